#!/usr/bin/env bash
# The local cluster's storage driver. For every StorageClass whose provisioner is $PROVISIONER it does what a CSI
# driver's external-provisioner and external-resizer do on a managed cluster:
# - provision: a Pending claim that the PV controller has handed to $PROVISIONER (annotation
#   volume.beta.kubernetes.io/storage-provisioner) gets a hostPath PV under $VOLUMES (world-writable, so non-root
#   pods can use it; capacity as requested, any access mode - it is one node), pre-bound to the claim by claimRef;
#   the PV controller then binds the pair. A claim of a WaitForFirstConsumer class is handed over only once the
#   scheduler has placed a pod using it (annotation volume.kubernetes.io/selected-node); its PV's nodeAffinity
#   names that node.
# - resize: when a bound claim requests more than its PV holds, the PV's capacity is raised to the request, then
#   the claim's status.capacity (status subresource). A hostPath directory has no filesystem of its own to grow.
#   The API server's PersistentVolumeClaimResize admission refuses growth where the class does not allow it.
# - delete: a Released PV with reclaim policy Delete goes, with its directory.
# Every pass looks at the whole state, so a pass cut short (a restart, a failed call) is finished by the next one.
# Started, restarted on change and stopped by hack/cluster.sh.
set -uo pipefail
: "${KUBECONFIG:?}" "${PROVISIONER:?}" "${VOLUMES:?}" "${NODE_NAME:?}"

# Quantities ("1Gi", "500M", "1e9", "1500m") in bytes, to compare a request with a capacity.
JQ_DEFS='def bytes: capture("^(?<n>[0-9.]+)(?<e>[eE][-+]?[0-9]+)?(?<u>[a-zA-Z]*)$")
  | (.n + (.e // "") | tonumber) * {"": 1, "m": 0.001, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
      "E": 1e18, "Ki": 1024, "Mi": 1048576, "Gi": 1073741824, "Ti": 1099511627776, "Pi": 1125899906842624,
      "Ei": 1152921504606846976}[.u];'

provision() {   # namespace claim uid class size accessModes(json) node
  local ns=$1 claim=$2 uid=$3 class=$4 size=$5 modes=$6 node=$7 pv="pvc-$3"
  local dir=$VOLUMES/$pv
  mkdir -p "$dir" && chmod 0777 "$dir"
  kubectl create -f - >/dev/null <<PV && echo "provisioned $pv ($size, class $class, node $node) for $ns/$claim"
apiVersion: v1
kind: PersistentVolume
metadata:
  name: $pv
  annotations: {pv.kubernetes.io/provisioned-by: $PROVISIONER}
spec:
  capacity: {storage: "$size"}
  accessModes: $modes
  persistentVolumeReclaimPolicy: Delete
  storageClassName: $class
  claimRef: {apiVersion: v1, kind: PersistentVolumeClaim, namespace: "$ns", name: "$claim", uid: "$uid"}
  hostPath: {path: "$dir", type: DirectoryOrCreate}
  nodeAffinity:
    required:
      nodeSelectorTerms:
      - matchExpressions: [{key: kubernetes.io/hostname, operator: In, values: ["$node"]}]
PV
}

resize() {      # namespace claim pv size grow-pv(true|false)
  local ns=$1 claim=$2 pv=$3 size=$4 grow_pv=$5
  if [ "$grow_pv" = true ]; then
    kubectl patch pv "$pv" --type=merge -p "{\"spec\":{\"capacity\":{\"storage\":\"$size\"}}}" >/dev/null || return
  fi
  kubectl -n "$ns" patch pvc "$claim" --subresource=status --type=merge \
    -p "{\"status\":{\"capacity\":{\"storage\":\"$size\"}}}" >/dev/null &&
    echo "resized $pv to $size for $ns/$claim"
}

reclaim() {     # pv
  kubectl delete pv "$1" --wait=false >/dev/null && rm -rf "${VOLUMES:?}/$1" && echo "deleted $1"
}

while true; do
  state=$(kubectl get pvc,pv,storageclass -A -o json 2>/dev/null) || { sleep 2; continue; }
  # Claims handed to us and not yet provisioned. The PV controller annotates a WaitForFirstConsumer claim only after
  # the scheduler's selected-node; checking both keeps a claim that lost its node (rescheduling) waiting.
  jq -r --arg p "$PROVISIONER" --arg node "$NODE_NAME" '
      (INDEX(.items[] | select(.kind == "StorageClass"); .metadata.name)) as $classes
      | .items[]
      | select(.kind == "PersistentVolumeClaim" and .status.phase == "Pending" and .metadata.deletionTimestamp == null
               and (.spec.volumeName // "") == ""
               and .metadata.annotations["volume.beta.kubernetes.io/storage-provisioner"] == $p)
      | (.spec.storageClassName // "") as $class
      | (if $classes[$class].volumeBindingMode == "WaitForFirstConsumer"
         then .metadata.annotations["volume.kubernetes.io/selected-node"] // empty else $node end) as $on
      | [.metadata.namespace, .metadata.name, .metadata.uid, $class, .spec.resources.requests.storage,
         (.spec.accessModes | tojson), $on] | @tsv' <<<"$state" |
    while IFS=$'\t' read -r ns claim uid class size modes on; do
      kubectl get pv "pvc-$uid" >/dev/null 2>&1 ||
        provision "$ns" "$claim" "$uid" "$class" "$size" "$modes" "$on"
    done
  # Bound claims of our PVs asking for more than the PV holds, or whose status lags behind a grown PV.
  jq -r --arg p "$PROVISIONER" "$JQ_DEFS"'
      (INDEX(.items[] | select(.kind == "PersistentVolume"); .metadata.name)) as $pvs
      | .items[]
      | select(.kind == "PersistentVolumeClaim" and .status.phase == "Bound")
      | $pvs[.spec.volumeName] as $pv
      | select($pv != null and $pv.metadata.annotations["pv.kubernetes.io/provisioned-by"] == $p)
      | .spec.resources.requests.storage as $want | $pv.spec.capacity.storage as $has
      | (.status.capacity.storage // "0") as $shown
      | [.metadata.namespace, .metadata.name, $pv.metadata.name] as $names
      | if ($want | bytes) > ($has | bytes) then $names + [$want, true]
        elif ($shown | bytes) < ($has | bytes) then $names + [$has, false]
        else empty end | @tsv' <<<"$state" |
    while IFS=$'\t' read -r ns claim pv size grow_pv; do resize "$ns" "$claim" "$pv" "$size" "$grow_pv"; done
  jq -r --arg p "$PROVISIONER" '.items[]
      | select(.kind == "PersistentVolume" and .status.phase == "Released"
               and .metadata.annotations["pv.kubernetes.io/provisioned-by"] == $p
               and .spec.persistentVolumeReclaimPolicy == "Delete") | .metadata.name' <<<"$state" |
    while read -r pv; do reclaim "$pv"; done
  sleep 1
done
