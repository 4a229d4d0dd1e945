"""Write-ahead journal of everything the codecs are fed, so no received tick is ever lost.

Owns: the on-disk record format (checksummed, length-prefixed), the live journal of one
process (`<root>/.journal/<instance>/seg-<n>.wal`, held by an flock), appending records on
the event loop into a memory buffer, writing and fsyncing that buffer in a dedicated
thread every `fsync_interval_s / 2` (so a frame is durable at most `fsync_interval_s`
after arrival), segment rotation with a checkpoint of every codec at the start of each
segment, retiring segments once every row derived from them is committed (deleted, or
with `keep_raw_s` moved to `<root>/.raw/<instance>/` as the raw frames `ingestd replay`
re-derives tables from), pruning that raw area (age, then size: oldest first), and a
close bounded in time (what could not be written is reported and the journal kept).

Must not: parse frames, or block the event loop on disk I/O (only the thread writes), or
delete a journal that holds anything not written.

Records (all integers little-endian):
    header   crc32 u32 (of kind+body) | body length u32 | kind u8
    FEED       feed u16 | JSON {"name","exchange","config"}
    CHECKPOINT feed u16 | seq_last i64 | JSON codec.state() (explicit and versioned; a
               checkpoint recovery cannot read - older version, corrupt - is logged and
               replay continues with a fresh codec: books resync)
    CONNECT    feed u16 | ts i64                 (codec.on_connect())
    ROTATE     feed u16 | ts i64                 (codec.on_rotate())
    FRAME      feed u16 | ts i64 | seq i64 | frame bytes
    FRAMES     feed u16 | ts i64 | first seq i64 | n u32 | n x length u32 | frames
               (the frames of one socket read: one record, one checksum; replay feeds
               them to the codec as the same batch, so it decodes exactly as live)
    REST       feed u16 | ts i64 | seq i64 | status u16 | key len u16 | url len u16
               | key | url | body
    EVENT      feed u16 | ts i64 | seq i64 | JSON [event, detail]
A torn or corrupted tail ends a segment: reading stops at the last valid record.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import struct
import uuid
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import orjson
import structlog

from ingestd.clock import Clock
from ingestd.config import FeedConfig
from ingestd.sink.fsutil import fsync_dir, try_lock_dir

log = structlog.get_logger("ingestd.journal")

JOURNAL_DIR = ".journal"
SEGMENT_SUFFIX = ".wal"
# Committed segments kept for `ingestd replay`: <root>/.raw/<instance>/seg-<n>.wal
RAW_DIR = ".raw"
# The raw area is pruned at least this often (and after every segment moved into it).
RAW_PRUNE_INTERVAL_S = 60.0

FEED, CHECKPOINT, CONNECT, ROTATE, FRAME, REST, EVENT, FRAMES = 1, 2, 3, 4, 5, 6, 7, 8

_HEADER = struct.Struct("<IIB")
_FEED_TS = struct.Struct("<Hq")
_FEED_TS_SEQ = struct.Struct("<Hqq")
_REST_EXTRA = struct.Struct("<HHH")
_FRAMES_HEAD = struct.Struct("<HqqI")
_KIND_CRC_FRAMES = zlib.crc32(bytes((8,)))
_crc32 = zlib.crc32
_KIND_CRC_FRAME = zlib.crc32(bytes((5,)))


def encode(kind: int, body: bytes) -> bytes:
    kb = bytes((kind,)) + body
    return _HEADER.pack(_crc32(kb), len(body), kind) + body


@dataclass(slots=True)
class Record:
    kind: int
    feed: int
    ts: int = 0
    seq: int = 0
    data: bytes = b""
    status: int = 0
    key: str = ""
    url: str = ""
    frames: list[bytes] | None = None


def decode_body(kind: int, body: bytes) -> Record:
    if kind == FRAMES:
        feed, ts, seq, n = _FRAMES_HEAD.unpack_from(body)
        off = _FRAMES_HEAD.size
        lengths = struct.unpack_from(f"<{n}I", body, off)
        off += 4 * n
        frames = []
        for length in lengths:
            frames.append(body[off:off + length])
            off += length
        if off != len(body):
            raise ValueError("FRAMES record lengths do not add up")
        return Record(kind, feed, ts, seq, frames=frames)
    if kind in (FRAME, EVENT):
        feed, ts, seq = _FEED_TS_SEQ.unpack_from(body)
        return Record(kind, feed, ts, seq, body[_FEED_TS_SEQ.size:])
    if kind == REST:
        feed, ts, seq = _FEED_TS_SEQ.unpack_from(body)
        status, klen, ulen = _REST_EXTRA.unpack_from(body, _FEED_TS_SEQ.size)
        off = _FEED_TS_SEQ.size + _REST_EXTRA.size
        key = body[off:off + klen].decode()
        url = body[off + klen:off + klen + ulen].decode()
        return Record(kind, feed, ts, seq, body[off + klen + ulen:], status, key, url)
    if kind in (CONNECT, ROTATE):
        feed, ts = _FEED_TS.unpack_from(body)
        return Record(kind, feed, ts)
    if kind == CHECKPOINT:
        feed, seq = _FEED_TS.unpack_from(body)
        return Record(kind, feed, seq=seq, data=body[_FEED_TS.size:])
    if kind == FEED:
        (feed,) = struct.unpack_from("<H", body)
        return Record(kind, feed, data=body[2:])
    raise ValueError(f"unknown record kind {kind}")


def read_segment(path: Path) -> tuple[list[Record], int, bool]:
    """All valid records of a segment, the byte offset after the last one, and whether
    the file continues past it (a torn or corrupted tail)."""
    data = path.read_bytes()
    records: list[Record] = []
    off, n = 0, len(data)
    hsize = _HEADER.size
    while off + hsize <= n:
        crc, length, kind = _HEADER.unpack_from(data, off)
        end = off + hsize + length
        if end > n:
            break
        body = data[off + hsize:end]
        if _crc32(bytes((kind,)) + body) != crc:
            break
        try:
            records.append(decode_body(kind, body))
        except (ValueError, struct.error, UnicodeDecodeError):
            break
        off = end
    return records, off, off != n


def iter_segments(journal_dir: Path) -> list[Path]:
    return sorted(journal_dir.glob(f"seg-*{SEGMENT_SUFFIX}"))


def keep_raw(root: Path, instance: str, segments: list[Path]) -> int:
    """Move committed segments of journal `instance` into `<root>/.raw/<instance>/` (a
    rename: same filesystem; the file keeps its mtime, the time of its last record).
    Blocking. Returns the bytes moved."""
    if not segments:
        return 0
    dest = root / RAW_DIR / instance
    if not dest.is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        fsync_dir(dest.parent)
    moved = 0
    for p in segments:
        try:
            size = p.stat().st_size
            os.rename(p, dest / p.name)
        except FileNotFoundError:
            continue
        moved += size
    fsync_dir(dest)
    fsync_dir(segments[0].parent)
    return moved


@dataclass(frozen=True, slots=True)
class RawPrune:
    """What one pass over the raw area found and did."""

    kept_bytes: int
    kept_segments: int
    deleted_segments: int
    deleted_bytes: int


def prune_raw(root: Path, *, now_ns: int, keep_s: float, max_bytes: int) -> RawPrune:
    """Delete kept raw segments older than `keep_s` (by mtime: the time their last record
    was written), then the oldest ones until the rest fit in `max_bytes` (0: no cap).
    Every instance's segments count (workers share a root). Blocking."""
    base = root / RAW_DIR
    if not base.is_dir():
        return RawPrune(0, 0, 0, 0)
    files: list[tuple[int, str, Path, int]] = []
    for inst in base.iterdir():
        if not inst.is_dir():
            continue
        for p in inst.glob(f"seg-*{SEGMENT_SUFFIX}"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime_ns, str(p), p, st.st_size))
    files.sort()
    cutoff_ns = now_ns - int(keep_s * 1e9)
    total = sum(f[3] for f in files)
    deleted = freed = 0
    for mtime_ns, _name, path, size in files:
        if mtime_ns >= cutoff_ns and (not max_bytes or total <= max_bytes):
            break
        path.unlink(missing_ok=True)
        total -= size
        deleted += 1
        freed += size
    if deleted:
        for inst in base.iterdir():
            try:
                inst.rmdir()  # only empty ones go
            except OSError:
                pass
    return RawPrune(total, len(files) - deleted, deleted, freed)


