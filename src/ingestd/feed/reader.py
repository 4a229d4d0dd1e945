"""The reader task of one feed: the only owner of that feed's WebSocket.

Owns: connecting, subscribing, receiving frames and stamping them (`ts_recv`,
`recv_seq`), handing them to the feed's codec, sending what the codec asks to send
(replies, keepalives), fetching REST snapshots the codec requests, handing each
message's rows to the intake as one queue item, keeping bad frames raw, reconnecting
with backoff, and the feed's counters.

Must not: decode venue formats (codecs do), write files (the writer does), or block the
loop. Stopping is graceful: a frame already received is always handed on before the
task ends; it is only interrupted while waiting on the network or a backoff sleep.
"""

from __future__ import annotations

import asyncio
import random
import time
from contextlib import suppress

import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from ingestd.clock import Clock, SeqAllocator
from ingestd.config import FeedConfig
from ingestd.exchanges import CODECS
from ingestd.exchanges.base import Codec, Output, RestRequest
from ingestd.feed.backoff import Backoff
from ingestd.feed.intake import Intake
from ingestd.feed.rest import USER_AGENT, http_get
from ingestd.logs import RateLimit
from ingestd.schema import EV_CONNECTED, EV_DISCONNECTED, EV_GAP, EV_RESYNC
from ingestd.sink.writer import Reject
from ingestd.stats import FeedStats

log = structlog.get_logger("ingestd.reader")

OPEN_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 2.0
REST_TIMEOUT_S = 10.0


class _Reconnect(Exception):
    """The venue asked us to reconnect (e.g. Binance serverShutdown)."""


