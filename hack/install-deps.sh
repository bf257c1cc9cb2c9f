#!/usr/bin/env bash
# Installs the Debian packages the local cluster and the image builds need. Idempotent: a machine that already
# has everything is left alone (no apt-get update), so warm runs stay fast.
set -euo pipefail

packages=(etcd-server golang-go rsync jq containerd runc containernetworking-plugins podman iptables openssl gcc
          golang-github-modern-go-reflect2-dev conntrack iproute2 unzip busybox-static
          tinyproxy    # the real forward proxy the puller tests go through
          wrk)         # the load generator of bench/gateway_bench.py

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep "install ok installed" >/dev/null || missing+=("$p")
done

# kube binaries are built from Debian's `kubernetes` source package, so the source lists must be enabled.
src_list=/etc/apt/sources.list.d/modeldeploy-src.sources
if [ ! -f "$src_list" ]; then
  cat > "$src_list" <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  need_update=1
fi

if [ "${#missing[@]}" -gt 0 ] || [ -n "${need_update:-}" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
echo "install-deps: Debian packages present"

command -v npm >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends npm; }
echo "install-deps: helm at $(bash "$(dirname "$0")/install-helm.sh")"
