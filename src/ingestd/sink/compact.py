"""Compaction: merge a closed day's part files into a few large, sorted files.

Owns: for each `<table>/exchange=<id>/date=<day>` partition of a closed UTC day with more
than one file, reading every file, sorting by (symbol, ts_recv, recv_seq), writing one
file (row groups of `row_group_rows`, coverage = union of the inputs'), verifying it
(read back, it equals the sorted concatenation of the inputs, row for row), publishing it
atomically, then deleting the inputs. A manifest under `<root>/.compaction/` names the
inputs before the output is published, so a crash between publish and delete is finished
by the next run (idempotent). Safe while a daemon writes: only files listed at the start
are merged; anything the daemon adds later stays for the next run.

Must not: run on the event loop (blocking), delete an input before the output is
verified and durable, or touch today's partition.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import structlog

from ingestd.schema import SCHEMAS, TABLES
from ingestd.sink.fsutil import fsync_dir
from ingestd.sink.parquet import COVERAGE_KEY, DICTIONARY_COLUMNS

log = structlog.get_logger("ingestd.compact")

MANIFEST_DIR = ".compaction"
COMPACT_PREFIX = "compact-"
DEFAULT_ROW_GROUP_ROWS = 500_000


@dataclass
class CompactResult:
    partitions: int = 0
    files_in: int = 0
    files_out: int = 0
    rows: int = 0
    resumed: int = 0
    skipped: list[str] = field(default_factory=list)


def _merge_coverage(tables: list[pa.Table]) -> dict[str, list[list[int]]]:
    merged: dict[str, list[list[int]]] = {}
    for t in tables:
        raw = (t.schema.metadata or {}).get(COVERAGE_KEY.encode())
        if not raw:
            continue
        for feed, spans in orjson.loads(raw).items():
            merged.setdefault(feed, []).extend([list(s) for s in spans])
    for spans in merged.values():
        spans.sort()
        out: list[list[int]] = []
        for lo, hi in spans:
            if out and lo <= out[-1][1] + 1:
                out[-1][1] = max(out[-1][1], hi)
            else:
                out.append([lo, hi])
        spans[:] = out
    return merged


def _finish_manifests(root: Path, result: CompactResult) -> None:
    """Complete compactions a crash interrupted: the output, if published, wins."""
    mdir = root / MANIFEST_DIR
    if not mdir.is_dir():
        return
    for manifest in sorted(mdir.glob("*.json")):
        m = orjson.loads(manifest.read_bytes())
        output = Path(m["output"])
        if output.exists():
            for name in m["inputs"]:
                Path(name).unlink(missing_ok=True)
            fsync_dir(output.parent)
            result.resumed += 1
        manifest.unlink()


def compact_partition(root: Path, partition: Path, table_name: str,
                      row_group_rows: int = DEFAULT_ROW_GROUP_ROWS) -> tuple[int, int]:
    """Merge one partition's files; returns (files merged, rows). Blocking."""
    files = sorted(p for p in partition.glob("*.parquet"))
    if len(files) <= 1:
        return 0, 0
    tables = [pq.read_table(f) for f in files]
    schema = SCHEMAS[table_name]
    merged = pa.concat_tables([t.select(schema.names).cast(schema) for t in tables])
    order = pc.sort_indices(merged, sort_keys=[("symbol", "ascending"),
                                               ("ts_recv", "ascending"),
                                               ("recv_seq", "ascending")])
    out_table = merged.take(order)
    meta = dict(schema.metadata or {})
    coverage = _merge_coverage(tables)
    if coverage:
        meta[COVERAGE_KEY.encode()] = orjson.dumps(coverage)
    meta[b"ingestd.compacted_from"] = str(len(files)).encode()
    out_table = out_table.replace_schema_metadata(meta)
    first_ts = min(int(f.name.split("-", 1)[0]) if f.name[0].isdigit()
                   else int(f.name.split("-")[1]) for f in files)
    name = f"{COMPACT_PREFIX}{first_ts:019d}-{uuid.uuid4().hex}.parquet"
    staging = root / ".staging" / "compaction"
    staging.mkdir(parents=True, exist_ok=True)
    tmp = staging / (name + ".tmp")
    with open(tmp, "wb") as f:
        pq.write_table(out_table, f, compression="zstd", row_group_size=row_group_rows,
                       use_dictionary=DICTIONARY_COLUMNS[table_name])
        f.flush()
        os.fsync(f.fileno())
    # Verify before anything is deleted: the file read back is exactly the sorted merge
    # (a permutation of the inputs' rows), and no input row is missing.
    written = pq.read_table(tmp)
    expected_rows = sum(t.num_rows for t in tables)
    if written.num_rows != expected_rows or not written.equals(out_table):
        tmp.unlink()
        raise RuntimeError(f"compaction of {partition} failed verification")
    final = partition / name
    mdir = root / MANIFEST_DIR
    mdir.mkdir(exist_ok=True)
    manifest = mdir / f"{uuid.uuid4().hex}.json"
    manifest.write_bytes(orjson.dumps({"output": str(final),
                                       "inputs": [str(f) for f in files]}))
    with open(manifest, "rb+") as mf:
        os.fsync(mf.fileno())
    fsync_dir(mdir)
    os.rename(tmp, final)
    fsync_dir(partition)
    for src in files:
        src.unlink()
    fsync_dir(partition)
    manifest.unlink()
    return len(files), merged.num_rows


def compact(root: Path, before_date: str | None = None,
            row_group_rows: int = DEFAULT_ROW_GROUP_ROWS) -> CompactResult:
    """Compact every partition whose date is before `before_date` (default: today UTC)."""
    result = CompactResult()
    _finish_manifests(root, result)
    cutoff = before_date or datetime.now(UTC).strftime("%Y-%m-%d")
    for table_name in TABLES:
        for partition in sorted((root / table_name).glob("exchange=*/date=*")):
            date = partition.name.removeprefix("date=")
            if date >= cutoff:
                continue
            n_files, rows = compact_partition(root, partition, table_name, row_group_rows)
            if n_files:
                result.partitions += 1
                result.files_in += n_files
                result.files_out += 1
                result.rows += rows
                log.info("compacted", partition=str(partition.relative_to(root)),
                         files=n_files, rows=rows)
    return result
