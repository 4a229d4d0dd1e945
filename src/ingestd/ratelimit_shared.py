"""A per-venue connection-rate limit that holds across the worker processes of one host.

Owns: `SharedConnectLimiter`, a `ConnectLimiter` whose recent attempt times live in a small
memory-mapped file per venue, `<local_dir>/.limits/<exchange>.slots`, guarded by an
`fcntl.flock` on it: every worker of a supervisor maps the same file, so `max_attempts`
connection attempts per `window_s` hold for the host, not per process. The file holds a
ring of the last `max_attempts` reserved attempt times (CLOCK_MONOTONIC seconds, which
every process of the host shares) and the kernel boot id (monotonic time restarts at boot:
a file from an earlier boot is reset). A reservation takes the slot
`max(now, oldest of the last max_attempts + window_s, newest)`: at most `max_attempts`
attempts start in any window, callers queue in order. `reset_limits` clears the files
(the supervisor calls it before it starts any worker).

Cost: one uncontended flock and a few loads/stores on a mapped page per connection attempt
(microseconds, no disk I/O: the page is written back lazily and its content matters only
while the host is up), so it is called on the event loop like the in-process limiter.

Must not: sleep (the caller sleeps), read a clock (the caller passes monotonic time), or
fail a feed: a file that cannot be opened falls back to the in-process window (logged).
"""

from __future__ import annotations

import fcntl
import math
import mmap
import os
import struct
from pathlib import Path

import structlog

from ingestd.feed.limiter import ConnectLimiter

log = structlog.get_logger("ingestd.ratelimit")

LIMITS_DIR = ".limits"
MAGIC = b"ILIM0001"
# magic(8) boot id(16) slots(u32) head(u32), then `slots` float64 times.
_HEADER = struct.Struct("<8s16sII")


def boot_id() -> bytes:
    """16 bytes naming this boot of the host (b"\\0" * 16 where the kernel has no boot id)."""
    try:
        text = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return bytes.fromhex(text.replace("-", ""))[:16].ljust(16, b"\0")
    except (OSError, ValueError):  # pragma: no cover - not Linux
        return b"\0" * 16


def limits_dir(local_dir: Path) -> Path:
    return local_dir / LIMITS_DIR


def reset_limits(local_dir: Path) -> None:
    """Remove every venue's file (blocking; before any worker runs)."""
    d = limits_dir(local_dir)
    if not d.is_dir():
        return
    for p in d.iterdir():
        if p.name.endswith(".slots"):
            p.unlink(missing_ok=True)


class SharedConnectLimiter(ConnectLimiter):
    """`ConnectLimiter` over a file shared by the processes of one host."""

    def __init__(self, path: Path, max_attempts: int, window_s: float) -> None:
        super().__init__(max_attempts, window_s)
        self.path = path
        self._size = _HEADER.size + 8 * max_attempts
        self._fd: int | None = None
        self._mm: mmap.mmap | None = None
        try:
            self._open()
        except OSError as e:
            log.error("shared_limiter_unavailable", path=str(path), error=str(e),
                      detail="this process limits its own attempts only")
            self.close()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._fd = fd
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            me = boot_id()
            valid = os.fstat(fd).st_size == self._size
            if valid:
                magic, boot, slots, head = _HEADER.unpack(os.pread(fd, _HEADER.size, 0))
                valid = magic == MAGIC and boot == me and slots == self.max_attempts \
                    and head < slots
            if not valid:
                body = _HEADER.pack(MAGIC, me, self.max_attempts, 0) \
                    + struct.pack(f"<{self.max_attempts}d", *([-math.inf] * self.max_attempts))
                os.ftruncate(fd, 0)
                os.pwrite(fd, body, 0)
            self._mm = mmap.mmap(fd, self._size)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def reserve(self, now: float) -> float:
        mm, fd = self._mm, self._fd
        if mm is None or fd is None:
            return super().reserve(now)
        n = self.max_attempts
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            head = struct.unpack_from("<I", mm, _HEADER.size - 4)[0] % n
            oldest = struct.unpack_from("<d", mm, _HEADER.size + 8 * head)[0]
            newest = struct.unpack_from("<d", mm, _HEADER.size + 8 * ((head - 1) % n))[0]
            at: float = max(now, oldest + self.window_s, newest)
            struct.pack_into("<d", mm, _HEADER.size + 8 * head, at)
            struct.pack_into("<I", mm, _HEADER.size - 4, (head + 1) % n)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        return at - now

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def shared_limiters(local_dir: Path, limits: dict[str, tuple[int, float]]
                    ) -> dict[str, ConnectLimiter]:
    """One shared limiter per venue id (`limits`: venue -> (max_attempts, window_s))."""
    d = limits_dir(local_dir)
    return {venue: SharedConnectLimiter(d / f"{venue}.slots", n, window_s)
            for venue, (n, window_s) in limits.items()}


__all__ = ["LIMITS_DIR", "SharedConnectLimiter", "boot_id", "limits_dir", "reset_limits",
           "shared_limiters"]
