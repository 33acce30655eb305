#!/usr/bin/env bash
# The Bento's image, `bentoml containerize` of a Bento in BENTOML_HOME (default: the one
# under FLOOD_HOME), tagged as the Bento: flood_risk:<version>, the BENTO_TAG compose runs.
# Skipped when that image exists. Usage: deploy/images/build-bento.sh flood_risk:<version>
set -euo pipefail
tag=${1:?usage: build-bento.sh flood_risk:<version>}
root=$(cd "$(dirname "$0")/../.." && pwd)
bentoml=${BENTOML_BIN:-$root/.venv/bin/bentoml}
export BENTOML_HOME=${BENTOML_HOME:-${FLOOD_HOME:-$root/.flood}/bentoml}
export BENTOML_DO_NOT_TRACK=true

if docker image inspect "$tag" >/dev/null 2>&1; then
    exit 0
fi
"$(dirname "$0")/build-base.sh"

# BentoML builds with BuildKit (DOCKER_BUILDKIT=1, and its cache mounts keep uv's downloads
# between builds). A docker CLI without the buildx plugin refuses BuildKit; Debian's docker.io
# client talks BuildKit to the engine itself, so it is put first on PATH when needed.
work=$(mktemp -d /tmp/flood-containerize.XXXXXX)
trap 'rm -rf "$work"' EXIT
if ! docker buildx version >/dev/null 2>&1 && [ -x /usr/bin/docker ]; then
    mkdir "$work/bin"
    ln -s /usr/bin/docker "$work/bin/docker"
    export PATH="$work/bin:$PATH"
fi
# BentoML refuses a Dockerfile template outside its working directory or under a hidden one
# (.flood/...): its temporary build context and its working directory are both this one.
started=$SECONDS
(cd "$work" && TMPDIR="$work" "$bentoml" containerize "$tag" --progress plain >"$work/build.log" 2>&1) || {
    tail -40 "$work/build.log" >&2
    exit 1
}
printf '[images] %s built (%d s, %s)\n' "$tag" "$((SECONDS - started))" \
    "$(docker image inspect "$tag" --format '{{.Size}}' | numfmt --to=iec)" >&2
