"""`format = "delta"`: one Delta Lake table per table, appended to exactly once.

Owns: `<root>/<table>` as a Delta Lake table (the `deltalake` package, delta-rs), partitioned
by `exchange` and `date`, with the contract's schema in microseconds plus the `date`
partition column (date32, the UTC date of `ts_recv`, as in the Parquet layout's
`date=` directories); creating a table on its first commit (a race between daemons that
create it at once is settled by the store: the loser loads the winner's table); the
commits (one Delta commit per `publish_many` call: every partition of one table that was
due at one flush, so commits per table are bounded by `flush_interval_s` per daemon);
exactly-once across crashes; and what recovery asks (`DeltaCoverage`).

Exactly once. Every commit carries Delta application transactions ("txn" actions):
app id `ingestd/<feed key>/<table>/<exchange>/<date>` (the feed key is
`<journal instance>/<feed name>`, so each daemon instance and feed has its own), version
= the highest `recv_seq` of that feed in that partition that the commit holds. The
version is a watermark: every row of that feed, table and partition with a `recv_seq` at
or below it is committed. It stays one because
- the batches of one partition are committed in `recv_seq` order: each batch holds every
  row of its feed's interval (batcher.Coverage), and after a failed commit no later batch
  of that app id is committed before the failed rows are (the writer puts them back in
  front of its buffer; `publish` refuses a batch that starts above a failed one);
- a failed commit is resolved before `publish` returns: delta-rs may report an error for
  a commit that landed (the log entry was written, the answer lost), so on any error the
  table is read again and the transaction versions say whether it landed; while the
  store cannot be read, `publish` keeps trying (capped backoff; `close` aborts it - the
  journal keeps the rows and the next start's recovery settles them).
Recovery skips a journal row when its `recv_seq` <= that version (`DeltaCoverage`) and
commits the rest through `publish` with the dead instance's feed keys.

Durability: delta-rs does not fsync a local table's files, so after a local commit its
data files, their directories, the log entry and `_delta_log/` are fsync'd before
`publish` returns (only then may the journal drop the rows); if that fails the commit is
visible, so `PublishedNotDurable` is raised (never committed again; `sync_durable`
retries). A power cut between delta-rs's writes and that fsync may still leave the log
entry durable and a data file not - the window is a few milliseconds. On an object store
a commit is durable when its PUT returns.

Concurrency: several daemons (hosts) append to one table; delta-rs's optimistic
concurrency retries a commit whose version another writer took (appends never conflict
logically), at most `MAX_COMMIT_RETRIES` times. On S3 the store's conditional PUT
arbitrates: `conditional_put = "etag"` is set unless `[storage.options]` says otherwise
(S3-compatible stores such as SeaweedFS, MinIO, R2 need it; AWS S3 honours it too).

Storage options: `[storage.options]` `endpoint_url`, `region`, `allow_http` become
delta-rs's `AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ALLOW_HTTP`; any other key is passed
through unchanged. Credentials come only from the store's standard environment
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, ...), which
delta-rs reads itself; they are never logged.

Must not: run on the event loop (everything here blocks), decide when to flush (the
writer does), or commit a row whose `recv_seq` is at or below its app id's version.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final, cast
from urllib.parse import unquote

import orjson
import pyarrow as pa
import structlog
from deltalake import CommitProperties, DeltaTable, Transaction, WriterProperties, write_deltalake
from deltalake.exceptions import DeltaError, TableNotFoundError

from ingestd.config import StorageConfig
from ingestd.schema import SCHEMA_VERSION, schema_for
from ingestd.sink import fsutil
from ingestd.sink.batcher import Batch
from ingestd.sink.parquet import Committed, PublishedNotDurable, Staging, batch_table
from ingestd.stats import StoreStats

log = structlog.get_logger("ingestd.delta")

UNIT: Final = "us"
PARTITION_BY: Final = ["exchange", "date"]
# Appends never conflict logically: a commit whose version another writer took is
# retried on top of it, this many times at most (then the writer retries the batch).
MAX_COMMIT_RETRIES: Final = 100
# Table properties set when ingestd creates a table. Transactions last updated longer ago
# than this are forgotten (else one per instance, feed, table and day would pile up in
# every snapshot forever): a journal left unrecovered longer than that could be replayed
# twice (recovery runs at the next start; a host down for 30 days is out of scope).
TABLE_CONFIGURATION: Final[dict[str, str | None]] = {
    "delta.setTransactionRetentionDuration": "interval 30 days",
}
# How long recovery waits for an unreachable store before it sets a journal aside.
RECOVERY_STORE_WAIT_S: Final = 60.0
# Reads of a table that say it does not exist before recovery believes them.
NOT_FOUND_TRIES: Final = 4
# Backoff while a failed commit's outcome cannot be read from the store.
VERIFY_MIN_S: Final = 0.5
VERIFY_MAX_S: Final = 10.0

_OPTION_NAMES: Final = {"endpoint_url": "AWS_ENDPOINT_URL", "region": "AWS_REGION",
                        "allow_http": "AWS_ALLOW_HTTP"}


class DeltaCommitError(OSError):
    """Nothing of the batch became visible (checked against the table): retry it."""


def delta_schema(table: str) -> pa.Schema:
    """The Delta table's Arrow schema: the contract's in microseconds, plus `date`."""
    base = schema_for(table, UNIT)
    return base.append(pa.field("date", pa.date32(), nullable=False)).remove_metadata()


def storage_options(storage: StorageConfig) -> dict[str, str]:
    """delta-rs storage options for `[storage]` (see the module docstring)."""
    out: dict[str, str] = {}
    for key, value in storage.options.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        out[_OPTION_NAMES.get(key, key)] = text
    if storage.root.startswith(("s3://", "s3a://")):
        lowered = {k.lower() for k in out}
        if not lowered & {"conditional_put", "aws_conditional_put"}:
            out["conditional_put"] = "etag"
    return out


def table_uri(root: str, table: str) -> str:
    return f"{root.removeprefix('file://').rstrip('/')}/{table}"


def app_id(feed_key: str, table: str, exchange: str, date: str) -> str:
    """The application-transaction id of one feed's rows in one partition of a table."""
    return f"ingestd/{feed_key}/{table}/{exchange}/{date}"


