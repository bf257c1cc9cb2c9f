"""The gateway on the real local cluster, with the project's images: `modeldeploy gateway` and `modeldeploy operator`
run on this host (as in the other operator tests) and the model pods in the cluster; load goes to the gateway on
127.0.0.1, which sends it on to pod addresses. Bounded: at most LOAD_CLIENTS requests in flight, each phase with a
deadline.

- two ModelDeployments behind one gateway, each answered by name, an unknown name 404 in OpenAI's shape;
- spec.autoscaling: a load keeping LOAD_CLIENTS requests in flight scales 1 -> ceil(LOAD_CLIENTS / targetInFlight)
  and, once idle, back to minReplicas after scaleDownDelaySeconds; spec.replicas written meanwhile (as a GitOps tool
  would) changes nothing;
- without spec.autoscaling, a real HPA (autoscaling/v2beta2) on the ModelDeployment's scale subresource: the count
  it writes is run and left alone (no metrics server here: it acts on its minReplicas, which needs none);
- minReplicas 0: Ready at zero; a burst is held and every request answered 200, the time to the first answer
  printed, the cold start in status.autoscaler; idle again, back to zero."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager

import aiohttp
from kubernetes import client

from tests.cluster.test_operator import GROUP, PLURAL, VERSION, crd  # noqa: F401 (crd: fixture)
from tests.cluster.test_real_clusters import config_for, hub, served, status_of, wait_ready  # noqa: F401 (hub)
from tests.cluster.test_operator_pull import kubectl
from tests.helpers import free_port, operator_process, wait_for

LOAD_CLIENTS = 6
TARGET_IN_FLIGHT = 2
SCALE_DOWN_DELAY = 15


@contextmanager
def gateway_process(kubeconfig: str, namespace: str, workdir):
    port = free_port()
    log_path = workdir / "gateway.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "modeldeploy", "gateway", "--namespace", namespace,
                                    "--host", "127.0.0.1", "--port", str(port), "--hold-timeout", "240"],
                                   stdout=log, stderr=subprocess.STDOUT,
                                   env={"KUBECONFIG": kubeconfig, "PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        url = f"http://127.0.0.1:{port}"

        def ready():
            assert process.poll() is None, log_path.read_text()
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                return response.status == 200

        try:
            wait_for(ready, 60, "the gateway to list the cluster")
            yield url
        finally:
            process.terminate()
            process.wait(30)
            print("--- gateway log ---\n" + log_path.read_text()[-6000:])


def call(url: str, body: dict, path: str = "/v1/embeddings") -> tuple[int, dict]:
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def models(url: str) -> list[str]:
    with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as response:
        return [m["id"] for m in json.loads(response.read())["data"]]


def deployment_replicas(apps, namespace: str, name: str) -> int:
    return apps.read_namespaced_deployment(name, namespace).spec.replicas


async def keep_in_flight(url: str, model: str, clients: int, until, deadline: float) -> dict:
    """`clients` loops, each with one request in flight at a time, until `until()` holds or the deadline passes."""
    codes: dict[int, int] = {}
    stop = asyncio.Event()

    async def client_loop(session):
        while not stop.is_set():
            async with session.post(f"{url}/v1/embeddings", json={"model": model, "input": "load " * 20}) as r:
                await r.read()
                codes[r.status] = codes.get(r.status, 0) + 1

    async def watch():
        end = time.monotonic() + deadline
        while time.monotonic() < end and not await asyncio.to_thread(until):
            await asyncio.sleep(1)
        stop.set()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(watch(), *(client_loop(session) for _ in range(clients)))
    return codes


def test_one_gateway_two_models_autoscaling_and_an_external_scale(api_client, kubeconfig, crd, namespace, images,
                                                                   hub, tmp_path):
    custom, apps = client.CustomObjectsApi(api_client), client.AppsV1Api(api_client)
    autoscaling = {"minReplicas": 1, "maxReplicas": 4, "targetInFlight": TARGET_IN_FLIGHT, "scaleUpSeconds": 3,
                   "scaleDownDelaySeconds": SCALE_DOWN_DELAY}
    with operator_process(kubeconfig, namespace, tmp_path, config_for(images, hub)), \
            gateway_process(kubeconfig, namespace, tmp_path) as url:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                               served("alpha", "org/minilm-a", hub, autoscaling=autoscaling))
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, served("beta", "org/minilm-b", hub))
        wait_ready(custom, namespace, "alpha")
        wait_ready(custom, namespace, "beta")
        wait_for(lambda: models(url) == ["alpha", "beta"], 30, "both models listed by the gateway")

        # By name; an unknown name is a 404 in OpenAI's shape.
        for name, repo in (("alpha", "org/minilm-a"), ("beta", "org/minilm-b")):
            status, body = call(url, {"model": name, "input": ["a sentence", "another one"]})
            assert status == 200 and body["model"] == repo and len(body["data"]) == 2
            assert len(body["data"][0]["embedding"]) == 384
        status, body = call(url, {"model": "gamma", "input": "x"})
        assert status == 404 and body["error"]["type"] == "model_not_found" and body["error"]["param"] == "model"
        assert "alpha" in body["error"]["message"]

        # A GitOps tool owning spec.replicas does not move an autoscaled model.
        custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "alpha", {"spec": {"replicas": 3}})
        wait_for(lambda: status_of(custom, namespace, "alpha").get("observedGeneration") == 2, 60,
                 "the operator to see generation 2")
        assert deployment_replicas(apps, namespace, "alpha") == 1

        # Load: LOAD_CLIENTS in flight -> ceil(LOAD_CLIENTS / target) replicas, all Ready while the load runs.
        expected = min(math.ceil(LOAD_CLIENTS / TARGET_IN_FLIGHT), autoscaling["maxReplicas"])
        started = time.monotonic()

        def scaled_up():
            status = status_of(custom, namespace, "alpha")
            return status.get("desiredReplicas") == expected and status.get("readyReplicas") == expected

        codes = asyncio.run(keep_in_flight(url, "alpha", LOAD_CLIENTS, scaled_up, 240))
        status = status_of(custom, namespace, "alpha")
        print(f"scaled 1 -> {status.get('readyReplicas')} Ready in {time.monotonic() - started:.0f} s under "
              f"{LOAD_CLIENTS} in flight; answers {codes}; {status['autoscaler']}")
        assert scaled_up(), status
        assert set(codes) == {200}
        assert "in flight" in status["autoscaler"]["reason"]
        assert deployment_replicas(apps, namespace, "alpha") == expected

        # Idle: back to minReplicas, not before the delay.
        idle_from = time.monotonic()
        wait_for(lambda: status_of(custom, namespace, "alpha").get("desiredReplicas") == 1, SCALE_DOWN_DELAY + 60,
                 "alpha back to minReplicas", detail=lambda: status_of(custom, namespace, "alpha").get("autoscaler"))
        waited = time.monotonic() - idle_from
        print(f"back to 1 replica {waited:.0f} s after the load stopped (delay {SCALE_DOWN_DELAY} s)")
        assert waited >= SCALE_DOWN_DELAY - 2
        wait_for(lambda: deployment_replicas(apps, namespace, "alpha") == 1, 30, "the Deployment at 1")

        # Without spec.autoscaling: a real HPA on the scale subresource. With no metrics server here it cannot
        # measure, but it raises a count below its minReplicas first: its count is run and left alone.
        hpa = {"apiVersion": "autoscaling/v2beta2", "kind": "HorizontalPodAutoscaler",
               "metadata": {"name": "beta", "namespace": namespace},
               "spec": {"scaleTargetRef": {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelDeployment",
                                           "name": "beta"}, "minReplicas": 2, "maxReplicas": 2}}
        (tmp_path / "hpa.json").write_text(json.dumps(hpa))
        applied = kubectl(kubeconfig, "apply", "-f", str(tmp_path / "hpa.json"))
        assert applied.returncode == 0, applied.stderr
        wait_ready(custom, namespace, "beta", timeout=180, generation=2)
        beta = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "beta")
        assert beta["spec"]["replicas"] == 2 and beta["status"]["readyReplicas"] == 2
        writers = {f["manager"] for f in beta["metadata"]["managedFields"] if "f:replicas" in
                   json.dumps(f.get("fieldsV1", {}).get("f:spec", {}))}
        # (1.20 records no field manager for writes through the scale subresource: the creator stays listed.)
        print(f"beta: spec.replicas 2 from the HPA; managers of spec.replicas in managedFields: {writers}")
        assert not writers & {"modeldeploy", "kopf"}
        assert deployment_replicas(apps, namespace, "beta") == 2
        assert status_of(custom, namespace, "beta").get("desiredReplicas") == 2
        assert "autoscaler" not in status_of(custom, namespace, "beta")

        def hpa_status():
            done = kubectl(kubeconfig, "get", "hpa", "beta", "-n", namespace, "-o", "json")
            return json.loads(done.stdout).get("status", {}) if done.returncode == 0 else {}

        wait_for(lambda: hpa_status().get("currentReplicas") == 2, 60, "the HPA to see its count held",
                 detail=hpa_status)
        assert custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "beta")["spec"]["replicas"] == 2
        answers = [call(url, {"model": "beta", "input": f"text {i}"})[0] for i in range(6)]
        assert answers == [200] * 6


def test_scale_to_zero_holds_a_burst_and_answers_every_request(api_client, kubeconfig, crd, namespace, images, hub,
                                                                tmp_path):
    custom, apps = client.CustomObjectsApi(api_client), client.AppsV1Api(api_client)
    autoscaling = {"minReplicas": 0, "maxReplicas": 1, "scaleDownDelaySeconds": SCALE_DOWN_DELAY}
    with operator_process(kubeconfig, namespace, tmp_path, config_for(images, hub)), \
            gateway_process(kubeconfig, namespace, tmp_path) as url:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                               served("cold", "org/minilm-c", hub, autoscaling=autoscaling))
        status = wait_ready(custom, namespace, "cold")
        assert status["desiredReplicas"] == 0 and status["readyText"] == "0/0"
        assert deployment_replicas(apps, namespace, "cold") == 0
        wait_for(lambda: models(url) == ["cold"], 30, "the model listed at zero")

        async def burst(count: int):
            started = time.monotonic()

            async def one(session, i):
                async with session.post(f"{url}/v1/embeddings", json={"model": "cold", "input": f"text {i}"}) as r:
                    await r.read()
                    return r.status, time.monotonic() - started

            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
                return await asyncio.gather(*(one(session, i) for i in range(count)))

        answers = asyncio.run(burst(8))
        first = min(seconds for _, seconds in answers)
        status = status_of(custom, namespace, "cold")
        print(f"from zero: 8 requests held, first answered after {first:.1f} s, last after "
              f"{max(s for _, s in answers):.1f} s; status.autoscaler {status.get('autoscaler')}")
        assert [code for code, _ in answers] == [200] * 8
        wait_for(lambda: status_of(custom, namespace, "cold").get("autoscaler", {}).get("coldStartSeconds"), 30,
                 "the cold start in the status")
        assert 0 < status_of(custom, namespace, "cold")["autoscaler"]["coldStartSeconds"] <= first + 5

        wait_for(lambda: deployment_replicas(apps, namespace, "cold") == 0, SCALE_DOWN_DELAY + 60,
                 "back to zero once idle", detail=lambda: status_of(custom, namespace, "cold").get("autoscaler"))
        wait_for(lambda: status_of(custom, namespace, "cold").get("readyText") == "0/0", 60, "Ready at 0/0 again")
