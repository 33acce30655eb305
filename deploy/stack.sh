#!/usr/bin/env bash
# `make stack`: the compose stack on this machine with the stand-ins of
# docker-compose.standins.yml, building whatever is missing first: the base and stand-in
# images, the secrets file, a signed Bento of the champion (training one if the registry has
# none) and its image. `make stack-down` stops it and keeps the volumes.
# Usage: deploy/stack.sh up|down
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bin=$root/.venv/bin
home=${FLOOD_HOME:-$root/.flood}
env_file=${STACK_ENV_FILE:-$home/stack.env}
if docker compose version >/dev/null 2>&1; then compose=(docker compose); else compose=("$bin/docker-compose"); fi
compose+=(-f docker-compose.yml -f docker-compose.standins.yml --env-file "$env_file")

log() { printf '[stack] %s\n' "$*" >&2; }

if [ "${1:-up}" = down ]; then
    [ -f "$env_file" ] || { log "no $env_file: nothing was started"; exit 0; }
    exec "${compose[@]}" stop -t 90
fi

mkdir -p "$home"
if [ ! -f "$env_file" ]; then
    # The secrets docker-compose.yml requires, random, readable only by this user.
    (umask 077 && "$bin/python" - >"$env_file" <<'PY'
import secrets
for name in ("POSTGRES_PASSWORD", "REDIS_PASSWORD"):
    print(f"{name}={secrets.token_hex(24)}")
for name in ("SECRET_KEY", "MODEL_SIGNING_KEY", "BACKUP_SIGNING_KEY"):
    print(f"{name}={secrets.token_urlsafe(48)}")
PY
    )
    log "secrets written to $env_file"
fi
set -a
# shellcheck disable=SC1090
. "$env_file"
set +a

deploy/images/build-base.sh
deploy/images/build-standins.sh

if [ -z "${BENTO_TAG:-}" ]; then
    # A Bento signed with this stack's MODEL_SIGNING_KEY (production refuses any other).
    if ! "$bin/flood" models list 2>/dev/null | grep -q champion; then
        log "no champion: training one (real data from FLOOD_DATA_DIR; production refuses synthetic)"
        "$bin/flood" train --register --promote --allow-failed
    fi
    tag=$("$bin/flood" bento build | tail -n 1)
    BENTO_TAG=${tag#flood_risk:}
    printf 'BENTO_TAG=%s\n' "$BENTO_TAG" >>"$env_file"
    log "Bento $tag built for the stack (BENTO_TAG in $env_file)"
fi
BENTOML_HOME="$home/bentoml" deploy/images/build-bento.sh "flood_risk:$BENTO_TAG"

"${compose[@]}" up -d --wait --wait-timeout 300
log "up: http://127.0.0.1:${STACK_PORT:-3000} (bento $BENTO_TAG); make stack-down stops it, volumes kept"
