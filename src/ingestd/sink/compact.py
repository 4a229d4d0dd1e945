"""Compaction: merge a closed day's part files into a few large, sorted files.

Owns: for each `<table>/exchange=<id>/date=<day>` partition of a closed UTC day with more
than one file, merging every file into one file sorted by (symbol, ts_recv, recv_seq)
(row groups of `row_group_rows`, coverage = union of the inputs'), verifying it, publishing
it atomically, then deleting the inputs. A manifest under `<root>/.compaction/` names the
inputs before the output is published, so a crash between publish and delete is finished
by the next run (idempotent). Safe while a daemon writes: only files listed at the start
are merged; anything the daemon adds later stays for the next run.

One run per root at a time: a run holds an flock on `<root>/.compaction/.lock` from before
it finishes interrupted manifests until it returns. A second run does not wait: it raises
`CompactionBusy` (the CLI exits 75, EX_TEMPFAIL) - unless called with `wait=True`
(`ingestd compact --wait`), then it logs `compaction_waiting` and blocks until the lock is
free. The lock dies with its process, so a crashed run never leaves a stale lock.

Memory is bounded whatever the size of the day (an external merge sort): the inputs are
read in record batches, `run_rows` rows at a time are sorted in memory and written as a
sorted run to this run's own staging directory (`parquet.Staging`, so a daemon starting
meanwhile leaves it alone); the runs are then merged, at most `FAN_IN` at once (more runs
take extra passes), `run_rows // FAN_IN` rows buffered per run, into row groups of
`row_group_rows` rows. Peak: about `run_rows` rows sorted plus one output row group
(~80 bytes a book row in Arrow), not the partition. Verification reads the output back
in batches: row count, order (every row's key >= the previous one's) and an
order-independent fingerprint of every column (sums of polars row hashes) equal to the
inputs' - sorted and the same multiset of rows is the sorted merge of the inputs.

The output keeps the inputs' timestamp unit (`timestamp_unit = "us"` files stay us; ns
when a partition mixes both, which is exact).

Delta tables (`format = "delta"`, local or object store: `compact_delta`) are compacted by
Delta itself: optimize (bin-packing of the closed days' partitions), a checkpoint, expired
log cleanup, vacuum (files out of the table, past the retention). `compact_storage` is
what `ingestd compact` runs: it picks by `[storage]`.

Must not: run on the event loop (blocking), delete an input before the output is
verified and durable, touch today's partition, or load a whole partition into memory.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import orjson
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import structlog

from ingestd.config import StorageConfig
from ingestd.schema import TABLES, schema_for
from ingestd.sink.fsutil import fsync_dir
from ingestd.sink.parquet import COVERAGE_KEY, DICTIONARY_COLUMNS, Staging

log = structlog.get_logger("ingestd.compact")

MANIFEST_DIR = ".compaction"
LOCK_FILE = ".lock"
COMPACT_PREFIX = "compact-"
DEFAULT_ROW_GROUP_ROWS = 500_000
# Rows sorted in memory at once (one sorted run): ~80 MB of book rows, ~3x that to sort.
DEFAULT_RUN_ROWS = 1_000_000
# Sorted runs merged at once; more runs are merged in extra passes.
FAN_IN = 32
SORT_KEYS = [("symbol", "ascending"), ("ts_recv", "ascending"), ("recv_seq", "ascending")]
# Rows read from an input file per batch.
READ_BATCH_ROWS = 65_536
# Sorted runs are temporary: fast compression; small row groups so a reader of a run holds
# only one merge batch.
RUN_COMPRESSION = "lz4"


class CompactionBusy(RuntimeError):
    """Another compaction run holds this root's lock."""


@dataclass
class CompactResult:
    partitions: int = 0
    files_in: int = 0
    files_out: int = 0
    rows: int = 0
    resumed: int = 0
    skipped: list[str] = field(default_factory=list)


