"""The HTTP server: protocol routes over one engine, health and metrics, error handling that keeps the server up.
It listens at once (liveness, metrics) and turns ready only after the model is loaded and a warm-up pass ran."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from modeldeploy.serve.batching import QueueFull
from modeldeploy.serve.engine import BadInput, Engine
from modeldeploy.serve.kserve_api import KServeRoutes
from modeldeploy.serve.metrics import RuntimeMetrics
from modeldeploy.serve.openai_api import ModelNotFound, OpenAIRoutes

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    name: str
    metrics: RuntimeMetrics
    engine: Engine | None = None
    ready: bool = False
    created: int = field(default_factory=lambda: int(time.time()))


def error_response(request: web.Request, status: int, message: str, kind: str, param: str | None = None,
                   headers: dict | None = None) -> web.Response:
    """The error in the format of the API that was called: KServe v2 `{"error": ...}`, else OpenAI's."""
    if request.path.startswith("/v2/"):
        return web.json_response({"error": message}, status=status, headers=headers)
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": status}},
                             status=status, headers=headers)


def build_app(state: ServerState) -> web.Application:
    @web.middleware
    async def guard(request: web.Request, handler):
        measured = request.path.startswith(("/v1/", "/v2/models/")) and request.method == "POST"
        if request.path.startswith(("/v1/", "/v2/models/")) and not state.ready:
            return error_response(request, 503, "the model is still loading", "server_not_ready",
                                  headers={"Retry-After": "5"})
        started = time.monotonic()
        kind = None
        try:
            response = await handler(request)
        except BadInput as error:
            kind, response = "bad_request", error_response(request, 400, str(error), "invalid_request_error",
                                                           error.param)
        except ModelNotFound as error:
            kind, response = "model_not_found", error_response(request, 404, str(error), "model_not_found", "model")
        except QueueFull as error:
            kind, response = "queue_full", error_response(request, 503, f"the server is busy: {error}",
                                                          "server_overloaded", headers={"Retry-After": "1"})
        except web.HTTPException:
            raise
        except Exception as error:   # a bug or a failed forward pass: answered, logged, the server stays up
            log.exception("%s %s failed", request.method, request.path)
            kind, response = "internal", error_response(request, 500, f"internal error: {type(error).__name__}",
                                                        "internal_error")
        if measured:
            route = request.match_info.route.resource.canonical if request.match_info.route.resource else "?"
            state.metrics.count_request(route, response.status)
            if kind:
                state.metrics.count_error(kind)
            else:
                state.metrics.observe_latency(time.monotonic() - started)
        return response

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(state.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application(middlewares=[guard], client_max_size=16 * 1024 * 1024)
    OpenAIRoutes(state).add_to(app)
    KServeRoutes(state).add_to(app)
    app.router.add_get("/metrics", metrics)
    return app
