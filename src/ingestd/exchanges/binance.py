"""Binance spot (`binance`) and USD-M futures (`binance-usdm`) codecs.

Owns: Binance's combined-stream URL, the decoding of `@trade` / `@aggTrade`,
`@bookTicker` and `@depth@100ms` frames, and the documented local order book procedure:

1. diffs are buffered from the moment the stream opens; the first diff for a symbol asks
   for a REST snapshot (`/api/v3/depth` spot, `/fapi/v1/depth` USD-M);
2. a snapshot older than the first buffered diff (`lastUpdateId < U`) is fetched again;
3. buffered diffs with `u <= lastUpdateId` (USD-M: `u < lastUpdateId`) are dropped, the
   first applied diff must straddle the snapshot (spot `U <= lastUpdateId+1 <= u`, USD-M
   `U <= lastUpdateId <= u`), and every later diff must continue the previous one
   (spot `U == previous u + 1`, USD-M `pu == previous u`);
4. on a break a `gap` event is written, the symbol goes back to step 1, and the new
   snapshot block is followed by a `resync` event.

Trades: `trade_stream = "trade"` (default: every fill, `trade_id` = `t`) or `"aggTrade"`
(fills of one taker order at one price, `trade_id` = `a`). `m` (buyer is maker) true means
the taker sold. Trade ids go through the shared exact de-duplication (exchanges/trades.py):
a replayed id is dropped (counted), a jump is a `gap` event, a never-seen lower id is
stored with an `out_of_order` event.

Frames are decoded with typed msgspec structs: one decode of the combined-stream envelope
with the payload as a union tagged by `e` (spot `@bookTicker` has no `e`: its own
envelope); anything else (acks, errors, raw payloads without the envelope) takes the
generic path, which converts the payload into the same structs.

USD-M open interest has no stream: the codec declares one `GET /fapi/v1/openInterest`
per symbol as a periodic poll (`poll_requests`, run by feed/polls.py every
`poll_interval_s`, default 10 s); each answer merges `openInterest` into the symbol's
latest derivatives values (ts_event = the answer's `time`); a failed answer is a
`poll_failed` event, a garbage body is also kept raw.

Must not: do I/O, read a clock or log (see exchanges/base.py).
"""

from __future__ import annotations

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
    RestRequest,
    amount,
    parse_levels,
    price,
    quote_side,
    reject_reason,
)
from ingestd.exchanges.book import BookSync, Diff, RangeRules, RestSnapshot
from ingestd.exchanges.derivs import LatestValues
from ingestd.exchanges.trades import NEW, TradeIds, report_trade
from ingestd.schema import BUY, EV_POLL_FAILED, SELL

MAX_STREAMS_PER_CONNECTION = 1024
_INF = float("inf")
_MAX_MS: Final = (2**63 - 1) // 1_000_000

Ms = Annotated[int, msgspec.Meta(ge=0, le=_MAX_MS)]
Id = Annotated[int, msgspec.Meta(ge=0)]
Price = list[tuple[str, str]]


# ---- wire structs ------------------------------------------------------------------------
class _Trade(msgspec.Struct, tag_field="e", tag="trade", gc=False):
    s: str
    t: Id
    p: str
    q: str
    T: Ms
    m: bool


class _AggTrade(msgspec.Struct, tag_field="e", tag="aggTrade", gc=False):
    s: str
    a: Id
    p: str
    q: str
    T: Ms
    m: bool


class _Depth(msgspec.Struct, tag_field="e", tag="depthUpdate", gc=False):
    s: str
    U: Id
    u: Id
    b: Price
    a: Price
    E: Ms | None = None
    T: Ms | None = None
    pu: int = -1


class _BookTicker(msgspec.Struct, gc=False):
    """Spot `@bookTicker`: no event type, no time."""

    s: str
    b: str
    B: str
    a: str
    A: str
    u: Id | None = None
    T: Ms | None = None
    E: Ms | None = None


class _BookTickerUsdm(_BookTicker, tag_field="e", tag="bookTicker"):
    """USD-M `@bookTicker`: the same fields, tagged by `e`, with times."""


class _ServerShutdown(msgspec.Struct, tag_field="e", tag="serverShutdown", gc=False):
    E: Ms


class _MarkPrice(msgspec.Struct, tag_field="e", tag="markPriceUpdate", gc=False):
    """USD-M `@markPrice@1s`: mark `p`, index `i`, funding `r` paid at `T`."""

    s: str
    E: Ms
    p: str
    i: str
    r: str
    T: Ms


