"""Clocks and the per-feed receive-sequence allocator.

Owns: the `Clock` protocol every time-dependent component takes (so tests inject a fake
one), the system clock, and `SeqAllocator`, which turns receive times into `recv_seq`
values that strictly increase per feed, also across restarts (a nanosecond wall clock
bumped on ties).

Must not: sleep, or be read anywhere on a path that must be deterministic (codecs).
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def time_ns(self) -> int:
        """Wall clock, ns since the Unix epoch (UTC): stamps `ts_recv`."""
        ...

    def monotonic(self) -> float:
        """Monotonic seconds: every timeout, age and backoff."""
        ...


class SystemClock:
    __slots__ = ()

    def time_ns(self) -> int:
        return time.time_ns()

    def monotonic(self) -> float:
        return time.monotonic()


SYSTEM_CLOCK = SystemClock()


class SeqAllocator:
    """`next(ts_ns)` returns max(ts_ns, previous + 1): strictly increasing, close to time."""

    __slots__ = ("last",)

    def __init__(self, last: int = 0) -> None:
        self.last = last

    def next(self, ts_ns: int) -> int:
        last = self.last + 1
        seq = ts_ns if ts_ns > last else last
        self.last = seq
        return seq

    def take(self, ts_ns: int, n: int) -> int:
        """`n` consecutive values for the frames of one read: returns the first."""
        first = self.last + 1
        if ts_ns > first:
            first = ts_ns
        self.last = first + n - 1
        return first

    def bump(self, used: int) -> None:
        """A codec used values up to `used` (released buffered rows)."""
        if used > self.last:
            self.last = used
