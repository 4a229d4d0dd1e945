"""Coinbase Advanced Trade (`coinbase`) codec: wss://advanced-trade-ws.coinbase.com.

Owns: Coinbase's wire format and rules - the subscribe messages (one per channel:
`market_trades` for trades, `ticker` for quotes, `level2` for the book, and always
`heartbeats`, which keeps the connection open), the decoding (typed msgspec structs, one
tagged union on `channel`) of `market_trades`, `ticker` / `ticker_batch`, `l2_data`,
`subscriptions` and `heartbeats` frames and of `type: error` frames, the per-connection
`sequence_num` check, and the book resync by re-subscription, run on the shared
`BookSync` (channel snapshots, no per-symbol ids: `rules=None`) and the shared exact trade
de-duplication (`TradeIds`).

What the recorded data (shared fixtures, 2026-08-09, BTC-USD and ETH-USD) shows:

- **`side` is the maker's side, not the taker's.** Compared with the best bid/ask of the
  last `ticker` message before each trade, all 42 `"SELL"` trades printed at the best ask
  and 19 of 21 `"BUY"` trades at the best bid (the other 2 inside the spread, part of a
  sweep). Multi-fill frames agree: `"BUY"` fills of one frame walk *down* through the bids
  with increasing trade id (ETH-USD 833140784..787: 1919.47, 1919.43, 1919.42, 1919.38),
  `"SELL"` fills walk up through the asks. So the taker side written here is the opposite:
  `"SELL"` -> `buy`, `"BUY"` -> `sell` (anything else -> `unknown`).
- **`sequence_num` is one counter per connection across all channels**, starting at 0
  (the first frame recorded has 0; acks, heartbeats and data frames all take a number,
  so do frames of channels this codec does not handle, e.g. `candles`). Any jump is one
  feed-level `gap` event (`expected`/`received` in the detail). A lost frame may have been
  an `l2_data` update of any product, so every book of the feed is resynced (except one
  the frame with the jump itself snapshots): Coinbase has no REST book snapshot for this
  feed, so the codec sends one `unsubscribe` + `subscribe` pair for `level2` with those
  products (`BookSync.break_many`; a book whose snapshot was asked for less than
  `REASK_MIN_S` ago is not asked again) and `BookSync` drops that book's updates (counted
  as `book_not_synced`) until the new `l2_data` snapshot, which is written as a snapshot
  block followed by a `resync` event. Updates before the first snapshot of a connection
  wait for the connect-time subscription's snapshot; if none comes, the shared rule of
  `BookSync` re-subscribes (exchanges/book.py, SNAPSHOT_WAIT_S). A frame whose `sequence_num`
  goes back is a `gap` event too; its book and quote content is dropped as stale
  (`stale_book_update`, `out_of_order_frame`), its trades go through de-duplication.
- **Trade ids are per-product integers, consecutive and increasing** (147 BTC-USD ids and
  132 ETH-USD ids without a hole; within a frame listed newest first). `market_trades`
  sends the last 100 trades of each product as a `snapshot` on every (re)subscription.
  The trades of one frame are taken in ascending id order (so a normal snapshot is one
  run of new or replayed ids, not a flood of out-of-order ones) through the shared
  `TradeIds` (consecutive): a replayed id is dropped (counted, `duplicate_trade`), a
  jump is a `gap` event for that symbol, and a never-seen id below the highest seen (the
  hole of an earlier jump, filled by a later snapshot) is stored with an `out_of_order`
  event. Non-numeric ids (or numbers beyond int64) go through the opaque-id window.
- `l2_data` (the `level2` channel's delivery name) sends sides `bid`/`offer`,
  `new_quantity` absolute (0 removes) and an RFC 3339 `event_time` per level. Update rows
  carry their level's `event_time` as `ts_event` (an update is applied as one diff per run
  of levels sharing an `event_time`: in the recording every event has one); a snapshot
  block carries the latest `event_time` of its levels (one value for the whole block; the
  recorded snapshot's levels all share it). `update_id` is null: `sequence_num` restarts
  on every connection and is not a per-book id. Ticker rows take the envelope
  `timestamp` (ns) as `ts_event`; trades their `time`.

Connections: `on_connect` (and a rotation, the default `on_rotate`) restarts the
sequence at 0 and unsyncs every book: the connect-time `level2` subscription brings the
snapshots. Trade ids are kept, so the replayed trade snapshots are de-duplicated.

State (`state()` / `restore()`): trade ids (`trades`), every book's sync position
(`books`; no levels are kept: Coinbase has no checksum and no depth truncation, and
quotes come from `ticker`; what each waits for), and the per-connection bookkeeping
(`connection`: the next expected `sequence_num`, the subscriptions acknowledged so far),
so a journal replay continues a connection exactly.

Must not: do I/O, read a clock or log (see exchanges/base.py); catch decode errors itself
(the base rejects the frame); change any state, count a drop or queue a reply before a
frame is known to be well-formed.
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
    iso_to_ns,
    price,
    quote_side,
)
from ingestd.exchanges.book import BookSync, Diff, Levels
from ingestd.exchanges.trades import TradeIds, admit_trade_id, trade_id
from ingestd.schema import ASK, BID, BUY, SELL, UNKNOWN

# Our channels -> the venue's subscription channel names.
CHANNEL_OF: Final = {"trades": "market_trades", "quotes": "ticker", "book": "level2"}
HEARTBEATS: Final = "heartbeats"
# Drop reason for quotes of a frame whose sequence_num went back.
DROP_OUT_OF_ORDER: Final = "out_of_order_frame"

# BTC-USD's full level2 snapshot is ~5 MB (the recorded ETH-USD one 2.5 MB).
MIN_BOOK_FRAME_BYTES: Final = 8 * 1024 * 1024

_TAKER_SIDE: Final = {"SELL": BUY, "BUY": SELL}   # the venue's side is the maker's
_BOOK_SIDE: Final = {"bid": BID, "offer": ASK, "ask": ASK}

Seq = Annotated[int, msgspec.Meta(ge=0)]
Number = str | float   # Coinbase sends decimal strings; bare JSON numbers are taken too


# ---- wire structs (unknown fields ignored) --------------------------------------------------
class _Trade(msgspec.Struct, gc=False):
    product_id: str
    trade_id: str | int
    price: Number
    size: Number
    time: str
    side: str | None = None


class _TradesEvent(msgspec.Struct, gc=False):
    trades: list[_Trade]
    type: str | None = None


class _Ticker(msgspec.Struct, gc=False):
    product_id: str
    best_bid: Number
    best_bid_quantity: Number
    best_ask: Number
    best_ask_quantity: Number


class _TickersEvent(msgspec.Struct, gc=False):
    tickers: list[_Ticker]
    type: str | None = None


class _Level(msgspec.Struct, gc=False):
    side: str
    event_time: str
    price_level: Number
    new_quantity: Number


class _L2Event(msgspec.Struct, gc=False):
    type: Literal["snapshot", "update"]
    product_id: str
    updates: list[_Level]


class _SubscriptionsEvent(msgspec.Struct, gc=False):
    subscriptions: dict[str, list[Any]]


class _TradesMsg(msgspec.Struct, tag_field="channel", tag="market_trades", gc=False):
    sequence_num: Seq
    events: list[_TradesEvent]


class _TickerMsg(msgspec.Struct, tag_field="channel", tag="ticker", gc=False):
    sequence_num: Seq
    timestamp: str
    events: list[_TickersEvent]


class _TickerBatchMsg(_TickerMsg, tag="ticker_batch", gc=False):
    pass


class _L2Msg(msgspec.Struct, tag_field="channel", tag="l2_data", gc=False):
    sequence_num: Seq
    events: list[_L2Event]


class _SubscriptionsMsg(msgspec.Struct, tag_field="channel", tag="subscriptions", gc=False):
    sequence_num: Seq
    events: list[_SubscriptionsEvent]


class _HeartbeatsMsg(msgspec.Struct, tag_field="channel", tag=HEARTBEATS, gc=False):
    sequence_num: Seq
    events: list[Any]


class _OtherMsg(msgspec.Struct, gc=False):
    """A frame of a channel this codec does not handle (e.g. `candles`): it still takes a
    sequence number."""

    channel: str
    sequence_num: Seq
    events: list[Any]


_Channel = _TradesMsg | _TickerMsg | _TickerBatchMsg | _L2Msg | _SubscriptionsMsg | \
    _HeartbeatsMsg

_FRAME = msgspec.json.Decoder(_Channel)
# One strict decoder per channel: on the generic path they raise with a precise reason.
_STRICT: Final[dict[str, msgspec.json.Decoder[Any]]] = {
    "market_trades": msgspec.json.Decoder(_TradesMsg),
    "ticker": msgspec.json.Decoder(_TickerMsg),
    "ticker_batch": msgspec.json.Decoder(_TickerBatchMsg),
    "l2_data": msgspec.json.Decoder(_L2Msg),
    "subscriptions": msgspec.json.Decoder(_SubscriptionsMsg),
    HEARTBEATS: msgspec.json.Decoder(_HeartbeatsMsg)}
_OTHER = msgspec.json.Decoder(_OtherMsg)

# Decoded and validated, not yet applied.
# A trade: (symbol, trade_id text, trade_id int | None (opaque), ts_ns, side, price, amount)
_CheckedTrade = tuple[str, str, int | None, int, str, float, float]
# A run of one l2_data event's levels sharing one event_time: (ts_event_ns, bids, asks)
_Run = tuple[int, Levels, Levels]
_NO_SNAPSHOTS: Final[frozenset[str]] = frozenset()


def _runs(updates: list[_Level]) -> list[_Run]:
    """An event's levels, validated, as runs of consecutive levels sharing an event_time."""
    runs: list[_Run] = []
    last_time = ""
    bids: Levels = []
    asks: Levels = []
    for u in updates:
        side = _BOOK_SIDE.get(u.side)
        if side is None:
            raise BadFrame(f"book side {u.side!r}"[:80])
        if u.event_time != last_time or not runs:
            last_time = u.event_time
            bids, asks = [], []
            runs.append((iso_to_ns(last_time), bids, asks))
        (bids if side == BID else asks).append((price(u.price_level),
                                                amount(u.new_quantity)))
    return runs


