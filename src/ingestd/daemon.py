"""The daemon: start-up, main loop and shutdown of one ingestd process.

Owns: the queue, the writer task, one reader task per feed, signal handling (first
SIGTERM/SIGINT drains within `shutdown_timeout_s`; a second one forces exit), and the
order of shutdown: stop readers (each hands on what it received), then the writer drains
the queue and commits every buffered row.

Must not: parse argv or choose exit codes for config errors (cli.py), or decode frames.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path

import structlog

from ingestd import __version__
from ingestd.clock import SYSTEM_CLOCK, Clock, SeqAllocator
from ingestd.config import Config, FeedConfig
from ingestd.exchanges import CODECS
from ingestd.feed.intake import Intake
from ingestd.feed.limiter import ConnectLimiter
from ingestd.feed.reader import FeedReader
from ingestd.sink.journal import Journal
from ingestd.sink.recovery import RecoveryResult, recover
from ingestd.sink.writer import STOP, QueueItem, Writer
from ingestd.stats import FeedStats, QueueStats, WriterStats

log = structlog.get_logger("ingestd.daemon")

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_FORCED = 130


class UnusableRoot(Exception):
    """The output directory cannot be created or written."""


def check_root(root: Path) -> None:
    """Create `root` if needed and prove we can write, fsync and delete a file in it."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".ingestd-probe-{uuid.uuid4().hex}"
        with open(probe, "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise UnusableRoot(f"storage.root: {root}: not a usable output directory: "
                           f"{e.strerror or e}") from None


