"""The runtime's Prometheus metrics. The first two names are the ones users of the original design know; the rest
follow vLLM/TGI practice (queue depth, batch size, time in queue, tokens) under the same `model_` prefix."""

from __future__ import annotations

from prometheus_client import PROCESS_COLLECTOR, CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class RuntimeMetrics:
    def __init__(self, model_name: str, quantization: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.model_name = model_name
        self.quantization = quantization
        r = self.registry
        r.register(PROCESS_COLLECTOR)   # the server process's CPU seconds and resident memory
        self.latency = Histogram("model_inference_latency_seconds", "Request latency, arrival to response",
                                 ["model_name", "quantization"], buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("model_inference_errors_total", "Failed requests by kind",
                              ["model_name", "error_type"], registry=r)
        self.requests = Counter("model_requests_total", "Requests by endpoint and HTTP status",
                                ["model_name", "endpoint", "code"], registry=r)
        self.queue_size = Gauge("model_queue_size", "Items waiting for a forward pass", ["model_name"], registry=r)
        self.batch_size = Histogram("model_batch_size", "Items per forward pass", ["model_name"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_time = Histogram("model_queue_time_seconds", "Time a request waited for its forward pass",
                                    ["model_name"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("model_prompt_tokens_total", "Input tokens processed", ["model_name"],
                                     registry=r)
        self.generated_tokens = Counter("model_generated_tokens_total", "Tokens generated", ["model_name"],
                                        registry=r)
        self.cancelled = Counter("model_cancelled_requests_total",
                                 "Requests given up before their result: the client went away or the request ran "
                                 "past its time limit (a generation stops at its next token)", ["model_name"],
                                 registry=r)
        self.load_seconds = Gauge("model_load_seconds", "Time to load and warm up the model", ["model_name"],
                                  registry=r)
        self.ready = Gauge("model_ready", "1 once the model is loaded and warmed up", ["model_name"], registry=r)

    def observe_latency(self, seconds: float) -> None:
        self.latency.labels(self.model_name, self.quantization).observe(seconds)

    def count_error(self, error_type: str) -> None:
        self.errors.labels(self.model_name, error_type).inc()

    def count_request(self, endpoint: str, code: int) -> None:
        self.requests.labels(self.model_name, endpoint, str(code)).inc()
