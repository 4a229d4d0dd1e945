"""Kraken spot WebSocket v2 (`kraken`) codec: trades, best bid/ask and a checksummed L2 book.

Owns: Kraken's wire format and rules - the v2 subscribe / unsubscribe / ping messages, the
decoding (typed msgspec structs, one tagged union on `channel`) of `trade`, `ticker`
(subscribed with `event_trigger = "bbo"`, so every best bid/offer change is a row) and
`book` frames, the `status` / `heartbeat` / `pong` / ack frames, and Kraken's documented
local order-book procedure, run on the shared `BookSync` (channel snapshots, no ids:
`rules=None`; levels kept with their text, truncated to `depth`, verified by `_verify`):

1. the book is subscribed with `depth` = `book_depth` (10, 25, 100, 500 or 1000; default
   25, the depth of the recorded fixtures and the smallest that still gives a ladder well
   beyond the 10 checksummed levels) and `snapshot = true`;
2. a `snapshot` replaces the book of its symbol (a snapshot block, one `recv_seq`; levels
   beyond `depth` are not kept); `update` levels set a price's absolute size (`qty` 0
   removes it);
3. Kraken does **not** send deletions for levels pushed beyond the subscribed depth: after
   applying an update the client truncates each side to `depth`. The codec writes those
   removals as `amount = 0` rows, so the table alone rebuilds the exact book;
4. every snapshot and update carries `checksum`: CRC32 over the top 10 asks (ascending)
   then the top 10 bids (descending), each level as price text then qty text with "." removed
   and leading zeros stripped, **as sent**. Prices and sizes are bare JSON numbers and a
   float round-trip changes their text (`0.00005100` -> `5.1e-05`), so book levels are
   decoded with the number tokens kept raw (`msgspec.Raw`) and the book keeps that text;
   trades and tickers are decoded straight to floats. The checksum is the only continuity
   check (v2 books carry no sequence number; `update_id` is null): an update is applied
   and truncated, then compared;
5. on a mismatch a `gap` event (expected vs computed checksum) is written (the frame's
   rows are not: `book_checksum_mismatch`), the symbol's book is unsubscribed and
   subscribed again (`Output.replies`), updates are dropped (counted, `book_not_synced`)
   until the fresh snapshot, whose block is followed by a `resync` event. A snapshot that
   itself fails the checksum is retried `MAX_VERIFY_FAILURES` times; then the book is
   kept unverified for the rest of the connection (an `error` event says so), rather
   than resubscribing forever (BookSync's rule). Updates
   before the first snapshot of a connection's subscription are dropped without a
   resubscription (the subscription brings the snapshot); if it does not come, the
   shared rule of `BookSync` resubscribes (exchanges/book.py, SNAPSHOT_WAIT_S).

Rows of one update frame are netted: one row per (side, price) touched by the frame,
carrying that level's size after the frame (0 when deleted or truncated), so applying the
rows of one `recv_seq` in any order gives the same book.

Trades: `side` is the taker's side (checked against the data: the recorded `buy` at
83744.3 printed at the ask of the ticker of the same instant). `trade_id` is a per-pair
sequential integer, de-duplicated exactly by the shared `TradeIds` (consecutive ids): a
replayed id (the trade snapshot on every (re)subscribe) is dropped (counted,
`duplicate_trade`), a jump writes a `gap` event with the number of missing trades, and a
never-seen id below the highest seen is stored with an `out_of_order` event. The trades of
one frame are taken in id order (Kraken's trade snapshot lists the newest first).

Subscriptions: each channel is one `subscribe` for all symbols; Kraken acknowledges per
symbol (`subscribed` events). A refusal (`success: false`, e.g. "Currency pair not
supported XBT/USD") becomes a `refused` event, never an exception; a refusal of our own
book resubscription recycles the connection. Pings are `{"method":"ping","req_id":N}`
every `keepalive_interval_s`; pongs and heartbeats are consumed silently. `status` frames
become `status` events (system state, connection id).

Connections: Kraken has no resume, so `on_connect` forgets every book (trade ids are
kept: the trade snapshot of the new subscription is de-duplicated).

State (`state()` / `restore()`): trade ids (`trades`), and every book's sync position,
what it waits for, its checksum standing and its levels with their text as sent
(`books`, so a restored book keeps verifying checksums).

Must not: do I/O, read a clock or log (see exchanges/base.py); catch decode errors itself
(the base rejects the frame); change any state before a frame is known to be well-formed.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from itertools import chain
from typing import Annotated, Any, ClassVar, Final, Literal, TypeVar

import msgspec

from ingestd.config import FeedConfig
from ingestd.exchanges.base import (
    DROP_UNSUBSCRIBED,
    BadFrame,
    Codec,
    Output,
    amount,
    iso_to_ns,
    parse_levels,
    price,
    quote_side,
)
from ingestd.exchanges.book import SYNCED, BookSync, Diff, Levels, SymbolBook, TextLevels
from ingestd.exchanges.trades import TradeIds, admit_trade
from ingestd.schema import BUY, SELL, UNKNOWN

BOOK_DEPTHS: Final = (10, 25, 100, 500, 1000)
DEFAULT_BOOK_DEPTH: Final = 25
CHECKSUM_LEVELS: Final = 10

# req_id values of our requests, echoed by Kraken in acks and refusals.
REQ_TRADE: Final = 1
REQ_TICKER: Final = 2
REQ_BOOK: Final = 3
REQ_UNSUBSCRIBE_BOOK: Final = 4
REQ_PING_FIRST: Final = 1000
_REQ_CHANNEL: Final = {REQ_TRADE: "trade", REQ_TICKER: "ticker", REQ_BOOK: "book",
                       REQ_UNSUBSCRIBE_BOOK: "book"}

_SIDES: Final = {"buy": BUY, "sell": SELL}

_MAX_I64: Final = 2**63 - 1
TradeId = Annotated[int, msgspec.Meta(ge=0, le=_MAX_I64)]
Crc32 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFFFF)]
# What a quoted level number may hold (Kraken sends bare JSON numbers; float() alone would
# also take "1_000", " 1", "inf").
_JSON_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")


# ---- wire structs (unknown fields ignored) --------------------------------------------------
class _Level(msgspec.Struct):
    price: msgspec.Raw
    qty: msgspec.Raw


class _BookData(msgspec.Struct):
    symbol: str
    bids: list[_Level] = msgspec.field(default_factory=list)
    asks: list[_Level] = msgspec.field(default_factory=list)
    checksum: Crc32 | None = None
    timestamp: str | None = None


class _Trade(msgspec.Struct):
    symbol: str
    side: str
    price: float
    qty: float
    trade_id: TradeId
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


class _BookMsg(msgspec.Struct, tag_field="channel", tag="book"):
    type: Literal["snapshot", "update"]
    data: list[_BookData]


class _TradeMsg(msgspec.Struct, tag_field="channel", tag="trade"):
    data: list[_Trade]


class _TickerMsg(msgspec.Struct, tag_field="channel", tag="ticker"):
    data: list[_Ticker]


class _StatusMsg(msgspec.Struct, tag_field="channel", tag="status"):
    data: list[_Status]


class _Heartbeat(msgspec.Struct, tag_field="channel", tag="heartbeat"):
    pass


_Channel = _BookMsg | _TradeMsg | _TickerMsg | _StatusMsg | _Heartbeat
_E = TypeVar("_E", _BookData, _Trade, _Ticker)  # the entries of a data message


class _Envelope(msgspec.Struct):
    """Any frame, loosely: responses to our requests, and the generic path's dispatch."""

    channel: str | None = None
    type: str | None = None
    method: str | None = None
    success: bool | None = None
    error: Any = None
    symbol: Any = None
    result: Any = None
    req_id: Any = None


