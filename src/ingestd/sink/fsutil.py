"""Filesystem primitives the durability code shares: directory fsync and directory locks.

Owns: `fsync_dir` (make a rename or a new entry durable) and `try_lock_dir` (an flock on
`<dir>/.lock`, held by an open descriptor, that tells a live owner from a dead one).

Must not: be called on the event loop (blocking syscalls).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def try_lock_dir(d: Path) -> int | None:
    """flock `<d>/.lock` without waiting: the fd holding it, or None if a live owner has it."""
    try:
        fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def sync_dirs(dirs: list[Path], fsync_dir: Callable[[Path], None]) -> dict[Path, str | None]:
    """Sync each directory (blocking; worker thread): None where it worked, else why not."""
    out: dict[Path, str | None] = {}
    for d in dirs:
        try:
            fsync_dir(d)
        except OSError as e:
            out[d] = f"{type(e).__name__}: {e}"
        else:
            out[d] = None
    return out
