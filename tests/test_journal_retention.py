"""Journal retention never deletes a segment ahead of its rows, and never pins one for ever.

The pipeline here is the daemon's own parts on loopback - a Journal, the queue, the Writer
and a FeedReader (its public `ingest`, or a real session against the simulator) - with
retention asked exactly as the daemon asks it (`ingestd.daemon.committed_below`). Segment
rotation is driven by the journal's injected clock.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import polars as pl
from aiohttp import web

from ingestd.clock import SYSTEM_CLOCK
from ingestd.config import FeedConfig
from ingestd.daemon import committed_below
from ingestd.feed.intake import STOP, Intake, MessageQueue
from ingestd.feed.reader import FeedReader
from ingestd.sim import SimServer
from ingestd.sink.batcher import NS_PER_DAY, day_to_date
from ingestd.sink.journal import REST, Journal, iter_segments, read_segment
from ingestd.sink.parquet import Staging
from ingestd.sink.recovery import recover
from ingestd.sink.writer import Writer
from ingestd.stats import QueueStats, WriterStats
from tests.support import make_config, read_table, recorded_frames

DAY_NS = NS_PER_DAY


class StepClock:
    """Wall time shifted by `wall_offset_ns`; monotonic time the test moves forward."""

    def __init__(self, wall_offset_ns: int = 0) -> None:
        self.wall_offset_ns = wall_offset_ns
        self.offset_s = 0.0

    def time_ns(self) -> int:
        return time.time_ns() + self.wall_offset_ns

    def monotonic(self) -> float:
        return time.monotonic() + self.offset_s


async def until(cond: Callable[[], bool], timeout_s: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not cond():
        if loop.time() > end:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.01)


class Pipeline:
    """Journal -> reader -> queue -> writer, as the daemon wires them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.jclock = StepClock()
        self.journal = Journal(root, fsync_interval_s=0.02, clock=self.jclock,
                               segment_max_s=3600.0)
        self.journal.open()
        self.journal.start()
        qstats = QueueStats(100_000)
        self.queue = MessageQueue(100_000, qstats)
        self.intake = Intake(self.queue, "block", qstats)
        self.wstats = WriterStats()
        self.writer = Writer(root, self.queue, flush_interval_s=0.05, flush_max_rows=100_000,
                             compression="zstd", clock=SYSTEM_CLOCK, stats=self.wstats,
                             instance=self.journal.instance)
        self.writer.open()
        self.readers: dict[str, FeedReader] = {}
        self._writer_task: asyncio.Task[None] | None = None

    def reader(self, feed: FeedConfig, clock: Any = SYSTEM_CLOCK) -> FeedReader:
        r = FeedReader(feed, self.intake, clock=clock, journal=self.journal)
        self.readers[feed.name] = r
        return r

    def start_writer(self) -> None:
        self._writer_task = asyncio.create_task(self.writer.run())

    def all_committed(self) -> bool:
        return (self.queue.qsize() == 0 and not self.wstats.buffered_rows
                and self.writer.inflight == 0)

    async def rotate(self) -> None:
        """Start a new segment (the flush loop does it once the clock says it is due)."""
        before = len(iter_segments(self.journal.dir))
        self.jclock.offset_s += 10_000.0
        await until(lambda: len(iter_segments(self.journal.dir)) > before)

    def deletable(self) -> list[Path]:
        low = committed_below(self.writer, self.journal, self.readers)
        return [s.path for s in self.journal.deletable(low)]

    async def close(self) -> None:
        for r in self.readers.values():
            r.stop()
            if r.task is not None:
                await r.task
        if self._writer_task is not None:
            self.queue.put_nowait(STOP)
            await self._writer_task
        await self.journal.close(removable=True)


def trade_feed(root: Path, symbols: list[str]) -> FeedConfig:
    return make_config(root, [{"name": "spot", "exchange": "binance", "symbols": symbols,
                               "channels": ["trades"], "trade_stream": "aggTrade"}]).feeds[0]