class _LiquidationOrder(msgspec.Struct, gc=False):
    s: str
    S: str
    p: str
    z: str
    T: Ms


class _ForceOrder(msgspec.Struct, tag_field="e", tag="forceOrder", gc=False):
    """USD-M `@forceOrder`: the liquidation order `o` (side `S`, price `p`, filled `z`)."""

    E: Ms
    o: _LiquidationOrder


_Payload = (_Trade | _AggTrade | _Depth | _BookTickerUsdm | _ServerShutdown | _MarkPrice
            | _ForceOrder)


class _Envelope(msgspec.Struct, gc=False):
    stream: str
    data: _Payload


class _TickerEnvelope(msgspec.Struct, gc=False):
    stream: str
    data: _BookTicker


class _OpenInterest(msgspec.Struct, gc=False):
    """The body of `GET /fapi/v1/openInterest?symbol=...`."""

    symbol: str
    openInterest: str
    time: Ms


_ENVELOPE = msgspec.json.Decoder(_Envelope)
_OPEN_INTEREST = msgspec.json.Decoder(_OpenInterest)
_TICKER_ENVELOPE = msgspec.json.Decoder(_TickerEnvelope)
_KINDS: Final[dict[str, type[msgspec.Struct]]] = {
    "trade": _Trade, "aggTrade": _AggTrade, "depthUpdate": _Depth,
    "bookTicker": _BookTickerUsdm, "serverShutdown": _ServerShutdown,
    "markPriceUpdate": _MarkPrice, "forceOrder": _ForceOrder}
_LIQUIDATION_SIDES: Final = {"BUY": BUY, "SELL": SELL}


# ---- continuity rules ----------------------------------------------------------------------
class SpotRules(RangeRules):
    """Spot: drop diffs with u <= lastUpdateId; the first applied diff has
    U <= lastUpdateId + 1 <= u; then U == previous u + 1 (the shared RangeRules)."""

    FIRST = "U"
    LAST = "u"


class UsdmRules:
    """USD-M: drop diffs with u < lastUpdateId; the first applied diff has
    U <= lastUpdateId <= u; then pu == previous u."""

    @staticmethod
    def stale(diff: Diff, last_id: int, just_synced: bool) -> bool:
        return diff.last_id < last_id or (diff.last_id == last_id and not just_synced)

    @staticmethod
    def bridges(diff: Diff, snapshot_id: int) -> bool:
        return diff.first_id <= snapshot_id <= diff.last_id

    @staticmethod
    def continues(diff: Diff, last_id: int) -> bool:
        return diff.prev_id == last_id

    @staticmethod
    def too_old(snapshot_id: int, first_buffered: Diff) -> bool:
        return snapshot_id < first_buffered.first_id

    @staticmethod
    def gap_detail(symbol: str, diff: Diff, last_id: int) -> str:
        return f"expected pu={last_id}, got pu={diff.prev_id} u={diff.last_id}"


class _QuoteIds:
    """The last bookTicker update id per symbol (quotes older than it are replays)."""

    def __init__(self) -> None:
        self.last: dict[str, int] = {}

    def state(self) -> dict[str, int]:
        return dict(self.last)

    def restore(self, state: Any) -> None:
        self.last = {str(k): int(v) for k, v in dict(state).items()}


class _LastTimes:
    """The `time` of the last open interest answer used, per symbol (an answer no newer
    is the same value again: dropped)."""

    def __init__(self) -> None:
        self.last: dict[str, int] = {}

    def state(self) -> dict[str, int]:
        return dict(self.last)

    def restore(self, state: Any) -> None:
        self.last = {str(k): int(v) for k, v in dict(state).items()}


# Open interest polls: `RestRequest.key` prefix, and Binance's request weight budget.
OPEN_INTEREST_KEY: Final = "openInterest:"
OPEN_INTEREST_PATH: Final = "/fapi/v1/openInterest"
OPEN_INTEREST_WEIGHT: Final = 1
# "2400 request weight per minute per IP", shared with depth snapshots (weight 2-20 each)
# and every other feed of the IP: one feed's polls may use at most this share.
REQUEST_WEIGHT_PER_MIN: Final = 2400
POLL_WEIGHT_SHARE: Final = 0.5
DROP_STALE_OPEN_INTEREST: Final = "stale_open_interest"


