"""Crash recovery at start-up: replay dead processes' journals into Parquet exactly once.

Owns: finding journal directories under `<root>/.journal/` whose owner is gone (their
flock can be taken), reading their segments in order (cutting torn tails off), replaying
every record through the same codecs (restored from the checkpoint at the start of the
oldest segment), skipping every row that a committed file already holds (by the
`ingestd.coverage` metadata: feed key, table, partition and recv_seq interval), committing
the rest, and only then deleting the journal directory (or, when raw frames are kept,
moving its segments to `<root>/.raw/<instance>/`). Also `replay_journal`, the one
re-normalization of journal records that `ingestd replay` (replay.py) runs on kept
segments, with the codec classes it is given, and `RowSink`, the batching committer both
share.

Must not: run on the event loop (it is blocking; the daemon runs it in a thread before
any feed starts), or trust anything in a journal past its first invalid record.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import orjson
import structlog

from ingestd.config import FeedConfig
from ingestd.exchanges import CODECS
from ingestd.exchanges.base import Codec, Output, RestRequest, StateError
from ingestd.schema import Block
from ingestd.sink.batcher import NS_PER_DAY, Batcher, PartitionKey
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
    Record,
    feed_config_from,
    iter_segments,
    records_of,
)
from ingestd.sink.journal import keep_raw as keep_raw_segments
from ingestd.sink.parquet import FILE_AGE_MARGIN_NS, CoverageIndex, commit
from ingestd.sink.publish import CoverageLookup, LocalParquetPublisher, Publisher

log = structlog.get_logger("ingestd.recovery")

# Journals that could not be replayed are moved here (kept, never replayed again).
FAILED_DIR = ".journal-failed"



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
    coverage_files_read: int = 0   # committed files whose coverage metadata was read
    raw_segments_kept: int = 0     # segments moved to <root>/.raw after their recovery
    feeds: dict[str, FeedState] = field(default_factory=dict)  # feed name -> replayed state


class RowSink:
    """Rows replayed from a journal, batched per (table, exchange, day) and committed
    (blocking) with the same coverage metadata the writer records: through `publisher`,
    or as local Parquet files under `root` staged in `staging` when none is given."""

    def __init__(self, root: Path, staging: Path, compression: str,
                 flush_max_rows: int, publisher: Publisher | None = None) -> None:
        self.root = root
        self.staging = staging
        self.compression = compression
        self.publisher = publisher
        self.batcher = Batcher(flush_interval_s=1e9, flush_max_rows=flush_max_rows)
        self.files = 0
        self.rows = 0

    def add(self, block: Block, exchange: str, feed_key: str) -> None:
        self.rows += len(block)
        full = self.batcher.add(block.TABLE, exchange, block, 0.0, feed_key)
        if full is not None:
            self._commit(full.key)

    def finish(self) -> None:
        for key in self.batcher.partitions():
            self._commit(key)

    def _commit(self, key: PartitionKey) -> None:
        batch = self.batcher.take(key)
        if self.publisher is not None:
            self.publisher.publish(batch)
        else:
            commit(self.root, self.staging, batch, self.compression)
        self.files += 1


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


def _seeded_codec(cls: type[Codec], feed: FeedConfig, saved: Any) -> tuple[Codec, str | None]:
    """`cls` for `feed` with a checkpoint's state, or a fresh one and the reason why not."""
    codec = cls(feed)
    try:
        codec.restore(saved)
    except StateError as e:
        return cls(feed), str(e)
    return codec, None


