"""The publisher seam: how a batch of rows becomes committed output, whatever the store.

Owns: the `Publisher` interface the writer and recovery commit through (instead of calling
`parquet.commit` and reading `CoverageIndex` on local paths themselves), the
`CoverageLookup` interface recovery asks "is this row already committed?", the local
Parquet publisher (today's behaviour: staging -> fsync -> rename -> directory fsync), and
`make_publisher`, which picks the publisher from `[storage]` (format, local or remote
root).

Publishers:
- `LocalParquetPublisher` - `format = "parquet"`, local root (parquet.py's protocol).
- `ingestd.sink.objstore.ObjectStoreParquetPublisher` - `format = "parquet"`, an
  object-store root (s3://, gs://, abfs://): committed locally into an outbox, uploaded by
  a worker thread.
- `ingestd.sink.delta.DeltaPublisher` - `format = "delta"` (imported lazily).

Contract of every publisher (all methods blocking: the writer's worker thread, or
recovery's thread - never the event loop):
- `open() -> int`: prepare (staging directory, leftovers of dead processes, background
  uploads); returns how many stale staging files were removed.
- `close()`: release what `open` took; must not block for long (the store may be down:
  what is committed but not uploaded stays on local disk for the next start).
- `publish(batch) -> Committed`: commit the batch's rows durably, exactly once. After it
  returns, the journal may drop the rows' frames. Raises `PublishedNotDurable` when the
  rows are visible but not yet durable (never publish them again: only
  `sync_durable` is retried), any other OSError when nothing became visible (the writer
  retries the same batch later).
- `sync_durable(dirs) -> {dir: None | error}`: retry what `PublishedNotDurable` left.
- `coverage() -> CoverageLookup`: a fresh view of what is committed, for recovery.
- `unit`: the timestamp unit of the Arrow tables (`storage.effective_unit`); the writer
  converts ahead with it.
- `staging_dir`: this process's staging directory (recovery and replay stage there).
- `store_stats`: the remote store's state for /health and /metrics (None when local).

Must not: decide when to flush (the writer does), run on the event loop, or read
credentials from the config (object stores take them from their standard environment).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ingestd.config import StorageConfig
from ingestd.sink import fsutil
from ingestd.sink.batcher import Batch
from ingestd.sink.fsutil import sync_dirs
from ingestd.sink.parquet import Committed, CoverageLookup, LocalCoverage, Staging, commit

if TYPE_CHECKING:
    from ingestd.stats import StoreStats


class Publisher(Protocol):
    """See the module docstring for the contract of each member."""

    @property
    def unit(self) -> str: ...

    @property
    def staging_dir(self) -> Path: ...

    @property
    def store_stats(self) -> StoreStats | None: ...

    def open(self) -> int: ...

    def close(self) -> None: ...

    def publish(self, batch: Batch) -> Committed: ...

    def sync_durable(self, dirs: list[Path]) -> dict[Path, str | None]: ...

    def coverage(self) -> CoverageLookup: ...


class LocalParquetPublisher:
    """Hive-partitioned Parquet under a local root: `parquet.commit` into
    `<root>/<table>/exchange=../date=../`, staged in `<local_dir>/.staging/<own>/` - or
    in `staging_dir`, a staging directory someone else opened (and closes)."""

    def __init__(self, root: Path, *, compression: str = "zstd", unit: str = "ns",
                 local_dir: Path | None = None, staging_dir: Path | None = None,
                 fsync_dir: Callable[[Path], None] = fsutil.fsync_dir) -> None:
        self.root = root
        self.compression = compression
        self.unit = unit
        self.fsync_dir = fsync_dir
        self.staging: Staging | None = None
        if staging_dir is None:
            self.staging = Staging(local_dir if local_dir is not None else root)
            staging_dir = self.staging.path
        self._staging_dir = staging_dir

    @property
    def staging_dir(self) -> Path:
        return self._staging_dir

    @property
    def store_stats(self) -> StoreStats | None:
        return None

    def open(self) -> int:
        return 0 if self.staging is None else self.staging.open()

    def close(self) -> None:
        if self.staging is not None:
            self.staging.close()

    def publish(self, batch: Batch) -> Committed:
        return commit(self.root, self._staging_dir, batch, self.compression,
                      fsync_dir=self.fsync_dir, unit=self.unit)

    def sync_durable(self, dirs: list[Path]) -> dict[Path, str | None]:
        return sync_dirs(dirs, self.fsync_dir)

    def coverage(self) -> CoverageLookup:
        return LocalCoverage(self.root)


def make_publisher(storage: StorageConfig, local_dir: Path, instance: str) -> Publisher:
    """The publisher for `[storage]`: by format, then by local or object-store root.
    `local_dir` holds staging (and the object store's outbox); `instance` names this
    process (its journal's instance id) for publishers that need one per writer."""
    unit = storage.effective_unit
    if storage.format == "delta":
        try:
            from ingestd.sink import delta  # type: ignore[attr-defined,unused-ignore]
        except ImportError as e:
            raise ValueError("storage.format = \"delta\" is not available in this build: "
                             f"{e}") from None
        publisher: Publisher = delta.DeltaPublisher(storage, local_dir, instance)
        return publisher
    if storage.is_remote:
        from ingestd.sink.objstore import ObjectStoreParquetPublisher

        return ObjectStoreParquetPublisher(storage, local_dir, instance)
    return LocalParquetPublisher(Path(storage.root.removeprefix("file://")),
                                 compression=storage.compression, unit=unit,
                                 local_dir=local_dir)


__all__ = ["Committed", "CoverageLookup", "LocalParquetPublisher", "Publisher",
           "make_publisher", "sync_dirs"]
