"""Bitstamp WebSocket API v2 codec (`bitstamp`).

Owns Bitstamp's wire format and rules: the endpoint (`wss://ws.bitstamp.net`), one
`{"event":"bts:subscribe","data":{"channel":"<channel>_<pair>"}}` per channel and pair
(pairs are Bitstamp's lowercase spelling: `btcusd`, `btcusd-perp`), the client heartbeat
`{"event":"bts:heartbeat"}` (answered by `{"event":"bts:heartbeat","channel":"",
"data":{"status":"success"}}`; Bitstamp sends no pings of its own, so the heartbeat's
answer is what keeps a quiet feed from looking stale), typed msgspec structs per message
kind, and the decoding of these channels:

- `live_trades_<pair>` (event `trade`) -> trades. `price_str` / `amount_str` (exact
  decimals; the float `price` / `amount` are used only if the text is absent),
  `ts_event` = `microtimestamp` (µs, exact), `trade_id` = `id`. `type` 0 = buy, 1 = sell
  is the taker's side (Bitstamp's docs), checked on the recorded frames
  (sim/data/bitstamp/live_trades.jsonl, 42 trades of 7 pairs, 2021-04-05 and
  2022-01-05): every `type` 0 trade has `buy_order_id > sell_order_id` (13/13) and every
  `type` 1 trade `sell_order_id > buy_order_id` (29/29) - the taker is the newer (later)
  order; against the book rebuilt from the same capture (ethusd, snapshot + diffs): the one
  buy inside the recorded diffs printed at the best ask (1/1), and the 9 sells printed at or
  below the best bid of the book as of the last recorded diff (9/9; they come 3.7-15.4 s
  after it, so that book is only approximate). Other `type` values are stored as
  `unknown`. Trade ids increase across all pairs (one venue-wide counter: 161009669 on
  linketh, 161009672 on xrpbtc, 161009670 on linketh again), so a pair's ids jump and a
  jump is not a gap: `TradeIds(consecutive=False)` - a repeated id is dropped (counted,
  `duplicate_trade`), a never-seen id below the highest seen is stored with an
  `out_of_order` event.
- `order_book_<pair>` (event `data`): the top 100 levels of each side, pushed whole on
  every change -> quotes (its first bid and first ask; an empty side is null). A push
  whose best bid/ask (prices and amounts) equals the last row written for the pair writes
  nothing (counted, `unchanged_quote`: a change deeper in the top 100), one whose
  `microtimestamp` is older than the last one's is dropped (counted, `stale_quote`: a
  replay during a make-before-break rotation). The first push after a new connection is
  always written.
- `diff_order_book_<pair>` (event `data`) -> book: the changed levels of the full book
  (absolute amounts, "0.00000000" deletes), synced with the REST snapshot
  `GET /api/v2/order_book/<pair>/` (full depth, grouped by price) on the shared
  `BookSync` (REST mode) with `BitstampRules`. Bitstamp sends NO sequence number: the
  `microtimestamp` (µs) of diffs and snapshot is the only ordering, so `update_id` is null
  and `ts_event` carries it. The rule (Bitstamp's WebSocket v2 docs define the channel
  and the REST book with `microtimestamp` but no sequence number; the fixture README's
  protocol table gives the procedure as "sync by fetching REST /api/v2/order_book/<pair>
  and discarding diffs with microtimestamp <= the snapshot's microtimestamp", the one
  public Bitstamp clients follow; the recording confirms it, see below):

  1. diffs are buffered from the subscription; the first diff of an unsynced pair asks
     for the REST snapshot;
  2. a snapshot whose `microtimestamp` X is older than the first buffered diff's F
     (X < F) is fetched again: diffs between X and our subscription may never have
     reached us;
  3. buffered diffs with `microtimestamp` <= X are already in the snapshot: dropped
     (counted, `stale_book_update`); the others are applied in order after the
     snapshot block (each with its own recv_seq);
  4. then every diff is applied, except one older than the last applied diff (dropped,
     `stale_book_update`: the overlap of a make-before-break rotation). One with the
     same `microtimestamp` as the last applied diff is applied: amounts are absolute, so
     applying a repeat again changes nothing, while skipping a distinct diff of the same
     microsecond would lose it.

  Checked on the recording (9 pairs with diffs, 2022-01-05): the 214 levels last set by a
  diff with `microtimestamp` <= X all equal the snapshot's (214/214), and none of the 219
  levels first touched by a diff after X repeats the snapshot's value (0/219): the
  snapshot holds exactly the diffs up to its `microtimestamp`. The rebuilt books never
  cross.

Continuity: with no sequence numbers, a lost diff inside one connection cannot be
detected from the data (the venue gives no means to). What can be detected is handled:
a disconnect (the reader's `disconnected` event) resets every book (`on_connect`), and
the new connection's first diff fetches a new snapshot, written as a snapshot block and
followed by a `resync` event; a snapshot that fails (HTTP error, garbage) is a
`snapshot_failed` event and is retried with backoff (BookSync). `bts:request_reconnect`
(the server is going into maintenance: "reconnect within a few seconds") is a
`reconnect_requested` event and a make-before-break rotation (`Output.reconnect`); a
rotation keeps books, trade ids and quote state (`on_rotate`), the overlap being dropped
by `microtimestamp` and trade id as above. Bitstamp closes connections after 90 days:
`default_rotate_after_s` rotates after 89.

Control frames: `bts:subscription_succeeded` -> `subscribed` event (Bitstamp acks
unknown pairs too, so a wrong pair shows up only as silence); `bts:unsubscription_succeeded`
and the heartbeat answer are silent; `bts:error` -> `refused` when its channel is one of
ours, else a venue `error` event. Data of pairs or channels the feed did not subscribe to
is dropped and counted; other events and channels (`live_orders`, `detail_order_book`)
are unknown messages.

State (`state()` / `restore()`): trade ids (`trades`), every book's sync position and
buffer (`books`), the last quote of each pair (`quotes`).

Must not: do I/O, read a clock or log (see exchanges/base.py); catch decode errors itself
(the base rejects the frame); change any state before a frame is known to be well-formed.
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
    us_to_ns,
)
from ingestd.exchanges.book import BookSync, Diff, RestSnapshot
from ingestd.exchanges.trades import NEW, TradeIds, report_trade
from ingestd.schema import BUY, SELL, UNKNOWN

# Channel name prefixes (Bitstamp names) by the feed channel they serve.
CH_TRADES: Final = "live_trades_"
CH_TOP: Final = "order_book_"
CH_DIFF: Final = "diff_order_book_"
CHANNEL_OF: Final = {"book": CH_DIFF, "trades": CH_TRADES, "quotes": CH_TOP}

DROP_UNCHANGED_QUOTE: Final = "unchanged_quote"
DROP_STALE_QUOTE: Final = "stale_quote"
EV_RECONNECT_REQUESTED: Final = "reconnect_requested"

_SIDES: Final[dict[int, str]] = {0: BUY, 1: SELL}
_INF: Final = float("inf")
_MAX_I64: Final = 2**63 - 1
TradeIdInt = Annotated[int, msgspec.Meta(ge=0, le=_MAX_I64)]
Levels = list[tuple[str, str]]


# ---- wire structs (unknown fields ignored; no reference cycles: untracked by the GC) ---------
class _Envelope(msgspec.Struct, gc=False):
    """Every frame: `{"event", "channel", "data"}` (key order varies: the 2021 trade
    capture puts `channel` first)."""

    event: str
    channel: str = ""
    data: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)


class _Trade(msgspec.Struct, gc=False):
    id: TradeIdInt
    type: int
    microtimestamp: str
    price_str: str | None = None
    amount_str: str | None = None
    price: float | None = None
    amount: float | None = None


class _Book(msgspec.Struct, gc=False):
    """`diff_order_book` / `order_book` data and the REST `order_book` body."""

    microtimestamp: str
    bids: Levels
    asks: Levels


class _Error(msgspec.Struct, gc=False):
    code: int | str | None = None
    message: str | None = None


_ENVELOPE = msgspec.json.Decoder(_Envelope)
_TRADE = msgspec.json.Decoder(_Trade)
_BOOK = msgspec.json.Decoder(_Book)
_ERROR = msgspec.json.Decoder(_Error | str | None)


def _us(text: str) -> int:
    """`microtimestamp`: µs since the epoch as a digit string -> ns, exactly."""
    if not (text.isdigit() and text.isascii() and len(text) < 17):
        raise BadFrame(f"bad microtimestamp: {text!r}"[:80])
    return us_to_ns(text)


def _subscribe(channel: str) -> str:
    return orjson.dumps({"event": "bts:subscribe", "data": {"channel": channel}}).decode()


# ---- continuity rules ----------------------------------------------------------------------
class BitstampRules:
    """Diffs and snapshots are ordered by `microtimestamp` (µs) only; `Diff.first_id` and
    `last_id` hold it, and a snapshot's id is its own. See the module docstring."""

    @staticmethod
    def stale(diff: Diff, last_id: int, just_synced: bool) -> bool:
        # Right after the snapshot: <= its microtimestamp is already in it. Later: only
        # an older diff is a repeat (same microsecond: applied again, harmlessly).
        return diff.last_id < last_id or (just_synced and diff.last_id == last_id)

    @staticmethod
    def bridges(diff: Diff, snapshot_id: int) -> bool:
        return True  # no ids: any diff newer than the snapshot follows it

    @staticmethod
    def continues(diff: Diff, last_id: int) -> bool:
        return True  # no ids: continuity cannot be checked within a connection

    @staticmethod
    def too_old(snapshot_id: int, first_buffered: Diff) -> bool:
        return snapshot_id < first_buffered.first_id

    @staticmethod
    def gap_detail(symbol: str, diff: Diff, last_id: int) -> str:
        return (f"diff microtimestamp {diff.last_id} does not follow "
                f"microtimestamp {last_id}")