def open_table(uri: str, options: Mapping[str, str], table: str) -> DeltaTable:
    """The table at `uri`, created (empty, ingestd's schema and partitioning) if missing.
    When several daemons create it at once, one wins; the others load its table."""
    try:
        return DeltaTable(uri, storage_options=dict(options))
    except TableNotFoundError:
        pass
    try:
        DeltaTable.create(uri, delta_schema(table), partition_by=PARTITION_BY, mode="ignore",
                          name=table,
                          description=f"ingestd {table}, schema version {SCHEMA_VERSION}",
                          configuration=TABLE_CONFIGURATION, storage_options=dict(options))
        log.info("delta_table_created", table=table, uri=uri)
    except Exception as e:  # another daemon created it first: load theirs
        log.info("delta_table_create_raced", table=table, error=f"{type(e).__name__}: {e}"[:200])
    return DeltaTable(uri, storage_options=dict(options))


def _date32(date: str) -> pa.Scalar:
    return pa.scalar(dt.date.fromisoformat(date), pa.date32())


def batch_arrow(batch: Batch) -> pa.Table:
    """A batch as rows of its Delta table (contract columns in us, then `date`)."""
    data = batch_table(batch, UNIT)
    date = pa.array([_date32(batch.date)] * data.num_rows, pa.date32()) if data.num_rows \
        else pa.array([], pa.date32())
    return data.append_column(pa.field("date", pa.date32(), nullable=False),
                              date).cast(delta_schema(batch.table))