class FeedReader:
    def __init__(self, feed: FeedConfig, intake: Intake, *, clock: Clock,
                 stats: FeedStats | None = None, seq: SeqAllocator | None = None,
                 rng: random.Random | None = None, healthy_after_s: float = 10.0) -> None:
        self.feed = feed
        self.name = feed.name
        self.exchange = feed.exchange
        self.codec: Codec = CODECS[feed.exchange](feed)
        self.intake = intake
        self.clock = clock
        self.stats = stats or FeedStats(feed.name, feed.exchange)
        self.seq = seq or SeqAllocator()
        self.backoff = Backoff(feed.reconnect_min_delay_s, feed.reconnect_max_delay_s, rng)
        self.healthy_after_s = healthy_after_s
        self.log = log.bind(feed=feed.name, exchange=feed.exchange)
        self._bad_frames = RateLimit(10.0)
        self._stopping = False
        self._interruptible = False
        self._task: asyncio.Task[None] | None = None
        self._fetches: set[asyncio.Task[None]] = set()

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run(), name=f"reader:{self.name}")
        return self._task

    @property
    def task(self) -> asyncio.Task[None] | None:
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
                started = self.clock.monotonic()
                reason = await self._session()
                if self._stopping:
                    break
                if self.clock.monotonic() - started >= self.healthy_after_s:
                    self.backoff.reset()
                delay_s = self.backoff.next_delay_s()
                st.state = "reconnecting"
                self.log.warning("feed_disconnected", reason=reason,
                                 retry_in_s=round(delay_s, 3), failures=self.backoff.failures)
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

    async def _interruptible_sleep(self, delay_s: float) -> None:
        self._interruptible = True
        try:
            await asyncio.sleep(delay_s)
        finally:
            self._interruptible = False

    # ---- one connection --------------------------------------------------------------------
    async def _session(self) -> str:
        """Connect, subscribe and stream until the connection ends; returns why it ended."""
        st = self.stats
        url = self.codec.ws_url()
        self._interruptible = True
        try:
            ws = await connect(
                url,
                open_timeout=OPEN_TIMEOUT_S,
                close_timeout=CLOSE_TIMEOUT_S,
                ping_interval=self.codec.ws_ping_interval_s,
                ping_timeout=self.codec.ws_ping_interval_s,
                max_size=self.feed.max_frame_bytes,
                max_queue=1024,
                compression=None,
                user_agent_header=USER_AGENT,
                proxy=None,
            )
        except InvalidStatus as e:
            return f"handshake refused: HTTP {e.response.status_code}"
        except (OSError, TimeoutError, InvalidHandshake) as e:
            return f"connect failed: {type(e).__name__}: {e}"
        finally:
            self._interruptible = False
        st.connects += 1
        if st.connects > 1:
            st.reconnects += 1
        st.state = "streaming"
        self.log.info("feed_connected", url=url.split("?", 1)[0], connects=st.connects)
        reason = "closed"
        keepalive = None
        try:
            self.codec.on_connect()
            await self._feed_event(EV_CONNECTED, url.split("?", 1)[0])
            for msg in self.codec.subscribe_messages():
                await ws.send(msg)
            if self.codec.keepalive_interval_s:
                keepalive = asyncio.create_task(
                    self._keepalive(ws, self.codec.keepalive_interval_s))
            await self._stream(ws)
        except ConnectionClosed as e:
            reason = _close_reason(e)
            if (e.rcvd is not None and e.rcvd.code == 1009) or (e.sent is not None \
                    and e.sent.code == 1009):
                st.parse_errors["oversized_frame"] += 1
        except _Reconnect as e:
            reason = f"venue requested reconnect: {e}"
        except asyncio.CancelledError:
            reason = "shutdown"
            if not self._stopping:
                raise
        finally:
            if keepalive is not None:
                keepalive.cancel()
            for t in list(self._fetches):
                t.cancel()
            self._fetches.clear()
            with suppress(Exception):
                await asyncio.shield(ws.close())
            st.state = "stopped" if self._stopping else "reconnecting"
            await self._feed_event(EV_DISCONNECTED, reason)
        return reason

    async def _stream(self, ws: ClientConnection) -> None:
        st = self.stats
        codec_parse = self.codec.parse
        clock = self.clock
        seq_next = self.seq.next
        while not self._stopping:
            self._interruptible = True
            try:
                frame = await ws.recv(decode=False)
            finally:
                self._interruptible = False
            ts_recv_ns = clock.time_ns()
            seq = seq_next(ts_recv_ns)
            st.messages += 1
            st.bytes += len(frame)
            st.last_message_mono = clock.monotonic()
            out = codec_parse(frame, ts_recv_ns, seq)
            if out.error is not None:
                await self._reject(frame, ts_recv_ns, out.error)
                continue
            await self._handle(out, ws)

    async def _handle(self, out: Output, ws: ClientConnection) -> None:
        """Act on a codec output: counters, requests, replies, rows to the intake."""
        st = self.stats
        if out.last_seq:
            self.seq.bump(out.last_seq)
        if out.unknown:
            st.unknown_messages += 1
        if out.drops:
            st.drops.update(out.drops)
        if out.events:
            for ev in out.events:
                if ev[5] == EV_GAP:
                    st.gaps += 1
                elif ev[5] == EV_RESYNC:
                    st.resyncs += 1
            self.log.info("feed_events", events=[(e[0], e[5], e[6]) for e in out.events])
        if out.requests:
            for req in out.requests:
                task = asyncio.create_task(self._fetch(req, ws))
                self._fetches.add(task)
                task.add_done_callback(self._fetches.discard)
        if out.replies:
            for text in out.replies:
                await ws.send(text)
        if out.trades or out.quotes or out.book or out.events:
            await self.intake.put((self.name, self.exchange, out))
        if out.reconnect:
            raise _Reconnect(out.reconnect)

    async def _fetch(self, req: RestRequest, ws: ClientConnection) -> None:
        if req.delay_s > 0:
            await asyncio.sleep(req.delay_s)
        started = time.monotonic()
        status, body = await http_get(req.url, REST_TIMEOUT_S)
        ts_recv_ns = self.clock.time_ns()
        seq = self.seq.next(ts_recv_ns)
        out = self.codec.on_rest(req, status, body, ts_recv_ns, seq)
        self.log.info("rest_fetched", key=req.key, status=status, bytes=len(body),
                      elapsed_s=round(time.monotonic() - started, 3))
        if out.error is not None:
            await self._reject(body, ts_recv_ns, out.error)
        try:
            await self._handle(out, ws)
        except _Reconnect:
            await ws.close()

    async def _keepalive(self, ws: ClientConnection, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            msg = self.codec.keepalive_message()
            if msg is not None:
                await ws.send(msg)

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
        out = Output()
        out.events = [(None, None, ts, self.seq.next(ts), self.name, event, detail)]
        await self.intake.put((self.name, self.exchange, out))


def _close_reason(e: ConnectionClosed) -> str:
    frame = e.rcvd or e.sent
    if frame is None:
        return "connection lost without a close frame"
    who = "venue" if e.rcvd is not None else "client"
    return f"closed by {who}: {frame.code} {frame.reason}".rstrip()
