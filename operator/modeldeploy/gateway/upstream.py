"""The gateway's side towards the model servers: HTTP/1.1 POSTs over kept-alive connections, one request at a time
on each, answers parsed by llhttp (httptools, uvicorn's parser). aiohttp's client took about two thirds of the
gateway's time per request (its request and response objects, timers, payload registry); with this the gateway's
CPU per request halved, and the less it costs the less a batch's answers queue in it (bench/gateway_bench.py).

The servers are the gateway's own (modeldeploy serve, llama.cpp, ...), found through their Endpoints; still, an
answer that does not parse, or a connection that ends early, fails that request only and closes its connection."""

from __future__ import annotations

import asyncio
import collections
import time

import httptools

# A kept-alive connection unused this long is closed: before the servers close theirs (llama.cpp and uvicorn after
# 5 s, aiohttp 75 s), so that a request is never written into a connection the server is closing. A request whose
# connection fails is not sent again: the server may have taken it.
IDLE_SECONDS = 4.0
HIGH_WATER = 2**20          # a streamed answer's bytes buffered for a slow client before the server is paused
MAX_HEADER_BYTES = 64 * 2**10


class Unconnected(Exception):
    """No connection to the server could be made (refused, unreachable, too slow): it never saw the request, so
    another replica may take it."""


class UpstreamError(Exception):
    """The server's answer failed: the connection ended or broke, or the answer did not parse."""


class Answer:
    """One server's answer: status and headers first, then its body whole (`read`) or as it comes (`chunks`)."""

    def __init__(self, connection: Connection):
        self.connection = connection
        self.status = 0
        self.headers: dict[str, str] = {}       # names lower-case; a repeated header keeps its last value
        self.complete = False
        self.whole = False          # read whole (the gateway holds it all anyway), never paused
        self.failed: Exception | None = None
        self.buffered = collections.deque()
        self.size = 0
        self.arrived = asyncio.get_running_loop().create_future()    # set on the headers, then again on each chunk

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").partition(";")[0].strip().lower()

    def wake(self) -> None:
        if not self.arrived.done():
            self.arrived.set_result(None)

    async def wait(self) -> None:
        await self.arrived
        self.arrived = asyncio.get_running_loop().create_future()

    async def read(self) -> bytes:
        self.whole = True
        self.connection.resume(self)
        while not self.complete:
            if self.failed:
                raise self.failed
            await self.wait()
        body = b"".join(self.buffered)
        self.buffered.clear()
        return body

    async def chunks(self):
        while True:
            while self.buffered:
                chunk = self.buffered.popleft()
                self.size -= len(chunk)
                self.connection.resume(self)
                yield chunk
            if self.complete:
                return
            if self.failed:
                raise self.failed
            await self.wait()


