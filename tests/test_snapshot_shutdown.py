"""A REST snapshot answered while the queue is full (capacity 1, `block`) and a session
end or a shutdown right after: the snapshot block and the diffs it released are
committed - nothing the reader handed on is left behind in its outbox."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from ingestd.clock import SYSTEM_CLOCK
from ingestd.daemon import Daemon
from ingestd.exchanges.base import Output
from ingestd.feed.intake import Intake, MessageQueue
from ingestd.feed.reader import FeedReader
from ingestd.sim import Faults, SimServer
from ingestd.stats import QueueStats
from tests.exchanges.test_binance import SPOT_BOOK
from tests.support import feed_for, make_config, read_table

TABLES = ("trades", "quotes", "book", "events")
FLUSH_ROWS = 1


async def wait_until(cond: Any, timeout_s: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("drops", [False, True], ids=["shutdown", "session-ends"])
async def test_snapshots_and_released_diffs_survive_a_full_queue_at_stop(
        root: Path, drops: bool) -> None:
    # Fast: the queue of capacity 1 is full whenever the reader hands on. With `drops`,
    # the venue also ends every session after 40 frames (snapshots in flight).
    faults = Faults(close_every_n_frames=40) if drops else Faults()
    async with SimServer("binance", rate_msgs_s=400 if drops else None,
                         faults=faults) as sim:
        feed = feed_for(sim, name="books", symbols=SPOT_BOOK, channels=["book"],
                        reconnect_min_delay_s=0.01, reconnect_max_delay_s=0.02,
                        breaker_failures=1000)
        cfg = make_config(root, [feed], queue={"capacity": 1, "when_full": "block"},
                          storage={"flush_max_rows": FLUSH_ROWS})
        daemon = Daemon(cfg)
        task = asyncio.create_task(daemon.run(install_signals=False))
        try:
            # Stop right after the first snapshot answers were handed on (each releases
            # the diffs buffered while it was fetched), the queue still full.
            await wait_until(lambda: "books" in daemon.feed_stats
                             and len(sim.rest_requests) >= (8 if drops else 2)
                             and daemon.feed_stats["books"].rows["book"] > 0, 5)
            daemon.request_stop("test: stop with a full queue")
            assert await asyncio.wait_for(task, 30) == 0
        finally:
            if not task.done():
                daemon.request_stop("test cleanup")
                await asyncio.wait_for(task, 30)
    st = daemon.feed_stats["books"]
    assert not any(k.startswith("queue_full") for k in st.drops)
    assert not daemon.queue_stats.dropped
    # Every row handed on (counted when handed) is in Parquet: snapshot blocks, the
    # diffs they released, and every event - the last `disconnected` included.
    for table in TABLES:
        assert read_table(root, table).height == st.rows[table], table
    events = read_table(root, "events")
    kinds = events["event"].to_list()
    assert kinds.count("connected") == kinds.count("disconnected") == st.connects
    assert events.filter(pl.col("event") == "disconnected")["detail"].to_list()[-1] \
        == "shutdown"
    # Snapshot blocks are whole: each snapshot recv_seq has both sides.
    snaps = read_table(root, "book").filter(pl.col("is_snapshot"))
    assert snaps.height > 0
    sides = snaps.group_by("recv_seq").agg(pl.col("side").n_unique())
    assert (sides["side"] == 2).all()


async def test_a_stopped_reader_ends_only_once_its_outbox_reached_the_queue(
        root: Path) -> None:
    """The reader alone, the test playing a writer that falls behind: at stop, the
    reader's last rows (its `disconnected` event) meet a full queue; the task does not
    end before they are in the queue, and everything it counted as handed on - snapshot
    blocks, released diffs, events - is in what the queue delivered."""
    async with SimServer("binance", rate_msgs_s=None) as sim:
        cfg = make_config(root, [feed_for(sim, name="books", symbols=SPOT_BOOK,
                                          channels=["book"])])
        qstats = QueueStats(1)
        queue = MessageQueue(1, qstats)
        reader = FeedReader(cfg.feeds[0], Intake(queue, "block", qstats),
                            clock=SYSTEM_CLOCK)
        taken: list[Output] = []

        async def take() -> None:
            if queue.qsize():        # get_all() returns at once when something is queued
                taken.extend(i for i in await queue.get_all() if i is not None)

        reader.start()
        try:
            # Nobody consumes yet: a snapshot was handed on and waits in the outbox.
            await wait_until(lambda: reader.stats.rows["book"] > 0
                             and reader.outbox.pending > 0)
            reader.stop()
            events_before = reader.stats.rows["events"]
            # The writer catches up until the outbox is empty, then falls behind: the
            # last item the outbox moved stays in the queue.
            while reader.outbox.pending:
                await take()
                await asyncio.sleep(0)
            assert queue.qsize() > 0
            # The reader ends its session and hands on its `disconnected` event.
            await wait_until(lambda: reader.task is not None and (
                reader.task.done() or reader.stats.rows["events"] > events_before))
            assert reader.task is not None and not reader.task.done(), \
                "the reader ended with rows still in its outbox"
            assert reader.outbox.pending > 0
            while not reader.task.done():              # the writer catches up again
                await take()
                await asyncio.sleep(0.001)
            await take()
        finally:
            reader.stop()
            if reader.task is not None:
                while not reader.task.done():
                    await take()
                    await asyncio.sleep(0.001)
    assert reader.outbox.pending == 0
    got: dict[str, int] = {}
    for out in taken:
        for block in out.blocks():
            got[block.TABLE] = got.get(block.TABLE, 0) + len(block)
    assert got == {t: n for t, n in reader.stats.rows.items() if n}
    last = taken[-1].events
    assert last is not None and list(last.event)[-1] == "disconnected"
