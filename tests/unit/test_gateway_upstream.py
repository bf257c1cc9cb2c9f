"""The gateway's connections to model servers (gateway/upstream.py), against raw servers on 127.0.0.1 that answer
byte for byte what a test wants: kept-alive reuse, a kept-alive connection the server closed, answers that end early
or do not parse, an answer framed by the connection's end, a slow reader (the server is paused, the buffer bounded),
and a request given up mid-answer (the server sees its connection close, which is what cancels a generation).

Bad answers tried: bytes that are no HTTP, a body shorter than its Content-Length, a connection closed after the
headers or reset mid-body, an extra answer, an interim 103 (skipped), status 000, headers past 64 KiB, a server
closing a connection it kept alive, and one that takes a request and closes (never sent twice)."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from modeldeploy.gateway import upstream
from modeldeploy.gateway.upstream import Unconnected, Upstreams, UpstreamError

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class RawServer:
    """Reads whole requests (headers and Content-Length bytes) and answers each with `answer(n)`'s bytes, n
    counting requests across connections; None closes the connection instead."""

    def __init__(self, answer, close_after_each: bool = False):
        self.answer, self.close_after_each = answer, close_after_each
        self.requests, self.connections, self.closed = 0, 0, asyncio.Event()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
                self.requests += 1
                answer = self.answer(self.requests)
                if answer is None:
                    break
                if isinstance(answer, bytes):
                    writer.write(answer)
                else:
                    await answer(reader, writer)
                await writer.drain()
                if self.close_after_each:
                    break
            writer.close()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.set()


def run(scenario):
    async def main():
        upstreams = Upstreams(connect_timeout=2)
        try:
            return await asyncio.wait_for(scenario(upstreams), 20)
        finally:
            upstreams.close()
    return asyncio.run(main())


async def ask(upstreams: Upstreams, address: str) -> tuple[int, dict, bytes]:
    answer = await upstreams.post(address, "/v1/embeddings", b'{"input":"x"}')
    return answer.status, answer.headers, await answer.read()


def test_connections_are_kept_alive_and_reused():
    async def scenario(upstreams):
        server = RawServer(lambda n: OK)
        address = await server.start()
        answers = [await ask(upstreams, address) for _ in range(3)]
        assert answers == [(200, {"content-type": "application/json", "content-length": "2"}, b"{}")] * 3
        assert (server.requests, server.connections) == (3, 1)
    run(scenario)


def test_a_kept_alive_connection_the_server_closed_or_left_idle_too_long_is_not_reused(monkeypatch):
    async def scenario(upstreams):
        server = RawServer(lambda n: OK, close_after_each=True)     # no "Connection: close": a keep-alive timeout
        address = await server.start()
        await ask(upstreams, address)
        while upstreams.idle.get(address):           # the server's close arrives
            await asyncio.sleep(0.01)
        assert (await ask(upstreams, address))[0] == 200 and server.connections == 2
        while upstreams.idle.get(address):
            await asyncio.sleep(0.01)
        server.close_after_each = False
        await ask(upstreams, address)
        monkeypatch.setattr(upstream, "IDLE_SECONDS", 0.0)   # older than the servers' own keep-alive limits
        await ask(upstreams, address)
        assert server.connections == 4
    run(scenario)


def test_a_request_whose_connection_fails_is_never_sent_again():
    async def scenario(upstreams):
        server = RawServer(lambda n: OK if n == 1 else None)      # takes the second request, then closes (a crash)
        address = await server.start()
        await ask(upstreams, address)
        with pytest.raises(UpstreamError, match="closed before the answer's end"):
            await ask(upstreams, address)                         # on the kept-alive connection
        assert server.requests == 2
    run(scenario)


def test_answers_that_fail_fail_their_request_only():
    async def short(reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"a\":")
        await writer.drain()
        writer.close()

    broken = {1: b"this is not HTTP\r\n\r\n", 2: short, 3: None, 4: OK}

    async def scenario(upstreams):
        server = RawServer(lambda n: broken[n])
        address = await server.start()
        for message in ("did not parse", "closed before the answer's end", "closed before the answer's end"):
            with pytest.raises(UpstreamError, match=message):
                await ask(upstreams, address)
        assert await ask(upstreams, address) == (200, {"content-type": "application/json", "content-length": "2"},
                                                 b"{}")
        assert server.connections == 4         # no connection that failed carried another request
    run(scenario)


def test_a_failure_after_part_of_an_answer_is_not_retried():
    async def cut(reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
        await writer.drain()
        writer.transport.abort()

    async def scenario(upstreams):
        server = RawServer(lambda n: OK if n == 1 else cut)
        address = await server.start()
        await ask(upstreams, address)
        with pytest.raises(UpstreamError):
            await ask(upstreams, address)            # on the kept-alive connection, which got bytes back
        assert server.requests == 2                   # not sent again
    run(scenario)


def test_interim_answers_are_skipped_and_odd_ones_refused():
    answers = {1: b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + OK,
               2: b"HTTP/1.1 000 Nothing\r\nContent-Length: 0\r\n\r\n",
               3: b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * (upstream.MAX_HEADER_BYTES + 1) + b"\r\n\r\n"}

    async def scenario(upstreams):
        server = RawServer(lambda n: answers[n])
        address = await server.start()
        assert await ask(upstreams, address) == (200, {"content-type": "application/json", "content-length": "2"},
                                                 b"{}")
        for message in ("no HTTP status", "headers passed"):
            with pytest.raises(UpstreamError, match=message):
                await ask(upstreams, address)
    run(scenario)


def test_an_answer_framed_by_the_connections_end_is_whole_unless_reset():
    async def scenario(upstreams):
        server = RawServer(lambda n: b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it")
        address = await server.start()
        # HTTP/1.0 without a length: the body is what comes until the server closes, which it does after each.
        server.close_after_each = True
        assert (await ask(upstreams, address))[2] == b"all of it"

        async def reset(reader, writer):
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\npart of")
            await writer.drain()
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()                                # a reset (RST), not an end (FIN)
        server.answer = lambda n: reset
        with pytest.raises(UpstreamError, match="closed before the answer's end"):
            await ask(upstreams, address)
    run(scenario)


def test_a_server_that_talks_out_of_turn_is_not_reused():
    async def scenario(upstreams):
        async def extra(reader, writer):
            writer.write(OK + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n!!")      # one answer too many
        server = RawServer(lambda n: extra if n == 1 else OK)
        address = await server.start()
        assert (await ask(upstreams, address))[2] == b"{}"
        assert (await ask(upstreams, address))[2] == b"{}"     # not the stray "!!"
        assert server.connections == 2
    run(scenario)


def test_a_slow_reader_pauses_the_server_and_bounds_the_buffer_a_whole_read_does_not():
    chunk = b"x" * 65536
    total = 64 * len(chunk)

    async def scenario(upstreams):
        async def big(reader, writer):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(64):
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
        server = RawServer(lambda n: big)
        address = await server.start()
        answer = await upstreams.post(address, "/v1/chat/completions", b"{}")
        while not answer.connection.paused:
            await answer.wait()
        assert upstream.HIGH_WATER < answer.size <= upstream.HIGH_WATER + 2**18      # one read past the mark
        received, largest = 0, 0
        async for part in answer.chunks():
            received += len(part)
            largest = max(largest, answer.size)
        assert received == total and largest <= upstream.HIGH_WATER + 2**18
        status, _, body = await ask(upstreams, address)      # read whole: never paused, or it would never end
        assert (status, len(body), server.connections) == (200, total, 1)                # resumed and reused
    run(scenario)


def test_giving_up_an_answer_closes_its_connection():
    async def scenario(upstreams):
        async def slow(reader, writer):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"5\r\nfirst\r\n")
            await writer.drain()
            assert await reader.read() == b""     # generating, until the connection's end says nobody listens
        server = RawServer(lambda n: slow)
        address = await server.start()
        answer = await upstreams.post(address, "/v1/chat/completions", b"{}")
        assert await anext(answer.chunks()) == b"first"
        upstreams.abandon(answer)
        await asyncio.wait_for(server.closed.wait(), 5)
        assert not upstreams.idle.get(address)
    run(scenario)


def test_no_connection_is_unconnected_so_the_next_replica_is_tried():
    async def scenario(upstreams):
        with pytest.raises(Unconnected, match="127.0.0.1:9"):
            await ask(upstreams, "127.0.0.1:9")       # the discard port: nothing listens
    run(scenario)