async def test_rows_waiting_in_the_queue_keep_their_segment(tmp_path: Path) -> None:
    """A feed the writer has taken nothing of yet has no commit watermark: that must read
    as "everything pending", not "nothing pending"."""
    p = Pipeline(tmp_path / "data")
    reader = p.reader(trade_feed(p.root, ["ZILUSDT", "DENTUSDT"]))
    frames = list(recorded_frames("binance_spot", "aggTrade.jsonl"))
    for i in range(0, 40, 4):
        reader.ingest(time.time_ns(), frames[i:i + 4])
    assert p.queue.qsize() > 0 and p.writer.consumed_seq == {}
    await p.rotate()
    assert p.deletable() == [], "a segment whose rows wait in the queue was deletable"

    p.start_writer()
    await until(lambda: p.wstats.files_written > 0 and p.all_committed())
    first = iter_segments(p.journal.dir)[0]
    assert p.deletable() == [first]
    await p.close()


async def test_rows_of_a_feed_removed_by_a_reload_keep_their_segment(tmp_path: Path) -> None:
    """A reload stops a feed (its reader is gone) while its last rows still wait in the
    queue: the journal's watermark of that feed stands in for the reader's."""
    p = Pipeline(tmp_path / "data")
    reader = p.reader(trade_feed(p.root, ["ZILUSDT", "DENTUSDT"]))
    frames = list(recorded_frames("binance_spot", "aggTrade.jsonl"))
    for i in range(0, 20, 4):
        reader.ingest(time.time_ns(), frames[i:i + 4])
    del p.readers["spot"]          # what the daemon's reload does with a removed feed
    p.journal.unregister("spot")
    await p.rotate()
    assert p.deletable() == [], "a removed feed's queued rows lost their segment"
    p.start_writer()
    await until(lambda: p.wstats.files_written > 0 and p.all_committed())
    assert p.deletable() == iter_segments(p.journal.dir)[:1]
    await p.close()


async def test_frames_without_rows_do_not_pin_the_journal(tmp_path: Path) -> None:
    """Once every row is committed, a segment whose frames produced no rows (here another
    symbol's trades, dropped; in production heartbeats) can go: a quiet feed must not
    keep every later segment on disk for ever."""
    p = Pipeline(tmp_path / "data")
    reader = p.reader(trade_feed(p.root, ["ZILUSDT", "DENTUSDT"]))
    p.start_writer()
    frames = list(recorded_frames("binance_spot", "aggTrade.jsonl"))
    rows = [f for f in frames if orjson.loads(f)["data"]["s"] != "MANAUSDT"]
    rowless = [f for f in frames if orjson.loads(f)["data"]["s"] == "MANAUSDT"]
    assert rows and rowless
    for i in range(0, 20, 4):
        reader.ingest(time.time_ns(), rows[i:i + 4])
    await until(lambda: p.wstats.files_written > 0 and p.all_committed())
    await p.rotate()
    for i in range(0, 12, 3):
        out = reader.ingest(time.time_ns(), rowless[i:i + 3])
        assert not out.has_rows
    await p.rotate()
    segments = iter_segments(p.journal.dir)
    assert len(segments) == 3
    assert p.deletable() == segments[:2]
    await p.close()


