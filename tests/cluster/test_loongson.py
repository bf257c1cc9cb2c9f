"""The loongson profile for real, under emulation: the emulator registered (hack/loong64-emulator.sh), the loong64
operator and llama.cpp images built from Debian sid's loong64 packages (hack/build-images.sh), and a
ModelDeployment of a GGUF repository (a tiny random-weight llama made here) with the llama.cpp engine: the pull Job
and the monitoring sidecar run the loong64 operator image, the pull takes one quantisation of the GGUF files,
llama.cpp (loong64) serves it with --metrics, a completion comes back through its OpenAI API, and the sidecar
passes llama.cpp's metrics on with its own probe of /health.

The cluster's one node is x86_64: the operator configuration overrides the profile's node selector to fit it, and
names the images by this build's arch tags (a registry would serve one multi-arch name). Speed under emulation
says nothing about Loongson hardware; correctness is what is checked. Skips where binfmt_misc cannot be used."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request

import pytest
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster.test_operator import GROUP, PLURAL, VERSION, condition, crd, mdep  # noqa: F401 (crd: fixture)
from tests.cluster.test_operator_pull import NODE_ADDRESS, kubectl, server_pods
from tests.helpers import REPO, operator_process, wait_for
from tests.hubserver import HubServer, Repo
from tests.models import TINY_GGUF, build_gguf_llama

OPERATOR_LOONG64 = "localhost/modeldeploy:dev-loong64"
LLAMACPP_LOONG64 = "localhost/llama.cpp-server:dev-loong64"
EMULATION_UNUSABLE = 3      # hack/loong64-emulator.sh and hack/build-images.sh: binfmt_misc cannot be used here
GUEST_FAULT = "qemu: uncaught target signal"    # how qemu-user reports a loong64 process killed by a signal


@pytest.fixture(scope="module")
def loong64_images(kubeconfig) -> None:
    done = subprocess.run(["bash", str(REPO / "hack" / "build-images.sh"), "operator-loong64", "llama.cpp-loong64"],
                          capture_output=True, text=True)
    if done.returncode == EMULATION_UNUSABLE:
        pytest.skip(f"loong64 images cannot run here: {done.stderr.strip().splitlines()[-2:]}")
    if done.returncode != 0:
        pytest.fail(f"building the loong64 images failed:\n{done.stderr[-4000:]}", pytrace=False)


@pytest.fixture(scope="module")
def gguf_hub(kubeconfig, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    for dtype in ("F32", "F16"):          # two quantisations: the pull takes one (F16 comes first in the order)
        build_gguf_llama(folder, dtype)
    (folder / "README.md").write_text("A tiny random-weight llama for tests.\n")
    server = HubServer()
    server.add_repo(Repo.from_folder(TINY_GGUF, folder))
    server.start(host=NODE_ADDRESS)
    yield server
    server.stop()


@pytest.fixture
def operator(kubeconfig, crd, namespace, loong64_images, gguf_hub, tmp_path):  # noqa: F811
    config = ("registry: localhost\nimagePullPolicy: Never\n"
              "profiles:\n  loongson:\n"
              "    nodeSelector: {kubernetes.io/hostname: node1}   # the one (x86_64) node stands in for Loongson\n"
              f"    operatorImage: {OPERATOR_LOONG64}\n    images: {{llamacpp: {LLAMACPP_LOONG64}}}\n"
              f"pull: {{allowedEndpoints: {{huggingface: ['{gguf_hub.url}']}}}}\n")
    with operator_process(kubeconfig, namespace, tmp_path, config) as process:
        yield process


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def samples(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if not s.labels}


def machine(kubeconfig: str, namespace: str, pod: str, container: str) -> str:
    done = kubectl(kubeconfig, "-n", namespace, "exec", pod, "-c", container, "--", "uname", "-m")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_gguf_model_served_by_loong64_llamacpp_with_a_loong64_pull_and_sidecar(
        api_client, kubeconfig, namespace, operator, gguf_hub):
    started = time.monotonic()
    custom, core = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)
    repo = gguf_hub.repos[TINY_GGUF]
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, mdep(
        "tiny", model={"id": TINY_GGUF, "endpoint": gguf_hub.url}, task="text-generation",
        accelerator={"profile": "loongson"}, runtime={"engine": "llamacpp"}))

    def ready_or_faulted():
        if condition(custom, namespace, "tiny", "Ready").get("status") == "True":
            return "ready"
        for pod in server_pods(core, namespace, "tiny"):     # qemu writes the guest's core dump and hangs: fail now
            if pod.status.phase == "Running" and GUEST_FAULT in (log := core.read_namespaced_pod_log(
                    pod.metadata.name, namespace, container="server")):
                pytest.fail(f"llama-server (loong64) was killed by a signal:\n{log[-2000:]}", pytrace=False)
        return None

    wait_for(ready_or_faulted, 480, "Ready", interval=2, detail=lambda: condition(custom, namespace, "tiny", "Ready"))
    ready_after = time.monotonic() - started

    # The pull ran the loong64 operator image and took one quantisation: the F16 file, nothing else.
    job_pod = core.list_namespaced_pod(namespace, label_selector="app.kubernetes.io/component=pull").items[0]
    assert job_pod.spec.containers[0].image == OPERATOR_LOONG64 and job_pod.status.phase == "Succeeded"
    result = json.loads(job_pod.status.container_statuses[0].state.terminated.message)
    assert sorted(result["file_endpoints"]) == ["tiny-llama-F16.gguf"]
    assert gguf_hub.total_bytes_sent == repo.files["tiny-llama-F16.gguf"].size

    pod = server_pods(core, namespace, "tiny")[0]
    server, monitor = pod.spec.containers
    assert server.image == LLAMACPP_LOONG64 and monitor.image == OPERATOR_LOONG64
    assert server.args[server.args.index("-m") + 1].endswith(f"/snapshots/{repo.commit}/tiny-llama-F16.gguf")
    assert "--metrics" in server.args and monitor.args[monitor.args.index("--probe-path") + 1] == "/health"
    # Both containers' processes run loong64 code (qemu-user reports the emulated machine).
    assert machine(kubeconfig, namespace, pod.metadata.name, "monitor") == "loongarch64"
    assert machine(kubeconfig, namespace, pod.metadata.name, "server") == "loongarch64"

    # A completion from llama.cpp through its OpenAI API, at the pod's address.
    base = f"http://{pod.status.pod_ip}"
    completion = post(f"{base}:8080/v1/completions", {"model": TINY_GGUF, "prompt": "hello world", "max_tokens": 8,
                                                      "temperature": 0, "ignore_eos": True})
    assert completion["usage"]["completion_tokens"] == 8 and isinstance(completion["choices"][0]["text"], str)

    # The sidecar: its probe of /health, and llama.cpp's own metrics (--metrics) passed on.
    metrics = wait_for(lambda: (s := samples(f"{base}:9090/metrics")).get("model_server_up") == 1
                       and s.get("model_server_metrics_scrape_success") == 1 and s, 60, "the sidecar's metrics")
    assert metrics["llamacpp:tokens_predicted_total"] >= 8
    assert metrics["model_server_probe_consecutive_failures"] == 0
    print(f"loongson under emulation: Ready after {ready_after:.0f} s, test body {time.monotonic() - started:.0f} s")
