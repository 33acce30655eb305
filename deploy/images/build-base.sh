#!/usr/bin/env bash
# The local base image every container of the stack builds on: Debian bookworm from Debian's
# own packages (debootstrap), because no image registry can be reached from here. Idempotent:
# each image is built only when it is missing. Usage: deploy/images/build-base.sh
set -euo pipefail
cd "$(dirname "$0")"

ROOTFS_IMAGE=${FLOOD_ROOTFS_IMAGE:-floodingnaque-debian:bookworm}
BASE_IMAGE=${FLOOD_BASE_IMAGE:-floodingnaque-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

log() { printf '[images] %s\n' "$*" >&2; }
have() { docker image inspect "$1" >/dev/null 2>&1; }

if ! have "$ROOTFS_IMAGE"; then
    command -v debootstrap >/dev/null || { echo "need debootstrap (apt-get install debootstrap)" >&2; exit 1; }
    rootfs=$(mktemp -d /tmp/flood-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    log "debootstrap bookworm (minbase) into $rootfs"
    started=$SECONDS
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 || { tail -20 "$rootfs.log" >&2; exit 1; }
    rm -f "$rootfs.log"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" -c . | docker import - "$ROOTFS_IMAGE" >/dev/null
    log "$ROOTFS_IMAGE imported ($((SECONDS - started)) s)"
fi

if ! have "$BASE_IMAGE"; then
    context=$(mktemp -d /tmp/flood-base-context.XXXXXX)
    trap 'rm -rf "$context"' EXIT
    cp base/Dockerfile "$context/"
    # Certificate authorities the host trusts beyond Debian's (a proxy's or a company's):
    # pip and uv inside the image must reach the package index the host reaches.
    mkdir -p "$context/ca-certificates"
    find /usr/local/share/ca-certificates -maxdepth 1 -name '*.crt' -exec cp {} "$context/ca-certificates/" \; 2>/dev/null || true
    started=$SECONDS
    DOCKER_BUILDKIT=0 docker build -q --build-arg ROOTFS="$ROOTFS_IMAGE" -t "$BASE_IMAGE" "$context" >/dev/null
    log "$BASE_IMAGE built ($((SECONDS - started)) s)"
fi
