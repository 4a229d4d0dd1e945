"""Simulated Coinbase Advanced Trade: subscribe/unsubscribe per channel, one sequence.

Owns: Coinbase's subscription protocol (one `subscribe`/`unsubscribe` message per channel,
answered by a `subscriptions` message listing everything subscribed; unknown products or
channels refused with a `type: error` message, as the Exchange feed documents - the
Advanced Trade wording was not recorded), and serving the recorded `market_trades`,
`ticker`, `l2_data` and `heartbeats` frames of the subscribed channels and products
byte for byte, in recorded `sequence_num` order.

The recording (one 2026 connection that also subscribed `candles` and BTC-USD `level2`,
which were not kept) has holes in `sequence_num`, and a client that subscribes to less
leaves more. The real venue numbers each connection's messages 0, 1, 2, ... without holes,
so `CoinbaseStream` gives every number exactly one frame: the recorded frame holding it
if the client subscribed to it, else (in this order) a pending `subscriptions` ack, a
pending level2 snapshot, or a filler `heartbeats` frame. Acks and fillers are protocol
frames composed here and sent as control frames; recorded frames and snapshots are data.

On a `level2` re-subscription after the recorded snapshot was passed (what the ingestd
codec does after a gap), the venue answers as Coinbase does: a fresh `l2_data` snapshot,
built from the recorded snapshot plus every recorded update up to that point (each
level's text exactly as recorded), with that product's updates held back until it is sent.

Faults for tests: `skip_seqs` loses the frames of those sequence numbers.

Must not: change a recorded frame or invent market data (the snapshot above only
re-states recorded levels).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass
from decimal import Decimal
from functools import cache, partial
from typing import TYPE_CHECKING, Any, ClassVar

import orjson

from ingestd.sim import recorded
from ingestd.sim.venues.base import Venue

if TYPE_CHECKING:
    from ingestd.sim.server import SimConn

DATA_DIR = "coinbase"
FILES = ("market_trades.jsonl", "ticker.jsonl", "level2.jsonl", "heartbeats.jsonl")
HEARTBEATS = "heartbeats"
# The channels Advanced Trade accepts without authentication (data exists for the first four).
CHANNELS = frozenset({"market_trades", "ticker", "level2", HEARTBEATS, "ticker_batch",
                      "candles", "status"})
_DELIVERED_AS = {"l2_data": "level2"}  # delivery name -> subscription name

# (side, event_time, price_level, new_quantity), as recorded
Level = tuple[str, str, str, str]


@dataclass(frozen=True, slots=True)
class Recorded:
    seq: int
    channel: str                 # the subscription channel that selects it
    products: frozenset[str]
    timestamp: str
    frame: bytes
    l2: tuple[tuple[str, bool, tuple[Level, ...]], ...] = ()  # (product, snapshot?, levels)
    heartbeat_counter: int | None = None


@cache
def load() -> tuple[Recorded, ...]:
    """Every recorded frame of FILES, in `sequence_num` order."""
    items = []
    for name in FILES:
        for frame in recorded.frames(DATA_DIR, name):
            msg = orjson.loads(frame)
            channel = _DELIVERED_AS.get(msg["channel"], msg["channel"])
            products: set[str] = set()
            l2 = []
            counter = None
            for ev in msg["events"]:
                for t in [*ev.get("trades", []), *ev.get("tickers", [])]:
                    products.add(t["product_id"])
                if "product_id" in ev:
                    products.add(ev["product_id"])
                if channel == "level2":
                    l2.append((ev["product_id"], ev["type"] == "snapshot", tuple(
                        (u["side"], u["event_time"], u["price_level"], u["new_quantity"])
                        for u in ev["updates"])))
                if "heartbeat_counter" in ev:
                    counter = int(ev["heartbeat_counter"])
            items.append(Recorded(msg["sequence_num"], channel, frozenset(products),
                                  msg["timestamp"], frame, tuple(l2), counter))
    items.sort(key=lambda r: r.seq)
    return tuple(items)


def _error(message: str, reason: str) -> bytes:
    return orjson.dumps({"type": "error", "message": message, "reason": reason})


def _go_time(rfc3339: str) -> str:
    """`2026-08-09T21:05:48.2285Z` as Go prints it: `2026-08-09 21:05:48.2285 +0000 UTC`."""
    return rfc3339.replace("T", " ").rstrip("Z") + " +0000 UTC"


class CoinbaseStream:
    """The outgoing side of one connection: which frame takes each `sequence_num`.

    Pure (no I/O, no clock): the venue's session drives it, tests may drive it directly.
    """

    def __init__(self, frames: tuple[Recorded, ...], products: frozenset[str],
                 skip_seqs: frozenset[int] = frozenset()) -> None:
        self._frames = frames
        self._pos = 0
        self.products = products
        self.skip_seqs = skip_seqs
        self.seq = 0                               # the next sequence_num
        self.subs: dict[str, list[str]] = {}       # channel -> products, in request order
        # Frames waiting for a free number: (builder, is market data)
        self._pending: deque[tuple[Callable[[int], bytes], bool]] = deque()
        self._held: set[str] = set()               # level2 snapshot pending: no updates yet
        self._books: dict[str, dict[tuple[str, str], tuple[str, str]]] = {}
        self._snapshot_passed: set[str] = set()
        self._timestamp = frames[0].timestamp if frames else "1970-01-01T00:00:00Z"
        first_hb = next((f.heartbeat_counter for f in frames
                         if f.heartbeat_counter is not None), 1)
        self._hb_counter = first_hb - 1
        self.frames_out = 0                        # frames actually sent (the session counts)
        self.finished = False                      # every recorded frame has been passed

    # ---- client requests -------------------------------------------------------------------
    def request(self, text: str | bytes) -> list[bytes]:
        """Handle one client message; returns frames to send now (errors: no sequence_num)."""
        try:
            req = orjson.loads(text)
        except orjson.JSONDecodeError:
            return [_error("Failed to parse message", "malformed JSON")]
        if not isinstance(req, dict):
            return [_error("Failed to parse message", "expected a JSON object")]
        kind, channel = req.get("type"), req.get("channel")
        if kind not in ("subscribe", "unsubscribe"):
            return [_error("Failed to parse message", f"unknown message type {kind!r}")]
        verb = "Failed to subscribe" if kind == "subscribe" else "Failed to unsubscribe"
        if not isinstance(channel, str) or channel not in CHANNELS:
            return [_error(verb, f"{channel} is not a valid channel")]
        products = req.get("product_ids", [])
        if not isinstance(products, list) or not all(isinstance(p, str) for p in products):
            return [_error(verb, "product_ids must be a list of strings")]
        if channel == HEARTBEATS:
            products = [HEARTBEATS]
        else:
            bad = [p for p in products if p not in self.products]
            if bad:
                return [_error(verb, f"{', '.join(bad)} is not a valid product")]
        snapshots = []
        if kind == "subscribe":
            current = self.subs.setdefault(channel, [])
            for p in products:
                if p not in current:
                    current.append(p)
                    if channel == "level2" and p in self._snapshot_passed:
                        snapshots.append(p)
        else:
            current = self.subs.get(channel, [])
            keep = [p for p in current if products and p not in products]
            if keep:
                self.subs[channel] = keep
            else:
                self.subs.pop(channel, None)
        acked = {ch: list(ps) for ch, ps in sorted(self.subs.items())}
        self._pending.append((partial(self._ack, subs=acked), False))
        for p in snapshots:
            self._held.add(p)
            self._pending.append((partial(self._snapshot, product=p), True))
        return []

    # ---- the sequence ----------------------------------------------------------------------
    def next(self) -> tuple[int, bytes | None, bool] | None:
        """(sequence_num, frame or None if lost on purpose, is data) for the next number;
        None when the recording is over and no reply is pending."""
        s = self.seq
        rec = self._frames[self._pos] if self._pos < len(self._frames) else None
        frame: bytes | None = None
        data = False
        if rec is not None and rec.seq == s:
            self._pos += 1
            self._pass(rec)
            if self._serves(rec):
                frame, data = rec.frame, True
        elif rec is None:
            self.finished = True
            if not self._pending:
                return None
        if frame is None:
            if self._pending:
                build, data = self._pending.popleft()
                frame = build(s)
            else:
                frame = self._filler(s)
        self.seq = s + 1
        return s, (None if s in self.skip_seqs else frame), data

    def heartbeat(self) -> tuple[int, bytes | None, bool]:
        """A heartbeat for the next number (once a second after the recording ends)."""
        s = self.seq
        self.seq = s + 1
        self._hb_counter += 1
        return s, (None if s in self.skip_seqs else self._filler(s)), False

    def book(self, product: str) -> dict[tuple[str, str], tuple[str, str]]:
        """The venue's book of `product` so far: (side, price_level) -> (qty, event_time)."""
        return dict(self._books.get(product, {}))

    def _pass(self, rec: Recorded) -> None:
        """The venue's state moves past `rec`, whether or not this client gets it."""
        self._timestamp = rec.timestamp
        if rec.heartbeat_counter is not None:
            self._hb_counter = rec.heartbeat_counter
        for product, snapshot, levels in rec.l2:
            book = self._books.setdefault(product, {})
            if snapshot:
                book.clear()
                self._snapshot_passed.add(product)
            for side, event_time, px, qty in levels:
                if Decimal(qty) == 0:
                    book.pop((side, px), None)
                else:
                    book[(side, px)] = (qty, event_time)

    def _serves(self, rec: Recorded) -> bool:
        if rec.channel == HEARTBEATS:
            return HEARTBEATS in self.subs
        subscribed = self.subs.get(rec.channel, ())
        held = self._held if rec.channel == "level2" else ()
        return any(p in subscribed and p not in held for p in rec.products)

    # ---- composed frames -------------------------------------------------------------------
    def _ack(self, seq: int, subs: dict[str, list[str]]) -> bytes:
        return orjson.dumps({"channel": "subscriptions", "timestamp": self._timestamp,
                             "sequence_num": seq, "events": [{"subscriptions": subs}]})

    def _filler(self, seq: int) -> bytes:
        return orjson.dumps({"channel": HEARTBEATS, "timestamp": self._timestamp,
                             "sequence_num": seq,
                             "events": [{"current_time": _go_time(self._timestamp),
                                         "heartbeat_counter": self._hb_counter}]})

    def _snapshot(self, seq: int, product: str) -> bytes:
        self._held.discard(product)
        book = self._books.get(product, {})
        bids = sorted(((px, v) for (side, px), v in book.items() if side == "bid"),
                      key=lambda x: Decimal(x[0]), reverse=True)
        offers = sorted(((px, v) for (side, px), v in book.items() if side != "bid"),
                        key=lambda x: Decimal(x[0]))
        updates: list[dict[str, Any]] = [
            {"side": side, "event_time": et, "price_level": px, "new_quantity": qty}
            for side, levels in (("bid", bids), ("offer", offers))
            for px, (qty, et) in levels]
        return orjson.dumps({"channel": "l2_data", "timestamp": self._timestamp,
                             "sequence_num": seq, "events": [
                                 {"type": "snapshot", "product_id": product,
                                  "updates": updates}]})


