"""Make-before-break rotation under faults: a rotation cancelled at any point (session end,
shutdown) closes what it opened, and a rotation whose new connection fails leaves the
current connection streaming and is over - the next `serverShutdown` rotates again.

The venue is a real local WebSocket server (websockets) publishing one live timeline of
recorded Binance aggTrade frames to every open connection, with a per-handshake script
(refuse, hold) and `serverShutdown` announcements on cue; it counts the TCP connections
still open on its side."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from ingestd.daemon import Daemon
from tests.support import make_config, read_table, recorded_frames

SYMBOLS = ["ZILUSDT", "DENTUSDT", "MANAUSDT"]
SHUTDOWN = b'{"stream":"!serverShutdown","data":{"e":"serverShutdown","E":1770123456789}}'


class LiveVenue:
    def __init__(self, rate_msgs_s: float, refuse: frozenset[int] = frozenset(),
                 hold: frozenset[int] = frozenset()) -> None:
        self.frames = [f for f in recorded_frames("binance_spot", "aggTrade.jsonl")
                       if json.loads(f)["data"]["s"] in SYMBOLS]
        self.rate_msgs_s = rate_msgs_s
        self.refuse = refuse                  # handshake numbers answered 503
        self.hold = hold                      # handshake numbers never answered
        self.handshakes = 0
        self.open_tcp = 0                     # connections not yet closed on this side
        self.sent: dict[int, list[bytes]] = {}
        self.published = 0
        self._numbers: dict[ServerConnection, int] = {}
        self._queues: dict[int, asyncio.Queue[bytes]] = {}
        self._conns: dict[int, ServerConnection] = {}
        self._release = asyncio.Event()
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def _task(self, coro: Any) -> None:
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _until_closed(self, conn: ServerConnection) -> None:
        self.open_tcp += 1
        try:
            await conn.wait_closed()
        finally:
            self.open_tcp -= 1

    async def _process_request(self, conn: ServerConnection,
                               request: Request) -> Response | None:
        self.handshakes += 1
        n = self._numbers[conn] = self.handshakes
        self._task(self._until_closed(conn))
        if n in self.refuse:
            return Response(503, "Busy", Headers({"Content-Type": "text/plain"}), b"busy\n")
        if n in self.hold:
            await self._release.wait()
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        n = self._numbers[ws]
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._queues[n] = queue
        self._conns[n] = ws
        sent = self.sent.setdefault(n, [])
        try:
            while not self._closing:
                get = asyncio.ensure_future(queue.get())
                closed = asyncio.ensure_future(ws.wait_closed())
                await asyncio.wait({get, closed}, return_when=asyncio.FIRST_COMPLETED)
                closed.cancel()
                if not get.done():
                    get.cancel()
                    return
                frame = get.result()
                await ws.send(frame, text=True)
                if frame is not SHUTDOWN:
                    sent.append(frame)
        except ConnectionClosed:
            pass
        finally:
            self._queues.pop(n, None)

    async def _publish(self) -> None:
        while not self._queues:
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i, frame in enumerate(self.frames):
            delay = t0 + i / self.rate_msgs_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self.published += 1
            for q in list(self._queues.values()):
                q.put_nowait(frame)

    def announce_shutdown(self, n: int) -> None:
        """Send `serverShutdown` on connection `n` (in order with its data)."""
        self._queues[n].put_nowait(SHUTDOWN)

    def release(self) -> None:
        """Answer the held handshakes now."""
        self._release.set()

    def open_connections(self) -> list[int]:
        return sorted(self._queues)

    async def __aenter__(self) -> LiveVenue:
        self._server = await serve(self._handler, "127.0.0.1", 0, compression=None,
                                   ping_interval=None, process_request=self._process_request)
        self.port = next(iter(self._server.sockets)).getsockname()[1]
        self._task(self._publish())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closing = True
        self._release.set()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def trades_sent(self) -> set[tuple[str, str]]:
        return {(d["s"], str(d["a"])) for frames in self.sent.values()
                for d in (json.loads(f)["data"] for f in frames)}


async def wait_until(cond: Any, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def feed(venue: LiveVenue) -> dict[str, Any]:
    return {"name": "rot", "exchange": "binance", "url": venue.url, "symbols": SYMBOLS,
            "channels": ["trades"], "trade_stream": "aggTrade", "stale_after_s": 5.0,
            "reconnect_min_delay_s": 0.05, "reconnect_max_delay_s": 0.1}


@pytest.mark.parametrize("transport", ["picows", "websockets"])
@pytest.mark.parametrize("phase", ["handshake", "overlap"])
async def test_a_rotation_cancelled_by_shutdown_leaves_no_connection_open(
        root: Path, phase: str, transport: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shutdown while the rotation's new connection waits for its handshake answer, or
    streams its overlap: after the daemon stopped, the venue has no connection open."""
    monkeypatch.setenv("INGESTD_TRANSPORT", transport)
    hold = frozenset({2}) if phase == "handshake" else frozenset()
    async with LiveVenue(rate_msgs_s=60, hold=hold) as venue:
        daemon = Daemon(make_config(root, [feed(venue)]))
        task = asyncio.create_task(daemon.run(install_signals=False))
        try:
            await wait_until(lambda: daemon.writer_stats.rows_written["trades"] > 0)
            venue.announce_shutdown(1)
            if phase == "handshake":
                await wait_until(lambda: venue.handshakes == 2)     # held: no answer yet
            else:
                await wait_until(lambda: len(venue.sent.get(2, [])) >= 2)  # overlapping
            assert daemon.feed_stats["rot"].connects == 1             # not switched yet
            daemon.request_stop("test: stop during the rotation")
            assert await asyncio.wait_for(task, 30) == 0
            # The venue answers the abandoned handshake only now, after the daemon ended.
            venue.release()
            # Every connection the feed opened is closed - none is left open for as long
            # as the process lives, streaming into a connection nobody reads.
            await wait_until(lambda: venue.open_tcp == 0, timeout_s=5)
        finally:
            if not task.done():
                daemon.request_stop("test cleanup")
                await asyncio.wait_for(task, 30)
    events = read_table(root, "events")
    assert events.filter(pl.col("event") == "disconnected")["detail"].to_list() == \
        ["shutdown"]