class Connection(asyncio.Protocol):
    def __init__(self, pool: Upstreams, address: str):
        self.pool, self.address = pool, address
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.answer: Answer | None = None
        self.header_bytes = 0
        self.idle_since = 0.0
        self.paused = False

    # -- asyncio -------------------------------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.answer is None:     # nothing asked: a server that talks out of turn is not trusted with the next
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            ours = error.__context__        # one of ours, raised in a callback, says more than httptools' wrapper
            self.fail(ours if isinstance(ours, UpstreamError) else UpstreamError(f"the answer did not parse: {error}"))

    def connection_lost(self, exc) -> None:
        self.pool.forget(self)
        answer = self.answer
        if (answer is not None and exc is None and answer.status
                and not {"content-length", "transfer-encoding"} & answer.headers.keys()):
            self.answer, answer.complete = None, True   # an answer framed by the connection's end (HTTP/1.0's way)
            answer.wake()
        elif answer is not None:
            self.fail(UpstreamError("the connection closed before the answer's end"))
        self.transport = None

    # -- httptools callbacks ---------------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.answer is None:     # a second answer to one request: the rest of the bytes are not trusted either
            raise UpstreamError("an answer nobody asked for")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > MAX_HEADER_BYTES:
            raise UpstreamError(f"the answer's headers passed {MAX_HEADER_BYTES} bytes")
        self.answer.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 100:
            raise UpstreamError(f"the answer's status {status} is no HTTP status")
        if status < 200:            # an interim answer (102, 103): the real one follows on the same connection
            self.answer.headers.clear()
            return
        self.answer.status = status
        self.answer.wake()

    def on_body(self, body: bytes) -> None:
        answer = self.answer
        answer.buffered.append(body)
        answer.size += len(body)
        if answer.size > HIGH_WATER and not (self.paused or answer.whole):
            self.paused = True
            self.transport.pause_reading()
        answer.wake()

    def on_message_complete(self) -> None:
        if not self.answer.status:      # the end of an interim answer
            return
        answer, self.answer = self.answer, None
        answer.complete = True
        answer.wake()
        if self.parser.should_keep_alive():
            self.pool.give_back(self)
        else:
            self.close()

    # -- the pool's side -------------------------------------------------------------------------------------------
    def send(self, request: bytes) -> Answer:
        self.answer, self.header_bytes = Answer(self), 0
        self.transport.write(request)
        return self.answer

    def resume(self, answer: Answer) -> None:
        if self.paused and self.answer is answer and (answer.whole or answer.size <= HIGH_WATER // 2):
            self.paused = False
            self.transport.resume_reading()

    def fail(self, error: Exception) -> None:
        answer, self.answer = self.answer, None
        if answer is not None:
            answer.failed = error
            answer.wake()
        self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()


class Upstreams:
    """Kept-alive connections per server address, each carrying one request at a time."""

    def __init__(self, connect_timeout: float = 5.0):
        self.connect_timeout = connect_timeout
        self.idle: dict[str, list[Connection]] = collections.defaultdict(list)
        self.sweeper: asyncio.TimerHandle | None = None

    async def post(self, address: str, path: str, body: bytes) -> Answer:
        """Sends `body` to `address` (host:port, an IPv6 host bare or in brackets) and returns once the answer's
        headers are in. Unconnected when no connection could be made; UpstreamError when the answer failed."""
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        authority = f"[{host}]:{port}" if ":" in host else address
        head = (f"POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
        connection = self.take(address) or await self.connect(address, host, int(port))
        answer = connection.send(head + body)
        try:
            while not answer.status:
                if answer.failed:
                    raise answer.failed
                await answer.wait()
        except BaseException:
            self.abandon(answer)        # cancelled, or failed: the connection is mid-answer either way
            raise
        return answer

    def abandon(self, answer: Answer) -> None:
        """The gateway stopped reading an answer before its end (the client went away, a timeout): its connection
        cannot carry another request."""
        if answer.connection.answer is answer:
            answer.connection.fail(UpstreamError("the answer was abandoned"))

    async def connect(self, address: str, host: str, port: int) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(lambda: Connection(self, address), host, port)
        except TimeoutError:
            raise Unconnected(f"connecting to {address} took longer than {self.connect_timeout:g} s") from None
        except OSError as error:
            raise Unconnected(f"connecting to {address}: {error.strerror or error}") from None
        return connection

    def take(self, address: str) -> Connection | None:
        idle = self.idle.get(address)
        oldest = time.monotonic() - IDLE_SECONDS
        while idle:
            connection = idle.pop()
            if connection.usable and connection.idle_since >= oldest:
                return connection
            connection.close()
        return None

    def give_back(self, connection: Connection) -> None:
        if connection.paused:
            connection.paused = False
            connection.transport.resume_reading()
        connection.idle_since = time.monotonic()
        self.idle[connection.address].append(connection)
        if self.sweeper is None:
            self.sweeper = asyncio.get_running_loop().call_later(IDLE_SECONDS, self.sweep)

    def forget(self, connection: Connection) -> None:
        idle = self.idle.get(connection.address)
        if idle and connection in idle:
            idle.remove(connection)

    def sweep(self) -> None:
        self.sweeper = None
        oldest = time.monotonic() - IDLE_SECONDS
        for address, idle in list(self.idle.items()):
            for connection in [c for c in idle if c.idle_since < oldest]:
                idle.remove(connection)
                connection.close()
            if not idle:
                del self.idle[address]
        if self.idle:
            self.sweeper = asyncio.get_running_loop().call_later(IDLE_SECONDS, self.sweep)

    def drop(self, addresses) -> None:
        """Closes the idle connections to these addresses (their pods went away); busy ones go idle, then the
        sweep closes them."""
        for address in addresses:
            for connection in self.idle.pop(address, ()):
                connection.close()

    def close(self) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
        self.drop(list(self.idle))
