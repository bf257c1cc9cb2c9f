"""Dynamic batching: requests that arrive together share one forward pass.

A request carries one or more items (texts). The collector takes queued requests, oldest first, until the batch
holds `max_batch_size` items; when the model is idle it waits at most `max_delay` for company, and while a forward
pass runs, new requests simply queue up for the next one. Forward passes run one at a time on a dedicated thread
(torch already uses every core it is given), so the event loop keeps answering. The queue is bounded: a request
that does not fit the free room now is refused at once (503 with Retry-After) instead of growing latency without
limit, and one bigger than the whole queue always (413), however busy the server is. A request whose caller goes
away while it waits leaves the queue."""

from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

from modeldeploy.serve.errors import QueueFull, TooLarge


def new_model_thread() -> ThreadPoolExecutor:
    """The one thread that makes every torch call of a server: loading, calibration, warm-up and passes. OpenMP keeps
    a team of worker threads per calling thread, so torch calls from a second thread (say, loading in the default
    executor) would leave two teams competing for the same cores."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")


@dataclass(eq=False)
class _Request:
    items: list[Any]
    group: Hashable
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class BatchStats:
    """What the batcher reports to metrics after each pass."""
    batch_items: int
    queue_seconds: list[float]


class DynamicBatcher:
    def __init__(self, run_batch: Callable[[list[Any]], list[Any]], max_batch_size: int, max_delay: float,
                 max_queue: int, on_batch: Callable[[BatchStats], None] | None = None, gather_factor: int = 1,
                 model_thread: ThreadPoolExecutor | None = None):
        """`run_batch(items) -> results` runs on the model thread, one result per item, in order. With a
        `gather_factor` above 1, up to that many batches' worth of queued items are handed over at once, for an
        engine that regroups them (by length) into passes of at most `max_batch_size`. `model_thread`: the
        single-thread executor that already holds the model (see `new_model_thread()`), else a new one."""
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.gather_limit = max_batch_size * gather_factor
        self.max_delay = max_delay
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.pending: collections.deque[_Request] = collections.deque()
        self.queued_items = 0
        self.executor = model_thread or new_model_thread()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._arrived = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._collect(), name="batcher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, items: list[Any], group: Hashable = None) -> list[Any]:
        """Results for `items`, computed in batches with other requests of the same `group`."""
        return await self.wait(self.enqueue(items, group))

    def enqueue(self, items: list[Any], group: Hashable = None) -> _Request:
        """Queues `items` now, or refuses them now (TooLarge, QueueFull): `submit` in two steps, for a caller that
        must know before it answers (a stream, whose status goes out with its first byte)."""
        if len(items) > self.max_queue:
            raise TooLarge(f"{len(items)} items are more than the queue holds ({self.max_queue}, --max-queue)")
        if self.queued_items + len(items) > self.max_queue:
            raise QueueFull(f"{self.queued_items} items are queued (limit {self.max_queue})")
        request = _Request(items, group, asyncio.get_running_loop().create_future())
        self.pending.append(request)
        self.queued_items += len(items)
        self._arrived.set()
        return request

    async def wait(self, request: _Request) -> list[Any]:
        try:
            return await request.future
        except asyncio.CancelledError:
            if request in self.pending:     # not taken yet: its room goes back to the queue
                self.pending.remove(request)
                self.queued_items -= len(request.items)
            raise

    async def run_alone(self, function: Callable[[], Any]) -> Any:
        """Runs something on the model thread between batches (e.g. a warm-up pass)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, function)

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.pending:
                self._arrived.clear()
                await self._arrived.wait()
            # Idle model: give concurrent requests up to max_delay to join, unless the batch is already full.
            deadline = self.pending[0].enqueued + self.max_delay
            while self.queued_items < self.max_batch_size and (wait := deadline - time.monotonic()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), wait)
                except asyncio.TimeoutError:
                    break
            if not self.pending:    # its callers went away while it waited for company
                continue
            batch = self._take()
            items = [item for request in batch for item in request.items]
            now = time.monotonic()
            try:
                results = await loop.run_in_executor(self.executor, self.run_batch, items)
            except Exception as error:   # a failed pass fails its requests, not the server
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(error)
                continue
            if self.on_batch:
                self.on_batch(BatchStats(len(items), [now - r.enqueued for r in batch]))
            offset = 0
            for request in batch:
                count = len(request.items)
                if not request.future.done():   # the client may have gone away
                    request.future.set_result(results[offset:offset + count])
                offset += count

    def _take(self) -> list[_Request]:
        """Oldest request first, then others of its group while they fit (a request bigger than the batch size
        runs alone: the engine splits it)."""
        first = self.pending.popleft()
        batch, size = [first], len(first.items)
        kept = collections.deque()
        while self.pending:
            request = self.pending.popleft()
            if request.group == first.group and size + len(request.items) <= self.gather_limit:
                batch.append(request)
                size += len(request.items)
            else:
                kept.append(request)
        self.pending = kept
        self.queued_items -= size
        return batch
