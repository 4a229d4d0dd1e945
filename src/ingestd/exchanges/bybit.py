"""Bybit v5 public WebSocket codecs: spot (`bybit-spot`) and USDT/USDC perps (`bybit-linear`).

Owns: Bybit's wire format and rules - the endpoints (`wss://stream.bybit.com/v5/public/spot`
and `/linear`), the `{"op":"subscribe","args":[...],"req_id":...}` requests (spot: at most
10 args per request, so several messages), the `{"op":"ping"}` keepalive and the silent
handling of every pong shape, acks (`subscribed` events naming the request's topics) and
refusals (`success:false` -> `refused` events), and the decoding (typed msgspec structs,
prices and sizes kept as the venue's decimal strings until checked) of:

- `publicTrade.<SYM>` -> trades. `trade_id` = `i`, `side` = `S` (`Buy`/`Sell` is the
  taker's side: checked against the recorded book, every trade at the best ask says `Buy`,
  every trade at the best bid `Sell`), `ts_event` = `T` (ms). Ids go through the shared
  exact de-duplication (exchanges/trades.py): spot ids are digit strings, kept as integer
  ids (a replay is dropped and counted, a never-seen id below the highest seen is stored
  with an `out_of_order` event; they are not consecutive per symbol, so a jump is no
  gap); linear ids are UUIDs, kept as opaque ids (a replay within the window is dropped).
  A frame is checked whole before any of its ids is recorded.
- `orderbook.1.<SYM>` -> quotes (Bybit's best bid/ask stream). Each row is the full best
  bid/ask after the message (levels kept per symbol, truncated to the best one; a side is
  null only when it is empty).
- `orderbook.<depth>.<SYM>` -> book, `depth` = feed `book_depth` (50, 200 or 1000;
  default 200). `snapshot` -> a snapshot block (`is_snapshot` true, one `recv_seq`),
  `delta` -> deltas (size "0" deletes). Bybit truncates its book itself (levels leaving the
  depth are deleted explicitly), so the rows alone rebuild the venue's book.
- linear only: `tickers.<SYM>` -> derivatives (snapshot, then deltas carrying only what
  changed, merged with the symbol's latest values: markPrice, indexPrice, fundingRate paid
  at nextFundingTime, openInterest) and `allLiquidation.<SYM>` -> liquidations (`S` names
  the liquidated position, the order's side is the opposite; price `p`, amount `v`).

Topics are parsed strictly: an orderbook message counts only if its topic is exactly one
the feed subscribed (`orderbook.1.<SYM>` for quotes, `orderbook.<depth>.<SYM>` for the
book, spelled as subscribed) and `data.s` is that symbol. Another of Bybit's own spellings
(`orderbook.50.X` on a depth-200 feed, an unsubscribed symbol) is dropped as
`unsubscribed_symbol`; any other spelling (`orderbook.01.X`, `orderbook.0200.X`) is an
unknown message, never a book of its own.

Sequencing (both orderbook topics, on the shared `BookSync` with channel snapshots and
`BybitRules`): `data.u` grows by 1 per message per topic. `u == 1` on a delta means Bybit
restarted its book service: that delta is written as a snapshot block plus a `resync`
event. orderbook.1 resends its snapshot after 3 s without change (same `u`): a snapshot on
a synced orderbook.1 topic is a new best bid/ask, not a resync; on a synced book topic it
means the venue reset the book (`resync`). On a break: a `gap` event (expected/received
`u`), the topic is resubscribed (unsubscribe + subscribe through `Output.replies`), deltas
are dropped (counted, `book_not_synced`) until the new snapshot, which is followed by a
`resync` event (as is the first snapshot after a reconnect, for a topic that was synced).
`update_id` = `u`; `ts_event` = `cts` (matching engine time) if present, else `ts`.
A delta before the first snapshot of a connection's subscription does not resubscribe (the
subscription brings the snapshot; if none comes, the shared rule of `BookSync` asks again:
exchanges/book.py, SNAPSHOT_WAIT_S). Safety net: `STALE_RUN_GAP` consecutive
already-applied `u` (ids that went back without `u = 1`) count as a gap.

Connections: `on_connect` forgets every book (a new connection's subscriptions start with
snapshots); `on_rotate` (make-before-break) keeps them, since `u` is the venue's per-topic
id, not a per-connection counter (a fresh subscription's first snapshot in the recordings
already carries u=15076952): the new connection's overlap (its snapshot and the deltas
with `u` <= the last applied one) is dropped as `stale_book_update` and the book
continues without a resync.

State (`state()` / `restore()`): trade ids (`trades`), both books' sync positions and the
best bid/ask levels (`book`, `bbo`), the per-topic bookkeeping around them (`topics`) and
the requests awaiting their ack with the request counter (`requests`).

Must not: do I/O, read a clock or log (see exchanges/base.py); catch decode errors itself
(the base rejects the frame); change any state before a frame is known to be well-formed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Final, Literal

import msgspec
import orjson

from ingestd.config import FeedConfig
from ingestd.exchanges.base import (
    DROP_STALE_BOOK,
    DROP_UNSUBSCRIBED,
    BadFrame,
    Codec,
    Output,
    amount,
    ms_to_ns,
    parse_levels,
    price,
)
from ingestd.exchanges.book import BookSync, Diff, Levels
from ingestd.exchanges.derivs import LatestValues
from ingestd.exchanges.trades import TradeIds, admit_trade_id, trade_id
from ingestd.schema import BUY, SELL, UNKNOWN

# Consecutive already-applied deltas (u went back without u = 1) that are a gap.
STALE_RUN_GAP: Final = 500
# Bybit: the `args` of one connection may hold at most 21,000 characters.
MAX_ARGS_CHARS: Final = 21_000
# Requests remembered until acknowledged (to name the topics of an ack or a refusal).
MAX_PENDING_REQUESTS: Final = 1024

PING: Final = '{"op":"ping"}'

_INF: Final = float("inf")
_MAX_I64: Final = 2**63 - 1
_MAX_MS: Final = _MAX_I64 // 1_000_000
Ms = Annotated[int, msgspec.Meta(ge=0, le=_MAX_MS)]
UpdateId = Annotated[int, msgspec.Meta(ge=0, le=_MAX_I64)]

_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]*)?")
_DECIMALS = re.compile(r"[0-9]+(?:\.[0-9]*)?(?:,[0-9]+(?:\.[0-9]*)?)*")
# An orderbook topic as Bybit spells it: its depths (no other spelling of them), a symbol.
_BOOK_TOPIC = re.compile(r"orderbook\.(?:1|50|200|1000)\.([A-Z0-9][A-Z0-9-]*)")
_TOPIC_IN_MSG = re.compile(r"topic:([A-Za-z0-9._-]+)")
_TRADE_HEAD: Final = b'{"topic":"publicTrade.'
_BOOK_HEAD: Final = b'{"topic":"orderbook.'


# ---- wire structs ------------------------------------------------------------------------
class _Trade(msgspec.Struct):
    T: Ms
    s: str
    S: str
    v: str
    p: str
    i: str | int


class _Trades(msgspec.Struct):
    topic: str
    data: list[_Trade]


class _BookData(msgspec.Struct):
    s: str
    b: list[tuple[str, str]]
    a: list[tuple[str, str]]
    u: UpdateId


class _BookMsg(msgspec.Struct):
    topic: str
    type: Literal["snapshot", "delta"]
    data: _BookData
    ts: Ms | None = None
    cts: Ms | None = None


class _Control(msgspec.Struct):
    """Acks, refusals, pongs, and our own requests echoed."""

    op: str | None = None
    success: bool | None = None
    ret_msg: str | None = None
    req_id: str | None = None


class _TickerData(msgspec.Struct):
    """`tickers.<SYM>` (linear): a snapshot, then deltas carrying only what changed."""

    symbol: str
    markPrice: str | None = None
    indexPrice: str | None = None
    fundingRate: str | None = None
    nextFundingTime: str | None = None
    openInterest: str | None = None


class _TickerMsg(msgspec.Struct):
    topic: str
    type: Literal["snapshot", "delta"]
    data: _TickerData
    ts: Ms | None = None


class _Liquidation(msgspec.Struct):
    T: Ms
    s: str
    S: str
    v: str
    p: str


class _Liquidations(msgspec.Struct):
    topic: str
    data: list[_Liquidation]
    ts: Ms | None = None


_TRADES = msgspec.json.Decoder(_Trades)
_BOOK = msgspec.json.Decoder(_BookMsg)
_TICKER = msgspec.json.Decoder(_TickerMsg)
_LIQUIDATIONS = msgspec.json.Decoder(_Liquidations)
_TICKER_HEAD: Final = b'{"topic":"tickers.'
_LIQUIDATION_HEAD: Final = b'{"topic":"allLiquidation.'
# allLiquidation `S` names the liquidated position: a long (Buy) is closed by a sell.
_LIQUIDATION_ORDER_SIDE: Final = {"Buy": SELL, "Sell": BUY}


def _opt_number(text: str | None, what: str, positive: bool) -> float | None:
    """A ticker field: absent or "" is not sent (None); else a finite number."""
    if text is None or text == "":
        return None
    v = float(text)
    if not (0.0 < v < _INF if positive else -_INF < v < _INF):
        raise BadFrame(f"{what} out of range: {text!r}"[:80])
    return v


def _decimals(texts: list[str]) -> None:
    """Bybit sends every price and size as a plain decimal string: one match per frame
    (float() alone would take "1_000", "1e5", "inf")."""
    if texts and _DECIMALS.fullmatch(",".join(texts)) is None:
        for t in texts:
            if _DECIMAL.fullmatch(t) is None:
                raise BadFrame(f"not a decimal string: {t!r}"[:80])


def _levels(raw: list[tuple[str, str]]) -> Levels:
    _decimals([x for level in raw for x in level])
    return parse_levels(raw)


# ---- continuity rules ----------------------------------------------------------------------
class BybitRules:
    """`u` grows by exactly one per message of a topic: a delta with `u` <= the last
    applied one is a repeat; the first delta after a snapshot, like every later one, has
    `u` = previous + 1. Channel snapshots: nothing is buffered, so no snapshot is too old."""

    def __init__(self, depth: int) -> None:
        self.depth = depth

    @staticmethod
    def stale(diff: Diff, last_id: int, just_synced: bool) -> bool:
        return diff.last_id <= last_id

    @staticmethod
    def bridges(diff: Diff, snapshot_id: int) -> bool:
        return diff.last_id == snapshot_id + 1

    @staticmethod
    def continues(diff: Diff, last_id: int) -> bool:
        return diff.last_id == last_id + 1

    @staticmethod
    def too_old(snapshot_id: int, first_buffered: Diff) -> bool:
        return False

    def gap_detail(self, symbol: str, diff: Diff, last_id: int) -> str:
        return (f"{book_topic(self.depth, symbol)}: expected u={last_id + 1}, "
                f"received u={diff.last_id}")


def book_topic(depth: int, symbol: str) -> str:
    return f"orderbook.{depth}.{symbol}"


# ---- per-topic bookkeeping and requests (explicit state) -----------------------------------
def _strs(v: Any, what: str) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise BadFrame(f"{what} is not a list of strings")
    return v


def _str_map(v: Any, what: str, kind: type) -> dict[str, Any]:
    if not isinstance(v, dict) or not all(
            isinstance(k, str) and isinstance(x, kind) and not isinstance(x, bool)
            for k, x in v.items()):
        raise BadFrame(f"{what} is not an object of {kind.__name__}")
    return dict(v)


class _Topics:
    """What Bybit's rules need beside the shared sync, per orderbook topic."""

    def __init__(self) -> None:
        self.rotating: set[str] = set()       # a make-before-break overlap may arrive
        self.reasons: dict[str, str] = {}     # why the next snapshot is a resync
        self.stale: dict[str, int] = {}       # consecutive already-applied deltas

    def state(self) -> dict[str, Any]:
        return {"rotating": sorted(self.rotating), "reasons": dict(self.reasons),
                "stale": dict(self.stale)}

    def restore(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise BadFrame("topics state is not an object")
        rotating = set(_strs(state["rotating"], "rotating"))
        reasons = _str_map(state["reasons"], "reasons", str)
        stale = _str_map(state["stale"], "stale", int)
        self.rotating, self.reasons, self.stale = rotating, reasons, stale


class _Requests:
    """Our subscribe/unsubscribe requests until acknowledged (to name the topics of an ack
    or a refusal), and the counter that numbers their `req_id`."""

    def __init__(self) -> None:
        self.seq = 0
        self.pending: dict[str, tuple[str, tuple[str, ...]]] = {}  # req_id -> (op, args)

    def new(self, op: str, args: Sequence[str]) -> str:
        self.seq += 1
        req_id = f"{'sub' if op == 'subscribe' else 'unsub'}-{self.seq}"
        if len(self.pending) >= MAX_PENDING_REQUESTS:
            del self.pending[next(iter(self.pending))]
        self.pending[req_id] = (op, tuple(args))
        return orjson.dumps({"op": op, "args": list(args), "req_id": req_id}).decode()

    def state(self) -> dict[str, Any]:
        return {"seq": self.seq,
                "pending": [[rid, op, list(args)] for rid, (op, args) in self.pending.items()]}

    def restore(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise BadFrame("requests state is not an object")
        seq = state["seq"]
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise BadFrame(f"request counter {seq!r}")
        entries = state["pending"]
        if not isinstance(entries, list):
            raise BadFrame("pending requests are not a list")
        pending: dict[str, tuple[str, tuple[str, ...]]] = {}
        for entry in entries:
            if not (isinstance(entry, list) and len(entry) == 3
                    and isinstance(entry[0], str) and isinstance(entry[1], str)):
                raise BadFrame("a pending request is not [req_id, op, args]")
            pending[entry[0]] = (entry[1], tuple(_strs(entry[2], "args")))
        self.seq, self.pending = seq, pending


# ---- the codecs ------------------------------------------------------------------------------
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
    book_depth_note: ClassVar[str] = ("Bybit orderbook depths; the best bid/ask comes with "
                                      "channel 'quotes'")
    default_book_depth: ClassVar[int] = 200
    symbol_pattern: ClassVar[re.Pattern[str] | None] = re.compile(r"[A-Z0-9]{2,32}")
    symbol_spelling: ClassVar[str] = "Bybit-native (e.g. 'BTCUSDT')"
    # Spot trade ids are digit strings (integer ids); anything else is kept opaque.
    numeric_trade_ids: ClassVar[bool] = True

    def __init__(self, feed: FeedConfig) -> None:
        super().__init__(feed)
        self.depth = feed.book_depth or self.default_book_depth
        self._want_trades = "trades" in self.channels
        self.trade_ids = self.stateful("trades", TradeIds(consecutive=False))
        self.book_sync = self.stateful("book", self._sync(self.depth))
        # orderbook.1 feeds quotes: its best levels are kept, no book rows are written.
        self.bbo_sync = self.stateful("bbo", self._sync(1, keep_levels=True, rows=False))
        self.topics = self.stateful("topics", _Topics())
        self.requests = self.stateful("requests", _Requests())
        # Every orderbook topic subscribed, exactly as spelled in the subscription.
        self._books: dict[str, tuple[BookSync, str]] = {}
        for sym in feed.symbols:
            for sync, channel in ((self.bbo_sync, "quotes"), (self.book_sync, "book")):
                if channel in self.channels:
                    self._books[self._topic(sync, sym)] = (sync, sym)
        self._expect_snapshots()

    def _sync(self, depth: int, *, keep_levels: bool = False, rows: bool = True) -> BookSync:
        """The shared sync of one orderbook depth: channel snapshots, `u` continuity
        (kept levels are truncated to the depth)."""
        return BookSync(self, BybitRules(depth), resubscribe=lambda syms, out: (
            self._resubscribe([book_topic(depth, s) for s in syms], out)),
            keep_levels=keep_levels, depth=depth if keep_levels else None, rows=rows)

    @staticmethod
    def _topic(sync: BookSync, symbol: str) -> str:
        assert isinstance(sync.rules, BybitRules)
        return book_topic(sync.rules.depth, symbol)

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
        problems = super().check_feed(feed)
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
        self._expect_snapshots()
        t = self.topics
        t.rotating.clear()
        t.stale.clear()
        # Written only for a topic that was synced before (BookSync's rule).
        t.reasons = dict.fromkeys(self._books, "new connection")
        self.requests.pending.clear()

    def _expect_snapshots(self) -> None:
        """Every subscribed topic's snapshot comes with the (new) subscription."""
        for sync in (self.book_sync, self.bbo_sync):
            sync.reset(expect=[sym for s, sym in self._books.values() if s is sync])

    def on_rotate(self) -> None:
        # The new connection subscribed the same topics and `u` is the venue's per-topic
        # update id, not per connection: keep every book, skip the overlap (its snapshot and
        # deltas with u <= the last applied one) and continue at the next `u`. Trade ids
        # are de-duplicated as always; acks of the new connection stay pending.
        self.topics.rotating = {topic for topic, (sync, sym) in self._books.items()
                                if sync.synced(sym)}

    def subscribe_messages(self) -> Sequence[str]:
        topics = self.topics_for(self.feed.symbols, self.feed.channels, self.depth)
        step = self.max_args_per_request or len(topics) or 1
        return [self.requests.new("subscribe", topics[i:i + step])
                for i in range(0, len(topics), step)]

    def keepalive_message(self) -> str | None:
        return PING

    def _resubscribe(self, topics: list[str], out: Output) -> None:
        """Ask for fresh snapshots of these topics (BookSync's `resubscribe`)."""
        out.reply(self.requests.new("unsubscribe", topics))
        out.reply(self.requests.new("subscribe", topics))

    # ---- frames ----------------------------------------------------------------------------
    def parse_frame(self, frame: bytes | str, ts_recv_ns: int, recv_seq: int,
                    out: Output) -> None:
        raw = frame.encode() if isinstance(frame, str) else frame
        if raw.startswith(_TRADE_HEAD):
            self._trades(_TRADES.decode(raw), ts_recv_ns, recv_seq, out)
        elif raw.startswith(_BOOK_HEAD):
            self._orderbook(_BOOK.decode(raw), ts_recv_ns, recv_seq, out)
        elif raw.startswith(_TICKER_HEAD):
            self._ticker(_TICKER.decode(raw), ts_recv_ns, recv_seq, out)
        elif raw.startswith(_LIQUIDATION_HEAD):
            self._liquidations(_LIQUIDATIONS.decode(raw), ts_recv_ns, recv_seq, out)
        else:
            self._generic(raw, ts_recv_ns, recv_seq, out)

    def _generic(self, raw: bytes, ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        """Frames off the fast path: data with `topic` not first, control frames, unknown
        kinds, and bad frames (which raise here with a precise reason)."""
        msg = orjson.loads(raw)
        if type(msg) is not dict:
            raise BadFrame("not a JSON object")
        topic = msg.get("topic")
        if topic is not None:
            if type(topic) is not str:
                raise BadFrame("topic is not a string")
            family = topic.partition(".")[0]
            if family == "publicTrade":
                self._trades(msgspec.convert(msg, _Trades), ts_recv_ns, recv_seq, out)
            elif family == "orderbook":
                self._orderbook(msgspec.convert(msg, _BookMsg), ts_recv_ns, recv_seq, out)
            elif family == "tickers":
                self._ticker(msgspec.convert(msg, _TickerMsg), ts_recv_ns, recv_seq, out)
            elif family == "allLiquidation":
                self._liquidations(msgspec.convert(msg, _Liquidations), ts_recv_ns,
                                   recv_seq, out)
            else:
                out.unknown += 1  # tickers, kline, ...: never subscribed by us
        elif "op" in msg or "success" in msg:
            self._control(msgspec.convert(msg, _Control), ts_recv_ns, recv_seq, out)
        else:
            out.unknown += 1

    def _control(self, msg: _Control, ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        op, success, ret_msg = msg.op, msg.success, msg.ret_msg
        if op == "pong" or (success is True and (op == "ping" or ret_msg == "pong")):
            return  # pong: spot/linear `{"success":true,"ret_msg":"pong",...}` or `op:pong`
        pending = (self.requests.pending.pop(msg.req_id, None) if msg.req_id is not None
                   else None)
        if success is True:
            if op == "subscribe":
                detail = " ".join(pending[1]) if pending is not None else None
                self.subscribed(out, None, ts_recv_ns, recv_seq, detail)
            return  # unsubscribe (resync) and other acks
        if success is False:
            text = ret_msg if ret_msg is not None else "None"
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
        out.unknown += 1

    # ---- trades ----------------------------------------------------------------------------
    def _trades(self, msg: _Trades, ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        data = msg.data
        # The whole frame is checked before any id is recorded.
        _decimals([x for t in data for x in (t.p, t.v)])
        checked = []
        numeric = self.numeric_trade_ids
        for t in data:
            text, tid = trade_id(t.i)
            side = BUY if t.S == "Buy" else SELL if t.S == "Sell" else UNKNOWN
            checked.append((t.s, t.T * 1_000_000, text, tid if numeric else None, side,
                            price(t.p), amount(t.v)))
        want, symbols, ids = self._want_trades, self.symbols, self.trade_ids
        unsubscribed = 0
        block = None
        for sym, ts_event, text, tid, side, px, qty in checked:
            if not want or sym not in symbols:
                unsubscribed += 1
            elif admit_trade_id(self, out, ids, sym, text, tid, ts_recv_ns, recv_seq):
                if block is None:
                    block = out.trades_block()
                block.add(sym, ts_event, ts_recv_ns, recv_seq, text, side, px, qty)
        if unsubscribed:
            out.drop(DROP_UNSUBSCRIBED, unsubscribed)

    # ---- derivatives and liquidations (linear only) ------------------------------------------
    def _ticker(self, msg: _TickerMsg, ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        out.unknown += 1  # spot: never subscribed

    def _liquidations(self, msg: _Liquidations, ts_recv_ns: int, recv_seq: int,
                      out: Output) -> None:
        out.unknown += 1  # spot: never subscribed

    # ---- order books -----------------------------------------------------------------------
    def _orderbook(self, msg: _BookMsg, ts_recv_ns: int, recv_seq: int,
                   out: Output) -> None:
        d = msg.data
        sym = d.s
        ts = msg.cts if msg.cts is not None else msg.ts
        if ts is None:
            raise BadFrame("orderbook message has neither cts nor ts")
        bids, asks = _levels(d.b), _levels(d.a)
        topic = msg.topic
        entry = self._books.get(topic)
        if entry is None:
            spelled = _BOOK_TOPIC.fullmatch(topic)
            if spelled is None:
                out.unknown += 1  # not a spelling of any topic we subscribe: no book
                return
            if spelled.group(1) != sym:
                raise BadFrame(f"topic {topic!r} does not match symbol {sym!r}"[:120])
            out.drop(DROP_UNSUBSCRIBED)  # a depth or symbol this feed did not subscribe
            return
        sync, subscribed = entry
        if sym != subscribed:
            raise BadFrame(f"topic {topic!r} does not match symbol {sym!r}"[:120])
        self._sequence(sync, topic, sym, msg.type == "snapshot", d.u, ts * 1_000_000, bids,
                       asks, ts_recv_ns, recv_seq, out)

    def _sequence(self, sync: BookSync, topic: str, sym: str, snapshot: bool, u: int,
                  ts_event: int, bids: Levels, asks: Levels, ts_recv_ns: int, recv_seq: int,
                  out: Output) -> None:
        topics = self.topics
        book = sync.books.get(sym)
        synced = book is not None and sync.synced(sym)
        last = book.last_id if book is not None else 0
        quiet = False
        if topic in topics.rotating:
            if synced and u <= last and u != 1:
                out.drop(DROP_STALE_BOOK)  # the overlap of a make-before-break switch
                self._stale(sync, topic, sym, u, last, ts_recv_ns, recv_seq, out)
                return
            topics.rotating.discard(topic)
            quiet = synced  # the new connection's first news continues the book
        if not snapshot and u == 1:
            snapshot, quiet = True, False  # the venue restarted its book service
            topics.reasons[topic] = "u=1: venue restarted the order book service"
        if snapshot:
            if synced and not quiet and topic not in topics.reasons:
                if sync.rows:  # an unrequested snapshot on a synced book: a reset
                    topics.reasons[topic] = f"venue sent a new snapshot after u={last}"
                else:
                    quiet = True  # orderbook.1 resends its snapshot: a new best bid/ask
            reason = topics.reasons.pop(topic, "resubscribed")
            topics.stale.pop(topic, None)
            sync.snapshot(sym, out, ts_event_ns=ts_event, ts_recv_ns=ts_recv_ns,
                          recv_seq=recv_seq, bids=bids, asks=asks, snapshot_id=u, update_id=u,
                          detail=f"{topic}: snapshot u={u} ({reason})",
                          resync=False if quiet else None)
        else:
            diff = Diff(u, u, -1, u, ts_event, ts_recv_ns, bids, asks)
            if not sync.diff(sym, diff, out, recv_seq):
                if not synced:
                    return  # dropped until the snapshot (BookSync asks again if late)
                if sync.synced(sym):
                    self._stale(sync, topic, sym, u, last, ts_recv_ns, recv_seq, out)
                else:  # a gap: BookSync wrote it and resubscribed
                    topics.reasons[topic] = f"after gap at u={u}"
                    topics.stale.pop(topic, None)
                return
            topics.stale.pop(topic, None)
        if not sync.rows:
            self._quote(sync, sym, ts_event, ts_recv_ns, recv_seq, out)

    def _quote(self, sync: BookSync, sym: str, ts_event: int, ts_recv_ns: int,
               recv_seq: int, out: Output) -> None:
        """The best bid/ask after an orderbook.1 message (the sync keeps depth 1: whatever
        is not the best has left the stream)."""
        book = sync.book(sym)
        assert book.bids is not None and book.asks is not None
        bid, ask = book.bids.best(), book.asks.best()
        out.quotes_block().add(sym, ts_event, ts_recv_ns, recv_seq,
                               bid[0] if bid else None, bid[1] if bid else None,
                               ask[0] if ask else None, ask[1] if ask else None)

    def _stale(self, sync: BookSync, topic: str, sym: str, u: int, last: int,
               ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        """Already applied (a repeat, or a rotation's overlap: dropped, counted); endless
        repeats mean the venue's ids went back without `u = 1`: resynchronise."""
        topics = self.topics
        n = topics.stale.get(topic, 0) + 1
        if n < STALE_RUN_GAP:
            topics.stale[topic] = n
            return
        topics.stale.pop(topic, None)
        topics.rotating.discard(topic)
        topics.reasons[topic] = "after u went back"
        sync.break_sync(sym, out, f"{topic}: u went back (received u={u} after u={last})",
                        ts_recv_ns, recv_seq)


class BybitLinear(BybitSpot):
    """USDT/USDC perpetuals and futures: same protocol; no per-request argument limit;
    trade ids are UUIDs."""

    exchange: ClassVar[str] = "bybit-linear"
    default_ws_url: ClassVar[str] = "wss://stream.bybit.com/v5/public/linear"
    max_args_per_request: ClassVar[int | None] = None
    # USDC contracts are spelled like "BTCPERP" or "BTC-26DEC25".
    symbol_pattern: ClassVar[re.Pattern[str] | None] = re.compile(r"[A-Z0-9][A-Z0-9-]{1,31}")
    symbol_spelling: ClassVar[str] = "Bybit-native (e.g. 'BTCUSDT', 'BTC-26DEC25')"
    numeric_trade_ids: ClassVar[bool] = False
    CHANNELS: ClassVar[tuple[str, ...]] = ("trades", "quotes", "book", "derivatives",
                                           "liquidations")

    def __init__(self, feed: FeedConfig) -> None:
        super().__init__(feed)
        self.derivs: LatestValues = self.stateful("derivatives", LatestValues())
        self._want_derivs = "derivatives" in self.channels
        self._want_liquidations = "liquidations" in self.channels

    @classmethod
    def topics_for(cls, symbols: Sequence[str], channels: Sequence[str],
                   depth: int) -> list[str]:
        topics = super().topics_for(symbols, channels, depth)
        for sym in symbols:
            if "derivatives" in channels:
                topics.append(f"tickers.{sym}")
            if "liquidations" in channels:
                topics.append(f"allLiquidation.{sym}")
        return topics

    def _ticker(self, msg: _TickerMsg, ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        """`tickers.<SYM>` -> derivatives: markPrice, indexPrice, fundingRate (paid at
        nextFundingTime), openInterest; a delta carries only what changed, merged with the
        symbol's latest values. A message carrying none of them (a best bid/ask delta)
        writes no row (nothing changed). `ts_event` = `ts`."""
        if not self._want_derivs:
            out.unknown += 1  # never subscribed
            return
        d = msg.data
        sym = d.symbol
        if sym not in self.symbols or msg.topic != f"tickers.{sym}":
            out.drop(DROP_UNSUBSCRIBED)
            return
        mark = _opt_number(d.markPrice, "markPrice", True)
        index = _opt_number(d.indexPrice, "indexPrice", True)
        funding = _opt_number(d.fundingRate, "fundingRate", False)
        oi = _opt_number(d.openInterest, "openInterest", False)
        if oi is not None and oi < 0:
            raise BadFrame(f"openInterest out of range: {d.openInterest!r}"[:80])
        nft = d.nextFundingTime
        next_ns = None
        if nft is not None and nft != "" and nft != "0":
            next_ns = int(nft)
            if not 0 < next_ns <= _MAX_MS:
                raise BadFrame(f"nextFundingTime out of range: {nft!r}"[:80])
            next_ns *= 1_000_000
        if mark is None and index is None and funding is None and oi is None \
                and next_ns is None:
            return
        self.derivs.update(out, sym, ms_to_ns(msg.ts) if msg.ts is not None else None,
                           ts_recv_ns, recv_seq, mark_price=mark, index_price=index,
                           funding_rate=funding, open_interest=oi, next_funding_time=next_ns)

    def _liquidations(self, msg: _Liquidations, ts_recv_ns: int, recv_seq: int,
                      out: Output) -> None:
        """`allLiquidation.<SYM>` -> liquidations: `S` names the liquidated position, so
        the order's side is the opposite; price `p`, amount `v`, time `T`."""
        if not self._want_liquidations:
            out.unknown += 1  # never subscribed
            return
        rows = []
        for item in msg.data:
            side = _LIQUIDATION_ORDER_SIDE.get(item.S)
            if side is None:
                raise BadFrame(f"liquidation side {item.S!r}"[:80])
            _decimals([item.p, item.v])
            rows.append((item.s, item.T * 1_000_000, side, price(item.p), amount(item.v)))
        unsubscribed = 0
        for sym, ts_event, side, px, qty in rows:
            if sym not in self.symbols:
                unsubscribed += 1
                continue
            out.liquidations_block().add(sym, ts_event, ts_recv_ns, recv_seq, side, px, qty,
                                         None)
        if unsubscribed:
            out.drop(DROP_UNSUBSCRIBED, unsubscribed)