@dataclass(slots=True)
class _Segment:
    number: int
    path: Path
    max_seq: dict[str, int] = field(default_factory=dict)   # feed key -> highest seq


@dataclass(slots=True)
class JournalStats:
    records: int = 0
    bytes_appended: int = 0
    bytes_durable: int = 0
    fsyncs: int = 0
    fsync_failures: int = 0
    last_fsync_mono: float | None = None
    segments_deleted: int = 0     # retired from the journal (deleted or kept as raw)
    pending_bytes: int = 0
    healthy: bool = True
    last_error: str | None = None
    raw_kept_bytes: int = 0       # bytes in <root>/.raw (every instance), at the last prune
    raw_kept_segments: int = 0
    raw_deleted: int = 0          # kept raw segments deleted by age or the size cap


class Journal:
    """The live journal of this process. Appends happen on the loop; I/O in one thread."""

    def __init__(self, root: Path, *, fsync_interval_s: float, clock: Clock,
                 segment_max_bytes: int = 256 * 1024 * 1024, segment_max_s: float = 300.0,
                 keep_raw_s: float = 0.0, keep_raw_max_bytes: int = 0,
                 max_pending_bytes: int = 256 * 1024 * 1024) -> None:
        self.root = root
        self.instance = uuid.uuid4().hex[:12]
        self.dir = root / JOURNAL_DIR / self.instance
        self.clock = clock
        self.fsync_interval_s = fsync_interval_s
        self.segment_max_bytes = segment_max_bytes
        self.segment_max_s = segment_max_s
        self.keep_raw_s = keep_raw_s
        self.keep_raw_max_bytes = keep_raw_max_bytes
        self._raw_pruned_mono: float | None = None
        self._raw_dirty = False
        self.max_pending_bytes = max_pending_bytes
        self.stats = JournalStats()
        # Appended, not yet handed to the thread: pieces are kept as they are (no growing
        # buffer, no copies) and written with writev.
        self._pieces: list[bytes] = []
        self._feeds: dict[str, int] = {}          # feed name -> id
        self._next_fid = 0
        self._feed_codecs: dict[str, Any] = {}    # feed name -> codec (for checkpoints)
        self._feed_seq: dict[str, Any] = {}       # feed name -> SeqAllocator
        self._feed_info: dict[str, bytes] = {}
        self._segments: list[_Segment] = []
        self._current: _Segment | None = None
        self._segment_started_mono = 0.0
        self._segment_bytes = 0
        self._lock_fd: int | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="ingestd-journal")
        self._flusher: asyncio.Task[None] | None = None
        self._chunks: list[tuple[Path, list[bytes]]] = []  # appended, not yet durable
        self._sizes: dict[Path, int] = {}               # durable length of each segment
        self._writing: asyncio.Future[None] | None = None
        self._room = asyncio.Event()
        self._room.set()

    # ---- lifecycle -------------------------------------------------------------------------
    def open(self) -> None:
        """Blocking: create and lock our directory, start the first segment."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = try_lock_dir(self.dir)
        if self._lock_fd is None:
            raise OSError(f"cannot lock journal directory {self.dir}")
        fsync_dir(self.dir.parent)

    def start(self) -> None:
        self._new_segment()
        self._flusher = asyncio.create_task(self._flush_loop(), name="journal-flush")

    def feed_key(self, feed: str) -> str:
        """The key this journal's feed has in Parquet coverage metadata."""
        return f"{self.instance}/{feed}"

    def register(self, feed: FeedConfig, codec: Any, seq: Any) -> int:
        """A feed's records get this id; its codec is checkpointed at each new segment."""
        # A new id per registration: a feed restarted with a changed config (SIGHUP) must
        # replay with its new codec, not the old one's state.
        self._next_fid += 1
        fid = self._next_fid
        self._feeds[feed.name] = fid
        self._feed_codecs[feed.name] = codec
        self._feed_seq[feed.name] = seq
        info = orjson.dumps({"name": feed.name, "exchange": feed.exchange,
                             "config": msgspec.to_builtins(feed)})
        self._feed_info[feed.name] = info
        self._append(FEED, struct.pack("<H", fid) + info, feed.name, 0)
        self._checkpoint(feed.name)
        return fid

    def unregister(self, feed: str) -> None:
        self._feeds.pop(feed, None)
        self._feed_codecs.pop(feed, None)
        self._feed_seq.pop(feed, None)
        self._feed_info.pop(feed, None)

    async def close(self, removable: bool, timeout_s: float | None = None) -> int:
        """Flush and fsync everything, retrying failed writes for at most `timeout_s`
        (None: until it succeeds); then, if `removable` (every row committed) and nothing
        is left unwritten, retire our segments (deleted, or kept as raw frames). Returns
        the bytes not confirmed written when the bound passed (an attempt still running
        then may yet write some: see `writing`): then the journal stays where it is, for
        the next start to replay what did reach the disk."""
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        await self.flush(timeout_s)
        unwritten = self.stats.pending_bytes
        if unwritten:
            log.error("journal_close_incomplete", unwritten_bytes=unwritten,
                      journal=str(self.dir), timeout_s=timeout_s,
                      error=self.stats.last_error, detail="journal kept for the next start")
        elif removable:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self._retire_all)
        self._executor.shutdown(wait=False)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        return unwritten

    def _retire_all(self) -> None:
        paths = iter_segments(self.dir)
        if self.keep_raw_s:
            self.stats.raw_kept_bytes += keep_raw(self.root, self.instance, paths)
        for p in paths:
            p.unlink(missing_ok=True)
        self.stats.segments_deleted += len(paths)
        (self.dir / ".lock").unlink(missing_ok=True)
        try:
            self.dir.rmdir()
        except OSError:
            pass

    # ---- appending (event loop, hot path) --------------------------------------------------
    def _append(self, kind: int, body: bytes, feed: str, seq: int) -> None:
        kb = bytes((kind,)) + body
        rec = _HEADER.pack(_crc32(kb), len(body), kind) + body
        self._pieces.append(rec)
        n = len(rec)
        st = self.stats
        st.records += 1
        st.bytes_appended += n
        st.pending_bytes += n
        self._segment_bytes += n
        if seq:
            cur = self._current
            if cur is not None and seq > cur.max_seq.get(feed, 0):
                cur.max_seq[feed] = seq
        if st.pending_bytes > self.max_pending_bytes:
            self._room.clear()

    def frame(self, feed: str, fid: int, ts: int, seq: int, frame: bytes) -> None:
        """The hot path: one header and one copy of the frame into the buffer."""
        meta = _FEED_TS_SEQ.pack(fid, ts, seq)
        size = len(meta) + len(frame)
        self._pieces += (_HEADER.pack(_crc32(frame, _crc32(meta, _KIND_CRC_FRAME)), size, FRAME)
                         + meta, frame)
        n = size + _HEADER.size
        st = self.stats
        st.records += 1
        st.bytes_appended += n
        st.pending_bytes += n
        self._segment_bytes += n
        cur = self._current
        if cur is not None:
            cur.max_seq[feed] = seq  # recv_seq only grows per feed
        if st.pending_bytes > self.max_pending_bytes:
            self._room.clear()

    def frames(self, feed: str, fid: int, ts: int, first_seq: int,
               frames: list[bytes]) -> None:
        """The hot path: the frames of one socket read as one record (one join)."""
        n = len(frames)
        head = _FRAMES_HEAD.pack(fid, ts, first_seq, n) + struct.pack(
            f"<{n}I", *[len(f) for f in frames])
        payload = b"".join(frames)
        size = len(head) + len(payload)
        self._pieces += (_HEADER.pack(_crc32(payload, _crc32(head, _KIND_CRC_FRAMES)), size,
                                      FRAMES) + head, payload)
        added = size + _HEADER.size
        st = self.stats
        st.records += 1
        st.bytes_appended += added
        st.pending_bytes += added
        self._segment_bytes += added
        cur = self._current
        if cur is not None:
            cur.max_seq[feed] = first_seq + n - 1  # recv_seq only grows per feed
        if st.pending_bytes > self.max_pending_bytes:
            self._room.clear()

    def note_seq(self, feed: str, seq: int) -> None:
        """A codec used recv_seq values up to `seq` for rows it released (book diffs
        after a REST snapshot): the current segment holds their inputs' successors, so
        it must not be deleted before those rows are committed."""
        cur = self._current
        if cur is not None and seq > cur.max_seq.get(feed, 0):
            cur.max_seq[feed] = seq

    def rest(self, feed: str, fid: int, ts: int, seq: int, status: int, key: str, url: str,
             body: bytes) -> None:
        k, u = key.encode(), url.encode()
        self._append(REST, _FEED_TS_SEQ.pack(fid, ts, seq)
                     + _REST_EXTRA.pack(min(status, 65535), len(k), len(u)) + k + u + body,
                     feed, seq)

    def connect(self, feed: str, fid: int, ts: int) -> None:
        self._append(CONNECT, _FEED_TS.pack(fid, ts), feed, 0)

    def rotate(self, feed: str, fid: int, ts: int) -> None:
        self._append(ROTATE, _FEED_TS.pack(fid, ts), feed, 0)

    def event(self, feed: str, fid: int, ts: int, seq: int, event: str,
              detail: str | None) -> None:
        self._append(EVENT, _FEED_TS_SEQ.pack(fid, ts, seq) + orjson.dumps([event, detail]),
                     feed, seq)

    @property
    def writing(self) -> bool:
        """A write attempt is running in the journal's thread (after a bounded close, one
        started before the bound may still be: the process's exit waits for it)."""
        return self._writing is not None

    @property
    def full(self) -> bool:
        """More than `max_pending_bytes` not yet written (the disk is failing)."""
        return not self._room.is_set()

    async def wait_room(self) -> None:
        await self._room.wait()

    # ---- segments and checkpoints ----------------------------------------------------------
    def _checkpoint(self, feed: str) -> None:
        codec = self._feed_codecs[feed]
        seq = self._feed_seq[feed]
        state = orjson.dumps(codec.state())
        self._append(CHECKPOINT, _FEED_TS.pack(self._feeds[feed], seq.last) + state, feed, 0)

    def _new_segment(self) -> None:
        number = self._current.number + 1 if self._current is not None else 1
        seg = _Segment(number, self.dir / f"seg-{number:08d}{SEGMENT_SUFFIX}")
        self._submit_pending()  # what was appended so far belongs to the old segment
        self._current = seg
        self._segments.append(seg)
        self._segment_bytes = 0
        self._segment_started_mono = self.clock.monotonic()
        # A segment is self-contained: feed table and codec state first.
        for name, fid in self._feeds.items():
            if name in self._feed_info:
                self._append(FEED, struct.pack("<H", fid) + self._feed_info[name], name, 0)
                self._checkpoint(name)

    def _maybe_rotate(self) -> None:
        if self._segment_bytes >= self.segment_max_bytes or \
                self.clock.monotonic() - self._segment_started_mono >= self.segment_max_s:
            self._new_segment()

    # ---- writing (the journal thread) ------------------------------------------------------
    def _submit_pending(self) -> None:
        """Move what was appended into a chunk bound for the current segment file."""
        if self._pieces and self._current is not None:
            self._chunks.append((self._current.path, self._pieces))
            self._pieces = []

    def _start_write(self) -> asyncio.Future[None] | None:
        if self._writing is not None or not self._chunks:
            return self._writing
        chunks = list(self._chunks)
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._executor, self._write, chunks, dict(self._sizes))
        self._writing = asyncio.ensure_future(self._after_write(fut, chunks))
        return self._writing

    async def _after_write(self, fut: asyncio.Future[dict[Path, int]],
                           chunks: list[tuple[Path, list[bytes]]]) -> None:
        st = self.stats
        try:
            sizes = await fut
        except OSError as e:
            st.fsync_failures += 1
            if st.healthy:
                log.error("journal_write_failed", error=f"{type(e).__name__}: {e}",
                          pending_bytes=st.pending_bytes)
            st.healthy = False
            st.last_error = f"{type(e).__name__}: {e}"
            return
        finally:
            self._writing = None
        del self._chunks[:len(chunks)]
        self._sizes.update(sizes)
        n = sum(len(p) for _, pieces in chunks for p in pieces)
        st.fsyncs += 1
        st.bytes_durable += n
        st.pending_bytes -= n
        st.last_fsync_mono = self.clock.monotonic()
        if not st.healthy:
            log.info("journal_recovered")
        st.healthy = True
        st.last_error = None
        if st.pending_bytes <= self.max_pending_bytes:
            self._room.set()

    @staticmethod
    def _write(chunks: list[tuple[Path, list[bytes]]],
               sizes: dict[Path, int]) -> dict[Path, int]:
        """Append chunks and fsync (journal thread). After a failure nothing is trusted
        beyond the last durable size: the file is truncated back to it and every pending
        chunk is written again with a fresh descriptor and fsync'd (a failed fsync is
        never retried on the data it failed for)."""
        new_sizes: dict[Path, int] = {}
        by_path: dict[Path, list[bytes]] = {}
        for path, pieces in chunks:
            by_path.setdefault(path, []).extend(pieces)
        for path, parts in by_path.items():
            created = not path.exists()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                good = sizes.get(path, 0)
                if os.fstat(fd).st_size != good:
                    os.ftruncate(fd, good)
                os.lseek(fd, good, os.SEEK_SET)
                total = _write_all(fd, parts)
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                fsync_dir(path.parent)
            new_sizes[path] = good + total
        return new_sizes

    def flush_blocking(self) -> None:
        """Write everything pending from the calling thread (only for a forced exit)."""
        self._submit_pending()
        if self._chunks:
            try:
                self._write(list(self._chunks), dict(self._sizes))
            except OSError as e:
                log.error("journal_final_write_failed", error=str(e),
                          unwritten_bytes=self.stats.pending_bytes)

    async def flush(self, timeout_s: float | None = None) -> bool:
        """Write and fsync everything appended so far, retrying failed writes until they
        succeed or `timeout_s` has passed (None: no limit). Returns whether everything is
        durable. A write still running at the deadline is left to finish in the thread."""
        self._submit_pending()
        clock = self.clock
        deadline = None if timeout_s is None else clock.monotonic() + max(0.0, timeout_s)
        while self._chunks:
            fut = self._start_write()
            if fut is not None:
                if deadline is None:
                    await fut
                else:
                    try:
                        await asyncio.wait_for(asyncio.shield(fut),
                                               max(0.0, deadline - clock.monotonic()))
                    except TimeoutError:
                        return False
            if not self._chunks:
                break
            pause_s = min(self.fsync_interval_s, 0.2)
            if deadline is not None:
                left_s = deadline - clock.monotonic()
                if left_s <= 0:
                    return False
                pause_s = min(pause_s, left_s)
            await asyncio.sleep(pause_s)
        return True

    async def _flush_loop(self) -> None:
        period = self.fsync_interval_s / 2
        while True:
            await asyncio.sleep(period)
            self._submit_pending()
            if self._writing is None:
                self._maybe_rotate()
                self._start_write()

    # ---- retention -------------------------------------------------------------------------
    def deletable(self, committed_below: dict[str, int | None]) -> list[_Segment]:
        """Segments (not the current one) all of whose rows are committed.

        `committed_below[feed key]` is the lowest recv_seq of that feed not yet committed
        (None: nothing pending)."""
        out = []
        for seg in self._segments[:-1]:
            ok = True
            for feed, max_seq in seg.max_seq.items():
                low = committed_below.get(self.feed_key(feed))
                if low is not None and low <= max_seq:
                    ok = False
                    break
            if not ok:
                break  # keep order: never delete a segment after one that must stay
            out.append(seg)
        return out

    def last_seq(self, feed: str) -> int:
        """The highest recv_seq of `feed` in the segments not yet retired (0: none)."""
        return max((seg.max_seq.get(feed, 0) for seg in self._segments), default=0)

    def feeds_seen(self) -> set[str]:
        """Every feed with a recv_seq in the segments not yet retired (also feeds a
        reload removed since)."""
        return {feed for seg in self._segments for feed in seg.max_seq}

    async def delete_segments(self, segments: list[_Segment]) -> None:
        """Retire committed segments: deleted, or moved to the raw area if raw frames are
        kept (`keep_raw_s`)."""
        if not segments:
            return
        for seg in segments:
            self._segments.remove(seg)
            self._sizes.pop(seg.path, None)
        paths = [s.path for s in segments]
        loop = asyncio.get_running_loop()
        if self.keep_raw_s:
            moved = await loop.run_in_executor(self._executor, keep_raw, self.root,
                                               self.instance, paths)
            self.stats.raw_kept_bytes += moved
            self._raw_dirty = True
        else:
            await loop.run_in_executor(self._executor, self._unlink, paths)
        self.stats.segments_deleted += len(segments)

    async def prune_raw(self, force: bool = False) -> RawPrune | None:
        """Apply `keep_raw_s` and `keep_raw_max_bytes` to the raw area (a thread does the
        I/O): after segments were moved into it, and every RAW_PRUNE_INTERVAL_S. Does
        nothing when raw frames are not kept (a raw area left from such a config stays
        untouched). Returns what it did, or None if it did not run."""
        if not self.keep_raw_s:
            return None
        now = self.clock.monotonic()
        last = self._raw_pruned_mono
        if not (force or self._raw_dirty or last is None
                or now - last >= RAW_PRUNE_INTERVAL_S):
            return None
        self._raw_pruned_mono = now
        self._raw_dirty = False
        loop = asyncio.get_running_loop()
        done = await loop.run_in_executor(
            self._executor, lambda: prune_raw(self.root, now_ns=self.clock.time_ns(),
                                              keep_s=self.keep_raw_s,
                                              max_bytes=self.keep_raw_max_bytes))
        st = self.stats
        st.raw_kept_bytes = done.kept_bytes
        st.raw_kept_segments = done.kept_segments
        if done.deleted_segments:
            st.raw_deleted += done.deleted_segments
            log.info("raw_frames_pruned", deleted_segments=done.deleted_segments,
                     freed_bytes=done.deleted_bytes, kept_bytes=done.kept_bytes,
                     kept_segments=done.kept_segments, keep_s=self.keep_raw_s,
                     max_bytes=self.keep_raw_max_bytes)
        return done

    @staticmethod
    def _unlink(paths: list[Path]) -> None:
        for p in paths:
            p.unlink(missing_ok=True)


