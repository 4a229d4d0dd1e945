"""Live counters of feeds, the queue and the writer, and frozen snapshots of them.

Owns: plain mutable counter objects that the reader, the queue and the writer bump on the
event loop (no locks: one thread writes each field), the frozen snapshot types that
health and metrics read (`DaemonSnapshot` and its parts), and the pure functions that
build a snapshot from the live counters. A snapshot holds copies (counts as tuples of
pairs, ages precomputed from one `now`), so a reader of it never sees the live objects.

Must not: do I/O, import the daemon, or compute anything per message beyond an integer
increment (snapshots are built per scrape or health request, never per message).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import msgspec

# Upper bounds (seconds) of the flush-duration histogram's buckets; +Inf is implied.
FLUSH_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                                    5.0, 10.0, 30.0)


@dataclass(slots=True)
class FeedStats:
    name: str
    exchange: str
    state: str = "connecting"           # connecting | streaming | reconnecting | stopped
    breaker: str = "closed"             # closed | open | half_open
    messages: int = 0                   # frames received
    bytes: int = 0
    rows: Counter[str] = field(default_factory=Counter)       # rows handed on, by table
    last_message_mono: float | None = None
    connects: int = 0
    reconnects: int = 0
    gaps: int = 0
    resyncs: int = 0
    stale: int = 0
    parse_errors: Counter[str] = field(default_factory=Counter)  # by reason
    unknown_messages: int = 0
    drops: Counter[str] = field(default_factory=Counter)      # rows/frames dropped, by reason
    last_error: str | None = None
    polls: Counter[str] = field(default_factory=Counter)      # REST poll answers, by outcome


@dataclass(slots=True)
class WriterStats:
    rows_written: Counter[str] = field(default_factory=Counter)  # by table
    files_written: int = 0
    bytes_written: int = 0
    flush_errors: int = 0
    last_commit_mono: float | None = None
    last_progress_mono: float | None = None
    last_error: str | None = None
    flush_seconds_total: float = 0.0
    buffered_rows: int = 0
    rejects_written: int = 0
    rejects_lost: int = 0               # rejected frames whose write to .rejects/ failed
    rejects_deleted: int = 0            # files deleted from .rejects/ to keep its budget
    rejects_bytes: int = 0              # size of .rejects/ after the latest write
    dir_fsync_failures: int = 0         # directory syncs after a publish that failed
    unsynced_dirs: int = 0              # partitions with published files not yet durable
    healthy: bool = True
    # Commits per flush-duration bucket (not cumulative): index i counts durations in
    # (FLUSH_BUCKETS[i-1], FLUSH_BUCKETS[i]]; the last slot counts those above 30 s.
    flush_buckets: list[int] = field(default_factory=lambda: [0] * (len(FLUSH_BUCKETS) + 1))

    def observe_flush(self, seconds: float) -> None:
        """Count one commit's duration in its histogram bucket. Only the buckets: the
        sum and count stay `flush_seconds_total` and `files_written`."""
        self.flush_buckets[bisect_left(FLUSH_BUCKETS, seconds)] += 1


@dataclass(slots=True)
class StoreStats:
    """The remote object store's state, kept by its publisher's uploader (one writer
    thread updates it; the loop reads it for /health and /metrics)."""

    url: str                              # the root, e.g. s3://bucket/prefix
    state: str = "starting"               # "ok" | "unreachable" | "starting"
    last_error: str | None = None         # the latest upload failure (never credentials)
    files_waiting: int = 0                # committed locally, not uploaded yet
    bytes_waiting: int = 0
    files_uploaded: int = 0
    bytes_uploaded: int = 0
    upload_failures: int = 0              # failed upload attempts (each retried)
    last_upload_mono: float | None = None


@dataclass(slots=True)
class QueueStats:
    capacity: int
    dropped: Counter[str] = field(default_factory=Counter)  # by reason (e.g. queue_full)
    peak_depth: int = 0
    depth: int = 0  # current depth in messages, kept up to date by the queue


class JournalStatsLike(Protocol):
    """What a snapshot reads of the journal's counters (sink.journal.JournalStats)."""

    @property
    def healthy(self) -> bool: ...
    @property
    def pending_bytes(self) -> int: ...
    @property
    def last_fsync_mono(self) -> float | None: ...
    @property
    def fsync_failures(self) -> int: ...
    @property
    def segments_deleted(self) -> int: ...
    @property
    def bytes_appended(self) -> int: ...
    @property
    def raw_kept_bytes(self) -> int: ...
    @property
    def raw_deleted(self) -> int: ...


