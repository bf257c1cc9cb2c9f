"""Proves the local cluster is a real Kubernetes: a locally built image runs, its logs come through the API, a
Service ClusterIP answers from the host, a PVC binds and is written to, storage behaves as on managed clusters
(WaitForFirstConsumer binding on the scheduler's node, expansion where the class allows it), and the garbage
collector deletes dependents of a deleted owner."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import urllib.request
import uuid
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.helpers import CLUSTER_SH, REPO, wait_for

IMAGE = "localhost/modeldeploy-test-busybox:1"
NODE = "node1"
DRIVER = "modeldeploy.io/local-hostpath"   # the provisioner name of both local StorageClasses
SELECTED_NODE = "volume.kubernetes.io/selected-node"
STORAGE_PROVISIONER = "volume.beta.kubernetes.io/storage-provisioner"
RESTRICTED = client.V1SecurityContext(
    run_as_non_root=True, run_as_user=65534, allow_privilege_escalation=False, read_only_root_filesystem=True,
    capabilities=client.V1Capabilities(drop=["ALL"]))


@pytest.fixture(scope="module")
def busybox_image(kubeconfig) -> str:
    with tempfile.TemporaryDirectory() as context:
        shutil.copy(REPO / "tests/images/busybox/Containerfile", context)
        shutil.copy("/bin/busybox", Path(context) / "busybox")
        subprocess.run(["podman", "build", "--network=none", "-q", "-t", IMAGE, context], check=True,
                       capture_output=True)
    subprocess.run(["bash", str(CLUSTER_SH), "load-image", IMAGE], check=True, capture_output=True)
    return IMAGE


def pod(name: str, script: str, image: str, volumes=(), mounts=(), labels=None, restart="Never") -> client.V1Pod:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels=labels),
        spec=client.V1PodSpec(
            restart_policy=restart,
            automount_service_account_token=False,
            containers=[client.V1Container(name="main", image=image, image_pull_policy="Never", args=[script],
                                           security_context=RESTRICTED, volume_mounts=list(mounts))],
            volumes=list(volumes)))


def pod_phase(core: client.CoreV1Api, namespace: str, name: str) -> str:
    return core.read_namespaced_pod(name, namespace).status.phase


def pod_ready(core: client.CoreV1Api, namespace: str, name: str) -> bool:
    conditions = core.read_namespaced_pod(name, namespace).status.conditions or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def claim(name: str, size: str, storage_class: str | None = None) -> dict:
    spec = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}}
    if storage_class:
        spec["storageClassName"] = storage_class
    return {"metadata": {"name": name}, "spec": spec}


def claim_volume(name: str) -> tuple[list, list]:
    return ([client.V1Volume(name="data", persistent_volume_claim=client.V1PersistentVolumeClaimVolumeSource(
                claim_name=name))],
            [client.V1VolumeMount(name="data", mount_path="/data")])


def request_storage(core: client.CoreV1Api, namespace: str, name: str, size: str) -> None:
    core.patch_namespaced_persistent_volume_claim(
        name, namespace, {"spec": {"resources": {"requests": {"storage": size}}}})


def claim_events(core: client.CoreV1Api, namespace: str, name: str, reason: str) -> list:
    return core.list_namespaced_event(
        namespace, field_selector=f"involvedObject.kind=PersistentVolumeClaim,involvedObject.name={name},"
                                  f"reason={reason}").items


def bound(core: client.CoreV1Api, namespace: str, name: str):
    pvc = core.read_namespaced_persistent_volume_claim(name, namespace)
    return pvc if pvc.status.phase == "Bound" else None


def grown(core: client.CoreV1Api, namespace: str, name: str, size: str):
    """The claim's PV once the claim's status shows `size`; the PV is read afterwards, so it must have grown first."""
    pvc = core.read_namespaced_persistent_volume_claim(name, namespace)
    if (pvc.status.capacity or {}).get("storage") != size:
        return None
    return core.read_persistent_volume(pvc.spec.volume_name)


def test_locally_built_image_runs_and_its_logs_come_through_the_api(api_client, namespace, busybox_image):
    core = client.CoreV1Api(api_client)
    marker = uuid.uuid4().hex
    core.create_namespaced_pod(namespace, pod("hello", f"echo hello-{marker}; id -u", busybox_image))
    wait_for(lambda: pod_phase(core, namespace, "hello") == "Succeeded", 120, "pod hello to succeed")
    logs = core.read_namespaced_pod_log("hello", namespace)
    assert f"hello-{marker}" in logs
    assert logs.split()[-1] == "65534"


def test_service_cluster_ip_reaches_a_pod_from_the_host(api_client, namespace, busybox_image):
    core = client.CoreV1Api(api_client)
    marker = uuid.uuid4().hex
    script = f"mkdir -p /tmp/www && echo {marker} > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www"
    web = pod("web", script, busybox_image, labels={"app": "web"}, restart="Always",
              volumes=[client.V1Volume(name="tmp", empty_dir=client.V1EmptyDirVolumeSource())],
              mounts=[client.V1VolumeMount(name="tmp", mount_path="/tmp")])
    web.spec.containers[0].readiness_probe = client.V1Probe(
        tcp_socket=client.V1TCPSocketAction(port=8080), period_seconds=1)
    core.create_namespaced_pod(namespace, web)
    service = core.create_namespaced_service(namespace, client.V1Service(
        metadata=client.V1ObjectMeta(name="web"),
        spec=client.V1ServiceSpec(selector={"app": "web"},
                                  ports=[client.V1ServicePort(port=80, target_port=8080)])))
    cluster_ip = service.spec.cluster_ip

    def answer():
        with urllib.request.urlopen(f"http://{cluster_ip}/index.html", timeout=2) as response:
            return response.read().decode().strip()

    assert wait_for(answer, 120, f"service web at {cluster_ip} to answer") == marker


def test_pvc_binds_and_pods_share_what_is_written(api_client, namespace, busybox_image):
    core = client.CoreV1Api(api_client)
    core.create_namespaced_persistent_volume_claim(namespace, {
        "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}})
    wait_for(lambda: core.read_namespaced_persistent_volume_claim("data", namespace).status.phase == "Bound",
             60, "PVC data to bind")
    claim = core.read_namespaced_persistent_volume_claim("data", namespace)
    assert claim.spec.storage_class_name == "local-hostpath"   # the default StorageClass was applied
    assert claim.status.capacity["storage"] == "1Gi"
    # Bound before any pod exists: the default class binds immediately, with no node chosen by a scheduler.
    assert client.StorageV1Api(api_client).read_storage_class("local-hostpath").volume_binding_mode == "Immediate"
    assert SELECTED_NODE not in (claim.metadata.annotations or {})

    marker = uuid.uuid4().hex
    volume = [client.V1Volume(name="data", persistent_volume_claim=client.V1PersistentVolumeClaimVolumeSource(
        claim_name="data"))]
    mount = [client.V1VolumeMount(name="data", mount_path="/data")]
    core.create_namespaced_pod(namespace, pod("writer", f"echo {marker} > /data/token", busybox_image,
                                              volume, mount))
    wait_for(lambda: pod_phase(core, namespace, "writer") == "Succeeded", 120, "pod writer to succeed")
    core.create_namespaced_pod(namespace, pod("reader", "cat /data/token", busybox_image, volume, mount))
    wait_for(lambda: pod_phase(core, namespace, "reader") == "Succeeded", 120, "pod reader to succeed")
    assert core.read_namespaced_pod_log("reader", namespace).strip() == marker


def test_wffc_claim_waits_for_its_pod_binds_on_the_pods_node_and_grows_while_in_use(api_client, namespace,
                                                                                     busybox_image):
    core = client.CoreV1Api(api_client)
    wffc = client.StorageV1Api(api_client).read_storage_class("local-wffc")
    assert (wffc.provisioner, wffc.volume_binding_mode, wffc.allow_volume_expansion) == (
        DRIVER, "WaitForFirstConsumer", True)
    created = core.create_namespaced_persistent_volume_claim(namespace, claim("cache", "1Gi", "local-wffc"))

    # The PV controller has seen the claim and decided to wait for a consumer; nothing is provisioned meanwhile.
    wait_for(lambda: claim_events(core, namespace, "cache", "WaitForFirstConsumer"), 60,
             "the PV controller's WaitForFirstConsumer event on PVC cache")
    pending = core.read_namespaced_persistent_volume_claim("cache", namespace)
    assert pending.status.phase == "Pending" and not pending.spec.volume_name
    assert not {SELECTED_NODE, STORAGE_PROVISIONER} & set(pending.metadata.annotations or {})
    assert not [pv for pv in core.list_persistent_volume().items
                if pv.spec.claim_ref and pv.spec.claim_ref.uid == created.metadata.uid]

    # A pod using it: the scheduler picks node1 and says so on the claim, the PV controller hands the claim to the
    # driver, the driver makes a PV pinned to node1, the claim binds and the pod runs and writes.
    marker = uuid.uuid4().hex
    volumes, mounts = claim_volume("cache")
    user = pod("user", f"echo {marker} > /data/token && exec sleep 3600", busybox_image, volumes, mounts)
    user.spec.termination_grace_period_seconds = 1
    user.spec.containers[0].readiness_probe = client.V1Probe(
        _exec=client.V1ExecAction(command=["cat", "/data/token"]), period_seconds=1)
    core.create_namespaced_pod(namespace, user)
    wait_for(lambda: pod_ready(core, namespace, "user"), 120, "pod user to write to the claim (Ready)",
             detail=lambda: core.read_namespaced_persistent_volume_claim("cache", namespace).status)
    assert core.read_namespaced_pod("user", namespace).spec.node_name == NODE
    pvc = bound(core, namespace, "cache")
    assert pvc is not None
    assert pvc.metadata.annotations[SELECTED_NODE] == NODE
    assert pvc.metadata.annotations[STORAGE_PROVISIONER] == DRIVER
    pv = core.read_persistent_volume(pvc.spec.volume_name)
    assert (pv.spec.storage_class_name, pv.spec.capacity["storage"], pv.spec.claim_ref.uid) == (
        "local-wffc", "1Gi", created.metadata.uid)
    assert [(e.key, e.operator, e.values) for term in pv.spec.node_affinity.required.node_selector_terms
            for e in term.match_expressions] == [("kubernetes.io/hostname", "In", [NODE])]

    # Asking for more while the pod uses it: the expand controller leaves hostPath to an external resizer, the
    # driver grows the PV, then the claim's status; the pod keeps running and the data stays.
    request_storage(core, namespace, "cache", "2Gi")
    pv = wait_for(lambda: grown(core, namespace, "cache", "2Gi"), 60, "PVC cache to grow to 2Gi",
                  detail=lambda: core.read_namespaced_persistent_volume_claim("cache", namespace).status)
    assert pv.spec.capacity["storage"] == "2Gi"
    wait_for(lambda: claim_events(core, namespace, "cache", "ExternalExpanding"), 60,
             "the expand controller's ExternalExpanding event on PVC cache")
    status = core.read_namespaced_pod("user", namespace).status
    assert status.phase == "Running" and status.container_statuses[0].restart_count == 0
    core.create_namespaced_pod(namespace, pod("reader", "cat /data/token", busybox_image, volumes, mounts))
    wait_for(lambda: pod_phase(core, namespace, "reader") == "Succeeded", 120, "pod reader to succeed")
    assert core.read_namespaced_pod_log("reader", namespace).strip() == marker


def test_claims_grow_where_the_class_allows_it_and_never_shrink(api_client, namespace):
    core = client.CoreV1Api(api_client)
    storage = client.StorageV1Api(api_client)
    fixed = f"{namespace[:40]}-fixed"   # cluster-scoped: named after this test's namespace, deleted below
    storage.create_storage_class({"metadata": {"name": fixed}, "provisioner": DRIVER, "reclaimPolicy": "Delete",
                                  "volumeBindingMode": "Immediate"})
    try:
        core.create_namespaced_persistent_volume_claim(namespace, claim("grows", "1Gi"))
        core.create_namespaced_persistent_volume_claim(namespace, claim("fixed", "1Gi", fixed))
        for name in ("grows", "fixed"):
            wait_for(lambda: bound(core, namespace, name), 60, f"PVC {name} to bind")

        request_storage(core, namespace, "grows", "2Gi")   # the default class allows expansion
        pv = wait_for(lambda: grown(core, namespace, "grows", "2Gi"), 60, "PVC grows to grow to 2Gi")
        assert pv.spec.capacity["storage"] == "2Gi"

        with pytest.raises(ApiException) as refused:   # PersistentVolumeClaimResize admission
            request_storage(core, namespace, "fixed", "2Gi")
        assert refused.value.status == 403 and "must support resize" in refused.value.body
        with pytest.raises(ApiException) as shrunk:    # validation of every claim update
            request_storage(core, namespace, "grows", "1Gi")
        assert shrunk.value.status == 422 and "less than previous value" in shrunk.value.body
        assert core.read_namespaced_persistent_volume_claim("fixed", namespace).status.capacity["storage"] == "1Gi"
    finally:
        storage.delete_storage_class(fixed)


def test_deleting_an_owner_garbage_collects_its_dependents(api_client, namespace):
    core = client.CoreV1Api(api_client)
    owner = core.create_namespaced_config_map(namespace, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="owner")))
    reference = client.V1OwnerReference(api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid)
    core.create_namespaced_config_map(namespace, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="dependent", owner_references=[reference])))
    core.delete_namespaced_config_map("owner", namespace)

    def dependent_gone():
        try:
            core.read_namespaced_config_map("dependent", namespace)
            return False
        except ApiException as error:
            return error.status == 404

    wait_for(dependent_gone, 60, "the garbage collector to delete the dependent ConfigMap")
