"""The reader task of one feed: the only owner of that feed's WebSocket connections.

Owns: connecting (through the feed's circuit breaker and the venue's connection-rate
limit), subscribing, receiving frames and stamping them (`ts_recv`, `recv_seq`), handing
them to the feed's codec, sending what the codec asks to send (replies, keepalives),
fetching the REST snapshots it requests, handing each message's rows to the intake as one
queue item, keeping bad frames raw, detecting stale streams, reconnecting with backoff,
planned make-before-break rotation, and the feed's counters and `events` rows
(connected, disconnected with the reason, stale).

Must not: decode venue formats (codecs do), write files (the writer does), or block the
loop. Stopping is graceful: a frame already received is always handed on before the
task ends; the task is only interrupted while it waits on the network or a sleep.

Sessions: a session that ends before `healthy_session_s` of streaming is a failure; the
backoff (full jitter) grows with consecutive failures and resets only after a healthy
session; `breaker_failures` consecutive failures open the breaker for
`breaker_cooldown_s`. Handshake answers are classified: network errors and 5xx retry;
429/418 wait at least Retry-After; other 4xx open the breaker at once (a clear error for
that feed, retried only after the cooldown).
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from contextlib import suppress
from dataclasses import dataclass

import structlog

from ingestd.clock import Clock, SeqAllocator
from ingestd.config import FeedConfig
from ingestd.exchanges import CODECS
from ingestd.exchanges.base import Codec, Output, RestRequest
from ingestd.feed.backoff import Backoff
from ingestd.feed.breaker import Breaker
from ingestd.feed.intake import Intake
from ingestd.feed.limiter import ConnectLimiter
from ingestd.feed.rest import USER_AGENT, http_get
from ingestd.feed.transport import Connection, HandshakeRejected, TransportClosed, connect
from ingestd.logs import RateLimit
from ingestd.schema import (
    EV_BREAKER_CLOSED,
    EV_BREAKER_HALF_OPEN,
    EV_BREAKER_OPEN,
    EV_CONNECTED,
    EV_DISCONNECTED,
    EV_GAP,
    EV_RESYNC,
    EV_STALE,
)
from ingestd.sink.journal import Journal
from ingestd.sink.writer import Reject
from ingestd.stats import FeedStats

log = structlog.get_logger("ingestd.reader")

OPEN_TIMEOUT_S = 10.0
REST_TIMEOUT_S = 10.0
# Make-before-break: the new connection must have streamed this long before the switch,
# so that its first frames overlap what the old one delivered (the codec drops the
# overlap by exchange ids).
ROTATION_OVERLAP_S = 1.0
# At most this many already-received frames are taken per loop turn.
RECV_BATCH = 256


@dataclass(slots=True)
class SessionEnd:
    reason: str
    streamed_s: float = 0.0          # time between connect and the end (0: never connected)
    retry_after_s: float | None = None
    trip_breaker: bool = False       # a non-retryable answer: open the breaker at once


class _Reconnect(Exception):
    """The venue asked us to reconnect and rotation was not possible."""


def retry_after_s(value: str | None, now_wall_s: float) -> float | None:
    """Parse a Retry-After header (seconds or an HTTP date) into seconds from now."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now_wall_s)


