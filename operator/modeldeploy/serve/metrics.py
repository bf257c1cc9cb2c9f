"""The runtime's Prometheus metrics. The first two names are the ones users of the original design know; the rest
follow vLLM/TGI practice (queue depth, batch size, time in queue, tokens) under the same `model_` prefix."""

from __future__ import annotations

from prometheus_client import PROCESS_COLLECTOR, CollectorRegistry, Counter, Gauge, Histogram, Info

from modeldeploy.serve.precision import PrecisionChoice

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
        self.precision = Info("model_precision", "The precision that runs (selected), what was asked for "
                              "(requested) and why (reason; auto on CPU is measured at start-up)", ["model_name"],
                              registry=r)
        self.int8_speedup = Gauge("model_precision_int8_speedup_ratio", "fp32 time over int8 time of the model's "
                                  "linear layers, measured at start-up by precision auto", ["model_name"], registry=r)
        self.int8_agreement = Gauge("model_precision_int8_cosine", "Mean cosine of the int8 model's output to "
                                    "fp32's on held-out texts, measured at start-up by precision auto",
                                    ["model_name"], registry=r)
        self.precision_seconds = Gauge("model_precision_decision_seconds", "Start-up time spent deciding "
                                       "precision auto (timing, calibration, agreement check)", ["model_name"],
                                       registry=r)

    def record_precision(self, choice: PrecisionChoice) -> None:
        self.quantization = choice.selected      # the latency histogram's label from now on
        self.precision.labels(self.model_name).info({"requested": choice.requested, "selected": choice.selected,
                                                     "reason": choice.reason})
        if choice.requested == "auto":
            self.precision_seconds.labels(self.model_name).set(choice.seconds)
        if choice.int8_speedup is not None:
            self.int8_speedup.labels(self.model_name).set(choice.int8_speedup)
        if choice.agreement is not None:
            self.int8_agreement.labels(self.model_name).set(choice.agreement)

    def observe_latency(self, seconds: float) -> None:
        self.latency.labels(self.model_name, self.quantization).observe(seconds)

    def count_error(self, error_type: str) -> None:
        self.errors.labels(self.model_name, error_type).inc()

    def count_request(self, endpoint: str, code: int) -> None:
        self.requests.labels(self.model_name, endpoint, str(code)).inc()
