"""The pull half of a ModelDeployment for real, in the cluster: the operator image (built here by
hack/build-images.sh) runs `modeldeploy pull` in a Job against a Hub-compatible server on the host, writes the
shared cache PVC, and the operator reads the result from the pod's termination message into the status, then
creates the serving Deployment pinned to the resolved commit. A second ModelDeployment of the same model reuses
the finished pull."""

from __future__ import annotations

import subprocess

import pytest
from kubernetes import client

from tests.cluster.test_operator import GROUP, PLURAL, VERSION, condition, crd, mdep  # noqa: F401 (crd: fixture)
from tests.helpers import REPO, operator_process, wait_for
from tests.hubserver import HubServer, Repo
from tests.models import MINILM, minilm_dir

NODE_ADDRESS = "10.244.0.1"   # the cluster bridge: pods reach the host here (hack/cluster.sh)


@pytest.fixture(scope="module")
def operator_image(kubeconfig) -> str:
    done = subprocess.run(["bash", str(REPO / "hack" / "build-images.sh")], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"building the images failed:\n{done.stderr[-4000:]}")
    return "localhost/modeldeploy:dev"


@pytest.fixture(scope="module")
def hub(kubeconfig):   # the bridge address exists once the cluster runs
    server = HubServer()
    server.add_repo(Repo.from_folder(MINILM, minilm_dir()))
    server.start(host=NODE_ADDRESS)
    yield server
    server.stop()


@pytest.fixture
def operator(kubeconfig, crd, namespace, operator_image, tmp_path):  # noqa: F811
    config = f"registry: localhost\noperator_image: {operator_image}\nimage_pull_policy: Never\n"
    with operator_process(kubeconfig, namespace, tmp_path, config) as process:
        yield process


def test_the_pull_job_fills_the_cache_and_the_status_follows(api_client, namespace, operator, hub):
    custom, apps, batch = (client.CustomObjectsApi(api_client), client.AppsV1Api(api_client),
                           client.BatchV1Api(api_client))
    commit = hub.repos[MINILM].commit
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                           mdep("minilm", model={"id": MINILM, "endpoint": hub.url}))
    weights = wait_for(lambda: condition(custom, namespace, "minilm", "WeightsReady").get("status") == "True" and
                       condition(custom, namespace, "minilm", "WeightsReady"), 300, "the weights to be pulled")
    assert commit in weights["message"] and "13 files" in weights["message"]
    status = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "minilm")["status"]
    assert status["resolvedRevision"] == commit
    assert status["download"]["bytes"] == sum(f.size for f in hub.repos[MINILM].files.values())
    assert hub.total_bytes_sent == status["download"]["bytes"]          # pulled once, in the cluster

    deployment = wait_for(lambda: apps.list_namespaced_deployment(namespace).items, 60, "the Deployment")[0]
    server = deployment.spec.template.spec.containers[0]
    assert server.args[server.args.index("--revision") + 1] == commit  # pinned to the resolved commit
    assert deployment.metadata.owner_references[0].name == "minilm"
    # The runtime image is not built yet: the status names the reason instead of waiting silently.
    wait_for(lambda: "ErrImageNeverPull" in condition(custom, namespace, "minilm", "Available").get("message", ""),
             120, "the missing runtime image in the status")

    # A second ModelDeployment of the same weights reuses the finished pull: no new Job, no bytes moved.
    hub.reset_counters()
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                           mdep("minilm-2", model={"id": MINILM, "endpoint": hub.url}))
    wait_for(lambda: condition(custom, namespace, "minilm-2", "WeightsReady").get("status") == "True", 120,
             "the second one's weights")
    assert len(batch.list_namespaced_job(namespace).items) == 1 and hub.total_bytes_sent == 0
