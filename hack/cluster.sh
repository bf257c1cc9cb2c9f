#!/usr/bin/env bash
# A real single-node Kubernetes 1.20 on this machine, without Docker: etcd, kube-apiserver (RBAC on),
# kube-controller-manager, kube-scheduler, containerd + runc + CNI bridge, kubelet, kube-proxy, and a hostPath
# storage driver (provisioner + resizer) behind two StorageClasses. The recipe and its pitfalls:
# shared/notes/local-cluster.md.
#
#   hack/cluster.sh start              start (or reuse) the cluster; prints the kubeconfig path. On a running
#                                      cluster it only (re)applies the StorageClasses and restarts the storage
#                                      driver if its script or settings changed: the control plane stays up
#   hack/cluster.sh stop               stop every component and the pods' containers
#   hack/cluster.sh status             exit 0 when the API answers and the node is Ready
#   hack/cluster.sh load-image IMAGE   copy a podman image into containerd's k8s.io namespace
#   hack/cluster.sh logs [N]           tail every component's log
#   hack/cluster.sh kubeconfig         print the admin kubeconfig path
#   hack/cluster.sh reset              stop, then delete all cluster state (etcd data, certificates, volumes)
#
# Every address is on this machine: the control plane listens on the CNI bridge's gateway address, so both the host
# and in-cluster pods (the operator among them) reach it; etcd and the kubelet's helpers stay on loopback.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-1.20.2}
CACHE=${MODELDEPLOY_CACHE:-$HOME/.cache/modeldeploy}
BIN=$CACHE/kubernetes-$K8S_VERSION/bin
STATE=${MODELDEPLOY_CLUSTER_DIR:-$CACHE/cluster}
LOGS=$STATE/logs
PIDS=$STATE/pids
PKI=$STATE/pki
KUBECONFIG_FILE=$STATE/admin.kubeconfig

NODE_NAME=node1
NODE_IP=10.244.0.1          # the cni0 bridge's address: the pods' gateway and the node's InternalIP
POD_CIDR=10.244.0.0/24
SERVICE_CIDR=10.0.0.0/24
API_SERVICE_IP=10.0.0.1
API_PORT=6443
ETCD_PORT=2379
PAUSE_IMAGE=localhost/pause:3.4.1
PROVISIONER=modeldeploy.io/local-hostpath   # one driver, both classes (as one CSI driver serves many classes)
VOLUMES=$STATE/volumes
HACK=$(cd "$(dirname "$0")" && pwd)

log() { echo "cluster: $*" >&2; }
die() { log "ERROR: $*"; tail_logs 30; exit 1; }
kc() { kubectl --kubeconfig "$KUBECONFIG_FILE" "$@"; }

