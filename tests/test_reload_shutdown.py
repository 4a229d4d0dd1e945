"""A SIGHUP reload that overlaps a shutdown never starts feeds once stopping began: no
reader outlives the daemon, and everything that was received is committed."""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import os
import struct
from pathlib import Path
from typing import Any

from ingestd.checks import load_config
from ingestd.daemon import Daemon
from ingestd.feed.reader import FeedReader
from ingestd.sim import SimServer
from tests.support import feed_for, read_table, recorded_frames

FEED = """
[[feeds]]
name = "{name}"
exchange = "binance"
url = "{url}"
symbols = ["ZILUSDT", "DENTUSDT", "MANAUSDT"]
channels = ["trades"]
trade_stream = "aggTrade"
stale_after_s = {stale}
"""

HEAD = """
[storage]
root = "{root}"
flush_interval_s = 0.2

[health]
listen = "127.0.0.1:0"

[log]
level = "warning"
format = "console"
"""


async def wait_for(cond: Any, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def open_writer(fifo: Path, timeout_s: float = 10.0) -> int:
    """Open the FIFO for writing once someone is reading it (the reload's config read)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO or loop.time() > deadline:
                raise
        await asyncio.sleep(0.01)


async def test_a_reload_resuming_during_shutdown_starts_nothing(tmp_path: Path) -> None:
    root = tmp_path / "data"
    fifo = tmp_path / "feeds.fifo"
    os.mkfifo(fifo)
    readers: list[FeedReader] = []
    async with SimServer("binance", rate_msgs_s=300, live=True) as sim_a, \
            SimServer("binance", rate_msgs_s=300, live=True) as sim_b:
        first = tmp_path / "feeds.toml"
        first.write_text(HEAD.format(root=root)
                         + FEED.format(name="a", url=feed_for(sim_a)["url"], stale=30.0))
        # The running config came from a file; SIGHUP re-reads the FIFO, so the reload's
        # config read lasts until the test writes to it.
        daemon = Daemon(load_config(first), config_path=str(fifo))
        task = asyncio.create_task(daemon.run(install_signals=False))
        reload: asyncio.Task[bool] | None = None
        fd: int | None = None
        try:
            await wait_for(lambda: daemon.writer_stats.rows_written["trades"] > 0)
            readers.append(daemon.readers["a"])
            reload = asyncio.create_task(daemon.reload())
            fd = await open_writer(fifo)          # the reload is reading its config now
            daemon.request_stop("test: shutdown while a reload reads its config")
            # The new config changes feed a and adds feed b; the reload resumes only now,
            # after stopping began, while the shutdown drains.
            os.write(fd, (HEAD.format(root=root)
                          + FEED.format(name="a", url=feed_for(sim_a)["url"], stale=31.0)
                          + FEED.format(name="b", url=feed_for(sim_b)["url"], stale=30.0)
                          ).encode())
            os.close(fd)
            fd = None
            assert await asyncio.wait_for(task, 30) == 0
            reloaded = await asyncio.wait_for(reload, 30)
            readers.extend(r for r in daemon.readers.values() if r not in readers)
            running = sorted(r.name for r in readers if r.task is None or not r.task.done())
        finally:
            if fd is not None:
                os.close(fd)
            elif reload is None or not reload.done():
                # Never leave the reload's thread blocked on the FIFO.
                with_reader = await open_writer(fifo)
                os.close(with_reader)
            for r in daemon.readers.values():   # a reader the daemon leaked: end it here
                r.stop()
            if not task.done():
                daemon.request_stop("test cleanup")
                await asyncio.wait_for(task, 30)
    # No reader runs after the daemon returned, and none was started for the new feed.
    assert running == []
    assert "b" not in daemon.readers and sim_b.handshakes == 0
    # Nothing received was lost: every trade row handed on is in Parquet.
    handed = sum(r.stats.rows["trades"] for r in readers)
    assert read_table(root, "trades").height == handed > 0
    # The feed kept its running config (the reload was abandoned, not half applied).
    assert reloaded is False
    assert daemon.cfg.feeds[0].stale_after_s == 30.0 and len(daemon.cfg.feeds) == 1


class SlowCloseVenue:
    """A minimal WebSocket server (real sockets, RFC 6455 by hand) that sends some frames,
    then never answers the client's close: the client's close takes its full timeout.
    `close_seen` is set when the client's close frame arrives, `client_gone` when the
    client closes the TCP connection."""

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = frames
        self.close_seen = asyncio.Event()
        self.client_gone = asyncio.Event()
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        request = await reader.readuntil(b"\r\n\r\n")
        key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        accept = base64.b64encode(hashlib.sha1(
            key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        for frame in self.frames:
            header = bytes([0x81, len(frame)]) if len(frame) < 126 else \
                bytes([0x81, 126]) + struct.pack(">H", len(frame))
            writer.write(header + frame)
        await writer.drain()
        try:
            while True:
                b0, b1 = await reader.readexactly(2)
                n = b1 & 0x7F
                if n == 126:
                    n = struct.unpack(">H", await reader.readexactly(2))[0]
                elif n == 127:
                    n = struct.unpack(">Q", await reader.readexactly(8))[0]
                await reader.readexactly(n + (4 if b1 & 0x80 else 0))
                if b0 & 0x0F == 8:
                    self.close_seen.set()          # ... and never answered
        except (asyncio.IncompleteReadError, ConnectionError):
            self.client_gone.set()                 # the client closed the TCP connection

    async def __aenter__(self) -> SlowCloseVenue:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        for w in self._writers:
            w.close()
        self._server.close()
        await self._server.wait_closed()


async def test_a_shutdown_during_a_reloads_feed_stop_waits_for_that_feed(
        tmp_path: Path) -> None:
    """Shutdown begins while a reload stops a changed feed (its close is slow): the
    shutdown waits for that reader - its last rows, the `disconnected` event included,
    are committed - and the reload starts nothing afterwards."""
    root = tmp_path / "data"
    path = tmp_path / "feeds.toml"
    trades = [f for f in recorded_frames("binance_spot", "aggTrade.jsonl")
              if b'"ZILUSDT"' in f][:5]
    async with SlowCloseVenue(trades) as venue:
        url = f"ws://127.0.0.1:{venue.port}"
        path.write_text(HEAD.format(root=root) + FEED.format(name="a", url=url, stale=30.0))
        daemon = Daemon(load_config(path), config_path=str(path))
        task = asyncio.create_task(daemon.run(install_signals=False))
        reload: asyncio.Task[bool] | None = None
        try:
            await wait_for(lambda: daemon.writer_stats.rows_written["trades"] == 5)
            old = daemon.readers["a"]
            path.write_text(HEAD.format(root=root) + FEED.format(name="a", url=url,
                                                                  stale=31.0))
            reload = asyncio.create_task(daemon.reload())
            await asyncio.wait_for(venue.close_seen.wait(), 10)   # the reload stops "a"
            daemon.request_stop("test: shutdown while a reload stops a feed")
            assert await asyncio.wait_for(task, 30) == 0
            reloaded = await asyncio.wait_for(reload, 30)
            running = sorted(r.name for r in daemon.readers.values()
                             if r.task is None or not r.task.done())
        finally:
            for r in daemon.readers.values():
                r.stop()
            if not task.done():
                daemon.request_stop("test cleanup")
                await asyncio.wait_for(task, 30)
            if reload is not None and not reload.done():
                await asyncio.wait_for(reload, 30)
    assert running == [] and venue.connections == 1     # nothing started again
    assert old.task is not None and old.task.done()
    assert reloaded is False
    events = read_table(root, "events")
    mine = events.filter(events["feed"] == "a")["event"].to_list()
    # Every row the stopped reader handed on is committed, its last event too.
    assert mine == ["connected", "disconnected"]
    assert read_table(root, "trades").height == old.stats.rows["trades"] == 5