def replay_journal(journal_dir: Path, *, truncate: bool,
                   emit: Callable[[str, str, str, Output], None],
                   result: RecoveryResult, segments: Sequence[Path] | None = None,
                   codecs: Mapping[str, type[Codec]] | None = None,
                   on_segment: Callable[[Path, list[Record]], None] | None = None,
                   ) -> dict[str, FeedState]:
    """Feed every record of a journal directory (or just `segments` of it, in order)
    through its codecs, calling `emit(feed key, exchange, feed name, Output)` for what
    each produces. Each feed's codec is an instance of `codecs[exchange]` (default: the
    registry), seeded from the feed's first checkpoint: later checkpoints describe the
    state replay has reached by itself. Frames of one FRAMES record are decoded as one
    batch, exactly as they were live."""
    instance = journal_dir.name
    registry = CODECS if codecs is None else codecs
    feeds: dict[int, FeedState] = {}
    seeded: set[int] = set()
    for _path, records, torn in records_of(journal_dir, truncate, segments):
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
                        codec = registry[exchange](cfg)
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
                # Only a feed's first checkpoint matters (the oldest segment's, or the one
                # a feed added or changed by a reload starts with): later ones describe
                # the state replay has reached by itself.
                if rec.feed not in seeded:
                    seeded.add(rec.feed)
                    state.last_seq = max(state.last_seq, rec.seq)
                    problem: str | None = None
                    saved: Any = None
                    try:
                        saved = orjson.loads(rec.data)
                    except orjson.JSONDecodeError as e:
                        problem = f"not JSON (an older format?): {e}"
                    if saved is not None:
                        state.codec, problem = _seeded_codec(
                            type(state.codec), state.codec.feed, saved)
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
        if on_segment is not None:
            on_segment(_path, records)
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
            flush_max_rows: int = 200_000, keep_raw: bool = False,
            publisher: Publisher | None = None) -> RecoveryResult:
    """Replay every orphaned journal under `root` (the local dir) exactly once: through
    `publisher` (its coverage says what is committed already), or into local Parquet
    under `root` staged in `staging` when none is given. With `keep_raw`, each recovered
    journal's segments are kept under `<root>/.raw/`."""
    result = RecoveryResult()
    if publisher is None:
        publisher = LocalParquetPublisher(root, compression=compression, staging_dir=staging)
    for journal_dir, fd in adoptable_journals(root):
        try:
            _recover_one(root, journal_dir, publisher, flush_max_rows, result, keep_raw)
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


def _recover_one(root: Path, journal_dir: Path, publisher: Publisher,
                 flush_max_rows: int, result: RecoveryResult, keep_raw: bool) -> None:
    instance = journal_dir.name
    min_ts, _ = _journal_bounds(journal_dir)
    index: CoverageLookup = publisher.coverage()
    sink = RowSink(root, publisher.staging_dir, "", flush_max_rows, publisher)
    counts = {"new": 0, "old": 0}
    prefix = f"{instance}/"

    def emit(key: str, exchange: str, _feed: str, out: Output) -> None:
        for block in out.blocks():
            table = block.TABLE
            keep = []
            for i, (ts, seq) in enumerate(zip(block.ts_recv, block.recv_seq,  # type: ignore[attr-defined]
                                              strict=True)):
                day = ts // NS_PER_DAY
                index.load(table, exchange, day, prefix, min_ts)
                if index.covers(key, table, exchange, day, seq):
                    counts["old"] += 1
                else:
                    keep.append(i)
            if not keep:
                continue
            counts["new"] += len(keep)
            sink.add(block if len(keep) == len(block) else block.take(keep), exchange, key)

    states = replay_journal(journal_dir, truncate=True, emit=emit, result=result)
    sink.finish()
    result.files += sink.files
    result.coverage_files_read += index.files_read
    result.journals += 1
    result.rows_committed += counts["new"]
    result.rows_already_committed += counts["old"]
    for name, state in states.items():
        prev = result.feeds.get(name)
        if prev is None or state.last_seq > prev.last_seq:
            result.feeds[name] = state
    log.info("journal_recovered", journal=instance, rows_committed=counts["new"],
             rows_already_committed=counts["old"], records=result.records,
             coverage_files_read=index.files_read)
    # Everything derived from this journal is committed (and fsync'd): it can go - as
    # kept raw frames, if those are kept.
    if keep_raw:
        segments = iter_segments(journal_dir)
        keep_raw_segments(root, instance, segments)
        result.raw_segments_kept += len(segments)
    shutil.rmtree(journal_dir, ignore_errors=True)


__all__ = ["FILE_AGE_MARGIN_NS", "CoverageIndex", "RecoveryResult", "RowSink",
           "adoptable_journals", "recover", "replay_journal"]