# ---- frozen snapshots -----------------------------------------------------------------
Counts = tuple[tuple[str, int], ...]   # (key, count) pairs in the live counter's order


class FeedSnapshot(msgspec.Struct, frozen=True):
    name: str
    exchange: str
    state: str
    breaker: str
    messages: int
    bytes: int
    rows: Counts
    last_message_age_s: float | None    # None: no frame yet
    connects: int
    reconnects: int
    gaps: int
    resyncs: int
    stale: int
    parse_errors: Counts
    unknown_messages: int
    drops: Counts
    last_error: str | None
    polls: Counts = ()                  # periodic REST poll answers by outcome (feed/polls.py)


class QueueSnapshot(msgspec.Struct, frozen=True):
    depth: int
    capacity: int
    peak_depth: int
    dropped: Counts


class WriterSnapshot(msgspec.Struct, frozen=True):
    healthy: bool
    rows_written: Counts
    files_written: int
    bytes_written: int
    flush_errors: int
    buffered_rows: int
    rejects_written: int
    rejects_lost: int
    rejects_deleted: int
    rejects_bytes: int
    dir_fsync_failures: int
    unsynced_dirs: int
    last_commit_age_s: float | None     # None: nothing committed yet
    last_progress_age_s: float | None   # None: no progress recorded yet
    last_error: str | None
    flush_seconds_total: float
    # Cumulative (upper bound, commits <= bound), ending with (inf, files_written).
    flush_histogram: tuple[tuple[float, int], ...]


class JournalSnapshot(msgspec.Struct, frozen=True):
    healthy: bool
    pending_bytes: int
    fsync_age_s: float | None           # None: no fsync yet
    fsync_failures: int
    segments_deleted: int
    bytes_appended: int
    raw_kept_bytes: int                 # raw frames kept under <root>/.raw for replay
    raw_deleted: int                    # kept raw segments deleted by age or size cap


class StoreSnapshot(msgspec.Struct, frozen=True):
    url: str
    state: str                          # ok | unreachable | starting
    last_error: str | None
    files_waiting: int
    bytes_waiting: int
    files_uploaded: int
    bytes_uploaded: int
    upload_failures: int
    last_upload_age_s: float | None     # None: nothing uploaded yet


class DaemonSnapshot(msgspec.Struct, frozen=True):
    state: str                          # starting | ok | stopping
    loop_lag_s: float
    loop_lag_max_s: float
    feeds: tuple[FeedSnapshot, ...]     # sorted by name
    queue: QueueSnapshot
    writer: WriterSnapshot
    journal: JournalSnapshot | None     # None: journal disabled
    store: StoreSnapshot | None = None  # None: the root is local


SnapshotSource = Callable[[], DaemonSnapshot]


@runtime_checkable
class SnapshotProvider(Protocol):
    """An object that builds snapshots of itself (the daemon)."""

    def stats_snapshot(self) -> DaemonSnapshot: ...


def _counts(c: Mapping[str, int]) -> Counts:
    return tuple(c.items())


def _age(now_mono: float, mono: float | None) -> float | None:
    return None if mono is None else now_mono - mono


