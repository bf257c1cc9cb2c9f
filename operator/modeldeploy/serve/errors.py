"""The runtime's errors, one class per answer. Each carries its HTTP status, the OpenAI error `type`, the label it
counts under in `model_inference_errors_total`, and the request field it names; app.py answers them all in the
called protocol's own error shape."""

from __future__ import annotations


class ServeError(Exception):
    status = 500
    kind = "internal_error"     # OpenAI's error "type"
    metric = "internal"
    headers: dict[str, str] = {}

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class BadInput(ServeError, ValueError):
    """The request is wrong (the client's fault)."""
    status, kind, metric = 400, "invalid_request_error", "bad_request"


class TooLarge(ServeError):
    """The request is bigger than this server ever takes (body size, inputs, queue): the same answer however
    busy the server is, so a client knows not to retry it as it is."""
    status, kind, metric = 413, "request_too_large", "too_large"


class ModelNotFound(ServeError):
    status, kind, metric = 404, "model_not_found", "model_not_found"


class QueueFull(ServeError):
    """The request fits the limits but not the queue's free room now: worth retrying."""
    status, kind, metric = 503, "server_overloaded", "queue_full"
    headers = {"Retry-After": "1"}

    def __init__(self, message: str):
        super().__init__(f"the server is busy: {message}")


class NotReady(ServeError):
    status, kind, metric = 503, "server_not_ready", "not_ready"
    headers = {"Retry-After": "5"}


class Refused(ServeError):
    """aiohttp's own refusals (no such route, method not allowed)."""
    kind, metric = "invalid_request_error", "bad_request"

    def __init__(self, message: str, status: int, headers: dict[str, str]):
        super().__init__(message)
        self.status, self.headers = status, headers


class TimedOut(ServeError):
    status, kind, metric = 504, "timeout", "timeout"
