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
the taker sold. Duplicate or older trade ids per symbol are dropped (counted).

Must not: do I/O, read a clock or log (see exchanges/base.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson

from ingestd.config import FeedConfig
from ingestd.exchanges.base import (
    DROP_BUFFER_OVERFLOW,
    DROP_DUPLICATE_TRADE,
    DROP_STALE_BOOK,
    DROP_UNSUBSCRIBED,
    BadFrame,
    Codec,
    Output,
    RestRequest,
    amount,
    ms_to_ns,
    price,
)
from ingestd.schema import ASK, BID, BUY, SELL, BookRow, TradeRow

MAX_STREAMS_PER_CONNECTION = 1024
_INF = float("inf")
_MAX_MS = (2**63 - 1) // 1_000_000
MAX_BUFFERED_DIFFS = 10_000
SNAPSHOT_RETRY_MIN_S = 0.5
SNAPSHOT_RETRY_MAX_S = 30.0

Levels = list[tuple[float, float]]


@dataclass(slots=True)
class _Diff:
    first_id: int      # U
    last_id: int       # u
    prev_id: int       # pu (USD-M only; -1 on spot)
    ts_event_ns: int | None
    ts_recv_ns: int
    bids: Levels
    asks: Levels


@dataclass(slots=True)
class _BookState:
    synced: bool = False
    ever_synced: bool = False
    awaiting_snapshot: bool = False
    snapshot_attempts: int = 0
    last_id: int = 0          # u of the last applied diff (or the snapshot's lastUpdateId)
    first_after_snapshot: bool = False
    buffer: list[_Diff] = field(default_factory=list)


def _levels(raw: Any) -> Levels:
    """[[price, size], ...] decimal strings -> floats; every price finite and > 0, every
    size finite and >= 0 (else BadFrame). One pass of conversions, one pass of checks:
    cheaper than a checked conversion per value on the book hot path."""
    levels = [(float(p), float(q)) for p, q in raw]
    for px, sz in levels:
        if not (0.0 < px < _INF and 0.0 <= sz < _INF):
            price(px)
            amount(sz)  # raise with the offending value
    return levels


class BinanceSpot(Codec):
    exchange: ClassVar[str] = "binance"
    default_ws_url: ClassVar[str] = "wss://stream.binance.com:9443/stream"
    default_rest_url: ClassVar[str | None] = "https://api.binance.com"
    depth_path: ClassVar[str] = "/api/v3/depth"
    default_depth_limit: ClassVar[int] = 1000
    max_depth_limit: ClassVar[int] = 5000
    # Binance pings every 20 s and expects pongs (websockets answers them); our own pings
    # detect a dead TCP path sooner than the venue's 1-minute pong timeout.
    ws_ping_interval_s: ClassVar[float | None] = 20.0
    default_stale_after_s: ClassVar[float] = 30.0
    # Binance closes connections at 24 h: rotate (make-before-break) after 23 h.
    default_rotate_after_s: ClassVar[float | None] = 82_800.0
    # "300 connections per attempt every 5 minutes per IP".
    connect_limit: ClassVar[tuple[int, float]] = (300, 300.0)

    def __init__(self, feed: FeedConfig) -> None:
        super().__init__(feed)
        self.trade_stream = feed.trade_stream or "trade"
        self.depth_limit = feed.book_depth or self.default_depth_limit
        self._books: dict[str, _BookState] = {}
        self._last_trade_id: dict[str, int] = {}
        self._last_quote_id: dict[str, int] = {}
        self._want_book = "book" in self.channels

    # ---- config --------------------------------------------------------------------------
    @classmethod
    def check_feed(cls, feed: FeedConfig) -> list[str]:
        problems = []
        if feed.trade_stream not in (None, "trade", "aggTrade"):
            problems.append(f"trade_stream: {feed.trade_stream!r} is not one of "
                            "'trade', 'aggTrade'")
        if feed.book_depth is not None and not 5 <= feed.book_depth <= cls.max_depth_limit:
            problems.append(f"book_depth: REST snapshot limit must be 5..{cls.max_depth_limit}")
        for sym in feed.symbols:
            if not (sym.isascii() and sym.isalnum() and sym.upper() == sym):
                problems.append(f"symbols: {sym!r} is not Binance-native (e.g. 'BTCUSDT')")
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
        for state in self._books.values():
            state.synced = False
            state.awaiting_snapshot = False
            state.snapshot_attempts = 0
            state.buffer.clear()

    def on_rotate(self) -> None:
        # Same streams, same ids on the new connection: keep books, trade and quote ids;
        # the overlap is dropped as duplicates / already-applied diffs.
        pass

    def subscribe_messages(self) -> Sequence[str]:
        return ()  # the combined-stream URL carries the subscription

    # ---- frames ----------------------------------------------------------------------------
    def parse(self, frame: bytes | str, ts_recv_ns: int, recv_seq: int) -> Output:
        out = Output()
        try:
            msg = orjson.loads(frame)
            if not isinstance(msg, dict):
                raise BadFrame("not a JSON object")
            data = msg.get("data", msg)
            if not isinstance(data, dict):
                raise BadFrame("data is not an object")
            kind = data.get("e")
            if kind == "trade" or kind == "aggTrade":
                self._trade(data, kind, ts_recv_ns, recv_seq, out)
            elif kind == "depthUpdate":
                self._diff(data, ts_recv_ns, recv_seq, out)
            elif kind == "bookTicker" or (kind is None and "b" in data and "A" in data):
                self._quote(data, ts_recv_ns, recv_seq, out)
            elif kind == "serverShutdown":
                self.ev(out, "server_shutdown", ts_recv_ns, recv_seq, None,
                        "venue announced shutdown", ms_to_ns(data["E"]))
                out.reconnect = "serverShutdown"
            elif "result" in msg and "id" in msg:
                pass  # ack of a SUBSCRIBE / property request
            elif "code" in msg and "msg" in msg:
                self.venue_error(out, ts_recv_ns, recv_seq, f"{msg['code']}: {msg['msg']}")
            else:
                out.unknown = True
        except (orjson.JSONDecodeError, BadFrame, KeyError, TypeError, ValueError,
                IndexError, AttributeError, OverflowError) as e:
            fresh = Output()
            fresh.error = f"{type(e).__name__}: {e}"[:200]
            return fresh
        return out

    def _trade(self, d: dict[str, Any], kind: str, ts_recv_ns: int, recv_seq: int,
               out: Output) -> None:
        sym = d["s"]
        if sym not in self.symbols:
            out.drop(DROP_UNSUBSCRIBED)
            return
        tid = d["t"] if kind == "trade" else d["a"]
        if type(tid) is not int:
            tid = int(tid)
        last = self._last_trade_id.get(sym)
        if last is not None and tid <= last:
            out.drop(DROP_DUPLICATE_TRADE)
            return
        m = d["m"]
        if m is True:
            side = SELL   # the buyer was the maker: the taker sold
        elif m is False:
            side = BUY
        else:
            raise BadFrame("m is not a boolean")
        # Inline conversions with the same checks as base.price/amount/ms_to_ns (hot path).
        px, qty, t_ms = float(d["p"]), float(d["q"]), d["T"]
        if not (0.0 < px < _INF and 0.0 <= qty < _INF):
            price(px)
            amount(qty)
        if type(t_ms) is not int or not 0 <= t_ms <= _MAX_MS:
            t_ms = ms_to_ns(t_ms) // 1_000_000
        row: TradeRow = (sym, t_ms * 1_000_000, ts_recv_ns, recv_seq, str(tid), side, px, qty)
        if last is not None and tid != last + 1:
            # Binance trade ids (and aggregate trade ids) are consecutive per symbol.
            self.gap(out, sym, ts_recv_ns, recv_seq,
                     f"trade id expected {last + 1}, got {tid} ({tid - last - 1} missing)")
        self._last_trade_id[sym] = tid
        out.trades = [row]

    def _quote(self, d: dict[str, Any], ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        sym = d["s"]
        if sym not in self.symbols:
            out.drop(DROP_UNSUBSCRIBED)
            return
        uid = d.get("u")
        if uid is not None:
            uid = int(uid)
            last = self._last_quote_id.get(sym)
            if last is not None and uid <= last:
                out.drop("duplicate_quote")
                return
        ts = d.get("T") or d.get("E")
        bid_px, bid_sz = float(d["b"]), amount(d["B"])
        ask_px, ask_sz = float(d["a"]), amount(d["A"])
        # Binance sends zeros for an empty side.
        bid = (price(bid_px), bid_sz) if bid_px or bid_sz else (None, None)
        ask = (price(ask_px), ask_sz) if ask_px or ask_sz else (None, None)
        out.quotes = [(sym, ms_to_ns(ts) if ts is not None else None, ts_recv_ns, recv_seq,
                       bid[0], bid[1], ask[0], ask[1])]
        if uid is not None:
            self._last_quote_id[sym] = uid

    # ---- order book ------------------------------------------------------------------------
    def _event_time(self, d: dict[str, Any]) -> int | None:
        return ms_to_ns(d["E"]) if "E" in d else None

    def _diff(self, d: dict[str, Any], ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        sym = d["s"]
        if sym not in self.symbols or not self._want_book:
            out.drop(DROP_UNSUBSCRIBED)
            return
        diff = _Diff(int(d["U"]), int(d["u"]), int(d.get("pu", -1)), self._event_time(d),
                     ts_recv_ns, _levels(d["b"]), _levels(d["a"]))
        state = self._books.get(sym)
        if state is None:
            state = self._books[sym] = _BookState()
        if not state.synced:
            self._buffer(sym, state, diff, out)
            return
        if self._is_stale(diff, state):
            out.drop(DROP_STALE_BOOK)
            return
        if state.first_after_snapshot:
            ok = self._bridges(diff, state.last_id)
        else:
            ok = self._continues(diff, state.last_id)
        if not ok:
            self.gap(out, sym, ts_recv_ns, recv_seq, self._gap_detail(diff, state.last_id))
            state.synced = False
            self._buffer(sym, state, diff, out)
            return
        state.first_after_snapshot = False
        state.last_id = diff.last_id
        rows = out.book = []
        self._emit_diff(sym, diff, recv_seq, rows)

    def _buffer(self, sym: str, state: _BookState, diff: _Diff, out: Output) -> None:
        if len(state.buffer) >= MAX_BUFFERED_DIFFS:
            del state.buffer[0]
            out.drop(DROP_BUFFER_OVERFLOW)
        state.buffer.append(diff)
        if not state.awaiting_snapshot:
            state.awaiting_snapshot = True
            out.request(self._snapshot_request(sym, state))

    def _snapshot_request(self, sym: str, state: _BookState) -> RestRequest:
        delay = 0.0
        if state.snapshot_attempts:
            delay = min(SNAPSHOT_RETRY_MAX_S,
                        SNAPSHOT_RETRY_MIN_S * 2 ** (state.snapshot_attempts - 1))
        state.snapshot_attempts += 1
        return RestRequest(sym, self.rest_url(
            f"{self.depth_path}?symbol={sym}&limit={self.depth_limit}"), delay)

    def _is_stale(self, diff: _Diff, state: _BookState) -> bool:
        """Already contained in the book (older than, or equal to, what was applied)."""
        if diff.last_id != state.last_id:
            return diff.last_id < state.last_id
        return not (state.first_after_snapshot and self._applies_at_snapshot_id())

    # Continuity rules (spot); USD-M overrides them.
    def _applies_at_snapshot_id(self) -> bool:
        return False  # spot drops diffs with u <= lastUpdateId

    def _bridges(self, diff: _Diff, snapshot_id: int) -> bool:
        return diff.first_id <= snapshot_id + 1 <= diff.last_id

    def _too_old(self, snapshot_id: int, first_buffered: _Diff) -> bool:
        return snapshot_id + 1 < first_buffered.first_id

    def _continues(self, diff: _Diff, prev_last_id: int) -> bool:
        return diff.first_id == prev_last_id + 1

    def _gap_detail(self, diff: _Diff, prev_last_id: int) -> str:
        return (f"expected U={prev_last_id + 1}, got U={diff.first_id} u={diff.last_id}")

    def _snapshot_time(self, body: dict[str, Any]) -> int | None:
        return None  # spot REST depth has no timestamp

    def on_rest(self, request: RestRequest, status: int, body: bytes,
                ts_recv_ns: int, recv_seq: int) -> Output:
        out = Output()
        sym = request.key
        state = self._books.get(sym)
        if state is None or not state.awaiting_snapshot:
            return out  # a late answer for a connection that is gone
        state.awaiting_snapshot = False
        if status != 200:
            detail = f"snapshot HTTP {status}: {body[:200].decode('utf-8', 'replace')}"
            self.venue_error(out, ts_recv_ns, recv_seq, detail)
            state.awaiting_snapshot = True
            out.request(self._snapshot_request(sym, state))
            return out
        try:
            snap = orjson.loads(body)
            last_id = int(snap["lastUpdateId"])
            bids, asks = _levels(snap["bids"]), _levels(snap["asks"])
            ts_event = self._snapshot_time(snap)
        except (orjson.JSONDecodeError, BadFrame, KeyError, TypeError, ValueError,
                IndexError) as e:
            out.error = f"bad snapshot for {sym}: {type(e).__name__}: {e}"[:200]
            state.awaiting_snapshot = True
            out.request(self._snapshot_request(sym, state))
            return out
        buffered = state.buffer
        if buffered and self._too_old(last_id, buffered[0]):
            # Older than the first buffered diff: it cannot be bridged. Fetch again.
            state.awaiting_snapshot = True
            out.request(self._snapshot_request(sym, state))
            return out
        state.buffer = []
        state.snapshot_attempts = 0
        rows: list[BookRow] = []
        out.book = rows
        for px, sz in bids:
            rows.append((sym, ts_event, ts_recv_ns, recv_seq, True, BID, px, sz, last_id))
        for px, sz in asks:
            rows.append((sym, ts_event, ts_recv_ns, recv_seq, True, ASK, px, sz, last_id))
        if state.ever_synced:
            self.resync(out, sym, ts_recv_ns, recv_seq, f"snapshot lastUpdateId={last_id}")
        state.synced = state.ever_synced = True
        state.last_id = last_id
        state.first_after_snapshot = True
        # Release what was buffered, in order, each diff with its own recv_seq.
        seq = recv_seq
        for idx, diff in enumerate(buffered):
            if self._is_stale(diff, state):
                out.drop(DROP_STALE_BOOK)
                continue
            ok = (self._bridges(diff, state.last_id) if state.first_after_snapshot
                  else self._continues(diff, state.last_id))
            if not ok:
                seq += 1
                self.gap(out, sym, diff.ts_recv_ns, seq, self._gap_detail(diff, state.last_id))
                # Everything from here on needs a new snapshot.
                state.synced = False
                state.buffer = buffered[idx:]
                state.awaiting_snapshot = True
                out.request(self._snapshot_request(sym, state))
                break
            seq += 1
            state.first_after_snapshot = False
            state.last_id = diff.last_id
            self._emit_diff(sym, diff, seq, rows)
        out.last_seq = seq
        return out

    @staticmethod
    def _emit_diff(sym: str, diff: _Diff, seq: int, rows: list[BookRow]) -> None:
        ts_e, ts_r, uid = diff.ts_event_ns, diff.ts_recv_ns, diff.last_id
        rows.extend([(sym, ts_e, ts_r, seq, False, BID, px, sz, uid) for px, sz in diff.bids])
        rows.extend([(sym, ts_e, ts_r, seq, False, ASK, px, sz, uid) for px, sz in diff.asks])


class BinanceUsdm(BinanceSpot):
    """USD-M futures: `pu` continuity, `/fapi/v1/depth`, transaction time `T` on everything."""

    exchange: ClassVar[str] = "binance-usdm"
    default_ws_url: ClassVar[str] = "wss://fstream.binance.com/stream"
    default_rest_url: ClassVar[str | None] = "https://fapi.binance.com"
    depth_path: ClassVar[str] = "/fapi/v1/depth"
    max_depth_limit: ClassVar[int] = 1000

    def _applies_at_snapshot_id(self) -> bool:
        return True  # USD-M drops only diffs with u < lastUpdateId

    def _bridges(self, diff: _Diff, snapshot_id: int) -> bool:
        return diff.first_id <= snapshot_id <= diff.last_id

    def _too_old(self, snapshot_id: int, first_buffered: _Diff) -> bool:
        return snapshot_id < first_buffered.first_id

    def _continues(self, diff: _Diff, prev_last_id: int) -> bool:
        return diff.prev_id == prev_last_id

    def _gap_detail(self, diff: _Diff, prev_last_id: int) -> str:
        return f"expected pu={prev_last_id}, got pu={diff.prev_id} u={diff.last_id}"

    def _event_time(self, d: dict[str, Any]) -> int | None:
        ts = d.get("T") or d.get("E")
        return ms_to_ns(ts) if ts is not None else None

    def _snapshot_time(self, body: dict[str, Any]) -> int | None:
        ts = body.get("T") or body.get("E")
        return ms_to_ns(ts) if ts is not None else None
