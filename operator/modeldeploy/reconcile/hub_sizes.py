"""The sizes a hub lists for a model's selected files, for sizing a new cache PVC and the courtesy space check before
a pull. Sizing is a courtesy: the pull pod checks free space itself, with the token. So the operator asks without a
token, only endpoints the admin allows (the spec was checked before), and never waits for an answer: a lookup runs
on a loop of its own, bounded in time, bytes and pages, and until it ends the caller hears `PENDING`. A hub that
accepts connections and never answers costs a pending coroutine, not a reconcile worker."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Awaitable, Callable
from urllib.parse import quote, urljoin, urlsplit

import aiohttp

from modeldeploy.pull.selection import select

log = logging.getLogger("modeldeploy.operator")

LISTING_SECONDS = 600        # how long an answer (sizes, or "the hub does not tell") is trusted: a branch can move
UNREACHABLE_SECONDS = 300    # how long an endpoint that did not answer is not asked again
TIMEOUT_SECONDS = 10.0       # a whole lookup, every page
MAX_BYTES = 8 * 2**20        # of listing JSON, every page
MAX_PAGES = 20
MAX_CONCURRENT = 16          # lookups in flight, all endpoints
BODY_SECONDS = 8.0           # one page's body, once the hub has answered
MAX_ANSWERS = 10_000         # remembered answers before the stale ones are dropped


class Pending:
    def __repr__(self) -> str:
        return "PENDING"


PENDING = Pending()          # a lookup is under way: ask again in a moment


@dataclass(frozen=True)
class Query:
    endpoint: str
    repo_id: str
    revision: str
    files: tuple[str, ...] | None
    allow_pickle: bool
    gguf: bool = False          # llama.cpp's selection: one quantisation of the .gguf files


Lister = Callable[[aiohttp.ClientSession, Query], Awaitable[int | None]]


async def list_selected_bytes(session: aiohttp.ClientSession, query: Query) -> int | None:
    """Bytes of the selected files; None when the hub answers but does not tell: an unknown model or revision, a
    gated repository (no token is sent), a listing too large or not a hub's. Raises only when the endpoint itself
    does not answer (connection refused, timeout)."""
    url = (f"{query.endpoint}/api/models/{quote(query.repo_id, safe='/')}/tree/{quote(query.revision, safe='')}"
           "?recursive=true")
    origin = urlsplit(query.endpoint)[:2]
    sizes: dict[str, int] = {}
    budget = MAX_BYTES
    for _ in range(MAX_PAGES):
        # No redirects: an allowed endpoint must not send the operator on to an address nobody allowed.
        async with session.get(url, allow_redirects=False) as response:
            if response.status != 200:
                return refused(query, f"HTTP {response.status}")
            body = b""
            try:
                async with asyncio.timeout(BODY_SECONDS):
                    async for chunk in response.content.iter_chunked(65536):
                        body += chunk
                        if len(body) > budget:
                            return refused(query, f"a listing larger than {MAX_BYTES} bytes")
            except TimeoutError:      # it answered, slowly: this listing is refused, the endpoint is not
                return refused(query, f"a listing page slower than {BODY_SECONDS:.0f} s")
            budget -= len(body)
            link = response.links.get("next")
        try:
            entries = json.loads(body)
            sizes.update({e["path"]: int(e["size"]) for e in entries if e.get("type") == "file"})
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            return refused(query, f"not a hub's listing ({error})")
        if not link:
            try:
                return sum(sizes[p] for p in select(sorted(sizes), list(query.files) if query.files else None,
                                                    [], query.allow_pickle, query.gguf))
            except Exception as error:      # nothing selected, an unsafe name: the pull says what is wrong
                return refused(query, str(error))
        url = urljoin(url, str(link["url"]))
        if urlsplit(url)[:2] != origin:
            return refused(query, "a next page on another host")
    return refused(query, f"more than {MAX_PAGES} pages")


def refused(query: Query, why: str) -> None:
    log.info("hub %s lists no sizes for %s@%s: %s", query.endpoint, query.repo_id, query.revision, why[:200])
    return None


class HubSizes:
    def __init__(self, clock: Callable[[], float] = time.monotonic, lister: Lister = list_selected_bytes,
                 timeout: float = TIMEOUT_SECONDS):
        self.clock = clock
        self.lister = lister
        self.timeout = timeout
        self.answers: dict[Query, tuple[float, int | None]] = {}     # query -> (when, bytes or None)
        self.running: dict[Query, concurrent.futures.Future] = {}
        self.unreachable: dict[str, float] = {}                      # endpoint -> since when
        self.lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.session: aiohttp.ClientSession | None = None
        self.slots: asyncio.Semaphore | None = None

    def ask(self, query: Query, wait: float = 0) -> int | None | Pending:
        """Bytes of the selected files if known; None if the hub will not tell (or cannot be reached); PENDING
        while a first lookup runs (it ends within the timeout). An answer past its time is still given while it is
        asked again, so a resource that was sized stays sized (no flapping). `wait`: seconds a first lookup may
        take before the caller hears PENDING (a hub that answers at once costs no retry)."""
        now = self.clock()
        with self.lock:
            unreachable = now - self.unreachable.get(query.endpoint, -UNREACHABLE_SECONDS) < UNREACHABLE_SECONDS
            known = self.answers.get(query)
            if known is not None and now - known[0] < LISTING_SECONDS:
                return known[1]
            if unreachable:
                return known[1] if known else None
            if query not in self.running:
                self.running[query] = asyncio.run_coroutine_threadsafe(self._look_up(query), self._loop())
            lookup = self.running.get(query)
            if len(self.answers) > MAX_ANSWERS:
                self.answers = {q: a for q, a in self.answers.items() if now - a[0] < 2 * LISTING_SECONDS}
        if known:
            return known[1]
        if wait > 0 and lookup is not None:
            with contextlib.suppress(concurrent.futures.TimeoutError):
                lookup.result(wait)
            with self.lock:
                if (answer := self.answers.get(query)) is not None:
                    return answer[1]
        return PENDING

    def _loop(self) -> asyncio.AbstractEventLoop:
        if self.loop is None:
            self.loop = asyncio.new_event_loop()
            threading.Thread(target=self.loop.run_forever, name="hub-sizes", daemon=True).start()
        return self.loop

    async def _look_up(self, query: Query) -> None:
        if self.session is None:
            # No proxy variables, no cookies, no credentials of any kind: the operator asks as nobody.
            # No answer to a connection or a request within the timeout: the endpoint does not answer.
            self.session = aiohttp.ClientSession(
                trust_env=False, cookie_jar=aiohttp.DummyCookieJar(),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=self.timeout))
            self.slots = asyncio.Semaphore(MAX_CONCURRENT)
        answer: int | None = None
        try:
            async with self.slots:      # the time limit starts once a slot is free: others' lookups are not ours
                async with asyncio.timeout(2 * self.timeout):
                    answer = await self.lister(self.session, query)
        except (aiohttp.ClientConnectionError, aiohttp.ServerTimeoutError) as error:   # no answer at all
            log.info("hub %s did not answer a listing of %s (%s: %s); cache sizing skips it for %d s",
                     query.endpoint, query.repo_id, type(error).__name__, str(error)[:200], UNREACHABLE_SECONDS)
            with self.lock:
                self.unreachable[query.endpoint] = self.clock()
        except Exception as error:      # it answered, but too slowly or not like a hub: this listing only
            refused(query, f"{type(error).__name__}: {str(error)[:200]}")
        finally:
            with self.lock:
                self.answers[query] = (self.clock(), answer)
                self.running.pop(query, None)

    def wait(self, timeout: float) -> None:
        """Until no lookup runs (for tests and benchmarks that want the answer, not PENDING)."""
        deadline = time.monotonic() + timeout
        while self.running and time.monotonic() < deadline:
            time.sleep(0.02)
