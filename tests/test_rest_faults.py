"""A book never waits forever for a snapshot: every way a REST answer can fail is an
event and a retry, and the book syncs once a good answer comes.

The feed's `rest_url` points at a real TCP server on loopback that misbehaves in turn -
an answer that is not HTTP, a chunked body cut short, a 200 with garbage JSON, silence
(the fetch deadline) - and then forwards the simulated venue's real snapshot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import polars as pl

from ingestd.feed.rest import http_get
from ingestd.sim import SimServer
from tests.exchanges.test_binance import SPOT_BOOK, reference_books
from tests.support import apply_book_rows, book_table_rows, feed_for, make_config, read_table
from tests.support import run_daemon as run

Writer = asyncio.StreamWriter


async def not_http(w: Writer, _good: bytes) -> None:
    w.write(b"SSH-2.0-OpenSSH_9.6\r\n")
    await w.drain()


async def chunked_cut_short(w: Writer, _good: bytes) -> None:
    w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: application/json\r\n\r\n400\r\n{\"lastUpdateId\":")
    await w.drain()


async def garbage_json(w: Writer, _good: bytes) -> None:
    body = b'{"lastUpdateId": "soon", "bids": [[1]]'
    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    await w.drain()


async def silence(w: Writer, _good: bytes) -> None:
    await asyncio.sleep(30)


async def good(w: Writer, body: bytes) -> None:
    w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    await w.drain()


Behaviour = Callable[[Writer, bytes], Awaitable[None]]
FAULTS: list[Behaviour] = [not_http, chunked_cut_short, garbage_json, silence]


class FaultyRest:
    """Answers the n-th request with FAULTS[n], then with the venue's real answer."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.requests = 0
        self.server: asyncio.Server | None = None

    async def handle(self, r: asyncio.StreamReader, w: Writer) -> None:
        try:
            head = await r.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            n = self.requests
            self.requests += 1
            answer = await http_get(self.upstream + path, 5.0)
            behaviour = FAULTS[n] if n < len(FAULTS) else good
            await behaviour(w, answer.body)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_broken_snapshot_answers_are_retried_until_the_book_syncs(root: Path) -> None:
    symbol = SPOT_BOOK[0]
    async with SimServer("binance", rate_msgs_s=50) as sim:
        rest = FaultyRest(sim.rest_url)
        rest_url = await rest.start()
        feed = {**feed_for(sim, symbols=[symbol], channels=["book"]), "rest_url": rest_url,
                "rest_timeout_s": 0.5}
        cfg = make_config(root, [feed])

        def synced(d: object) -> bool:
            return rest.requests > len(FAULTS) and d.writer_stats.rows_written["book"] > 0  # type: ignore[attr-defined]

        try:
            daemon = await run(cfg, synced, timeout_s=40, settle_s=1.0)
        finally:
            await rest.stop()
    events = read_table(root, "events")
    failed = events.filter(pl.col("event") == "snapshot_failed")["detail"].to_list()
    # One event per broken answer, each saying what was wrong, in order.
    assert len(failed) == len(FAULTS), failed
    for detail, word in zip(failed, ("not_http", "truncated", "bad snapshot", "timeout"),
                            strict=True):
        assert word in detail, (word, detail)
    assert daemon.feed_stats[feed["name"]].parse_errors == {}
    book = read_table(root, "book")
    assert book.filter(pl.col("is_snapshot")).height > 0
    # The book rebuilt from the table is the venue's book: the diffs buffered during
    # the ~4 s of failed fetches were bridged to the snapshot and released, none lost.
    rebuilt = apply_book_rows(book_table_rows(book))
    assert rebuilt[symbol] == reference_books("binance_spot", SPOT_BOOK, futures=False)[symbol]
