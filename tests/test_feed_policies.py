"""Pure connection policies: backoff with full jitter, circuit breaker, rate limit."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from ingestd.feed.backoff import Backoff
from ingestd.feed.breaker import Breaker
from ingestd.feed.limiter import ConnectLimiter
from ingestd.feed.reader import retry_after_s


def test_backoff_doubles_caps_and_resets() -> None:
    b = Backoff(0.5, 30.0, random.Random(1))
    caps = []
    for _ in range(10):
        caps.append(b.cap_s())
        b.next_delay_s()
    assert caps[:7] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0] and caps[-1] == 30.0
    b.reset()
    assert b.cap_s() == 0.5 and b.failures == 0


@given(seed=st.integers(), failures=st.integers(0, 200))
def test_backoff_delay_is_full_jitter_within_cap(seed: int, failures: int) -> None:
    b = Backoff(0.5, 30.0, random.Random(seed))
    b.failures = failures
    cap = b.cap_s()
    assert 0.0 <= b.next_delay_s() <= cap <= 30.0


def test_backoff_jitter_spreads_feeds() -> None:
    delays = {round(Backoff(1.0, 30.0, random.Random(i)).next_delay_s(), 6) for i in range(50)}
    assert len(delays) == 50


def test_breaker_opens_after_n_failures_half_opens_and_closes() -> None:
    br = Breaker(failures=3, cooldown_s=30.0)
    assert br.failure(now=1.0) is None and br.failure(now=2.0) is None
    assert br.failure(now=3.0) == "open" and br.opens == 1
    assert br.wait_s(now=10.0) == 23.0
    assert br.before_attempt(now=10.0) is None and br.state == "open"
    assert br.before_attempt(now=33.0) == "half_open"
    # A failed trial re-opens at once; a healthy session closes.
    assert br.failure(now=34.0) == "open" and br.wait_s(34.0) == 30.0
    assert br.before_attempt(now=64.0) == "half_open"
    assert br.success() == "closed" and br.consecutive_failures == 0
    assert br.success() is None


def test_breaker_trip_opens_immediately() -> None:
    br = Breaker(failures=5, cooldown_s=10.0)
    assert br.failure(now=0.0, trip=True) == "open"


def test_limiter_spaces_attempts_to_the_venue_limit() -> None:
    lim = ConnectLimiter(max_attempts=3, window_s=1.0)
    waits = [lim.reserve(now=0.0) for _ in range(7)]
    assert waits == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0]
    assert lim.reserve(now=5.0) == 0.0


def test_retry_after_parsing() -> None:
    assert retry_after_s("7", 0.0) == 7.0
    assert retry_after_s("0.5", 0.0) == 0.5
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", 1445412470.0) == 10.0
    assert retry_after_s("soon", 0.0) is None and retry_after_s(None, 0.0) is None
