"""The shared core under every protocol: one loaded model, its batcher, and the task's computation. Protocol
modules (openai_api, kserve_api) turn validated requests (requests.py) into calls on an engine and never touch
torch or the tokenizer.

Three threads share the work: the event loop (HTTP, validation), one tokenizer thread (tokenization and chat
templates: fast tokenizers release the GIL, so a big request does not stall liveness or metrics) and the model
thread (forward passes). Tokenization does not run on the model thread, where it would wait behind forward passes
and the next batch would wait for it."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Coroutine

from modeldeploy.serve.batching import BatchStats, DynamicBatcher
from modeldeploy.serve.errors import BadInput
from modeldeploy.serve.loading import LoadedModel
from modeldeploy.serve.metrics import RuntimeMetrics

log = logging.getLogger(__name__)


# The fixed cost of one forward pass, in padded-token equivalents (measured for all-MiniLM-L6-v2 on CPU: about
# 3 ms per pass against 0.2 ms per token).
PASS_COST_TOKENS = 16


@dataclasses.dataclass
class BatchingOptions:
    max_batch_size: int = 32
    max_delay_ms: float = 5.0
    max_queue: int = 1024


class Engine:
    gather_factor = 1   # encoder engines regroup a wider gather by length (forward_groups)

    def __init__(self, loaded: LoadedModel, name: str, batching: BatchingOptions, metrics: RuntimeMetrics,
                 model_thread: ThreadPoolExecutor | None = None):
        self.loaded = loaded
        self.name = name
        self.metrics = metrics
        self.batcher = DynamicBatcher(self.run_batch, batching.max_batch_size, batching.max_delay_ms / 1000,
                                      batching.max_queue, on_batch=self._observe_batch,
                                      gather_factor=self.gather_factor, model_thread=model_thread)
        self.tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def task(self) -> str:
        return self.loaded.task

    @property
    def version(self) -> str:
        return self.loaded.commit

    async def stop(self) -> None:
        await self.batcher.stop()
        self.tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    def _observe_batch(self, stats: BatchStats) -> None:
        self.metrics.batch_size.labels(self.name).observe(stats.batch_items)
        for seconds in stats.queue_seconds:
            self.metrics.queue_time.labels(self.name).observe(seconds)
        self.metrics.queue_size.labels(self.name).set(self.batcher.queued_items)

    async def tokenize(self, texts: list[str], limit: int | None = None) -> list[list[int]]:
        """Token ids of validated texts, each checked against the model's length, on the tokenizer thread."""
        ids = await asyncio.get_running_loop().run_in_executor(self.tokenizer_thread, self._tokenize, texts)
        limit = limit or self.loaded.max_length
        for i, row in enumerate(ids):
            if len(row) > limit:
                raise BadInput(f"input[{i}] has {len(row)} tokens; this model takes at most {limit}", "input")
        self.metrics.prompt_tokens.labels(self.name).inc(sum(len(r) for r in ids))
        return ids

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]

    async def submit(self, items: list[Any], group=None) -> list[Any]:
        return await self.enqueue(items, group)

    def enqueue(self, items: list[Any], group=None) -> Coroutine[Any, Any, list[Any]]:
        """Queues `items` at once (or raises TooLarge, QueueFull at once); the coroutine waits for the results."""
        self.metrics.queue_size.labels(self.name).set(self.batcher.queued_items + len(items))
        return self._results(self.batcher.enqueue(items, group), items)

    async def _results(self, queued, items: list[Any]) -> list[Any]:
        try:
            return await self.batcher.wait(queued)
        except asyncio.CancelledError:
            self.cancel(items)
            self.metrics.cancelled.labels(self.name).inc()
            log.info("%s: a request of %d items was cancelled (client gone or past --request-timeout)",
                     self.name, len(items))
            raise

    def cancel(self, items: list[Any]) -> None:
        """Items whose request was given up (an encoder pass, once started, is short enough to finish)."""

    def run_batch(self, items: list[Any]) -> list[Any]:
        raise NotImplementedError

    def warm_up(self) -> None:
        raise NotImplementedError

    # -- helpers for encoder tasks ------------------------------------------------------------------------------
    def forward_groups(self, items: list[list[int]], forward) -> list[Any]:
        """Padding-aware: sorts by length, then cuts the sorted run into passes (each at most the batch size) so
        that padded tokens plus a fixed cost per pass are fewest - a small dynamic programme over the cut points.
        Each pass is padded only to its own longest row. Results come back in input order."""
        order = sorted(range(len(items)), key=lambda i: len(items[i]))
        lengths = [len(items[i]) for i in order]
        n, limit = len(order), self.batcher.max_batch_size
        best = [0.0] + [float("inf")] * n          # best[j]: cheapest cover of the j shortest rows
        cut = [0] * (n + 1)
        for j in range(1, n + 1):
            for i in range(max(0, j - limit), j):    # a pass of rows i..j-1, padded to lengths[j-1]
                cost = best[i] + (j - i) * lengths[j - 1] + PASS_COST_TOKENS
                if cost < best[j]:
                    best[j], cut[j] = cost, i
        passes, j = [], n
        while j > 0:
            passes.append(order[cut[j]:j])
            j = cut[j]
        results: list[Any] = [None] * n
        for group in reversed(passes):
            for position, value in zip(group, forward([items[i] for i in group])):
                results[position] = value
        return results

    def pad(self, rows: list[list[int]]):
        return self.tokenizer.pad({"input_ids": rows}, return_tensors="pt").to(self.loaded.device)