IOV_MAX = 1024


def _write_all(fd: int, pieces: list[bytes]) -> int:
    """Write every piece in order with writev (no joining copy); returns the bytes."""
    total = 0
    for start in range(0, len(pieces), IOV_MAX):
        group = pieces[start:start + IOV_MAX]
        want = sum(len(p) for p in group)
        done = os.writev(fd, group)
        if done < want:  # a short write: finish the rest of this group plainly
            view = memoryview(b"".join(group))[done:]
            while view:
                done = os.write(fd, view)
                view = view[done:]
        total += want
    return total


def feed_config_from(info: bytes) -> tuple[str, str, FeedConfig]:
    d = orjson.loads(info)
    return d["name"], d["exchange"], msgspec.convert(d["config"], FeedConfig)


def records_of(journal_dir: Path, truncate: bool, segments: Sequence[Path] | None = None,
               ) -> Iterator[tuple[Path, list[Record], bool]]:
    """Every segment's valid records in order (or those of `segments`, in the order
    given); with `truncate`, torn tails are cut off."""
    for path in iter_segments(journal_dir) if segments is None else segments:
        try:
            recs, end, torn = read_segment(path)
        except FileNotFoundError:
            # Deleted since it was listed (kept raw frames are pruned oldest first): the
            # next segment starts with its own checkpoints.
            log.warning("journal_segment_vanished", segment=str(path))
            continue
        if torn and truncate:
            with open(path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        yield path, recs, torn
