"""A ModelDeployment's whole life on the real cluster, with the project's images (built here by
hack/build-images.sh): the pull Job fills the shared cache from a Hub-compatible server on the host, the status
takes the resolved commit, the serving pods (runtime + monitoring sidecar) go Ready and `kubectl wait` returns;
`kubectl scale` goes through the scale subresource to the Deployment only; a revision change pulls again and rolls
the pods onto the new commit; the cache PVC is sized from the hub's file list; a PodMonitor appears once the
Prometheus Operator's CRD exists, and not before.
(The operator runs on the host here; tests/cluster/test_e2e.py runs it in the cluster from the Helm chart.)"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import kopf
import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException
from prometheus_client import REGISTRY

from modeldeploy.config import OperatorConfig
from modeldeploy.reconcile import metrics
from modeldeploy.reconcile.children import Apis
from modeldeploy.reconcile.hub_sizes import Query
from modeldeploy.reconcile.reconciler import reconcile, reconcile_by_name
from tests.cluster.test_operator import (GROUP, PLURAL, VERSION, condition, crd, mdep,  # noqa: F401 (crd: fixture)
                                         stall_of)
from tests.helpers import operator_process, wait_for
from tests.hubserver import HubServer, Repo, RepoFile
from tests.models import MINILM, minilm_dir

NODE_ADDRESS = "10.244.0.1"   # the cluster bridge: pods reach the host here (hack/cluster.sh)
POD_MONITOR_CRD = {
    # The Prometheus Operator's PodMonitor kind, as far as the API server is concerned (its real schema is large).
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "podmonitors.monitoring.coreos.com"},
    "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
             "names": {"plural": "podmonitors", "singular": "podmonitor", "kind": "PodMonitor",
                       "listKind": "PodMonitorList"},
             "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                 "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]},
}


@pytest.fixture(scope="module")
def hub(kubeconfig):   # the bridge address exists once the cluster runs
    server = HubServer()
    server.add_repo(Repo.from_folder(MINILM, minilm_dir()))
    server.start(host=NODE_ADDRESS)
    yield server
    server.stop()


@pytest.fixture
def operator(kubeconfig, crd, namespace, images, hub, tmp_path):  # noqa: F811
    config = (f"registry: localhost\noperatorImage: {images['operator']}\nimagePullPolicy: Never\n"
              f"profiles: {{cpu: {{images: {{builtin: {images['runtime-cpu']}}}}}}}\n"
              f"monitoring: {{discoveryIntervalSeconds: 1}}\n"
              f"pull: {{allowedEndpoints: {{huggingface: ['{hub.url}']}}, tokenOverHttp: ['{hub.url}']}}\n")
    with operator_process(kubeconfig, namespace, tmp_path, config) as process:
        yield process


FIXED_CLASS = "modeldeploy-test-fixed-size"


@pytest.fixture(scope="module")
def fixed_size_class(api_client):
    """A StorageClass whose claims cannot grow (the local ones can): where the operator must stop with NoSpace."""
    storage = client.StorageV1Api(api_client)
    try:
        storage.create_storage_class({"metadata": {"name": FIXED_CLASS}, "provisioner": "modeldeploy.io/local-hostpath",
                                      "reclaimPolicy": "Delete", "allowVolumeExpansion": False})
    except ApiException as error:
        if error.status != 409:
            raise
    yield FIXED_CLASS
    storage.delete_storage_class(FIXED_CLASS)


TINY_CACHE = {"claimName": "tiny", "size": "10Mi", "storageClassName": FIXED_CLASS}


@pytest.fixture
def pod_monitor_crd(api_client):
    extensions = client.ApiextensionsV1Api(api_client)
    yield lambda: extensions.create_custom_resource_definition(POD_MONITOR_CRD)
    try:
        extensions.delete_custom_resource_definition(POD_MONITOR_CRD["metadata"]["name"])
    except ApiException as error:
        if error.status != 404:
            raise


def kubectl(kubeconfig: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["kubectl", "--kubeconfig", kubeconfig, *args], capture_output=True, text=True,
                          timeout=timeout)


def server_pods(core, namespace: str, name: str) -> list:
    return core.list_namespaced_pod(namespace, label_selector=f"modeldeploy.io/model-deployment={name}").items


def test_a_model_deployment_from_pull_to_ready_scaled_and_moved_to_a_new_revision(
        api_client, kubeconfig, namespace, operator, hub, pod_monitor_crd):
    custom, apps, batch, core = (client.CustomObjectsApi(api_client), client.AppsV1Api(api_client),
                                 client.BatchV1Api(api_client), client.CoreV1Api(api_client))
    first = hub.repos[MINILM]
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, mdep(
        "minilm", model={"id": MINILM, "endpoint": hub.url, "revision": first.commit}, replicas=1))

    # `kubectl wait` understands the status (Ready with observedGeneration).
    waited = kubectl(kubeconfig, "-n", namespace, "wait", "mdep/minilm", "--for=condition=Ready", "--timeout=300s",
                     timeout=320)
    assert waited.returncode == 0, waited.stderr + str(condition(custom, namespace, "minilm", "Ready"))
    status = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "minilm")["status"]
    assert status["resolvedRevision"] == first.commit and status["phase"] == "Ready"
    assert status["readyReplicas"] == 1 and status["observedGeneration"] == 1
    assert status["download"]["bytes"] == sum(f.size for f in first.files.values()) == hub.total_bytes_sent
    assert "etaSeconds" not in status["download"]          # only while pulling
    # The cache PVC was sized from the file sizes the hub lists (91 MB + 25% headroom, at least 1Gi).
    claim = core.read_namespaced_persistent_volume_claim("model-cache", namespace)
    assert claim.spec.resources.requests["storage"] == "1Gi"
    deployment = apps.read_namespaced_deployment("minilm", namespace)
    server, monitor = deployment.spec.template.spec.containers
    assert server.args[server.args.index("--revision") + 1] == first.commit     # pinned to the resolved commit
    assert monitor.name == "monitor" and deployment.metadata.owner_references[0].name == "minilm"
    pods = server_pods(core, namespace, "minilm")
    assert all(s.ready for p in pods for s in p.status.container_statuses)   # server and sidecar alike
    # No PodMonitor kind in the cluster: only the prometheus.io annotations.
    assert deployment.spec.template.metadata.annotations["prometheus.io/port"] == "9090"

    # Scaling goes through the scale subresource and touches the Deployment only: no new pull.
    scaled = kubectl(kubeconfig, "-n", namespace, "scale", "mdep/minilm", "--replicas=2")
    assert scaled.returncode == 0, scaled.stderr
    wait_for(lambda: custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "minilm")["status"].get(
        "readyReplicas") == 2 and condition(custom, namespace, "minilm", "Ready")["status"] == "True", 180,
        "two ready replicas")
    assert apps.read_namespaced_deployment("minilm", namespace).spec.replicas == 2
    assert len(batch.list_namespaced_job(namespace).items) == 1
    scale = custom.get_namespaced_custom_object_scale(GROUP, VERSION, namespace, PLURAL, "minilm")
    assert scale["status"]["replicas"] == 2 and "modeldeploy.io/model-deployment=minilm" in scale["status"]["selector"]

    # With the Prometheus Operator's CRD installed, the next reconcile adds a PodMonitor owned by the resource.
    pod_monitor_crd()
    group, version, plural = "monitoring.coreos.com", "v1", "podmonitors"
    wait_for(lambda: custom.get_api_resources(group, version).resources, 60, "the PodMonitor kind to be served")

    # A new revision: a new pull (only the changed file moves), then the pods roll onto the new commit.
    second = hub.add_repo(Repo.from_files(MINILM, {**first.files, "NOTICE.txt": RepoFile("NOTICE.txt", b"v2\n")}))
    hub.reset_counters()
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "minilm",
                                          {"spec": {"model": {"revision": "main"}}})
    wait_for(lambda: custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "minilm")["status"].get(
        "resolvedRevision") == second.commit, 240, "the new revision to be pulled")
    # The old revision's Job is released (no resource has its weights key any more); the new pull's stays.
    wait_for(lambda: [j.metadata.annotations["modeldeploy.io/model"] for j in batch.list_namespaced_job(
        namespace, label_selector="app.kubernetes.io/component=pull").items if not j.metadata.deletion_timestamp]
        == [f"huggingface:{MINILM}@main"], 60, "the old revision's pull Job to be released")
    assert hub.total_bytes_sent == 3                                # the one new file; the rest is in the cache

    def rolled():
        current = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "minilm")
        pods = [p for p in server_pods(core, namespace, "minilm") if not p.metadata.deletion_timestamp]
        return (current["status"]["observedGeneration"] == current["metadata"]["generation"] == 3 and condition(custom, namespace, "minilm", "Ready")["status"] ==
                "True" and len(pods) == 2 and all(second.commit in p.spec.containers[0].args for p in pods))
    wait_for(rolled, 300, "the pods to roll onto the new commit and be Ready", detail=lambda: (
        custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "minilm")["status"],
        [(p.metadata.name, p.spec.containers[0].args, p.status.container_statuses)
         for p in server_pods(core, namespace, "minilm")]))

    # Rolled out: the previous commit's snapshot leaves the cache (its files, all shared with the new one, stay).
    pruned = wait_for(lambda: [e for e in core.list_namespaced_event(
        namespace, field_selector="involvedObject.name=model-cache").items if e.reason == "WeightsPruned"], 120,
        "the previous commit's snapshot to be pruned")
    assert first.commit in pruned[0].message
    volume = core.read_persistent_volume(core.read_namespaced_persistent_volume_claim(
        "model-cache", namespace).spec.volume_name).spec.host_path.path
    snapshots = Path(volume) / ("models--" + MINILM.replace("/", "--")) / "snapshots"
    assert sorted(p.name for p in snapshots.iterdir()) == [second.commit]
    assert (snapshots / second.commit / "model.safetensors").stat().st_size == first.files["model.safetensors"].size
    assert "previousSnapshot" not in custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                                                         "minilm")["status"]

    [pod_monitor] = custom.list_namespaced_custom_object(group, version, namespace, plural)["items"]
    assert pod_monitor["metadata"]["ownerReferences"][0]["name"] == "minilm"
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert pod_monitor["spec"]["selector"]["matchLabels"]["modeldeploy.io/model-deployment"] == "minilm"


def test_bad_inputs_that_only_the_hub_can_reveal(api_client, namespace, operator, hub, fixed_size_class):
    """Bad inputs tried: a model the hub does not have; a gated model without a token; a cache PVC smaller than the
    files the hub lists, of a class that cannot grow. Each ends Stalled with its own reason and a Warning Event; the
    small cache starts no Job. A stall stays put while the Job's retries run (1.20 has no podFailurePolicy)."""
    custom, batch, core = (client.CustomObjectsApi(api_client), client.BatchV1Api(api_client),
                           client.CoreV1Api(api_client))
    gated = hub.add_repo(Repo.from_files("org/gated", {"config.json": RepoFile("config.json", b"{}")},
                                         token="hf_needed", gated=True))
    cases = {
        "missing": ({"id": "org/missing", "endpoint": hub.url}, {}, "NotFound"),
        "gated": ({"id": gated.repo_id, "endpoint": hub.url}, {}, "Unauthorized"),
        "small-cache": ({"id": MINILM, "endpoint": hub.url}, TINY_CACHE, "NoSpace"),
    }
    for name, (model, cache, _) in cases.items():
        spec = {"model": model, **({"cache": cache} if cache else {})}
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, mdep(name, **spec))
    stalls = {}
    for name, (_, _, reason) in cases.items():
        stalled = wait_for(lambda: stall_of(custom, namespace, name), 180, f"{name} to stall",
                           detail=lambda: custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                                                              name).get("status"))
        assert stalled["reason"] == reason, stalled
        assert condition(custom, namespace, name, "Ready")["status"] == "False"
        wait_for(lambda: any(e.type == "Warning" and e.reason == reason for e in core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.name={name}").items), 30, f"a Warning Event for {name}")
        stalls[name] = stalled
    small = condition(custom, namespace, "small-cache", "Stalled")["message"]
    assert "holds 10Mi but its models need 0.09 GiB and it cannot be expanded (Forbidden)" in small   # 91 MB
    jobs = {j.metadata.name for j in batch.list_namespaced_job(namespace).items}
    assert len(jobs) == 2 and not any("minilm" in j for j in jobs)   # the small cache started no pull

    # Before 1.26 (no podFailurePolicy) the Job tries again: once its second pod has failed too, the stall is the
    # same one, with one Warning. From 1.26 the policy ends the Job at the first. Either way the failure is kept on
    # the Job.
    missing_job = next(j for j in jobs if j.startswith("pull-missing-"))
    version = client.VersionApi(api_client).get_code()
    if (int(version.major), int(version.minor.rstrip("+"))) < (1, 26):
        wait_for(lambda: sum(p.status.phase == "Failed" for p in core.list_namespaced_pod(
            namespace, label_selector=f"job-name={missing_job}").items) >= 2, 120, "the Job's second pod to fail")
    else:
        failed = wait_for(lambda: next((c for c in batch.read_namespaced_job(missing_job, namespace).status.conditions
                                        or [] if c.type == "Failed" and c.status == "True"), None), 60,
                          "the Job to fail by its podFailurePolicy")
        assert failed.reason == "PodFailurePolicy"
        assert len(core.list_namespaced_pod(namespace, label_selector=f"job-name={missing_job}").items) == 1
    after = condition(custom, namespace, "missing", "Stalled")
    assert (after["status"], after["reason"], after["lastTransitionTime"]) == \
        ("True", "NotFound", stalls["missing"]["lastTransitionTime"])
    stalled_events = [e for e in core.list_namespaced_event(namespace, field_selector="involvedObject.name=missing")
                      .items if e.reason == "NotFound"]
    assert [(e.type, e.count) for e in stalled_events] == [("Warning", 1)]
    kept = batch.read_namespaced_job(missing_job, namespace).metadata.annotations["modeldeploy.io/pull-result"]
    assert json.loads(kept)["reason"] == "NotFound"


def in_process_memo(api_client, hub) -> kopf.Memo:
    """What the operator's start-up puts in kopf's memo, for reconciles run in the test's own thread."""
    config = OperatorConfig(pull={"allowedEndpoints": {"huggingface": [hub.url]}})
    return kopf.Memo(apis=Apis.create(api_client), config=config, phases=metrics.PhaseBook())


def test_a_reconcile_outside_kopf_handlers_posts_its_events(api_client, namespace, crd, hub,  # noqa: F811
                                                             fixed_size_class):
    """The progress refresher reconciles from outside kopf's handlers, where kopf.warn cannot post (a stall it
    found once lost its Event). Here the reconcile runs in the test's own thread, as the refresher's does: the
    stall's Warning Event reaches the API."""
    custom, core = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)
    memo = in_process_memo(api_client, hub)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, mdep(
        "small", model={"id": MINILM, "endpoint": hub.url}, cache=TINY_CACHE))

    def stalled():
        reconcile_by_name(memo, namespace, "small")
        return condition(custom, namespace, "small", "Stalled").get("status") == "True"

    wait_for(stalled, 60, "the reconcile to find the cache too small", interval=1)
    posted = {(e.type, e.reason) for e in core.list_namespaced_event(
        namespace, field_selector="involvedObject.name=small").items}
    assert ("Warning", "NoSpace") in posted, posted