class EmbeddingEngine(Engine):
    """Sentence embeddings with the model's own pooling and normalisation (as sentence-transformers computes them)."""

    gather_factor = 4
    dimensions: int | None = None     # known after the warm-up pass

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        ids = await self.tokenize(texts)
        vectors = await self.submit(ids)
        return vectors, sum(len(r) for r in ids)

    def run_batch(self, items: list[list[int]]) -> list[list[float]]:
        return self.forward_groups(items, self._forward)

    def _forward(self, rows: list[list[int]]) -> list[list[float]]:
        import torch

        batch = self.pad(rows)
        with torch.inference_mode():
            hidden = self.loaded.model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooling = self.loaded.pooling
            if pooling == "cls":
                pooled = hidden[:, 0]
            elif pooling == "max":
                pooled = hidden.masked_fill(mask == 0, -1e9).max(dim=1).values
            elif pooling == "lasttoken":
                last = batch["attention_mask"].sum(dim=1) - 1
                pooled = hidden[torch.arange(hidden.shape[0]), last]
            else:
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            if self.loaded.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.cpu().tolist()

    def warm_up(self) -> None:
        self.dimensions = len(self.run_batch(self.tokenizer(["warm up"] * 2)["input_ids"])[0])


class ClassificationEngine(Engine):
    gather_factor = 4

    async def classify(self, texts: list[str]) -> tuple[list[dict], int]:
        ids = await self.tokenize(texts)
        probabilities = await self.submit(ids)
        labels = self.loaded.labels
        results = [{"label": labels[max(range(len(p)), key=p.__getitem__)], "probs": p,
                    "scores": dict(zip(labels, p))} for p in probabilities]
        return results, sum(len(r) for r in ids)

    def run_batch(self, items: list[list[int]]) -> list[list[float]]:
        return self.forward_groups(items, self._forward)

    def _forward(self, rows: list[list[int]]) -> list[list[float]]:
        import torch

        with torch.inference_mode():
            logits = self.loaded.model(**self.pad(rows)).logits.float()
        return torch.softmax(logits, dim=-1).cpu().tolist()

    def warm_up(self) -> None:
        self.run_batch(self.tokenizer(["warm up"])["input_ids"])


@dataclasses.dataclass
class Generation:
    """One generation request; `stream` receives text deltas (then None) when the client streams."""
    input_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    stream: asyncio.Queue | None = None
    loop: asyncio.AbstractEventLoop | None = None
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    cancelled: bool = False     # set by the event loop when the caller is gone; the row stops at its next token

    @property
    def sampling(self) -> tuple:
        return (self.temperature > 0, round(self.temperature, 4), round(self.top_p, 4))

    def push(self, delta: str | None) -> None:
        if self.stream is not None and (delta or delta is None):
            self.loop.call_soon_threadsafe(self.stream.put_nowait, delta)


