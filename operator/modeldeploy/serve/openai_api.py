"""OpenAI-compatible endpoints: /v1/models, /v1/embeddings, /v1/completions, /v1/chat/completions (with SSE
streaming), and /v1/classify (the shape vLLM uses for classifiers)."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid

from aiohttp import web

from modeldeploy.serve.engine import BadInput, ClassificationEngine, EmbeddingEngine, Engine, GenerationEngine

DEFAULT_CHAT_MAX_TOKENS = 256


class ModelNotFound(Exception):
    pass


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

    # -- request parsing ------------------------------------------------------------------------------------------
    async def body(self, request: web.Request, engine_type: type) -> dict:
        try:
            body = await request.json()
        except ValueError as error:
            raise BadInput(f"the request body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise BadInput("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.engine.name:
            raise ModelNotFound(f"the model {model!r} does not exist; this server serves {self.engine.name!r}")
        if not isinstance(self.engine, engine_type):
            raise BadInput(f"{request.path} is not available: {self.engine.name} serves {self.engine.loaded.task}")
        return body

    @staticmethod
    def texts(body: dict, key: str = "input") -> list[str]:
        value = body.get(key)
        if value is None:
            raise BadInput(f"'{key}' is required", key)
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise BadInput(f"'{key}' must be a string or a list of strings", key)

    @staticmethod
    def number(body: dict, key: str, default, low, high, kind=float):
        value = body.get(key, default)
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise BadInput(f"'{key}' must be a {'whole ' if kind is int else ''}number", key)
        if not low <= value <= high:
            raise BadInput(f"'{key}' must be between {low} and {high}", key)
        return kind(value)

    def sampling(self, body: dict, default_max_tokens: int) -> dict:
        if body.get("n", 1) != 1:
            raise BadInput("only n=1 is supported", "n")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
            raise BadInput("'stop' must be a string or a list of up to 4 strings", "stop")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        return {"max_new_tokens": self.number({"max_tokens": max_tokens}, "max_tokens", default_max_tokens, 1,
                                              1_000_000, int),
                "temperature": self.number(body, "temperature", 1.0, 0.0, 2.0),
                "top_p": self.number(body, "top_p", 1.0, 0.0, 1.0) or 1.0,
                "stop": stop}

    # -- endpoints ------------------------------------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.engine.name, "object": "model", "created": self.created, "owned_by": "modeldeploy"}]})

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await self.body(request, EmbeddingEngine)
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise BadInput("'encoding_format' must be float or base64", "encoding_format")
        vectors, tokens = await self.engine.embed(self.texts(body))
        dimensions = body.get("dimensions")
        if dimensions is not None:
            dimensions = self.number(body, "dimensions", None, 1, len(vectors[0]), int)
            vectors = [v[:dimensions] for v in vectors]
        data = [{"object": "embedding", "index": i,
                 "embedding": v if encoding == "float" else
                 base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()} for i, v in enumerate(vectors)]
        return web.json_response({"object": "list", "data": data, "model": self.engine.name,
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def classify(self, request: web.Request) -> web.Response:
        body = await self.body(request, ClassificationEngine)
        results, tokens = await self.engine.classify(self.texts(body))
        data = [{"index": i, "label": r["label"], "probs": r["probs"], "num_classes": len(r["probs"])}
                for i, r in enumerate(results)]
        return web.json_response({"id": f"classify-{uuid.uuid4().hex}", "object": "list",
                                  "created": int(time.time()), "model": self.engine.name, "data": data,
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self.body(request, GenerationEngine)
        prompts = self.texts(body, "prompt")
        if len(prompts) != 1:
            raise BadInput("send one prompt per request", "prompt")
        return await self._generate(request, body, prompts[0], chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self.body(request, GenerationEngine)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadInput("'messages' must be a non-empty list", "messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer", "tool"):
                raise BadInput(f"messages[{i}] needs a role of system, user, assistant or tool", "messages")
            if isinstance(m.get("content"), list):   # content parts: text only
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in m["content"]):
                    raise BadInput(f"messages[{i}]: only text content parts are supported", "messages")
                m["content"] = "".join(p.get("text", "") for p in m["content"])
            if not isinstance(m.get("content"), str):
                raise BadInput(f"messages[{i}].content must be a string", "messages")
        tokenizer = self.engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise BadInput(f"{self.engine.name} has no chat template; use /v1/completions")
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return await self._generate(request, body, prompt, chat=True)

    async def _generate(self, request: web.Request, body: dict, prompt: str, chat: bool) -> web.StreamResponse:
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadInput("'stream' must be true or false", "stream")
        options = self.sampling(body, DEFAULT_CHAT_MAX_TOKENS if chat else 16)
        generation = self.engine.prepare(prompt, stream=stream, **options)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def choice(text: str, finish: str | None, delta: bool) -> dict:
            if chat:
                key = "delta" if delta else "message"
                return {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

        if not stream:
            done = await self.engine.generate(generation)
            return web.json_response({
                "id": ident, "object": kind, "created": created, "model": self.engine.name,
                "choices": [choice(done.text, done.finish_reason, delta=False)],
                "usage": {"prompt_tokens": len(done.input_ids), "completion_tokens": done.tokens,
                          "total_tokens": len(done.input_ids) + done.tokens}})

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        task = asyncio.get_running_loop().create_task(self.engine.generate(generation))
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        async def send(payload: dict) -> None:
            await response.write(f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode())

        while (delta := await generation.stream.get()) is not None:
            await send({"id": ident, "object": chunk_kind, "created": created, "model": self.engine.name,
                        "choices": [choice(delta, None, delta=True)]})
        done = await task
        await send({"id": ident, "object": chunk_kind, "created": created, "model": self.engine.name,
                    "choices": [choice("", done.finish_reason, delta=True)]})
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

