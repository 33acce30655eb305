#!/usr/bin/env bash
# The stand-ins image of docker-compose.standins.yml (deploy/standins), when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
image=${FLOOD_STANDINS_IMAGE:-floodingnaque-standins:bookworm}
if docker image inspect "$image" >/dev/null 2>&1; then
    exit 0
fi
images/build-base.sh
started=$SECONDS
DOCKER_BUILDKIT=0 docker build -q --build-arg BASE_IMAGE="${FLOOD_BASE_IMAGE:-floodingnaque-base:bookworm}" \
    -t "$image" standins >/dev/null
printf '[images] %s built (%d s)\n' "$image" "$((SECONDS - started))" >&2