# ---- per-connection bookkeeping ---------------------------------------------------------------
class _Connection:
    """What one connection has established: the next `sequence_num` and the (channel,
    product) subscriptions acknowledged."""

    def __init__(self) -> None:
        self.expected = 0
        self.acked: frozenset[tuple[str, str]] = frozenset()

    def reset(self) -> None:
        self.expected = 0
        self.acked = frozenset()

    def state(self) -> dict[str, Any]:
        return {"expected": self.expected, "acked": sorted([ch, p] for ch, p in self.acked)}

    def restore(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise BadFrame("connection state is not an object")
        expected, acked = state["expected"], state["acked"]
        if type(expected) is not int or expected < 0:
            raise BadFrame(f"expected sequence_num {expected!r}")
        if not isinstance(acked, list) or not all(
                isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p)
                for p in acked):
            raise BadFrame("acked is not a list of [channel, product]")
        self.expected = expected
        self.acked = frozenset((ch, p) for ch, p in acked)


class Coinbase(Codec):
    exchange: ClassVar[str] = "coinbase"
    default_ws_url: ClassVar[str] = "wss://advanced-trade-ws.coinbase.com"
    # The `heartbeats` channel (1 message/s) is the keepalive; no application ping exists.
    keepalive_interval_s: ClassVar[float | None] = None
    # Protocol pings only detect a dead TCP path; the venue answers them.
    ws_ping_interval_s: ClassVar[float | None] = 20.0
    # Heartbeats arrive every second: 10 s of silence is a stale stream.
    default_stale_after_s: ClassVar[float] = 10.0
    # No forced disconnect is documented. A rotation is handled like a new connection (the
    # default `on_rotate`): sequence_num restarts, the new l2 snapshot resyncs the book,
    # replayed trades are dropped by id (the trade-id memory survives `on_connect`).
    default_rotate_after_s: ClassVar[float | None] = None
    # Documented: 8 connections/s and 8 unauthenticated messages/s per IP. A connection
    # sends up to 4 subscribe messages, so the message limit allows 2 connections/s.
    connect_limit: ClassVar[tuple[int, float]] = (2, 1.0)
    symbol_pattern: ClassVar[re.Pattern[str] | None] = re.compile(r"[A-Z0-9]+(?:-[A-Z0-9]+)+")
    symbol_spelling: ClassVar[str] = "a Coinbase product id (e.g. 'BTC-USD')"

    def __init__(self, feed: FeedConfig) -> None:
        super().__init__(feed)
        self._want_trades = "trades" in self.channels
        self._want_quotes = "quotes" in self.channels
        self._want_book = "book" in self.channels
        self._book_symbols: tuple[str, ...] = tuple(feed.symbols) if self._want_book else ()
        self.trade_ids = self.stateful("trades", TradeIds(consecutive=True))
        self.books = self.stateful("books", BookSync(self, None,
                                                     resubscribe=self._resubscribe))
        self.conn = self.stateful("connection", _Connection())
        # Every book waits for the snapshot its connect-time subscription brings.
        self.books.reset(expect=self._book_symbols)

    # ---- config --------------------------------------------------------------------------
    @classmethod
    def check_feed(cls, feed: FeedConfig) -> list[str]:
        problems = super().check_feed(feed)
        if "book" in feed.channels and feed.max_frame_bytes < MIN_BOOK_FRAME_BYTES:
            problems.append(f"max_frame_bytes: Coinbase level2 snapshots reach ~5 MB "
                            f"(BTC-USD); use at least {MIN_BOOK_FRAME_BYTES} with 'book'")
        return problems

    # ---- connection ------------------------------------------------------------------------
    def on_connect(self) -> None:
        # sequence_num restarts at 0 on every connection; every book needs a new snapshot,
        # which the connect-time `level2` subscription brings.
        self.conn.reset()
        self.books.reset(expect=self._book_symbols)

    def subscribe_messages(self) -> Sequence[str]:
        products = list(self.feed.symbols)
        msgs = [self._request("subscribe", CHANNEL_OF[ch], products)
                for ch in ("trades", "quotes", "book") if ch in self.channels]
        msgs.append(self._request("subscribe", HEARTBEATS, products))
        return msgs

    @staticmethod
    def _request(kind: str, channel: str, products: list[str]) -> str:
        return orjson.dumps({"type": kind, "product_ids": products,
                             "channel": channel}).decode()

    def _resubscribe(self, syms: list[str], out: Output) -> None:
        """BookSync's `resubscribe`: one unsubscribe + subscribe pair for these books."""
        out.reply(self._request("unsubscribe", CHANNEL_OF["book"], syms))
        out.reply(self._request("subscribe", CHANNEL_OF["book"], syms))

    # ---- frames ----------------------------------------------------------------------------
    def parse_frame(self, frame: bytes | str, ts_recv_ns: int, recv_seq: int,
                    out: Output) -> None:
        try:
            msg: Any = _FRAME.decode(frame)
        except (msgspec.ValidationError, msgspec.DecodeError):
            msg = self._generic(frame, ts_recv_ns, recv_seq, out)
        cls = type(msg)
        if cls is _L2Msg:
            self._book(msg, ts_recv_ns, recv_seq, out)
        elif cls is _TradesMsg:
            self._trades(msg, ts_recv_ns, recv_seq, out)
        elif cls is _TickerMsg or cls is _TickerBatchMsg:
            self._quotes(msg, ts_recv_ns, recv_seq, out)
        elif cls is _HeartbeatsMsg:
            self._sequence(msg.sequence_num, _NO_SNAPSHOTS, ts_recv_ns, recv_seq, out)
        elif cls is _SubscriptionsMsg:
            self._subscriptions(msg, ts_recv_ns, recv_seq, out)

    def _generic(self, frame: bytes | str, ts_recv_ns: int, recv_seq: int,
                 out: Output) -> msgspec.Struct | None:
        """Frames off the fast path: venue errors, other channels, foreign messages, and
        bad frames (which raise here with a precise reason)."""
        raw = orjson.loads(frame)
        if not isinstance(raw, dict):
            raise BadFrame("not a JSON object")
        if raw.get("type") == "error":
            self._venue_error(raw, ts_recv_ns, recv_seq, out)
            return None
        channel = raw.get("channel")
        if channel is None:
            out.unknown += 1
            return None
        if not isinstance(channel, str):
            raise BadFrame("channel is not a string")
        strict = _STRICT.get(channel)
        if strict is not None:
            decoded: msgspec.Struct = strict.decode(frame)
            return decoded
        other = _OTHER.decode(frame)   # valid, but not a channel we handle
        self._sequence(other.sequence_num, _NO_SNAPSHOTS, ts_recv_ns, recv_seq, out)
        out.unknown += 1
        return None

    # ---- sequence and book resync ------------------------------------------------------------
    def _sequence(self, seq: int, snapshots: frozenset[str], ts_recv_ns: int, recv_seq: int,
                  out: Output) -> bool:
        """Check `sequence_num` (of a validated frame that snapshots the books of
        `snapshots`); True if the frame is older than what was already seen."""
        conn = self.conn
        expected = conn.expected
        if seq == expected:
            conn.expected = seq + 1
            return False
        if seq < expected:
            self.gap(out, None, ts_recv_ns, recv_seq,
                     f"sequence_num went back: expected {expected}, received {seq}")
            return True
        self.gap(out, None, ts_recv_ns, recv_seq,
                 f"sequence_num: expected {expected}, received {seq} "
                 f"({seq - expected} messages missing)")
        conn.expected = seq + 1
        # Any book may have lost an update: resync all but those this frame snapshots.
        self.books.break_many([s for s in self._book_symbols if s not in snapshots], out, "",
                              ts_recv_ns, recv_seq, event=False)
        return False

    # ---- trades ----------------------------------------------------------------------------
    def _trades(self, msg: _TradesMsg, ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        checked: list[_CheckedTrade] = []
        numeric = True
        for ev in msg.events:
            for t in reversed(ev.trades):   # the venue lists newest first
                text, tid = trade_id(t.trade_id)
                numeric = numeric and tid is not None
                side = _TAKER_SIDE.get(t.side, UNKNOWN) if t.side is not None else UNKNOWN
                checked.append((t.product_id, text, tid, iso_to_ns(t.time), side,
                                price(t.price), amount(t.size)))
        if numeric and len(checked) > 1:
            # Ascending ids per product: a replay is one run of duplicates, then new ids.
            checked.sort(key=lambda r: (r[0], r[2] or 0))
        # Everything validated: the sequence, then the ids.
        self._sequence(msg.sequence_num, _NO_SNAPSHOTS, ts_recv_ns, recv_seq, out)
        want, symbols, ids = self._want_trades, self.symbols, self.trade_ids
        unsubscribed = 0
        block = None
        for sym, text, tid, ts, side, px, qty in checked:
            if not want or sym not in symbols:
                unsubscribed += 1
                continue
            if not admit_trade_id(self, out, ids, sym, text, tid, ts_recv_ns, recv_seq):
                continue
            if block is None:
                block = out.trades_block()
            block.add(sym, ts, ts_recv_ns, recv_seq, text, side, px, qty)
        if unsubscribed:
            out.drop(DROP_UNSUBSCRIBED, unsubscribed)

    # ---- quotes ----------------------------------------------------------------------------
    def _quotes(self, msg: _TickerMsg, ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        ts = iso_to_ns(msg.timestamp)
        rows = [(t.product_id, *quote_side(t.best_bid, t.best_bid_quantity),
                 *quote_side(t.best_ask, t.best_ask_quantity))
                for ev in msg.events for t in ev.tickers]
        stale = self._sequence(msg.sequence_num, _NO_SNAPSHOTS, ts_recv_ns, recv_seq, out)
        want, symbols = self._want_quotes, self.symbols
        unsubscribed = old = 0
        block = None
        for sym, bid_px, bid_sz, ask_px, ask_sz in rows:
            if not want or sym not in symbols:
                unsubscribed += 1
            elif stale:
                old += 1
            else:
                if block is None:
                    block = out.quotes_block()
                block.add(sym, ts, ts_recv_ns, recv_seq, bid_px, bid_sz, ask_px, ask_sz)
        if unsubscribed:
            out.drop(DROP_UNSUBSCRIBED, unsubscribed)
        if old:
            out.drop(DROP_OUT_OF_ORDER, old)

    # ---- order book ------------------------------------------------------------------------
    def _book(self, msg: _L2Msg, ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        parsed = [(ev.type == "snapshot", ev.product_id, _runs(ev.updates))
                  for ev in msg.events]
        snapshots = frozenset(sym for snap, sym, _ in parsed if snap)
        stale = self._sequence(msg.sequence_num, snapshots, ts_recv_ns, recv_seq, out)
        books, symbols = self.books, self.symbols
        for snapshot, sym, runs in parsed:
            if not self._want_book or sym not in symbols:
                out.drop(DROP_UNSUBSCRIBED)
            elif stale:
                out.drop(DROP_STALE_BOOK)
            elif snapshot:
                n = sum(len(b) + len(a) for _, b, a in runs)
                books.snapshot(sym, out, ts_event_ns=max((r[0] for r in runs), default=None),
                               ts_recv_ns=ts_recv_ns, recv_seq=recv_seq,
                               bids=[lv for r in runs for lv in r[1]],
                               asks=[lv for r in runs for lv in r[2]], snapshot_id=None,
                               update_id=None,
                               detail=f"l2_data snapshot, {n} levels")
            else:  # dropped (counted) while the book waits for its snapshot
                for ts, bids, asks in runs:
                    books.diff(sym, Diff(0, 0, -1, None, ts, ts_recv_ns, bids, asks), out,
                               recv_seq)

    # ---- acks and errors -------------------------------------------------------------------
    def _subscriptions(self, msg: _SubscriptionsMsg, ts_recv_ns: int, recv_seq: int,
                       out: Output) -> None:
        pairs = frozenset((channel, p) for ev in msg.events
                          for channel, products in ev.subscriptions.items()
                          for p in products if isinstance(p, str))
        self._sequence(msg.sequence_num, _NO_SNAPSHOTS, ts_recv_ns, recv_seq, out)
        for channel, sym in sorted(pairs - self.conn.acked):
            if sym in self.symbols:
                self.subscribed(out, sym, ts_recv_ns, recv_seq, channel)
        self.conn.acked = pairs

    def _venue_error(self, msg: dict[str, Any], ts_recv_ns: int, recv_seq: int,
                     out: Output) -> None:
        message, reason = msg.get("message"), msg.get("reason")
        detail = str(message) if message is not None else "error"
        if reason is not None:
            detail = f"{detail}: {reason}"
        detail = detail[:500]
        self.venue_error(out, ts_recv_ns, recv_seq, detail)
        named = sorted(s for s in self.symbols if s in detail)
        for sym in named:
            self.refused(out, sym, ts_recv_ns, recv_seq, detail)
        low = detail.lower()
        if not named and "subscribe" in low and "fail" in low:
            self.refused(out, None, ts_recv_ns, recv_seq, detail)
