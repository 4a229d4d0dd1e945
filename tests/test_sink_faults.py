"""Faults at the sink's edges: every drop is counted in the metrics, the rejects directory
stays under its budget, and a commit that became visible is never repeated."""

from __future__ import annotations

import asyncio
import errno
import os
import struct
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.server import ServerConnection, serve

from ingestd.daemon import Daemon
from ingestd.exchanges.base import Output
from ingestd.feed.intake import STOP, MessageQueue
from ingestd.schema import TradesBlock
from ingestd.sim.recorded import frames
from ingestd.sink.batcher import Batcher
from ingestd.sink.parquet import Staging, commit
from ingestd.sink.writer import REJECTS_DIR, Reject, RejectsStore, Writer
from ingestd.stats import QueueStats, WriterStats
from tests.support import make_config, read_table

NS = 1_000_000_000
T0_NS = 1_700_000_000 * NS


def ws_frame(payload: bytes) -> bytes:
    """One unmasked server text frame (FIN set)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return bytes((0x81, 126)) + struct.pack("!H", n) + payload
    return bytes((0x81, 127)) + struct.pack("!Q", n) + payload


async def get(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:80]
    return body


# ---- item 13: every drop reaches ingestd_drops_total --------------------------------------
async def test_drop_newest_counts_every_drop_in_the_metrics(root: Path) -> None:
    """A tiny drop_newest queue under a burst of trades and garbage frames: /metrics shows,
    by reason, exactly the messages, rows and rejects that never reached the disk."""
    symbols = ["ZILUSDT", "DENTUSDT", "MANAUSDT"]
    trades = [f for f in frames("binance_spot", "aggTrade.jsonl")
              if any(b'"s":"%s"' % s.encode() in f for s in symbols)]
    garbage = [b"{not json %d" % i for i in range(len(trades) // 3)]
    burst: list[bytes] = []
    for i, f in enumerate(trades):
        burst.append(f)
        if i % 3 == 2 and i // 3 < len(garbage):
            burst.append(garbage[i // 3])

    async def venue(ws: ServerConnection) -> None:
        # Several writes of a few frames each: the reads interleave with the writer, so
        # some reads reach the queue and others find it full.
        for i in range(0, len(burst), 7):
            ws.transport.write(b"".join(ws_frame(f) for f in burst[i:i + 7]))
            await asyncio.sleep(0)
        await ws.wait_closed()

    async with serve(venue, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1] if server.sockets else 0
        feed = {"name": "bn", "exchange": "binance", "url": f"ws://127.0.0.1:{port}",
                "symbols": symbols, "channels": ["trades"],
                "trade_stream": "aggTrade"}
        cfg = make_config(root, [feed], queue={"capacity": 1, "when_full": "drop_newest"})
        daemon = Daemon(cfg)
        task = asyncio.create_task(daemon.run(install_signals=False))
        try:
            async with asyncio.timeout(20):
                while (st := daemon.feed_stats.get("bn")) is None \
                        or st.messages < len(burst) or daemon.health_port is None:
                    await asyncio.sleep(0.02)
            # Every frame is read: its rows were handed on or dropped, synchronously.
            metrics = await get(daemon.health_port, "/metrics")
        finally:
            daemon.request_stop("test done")
            assert await asyncio.wait_for(task, 30) == 0
    families = {f.name: f for f in text_string_to_metric_families(metrics.decode())}
    drops: Counter[str] = Counter()
    for s in families["ingestd_drops"].samples:
        if s.name == "ingestd_drops_total":
            drops[s.labels["reason"]] += int(s.value)
    stored_trades = read_table(root, "trades").height
    rejects = [line for p in (root / REJECTS_DIR).rglob("*.jsonl")
               for line in p.read_bytes().splitlines()] if (root / REJECTS_DIR).exists() else []
    connected = read_table(root, "events")["event"].to_list().count("connected")
    assert connected == 1  # the first item: the queue is empty, it always enters
    dropped_trades = len(trades) - stored_trades
    dropped_rejects = len(garbage) - len(rejects)
    assert dropped_trades > 0, "the burst must overflow the queue"
    # Messages: each frame read (trade or garbage) and the connected event.
    assert drops["queue_full"] == len(burst) + 1 - stored_trades - len(rejects) - connected
    assert drops["queue_full_trades_rows"] == dropped_trades
    assert drops["queue_full_rejects"] == dropped_rejects
    # The queue's own count of what it turned away is exported as well.
    queue_dropped = {s.labels["reason"]: int(s.value)
                     for s in families["ingestd_queue_dropped"].samples
                     if s.name == "ingestd_queue_dropped_total"}
    assert queue_dropped == {"queue_full": drops["queue_full"]}


# ---- item 2: a commit that became visible is never repeated -------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.mono = 100.0
        self.wall_ns = T0_NS

    def time_ns(self) -> int:
        return self.wall_ns

    def monotonic(self) -> float:
        return self.mono


class FlakyDirSync:
    """The directory fsync step: fails with EIO the first `failures` times it is asked to
    sync a partition (`date=`) directory, i.e. right after a file was renamed into it."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[Path] = []

    def __call__(self, path: Path) -> None:
        self.calls.append(path)
        if path.name.startswith("date=") and self.failures > 0:
            self.failures -= 1
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def trades(*seqs: int) -> TradesBlock:
    b = TradesBlock()
    for seq in seqs:
        b.add("BTCUSDT", T0_NS + seq - 5, T0_NS + seq, seq, str(seq), "buy", 100.5, 0.25)
    return b