@contextmanager
def compaction_lock(root: Path, wait: bool = False) -> Iterator[None]:
    """Hold the root's compaction lock (flock on `<root>/.compaction/.lock`) for the block.

    Raises `CompactionBusy` if another run holds it, unless `wait`: then blocks until it
    is free."""
    mdir = root / MANIFEST_DIR
    mdir.mkdir(parents=True, exist_ok=True)
    path = mdir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise CompactionBusy(
                    f"another compaction is running on {root} (it holds {path})") from None
            log.info("compaction_waiting", lock=str(path))
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


# ---- coverage, manifests ----------------------------------------------------------------
def _merge_coverage(metadatas: list[dict[bytes, bytes] | None]) -> dict[str, list[list[int]]]:
    merged: dict[str, list[list[int]]] = {}
    for meta in metadatas:
        raw = (meta or {}).get(COVERAGE_KEY.encode())
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


# ---- the streaming merge ----------------------------------------------------------------
# A row's sort key as Python values, ordered as Arrow sorts (symbol: UTF-8 bytes = code
# points, nulls last; then ts_recv and recv_seq as integers).
Key = tuple[bool, str, int, int]
KeyColumns = tuple[pa.Array, pa.Array, pa.Array]


def _key_columns(batch: pa.RecordBatch) -> KeyColumns:
    return (batch.column("symbol"), batch.column("ts_recv").view(pa.int64()),
            batch.column("recv_seq"))


def _key_at(cols: KeyColumns, i: int) -> Key:
    sym = cols[0][i].as_py()
    return (sym is None, sym or "", cols[1][i].as_py(), cols[2][i].as_py())


def _sort(table: pa.Table) -> pa.Table:
    return table.take(pc.sort_indices(table, sort_keys=SORT_KEYS))


class _Cursor:
    """Reads one sorted run batch by batch; hands out the prefix of rows <= a key."""

    def __init__(self, batches: Iterator[pa.RecordBatch]) -> None:
        self._batches = batches
        self.batch: pa.RecordBatch | None = None
        self._keys: KeyColumns | None = None
        self._next_batch()

    def _next_batch(self) -> None:
        self.batch, self._keys = None, None
        for b in self._batches:
            if b.num_rows:
                self.batch, self._keys = b, _key_columns(b)
                return

    def last_key(self) -> Key:
        assert self.batch is not None and self._keys is not None
        return _key_at(self._keys, self.batch.num_rows - 1)

    def take_until(self, bound: Key) -> pa.RecordBatch | None:
        """The current batch's rows with key <= bound (a prefix: the run is sorted)."""
        assert self.batch is not None and self._keys is not None
        n = self.batch.num_rows
        if _key_at(self._keys, n - 1) <= bound:
            head = self.batch
            self._next_batch()
            return head
        lo, hi = 0, n - 1
        while lo < hi:  # first row with key > bound
            mid = (lo + hi) // 2
            if _key_at(self._keys, mid) <= bound:
                lo = mid + 1
            else:
                hi = mid
        if lo == 0:
            return None
        head = self.batch.slice(0, lo)
        self.batch = self.batch.slice(lo)
        self._keys = _key_columns(self.batch)
        return head


class _GroupWriter:
    """A Parquet file written in row groups of exactly `group_rows` (the last: the rest),
    fsync'd on close."""

    def __init__(self, path: Path, schema: pa.Schema, group_rows: int, table_name: str,
                 compression: str) -> None:
        self.path = path
        self.group_rows = group_rows
        self.rows = 0
        self._file: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._writer = pq.ParquetWriter(self._file, schema, compression=compression,
                                        use_dictionary=DICTIONARY_COLUMNS[table_name])
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def write(self, table: pa.Table) -> None:
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self.rows += table.num_rows
        while self._pending_rows >= self.group_rows:
            buf = pa.concat_tables(self._pending)
            self._writer.write_table(buf.slice(0, self.group_rows),
                                     row_group_size=self.group_rows)
            rest = buf.slice(self.group_rows)
            self._pending = [rest] if rest.num_rows else []
            self._pending_rows = rest.num_rows

    def close(self) -> None:
        try:
            if self._pending_rows:
                self._writer.write_table(pa.concat_tables(self._pending),
                                         row_group_size=self.group_rows)
            self._pending = []
            self._writer.close()
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()


