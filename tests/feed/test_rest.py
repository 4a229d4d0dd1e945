"""http_get against real servers on 127.0.0.1: every outcome is a RestAnswer, in time.

The malformed answers come from raw asyncio TCP servers; deadlines are small (0.5 s) and
every wait on a condition is bounded, so a regression fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest

from ingestd.feed.rest import USER_AGENT, RestAnswer, http_get

DEADLINE_S = 0.5
MARGIN_S = 0.4  # scheduling slack above a deadline on a loaded machine
HEAD_END = b"\r\n\r\n"

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Server:
    url: str
    handlers: set[asyncio.Task[None]] = field(default_factory=set)


@asynccontextmanager
async def serve(handler: Handler, path: str = "/api/v3/depth?symbol=BTCUSDT"
                ) -> AsyncIterator[Server]:
    """A raw TCP server on 127.0.0.1 port 0 running `handler` for each connection."""
    srv = Server("")

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        srv.handlers.add(task)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:  # the server stops (end of the test): not an error
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    srv.url = f"http://127.0.0.1:{port}{path}"
    try:
        yield srv
    finally:
        server.close()
        for task in srv.handlers:
            task.cancel()
        await asyncio.gather(*srv.handlers)
        await server.wait_closed()


def answer_with(*parts: bytes, close: bool = True) -> Handler:
    """Read the request head, write `parts` one by one, then close (or hold) the socket."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(HEAD_END)
        for part in parts:
            writer.write(part)
            await writer.drain()
        if not close:
            await reader.read()  # until the client closes

    return handler


async def timed_get(url: str, deadline_s: float = DEADLINE_S, **kw: int
                    ) -> tuple[RestAnswer, float]:
    started = time.monotonic()
    answer = await http_get(url, deadline_s, **kw)
    return answer, time.monotonic() - started


