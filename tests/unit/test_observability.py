"""The chart's observability kit: the alert rules parse as PromQL (the real Prometheus grammar, via promql-parser),
the Grafana dashboard loads and its queries parse, and every metric either of them names is one that the runtime,
the monitoring sidecar or the operator really exports (read off their registries, not a list kept by hand)."""

from __future__ import annotations

import json
import logging
import re
import sys
import types

import promql_parser
import pytest
import yaml
from prometheus_client import REGISTRY, CollectorRegistry

from modeldeploy.gateway.metrics import GatewayMetrics
from modeldeploy.monitor.exporter import Monitor, MonitorOptions
from modeldeploy.reconcile import metrics as operator_metrics  # noqa: F401  (registers the operator's metrics)
from modeldeploy.serve.gpu import GPU_METRICS, NvmlCollector
from modeldeploy.serve.metrics import RuntimeMetrics
from tests.helpers import REPO

FILES = REPO / "charts" / "modeldeploy" / "files"
DURATION = re.compile(r"^[0-9]+(ms|s|m|h|d)$")


def sample_names(registry: CollectorRegistry) -> set[str]:
    """The series names a registry's families produce, labelled or not (a family without children has no samples
    yet, so names are derived from its type)."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "summary": ["_sum", "_count"],
                "gauge": [""], "info": ["_info"], "unknown": [""]}
    return {family.name + suffix for family in registry.collect() for suffix in suffixes[family.type]}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> set[str]:
    runtime = sample_names(RuntimeMetrics("m", "none").registry)
    cache = tmp_path_factory.mktemp("cache")
    (cache / "weights").write_bytes(b"x" * 10)
    sidecar = sample_names(Monitor(MonitorOptions(target="http://127.0.0.1:9", cache_dir=cache,
                                                  snapshot=cache)).registry)
    gpu = {name for name, _ in GPU_METRICS.values()}     # the builtin runtime's, where NVML sees GPUs
    assert not any(name.startswith("model_gpu_") for name in sidecar)
    operator = {name for name in sample_names(REGISTRY) if name.startswith("modeldeploy_")}
    assert "model_inference_latency_seconds_bucket" in runtime and "model_server_up" in sidecar
    assert "modeldeploy_operator_reconciles_total" in operator
    gateway = sample_names(GatewayMetrics().registry)
    return runtime | sidecar | gpu | operator | gateway


def metric_names(expr: str) -> set[str]:
    """Every metric a PromQL expression selects, from its syntax tree."""
    names: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names.add(node.name)
            return
        for attribute in ("expr", "lhs", "rhs", "vector_selector", "param"):
            child = getattr(node, attribute, None)
            if child is not None and not isinstance(child, (str, int, float)):
                walk(child)
        for arg in getattr(node, "args", None) or []:
            walk(arg)

    walk(promql_parser.parse(expr))
    return names


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load((FILES / "alerts.yaml").read_text())["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[str]:
    dashboard = json.loads((FILES / "dashboard.json").read_text())
    return [target["expr"].replace("$__rate_interval", "5m") for panel in dashboard["panels"]
            for target in panel["targets"]]


def test_alert_rules_are_valid():
    rules = alert_rules()
    alerts = {rule["alert"] for rule in rules}
    # The list: down, error rate, latency, pull failures, GPU memory.
    assert {"ModelServerDown", "ModelServerErrorRateHigh", "ModelServerLatencyHigh", "ModelPullFailed",
            "ModelGPUMemoryNearlyFull"} <= alerts
    assert len(alerts) == len(rules)
    for rule in rules:
        promql_parser.parse(rule["expr"])
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert "for" not in rule or DURATION.match(rule["for"])


def test_dashboard_loads_and_its_queries_parse():
    dashboard = json.loads((FILES / "dashboard.json").read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] == "modeldeploy"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for panel in dashboard["panels"]:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["targets"]
        for target in panel["targets"]:
            assert set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval"} <= variables
    for query in dashboard_queries():
        promql_parser.parse(query)


def test_every_referenced_metric_is_exported(exported):
    referenced = set()
    for expr in [rule["expr"] for rule in alert_rules()] + dashboard_queries():
        referenced |= metric_names(expr)
    assert referenced, "no metric found: the walker is broken"
    assert referenced - exported == set()


def test_the_walker_finds_names_in_nested_expressions():
    expr = "histogram_quantile(0.9, sum by (le) (rate(a_bucket[5m]))) / (b + on() group_left c) > bool -d"
    assert metric_names(expr) == {"a_bucket", "b", "c", "d"}


def test_without_nvml_the_runtime_exports_no_gpu_series_and_says_why(caplog):
    """This machine has no NVIDIA driver: NVML's library is missing, as in a pod given no GPU."""
    registry = CollectorRegistry()
    with caplog.at_level(logging.WARNING, logger="modeldeploy.serve.gpu"):
        registry.register(NvmlCollector("m"))
    assert "no GPU metrics: NVML is not usable in this container" in caplog.text
    assert not [family for family in registry.collect() if family.name.startswith("model_gpu_")]


class FakeNvml:
    """NVML's API for two GPUs, the second without a power reading: for the exported shape only (no GPU here)."""

    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetUUID(self, handle):
        return f"GPU-{handle}".encode() if handle else f"GPU-{handle}"     # older bindings return bytes

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(used=79 * 2**30, total=80 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, handle):
        return types.SimpleNamespace(gpu=42)

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return 61

    def nvmlDeviceGetPowerUsage(self, handle):
        if handle == 1:
            raise self.NVMLError("Not Supported")
        return 250_000


def test_gpu_series_carry_the_labels_the_alert_groups_by(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    registry = CollectorRegistry()
    registry.register(NvmlCollector("org/m"))
    samples = {(s.name, s.labels["gpu"]): s for family in registry.collect() for s in family.samples}
    assert samples[("model_gpu_memory_used_bytes", "1")].labels == {"model_name": "org/m", "gpu": "1",
                                                                     "uuid": "GPU-1"}
    assert samples[("model_gpu_utilization_ratio", "0")].value == 0.42
    assert samples[("model_gpu_power_watts", "0")].value == 250
    assert ("model_gpu_power_watts", "1") not in samples              # not supported there: left out, not 0
    rule = next(r for r in alert_rules() if r["alert"] == "ModelGPUMemoryNearlyFull")
    grouped = set(re.search(r"max by \(([^)]*)\)", rule["expr"]).group(1).replace(" ", "").split(","))
    assert grouped - {"namespace", "pod"} <= set(samples[("model_gpu_memory_used_bytes", "0")].labels)
    assert samples[("model_gpu_memory_used_bytes", "0")].value / \
        samples[("model_gpu_memory_total_bytes", "0")].value > 0.95                  # this one would fire
