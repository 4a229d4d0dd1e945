"""Bybit v5 public WebSocket codecs: spot (`bybit-spot`) and USDT/USDC perps (`bybit-linear`).

Owns: the endpoints (`wss://stream.bybit.com/v5/public/spot` and `/linear`), the
`{"op":"subscribe","args":[...]}` requests (spot: at most 10 args per request, so several
messages), the `{"op":"ping"}` keepalive and the silent handling of both pong shapes, acks
(`subscribed` events) and refusals (`success:false` -> `refused` events), and the decoding of:

- `publicTrade.<SYM>` -> trades. `trade_id` = `i` (linear: a UUID string; spot: a digit
  string), `side` = `S` (`Buy`/`Sell` is the taker's side: checked against the recorded
  book, every trade at the best ask says `Buy`, every trade at the best bid `Sell`),
  `ts_event` = `T` (ms). Ids are not ordered (UUIDs), so duplicates are found in a bounded
  memory of the last `RECENT_TRADE_IDS` ids per symbol, dropped and counted.
- `orderbook.1.<SYM>` -> quotes (Bybit's best bid/ask stream). Each row is the full best
  bid/ask after the message (state kept per symbol; a side is null only when it is empty).
- `orderbook.<depth>.<SYM>` -> book, `depth` = feed `book_depth` (50, 200 or 1000;
  default 200). `snapshot` -> a snapshot block (`is_snapshot` true, one `recv_seq`),
  `delta` -> deltas (size "0" deletes). Bybit truncates its book itself (levels leaving the
  depth are deleted explicitly), so the rows alone rebuild the venue's book.

Sequencing (both orderbook topics): `data.u` must grow by 1 per message per topic. `u == 1`
on a delta means Bybit restarted its book service: that delta is written as a snapshot
block plus a `resync` event. A `snapshot` may repeat the last `u` (orderbook.1 resends its
snapshot after 3 s without change). On a break: a `gap` event (expected/received `u`),
the topic is resubscribed (unsubscribe + subscribe through `Output.replies`), deltas are
dropped (counted, `book_not_synced`) until the new snapshot, which is followed by a
`resync` event (as is the first snapshot after a reconnect, for a topic that was synced).
`update_id` = `u`; `ts_event` = `cts` (matching engine time) if present, else `ts`.
Safety nets: `RESUBSCRIBE_AFTER_DROPS` deltas without a snapshot resubscribe again, and as
many consecutive already-applied `u` (ids that went back without `u = 1`) count as a gap.

Connections: `on_connect` forgets every book (a new connection's subscriptions start with
snapshots); `on_rotate` (make-before-break) keeps them, since `u` is the venue's per-topic
id, not a per-connection counter (a fresh subscription's first snapshot in the recordings
already carries u=15076952): the new connection's overlap (its snapshot and the deltas
with `u` <= the last applied one) is dropped as `stale_book_update` and the book
continues without a resync.

Must not: do I/O, read a clock or log (see exchanges/base.py); raise from `parse`
(malformed frames become `Output.error`, valid messages of other kinds `Output.unknown`);
change any state before a frame is known to be well-formed.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

import orjson

from ingestd.config import FeedConfig
from ingestd.exchanges.base import (
    DROP_DUPLICATE_TRADE,
    DROP_STALE_BOOK,
    DROP_UNSUBSCRIBED,
    DROP_UNSYNCED_BOOK,
    BadFrame,
    Codec,
    Output,
    amount,
    ms_to_ns,
    price,
)
from ingestd.schema import ASK, BID, BUY, SELL, UNKNOWN, BookRow, QuoteRow, TradeRow

# Per-symbol memory of recent trade ids (UUIDs are not ordered): ~4096 * ~100 B per symbol.
RECENT_TRADE_IDS: Final = 4096
# Deltas dropped while waiting for a snapshot before the topic is resubscribed again
# (the first resubscription was lost or not honoured).
RESUBSCRIBE_AFTER_DROPS: Final = 500
# Bybit: the `args` of one connection may hold at most 21,000 characters.
MAX_ARGS_CHARS: Final = 21_000
# Requests remembered until acknowledged (to name the topics of an ack or a refusal).
MAX_PENDING_REQUESTS: Final = 1024

PING: Final = '{"op":"ping"}'

_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]*)?")
_TOPIC_IN_MSG = re.compile(r"topic:([A-Za-z0-9._-]+)")

Levels = list[tuple[float, float]]


def _num(v: Any) -> str:
    """Bybit sends every price and size as a plain decimal string."""
    if type(v) is not str or _DECIMAL.fullmatch(v) is None:
        raise BadFrame(f"not a decimal string: {v!r}"[:80])
    return v


def _levels(raw: Any) -> Levels:
    if type(raw) is not list:
        raise BadFrame("levels are not a list")
    out: Levels = []
    for lvl in raw:
        if type(lvl) is not list or len(lvl) != 2:
            raise BadFrame("a level is not [price, size]")
        out.append((price(_num(lvl[0])), amount(_num(lvl[1]))))
    return out


def _int(v: Any, what: str) -> int:
    if type(v) is not int or v < 0:
        raise BadFrame(f"{what} is not a non-negative integer: {v!r}"[:80])
    return v


def _ms(v: Any) -> int:
    """Milliseconds (integer, or digit string) -> ns via the exact base conversion."""
    if type(v) is int or (type(v) is str and v.isascii() and v.isdigit()):
        return ms_to_ns(v)
    raise BadFrame(f"bad ms timestamp: {v!r}"[:80])


@dataclass(slots=True)
class _TopicState:
    """Continuity of one orderbook topic (and the best bid/ask, for orderbook.1)."""

    last_u: int | None = None        # None: waiting for a snapshot
    ever_synced: bool = False
    resync_reason: str | None = None  # write a `resync` event with the next snapshot
    rotating: bool = False            # a make-before-break switch: overlap to skip
    unsynced_drops: int = 0
    stale_drops: int = 0              # consecutive
    bids: dict[float, float] = field(default_factory=dict)
    asks: dict[float, float] = field(default_factory=dict)


class _RecentIds:
    """The last `cap` ids seen, with O(1) membership."""

    __slots__ = ("cap", "order", "seen")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.order: deque[str] = deque()
        self.seen: set[str] = set()

    def __contains__(self, tid: str) -> bool:
        return tid in self.seen

    def add(self, tid: str) -> None:
        self.seen.add(tid)
        self.order.append(tid)
        if len(self.order) > self.cap:
            self.seen.discard(self.order.popleft())


class BybitSpot(Codec):
    exchange: ClassVar[str] = "bybit-spot"
    default_ws_url: ClassVar[str] = "wss://stream.bybit.com/v5/public/spot"
    # Bybit cuts a connection after 10 minutes without a ping and no data; it recommends
    # `{"op":"ping"}` every 20 s.
    keepalive_interval_s: ClassVar[float | None] = 20.0
    default_stale_after_s: ClassVar[float] = 30.0
    # "500 connections per 5 minutes" per domain (shared by every Bybit feed).
    connect_limit: ClassVar[tuple[int, float]] = (500, 300.0)
    max_args_per_request: ClassVar[int | None] = 10
    book_depths: ClassVar[tuple[int, ...]] = (50, 200, 1000)
    default_book_depth: ClassVar[int] = 200
    symbol_pattern: ClassVar[re.Pattern[str]] = re.compile(r"[A-Z0-9]{2,32}")
    symbol_example: ClassVar[str] = "'BTCUSDT'"

    def __init__(self, feed: FeedConfig) -> None:
        super().__init__(feed)
        self.depth = feed.book_depth or self.default_book_depth
        self._want_trades = "trades" in self.channels
        self._want_quotes = "quotes" in self.channels
        self._want_book = "book" in self.channels
        self._topics: dict[str, _TopicState] = {}
        self._trade_ids: dict[str, _RecentIds] = {}
        self._req_seq = 0
        self._pending: dict[str, tuple[str, tuple[str, ...]]] = {}  # req_id -> (op, args)

    # ---- config --------------------------------------------------------------------------
    @classmethod
    def topics_for(cls, symbols: Sequence[str], channels: Sequence[str],
                   depth: int) -> list[str]:
        topics = []
        for sym in symbols:
            if "trades" in channels:
                topics.append(f"publicTrade.{sym}")
            if "quotes" in channels:
                topics.append(f"orderbook.1.{sym}")
            if "book" in channels:
                topics.append(f"orderbook.{depth}.{sym}")
        return topics

    @classmethod
    def check_feed(cls, feed: FeedConfig) -> list[str]:
        problems = []
        if feed.trade_stream is not None:
            problems.append(f"trade_stream: not used by {cls.exchange}")
        if feed.book_depth is not None and feed.book_depth not in cls.book_depths:
            problems.append(f"book_depth: {feed.book_depth} is not one of "
                            f"{', '.join(map(str, cls.book_depths))} (Bybit orderbook depths; "
                            "the best bid/ask comes with channel 'quotes')")
        for sym in feed.symbols:
            if cls.symbol_pattern.fullmatch(sym) is None:
                problems.append(f"symbols: {sym!r} is not Bybit-native "
                                f"(e.g. {cls.symbol_example})")
        topics = cls.topics_for(feed.symbols, feed.channels,
                                feed.book_depth or cls.default_book_depth)
        chars = sum(len(t) for t in topics)
        if chars > MAX_ARGS_CHARS:
            problems.append(f"symbols: the {len(topics)} topics take {chars} characters, more "
                            f"than Bybit's {MAX_ARGS_CHARS} per connection")
        return problems

    # ---- connection ------------------------------------------------------------------------
    def on_connect(self) -> None:
        # Subscriptions do not survive a connection: every topic starts from a snapshot.
        for state in self._topics.values():
            if state.ever_synced:
                state.resync_reason = "new connection"
            state.last_u = None
            state.rotating = False
            state.unsynced_drops = state.stale_drops = 0
            state.bids.clear()
            state.asks.clear()
        self._pending.clear()

    def on_rotate(self) -> None:
        # The new connection subscribed the same topics and `u` is the venue's per-topic
        # update id, not per connection: keep every book, skip the overlap (its snapshot and
        # deltas with u <= the last applied one) and continue at the next `u`. Trade ids
        # are de-duplicated as always; acks of the new connection stay pending.
        for state in self._topics.values():
            state.rotating = state.last_u is not None

    def _request(self, op: str, args: Sequence[str]) -> str:
        self._req_seq += 1
        req_id = f"{'sub' if op == 'subscribe' else 'unsub'}-{self._req_seq}"
        if len(self._pending) >= MAX_PENDING_REQUESTS:
            del self._pending[next(iter(self._pending))]
        self._pending[req_id] = (op, tuple(args))
        return orjson.dumps({"op": op, "args": list(args), "req_id": req_id}).decode()

    def subscribe_messages(self) -> Sequence[str]:
        topics = self.topics_for(self.feed.symbols, self.feed.channels, self.depth)
        step = self.max_args_per_request or len(topics) or 1
        return [self._request("subscribe", topics[i:i + step])
                for i in range(0, len(topics), step)]

    def keepalive_message(self) -> str | None:
        return PING

    # ---- frames ----------------------------------------------------------------------------
    def parse(self, frame: bytes | str, ts_recv_ns: int, recv_seq: int) -> Output:
        out = Output()
        try:
            msg = orjson.loads(frame)
            if type(msg) is not dict:
                raise BadFrame("not a JSON object")
            topic = msg.get("topic")
            if topic is not None:
                if type(topic) is not str:
                    raise BadFrame("topic is not a string")
                family, _, rest = topic.partition(".")
                if family == "publicTrade":
                    self._trades(msg, ts_recv_ns, recv_seq, out)
                elif family == "orderbook":
                    self._orderbook(msg, topic, rest, ts_recv_ns, recv_seq, out)
                else:
                    out.unknown = True  # tickers, kline, ...: never subscribed by us
            elif "op" in msg or "success" in msg:
                self._control(msg, ts_recv_ns, recv_seq, out)
            else:
                out.unknown = True
        except (orjson.JSONDecodeError, BadFrame, KeyError, TypeError, ValueError,
                IndexError, AttributeError, OverflowError, RecursionError) as e:
            fresh = Output()
            fresh.error = f"{type(e).__name__}: {e}"[:200]
            return fresh
        return out

    def _control(self, msg: dict[str, Any], ts_recv_ns: int, recv_seq: int,
                 out: Output) -> None:
        op = msg.get("op")
        success = msg.get("success")
        ret_msg = msg.get("ret_msg")
        if op == "pong" or (success is True and (op == "ping" or ret_msg == "pong")):
            return  # pong: spot/linear `{"success":true,"ret_msg":"pong",...}` or `op:pong`
        req_id = msg.get("req_id")
        pending = self._pending.pop(req_id, None) if type(req_id) is str else None
        if success is True:
            if op == "subscribe":
                detail = " ".join(pending[1]) if pending is not None else None
                self.subscribed(out, None, ts_recv_ns, recv_seq, detail)
            return  # unsubscribe (resync) and other acks
        if success is False:
            text = ret_msg if type(ret_msg) is str else repr(ret_msg)
            symbol = None
            m = _TOPIC_IN_MSG.search(text)
            if m is not None:
                sym = m.group(1).rsplit(".", 1)[-1]
                symbol = sym if sym in self.symbols else None
            what = f"{op} {' '.join(pending[1])}" if pending is not None else str(op)
            self.refused(out, symbol, ts_recv_ns, recv_seq, f"{what}: {text}"[:500])
            return
        if op == "ping":
            return  # our own ping echoed (a shape seen in Bybit's examples)
        out.unknown = True

    # ---- trades ----------------------------------------------------------------------------
    def _trades(self, msg: dict[str, Any], ts_recv_ns: int, recv_seq: int,
                out: Output) -> None:
        data = msg["data"]
        if type(data) is not list:
            raise BadFrame("publicTrade data is not a list")
        rows: list[TradeRow] = []
        fresh: list[tuple[str, str]] = []
        in_frame: set[tuple[str, str]] = set()
        unsubscribed = duplicates = 0
        for t in data:
            if type(t) is not dict:
                raise BadFrame("a trade is not an object")
            sym = t["s"]
            if type(sym) is not str:
                raise BadFrame("s is not a string")
            tid = t["i"]
            if type(tid) is int:
                tid = str(tid)
            elif type(tid) is not str or not tid:
                raise BadFrame("i is not a trade id")
            s = t["S"]
            if type(s) is not str:
                raise BadFrame("S is not a string")
            side = BUY if s == "Buy" else SELL if s == "Sell" else UNKNOWN
            row: TradeRow = (sym, _ms(t["T"]), ts_recv_ns, recv_seq, tid, side,
                             price(_num(t["p"])), amount(_num(t["v"])))
            if sym not in self.symbols or not self._want_trades:
                unsubscribed += 1
                continue
            key = (sym, tid)
            recent = self._trade_ids.get(sym)
            if key in in_frame or (recent is not None and tid in recent):
                duplicates += 1
                continue
            in_frame.add(key)
            fresh.append(key)
            rows.append(row)
        # The whole frame is valid: now remember the ids.
        for sym, tid in fresh:
            recent = self._trade_ids.get(sym)
            if recent is None:
                recent = self._trade_ids[sym] = _RecentIds(RECENT_TRADE_IDS)
            recent.add(tid)
        if unsubscribed:
            out.drop(DROP_UNSUBSCRIBED, unsubscribed)
        if duplicates:
            out.drop(DROP_DUPLICATE_TRADE, duplicates)
        if rows:
            out.trades = rows

    # ---- order books -----------------------------------------------------------------------
    def _orderbook(self, msg: dict[str, Any], topic: str, rest: str, ts_recv_ns: int,
                   recv_seq: int, out: Output) -> None:
        depth_text, _, _ = rest.partition(".")
        if not (depth_text.isascii() and depth_text.isdigit()):
            raise BadFrame(f"bad orderbook topic {topic!r}"[:80])
        depth = int(depth_text)
        data = msg["data"]
        if type(data) is not dict:
            raise BadFrame("orderbook data is not an object")
        sym = data["s"]
        if type(sym) is not str:
            raise BadFrame("s is not a string")
        if topic != f"orderbook.{depth_text}.{sym}":
            raise BadFrame(f"topic {topic!r} does not match symbol {sym!r}"[:120])
        kind = msg["type"]
        if kind not in ("snapshot", "delta"):
            raise BadFrame(f"unknown orderbook type {kind!r}"[:80])
        u = _int(data["u"], "u")
        ts = msg.get("cts")
        if ts is None:
            ts = msg["ts"]
        ts_event = _ms(ts)
        bids, asks = _levels(data["b"]), _levels(data["a"])
        as_quotes = depth == 1 and self._want_quotes
        as_book = depth == self.depth and self._want_book
        if sym not in self.symbols or not (as_quotes or as_book):
            out.drop(DROP_UNSUBSCRIBED)
            return
        state = self._topics.get(topic)
        if state is None:
            state = self._topics[topic] = _TopicState()
        snapshot = kind == "snapshot"
        last = state.last_u
        rotated = state.rotating
        if rotated:
            if last is not None and u <= last and u != 1:
                self._stale(state, topic, sym, u, ts_recv_ns, recv_seq, out)
                return  # the overlap of a make-before-break switch
            state.rotating = False
        if not snapshot:
            if u == 1:
                snapshot = True  # the venue restarted its book service
                state.resync_reason = "u=1: venue restarted the order book service"
            elif last is None:
                out.drop(DROP_UNSYNCED_BOOK)
                state.unsynced_drops += 1
                if state.unsynced_drops >= RESUBSCRIBE_AFTER_DROPS:
                    state.unsynced_drops = 0
                    self._resubscribe(topic, out)
                return
            elif u <= last:
                self._stale(state, topic, sym, u, ts_recv_ns, recv_seq, out)
                return
            elif u != last + 1:
                out.drop(DROP_UNSYNCED_BOOK)
                self._lost(state, topic, sym, f"{topic}: expected u={last + 1}, received u={u}",
                           f"after gap at u={u}", ts_recv_ns, recv_seq, out)
                return
        elif depth > 1 and last is not None and state.resync_reason is None and not rotated:
            # An unrequested snapshot on a synced topic: the venue reset the book.
            state.resync_reason = f"venue sent a new snapshot after u={last}"
        state.stale_drops = 0
        if snapshot:
            if state.resync_reason is not None:
                self.resync(out, sym, ts_recv_ns, recv_seq,
                            f"{topic}: snapshot u={u} ({state.resync_reason})")
                state.resync_reason = None
            state.ever_synced = True
            state.unsynced_drops = 0
        state.last_u = u
        if as_book:
            rows: list[BookRow] = []
            for px, sz in bids:
                rows.append((sym, ts_event, ts_recv_ns, recv_seq, snapshot, BID, px, sz, u))
            for px, sz in asks:
                rows.append((sym, ts_event, ts_recv_ns, recv_seq, snapshot, ASK, px, sz, u))
            if rows:
                out.book = rows
        if as_quotes:
            out.quotes = [self._bbo(state, sym, snapshot, bids, asks, ts_event, ts_recv_ns,
                                    recv_seq)]

    @staticmethod
    def _bbo(state: _TopicState, sym: str, snapshot: bool, bids: Levels, asks: Levels,
             ts_event: int, ts_recv_ns: int, recv_seq: int) -> QuoteRow:
        if snapshot:
            state.bids.clear()
            state.asks.clear()
        for book, levels, is_bid in ((state.bids, bids, True), (state.asks, asks, False)):
            for px, sz in levels:
                if sz == 0.0:
                    book.pop(px, None)
                else:
                    book[px] = sz
            if len(book) > 1:  # depth 1: whatever is not the best has left the stream
                top = max(book) if is_bid else min(book)
                size = book[top]
                book.clear()
                book[top] = size
        bid = next(iter(state.bids.items()), None)
        ask = next(iter(state.asks.items()), None)
        return (sym, ts_event, ts_recv_ns, recv_seq,
                bid[0] if bid else None, bid[1] if bid else None,
                ask[0] if ask else None, ask[1] if ask else None)

    def _stale(self, state: _TopicState, topic: str, sym: str, u: int, ts_recv_ns: int,
               recv_seq: int, out: Output) -> None:
        """Already applied (a repeat, or a rotation's overlap); endless repeats mean the
        venue's ids went back without `u = 1`: resynchronise."""
        out.drop(DROP_STALE_BOOK)
        state.stale_drops += 1
        if state.stale_drops >= RESUBSCRIBE_AFTER_DROPS:
            self._lost(state, topic, sym,
                       f"{topic}: u went back (received u={u} after u={state.last_u})",
                       "after u went back", ts_recv_ns, recv_seq, out)

    def _lost(self, state: _TopicState, topic: str, sym: str, detail: str, reason: str,
              ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        """A break in `u`: record it, forget the book, resubscribe for a new snapshot."""
        self.gap(out, sym, ts_recv_ns, recv_seq, detail)
        state.last_u = None
        state.rotating = False
        state.unsynced_drops = state.stale_drops = 0
        state.resync_reason = reason
        state.bids.clear()
        state.asks.clear()
        self._resubscribe(topic, out)

    def _resubscribe(self, topic: str, out: Output) -> None:
        out.reply(self._request("unsubscribe", (topic,)))
        out.reply(self._request("subscribe", (topic,)))


class BybitLinear(BybitSpot):
    """USDT/USDC perpetuals and futures: same protocol; no per-request argument limit."""

    exchange: ClassVar[str] = "bybit-linear"
    default_ws_url: ClassVar[str] = "wss://stream.bybit.com/v5/public/linear"
    max_args_per_request: ClassVar[int | None] = None
    # USDC contracts are spelled like "BTCPERP" or "BTC-26DEC25".
    symbol_pattern: ClassVar[re.Pattern[str]] = re.compile(r"[A-Z0-9][A-Z0-9-]{1,31}")
    symbol_example: ClassVar[str] = "'BTCUSDT', 'BTC-26DEC25'"