async def test_a_failed_rotation_keeps_streaming_and_the_next_server_shutdown_rotates(
        root: Path) -> None:
    """The venue refuses the first rotation's handshake: the current connection keeps
    streaming (no break, no gap); the rotation is over, so the next `serverShutdown`
    starts another one, which switches make-before-break."""
    async with LiveVenue(rate_msgs_s=60, refuse=frozenset({2})) as venue:
        daemon = Daemon(make_config(root, [feed(venue)]))
        task = asyncio.create_task(daemon.run(install_signals=False))
        try:
            await wait_until(lambda: daemon.writer_stats.rows_written["trades"] > 0)
            venue.announce_shutdown(1)
            await wait_until(lambda: venue.handshakes == 2)            # refused
            # Announce again (as often as needed) until the reader starts a new rotation;
            # one still "in progress" would ignore every announcement.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10.0
            while venue.handshakes < 3 and 1 in venue.open_connections():
                assert loop.time() < deadline, "no rotation after a failed one"
                venue.announce_shutdown(1)
                await asyncio.sleep(0.2)
            await wait_until(lambda: daemon.feed_stats["rot"].connects == 2)  # switched
            await wait_until(lambda: 1 not in venue.open_connections())
            # Every trade of the timeline handed on (none lost at either switch).
            await wait_until(lambda: daemon.feed_stats["rot"].rows["trades"]
                             >= len(venue.frames))
        finally:
            daemon.request_stop("test done")
            assert await asyncio.wait_for(task, 30) == 0
    st = daemon.feed_stats["rot"]
    assert venue.handshakes == 3 and st.reconnects == 1 and st.gaps == 0
    events = read_table(root, "events")
    ends = events.filter(pl.col("event") == "disconnected")["detail"].to_list()
    assert ends == ["rotated: serverShutdown", "shutdown"], ends
    trades = read_table(root, "trades")
    stored = list(zip(trades["symbol"], trades["trade_id"], strict=True))
    assert len(stored) == len(set(stored)) == len(venue.frames)   # nothing lost or doubled
    assert set(stored) == venue.trades_sent()
