#!/usr/bin/env bash
# Fashion-MNIST comes from Debian's dataset-fashion-mnist package; install it when missing and root.
set -euo pipefail
DIR=${BACKFILL_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
if [ -f "$DIR/t10k-images-idx3-ubyte.gz" ]; then exit 0; fi
if [ "$(id -u)" = 0 ]; then
  echo "Fashion-MNIST not found in $DIR; installing Debian's dataset-fashion-mnist"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
else
  echo "Fashion-MNIST not found in $DIR. Install it with: sudo apt-get install -y dataset-fashion-mnist" >&2
  echo "(or point BACKFILL_FASHION_MNIST_DIR at a folder holding the four IDX .gz files)" >&2
  exit 1
fi