def feed_snapshot(st: FeedStats, now_mono: float) -> FeedSnapshot:
    return FeedSnapshot(
        name=st.name, exchange=st.exchange, state=st.state, breaker=st.breaker,
        messages=st.messages, bytes=st.bytes, rows=_counts(st.rows),
        last_message_age_s=_age(now_mono, st.last_message_mono), connects=st.connects,
        reconnects=st.reconnects, gaps=st.gaps, resyncs=st.resyncs, stale=st.stale,
        parse_errors=_counts(st.parse_errors), unknown_messages=st.unknown_messages,
        drops=_counts(st.drops), last_error=st.last_error, polls=_counts(st.polls))


def queue_snapshot(st: QueueStats) -> QueueSnapshot:
    return QueueSnapshot(depth=st.depth, capacity=st.capacity, peak_depth=st.peak_depth,
                         dropped=_counts(st.dropped))


def flush_histogram(st: WriterStats) -> tuple[tuple[float, int], ...]:
    """Cumulative buckets of the commits observed. The +Inf bucket is the commit count
    (`files_written`, at least the observations), so it always matches `_count`."""
    out: list[tuple[float, int]] = []
    total = 0
    for bound, n in zip(FLUSH_BUCKETS, st.flush_buckets, strict=False):
        total += n
        out.append((bound, total))
    total += sum(st.flush_buckets[len(FLUSH_BUCKETS):])
    out.append((math.inf, max(total, st.files_written)))
    return tuple(out)


def writer_snapshot(st: WriterStats, now_mono: float) -> WriterSnapshot:
    return WriterSnapshot(
        healthy=st.healthy, rows_written=_counts(st.rows_written),
        files_written=st.files_written, bytes_written=st.bytes_written,
        flush_errors=st.flush_errors, buffered_rows=st.buffered_rows,
        rejects_written=st.rejects_written, rejects_lost=st.rejects_lost,
        rejects_deleted=st.rejects_deleted, rejects_bytes=st.rejects_bytes,
        dir_fsync_failures=st.dir_fsync_failures, unsynced_dirs=st.unsynced_dirs,
        last_commit_age_s=_age(now_mono, st.last_commit_mono),
        last_progress_age_s=_age(now_mono, st.last_progress_mono),
        last_error=st.last_error, flush_seconds_total=st.flush_seconds_total,
        flush_histogram=flush_histogram(st))


def journal_snapshot(st: JournalStatsLike, now_mono: float) -> JournalSnapshot:
    return JournalSnapshot(
        healthy=st.healthy, pending_bytes=st.pending_bytes,
        fsync_age_s=_age(now_mono, st.last_fsync_mono), fsync_failures=st.fsync_failures,
        segments_deleted=st.segments_deleted, bytes_appended=st.bytes_appended,
        raw_kept_bytes=st.raw_kept_bytes, raw_deleted=st.raw_deleted)


def daemon_snapshot(*, state: str, now_mono: float, loop_lag_s: float, loop_lag_max_s: float,
                    feeds: Iterable[FeedStats], queue: QueueStats, writer: WriterStats,
                    journal: JournalStatsLike | None,
                    store: StoreStats | None = None) -> DaemonSnapshot:
    """Copy the live counters into one frozen snapshot; every age is `now_mono` minus
    the counter's monotonic timestamp."""
    return DaemonSnapshot(
        state=state, loop_lag_s=loop_lag_s, loop_lag_max_s=loop_lag_max_s,
        feeds=tuple(sorted((feed_snapshot(f, now_mono) for f in feeds),
                           key=lambda f: f.name)),
        queue=queue_snapshot(queue), writer=writer_snapshot(writer, now_mono),
        journal=None if journal is None else journal_snapshot(journal, now_mono),
        store=None if store is None else store_snapshot(store, now_mono))


def store_snapshot(st: StoreStats, now_mono: float) -> StoreSnapshot:
    return StoreSnapshot(
        url=st.url, state=st.state, last_error=st.last_error,
        files_waiting=st.files_waiting, bytes_waiting=st.bytes_waiting,
        files_uploaded=st.files_uploaded, bytes_uploaded=st.bytes_uploaded,
        upload_failures=st.upload_failures,
        last_upload_age_s=_age(now_mono, st.last_upload_mono))
