#!/usr/bin/env bash
# `make deploy-test`: the compose stack built and run for real, with the README's "Run the full stack" commands.
#
# 1. A Docker engine: the one `docker info` reaches; else the sandbox engine of ../shared/tools/sandbox-docker
#    (or $SANDBOX_DOCKER, or /work/shared/...), started here when it is not running and stopped again at the end.
# 2. Compose v2 (`docker compose`) when installed, else v1 (`docker-compose`); $COMPOSE overrides.
# 3. Fresh random operator token and Postgres/Redis passwords; `compose config` must refuse to run without each.
# 4. `compose build`, then `compose up -d --scale worker=2 api worker prometheus` (postgres, redis and migrate
#    come up as their dependencies). Grafana is left out: no Grafana image can be pulled here, so its panels
#    are drawn from the same Prometheus queries instead (devtools/dashboard.py).
# 5. The backend network is internal, Redis refuses a client without the password, and only the api and
#    Prometheus publish ports.
# 6. devtools/deploy_check.py: readiness, Prometheus scraping the api and both workers, a gallery loaded through
#    the API, a v1 -> v2 rollout to completion, every item searchable before and after, every dashboard expression
#    with data, and the dashboard rendered to $DEPLOY_OUT/dashboard.png.
# 7. `compose down -v` (this project's containers, networks and volumes only), superseded images pruned on the
#    sandbox engine (its layer cache stays for the next run), and the engine stopped if step 1 started it.
#    Compose logs are kept in $DEPLOY_OUT/compose.log, the build's in $DEPLOY_OUT/build.log.
#
# Settings: DEPLOY_ITEMS (300), DEPLOY_RATE (items/s of the rollout, 6), DEPLOY_OUT (runs/deploy),
# COMPOSE_PROJECT_NAME (backfill-deploy-test: never the project of an operator's own stack),
# BACKFILL_TORCH_INDEX_URL (build argument; empty on the sandbox engine, whose python image offers the CPU torch).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
OUT=${DEPLOY_OUT:-$ROOT/runs/deploy}
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-backfill-deploy-test}
T0=$SECONDS
log() { echo "[deploy-test $(date -u +%H:%M:%S) +$((SECONDS - T0))s] $*" >&2; }
die() { log "FAILED: $*"; exit 1; }
mkdir -p "$OUT"

# The sandbox script beside this checkout, else where these machines keep it (a CI clone may live elsewhere).
SANDBOX=${SANDBOX_DOCKER:-}
if [ -z "$SANDBOX" ]; then
  for candidate in "$ROOT/../shared/tools/sandbox-docker/sandbox-docker.sh" /work/shared/tools/sandbox-docker/sandbox-docker.sh; do
    if [ -f "$candidate" ]; then SANDBOX=$candidate; break; fi
  done
  SANDBOX=${SANDBOX:-$ROOT/../shared/tools/sandbox-docker/sandbox-docker.sh}
fi
STARTED_ENGINE="" ON_SANDBOX="" COMPOSE_CMD=()
compose() { "${COMPOSE_CMD[@]}" "$@"; }
cleanup() {
  local rc=$?
  if [ "${#COMPOSE_CMD[@]}" -gt 0 ]; then
    compose logs --no-color > "$OUT/compose.log" 2>&1 || true
    if [ "$rc" != 0 ]; then
      compose ps >&2 || true
      log "last compose log lines (all of them in $OUT/compose.log):"; tail -60 "$OUT/compose.log" >&2 || true
    fi
    compose down -v --remove-orphans >/dev/null 2>&1 || log "compose down failed"
    # The sandbox engine keeps its layer cache for the next run (/var/lib/sandbox-docker); only superseded
    # images go. A user's own engine is left as it is.
    if [ -n "$ON_SANDBOX" ]; then docker image prune -f >/dev/null 2>&1 || true; fi
  fi
  if [ -n "$STARTED_ENGINE" ]; then log "stopping the sandbox engine this test started"; bash "$SANDBOX" stop || true; fi
  if [ "$rc" = 0 ]; then log "passed in $((SECONDS - T0)) s"; else log "FAILED (exit $rc) after $((SECONDS - T0)) s"; fi
}
trap cleanup EXIT

# --- 1. the engine ------------------------------------------------------------------------------------------
if docker info >/dev/null 2>&1; then
  log "Docker engine: the running one (${DOCKER_HOST:-default socket})"
elif [ -f "$SANDBOX" ]; then
  eval "$(bash "$SANDBOX" env)"
  if docker info >/dev/null 2>&1; then
    log "Docker engine: the sandbox engine, already running"
  else
    log "Docker engine: starting the sandbox engine ($SANDBOX; about 3 min the first time on a machine)"
    STARTED_ENGINE=1  # from here on, a dockerd of the sandbox is ours to stop, even after a failed start
    for attempt in 1 2 3; do  # apt-get inside it fails while another apt-get holds the dpkg lock
      if bash "$SANDBOX" start >/dev/null; then break; fi
      [ "$attempt" = 3 ] && die "the sandbox engine did not start"
      log "sandbox engine start failed (attempt $attempt); retrying in 30 s"; sleep 30
    done
  fi
else
  die "no Docker engine: \`docker info\` fails and there is no sandbox script at $SANDBOX"