def _merge(cursors: list[_Cursor], out: _GroupWriter) -> None:
    """K-way merge of sorted runs, a batch at a time: every row <= the smallest of the
    runs' current last keys can be written now (no run has a smaller row left)."""
    live = [c for c in cursors if c.batch is not None]
    while live:
        bound = min(c.last_key() for c in live)
        parts = [p for c in live if (p := c.take_until(bound)) is not None]
        table = pa.Table.from_batches(parts)
        out.write(table if len(parts) == 1 else _sort(table))  # one part: sorted already
        live = [c for c in live if c.batch is not None]


class _Fingerprint:
    """Row count and an order-independent digest of every row (sums of 64-bit row hashes,
    split in halves so the sums never overflow)."""

    def __init__(self) -> None:
        self.rows = 0
        self.low = 0
        self.high = 0

    def add(self, batch: pa.RecordBatch) -> None:
        h = pl.from_arrow(batch).hash_rows()  # type: ignore[union-attr]
        self.rows += len(h)
        self.low += int((h % (1 << 32)).sum())
        self.high += int((h // (1 << 32)).sum())

    def digest(self) -> tuple[int, int, int]:
        return self.rows, self.low, self.high


def _read_batches(path: Path, schema: pa.Schema, batch_rows: int) -> Iterator[pa.RecordBatch]:
    pf = pq.ParquetFile(path)
    try:
        for b in pf.iter_batches(batch_size=batch_rows, columns=schema.names):
            yield b.cast(schema)
    finally:
        pf.close()


def _is_sorted(table: pa.Table) -> bool:
    """Arrow's sort is stable: a sorted table's sort indices are 0, 1, 2, ..."""
    if table.num_rows < 2:
        return True
    idx = pc.sort_indices(table, sort_keys=SORT_KEYS)
    return bool(pc.all(pc.equal(pc.pairwise_diff(idx), 1)).as_py())


def _verify(path: Path, schema: pa.Schema, expected: _Fingerprint, batch_rows: int) -> bool:
    got = _Fingerprint()
    prev: pa.RecordBatch | None = None  # the previous batch's last row
    for b in _read_batches(path, schema, batch_rows):
        got.add(b)
        if not _is_sorted(pa.Table.from_batches([prev, b] if prev is not None else [b])):
            return False
        prev = b.slice(b.num_rows - 1)
    return got.digest() == expected.digest()


def _sorted_runs(files: list[Path], schema: pa.Schema, table_name: str, run_rows: int,
                 merge_batch_rows: int, workdir: Path,
                 fingerprint: _Fingerprint) -> tuple[list[Path], pa.Table | None]:
    """Pass 1: the inputs, `run_rows` rows at a time, sorted. Returns the sorted run files,
    or (no files, the sorted table) when everything fit in one run."""
    runs: list[Path] = []
    pending: list[pa.RecordBatch] = []
    pending_rows = 0

    def sorted_pending() -> pa.Table:
        nonlocal pending, pending_rows
        table = _sort(pa.Table.from_batches(pending, schema=schema))
        pending, pending_rows = [], 0
        return table

    def spill() -> None:
        run = _GroupWriter(workdir / f"run-{uuid.uuid4().hex}.parquet.tmp", schema,
                           merge_batch_rows, table_name, RUN_COMPRESSION)
        try:
            run.write(sorted_pending())
        finally:
            run.close()
        runs.append(run.path)

    for f in files:
        for b in _read_batches(f, schema, min(READ_BATCH_ROWS, run_rows)):
            fingerprint.add(b)
            pending.append(b)
            pending_rows += b.num_rows
            if pending_rows >= run_rows:
                spill()
    if not runs:
        return [], sorted_pending()
    if pending_rows:
        spill()
    return runs, None


def _cursor(path: Path, schema: pa.Schema, batch_rows: int) -> _Cursor:
    return _Cursor(_read_batches(path, schema, batch_rows))


def _finest_unit(files: list[Path]) -> str:
    """The timestamp unit of the output: the files' own ("ns", or "us" when written with
    `timestamp_unit = "us"`); "ns" when they differ (us -> ns is exact, ns -> us is not)."""
    units = set()
    for f in files:
        ts = pq.read_schema(f).field("ts_recv").type
        units.add(ts.unit if pa.types.is_timestamp(ts) else "ns")
    return "us" if units == {"us"} else "ns"


def compact_partition(root: Path, partition: Path, table_name: str,
                      row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
                      run_rows: int = DEFAULT_RUN_ROWS,
                      staging: Path | None = None) -> tuple[int, int]:
    """Merge one partition's files; returns (files merged, rows). Blocking. The caller
    holds the root's compaction lock; `staging` is its own staging directory."""
    files = sorted(p for p in partition.glob("*.parquet"))
    if len(files) <= 1:
        return 0, 0
    if staging is None:
        own = Staging(root)
        own.open()
        try:
            return compact_partition(root, partition, table_name, row_group_rows, run_rows,
                                     own.path)
        finally:
            own.close()
    schema = schema_for(table_name, _finest_unit(files))
    meta = dict(schema.metadata or {})
    coverage = _merge_coverage([pq.read_schema(f).metadata for f in files])
    if coverage:
        meta[COVERAGE_KEY.encode()] = orjson.dumps(coverage)
    meta[b"ingestd.compacted_from"] = str(len(files)).encode()
    first_ts = min(int(f.name.split("-", 1)[0]) if f.name[0].isdigit()
                   else int(f.name.split("-")[1]) for f in files)
    name = f"{COMPACT_PREFIX}{first_ts:019d}-{uuid.uuid4().hex}.parquet"
    tmp = staging / (name + ".tmp")
    merge_batch_rows = max(1, run_rows // FAN_IN)
    expected = _Fingerprint()
    runs: list[Path] = []
    try:
        runs, in_memory = _sorted_runs(files, schema, table_name, run_rows, merge_batch_rows,
                                       staging, expected)
        while len(runs) > FAN_IN:  # extra passes: FAN_IN runs -> one longer run
            merged: list[Path] = []
            for i in range(0, len(runs), FAN_IN):
                group = runs[i:i + FAN_IN]
                run = _GroupWriter(staging / f"run-{uuid.uuid4().hex}.parquet.tmp", schema,
                                   merge_batch_rows, table_name, RUN_COMPRESSION)
                try:
                    _merge([_cursor(p, schema, merge_batch_rows) for p in group], run)
                finally:
                    run.close()
                merged.append(run.path)
                for p in group:
                    p.unlink()
            runs = merged
        out = _GroupWriter(tmp, schema.with_metadata(meta), row_group_rows, table_name,
                           "zstd")
        try:
            if in_memory is not None:
                _merge([_Cursor(iter(in_memory.to_batches(max_chunksize=merge_batch_rows)))],
                       out)
                in_memory = None
            else:
                _merge([_cursor(p, schema, merge_batch_rows) for p in runs], out)
        finally:
            out.close()
        for p in runs:
            p.unlink()
        runs = []
        # Verify before anything is deleted: the file read back is sorted and holds
        # exactly the inputs' rows (count and fingerprint of every column).
        if out.rows != expected.rows or not _verify(tmp, schema, expected,
                                                    READ_BATCH_ROWS):
            raise RuntimeError(f"compaction of {partition} failed verification")
    except BaseException:
        tmp.unlink(missing_ok=True)
        for p in runs:
            p.unlink(missing_ok=True)
        raise
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
    return len(files), expected.rows


def compact(root: Path, before_date: str | None = None,
            row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
            run_rows: int = DEFAULT_RUN_ROWS, wait: bool = False) -> CompactResult:
    """Compact every partition whose date is before `before_date` (default: today UTC).

    Holds the root's compaction lock throughout: raises `CompactionBusy` if another run
    holds it, or with `wait` blocks until it is free."""
    result = CompactResult()
    if not root.is_dir():
        return result
    with compaction_lock(root, wait):
        _finish_manifests(root, result)
        cutoff = before_date or datetime.now(UTC).strftime("%Y-%m-%d")
        staging = Staging(root)
        staging.open()
        try:
            for table_name in TABLES:
                for partition in sorted((root / table_name).glob("exchange=*/date=*")):
                    date = partition.name.removeprefix("date=")
                    if date >= cutoff:
                        continue
                    n_files, rows = compact_partition(root, partition, table_name,
                                                      row_group_rows, run_rows, staging.path)
                    if n_files:
                        result.partitions += 1
                        result.files_in += n_files
                        result.files_out += 1
                        result.rows += rows
                        log.info("compacted", partition=str(partition.relative_to(root)),
                                 files=n_files, rows=rows)
        finally:
            staging.close()
    return result


# ---- Delta tables (`format = "delta"`) ------------------------------------------------------
@dataclass
class DeltaCompactResult(CompactResult):
    tables: int = 0
    checkpoints: int = 0
    vacuumed_files: int = 0


def compact_delta(storage: StorageConfig, before_date: str | None = None,
                  vacuum_retention_hours: int | None = None,
                  target_size_bytes: int | None = None) -> DeltaCompactResult:
    """Every ingestd Delta table under `storage.root` (local or object store): optimize
    (bin-packing compaction of the closed days' partitions, `date` < `before_date`,
    default today UTC: small files of one partition become few large ones, the rows
    unchanged), a checkpoint (readers replay no long log), expired log files cleaned up,
    then vacuum: files no longer in the table (the compacted-away ones, and data files of
    commits that failed) deleted once older than `vacuum_retention_hours` - default the
    table's `delta.deletedFileRetentionDuration`, 7 days. Never shorter while daemons
    write: a file written for a commit still in flight would be deleted under it.

    Safe while daemons append: Delta's optimistic concurrency makes appends and the
    compaction's commit both succeed (they touch different files)."""
    from ingestd.sink.delta import delta_tables, storage_options

    result = DeltaCompactResult()
    cutoff = before_date or datetime.now(UTC).strftime("%Y-%m-%d")
    for name, table in delta_tables(storage.root, storage_options(storage)).items():
        result.tables += 1
        metrics = table.optimize.compact(partition_filters=[("date", "<", cutoff)],
                                         target_size=target_size_bytes)
        removed = int(metrics.get("numFilesRemoved", 0))
        if removed:
            result.partitions += int(metrics.get("partitionsOptimized", 0))
            result.files_in += removed
            result.files_out += int(metrics.get("numFilesAdded", 0))
        table.create_checkpoint()
        result.checkpoints += 1
        table.cleanup_metadata()
        deleted = table.vacuum(retention_hours=vacuum_retention_hours, dry_run=False,
                               enforce_retention_duration=vacuum_retention_hours is None)
        result.vacuumed_files += len(deleted)
        result.rows += table.count()
        log.info("delta_compacted", table=name, files_in=removed,
                 files_out=int(metrics.get("numFilesAdded", 0)), vacuumed=len(deleted),
                 version=table.version())
    return result


def compact_storage(storage: StorageConfig, before_date: str | None = None,
                    wait: bool = False,
                    vacuum_retention_hours: int | None = None) -> CompactResult:
    """`ingestd compact` for `[storage]`: Delta tables (local or object store), or the
    Parquet layout under a local root. One run per local directory at a time (the lock
    lives in `storage.local_path`)."""
    if storage.format == "delta":
        lock_dir = Path(storage.local_path)
        lock_dir.mkdir(parents=True, exist_ok=True)
        with compaction_lock(lock_dir, wait):
            return compact_delta(storage, before_date, vacuum_retention_hours)
    if storage.is_remote:
        raise ValueError("ingestd compact: Parquet under an object-store root is not "
                         "compacted (use format = \"delta\" for compaction there)")
    return compact(Path(storage.root.removeprefix("file://")), before_date, wait=wait)

