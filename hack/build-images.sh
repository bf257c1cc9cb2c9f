#!/usr/bin/env bash
# Builds the project's images here, offline, and loads them into the local cluster's containerd:
#   localhost/modeldeploy-base:bookworm   Debian bookworm + python3 (debootstrap from Debian's archive; cached)
#   localhost/modeldeploy:dev             the operator image (Dockerfile target `operator`)
# Usage: hack/build-images.sh [--no-load]
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${MODELDEPLOY_CACHE:-$HOME/.cache/modeldeploy}
BASE=localhost/modeldeploy-base:bookworm
OPERATOR=localhost/modeldeploy:dev
PIP=${PIP:-.venv/bin/pip}
log() { echo "build-images: $*" >&2; }

command -v debootstrap >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null; }

if ! podman image exists "$BASE"; then
  tarball=$CACHE/images/base-bookworm.tar
  if [ ! -s "$tarball" ]; then
    log "debootstrap bookworm (python3) into a fresh root"
    root=$(mktemp -d)
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" \
      http://deb.debian.org/debian >/dev/null
    rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/usr/share/doc "$root"/usr/share/man
    mkdir -p "$(dirname "$tarball")"
    tar -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$root"
  fi
  podman import "$tarball" "$BASE" >/dev/null
fi

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
mkdir "$context/wheels"
log "wheels for the operator image"
pip_log=$context/pip.log
$PIP wheel -q --no-deps -w "$context/wheels" . >"$pip_log" 2>&1 || { cat "$pip_log" >&2; exit 1; }
$PIP download -q --only-binary=:all: -d "$context/wheels" "$(ls "$context"/wheels/modeldeploy-*.whl)[gpu]" \
  >"$pip_log" 2>&1 || { cat "$pip_log" >&2; exit 1; }
rm -f "$pip_log"
cp Dockerfile "$context/"
log "building $OPERATOR"
podman build --network=none -q --target operator --build-arg "BASE_IMAGE=$BASE" -t "$OPERATOR" "$context" >/dev/null
podman image inspect "$OPERATOR" --format "build-images: $OPERATOR {{.Size}} bytes" >&2

[ "${1:-}" = "--no-load" ] || bash hack/cluster.sh load-image "$OPERATOR"
