"""Parquet on an object store (`root = "s3://bucket/prefix"`, gs://, abfs://): commit
locally, upload in the background, exactly once across `kill -9`.

Owns: the object-store client (pyarrow.fs: `S3FileSystem` from `[storage.options]`, others
through `FileSystem.from_uri`; credentials only from the store's standard environment),
the local outbox, the uploader threads (`upload_concurrency` at once, oldest file first;
capped exponential backoff with full jitter), the
index of uploaded files' coverage, the store's state for /health and /metrics, and the
recovery coverage over all of it.

Protocol (why it is exactly once):
1. `publish(batch)` writes the Parquet file exactly as local Parquet does (staging, fsync,
   rename, directory fsync) but into this process's outbox,
   `<local_dir>/.outbox/<instance>/files/<table>/exchange=../date=../<name>.parquet.pending`.
   That is the commit: once it returns, the journal may drop the rows' frames. The name
   (first ts_recv + random) is chosen once, here; the object key is that same layout under
   the prefix, so every later upload of the file writes the SAME key.
2. The uploader PUTs each pending file (read whole, written with one write and close: a
   single PutObject, or a multipart upload that only becomes visible when completed - an
   object appears only when complete), checks the object's size, appends the file's
   coverage to the outbox's `uploaded.jsonl` (fsync'd), and only then deletes the local
   copy. A crash anywhere in between leaves the file pending: the next start uploads it
   again under the same key - an overwrite with identical bytes, never a second copy.
3. Recovery (replaying a dead process's journal) must skip every row that is already
   committed. Committed rows are in exactly two places: pending outbox files (their
   footers hold the coverage) and uploaded files (the index holds the coverage, so
   recovery never lists or reads the bucket - cheap, and correct while the store is
   down). Listing the pending files first and reading the index second never misses a
   file that is uploaded meanwhile: its index line is written before its local copy goes.
   Index entries are kept while a journal could still need them: a journal whose oldest
   record was received at T only looks at files committed after T - FILE_AGE_MARGIN_NS
   (the same rule as local files' mtime), so entries older than that for the oldest
   journal on disk are pruned.
Several processes (workers) share one `local_dir`: each has its own outbox directory,
held by an flock; a live process adopts (uploads and prunes) the outboxes of dead ones,
and recovery reads every outbox.

While the store is unreachable, rows wait locally (journal, then outbox), uploads retry
with backoff, and the store's state says so. The outbox is bounded only by the local disk:
when it is full, the commit fails and the writer's existing disk-full path applies (rows
stay buffered and in the journal, intake applies backpressure).

Must not: run on the event loop (every method blocks; the uploaders are threads),
log or store credentials, publish a file under a second key, or delete a local copy
before its object and its index line exist.
"""

from __future__ import annotations

import heapq
import os
import random
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pyarrow.parquet as pq
import structlog
from pyarrow import fs as pafs

from ingestd.config import StorageConfig
from ingestd.sink import fsutil
from ingestd.sink.batcher import Batch, day_to_date
from ingestd.sink.fsutil import sync_dirs, try_lock_dir
from ingestd.sink.journal import JOURNAL_DIR, iter_segments, read_segment
from ingestd.sink.parquet import (
    COVERAGE_KEY,
    FILE_AGE_MARGIN_NS,
    Committed,
    CoverageIndex,
    CoverageLookup,
    Staging,
    commit,
)
from ingestd.stats import StoreStats

log = structlog.get_logger("ingestd.objstore")

OUTBOX_DIR = ".outbox"
FILES_DIR = "files"
INDEX_NAME = "uploaded.jsonl"
PENDING_SUFFIX = ".pending"
UPLOAD_RETRY_MIN_S = 0.5
UPLOAD_RETRY_MAX_S = 30.0
PRUNE_INTERVAL_S = 300.0
UPLOADERS = 4
# At close, how long uploads in flight may take before the process goes on without them.
STOP_WAIT_S = 2.0
# On a clean shutdown, the uploader gets this long to empty the outbox (if the store is
# up); what is left is uploaded at the next start.
CLOSE_UPLOAD_S = 2.0


# ---- the store --------------------------------------------------------------------------


