"""The reader task of one feed: the only owner of that feed's WebSocket connections.

Owns: connecting (through the feed's circuit breaker and the venue's connection-rate
limit), subscribing, receiving the frames of each socket read (stamped with `ts_recv` by
the transport when they were read) and numbering them (`recv_seq`), the ONE ingest path
(journal the read, decode it with one codec call, hand its blocks on through the feed's
ordered outbox, synchronously, before anything else of the feed can run) used by normal
streaming, rotation and REST answers alike, then sending what the codec asks to send
(replies, keepalives) - a reply that cannot be sent never costs the rows of its read -
fetching the REST snapshots it requests and, while connected, running the codec's
periodic REST polls (feed/polls.py; their answers take the same REST ingest path),
keeping bad frames raw, detecting stale streams, reconnecting with backoff,
make-before-break rotation (feed/rotation.py), and the feed's counters and `events` rows
(connected, disconnected with the reason, stale).

Supervision: every task of a feed is watched. An unexpected exception in a session is
classified, logged, written as an `error` event and retried with backoff; a fetch that
crashes is reported to the codec as a failed snapshot (retried); a crashed watchdog or
keepalive ends the session (reconnect); a crash of the reader loop itself is logged,
recorded and the loop restarts.

Must not: decode venue formats (codecs do), write files (the writer does), or block the
loop. Stopping is graceful: a frame already received is always handed on before the
task ends; the task is only interrupted while it waits on the network or a sleep.

Sessions: a session that ends before `healthy_session_s` of streaming is a failure; the
backoff (full jitter) grows with consecutive failures and resets only after a healthy
session - as soon as a session has streamed `healthy_session_s`, which also closes a
half-open breaker while that trial session goes on; `breaker_failures` consecutive
failures open the breaker for `breaker_cooldown_s`. Handshake answers are classified:
network errors and 5xx retry; 429/418 wait at least Retry-After; other 4xx open the
breaker at once (a clear error for that feed, retried only after the cooldown).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Coroutine
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import structlog

from ingestd.clock import Clock, SeqAllocator
from ingestd.config import FeedConfig
from ingestd.exchanges import CODECS
from ingestd.exchanges.base import Codec, Output, RestRequest
from ingestd.exchanges.connect import ConnectsAfterRest
from ingestd.feed.backoff import Backoff
from ingestd.feed.breaker import Breaker
from ingestd.feed.intake import Intake
from ingestd.feed.limiter import ConnectLimiter
from ingestd.feed.polls import Poller
from ingestd.feed.rest import USER_AGENT, RestAnswer, http_get, retry_after_s
from ingestd.feed.rotation import Rotation
from ingestd.feed.transport import Connection, HandshakeRejected, TransportClosed, connect
from ingestd.logs import RateLimit
from ingestd.schema import (
    EV_BREAKER_CLOSED,
    EV_BREAKER_HALF_OPEN,
    EV_BREAKER_OPEN,
    EV_CONNECTED,
    EV_DISCONNECTED,
    EV_ERROR,
    EV_GAP,
    EV_RESYNC,
    EV_STALE,
)
from ingestd.sink.journal import Journal
from ingestd.sink.writer import Reject
from ingestd.stats import FeedStats

log = structlog.get_logger("ingestd.reader")

OPEN_TIMEOUT_S = 10.0
# Make-before-break: the new connection must have streamed this long before the switch,
# so that its first frames overlap what the old one delivered (the codec drops the
# overlap by exchange ids).
ROTATION_OVERLAP_S = 1.0
# Frames processed back to back before the reader lets the loop run (a truthful ts_recv
# needs the loop to read the socket often; each yield costs a loop iteration).
YIELD_EVERY_FRAMES = 128
# A crashed reader loop restarts after this long.
CRASH_RESTART_S = 1.0


@dataclass(slots=True)
class SessionEnd:
    reason: str
    streamed_s: float = 0.0          # time between connect and the end (0: never connected)
    retry_after_s: float | None = None
    trip_breaker: bool = False       # a non-retryable answer: open the breaker at once


class FeedReader:
    def __init__(self, feed: FeedConfig, intake: Intake, *, clock: Clock,
                 stats: FeedStats | None = None, seq: SeqAllocator | None = None,
                 rng: random.Random | None = None,
                 limiter: ConnectLimiter | None = None, journal: Journal | None = None,
                 codec: Codec | None = None) -> None:
        self.feed = feed
        self.name = feed.name
        self.exchange = feed.exchange
        # A codec restored from saved state or crash recovery keeps its trade-id
        # watermarks (no duplicates, gap detection across the restart); its book state
        # resets on connect.
        self.codec: Codec = codec or CODECS[feed.exchange](feed)
        self.intake = intake
        self.outbox = intake.outbox(self._count_dropped)
        self.clock = clock
        self.stats = stats or FeedStats(feed.name, feed.exchange)
        self.seq = seq or SeqAllocator()
        self.backoff = Backoff(feed.reconnect_min_delay_s, feed.reconnect_max_delay_s, rng)
        self.breaker = Breaker(feed.breaker_failures, feed.breaker_cooldown_s)
        self.limiter = limiter or ConnectLimiter(*self.codec.connect_limit)
        self.healthy_session_s = feed.healthy_session_s
        self.stale_after_s = feed.stale_after_s or self.codec.default_stale_after_s
        self.rotate_after_s = feed.rotate_after_s or self.codec.default_rotate_after_s
        self.log = log.bind(feed=feed.name, exchange=feed.exchange)
        self._bad_frames = RateLimit(10.0)
        self._stopping = False
        self._interruptible = False
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()     # supervised helpers of a session
        self._ws: Connection | None = None
        self._rotation: Rotation | None = None
        self._session_error: str | None = None          # a crashed helper ends the session
        self._went_stale = False
        self.handed_seq = 0                              # highest recv_seq pushed
        self.journal = journal
        self._fid = journal.register(feed, self.codec, self.seq) if journal else 0
        self._drop_when_journal_full = intake.block is False
        polls = self.codec.poll_requests()
        interval_s = self.codec.poll_interval_s()
        # Periodic REST polls (feed/polls.py), run while a session is connected.
        self.poller: Poller | None = Poller(
            polls, interval_s, deadline_s=feed.rest_timeout_s, clock=clock,
            ingest=self._poll_answer, log=self.log, counts=self.stats.polls,
        ) if polls and interval_s > 0 else None

    # ---- lifecycle -------------------------------------------------------------------------
    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run(), name=f"reader:{self.name}")
        return self._task

    def stop(self) -> None:
        """Ask the reader to finish; it hands on what it already received, then ends."""
        self._stopping = True
        if self._interruptible and self._task is not None:
            self._interruptible = False
            self._task.cancel()

    async def run(self) -> None:
        """The supervised reader loop: sessions until stopped; a crash restarts it."""
        st = self.stats
        try:
            while not self._stopping:
                try:
                    await self._sessions()
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # a bug outside a session: log, record, restart
                    reason = f"reader crashed: {type(e).__name__}: {e}"[:300]
                    st.last_error = reason
                    self.log.exception("reader_crashed")
                    self._feed_event(EV_ERROR, reason)
                    await self._interruptible_sleep(CRASH_RESTART_S)
            # What was handed on but still waits in the outbox (a full queue in `block`
            # mode: a snapshot and the diffs it released, the last `disconnected` event)
            # reaches the queue before the task ends - the daemon's STOP goes behind it.
            await self.outbox.drained()
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        finally:
            st.state = "stopped"
        self.log.info("feed_stopped", messages=st.messages, reconnects=st.reconnects,
                      gaps=st.gaps, parse_errors=sum(st.parse_errors.values()))

    async def _sessions(self) -> None:
        while not self._stopping:
            await self._wait_for_breaker()
            wait_s = self.limiter.reserve(self.clock.monotonic())
            if wait_s > 0:
                await self._interruptible_sleep(wait_s)
            end = await self._session()
            if self._stopping:
                break
            delay_s = self._after_session(end)
            self.stats.state = "reconnecting"
            await self._interruptible_sleep(delay_s)

    async def _wait_for_breaker(self) -> None:
        wait_s = self.breaker.wait_s(self.clock.monotonic())
        if wait_s > 0:
            self.stats.state = "reconnecting"
            await self._interruptible_sleep(wait_s)
        if self.breaker.before_attempt(self.clock.monotonic()) is not None:
            self.stats.breaker = self.breaker.state
            self.log.info("breaker_half_open")
            self._feed_event(EV_BREAKER_HALF_OPEN, None)

    def _after_session(self, end: SessionEnd) -> float:
        """Classify the finished session; returns the delay before the next attempt."""
        st = self.stats
        now = self.clock.monotonic()
        healthy = end.streamed_s >= self.healthy_session_s and not end.trip_breaker
        if healthy:
            self.backoff.reset()
            if self.breaker.success() is not None:
                self.log.info("breaker_closed")
                self._feed_event(EV_BREAKER_CLOSED, None)
        else:
            changed = self.breaker.failure(now, trip=end.trip_breaker)
            if changed is not None:
                self.log.error("breaker_opened", failures=self.breaker.consecutive_failures,
                               cooldown_s=self.breaker.cooldown_s, reason=end.reason)
                self._feed_event(
                    EV_BREAKER_OPEN, f"after {self.breaker.consecutive_failures} failed "
                    f"session(s), cooling down {self.breaker.cooldown_s:g} s: {end.reason}")
        st.breaker = self.breaker.state
        delay_s = 0.0 if healthy else self.backoff.next_delay_s()
        if end.retry_after_s is not None:
            delay_s = max(delay_s, end.retry_after_s)
        self.log.warning("feed_disconnected", reason=end.reason, healthy=healthy,
                         streamed_s=round(end.streamed_s, 3), retry_in_s=round(delay_s, 3),
                         failures=self.breaker.consecutive_failures, breaker=st.breaker)
        return delay_s

    def _session_proved(self) -> None:
        """The session has streamed `healthy_session_s`: it is healthy now, not only when
        it ends - the backoff resets and a half-open breaker (this was its trial) closes
        while the session goes on."""
        self.backoff.reset()
        if self.breaker.success() is not None:
            self.log.info("breaker_closed", streamed_s=self.healthy_session_s)
            self._feed_event(EV_BREAKER_CLOSED, f"trial session streamed "
                             f"{self.healthy_session_s:g} s")
        self.stats.breaker = self.breaker.state

    async def _interruptible_sleep(self, delay_s: float) -> None:
        self._interruptible = True
        try:
            await asyncio.sleep(delay_s)
        finally:
            self._interruptible = False

    # ---- connecting ------------------------------------------------------------------------
    async def _connect(self, url: str) -> Connection:
        return await asyncio.wait_for(
            connect(url, ping_interval_s=self.codec.ws_ping_interval_s,
                    max_size=self.feed.max_frame_bytes, user_agent=USER_AGENT),
            OPEN_TIMEOUT_S + 1.0)

    def _handshake_failure(self, e: Exception) -> SessionEnd:
        if isinstance(e, HandshakeRejected):
            status = e.status
            if status in (429, 418):
                retry = next((v for k, v in e.headers.items() if k.lower() == "retry-after"),
                             None)
                after = retry_after_s(retry, self.clock.time_ns() / 1e9)
                wait = after if after is not None else self.feed.reconnect_max_delay_s
                return SessionEnd(f"handshake refused: HTTP {status} (rate limited)",
                                  retry_after_s=wait)
            if 500 <= status < 600:
                return SessionEnd(f"handshake refused: HTTP {status}")
            return SessionEnd(f"handshake refused: HTTP {status} (not retryable: check the "
                              "feed's url and symbols)", trip_breaker=True)
        if isinstance(e, OSError | TimeoutError):
            return SessionEnd(f"connect failed: {type(e).__name__}: {e}")
        # Anything else is unexpected (e.g. a URL no connection can use): classified,
        # logged, recorded as an `error` event and retried with backoff like a failed
        # connect.
        reason = f"connect failed (unexpected): {type(e).__name__}: {e}"[:300]
        self.log.error("connect_crashed", error=reason)
        self._feed_event(EV_ERROR, reason)
        return SessionEnd(reason)

    async def _before_connect(self) -> SessionEnd | None:
        """A venue whose connection needs a REST answer first (KuCoin's token): fetch it
        and hand it to the codec. No usable answer is a failed session (backoff)."""
        codec = self.codec
        if not isinstance(codec, ConnectsAfterRest):
            return None
        req = codec.connect_request()
        if req is None:
            return None
        answer = await http_get(req.url, self.feed.rest_timeout_s, method=req.method)
        status, body = answer.status, answer.body
        if answer.error is not None:
            status, body = 0, answer.error.encode()
        problem = codec.on_connect_answer(status, body)
        return None if problem is None else SessionEnd(
            f"connect request failed: {problem}"[:300])

    # ---- one session -----------------------------------------------------------------------
    async def _session(self) -> SessionEnd:
        """Connect, subscribe and stream until the connection ends."""
        st = self.stats
        st.state = "connecting" if st.connects == 0 else "reconnecting"
        self._interruptible = True
        try:
            failed = await self._before_connect()
            if failed is not None:
                st.last_error = failed.reason
                return failed
            url = self.codec.ws_url()
            ws = await self._connect(url)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            end = self._handshake_failure(e)
            st.last_error = end.reason
            return end
        finally:
            self._interruptible = False
        connected_at = self.clock.monotonic()
        self._count_connect()
        self.log.info("feed_connected", url=url.split("?", 1)[0], connects=st.connects)
        end = SessionEnd("closed")
        self._ws = ws
        self._went_stale = False
        self._session_error = None
        try:
            if self.journal is not None:
                self.journal.connect(self.name, self._fid, self.clock.time_ns())
            self.codec.on_connect()
            self._feed_event(EV_CONNECTED, url.split("?", 1)[0])
            await self._subscribe(ws)
            st.last_message_mono = self.clock.monotonic()
            self._spawn(self._watchdog(), "watchdog")
            if self.codec.keepalive_interval_s:
                self._spawn(self._keepalive(self.codec.keepalive_interval_s), "keepalive")
            if self.poller is not None:
                self._spawn(self.poller.run(), "poll")
            while True:
                try:
                    await self._stream(self._ws)
                    end.reason = "shutdown"  # stopping (seen between two reads)
                    break
                except TransportClosed:
                    if not await self._switch_to_rotated():
                        raise
        except TransportClosed as e:
            end.reason = e.describe()
            if self._session_error is not None:
                end.reason = self._session_error
            elif self._went_stale:
                end.reason = f"stale: no data for {self.stale_after_s:g} s"
            elif e.code == 1009 and not e.by_peer:
                # Either transport refused a message over max_frame_bytes (never
                # delivered) and closed with 1009.
                st.parse_errors["oversized_frame"] += 1
                end.reason = (f"oversized frame: a message over {self.feed.max_frame_bytes} "
                              f"bytes (closed with 1009: {e.reason})")[:300]
                if self._bad_frames.allow("oversized_frame", self.clock.monotonic()):
                    self.log.warning("bad_frame", reason="oversized_frame",
                                     max_frame_bytes=self.feed.max_frame_bytes,
                                     suppressed=self._bad_frames.take_suppressed(
                                         "oversized_frame"),
                                     total=st.parse_errors["oversized_frame"])
        except asyncio.CancelledError:
            end.reason = "shutdown"
            if not self._stopping:
                raise
        except Exception as e:  # supervision: a bug must not end the feed silently
            end.reason = f"internal error: {type(e).__name__}: {e}"[:300]
            self.log.exception("session_crashed")
            self._feed_event(EV_ERROR, end.reason)
        finally:
            await self._end_session(end)
        end.streamed_s = self.clock.monotonic() - connected_at
        return end

    async def _end_session(self, end: SessionEnd) -> None:
        st = self.stats
        await self._cancel_rotation()
        tasks, self._tasks = list(self._tasks), set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        current = self._ws
        self._ws = None
        if current is not None:
            with suppress(Exception):
                await asyncio.shield(current.close())
        st.state = "stopped" if self._stopping else "reconnecting"
        st.last_error = None if end.reason == "shutdown" else end.reason
        self._feed_event(EV_DISCONNECTED, end.reason)

    def _spawn(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        """A supervised helper task of this session."""
        task = asyncio.create_task(coro, name=f"{what}:{self.name}")
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._helper_done(t, what))

    def _helper_done(self, task: asyncio.Task[None], what: str) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        reason = f"{what} crashed: {type(exc).__name__}: {exc}"[:300]
        self.log.error("task_crashed", task=what, error=reason)
        self._feed_event(EV_ERROR, reason)
        if what not in ("fetch", "poll") and self._ws is not None:
            # Without its watchdog or keepalive the session cannot be trusted: end it.
            self._session_error = reason
            self._ws.abort()

    def _count_connect(self) -> None:
        st = self.stats
        st.connects += 1
        if st.connects > 1:
            st.reconnects += 1
        st.state = "streaming"

    async def _subscribe(self, ws: Connection) -> None:
        for msg in self.codec.subscribe_messages():
            await ws.send(msg)

    # ---- the ingest path -----------------------------------------------------------------
    async def _stream(self, ws: Connection) -> None:
        """Receive until the connection closes (raises) or the reader stops (returns).
        A read is always handed on whole, even if a stop arrives meanwhile."""
        clock = self.clock
        st = self.stats
        outbox = self.outbox
        journal = self.journal
        since_yield = 0
        while not self._stopping:
            self._interruptible = True
            try:
                ts_recv_ns, frames = await ws.recv_batch()
            finally:
                self._interruptible = False
            st.last_message_mono = clock.monotonic()
            if journal is not None and journal.full and not await self._journal_room(frames):
                continue
            out = self.ingest(ts_recv_ns, frames)
            if out.requests or out.replies or out.reconnect:
                await self._follow_up(out)
            if outbox.pending:
                await outbox.drained()
            since_yield += len(frames)
            if since_yield >= YIELD_EVERY_FRAMES:
                # recv_batch does not suspend while frames are queued: let the loop read
                # the socket (stamping what arrived) and run timers between reads.
                since_yield = 0
                await asyncio.sleep(0)

    def ingest(self, ts_recv_ns: int, frames: list[bytes]) -> Output:
        """Journal, decode and hand on the frames of one socket read. Synchronous: the
        recv_seq values it allocates reach the queue before anything else of the feed."""
        st = self.stats
        n = len(frames)
        st.messages += n
        st.bytes += sum(map(len, frames))
        first = self.seq.take(ts_recv_ns, n)
        if self.journal is not None:
            self.journal.frames(self.name, self._fid, ts_recv_ns, first, frames)
        out = self.codec.parse_batch(frames, ts_recv_ns, first)
        last = first + n - 1
        if out.last_seq < last:
            out.last_seq = last
        if out.rejects:
            self._keep_rejects(out, [(frames[i], reason) for i, reason in out.rejects],
                               ts_recv_ns)
        self._hand_on(out)
        return out

    def _hand_on(self, out: Output) -> None:
        """Counters, then push (rows or rejects) through the ordered outbox."""
        st = self.stats
        if out.last_seq > self.seq.last:
            self.seq.bump(out.last_seq)
            if self.journal is not None:
                self.journal.note_seq(self.name, out.last_seq)
        if out.unknown:
            st.unknown_messages += out.unknown
        if out.drops:
            st.drops.update(out.drops)
        rows = st.rows
        has_rows = False
        # Every table: a read whose only rows are derivatives or liquidations is handed on
        # like any other (a fixed list of tables once lost them silently).
        for block in (out.trades, out.quotes, out.book, out.events, out.derivatives,
                      out.liquidations):
            if block is not None:
                rows[block.TABLE] += len(block)
                has_rows = True
        if out.events is not None:
            self._count_events(out)
        if has_rows or out.raw_rejects:
            self.handed_seq = out.last_seq
            self.outbox.push(out)

    async def _follow_up(self, out: Output) -> None:
        """What the codec asked for beyond rows: fetches, replies, a reconnect. The rows
        are already handed on: a reply that cannot be sent costs nothing but the reply."""
        if out.requests:
            for req in out.requests:
                self._spawn(self._fetch(req), "fetch")
        if out.replies:
            ws = self._ws
            for text in out.replies:
                if ws is None:
                    break
                try:
                    await ws.send(text)
                except (TransportClosed, OSError) as e:
                    # The venue is closing: the session ends next; its rows are kept.
                    self.log.warning("reply_not_sent", error=str(e)[:200])
                    break
        if out.reconnect:
            self._request_rotation(out.reconnect)

    def _count_dropped(self, out: Output) -> None:
        """`drop_newest` dropped this output at the queue: count what it held."""
        st = self.stats
        st.drops["queue_full"] += out.messages or 1
        for block in out.blocks():
            st.drops[f"queue_full_{block.TABLE}_rows"] += len(block)
        if out.raw_rejects:
            st.drops["queue_full_rejects"] += len(out.raw_rejects)

    async def _journal_room(self, frames: list[bytes]) -> bool:
        """The journal cannot write (disk failing): block, or drop and count the read."""
        journal = self.journal
        assert journal is not None
        if self._drop_when_journal_full:
            self.stats.drops["journal_full"] += len(frames)
            return False
        await journal.wait_room()
        return True

    def _count_events(self, out: Output) -> None:
        st = self.stats
        assert out.events is not None
        names = out.events.event
        for ev in names:
            if ev == EV_GAP:
                st.gaps += 1
            elif ev == EV_RESYNC:
                st.resyncs += 1
        self.log.info("feed_events", events=list(zip(out.events.symbol, names,
                                                      out.events.detail, strict=True))[:20],
                      count=len(names))

    # ---- REST ------------------------------------------------------------------------------
    async def _fetch(self, req: RestRequest) -> None:
        if req.delay_s > 0:
            await asyncio.sleep(req.delay_s)
        started = time.monotonic()
        try:
            answer = await http_get(req.url, self.feed.rest_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a crashed fetch is a failed snapshot: the codec retries
            answer = RestAnswer(0, b"", f"fetch crashed: {type(e).__name__}: {e}")
        await self._rest_answer(req, answer, time.monotonic() - started)

    async def _poll_answer(self, req: RestRequest, answer: RestAnswer,
                           elapsed_s: float) -> None:
        await self._rest_answer(req, answer, elapsed_s, polled=True)

    async def _rest_answer(self, req: RestRequest, answer: RestAnswer, elapsed_s: float,
                           *, polled: bool = False) -> None:
        """The one ingest path of a REST answer (a snapshot or a poll): journal it, hand
        it to the codec, hand the rows on, then do what the codec asks next. A polled
        answer is logged at debug (the poller logs its failures at a bounded rate)."""
        status, body, error = answer.status, answer.body, answer.error
        if error is not None:
            status, body = 0, error.encode()
        ts_recv_ns = self.clock.time_ns()
        seq = self.seq.next(ts_recv_ns)
        if self.journal is not None:
            self.journal.rest(self.name, self._fid, ts_recv_ns, seq, status, req.key, req.url,
                              body)
        out = self.codec.on_rest(req, status, body, ts_recv_ns, seq)
        out.last_seq = max(out.last_seq, seq)
        (self.log.debug if polled else self.log.info)(
            "rest_fetched", key=req.key, status=status, bytes=len(body), error=error,
            elapsed_s=round(elapsed_s, 3))
        if out.rejects:
            self._keep_rejects(out, [(body, reason) for _, reason in out.rejects],
                               ts_recv_ns)
        self._hand_on(out)
        await self._follow_up(out)

    # ---- keepalive and staleness -----------------------------------------------------------
    async def _keepalive(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            msg = self.codec.keepalive_message()
            ws = self._ws
            if msg is not None and ws is not None:
                with suppress(TransportClosed, OSError):
                    await ws.send(msg)

    async def _watchdog(self) -> None:
        """Stale streams, a session proving healthy, and planned rotation: checks a few
        times per bound."""
        st = self.stats
        period_s = min(1.0, self.stale_after_s / 4)
        started = connected_at = self.clock.monotonic()
        proved = False
        while True:
            await asyncio.sleep(period_s)
            now = self.clock.monotonic()
            if not proved and now - connected_at >= self.healthy_session_s:
                proved = True
                self._session_proved()
            last = st.last_message_mono or started
            if now - last > self.stale_after_s:
                st.stale += 1
                self.log.warning("feed_stale", silent_s=round(now - last, 3),
                                 stale_after_s=self.stale_after_s)
                self._feed_event(EV_STALE, f"no data for {now - last:.3f} s")
                self._went_stale = True
                ws = self._ws
                if ws is not None:
                    # Abort at once: a black-holed peer would never complete a close
                    # handshake. The main loop sees the connection end and reconnects.
                    ws.abort()
                return
            if self.rotate_after_s and now - started >= self.rotate_after_s:
                self._request_rotation(f"planned after {self.rotate_after_s:g} s")
                started = now  # the next rotation is timed from this one

    # ---- make-before-break rotation ------------------------------------------------------
    def _request_rotation(self, reason: str) -> None:
        if self._rotation is not None or self._stopping:
            return
        self.log.info("rotation_started", reason=reason)
        url = self.codec.ws_url()
        rotation = Rotation(reason, lambda: self._connect(url), self._subscribe, self.clock,
                            ROTATION_OVERLAP_S)
        self._rotation = rotation
        rotation.task.add_done_callback(lambda _t: self._rotation_done(rotation))

    def _rotation_done(self, rotation: Rotation) -> None:
        if rotation is not self._rotation or rotation.task.cancelled():
            return
        if rotation.ready() is None:
            # Failed (the rotation closed what it opened): it is over - later planned
            # rotations and serverShutdown are honoured - and the current connection
            # keeps streaming until the venue closes it (then an ordinary reconnect).
            # Closing it now would only open the gap earlier.
            self._rotation = None
            self.log.warning("rotation_failed", reason=rotation.reason, error=rotation.error)
            return
        old = self._ws
        if old is not None:
            self._spawn(old.close(1000, "rotation"), "rotation-close")

    async def _switch_to_rotated(self) -> bool:
        """The current connection closed: if a rotated one is ready, continue on it."""
        rotation = self._rotation
        if rotation is None:
            return False
        if not rotation.task.done():
            # The venue closed the old connection first: wait for the new one.
            with suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(rotation.task),
                                       OPEN_TIMEOUT_S + ROTATION_OVERLAP_S)
        new = rotation.ready()
        self._rotation = None
        if new is None:
            await rotation.cancel()
            return False
        self._feed_event(EV_DISCONNECTED, f"rotated: {rotation.reason}")
        self._ws = new
        self._count_connect()
        if self.journal is not None:
            self.journal.rotate(self.name, self._fid, self.clock.time_ns())
        self.codec.on_rotate()
        self._feed_event(EV_CONNECTED, "rotation")
        self.log.info("rotation_switched", buffered_reads=len(rotation.kept))
        # What the new connection received during the overlap, read by read, through the
        # same ingest path; the codec drops what the old one already delivered (by ids).
        for ts_recv_ns, frames in rotation.kept:
            out = self.ingest(ts_recv_ns, frames)
            if out.requests or out.replies or out.reconnect:
                await self._follow_up(out)
        return True

    async def _cancel_rotation(self) -> None:
        rotation, self._rotation = self._rotation, None
        if rotation is not None:
            await rotation.cancel()

    # ---- bookkeeping -----------------------------------------------------------------------
    def _keep_rejects(self, out: Output, bad: list[tuple[bytes, str]], ts_recv_ns: int) -> None:
        st = self.stats
        kept: list[Reject] = []
        now = self.clock.monotonic()
        for frame, reason in bad:
            kind = reason.split(":", 1)[0]
            st.parse_errors[kind] += 1
            if self._bad_frames.allow(kind, now):
                self.log.warning("bad_frame", reason=reason, bytes=len(frame),
                                 suppressed=self._bad_frames.take_suppressed(kind),
                                 total=st.parse_errors[kind])
            kept.append(Reject(self.name, self.exchange, ts_recv_ns, reason, bytes(frame)))
        out.raw_rejects = kept

    def _feed_event(self, event: str, detail: str | None) -> None:
        """A feed-level event row, handed on at once (synchronously, in recv_seq order)."""
        ts = self.clock.time_ns()
        seq = self.seq.next(ts)
        if self.journal is not None:
            self.journal.event(self.name, self._fid, ts, seq, event, detail)
        out = self.codec.new_output()
        out.event(None, None, ts, seq, self.name, event, detail)
        out.messages = 0
        out.last_seq = seq
        self._hand_on(out)
