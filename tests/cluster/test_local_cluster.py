"""Proves the local cluster is a real Kubernetes: a locally built image runs, its logs come through the API, a
Service ClusterIP answers from the host, a PVC binds and is written to, and the garbage collector deletes
dependents of a deleted owner."""

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
