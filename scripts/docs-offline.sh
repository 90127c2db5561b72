#!/usr/bin/env bash
# Render the API's /docs page with no network at all: a new network namespace with only loopback (`unshare
# -n`, root), `backfill serve` on the embedded defaults inside it, and headless Chromium loading
# http://127.0.0.1:PORT/docs. Prints the rendered DOM (Swagger UI's operations appear only when its
# JavaScript ran, which needs its assets from the API itself); with SCREENSHOT=path.png it also saves a
# screenshot. Used by tests/integration/test_operator_docs.py; docs/api-docs-offline.png was made by it.
#
#   sudo unshare -n bash scripts/docs-offline.sh > dom.html      (or run it as root)
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${PORT:-8765}"
BACKFILL="${BACKFILL:-.venv/bin/backfill}"
CHROMIUM="${CHROMIUM:-chromium}"
WORK="$(mktemp -d)"
ip link set lo up
export BACKFILL_DATA_DIR="$WORK/data"
"$BACKFILL" serve --port "$PORT" >"$WORK/serve.log" 2>&1 &
SERVE=$!
trap 'kill $SERVE 2>/dev/null || true; wait $SERVE 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 1 240); do
  curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break
  sleep 0.5
done
curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null || { tail -20 "$WORK/serve.log" >&2; exit 1; }
FLAGS=(--headless --no-sandbox --disable-gpu --disable-dev-shm-usage --hide-scrollbars
       --user-data-dir="$WORK/chromium" --window-size=1280,1500 --virtual-time-budget=15000)
if [[ -n "${SCREENSHOT:-}" ]]; then
  "$CHROMIUM" "${FLAGS[@]}" --screenshot="$SCREENSHOT" "http://127.0.0.1:$PORT/docs" >/dev/null 2>&1
fi
"$CHROMIUM" "${FLAGS[@]}" --dump-dom "http://127.0.0.1:$PORT/docs" 2>/dev/null