class _QuoteState:
    """Per pair: the `microtimestamp` and best bid/ask of the last quote row written."""

    def __init__(self) -> None:
        self.last: dict[str, tuple[int, tuple[float | None, ...]]] = {}

    def state(self) -> dict[str, list[Any]]:
        return {sym: [mts, *top] for sym, (mts, top) in self.last.items()}

    def restore(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise BadFrame("quotes state is not an object")
        last: dict[str, tuple[int, tuple[float | None, ...]]] = {}
        for sym, v in state.items():
            if not (isinstance(sym, str) and isinstance(v, list) and len(v) == 5
                    and type(v[0]) is int and 0 <= v[0] <= _MAX_I64
                    and all(x is None or type(x) is float for x in v[1:])):
                raise BadFrame(f"quote state of {sym!r} is not [microtimestamp, 4 values]"[:120])
            last[sym] = (v[0], tuple(v[1:]))
        self.last = last


class Bitstamp(Codec):
    exchange: ClassVar[str] = "bitstamp"
    default_ws_url: ClassVar[str] = "wss://ws.bitstamp.net"
    default_rest_url: ClassVar[str | None] = "https://www.bitstamp.net"
    # The client heartbeat (Bitstamp sends none of its own); its answer feeds the
    # stale-stream timer of quiet feeds. Protocol-level pings are not needed on top of it.
    keepalive_interval_s: ClassVar[float | None] = 15.0
    ws_ping_interval_s: ClassVar[float | None] = None
    default_stale_after_s: ClassVar[float] = 30.0
    # "Maximum connection age is 90 days": rotate (make-before-break) a day before.
    default_rotate_after_s: ClassVar[float | None] = 89 * 86_400.0
    # Bitstamp documents no WebSocket connection limit; its API allows 400 requests per
    # second and 10,000 per 10 minutes per client. Connections are kept well below both.
    connect_limit: ClassVar[tuple[int, float]] = (5, 1.0)
    CHANNELS: ClassVar[tuple[str, ...]] = ("trades", "quotes", "book")
    symbol_pattern: ClassVar[re.Pattern[str] | None] = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
    symbol_spelling: ClassVar[str] = "a Bitstamp pair (lowercase, e.g. 'btcusd')"

    def __init__(self, feed: FeedConfig) -> None:
        super().__init__(feed)
        self._want_trades = "trades" in self.channels
        self._want_quotes = "quotes" in self.channels
        self._want_book = "book" in self.channels
        self.trade_ids: TradeIds = self.stateful("trades", TradeIds(consecutive=False))
        self.books: BookSync = self.stateful("books", BookSync(
            self, BitstampRules(), snapshot_request=self._snapshot_url))
        self.quotes: _QuoteState = self.stateful("quotes", _QuoteState())

    # ---- connection ------------------------------------------------------------------------
    def channel_names(self) -> list[str]:
        """Every Bitstamp channel this feed subscribes to (book first: its diffs are
        buffered from the start, as in the recording)."""
        return [CHANNEL_OF[ch] + sym for ch in ("book", "trades", "quotes")
                if ch in self.channels for sym in self.feed.symbols]

    def subscribe_messages(self) -> Sequence[str]:
        return [_subscribe(name) for name in self.channel_names()]

    def keepalive_message(self) -> str | None:
        return '{"event":"bts:heartbeat"}'

    def on_connect(self) -> None:
        # A new connection: every book is rebuilt from a fresh snapshot, and the first
        # quote of each pair is written whatever it is.
        self.books.reset()
        self.quotes.last.clear()

    def on_rotate(self) -> None:
        # Same channels on a connection made before the old one closed: keep everything;
        # the overlap is dropped by microtimestamp and trade id.
        pass

    def _snapshot_url(self, symbol: str) -> str:
        return self.rest_url(f"/api/v2/order_book/{symbol}/")

    # ---- frames ----------------------------------------------------------------------------
    def parse_frame(self, frame: bytes | str, ts_recv_ns: int, recv_seq: int,
                    out: Output) -> None:
        env = _ENVELOPE.decode(frame)
        event, channel = env.event, env.channel
        if event == "data":
            if channel.startswith(CH_DIFF):
                sym = channel[len(CH_DIFF):]
                if self._want_book and sym in self.symbols:
                    self._diff(sym, env.data, len(frame), ts_recv_ns, recv_seq, out)
                else:
                    out.drop(DROP_UNSUBSCRIBED)
                return
            if channel.startswith(CH_TOP):
                sym = channel[len(CH_TOP):]
                if self._want_quotes and sym in self.symbols:
                    self._quote(sym, env.data, ts_recv_ns, recv_seq, out)
                else:
                    out.drop(DROP_UNSUBSCRIBED)
                return
        elif event == "trade" and channel.startswith(CH_TRADES):
            sym = channel[len(CH_TRADES):]
            if self._want_trades and sym in self.symbols:
                self._trade(sym, env.data, ts_recv_ns, recv_seq, out)
            else:
                out.drop(DROP_UNSUBSCRIBED)
            return
        elif event.startswith("bts:"):
            self._control(event, channel, env.data, ts_recv_ns, recv_seq, out)
            return
        out.unknown += 1

    def _control(self, event: str, channel: str, data: msgspec.Raw, ts_recv_ns: int,
                 recv_seq: int, out: Output) -> None:
        if event == "bts:subscription_succeeded":
            self.subscribed(out, self._symbol_of(channel), ts_recv_ns, recv_seq,
                            channel or None)
        elif event in ("bts:heartbeat", "bts:unsubscription_succeeded"):
            pass
        elif event == "bts:request_reconnect":
            self.ev(out, EV_RECONNECT_REQUESTED, ts_recv_ns, recv_seq, None,
                    "venue asked to reconnect (bts:request_reconnect)")
            out.reconnect = "bts:request_reconnect"
        elif event == "bts:error":
            err = _ERROR.decode(data) if data else None
            detail = f"{err.code}: {err.message}" if isinstance(err, _Error) else str(err)
            if channel:
                detail = f"{channel}: {detail}"
            sym = self._symbol_of(channel)
            if sym is not None:
                self.refused(out, sym, ts_recv_ns, recv_seq, detail[:500])
            else:
                self.venue_error(out, ts_recv_ns, recv_seq, detail[:500])
        else:
            out.unknown += 1

    def _symbol_of(self, channel: str) -> str | None:
        """The pair of one of this feed's channels (None: not one of ours)."""
        for ch, prefix in CHANNEL_OF.items():
            if ch in self.channels and channel.startswith(prefix):
                sym = channel[len(prefix):]
                if sym in self.symbols:
                    return sym
        return None

    # ---- trades ----------------------------------------------------------------------------
    def _trade(self, sym: str, data: msgspec.Raw, ts_recv_ns: int, recv_seq: int,
               out: Output) -> None:
        # The hottest path: checks inlined (float() then one range test; the helpers only
        # to raise with the offending value), the shared id verdict called directly.
        t = _TRADE.decode(data)
        px_raw = t.price_str if t.price_str is not None else t.price
        qty_raw = t.amount_str if t.amount_str is not None else t.amount
        if px_raw is None or qty_raw is None:
            raise BadFrame("trade without price or amount")
        px, qty = float(px_raw), float(qty_raw)
        if not (0.0 < px < _INF and 0.0 <= qty < _INF):
            price(px)
            amount(qty)
        ts_event = _us(t.microtimestamp)
        tid = t.id
        ids = self.trade_ids
        verdict = ids.admit(sym, tid)
        if verdict != NEW and not report_trade(self, out, ids, verdict, sym, tid,
                                               ts_recv_ns, recv_seq):
            return
        out.trades_block().add(sym, ts_event, ts_recv_ns, recv_seq, str(tid),
                               _SIDES.get(t.type, UNKNOWN), px, qty)

    # ---- quotes: the top of the top-100 stream ---------------------------------------------
    def _quote(self, sym: str, data: msgspec.Raw, ts_recv_ns: int, recv_seq: int,
               out: Output) -> None:
        d = _BOOK.decode(data)
        mts = _us(d.microtimestamp)
        bid = quote_side(*d.bids[0]) if d.bids else (None, None)
        ask = quote_side(*d.asks[0]) if d.asks else (None, None)
        top = (*bid, *ask)
        last = self.quotes.last.get(sym)
        if last is not None:
            if mts < last[0]:
                out.drop(DROP_STALE_QUOTE)
                return
            if top == last[1]:
                out.drop(DROP_UNCHANGED_QUOTE)
                return
        out.quotes_block().add(sym, mts, ts_recv_ns, recv_seq, *top)
        self.quotes.last[sym] = (mts, top)

    # ---- order book --------------------------------------------------------------------------
    def _diff(self, sym: str, data: msgspec.Raw, nbytes: int, ts_recv_ns: int,
              recv_seq: int, out: Output) -> None:
        d = _BOOK.decode(data)
        ts_event = _us(d.microtimestamp)
        mts = ts_event // 1_000
        diff = Diff(mts, mts, -1, None, ts_event, ts_recv_ns, parse_levels(d.bids),
                    parse_levels(d.asks), nbytes)
        self.books.diff(sym, diff, out, recv_seq)

    def on_rest(self, request: RestRequest, status: int, body: bytes,
                ts_recv_ns: int, recv_seq: int) -> Output:
        return self.books.rest_answer(request, status, body, ts_recv_ns, recv_seq,
                                      _rest_snapshot)


def _rest_snapshot(body: bytes) -> RestSnapshot:
    """The REST `order_book` body: `{timestamp, microtimestamp, bids, asks}` (full depth);
    its microtimestamp is what buffered diffs are bridged from (BitstampRules)."""
    snap = _BOOK.decode(body)
    ts_event = _us(snap.microtimestamp)
    mts = ts_event // 1_000
    return RestSnapshot(parse_levels(snap.bids), parse_levels(snap.asks), snapshot_id=mts,
                        update_id=None, ts_event_ns=ts_event,
                        detail=f"snapshot microtimestamp={mts}")


__all__ = ["Bitstamp", "BitstampRules"]
