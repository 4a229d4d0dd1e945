"""`ingestd replay`: re-derive every table from the raw frames `[journal] keep_raw_days` kept.

Owns: finding the kept segments under `<root>/.raw/<instance>/` (each journal's segments
in their order, journals in the order they were written), choosing those a
`--since`/`--until` window needs, running them through today's codecs with
`recovery.replay_journal` - the one mechanism crash recovery uses too: FRAMES records
decoded as the same batches, each feed's codec seeded from its first checkpoint - into a
new root with the live layout, schemas and coverage metadata, keeping the rows whose
ts_recv lies in the window, and the progress line shown on a terminal.

The codecs are the registry's (`ingestd.exchanges.CODECS`) unless `codecs` names others
per exchange id: the hook through which a codec fix (or a test's subclass) is replayed.

Must not: write, move, lock or truncate anything under the live root (segments are only
read; staging lives in the output root), write into the live root or a directory inside
it, or pick exit codes (cli.py does).
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from ingestd.exchanges.base import Codec, Output
from ingestd.sink.journal import RAW_DIR, Record, iter_segments
from ingestd.sink.parquet import Staging
from ingestd.sink.recovery import RecoveryResult, RowSink, replay_journal

__all__ = ["Progress", "ReplayError", "ReplayResult", "kept_journals", "parse_time",
           "replay", "terminal_progress"]

# Rows received before `until` can be released by a record up to this much later (book
# diffs buffered until their REST snapshot arrives): segments this far past it are read.
UNTIL_TAIL_NS = 600 * 1_000_000_000


class ReplayError(Exception):
    """The output directory cannot be used (inside the live root, not empty, not
    writable)."""


@dataclass(slots=True)
class Progress:
    segments_done: int
    segments_total: int
    rows: int


@dataclass(slots=True)
class ReplayResult:
    journals: int = 0
    segments: int = 0
    records: int = 0
    rows: int = 0
    files: int = 0
    unreadable_checkpoints: int = 0
    torn_segments: int = 0


def parse_time(text: str) -> int:
    """An ISO 8601 date or time (UTC unless it says otherwise) as ns since the epoch."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not an ISO 8601 time: {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp()) * 1_000_000_000 + when.microsecond * 1_000


def kept_journals(root: Path) -> list[tuple[str, list[Path]]]:
    """(instance, its kept segments in order) for every journal under `<root>/.raw/`, the
    journals ordered by when their first kept segment was written."""
    base = root / RAW_DIR
    if not base.is_dir():
        return []
    found: list[tuple[int, str, list[Path]]] = []
    for d in base.iterdir():
        segments = iter_segments(d) if d.is_dir() else []
        if not segments:
            continue
        try:
            first_ns = segments[0].stat().st_mtime_ns
        except FileNotFoundError:
            first_ns = 0
        found.append((first_ns, d.name, segments))
    found.sort()
    return [(name, segments) for _, name, segments in found]


def _window(segments: list[Path], since_ns: int | None, until_ns: int | None) -> list[Path]:
    """The segments a window needs: from the first one written at or after `since` (its
    checkpoints seed the codecs; every segment before it ended before `since`) through
    the first one written after `until` plus the tail. A segment's mtime is the time its
    last record was written, a little after that record was received."""
    chosen: list[Path] = []
    for p in segments:
        try:
            mtime_ns = p.stat().st_mtime_ns
        except FileNotFoundError:
            continue  # pruned meanwhile (oldest first: the next one's checkpoint seeds)
        if since_ns is not None and mtime_ns < since_ns:
            continue
        chosen.append(p)
        if until_ns is not None and mtime_ns >= until_ns + UNTIL_TAIL_NS:
            break
    return chosen


def _check_out(root: Path, out: Path) -> None:
    live = root.resolve()
    target = out.resolve()
    if target == live or live in target.parents:
        raise ReplayError(f"--out {out}: inside the live root {root}; replay writes a new "
                          "root and never changes the live one")
    if target in live.parents:
        raise ReplayError(f"--out {out}: contains the live root {root}")
    try:
        target.mkdir(parents=True, exist_ok=True)
        if any(target.iterdir()):
            raise ReplayError(f"--out {out}: not empty; replay writes a new root")
        probe = target / f".ingestd-probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ReplayError(f"--out {out}: not a usable output directory: "
                          f"{e.strerror or e}") from None


def replay(root: Path, out: Path, *, since_ns: int | None = None,
           until_ns: int | None = None, compression: str = "zstd",
           flush_max_rows: int = 200_000, codecs: Mapping[str, type[Codec]] | None = None,
           progress: Callable[[Progress], None] | None = None) -> ReplayResult:
    """Replay every kept segment of the live root `root` into the new root `out`: the
    rows with since <= ts_recv < until (either bound optional). `codecs` replaces the
    registry's codec class for the exchanges it names. Blocking."""
    _check_out(root, out)
    registry: Mapping[str, type[Codec]] | None = None
    if codecs:
        from ingestd.exchanges import CODECS

        registry = {**CODECS, **codecs}
    journals = [(name, _window(segments, since_ns, until_ns))
                for name, segments in kept_journals(root)]
    journals = [(name, segments) for name, segments in journals if segments]
    total = sum(len(segments) for _, segments in journals)
    result = ReplayResult()
    staging = Staging(out)
    staging.open()
    sink = RowSink(out, staging.path, compression, flush_max_rows)
    low = since_ns if since_ns is not None else -(2**63)
    high = until_ns if until_ns is not None else 2**63

    def emit(key: str, exchange: str, _feed: str, output: Output) -> None:
        for block in output.blocks():
            ts = block.ts_recv  # type: ignore[attr-defined]
            if low <= min(ts) and max(ts) < high:
                sink.add(block, exchange, key)
                continue
            keep = [i for i, t in enumerate(ts) if low <= t < high]
            if keep:
                sink.add(block.take(keep), exchange, key)

    def segment_done(_path: Path, _records: list[Record]) -> None:
        result.segments += 1
        if progress is not None:
            progress(Progress(result.segments, total, sink.rows))

    try:
        for name, segments in journals:
            counts = RecoveryResult()
            replay_journal(root / RAW_DIR / name, truncate=False, emit=emit, result=counts,
                           segments=segments, codecs=registry, on_segment=segment_done)
            result.journals += 1
            result.records += counts.records
            result.unreadable_checkpoints += counts.unreadable_checkpoints
            result.torn_segments += counts.torn_segments
        sink.finish()
    finally:
        staging.close()
    result.rows = sink.rows
    result.files = sink.files
    return result


def terminal_progress(stream: TextIO | None = None) -> Callable[[Progress], None] | None:
    """A progress line rewritten in place on `stream` (stderr) if it is a terminal;
    None (no output at all) otherwise."""
    out = stream if stream is not None else sys.stderr
    try:
        tty = out.isatty()
    except (AttributeError, ValueError, OSError):
        tty = False
    if not tty:
        return None

    def show(p: Progress) -> None:
        width = 30
        filled = width * p.segments_done // max(p.segments_total, 1)
        out.write(f"\rreplay [{'#' * filled}{'.' * (width - filled)}] "
                  f"{p.segments_done}/{p.segments_total} segments, {p.rows} rows")
        if p.segments_done >= p.segments_total:
            out.write("\n")
        out.flush()

    return show

