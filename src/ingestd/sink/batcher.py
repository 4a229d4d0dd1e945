"""Buffers blocks per (table, exchange, UTC date) and decides when a buffer is due.

Owns: the in-memory buffers of columnar blocks between the queue and Parquet (a buffer
is a list of blocks, never rows), the flush policy (row limit or age, age measured on an
injected monotonic clock), the partition date of a row (the UTC date of its `ts_recv`:
a block that spans midnight is split), and the exact recv_seq coverage of each buffer.

Must not: do I/O or touch asyncio; it is driven by sink/writer.py.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ingestd.schema import Block

NS_PER_DAY = 86_400 * 1_000_000_000

PartitionKey = tuple[str, str, int]  # (table, exchange, day number since the epoch)


def day_to_date(day: int) -> str:
    return datetime.fromtimestamp(day * 86_400, tz=UTC).strftime("%Y-%m-%d")


# Which rows a buffer (and the file it becomes) holds: feed key -> [min_seq, max_seq].
# Rows of one feed reach one partition in recv_seq order, so the interval is exact: every
# row of that feed, table and partition with a recv_seq inside it is in this buffer.
Coverage = dict[str, list[int]]


# A part of a buffer already converted to Arrow by the writer's thread (the writer keeps
# Python rows only for the newest part: ~5x less memory than rows as Python objects).
Converted = Future[Any]


@dataclass(slots=True)
class Buffer:
    key: PartitionKey
    opened_mono: float
    first_ts_recv_ns: int = 0
    converted: list[Converted] = field(default_factory=list)  # oldest parts, in order
    blocks: list[Block] = field(default_factory=list)         # the newest rows, in order
    rows: int = 0
    block_rows: int = 0
    coverage: Coverage = field(default_factory=dict)

    def take_blocks(self) -> list[Block]:
        blocks, self.blocks, self.block_rows = self.blocks, [], 0
        return blocks


@dataclass(slots=True)
class Batch:
    """A buffer taken out for commit: converted parts, then blocks, of one table,
    exchange and date, in recv_seq order."""

    table: str
    exchange: str
    date: str
    blocks: list[Block]
    rows: int
    coverage: Coverage = field(default_factory=dict)
    converted: list[Converted] = field(default_factory=list)
    first_ts_recv_ns: int = 0


class Batcher:
    def __init__(self, flush_interval_s: float, flush_max_rows: int) -> None:
        self.flush_interval_s = flush_interval_s
        self.flush_max_rows = flush_max_rows
        self._buffers: dict[PartitionKey, Buffer] = {}
        self.buffered_rows = 0
        self.last: Buffer | None = None   # the buffer the last `add` appended to

    def add(self, table: str, exchange: str, block: Block, now_mono: float,
            feed_key: str = "") -> Buffer | None:
        """Append a block (of one feed, in recv_seq order); return the buffer if it
        reached the row limit (the caller takes it)."""
        ts = block.ts_recv  # type: ignore[attr-defined]
        first_day = min(ts) // NS_PER_DAY
        last_day = max(ts) // NS_PER_DAY
        if first_day != last_day:
            by_day: dict[int, list[int]] = {}
            for i, t in enumerate(ts):
                by_day.setdefault(t // NS_PER_DAY, []).append(i)
            full = None
            for idx in by_day.values():
                full = self.add(table, exchange, block.take(idx), now_mono, feed_key) or full
            return full
        key = (table, exchange, first_day)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = Buffer(key, now_mono, ts[0])
        self.last = buf
        n = len(block)
        blocks = buf.blocks
        if blocks:
            # One open block per buffer part: small reads are joined here, so the writer
            # thread converts long columns (the rows keep their order).
            blocks[-1].extend(block)
        else:
            blocks.append(block)
        buf.rows += n
        buf.block_rows += n
        seqs = block.recv_seq  # type: ignore[attr-defined]
        lo, hi = min(seqs[0], seqs[-1]), max(seqs[0], seqs[-1])
        cov = buf.coverage.get(feed_key)
        if cov is None:
            buf.coverage[feed_key] = [lo, hi]
        else:
            if lo < cov[0]:
                cov[0] = lo
            if hi > cov[1]:
                cov[1] = hi
        self.buffered_rows += n
        return buf if buf.rows >= self.flush_max_rows else None

    def take(self, key: PartitionKey) -> Batch:
        buf = self._buffers.pop(key)
        self.buffered_rows -= buf.rows
        table, exchange, day = key
        return Batch(table, exchange, day_to_date(day), buf.blocks, buf.rows, buf.coverage,
                     buf.converted, buf.first_ts_recv_ns)

    def lowest_seq(self) -> dict[str, int]:
        """Per feed key, the lowest recv_seq still buffered."""
        low: dict[str, int] = {}
        for buf in self._buffers.values():
            for feed, (lo, _) in buf.coverage.items():
                if lo < low.get(feed, lo + 1):
                    low[feed] = lo
        return low

    def due(self, now_mono: float, lead_s: float = 0.0) -> list[PartitionKey]:
        """Keys of buffers that must be handed to commit now, oldest first: those older
        than the flush interval minus `lead_s` (the time the caller needs until the file
        is visible), so no row waits longer than the interval to be committed."""
        limit = now_mono - max(0.0, self.flush_interval_s - lead_s)
        due = [b for b in self._buffers.values() if b.opened_mono <= limit]
        due.sort(key=lambda b: b.opened_mono)
        return [b.key for b in due]

    def partitions(self) -> list[PartitionKey]:
        return sorted(self._buffers, key=lambda k: self._buffers[k].opened_mono)

    def next_deadline(self) -> float | None:
        if not self._buffers:
            return None
        return min(b.opened_mono for b in self._buffers.values()) + self.flush_interval_s

    def restore(self, batch: Batch, key: PartitionKey, now_mono: float) -> None:
        """Put a batch whose commit failed back in front of anything buffered since."""
        buf = self._buffers.get(key)
        if buf is None:
            self._buffers[key] = Buffer(
                key, now_mono, batch.first_ts_recv_ns, list(batch.converted),
                list(batch.blocks), batch.rows, batch.rows,
                {k: list(v) for k, v in batch.coverage.items()})
        else:
            # The failed batch's rows come first: its converted parts, then its blocks
            # (as one more part, converted at commit time), then the newer buffer's.
            buf.converted[:0] = [*batch.converted, *_as_converted(batch.blocks)]
            buf.first_ts_recv_ns = batch.first_ts_recv_ns
            buf.rows += batch.rows
            buf.opened_mono = min(buf.opened_mono, now_mono)
            for feed, (lo, hi) in batch.coverage.items():
                cov = buf.coverage.setdefault(feed, [lo, hi])
                cov[0], cov[1] = min(cov[0], lo), max(cov[1], hi)
        self.buffered_rows += batch.rows


def _as_converted(blocks: list[Block]) -> list[Converted]:
    """Blocks wrapped as an already-resolved part (converted at commit time)."""
    if not blocks:
        return []
    fut: Converted = Future()
    fut.set_result(list(blocks))
    return [fut]