class GenerationEngine(Engine):
    """Batched generation: concurrent requests with the same sampling settings share one `generate` call; each row
    stops on its own (its max_new_tokens, a stop string or EOS) while the others go on."""

    async def prepare(self, prompt: str | list[dict], max_new_tokens: int, temperature: float, top_p: float,
                      stop: list[str], stream: bool) -> Generation:
        """`prompt`: a text, or chat messages (role, content) for the model's chat template."""
        if not isinstance(prompt, str):
            prompt = await asyncio.get_running_loop().run_in_executor(self.tokenizer_thread, self._chat, prompt)
        limit = getattr(self.loaded.model.config, "max_position_embeddings", None) or self.loaded.max_length
        ids = (await self.tokenize([prompt], limit=limit))[0]
        if len(ids) + max_new_tokens > limit:
            raise BadInput(f"the prompt has {len(ids)} tokens and max_tokens is {max_new_tokens}: more than the "
                           f"model's {limit}-token context", "max_tokens")
        loop = asyncio.get_running_loop()
        return Generation(ids, max_new_tokens, temperature, top_p, stop, asyncio.Queue() if stream else None, loop)

    def _chat(self, messages: list[dict]) -> str:
        from jinja2 import TemplateError

        if not getattr(self.tokenizer, "chat_template", None):
            raise BadInput(f"{self.name} has no chat template; use /v1/completions", "messages")
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateError as error:     # templates refuse what they cannot render (say, roles out of turn)
            raise BadInput(f"messages: the model's chat template refused them: {error}", "messages") from None

    def start(self, request: Generation) -> Coroutine[Any, Any, list[Generation]]:
        """Queues the generation now (or refuses it now); the coroutine waits for it, `[request]` when done."""
        return self.enqueue([request], group=request.sampling)

    async def generate(self, request: Generation) -> Generation:
        (done,) = await self.start(request)
        return done

    def cancel(self, items: list[Generation]) -> None:
        for g in items:
            g.cancelled = True

    def run_batch(self, items: list[Generation]) -> list[Generation]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        tokenizer = self.tokenizer
        batch = self.pad([g.input_ids for g in items])
        prompt_length = batch["input_ids"].shape[1]
        eos = tokenizer.eos_token_id

        class PerRow(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                finished = []
                for row, g in enumerate(items):
                    if g.cancelled and g.finish_reason is None:
                        g.finish_reason = "cancelled"
                    if g.finish_reason is None:
                        new = input_ids[row, prompt_length:].tolist()
                        if eos is not None and new and new[-1] == eos:
                            new, g.finish_reason = new[:-1], "stop"
                        text = tokenizer.decode(new, skip_special_tokens=True)
                        for s in g.stop:
                            if s and s in text:
                                text, g.finish_reason = text[:text.index(s)], "stop"
                        if g.finish_reason is None and len(new) >= g.max_new_tokens:
                            g.finish_reason = "length"
                        g.push(text[len(g.text):] if text.startswith(g.text) else "")
                        g.text, g.tokens = text, len(new)
                    finished.append(g.finish_reason is not None)
                return torch.tensor(finished, device=input_ids.device)

        first = items[0]
        sampling = {"do_sample": True, "temperature": first.temperature, "top_p": first.top_p} \
            if first.temperature > 0 else {"do_sample": False}
        try:
            with torch.inference_mode():
                self.loaded.model.generate(**batch, max_new_tokens=max(g.max_new_tokens for g in items),
                                           stopping_criteria=StoppingCriteriaList([PerRow()]),
                                           pad_token_id=tokenizer.pad_token_id, **sampling)
        finally:
            for g in items:
                g.finish_reason = g.finish_reason or "length"
                g.push(None)
                self.metrics.generated_tokens.labels(self.name).inc(g.tokens)
                if g.cancelled:
                    log.info("%s: generation stopped after %d of %d tokens: its request was cancelled", self.name,
                             g.tokens, g.max_new_tokens)
        return items

    def warm_up(self) -> None:
        import torch

        batch = self.pad([self.tokenizer("warm up")["input_ids"]])
        with torch.inference_mode():
            self.loaded.model.generate(**batch, max_new_tokens=2, do_sample=False,
                                       pad_token_id=self.tokenizer.pad_token_id)


ENGINES = {"feature-extraction": EmbeddingEngine, "sentence-similarity": EmbeddingEngine,
           "text-classification": ClassificationEngine, "text-generation": GenerationEngine}
