"""Crash recovery at start-up: replay dead processes' journals into Parquet exactly once.

Owns: finding journal directories under `<root>/.journal/` whose owner is gone (their
flock can be taken), reading their segments in order (cutting torn tails off), replaying
every record through the same codecs (restored from the checkpoint at the start of the
oldest segment), skipping every row that a committed file already holds (by the
`ingestd.coverage` metadata: feed key, table, partition and recv_seq interval), committing
the rest, and only then deleting the journal directory. Also `replay_journal`, the same
re-normalization for `ingestd replay` on kept segments.

Must not: run on the event loop (it is blocking; the daemon runs it in a thread before
any feed starts), or trust anything in a journal past its first invalid record.
"""

from __future__ import annotations

import bisect
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pyarrow.parquet as pq
import structlog

from ingestd.exchanges import CODECS, make_codec
from ingestd.exchanges.base import Codec, Output, RestRequest
from ingestd.sink.batcher import NS_PER_DAY, Batcher
from ingestd.sink.fsutil import try_lock_dir
from ingestd.sink.journal import (
    CHECKPOINT,
    CONNECT,
    EVENT,
    FEED,
    FRAME,
    FRAMES,
    JOURNAL_DIR,
    REST,
    ROTATE,
    feed_config_from,
    records_of,
)
from ingestd.sink.parquet import COVERAGE_KEY, commit, partition_dir

log = structlog.get_logger("ingestd.recovery")

# Journals that could not be replayed are moved here (kept, never replayed again).
FAILED_DIR = ".journal-failed"

# A file can hold rows from a journal only if its first ts_recv is at most this much
# older than the journal's oldest record (buffers live seconds; released book diffs keep
# their earlier receive time).
FILE_AGE_MARGIN_NS = 3600 * 1_000_000_000


@dataclass
class FeedState:
    name: str
    exchange: str
    codec: Codec
    last_seq: int = 0


@dataclass
class RecoveryResult:
    journals: int = 0
    unreadable_checkpoints: int = 0
    failed_journals: int = 0
    records: int = 0
    rows_committed: int = 0
    rows_already_committed: int = 0
    torn_segments: int = 0
    files: int = 0
    feeds: dict[str, FeedState] = field(default_factory=dict)  # feed name -> replayed state


class CoverageIndex:
    """Which (feed key, table, exchange, day) recv_seq intervals committed files hold."""

    def __init__(self) -> None:
        self._intervals: dict[tuple[str, str, str, int], list[tuple[int, int]]] = {}
        self._loaded: set[tuple[str, str, int]] = set()

    def load(self, root: Path, table: str, exchange: str, day: int, prefix: str,
             min_ts_ns: int) -> None:
        if (table, exchange, day) in self._loaded:
            return
        self._loaded.add((table, exchange, day))
        from ingestd.sink.batcher import day_to_date

        d = partition_dir(root, table, exchange, day_to_date(day))
        if not d.is_dir():
            return
        for f in d.iterdir():
            if not f.name.endswith(".parquet"):
                continue
            first = f.name.split("-", 1)[0]
            if first.isdigit() and int(first) < min_ts_ns - FILE_AGE_MARGIN_NS:
                continue
            try:
                meta = pq.read_metadata(f).metadata or {}
            except (OSError, ValueError) as e:
                log.error("unreadable_committed_file", path=str(f), error=str(e))
                continue
            raw = meta.get(COVERAGE_KEY.encode())
            if not raw:
                continue
            for feed, spans in orjson.loads(raw).items():
                if feed.startswith(prefix):
                    key = (feed, table, exchange, day)
                    self._intervals.setdefault(key, []).extend(
                        (int(lo), int(hi)) for lo, hi in spans)
        for spans in self._intervals.values():
            spans.sort()

    def covers(self, feed: str, table: str, exchange: str, day: int, seq: int) -> bool:
        spans = self._intervals.get((feed, table, exchange, day))
        if not spans:
            return False
        i = bisect.bisect_right(spans, (seq, 2**63)) - 1
        return i >= 0 and spans[i][0] <= seq <= spans[i][1]


