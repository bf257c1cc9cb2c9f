"""Fixtures shared by every test. Cluster fixtures start the local cluster (hack/cluster.sh) once per session."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from tests.helpers import CLUSTER_SH, REPO, cluster_logs, wait_for


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/cluster/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def kubeconfig() -> str:
    """Starts (or reuses) the local cluster; stops it at the end only if this session started it."""
    was_running = subprocess.run(["bash", str(CLUSTER_SH), "status"], capture_output=True).returncode == 0
    started = subprocess.run(["bash", str(CLUSTER_SH), "start"], capture_output=True, text=True)
    if started.returncode != 0:
        pytest.fail(f"the local cluster did not start:\n{started.stderr[-12000:]}", pytrace=False)
    path = started.stdout.strip().splitlines()[-1]
    yield path
    if not was_running and os.environ.get("MODELDEPLOY_KEEP_CLUSTER") != "1":
        subprocess.run(["bash", str(CLUSTER_SH), "stop"], capture_output=True)


@pytest.fixture(scope="session")
def api_client(kubeconfig):
    from kubernetes import config

    return config.new_client_from_config(config_file=kubeconfig)


@pytest.fixture
def namespace(api_client, request) -> str:
    """A fresh namespace per test, deleted (and waited for) afterwards. Failing tests print the cluster's logs."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    core = client.CoreV1Api(api_client)
    name = f"t-{request.node.name[:40].lower().replace('_', '-').strip('-')}-{uuid.uuid4().hex[:5]}"
    name = "".join(c for c in name if c.isalnum() or c == "-")
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    wait_for(lambda: core.list_namespaced_service_account(name, field_selector="metadata.name=default").items,
             60, f"the default ServiceAccount of {name}")
    yield name
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(cluster_logs(60))
    core.delete_namespace(name)

    def gone():
        try:
            core.read_namespace(name)
            return False
        except ApiException as error:
            return error.status == 404

    wait_for(gone, 120, f"namespace {name} to be deleted")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="session")
def images(kubeconfig) -> dict[str, str]:
    """The project's images, built here offline (hack/build-images.sh) and loaded into the cluster's containerd."""
    done = subprocess.run(["bash", str(REPO / "hack" / "build-images.sh")], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"building the images failed:\n{done.stderr[-4000:]}", pytrace=False)
    return {"operator": "localhost/modeldeploy:dev", "runtime-cpu": "localhost/modeldeploy-runtime-cpu:dev"}
