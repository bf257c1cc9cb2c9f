"""The HTTP server: protocol routes over one engine, health and metrics, error handling that keeps the server up.
It listens at once (liveness, metrics) and turns ready only after the model is loaded and a warm-up pass ran.

Every error, aiohttp's own included (413 body too large, 404, 405), is answered in the called protocol's shape;
every inference request runs under the time limit, and is cancelled when its client goes away."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from modeldeploy.serve.engine import Engine
from modeldeploy.serve.errors import NotReady, Refused, ServeError, TimedOut, TooLarge
from modeldeploy.serve.kserve_api import KServeRoutes
from modeldeploy.serve.metrics import RuntimeMetrics
from modeldeploy.serve.openai_api import STREAM, OpenAIRoutes, end_stream
from modeldeploy.serve.requests import Context, Limits

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    name: str
    metrics: RuntimeMetrics
    limits: Limits = field(default_factory=Limits)
    engine: Engine | None = None
    ready: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    def context(self) -> Context:
        return Context(self.limits, getattr(self.engine, "dimensions", None))


def error_body(request: web.Request, error: ServeError) -> dict:
    """The error in the format of the API that was called: KServe v2 `{"error": ...}`, else OpenAI's."""
    if request.path.startswith("/v2/"):
        return {"error": str(error)}
    return {"error": {"message": str(error), "type": error.kind, "param": error.param, "code": error.status}}


def error_response(request: web.Request, error: ServeError) -> web.Response:
    return web.json_response(error_body(request, error), status=error.status, headers=error.headers)


def from_aiohttp(request: web.Request, error: web.HTTPException, limits: Limits) -> ServeError:
    if isinstance(error, web.HTTPRequestEntityTooLarge):
        return TooLarge(f"the request body is larger than this server takes ({limits.max_body_bytes / 2**20:g} MiB)")
    allow = {"Allow": error.headers["Allow"]} if "Allow" in error.headers else {}      # a 405 names the methods
    return Refused(f"{error.reason}: {request.method} {request.path}", error.status, allow)


def build_app(state: ServerState) -> web.Application:
    limits = state.limits

    @web.middleware
    async def guard(request: web.Request, handler):
        api = request.path.startswith(("/v1/", "/v2/models/"))
        measured = api and request.method == "POST"
        if api and not state.ready:
            return error_response(request, NotReady("the model is still loading"))
        started = time.monotonic()
        error = None
        try:
            async with asyncio.timeout(limits.request_timeout if api else None):
                response = await handler(request)
        except ServeError as raised:
            error = raised
        except web.HTTPException as raised:
            if raised.status < 400:
                raise
            error = from_aiohttp(request, raised, limits)
        except TimeoutError:
            error = TimedOut(f"the request took longer than this server allows ({limits.request_timeout:g} s)")
            log.warning("%s %s: cancelled after %g s (--request-timeout)", request.method, request.path,
                        limits.request_timeout)
        except Exception as raised:   # a bug or a failed forward pass: answered, logged, the server stays up
            log.exception("%s %s failed", request.method, request.path)
            error = ServeError(f"internal error: {type(raised).__name__}")
        if error is not None:
            stream = request.get(STREAM)
            if stream is not None:      # the headers are out: the error becomes the stream's last event
                await end_stream(stream, error_body(request, error))
                response = stream
            else:
                response = error_response(request, error)
        if measured:
            took = time.monotonic() - started
            route = request.match_info.route.resource.canonical if request.match_info.route.resource else "?"
            state.metrics.count_request(route, error.status if error else response.status)
            if error:
                state.metrics.count_error(error.metric)
            else:
                state.metrics.observe_latency(took)
            if not response.prepared:      # a whole answer: its headers are still to go
                # This server's share (queued for a batch, the forward pass): what a client, or a gateway in
                # between, tells its own time from.
                response.headers["Server-Timing"] = f"serve;dur={took * 1000:.3f}"
        return response

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(state.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application(middlewares=[guard], client_max_size=limits.max_body_bytes)
    OpenAIRoutes(state).add_to(app)
    KServeRoutes(state).add_to(app)
    app.router.add_get("/metrics", metrics)
    return app
