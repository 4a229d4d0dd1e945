"""Kraken spot WebSocket v2 (`kraken`) codec: trades, best bid/ask and a checksummed L2 book.

Owns: the v2 subscribe / unsubscribe / ping messages, the decoding of `trade`, `ticker`
(subscribed with `event_trigger = "bbo"`, so every best bid/offer change is a row) and
`book` frames, the `status` / `heartbeat` / `pong` / ack frames, and Kraken's documented
local order-book procedure:

1. the book is subscribed with `depth` = `book_depth` (10, 25, 100, 500 or 1000; default
   25, the depth of the recorded fixtures and the smallest that still gives a ladder well
   beyond the 10 checksummed levels) and `snapshot = true`;
2. a `snapshot` replaces the book of its symbol (a snapshot block, one `recv_seq`);
   `update` levels set a price's absolute size (`qty` 0 removes it);
3. Kraken does **not** send deletions for levels pushed beyond the subscribed depth: after
   applying an update the client truncates each side to `depth`. The codec writes those
   removals as `amount = 0` rows, so the table alone rebuilds the exact book;
4. every snapshot and update carries `checksum`: CRC32 over the top 10 asks (ascending)
   then the top 10 bids (descending), each level as price text then qty text with "." removed
   and leading zeros stripped, **as sent**. Prices and sizes are bare JSON numbers and a
   float round-trip changes their text (`0.00005100` -> `5.1e-05`), so book frames are
   decoded with the number tokens kept raw (`msgspec.Raw`); trades and tickers are decoded
   straight to floats;
5. on a mismatch a `gap` event (expected vs computed checksum) is written, the symbol's
   book is unsubscribed and subscribed again (`Output.replies`), updates are dropped
   (counted) until the fresh snapshot, whose block is followed by a `resync` event. A
   snapshot that itself fails the checksum is retried `MAX_RESYNC_ATTEMPTS` times; then the
   book is kept unverified for the rest of the connection (an `error` event says so),
   rather than resubscribing forever.

Rows of one update frame are netted: one row per (side, price) touched by the frame,
carrying that level's size after the frame (0 when deleted or truncated), so applying the
rows of one `recv_seq` in any order gives the same book. `update_id` is null (v2 books carry
no sequence number; the checksum is the only continuity check).

Trades: `side` is the taker's side (checked against the data: the recorded `buy` at
83744.3 printed at the ask of the ticker of the same instant). `trade_id` is a per-pair
sequential integer: a trade at or below the highest id seen for its symbol is a replay (the
trade snapshot on every (re)subscribe) and is dropped (counted); a jump above it by more than
one writes a `gap` event with the number of missing trades.

Subscriptions: each channel is one `subscribe` for all symbols; Kraken acknowledges per
symbol (`subscribed` events). A refusal (`success: false`, e.g. "Currency pair not
supported XBT/USD") becomes a `refused` event, never an exception. Pings are
`{"method":"ping","req_id":N}` every `keepalive_interval_s`; pongs and heartbeats are
consumed silently. `status` frames become `status` events (system state, connection id).

Must not: do I/O, read a clock or log (see exchanges/base.py).
"""

from __future__ import annotations

import bisect
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

import msgspec

from ingestd.config import FeedConfig
from ingestd.exchanges.base import (
    DROP_DUPLICATE_TRADE,
    DROP_UNSUBSCRIBED,
    DROP_UNSYNCED_BOOK,
    BadFrame,
    Codec,
    Output,
    amount,
    iso_to_ns,
    price,
)
from ingestd.schema import ASK, BID, BUY, EV_ERROR, SELL, UNKNOWN, BookRow, QuoteRow, TradeRow

BOOK_DEPTHS: Final = (10, 25, 100, 500, 1000)
DEFAULT_BOOK_DEPTH: Final = 25
CHECKSUM_LEVELS: Final = 10
# Snapshots that fail their checksum in a row before the book is kept unverified.
MAX_RESYNC_ATTEMPTS: Final = 3
# Book updates dropped while waiting for a snapshot before the connection is recycled
# (a resubscription that never produced a snapshot).
MAX_UNSYNCED_UPDATES: Final = 1000