fi
if [ -f "$SANDBOX" ] && [ "$(bash "$SANDBOX" env | sed -n 's/.*DOCKER_HOST=\([^ ]*\).*/\1/p')" = "${DOCKER_HOST:-}" ]; then
  # The sandbox engine: the classic builder, and its python image offers the CPU torch wheel (PIP_FIND_LINKS)
  # while the PyTorch index is not reachable from it, so torch comes from pip's default index and those wheels.
  export DOCKER_BUILDKIT=0 BACKFILL_TORCH_INDEX_URL=${BACKFILL_TORCH_INDEX_URL-}
  ON_SANDBOX=1
fi

# --- 2. compose v2 or v1 ------------------------------------------------------------------------------------
if [ -n "${COMPOSE:-}" ]; then
  read -r -a found <<< "$COMPOSE"
elif docker compose version >/dev/null 2>&1; then
  found=(docker compose)
elif command -v docker-compose >/dev/null; then
  found=(docker-compose)
else
  die "neither \`docker compose\` (v2) nor \`docker-compose\` (v1) is installed"
fi
log "compose: ${found[*]} ($("${found[@]}" version --short 2>/dev/null || "${found[@]}" version | head -1))"


# --- 3. secrets: required, no defaults -----------------------------------------------------------------------
secret() { "$PY" -c 'import secrets; print(secrets.token_hex(24))'; }
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
BACKFILL_OPERATOR_TOKEN=$(secret); POSTGRES_PASSWORD=$(secret); REDIS_PASSWORD=$(secret)
export BACKFILL_OPERATOR_TOKEN POSTGRES_PASSWORD REDIS_PASSWORD
: > "$OUT/empty.env"  # so that a local .env cannot supply what the shell does not
for var in BACKFILL_OPERATOR_TOKEN POSTGRES_PASSWORD REDIS_PASSWORD; do
  if refusal=$(env -u "$var" "${found[@]}" --env-file "$OUT/empty.env" config -q 2>&1); then
    die "compose starts without $var"
  fi
  case "$refusal" in *"$var"*) ;; *) die "compose config failed without $var, but not naming it: $refusal";; esac
done
"${found[@]}" config -q || die "compose config"
COMPOSE_CMD=("${found[@]}")  # from here on, the cleanup collects the logs and takes the stack down
log "compose refuses to start without BACKFILL_OPERATOR_TOKEN, POSTGRES_PASSWORD or REDIS_PASSWORD"
export BACKFILL_API_PORT=${BACKFILL_API_PORT:-$(free_port)} PROMETHEUS_PORT=${PROMETHEUS_PORT:-$(free_port)}
# The live probe every 5 s so that its panels fill during a one-minute rollout; the guard is not under test here
# (a 300-item gallery is too small for its 0.02 margin).
export BACKFILL_PROBE_INTERVAL_SECONDS=5 BACKFILL_GUARD_MARGIN=1

# --- 4. build and start ----------------------------------------------------------------------------------------
log "building the image (torch index: '${BACKFILL_TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}')"
compose build > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log" >&2; die "compose build (log: $OUT/build.log)"; }
if grep -q "^smoke:" "$OUT/build.log"; then grep "^smoke:" "$OUT/build.log" | tail -1 >&2
else log "smoke check: cached (it passed when its layer was built)"; fi
image=${BACKFILL_IMAGE:-online-backfill:latest} base=${BACKFILL_BASE_IMAGE:-python:3.11-slim}
size() { docker image inspect -f '{{.Size}}' "$1" | awk '{printf "%.2f GB", $1 / 1e9}'; }
added=$(( $(docker image inspect -f '{{.Size}}' "$image") - $(docker image inspect -f '{{.Size}}' "$base") ))
log "image $image: $(size "$image") ($(echo "$added" | awk '{printf "%.2f GB", $1 / 1e9}') on top of $base, $(size "$base")), user $(docker image inspect -f '{{.Config.User}}' "$image")"
case "$(docker image inspect -f '{{.Config.User}}' "$image")" in ""|root|0|root:*|0:*) die "the image runs as root";; esac
log "starting postgres, redis, migrate, api, 2 workers and prometheus"
compose up -d --scale worker=2 api worker prometheus

# --- 5. isolation -------------------------------------------------------------------------------------------------
[ "$(docker network inspect -f '{{.Internal}}' "${COMPOSE_PROJECT_NAME}_backend")" = true ] || die "backend network is not internal"
noauth=$(compose exec -T redis sh -c 'unset REDISCLI_AUTH; redis-cli ping' 2>&1 || true)
case "$noauth" in *NOAUTH*) ;; *) die "redis answered a client without the password: $noauth";; esac
published=$(docker ps --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" \
  --format '{{.Label "com.docker.compose.service"}} {{.Ports}}' | awk '$0 ~ /->/ {print $1}' | sort -u | xargs)
[ "$published" = "api prometheus" ] || die "published ports on: '$published' (expected: api prometheus)"
log "backend network internal; redis refuses a client without the password; ports published by: $published"

# --- 6. the checks through the API and Prometheus ------------------------------------------------------------------
"$PY" -m devtools.deploy_check --api "http://127.0.0.1:$BACKFILL_API_PORT" \
  --prometheus "http://127.0.0.1:$PROMETHEUS_PORT" --workers 2 --items "${DEPLOY_ITEMS:-300}" \
  --rate "${DEPLOY_RATE:-6}" --out "$OUT"