_FRAME = msgspec.json.Decoder(_Channel)
_ENVELOPE = msgspec.json.Decoder(_Envelope)
# One strict decoder per channel: on the generic path they raise with a precise reason.
_STRICT: Final[dict[str, msgspec.json.Decoder[Any]]] = {
    "book": msgspec.json.Decoder(_BookMsg), "trade": msgspec.json.Decoder(_TradeMsg),
    "ticker": msgspec.json.Decoder(_TickerMsg), "status": msgspec.json.Decoder(_StatusMsg),
    "heartbeat": msgspec.json.Decoder(_Heartbeat)}
_ENCODE = msgspec.json.Encoder()


# ---- checksums -------------------------------------------------------------------------------
def _token(raw: msgspec.Raw) -> str:
    """A level number's JSON token as sent (a quoted decimal without its quotes)."""
    text = bytes(raw).decode()
    if text[:1] == '"':
        text = text[1:-1]
        if _JSON_NUMBER.fullmatch(text) is None:
            raise BadFrame(f"not a number: {text!r}"[:80])
    return text


def _levels(raw: list[_Level]) -> tuple[Levels, TextLevels]:
    """Levels as floats (prices > 0, sizes >= 0, else BadFrame) and as the text sent."""
    texts = [(_token(lv.price), _token(lv.qty)) for lv in raw]
    return parse_levels(texts), texts


