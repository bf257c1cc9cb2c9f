"""The gateway's HTTP side: OpenAI's routes, each request routed on its `model` field to that model's ready pod with
the fewest requests in flight; held (bounded in number and time) while the model has no ready pod; streams passed on
chunk by chunk. Errors the gateway itself answers come in OpenAI's shape (serve/'s error classes); a server's own
answers, errors included, pass through unchanged."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from modeldeploy.gateway.autoscaler import Decision, Recommender
from modeldeploy.gateway.metrics import GatewayMetrics
from modeldeploy.gateway.routing import Key, Model, Pool, public_names, resolve
from modeldeploy.gateway.upstream import Answer, Unconnected, Upstreams, UpstreamError
from modeldeploy.reconcile.status import now as timestamp
from modeldeploy.serve.app import error_body, error_response, from_aiohttp
from modeldeploy.serve.errors import BadInput, ModelNotFound, NotReady, QueueFull, ServeError, TimedOut
from modeldeploy.serve.requests import Limits, OpenAIRequest

log = logging.getLogger("modeldeploy.gateway")
ROUTES = ("/v1/embeddings", "/v1/completions", "/v1/chat/completions", "/v1/classify")
PASSED_BACK = ("Content-Type", "Retry-After", "Allow")     # of a server's headers, the ones a client needs
MODEL = web.RequestKey("model", tuple)      # the model's (namespace, name) once known, for the metrics


@dataclass(frozen=True)
class Options:
    max_body_bytes: int = 4 * 2**20
    hold_timeout: float = 300.0         # a held request's longest wait for a ready replica
    max_held: int = 256                 # held requests per model; more are refused at once (503)
    request_timeout: float = 600.0      # to the server's last byte
    connect_timeout: float = 5.0
    tick: float = 1.0                   # autoscaler period


class Unreachable(ServeError):
    status, kind, metric = 502, "bad_gateway", "upstream"


# (namespace, name, fields) -> written: the autoscaler's decision into the ModelDeployment's status.
StatusWriter = Callable[[str, str, dict], Awaitable[None]]


class Gateway:
    def __init__(self, options: Options = Options(), metrics: GatewayMetrics | None = None,
                 write_status: StatusWriter | None = None):
        self.options = options
        self.metrics = metrics or GatewayMetrics()
        self.write_status = write_status
        self.models: dict[Key, Model] = {}
        self.pools: dict[Key, Pool] = {}
        self.recommenders: dict[Key, Recommender] = {}
        self.synced = asyncio.Event()        # set once the watches listed what exists
        self.upstreams = Upstreams(options.connect_timeout)

    # -- the routing table, as the watches (or a fixed list) tell it -----------------------------------------------
    def pool(self, key: Key) -> Pool:
        if key not in self.pools:
            now = time.monotonic()
            self.pools[key] = Pool(since=now, changed=now)
        return self.pools[key]

    def set_model(self, model: Model) -> None:
        old = self.models.get(model.key)
        if old is not None and old.desired != model.desired and model.desired is not None:
            self.metrics.desired.labels(*model.key).set(model.desired)
        self.models[model.key] = model
        self.pool(model.key)

    def drop_model(self, key: Key) -> None:
        self.models.pop(key, None)
        self.recommenders.pop(key, None)

    def set_addresses(self, key: Key, addresses: list[str]) -> None:
        pool = self.pool(key)
        was_empty = not pool.addresses
        self.upstreams.drop(set(pool.addresses) - set(addresses))
        pool.set_addresses(addresses)
        self.metrics.ready_pods.labels(*key).set(len(addresses))
        if was_empty and addresses and pool.held_since is not None:
            seconds = time.monotonic() - pool.held_since
            pool.held_since = None
            self.metrics.cold_start.labels(*key).set(seconds)
            log.info("%s/%s: a replica is ready %.1f s after the first held request", *key, seconds)
            model = self.models.get(key)
            if model is not None and model.autoscaling is not None:
                self.spawn(self.report(key, {"coldStartSeconds": round(seconds, 2)}))

    # -- requests --------------------------------------------------------------------------------------------------
    def build_app(self) -> web.Application:
        app = web.Application(middlewares=[self.guard], client_max_size=self.options.max_body_bytes)
        app.router.add_get("/v1/models", self.list_models)
        for route in ROUTES:
            app.router.add_post(route, self.forward)
        app.router.add_get("/metrics", self.export_metrics)
        app.router.add_get("/healthz", self.liveness)
        app.router.add_get("/readyz", self.readiness)
        app.on_startup.append(self.start)
        app.on_cleanup.append(self.stop)
        return app

    async def start(self, _app) -> None:
        self.tasks = {asyncio.get_running_loop().create_task(self.autoscale_forever())}

    async def stop(self, _app) -> None:
        for task in self.tasks:
            task.cancel()
        self.upstreams.close()

    def spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    @web.middleware
    async def guard(self, request: web.Request, handler):
        started = time.monotonic()
        error = None
        try:
            response = await handler(request)
        except ServeError as raised:
            error = raised
        except web.HTTPException as raised:
            if raised.status < 400:
                raise
            error = from_aiohttp(request, raised, Limits(max_body_bytes=self.options.max_body_bytes))
        except Exception as raised:
            log.exception("%s %s failed", request.method, request.path)
            error = ServeError(f"internal error: {type(raised).__name__}")
        if error is not None:
            response = error_response(request, error)
        if request.method == "POST":
            labels = request.get(MODEL, ("", ""))
            metrics = self.metrics
            metrics.child(metrics.requests, *labels, request.path if request.path in ROUTES else "other",
                          str(response.status)).inc()
            if error is not None:
                metrics.child(metrics.errors, *labels, error.metric).inc()
            else:
                metrics.child(metrics.latency, *labels).observe(time.monotonic() - started)
        return response

    async def list_models(self, request: web.Request) -> web.Response:
        names = public_names(self.models)
        data = [{"id": names[key], "object": "model", "created": model.created, "owned_by": key[0],
                 "root": model.served_as} for key, model in sorted(self.models.items()) if model.ready]
        return web.json_response({"object": "list", "data": data})

    async def liveness(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def readiness(self, request: web.Request) -> web.Response:
        return web.Response(text="ok") if self.synced.is_set() else web.Response(status=503, text="syncing")

    async def export_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    def route(self, body: bytes) -> tuple[dict, Model]:
        """The request's JSON and the model it names; 400 for a body that is no JSON object or names no model, 404
        for a model the gateway does not know."""
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as error:
            raise BadInput(f"the request body is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise BadInput("the request body must be a JSON object")
        try:
            asked = OpenAIRequest.model_validate({"model": data.get("model")}).model
        except ValueError:
            raise BadInput("model: must be a string", "model") from None
        if not asked:
            raise BadInput("model: required: the gateway routes on it (GET /v1/models lists them)", "model")
        key, candidates = resolve(self.models, asked)
        if key is None:
            hint = (f"; it exists in several namespaces: {', '.join(candidates)}" if candidates else
                    f"; this gateway serves {', '.join(sorted(public_names(self.models).values())) or 'none'}")
            raise ModelNotFound(f"the model {asked[:200]!r} does not exist{hint[:1000]}", "model")
        return data, self.models[key]

    async def forward(self, request: web.Request) -> web.StreamResponse:
        data, model = self.route(await request.read())
        request[MODEL] = model.key
        if model.stalled:
            raise NotReady(f"the model {model.name!r} cannot serve: {model.stalled}")
        data["model"] = model.served_as
        payload = json.dumps(data, separators=(",", ":")).encode()
        pool = self.pool(model.key)
        gauge = self.metrics.child(self.metrics.in_flight, *model.key)
        pool.add(1, time.monotonic())
        gauge.inc()
        try:
            if not pool.addresses:
                await self.hold(model, pool)
            return await self.send(request, pool, payload)
        finally:
            pool.add(-1, time.monotonic())
            gauge.dec()

    async def hold(self, model: Model, pool: Pool) -> None:
        """Waits for a ready replica: at most `max_held` requests per model, each at most `hold_timeout`. The
        request counts as in flight meanwhile, which is what makes the autoscaler start a replica."""
        if pool.held >= self.options.max_held:
            raise QueueFull(f"{pool.held} requests already wait for a replica of {model.name!r}")
        now = time.monotonic()
        if pool.held_since is None:
            pool.held_since = now
        pool.held += 1
        gauge = self.metrics.held.labels(*model.key)
        gauge.inc()
        try:
            async with asyncio.timeout(self.options.hold_timeout):
                while not pool.addresses:
                    await pool.available.wait()
        except TimeoutError:
            raise NotReady(f"no replica of {model.name!r} became ready within {self.options.hold_timeout:g} s"
                           ) from None
        finally:
            pool.held -= 1
            gauge.dec()
            self.metrics.hold_seconds.labels(*model.key).observe(time.monotonic() - now)
            if not pool.held and pool.addresses:
                pool.held_since = None

    async def send(self, request: web.Request, pool: Pool, payload: bytes) -> web.StreamResponse:
        """To the ready address with the fewest requests in flight; one whose connection is refused (a pod going
        away before its endpoint does) gives way to the next. A server's answer passes through as it comes."""
        tried: set[str] = set()
        while (address := pool.pick(tried)) is not None:
            tried.add(address)
            pool.in_flight[address] += 1
            sent = time.perf_counter()
            answer = None
            try:
                async with asyncio.timeout(self.options.request_timeout) as deadline:
                    answer = await self.upstreams.post(address, request.path, payload)
                    headers = {k: answer.headers[k.lower()] for k in PASSED_BACK if k.lower() in answer.headers}
                    if answer.content_type != "text/event-stream":
                        body = await answer.read()
                        # What the server took, as the gateway saw it, after the server's own entries (modeldeploy
                        # serve's `serve`): a client tells the gateway's share from them.
                        took = f"upstream;dur={(time.perf_counter() - sent) * 1000:.3f}"
                        server = answer.headers.get("server-timing")
                        headers["Server-Timing"] = f"{server}, {took}" if server else took
                        return web.Response(status=answer.status, body=body, headers=headers)
                return await self.relay_stream(request, answer, headers, deadline.when())
            except TimeoutError:
                raise TimedOut(f"the model server took longer than {self.options.request_timeout:g} s") from None
            except Unconnected as error:
                log.warning("%s, trying another replica", error)
            except UpstreamError as error:
                raise Unreachable(f"the model server failed: {error}") from None
            finally:
                if answer is not None:
                    self.upstreams.abandon(answer)
                pool.in_flight[address] -= 1
                if not pool.in_flight[address]:
                    del pool.in_flight[address]
        raise Unreachable("no replica of this model accepted the connection")

    async def relay_stream(self, request: web.Request, upstream: Answer, headers: dict,
                           deadline: float) -> web.StreamResponse:
        """Server-sent events passed on as each chunk arrives. Once the headers are out, a server that fails ends
        the stream with the error as its last event (as the servers themselves do); a client that goes away closes
        the server's connection, which cancels its generation."""
        response = web.StreamResponse(status=upstream.status, headers={**headers, "Cache-Control": "no-cache"})
        try:
            await response.prepare(request)
            try:
                async with asyncio.timeout_at(deadline):
                    async for chunk in upstream.chunks():
                        await response.write(chunk)
            except (UpstreamError, TimeoutError) as error:
                self.upstreams.abandon(upstream)        # before a write that a client not reading can hold up
                failed = Unreachable(f"the model server failed mid-stream: {type(error).__name__}")
                await response.write(f"data: {json.dumps(error_body(request, failed))}\n\n".encode())
            await response.write_eof()
        except ConnectionResetError:
            pass
        return response

    # -- autoscaling -------------------------------------------------------------------------------------------------
    async def autoscale_forever(self) -> None:
        while True:
            await asyncio.sleep(self.options.tick)
            try:
                self.autoscale_once(time.monotonic())
            except Exception:
                log.exception("autoscaler tick failed")

    def autoscale_once(self, now: float) -> None:
        for key, model in list(self.models.items()):
            pool = self.pool(key)
            load = pool.average_since_last(now)
            if model.autoscaling is None:
                self.recommenders.pop(key, None)
                continue
            recommender = self.recommenders.setdefault(key, Recommender(started=now))
            decision = recommender.decide(now, load, model.autoscaling, model.current_replicas())
            if decision is not None:
                self.apply(model, decision)

    def apply(self, model: Model, decision: Decision) -> None:
        log.info("%s/%s: %s -> %d replicas (%s)", model.namespace, model.name, model.current_replicas(),
                 decision.replicas, decision.reason)
        model.desired = decision.replicas       # taken at once: the next tick starts from it
        self.metrics.desired.labels(*model.key).set(decision.replicas)
        self.spawn(self.report(model.key, {"desiredReplicas": decision.replicas, "reason": decision.reason[:1000],
                                           "lastScaleTime": timestamp()}))

    async def report(self, key: Key, fields: dict) -> None:
        if self.write_status is None:
            return
        try:
            await self.write_status(*key, fields)
        except Exception:
            log.exception("%s/%s: writing status.autoscaler failed", *key)
