"""Coinbase Advanced Trade (`coinbase`) codec: wss://advanced-trade-ws.coinbase.com.

Owns: the subscribe messages (one per channel: `market_trades` for trades, `ticker` for
quotes, `level2` for the book, and always `heartbeats`, which keeps the connection open),
the decoding of `market_trades`, `ticker`, `l2_data`, `subscriptions`, `heartbeats` and
`type: error` frames, the per-connection `sequence_num` check, the book resync by
re-subscription, and the de-duplication of replayed trades.

Must not: do I/O, read a clock or log (see exchanges/base.py).

What the recorded data (shared fixtures, 2026-08-09, BTC-USD and ETH-USD) shows:

- **`side` is the maker's side, not the taker's.** Compared with the best bid/ask of the
  last `ticker` message before each trade, all 42 `"SELL"` trades printed at the best ask
  and 19 of 21 `"BUY"` trades at the best bid (the other 2 inside the spread, part of a
  sweep). Multi-fill frames agree: `"BUY"` fills of one frame walk *down* through the bids
  with increasing trade id (ETH-USD 833140784..787: 1919.47, 1919.43, 1919.42, 1919.38),
  `"SELL"` fills walk up through the asks. So the taker side written here is the opposite:
  `"SELL"` -> `buy`, `"BUY"` -> `sell` (anything else -> `unknown`).
- **`sequence_num` is one counter per connection across all channels**, starting at 0
  (the first frame recorded has 0; acks, heartbeats and data frames all take a number).
  Any jump is a `gap` event (`expected`/`received` in the detail). A lost frame may have
  been a `l2_data` update, so every book of the feed is resynced: Coinbase has no REST
  book snapshot for this feed, so the codec sends `unsubscribe` + `subscribe` for
  `level2` (at most once per `RESUBSCRIBE_MIN_INTERVAL_S` of receive time; again after
  `RESYNC_TIMEOUT_S` if no snapshot came) and drops that book's updates (counted as
  `book_not_synced`) until the new `l2_data` snapshot, which is written as a snapshot block
  followed by a `resync` event. A frame whose `sequence_num` goes back is a `gap` event too;
  its book and quote content is dropped as stale.
- **Trade ids are per-product integers, contiguous and increasing** (147 BTC-USD ids and
  132 ETH-USD ids without a hole; within a frame listed newest first). `market_trades`
  sends the last 100 trades of each product as a `snapshot` on every (re)subscription, so
  trades are emitted in ascending id order per frame and de-duplicated with a last-id
  watermark per product; ids skipped over (a jump, itself a `gap` event for that symbol)
  are remembered (bounded, `MAX_MISSING_TRADE_IDS`) so that a later replay can still fill
  them in once. Non-numeric ids fall back to a bounded set of recent ids.
- `l2_data` (the `level2` channel's delivery name) sends sides `bid`/`offer`,
  `new_quantity` absolute (0 removes) and an RFC 3339 `event_time` per level (used as
  `ts_event`); `update_id` is null because `sequence_num` restarts on every connection.
  Ticker rows take the envelope `timestamp` (ns) as `ts_event`; trades their `time`.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

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
    iso_to_ns,
    price,
)
from ingestd.schema import ASK, BID, BUY, SELL, UNKNOWN, BookRow, QuoteRow, TradeRow

# Our channels -> the venue's subscription channel names.
CHANNEL_OF = {"trades": "market_trades", "quotes": "ticker", "book": "level2"}
HEARTBEATS = "heartbeats"
# Drop reason for quotes of a frame whose sequence_num went back.
DROP_OUT_OF_ORDER = "out_of_order_frame"

RESUBSCRIBE_MIN_INTERVAL_S = 1.0   # at most one level2 re-subscription per book per second
RESYNC_TIMEOUT_S = 5.0             # no snapshot this long after asking: ask again
MAX_MISSING_TRADE_IDS = 1000       # skipped trade ids remembered per product
MAX_TEXT_TRADE_IDS = 10_000        # recent non-numeric trade ids remembered per product
# BTC-USD's full level2 snapshot is ~5 MB (the recorded ETH-USD one 2.5 MB).
MIN_BOOK_FRAME_BYTES = 8 * 1024 * 1024

_NS = 1_000_000_000
_PRODUCT_ID = re.compile(r"^[A-Z0-9]+(?:-[A-Z0-9]+)+$")
_TAKER_SIDE = {"SELL": BUY, "BUY": SELL}   # the venue's side is the maker's
_BOOK_SIDE = {"bid": BID, "offer": ASK, "ask": ASK}
_ERRORS = (orjson.JSONDecodeError, BadFrame, KeyError, TypeError, ValueError, IndexError,
           AttributeError, OverflowError)

# Decoded, not yet applied: (symbol, trade_id text, trade_id int|None, ts_ns, side, px, qty)
_Trade = tuple[str, str, int | None, int, str, float, float]
# (ts_event_ns, side, price, amount)
_Level = tuple[int, str, float, float]


@dataclass(slots=True)
class _L2Event:
    snapshot: bool
    symbol: str
    levels: list[_Level]


@dataclass(slots=True)
class _Book:
    synced: bool = False
    ever_synced: bool = False
    # ts_recv of our last level2 (re)subscription; None: only the connect-time one.
    asked_ns: int | None = None


@dataclass(slots=True)
class _TradeIds:
    last: int | None = None
    missing: set[int] = field(default_factory=set)
    text_seen: set[str] = field(default_factory=set)
    text_order: deque[str] = field(default_factory=deque)


# ---- small typed accessors (every failure is a BadFrame) ----------------------------------
def _obj(v: Any, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise BadFrame(f"{what} is not an object")
    return v


def _arr(v: Any, what: str) -> list[Any]:
    if not isinstance(v, list):
        raise BadFrame(f"{what} is not an array")
    return v


def _text(d: dict[str, Any], key: str) -> str:
    v = d.get(key)
    if not isinstance(v, str):
        raise BadFrame(f"{key} is not a string")
    return v


def _number(d: dict[str, Any], key: str) -> str | int | float:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise BadFrame(f"{key} is not a number")
    return v


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


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

    def __init__(self, feed: FeedConfig) -> None:
        super().__init__(feed)
        self._want_trades = "trades" in self.channels
        self._want_quotes = "quotes" in self.channels
        self._want_book = "book" in self.channels
        self._books: dict[str, _Book] = (
            {s: _Book() for s in feed.symbols} if self._want_book else {})
        self._trade_ids: dict[str, _TradeIds] = {}
        self._expected_seq = 0
        self._acked: frozenset[tuple[str, str]] = frozenset()

    # ---- config --------------------------------------------------------------------------
    @classmethod
    def check_feed(cls, feed: FeedConfig) -> list[str]:
        problems = super().check_feed(feed)
        for sym in feed.symbols:
            if not _PRODUCT_ID.match(sym):
                problems.append(f"symbols: {sym!r} is not a Coinbase product id "
                                "(e.g. 'BTC-USD')")
        if "book" in feed.channels and feed.max_frame_bytes < MIN_BOOK_FRAME_BYTES:
            problems.append(f"max_frame_bytes: Coinbase level2 snapshots reach ~5 MB "
                            f"(BTC-USD); use at least {MIN_BOOK_FRAME_BYTES} with 'book'")
        return problems

    # ---- connection ------------------------------------------------------------------------
    def on_connect(self) -> None:
        # sequence_num restarts at 0 on every connection; every book needs a new snapshot
        # (the connect-time `level2` subscription brings one).
        self._expected_seq = 0
        self._acked = frozenset()
        for book in self._books.values():
            book.synced = False
            book.asked_ns = None

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

    # ---- frames ----------------------------------------------------------------------------
    def parse(self, frame: bytes | str, ts_recv_ns: int, recv_seq: int) -> Output:
        # Decode everything first (no state touched), then apply: a rejected frame leaves
        # the codec as if it never arrived (its sequence_num then shows up as a gap).
        try:
            msg = _obj(orjson.loads(frame), "frame")
            if msg.get("type") == "error":
                return self._venue_error(msg, ts_recv_ns, recv_seq)
            channel = msg.get("channel")
            seq = msg.get("sequence_num")
            if channel is None:
                out = Output()
                out.unknown = True
                return out
            if not isinstance(channel, str):
                raise BadFrame("channel is not a string")
            if not isinstance(seq, int) or isinstance(seq, bool):
                raise BadFrame("sequence_num is not an integer")
            seq_num = seq
            events = _arr(msg.get("events"), "events")
            trades: list[_Trade] | None = None
            quotes: list[QuoteRow] | None = None
            l2: list[_L2Event] | None = None
            subs: frozenset[tuple[str, str]] | None = None
            if channel == "market_trades":
                trades = self._decode_trades(events)
            elif channel == "ticker" or channel == "ticker_batch":
                quotes = self._decode_tickers(events, iso_to_ns(_text(msg, "timestamp")),
                                              ts_recv_ns, recv_seq)
            elif channel == "l2_data":
                l2 = self._decode_l2(events)
            elif channel == "subscriptions":
                subs = self._decode_subscriptions(events)
            elif channel != HEARTBEATS:
                channel = ""  # valid, but not a channel we handle
        except _ERRORS as e:
            bad = Output()
            bad.error = f"{type(e).__name__}: {e}"[:200]
            return bad

        out = Output()
        snap_syms = {e.symbol for e in l2 if e.snapshot} if l2 else set()
        stale = self._check_sequence(seq_num, snap_syms, ts_recv_ns, recv_seq, out)
        if trades is not None:
            self._apply_trades(trades, ts_recv_ns, recv_seq, out)
        elif quotes is not None:
            self._apply_quotes(quotes, stale, out)
        elif l2 is not None:
            self._apply_l2(l2, stale, ts_recv_ns, recv_seq, out)
        elif subs is not None:
            self._apply_subscriptions(subs, ts_recv_ns, recv_seq, out)
        elif not channel:
            out.unknown = True
        return out

    # ---- decoding (pure) -------------------------------------------------------------------
    @staticmethod
    def _decode_trades(events: list[Any]) -> list[_Trade]:
        trades: list[_Trade] = []
        for ev in events:
            for raw in reversed(_arr(_obj(ev, "event").get("trades"), "trades")):
                t = _obj(raw, "trade")
                tid_raw = t.get("trade_id")
                if _is_int(tid_raw):
                    tid_text = str(tid_raw)
                elif isinstance(tid_raw, str) and tid_raw:
                    tid_text = tid_raw
                else:
                    raise BadFrame("trade_id is not a string or integer")
                tid = int(tid_text) if tid_text.isascii() and tid_text.isdigit() else None
                side = t.get("side")
                trades.append((_text(t, "product_id"), tid_text, tid,
                               iso_to_ns(_text(t, "time")),
                               _TAKER_SIDE.get(side, UNKNOWN) if isinstance(side, str)
                               else UNKNOWN,
                               price(_number(t, "price")), amount(_number(t, "size"))))
        # Oldest first (the venue lists newest first); numeric ids strictly ascending.
        if all(t[2] is not None for t in trades):
            trades.sort(key=lambda t: (t[0], t[2]))
        return trades

    @staticmethod
    def _decode_tickers(events: list[Any], ts_event_ns: int, ts_recv_ns: int,
                        recv_seq: int) -> list[QuoteRow]:
        rows: list[QuoteRow] = []
        for ev in events:
            for raw in _arr(_obj(ev, "event").get("tickers"), "tickers"):
                t = _obj(raw, "ticker")
                bid_px, bid_sz = _side_of_book(t, "best_bid", "best_bid_quantity")
                ask_px, ask_sz = _side_of_book(t, "best_ask", "best_ask_quantity")
                rows.append((_text(t, "product_id"), ts_event_ns, ts_recv_ns, recv_seq,
                             bid_px, bid_sz, ask_px, ask_sz))
        return rows

    @staticmethod
    def _decode_l2(events: list[Any]) -> list[_L2Event]:
        decoded: list[_L2Event] = []
        for raw_ev in events:
            ev = _obj(raw_ev, "event")
            kind = ev.get("type")
            if kind != "snapshot" and kind != "update":
                raise BadFrame(f"l2_data event type {kind!r}")
            levels: list[_Level] = []
            last_time, last_ns = "", 0
            for raw in _arr(ev.get("updates"), "updates"):
                u = _obj(raw, "update")
                raw_side = u.get("side")
                side = _BOOK_SIDE.get(raw_side) if isinstance(raw_side, str) else None
                if side is None:
                    raise BadFrame(f"book side {raw_side!r}")
                t = _text(u, "event_time")
                if t != last_time:  # a snapshot's levels share one event_time
                    last_time, last_ns = t, iso_to_ns(t)
                levels.append((last_ns, side, price(_number(u, "price_level")),
                               amount(_number(u, "new_quantity"))))
            decoded.append(_L2Event(kind == "snapshot", _text(ev, "product_id"), levels))
        return decoded

    @staticmethod
    def _decode_subscriptions(events: list[Any]) -> frozenset[tuple[str, str]]:
        pairs: set[tuple[str, str]] = set()
        for ev in events:
            subs = _obj(_obj(ev, "event").get("subscriptions"), "subscriptions")
            for channel, products in subs.items():
                for p in _arr(products, "subscribed products"):
                    if isinstance(p, str):
                        pairs.add((channel, p))
        return frozenset(pairs)

    # ---- sequence and book resync ------------------------------------------------------------
    def _check_sequence(self, seq: int, snap_syms: set[str], ts_recv_ns: int, recv_seq: int,
                        out: Output) -> bool:
        """Check `sequence_num`; True if the frame is older than what was already seen."""
        expected = self._expected_seq
        if seq == expected:
            self._expected_seq = seq + 1
            return False
        if seq < expected:
            self.gap(out, None, ts_recv_ns, recv_seq,
                     f"sequence_num went back: expected {expected}, received {seq}")
            return True
        self.gap(out, None, ts_recv_ns, recv_seq,
                 f"sequence_num: expected {expected}, received {seq} "
                 f"({seq - expected} messages missing)")
        self._expected_seq = seq + 1
        # Any book may have lost an update: resync all but those this frame snapshots.
        resub = []
        for sym, book in self._books.items():
            if sym in snap_syms:
                continue
            book.synced = False
            if (book.asked_ns is None
                    or ts_recv_ns - book.asked_ns >= RESUBSCRIBE_MIN_INTERVAL_S * _NS):
                book.asked_ns = ts_recv_ns
                resub.append(sym)
        self._resubscribe_books(resub, out)
        return False

    def _resubscribe_books(self, symbols: list[str], out: Output) -> None:
        if symbols:
            out.reply(self._request("unsubscribe", CHANNEL_OF["book"], symbols))
            out.reply(self._request("subscribe", CHANNEL_OF["book"], symbols))

    # ---- applying --------------------------------------------------------------------------
    def _apply_trades(self, trades: list[_Trade], ts_recv_ns: int, recv_seq: int,
                      out: Output) -> None:
        rows: list[TradeRow] = []
        for sym, tid_text, tid, ts, side, px, qty in trades:
            if not self._want_trades or sym not in self.symbols:
                out.drop(DROP_UNSUBSCRIBED)
                continue
            ids = self._trade_ids.get(sym)
            if ids is None:
                ids = self._trade_ids[sym] = _TradeIds()
            if not self._is_new_trade(sym, ids, tid_text, tid, ts_recv_ns, recv_seq, out):
                out.drop(DROP_DUPLICATE_TRADE)
                continue
            rows.append((sym, ts, ts_recv_ns, recv_seq, tid_text, side, px, qty))
        if rows:
            out.trades = rows

    def _is_new_trade(self, sym: str, ids: _TradeIds, tid_text: str, tid: int | None,
                      ts_recv_ns: int, recv_seq: int, out: Output) -> bool:
        if tid is None:
            if tid_text in ids.text_seen:
                return False
            ids.text_seen.add(tid_text)
            ids.text_order.append(tid_text)
            if len(ids.text_order) > MAX_TEXT_TRADE_IDS:
                ids.text_seen.discard(ids.text_order.popleft())
            return True
        last = ids.last
        if last is None or tid > last:
            if last is not None and tid > last + 1:
                self.gap(out, sym, ts_recv_ns, recv_seq,
                         f"trade_id: expected {last + 1}, received {tid}")
                ids.missing.update(range(max(last + 1, tid - MAX_MISSING_TRADE_IDS), tid))
                if len(ids.missing) > MAX_MISSING_TRADE_IDS:
                    floor = tid - MAX_MISSING_TRADE_IDS
                    ids.missing = {i for i in ids.missing if i >= floor}
            ids.last = tid
            return True
        if tid in ids.missing:  # a trade skipped earlier, replayed now
            ids.missing.discard(tid)
            return True
        return False

    def _apply_quotes(self, quotes: list[QuoteRow], stale: bool, out: Output) -> None:
        rows = []
        for row in quotes:
            if not self._want_quotes or row[0] not in self.symbols:
                out.drop(DROP_UNSUBSCRIBED)
            elif stale:
                out.drop(DROP_OUT_OF_ORDER)
            else:
                rows.append(row)
        if rows:
            out.quotes = rows

    def _apply_l2(self, events: list[_L2Event], stale: bool, ts_recv_ns: int, recv_seq: int,
                  out: Output) -> None:
        rows: list[BookRow] = []
        resub: list[str] = []
        for ev in events:
            sym = ev.symbol
            book = self._books.get(sym)
            if book is None:
                out.drop(DROP_UNSUBSCRIBED)
                continue
            if stale:
                out.drop(DROP_STALE_BOOK)
                continue
            if ev.snapshot:
                for ts, side, px, qty in ev.levels:
                    rows.append((sym, ts, ts_recv_ns, recv_seq, True, side, px, qty, None))
                if book.ever_synced:
                    self.resync(out, sym, ts_recv_ns, recv_seq,
                                f"l2_data snapshot, {len(ev.levels)} levels")
                book.synced = book.ever_synced = True
                book.asked_ns = None
            elif book.synced:
                for ts, side, px, qty in ev.levels:
                    rows.append((sym, ts, ts_recv_ns, recv_seq, False, side, px, qty, None))
            else:
                out.drop(DROP_UNSYNCED_BOOK)
                if book.asked_ns is None:
                    book.asked_ns = ts_recv_ns  # start waiting from the first dropped update
                elif ts_recv_ns - book.asked_ns >= RESYNC_TIMEOUT_S * _NS:
                    book.asked_ns = ts_recv_ns
                    resub.append(sym)
        self._resubscribe_books(resub, out)
        if rows:
            out.book = rows

    def _apply_subscriptions(self, pairs: frozenset[tuple[str, str]], ts_recv_ns: int,
                             recv_seq: int, out: Output) -> None:
        for channel, sym in sorted(pairs - self._acked):
            if sym in self.symbols:
                self.subscribed(out, sym, ts_recv_ns, recv_seq, channel)
        self._acked = pairs

    def _venue_error(self, msg: dict[str, Any], ts_recv_ns: int, recv_seq: int) -> Output:
        out = Output()
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
        return out


def _side_of_book(t: dict[str, Any], px_key: str, qty_key: str
                  ) -> tuple[float | None, float | None]:
    """One side of a ticker's BBO; (None, None) when the venue reports that side empty."""
    px, qty = _number(t, px_key), _number(t, qty_key)
    if px == "" or float(px) == 0.0:
        if qty == "" or float(qty) == 0.0:
            return None, None
        raise BadFrame(f"{px_key} empty with {qty_key}={qty!r}")
    return price(px), amount(qty)
