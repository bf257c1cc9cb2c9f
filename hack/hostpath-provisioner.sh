#!/usr/bin/env bash
# The local cluster's dynamic provisioner: binds every Pending PVC of $STORAGE_CLASS to a new hostPath PV under
# $VOLUMES (world-writable, so non-root pods can use it; capacity as requested, any access mode - it is one node),
# and deletes the PV and its directory once the claim is gone. Started and stopped by hack/cluster.sh.
set -uo pipefail
: "${KUBECONFIG:?}" "${STORAGE_CLASS:?}" "${VOLUMES:?}" "${NODE_NAME:?}"
PROVISIONER=modeldeploy.io/local-hostpath

provision() {   # namespace name uid size accessModes(json)
  local ns=$1 claim=$2 uid=$3 size=$4 modes=$5 pv="pvc-$3"
  local dir=$VOLUMES/$pv
  mkdir -p "$dir" && chmod 0777 "$dir"
  kubectl create -f - >/dev/null <<PV && echo "provisioned $pv ($size) for $ns/$claim"
apiVersion: v1
kind: PersistentVolume
metadata:
  name: $pv
  annotations: {pv.kubernetes.io/provisioned-by: $PROVISIONER}
spec:
  capacity: {storage: "$size"}
  accessModes: $modes
  persistentVolumeReclaimPolicy: Delete
  storageClassName: $STORAGE_CLASS
  claimRef: {apiVersion: v1, kind: PersistentVolumeClaim, namespace: "$ns", name: "$claim", uid: "$uid"}
  hostPath: {path: "$dir", type: DirectoryOrCreate}
  nodeAffinity:
    required:
      nodeSelectorTerms:
      - matchExpressions: [{key: kubernetes.io/hostname, operator: In, values: ["$NODE_NAME"]}]
PV
}

reclaim() {     # pv
  kubectl delete pv "$1" --wait=false >/dev/null && rm -rf "${VOLUMES:?}/$1" && echo "deleted $1"
}

while true; do
  state=$(kubectl get pvc,pv -A -o json 2>/dev/null) || { sleep 2; continue; }
  jq -r --arg sc "$STORAGE_CLASS" '.items[]
      | select(.kind == "PersistentVolumeClaim" and .status.phase == "Pending"
               and (.spec.storageClassName // "") == $sc and (.spec.volumeName // "") == "")
      | [.metadata.namespace, .metadata.name, .metadata.uid, .spec.resources.requests.storage,
         (.spec.accessModes | tojson)] | @tsv' <<<"$state" |
    while IFS=$'\t' read -r ns claim uid size modes; do
      kubectl get pv "pvc-$uid" >/dev/null 2>&1 || provision "$ns" "$claim" "$uid" "$size" "$modes"
    done
  jq -r --arg p "$PROVISIONER" '.items[]
      | select(.kind == "PersistentVolume" and .status.phase == "Released"
               and .metadata.annotations["pv.kubernetes.io/provisioned-by"] == $p
               and .spec.persistentVolumeReclaimPolicy == "Delete") | .metadata.name' <<<"$state" |
    while read -r pv; do reclaim "$pv"; done
  sleep 1
done