class GatedRest:
    """A loopback REST endpoint answering Binance depth requests with a recorded snapshot,
    each only once the test opens the gate."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.gate = asyncio.Event()
        self.asked = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _depth(self, request: web.Request) -> web.Response:
        self.asked.set()
        await self.gate.wait()
        return web.Response(body=self.body, content_type="application/json")

    async def __aenter__(self) -> GatedRest:
        app = web.Application()
        app.router.add_get("/api/v3/depth", self._depth)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.gate.set()
        if self._runner is not None:
            await self._runner.cleanup()


def book_rows(root: Path) -> pl.DataFrame:
    df = read_table(root, "book")
    return df.drop("date").sort("recv_seq", "side", "price")


async def test_a_segment_ending_in_a_rest_snapshot_waits_for_its_released_diffs(
        tmp_path: Path) -> None:
    """A REST snapshot releases the diffs buffered before it with recv_seq values above
    the snapshot record's own. With the segment boundary right after that record, the
    snapshot's rows committed and the released diffs not yet (here: they belong to an
    earlier day's partition, whose directory is blocked by a file), the segment must stay:
    a crash at that moment, recovered, must give the same book as no crash."""
    root = tmp_path / "data"
    # The reader's clock runs 3 days ahead: the snapshot record (and its rows) is dated
    # then, while the released diffs keep the receive time of their frames (today).
    reader_clock = StepClock(wall_offset_ns=3 * DAY_NS)
    blocked = root / "book" / "exchange=binance"
    blocked.mkdir(parents=True)
    today = time.time_ns() // DAY_NS
    for day in (today, today + 1):
        (blocked / f"date={day_to_date(day)}").write_bytes(b"in the way")
    snapshot = recorded_frames("binance_spot", "depth_snapshot_rest.jsonl")[0]  # NKNUSDT
    async with SimServer("binance") as sim, GatedRest(snapshot) as rest:
        venue: Any = sim.venue
        diffs = sum(len(v) for k, v in venue.by_stream.items() if k.startswith("nknusdt@depth"))
        feed = make_config(root, [{"name": "books", "exchange": "binance", "url": sim.url,
                                   "rest_url": rest.url, "symbols": ["NKNUSDT"],
                                   "channels": ["book"]}]).feeds[0]
        p = Pipeline(root)
        p.start_writer()
        reader = p.reader(feed, clock=reader_clock)
        acks = len(reader.codec.subscribe_messages())
        reader.start()
        await asyncio.wait_for(rest.asked.wait(), 15)
        await until(lambda: len(sim.sent) == diffs and reader.stats.messages == diffs + acks)
        assert reader.stats.rows["book"] == 0  # every diff is buffered, none released
        rest.gate.set()
        await until(lambda: reader.stats.rows["book"] > 0 and p.wstats.flush_errors > 0
                    and (root / "book" / "exchange=binance"
                         / f"date={day_to_date(today + 3)}").is_dir())
        await until(lambda: p.journal.stats.pending_bytes == 0)
        await p.rotate()

        rest_segment, rest_seq = next(
            (seg, rec.seq) for seg in iter_segments(p.journal.dir)
            for rec in read_segment(seg)[0] if rec.kind == REST)
        deletable = p.deletable()
        assert rest_segment not in deletable, \
            "the segment of a REST snapshot went before the diffs it released were committed"

        # A crash now: what the disk holds, after retention did what it may.
        await p.journal.delete_segments(p.journal.deletable(
            committed_below(p.writer, p.journal, p.readers)))
        await until(lambda: p.journal.stats.pending_bytes == 0)
        crashed = tmp_path / "crashed"
        shutil.copytree(root, crashed, ignore=shutil.ignore_patterns(".staging"))
        # The live run goes on: the way is cleared, everything gets committed.
        for day in (today, today + 1):
            (blocked / f"date={day_to_date(day)}").unlink()
        await until(lambda: p.all_committed() and p.wstats.healthy)
        await p.close()

    live = book_rows(root)
    released = live.filter(pl.col("recv_seq") > rest_seq)
    assert released.height > 0 and (released["is_snapshot"] == False).all()  # noqa: E712
    for day in (today, today + 1):
        (crashed / "book" / "exchange=binance" / f"date={day_to_date(day)}").unlink()
    staging = Staging(crashed)
    staging.open()
    result = recover(crashed, "zstd", staging.path)
    staging.close()
    assert result.journals == 1
    assert book_rows(crashed).equals(live)
