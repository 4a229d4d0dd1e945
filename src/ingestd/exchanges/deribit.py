"""Deribit API v2 public WebSocket codec (`deribit`).

Owns Deribit's wire format and rules: the JSON-RPC 2.0 endpoint
(`wss://www.deribit.com/ws/api/v2`), its requests (`public/set_heartbeat`, then one
`public/subscribe` with every channel of the feed), the heartbeat protocol (the venue
sends `heartbeat` notifications and `test_request`s; a `test_request` must be answered
with `public/test` or Deribit closes the connection at once - the answer goes out through
`Output.replies`), the request ids (`n * 8 + method code`, so an answer names its method
even after a restart), acks (`subscribed` events per channel; a channel missing from the
ack's result is one Deribit did not subscribe - an unknown instrument - and is a `refused`
event; a JSON-RPC `error` answering a subscribe refuses its channels), typed msgspec
structs per notification kind, and the decoding of these channels, all with the feed's
notification interval. The config has no key for an interval, so this venue reads the
shared `trade_stream` key as the interval of every channel it subscribes: "100ms" (the
default), "agg2", or "raw" (what the 2021 recordings used; since 2024-25 Deribit refuses
it to unauthorized connections - error 13778, a `refused` event - and this codec does not
authenticate):

- `trades.<inst>.<interval>` -> trades (and liquidations). `side` = `direction`, which
  Deribit documents as the taker's direction. Checked on the recorded data: no recording
  holds trades and a best bid/ask of the same moment (0 trades checkable against quotes);
  the one multi-fill frame (2025-12-12, 2 `sell` fills in one ms) walks down the book as a
  taker sell sweeping bids does (92294.5 then 92288.5): 1/1 consistent. `trade_id` =
  `trade_id` (digit strings for BTC; Deribit also spells ids like "ETH-16463419", so it is
  kept as text), `ts_event` = `timestamp` (ms), `amount` = `amount` as sent: USD for
  inverse futures/perpetuals (10 USD per BTC contract; `contracts` is not used), base
  currency for options and linear instruments. De-duplication and continuity run on
  `trade_seq`, the per-instrument sequence that goes up by one per trade (exchanges/
  trades.py, consecutive integer ids): a replay is dropped (counted), a jump is a `gap`
  event, a never-seen lower sequence is stored with an `out_of_order` event.
  A trade flagged `liquidation` is also a liquidations row (channel `liquidations`; it
  needs the trades subscription, which is made for either channel): `"T"` - the taker was
  liquidated, the liquidation order's side is `direction`; `"M"` - the maker, the
  opposite side; `"MT"` - both, two rows (taker's, then maker's). `price`/`amount` are the
  trade's, `order_id` is null (the public trade names no order). A flag of another value
  (or on a trade without a buy/sell direction) writes no liquidation row and is counted
  (`unreadable_liquidation`). A third party reports that the public `.100ms` stream left
  the flag out in 2026 while Deribit's trade history carried it: not verified here.
- `ticker.<inst>.<interval>` -> quotes (channel `quotes`) and derivatives (channel
  `derivatives`). Quotes: `best_bid_price`/`best_bid_amount`, `best_ask_*`; a side of
  price 0 and amount 0 (or null) is an empty side (null). A ticker pushes whenever any of
  its fields changes (mark price, greeks...), so a quote row is written only when the best
  bid/ask differs from the last one written for the instrument (explicit state); each row
  is still the full best bid/ask. Checked: all 150 recorded ticker best bid/asks equal
  the best levels of the book rebuilt from the same capture at the ticker's timestamp.
  Derivatives (exchanges/derivs.py `LatestValues`, carried forward): `mark_price`,
  `index_price`, `funding_rate` = `current_funding` (perpetuals only; Deribit sends no next
  funding time, so `next_funding_time` and `predicted_funding_rate` stay null;
  `funding_8h` is not used), `open_interest` = `open_interest` (USD for inverse
  instruments, contracts/base currency otherwise). `ts_event` = `timestamp` (ms).
- `book.<inst>.<interval>` -> book, on the shared `BookSync` with channel snapshots: the
  subscription brings `type: snapshot` (a snapshot block, one `recv_seq`, `update_id` =
  `change_id`), then `type: change` messages whose entries `[action, price, amount]` are
  absolute sizes (`new`/`change`; `delete` removes the level: amount 0). Deribit's book
  channel is the whole book (no truncation). Continuity (`DeribitRules`): every change's
  `prev_change_id` equals the previous message's `change_id` (the snapshot's for the
  first; verified 0 breaks over the 187 recorded messages). A break is a `gap` event
  (expected vs received), `public/unsubscribe` + `public/subscribe` of that book channel
  (one pair for every book broken by the same read), changes are dropped (counted) until
  the new snapshot, which is followed by a `resync` event. A change before the first
  snapshot of a connection's subscription is dropped without a resubscribe (the
  subscription brings the snapshot; if it does not come, BookSync asks again).

Channels are matched exactly: a notification counts only for a channel this feed
subscribed (spelled as subscribed), and its `instrument_name` must be that channel's;
other Deribit data channels (another interval, `trades.option.any.raw`, grouped books,
`quote.*`) are dropped and counted as `unsubscribed_symbol`; anything else is unknown.

Keepalive: `public/set_heartbeat` with `HEARTBEAT_INTERVAL_S` (Deribit: at least 10 s);
a quiet connection still receives a heartbeat or a test_request every interval, so
silence beyond `default_stale_after_s` is a stale stream. No protocol-level pings (the
heartbeat is Deribit's documented liveness check). Connections: Deribit allows 32
simultaneous connections per IP and charges a subscribe 3,000 of a 30,000-credit pool
(burst 10, ~3.3/s sustained): `connect_limit` keeps new connections (each one subscribe)
within that. `on_connect` forgets every book and the requests awaiting an answer (the
new connection's subscription brings new snapshots); trade sequences and the last quotes
are kept.

State (`state()` / `restore()`): trade sequences (`trades`), books (`books`), last quote
per instrument (`quotes`), latest derivatives values (`derivs`), request counter and
pending requests (`requests`).

Must not: do I/O, read a clock or log (see exchanges/base.py); catch decode errors itself
(the base rejects the frame); change any state before a frame is known to be well-formed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Final

import msgspec
import orjson

from ingestd.config import FeedConfig
from ingestd.exchanges.base import (
    DROP_UNSUBSCRIBED,
    BadFrame,
    Codec,
    Output,
    amount,
    ms_to_ns,
    price,
    quote_side,
)
from ingestd.exchanges.book import BookSync, Diff, Levels
from ingestd.exchanges.derivs import LatestValues
from ingestd.exchanges.trades import TradeIds, admit_trade, trade_id
from ingestd.schema import BUY, SELL, UNKNOWN

# Feed channels -> Deribit channel families.
FAM_TRADES: Final = "trades"
FAM_TICKER: Final = "ticker"
FAM_BOOK: Final = "book"
# Data families Deribit sends that this codec knows (others are unknown messages).
_KNOWN_FAMILIES: Final = frozenset({FAM_TRADES, FAM_TICKER, FAM_BOOK, "quote",
                                    "incremental_ticker"})
INTERVALS: Final = ("100ms", "raw", "agg2")
DEFAULT_INTERVAL: Final = "100ms"
HEARTBEAT_INTERVAL_S: Final = 15

# JSON-RPC request ids: n * ID_STRIDE + the method's code.
ID_STRIDE: Final = 8
M_SET_HEARTBEAT: Final = 1
M_SUBSCRIBE: Final = 2
M_UNSUBSCRIBE: Final = 3
M_TEST: Final = 4
METHODS: Final[dict[int, str]] = {M_SET_HEARTBEAT: "public/set_heartbeat",
                                  M_SUBSCRIBE: "public/subscribe",
                                  M_UNSUBSCRIBE: "public/unsubscribe",
                                  M_TEST: "public/test"}
MAX_PENDING_REQUESTS: Final = 256

DROP_UNREADABLE_LIQUIDATION: Final = "unreadable_liquidation"

_MAX_I64: Final = 2**63 - 1
_MAX_MS: Final = _MAX_I64 // 1_000_000
Ms = Annotated[int, msgspec.Meta(ge=0, le=_MAX_MS)]
Id64 = Annotated[int, msgspec.Meta(ge=0, le=_MAX_I64)]

_SIDES: Final[dict[str, str]] = {"buy": BUY, "sell": SELL}
_OPPOSITE: Final[dict[str, str]] = {BUY: SELL, SELL: BUY}
_INF: Final = math.inf


# ---- wire structs ----------------------------------------------------------------------------
class _Trade(msgspec.Struct, gc=False):
    trade_seq: Id64
    trade_id: str | int
    timestamp: Ms
    price: float
    amount: float
    direction: str
    instrument_name: str
    liquidation: str | None = None


class _BookData(msgspec.Struct, gc=False):
    type: str
    timestamp: Ms
    instrument_name: str
    change_id: Id64
    bids: list[tuple[str, float, float]]
    asks: list[tuple[str, float, float]]
    prev_change_id: Id64 | None = None


class _Ticker(msgspec.Struct, gc=False):
    timestamp: Ms
    instrument_name: str
    best_bid_price: float | None = None
    best_bid_amount: float | None = None
    best_ask_price: float | None = None
    best_ask_amount: float | None = None
    mark_price: float | None = None
    index_price: float | None = None
    open_interest: float | None = None
    current_funding: float | None = None


class _TradesParams(msgspec.Struct, gc=False):
    channel: str
    data: list[_Trade]


class _BookParams(msgspec.Struct, gc=False):
    channel: str
    data: _BookData


class _TickerParams(msgspec.Struct, gc=False):
    channel: str
    data: _Ticker


class _TradesMsg(msgspec.Struct, gc=False):
    params: _TradesParams


class _BookMsg(msgspec.Struct, gc=False):
    params: _BookParams


class _TickerMsg(msgspec.Struct, gc=False):
    params: _TickerParams


class _Error(msgspec.Struct, gc=False):
    code: int | None = None
    message: str | None = None


class _Rpc(msgspec.Struct, gc=False):
    """Every frame off the fast path: answers, errors, heartbeats, notifications."""

    id: int | str | None = None
    method: str | None = None
    params: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)
    result: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)
    error: _Error | None = None


class _Notification(msgspec.Struct, gc=False):
    channel: str
    data: msgspec.Raw


class _Heartbeat(msgspec.Struct, gc=False):
    type: str


_RPC = msgspec.json.Decoder(_Rpc)
_NOTIFICATION = msgspec.json.Decoder(_Notification)
_HEARTBEAT = msgspec.json.Decoder(_Heartbeat)
_ANY = msgspec.json.Decoder()
_DATA: Final[dict[str, msgspec.json.Decoder[Any]]] = {
    FAM_TRADES: msgspec.json.Decoder(list[_Trade]),
    FAM_BOOK: msgspec.json.Decoder(_BookData),
    FAM_TICKER: msgspec.json.Decoder(_Ticker),
}
# The fast path: Deribit sends notifications with this head (every recorded frame does).
_HEAD: Final = b'{"jsonrpc":"2.0","method":"subscription","params":{"channel":"'
_HEAD_LEN: Final = len(_HEAD)
_FAST: Final[dict[str, msgspec.json.Decoder[Any]]] = {
    FAM_TRADES: msgspec.json.Decoder(_TradesMsg),
    FAM_BOOK: msgspec.json.Decoder(_BookMsg),
    FAM_TICKER: msgspec.json.Decoder(_TickerMsg),
}


# ---- field helpers ---------------------------------------------------------------------------
def _levels(raw: list[tuple[str, float, float]]) -> Levels:
    """Book entries `[action, price, amount]` -> (price, absolute amount); `delete` is 0."""
    levels = []
    for action, px, amt in raw:
        if action == "delete":
            amt = 0.0
        elif action != "new" and action != "change":
            raise BadFrame(f"unknown book action {action!r}"[:80])
        if not (0.0 < px < _INF and 0.0 <= amt < _INF):
            price(px)
            amount(amt)
        levels.append((px, amt))
    return levels


def _non_negative(v: float | None, what: str) -> float | None:
    if v is not None and not 0.0 <= v < _INF:
        raise BadFrame(f"{what} out of range: {v!r}"[:80])
    return v


def _finite(v: float | None, what: str) -> float | None:
    if v is not None and not -_INF < v < _INF:
        raise BadFrame(f"{what} out of range: {v!r}"[:80])
    return v


def _strs(v: Any, what: str) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise BadFrame(f"{what} is not a list of strings")
    return v


# ---- continuity rules ------------------------------------------------------------------------
class DeribitRules:
    """`prev_change_id` == the previous message's `change_id` (the snapshot's for the first
    change). Channel snapshots: nothing is buffered, nothing is stale (a repeated or older
    change is a break too: the book is resynced rather than guessed)."""

    @staticmethod
    def stale(diff: Diff, last_id: int, just_synced: bool) -> bool:
        return False

    @staticmethod
    def bridges(diff: Diff, snapshot_id: int) -> bool:
        return diff.prev_id == snapshot_id

    @staticmethod
    def continues(diff: Diff, last_id: int) -> bool:
        return diff.prev_id == last_id

    @staticmethod
    def too_old(snapshot_id: int, first_buffered: Diff) -> bool:
        return False

    @staticmethod
    def gap_detail(symbol: str, diff: Diff, last_id: int) -> str:
        return (f"expected prev_change_id={last_id}, received prev_change_id={diff.prev_id} "
                f"change_id={diff.last_id}")


# ---- explicit state parts --------------------------------------------------------------------
Quote = tuple[float | None, float | None, float | None, float | None]


class _LastQuotes:
    """The last best bid/ask written per instrument (a ticker repeats it unchanged)."""

    def __init__(self) -> None:
        self.last: dict[str, Quote] = {}

    def state(self) -> dict[str, list[float | None]]:
        return {sym: list(q) for sym, q in self.last.items()}

    def restore(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise BadFrame("quotes state is not an object")
        last: dict[str, Quote] = {}
        for sym, q in state.items():
            if not (isinstance(sym, str) and isinstance(q, list) and len(q) == 4 and all(
                    v is None or (type(v) is float and 0.0 <= v < _INF) for v in q)):
                raise BadFrame(f"last quote of {sym!r} is not 4 numbers or nulls"[:120])
            last[sym] = (q[0], q[1], q[2], q[3])
        self.last = last


class _Requests:
    """Our JSON-RPC requests: the counter that numbers them, and the channels of the
    subscribes/unsubscribes still awaiting their answer."""

    def __init__(self) -> None:
        self.seq = 0
        self.pending: dict[int, list[str]] = {}

    def new(self, code: int, params: dict[str, Any],
            channels: list[str] | None = None) -> str:
        self.seq += 1
        rid = self.seq * ID_STRIDE + code
        if channels is not None:
            if len(self.pending) >= MAX_PENDING_REQUESTS:
                del self.pending[next(iter(self.pending))]
            self.pending[rid] = channels
        return orjson.dumps({"jsonrpc": "2.0", "id": rid, "method": METHODS[code],
                             "params": params}).decode()

    def state(self) -> dict[str, Any]:
        return {"seq": self.seq,
                "pending": [[rid, chans] for rid, chans in self.pending.items()]}

    def restore(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise BadFrame("requests state is not an object")
        seq = state["seq"]
        if type(seq) is not int or not 0 <= seq <= _MAX_I64 // ID_STRIDE:
            raise BadFrame(f"request counter {seq!r}"[:80])
        entries = state["pending"]
        if not isinstance(entries, list):
            raise BadFrame("pending requests are not a list")
        pending: dict[int, list[str]] = {}
        for entry in entries:
            if not (isinstance(entry, list) and len(entry) == 2 and type(entry[0]) is int):
                raise BadFrame("a pending request is not [id, channels]")
            pending[entry[0]] = list(_strs(entry[1], "pending channels"))
        self.seq, self.pending = seq, pending


# ---- the codec -------------------------------------------------------------------------------
class Deribit(Codec):
    exchange: ClassVar[str] = "deribit"
    default_ws_url: ClassVar[str] = "wss://www.deribit.com/ws/api/v2"
    keepalive_interval_s: ClassVar[float | None] = None   # heartbeats, answered in replies
    ws_ping_interval_s: ClassVar[float | None] = None
    default_stale_after_s: ClassVar[float] = 40.0          # > 2 heartbeat intervals
    # One subscribe per connection: at most 10 at once, ~3.3 per second sustained.
    connect_limit: ClassVar[tuple[int, float]] = (10, 3.0)
    CHANNELS: ClassVar[tuple[str, ...]] = ("trades", "quotes", "book", "derivatives",
                                           "liquidations")
    trade_streams: ClassVar[tuple[str, ...]] = INTERVALS
    # BTC-PERPETUAL, BTC-26MAR21, ETH-9APR21-1950-C, BTC_USDC-PERPETUAL,
    # XRP_USDC-30MAY25-2d2-C; never a "." (it separates the parts of a channel name).
    symbol_pattern: ClassVar[re.Pattern[str] | None] = re.compile(
        r"[A-Z0-9][A-Za-z0-9_]*(?:-[A-Za-z0-9_]+)*")
    symbol_spelling: ClassVar[str] = ("a Deribit instrument_name (e.g. 'BTC-PERPETUAL', "
                                      "'ETH-9APR21-1950-C')")

    def __init__(self, feed: FeedConfig) -> None:
        super().__init__(feed)
        self.interval = feed.trade_stream or DEFAULT_INTERVAL
        ch = self.channels
        self._want_trades = "trades" in ch
        self._want_liquidations = "liquidations" in ch
        self._want_quotes = "quotes" in ch
        self._want_derivs = "derivatives" in ch
        families = []
        if self._want_trades or self._want_liquidations:
            families.append(FAM_TRADES)
        if self._want_quotes or self._want_derivs:
            families.append(FAM_TICKER)
        if "book" in ch:
            families.append(FAM_BOOK)
        # Every channel subscribed, exactly as spelled: -> (family, instrument).
        self._routes: dict[str, tuple[str, str]] = {}
        for sym in feed.symbols:
            for fam in families:
                self._routes[self.channel(fam, sym)] = (fam, sym)
        self.trade_seqs = self.stateful("trades", TradeIds(consecutive=True))
        self.books = self.stateful("books", BookSync(
            self, DeribitRules(), resubscribe=self._resubscribe))
        self.quotes = self.stateful("quotes", _LastQuotes())
        self.derivs = self.stateful("derivs", LatestValues())
        self.requests = self.stateful("requests", _Requests())
        self.books.reset(expect=self._book_symbols())

    def channel(self, family: str, symbol: str) -> str:
        return f"{family}.{symbol}.{self.interval}"

    def channels_subscribed(self) -> list[str]:
        return list(self._routes)

    def _book_symbols(self) -> list[str]:
        return [sym for fam, sym in self._routes.values() if fam == FAM_BOOK]

    # ---- connection ------------------------------------------------------------------------
    def on_connect(self) -> None:
        # The new connection's subscription brings every book's snapshot; the old
        # connection's requests are never answered.
        self.books.reset(expect=self._book_symbols())
        self.requests.pending.clear()

    def subscribe_messages(self) -> Sequence[str]:
        req = self.requests
        channels = self.channels_subscribed()
        return [req.new(M_SET_HEARTBEAT, {"interval": HEARTBEAT_INTERVAL_S}),
                req.new(M_SUBSCRIBE, {"channels": channels}, channels)]

    def _resubscribe(self, symbols: list[str], out: Output) -> None:
        """Ask Deribit for fresh book snapshots (BookSync's `resubscribe`)."""
        channels = [self.channel(FAM_BOOK, sym) for sym in symbols]
        out.reply(self.requests.new(M_UNSUBSCRIBE, {"channels": channels}, channels))
        out.reply(self.requests.new(M_SUBSCRIBE, {"channels": channels}, channels))

    # ---- frames ----------------------------------------------------------------------------
    def parse_frame(self, frame: bytes | str, ts_recv_ns: int, recv_seq: int,
                    out: Output) -> None:
        raw = frame.encode() if isinstance(frame, str) else frame
        end = raw.find(b'"', _HEAD_LEN) if raw.startswith(_HEAD) else -1
        if end > 0:
            channel = raw[_HEAD_LEN:end].decode("utf-8", "replace")
            route = self._route(channel, out)
            if route is None:
                return
            fam, sym = route
            decoder = _FAST.get(fam)
            if decoder is not None:
                params = decoder.decode(raw).params
                if params.channel != channel:
                    raise BadFrame("channel repeated with another value")
                self._data(fam, sym, params.data, len(raw), ts_recv_ns, recv_seq, out)
                return
        self._generic(raw, ts_recv_ns, recv_seq, out)

    def _route(self, channel: str, out: Output) -> tuple[str, str] | None:
        """The (family, instrument) of a channel this feed subscribed; None (dropped and
        counted, or unknown) for any other."""
        route = self._routes.get(channel)
        if route is None:
            if channel.partition(".")[0] in _KNOWN_FAMILIES:
                out.drop(DROP_UNSUBSCRIBED)
            else:
                out.unknown += 1
        return route

    def _data(self, fam: str, sym: str, data: Any, nbytes: int, ts_recv_ns: int,
              recv_seq: int, out: Output) -> None:
        if fam == FAM_TRADES:
            self._trades(sym, data, ts_recv_ns, recv_seq, out)
        elif fam == FAM_TICKER:
            self._ticker(sym, data, ts_recv_ns, recv_seq, out)
        else:
            self._book(sym, data, nbytes, ts_recv_ns, recv_seq, out)

    def _generic(self, raw: bytes, ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        """Frames off the fast path: answers, errors, heartbeats, notifications in another
        key order, unknown kinds, and bad frames (which raise here with a precise reason)."""
        msg = _RPC.decode(raw)
        method = msg.method
        if method == "subscription":
            note = _NOTIFICATION.decode(msg.params)
            route = self._route(note.channel, out)
            if route is not None:
                fam, sym = route
                self._data(fam, sym, _DATA[fam].decode(note.data), len(raw), ts_recv_ns,
                           recv_seq, out)
        elif method == "heartbeat":
            kind = _HEARTBEAT.decode(msg.params).type
            if kind == "test_request":
                out.reply(self.requests.new(M_TEST, {}))
            elif kind != "heartbeat":
                out.unknown += 1
        elif method is not None:
            out.unknown += 1
        elif msg.error is not None:
            self._error(msg.id, msg.error, ts_recv_ns, recv_seq, out)
        elif msg.id is not None and msg.result:
            self._answer(msg.id, msg.result, ts_recv_ns, recv_seq, out)
        else:
            out.unknown += 1

    # ---- answers to our requests -------------------------------------------------------------
    @staticmethod
    def _code(rid: int | str | None) -> int:
        """The method code of one of our request ids (0: not one of ours)."""
        return rid % ID_STRIDE if type(rid) is int and rid > 0 else 0

    def _answer(self, rid: int | str, result: msgspec.Raw, ts_recv_ns: int, recv_seq: int,
                out: Output) -> None:
        """A `result`: a list of channels answers a subscribe (`subscribed` events; the
        channels asked for but missing from it are `refused`) or an unsubscribe (silent);
        "ok" and objects answer `public/set_heartbeat` and `public/test` (silent)."""
        value = _ANY.decode(result)
        if isinstance(value, list):
            channels = _strs(value, "subscribe result")
            code = self._code(rid)
            asked = self.requests.pending.pop(rid, None) if type(rid) is int else None
            if code == M_UNSUBSCRIBE:
                return
            routes = self._routes
            for channel in channels:
                route = routes.get(channel)
                self.subscribed(out, route[1] if route else None, ts_recv_ns, recv_seq,
                                channel)
            if asked is not None:
                taken = set(channels)
                for channel in asked:
                    if channel not in taken:
                        route = routes.get(channel)
                        self.refused(out, route[1] if route else None, ts_recv_ns, recv_seq,
                                     f"{channel}: not in Deribit's subscribe result "
                                     "(unknown instrument or channel)")
        elif not (value == "ok" or isinstance(value, dict)):
            out.unknown += 1

    def _error(self, rid: int | str | None, err: _Error, ts_recv_ns: int, recv_seq: int,
               out: Output) -> None:
        text = f"{err.code}: {err.message}"[:300]
        code = self._code(rid)
        asked = (self.requests.pending.pop(rid, None)
                 if code in (M_SUBSCRIBE, M_UNSUBSCRIBE) and type(rid) is int else None)
        if code == M_SUBSCRIBE and asked:
            for channel in asked:
                route = self._routes.get(channel)
                self.refused(out, route[1] if route else None, ts_recv_ns, recv_seq,
                             f"{channel}: {text}")
            return
        what = METHODS.get(code, "request")
        self.venue_error(out, ts_recv_ns, recv_seq, f"{what} id={rid}: {text}"[:500])

    # ---- trades and liquidations -------------------------------------------------------------
    def _trades(self, sym: str, data: list[_Trade], ts_recv_ns: int, recv_seq: int,
                out: Output) -> None:
        # The whole frame is checked before any sequence is recorded.
        checked = []
        for t in data:
            if t.instrument_name != sym:
                raise BadFrame(f"trade of {t.instrument_name!r} on {sym!r}'s channel"[:120])
            text, _ = trade_id(t.trade_id)
            px, qty = t.price, t.amount
            if not (0.0 < px < _INF and 0.0 <= qty < _INF):
                price(px)
                amount(qty)
            checked.append((t.trade_seq, text, t.timestamp * 1_000_000,
                            _SIDES.get(t.direction, UNKNOWN), px, qty, t.liquidation))
        ids = self.trade_seqs
        want_trades, want_liq = self._want_trades, self._want_liquidations
        for seq, text, ts_event, side, px, qty, liq in checked:
            if not admit_trade(self, out, ids, sym, seq, ts_recv_ns, recv_seq):
                continue
            if want_trades:
                out.trades_block().add(sym, ts_event, ts_recv_ns, recv_seq, text, side, px,
                                       qty)
            if liq is not None and want_liq:
                self._liquidation(sym, liq, side, ts_event, px, qty, ts_recv_ns, recv_seq, out)

    @staticmethod
    def _liquidation(sym: str, flag: str, taker: str, ts_event: int, px: float, qty: float,
                     ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        """The liquidation order(s) of a flagged trade: "T" the taker's (its direction),
        "M" the maker's (the opposite), "MT" both."""
        maker = _OPPOSITE.get(taker)
        if maker is None or flag not in ("T", "M", "MT"):
            out.drop(DROP_UNREADABLE_LIQUIDATION)
            return
        block = out.liquidations_block()
        if "T" in flag:
            block.add(sym, ts_event, ts_recv_ns, recv_seq, taker, px, qty, None)
        if "M" in flag:
            block.add(sym, ts_event, ts_recv_ns, recv_seq, maker, px, qty, None)

    # ---- ticker: quotes and derivatives ------------------------------------------------------
    def _ticker(self, sym: str, d: _Ticker, ts_recv_ns: int, recv_seq: int,
                out: Output) -> None:
        if d.instrument_name != sym:
            raise BadFrame(f"ticker of {d.instrument_name!r} on {sym!r}'s channel"[:120])
        ts_event = ms_to_ns(d.timestamp)
        bid = quote_side(d.best_bid_price, d.best_bid_amount)
        ask = quote_side(d.best_ask_price, d.best_ask_amount)
        mark = _non_negative(d.mark_price, "mark_price")
        index = _non_negative(d.index_price, "index_price")
        oi = _non_negative(d.open_interest, "open_interest")
        funding = _finite(d.current_funding, "current_funding")
        if self._want_quotes:
            quote = (bid[0], bid[1], ask[0], ask[1])
            last = self.quotes.last
            if last.get(sym) != quote:
                out.quotes_block().add(sym, ts_event, ts_recv_ns, recv_seq, *quote)
                last[sym] = quote
        if self._want_derivs:
            self.derivs.update(out, sym, ts_event, ts_recv_ns, recv_seq, mark_price=mark,
                               index_price=index, funding_rate=funding, open_interest=oi)

    # ---- book --------------------------------------------------------------------------------
    def _book(self, sym: str, d: _BookData, nbytes: int, ts_recv_ns: int, recv_seq: int,
              out: Output) -> None:
        if d.instrument_name != sym:
            raise BadFrame(f"book of {d.instrument_name!r} on {sym!r}'s channel"[:120])
        kind = d.type
        if kind != "snapshot" and kind != "change":
            raise BadFrame(f"unknown book message type {kind!r}"[:80])
        bids, asks = _levels(d.bids), _levels(d.asks)
        ts_event = ms_to_ns(d.timestamp)
        cid = d.change_id
        if kind == "snapshot":
            self.books.snapshot(sym, out, ts_event_ns=ts_event, ts_recv_ns=ts_recv_ns,
                                recv_seq=recv_seq, bids=[lv for lv in bids if lv[1]],
                                asks=[lv for lv in asks if lv[1]], snapshot_id=cid,
                                update_id=cid, detail=f"snapshot change_id={cid}")
            return
        prev = d.prev_change_id
        if prev is None:
            raise BadFrame("book change without prev_change_id")
        self.books.diff(sym, Diff(cid, cid, prev, cid, ts_event, ts_recv_ns, bids, asks,
                                  nbytes), out, recv_seq)


__all__ = ["HEARTBEAT_INTERVAL_S", "INTERVALS", "Deribit", "DeribitRules"]