def adoptable_journals(root: Path) -> list[tuple[Path, int]]:
    """Journal directories whose owner is gone, each with the lock fd we now hold."""
    base = root / JOURNAL_DIR
    if not base.is_dir():
        return []
    out = []
    for d in sorted(base.iterdir()):
        if not d.is_dir():
            continue
        fd = try_lock_dir(d)
        if fd is not None:
            out.append((d, fd))
    return out


def replay_journal(journal_dir: Path, *, truncate: bool,
                   emit: Callable[[str, str, str, Output], None],
                   result: RecoveryResult) -> dict[str, FeedState]:
    """Feed every record of a journal directory through its codecs, calling
    `emit(feed key, exchange, table-less Output)` for what each produces."""
    instance = journal_dir.name
    feeds: dict[int, FeedState] = {}
    first_segment = True
    for _path, records, torn in records_of(journal_dir, truncate):
        if torn:
            result.torn_segments += 1
            log.warning("journal_tail_truncated" if truncate else "journal_tail_invalid",
                        segment=str(_path), valid_records=len(records))
        for rec in records:
            result.records += 1
            kind = rec.kind
            state = feeds.get(rec.feed)
            if kind == FEED:
                if state is None:
                    try:
                        name, exchange, cfg = feed_config_from(rec.data)
                        codec = CODECS[exchange](cfg)
                    except (ValueError, KeyError, TypeError, msgspec.ValidationError) as e:
                        log.error("journal_feed_unreadable", journal=instance,
                                  error=f"{type(e).__name__}: {e}"[:200])
                        continue  # its records are skipped: this version cannot decode them
                    feeds[rec.feed] = FeedState(name, exchange, codec)
                continue
            if state is None:
                continue  # records of a feed whose FEED record was lost: cannot decode
            key = f"{instance}/{state.name}"
            if kind == CHECKPOINT:
                # Only the oldest segment's checkpoints matter: later ones describe the
                # state replay has reached by itself.
                if first_segment:
                    state.last_seq = max(state.last_seq, rec.seq)
                    problem: str | None = None
                    saved: Any = None
                    try:
                        saved = orjson.loads(rec.data)
                    except orjson.JSONDecodeError as e:
                        problem = f"not JSON (an older format?): {e}"
                    if saved is not None:
                        state.codec, problem = make_codec(state.codec.feed, saved)
                    if problem is not None:
                        # Replay what can be replayed with a fresh codec: trades and
                        # events decode as before; books resync at the next snapshot.
                        result.unreadable_checkpoints += 1
                        log.warning("checkpoint_unreadable", journal=instance,
                                    feed=state.name, error=problem[:200])
                continue
            if kind == CONNECT:
                state.codec.on_connect()
            elif kind == ROTATE:
                state.codec.on_rotate()
            elif kind == FRAMES:
                assert rec.frames is not None
                out = state.codec.parse_batch(rec.frames, rec.ts, rec.seq)
                state.last_seq = max(state.last_seq, rec.seq + len(rec.frames) - 1,
                                     out.last_seq)
                emit(key, state.exchange, state.name, out)
            elif kind == FRAME:
                out = state.codec.parse(rec.data, rec.ts, rec.seq)
                state.last_seq = max(state.last_seq, rec.seq, out.last_seq)
                emit(key, state.exchange, state.name, out)
            elif kind == REST:
                req = RestRequest(rec.key, rec.url)
                out = state.codec.on_rest(req, rec.status, rec.data, rec.ts, rec.seq)
                state.last_seq = max(state.last_seq, rec.seq, out.last_seq)
                emit(key, state.exchange, state.name, out)
            elif kind == EVENT:
                event, detail = orjson.loads(rec.data)
                out = state.codec.new_output()
                out.event(None, None, rec.ts, rec.seq, state.name, event, detail)
                state.last_seq = max(state.last_seq, rec.seq)
                emit(key, state.exchange, state.name, out)
        first_segment = False
    return {s.name: s for s in feeds.values()}


