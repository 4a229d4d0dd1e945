"""Exponential backoff with full jitter. Pure: the random source is injected.

Owns: the delay before the next connection attempt of one feed, growing with consecutive
failures (`min_s * 2**n`, capped at `max_s`, then drawn uniformly from [0, cap]: "full
jitter", so many feeds failing together do not reconnect in lockstep), and its reset
after a healthy session.

Must not: sleep or read a clock.
"""

from __future__ import annotations

import random


class Backoff:
    def __init__(self, min_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self.min_s = min_s
        self.max_s = max_s
        self.failures = 0
        self._rng = rng or random.Random()

    def cap_s(self) -> float:
        return min(self.max_s, self.min_s * 2.0 ** min(self.failures, 62))

    def next_delay_s(self) -> float:
        """Record one more failure and return how long to wait before retrying."""
        cap = self.cap_s()
        self.failures += 1
        return self._rng.uniform(0.0, cap)

    def reset(self) -> None:
        self.failures = 0
