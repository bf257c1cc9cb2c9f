"""End to end, the way a user installs it: `helm install` the chart with the project's images (built here), the
operator runs in the cluster under the chart's namespaced RBAC (not admin), a ModelDeployment applied with kubectl
on the CPU profile goes Ready, its two replicas share one download, an embeddings request through the Service's
ClusterIP returns sentence-transformers' vector, the chart's gateway answers it by name under its own RBAC, the
sidecars and the operator export metrics; deleting the ModelDeployment and `helm uninstall` leave only what the
documented policy keeps (the cache PVC, the CRD)."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest
import yaml
from aiohttp import web
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster.test_operator import GROUP, PLURAL, VERSION
from tests.cluster.test_operator_pull import NODE_ADDRESS, kubectl
from tests.helpers import REPO, helm_binary, wait_for
from tests.hubserver import HubServer, Repo
from tests.models import MINILM, minilm_dir

RELEASE = "md"
TEXTS = ["A man is eating food.", "The new movie is awesome", "模型部署"]


class RecordingHub(HubServer):
    """The local hub, noting which address sent which Authorization header."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, str | None]] = []      # (client address, Authorization)

    def app(self) -> web.Application:
        @web.middleware
        async def record(request, handler):
            self.seen.append((request.remote, request.headers.get("Authorization")))
            return await handler(request)

        app = super().app()
        app.middlewares.append(record)
        return app


@pytest.fixture(scope="module")
def hub(kubeconfig):
    server = RecordingHub()
    server.add_repo(Repo.from_folder(MINILM, minilm_dir()))
    server.start(host=NODE_ADDRESS)
    yield server
    server.stop()


