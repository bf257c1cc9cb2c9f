"""The operator under the semantics of the clusters users run, on the real local cluster with the project's images:
a WaitForFirstConsumer StorageClass (as on GKE, EKS, AKS, kind and k3s), a cache that grows with the models in it and
forgets the ones nobody uses, state that survives its pods, updates that remove what they no longer set, deletions
made while the operator was down, pods the scheduler cannot place, and the kustomize base as users apply it.

Bad inputs tried: replicas asking for more CPU than the node has; a switch of engine (builtin -> custom -> builtin),
of monitoring and of the Service port on a Ready resource; a finished pull pod deleted; a resource deleted while
the operator is stopped."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from modeldeploy.api import parse_spec
from modeldeploy.config import OperatorConfig
from modeldeploy.manifests.common import weights_key
from modeldeploy.manifests.pull_job import build_pull_job
from tests.cluster.test_operator import GROUP, PLURAL, VERSION, condition, crd, mdep  # noqa: F401 (crd: fixture)
from tests.cluster.test_operator_pull import NODE_ADDRESS, kubectl
from tests.helpers import REPO, free_port, operator_process, wait_for
from tests.hubserver import HubServer, Repo
from tests.models import minilm_dir

WFFC_CLASS = "local-wffc"


@pytest.fixture(scope="module")
def hub(kubeconfig):
    server = HubServer()
    for name in ("a", "b", "c"):
        server.add_repo(Repo.from_folder(f"org/minilm-{name}", minilm_dir()))
    server.start(host=NODE_ADDRESS)
    yield server
    server.stop()


def config_for(images: dict, hub: HubServer) -> str:
    return (f"registry: localhost\noperatorImage: {images['operator']}\nimagePullPolicy: Never\n"
            f"profiles: {{cpu: {{images: {{builtin: {images['runtime-cpu']}}}}}}}\n"
            f"pull: {{allowedEndpoints: {{huggingface: ['{hub.url}']}}}}\n")


def served(name: str, model: str, hub: HubServer, **spec) -> dict:
    spec.setdefault("resources", {"requests": {"cpu": "100m", "memory": "256Mi"}})
    return mdep(name, model={"id": model, "endpoint": hub.url}, **spec)


def status_of(custom, namespace: str, name: str) -> dict:
    return custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name).get("status") or {}


def wait_ready(custom, namespace: str, name: str, timeout: float = 300, generation: int | None = None) -> dict:
    def ready():
        status = status_of(custom, namespace, name)
        ok = condition(custom, namespace, name, "Ready")
        return ok.get("status") == "True" and (generation is None or ok.get("observedGeneration") == generation) \
            and status
    return wait_for(ready, timeout, f"{name} Ready", detail=lambda: status_of(custom, namespace, name))


IDLE_SECONDS = 30


def api_requests(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "modeldeploy_operator_api_requests_total")


def cache_folder(core, namespace: str, claim: str) -> Path:
    volume = core.read_namespaced_persistent_volume_claim(claim, namespace).spec.volume_name
    return Path(core.read_persistent_volume(volume).spec.host_path.path)


def test_wait_for_first_consumer_a_growing_cache_and_weights_that_leave(api_client, kubeconfig, namespace, images,
                                                                        hub, tmp_path):
    custom, core = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)
    cache = {"claimName": "small", "size": "100Mi", "storageClassName": WFFC_CLASS}
    with operator_process(kubeconfig, namespace, tmp_path, config_for(images, hub)):
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                               served("first", "org/minilm-a", hub, cache=cache))
        # The claim waits for its first consumer; the pull pod is that consumer (before, no pull ever started).
        wait_ready(custom, namespace, "first")
        claim = core.read_namespaced_persistent_volume_claim("small", namespace)
        assert claim.metadata.annotations.get("volume.kubernetes.io/selected-node") == "node1"

        # A second model does not fit the 100Mi claim beside the first: the claim grows, both serve.
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                               served("second", "org/minilm-b", hub, cache=cache))
        wait_ready(custom, namespace, "second")
        claim = core.read_namespaced_persistent_volume_claim("small", namespace)
        assert claim.spec.resources.requests["storage"] == "1Gi" and claim.status.capacity["storage"] == "1Gi"
        assert condition(custom, namespace, "first", "Ready")["status"] == "True"
        assert any(e.reason == "CacheExpanding" for e in core.list_namespaced_event(
            namespace, field_selector="involvedObject.name=second").items)

        # The last user of the first model goes: its weights leave the cache, the second's stay.
        folder = cache_folder(core, namespace, "small")
        assert (folder / "models--org--minilm-a").is_dir() and (folder / "models--org--minilm-b").is_dir()
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "first")
        pruned = wait_for(lambda: [e for e in core.list_namespaced_event(
            namespace, field_selector="involvedObject.name=small").items if e.reason == "WeightsPruned"], 180,
            "the prune Event on the cache")
        assert "org/minilm-a" in pruned[0].message and "freed" in pruned[0].message
        assert not (folder / "models--org--minilm-a").exists()
        assert (folder / "models--org--minilm-b").is_dir()
        assert condition(custom, namespace, "second", "Ready")["status"] == "True"
        wait_for(lambda: not client.BatchV1Api(api_client).list_namespaced_job(
            namespace, label_selector="app.kubernetes.io/component=prune").items, 60, "the prune Job to go")


def test_state_outlives_pods_updates_converge_and_the_scheduler_is_heard(api_client, kubeconfig, namespace, images,
                                                                         hub, tmp_path):
    custom, core = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)
    apps = client.AppsV1Api(api_client)
    port = free_port()
    with operator_process(kubeconfig, namespace, tmp_path, config_for(images, hub), metrics_port=port):
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, served("m", "org/minilm-c", hub))
        commit = wait_ready(custom, namespace, "m")["resolvedRevision"]

        # Ready and left alone, it costs the API server nothing beyond kopf's watches.
        # (Pods settle for a few seconds after Ready: their last status updates are events the operator follows.)
        quiet: list = [None]    # the first look only takes a sample

        def quiet_for_10s():
            before, quiet[0] = quiet[0], api_requests(port)
            return before == quiet[0]

        wait_for(quiet_for_10s, 180, "the operator to settle after Ready", interval=10)
        before = api_requests(port)
        time.sleep(IDLE_SECONDS)    # a quiet period is what is measured here, not a condition to wait for
        print(f"idle Ready ModelDeployment: {api_requests(port) - before:.0f} API requests in {IDLE_SECONDS} s")
        assert api_requests(port) - before == 0

        # The finished pull pod goes (garbage collection, a lost node): the resource stays Ready and still follows
        # its spec.
        for pod in core.list_namespaced_pod(namespace, label_selector="app.kubernetes.io/component=pull").items:
            core.delete_namespaced_pod(pod.metadata.name, namespace, grace_period_seconds=0)
        wait_for(lambda: not core.list_namespaced_pod(namespace, label_selector="app.kubernetes.io/component=pull")
                 .items, 60, "the pull pod to go")
        scaled = kubectl(kubeconfig, "-n", namespace, "scale", "mdep/m", "--replicas=0")
        assert scaled.returncode == 0, scaled.stderr
        wait_for(lambda: apps.read_namespaced_deployment("m", namespace).spec.replicas == 0, 60, "the scale")
        wait_ready(custom, namespace, "m", generation=2)
        assert status_of(custom, namespace, "m")["resolvedRevision"] == commit

        # Engine, monitoring and port switches on a Ready resource: each rolls to a valid Deployment and Service
        # that keep nothing of the previous shape.
        custom_engine = {"engine": "custom", "image": images["runtime-cpu"], "port": 8080, "args": [
            "serve", "--model", "org/minilm-c", "--revision", commit, "--cache-dir", "/cache",
            "--task", "feature-extraction", "--port", "8080"]}
        switches = [({"replicas": 1, "runtime": custom_engine, "service": {"port": 8000}}, "custom"),
                    ({"runtime": {"engine": "builtin", "image": None, "port": None, "args": []},   # the custom engine's go
                      "monitoring": {"enabled": False}}, "builtin, no sidecar"),
                    ({"monitoring": {"enabled": True}, "service": {"port": 80}}, "builtin again")]
        for generation, (change, what) in enumerate(switches, start=3):
            custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "m", {"spec": change})
            wait_ready(custom, namespace, "m", generation=generation)
            pod_spec = apps.read_namespaced_deployment("m", namespace).spec.template.spec
            server = pod_spec.containers[0]
            ports = {p.name: p.port for p in core.read_namespaced_service("m", namespace).spec.ports}
            if what == "custom":
                assert server.command is None and server.readiness_probe.http_get is None, what
                assert server.readiness_probe.tcp_socket is not None and ports["http"] == 8000
            else:
                assert server.command == ["modeldeploy"] and server.readiness_probe.tcp_socket is None, what
                assert server.readiness_probe.http_get.path == "/v2/health/ready"
            sidecar = [c.name for c in pod_spec.containers if c.name == "monitor"]
            assert bool(sidecar) == (what != "builtin, no sidecar") and ("metrics" in ports) == bool(sidecar), what
        assert ports["http"] == 80

        # More than the node has: the scheduler's words reach the status.
        custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "m",
                                              {"spec": {"resources": {"requests": {"cpu": "64"}}}})
        available = wait_for(lambda: condition(custom, namespace, "m", "Available").get("reason") == "Unschedulable"
                             and condition(custom, namespace, "m", "Available"), 120, "the scheduler's reason")
        assert "Insufficient cpu" in available["message"], available


def test_a_deletion_while_the_operator_was_down_is_caught_up(api_client, kubeconfig, namespace, crd, tmp_path):  # noqa: F811
    custom, batch = client.CustomObjectsApi(api_client), client.BatchV1Api(api_client)
    config = "registry: localhost\nimagePullPolicy: Never\n"
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, mdep("gone", model={"id": "org/a"}))
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, mdep("kept", model={"id": "org/b"}))
    with operator_process(kubeconfig, namespace, tmp_path, config):
        wait_for(lambda: len(batch.list_namespaced_job(namespace).items) == 2, 90, "both pull Jobs")
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "gone")    # the operator is down
    wait_for(lambda: len(custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]) == 1, 30,
             "the resource to go")
    assert len(batch.list_namespaced_job(namespace).items) == 2
    with operator_process(kubeconfig, namespace, tmp_path, config):
        wait_for(lambda: [j.metadata.name for j in batch.list_namespaced_job(namespace).items
                          if not j.metadata.deletion_timestamp] == [kept_job(batch, namespace)], 60,
                 "the orphaned Job to go")
        # A changed model id releases the old weights' Job too.
        custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "kept",
                                              {"spec": {"model": {"id": "org/c"}}})
        wait_for(lambda: [j.metadata.annotations["modeldeploy.io/model"] for j in batch.list_namespaced_job(namespace)
                          .items if not j.metadata.deletion_timestamp] == ["huggingface:org/c@main"], 60,
                 "the old model's Job to go and the new one's to come",
                 detail=lambda: (status_of(custom, namespace, "kept"), [j.metadata.name for j in
                                                                        batch.list_namespaced_job(namespace).items]))


def test_a_pull_job_no_resource_pulls_goes_on_the_timer(api_client, kubeconfig, namespace, crd, tmp_path):  # noqa: F811
    """Besides deletions, spec changes and start-up, the operator looks for unused pull Jobs on a timer: one those
    collections could not take back (the API server failing them, or the check after a Job is made; a spec moved
    back right after that check) goes too. Here such a Job, made as the operator makes them but for weights no resource pulls,
    appears while the operator runs; the Job a resource uses stays."""
    custom, batch = client.CustomObjectsApi(api_client), client.BatchV1Api(api_client)
    config = "registry: localhost\nimagePullPolicy: Never\npull: {collectIntervalSeconds: 2}\n"
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, mdep("kept", model={"id": "org/b"}))
    with operator_process(kubeconfig, namespace, tmp_path, config):
        kept = wait_for(lambda: [j.metadata.name for j in batch.list_namespaced_job(namespace).items
                                 if not j.metadata.deletion_timestamp], 90,
                        "the resource's pull Job")       # the operator is up: its start-up collection is behind it
        operator_config = OperatorConfig.model_validate(yaml.safe_load(config))
        spec = parse_spec(mdep("left", model={"id": "org/left"}))
        key = weights_key(spec, operator_config)
        batch.create_namespaced_job(namespace, build_pull_job(spec, operator_config, key))
        wait_for(lambda: [j.metadata.name for j in batch.list_namespaced_job(namespace).items
                          if not j.metadata.deletion_timestamp] == kept, 30, "the unused Job to go",
                 detail=lambda: [j.metadata.name for j in batch.list_namespaced_job(namespace).items])


def kept_job(batch, namespace: str) -> str:
    return next(j.metadata.name for j in batch.list_namespaced_job(namespace).items
                if j.metadata.annotations["modeldeploy.io/model"] == "huggingface:org/b@main")


def test_the_kustomize_base_brings_up_a_working_operator(api_client, kubeconfig, namespace, crd, images, tmp_path):  # noqa: F811
    """`kubectl apply -k` as users run it, with an overlay naming this cluster's images, watching one namespace."""
    shutil.copytree(REPO / "examples" / "kustomize" / "base", tmp_path / "base")   # kustomize takes relative roots
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    repository, tag = images["operator"].rsplit(":", 1)
    (overlay / "kustomization.yaml").write_text(f"""
resources: [../base]
images: [{{name: ghcr.io/modeldeploy/modeldeploy, newName: {repository}, newTag: {tag}}}]
patches:
- target: {{kind: Deployment, name: modeldeploy}}
  patch: |-
    - {{op: replace, path: /spec/template/spec/containers/0/imagePullPolicy, value: Never}}
    - {{op: add, path: /spec/template/spec/containers/0/args/-, value: --namespace}}
    - {{op: add, path: /spec/template/spec/containers/0/args/-, value: {namespace}}}
""")
    rendered = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True)
    assert rendered.returncode == 0, rendered.stderr
    applied = kubectl(kubeconfig, "apply", "-k", str(overlay))
    try:
        assert applied.returncode == 0, applied.stderr
        ready = kubectl(kubeconfig, "-n", "modeldeploy-system", "rollout", "status", "deploy/modeldeploy",
                        "--timeout=180s", timeout=200)
        assert ready.returncode == 0, ready.stderr + kubectl(kubeconfig, "-n", "modeldeploy-system", "logs",
                                                             "deploy/modeldeploy", "--tail=30").stdout
        custom = client.CustomObjectsApi(api_client)
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, mdep("via-kustomize",
                                                                                      model={"id": "org/a"}))
        wait_for(lambda: client.BatchV1Api(api_client).list_namespaced_job(namespace).items, 90,
                 "the operator from the kustomize base to make the pull Job")
        wait_for(lambda: status_of(custom, namespace, "via-kustomize").get("phase") == "Pulling", 60, "its status")
    finally:
        # Everything but the CRD, which the other tests share.
        objects = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True).stdout
        docs = [d for d in objects.split("\n---\n") if "kind: CustomResourceDefinition" not in d]
        subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "delete", "--wait=true", "--ignore-not-found",
                        "-f", "-"], input="\n---\n".join(docs), capture_output=True, text=True, timeout=180)
