#!/usr/bin/env bash
# Make sure the test Postgres and Redis are reachable, and Fashion-MNIST and Prometheus are installed.
# Starts the servers when installed but stopped; installs them with apt-get when absent and root.
# With CI=true a service that cannot be had is a failure, never a silent skip.
set -uo pipefail

PG_HOST=${PGHOST:-127.0.0.1}
PG_PORT=${PGPORT:-5432}
REDIS_PORT=${REDIS_PORT:-6379}
IS_ROOT=$([ "$(id -u)" = 0 ] && echo 1 || echo 0)
APT_UPDATED=0
FAILED=0

say() { echo "[services] $*"; }

apt_install() {
  if [ "$IS_ROOT" != 1 ]; then
    say "cannot install $* (not root): run 'sudo apt-get install -y $*'"
    return 1
  fi
  if [ "$APT_UPDATED" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

pg_up() { pg_isready -q -h "$PG_HOST" -p "$PG_PORT" 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; }

# --- PostgreSQL -------------------------------------------------------------------------------------
if [ -z "${BACKFILL_TEST_DATABASE_URL:-}" ]; then
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    say "PostgreSQL not installed; installing"
    apt_install postgresql || true
  fi
  if ! pg_up && command -v pg_ctlcluster >/dev/null 2>&1; then
    for v in $(ls /etc/postgresql 2>/dev/null); do
      say "starting PostgreSQL $v"
      pg_ctlcluster --skip-systemctl-redirect "$v" main start 2>/dev/null || true
    done
    for _ in $(seq 1 30); do pg_up && break; sleep 1; done
  fi
  if pg_up; then
    # trust auth on loopback is the machine's default; make sure the `test` database exists
    psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -tAc "select 1 from pg_database where datname='test'" postgres 2>/dev/null | grep -q 1 \
      || psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -qc "create database test" postgres 2>/dev/null \
      || su postgres -c "createdb test" 2>/dev/null || true
    say "PostgreSQL ready at $PG_HOST:$PG_PORT"
  else
    say "PostgreSQL is NOT reachable at $PG_HOST:$PG_PORT"; FAILED=1
  fi
fi

# --- Redis --------------------------------------------------------------------------------------------
if [ -z "${BACKFILL_TEST_REDIS_URL:-}" ]; then
  if ! command -v redis-server >/dev/null 2>&1; then
    say "Redis not installed; installing"
    apt_install redis-server || true
  fi
  if ! redis_up && command -v redis-server >/dev/null 2>&1; then
    say "starting Redis"
    mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log >/dev/null 2>&1 \
      || redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no >/dev/null
    for _ in $(seq 1 20); do redis_up && break; sleep 0.5; done
  fi
  if redis_up; then say "Redis ready at 127.0.0.1:$REDIS_PORT"; else say "Redis is NOT reachable"; FAILED=1; fi
fi

# --- Data and tools the tests use -------------------------------------------------------------------
FMNIST_DIR=${BACKFILL_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
if [ ! -f "$FMNIST_DIR/t10k-images-idx3-ubyte.gz" ]; then
  say "Fashion-MNIST not found in $FMNIST_DIR; installing Debian's dataset-fashion-mnist"
  apt_install dataset-fashion-mnist || { say "missing: apt-get install -y dataset-fashion-mnist"; FAILED=1; }
fi
if ! command -v prometheus >/dev/null 2>&1; then
  say "Prometheus not installed; installing Debian's prometheus (for the dashboard test)"
  apt_install prometheus || { say "missing: apt-get install -y prometheus"; FAILED=1; }
  # the package may start a system instance on :9090; the tests run their own on another port
fi

if [ "$FAILED" = 1 ]; then
  if [ "${CI:-}" = "true" ]; then say "a required service or package is missing (CI=true): failing"; exit 1; fi
  say "some services are missing; their tests will be skipped (they fail under CI=true)"
fi
exit 0
