#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and kube-proxy from Debian's `kubernetes`
# source package, plus the static pause binary, into a cache keyed by version. A second run finds them and returns.
# Pitfalls handled (see shared/notes/local-cluster.md): vendored reflect2 1.0.1 crashes under Go >= 1.18, GOPATH-mode
# build, and a failed build leaving empty files in _output/.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-1.20.2}
CACHE=${MODELDEPLOY_CACHE:-$HOME/.cache/modeldeploy}
BIN=$CACHE/kubernetes-$K8S_VERSION/bin
components=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)

complete() {
  for c in "${components[@]}" pause; do [ -s "$BIN/$c" ] || return 1; done
}
if complete; then echo "build-kubernetes: cached in $BIN"; exit 0; fi

work=$CACHE/kubernetes-$K8S_VERSION/src
mkdir -p "$work" "$BIN"
cd "$work"
# Debian versions it "1.20.5+really1.20.2"; the tarball unpacks to kubernetes-1.20.2/.
ls kubernetes_*.orig.tar.gz >/dev/null 2>&1 || apt-get source --download-only kubernetes
rm -rf "kubernetes-$K8S_VERSION"
tar xzf kubernetes_*.orig.tar.gz
[ -d "kubernetes-$K8S_VERSION" ] || { echo "build-kubernetes: the source is not version $K8S_VERSION" >&2; exit 1; }
cd "kubernetes-$K8S_VERSION"

rm -f vendor/github.com/modern-go/reflect2/*.go vendor/github.com/modern-go/reflect2/*.s
cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go /usr/share/gocode/src/github.com/modern-go/reflect2/*.s \
   vendor/github.com/modern-go/reflect2/

mkdir -p .go/src/k8s.io && ln -sfn ../../.. .go/src/k8s.io/kubernetes
what=""
for c in "${components[@]}"; do what="$what cmd/$c"; done
GOPATH=$PWD/.go CGO_ENABLED=0 make WHAT="${what# }"
for c in "${components[@]}"; do
  install -m 0755 "_output/local/bin/linux/amd64/$c" "$BIN/$c.tmp" && mv "$BIN/$c.tmp" "$BIN/$c"
done
gcc -static -O2 -o "$BIN/pause.tmp" build/pause/linux/pause.c && mv "$BIN/pause.tmp" "$BIN/pause"

cd "$work" && rm -rf "kubernetes-$K8S_VERSION"   # ~1 GB of build tree; the tarball stays for rebuilds
complete
echo "build-kubernetes: built into $BIN"
