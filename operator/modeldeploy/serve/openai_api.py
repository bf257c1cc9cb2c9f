"""OpenAI-compatible endpoints: /v1/models, /v1/embeddings, /v1/completions, /v1/chat/completions (with SSE
streaming), and /v1/classify (the shape vLLM uses for classifiers)."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid
from typing import TypeVar

from aiohttp import web

from modeldeploy.serve.engine import ClassificationEngine, EmbeddingEngine, Engine, GenerationEngine
from modeldeploy.serve.errors import BadInput, ModelNotFound
from modeldeploy.serve.requests import (ChatRequest, ClassifyRequest, CompletionRequest, EmbeddingsRequest,
                                        Generating, OpenAIRequest, parse)

M = TypeVar("M", bound=OpenAIRequest)

DEFAULT_CHAT_MAX_TOKENS = 256
DEFAULT_COMPLETION_MAX_TOKENS = 16
STREAM = "modeldeploy.stream"   # request key: a started SSE response, for errors that come after its headers


class OpenAIRoutes:
    def __init__(self, state):
        self.state = state

    @property
    def engine(self) -> Engine:
        return self.state.engine

    @property
    def created(self) -> int:
        return self.state.created

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/classify", self.classify)

    async def parse(self, request: web.Request, model: type[M], engine_type: type) -> M:
        if not isinstance(self.engine, engine_type):
            raise BadInput(f"{request.path} is not available: {self.engine.name} serves {self.engine.task}")
        body = parse(model, await request.read(), self.state.context())
        if body.model is not None and body.model != self.engine.name:
            raise ModelNotFound(f"the model {body.model!r} does not exist; this server serves {self.engine.name!r}",
                                "model")
        return body

    # -- endpoints ------------------------------------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.engine.name, "object": "model", "created": self.created, "owned_by": "modeldeploy"}]})

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await self.parse(request, EmbeddingsRequest, EmbeddingEngine)
        vectors, tokens = await self.engine.embed(body.input)
        if body.dimensions is not None:
            vectors = [v[:body.dimensions] for v in vectors]
        data = [{"object": "embedding", "index": i,
                 "embedding": v if body.encoding_format == "float" else
                 base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()} for i, v in enumerate(vectors)]
        return web.json_response({"object": "list", "data": data, "model": self.engine.name,
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def classify(self, request: web.Request) -> web.Response:
        body = await self.parse(request, ClassifyRequest, ClassificationEngine)
        results, tokens = await self.engine.classify(body.input)
        data = [{"index": i, "label": r["label"], "probs": r["probs"], "num_classes": len(r["probs"])}
                for i, r in enumerate(results)]
        return web.json_response({"id": f"classify-{uuid.uuid4().hex}", "object": "list",
                                  "created": int(time.time()), "model": self.engine.name, "data": data,
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self.parse(request, CompletionRequest, GenerationEngine)
        return await self._generate(request, body, body.prompt[0], chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self.parse(request, ChatRequest, GenerationEngine)
        return await self._generate(request, body, [m.text() for m in body.messages], chat=True)

    async def _generate(self, request: web.Request, body: Generating, prompt: str | list[dict],
                        chat: bool) -> web.StreamResponse:
        options = body.options(DEFAULT_CHAT_MAX_TOKENS if chat else DEFAULT_COMPLETION_MAX_TOKENS)
        generation = await self.engine.prepare(prompt, stream=body.stream, **options)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def choice(text: str, finish: str | None, delta: bool) -> dict:
            if chat:
                key = "delta" if delta else "message"
                return {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

        if not body.stream:
            done = await self.engine.generate(generation)
            return web.json_response({
                "id": ident, "object": kind, "created": created, "model": self.engine.name,
                "choices": [choice(done.text, done.finish_reason, delta=False)],
                "usage": {"prompt_tokens": len(done.input_ids), "completion_tokens": done.tokens,
                          "total_tokens": len(done.input_ids) + done.tokens}})

        # Queued now, or refused now (413, 503) while a status code can still be sent.
        task = asyncio.get_running_loop().create_task(self.engine.start(generation))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        async def send(payload: dict) -> None:
            await response.write(f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode())

        try:
            await response.prepare(request)
            request[STREAM] = response
            while (delta := await generation.stream.get()) is not None:
                await send({"id": ident, "object": chunk_kind, "created": created, "model": self.engine.name,
                            "choices": [choice(delta, None, delta=True)]})
            (done,) = await task
            await send({"id": ident, "object": chunk_kind, "created": created, "model": self.engine.name,
                        "choices": [choice("", done.finish_reason, delta=True)]})
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:    # the client went away mid-stream
            pass
        finally:
            task.cancel()               # stops the generation at its next token unless it is done
        return response


async def end_stream(response: web.StreamResponse, error: dict) -> None:
    """Ends a stream whose headers are out (no status code left to send) with the error as its last event."""
    try:
        await response.write(f"data: {json.dumps(error)}\n\n".encode())
        await response.write_eof()
    except ConnectionResetError:
        pass
