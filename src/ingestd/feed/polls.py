"""Periodic REST polls of one feed: values a venue sends on no stream (Binance USD-M open
interest, `GET /fapi/v1/openInterest`).

Owns: `PollSchedule` (sans-I/O: when the next request is due - one cycle of the codec's
`poll_requests()` spread evenly over its `poll_interval_s()`, so the venue sees at most one
request every interval/n seconds from this feed - and the pause after a 429 / 418 answer,
honouring its Retry-After, else doubling from RATE_LIMIT_PAUSE_S up to
RATE_LIMIT_PAUSE_MAX_S), and `Poller`, the task that runs the cycle: one request in flight
at a time, each fetched with feed/rest.py under the feed's `rest_timeout_s`, and every
answer - success, HTTP error, garbage or no answer at all - handed to the reader's one REST
ingest path (journal it as a REST record, `codec.on_rest`, hand the rows on), so crash
recovery replays polled answers exactly. Counts answers by outcome (`counts`, the feed's
`FeedStats.polls`, exported as `ingestd_polls_total`: `ok` for an HTTP 200 - the codec
judges its body, a garbage one is a parse error -, `http_<status>`, or rest.py's error
class such as `timeout`) and logs failures at a bounded rate (one line per outcome class
per LOG_EVERY_S, with the number suppressed).

When: the reader runs a Poller only while a session is connected (a helper task of the
session, like the watchdog). Polled values merge into what the stream sends; a venue that
is unreachable or has banned the IP is not polled on top of reconnect attempts. The
schedule and the rate-limit pause outlive sessions: a reconnect neither resets a Retry-After
wait nor restarts the cycle at its first request.

Must not: decode bodies or write rows and events itself (the codec turns a failed answer
into an event row, which is what replay re-creates), run requests concurrently, or let a
failure end the feed (a crashed fetch is a failed answer; nothing else raises but
CancelledError).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ingestd.clock import Clock
from ingestd.exchanges.base import RestRequest
from ingestd.feed.rest import RestAnswer, http_get, retry_after_s
from ingestd.logs import RateLimit

# A 429/418 without Retry-After pauses every poll of the feed this long, doubling for each
# consecutive one up to the cap (Binance counts request weight per minute).
RATE_LIMIT_PAUSE_S = 60.0
RATE_LIMIT_PAUSE_MAX_S = 600.0
RATE_LIMITED = (429, 418)
LOG_EVERY_S = 10.0

Fetch = Callable[[str, float], Awaitable[RestAnswer]]
Ingest = Callable[[RestRequest, RestAnswer, float], Awaitable[None]]


class PollSchedule:
    """When the next poll may start. Times are monotonic seconds passed in by the caller."""

    __slots__ = ("gap_s", "next_at", "paused_until", "rate_limited")

    def __init__(self, interval_s: float, n_requests: int) -> None:
        if interval_s <= 0 or n_requests <= 0:
            raise ValueError("a poll schedule needs a positive interval and requests")
        self.gap_s = interval_s / n_requests
        self.next_at: float | None = None      # None: the first request goes at once
        self.paused_until = 0.0
        self.rate_limited = 0                  # consecutive 429/418 answers

    def wait_s(self, now: float) -> float:
        """How long until the next request may start (0: now)."""
        due = self.paused_until if self.next_at is None \
            else max(self.next_at, self.paused_until)
        return max(0.0, due - now)

    def started(self, now: float) -> None:
        """A request starts now: the next one no sooner than one gap later (a late start
        never lets the following ones catch up in a burst)."""
        self.next_at = max(self.next_at if self.next_at is not None else now, now) \
            + self.gap_s

    def answered(self, status: int, retry_after: float | None, now: float) -> float | None:
        """Account for an answer; returns the pause it imposes on every poll (429/418)."""
        if status in RATE_LIMITED:
            self.rate_limited += 1
            pause_s = retry_after if retry_after is not None else min(
                RATE_LIMIT_PAUSE_MAX_S, RATE_LIMIT_PAUSE_S * 2 ** min(self.rate_limited - 1, 16))
            self.paused_until = max(self.paused_until, now + pause_s)
            return pause_s
        if status > 0:
            self.rate_limited = 0
        return None


def outcome(answer: RestAnswer) -> str:
    """The counter key of an answer: `ok`, `http_<status>`, or rest.py's error class."""
    if answer.error is not None:
        return answer.error.split(":", 1)[0]
    return "ok" if answer.status == 200 else f"http_{answer.status}"


class Poller:
    """Runs one feed's polls; `run()` is started for each connected session."""

    def __init__(self, requests: Sequence[RestRequest], interval_s: float, *,
                 deadline_s: float, clock: Clock, ingest: Ingest, log: Any,
                 counts: Counter[str] | None = None, fetch: Fetch = http_get) -> None:
        self.requests = tuple(requests)
        self.schedule = PollSchedule(interval_s, len(self.requests))
        self.deadline_s = deadline_s
        self.clock = clock
        self.ingest = ingest
        self.fetch = fetch
        self.log = log
        # Answers by outcome (the reader passes its FeedStats.polls: ingestd_polls_total).
        self.counts: Counter[str] = Counter() if counts is None else counts
        self._index = 0                        # the next request of the cycle
        self._log_limit = RateLimit(LOG_EVERY_S)

    async def run(self) -> None:
        """Poll until cancelled (the session ended)."""
        clock = self.clock
        schedule = self.schedule
        while True:
            wait_s = schedule.wait_s(clock.monotonic())
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            req = self.requests[self._index]
            self._index = (self._index + 1) % len(self.requests)
            started = clock.monotonic()
            schedule.started(started)
            try:
                answer = await self.fetch(req.url, self.deadline_s)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a crashed fetch is a failed answer, never the feed's end
                answer = RestAnswer(0, b"", f"error: fetch crashed: {type(e).__name__}: {e}"
                                    [:200])
            now = clock.monotonic()
            pause_s = schedule.answered(
                answer.status, retry_after_s(answer.retry_after, clock.time_ns() / 1e9), now)
            kind = outcome(answer)
            self.counts[kind] += 1
            if kind != "ok" and self._log_limit.allow(kind, now):
                self.log.warning("poll_failed", key=req.key, outcome=kind,
                                 status=answer.status, error=answer.error,
                                 paused_s=None if pause_s is None else round(pause_s, 3),
                                 suppressed=self._log_limit.take_suppressed(kind),
                                 total=self.counts[kind])
            await self.ingest(req, answer, now - started)
