"""The PodMonitor of a ModelDeployment, for clusters that run the Prometheus Operator: it scrapes each serving
pod's monitoring sidecar, the one endpoint that carries the server's metrics too."""

from __future__ import annotations

from modeldeploy.manifests.common import mdep_labels
from modeldeploy.manifests.serving import server_selector

POD_MONITOR_API = ("monitoring.coreos.com", "v1", "podmonitors")


def build_pod_monitor(name: str) -> dict:
    return {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
        "metadata": {"name": name, "labels": mdep_labels(name, "server")},
        "spec": {
            "selector": {"matchLabels": server_selector(name)},
            "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics", "interval": "30s"}],
        },
    }