async def wait_for(cond: Callable[[], bool], clock: FakeClock, step_s: float = 0.1) -> None:
    """Advance the fake clock until `cond()` holds (the writer's thread does real work)."""
    async with asyncio.timeout(10):
        while not cond():
            clock.mono += step_s
            await asyncio.sleep(0.01)


def stored_seqs(root: Path) -> list[int]:
    return sorted(seq for p in (root / "trades").rglob("*.parquet")
                  for seq in pq.read_table(p).column("recv_seq").to_pylist())


def test_commit_reports_a_published_file_whose_directory_sync_failed(tmp_path: Path) -> None:
    from ingestd.sink.parquet import PublishedNotDurable

    staging = Staging(tmp_path)
    staging.open()
    b = Batcher(1.0, 10)
    b.add("trades", "binance", trades(1, 2), 0.0, "i/f")
    with pytest.raises(PublishedNotDurable) as failed:
        commit(tmp_path, staging.path, b.take(b.partitions()[0]), fsync_dir=FlakyDirSync(1))
    done = failed.value.committed
    # Visible (renamed into place), only the directory entry may not be durable yet.
    assert done.path.exists() and done.rows == 2 and failed.value.errno == errno.EIO
    assert pq.read_table(done.path).column("recv_seq").to_pylist() == [1, 2]
    assert not list(staging.path.glob("*.tmp"))
    staging.close()


