"""A circuit breaker per feed. Pure: the monotonic time is passed in.

Owns: the breaker state of one feed - `closed` (connect normally), `open` after
`failures` consecutive failed sessions (no attempts until `cooldown_s` has passed),
`half_open` (one trial attempt), back to `closed` after a healthy session or to `open`
after a failed trial - and the transitions, which the caller logs.

Must not: sleep, read a clock, or know about sockets.
"""

from __future__ import annotations

from typing import Literal

BreakerState = Literal["closed", "open", "half_open"]


class Breaker:
    def __init__(self, failures: int, cooldown_s: float) -> None:
        self.threshold = failures
        self.cooldown_s = cooldown_s
        self.state: BreakerState = "closed"
        self.consecutive_failures = 0
        self.opened_at: float | None = None
        self.opens = 0

    def wait_s(self, now: float) -> float:
        """How long to wait before the next attempt is allowed (0: go ahead)."""
        if self.state != "open" or self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.cooldown_s - now)

    def before_attempt(self, now: float) -> BreakerState | None:
        """Called right before connecting; returns the new state if it changed."""
        if self.state == "open" and self.wait_s(now) == 0.0:
            self.state = "half_open"
            return self.state
        return None

    def success(self) -> BreakerState | None:
        """A healthy session: close the breaker."""
        self.consecutive_failures = 0
        if self.state != "closed":
            self.state = "closed"
            self.opened_at = None
            return self.state
        return None

    def failure(self, now: float, trip: bool = False) -> BreakerState | None:
        """A failed session (or, with `trip`, one that must open the breaker at once)."""
        self.consecutive_failures += 1
        if self.state == "half_open" or trip or self.consecutive_failures >= self.threshold:
            changed = self.state != "open"
            self.state = "open"
            self.opened_at = now
            if changed:
                self.opens += 1
                return self.state
            return None
        return None
