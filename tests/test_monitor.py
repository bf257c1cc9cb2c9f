"""The monitoring sidecar beside a real model server: one endpoint carrying the server's metrics (moving with
traffic) and the sidecar's own (probe, cache, cgroup), read with Prometheus' text parser; and what it reports when
the server goes away, and where there is no GPU."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import ServeProcess, free_port, wait_for
from tests.models import MINILM, pull_minilm


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cache")
    return directory, pull_minilm(directory)


def scrape(url: str) -> dict[str, float]:
    """Samples by name and sorted labels, e.g. 'model_server_up' or 'model_inference_errors_total{...}'."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def embed(url: str, texts: list[str]) -> None:
    request = urllib.request.Request(f"{url}/v1/embeddings", data=json.dumps({"input": texts}).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=60).read()


def test_one_endpoint_with_the_servers_metrics_and_the_sidecars(cache, tmp_path):
    directory, commit = cache
    server = ServeProcess("--model", MINILM, "--revision", commit, "--cache-dir", str(directory),
                          "--task", "feature-extraction", "--quantization", "none").wait_ready()
    port = free_port()
    monitor = subprocess.Popen([sys.executable, "-m", "modeldeploy", "monitor", "--target", server.url,
                                "--port", str(port), "--host", "127.0.0.1", "--interval", "0.5",
                                "--cache-dir", str(directory), "--model", MINILM, "--revision", commit],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        first = wait_for(lambda: (s := scrape(url)).get("model_server_up") == 1 and s, 60, "the sidecar to see "
                         "the server up")
        latency = f"model_inference_latency_seconds_count{{model_name={MINILM},quantization=none}}"
        before = first.get(latency, 0)
        for _ in range(3):
            embed(server.url, ["hello", "world"])
        after = scrape(url)
        assert after[latency] == before + 3                       # the runtime's own metric, passed through
        assert after["model_server_probe_duration_seconds_count"] >= 1
        assert after["model_server_probe_consecutive_failures"] == 0
        assert after["model_server_metrics_scrape_success"] == 1
        assert after["model_cache_used_bytes"] > 0 and after["model_cache_free_bytes"] > 0
        assert after["model_size_bytes"] >= 90_000_000           # the MiniLM snapshot on disk
        # No GPU series: the sidecar requests no GPU, and a CPU server exports none (not zeros, not guesses).
        assert not any(name.startswith("model_gpu_") for name in after)
        assert after["model_precision_info{model_name=%s,reason=requested,requested=none,selected=none}" % MINILM] == 1
        assert after["process_resident_memory_bytes"] > 0          # the server process's footprint
        assert any(name.startswith("modeldeploy_monitor_memory_bytes") for name in after)

        server.stop()
        down = wait_for(lambda: (s := scrape(url)).get("model_server_up") == 0 and s, 30, "the sidecar to see the "
                        "server down")
        assert down["model_server_metrics_scrape_success"] == 0
        wait_for(lambda: scrape(url)["model_server_probe_consecutive_failures"] >= 2, 30,
                 "consecutive failures to count up")
        with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
            assert response.status == 200                         # its own liveness holds with the server gone
    finally:
        server.stop()
        monitor.terminate()
        monitor.wait(10)


def test_tcp_probe_for_a_server_without_a_health_path():
    """The custom engine's sidecar (--probe-tcp): up while the port accepts connections, whatever HTTP says."""
    listener = socket.create_server(("127.0.0.1", 0))     # accepts, never answers HTTP
    target = f"http://127.0.0.1:{listener.getsockname()[1]}"
    port = free_port()
    monitor = subprocess.Popen([sys.executable, "-m", "modeldeploy", "monitor", "--target", target, "--probe-tcp",
                                "--port", str(port), "--host", "127.0.0.1", "--interval", "0.3"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: scrape(url).get("model_server_up") == 1, 30, "the TCP probe to see the port open")
        assert scrape(url)["model_server_probe_consecutive_failures"] == 0
        listener.close()
        wait_for(lambda: (s := scrape(url)).get("model_server_up") == 0
                 and s["model_server_probe_consecutive_failures"] >= 2, 30, "the TCP probe to see the port closed")
    finally:
        listener.close()
        monitor.terminate()
        monitor.wait(10)