class Daemon:
    def __init__(self, cfg: Config, clock: Clock = SYSTEM_CLOCK) -> None:
        self.cfg = cfg
        self.clock = clock
        self.root = Path(cfg.storage.root)
        self.queue: asyncio.Queue[QueueItem] = asyncio.Queue(cfg.queue.capacity)
        self.queue_stats = QueueStats(cfg.queue.capacity)
        self.writer_stats = WriterStats()
        self.intake = Intake(self.queue, cfg.queue.when_full, self.queue_stats)
        jc = cfg.journal
        self.journal: Journal | None = None
        if jc.enabled:
            self.journal = Journal(self.root, fsync_interval_s=jc.fsync_interval_s, clock=clock,
                                   segment_max_bytes=jc.segment_max_bytes,
                                   segment_max_s=jc.segment_max_s,
                                   max_pending_bytes=jc.max_pending_bytes)
        self.writer = Writer(self.root, self.queue,
                             flush_interval_s=cfg.storage.flush_interval_s,
                             flush_max_rows=cfg.storage.flush_max_rows,
                             compression=cfg.storage.compression,
                             clock=clock, stats=self.writer_stats,
                             instance=self.journal.instance if self.journal else "")
        self.recovery: RecoveryResult | None = None
        self.readers: dict[str, FeedReader] = {}
        self.feed_stats: dict[str, FeedStats] = {}
        # One connection-rate limiter per venue, shared by all its feeds.
        self.limiters: dict[str, ConnectLimiter] = {}
        self.state = "starting"
        self._stop = asyncio.Event()
        self._signals = 0
        self.exit_code = EXIT_OK

    @staticmethod
    def root_of(cfg: Config) -> Path:
        return Path(cfg.storage.root)

    # ---- control ---------------------------------------------------------------------------
    def request_stop(self, reason: str = "requested") -> None:
        if not self._stop.is_set():
            log.info("shutdown_requested", reason=reason)
            self.state = "stopping"
            self._stop.set()

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals == 1:
            self.request_stop(name)
            return
        log.error("forced_exit", signal=name, buffered_rows=self.writer_stats.buffered_rows,
                  queued=self.queue.qsize())
        if self.journal is not None:
            # Everything received is in the journal; make the last of it durable so the
            # next start replays it. Blocking is fine: the process is about to end.
            self.journal.flush_blocking()
        os._exit(EXIT_FORCED)

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _remove_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)

    # ---- run -------------------------------------------------------------------------------
    async def _recover(self) -> None:
        """Replay journals of processes that died, before any feed starts."""
        self.recovery = await asyncio.to_thread(
            recover, self.root, self.cfg.storage.compression, self.writer.staging.path,
            self.cfg.storage.flush_max_rows)
        r = self.recovery
        if r.journals:
            log.warning("recovered_from_journal", journals=r.journals, records=r.records,
                        rows_committed=r.rows_committed,
                        rows_already_committed=r.rows_already_committed,
                        torn_segments=r.torn_segments, files=r.files)

    def _start_feed(self, feed: FeedConfig) -> None:
        stats = FeedStats(feed.name, feed.exchange)
        self.feed_stats[feed.name] = stats
        limiter = self.limiters.get(feed.exchange)
        if limiter is None:
            limiter = ConnectLimiter(*CODECS[feed.exchange].connect_limit)
            self.limiters[feed.exchange] = limiter
        seq = SeqAllocator(self.clock.time_ns())
        codec = None
        restored = self.recovery.feeds.get(feed.name) if self.recovery else None
        if restored is not None and restored.exchange == feed.exchange \
                and restored.codec.feed == feed:
            codec = restored.codec
            seq.bump(restored.last_seq)
        reader = FeedReader(feed, self.intake, clock=self.clock, stats=stats, seq=seq,
                            limiter=limiter, journal=self.journal, codec=codec)
        self.readers[feed.name] = reader
        reader.start()

    async def _journal_retention(self) -> None:
        """Delete journal segments once everything derived from them is committed."""
        journal = self.journal
        assert journal is not None
        while True:
            await asyncio.sleep(1.0)
            segments = journal.deletable(self.writer.committed_below())
            if segments:
                await journal.delete_segments(segments)

    async def run(self, install_signals: bool = True) -> int:
        check_root(self.root)
        await asyncio.to_thread(self.writer.open)
        if self.journal is not None:
            await asyncio.to_thread(self.journal.open)
            await self._recover()
            self.journal.start()
        log.info("starting", version=__version__, root=str(self.root),
                 feeds=[f.name for f in self.cfg.feeds],
                 journal=str(self.journal.dir) if self.journal else None,
                 stale_staging_removed=self.writer.stale_staging_removed)
        writer_task = asyncio.create_task(self.writer.run(), name="writer")
        retention = None
        if self.journal is not None:
            retention = asyncio.create_task(self._journal_retention(), name="journal-retention")
        for feed in self.cfg.feeds:
            self._start_feed(feed)
        if install_signals:
            self._install_signals()
        self.state = "ok"
        stop_wait = asyncio.create_task(self._stop.wait())
        done, _ = await asyncio.wait({stop_wait, writer_task},
                                     return_when=asyncio.FIRST_COMPLETED)
        if writer_task in done:
            # The writer must never end on its own: that is a fatal error.
            exc = writer_task.exception()
            log.error("writer_failed", error=repr(exc))
            self.exit_code = EXIT_FATAL
            self.request_stop("writer failed")
        stop_wait.cancel()
        try:
            await asyncio.wait_for(self._shutdown(writer_task),
                                   timeout=self.cfg.service.shutdown_timeout_s)
        except TimeoutError:
            log.error("shutdown_timeout", timeout_s=self.cfg.service.shutdown_timeout_s,
                      buffered_rows=self.writer_stats.buffered_rows,
                      queued=self.queue.qsize())
            self.exit_code = EXIT_FATAL
        finally:
            if retention is not None:
                retention.cancel()
            if install_signals:
                self._remove_signals()
        if self.journal is not None:
            # Safe to drop the journal only if every row reached Parquet.
            complete = self.exit_code == EXIT_OK and not self.writer_stats.buffered_rows \
                and self.writer.inflight == 0
            await self.journal.close(removable=complete)
        log.info("stopped", exit_code=self.exit_code,
                 rows_written=dict(self.writer_stats.rows_written),
                 files_written=self.writer_stats.files_written)
        return self.exit_code

    async def _shutdown(self, writer_task: asyncio.Task[None]) -> None:
        tasks = []
        for reader in self.readers.values():
            reader.stop()
            if reader.task is not None:
                tasks.append(reader.task)
        await asyncio.gather(*tasks, return_exceptions=True)
        if not writer_task.done():
            await self.queue.put(STOP)
            await writer_task
