"""The sink: batching by partition, atomic commits, staging hygiene, failure retry."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ingestd.exchanges.base import Output
from ingestd.feed.intake import STOP, MessageQueue
from ingestd.schema import SCHEMAS, EventsBlock, TradesBlock
from ingestd.sink.batcher import NS_PER_DAY, Batcher
from ingestd.sink.parquet import Staging, commit, to_arrow
from ingestd.sink.writer import Reject, Writer
from ingestd.stats import QueueStats


class FakeClock:
    def __init__(self) -> None:
        self.mono = 100.0
        self.wall_ns = 1_700_000_000_000_000_000

    def time_ns(self) -> int:
        return self.wall_ns

    def monotonic(self) -> float:
        return self.mono


def trade(ts: int, seq: int, tid: str = "1") -> tuple[object, ...]:
    return ("BTCUSDT", ts - 5, ts, seq, tid, "buy", 100.5, 0.25)


def block(*rows: tuple[object, ...]) -> TradesBlock:
    b = TradesBlock()
    for r in rows:
        b.add(*r)  # type: ignore[arg-type]
    return b


def test_batcher_partitions_by_utc_date_and_flushes_on_rows_or_age() -> None:
    b = Batcher(flush_interval_s=1.0, flush_max_rows=3)
    day = 19_000 * NS_PER_DAY
    assert b.add("trades", "binance", block(trade(day + 1, 1)), now_mono=10.0) is None
    # One block whose rows straddle midnight is split by row.
    b.add("trades", "binance", block(trade(day + NS_PER_DAY - 1, 2),
                                     trade(day + NS_PER_DAY, 3)), now_mono=10.5)
    assert sorted(k[2] for k in b.partitions()) == [19_000, 19_001]
    assert b.due(10.9) == [] and b.due(11.0) == [("trades", "binance", 19_000)]
    # With a lead (the time a commit takes), buffers are handed over early enough that no
    # row waits longer than the interval to be committed.
    assert b.due(10.85, lead_s=0.2) == [("trades", "binance", 19_000)]
    assert b.due(10.75, lead_s=0.2) == []
    full = b.add("trades", "binance", block(trade(day + 2, 4)), now_mono=10.6)
    assert full is not None and full.rows == 3
    batch = b.take(full.key)
    assert batch.date == "2022-01-08" and b.buffered_rows == 1


def test_to_arrow_matches_the_contract_schema() -> None:
    table = to_arrow("trades", "binance", [block(trade(1_700_000_000_000_000_000, 7))])
    assert table.schema == SCHEMAS["trades"]
    assert table.column("exchange").to_pylist() == ["binance"]
    assert table.column("ts_recv").cast("int64").to_pylist() == [1_700_000_000_000_000_000]
    ev = EventsBlock()
    ev.add(None, None, 5, 6, "f", "connected", None)
    events = to_arrow("events", "binance", [ev])
    assert events.column("symbol").to_pylist() == [None]
    # Many small blocks are joined into chunks and converted in bulk, in order.
    many = [block(trade(1_700_000_000_000_000_000 + i, i, str(i))) for i in range(5000)]
    t = to_arrow("trades", "binance", many)
    assert t.column("recv_seq").to_pylist() == list(range(5000))
    assert t.schema == SCHEMAS["trades"]


def test_commit_is_atomic_and_staging_is_per_process(tmp_path: Path) -> None:
    staging = Staging(tmp_path)
    staging.open()
    b = Batcher(1.0, 10)
    b.add("trades", "binance", block(trade(1_700_000_000_000_000_000, 1)), 0.0)
    done = commit(tmp_path, staging.path, b.take(b.partitions()[0]))
    assert done.path.parent == tmp_path / "trades" / "exchange=binance" / "date=2023-11-14"
    assert pq.read_table(done.path).num_rows == 1
    assert not list(staging.path.glob("*.tmp"))
    # A second process's live staging dir is left alone; a dead one's is removed.
    other = Staging(tmp_path)
    other.open()
    (other.path / "x.parquet.tmp").write_bytes(b"partial")
    dead = tmp_path / ".staging" / "deadbeef"
    dead.mkdir()
    (dead / "y.parquet.tmp").write_bytes(b"partial")
    third = Staging(tmp_path)
    assert third.open() == 1
    assert (other.path / "x.parquet.tmp").exists() and not dead.exists()
    for s in (staging, other, third):
        s.close()


def test_commit_rejects_unsafe_partition_values(tmp_path: Path) -> None:
    staging = Staging(tmp_path)
    staging.open()
    b = Batcher(1.0, 10)
    b.add("trades", "../../etc", block(trade(1_700_000_000_000_000_000, 1)), 0.0)
    with pytest.raises(ValueError, match="unsafe"):
        commit(tmp_path, staging.path, b.take(b.partitions()[0]))
    assert not list(tmp_path.rglob("*.parquet"))


async def test_writer_retries_a_failed_commit_without_losing_rows(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    queue = MessageQueue(1000, QueueStats(1000))
    clock = FakeClock()
    w = Writer(root, queue, flush_interval_s=0.05, flush_max_rows=1000, compression="zstd",
               clock=clock)
    w.open()
    task = asyncio.create_task(w.run())
    # Make the table directory unwritable by putting a file where it must go.
    (root / "trades").write_text("in the way")
    out = Output("f", "binance")
    out.trades = block(trade(clock.wall_ns, 1))
    out.raw_rejects = [Reject("f", "binance", clock.wall_ns, "JSONDecodeError", b"\xff garbage")]
    queue.put_nowait(out)
    for _ in range(200):
        clock.mono += 0.1
        await asyncio.sleep(0.01)
        if w.stats.flush_errors:
            break
    assert w.stats.flush_errors >= 1 and not w.stats.healthy
    assert w.batcher.buffered_rows == 1
    (root / "trades").unlink()
    clock.mono += 60
    for _ in range(200):
        await asyncio.sleep(0.01)
        clock.mono += 0.1
        if w.stats.rows_written["trades"]:
            break
    assert w.stats.rows_written["trades"] == 1 and w.stats.healthy
    queue.put_nowait(STOP)
    await asyncio.wait_for(task, 10)
    rejects = list((root / ".rejects").rglob("*.jsonl"))
    assert len(rejects) == 1 and b"frame_b64" in rejects[0].read_bytes()
    assert not [p for p in root.rglob("*.tmp")]
    assert os.listdir(root / ".staging") == []


def test_a_failed_batch_with_converted_parts_goes_back_in_front_in_order() -> None:
    """Parts converted ahead of the commit, then blocks: after a failed commit the batch
    returns ahead of rows buffered since, and the file keeps recv_seq order."""
    from concurrent.futures import Future

    from ingestd.sink.parquet import batch_table

    day = 19_000 * NS_PER_DAY
    b = Batcher(1.0, 10**6)
    for seq in range(1, 4):
        b.add("trades", "binance", block(trade(day + seq, seq)), 0.0, "k")
    buf = b.last
    assert buf is not None
    part: Future[object] = Future()
    part.set_result(to_arrow("trades", "binance", buf.take_blocks()))
    buf.converted.append(part)
    b.add("trades", "binance", block(trade(day + 4, 4)), 0.0, "k")
    key = b.partitions()[0]
    failed = b.take(key)
    b.add("trades", "binance", block(trade(day + 5, 5)), 1.0, "k")   # arrives meanwhile
    b.restore(failed, key, 2.0)
    again = b.take(key)
    assert again.rows == 5 and again.coverage == {"k": [1, 5]}
    assert batch_table(again).column("recv_seq").to_pylist() == [1, 2, 3, 4, 5]