_SEP: Final = "\x00"  # between numbers while checksumming: no number's text holds it
_LEADING_ZEROS: Final = re.compile(_SEP + "0+")


def _crc(asks: TextLevels, bids: TextLevels) -> int:
    """Kraken's CRC32 over the top asks then the top bids, given best first as sent: each
    number's text with "." removed and leading zeros stripped (on one joined string, not
    per number: this runs on every update)."""
    joined = _SEP + _SEP.join(chain.from_iterable((*asks[:CHECKSUM_LEVELS],
                                                   *bids[:CHECKSUM_LEVELS])))
    stripped = _LEADING_ZEROS.sub(_SEP, joined.replace(".", "")).replace(_SEP, "")
    return zlib.crc32(stripped.encode())


def book_checksum(asks: Sequence[tuple[str, str]], bids: Sequence[tuple[str, str]]) -> int:
    """Kraken's CRC32 of a book given as (price text, qty text) best first (for tests/tools)."""
    return _crc(list(asks), list(bids))


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
    book_depths: ClassVar[tuple[int, ...]] = BOOK_DEPTHS
    book_depth_note: ClassVar[str] = "Kraken's book depths"
    symbol_pattern: ClassVar[re.Pattern[str] | None] = re.compile(
        r"[A-Za-z0-9._-]+/[A-Za-z0-9._-]+")
    symbol_spelling: ClassVar[str] = "Kraken v2 spelling (BASE/QUOTE, e.g. 'BTC/USD')"

    def __init__(self, feed: FeedConfig) -> None:
        super().__init__(feed)
        self.depth = feed.book_depth or DEFAULT_BOOK_DEPTH
        self._want_trades = "trades" in self.channels
        self._want_quotes = "quotes" in self.channels
        self._want_book = "book" in self.channels
        self.trade_ids = self.stateful("trades", TradeIds(consecutive=True))
        self.books = self.stateful("books", BookSync(
            self, None, resubscribe=self._resubscribe, keep_text=True, depth=self.depth,
            verify=self._verify))
        self._book_symbols = tuple(feed.symbols) if self._want_book else ()
        self.books.reset(expect=self._book_symbols)
        self._ping_id = REQ_PING_FIRST

    # ---- config --------------------------------------------------------------------------
    @classmethod
    def check_feed(cls, feed: FeedConfig) -> list[str]:
        problems = super().check_feed(feed)
        for sym in feed.symbols:
            base, _, quote = sym.partition("/")
            if base == "XBT" and cls.symbol_pattern and cls.symbol_pattern.fullmatch(sym):
                problems.append(f"symbols: {sym!r}: Kraken v2 names bitcoin BTC "
                                f"(e.g. 'BTC/{quote}'), it refuses XBT pairs")
        return problems

    # ---- connection ------------------------------------------------------------------------
    def on_connect(self) -> None:
        # Kraken has no resume: every book is rebuilt from the snapshot of the new session,
        # which its subscription brings. Trade ids are kept (replays are de-duplicated).
        self.books.reset(expect=self._book_symbols)

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

    def _resubscribe(self, syms: list[str], out: Output) -> None:
        """Ask for fresh snapshots of these books (BookSync's `resubscribe`)."""
        out.reply(self._book_unsubscribe(syms))
        out.reply(self._book_subscribe(syms))

    # ---- frames ----------------------------------------------------------------------------
    def parse_frame(self, frame: bytes | str, ts_recv_ns: int, recv_seq: int,
                    out: Output) -> None:
        try:
            msg: Any = _FRAME.decode(frame)
        except (msgspec.ValidationError, msgspec.DecodeError):
            msg = self._generic(frame, ts_recv_ns, recv_seq, out)
            if msg is None:
                return
        cls = type(msg)
        if cls is _BookMsg:
            self._book(msg, ts_recv_ns, recv_seq, out)
        elif cls is _TradeMsg:
            self._trades(msg, ts_recv_ns, recv_seq, out)
        elif cls is _TickerMsg:
            self._quotes(msg, ts_recv_ns, recv_seq, out)
        elif cls is _StatusMsg:
            self._status(msg, ts_recv_ns, recv_seq, out)
        # _Heartbeat: nothing to do

    def _generic(self, frame: bytes | str, ts_recv_ns: int, recv_seq: int,
                 out: Output) -> msgspec.Struct | None:
        """Frames off the fast path: responses to our requests, unknown kinds, and bad
        frames (which raise here with a precise reason)."""
        msg = _ENVELOPE.decode(frame)
        channel = msg.channel
        if channel is not None:
            strict = _STRICT.get(channel)
            if strict is None or (channel == "book" and msg.type not in ("snapshot",
                                                                          "update")):
                out.unknown += 1  # ohlc, instrument, level3, ...: never subscribed by us
                return None
            decoded: msgspec.Struct = strict.decode(frame)
            return decoded
        if msg.method is not None:
            self._response(msg, ts_recv_ns, recv_seq, out)
        else:
            out.unknown += 1
        return None

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
                out.unknown += 1
            return
        if msg.success is not False:
            out.unknown += 1
            return
        error = str(msg.error) if msg.error is not None else "no reason given"
        if method == "subscribe":
            self.refused(out, symbol, ts_recv_ns, recv_seq,
                         f"{channel}: {error}" if channel else error)
            if channel == "book" and symbol is not None and self.books.requested(symbol):
                # Our own resubscription was refused: only a new connection can recover.
                out.reconnect = f"book resubscription for {symbol} refused: {error}"
        elif method == "unsubscribe":
            pass  # e.g. "Subscription Not Found"; the subscribe that follows decides
        else:
            self.venue_error(out, ts_recv_ns, recv_seq, f"{method}: {error}")

    def _status(self, msg: _StatusMsg, ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        for st in msg.data:
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
    def _trades(self, msg: _TradeMsg, ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        trades = msg.data
        if len(trades) > 1:
            trades = sorted(trades, key=lambda t: t.trade_id)  # a snapshot is newest first
        # The hot path: one loop filters and checks (no helper call, no comprehension).
        symbols = self.symbols if self._want_trades else frozenset()
        unsubscribed = 0
        checked = []
        for t in trades:
            if t.symbol in symbols:
                checked.append((t.symbol,
                                iso_to_ns(t.timestamp) if t.timestamp is not None else None,
                                t.trade_id, _SIDES.get(t.side, UNKNOWN), price(t.price),
                                amount(t.qty) or 0.0))
            else:
                unsubscribed += 1
        if unsubscribed:
            out.drop(DROP_UNSUBSCRIBED, unsubscribed)
        # Everything validated: record the ids.
        ids = self.trade_ids
        block = None
        for sym, ts, tid, side, px, qty in checked:
            if admit_trade(self, out, ids, sym, tid, ts_recv_ns, recv_seq):
                if block is None:
                    block = out.trades_block()
                block.add(sym, ts, ts_recv_ns, recv_seq, str(tid), side, px, qty)

    def _subscribed(self, entries: list[_E], want: bool) -> tuple[list[_E], int]:
        """The entries of a frame for the feed's symbols (none if the channel is not
        wanted), and how many others there are (dropped once the frame is validated)."""
        if not want:
            return [], len(entries)
        if len(entries) == 1:  # the common frame: no list to build
            return (entries, 0) if entries[0].symbol in self.symbols else ([], 1)
        symbols = self.symbols
        kept = [e for e in entries if e.symbol in symbols]
        return kept, len(entries) - len(kept)

    # ---- quotes ----------------------------------------------------------------------------
    def _quotes(self, msg: _TickerMsg, ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        tickers, unsubscribed = self._subscribed(msg.data, self._want_quotes)
        rows = []
        for t in tickers:
            rows.append((t.symbol, iso_to_ns(t.timestamp) if t.timestamp is not None else None,
                         *quote_side(t.bid, t.bid_qty), *quote_side(t.ask, t.ask_qty)))
        if unsubscribed:
            out.drop(DROP_UNSUBSCRIBED, unsubscribed)
        if rows:
            block = out.quotes_block()
            for sym, ts, bid_px, bid_sz, ask_px, ask_sz in rows:
                block.add(sym, ts, ts_recv_ns, recv_seq, bid_px, bid_sz, ask_px, ask_sz)

    # ---- order book ------------------------------------------------------------------------
    def _book(self, msg: _BookMsg, ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        entries, unsubscribed = self._subscribed(msg.data, self._want_book)
        # Validate everything before touching any book.
        parsed = [(e.symbol, _levels(e.bids), _levels(e.asks), e.checksum,
                   iso_to_ns(e.timestamp) if e.timestamp is not None else None)
                  for e in entries]
        if unsubscribed:
            out.drop(DROP_UNSUBSCRIBED, unsubscribed)
        snapshot = msg.type == "snapshot"
        for sym, (bids, bid_texts), (asks, ask_texts), checksum, ts in parsed:
            if snapshot:
                self._snapshot(sym, bids, bid_texts, asks, ask_texts, checksum, ts,
                               ts_recv_ns, recv_seq, out)
            else:
                self._update(sym, bids, bid_texts, asks, ask_texts, checksum, ts,
                             ts_recv_ns, recv_seq, out)

    def _snapshot(self, sym: str, bids: Levels, bid_texts: TextLevels, asks: Levels,
                  ask_texts: TextLevels, checksum: int | None, ts: int | None,
                  ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        books = self.books
        book = books.book(sym)
        if book.after_gap:
            why = "after checksum gap"  # a resync even if no snapshot verified before
        elif book.status == SYNCED:  # the venue replaced a book we were keeping
            why = "replacing a synced book"
        elif books.requested(sym):
            why = "after resubscription"
        else:
            why = "after reconnect"
        books.snapshot(sym, out, ts_event_ns=ts, ts_recv_ns=ts_recv_ns, recv_seq=recv_seq,
                       bids=bids, asks=asks, snapshot_id=None, update_id=None,
                       texts=(bid_texts, ask_texts), check=checksum,
                       detail=f"book snapshot {why}")

    def _update(self, sym: str, bids: Levels, bid_texts: TextLevels, asks: Levels,
                ask_texts: TextLevels, checksum: int | None, ts: int | None,
                ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        # Applied, truncated to depth, then verified: the checksum is the continuity check.
        self.books.diff(sym, Diff(0, 0, -1, None, ts, ts_recv_ns, bids, asks, 0,
                                  (bid_texts, ask_texts), checksum), out, recv_seq)

    @staticmethod
    def _verify(book: SymbolBook, checksum: int, snapshot: bool) -> str | None:
        """BookSync's `verify`: Kraken's CRC32 of the book as kept against the one sent."""
        assert book.bids is not None and book.asks is not None
        computed = _crc(book.asks.top_text(CHECKSUM_LEVELS), book.bids.top_text(CHECKSUM_LEVELS))
        if computed == checksum:
            return None
        return (f"{'snapshot ' if snapshot else ''}checksum mismatch: expected {checksum}, "
                f"computed {computed}")

    # ---- introspection (tests, tools) ------------------------------------------------------
    def book_levels(self, symbol: str) -> tuple[Levels, Levels] | None:
        """The maintained (bids, asks) of a synced symbol, best first; None if not synced."""
        if not self.books.synced(symbol):
            return None
        book = self.books.book(symbol)
        assert book.bids is not None and book.asks is not None
        return book.bids.top(), book.asks.top()