def helm(kubeconfig: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([helm_binary(), "--kubeconfig", kubeconfig, *args], capture_output=True, text=True,
                          timeout=timeout)


def get_json(url: str, body: dict | None = None) -> bytes:
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body else None,
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read()


def samples(url: str, name: str) -> list:
    families = text_string_to_metric_families(get_json(url).decode())
    return [s for family in families for s in family.samples if s.name == name]


def test_helm_install_to_an_answered_request_and_clean_removal(api_client, kubeconfig, namespace, images, hub):
    core, apps, batch, rbac = (client.CoreV1Api(api_client), client.AppsV1Api(api_client),
                               client.BatchV1Api(api_client), client.RbacAuthorizationV1Api(api_client))
    custom = client.CustomObjectsApi(api_client)
    operator_repo, operator_tag = images["operator"].rsplit(":", 1)
    installed = helm(kubeconfig, "install", RELEASE, str(REPO / "charts" / "modeldeploy"), "-n", namespace,
                     "--set", f"image.repository={operator_repo}", "--set", f"image.tag={operator_tag}",
                     "--set", "image.pullPolicy=Never", "--set", "config.imagePullPolicy=Never",
                     "--set", f"config.profiles.cpu.images.builtin={images['runtime-cpu']}",
                     "--set", f"watchNamespaces={{{namespace}}}",
                     # the local hub: an endpoint the admin allows, over plain http, tokens included
                     "--set-json", f'config.pull.allowedEndpoints={{"huggingface": ["{hub.url}"]}}',
                     "--set-json", f'config.pull.tokenOverHttp=["{hub.url}"]',
                     "--wait", "--timeout", "3m")
    assert installed.returncode == 0, installed.stderr + kubectl(
        kubeconfig, "-n", namespace, "logs", f"deploy/{RELEASE}-modeldeploy", "--tail=30").stdout
    assert "kubectl wait mdep/minilm --for=condition=Ready" in installed.stdout        # NOTES.txt
    operator = core.list_namespaced_pod(namespace, label_selector="app.kubernetes.io/component=operator").items[0]
    service_account = f"system:serviceaccount:{namespace}:{operator.spec.service_account_name}"
    # Its RBAC is the chart's namespaced Role: nothing cluster-wide, no Secrets at all.
    for verb, resource, where, allowed in (("get", "secrets", namespace, "no"), ("list", "secrets", namespace, "no"),
                                           ("create", "deployments", "default", "no"),
                                           ("create", "jobs", namespace, "yes")):
        answer = kubectl(kubeconfig, "auth", "can-i", verb, resource, "-n", where, f"--as={service_account}")
        assert answer.stdout.strip() == allowed, (verb, resource, where, answer.stdout)
    assert not [b for b in rbac.list_cluster_role_binding().items if b.metadata.name.startswith(f"{RELEASE}-")]

    manifest = yaml.safe_load((REPO / "examples" / "embeddings-cpu.yaml").read_text())
    manifest["spec"]["model"]["endpoint"] = hub.url           # the one value that points away from huggingface.co
    manifest["spec"]["replicas"] = 2
    # This node has 2 cores in all: the example's 1-CPU request per replica would leave the second one Pending.
    manifest["spec"]["resources"] = {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}}
    applied = subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "-n", namespace, "apply", "-f", "-"],
                             input=yaml.safe_dump(manifest), capture_output=True, text=True)
    assert applied.returncode == 0, applied.stderr
    name = manifest["metadata"]["name"]
    waited = kubectl(kubeconfig, "-n", namespace, "wait", f"mdep/{name}", "--for=condition=Ready", "--timeout=420s",
                     timeout=440)
    status = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name).get("status")
    assert waited.returncode == 0, (waited.stderr, status, kubectl(kubeconfig, "-n", namespace, "logs",
                                                                   operator.metadata.name, "--tail=40").stdout)
    assert status["readyReplicas"] == 2 and status["phase"] == "Ready"

    # Two replicas, one download, one cache.
    size = sum(f.size for f in hub.repos[MINILM].files.values())
    assert hub.total_bytes_sent == size and len(batch.list_namespaced_job(namespace).items) == 1
    pods = core.list_namespaced_pod(namespace, label_selector=f"modeldeploy.io/model-deployment={name}").items
    assert len(pods) == 2
    assert {v.persistent_volume_claim.claim_name for p in pods for v in p.spec.volumes if v.persistent_volume_claim} \
        == {"model-cache"}

    # A real request through the Service's ClusterIP, answered with sentence-transformers' vectors.
    from sentence_transformers import SentenceTransformer

    service = core.read_namespaced_service(name, namespace)
    url = f"http://{service.spec.cluster_ip}:{service.spec.ports[0].port}"
    answer = json.loads(get_json(f"{url}/v1/embeddings", {"model": MINILM, "input": TEXTS}))
    got = np.array([item["embedding"] for item in answer["data"]])
    reference = SentenceTransformer(str(minilm_dir()), device="cpu").encode(TEXTS, normalize_embeddings=True)
    cosine = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
    assert got.shape == (3, 384) and cosine.min() >= 0.999, cosine
    for _ in range(5):
        get_json(f"{url}/v1/embeddings", {"model": MINILM, "input": "one more"})

    # Each pod's sidecar serves the server's metrics merged with its own; the operator exports its own.
    requests = sum(s.value for p in pods for s in samples(f"http://{p.status.pod_ip}:9090/metrics",
                                                          "model_requests_total")
                   if s.labels["endpoint"] == "/v1/embeddings" and s.labels["code"] == "200")
    assert requests == 6
    assert all(samples(f"http://{p.status.pod_ip}:9090/metrics", "model_server_up")[0].value == 1 for p in pods)
    operator_metrics = f"http://{operator.status.pod_ip}:8082/metrics"
    ready = [s for s in samples(operator_metrics, "modeldeploy_model_deployments") if s.labels["phase"] == "Ready"]
    assert ready[0].value == 1
    assert sum(s.value for s in samples(operator_metrics, "modeldeploy_operator_reconciles_total")
               if s.labels["result"] == "ok") > 0

    # The chart's gateway, in its own pod under its own RBAC, through its Service: the model listed and answered by
    # name with the same vectors (and a Server-Timing header giving the server's share), an unknown name a 404 in
    # OpenAI's shape, both counted.
    gateway_pod = core.list_namespaced_pod(namespace, label_selector="app.kubernetes.io/component=gateway").items[0]
    gateway_account = f"system:serviceaccount:{namespace}:{gateway_pod.spec.service_account_name}"
    for verb, resource, subresource, allowed in (
            ("get", "secrets", "", "no"), ("list", "pods", "", "no"), ("watch", "endpoints", "", "yes"),
            ("patch", "modeldeployments.modeldeploy.io", "status", "yes"),
            ("patch", "modeldeployments.modeldeploy.io", "", "no")):
        answer = kubectl(kubeconfig, "auth", "can-i", verb, resource, f"--subresource={subresource}", "-n",
                         namespace, f"--as={gateway_account}")
        # stderr: kubectl warns, and says no, for a resource it does not know
        assert (answer.stdout.strip(), answer.stderr) == (allowed, ""), (verb, resource, subresource, answer)
    gateway_service = core.read_namespaced_service(f"{RELEASE}-modeldeploy-gateway", namespace)
    gateway = f"http://{gateway_service.spec.cluster_ip}:{gateway_service.spec.ports[0].port}"
    wait_for(lambda: [m["id"] for m in json.loads(get_json(f"{gateway}/v1/models"))["data"]] == [name], 60,
             "the gateway to list the model")
    request = urllib.request.Request(f"{gateway}/v1/embeddings", data=json.dumps({"model": name, "input": TEXTS})
                                     .encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        through, timing = json.loads(response.read()), response.headers["Server-Timing"]
    serve, upstream = (entry.partition(";dur=") for entry in timing.split(", "))
    assert through["model"] == MINILM and (serve[0], upstream[0]) == ("serve", "upstream")
    assert 0 < float(serve[2]) <= float(upstream[2])        # the server's own share within what the gateway saw
    assert np.abs(np.array([item["embedding"] for item in through["data"]]) - got).max() < 1e-5
    with pytest.raises(urllib.error.HTTPError) as refused:
        get_json(f"{gateway}/v1/embeddings", {"model": "no-such-model", "input": "x"})
    assert refused.value.code == 404 and json.loads(refused.value.read())["error"]["type"] == "model_not_found"
    counted = {(s.labels["model_name"], s.labels["code"]): s.value
               for s in samples(f"{gateway}/metrics", "modeldeploy_gateway_requests_total")}
    assert counted == {(name, "200"): 1.0, ("", "404"): 1.0}

    # A user names an unrelated Secret as the hub token. The operator cannot read it (no RBAC) and never sends a
    # Secret value anywhere; the pull pod, in the user's namespace, sends what the user named - to the allowed hub.
    password = f"db-{uuid.uuid4().hex}"
    core.create_namespaced_secret(namespace, client.V1Secret(metadata=client.V1ObjectMeta(name="db-credentials"),
                                                             string_data={"password": password}))
    with_token = yaml.safe_load(yaml.safe_dump(manifest))
    with_token["metadata"]["name"] = "with-token"
    with_token["spec"]["replicas"] = 0
    with_token["spec"]["model"]["tokenSecretRef"] = {"name": "db-credentials", "key": "password"}
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, with_token)
    waited = kubectl(kubeconfig, "-n", namespace, "wait", "mdep/with-token", "--for=condition=WeightsReady",
                     "--timeout=180s", timeout=200)
    assert waited.returncode == 0, waited.stderr
    pull_pods = {p.status.pod_ip for p in core.list_namespaced_pod(
        namespace, label_selector="app.kubernetes.io/component=pull").items}
    operator_ip = operator.status.pod_ip
    assert [auth for ip, auth in hub.seen if ip == operator_ip] and \
        not [auth for ip, auth in hub.seen if ip == operator_ip and auth]     # it asked, without any token
    sent = {ip for ip, auth in hub.seen if auth and password in auth}
    assert sent and sent <= pull_pods, (sent, pull_pods, operator_ip)
    assert kubectl(kubeconfig, "-n", namespace, "delete", "mdep/with-token").returncode == 0

    # Deleting the ModelDeployment takes its Deployment, Service and (last user gone) the pull Job; the cache stays.
    deleted = kubectl(kubeconfig, "-n", namespace, "delete", f"mdep/{name}", "--timeout=60s")
    assert deleted.returncode == 0, deleted.stderr
    wait_for(lambda: not apps.list_namespaced_deployment(namespace, label_selector="app.kubernetes.io/component="
                                                                                   "server").items
             and not core.list_namespaced_service(namespace, label_selector="app.kubernetes.io/component=server").items
             and not batch.list_namespaced_job(namespace).items, 120, "the ModelDeployment's objects to go")
    assert [c.metadata.name for c in core.list_namespaced_persistent_volume_claim(namespace).items] == ["model-cache"]

    # helm uninstall removes every object of the release; the CRD stays (Helm never deletes CRDs).
    removed = helm(kubeconfig, "uninstall", RELEASE, "-n", namespace, "--wait", "--timeout", "2m")
    assert removed.returncode == 0, removed.stderr
    selector = f"app.kubernetes.io/instance={RELEASE}"
    left = (apps.list_namespaced_deployment(namespace, label_selector=selector).items
            + core.list_namespaced_service_account(namespace, label_selector=selector).items
            + core.list_namespaced_config_map(namespace, label_selector=selector).items
            + core.list_namespaced_service(namespace, label_selector=selector).items
            + rbac.list_namespaced_role(namespace, label_selector=selector).items
            + rbac.list_namespaced_role_binding(namespace, label_selector=selector).items)
    assert left == []
    wait_for(lambda: not core.list_namespaced_pod(namespace, label_selector="app.kubernetes.io/component=operator")
             .items, 120, "the operator pod to go")
    assert client.ApiextensionsV1Api(api_client).read_custom_resource_definition("modeldeployments.modeldeploy.io")
