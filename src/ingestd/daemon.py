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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import structlog

from ingestd import __version__
from ingestd.checks import load_config
from ingestd.clock import SYSTEM_CLOCK, Clock, SeqAllocator
from ingestd.config import Config, ConfigError, FeedConfig
from ingestd.exchanges import CODECS, Codec, make_codec
from ingestd.feed.intake import STOP, Intake, MessageQueue
from ingestd.feed.limiter import ConnectLimiter
from ingestd.feed.reader import FeedReader
from ingestd.health import HealthServer, writer_progressing
from ingestd.notify import Notifier
from ingestd.runtime import tune_gc
from ingestd.sink.journal import Journal
from ingestd.sink.publish import make_publisher
from ingestd.sink.recovery import RecoveryResult, recover
from ingestd.sink.state import load_feed_state, save_feed_states
from ingestd.sink.writer import Writer
from ingestd.stats import DaemonSnapshot, FeedStats, QueueStats, WriterStats, daemon_snapshot

log = structlog.get_logger("ingestd.daemon")

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_FORCED = 130


class UnusableRoot(Exception):
    """The output directory cannot be created or written."""


class HealthBindError(Exception):
    """The health endpoint's address cannot be bound."""


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


def journal_close_reserve_s(cfg: Config) -> float:
    """The part of `shutdown_timeout_s` kept for the journal's last writes: the writer's
    drain gets the rest, so the whole shutdown stays within the budget."""
    return min(cfg.service.shutdown_timeout_s / 4, max(2 * cfg.journal.fsync_interval_s, 0.5))


def committed_below(writer: Writer, journal: Journal,
                    readers: Mapping[str, FeedReader]) -> dict[str, int | None]:
    """Per feed key, the lowest recv_seq whose rows are not all committed yet (missing or
    None: nothing pending): journal segments holding only lower values may go.

    A row is pending in the writer (buffered, or in a commit in flight) or in the queue
    (its reader handed on more than the writer took: everything after what the writer
    took counts as pending). Nothing else is: a read whose frames produced no rows was
    done when it was journaled (the reader journals, decodes and hands on in one
    synchronous step), so a feed that only sends heartbeats never pins the journal. A feed
    a reload stopped has no reader any more: its last journaled record is its
    `disconnected` event (a row), so the journal's highest recv_seq of it stands in."""
    taken = writer.consumed_seq
    low: dict[str, int | None] = {}
    for key, value in writer.committed_below().items():
        # The writer answers "what it took + 1" when nothing of a feed is buffered or in
        # flight: rows it holds never have a recv_seq above what it took.
        if value is not None and value <= taken.get(key, 0):
            low[key] = value
    handed: dict[str, int] = {}
    for name in journal.feeds_seen():
        handed[journal.feed_key(name)] = journal.last_seq(name)
    for name, reader in readers.items():
        # A reader that has handed nothing on yet (just started by a reload) may follow
        # one whose rows still wait in the queue: the journal's watermark stands in.
        handed[journal.feed_key(name)] = reader.handed_seq or journal.last_seq(name)
    for key, top in handed.items():
        took = taken.get(key, 0)
        if top > took:
            pending = low.get(key)
            low[key] = took + 1 if pending is None else min(pending, took + 1)
    return low


