"""The operator's own Prometheus metrics, served on --metrics-port: reconciles and their duration and errors,
ModelDeployments by phase, and the bytes the pull Jobs have moved."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECONCILES = Counter("modeldeploy_operator_reconciles_total", "Reconciles of a ModelDeployment, by result",
                     ["result"])   # ok | error | conflict (the resource changed meanwhile: read again, run again)
RECONCILE_SECONDS = Histogram("modeldeploy_operator_reconcile_duration_seconds", "Time one reconcile took",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
PHASES = ("Pending", "Pulling", "Deploying", "Ready", "Failed")
BY_PHASE = Gauge("modeldeploy_model_deployments", "ModelDeployments this operator watches, by phase", ["phase"])
PULL_BYTES = Gauge("modeldeploy_pull_bytes", "Bytes a ModelDeployment's pull has fetched so far",
                   ["namespace", "model_deployment"])
PULL_TOTAL_BYTES = Gauge("modeldeploy_pull_total_bytes", "Bytes a ModelDeployment's pull fetches in all",
                         ["namespace", "model_deployment"])
PULL_FAILURES = Counter("modeldeploy_pull_failures_total", "Pulls that ended failed, by reason", ["reason"])
API_REQUESTS = Counter("modeldeploy_operator_api_requests_total",
                       "Requests the reconciler made to the Kubernetes API (kopf's watches aside), by method",
                       ["method"])


class PhaseBook:
    """Each ModelDeployment's last phase, so the by-phase gauge counts resources, not reconciles."""

    def __init__(self) -> None:
        self.phases: dict[tuple[str, str], str] = {}
        for phase in PHASES:
            BY_PHASE.labels(phase).set(0)

    def record(self, namespace: str, name: str, phase: str | None) -> None:
        key = (namespace, name)
        if phase is None:
            self.phases.pop(key, None)
            for gauge in (PULL_BYTES, PULL_TOTAL_BYTES):
                try:
                    gauge.remove(namespace, name)
                except KeyError:
                    pass
        else:
            self.phases[key] = phase
        for each in PHASES:
            BY_PHASE.labels(each).set(sum(1 for p in self.phases.values() if p == each))


def record_download(namespace: str, name: str, download: dict | None) -> None:
    if not download or download.get("bytes") is None:
        return
    PULL_BYTES.labels(namespace, name).set(download["bytes"])
    total = download.get("totalBytes")
    if total is not None:
        PULL_TOTAL_BYTES.labels(namespace, name).set(total)
