"""Connection-attempt rate limit per venue, shared by all feeds of one exchange.

Owns: a sliding window of recent attempt times and how long the next attempt must wait
so that at most `max_attempts` happen in any `window_s` (venues ban IPs that exceed
their documented limits, e.g. Binance 300 connections / 5 min, OKX 3 / s).

Must not: sleep or read a clock (the caller passes monotonic time and sleeps).
"""

from __future__ import annotations

from collections import deque


class ConnectLimiter:
    def __init__(self, max_attempts: int, window_s: float) -> None:
        self.max_attempts = max_attempts
        self.window_s = window_s
        self._attempts: deque[float] = deque()

    def reserve(self, now: float) -> float:
        """Reserve the next attempt slot; returns how long to wait before using it."""
        q = self._attempts
        while q and q[0] <= now - self.window_s:
            q.popleft()
        if len(q) < self.max_attempts:
            q.append(now)
            return 0.0
        at = q[-self.max_attempts] + self.window_s
        # Reserve the slot at `at` so concurrent callers queue up behind each other.
        q.append(at)
        return at - now