class Daemon:
    def __init__(self, cfg: Config, clock: Clock = SYSTEM_CLOCK,
                 config_path: str | None = None, notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.clock = clock
        self.config_path = config_path
        self.notifier = notifier or Notifier()
        self.health: HealthServer | None = None
        self.health_port: int | None = None
        self.loop_lag_s = 0.0
        self.loop_lag_max_s = 0.0
        self.stats_interval_s = 60.0
        self.reloads = 0
        self._reload_lock = asyncio.Lock()
        self._background: list[asyncio.Task[Any]] = []
        self.root = Path(cfg.storage.root)
        # Journal, staging, state, kept raw frames, rejects: local even when the output
        # root is an object store (`storage.local_path`).
        self.local_dir = self.root_of(cfg)
        self.queue_stats = QueueStats(cfg.queue.capacity)
        self.queue = MessageQueue(cfg.queue.capacity, self.queue_stats)
        self.writer_stats = WriterStats()
        self.intake = Intake(self.queue, cfg.queue.when_full, self.queue_stats)
        jc = cfg.journal
        self.journal: Journal | None = None
        if jc.enabled:
            self.journal = Journal(self.local_dir, fsync_interval_s=jc.fsync_interval_s,
                                   clock=clock, segment_max_bytes=jc.segment_max_bytes,
                                   segment_max_s=jc.segment_max_s,
                                   keep_raw_s=jc.keep_raw_days * 86_400.0,
                                   keep_raw_max_bytes=jc.keep_raw_max_bytes,
                                   max_pending_bytes=jc.max_pending_bytes)
        self.instance = self.journal.instance if self.journal else uuid.uuid4().hex
        try:
            self.publisher = make_publisher(cfg.storage, self.local_dir, self.instance)
        except ValueError as e:  # e.g. an http endpoint without allow_http
            raise UnusableRoot(str(e)) from None
        self.writer = Writer(self.local_dir, self.queue,
                             flush_interval_s=cfg.storage.flush_interval_s,
                             flush_max_rows=cfg.storage.flush_max_rows,
                             compression=cfg.storage.compression,
                             clock=clock, stats=self.writer_stats,
                             instance=self.journal.instance if self.journal else "",
                             publisher=self.publisher)
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
        """The local directory this daemon must be able to write (`storage.local_path`:
        the root itself when it is local)."""
        return Path(cfg.storage.local_path)

    def read_config(self) -> Config:
        """The config a SIGHUP applies (blocking). A worker process (worker.py) reads
        its share of the supervisor's validated config instead of the file."""
        assert self.config_path is not None
        return load_config(self.config_path)

    def stats_snapshot(self) -> DaemonSnapshot:
        """A frozen copy of every counter (what health and metrics read)."""
        self.queue_stats.depth = self.queue.qsize()
        return daemon_snapshot(
            state=self.state, now_mono=self.clock.monotonic(), loop_lag_s=self.loop_lag_s,
            loop_lag_max_s=self.loop_lag_max_s, feeds=self.feed_stats.values(),
            queue=self.queue_stats, writer=self.writer_stats,
            journal=None if self.journal is None else self.journal.stats,
            store=self.publisher.store_stats)

    # ---- control ---------------------------------------------------------------------------
    def request_stop(self, reason: str = "requested") -> None:
        if not self._stop.is_set():
            # Stop first, then log: a log line that fails (stdout gone) must not keep the
            # daemon running.
            self.state = "stopping"
            self._stop.set()
            log.info("shutdown_requested", reason=reason)

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals == 1:
            self.request_stop(name)
            return
        self.notifier.send("STATUS=forced exit")
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
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)

    def _remove_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)

    def _on_sighup(self) -> None:
        task = asyncio.create_task(self.reload())
        self._background.append(task)
        task.add_done_callback(self._background.remove)

    # ---- SIGHUP: reload -------------------------------------------------------------------
    async def reload(self) -> bool:
        """Re-read the config file: added feeds start, removed feeds stop (their data is
        committed), changed feeds restart, untouched feeds keep their connections. An
        invalid file is logged and the running config stays."""
        if self.config_path is None or self._stop.is_set():
            return False
        async with self._reload_lock:
            if self._stop.is_set():
                return False
            self.notifier.reloading()
            try:
                new = await asyncio.to_thread(self.read_config)
            except ConfigError as e:
                log.error("reload_rejected", problems=e.problems)
                self.notifier.status(f"reload rejected: {e.problems[0]}; running config kept")
                if not self._stop.is_set():
                    self.notifier.send("READY=1")
                return False
            # Every await of a reload may end after shutdown began (a slow config read,
            # a feed that takes its time to stop): from then on it changes nothing more.
            if self._stop.is_set():
                log.warning("reload_abandoned", detail="shutdown began while the config "
                            "was read; nothing changed")
                return False
            fixed = [name for name in ("storage", "journal", "queue", "service", "health",
                                       "log") if getattr(new, name) != getattr(self.cfg, name)]
            if fixed:
                log.warning("reload_needs_restart", sections=fixed,
                            detail="only [[feeds]] changes apply without a restart")
            old = {f.name: f for f in self.cfg.feeds}
            want = {f.name: f for f in new.feeds}
            removed = sorted(set(old) - set(want))
            added = sorted(set(want) - set(old))
            changed = sorted(n for n in set(old) & set(want) if old[n] != want[n])
            carried: dict[str, dict[str, Any]] = {}
            for name in removed + changed:
                reader = await self._stop_feed(name)
                if reader is not None and name in changed:
                    # A changed feed keeps its trade de-duplication state: the venue's
                    # replay of recent trades on the new connection is not stored twice.
                    carried[name] = reader.codec.state()
            if self._stop.is_set():
                log.warning("reload_abandoned", stopped=removed + changed,
                            not_started=added + changed,
                            detail="shutdown began while feeds stopped; none is started")
                return False
            for name in added + changed:
                self._start_feed(want[name], carried.get(name))
            self.cfg = msgspec.structs.replace(self.cfg, feeds=new.feeds)
            self.reloads += 1
            log.info("reloaded", added=added, removed=removed, changed=changed,
                     unchanged=sorted(set(old) & set(want) - set(changed)))
            self.notifier.send("READY=1", f"STATUS={self._status_line()}")
            return True

    async def _stop_feed(self, name: str) -> FeedReader | None:
        """Stop one feed and wait until it handed on everything it received. It stays in
        `readers` until then, so that a shutdown meanwhile waits for it too."""
        reader = self.readers.get(name)
        if reader is None:
            return None
        reader.stop()
        if reader.task is not None:
            await asyncio.gather(reader.task, return_exceptions=True)
        if self.readers.get(name) is reader:
            del self.readers[name]
        if self.journal is not None:
            self.journal.unregister(name)
        self.feed_stats.pop(name, None)
        return reader

    # ---- background monitors ---------------------------------------------------------------
    async def _lag_monitor(self) -> None:
        """How late the loop runs a timer: a blocked loop starves every feed's keepalive."""
        period = 0.25
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(period)
            lag = max(0.0, loop.time() - t0 - period)
            self.loop_lag_s = lag
            if lag > self.loop_lag_max_s:
                self.loop_lag_max_s = lag

    def _status_line(self) -> str:
        streaming = sum(1 for st in self.feed_stats.values() if st.state == "streaming")
        rows = sum(self.writer_stats.rows_written.values())
        return (f"{self.state}: {streaming}/{len(self.feed_stats)} feeds streaming, "
                f"{rows} rows written, queue {self.queue.qsize()}/{self.cfg.queue.capacity}")

    async def _notify_loop(self) -> None:
        """WATCHDOG=1 at half the watchdog interval, only while the loop and the writer
        make progress; a STATUS= line every 10 s."""
        n = self.notifier
        period = min(10.0, n.watchdog_s / 2) if n.watchdog_s else 10.0
        since_status = 0.0
        while True:
            await asyncio.sleep(period)
            if n.watchdog_s and writer_progressing(self):
                n.watchdog()
            since_status += period
            if since_status >= 10.0:
                since_status = 0.0
                n.status(self._status_line())

    async def _stats_logger(self) -> None:
        """One line per feed per interval (never per message)."""
        last: dict[str, tuple[int, int]] = {}
        while True:
            await asyncio.sleep(self.stats_interval_s)
            for name, st in sorted(self.feed_stats.items()):
                prev_msgs, prev_rows = last.get(name, (0, 0))
                rows = sum(st.rows.values())
                log.info("feed_stats", feed=name, exchange=st.exchange, state=st.state,
                         breaker=st.breaker, messages=st.messages - prev_msgs,
                         rows=rows - prev_rows, gaps=st.gaps, reconnects=st.reconnects,
                         parse_errors=sum(st.parse_errors.values()),
                         drops=sum(st.drops.values()), interval_s=self.stats_interval_s)
                last[name] = (st.messages, rows)

    # ---- run -------------------------------------------------------------------------------
    async def _recover(self) -> None:
        """Replay journals of processes that died, before any feed starts."""
        self.recovery = await asyncio.to_thread(
            recover, self.local_dir, self.cfg.storage.compression,
            self.publisher.staging_dir, self.cfg.storage.flush_max_rows,
            keep_raw=self.cfg.journal.keep_raw_days > 0, publisher=self.publisher)
        r = self.recovery
        if r.journals:
            log.warning("recovered_from_journal", journals=r.journals, records=r.records,
                        rows_committed=r.rows_committed,
                        rows_already_committed=r.rows_already_committed,
                        torn_segments=r.torn_segments, files=r.files)

    def _start_feed(self, feed: FeedConfig, carried: dict[str, Any] | None = None) -> None:
        """Start one feed's reader - never once stopping began: the shutdown stops only
        the readers it finds, and what a later one received would be lost."""
        if self._stop.is_set():
            log.warning("feed_not_started", feed=feed.name, reason="shutting down")
            return
        stats = FeedStats(feed.name, feed.exchange)
        self.feed_stats[feed.name] = stats
        limiter = self.limiters.get(feed.exchange)
        if limiter is None:
            limiter = ConnectLimiter(*CODECS[feed.exchange].connect_limit)
            self.limiters[feed.exchange] = limiter
        seq = SeqAllocator(self.clock.time_ns())
        codec: Codec | None = None
        problem: str | None = None
        restored = self.recovery.feeds.get(feed.name) if self.recovery else None
        if carried is not None and carried.get("exchange") == feed.exchange:
            codec, problem = make_codec(feed, carried)
        elif restored is not None and restored.exchange == feed.exchange \
                and restored.codec.feed == feed:
            codec = restored.codec
            seq.bump(restored.last_seq)
        else:
            saved = load_feed_state(self.local_dir, feed)
            if saved is not None:
                state, last_seq = saved
                codec, problem = make_codec(feed, state)
                seq.bump(last_seq)
        if problem is not None:
            log.warning("codec_state_unusable", feed=feed.name, error=problem[:200],
                        detail="starting with a fresh codec; books resync")
        reader = FeedReader(feed, self.intake, clock=self.clock, stats=stats, seq=seq,
                            limiter=limiter, journal=self.journal, codec=codec)
        self.readers[feed.name] = reader
        reader.start()

    def _committed_below(self) -> dict[str, int | None]:
        assert self.journal is not None
        return committed_below(self.writer, self.journal, self.readers)

    async def _journal_retention(self) -> None:
        """Retire journal segments once everything derived from them is committed (kept
        as raw frames with `[journal] keep_raw_days`, whose area is pruned here too)."""
        journal = self.journal
        assert journal is not None
        while True:
            await asyncio.sleep(1.0)
            segments = journal.deletable(self._committed_below())
            if segments:
                await journal.delete_segments(segments)
            await journal.prune_raw()

    async def run(self, install_signals: bool = True) -> int:
        if install_signals:
            # First thing: a signal during start-up (e.g. recovery) must drain, not kill.
            self._install_signals()
            tune_gc()  # the real daemon process (tests keep the interpreter's defaults)
        check_root(self.local_dir)
        await asyncio.to_thread(self.writer.open)
        if self.journal is not None:
            await asyncio.to_thread(self.journal.open)
            await self._recover()
            self.journal.start()
        host, _, port = self.cfg.health.listen.rpartition(":")
        self.health = HealthServer(self.stats_snapshot, host.strip("[]"), int(port))
        try:
            self.health_port = await self.health.start()
        except OSError as e:
            raise HealthBindError(f"health.listen: cannot listen on {self.cfg.health.listen}: "
                                  f"{e.strerror or e}") from None
        log.info("starting", version=__version__, root=self.cfg.storage.root,
                 local_dir=str(self.local_dir),
                 feeds=[f.name for f in self.cfg.feeds],
                 journal=str(self.journal.dir) if self.journal else None,
                 health=f"{host}:{self.health_port}",
                 stale_staging_removed=self.writer.stale_staging_removed)
        writer_task = asyncio.create_task(self.writer.run(), name="writer")
        for monitor in (self._lag_monitor, self._notify_loop, self._stats_logger):
            self._background.append(asyncio.create_task(monitor(), name=monitor.__name__))
        retention = None
        if self.journal is not None:
            retention = asyncio.create_task(self._journal_retention(), name="journal-retention")
        if not self._stop.is_set():  # a signal during start-up: do not start feeds
            for feed in self.cfg.feeds:
                self._start_feed(feed)
        if not self._stop.is_set():
            self.state = "ok"
        self.notifier.ready(self._status_line())
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
        self.notifier.stopping()
        shutdown_deadline = self.clock.monotonic() + self.cfg.service.shutdown_timeout_s
        journal_reserve_s = journal_close_reserve_s(self.cfg) if self.journal else 0.0
        try:
            await asyncio.wait_for(self._shutdown(writer_task),
                                   timeout=self.cfg.service.shutdown_timeout_s
                                   - journal_reserve_s)
        except TimeoutError:
            log.error("shutdown_timeout", timeout_s=self.cfg.service.shutdown_timeout_s,
                      buffered_rows=self.writer_stats.buffered_rows,
                      queued=self.queue.qsize())
            self.exit_code = EXIT_FATAL
        finally:
            if retention is not None:
                retention.cancel()
            for task in list(self._background):
                task.cancel()
            if self.health is not None:
                await self.health.stop()
            if install_signals:
                self._remove_signals()
        await asyncio.to_thread(save_feed_states, self.local_dir,
                                [(r.feed, r.codec.state(), r.seq.last)
                                 for r in self.readers.values()])
        if self.journal is not None:
            # Safe to drop the journal only if every row reached Parquet. Its last writes
            # get what is left of the shutdown budget (its reserve, unless saving states
            # took it): a disk that fails them (ENOSPC) must not hold the process; what is
            # not written is logged and the journal kept for the next start.
            complete = self.exit_code == EXIT_OK and not self.writer_stats.buffered_rows \
                and self.writer.inflight == 0
            await self.journal.close(
                removable=complete,
                timeout_s=max(shutdown_deadline - self.clock.monotonic(),
                              journal_reserve_s / 2))
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
            self.queue.put_nowait(STOP)
            await writer_task
