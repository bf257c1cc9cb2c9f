#!/usr/bin/env bash
# Builds the project's images here, offline, and loads them into the local cluster's containerd:
#   localhost/modeldeploy-base:bookworm   Debian bookworm + python3 (debootstrap from Debian's archive; cached)
#   localhost/modeldeploy:dev             the operator image (Dockerfile target `operator`)
#   localhost/modeldeploy-runtime-cpu:dev the CPU serving runtime (target `runtime-cpu`, torch from this disk)
# and, when asked for by name, the Loongson (linux/loong64) images, run here under emulation (hack/loong64-emulator.sh):
#   localhost/modeldeploy:dev-loong64          the operator image on Debian sid's loong64 python3 packages
#                                              (target `operator-debian`)
#   localhost/llama.cpp-server:dev-loong64     llama-server from Debian's `llama.cpp` (target `llama.cpp-debian`)
# Their bases are Debian sid loong64 roots (debootstrap under emulation, then apt-get inside; cached as tarballs).
# Registries that serve manifest lists carry one multi-arch name instead (e.g. modeldeploy:TAG for amd64 + loong64,
# pushed with `podman manifest`); a node of one architecture cannot tell such names apart here, so arch tags.
# Usage: hack/build-images.sh [--no-load] [operator|runtime-cpu|operator-loong64|llama.cpp-loong64 ...]
#        (default: operator runtime-cpu). Exit status 3: loong64 asked for where binfmt_misc cannot be used.
set -euo pipefail
shopt -s inherit_errexit   # a failure inside $(...) fails the build too
cd "$(dirname "$0")/.."
CACHE=${MODELDEPLOY_CACHE:-$HOME/.cache/modeldeploy}
BASE=localhost/modeldeploy-base:bookworm
OPERATOR=localhost/modeldeploy:dev
RUNTIME_CPU=localhost/modeldeploy-runtime-cpu:dev
OPERATOR_LOONG64=localhost/modeldeploy:dev-loong64
LLAMACPP_LOONG64=localhost/llama.cpp-server:dev-loong64
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PIP=${PIP:-.venv/bin/pip}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
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
    operator|runtime-cpu|operator-loong64|llama.cpp-loong64) targets+=("$arg") ;;
    *) echo "usage: $0 [--no-load] [operator|runtime-cpu|operator-loong64|llama.cpp-loong64 ...]" >&2; exit 2 ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(operator runtime-cpu)

dockerfile_arg() { sed -n "s/^ARG $1=\"\(.*\)\"$/\1/p" Dockerfile; }

sid_loong64_base() {   # NAME PACKAGES...: a Debian sid loong64 root with these packages, imported as an image
  local name=$1; shift
  local key image tarball minbase root
  key=$(echo "$*" | sha256sum | cut -c1-12)
  image=localhost/debian-sid-loong64-$name:$key
  podman image exists "$image" && { echo "$image"; return; }
  tarball=$CACHE/images/sid-loong64-$name-$key.tar
  minbase=$CACHE/images/sid-loong64-minbase.tar
  root=$(mktemp -d)
  mkdir -p "$CACHE/images"
  if [ ! -s "$tarball" ]; then
    if [ ! -s "$minbase" ]; then
      log "debootstrap Debian sid loong64 (minbase) under emulation: minutes, once"
      debootstrap --arch=loong64 --variant=minbase sid "$root" "$DEBIAN_MIRROR" >"$root.log" 2>&1 ||
        { tail -n 30 "$root.log" >&2; exit 1; }
      rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root.log"
      tar -C "$root" -cf "$minbase.tmp" .
      mv "$minbase.tmp" "$minbase"
    else
      tar -C "$root" -xf "$minbase"
    fi
    # `debootstrap --include` cannot resolve virtual packages: apt inside the root does. A mirror's sid Release may be
    # past its Valid-Until (a frozen copy); its signature is still checked.
    log "apt-get install in the loong64 root ($name): $*"
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    mount -t proc proc "$root/proc"
    if ! chroot "$root" sh -c "apt-get -q -o Acquire::Check-Valid-Until=false update &&
          DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $* && apt-get clean" \
          >"$root.log" 2>&1; then
      umount "$root/proc"; tail -n 30 "$root.log" >&2; exit 1
    fi
    umount "$root/proc"
    rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/share/doc "$root"/usr/share/man "$root.log"
    : > "$root/etc/resolv.conf"
    tar -C "$root" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
  fi
  rm -rf "$root"
  podman import -q --os linux --arch loong64 "$tarball" "$image" >/dev/null
  echo "$image"
}

if [[ " ${targets[*]} " == *-loong64* ]]; then
  rc=0; bash hack/loong64-emulator.sh || rc=$?
  [ $rc = 0 ] || { log "cannot build loong64 images on this machine (see above)"; exit "$rc"; }
fi

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
  platform=linux/amd64 base=$BASE dockerfile_target=$target
  case $target in
    operator) image=$OPERATOR ;;
    runtime-cpu) image=$RUNTIME_CPU; fetch "$TORCH_SPEC" "$own[runtime,gpu]" ;;
    operator-loong64)
      image=$OPERATOR_LOONG64 platform=linux/loong64 dockerfile_target=operator-debian
      base=$(sid_loong64_base python $(dockerfile_arg DEBIAN_OPERATOR_PACKAGES)) ;;
    llama.cpp-loong64)
      image=$LLAMACPP_LOONG64 platform=linux/loong64 dockerfile_target=llama.cpp-debian
      base=$(sid_loong64_base llama.cpp $(dockerfile_arg DEBIAN_LLAMACPP_PACKAGES)) ;;
  esac
  # Bind-mounted wheels are invisible to the layer cache: their digests key the install layers (see Dockerfile).
  deps_digest=$(cd "$context/wheels" && ls | grep -v '^modeldeploy-' | sha256sum | cut -c1-16)
  # (of the sources, not the wheel: a wheel's bytes change with every build)
  source_digest=$(find operator -type f -not -path '*/__pycache__/*' -not -path '*.egg-info/*' | sort |
    xargs cat pyproject.toml | sha256sum | cut -c1-16)
  log "building $image (target $target)"
  podman build --network=none -q --platform "$platform" --target "$dockerfile_target" \
    --build-arg "BASE_IMAGE=$base" --build-arg "DEBIAN_IMAGE=$base" --build-arg APT_INSTALL=0 \
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
# The previous builds' layers, now untagged. Housekeeping only: a layer still held by a build that was killed (its
# buildah working container left behind) refuses to go, and that must not fail the images just built.
podman image prune -f >/dev/null 2>&1 || log "some untagged layers are still in use; left for the next build"