class CoinbaseVenue(Venue):
    exchange: ClassVar[str] = "coinbase"
    demo_feed: ClassVar[dict[str, object]] = {
        # Trades and quotes of both products; the book of ETH-USD (the BTC-USD snapshot
        # was not kept, so its book stays empty).
        "symbols": ["BTC-USD", "ETH-USD"],
        "channels": ["trades", "quotes", "book"],
    }

    def __init__(self, skip_seqs: Iterable[int] = (), settle_s: float = 0.2,
                 idle_heartbeat_s: float = 1.0) -> None:
        self.frames = load()
        self.products = frozenset(p for f in self.frames for p in f.products)
        self.skip_seqs = frozenset(skip_seqs)
        # Start serving once the client subscribed to heartbeats, or this long after its
        # first subscribe (clients send all their subscriptions right after connecting).
        self.settle_s = settle_s
        self.idle_heartbeat_s = idle_heartbeat_s
        self.streams: list[CoinbaseStream] = []    # one per connection, in order

    def new_stream(self) -> CoinbaseStream:
        return CoinbaseStream(self.frames, self.products, self.skip_seqs)

    async def session(self, conn: SimConn) -> None:
        stream = self.new_stream()
        self.streams.append(stream)
        ready = asyncio.Event()
        wake = asyncio.Event()
        runner: asyncio.Task[None] | None = None

        async def serve() -> None:
            with suppress(TimeoutError):
                await asyncio.wait_for(ready.wait(), self.settle_s)
            rate = conn.server.rate_msgs_s
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            n_data = 0
            while True:
                item = stream.next()
                if item is None:
                    wake.clear()
                    try:
                        await asyncio.wait_for(wake.wait(), self.idle_heartbeat_s)
                        continue
                    except TimeoutError:
                        item = stream.heartbeat()
                _, frame, data = item
                if frame is None:
                    continue
                if data:
                    if rate:
                        delay = t0 + n_data / rate - loop.time()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    n_data += 1
                    await conn.send(frame)
                else:
                    await conn.send_control(frame)
                stream.frames_out += 1

        try:
            while True:
                msg = await conn.recv()
                for frame in stream.request(msg):
                    await conn.send_control(frame)
                    stream.frames_out += 1
                if HEARTBEATS in stream.subs:
                    ready.set()
                if runner is None and stream.subs:
                    runner = asyncio.create_task(serve())
                wake.set()
        finally:
            if runner is not None:
                runner.cancel()
                await asyncio.gather(runner, return_exceptions=True)
