#!/usr/bin/env bash
# Lets this (x86_64) machine run loong64 binaries, so containerd, podman and chroot run loong64 images directly.
# bookworm's qemu 7.2 dies on Debian's loong64 binaries (they use LSX): the static qemu-loongarch64 of trixie's
# `qemu-user` (10.x) runs them. It is fetched once with apt from Debian's trixie suite, extracted (not installed)
# into the cache, and registered with binfmt_misc with the F flag: the kernel opens it at registration, so it works
# inside containers and chroots too.
# Exit status: 0 registered (or already), 3 binfmt_misc cannot be used here (the reason on stderr).
set -euo pipefail
CACHE=${MODELDEPLOY_CACHE:-$HOME/.cache/modeldeploy}
DIR=$CACHE/loong64
QEMU=$DIR/qemu-loongarch64
BINFMT=/proc/sys/fs/binfmt_misc
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
log() { echo "loong64-emulator: $*" >&2; }
unusable() { log "binfmt_misc cannot be used here: $*"; exit 3; }

ENTRY=$BINFMT/qemu-loongarch64
if [ -r "$ENTRY" ]; then
  grep -qx enabled "$ENTRY" && grep -qx "interpreter $QEMU" "$ENTRY" && exit 0
  # e.g. bookworm's qemu-user-static: its 7.2 dies on these binaries
  log "replacing the registered $(sed -n 's/^interpreter //p' "$ENTRY")"
  echo -1 > "$ENTRY" || unusable "cannot remove the registered $ENTRY"
fi

if [ ! -x "$QEMU" ]; then
  log "fetching qemu-user from Debian trixie"
  apt_dir=$(mktemp -d)
  trap 'rm -rf "$apt_dir"' EXIT
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial"
  echo "deb $MIRROR trixie main" > "$apt_dir/sources.list"
  # A private apt state: the host's sources and package lists stay untouched.
  apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=-"
            -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir" -o "Dir::Cache::pkgcache="
            -o "Dir::Cache::srcpkgcache=" -o "APT::Architecture=amd64" -o "APT::Architectures=amd64")
  apt-get -q "${apt_opts[@]}" update >"$apt_dir/log" 2>&1 || { cat "$apt_dir/log" >&2; exit 1; }
  (cd "$apt_dir" && apt-get -q "${apt_opts[@]}" download qemu-user) >"$apt_dir/log" 2>&1 ||
    { cat "$apt_dir/log" >&2; exit 1; }
  dpkg-deb -x "$apt_dir"/qemu-user_*.deb "$apt_dir/root"
  mkdir -p "$DIR"
  install -m 0755 "$apt_dir/root/usr/bin/qemu-loongarch64" "$QEMU.tmp" && mv "$QEMU.tmp" "$QEMU"
fi

if ! mountpoint -q "$BINFMT"; then
  mount -t binfmt_misc binfmt_misc "$BINFMT" 2>/dev/null ||
    unusable "mounting $BINFMT failed (not root, or no privilege)"
fi
[ -w "$BINFMT/register" ] || unusable "$BINFMT/register is not writable"
magic='\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x02\x01'
mask='\xff\xff\xff\xff\xff\xff\xff\xfc\x00\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff'
echo ":qemu-loongarch64:M::$magic:$mask:$QEMU:F" > "$BINFMT/register" 2>/dev/null ||
  unusable "registering $QEMU was refused"
log "registered $QEMU for loong64 binaries"