# req_id values of our requests, echoed by Kraken in acks and refusals.
REQ_TRADE: Final = 1
REQ_TICKER: Final = 2
REQ_BOOK: Final = 3
REQ_UNSUBSCRIBE_BOOK: Final = 4
REQ_PING_FIRST: Final = 1000
_REQ_CHANNEL: Final = {REQ_TRADE: "trade", REQ_TICKER: "ticker", REQ_BOOK: "book",
                       REQ_UNSUBSCRIBE_BOOK: "book"}

_SIDES: Final = {"buy": BUY, "sell": SELL}
_ALLOWED_SYMBOL_CHARS: Final = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


# ---- wire shapes (msgspec: typed, validating, unknown fields ignored) -------------------------
class _Envelope(msgspec.Struct):
    channel: str | None = None
    type: str | None = None
    data: msgspec.Raw = msgspec.Raw()
    method: str | None = None
    success: bool | None = None
    error: Any = None
    symbol: Any = None
    result: Any = None
    req_id: Any = None


class _Level(msgspec.Struct):
    price: msgspec.Raw
    qty: msgspec.Raw


class _BookData(msgspec.Struct):
    symbol: str
    bids: list[_Level] = msgspec.field(default_factory=list)
    asks: list[_Level] = msgspec.field(default_factory=list)
    checksum: int | None = None
    timestamp: str | None = None


class _Trade(msgspec.Struct):
    symbol: str
    side: str
    price: float
    qty: float
    trade_id: int
    timestamp: str | None = None


class _Ticker(msgspec.Struct):
    symbol: str
    bid: float | None = None
    bid_qty: float | None = None
    ask: float | None = None
    ask_qty: float | None = None
    timestamp: str | None = None


class _Status(msgspec.Struct):
    system: str | None = None
    version: str | None = None
    api_version: str | None = None
    connection_id: msgspec.Raw = msgspec.Raw()


_ENVELOPE = msgspec.json.Decoder(_Envelope)
_BOOK = msgspec.json.Decoder(list[_BookData])
_TRADES = msgspec.json.Decoder(list[_Trade])
_TICKERS = msgspec.json.Decoder(list[_Ticker])
_STATUS = msgspec.json.Decoder(list[_Status])
_ENCODE = msgspec.json.Encoder()

_DECODE_ERRORS: Final = (msgspec.DecodeError, BadFrame, KeyError, TypeError, ValueError,
                         IndexError, AttributeError, OverflowError, UnicodeDecodeError)


# ---- order book ------------------------------------------------------------------------
# A parsed level: (price, size, checksum fragment = price+qty text without "." and leading 0s)
_Parsed = tuple[float, float, bytes]


def _number(raw: msgspec.Raw) -> tuple[float, bytes]:
    """A JSON number token (or a quoted decimal) as (float, its text as sent)."""
    text = bytes(raw)
    if text[:1] == b'"':
        text = text[1:-1]
    return float(text), text


def _fragment(text: bytes) -> bytes:
    return text.replace(b".", b"").lstrip(b"0")


def _levels(raw: list[_Level]) -> list[_Parsed]:
    out = []
    for lv in raw:
        px, px_text = _number(lv.price)
        sz, sz_text = _number(lv.qty)
        out.append((price(px), amount(sz) or 0.0, _fragment(px_text) + _fragment(sz_text)))
    return out


class _Side:
    """One side of a book: levels by price and the prices in best-first order."""

    __slots__ = ("keys", "levels", "sign")

    def __init__(self, descending: bool) -> None:
        self.sign = -1.0 if descending else 1.0
        self.levels: dict[float, tuple[float, bytes]] = {}
        self.keys: list[float] = []  # sign * price, ascending: best first

    def set(self, px: float, sz: float, frag: bytes) -> None:
        if px not in self.levels:
            bisect.insort(self.keys, self.sign * px)
        self.levels[px] = (sz, frag)

    def remove(self, px: float) -> None:
        if self.levels.pop(px, None) is not None:
            k = self.sign * px
            del self.keys[bisect.bisect_left(self.keys, k)]

    def truncate(self, depth: int) -> list[float]:
        """Drop levels beyond `depth`; return their prices."""
        if len(self.keys) <= depth:
            return []
        sign = self.sign
        cut = [sign * k for k in self.keys[depth:]]
        del self.keys[depth:]
        for px in cut:
            del self.levels[px]
        return cut

    def top_fragments(self, n: int) -> list[bytes]:
        sign, levels = self.sign, self.levels
        return [levels[sign * k][1] for k in self.keys[:n]]

    def best_first(self) -> list[tuple[float, float]]:
        sign, levels = self.sign, self.levels
        return [(sign * k, levels[sign * k][0]) for k in self.keys]