def open_store(storage: StorageConfig) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the base path (`bucket/prefix`) of an object-store root.

    s3://: `S3FileSystem` with `[storage.options]` endpoint_url (-> endpoint_override and
    scheme), region, allow_http (an http:// endpoint needs it), connect_timeout_s,
    request_timeout_s; credentials from the AWS standard environment (AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN / AWS_PROFILE, instance roles). Other
    schemes (gs://, abfs://) through `FileSystem.from_uri`, with their own environment."""
    scheme, _, rest = storage.root.partition("://")
    opts = storage.options
    if scheme in ("s3", "s3a"):
        kw: dict[str, Any] = {
            "connect_timeout": float(opts.get("connect_timeout_s", 5.0)),
            "request_timeout": float(opts.get("request_timeout_s", 30.0)),
            # Our uploader retries with its own backoff; one quick attempt each time.
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=2),
        }
        endpoint = opts.get("endpoint_url")
        if endpoint:
            parts = urlsplit(str(endpoint))
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"storage.options.endpoint_url: {endpoint!r} is not an "
                                 "http(s) URL")
            if parts.scheme == "http" and not opts.get("allow_http", False):
                raise ValueError(f"storage.options.endpoint_url: {endpoint!r} is plain "
                                 "http: set storage.options.allow_http = true")
            kw["endpoint_override"] = parts.netloc
            kw["scheme"] = parts.scheme
        if opts.get("region"):
            kw["region"] = str(opts["region"])
        return pafs.S3FileSystem(**kw), rest.strip("/")
    filesystem, path = pafs.FileSystem.from_uri(storage.root)
    return filesystem, path.strip("/")


def describe_error(e: BaseException) -> str:
    """A short, credential-free description of an upload failure."""
    text = str(e).replace("\n", " ")
    return f"{type(e).__name__}: {text[:300]}"


# ---- the outbox -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """One committed file: where it goes and which rows it holds."""

    rel: str                                  # <table>/exchange=../date=../<name>.parquet
    table: str
    exchange: str
    day: int
    coverage: dict[str, list[list[int]]]      # feed key -> [[lo, hi], ...]
    committed_ns: int                         # when the local file was written (mtime)
    size: int


def _parse_rel(rel: str) -> tuple[str, str, int]:
    from datetime import date as _date

    table, ex, dt, _name = rel.split("/")
    day = _date.fromisoformat(dt.removeprefix("date=")).toordinal() \
        - _date(1970, 1, 1).toordinal()
    return table, ex.removeprefix("exchange="), day