def refused_port() -> int:
    """A port on 127.0.0.1 that was listening a moment ago and is now closed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        return int(s.getsockname()[1])


# ---- complete answers --------------------------------------------------------------------
async def test_200_with_content_length_body_and_the_request_headers() -> None:
    heads: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(HEAD_END))
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n'
                     b'Content-Length: 15\r\n\r\n{"lastId": 123}')
        await writer.drain()

    async with serve(handler) as srv:
        answer, elapsed = await timed_get(srv.url)
    assert answer == RestAnswer(200, b'{"lastId": 123}', None)
    assert elapsed < DEADLINE_S
    head = heads[0].decode("latin-1").lower()
    assert head.startswith("get /api/v3/depth?symbol=btcusdt http/1.1\r\n")
    assert f"user-agent: {USER_AGENT}\r\n".lower() in head
    assert "accept: application/json\r\n" in head
    assert "gzip" in head.split("accept-encoding:")[1].split("\r\n")[0]


async def test_200_chunked_body_arriving_in_pieces() -> None:
    async with serve(answer_with(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"5\r\nhello\r\n", b"1\r\n \r\n", b"5\r\nworld\r\n", b"0\r\n\r\n",
            close=False)) as srv:
        answer, elapsed = await timed_get(srv.url)
    assert answer == RestAnswer(200, b"hello world", None)
    assert elapsed < DEADLINE_S


async def test_gzip_body_is_decoded() -> None:
    raw = b'{"bids": [], "asks": []}' * 100
    packed = gzip.compress(raw)
    async with serve(answer_with(
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n"
            b"Content-Length: %d\r\n\r\n" % len(packed), packed)) as srv:
        answer, _ = await timed_get(srv.url)
    assert answer == RestAnswer(200, raw, None)


async def test_503_is_an_answer_with_its_body() -> None:
    async with serve(answer_with(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 11\r\n\r\nmaintenance")) as srv:
        answer, _ = await timed_get(srv.url)
    assert answer == RestAnswer(503, b"maintenance", None)


async def test_body_until_close_without_length_is_complete() -> None:
    async with serve(answer_with(b"HTTP/1.0 200 OK\r\n\r\n", b"all of it")) as srv:
        answer, _ = await timed_get(srv.url)
    assert answer == RestAnswer(200, b"all of it", None)


# ---- no complete answer: status 0, a classified error ------------------------------------
@pytest.mark.parametrize("garbage", [
    pytest.param(b"SSH-2.0-OpenSSH_9.6\r\nInvalid SSH identification string.\r\n", id="ssh"),
    pytest.param(bytes(range(256)) * 4, id="binary"),
])
async def test_an_answer_that_is_not_http(garbage: bytes) -> None:
    async with serve(answer_with(garbage)) as srv:
        answer, elapsed = await timed_get(srv.url)
    assert answer.status == 0
    assert answer.body == b""
    assert answer.error is not None
    assert answer.error.startswith("not_http: "), answer.error
    assert elapsed < DEADLINE_S


async def test_content_length_body_cut_short_by_a_close() -> None:
    async with serve(answer_with(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
                                 b"abc")) as srv:
        answer, elapsed = await timed_get(srv.url)
    assert answer == RestAnswer(0, b"", "truncated: body cut short after 3 of 100 bytes")
    assert elapsed < DEADLINE_S


async def test_chunked_body_cut_short_by_a_close() -> None:
    async with serve(answer_with(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                                 b"5\r\nhello\r\n10\r\nabc")) as srv:
        answer, elapsed = await timed_get(srv.url)
    assert answer == RestAnswer(0, b"", "truncated: chunked body cut short after 8 bytes")
    assert elapsed < DEADLINE_S


async def test_close_before_any_answer() -> None:
    async with serve(answer_with()) as srv:
        answer, elapsed = await timed_get(srv.url)
    assert answer == RestAnswer(
        0, b"", "disconnected: the server closed the connection before a complete head")
    assert elapsed < DEADLINE_S


async def test_malformed_header() -> None:
    async with serve(answer_with(b"HTTP/1.1 200 OK\r\nNo colon here\r\n"
                                 b"Content-Length: 2\r\n\r\nhi")) as srv:
        answer, _ = await timed_get(srv.url)
    assert answer.status == 0
    assert answer.error is not None
    assert answer.error.startswith("bad_http: "), answer.error


async def test_gzip_that_does_not_decode() -> None:
    async with serve(answer_with(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n"
                                 b"Content-Length: 8\r\n\r\nnot gzip")) as srv:
        answer, _ = await timed_get(srv.url)
    assert answer.status == 0
    assert answer.error is not None
    assert answer.error.startswith("bad_encoding: "), answer.error


async def test_server_that_never_answers_times_out_at_the_deadline() -> None:
    closed = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(HEAD_END)
        await reader.read()  # until the client gives up and closes
        closed.set()

    async with serve(silent) as srv:
        answer, elapsed = await timed_get(srv.url)
        await asyncio.wait_for(closed.wait(), 2.0)  # the client closed its socket
    assert answer == RestAnswer(0, b"", "timeout: no complete answer within 0.5 s")
    assert DEADLINE_S <= elapsed < DEADLINE_S + MARGIN_S


async def test_trickling_server_is_cut_at_the_total_deadline() -> None:
    """One byte every 0.1 s forever: each read is quick, only a total deadline ends it."""
    sent = 0

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await reader.readuntil(HEAD_END)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
        while True:
            writer.write(b"x")
            await writer.drain()
            sent += 1
            await asyncio.sleep(0.1)  # the server's pace, not a wait for a condition

    async with serve(trickle) as srv:
        answer, elapsed = await timed_get(srv.url)
    assert answer == RestAnswer(0, b"", "timeout: no complete answer within 0.5 s")
    assert DEADLINE_S <= elapsed < DEADLINE_S + MARGIN_S
    assert sent >= 3  # bytes kept coming while the client waited


async def test_trickled_head_is_cut_at_the_total_deadline() -> None:
    async def trickle_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(HEAD_END)
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok":
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.1)

    async with serve(trickle_head) as srv:
        answer, elapsed = await timed_get(srv.url)
    assert answer == RestAnswer(0, b"", "timeout: no complete answer within 0.5 s")
    assert DEADLINE_S <= elapsed < DEADLINE_S + MARGIN_S


async def test_connection_refused() -> None:
    port = refused_port()
    answer, elapsed = await timed_get(f"http://127.0.0.1:{port}/")
    assert answer.status == 0
    assert answer.body == b""
    assert answer.error is not None
    assert answer.error.startswith("connect: ConnectionRefusedError "), answer.error
    assert elapsed < DEADLINE_S


async def test_https_url_on_a_plain_http_server_fails_the_handshake() -> None:
    async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # the TLS ClientHello: never a complete HTTP head
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async with serve(plain) as srv:
        answer, elapsed = await timed_get(srv.url.replace("http://", "https://"))
    assert answer.status == 0
    assert answer.error is not None
    assert answer.error.startswith("tls: "), answer.error
    assert elapsed < DEADLINE_S


@pytest.mark.parametrize(("url", "error"), [
    ("ftp://127.0.0.1/x", "bad_url: scheme must be http or https: 'ftp://127.0.0.1/x'"),
    ("http:///depth", "bad_url: no host: 'http:///depth'"),
    ("http://127.0.0.1:99999/", "bad_url: Port out of range 0-65535: 'http://127.0.0.1:99999/'"),
])
async def test_bad_url(url: str, error: str) -> None:
    assert await http_get(url, DEADLINE_S) == RestAnswer(0, b"", error)


async def test_declared_length_above_the_cap_is_too_large() -> None:
    async with serve(answer_with(b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n",
                                 b"x" * 2000)) as srv:
        answer, _ = await timed_get(srv.url, max_body_bytes=1000)
    assert answer == RestAnswer(0, b"", "too_large: Content-Length 2000 above the 1000 bytes cap")


async def test_endless_chunked_body_stops_at_the_cap() -> None:
    """No length to check up front: the cap holds while streaming, well before the end."""

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(HEAD_END)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while True:
            writer.write(b"400\r\n" + b"x" * 1024 + b"\r\n")
            await writer.drain()

    async with serve(endless) as srv:
        answer, elapsed = await timed_get(srv.url, max_body_bytes=100_000)
    assert answer == RestAnswer(0, b"", "too_large: body above the 100000 bytes cap")
    assert elapsed < DEADLINE_S


async def test_a_body_exactly_at_the_cap_is_an_answer() -> None:
    async with serve(answer_with(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                                 b"3e8\r\n" + b"y" * 1000 + b"\r\n0\r\n\r\n")) as srv:
        answer, _ = await timed_get(srv.url, max_body_bytes=1000)
    assert answer == RestAnswer(200, b"y" * 1000, None)


# ---- cancellation ------------------------------------------------------------------------
async def test_cancellation_propagates_and_leaves_nothing_behind() -> None:
    asked, closed = asyncio.Event(), asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(HEAD_END)
        asked.set()
        await reader.read()  # until the client closes
        closed.set()

    threads_before = threading.active_count()
    async with serve(silent) as srv:
        tasks_before = asyncio.all_tasks()
        fetch = asyncio.create_task(http_get(srv.url, 5.0))
        await asyncio.wait_for(asked.wait(), 2.0)
        fetch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await fetch
        assert fetch.cancelled()
        await asyncio.wait_for(closed.wait(), 2.0)  # the client's socket was closed
        left = {t for t in asyncio.all_tasks() - tasks_before - srv.handlers if not t.done()}
        assert left == set()
    assert threading.active_count() == threads_before