@dataclass(slots=True)
class _Book:
    bids: _Side = field(default_factory=lambda: _Side(descending=True))
    asks: _Side = field(default_factory=lambda: _Side(descending=False))
    synced: bool = False
    ever_synced: bool = False
    resyncing: bool = False       # a resubscription was sent; waiting for its snapshot
    failed_snapshots: int = 0     # snapshots in a row that failed their checksum
    verify: bool = True           # checksum verification (off after MAX_RESYNC_ATTEMPTS)
    unsynced_drops: int = 0

    def clear(self) -> None:
        self.bids = _Side(descending=True)
        self.asks = _Side(descending=False)

    def checksum(self) -> int:
        parts = self.asks.top_fragments(CHECKSUM_LEVELS)
        parts += self.bids.top_fragments(CHECKSUM_LEVELS)
        return zlib.crc32(b"".join(parts))


def book_checksum(asks: Sequence[tuple[str, str]], bids: Sequence[tuple[str, str]]) -> int:
    """Kraken's CRC32 of a book given as (price text, qty text) best first (for tests/tools)."""
    frags = [_fragment(p.encode()) + _fragment(q.encode())
             for p, q in [*asks[:CHECKSUM_LEVELS], *bids[:CHECKSUM_LEVELS]]]
    return zlib.crc32(b"".join(frags))