class Outbox:
    """One process's outbox directory: pending files and the index of uploaded ones."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.files = path / FILES_DIR
        self.index = path / INDEX_NAME

    def pending(self) -> Iterator[Path]:
        if self.files.is_dir():
            yield from self.files.glob(f"*/exchange=*/date=*/*{PENDING_SUFFIX}")

    def rel(self, p: Path) -> str:
        return p.relative_to(self.files).as_posix().removesuffix(PENDING_SUFFIX)

    def entry(self, p: Path) -> Entry:
        """A pending file's entry (its footer holds the coverage). Raises OSError."""
        st = p.stat()
        meta = pq.read_metadata(p).metadata or {}
        raw = meta.get(COVERAGE_KEY.encode())
        rel = self.rel(p)
        table, exchange, day = _parse_rel(rel)
        return Entry(rel, table, exchange, day, orjson.loads(raw) if raw else {},
                     st.st_mtime_ns, st.st_size)

    def uploaded(self) -> list[Entry]:
        """The index (a torn last line - a crash while appending - is ignored)."""
        try:
            data = self.index.read_bytes()
        except FileNotFoundError:
            return []
        out = []
        for line in data.splitlines():
            try:
                d = orjson.loads(line)
                out.append(Entry(d["rel"], d["table"], d["exchange"], int(d["day"]),
                                 d["coverage"], int(d["committed_ns"]), int(d["size"])))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
        return out

    def append_uploaded(self, e: Entry) -> None:
        line = orjson.dumps({"rel": e.rel, "table": e.table, "exchange": e.exchange,
                             "day": e.day, "coverage": e.coverage,
                             "committed_ns": e.committed_ns, "size": e.size}) + b"\n"
        with open(self.index, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def rewrite_index(self, keep: list[Entry]) -> None:
        """Replace the index by `keep` (atomically: a reader sees the old or the new)."""
        tmp = self.index.with_name(f"{INDEX_NAME}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            for e in keep:
                f.write(orjson.dumps({"rel": e.rel, "table": e.table,
                                      "exchange": e.exchange, "day": e.day,
                                      "coverage": e.coverage,
                                      "committed_ns": e.committed_ns,
                                      "size": e.size}) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self.index)
        fsutil.fsync_dir(self.path)


def _first_ts(segment: Path, scratch: Path) -> int | None:
    """The earliest receive time among a segment's first records (None: none timed yet).
    Reads a growing head of the file (a segment starts with every codec's checkpoint,
    which may be large) into `scratch`, never the whole segment at once unless needed;
    a head cut mid-record reads as a torn tail."""
    size = segment.stat().st_size
    for head in (1 << 20, 32 << 20, size):
        n = min(head, size)
        with open(segment, "rb") as f:
            data = f.read(n)
        scratch.write_bytes(data)
        try:
            records, _end, _torn = read_segment(scratch)
        finally:
            scratch.unlink(missing_ok=True)
        stamps = [r.ts for r in records if r.ts]
        if stamps:
            return min(stamps)
        if n >= size:
            return None
    return None


def oldest_journal_ns(local_dir: Path, cache: dict[Path, int], scratch_dir: Path) -> int | None:
    """The receive time of the oldest record in any journal under `local_dir` (None: no
    journal, or none has a timed record yet). Reads the head of each journal's oldest
    segment once (`cache`: segments are append-only, their first records never change);
    `scratch_dir` is where the head is copied to be read."""
    base = local_dir / JOURNAL_DIR
    if not base.is_dir():
        return None
    oldest: int | None = None
    seen: set[Path] = set()
    for d in base.iterdir():
        if not d.is_dir():
            continue
        segments = iter_segments(d)
        if not segments:
            continue
        first = segments[0]
        seen.add(first)
        ts = cache.get(first)
        if ts is None:
            try:
                found = _first_ts(first, scratch_dir / f"head-{uuid.uuid4().hex}.tmp")
            except FileNotFoundError:
                continue
            if found is None:
                continue  # nothing timed yet (a new segment): nothing older in it
            ts = cache[first] = found
        oldest = ts if oldest is None else min(oldest, ts)
    for gone in set(cache) - seen:
        del cache[gone]
    return oldest


class OutboxCoverage:
    """Recovery's view over every outbox under `<local_dir>/.outbox/` (live and dead
    processes'): pending files' footers, then the uploaded index (see the module
    docstring for why that order never misses a file)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.index = CoverageIndex()
        self._loaded: set[tuple[str, str, int]] = set()

    @property
    def files_read(self) -> int:
        return self.index.files_read

    def load(self, table: str, exchange: str, day: int, prefix: str, min_ts_ns: int) -> None:
        if (table, exchange, day) in self._loaded:
            return
        self._loaded.add((table, exchange, day))
        if not self.base.is_dir():
            return
        outboxes = [Outbox(d) for d in sorted(self.base.iterdir()) if d.is_dir()]
        part = f"{table}/exchange={exchange}/date={day_to_date(day)}/"
        for box in outboxes:
            for p in box.pending():
                rel = box.rel(p)
                if not rel.startswith(part):
                    continue
                try:
                    e = box.entry(p)
                except FileNotFoundError:
                    continue  # uploaded meanwhile: its index line exists (read below)
                except (OSError, ValueError) as err:
                    log.error("unreadable_outbox_file", path=str(p), error=str(err))
                    continue
                self.index.files_read += 1
                if e.day == day:
                    self.index.add(e.coverage, table, exchange, day, prefix)
        oldest_ns = min_ts_ns - FILE_AGE_MARGIN_NS
        for box in outboxes:
            for e in box.uploaded():
                if (e.table, e.exchange, e.day) == (table, exchange, day) \
                        and e.committed_ns >= oldest_ns:
                    self.index.files_read += 1
                    self.index.add(e.coverage, table, exchange, day, prefix)
        self.index.sort()

    def covers(self, feed: str, table: str, exchange: str, day: int, seq: int) -> bool:
        return self.index.covers(feed, table, exchange, day, seq)


# ---- the publisher ----------------------------------------------------------------------


def _release_after(threads: list[threading.Thread], fds: list[int]) -> None:
    for t in threads:
        t.join()
    for fd in fds:
        os.close(fd)


class Pending:
    """The files waiting for upload, oldest name first (names start with their first
    ts_recv), with the ones an uploader holds. Not thread-safe: used under the
    publisher's lock."""

    def __init__(self) -> None:
        self.items: dict[Path, tuple[Outbox, int]] = {}   # file -> (its outbox, size)
        self.bytes = 0
        self._heap: list[tuple[str, Path]] = []
        self._inflight: set[Path] = set()

    def __len__(self) -> int:
        return len(self.items)

    def add(self, path: Path, box: Outbox, size: int) -> None:
        if path in self.items:
            return
        self.items[path] = (box, size)
        self.bytes += size
        heapq.heappush(self._heap, (path.name, path))

    def take(self) -> tuple[Path, Outbox] | None:
        """The oldest file no uploader holds (now held), or None."""
        while self._heap:
            _, path = heapq.heappop(self._heap)
            if path in self.items and path not in self._inflight:
                self._inflight.add(path)
                return path, self.items[path][0]
        return None

    def done(self, path: Path) -> None:
        self._inflight.discard(path)
        item = self.items.pop(path, None)
        if item is not None:
            self.bytes -= item[1]

    def retry(self, path: Path) -> None:
        self._inflight.discard(path)
        if path in self.items:
            heapq.heappush(self._heap, (path.name, path))

    def holds(self, box: Outbox) -> bool:
        return any(b is box for b, _ in self.items.values())


class ObjectStoreParquetPublisher:
    """`format = "parquet"` on an object-store root (see the module docstring)."""

    def __init__(self, storage: StorageConfig, local_dir: Path, instance: str, *,
                 filesystem: pafs.FileSystem | None = None, base_path: str | None = None,
                 retry_min_s: float = UPLOAD_RETRY_MIN_S,
                 retry_max_s: float = UPLOAD_RETRY_MAX_S,
                 close_upload_s: float = CLOSE_UPLOAD_S,
                 uploaders: int | None = None,
                 prune_interval_s: float = PRUNE_INTERVAL_S,
                 fsync_dir: Callable[[Path], None] = fsutil.fsync_dir,
                 monotonic: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.storage = storage
        self.local_dir = local_dir
        self.instance = instance or uuid.uuid4().hex
        self.unit = storage.effective_unit
        self.compression = storage.compression
        self.is_s3 = storage.root.partition("://")[0] in ("s3", "s3a")
        if filesystem is None:
            filesystem, path = open_store(storage)
            base_path = path if base_path is None else base_path
        self.fs = filesystem
        self.base_path = (base_path or "").strip("/")
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self.close_upload_s = close_upload_s
        self.prune_interval_s = prune_interval_s
        # Uploads at once: one PUT's latency (tens of ms on a cloud store) must not bound
        # the files per second a writer commits.
        self.uploaders = max(1, uploaders if uploaders is not None else int(
            storage.options.get("upload_concurrency", UPLOADERS)))
        self.fsync_dir = fsync_dir
        self.monotonic = monotonic
        self.rng = rng or random.Random()
        self.staging = Staging(local_dir)
        self.outbox_base = local_dir / OUTBOX_DIR
        self.own = Outbox(self.outbox_base / self.instance)
        self.stats = StoreStats(url=storage.root)
        self._adopted: dict[Path, tuple[Outbox, int]] = {}   # dead outboxes we hold
        self._own_lock_fd: int | None = None
        self._pending = Pending()
        self._cond = threading.Condition()
        # Serializes index appends and rewrites (a prune must never drop an append).
        self._index_lock = threading.Lock()
        self._stop = False
        self._draining_until: float | None = None
        self._threads: list[threading.Thread] = []
        self._journal_cache: dict[Path, int] = {}
        self._last_prune_mono = 0.0

    # ---- Publisher interface --------------------------------------------------------------
    @property
    def staging_dir(self) -> Path:
        return self.staging.path

    @property
    def store_stats(self) -> StoreStats:
        return self.stats

    def open(self) -> int:
        """Staging, our outbox (locked), dead processes' outboxes adopted, every pending
        file queued, the index pruned, and the uploaders started."""
        removed = self.staging.open()
        self.own.files.mkdir(parents=True, exist_ok=True)
        self._own_lock_fd = try_lock_dir(self.own.path)
        if self._own_lock_fd is None:
            raise OSError(f"cannot lock {self.own.path}")
        for d in sorted(self.outbox_base.iterdir()):
            if not d.is_dir() or d == self.own.path:
                continue
            fd = try_lock_dir(d)
            if fd is not None:
                self._adopted[d] = (Outbox(d), fd)
        with self._cond:
            for box in [self.own] + [b for b, _ in self._adopted.values()]:
                for p in box.pending():
                    try:
                        self._pending.add(p, box, p.stat().st_size)
                    except FileNotFoundError:
                        continue
            self._count_waiting()
        self._prune()
        if self._pending:
            log.info("outbox_pending", files=self.stats.files_waiting,
                     bytes=self.stats.bytes_waiting, adopted_outboxes=len(self._adopted))
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True,
                                          name=f"ingestd-uploader-{i}")
                         for i in range(self.uploaders)]
        for t in self._threads:
            t.start()
        return removed

    def close(self) -> None:
        """Give the uploaders `close_upload_s` to empty the outbox (unless the store is
        unreachable), then stop them; what is left stays pending for the next start."""
        if not self._threads:
            return
        with self._cond:
            self._draining_until = self.monotonic() + (
                0.0 if self.stats.state == "unreachable" else self.close_upload_s)
            self._cond.notify_all()
        deadline = self.monotonic() + self.close_upload_s + 1.0
        for t in self._threads:
            t.join(max(0.0, deadline - self.monotonic()))
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        deadline = self.monotonic() + STOP_WAIT_S
        for t in self._threads:
            t.join(max(0.0, deadline - self.monotonic()))
        threads, self._threads = self._threads, []
        fds = [fd for _box, fd in self._adopted.values()]
        if self._own_lock_fd is not None:
            fds.append(self._own_lock_fd)
        self._adopted.clear()
        self._own_lock_fd = None
        self.staging.close()
        if any(t.is_alive() for t in threads):
            # An upload still in flight (a store that does not answer): the outboxes
            # stay locked until it ends, so no one else works on them meanwhile.
            log.warning("uploader_still_running", detail="outboxes unlocked when it ends")
            threading.Thread(target=_release_after, args=(threads, fds), daemon=True,
                             name="ingestd-uploader-release").start()
        else:
            _release_after([], fds)

    def publish(self, batch: Batch) -> Committed:
        """Commit into the outbox (durable: the journal may drop the rows), queue the
        upload. Raises like `parquet.commit`."""
        done = commit(self.own.files, self.staging.path, batch, self.compression,
                      fsync_dir=self.fsync_dir, unit=self.unit, suffix=PENDING_SUFFIX)
        with self._cond:
            self._pending.add(done.path, self.own, done.bytes)
            self._count_waiting()
            self._cond.notify_all()
        return done

    def sync_durable(self, dirs: list[Path]) -> dict[Path, str | None]:
        return sync_dirs(dirs, self.fsync_dir)

    def coverage(self) -> CoverageLookup:
        return OutboxCoverage(self.outbox_base)

    # ---- the uploaders --------------------------------------------------------------------
    def wait_uploaded(self, timeout_s: float) -> bool:
        """Block until nothing is pending (tests, tools); False on timeout."""
        deadline = self.monotonic() + timeout_s
        with self._cond:
            while self._pending:
                left = deadline - self.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def _count_waiting(self) -> None:
        self.stats.files_waiting = len(self._pending)
        self.stats.bytes_waiting = self._pending.bytes

    def _stopping(self) -> bool:
        """(Holding the lock.) Stop now, or the shutdown's upload budget is spent."""
        if self._stop:
            return True
        until = self._draining_until
        return until is not None and (not self._pending or self.monotonic() >= until)

    def _prune_due(self) -> bool:
        return self.monotonic() - self._last_prune_mono >= self.prune_interval_s

    def _probe(self) -> None:
        """One cheap request, so the state says whether the store answers."""
        try:
            self.fs.get_file_info(self.base_path or "/")
        except Exception as e:
            self._failed(e, self.retry_min_s)
            return
        with self._cond:
            if self.stats.state != "ok":
                log.info("store_ok", url=self.stats.url, previous=self.stats.state,
                         by="probe")
                self.stats.state = "ok"

    def _run(self, index: int) -> None:
        """One uploader. Number 0 also probes the store (at start, and while it is
        unreachable with nothing to upload) and prunes the index."""
        delay_s = self.retry_min_s
        if index == 0:
            self._probe()
        while True:
            if index == 0 and self._prune_due():
                self._prune()
            with self._cond:
                while True:
                    if self._stopping():
                        return
                    item = self._pending.take()
                    if item is not None:
                        break
                    if index == 0 and (self._prune_due() or (
                            self.stats.state == "unreachable" and not self._pending)):
                        break
                    self._cond.wait(1.0)
                if item is None and self.stats.state == "unreachable" and not self._pending:
                    # Nothing to upload: probe again after the backoff, so the state
                    # turns back to ok when the store does.
                    self._cond.wait_for(lambda: self._stopping() or bool(self._pending),
                                        timeout=self.rng.uniform(0.0, delay_s))
            if item is None:
                if self.stats.state == "unreachable" and not self._pending:
                    self._probe()
                    delay_s = self.retry_min_s if self.stats.state == "ok" \
                        else min(self.retry_max_s, delay_s * 2)
                continue
            path, box = item
            try:
                self._upload(path, box)
            except FileNotFoundError:
                # Uploaded by an earlier owner of this outbox meanwhile (adoption race):
                # its index line exists.
                with self._cond:
                    self._pending.done(path)
                    self._count_waiting()
                    self._cond.notify_all()
                continue
            except Exception as e:
                with self._cond:
                    self._pending.retry(path)
                self._failed(e, delay_s)
                # Full jitter, capped exponential backoff; a stop ends the wait.
                with self._cond:
                    self._cond.wait_for(self._stopping, timeout=self.rng.uniform(0.0, delay_s))
                delay_s = min(self.retry_max_s, delay_s * 2)
                continue
            delay_s = self.retry_min_s

    def _upload(self, path: Path, box: Outbox) -> None:
        entry = box.entry(path)
        data = path.read_bytes()
        key = f"{self.base_path}/{entry.rel}" if self.base_path else entry.rel
        if not self.is_s3:
            # S3 has no directories (creating them would add marker objects); others
            # (e.g. a hierarchical-namespace ABFS account) may need the parents.
            self.fs.create_dir(key.rpartition("/")[0], recursive=True)
        # One write of the whole file, then close: a PutObject (or a multipart upload
        # completed at close). Nothing is visible until close succeeds.
        with self.fs.open_output_stream(key) as out:
            out.write(data)
        info = self.fs.get_file_info(key)
        if info.size != len(data):
            raise OSError(f"uploaded {key} has {info.size} bytes, expected {len(data)}")
        with self._index_lock:
            box.append_uploaded(entry)
        path.unlink()
        now = self.monotonic()
        with self._cond:
            self._pending.done(path)
            self._count_waiting()
            st = self.stats
            st.files_uploaded += 1
            st.bytes_uploaded += len(data)
            st.last_upload_mono = now
            if st.state != "ok":
                log.info("store_ok", url=st.url, previous=st.state,
                         files_waiting=st.files_waiting, bytes_waiting=st.bytes_waiting)
                st.state = "ok"
            self._cond.notify_all()

    def _failed(self, e: Exception, delay_s: float) -> None:
        with self._cond:
            st = self.stats
            st.upload_failures += 1
            st.last_error = describe_error(e)
            if st.state == "unreachable":
                log.debug("upload_failed", error=st.last_error, retry_in_s=round(delay_s, 3))
                return
            st.state = "unreachable"
        log.error("store_unreachable", url=st.url, error=st.last_error,
                  files_waiting=st.files_waiting, bytes_waiting=st.bytes_waiting,
                  retry_in_s=round(delay_s, 3))

    # ---- index pruning ----------------------------------------------------------------------
    def _prune(self) -> None:
        """Drop index entries no journal on disk can need; remove adopted outboxes that
        hold nothing any more."""
        self._last_prune_mono = self.monotonic()
        try:
            oldest = oldest_journal_ns(self.local_dir, self._journal_cache, self.staging.path)
        except OSError as e:
            log.warning("outbox_index_prune_failed", error=str(e))
            return
        horizon = (time.time_ns() if oldest is None else oldest) - FILE_AGE_MARGIN_NS
        for box in [self.own] + [b for b, _ in self._adopted.values()]:
            with self._index_lock:
                entries = box.uploaded()
                keep = [e for e in entries if e.committed_ns >= horizon]
                if len(keep) != len(entries):
                    try:
                        box.rewrite_index(keep)
                    except OSError as e:
                        log.warning("outbox_index_prune_failed", error=str(e))
                        continue
            if box is self.own or keep:
                continue
            with self._cond:
                if self._pending.holds(box):
                    continue
                _, fd = self._adopted.pop(box.path)
            shutil.rmtree(box.path, ignore_errors=True)
            os.close(fd)


__all__ = ["ObjectStoreParquetPublisher", "OutboxCoverage", "open_store"]