def test_two_reconciles_of_one_read_write_and_post_once(api_client, namespace, crd, hub,  # noqa: F811
                                                        fixed_size_class):
    """kopf's workers and the progress refresher can reconcile the same resource from the same read. The first
    reconcile writes the status and posts the transitions' Events; the second finds the resource changed, reads it
    again and has nothing new to post. (Before, both wrote and both posted: doubled Events, and an older observation
    could overwrite a newer status.) The trustRemoteCode warning comes once per generation, through the same write."""
    custom, core = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)
    memo = in_process_memo(api_client, hub)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, mdep(
        "twice", model={"id": MINILM, "endpoint": hub.url}, cache=TINY_CACHE,
        runtime={"trustRemoteCode": True}))
    reconcile_by_name(memo, namespace, "twice")       # creates the cache PVC
    wait_for(lambda: core.read_namespaced_persistent_volume_claim("tiny", namespace).status.phase == "Bound", 60,
             "the cache PVC to bind")
    memo.apis.hub_sizes.ask(Query(hub.url, MINILM, "main", None, False, False))   # the space check's answer, early
    memo.apis.hub_sizes.wait(30)
    conflicts = REGISTRY.get_sample_value("modeldeploy_operator_reconciles_total", {"result": "conflict"}) or 0
    read = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "twice")
    for _ in range(2):
        reconcile(read, memo)
    assert REGISTRY.get_sample_value("modeldeploy_operator_reconciles_total", {"result": "conflict"}) == conflicts + 1
    reasons = [e.reason for e in core.list_namespaced_event(namespace,
                                                            field_selector="involvedObject.name=twice").items]
    assert reasons.count("NoSpace") == reasons.count("TrustRemoteCode") == 1, reasons
    assert condition(custom, namespace, "twice", "Stalled")["reason"] == "NoSpace"


