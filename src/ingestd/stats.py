"""Live counters of feeds, the queue and the writer, shared by value with health/metrics.

Owns: plain mutable counter objects that the reader and writer bump on the event loop
(no locks: one thread writes each field) and read-only snapshots of them.

Must not: do I/O or compute anything per message beyond an integer increment.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


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
    healthy: bool = True


@dataclass(slots=True)
class QueueStats:
    capacity: int
    dropped: Counter[str] = field(default_factory=Counter)  # by reason (e.g. queue_full)
    peak_depth: int = 0
