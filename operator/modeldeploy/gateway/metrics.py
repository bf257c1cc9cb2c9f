"""The gateway's Prometheus metrics, per model (`model_name`: the ModelDeployment, with `namespace`). Named apart
from the servers' `model_inference_*` series, whose alerts would otherwise count each request twice and take a cold
start's wait, or a client's misspelt model name, for a slow or failing server. Requests for no known model count
under model_name="" (a label never carries what a client typed)."""

from __future__ import annotations

from prometheus_client import PROCESS_COLLECTOR, CollectorRegistry, Counter, Gauge, Histogram

from modeldeploy.serve.metrics import LATENCY_BUCKETS

HOLD_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()
        r.register(PROCESS_COLLECTOR)
        labels = ["namespace", "model_name"]
        self.requests = Counter("modeldeploy_gateway_requests_total", "Requests by model, endpoint and HTTP status",
                                labels + ["endpoint", "code"], registry=r)
        self.errors = Counter("modeldeploy_gateway_errors_total",
                              "Requests the gateway answered with an error itself (not a server's answer passed on)",
                              labels + ["error_type"], registry=r)
        self.latency = Histogram("modeldeploy_gateway_request_latency_seconds",
                                 "Arrival to the last byte of the answer, as the client sees it (time held included)",
                                 labels, buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("modeldeploy_gateway_requests_in_flight",
                               "Requests in the gateway for each model, forwarded or held", labels, registry=r)
        self.held = Gauge("modeldeploy_gateway_held_requests", "Requests waiting for a ready replica", labels,
                          registry=r)
        self.hold_seconds = Histogram("modeldeploy_gateway_hold_seconds",
                                      "How long requests waited for a ready replica", labels, buckets=HOLD_BUCKETS,
                                      registry=r)
        self.desired = Gauge("modeldeploy_gateway_desired_replicas", "The autoscaler's decision per model", labels,
                             registry=r)
        self.cold_start = Gauge("modeldeploy_gateway_cold_start_seconds",
                                "The last scale-up from zero: first held request to a ready replica", labels,
                                registry=r)
        self.ready_pods = Gauge("modeldeploy_gateway_ready_replicas", "Ready addresses the gateway routes to",
                                labels, registry=r)
        self.children: dict = {}

    def child(self, metric, *labels):
        """`metric.labels(*labels)`, remembered: labels() checks and locks on every call, and the gateway asks for
        several on every request."""
        key = (id(metric), labels)
        found = self.children.get(key)
        if found is None:
            found = self.children[key] = metric.labels(*labels)
        return found
