"""The writer task: drains the queue into the batcher and commits Parquet off the loop.

Commits go through a `publish.Publisher` (local Parquet, an object store, Delta): the
writer decides when and what, the publisher how and where. `root` is the local directory
of the writer's own state (`.rejects/`; staging when no publisher is given).

Owns: consuming queue items (the blocks of one socket read or REST answer of one feed,
taken all at once), the flush timer, handing due
batches to a single worker thread (so commits of one process are serialized and the loop
never blocks on encoding or fsync), retrying failed commits with backoff without losing
or reordering rows, retrying only the directory sync of a file that was published but
not made durable (its rows are never committed twice; the journal keeps them until the
sync succeeds), keeping rejected frames raw under `<root>/.rejects/` within a size budget
(oldest files deleted first, counted), and the drain at shutdown.

Must not: parse frames, or block the event loop (all file I/O happens in the worker).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import structlog

from ingestd.clock import Clock
from ingestd.exchanges.base import Output
from ingestd.feed.intake import MessageQueue
from ingestd.schema import Block
from ingestd.sink import fsutil
from ingestd.sink.batcher import (
    NS_PER_DAY,
    Batch,
    Batcher,
    Coverage,
    PartitionKey,
    day_to_date,
)
from ingestd.sink.parquet import Committed, PublishedNotDurable, to_arrow
from ingestd.sink.publish import LocalParquetPublisher, Publisher
from ingestd.stats import WriterStats
from ingestd.trace import from_env as trace_from_env

log = structlog.get_logger("ingestd.writer")

REJECTS_DIR = ".rejects"
REJECTS_MAX_BYTES = 64 * 1024 * 1024   # default budget of `<root>/.rejects/`
REJECTS_FILES_PER_BUDGET = 16          # a rejects file is rotated at 1/16 of the budget
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




@dataclass(frozen=True, slots=True)
class RejectsWritten:
    """What one `RejectsStore.write` did."""

    written: int          # rejected frames appended
    deleted_files: int    # files deleted (oldest first) to stay under the budget
    deleted_bytes: int
    total_bytes: int      # bytes under `.rejects/` afterwards


class RejectsStore:
    """`<root>/.rejects/exchange=<id>/date=<YYYY-MM-DD>/<created ns>-<pid>-<random>.jsonl`:
    rejected frames as JSON lines, at most `max_bytes` in all (blocking; worker thread).

    Each partition's current file is appended to until it holds `max_bytes /
    REJECTS_FILES_PER_BUDGET`, then a new one starts, so the directory holds a few dozen
    files, not one per write. When the total passes the budget, the directory is listed
    again (other processes write there too) and whole files are deleted, oldest first by
    name (names start with their creation time), until it fits.
    """

    def __init__(self, root: Path, max_bytes: int = REJECTS_MAX_BYTES) -> None:
        self.base = root / REJECTS_DIR
        self.max_bytes = max_bytes
        self.file_max_bytes = max(1, max_bytes // REJECTS_FILES_PER_BUDGET)
        self._current: dict[Path, tuple[Path, int]] = {}  # partition -> (file, its size)
        self._total_bytes: int | None = None              # None: not listed yet

    def write(self, rejects: list[Reject], now_ns: int) -> RejectsWritten:
        by_dir: dict[Path, list[bytes]] = {}
        for r in rejects:
            date = day_to_date(r.ts_recv_ns // NS_PER_DAY)
            d = self.base / f"exchange={r.exchange}" / f"date={date}"
            try:
                text: dict[str, Any] = {"frame": r.frame.decode("utf-8")}
            except UnicodeDecodeError:
                text = {"frame_b64": base64.b64encode(r.frame).decode()}
            line = orjson.dumps({"feed": r.feed, "ts_recv": r.ts_recv_ns, "reason": r.reason,
                                 **text}) + b"\n"
            by_dir.setdefault(d, []).append(line)
        if self._total_bytes is None:
            self._total_bytes = sum(size for _, _, size in self._listing())
        for d, lines in by_dir.items():
            data = b"".join(lines)
            cur = self._current.get(d)
            if cur is None or cur[1] >= self.file_max_bytes:
                path = d / f"{now_ns:019d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
                size = 0
            else:
                path, size = cur
            _append(path, data)
            self._current[d] = (path, size + len(data))
            self._total_bytes += len(data)
        deleted = freed = 0
        if self._total_bytes > self.max_bytes:
            deleted, freed = self._evict()
        return RejectsWritten(len(rejects), deleted, freed, self._total_bytes)

    def _listing(self) -> list[tuple[str, Path, int]]:
        """Every rejects file (of every process): (name, path, size), oldest first."""
        files = []
        for p in self.base.glob("exchange=*/date=*/*.jsonl"):
            try:
                files.append((p.name, p, p.stat().st_size))
            except FileNotFoundError:
                continue  # deleted meanwhile by another process
        files.sort()
        return files

    def _evict(self) -> tuple[int, int]:
        files = self._listing()
        total = sum(size for _, _, size in files)
        deleted = freed = 0
        for _, path, size in files:
            if total <= self.max_bytes:
                break
            total -= size
            cur = self._current.get(path.parent)
            if cur is not None and cur[0] == path:
                del self._current[path.parent]
            try:
                path.unlink()
            except FileNotFoundError:
                continue  # another process deleted it
            deleted += 1
            freed += size
            for d in (path.parent, path.parent.parent):
                try:
                    d.rmdir()  # only if empty
                except OSError:
                    break
        self._total_bytes = total
        return deleted, freed


def _append(path: Path, data: bytes) -> None:
    """Append and fsync; creates the partition directory if missing (or removed by an
    eviction in another process)."""
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class Writer:
    def __init__(self, root: Path, queue: MessageQueue, *, flush_interval_s: float,
                 flush_max_rows: int, compression: str, clock: Clock,
                 stats: WriterStats | None = None, instance: str = "",
                 fsync_dir: Callable[[Path], None] = fsutil.fsync_dir,
                 rejects_max_bytes: int = REJECTS_MAX_BYTES,
                 publisher: Publisher | None = None) -> None:
        self.root = root
        self.queue = queue
        self.clock = clock
        self.compression = compression
        self.fsync_dir = fsync_dir
        self.stats = stats or WriterStats()
        self.batcher = Batcher(flush_interval_s, flush_max_rows)
        self.publisher: Publisher = publisher if publisher is not None else \
            LocalParquetPublisher(root, compression=compression, fsync_dir=fsync_dir)
        self.unit = self.publisher.unit
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
        self.rejects_store = RejectsStore(root, rejects_max_bytes)
        self._retry_at_mono = 0.0
        self._retry_delay_s = RETRY_MIN_S
        self._commit_failing = False
        # Published files whose directory sync failed, by partition directory: their rows
        # are visible (never committed again) but not yet durable (the journal keeps them).
        self._unsynced: dict[Path, list[Coverage]] = {}
        self._dir_sync: asyncio.Future[Any] | None = None
        self._dir_retry_at_mono = 0.0
        self._dir_retry_delay_s = RETRY_MIN_S
        self._tick_s = min(0.05, flush_interval_s / 4)
        self._commit_s_ewma = 0.0    # how long a commit takes lately (s)
        self._max_buffered = max(2 * flush_max_rows, 100_000)
        self._conversions: list[concurrent.futures.Future[Any]] = []
        self._idle = asyncio.Event()
        self.stale_staging_removed = 0

    # ---- lifecycle -------------------------------------------------------------------------
    def open(self) -> None:
        """Blocking start-up work (before the loop serves): the publisher's staging dir,
        leftovers."""
        self.stale_staging_removed = self.publisher.open()

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
        if out.derivatives:
            self._add(out.derivatives, exchange, now, key)
        if out.liquidations:
            self._add(out.liquidations, exchange, now, key)
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
            fut = self._executor.submit(to_arrow, block.TABLE, exchange, buf.take_blocks(),
                                        self.unit)
            buf.converted.append(fut)
            self._conversions.append(fut)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self._tick_s)
            self._flush_due()
            self.stats.last_progress_mono = self.clock.monotonic()

    def _flush_due(self, force: bool = False) -> None:
        now = self.clock.monotonic()
        if self._unsynced and self._dir_sync is None and now >= self._dir_retry_at_mono:
            self._start_dir_sync()
        if now < self._retry_at_mono:
            return
        # Flush early by the tick and the recent commit time: `flush_interval_s` is the
        # max age of a buffered row before it is committed, not the age at which its
        # commit starts.
        lead_s = min(self.batcher.flush_interval_s / 2, self._tick_s + self._commit_s_ewma)
        keys = self.batcher.partitions() if force else self.batcher.due(now, lead_s)
        if keys and hasattr(self.publisher, "publish_many"):
            # A table with a due partition commits all its partitions at once (Delta: at
            # most one commit per table per flush interval, however many partitions).
            tables = {key[0] for key in keys}
            by_table: dict[str, list[PartitionKey]] = {}
            for key in self.batcher.partitions():
                if key[0] in tables:
                    by_table.setdefault(key[0], []).append(key)
            for group in by_table.values():
                self._start_group(group)
            keys = []
        for key in keys:
            self._start_commit(key)
        if self._rejects:
            rejects, self._rejects = self._rejects, []
            fut = asyncio.get_running_loop().run_in_executor(
                self._executor, self.rejects_store.write, rejects, self.clock.time_ns())
            self._inflight.add(fut)
            count = len(rejects)
            fut.add_done_callback(lambda f: self._rejects_done(f, count))

    def _rejects_done(self, fut: asyncio.Future[RejectsWritten], n: int) -> None:
        self._inflight.discard(fut)
        st = self.stats
        exc = None if fut.cancelled() else fut.exception()
        if fut.cancelled() or exc is not None:
            # The frames stay in the journal; only this readable copy of them is lost.
            st.rejects_lost += n
            log.error("rejects_write_failed", error=str(exc), count=n)
            return
        done = fut.result()
        st.rejects_written += done.written
        st.rejects_bytes = done.total_bytes
        if done.deleted_files:
            st.rejects_deleted += done.deleted_files
            log.warning("rejects_deleted", files=done.deleted_files, bytes=done.deleted_bytes,
                        budget_bytes=self.rejects_store.max_bytes,
                        total_deleted=st.rejects_deleted)

    def _start_commit(self, key: PartitionKey) -> None:
        if self.clock.monotonic() < self._retry_at_mono:
            return
        batch = self.batcher.take(key)
        started = self.clock.monotonic()
        fut = asyncio.get_running_loop().run_in_executor(
            self._executor, self.publisher.publish, batch)
        self._inflight.add(fut)
        self._inflight_batches[fut] = batch
        fut.add_done_callback(lambda f: self._commit_done(f, batch, key, started))

    def _start_group(self, keys: list[PartitionKey]) -> None:
        """Partitions of one table committed at once (`publish_many`); each batch's
        outcome is then handled as its own commit's would be."""
        if self.clock.monotonic() < self._retry_at_mono:
            return
        loop = asyncio.get_running_loop()
        batches = [self.batcher.take(key) for key in keys]
        parts: list[asyncio.Future[Committed]] = [loop.create_future() for _ in batches]
        for part, batch in zip(parts, batches, strict=True):
            self._inflight_batches[part] = batch
        started = self.clock.monotonic()
        fut = loop.run_in_executor(self._executor, self.publisher.publish_many,  # type: ignore[attr-defined]
                                   batches)
        self._inflight.add(fut)

        def done(f: asyncio.Future[list[Committed]]) -> None:
            self._inflight.discard(f)
            exc = None if f.cancelled() else f.exception()
            delay_s = self._retry_delay_s
            for i, (part, batch, key) in enumerate(zip(parts, batches, keys, strict=True)):
                if exc is not None or f.cancelled():
                    part.set_exception(exc or asyncio.CancelledError())
                else:
                    part.set_result(f.result()[i])
                self._commit_done(part, batch, key, started)
            if exc is not None or f.cancelled():  # one failed commit: back off once
                self._retry_at_mono = self.clock.monotonic() + delay_s
                self._retry_delay_s = min(RETRY_MAX_S, delay_s * 2)

        fut.add_done_callback(done)

    def _commit_done(self, fut: asyncio.Future[Committed], batch: Batch, key: PartitionKey,
                     started_mono: float) -> None:
        self._inflight.discard(fut)
        self._inflight_batches.pop(fut, None)
        now = self.clock.monotonic()
        st = self.stats
        exc = None if fut.cancelled() else fut.exception()
        if isinstance(exc, PublishedNotDurable):
            # Visible: the rows are written and must never be committed again. Only the
            # directory sync is retried; until it succeeds the journal keeps their frames.
            done = exc.committed
            self._not_durable(batch, done, exc)
        elif fut.cancelled() or exc is not None:
            # Nothing became visible: put the rows back (in order) and retry later.
            self.batcher.restore(batch, key, now)
            st.flush_errors += 1
            st.healthy = False
            self._commit_failing = True
            st.last_error = f"{type(exc).__name__}: {exc}" if exc else "cancelled"
            self._retry_at_mono = now + self._retry_delay_s
            log.error("commit_failed", table=batch.table, exchange=batch.exchange,
                      rows=batch.rows, error=st.last_error,
                      retry_in_s=round(self._retry_delay_s, 3))
            self._retry_delay_s = min(RETRY_MAX_S, self._retry_delay_s * 2)
            return
        else:
            done = fut.result()
            # The directory sync of this commit also made every earlier rename into that
            # directory durable (commits are serialized in one thread).
            if self._unsynced.pop(done.path.parent, None) is not None:
                log.info("dir_sync_recovered", dir=str(done.path.parent), by="commit")
        if self._commit_failing:
            log.info("commit_recovered", table=batch.table, exchange=batch.exchange)
        self._commit_failing = False
        self._retry_delay_s = RETRY_MIN_S
        st.unsynced_dirs = len(self._unsynced)
        st.healthy = not self._commit_failing and not self._unsynced
        if self.trace is not None:
            self.trace.committed(str(done.path))
        st.rows_written[batch.table] += done.rows
        st.files_written += 1
        st.bytes_written += done.bytes
        st.last_commit_mono = now
        st.flush_seconds_total += now - started_mono
        st.observe_flush(now - started_mono)
        self._commit_s_ewma += 0.2 * ((now - started_mono) - self._commit_s_ewma)
        st.buffered_rows = self.batcher.buffered_rows

    def _not_durable(self, batch: Batch, done: Committed, exc: PublishedNotDurable) -> None:
        st = self.stats
        st.dir_fsync_failures += 1
        st.last_error = f"{type(exc).__name__}: {exc}"
        self._unsynced.setdefault(done.path.parent, []).append(
            {k: list(v) for k, v in batch.coverage.items()})
        self._dir_retry_at_mono = self.clock.monotonic() + self._dir_retry_delay_s
        log.error("commit_not_durable", table=batch.table, exchange=batch.exchange,
                  rows=batch.rows, path=str(done.path), error=st.last_error,
                  retry_in_s=round(self._dir_retry_delay_s, 3))

    def _start_dir_sync(self) -> None:
        """Retry the directory syncs of published, not yet durable files (worker thread)."""
        # How many entries each directory has now: only those are known to be covered
        # by this sync (a later one's rename may come after it).
        pending = {d: len(entries) for d, entries in self._unsynced.items()}
        fut = asyncio.get_running_loop().run_in_executor(
            self._executor, self.publisher.sync_durable, list(pending))
        self._dir_sync = fut
        self._inflight.add(fut)
        fut.add_done_callback(lambda f: self._dir_sync_done(f, pending))

    def _dir_sync_done(self, fut: asyncio.Future[dict[Path, str | None]],
                       pending: dict[Path, int]) -> None:
        self._inflight.discard(fut)
        self._dir_sync = None
        st = self.stats
        now = self.clock.monotonic()
        errors = {d: "cancelled" for d in pending} if fut.cancelled() else fut.result()
        failed = False
        for d, n in pending.items():
            entries = self._unsynced.get(d)
            if entries is None:
                continue  # a commit's sync made it durable meanwhile
            error = errors.get(d)
            if error is None:
                del entries[:n]
                if not entries:
                    del self._unsynced[d]
                log.info("dir_sync_recovered", dir=str(d), by="retry")
            else:
                failed = True
                st.dir_fsync_failures += 1
                st.last_error = error
                log.error("dir_sync_failed", dir=str(d), error=error,
                          retry_in_s=round(self._dir_retry_delay_s, 3))
        if failed:
            self._dir_retry_at_mono = now + self._dir_retry_delay_s
            self._dir_retry_delay_s = min(RETRY_MAX_S, self._dir_retry_delay_s * 2)
        else:
            self._dir_retry_delay_s = RETRY_MIN_S
        st.unsynced_dirs = len(self._unsynced)
        st.healthy = not self._commit_failing and not self._unsynced

    async def _drain(self) -> None:
        """Commit every buffered row; keeps retrying failed commits until cancelled."""
        while True:
            now = self.clock.monotonic()
            self._retry_at_mono = min(self._retry_at_mono, now)
            self._dir_retry_at_mono = min(self._dir_retry_at_mono, now)
            self._flush_due(force=True)
            if self._inflight:
                await asyncio.wait(set(self._inflight))
            if not (self.batcher.buffered_rows or self._inflight or self._rejects
                    or self._unsynced):
                break
            await asyncio.sleep(self._retry_delay_s)
        self._executor.shutdown(wait=False)  # nothing is pending any more
        # Blocking (an object store's uploader gets a short budget to empty its outbox).
        await asyncio.to_thread(self.publisher.close)
        if self.trace is not None:
            self.trace.dump()

    def committed_below(self) -> dict[str, int | None]:
        """Per feed key, the lowest recv_seq not yet committed (None: everything taken off
        the queue so far is committed). Rows still in the queue have higher values than
        `consumed_seq` (the intake keeps each feed's order)."""
        low: dict[str, int | None] = {}
        pending = self.batcher.lowest_seq()
        coverages = [b.coverage for b in self._inflight_batches.values()]
        for entries in self._unsynced.values():
            coverages.extend(entries)   # visible, but not durable yet
        for coverage in coverages:
            for feed, (lo, _) in coverage.items():
                if lo < pending.get(feed, lo + 1):
                    pending[feed] = lo
        for feed, consumed in self.consumed_seq.items():
            low[feed] = pending.get(feed, consumed + 1)
        return low

    @property
    def inflight(self) -> int:
        return len(self._inflight)