class DeltaPublisher:
    """The Delta publisher behind `publish.Publisher` (see publish.py for the contract)."""

    unit = UNIT

    def __init__(self, storage: StorageConfig, local_dir: Path, instance: str, *,
                 compression: str | None = None) -> None:
        self.root = storage.root
        self.instance = instance
        self.options = storage_options(storage)
        codec = (compression or storage.compression).upper()
        self._writer_properties = WriterProperties(
            compression=cast(Any, "UNCOMPRESSED" if codec == "NONE" else codec))
        self._staging = Staging(local_dir)
        self._tables: dict[str, DeltaTable] = {}
        # Per app id: the version this process last committed (or read).
        self._versions: dict[str, int] = {}
        # Per app id: the lowest first recv_seq of a batch whose commit failed and whose
        # rows are not committed yet; no batch starting above it may be committed.
        self._failed_lo: dict[str, int] = {}
        self._closing = threading.Event()
        self._stats = StoreStats(url=storage.root) if storage.is_remote else None
        self._local = not storage.is_remote
        self.commits = 0
        self.commit_failures = 0

    # ---- Publisher -----------------------------------------------------------------------
    @property
    def staging_dir(self) -> Path:
        return self._staging.path

    @property
    def store_stats(self) -> StoreStats | None:
        return self._stats

    def open(self) -> int:
        self._closing.clear()
        return self._staging.open()

    def close(self) -> None:
        self._closing.set()
        self._staging.close()

    def publish(self, batch: Batch) -> Committed:
        return self.publish_many([batch])[0]

    def sync_durable(self, dirs: list[Path]) -> dict[Path, str | None]:
        """After `PublishedNotDurable` (local tables): sync the table's directories."""
        out: dict[Path, str | None] = {}
        for d in dirs:
            try:
                if self._local:
                    for sub in [d / "_delta_log", *d.glob("exchange=*/date=*")]:
                        for f in sub.iterdir():
                            if f.is_file():
                                _fsync_file(f)
                        fsutil.fsync_dir(sub)
                    fsutil.fsync_dir(d)
                out[d] = None
            except OSError as e:
                out[d] = f"{type(e).__name__}: {e}"
        return out

    def coverage(self) -> DeltaCoverage:
        return DeltaCoverage(self.root, self.options)

    # ---- commits -------------------------------------------------------------------------
    def publish_many(self, batches: list[Batch]) -> list[Committed]:
        """Commit batches of one table (any partitions) as one Delta commit."""
        if not batches:
            return []
        table = batches[0].table
        if any(b.table != table for b in batches):
            raise ValueError("publish_many: batches of more than one table")
        txns = self._transactions(batches)
        self._check_order(txns)
        parts = [batch_arrow(b) for b in batches]
        data = parts[0] if len(parts) == 1 else pa.concat_tables(parts)
        started = time.monotonic()
        now_ms = time.time_ns() // 1_000_000  # lastUpdated: lets old transactions expire
        landed_despite_error = False
        try:
            dtable = self._table(table)
            if data.num_rows:
                write_deltalake(
                    dtable, data, mode="append", partition_by=PARTITION_BY,
                    writer_properties=self._writer_properties,
                    commit_properties=CommitProperties(
                        app_transactions=[Transaction(a, v, now_ms)
                                          for a, (_, v) in txns.items()],
                        max_commit_retries=MAX_COMMIT_RETRIES,
                        custom_metadata={"ingestd.instance": self.instance}))
        except Exception as e:
            error = f"{type(e).__name__}: {e}"[:300]
            if not self._landed(table, txns, error):
                self.commit_failures += 1
                for a, (lo, _) in txns.items():
                    self._failed_lo[a] = min(lo, self._failed_lo.get(a, lo))
                log.error("delta_commit_failed", table=table, rows=data.num_rows,
                          partitions=len(batches), error=error)
                raise DeltaCommitError(f"delta commit to {table} failed: {error}") from e
            log.warning("delta_commit_landed_despite_error", table=table, error=error)
            landed_despite_error = True
        self.commits += 1
        sizes: dict[tuple[str, str], int] = {}
        uri = table_uri(self.root, table)
        if self._local:
            try:
                if landed_despite_error:  # our version is unknown: sync the whole table
                    errors = [e for e in self.sync_durable([Path(uri)]).values() if e]
                    if errors:
                        raise OSError(errors[0])
                else:
                    sizes = self._make_durable(table, self._table(table).version())
            except OSError as e:
                # Committed (visible): never again. Only the sync is retried; until then
                # the journal keeps the rows.
                raise PublishedNotDurable(
                    Committed(Path(uri), data.num_rows, data.nbytes), e) from e
        for a, (lo, hi) in txns.items():
            self._versions[a] = max(hi, self._versions.get(a, hi))
            failed = self._failed_lo.get(a)
            if failed is not None and lo <= failed:
                del self._failed_lo[a]
        if self._stats is not None:
            self._stats.state = "ok"
            self._stats.files_uploaded += len(batches)
            self._stats.bytes_uploaded += data.nbytes
            self._stats.last_upload_mono = time.monotonic()
        log.debug("delta_committed", table=table, rows=data.num_rows, partitions=len(batches),
                  seconds=round(time.monotonic() - started, 4))
        return [Committed(Path(uri) / f"exchange={b.exchange}" / f"date={b.date}", p.num_rows,
                          sizes.get((b.exchange, b.date), p.nbytes))
                for b, p in zip(batches, parts, strict=True)]

    def _make_durable(self, table: str, version: int) -> dict[tuple[str, str], int]:
        """fsync what a local commit wrote (delta-rs does not): its data files, their
        directories, the log entry and `_delta_log/`, before the journal lets the rows go.
        Returns the bytes it added per (exchange, date)."""
        base = Path(table_uri(self.root, table))
        entry = base / "_delta_log" / f"{version:020d}.json"
        sizes: dict[tuple[str, str], int] = {}
        dirs: set[Path] = set()
        for line in entry.read_bytes().splitlines():
            add = orjson.loads(line).get("add")
            if add is None:
                continue
            path = base / unquote(add["path"])
            _fsync_file(path)
            dirs.add(path.parent)
            pv = add.get("partitionValues", {})
            key = (str(pv.get("exchange")), str(pv.get("date")))
            sizes[key] = sizes.get(key, 0) + int(add.get("size", 0))
        for d in dirs:
            fsutil.fsync_dir(d)
            fsutil.fsync_dir(d.parent)  # the date= directory may be new
            fsutil.fsync_dir(d.parent.parent)
        _fsync_file(entry)
        fsutil.fsync_dir(entry.parent)
        return sizes

    def _transactions(self, batches: Iterable[Batch]) -> dict[str, tuple[int, int]]:
        """App id -> (lowest, highest) recv_seq of the rows committed for it."""
        txns: dict[str, tuple[int, int]] = {}
        for b in batches:
            for feed, (lo, hi) in b.coverage.items():
                a = app_id(feed, b.table, b.exchange, b.date)
                prev = txns.get(a)
                txns[a] = (lo, hi) if prev is None else (min(lo, prev[0]), max(hi, prev[1]))
        return txns

    def _check_order(self, txns: Mapping[str, tuple[int, int]]) -> None:
        for a, (lo, _) in txns.items():
            failed = self._failed_lo.get(a)
            if failed is not None and lo > failed:
                raise DeltaCommitError(
                    f"{a}: rows from recv_seq {failed} on failed to commit; a later batch "
                    "waits for them (the writer retries both, in order)")

    def _table(self, table: str) -> DeltaTable:
        dtable = self._tables.get(table)
        if dtable is None:
            dtable = self._tables[table] = open_table(table_uri(self.root, table),
                                                      self.options, table)
        return dtable

    def _landed(self, table: str, txns: Mapping[str, tuple[int, int]], error: str) -> bool:
        """Did the failed commit land after all? Reads the table until it can tell (or
        the publisher is closed: then raises, the journal keeps the rows)."""
        delay = VERIFY_MIN_S
        while True:
            try:
                fresh = open_table(table_uri(self.root, table), self.options, table)
                self._tables[table] = fresh
                landed = [(fresh.transaction_version(a) or 0) >= hi
                          for a, (_, hi) in txns.items()]
            except Exception as e:
                if self._stats is not None:
                    self._stats.state = "unreachable"
                    self._stats.last_error = f"{type(e).__name__}: {e}"[:300]
                    self._stats.upload_failures += 1
                log.warning("delta_commit_unverified", table=table, commit_error=error,
                            error=f"{type(e).__name__}: {e}"[:300], retry_in_s=delay)
                if self._closing.wait(delay):
                    raise DeltaCommitError(
                        f"delta commit to {table}: outcome unknown at close ({error}); "
                        "the journal keeps the rows") from e
                delay = min(VERIFY_MAX_S, delay * 2)
                continue
            if self._stats is not None:
                self._stats.state = "ok"
            if any(landed) and not all(landed):
                log.error("delta_commit_partly_visible", table=table)  # cannot happen
            return all(landed) and bool(landed)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DeltaCoverage:
    """Recovery's view of the Delta tables: a row of feed key F, table T, partition
    (exchange, day) with recv_seq S is committed iff S <= the version of app id
    `app_id(F, T, exchange, date)`. One snapshot of each table, read on first use."""

    def __init__(self, root: str, options: Mapping[str, str]) -> None:
        self.root = root
        self.options = dict(options)
        self._tables: dict[str, DeltaTable | None] = {}
        self._versions: dict[str, int | None] = {}
        self.tables_read = 0

    @property
    def files_read(self) -> int:
        return self.tables_read

    def load(self, table: str, exchange: str, day: int, prefix: str,
             min_ts_ns: int) -> None:
        if table in self._tables:
            return
        uri = table_uri(self.root, table)
        delay_s = 0.2
        deadline = time.monotonic() + RECOVERY_STORE_WAIT_S
        attempt = 0
        while attempt < NOT_FOUND_TRIES:
            try:
                self._tables[table] = DeltaTable(uri, storage_options=self.options)
                self.tables_read += 1
                return
            except TableNotFoundError:
                # "Not found" must be true, not a listing that failed or lagged: taken as
                # nothing committed, it would replay committed rows. A table whose log
                # has files is asked again; if it still cannot be read, recovery stops
                # loudly (the journal is set aside, never replayed twice).
                if not DeltaTable.is_deltatable(uri, storage_options=self.options):
                    self._tables[table] = None  # no such table: nothing committed yet
                    return
                attempt += 1
                if attempt < NOT_FOUND_TRIES:
                    time.sleep(delay_s)
                    delay_s = min(2.0, delay_s * 2)
            except (OSError, DeltaError) as e:
                # The store does not answer (a failed read is never "no table"): wait
                # for it a while; then recovery stops and sets the journal aside.
                if time.monotonic() > deadline:
                    raise DeltaCommitError(f"{uri}: store unreachable during recovery: "
                                           f"{type(e).__name__}: {e}"[:300]) from e
                log.warning("delta_recovery_store_unreachable", table=table,
                            error=f"{type(e).__name__}: {e}"[:200], retry_in_s=delay_s)
                time.sleep(delay_s)
                delay_s = min(5.0, delay_s * 2)
                continue
        raise DeltaCommitError(f"{uri}: a Delta table that cannot be read now; recovery "
                               "cannot tell what is committed")

    def covers(self, feed: str, table: str, exchange: str, day: int, seq: int) -> bool:
        from ingestd.sink.batcher import day_to_date

        a = app_id(feed, table, exchange, day_to_date(day))
        if a not in self._versions:
            dtable = self._tables.get(table)
            self._versions[a] = None if dtable is None else dtable.transaction_version(a)
        version = self._versions[a]
        return version is not None and seq <= version


def delta_tables(root: str, options: Mapping[str, str]) -> dict[str, DeltaTable]:
    """Every ingestd table that exists under `root`, by name."""
    from ingestd.schema import TABLES

    out: dict[str, DeltaTable] = {}
    for name in TABLES:
        try:
            out[name] = DeltaTable(table_uri(root, name), storage_options=dict(options))
        except TableNotFoundError:
            continue
    return out


__all__ = ["PARTITION_BY", "DeltaCommitError", "DeltaCoverage", "DeltaPublisher", "app_id",
           "delta_schema", "delta_tables", "open_table", "storage_options", "table_uri"]
