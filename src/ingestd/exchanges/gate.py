"""Gate.io spot WebSocket v4 codec (`gate`).

Owns Gate's wire format and rules: the endpoint `wss://api.gateio.ws/ws/v4/`, subscribe
messages `{"time":N,"channel":"spot.trades","event":"subscribe","payload":[pairs]}`
(codecs have no clock: `time` is 0, which Gate accepts - it is informational), the
application ping `{"time":0,"channel":"spot.ping"}` every 10 s (answered by `spot.pong`),
and the decoding of:

- `spot.trades` -> trades. `id` (a venue-wide counter: ids jump between pairs, so
  `TradeIds(consecutive=False)`), `create_time_ms` (decimal ms text, exact to ns),
  `side` = the taker's side (Gate docs). Checked against the book rebuilt from the same
  recording (REST snapshot + `U`/`u` diffs, 2021-04-22, 9 trades): 4 agree (1 buy at the
  best ask, 3 sells at the best bid), 1 disagrees (a NEO_BTC "sell" at 0.0018753 while
  the rebuilt best ask was 0.0018735: the book moved in the same 100 ms), 4 printed
  inside the spread (hidden liquidity or book timing). Stored as sent; other values are
  `unknown`.
- `spot.book_ticker` -> quotes (`t` ms, `b`/`B`, `a`/`A`).
- `spot.order_book_update` (100ms) -> book, synced with the REST snapshot
  `GET /api/v4/spot/order_book?currency_pair=X&limit=100&with_id=true` (answer `id`) on
  the shared `BookSync` with `GateRules` (RangeRules): buffer updates; drop those with
  `u < id + 1`; the first applied has `U <= id + 1 <= u`; every later one
  `U == previous u + 1`. A break is a `gap` event, a new snapshot, then `resync`.
  Checked on the recording: 0 breaks over 172 frames, 8 of 10 snapshots bridged.
  The `full` flag of current docs (a full snapshot on the channel) is absent from the
  recording and not handled (a `full` update is treated as a diff and still checked by
  `U`/`u`).

Control frames: subscribe acks (`result.status == "success"`) -> `subscribed`; an `error`
object -> `refused` (subscribe) or a venue `error`; `spot.pong` is silent.

Must not: do I/O, read a clock or log; catch decode errors; change state before a frame
is known to be well-formed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, ClassVar, Final

import msgspec
import orjson

from ingestd.config import FeedConfig
from ingestd.exchanges.base import (
    DROP_UNSUBSCRIBED,
    BadFrame,
    Codec,
    Output,
    RestRequest,
    ms_to_ns,
    parse_levels,
    quote_side,
)
from ingestd.exchanges.book import BookSync, Diff, RangeRules, RestSnapshot
from ingestd.exchanges.trades import TradeIds, admit_trade
from ingestd.schema import BUY, SELL, UNKNOWN

CH_TRADES: Final = "spot.trades"
CH_QUOTES: Final = "spot.book_ticker"
CH_BOOK: Final = "spot.order_book_update"
_SIDES: Final = {"buy": BUY, "sell": SELL}
_MAX_I64: Final = 2**63 - 1
Id = Annotated[int, msgspec.Meta(ge=0, le=_MAX_I64)]
Levels = list[tuple[str, str]]
_MS = re.compile(r"(\d{1,15})(?:\.(\d{1,6})\d*)?")


class _Error(msgspec.Struct, gc=False):
    code: int | None = None
    message: str | None = None


class _Envelope(msgspec.Struct, gc=False):
    channel: str
    event: str = ""
    time: int | None = None
    result: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)
    error: _Error | None = None


class _Trade(msgspec.Struct, gc=False):
    id: Id
    create_time_ms: str
    side: str
    currency_pair: str
    amount: str
    price: str


class _Ticker(msgspec.Struct, gc=False):
    t: Id
    s: str
    b: str
    B: str
    a: str
    A: str


class _Update(msgspec.Struct, gc=False):
    t: Id
    s: str
    U: Id
    u: Id
    b: Levels = msgspec.field(default_factory=list)
    a: Levels = msgspec.field(default_factory=list)


class _Rest(msgspec.Struct, gc=False):
    id: Id
    bids: Levels
    asks: Levels


_ENVELOPE = msgspec.json.Decoder(_Envelope)
_TRADE = msgspec.json.Decoder(_Trade)
_TICKER = msgspec.json.Decoder(_Ticker)
_UPDATE = msgspec.json.Decoder(_Update)
_REST = msgspec.json.Decoder(_Rest)
_STATUS = msgspec.json.Decoder(dict[str, str] | None)


def ms_decimal_to_ns(text: str) -> int:
    """`create_time_ms` ("1619093543708.2642": decimal ms) -> ns, exactly (to the ns)."""
    m = _MS.fullmatch(text)
    if m is None:
        raise BadFrame(f"bad create_time_ms: {text!r}"[:80])
    return ms_to_ns(m.group(1)) + int((m.group(2) or "").ljust(6, "0"))


class GateRules(RangeRules):
    """Gate `U`/`u`: contained if `u <= last`; bridge `U <= id+1 <= u`; then
    `U == last + 1`."""

    FIRST = "U"
    LAST = "u"
    CONTIGUOUS = True


class Gate(Codec):
    exchange: ClassVar[str] = "gate"
    default_ws_url: ClassVar[str] = "wss://api.gateio.ws/ws/v4/"
    default_rest_url: ClassVar[str | None] = "https://api.gateio.ws"
    keepalive_interval_s: ClassVar[float | None] = 10.0
    ws_ping_interval_s: ClassVar[float | None] = None
    default_stale_after_s: ClassVar[float] = 30.0
    # Gate documents no WebSocket connect limit; its public REST limit is 200 requests
    # per 10 s per endpoint. Connections are kept well below.
    connect_limit: ClassVar[tuple[int, float]] = (5, 1.0)
    CHANNELS: ClassVar[tuple[str, ...]] = ("trades", "quotes", "book")
    symbol_pattern: ClassVar[re.Pattern[str] | None] = re.compile(r"[A-Z0-9]+_[A-Z0-9]+")
    symbol_spelling: ClassVar[str] = "a Gate pair (uppercase BASE_QUOTE, e.g. 'BTC_USDT')"

    def __init__(self, feed: FeedConfig) -> None:
        super().__init__(feed)
        self._want = {CH_TRADES: "trades" in self.channels,
                      CH_QUOTES: "quotes" in self.channels,
                      CH_BOOK: "book" in self.channels}
        self.trade_ids: TradeIds = self.stateful("trades", TradeIds(consecutive=False))
        self.books: BookSync = self.stateful("books", BookSync(
            self, GateRules(), snapshot_request=self._snapshot_url))

    def subscribe_messages(self) -> Sequence[str]:
        pairs = list(self.feed.symbols)
        msgs = []
        if self._want[CH_BOOK]:
            msgs += [_sub(CH_BOOK, [p, "100ms"]) for p in pairs]
        if self._want[CH_TRADES]:
            msgs.append(_sub(CH_TRADES, pairs))
        if self._want[CH_QUOTES]:
            msgs.append(_sub(CH_QUOTES, pairs))
        return msgs

    def keepalive_message(self) -> str | None:
        return '{"time":0,"channel":"spot.ping"}'

    def on_connect(self) -> None:
        self.books.reset()

    def _snapshot_url(self, symbol: str) -> str:
        return self.rest_url(f"/api/v4/spot/order_book?currency_pair={symbol}"
                             "&limit=100&with_id=true")

    def parse_frame(self, frame: bytes | str, ts_recv_ns: int, recv_seq: int,
                    out: Output) -> None:
        env = _ENVELOPE.decode(frame)
        ch, event = env.channel, env.event
        if event == "update" and ch in self._want:
            if not self._want[ch]:
                out.drop(DROP_UNSUBSCRIBED)
            elif ch == CH_TRADES:
                self._trade(env.result, ts_recv_ns, recv_seq, out)
            elif ch == CH_QUOTES:
                self._quote(env.result, ts_recv_ns, recv_seq, out)
            else:
                self._diff(env.result, len(frame), ts_recv_ns, recv_seq, out)
            return
        if ch == "spot.pong":
            return
        if env.error is not None:
            detail = f"{ch} {event}: {env.error.code}: {env.error.message}"[:500]
            if event == "subscribe":
                self.refused(out, None, ts_recv_ns, recv_seq, detail)
            else:
                self.venue_error(out, ts_recv_ns, recv_seq, detail)
            return
        if event == "subscribe":
            status = _STATUS.decode(env.result) if env.result else None
            if status is not None and status.get("status") == "success":
                self.subscribed(out, None, ts_recv_ns, recv_seq, ch)
                return
        out.unknown += 1

    def _trade(self, raw: msgspec.Raw, ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        t = _TRADE.decode(raw)
        sym = t.currency_pair
        if sym not in self.symbols:
            out.drop(DROP_UNSUBSCRIBED)
            return
        px, qty = parse_levels([(t.price, t.amount)])[0]
        ts_event = ms_decimal_to_ns(t.create_time_ms)
        if not admit_trade(self, out, self.trade_ids, sym, t.id, ts_recv_ns, recv_seq):
            return
        out.trades_block().add(sym, ts_event, ts_recv_ns, recv_seq, str(t.id),
                               _SIDES.get(t.side, UNKNOWN), px, qty)

    def _quote(self, raw: msgspec.Raw, ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        q = _TICKER.decode(raw)
        if q.s not in self.symbols:
            out.drop(DROP_UNSUBSCRIBED)
            return
        bid = quote_side(q.b, q.B)
        ask = quote_side(q.a, q.A)
        out.quotes_block().add(q.s, ms_to_ns(q.t), ts_recv_ns, recv_seq, *bid, *ask)

    def _diff(self, raw: msgspec.Raw, nbytes: int, ts_recv_ns: int, recv_seq: int,
              out: Output) -> None:
        d = _UPDATE.decode(raw)
        if d.s not in self.symbols:
            out.drop(DROP_UNSUBSCRIBED)
            return
        if d.u < d.U:
            raise BadFrame(f"U {d.U} > u {d.u}")
        diff = Diff(d.U, d.u, -1, d.u, ms_to_ns(d.t), ts_recv_ns, parse_levels(d.b),
                    parse_levels(d.a), nbytes)
        self.books.diff(d.s, diff, out, recv_seq)

    def on_rest(self, request: RestRequest, status: int, body: bytes,
                ts_recv_ns: int, recv_seq: int) -> Output:
        return self.books.rest_answer(request, status, body, ts_recv_ns, recv_seq,
                                      _rest_snapshot)


def _sub(channel: str, payload: list[str]) -> str:
    return orjson.dumps({"time": 0, "channel": channel, "event": "subscribe",
                         "payload": payload}).decode()


def _rest_snapshot(body: bytes) -> RestSnapshot:
    snap = _REST.decode(body)
    return RestSnapshot(parse_levels(snap.bids), parse_levels(snap.asks),
                        snapshot_id=snap.id, update_id=snap.id, ts_event_ns=None,
                        detail=f"snapshot id={snap.id}")


__all__ = ["Gate", "GateRules"]