class FeedReader:
    def __init__(self, feed: FeedConfig, intake: Intake, *, clock: Clock,
                 stats: FeedStats | None = None, seq: SeqAllocator | None = None,
                 rng: random.Random | None = None,
                 limiter: ConnectLimiter | None = None, journal: Journal | None = None,
                 codec: Codec | None = None) -> None:
        self.feed = feed
        self.name = feed.name
        self.exchange = feed.exchange
        # A codec restored by crash recovery keeps its trade-id watermarks (no duplicates,
        # gap detection across the restart); its book state resets on connect.
        self.codec: Codec = codec or CODECS[feed.exchange](feed)
        self.intake = intake
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
        self._fetches: set[asyncio.Task[None]] = set()
        self._ws: Connection | None = None
        self._rotation: asyncio.Task[Connection | None] | None = None
        self._rotation_buffer: list[tuple[bytes, int]] = []
        self._rotate_requested: str | None = None
        self._went_stale = False
        self.journal = journal
        self._fid = journal.register(feed, self.codec, self.seq) if journal else 0
        self._drop_when_journal_full = intake.block is False

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
        st = self.stats
        try:
            while not self._stopping:
                await self._wait_for_breaker()
                wait_s = self.limiter.reserve(self.clock.monotonic())
                if wait_s > 0:
                    await self._interruptible_sleep(wait_s)
                end = await self._session()
                if self._stopping:
                    break
                delay_s = await self._after_session(end)
                st.state = "reconnecting"
                await self._interruptible_sleep(delay_s)
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

    async def _wait_for_breaker(self) -> None:
        wait_s = self.breaker.wait_s(self.clock.monotonic())
        if wait_s > 0:
            self.stats.state = "reconnecting"
            await self._interruptible_sleep(wait_s)
        if self.breaker.before_attempt(self.clock.monotonic()) is not None:
            self.stats.breaker = self.breaker.state
            self.log.info("breaker_half_open")
            await self._feed_event(EV_BREAKER_HALF_OPEN, None)

    async def _after_session(self, end: SessionEnd) -> float:
        """Classify the finished session; returns the delay before the next attempt."""
        st = self.stats
        now = self.clock.monotonic()
        healthy = end.streamed_s >= self.healthy_session_s and not end.trip_breaker
        if healthy:
            self.backoff.reset()
            if self.breaker.success() is not None:
                self.log.info("breaker_closed")
                await self._feed_event(EV_BREAKER_CLOSED, None)
        else:
            changed = self.breaker.failure(now, trip=end.trip_breaker)
            if changed is not None:
                self.log.error("breaker_opened", failures=self.breaker.consecutive_failures,
                               cooldown_s=self.breaker.cooldown_s, reason=end.reason)
                await self._feed_event(
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
        return SessionEnd(f"connect failed: {type(e).__name__}: {e}")

    # ---- one session -----------------------------------------------------------------------
    async def _session(self) -> SessionEnd:
        """Connect, subscribe and stream until the connection ends."""
        st = self.stats
        url = self.codec.ws_url()
        st.state = "connecting" if st.connects == 0 else "reconnecting"
        self._interruptible = True
        try:
            ws = await self._connect(url)
        except (OSError, TimeoutError, HandshakeRejected) as e:
            end = self._handshake_failure(e)
            st.last_error = end.reason
            return end
        finally:
            self._interruptible = False
        connected_at = self.clock.monotonic()
        self._count_connect()
        self.log.info("feed_connected", url=url.split("?", 1)[0], connects=st.connects)
        end = SessionEnd("closed")
        watchdog = keepalive = None
        self._ws = ws
        self._went_stale = False
        try:
            if self.journal is not None:
                self.journal.connect(self.name, self._fid, self.clock.time_ns())
            self.codec.on_connect()
            await self._feed_event(EV_CONNECTED, url.split("?", 1)[0])
            await self._subscribe(ws)
            st.last_message_mono = self.clock.monotonic()
            watchdog = asyncio.create_task(self._watchdog())
            if self.codec.keepalive_interval_s:
                keepalive = asyncio.create_task(self._keepalive(self.codec.keepalive_interval_s))
            while True:
                try:
                    await self._stream(self._ws)
                    break  # stopping
                except TransportClosed:
                    if not await self._switch_to_rotated():
                        raise
        except TransportClosed as e:
            end.reason = e.describe()
            if self._went_stale:
                end.reason = f"stale: no data for {self.stale_after_s:g} s"
            elif e.code == 1009:
                st.parse_errors["oversized_frame"] += 1
        except _Reconnect as e:
            end.reason = f"venue requested reconnect: {e}"
        except asyncio.CancelledError:
            end.reason = "shutdown"
            if not self._stopping:
                raise
        finally:
            for t in (watchdog, keepalive):
                if t is not None:
                    t.cancel()
            await self._cancel_rotation()
            for t in list(self._fetches):
                t.cancel()
            self._fetches.clear()
            current = self._ws
            self._ws = None
            if current is not None:
                with suppress(Exception):
                    await asyncio.shield(current.close())
            st.state = "stopped" if self._stopping else "reconnecting"
            st.last_error = None if end.reason == "shutdown" else end.reason
            await self._feed_event(EV_DISCONNECTED, end.reason)
        end.streamed_s = self.clock.monotonic() - connected_at
        return end

    def _count_connect(self) -> None:
        st = self.stats
        st.connects += 1
        if st.connects > 1:
            st.reconnects += 1
        st.state = "streaming"

    async def _subscribe(self, ws: Connection) -> None:
        for msg in self.codec.subscribe_messages():
            await ws.send(msg)

    async def _stream(self, ws: Connection) -> None:
        """Receive until the connection closes (raises) or the reader stops (returns).

        Frames are taken in batches (everything one socket read delivered): they share a
        receive time, each gets its own recv_seq, and each becomes its own queue item.
        A batch is always handed on whole, even if a stop arrives meanwhile."""
        codec_parse = self.codec.parse
        clock = self.clock
        seq_next = self.seq.next
        st = self.stats
        rows = st.rows
        journal = self.journal
        name, exchange, fid = self.name, self.exchange, self._fid
        try_put = self.intake.try_put
        while not self._stopping:
            self._interruptible = True
            try:
                frames = await ws.recv_many(RECV_BATCH)
            finally:
                self._interruptible = False
            ts_recv_ns = clock.time_ns()
            st.last_message_mono = clock.monotonic()
            st.messages += len(frames)
            for frame in frames:
                st.bytes += len(frame)
                if journal is not None:
                    if journal.full and not await self._journal_room():
                        continue
                    seq = seq_next(ts_recv_ns)
                    journal.frame(name, fid, ts_recv_ns, seq, frame)
                else:
                    seq = seq_next(ts_recv_ns)
                out = codec_parse(frame, ts_recv_ns, seq)
                if out.error is not None:
                    await self._reject(frame, ts_recv_ns, out.error)
                    continue
                trades = out.trades
                if (trades is not None and out.quotes is None and out.book is None
                        and out.events is None and out.drops is None
                        and out.requests is None and out.replies is None
                        and not out.last_seq and not out.unknown and out.reconnect is None):
                    # The common case, a message of trades only: no coroutine hops.
                    rows["trades"] += len(trades)
                    if try_put((name, exchange, out)):
                        continue
                    if not await self.intake.put((name, exchange, out)):
                        st.drops["queue_full"] += 1
                    continue
                await self._handle(out)

    async def _journal_room(self) -> bool:
        """The journal cannot write (disk failing): block, or drop and count the frame."""
        journal = self.journal
        assert journal is not None
        if self._drop_when_journal_full:
            self.stats.drops["journal_full"] += 1
            return False
        await journal.wait_room()
        return True

    async def _handle(self, out: Output) -> None:
        """Act on a codec output: counters, requests, replies, rows to the intake."""
        st = self.stats
        if out.last_seq:
            self.seq.bump(out.last_seq)
        if out.unknown:
            st.unknown_messages += 1
        if out.drops:
            st.drops.update(out.drops)
        if out.events:
            self._count_events(out)
        if out.requests:
            for req in out.requests:
                task = asyncio.create_task(self._fetch(req))
                self._fetches.add(task)
                task.add_done_callback(self._fetches.discard)
        if out.replies and self._ws is not None:
            for text in out.replies:
                await self._ws.send(text)
        if out.trades or out.quotes or out.book or out.events:
            rows = st.rows
            if out.trades:
                rows["trades"] += len(out.trades)
            if out.quotes:
                rows["quotes"] += len(out.quotes)
            if out.book:
                rows["book"] += len(out.book)
            if out.events:
                rows["events"] += len(out.events)
            if not await self.intake.put((self.name, self.exchange, out)):
                st.drops["queue_full"] += 1
        if out.reconnect:
            self._request_rotation(out.reconnect)

    def _count_events(self, out: Output) -> None:
        st = self.stats
        for ev in out.events or ():
            if ev[5] == EV_GAP:
                st.gaps += 1
            elif ev[5] == EV_RESYNC:
                st.resyncs += 1
        self.log.info("feed_events", events=[(e[0], e[5], e[6]) for e in out.events or ()])

    async def _fetch(self, req: RestRequest) -> None:
        if req.delay_s > 0:
            await asyncio.sleep(req.delay_s)
        started = time.monotonic()
        status, body = await http_get(req.url, REST_TIMEOUT_S)
        ts_recv_ns = self.clock.time_ns()
        seq = self.seq.next(ts_recv_ns)
        if self.journal is not None:
            self.journal.rest(self.name, self._fid, ts_recv_ns, seq, status, req.key, req.url,
                              body)
        out = self.codec.on_rest(req, status, body, ts_recv_ns, seq)
        self.log.info("rest_fetched", key=req.key, status=status, bytes=len(body),
                      elapsed_s=round(time.monotonic() - started, 3))
        if out.error is not None:
            await self._reject(body, ts_recv_ns, out.error)
        await self._handle(out)

    async def _keepalive(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            msg = self.codec.keepalive_message()
            ws = self._ws
            if msg is not None and ws is not None:
                with suppress(TransportClosed):
                    await ws.send(msg)

    async def _watchdog(self) -> None:
        """Stale streams and planned rotation: checks a few times per bound."""
        st = self.stats
        period_s = min(1.0, self.stale_after_s / 4)
        started = self.clock.monotonic()
        while True:
            await asyncio.sleep(period_s)
            now = self.clock.monotonic()
            last = st.last_message_mono or started
            if now - last > self.stale_after_s:
                st.stale += 1
                self.log.warning("feed_stale", silent_s=round(now - last, 3),
                                 stale_after_s=self.stale_after_s)
                await self._feed_event(EV_STALE, f"no data for {now - last:.3f} s")
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
        self._rotate_requested = reason
        self.log.info("rotation_started", reason=reason)
        self._rotation = asyncio.create_task(self._prepare_rotation())

    async def _prepare_rotation(self) -> Connection | None:
        """Open and subscribe a second connection, buffer what it receives; once it has
        streamed for the overlap, close the old one (the main loop then switches)."""
        url = self.codec.ws_url()
        try:
            new = await self._connect(url)
        except (OSError, TimeoutError, HandshakeRejected) as e:
            self.log.warning("rotation_failed", error=str(e))
            self._rotation = None
            old = self._ws
            if old is not None:  # fall back to break-before-make
                await old.close(1000, "rotation")
            return None
        await self._subscribe(new)
        first_data: float | None = None
        buffer = self._rotation_buffer
        while True:
            if first_data is not None and self.clock.monotonic() - first_data >= \
                    ROTATION_OVERLAP_S:
                break
            try:
                frame = await asyncio.wait_for(new.recv(), ROTATION_OVERLAP_S)
            except TimeoutError:
                if first_data is None:
                    first_data = self.clock.monotonic()
                continue
            buffer.append((frame, self.clock.time_ns()))
            if first_data is None:
                first_data = self.clock.monotonic()
        old = self._ws
        if old is not None:
            await old.close(1000, "rotation")
        return new

    async def _switch_to_rotated(self) -> bool:
        """The current connection closed: if a rotated one is ready, continue on it."""
        task = self._rotation
        if task is None:
            return False
        if not task.done():
            # The venue closed the old connection first: wait for the new one.
            with suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), OPEN_TIMEOUT_S + ROTATION_OVERLAP_S)
        if not task.done() or task.cancelled() or task.result() is None:
            return False
        new = task.result()
        assert new is not None
        self._rotation = None
        buffered, self._rotation_buffer = self._rotation_buffer, []
        old_reason = self._rotate_requested or "rotation"
        self._rotate_requested = None
        await self._feed_event(EV_DISCONNECTED, f"rotated: {old_reason}")
        self._ws = new
        self._count_connect()
        if self.journal is not None:
            self.journal.rotate(self.name, self._fid, self.clock.time_ns())
        self.codec.on_rotate()
        await self._feed_event(EV_CONNECTED, "rotation")
        self.log.info("rotation_switched", buffered=len(buffered))
        st = self.stats
        # Frames the new connection received during the overlap, in arrival order; the
        # codec drops those the old connection already delivered (by exchange ids).
        for frame, ts_recv_ns in buffered:
            st.messages += 1
            st.bytes += len(frame)
            seq = self.seq.next(ts_recv_ns)
            if self.journal is not None:
                self.journal.frame(self.name, self._fid, ts_recv_ns, seq, frame)
            out = self.codec.parse(frame, ts_recv_ns, seq)
            if out.error is not None:
                await self._reject(frame, ts_recv_ns, out.error)
                continue
            await self._handle(out)
        return True

    async def _cancel_rotation(self) -> None:
        task, self._rotation = self._rotation, None
        self._rotation_buffer = []
        if task is None:
            return
        task.cancel()
        results = await asyncio.gather(task, return_exceptions=True)
        new = results[0]
        if new is not None and not isinstance(new, BaseException):
            with suppress(Exception):
                await new.close()

    # ---- bookkeeping -----------------------------------------------------------------------
    async def _reject(self, frame: bytes, ts_recv_ns: int, reason: str) -> None:
        st = self.stats
        kind = reason.split(":", 1)[0]
        st.parse_errors[kind] += 1
        now = self.clock.monotonic()
        if self._bad_frames.allow(kind, now):
            self.log.warning("bad_frame", reason=reason, bytes=len(frame),
                             suppressed=self._bad_frames.take_suppressed(kind),
                             total=st.parse_errors[kind])
        await self.intake.put(Reject(self.name, self.exchange, ts_recv_ns, reason, bytes(frame)))

    async def _feed_event(self, event: str, detail: str | None) -> None:
        ts = self.clock.time_ns()
        seq = self.seq.next(ts)
        if self.journal is not None:
            self.journal.event(self.name, self._fid, ts, seq, event, detail)
        out = Output()
        out.events = [(None, None, ts, seq, self.name, event, detail)]
        await self.intake.put((self.name, self.exchange, out))
