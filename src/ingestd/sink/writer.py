"""The writer task: drains the queue into the batcher and commits Parquet off the loop.

Owns: consuming queue items (the blocks of one socket read or REST answer of one feed,
taken all at once), the flush timer, handing due
batches to a single worker thread (so commits of one process are serialized and the loop
never blocks on encoding or fsync), retrying failed commits with backoff without losing
or reordering rows, keeping rejected frames raw under `<root>/.rejects/`, and the drain
at shutdown.

Must not: parse frames, or block the event loop (all file I/O happens in the worker).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import structlog

from ingestd.clock import Clock
from ingestd.exchanges.base import Output
from ingestd.feed.intake import MessageQueue
from ingestd.schema import Block
from ingestd.sink.batcher import NS_PER_DAY, Batch, Batcher, PartitionKey, day_to_date
from ingestd.sink.parquet import Committed, Staging, commit, to_arrow
from ingestd.stats import WriterStats
from ingestd.trace import from_env as trace_from_env

log = structlog.get_logger("ingestd.writer")

REJECTS_DIR = ".rejects"
MAX_INFLIGHT_COMMITS = 4
# A buffer's newest rows are converted to Arrow ahead of its commit in parts this big.
CONVERT_ROWS = 8192
# Conversions queued for the writer's thread before the writer stops taking items (the
# queue then applies backpressure): bounds the rows held as Python objects.
MAX_PENDING_CONVERSIONS = 4
RETRY_MIN_S = 0.5
RETRY_MAX_S = 30.0


@dataclass(frozen=True, slots=True)
class Reject:
    """A frame a codec could not decode, kept raw for inspection."""

    feed: str
    exchange: str
    ts_recv_ns: int
    reason: str
    frame: bytes




def write_rejects(root: Path, rejects: list[Reject]) -> None:
    """Append rejected frames as JSON lines (blocking; worker thread)."""
    by_dir: dict[Path, list[bytes]] = {}
    for r in rejects:
        date = day_to_date(r.ts_recv_ns // NS_PER_DAY)
        d = root / REJECTS_DIR / f"exchange={r.exchange}" / f"date={date}"
        try:
            text: dict[str, Any] = {"frame": r.frame.decode("utf-8")}
        except UnicodeDecodeError:
            text = {"frame_b64": base64.b64encode(r.frame).decode()}
        line = orjson.dumps({"feed": r.feed, "ts_recv": r.ts_recv_ns, "reason": r.reason,
                             **text}) + b"\n"
        by_dir.setdefault(d, []).append(line)
    for d, lines in by_dir.items():
        d.mkdir(parents=True, exist_ok=True)
        with open(d / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl", "ab") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())


class Writer:
    def __init__(self, root: Path, queue: MessageQueue, *, flush_interval_s: float,
                 flush_max_rows: int, compression: str, clock: Clock,
                 stats: WriterStats | None = None, instance: str = "") -> None:
        self.root = root
        self.queue = queue
        self.clock = clock
        self.compression = compression
        self.stats = stats or WriterStats()
        self.batcher = Batcher(flush_interval_s, flush_max_rows)
        self.staging = Staging(root)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="ingestd-writer")
        self._inflight: set[asyncio.Future[Any]] = set()
        self._inflight_batches: dict[asyncio.Future[Any], Batch] = {}
        # Feed key (journal instance/feed) -> highest recv_seq taken off the queue.
        self.instance = instance
        self.consumed_seq: dict[str, int] = {}
        self._feed_keys: dict[str, str] = {}
        self.trace = trace_from_env()
        self._rejects: list[Reject] = []
        self._retry_at_mono = 0.0
        self._retry_delay_s = RETRY_MIN_S
        self._tick_s = min(0.05, flush_interval_s / 4)
        self._commit_s_ewma = 0.0    # how long a commit takes lately (s)
        self._max_buffered = max(2 * flush_max_rows, 100_000)
        self._conversions: list[concurrent.futures.Future[Any]] = []
        self._idle = asyncio.Event()
        self.stale_staging_removed = 0

    # ---- lifecycle -------------------------------------------------------------------------
    def open(self) -> None:
        """Blocking start-up work (before the loop serves): staging dir, leftovers."""
        self.stale_staging_removed = self.staging.open()

    async def run(self) -> None:
        """Consume until STOP, then commit everything buffered and return."""
        ticker = asyncio.create_task(self._tick(), name="writer-ticker")
        try:
            await self._consume()
        finally:
            ticker.cancel()
        await self._drain()

    async def _consume(self) -> None:
        q = self.queue
        while True:
            items = await q.get_all()
            for item in items:
                if item is None:
                    return
                self._accept(item)
            self.stats.last_progress_mono = self.clock.monotonic()
            if len(self._inflight) >= MAX_INFLIGHT_COMMITS:
                await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)
            conversions = self._conversions
            if len(conversions) > MAX_PENDING_CONVERSIONS:
                conversions[:] = [f for f in conversions if not f.done()]
                while len(conversions) > MAX_PENDING_CONVERSIONS:
                    await asyncio.wrap_future(conversions.pop(0))
            while self.batcher.buffered_rows > self._max_buffered:
                # Commits are failing: stop taking rows so the queue applies backpressure.
                await asyncio.sleep(self._tick_s)
                self._flush_due(force=True)

    def _accept(self, out: Output) -> None:
        if out.raw_rejects:
            self._rejects.extend(out.raw_rejects)
        now = self.clock.monotonic()
        feed = out.feed
        key = self._feed_keys.get(feed)
        if key is None:
            key = self._feed_keys[feed] = f"{self.instance}/{feed}"
        exchange = out.exchange
        # Usually one table per read: test each, call the shared step only for those
        # that have rows.
        if out.trades:
            self._add(out.trades, exchange, now, key)
        if out.quotes:
            self._add(out.quotes, exchange, now, key)
        if out.book:
            self._add(out.book, exchange, now, key)
        if out.events:
            self._add(out.events, exchange, now, key)
        top = out.last_seq
        consumed = self.consumed_seq
        if top > consumed.get(key, 0):
            consumed[key] = top
        if self.trace is not None:
            self.trace.accepted(top)
        self.stats.buffered_rows = self.batcher.buffered_rows

    def _add(self, block: Block, exchange: str, now: float, key: str) -> None:
        batcher = self.batcher
        full = batcher.add(block.TABLE, exchange, block, now, key)
        if full is not None:
            self._start_commit(full.key)
            return
        buf = batcher.last
        if buf is not None and buf.block_rows >= CONVERT_ROWS:
            # Convert the buffer's newest rows now, in the writer's thread: Arrow holds
            # them in a fifth of the memory, and the commit has less left to do.
            fut = self._executor.submit(to_arrow, block.TABLE, exchange, buf.take_blocks())
            buf.converted.append(fut)
            self._conversions.append(fut)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self._tick_s)
            self._flush_due()
            self.stats.last_progress_mono = self.clock.monotonic()

    def _flush_due(self, force: bool = False) -> None:
        now = self.clock.monotonic()
        if now < self._retry_at_mono:
            return
        # Flush early by the tick and the recent commit time: `flush_interval_s` is the
        # max age of a buffered row before it is committed, not the age at which its
        # commit starts.
        lead_s = min(self.batcher.flush_interval_s / 2, self._tick_s + self._commit_s_ewma)
        keys = self.batcher.partitions() if force else self.batcher.due(now, lead_s)
        for key in keys:
            self._start_commit(key)
        if self._rejects:
            rejects, self._rejects = self._rejects, []
            fut = asyncio.get_running_loop().run_in_executor(
                self._executor, write_rejects, self.root, rejects)
            self._inflight.add(fut)
            count = len(rejects)
            fut.add_done_callback(lambda f: self._rejects_done(f, count))

    def _rejects_done(self, fut: asyncio.Future[None], n: int) -> None:
        self._inflight.discard(fut)
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            log.error("rejects_write_failed", error=str(exc), count=n)
        else:
            self.stats.rejects_written += n

    def _start_commit(self, key: PartitionKey) -> None:
        if self.clock.monotonic() < self._retry_at_mono:
            return
        batch = self.batcher.take(key)
        started = self.clock.monotonic()
        fut = asyncio.get_running_loop().run_in_executor(
            self._executor, commit, self.root, self.staging.path, batch, self.compression)
        self._inflight.add(fut)
        self._inflight_batches[fut] = batch
        fut.add_done_callback(lambda f: self._commit_done(f, batch, key, started))

    def _commit_done(self, fut: asyncio.Future[Committed], batch: Batch, key: PartitionKey,
                     started_mono: float) -> None:
        self._inflight.discard(fut)
        self._inflight_batches.pop(fut, None)
        now = self.clock.monotonic()
        st = self.stats
        exc = None if fut.cancelled() else fut.exception()
        if fut.cancelled() or exc is not None:
            # Nothing became visible: put the rows back (in order) and retry later.
            self.batcher.restore(batch, key, now)
            st.flush_errors += 1
            st.healthy = False
            st.last_error = f"{type(exc).__name__}: {exc}" if exc else "cancelled"
            self._retry_at_mono = now + self._retry_delay_s
            log.error("commit_failed", table=batch.table, exchange=batch.exchange,
                      rows=batch.rows, error=st.last_error,
                      retry_in_s=round(self._retry_delay_s, 3))
            self._retry_delay_s = min(RETRY_MAX_S, self._retry_delay_s * 2)
            return
        done = fut.result()
        if self.trace is not None:
            self.trace.committed(str(done.path))
        if not st.healthy:
            log.info("commit_recovered", table=batch.table, exchange=batch.exchange)
        st.healthy = True
        self._retry_delay_s = RETRY_MIN_S
        st.rows_written[batch.table] += done.rows
        st.files_written += 1
        st.bytes_written += done.bytes
        st.last_commit_mono = now
        st.flush_seconds_total += now - started_mono
        st.observe_flush(now - started_mono)
        self._commit_s_ewma += 0.2 * ((now - started_mono) - self._commit_s_ewma)
        st.buffered_rows = self.batcher.buffered_rows

    async def _drain(self) -> None:
        """Commit every buffered row; keeps retrying failed commits until cancelled."""
        while True:
            self._retry_at_mono = min(self._retry_at_mono, self.clock.monotonic())
            self._flush_due(force=True)
            if self._inflight:
                await asyncio.wait(set(self._inflight))
            if not self.batcher.buffered_rows and not self._inflight and not self._rejects:
                break
            await asyncio.sleep(self._retry_delay_s)
        self._executor.shutdown(wait=False)  # nothing is pending any more
        self.staging.close()
        if self.trace is not None:
            self.trace.dump()

    def committed_below(self) -> dict[str, int | None]:
        """Per feed key, the lowest recv_seq not yet committed (None: everything taken off
        the queue so far is committed). Rows still in the queue have higher values than
        `consumed_seq` (the intake keeps each feed's order)."""
        low: dict[str, int | None] = {}
        pending = self.batcher.lowest_seq()
        for batch in self._inflight_batches.values():
            for feed, (lo, _) in batch.coverage.items():
                if lo < pending.get(feed, lo + 1):
                    pending[feed] = lo
        for feed, consumed in self.consumed_seq.items():
            low[feed] = pending.get(feed, consumed + 1)
        return low

    @property
    def inflight(self) -> int:
        return len(self._inflight)