def _journal_bounds(journal_dir: Path) -> tuple[int, set[str]]:
    """Oldest record time and the exchanges of a journal (for loading coverage)."""
    min_ts = 2**63
    exchanges: set[str] = set()
    for _path, records, _torn in records_of(journal_dir, truncate=False):
        for rec in records:
            if rec.kind == FEED:
                exchanges.add(orjson.loads(rec.data)["exchange"])
            elif rec.ts and rec.ts < min_ts:
                min_ts = rec.ts
    return min_ts, exchanges


def recover(root: Path, compression: str, staging: Path,
            flush_max_rows: int = 200_000) -> RecoveryResult:
    """Replay every orphaned journal under `root` into Parquet, exactly once."""
    result = RecoveryResult()
    for journal_dir, fd in adoptable_journals(root):
        try:
            _recover_one(root, journal_dir, compression, staging, flush_max_rows, result)
        except Exception as e:
            # Never crash-loop the daemon on a journal it cannot replay: keep it aside
            # for inspection (and a later version) and carry on.
            result.failed_journals += 1
            aside = root / FAILED_DIR / journal_dir.name
            log.exception("journal_unrecoverable", journal=journal_dir.name,
                          error=f"{type(e).__name__}: {e}"[:300], kept_at=str(aside))
            try:
                aside.parent.mkdir(parents=True, exist_ok=True)
                os.rename(journal_dir, aside)
            except OSError as move_error:
                log.error("journal_set_aside_failed", error=str(move_error))
        finally:
            os.close(fd)
    return result


def _recover_one(root: Path, journal_dir: Path, compression: str, staging: Path,
                 flush_max_rows: int, result: RecoveryResult) -> None:
    instance = journal_dir.name
    min_ts, _ = _journal_bounds(journal_dir)
    index = CoverageIndex()
    batcher = Batcher(flush_interval_s=1e9, flush_max_rows=flush_max_rows)
    counts = {"new": 0, "old": 0}

    def emit(key: str, exchange: str, _feed: str, out: Output) -> None:
        for block in out.blocks():
            table = block.TABLE
            keep = []
            for i, (ts, seq) in enumerate(zip(block.ts_recv, block.recv_seq,  # type: ignore[attr-defined]
                                              strict=True)):
                day = ts // NS_PER_DAY
                index.load(root, table, exchange, day, f"{instance}/", min_ts)
                if index.covers(key, table, exchange, day, seq):
                    counts["old"] += 1
                else:
                    keep.append(i)
            if not keep:
                continue
            counts["new"] += len(keep)
            part = block if len(keep) == len(block) else block.take(keep)
            full = batcher.add(table, exchange, part, 0.0, key)
            if full is not None:
                _commit(full.key)

    def _commit(key: Any) -> None:
        batch = batcher.take(key)
        commit(root, staging, batch, compression)
        result.files += 1

    states = replay_journal(journal_dir, truncate=True, emit=emit, result=result)
    for key in batcher.partitions():
        _commit(key)
    result.journals += 1
    result.rows_committed += counts["new"]
    result.rows_already_committed += counts["old"]
    for name, state in states.items():
        prev = result.feeds.get(name)
        if prev is None or state.last_seq > prev.last_seq:
            result.feeds[name] = state
    log.info("journal_recovered", journal=instance, rows_committed=counts["new"],
             rows_already_committed=counts["old"], records=result.records)
    # Everything derived from this journal is committed (and fsync'd): it can go.
    shutil.rmtree(journal_dir, ignore_errors=True)


__all__ = ["CoverageIndex", "RecoveryResult", "adoptable_journals", "recover",
           "replay_journal"]
