"""KServe Open Inference Protocol (v2) endpoints: health, model metadata and readiness, and infer. Inputs are
BYTES tensors of texts; outputs are FP32 tensors (embeddings, class probabilities) or BYTES (generated text)."""

from __future__ import annotations

import dataclasses

from aiohttp import web

from modeldeploy.serve.engine import ClassificationEngine, EmbeddingEngine, Engine, GenerationEngine
from modeldeploy.serve.errors import BadInput, ModelNotFound
from modeldeploy.serve.requests import InferenceRequest, V2Parameters, parse

DEFAULT_MAX_TOKENS = 16


class KServeRoutes:
    def __init__(self, state):
        self.state = state

    @property
    def engine(self) -> Engine:
        return self.state.engine

    def is_ready(self) -> bool:
        return self.state.ready

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/v2/health/live", self.live)
        app.router.add_get("/v2/health/ready", self.ready)
        # Model names hold a slash (ORG/NAME): the more specific routes go first.
        app.router.add_post("/v2/models/{name:.+}/infer", self.infer)
        app.router.add_get("/v2/models/{name:.+}/ready", self.model_ready)
        app.router.add_get("/v2/models/{name:.+}", self.metadata)

    def check_name(self, request: web.Request) -> None:
        if request.match_info["name"] != self.engine.name:
            raise ModelNotFound(f"model {request.match_info['name']!r} not found; this server serves "
                                f"{self.engine.name!r}")

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        return web.json_response({"ready": self.is_ready()}, status=200 if self.is_ready() else 503)

    async def model_ready(self, request: web.Request) -> web.Response:
        self.check_name(request)
        return await self.ready(request)

    def outputs(self) -> list[dict]:
        if isinstance(self.engine, GenerationEngine):
            return [{"name": "text_output", "datatype": "BYTES", "shape": [-1]}]
        name = "embedding" if isinstance(self.engine, EmbeddingEngine) else "probabilities"
        return [{"name": name, "datatype": "FP32", "shape": [-1, -1]}]

    async def metadata(self, request: web.Request) -> web.Response:
        self.check_name(request)
        precision = self.engine.loaded.precision
        return web.json_response({"name": self.engine.name, "versions": [self.engine.version],
                                  "platform": "pytorch-transformers",
                                  "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
                                  "outputs": self.outputs(),
                                  # an extension: which precision runs and why (auto is measured at start-up)
                                  "precision": dataclasses.asdict(precision) if precision else None})

    async def infer(self, request: web.Request) -> web.Response:
        self.check_name(request)
        body = parse(InferenceRequest, await request.read(), self.state.context())
        texts = body.inputs[0].data
        output = self.outputs()[0]
        if isinstance(self.engine, GenerationEngine):
            if len(texts) != 1:
                raise BadInput("inputs[0].data: send one prompt per request", "inputs")
            options = (body.parameters or V2Parameters()).options(DEFAULT_MAX_TOKENS)
            generation = await self.engine.prepare(texts[0], stream=False, **options)
            done = await self.engine.generate(generation)
            data, out_shape = [done.text], [1]
        else:
            if isinstance(self.engine, EmbeddingEngine):
                rows, _ = await self.engine.embed(texts)
            elif isinstance(self.engine, ClassificationEngine):
                results, _ = await self.engine.classify(texts)
                rows = [r["probs"] for r in results]
            data = [x for row in rows for x in row]
            out_shape = [len(rows), len(rows[0])]
        return web.json_response({"model_name": self.engine.name, "model_version": self.engine.version,
                                  "id": body.id, "outputs": [{**output, "shape": out_shape, "data": data}]})