class BinanceSpot(Codec):
    exchange: ClassVar[str] = "binance"
    default_ws_url: ClassVar[str] = "wss://stream.binance.com:9443/stream"
    default_rest_url: ClassVar[str | None] = "https://api.binance.com"
    depth_path: ClassVar[str] = "/api/v3/depth"
    default_depth_limit: ClassVar[int] = 1000
    max_depth_limit: ClassVar[int] = 5000
    rules: ClassVar[type[SpotRules] | type[UsdmRules]] = SpotRules
    # Binance pings every 20 s and expects pongs (the transport answers them); our own
    # pings detect a dead TCP path sooner than the venue's 1-minute pong timeout.
    ws_ping_interval_s: ClassVar[float | None] = 20.0
    default_stale_after_s: ClassVar[float] = 30.0
    # Binance closes connections at 24 h: rotate (make-before-break) after 23 h.
    default_rotate_after_s: ClassVar[float | None] = 82_800.0
    # "300 connections per attempt every 5 minutes per IP".
    connect_limit: ClassVar[tuple[int, float]] = (300, 300.0)
    trade_streams: ClassVar[tuple[str, ...]] = ("trade", "aggTrade")
    symbol_pattern: ClassVar[re.Pattern[str] | None] = re.compile(r"[A-Z0-9]+")
    symbol_spelling: ClassVar[str] = "Binance-native (e.g. 'BTCUSDT')"

    def __init__(self, feed: FeedConfig) -> None:
        super().__init__(feed)
        self.trade_stream = feed.trade_stream or "trade"
        self.depth_limit = feed.book_depth or self.default_depth_limit
        self.trade_ids = self.stateful("trades", TradeIds(consecutive=True))
        self.quote_ids = self.stateful("quotes", _QuoteIds())
        self.books: BookSync = self.stateful("books", BookSync(
            self, self.rules(), snapshot_request=self._snapshot_url))
        self._want_book = "book" in self.channels
        self._want_trades = "trades" in self.channels

    # ---- config --------------------------------------------------------------------------
    @classmethod
    def book_depth_problem(cls, depth: int) -> str | None:
        if 5 <= depth <= cls.max_depth_limit:
            return None
        return f"REST snapshot limit must be 5..{cls.max_depth_limit}"

    @classmethod
    def check_feed(cls, feed: FeedConfig) -> list[str]:
        problems = super().check_feed(feed)
        if len(feed.symbols) * len(feed.channels) > MAX_STREAMS_PER_CONNECTION:
            problems.append(f"symbols: {len(feed.symbols) * len(feed.channels)} streams exceed "
                            f"Binance's {MAX_STREAMS_PER_CONNECTION} per connection")
        return problems

    # ---- connection ------------------------------------------------------------------------
    def streams(self) -> list[str]:
        names = []
        for sym in self.feed.symbols:
            low = sym.lower()
            if "trades" in self.channels:
                names.append(f"{low}@{self.trade_stream}")
            if "quotes" in self.channels:
                names.append(f"{low}@bookTicker")
            if "book" in self.channels:
                names.append(f"{low}@depth@100ms")
        return names

    def ws_url(self) -> str:
        base = super().ws_url()
        return f"{base}?streams={'/'.join(self.streams())}"

    def on_connect(self) -> None:
        # A new connection: every book must be rebuilt from a fresh snapshot.
        self.books.reset()

    def on_rotate(self) -> None:
        # Same streams, same ids on the new connection: keep books, trade and quote ids;
        # the overlap is dropped as duplicates / already-applied diffs.
        pass

    def subscribe_messages(self) -> Sequence[str]:
        return ()  # the combined-stream URL carries the subscription

    def _snapshot_url(self, symbol: str) -> str:
        return self.rest_url(f"{self.depth_path}?symbol={symbol}&limit={self.depth_limit}")

    # ---- frames ----------------------------------------------------------------------------
    def parse_frame(self, frame: bytes | str, ts_recv_ns: int, recv_seq: int,
                    out: Output) -> None:
        if isinstance(frame, str):
            frame = frame.encode()
        try:
            if frame.find(b"@bookTicker", 0, 48) != -1:
                self._quote(_TICKER_ENVELOPE.decode(frame).data, ts_recv_ns, recv_seq, out)
                return
            data: Any = _ENVELOPE.decode(frame).data
        except (msgspec.ValidationError, msgspec.DecodeError):
            data = self._generic(frame, ts_recv_ns, recv_seq, out)
            if data is None:
                return
        cls = type(data)
        if cls is _Trade:
            self._trade(data.s, data.t, data.m, data.p, data.q, data.T, ts_recv_ns,
                        recv_seq, out)
        elif cls is _AggTrade:
            self._trade(data.s, data.a, data.m, data.p, data.q, data.T, ts_recv_ns,
                        recv_seq, out)
        elif cls is _Depth:
            self._diff(data, len(frame), ts_recv_ns, recv_seq, out)
        elif cls is _BookTickerUsdm or cls is _BookTicker:
            self._quote(data, ts_recv_ns, recv_seq, out)
        elif cls is _ServerShutdown:
            self.ev(out, "server_shutdown", ts_recv_ns, recv_seq, None,
                    "venue announced shutdown", data.E * 1_000_000)
            out.reconnect = "serverShutdown"
        elif cls is _MarkPrice:
            self._mark_price(data, ts_recv_ns, recv_seq, out)
        elif cls is _ForceOrder:
            self._force_order(data, ts_recv_ns, recv_seq, out)
        elif cls is list:  # `!markPrice@arr`: every symbol's update in one frame
            for item in data:
                if not isinstance(item, _MarkPrice):
                    raise BadFrame("array stream item is not a markPriceUpdate")
                self._mark_price(item, ts_recv_ns, recv_seq, out)

    def _mark_price(self, d: _MarkPrice, ts_recv_ns: int, recv_seq: int,
                    out: Output) -> None:
        """Overridden by USD-M (spot has no mark price stream)."""
        out.unknown += 1

    def _force_order(self, d: _ForceOrder, ts_recv_ns: int, recv_seq: int,
                     out: Output) -> None:
        """Overridden by USD-M (spot has no liquidation stream)."""
        out.unknown += 1

    def _generic(self, frame: bytes | str, ts_recv_ns: int, recv_seq: int,
                 out: Output) -> msgspec.Struct | list[Any] | None:
        """Frames off the fast path: payloads without the envelope, acks, errors, unknown
        kinds, and bad frames (which raise here with a precise reason)."""
        msg = orjson.loads(frame)
        if not isinstance(msg, dict):
            raise BadFrame("not a JSON object")
        data = msg.get("data", msg)
        if isinstance(data, list):  # `!markPrice@arr`
            return msgspec.convert(data, list[_MarkPrice])
        if not isinstance(data, dict):
            raise BadFrame("data is not an object")
        kind = data.get("e")
        if isinstance(kind, str) and kind in _KINDS:
            return msgspec.convert(data, _KINDS[kind])
        if kind is None and "b" in data and "A" in data:
            return msgspec.convert(data, _BookTicker)
        if "result" in msg and "id" in msg:
            return None  # ack of a SUBSCRIBE / property request
        if "code" in msg and "msg" in msg:
            self.venue_error(out, ts_recv_ns, recv_seq, f"{msg['code']}: {msg['msg']}")
            return None
        out.unknown += 1
        return None

    def _trade(self, sym: str, tid: int, buyer_is_maker: bool, p: str, q: str, t_ms: int,
               ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        if sym not in self.symbols or not self._want_trades:
            out.drop(DROP_UNSUBSCRIBED)
            return
        px, qty = float(p), float(q)
        if not (0.0 < px < _INF and 0.0 <= qty < _INF):
            price(px)
            amount(qty)
        # The next id is the common case; everything else gets the shared event or drop.
        verdict = self.trade_ids.admit(sym, tid)
        if verdict != NEW and not report_trade(self, out, self.trade_ids, verdict, sym, tid,
                                               ts_recv_ns, recv_seq):
            return
        out.trades_block().add(sym, t_ms * 1_000_000, ts_recv_ns, recv_seq, str(tid),
                               SELL if buyer_is_maker else BUY, px, qty)

    def _quote(self, d: _BookTicker, ts_recv_ns: int, recv_seq: int,
               out: Output) -> None:
        sym = d.s
        if sym not in self.symbols:
            out.drop(DROP_UNSUBSCRIBED)
            return
        uid = d.u
        last_ids = self.quote_ids.last
        if uid is not None:
            last = last_ids.get(sym)
            if last is not None and uid <= last:
                out.drop("duplicate_quote")
                return
        ts = d.T or d.E
        bid = quote_side(d.b, d.B)  # Binance sends zeros for an empty side
        ask = quote_side(d.a, d.A)
        out.quotes_block().add(sym, ts * 1_000_000 if ts is not None else None, ts_recv_ns,
                               recv_seq, bid[0], bid[1], ask[0], ask[1])
        if uid is not None:
            last_ids[sym] = uid

    # ---- order book ------------------------------------------------------------------------
    def _event_time(self, d: _Depth) -> int | None:
        return d.E * 1_000_000 if d.E is not None else None

    def _diff(self, d: _Depth, nbytes: int, ts_recv_ns: int, recv_seq: int,
              out: Output) -> None:
        sym = d.s
        if sym not in self.symbols or not self._want_book:
            out.drop(DROP_UNSUBSCRIBED)
            return
        diff = Diff(d.U, d.u, d.pu, d.u, self._event_time(d), ts_recv_ns, parse_levels(d.b),
                    parse_levels(d.a), nbytes)
        self.books.diff(sym, diff, out, recv_seq)

    def _snapshot_time(self, body: dict[str, Any]) -> int | None:
        return None  # spot REST depth has no timestamp

    def on_rest(self, request: RestRequest, status: int, body: bytes,
                ts_recv_ns: int, recv_seq: int) -> Output:
        return self.books.rest_answer(request, status, body, ts_recv_ns, recv_seq,
                                      self._parse_snapshot)

    def _parse_snapshot(self, body: bytes) -> RestSnapshot:
        snap = orjson.loads(body)
        last_id = int(snap["lastUpdateId"])
        return RestSnapshot(parse_levels(snap["bids"]), parse_levels(snap["asks"]), last_id,
                            last_id, self._snapshot_time(snap),
                            f"snapshot lastUpdateId={last_id}")


class BinanceUsdm(BinanceSpot):
    """USD-M futures: `pu` continuity, `/fapi/v1/depth`, transaction time `T` on everything;
    `<sym>@markPrice@1s` -> derivatives (mark `p`, index `i`, funding `r` paid at `T`,
    event time `E`) and `<sym>@forceOrder` -> liquidations (side `o.S`, the order's side;
    price `o.p`, not the average `o.ap`; amount `o.z`, the filled quantity; time `o.T`).
    The all-market `!markPrice@arr` / `!forceOrder@arr` are decoded too; rows of symbols
    not subscribed are dropped. Open interest comes from polling REST
    `/fapi/v1/openInterest` (Binance has no stream for it; see the module docstring)."""

    exchange: ClassVar[str] = "binance-usdm"
    default_ws_url: ClassVar[str] = "wss://fstream.binance.com/stream"
    default_rest_url: ClassVar[str | None] = "https://fapi.binance.com"
    depth_path: ClassVar[str] = "/fapi/v1/depth"
    max_depth_limit: ClassVar[int] = 1000
    rules: ClassVar[type[SpotRules] | type[UsdmRules]] = UsdmRules
    CHANNELS: ClassVar[tuple[str, ...]] = ("trades", "quotes", "book", "derivatives",
                                           "liquidations")
    default_poll_interval_s: ClassVar[float | None] = 10.0
    # Perpetuals (BTCUSDT) and delivery contracts (BTCUSDT_220624).
    symbol_pattern: ClassVar[re.Pattern[str] | None] = re.compile(r"[A-Z0-9]+(?:_[0-9]{6})?")
    symbol_spelling: ClassVar[str] = "Binance-native (e.g. 'BTCUSDT', 'BTCUSDT_220624')"

    def __init__(self, feed: FeedConfig) -> None:
        super().__init__(feed)
        self.derivs: LatestValues = self.stateful("derivatives", LatestValues())
        self.oi_times = self.stateful("open_interest", _LastTimes())
        self._want_derivs = "derivatives" in self.channels
        self._want_liquidations = "liquidations" in self.channels

    @classmethod
    def check_feed(cls, feed: FeedConfig) -> list[str]:
        problems = super().check_feed(feed)
        if feed.poll_interval_s is not None and "derivatives" not in feed.channels:
            problems.append("poll_interval_s: only used with the derivatives channel "
                            "(open interest)")
        if "derivatives" in feed.channels:
            interval_s = feed.poll_interval_s or cls.default_poll_interval_s or 1.0
            per_min = len(feed.symbols) * OPEN_INTEREST_WEIGHT * 60.0 / interval_s
            budget = REQUEST_WEIGHT_PER_MIN * POLL_WEIGHT_SHARE
            if per_min > budget:
                floor_s = len(feed.symbols) * OPEN_INTEREST_WEIGHT * 60.0 / budget
                problems.append(
                    f"poll_interval_s: open interest of {len(feed.symbols)} symbols every "
                    f"{interval_s:g} s is {per_min:g} request weight/min, above the "
                    f"{budget:g} one feed may use (Binance allows {REQUEST_WEIGHT_PER_MIN} "
                    f"per IP, shared with depth snapshots): use at least {floor_s:g} s")
        return problems

    def poll_requests(self) -> Sequence[RestRequest]:
        """One open interest GET per symbol, when the feed records derivatives."""
        if not self._want_derivs:
            return ()
        return [RestRequest(OPEN_INTEREST_KEY + sym,
                            self.rest_url(f"{OPEN_INTEREST_PATH}?symbol={sym}"))
                for sym in self.feed.symbols]

    def on_rest(self, request: RestRequest, status: int, body: bytes,
                ts_recv_ns: int, recv_seq: int) -> Output:
        if request.key.startswith(OPEN_INTEREST_KEY):
            return self._open_interest(request.key[len(OPEN_INTEREST_KEY):], status, body,
                                       ts_recv_ns, recv_seq)
        return super().on_rest(request, status, body, ts_recv_ns, recv_seq)

    def _open_interest(self, symbol: str, status: int, body: bytes, ts_recv_ns: int,
                       recv_seq: int) -> Output:
        """An open interest answer: a derivatives row with every latest value; a failed
        answer is a `poll_failed` event (a garbage body is also rejected: kept raw)."""
        out = self.new_output()
        if status != 200:
            text = body[:200].decode("utf-8", "replace")
            self.ev(out, EV_POLL_FAILED, ts_recv_ns, recv_seq, symbol,
                    f"openInterest HTTP {status}: {text}" if status
                    else f"openInterest no answer: {text}")
            return out
        try:
            d = _OPEN_INTEREST.decode(body)
            if d.symbol != symbol:
                raise BadFrame(f"answer for {d.symbol!r}, asked for {symbol!r}"[:120])
            value = amount(d.openInterest)
        except Exception as e:  # the decode policy: a bad answer is kept raw, with an event
            reason = reject_reason(e)
            out.reject(0, reason)
            self.ev(out, EV_POLL_FAILED, ts_recv_ns, recv_seq, symbol,
                    f"openInterest bad answer: {reason}"[:200])
            return out
        if symbol not in self.symbols or not self._want_derivs:
            out.drop(DROP_UNSUBSCRIBED)
            return out
        ts_event_ns = d.time * 1_000_000
        last = self.oi_times.last.get(symbol)
        if last is not None and ts_event_ns <= last:
            out.drop(DROP_STALE_OPEN_INTEREST)
            return out
        self.oi_times.last[symbol] = ts_event_ns
        self.derivs.update(out, symbol, ts_event_ns, ts_recv_ns, recv_seq,
                           open_interest=value)
        return out

    def streams(self) -> list[str]:
        names = super().streams()
        for sym in self.feed.symbols:
            low = sym.lower()
            if self._want_derivs:
                names.append(f"{low}@markPrice@1s")
            if self._want_liquidations:
                names.append(f"{low}@forceOrder")
        return names

    def _mark_price(self, d: _MarkPrice, ts_recv_ns: int, recv_seq: int,
                    out: Output) -> None:
        sym = d.s
        if sym not in self.symbols or not self._want_derivs:
            out.drop(DROP_UNSUBSCRIBED)
            return
        mark, index, funding = price(d.p), price(d.i), float(d.r)
        if not -_INF < funding < _INF:
            raise BadFrame("funding rate is not finite")
        self.derivs.update(out, sym, d.E * 1_000_000, ts_recv_ns, recv_seq,
                           mark_price=mark, index_price=index, funding_rate=funding,
                           next_funding_time=d.T * 1_000_000)

    def _force_order(self, d: _ForceOrder, ts_recv_ns: int, recv_seq: int,
                     out: Output) -> None:
        o = d.o
        sym = o.s
        if sym not in self.symbols or not self._want_liquidations:
            out.drop(DROP_UNSUBSCRIBED)
            return
        side = _LIQUIDATION_SIDES.get(o.S)
        if side is None:
            raise BadFrame(f"liquidation side {o.S!r}"[:80])
        out.liquidations_block().add(sym, o.T * 1_000_000, ts_recv_ns, recv_seq, side,
                                     price(o.p), amount(o.z), None)

    def _event_time(self, d: _Depth) -> int | None:
        ts = d.T or d.E
        return ts * 1_000_000 if ts is not None else None

    def _snapshot_time(self, body: dict[str, Any]) -> int | None:
        ts = body.get("T") or body.get("E")
        return int(ts) * 1_000_000 if ts is not None else None