class Kraken(Codec):
    exchange: ClassVar[str] = "kraken"
    default_ws_url: ClassVar[str] = "wss://ws.kraken.com/v2"
    # Kraken's heartbeat flows at ~1 Hz while anything is subscribed; an application ping
    # also keeps a connection with no accepted subscription observably alive.
    keepalive_interval_s: ClassVar[float | None] = 10.0
    default_stale_after_s: ClassVar[float] = 10.0
    ws_ping_interval_s: ClassVar[float | None] = 20.0
    # Kraken's edge (Cloudflare) is reported to allow about 150 connection attempts per
    # rolling 10 minutes per IP; 5 per 20 s can never exceed that.
    connect_limit: ClassVar[tuple[int, float]] = (5, 20.0)

    def __init__(self, feed: FeedConfig) -> None:
        super().__init__(feed)
        self.depth = feed.book_depth or DEFAULT_BOOK_DEPTH
        self._want_trades = "trades" in self.channels
        self._want_quotes = "quotes" in self.channels
        self._want_book = "book" in self.channels
        self._books: dict[str, _Book] = {}
        self._last_trade_id: dict[str, int] = {}
        self._ping_id = REQ_PING_FIRST

    # ---- config --------------------------------------------------------------------------
    @classmethod
    def check_feed(cls, feed: FeedConfig) -> list[str]:
        problems = []
        if feed.trade_stream is not None:
            problems.append(f"trade_stream: not used by {cls.exchange}")
        if feed.book_depth is not None and feed.book_depth not in BOOK_DEPTHS:
            problems.append(f"book_depth: {feed.book_depth} is not one of Kraken's depths "
                            f"{', '.join(map(str, BOOK_DEPTHS))}")
        for sym in feed.symbols:
            base, sep, quote = sym.partition("/")
            if (not sep or not base or not quote or "/" in quote
                    or not set(sym) - {"/"} <= _ALLOWED_SYMBOL_CHARS):
                problems.append(f"symbols: {sym!r} is not Kraken v2 spelling "
                                "(BASE/QUOTE, e.g. 'BTC/USD')")
            elif base == "XBT":
                problems.append(f"symbols: {sym!r}: Kraken v2 names bitcoin BTC "
                                f"(e.g. 'BTC/{quote}'), it refuses XBT pairs")
        return problems

    # ---- connection ------------------------------------------------------------------------
    def on_connect(self) -> None:
        # Kraken has no resume: every book is rebuilt from the snapshot of the new session.
        for book in self._books.values():
            book.synced = False
            book.resyncing = False
            book.failed_snapshots = 0
            book.verify = True
            book.unsynced_drops = 0
            book.clear()

    def subscribe_messages(self) -> Sequence[str]:
        syms = list(self.feed.symbols)
        msgs = []
        if self._want_trades:
            msgs.append(self._request("subscribe", {"channel": "trade", "symbol": syms,
                                                    "snapshot": True}, REQ_TRADE))
        if self._want_quotes:
            msgs.append(self._request("subscribe", {"channel": "ticker", "symbol": syms,
                                                    "event_trigger": "bbo",
                                                    "snapshot": True}, REQ_TICKER))
        if self._want_book:
            msgs.append(self._book_subscribe(syms))
        return msgs

    def keepalive_message(self) -> str | None:
        self._ping_id += 1
        return self._request("ping", None, self._ping_id)

    @staticmethod
    def _request(method: str, params: dict[str, Any] | None, req_id: int) -> str:
        msg: dict[str, Any] = {"method": method}
        if params is not None:
            msg["params"] = params
        msg["req_id"] = req_id
        return _ENCODE.encode(msg).decode()

    def _book_subscribe(self, syms: list[str]) -> str:
        return self._request("subscribe", {"channel": "book", "symbol": syms,
                                           "depth": self.depth, "snapshot": True}, REQ_BOOK)

    def _book_unsubscribe(self, syms: list[str]) -> str:
        return self._request("unsubscribe", {"channel": "book", "symbol": syms,
                                             "depth": self.depth}, REQ_UNSUBSCRIBE_BOOK)

    # ---- frames ----------------------------------------------------------------------------
    def parse(self, frame: bytes | str, ts_recv_ns: int, recv_seq: int) -> Output:
        out = Output()
        try:
            msg = _ENVELOPE.decode(frame)
            channel = msg.channel
            if channel is not None:
                if channel == "book":
                    self._book(msg, ts_recv_ns, recv_seq, out)
                elif channel == "trade":
                    self._trades(msg, ts_recv_ns, recv_seq, out)
                elif channel == "ticker":
                    self._quotes(msg, ts_recv_ns, recv_seq, out)
                elif channel == "heartbeat":
                    pass
                elif channel == "status":
                    self._status(msg, ts_recv_ns, recv_seq, out)
                else:
                    out.unknown = True
            elif msg.method is not None:
                self._response(msg, ts_recv_ns, recv_seq, out)
            else:
                out.unknown = True
        except _DECODE_ERRORS as e:
            fresh = Output()
            fresh.error = f"{type(e).__name__}: {e}"[:200]
            return fresh
        return out

    @staticmethod
    def _data(msg: _Envelope) -> bytes:
        data = bytes(msg.data)
        if not data:
            raise BadFrame(f"{msg.channel} frame without data")
        return data

    # ---- responses to our requests -------------------------------------------------------
    def _response(self, msg: _Envelope, ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        method = msg.method
        if method == "pong":
            return
        result = msg.result if isinstance(msg.result, dict) else {}
        channel = result.get("channel")
        if not isinstance(channel, str):
            channel = _REQ_CHANNEL.get(msg.req_id) if isinstance(msg.req_id, int) else None
        symbol = result.get("symbol", msg.symbol)
        symbol = symbol if isinstance(symbol, str) else None
        if msg.success is True:
            if method == "subscribe":
                detail = channel or "?"
                if channel == "book" and "depth" in result:
                    detail = f"book depth={result['depth']}"
                self.subscribed(out, symbol, ts_recv_ns, recv_seq, detail)
            elif method != "unsubscribe":
                out.unknown = True
            return
        if msg.success is not False:
            out.unknown = True
            return
        error = str(msg.error) if msg.error is not None else "no reason given"
        if method == "subscribe":
            self.refused(out, symbol, ts_recv_ns, recv_seq,
                         f"{channel}: {error}" if channel else error)
            book = self._books.get(symbol) if symbol is not None and channel == "book" else None
            if book is not None and book.resyncing:
                # Our own resubscription was refused: only a new connection can recover.
                out.reconnect = f"book resubscription for {symbol} refused: {error}"
        elif method == "unsubscribe":
            pass  # e.g. "Subscription Not Found"; the subscribe that follows decides
        else:
            self.venue_error(out, ts_recv_ns, recv_seq, f"{method}: {error}")

    def _status(self, msg: _Envelope, ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        for st in _STATUS.decode(self._data(msg)):
            parts = [f"system={st.system}"]
            if st.version is not None:
                parts.append(f"version={st.version}")
            if st.api_version is not None:
                parts.append(f"api_version={st.api_version}")
            conn_id = bytes(st.connection_id)
            if conn_id:
                parts.append(f"connection_id={conn_id.decode('ascii', 'replace')[:40]}")
            self.ev(out, "status", ts_recv_ns, recv_seq, None, " ".join(parts))

    # ---- trades ----------------------------------------------------------------------------
    def _trades(self, msg: _Envelope, ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        trades = _TRADES.decode(self._data(msg))
        if not self._want_trades:
            out.drop(DROP_UNSUBSCRIBED, len(trades))
            return
        if len(trades) > 1:
            trades.sort(key=lambda t: t.trade_id)  # the watermark needs ascending ids
        symbols = self.symbols
        rows: list[TradeRow] = []
        marks: dict[str, int] = {}
        gaps: list[tuple[str, int, int]] = []
        last_ids = self._last_trade_id
        for t in trades:
            sym = t.symbol
            if sym not in symbols:
                out.drop(DROP_UNSUBSCRIBED)
                continue
            tid = t.trade_id
            last = marks.get(sym, last_ids.get(sym))
            if last is not None:
                if tid <= last:
                    out.drop(DROP_DUPLICATE_TRADE)
                    continue
                if tid > last + 1:
                    gaps.append((sym, last, tid))
            rows.append((sym, iso_to_ns(t.timestamp) if t.timestamp is not None else None,
                         ts_recv_ns, recv_seq, str(tid), _SIDES.get(t.side, UNKNOWN),
                         price(t.price), amount(t.qty) or 0.0))
            marks[sym] = tid
        # Everything validated: commit.
        last_ids.update(marks)
        if rows:
            out.trades = rows
        for sym, last, tid in gaps:
            self.gap(out, sym, ts_recv_ns, recv_seq,
                     f"trade_id jumped from {last} to {tid}: {tid - last - 1} trades missing")

    # ---- quotes ----------------------------------------------------------------------------
    def _quotes(self, msg: _Envelope, ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        tickers = _TICKERS.decode(self._data(msg))
        if not self._want_quotes:
            out.drop(DROP_UNSUBSCRIBED, len(tickers))
            return
        rows: list[QuoteRow] = []
        for t in tickers:
            if t.symbol not in self.symbols:
                out.drop(DROP_UNSUBSCRIBED)
                continue
            bid_px, bid_sz = _quote_side(t.bid, t.bid_qty)
            ask_px, ask_sz = _quote_side(t.ask, t.ask_qty)
            ts = iso_to_ns(t.timestamp) if t.timestamp is not None else None
            rows.append((t.symbol, ts, ts_recv_ns, recv_seq, bid_px, bid_sz, ask_px, ask_sz))
        if rows:
            out.quotes = rows

    # ---- order book ------------------------------------------------------------------------
    def _book(self, msg: _Envelope, ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        kind = msg.type
        if kind != "snapshot" and kind != "update":
            out.unknown = True
            return
        entries = _BOOK.decode(self._data(msg))
        if not self._want_book:
            out.drop(DROP_UNSUBSCRIBED, len(entries))
            return
        # Validate everything before touching any book.
        parsed = []
        for e in entries:
            if e.symbol not in self.symbols:
                out.drop(DROP_UNSUBSCRIBED)
                continue
            ts = iso_to_ns(e.timestamp) if e.timestamp is not None else None
            parsed.append((e.symbol, _levels(e.bids), _levels(e.asks), e.checksum, ts))
        rows: list[BookRow] = []
        for sym, bids, asks, checksum, ts in parsed:
            book = self._books.get(sym)
            if book is None:
                book = self._books[sym] = _Book()
            if kind == "snapshot":
                self._snapshot(sym, book, bids, asks, checksum, ts, ts_recv_ns, recv_seq,
                               out, rows)
            elif not book.synced:
                out.drop(DROP_UNSYNCED_BOOK)
                book.unsynced_drops += 1
                if book.unsynced_drops >= MAX_UNSYNCED_UPDATES and out.reconnect is None:
                    out.reconnect = (f"book {sym}: no snapshot after {book.unsynced_drops} "
                                     "updates")
            else:
                self._update(sym, book, bids, asks, checksum, ts, ts_recv_ns, recv_seq,
                             out, rows)
        if rows:
            out.book = rows

    def _mismatch(self, book: _Book, checksum: int | None) -> int | None:
        """The computed checksum if it disagrees with the venue's, else None."""
        if checksum is None or not book.verify:
            return None
        computed = book.checksum()
        return computed if computed != checksum else None

    def _resubscribe(self, sym: str, book: _Book, out: Output) -> None:
        book.synced = False
        book.resyncing = True
        book.unsynced_drops = 0
        book.clear()
        out.reply(self._book_unsubscribe([sym]))
        out.reply(self._book_subscribe([sym]))

    def _snapshot(self, sym: str, book: _Book, bids: list[_Parsed], asks: list[_Parsed],
                  checksum: int | None, ts: int | None, ts_recv_ns: int, recv_seq: int,
                  out: Output, rows: list[BookRow]) -> None:
        book.clear()
        for side, levels in ((book.bids, bids), (book.asks, asks)):
            for px, sz, frag in levels:
                if sz:
                    side.set(px, sz, frag)
            side.truncate(self.depth)
        bad = self._mismatch(book, checksum)
        if bad is not None:
            book.failed_snapshots += 1
            detail = f"snapshot checksum mismatch: expected {checksum}, computed {bad}"
            if book.failed_snapshots <= MAX_RESYNC_ATTEMPTS:
                self.gap(out, sym, ts_recv_ns, recv_seq, detail)
                self._resubscribe(sym, book, out)
                return
            book.verify = False
            self.ev(out, EV_ERROR, ts_recv_ns, recv_seq, sym,
                    f"{detail} after {MAX_RESYNC_ATTEMPTS} resubscriptions; "
                    "book kept without checksum verification until reconnect")
        else:
            book.failed_snapshots = 0
        for px, sz in book.bids.best_first():
            rows.append((sym, ts, ts_recv_ns, recv_seq, True, BID, px, sz, None))
        for px, sz in book.asks.best_first():
            rows.append((sym, ts, ts_recv_ns, recv_seq, True, ASK, px, sz, None))
        if book.ever_synced or book.resyncing:
            why = "after checksum gap" if book.resyncing else "after reconnect"
            self.resync(out, sym, ts_recv_ns, recv_seq, f"book snapshot {why}")
        book.synced = book.ever_synced = True
        book.resyncing = False
        book.unsynced_drops = 0

    def _update(self, sym: str, book: _Book, bids: list[_Parsed], asks: list[_Parsed],
                checksum: int | None, ts: int | None, ts_recv_ns: int, recv_seq: int,
                out: Output, rows: list[BookRow]) -> None:
        touched: dict[tuple[str, float], None] = {}
        depth = self.depth
        for side_name, side, levels in ((BID, book.bids, bids), (ASK, book.asks, asks)):
            for px, sz, frag in levels:
                if sz:
                    side.set(px, sz, frag)
                else:
                    side.remove(px)
                touched[(side_name, px)] = None
        for side_name, side in ((BID, book.bids), (ASK, book.asks)):
            for px in side.truncate(depth):
                touched[(side_name, px)] = None
        bad = self._mismatch(book, checksum)
        if bad is not None:
            self.gap(out, sym, ts_recv_ns, recv_seq,
                     f"checksum mismatch: expected {checksum}, computed {bad}")
            self._resubscribe(sym, book, out)
            return
        bid_levels, ask_levels = book.bids.levels, book.asks.levels
        for side_name, px in touched:
            lv = (bid_levels if side_name == BID else ask_levels).get(px)
            rows.append((sym, ts, ts_recv_ns, recv_seq, False, side_name, px,
                         lv[0] if lv is not None else 0.0, None))

    # ---- introspection (tests, tools) ------------------------------------------------------
    def book_levels(self, symbol: str) -> tuple[list[tuple[float, float]],
                                                list[tuple[float, float]]] | None:
        """The maintained (bids, asks) of a synced symbol, best first; None if not synced."""
        book = self._books.get(symbol)
        if book is None or not book.synced:
            return None
        return book.bids.best_first(), book.asks.best_first()


def _quote_side(px: float | None, sz: float | None) -> tuple[float | None, float | None]:
    """A best bid or ask; (None, None) when that side is empty (absent or zero)."""
    if px is None or sz is None or (px == 0 and sz == 0):
        return None, None
    return price(px), amount(sz)