async def test_a_failed_directory_sync_after_rename_never_publishes_rows_twice(
        tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    queue = MessageQueue(1000, QueueStats(1000))
    clock = FakeClock()
    flaky = FlakyDirSync(failures=1)
    stats = WriterStats()
    w = Writer(root, queue, flush_interval_s=0.05, flush_max_rows=1000, compression="zstd",
               clock=clock, stats=stats, instance="i", fsync_dir=flaky)
    w.open()
    task = asyncio.create_task(w.run())
    out = Output("f", "binance")
    out.trades = trades(1, 2, 3)
    out.last_seq = 3
    queue.put_nowait(out)
    await wait_for(lambda: flaky.failures == 0 and not w.inflight, clock)
    # The file is visible: its rows count as written, once, and are not buffered again.
    assert stored_seqs(root) == [1, 2, 3]
    assert stats.rows_written["trades"] == 3 and stats.files_written == 1
    assert w.batcher.buffered_rows == 0
    # Not durable yet: the state is visible, and the journal keeps the rows' frames.
    assert stats.dir_fsync_failures == 1 and stats.unsynced_dirs == 1 and not stats.healthy
    assert w.committed_below() == {"i/f": 1}
    # The retry syncs the directory only - no second file.
    await wait_for(lambda: stats.unsynced_dirs == 0, clock)
    assert stats.healthy and w.committed_below() == {"i/f": 4}  # all of it committed
    queue.put_nowait(STOP)
    await asyncio.wait_for(task, 10)
    assert stored_seqs(root) == [1, 2, 3]
    assert stats.rows_written["trades"] == 3 and stats.files_written == 1
    assert len(list((root / "trades").rglob("*.parquet"))) == 1


# ---- item 13: the rejects directory stays within its budget -------------------------------
def rejects_on_disk(root: Path) -> dict[Path, int]:
    base = root / REJECTS_DIR
    return {p: p.stat().st_size for p in base.rglob("*.jsonl")} if base.exists() else {}


def frames_on_disk(root: Path) -> list[str]:
    import orjson

    return [orjson.loads(line)["frame"] for p in sorted(rejects_on_disk(root))
            for line in p.read_bytes().splitlines()]


def test_rejects_directory_keeps_its_budget_oldest_files_first(tmp_path: Path) -> None:
    budget = 4096
    store = RejectsStore(tmp_path, max_bytes=budget)
    day_ns = 86_400 * NS
    written: list[str] = []
    deleted = 0
    for i in range(40):
        # The first writes land on an earlier date: that partition empties and goes.
        ts = T0_NS + (0 if i < 5 else day_ns)
        batch = [Reject("f", "binance", ts, "JSONDecodeError: bad", b"{garbage %03d-%d" % (i, k)
                        + b"x" * 120) for k in range(3)]
        written += [r.frame.decode() for r in batch]
        done = store.write(batch, now_ns=T0_NS + i)
        deleted += done.deleted_files
        on_disk = rejects_on_disk(tmp_path)
        assert sum(on_disk.values()) == done.total_bytes <= budget
    assert sum(len(f) for f in written) > 3 * budget   # far more than the budget was written
    kept = frames_on_disk(tmp_path)
    # Whole files were deleted oldest first: what is left is the newest frames, in order.
    assert kept == written[len(written) - len(kept):]
    assert written[-1] in kept and written[0] not in kept
    assert deleted > 0
    # Files are appended to until 1/16 of the budget, so their number stays small.
    assert len(rejects_on_disk(tmp_path)) <= 17
    dates = {p.parent.name for p in rejects_on_disk(tmp_path)}
    assert dates == {"date=2023-11-15"}
    assert not (tmp_path / REJECTS_DIR / "exchange=binance" / "date=2023-11-14").exists()
    # Another store on the same root (a restart, another process) counts what is there.
    again = RejectsStore(tmp_path, max_bytes=budget)
    done = again.write([Reject("f", "binance", T0_NS + day_ns, "x", b"{y" * 200)], T0_NS + 99)
    assert sum(rejects_on_disk(tmp_path).values()) == done.total_bytes <= budget


def written(stats: WriterStats, n: int) -> Callable[[], bool]:
    return lambda: stats.rejects_written == n


async def test_writer_counts_rejects_deleted_for_the_budget(tmp_path: Path) -> None:
    from ingestd.metrics import exposition, registry_for
    from ingestd.stats import daemon_snapshot

    root = tmp_path / "root"
    root.mkdir()
    qstats = QueueStats(1000)
    queue = MessageQueue(1000, qstats)
    clock = FakeClock()
    stats = WriterStats()
    w = Writer(root, queue, flush_interval_s=0.05, flush_max_rows=1000, compression="zstd",
               clock=clock, stats=stats, rejects_max_bytes=2048)
    w.open()
    task = asyncio.create_task(w.run())
    for i in range(30):
        out = Output("f", "binance")
        out.raw_rejects = [Reject("f", "binance", T0_NS, "JSONDecodeError: bad",
                                  b"{junk %d" % i + b"z" * 200)]
        queue.put_nowait(out)
        clock.wall_ns += 1
        await wait_for(written(stats, i + 1), clock)
        assert sum(rejects_on_disk(root).values()) == stats.rejects_bytes <= 2048
    queue.put_nowait(STOP)
    await asyncio.wait_for(task, 10)
    assert stats.rejects_deleted > 0 and stats.rejects_lost == 0
    assert frames_on_disk(root)[-1].startswith("{junk 29")
    snap = daemon_snapshot(state="ok", now_mono=clock.mono, loop_lag_s=0.0, loop_lag_max_s=0.0,
                           feeds=[], queue=qstats, writer=stats, journal=None)
    families = {f.name: f for f in text_string_to_metric_families(
        exposition(registry_for(lambda: snap)).decode())}
    [sample] = [s for s in families["ingestd_rejects_deleted"].samples
                if s.name == "ingestd_rejects_deleted_total"]
    assert sample.value == stats.rejects_deleted


async def test_a_later_commit_into_the_same_directory_makes_it_durable(tmp_path: Path) -> None:
    """A directory sync that works covers every earlier rename into that directory: the
    next commit there ends the not-durable state, still without a second copy."""
    root = tmp_path / "root"
    root.mkdir()
    queue = MessageQueue(1000, QueueStats(1000))
    clock = FakeClock()
    flaky = FlakyDirSync(failures=1)
    stats = WriterStats()
    w = Writer(root, queue, flush_interval_s=0.05, flush_max_rows=1000, compression="zstd",
               clock=clock, stats=stats, instance="i", fsync_dir=flaky)
    w.open()
    task = asyncio.create_task(w.run())
    first = Output("f", "binance")
    first.trades, first.last_seq = trades(1, 2), 2
    queue.put_nowait(first)
    await wait_for(lambda: stats.unsynced_dirs == 1 and not w.inflight, clock)
    retry_due = clock.mono + 0.5 - 0.1   # the retry is 0.5 s after the failure (or later)
    second = Output("f", "binance")
    second.trades, second.last_seq = trades(3), 3
    queue.put_nowait(second)
    # The next commit lands before the directory retry is due: the clock moves past the
    # flush interval once, then stands still while the commit runs.
    await asyncio.sleep(0.05)
    clock.mono += 0.06
    await wait_for(lambda: stats.files_written == 2, clock, step_s=0.0)
    assert clock.mono < retry_due and flaky.calls.count(flaky.calls[-1]) == 2
    assert stats.unsynced_dirs == 0 and stats.healthy
    assert w.committed_below() == {"i/f": 4}
    queue.put_nowait(STOP)
    await asyncio.wait_for(task, 10)
    assert stored_seqs(root) == [1, 2, 3] and stats.rows_written["trades"] == 3