tail_logs() {
  local n=${1:-40}
  for f in "$LOGS"/*.log; do
    [ -f "$f" ] || continue
    echo "===== $f (last $n lines)" >&2
    tail -n "$n" "$f" >&2
  done
}

alive() { local f=$PIDS/$1.pid; [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; }

# Runs a component in its own session so it outlives this script; its output goes to logs/NAME.log.
launch() {
  local name=$1; shift
  if alive "$name"; then return 0; fi
  log "starting $name"
  # 9>&-: the start lock (cmd_start) must not be inherited by what outlives this script.
  setsid nohup "$@" >>"$LOGS/$name.log" 2>&1 </dev/null 9>&- &
  echo $! >"$PIDS/$name.pid"
}

wait_for() {   # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || die "timed out after ${limit}s waiting for $what"
    sleep 0.5
  done
}

require_binaries() {
  for c in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy pause; do
    [ -x "$BIN/$c" ] || die "$BIN/$c is missing: run hack/build-kubernetes.sh (make kube-binaries) first"
  done
  for c in etcd containerd runc podman ctr kubectl openssl iptables jq; do
    command -v "$c" >/dev/null || die "$c is not installed: run hack/install-deps.sh (make deps) first"
  done
}

make_pki() {
  [ -f "$PKI/done" ] && return 0
  log "creating certificates and tokens in $PKI"
  mkdir -p "$PKI" && cd "$PKI"
  openssl genrsa -out ca.key 2048 2>/dev/null
  openssl req -x509 -new -key ca.key -days 3650 -subj "/CN=modeldeploy-local-ca" -out ca.crt 2>/dev/null
  openssl genrsa -out apiserver.key 2048 2>/dev/null
  cat >apiserver.cnf <<EOF
[req]
distinguished_name = dn
[dn]
[ext]
subjectAltName = IP:$NODE_IP,IP:$API_SERVICE_IP,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
keyUsage = digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
EOF
  openssl req -new -key apiserver.key -subj "/CN=kube-apiserver" -out apiserver.csr 2>/dev/null
  openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
    -extfile apiserver.cnf -extensions ext -out apiserver.crt 2>/dev/null
  openssl genrsa -out sa.key 2048 2>/dev/null
  openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  local token
  token=$(openssl rand -hex 24)
  echo "$token,admin,admin,\"system:masters\"" >tokens.csv
  chmod 600 ./*.key tokens.csv
  cat >"$KUBECONFIG_FILE" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: https://$NODE_IP:$API_PORT
    certificate-authority: $PKI/ca.crt
users:
- name: admin
  user:
    token: $token
contexts:
- name: local
  context: {cluster: local, user: admin}
current-context: local
EOF
  chmod 600 "$KUBECONFIG_FILE"
  touch done
  cd - >/dev/null
}

setup_network() {
  if ! ip link show cni0 >/dev/null 2>&1; then
    ip link add cni0 type bridge
  fi
  # "replace" is idempotent; "show | grep -q || add" raced under pipefail (grep -q exits early, ip gets SIGPIPE).
  ip addr replace "$NODE_IP/24" dev cni0
  ip link set cni0 up
  sysctl -qw net.ipv4.ip_forward=1
  # Pod -> Service -> pod on the same bridge needs bridged traffic to pass iptables (kube-proxy's DNAT).
  sysctl -qw net.bridge.bridge-nf-call-iptables=1 2>/dev/null || log "warning: bridge-nf-call-iptables not settable"
  mkdir -p /etc/cni/net.d
  cat >/etc/cni/net.d/10-modeldeploy.conflist <<EOF
{
  "cniVersion": "0.4.0",
  "name": "modeldeploy",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$NODE_IP"}]],
              "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
}

start_etcd() {
  launch etcd etcd --name local --data-dir "$STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
    --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
    --initial-cluster "local=http://127.0.0.1:$((ETCD_PORT + 1))"
  wait_for 60 etcd curl -sf "http://127.0.0.1:$ETCD_PORT/health"
}

start_control_plane() {
  launch kube-apiserver "$BIN/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address="$NODE_IP" --advertise-address="$NODE_IP" --secure-port="$API_PORT" --insecure-port=0 \
    --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" --client-ca-file="$PKI/ca.crt" \
    --token-auth-file="$PKI/tokens.csv" --authorization-mode=Node,RBAC \
    --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc \
    --service-cluster-ip-range="$SERVICE_CIDR" --allow-privileged=true \
    --kubelet-preferred-address-types=InternalIP
  wait_for 120 "kube-apiserver /readyz" kc get --raw /readyz

  launch kube-controller-manager "$BIN/kube-controller-manager" --kubeconfig="$KUBECONFIG_FILE" \
    --controllers='*,-nodeipam,-cloud-node-lifecycle,-service,-route,-attachdetach' \
    --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
    --leader-elect=false --port=0 --secure-port=0
  launch kube-scheduler "$BIN/kube-scheduler" --kubeconfig="$KUBECONFIG_FILE" \
    --leader-elect=false --port=0 --secure-port=0
}

start_containerd() {
  local cfg=$STATE/containerd.toml
  if [ ! -f "$cfg" ]; then
    # restrict_oom_score_adj: this machine lacks CAP_SYS_RESOURCE; without it every sandbox fails in runc.
    containerd config default |
      sed -e "s#sandbox_image = .*#sandbox_image = \"$PAUSE_IMAGE\"#" \
          -e 's#bin_dir = .*#bin_dir = "/usr/lib/cni"#' \
          -e 's#conf_dir = .*#conf_dir = "/etc/cni/net.d"#' \
          -e 's#restrict_oom_score_adj = .*#restrict_oom_score_adj = true#' >"$cfg"
  fi
  launch containerd containerd --config "$cfg"
  wait_for 60 containerd ctr version
  if ! ctr -n k8s.io images ls -q | grep -x "$PAUSE_IMAGE" >/dev/null; then
    log "building $PAUSE_IMAGE"
    local dir
    dir=$(mktemp -d)
    cp "$BIN/pause" "$dir/pause"
    tar -C "$dir" -c . | podman import --change 'ENTRYPOINT ["/pause"]' - "$PAUSE_IMAGE" >/dev/null
    rm -rf "$dir"
    load_image "$PAUSE_IMAGE"
  fi
}

start_node() {
  mkdir -p "$STATE/kubelet"
  cat >"$STATE/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
cgroupDriver: cgroupfs
failSwapOn: false
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
enforceNodeAllocatable: []
evictionHard: {}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
serializeImagePulls: false
EOF
  launch kubelet "$BIN/kubelet" --config="$STATE/kubelet/config.yaml" --kubeconfig="$KUBECONFIG_FILE" \
    --container-runtime=remote --container-runtime-endpoint=unix:///run/containerd/containerd.sock \
    --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" --root-dir=/var/lib/kubelet
  launch kube-proxy "$BIN/kube-proxy" --kubeconfig="$KUBECONFIG_FILE" --proxy-mode=iptables \
    --cluster-cidr="$POD_CIDR" --hostname-override="$NODE_NAME" --conntrack-max-per-core=0 \
    --metrics-bind-address=127.0.0.1:10249 --healthz-bind-address=127.0.0.1:10256

  wait_for 120 "node $NODE_NAME Ready" node_ready
  # The node registers tainted not-ready; the taint can outlive the first Ready heartbeat by a few seconds.
  kc taint node "$NODE_NAME" node.kubernetes.io/not-ready:NoSchedule- >/dev/null 2>&1 || true
}

node_ready() {
  [ "$(kc get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]
}

# The StorageClasses users meet on managed clusters, both served by hack/hostpath-provisioner.sh:
# - local-hostpath (default, Immediate): a claim binds as soon as it is created, on the one node.
# - local-wffc (WaitForFirstConsumer, as on GKE/EKS/AKS, kind and k3s): the PV controller leaves a claim Pending
#   until the scheduler places a pod using it and annotates volume.kubernetes.io/selected-node; then it hands the
#   claim to the provisioner, which makes a PV with nodeAffinity to that node.
# Both allow expansion; the driver grows the PV, then the claim's status. kube-controller-manager's expand controller
# stays on: for a hostPath PV it finds no in-tree expander and leaves the claim to an external resizer (an
# ExternalExpanding event), which is what the driver is.
start_provisioner() {
  mkdir -p "$VOLUMES"
  kc apply -f - >/dev/null <<EOF
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: local-hostpath
  annotations: {storageclass.kubernetes.io/is-default-class: "true"}
provisioner: $PROVISIONER
reclaimPolicy: Delete
volumeBindingMode: Immediate
allowVolumeExpansion: true
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: local-wffc
provisioner: $PROVISIONER
reclaimPolicy: Delete
volumeBindingMode: WaitForFirstConsumer
allowVolumeExpansion: true
EOF
  local settings sum
  settings=(KUBECONFIG="$KUBECONFIG_FILE" PROVISIONER="$PROVISIONER" VOLUMES="$VOLUMES" NODE_NAME="$NODE_NAME")
  sum=$( { printf '%s\n' "${settings[@]}"; cat "$HACK/hostpath-provisioner.sh"; } | sha256sum | cut -d' ' -f1)
  if alive provisioner && [ "$(cat "$PIDS/provisioner.sum" 2>/dev/null)" != "$sum" ]; then
    log "restarting provisioner (its script or settings changed)"
    stop_component provisioner
  fi
  launch provisioner env "${settings[@]}" bash "$HACK/hostpath-provisioner.sh"
  echo "$sum" >"$PIDS/provisioner.sum"
}

stop_component() {   # the component's whole process group (launch made it a session leader), within 20 s
  local pid deadline=$((SECONDS + 20))
  pid=$(cat "$PIDS/$1.pid")
  kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
  kill -9 -- "-$pid" 2>/dev/null || true
  rm -f "$PIDS/$1.pid"
}

cluster_ok() {
  [ -f "$KUBECONFIG_FILE" ] || return 1
  for c in etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet kube-proxy provisioner; do
    alive "$c" || return 1
  done
  kc get --raw /readyz >/dev/null 2>&1 && node_ready
}

cmd_start() {
  require_binaries
  mkdir -p "$LOGS" "$PIDS"
  # Test sessions of several people may start at once: one start at a time, so one driver runs.
  exec 9>"$STATE/start.lock"
  flock 9
  if cluster_ok; then
    log "already running"
    start_provisioner
    echo "$KUBECONFIG_FILE"
    return 0
  fi
  local t0=$SECONDS
  make_pki
  setup_network
  start_etcd
  start_control_plane
  start_containerd
  start_node
  start_provisioner
  wait_for 60 "the default ServiceAccount" kc -n default get serviceaccount default
  log "ready in $((SECONDS - t0))s; export KUBECONFIG=$KUBECONFIG_FILE"
  echo "$KUBECONFIG_FILE"
}

cmd_stop() {
  local c
  for c in provisioner kube-proxy kubelet kube-scheduler kube-controller-manager kube-apiserver etcd; do
    if alive "$c"; then log "stopping $c"; kill "$(cat "$PIDS/$c.pid")" 2>/dev/null || true; fi
  done
  # Pods' containers live on under their shims; stop them before containerd so nothing keeps running.
  if alive containerd; then
    local ids
    ids=$(ctr -n k8s.io tasks ls -q 2>/dev/null || true)
    for id in $ids; do ctr -n k8s.io tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true; done
    log "stopping containerd"
    kill "$(cat "$PIDS/containerd.pid")" 2>/dev/null || true
  fi
  pkill -f containerd-shim-runc-v2 2>/dev/null || true
  for c in provisioner kube-proxy kubelet kube-scheduler kube-controller-manager kube-apiserver etcd containerd; do
    local f=$PIDS/$c.pid
    if [ -f "$f" ]; then
      local pid deadline=$((SECONDS + 20))
      pid=$(cat "$f")
      while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$f"
    fi
  done
  # kubelet leaves its pods' volume mounts behind; unmount them so a reset can delete the tree.
  grep -o ' /var/lib/kubelet/pods/[^ ]*' /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  log "stopped"
}

cmd_status() {
  if cluster_ok; then
    kc get nodes
    return 0
  fi
  log "not running (or not ready)"
  return 1
}

load_image() {
  local image=$1 archive
  archive=$(mktemp --suffix=.tar)
  rm -f "$archive"
  podman save -q --format oci-archive -o "$archive" "$image" >/dev/null
  # ctr names an OCI archive's image after its ref annotation; --base-name + --digests keep the full name.
  ctr -n k8s.io images import --base-name "${image%:*}" --digests --all-platforms "$archive" >/dev/null
  local digest_ref
  digest_ref=$(ctr -n k8s.io images ls -q | grep -F "${image%:*}@sha256:" | head -n1 || true)
  if ! ctr -n k8s.io images ls -q | grep -xF "$image" >/dev/null; then
    [ -n "$digest_ref" ] || { rm -f "$archive"; die "import of $image into containerd failed"; }
    ctr -n k8s.io images tag --force "$digest_ref" "$image" >/dev/null
  fi
  rm -f "$archive"
  log "loaded $image into containerd"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  load-image) shift; [ $# -ge 1 ] || die "usage: $0 load-image IMAGE..."; for i in "$@"; do load_image "$i"; done ;;
  logs) tail_logs "${2:-40}" 2>&1 ;;
  kubeconfig) echo "$KUBECONFIG_FILE" ;;
  reset) cmd_stop; log "deleting $STATE"; rm -rf "$STATE" /var/lib/cni/networks/modeldeploy ;;
  *) echo "usage: $0 start|stop|status|load-image IMAGE...|logs [N]|kubeconfig|reset" >&2; exit 2 ;;
esac