def test_a_pull_job_made_from_an_older_read_is_taken_back(api_client, namespace, crd, hub, caplog):  # noqa: F811
    """A reconcile can work from a read older than the resource: a lagging view, or one that began before the spec
    changed. Its pull Job for the old weights may come after whatever released the old Job had run, and nothing
    would take it back (CI saw one stay, pulling weights no resource wanted). Here the model's revision moves, the
    resource is reconciled as it is now, and then an older read of it: the Job that one made goes, and it runs
    again on the resource as it is."""
    custom, core, batch = (client.CustomObjectsApi(api_client), client.CoreV1Api(api_client),
                           client.BatchV1Api(api_client))
    memo = in_process_memo(api_client, hub)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, mdep(
        "moved", model={"id": MINILM, "endpoint": hub.url}, cache={"claimName": "roomy", "size": "1Gi"}))
    reconcile_by_name(memo, namespace, "moved")       # creates the cache PVC
    wait_for(lambda: core.read_namespaced_persistent_volume_claim("roomy", namespace).status.phase == "Bound", 60,
             "the cache PVC to bind")
    memo.apis.hub_sizes.ask(Query(hub.url, MINILM, "main", None, False, False))   # the space check's answer, early
    memo.apis.hub_sizes.wait(30)
    older = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "moved")
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "moved",
                                          {"spec": {"model": {"revision": "v2"}}})
    reconcile_by_name(memo, namespace, "moved")     # the newer read first: it moves the key and releases the old Job
    conflicts = REGISTRY.get_sample_value("modeldeploy_operator_reconciles_total", {"result": "conflict"}) or 0
    with caplog.at_level(logging.INFO, logger="modeldeploy.operator"):
        reconcile(older, memo)
    made = [r.getMessage() for r in caplog.records if "pull job" in r.getMessage() and "created" in r.getMessage()]
    assert [m for m in made if m.endswith("@main")], made        # the older read did make its Job
    assert REGISTRY.get_sample_value("modeldeploy_operator_reconciles_total", {"result": "conflict"}) == conflicts + 1
    kept = [(j.metadata.name, j.metadata.annotations["modeldeploy.io/model"])
            for j in batch.list_namespaced_job(namespace).items if not j.metadata.deletion_timestamp]
    assert not [job for job in kept if job[1].endswith("@main")], kept
    assert custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "moved")["status"][
        "observedGeneration"] == 2
