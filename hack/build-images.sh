#!/usr/bin/env bash
# Builds the project's images here, offline, and loads them into the local cluster's containerd:
#   localhost/modeldeploy-base:bookworm   Debian bookworm + python3 (debootstrap from Debian's archive; cached)
#   localhost/modeldeploy:dev             the operator image (Dockerfile target `operator`)
#   localhost/modeldeploy-runtime-cpu:dev the CPU serving runtime (target `runtime-cpu`, torch from this disk)
# Usage: hack/build-images.sh [--no-load] [operator|runtime-cpu ...]   (default: both)
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${MODELDEPLOY_CACHE:-$HOME/.cache/modeldeploy}
BASE=localhost/modeldeploy-base:bookworm
OPERATOR=localhost/modeldeploy:dev
RUNTIME_CPU=localhost/modeldeploy-runtime-cpu:dev
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
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

load=1
targets=()
for arg in "$@"; do
  case $arg in
    --no-load) load=0 ;;
    operator|runtime-cpu) targets+=("$arg") ;;
    *) echo "usage: $0 [--no-load] [operator|runtime-cpu ...]" >&2; exit 2 ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(operator runtime-cpu)

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
mkdir "$context/wheels"
cp Dockerfile "$context/"
pip_log=$context/pip.log
fetch() {   # wheels of everything asked for, from the indexes and wheel folders pip is configured with
  $PIP download -q --only-binary=:all: -d "$context/wheels" "$@" >"$pip_log" 2>&1 || { cat "$pip_log" >&2; exit 1; }
}
log "wheels"
$PIP wheel -q --no-deps -w "$context/wheels" . >"$pip_log" 2>&1 || { cat "$pip_log" >&2; exit 1; }
own=$(ls "$context"/wheels/modeldeploy-*.whl)
fetch "$own[gpu]"

for target in "${targets[@]}"; do
  case $target in
    operator) image=$OPERATOR ;;
    runtime-cpu) image=$RUNTIME_CPU; fetch "$TORCH_SPEC" "$own[runtime,gpu]" ;;
  esac
  # Bind-mounted wheels are invisible to the layer cache: their digests key the install layers (see Dockerfile).
  deps_digest=$(cd "$context/wheels" && ls | grep -v '^modeldeploy-' | sha256sum | cut -c1-16)
  # (of the sources, not the wheel: a wheel's bytes change with every build)
  source_digest=$(find operator -type f -not -path '*/__pycache__/*' -not -path '*.egg-info/*' | sort |
    xargs cat pyproject.toml | sha256sum | cut -c1-16)
  log "building $image (target $target)"
  podman build --network=none -q --target "$target" --build-arg "BASE_IMAGE=$BASE" \
    --build-arg "TORCH_SPEC=$TORCH_SPEC" --build-arg "DEPS_DIGEST=$deps_digest" \
    --build-arg "SOURCE_DIGEST=$source_digest" -t "$image" "$context" >/dev/null
  podman image inspect "$image" --format "build-images: $image {{.Size}} bytes" >&2
  if [ "$load" = 1 ]; then
    # Loading takes ~20 s a GB: skip it when containerd already holds this very build.
    id=$(podman image inspect --format '{{.Id}}' "$image")
    marker=$CACHE/images/loaded-$(echo "$image" | tr '/:' '__')
    if [ "$(cat "$marker" 2>/dev/null)" = "$id" ] && ctr -n k8s.io images ls -q 2>/dev/null | grep -xF "$image" >/dev/null; then
      log "$image already in the cluster"
    else
      bash hack/cluster.sh load-image "$image" && echo "$id" > "$marker"
    fi
  fi
done
podman image prune -f >/dev/null   # the previous builds' layers, now untagged
