"""Hyperliquid public WebSocket codec (`hyperliquid`).

Owns Hyperliquid's wire format and rules: the endpoint `wss://api.hyperliquid.xyz/ws`, one
subscribe request per (channel, coin) - `{"method":"subscribe","subscription":
{"type":"trades","coin":"BTC"}}` - the application keepalive `{"method":"ping"}` (answered
by `{"channel":"pong"}`, which is silent: neither data nor unknown), typed msgspec structs
per message kind, and the decoding of these channels:

- `trades` -> trades. `side` "B" = buy, "A" = sell, read as the taker's (aggressor's)
  side, as client libraries read it (Hyperliquid's docs give the field without saying
  whose side it is). Checked on the recorded frames: the one trade recorded within a
  second of a book (2025-02-19, `B` at 96221.0, 0.8 s after the l2Book whose best
  bid/ask is 96220.0/96221.0) printed at the best ask: a buyer lifting the offer (1/1
  consistent). Other values are stored
  as `unknown`. `trade_id` = `tid` as text, `ts_event` = `time` (ms, exact),
  `price`/`amount` = `px`/`sz` (decimal strings; `sz` in coin units).
  `tid`s are NOT ordered (recorded: 951635025884506, 293353986402527, 437413095582311,
  784469253141982; a testnet replay 447757798903687 then 355416041315622 a second later):
  they look like 50-bit hashes. So de-duplication keeps the last ids seen per coin as an
  opaque window (exchanges/trades.py, `admit_opaque_trade`), which catches the ~30 recent
  fills Hyperliquid replays on every (re)subscribe (TRADE_ID_WINDOW ids per coin); no gap
  can be inferred from a `tid`.
- `l2Book` -> book. Every push is the whole (20-level, or 5 with `fast`) book of the
  coin, with no sequence number and no deltas: each push is written as a snapshot block
  (all its levels, `is_snapshot = true`, one `recv_seq`, `update_id` null,
  `ts_event` = `time`), which replaces the book (the contract's rule). There is nothing
  to bridge, buffer or resync, so no `BookSync`; continuity across a disconnect is the
  next push. A push whose `time` is older than the last one written for the coin is
  dropped (`stale_book_update`: the overlap of a make-before-break rotation); levels of
  size 0 are not levels and are left out; a push with both sides empty writes no rows
  (a snapshot block cannot be empty) but the shared `empty_snapshot` event, so a reader knows the
  book it holds is gone.
- `bbo` -> quotes (`bbo` = [bid, ask], each {px, sz, n} or null for an empty side;
  `ts_event` = `time`). Older-than-last pushes are dropped (`stale_quote`).
- `activeAssetCtx` -> derivatives (exchanges/derivs.py `LatestValues`): `mark_price` =
  `markPx`, `index_price` = `oraclePx` (Hyperliquid's oracle is its index), `funding_rate`
  = `funding` (the current hourly rate, the one the next hourly payment uses),
  `open_interest` = `openInterest` (coin units). Hyperliquid funds every hour on the
  hour and sends no funding time, and the message carries no time at all: `ts_event`,
  `next_funding_time` and `predicted_funding_rate` stay null - we do not invent a venue
  time from our own clock (a reader wanting it takes the next full hour after `ts_recv`).
  Spot coins have no such context (their channel is `activeSpotAssetCtx`, without funding
  or oracle): `check_feed` refuses `derivatives` for spot coins.

Symbols are Hyperliquid coin names as the messages spell them: perpetuals "BTC", "kPEPE";
builder-deployed (HIP-3) perpetuals "dex:COIN"; spot pairs "@107" (the spot index) or
"PURR/USDC". Rows of coins the feed did not subscribe to are dropped and counted.

Control frames: `subscriptionResponse` -> a `subscribed` event (symbol = its coin; an
`unsubscribe` answer is silent); `{"channel":"error","data":"..."}` -> a `refused` event
when it is about a subscription (the coin is named when the text quotes one of ours), else
a venue `error`. Other channels (`candle`, `allMids`...) are counted as unknown.

Limits (docs, per IP): 1000 subscriptions, 2000 messages sent per minute, 100 connections
(third-party SDKs keep to 10 at once and 30 new a minute): `check_feed` refuses a feed of
more than 1000 subscriptions, and `connect_limit` allows 10 connections per 20 s. The
server closes a connection that has sent it nothing for 60 s: the ping goes out every
KEEPALIVE_S (20 s, well inside the limit even when a send is delayed), and since its pong
is a frame read, a quiet but live connection is never stale (`default_stale_after_s` is
more than two ping intervals). Protocol-level pings are not used.

Must not: do I/O, read a clock or log; catch decode errors itself (the base rejects the
frame); change any state before a frame is known to be well-formed.
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
    DROP_STALE_BOOK,
    DROP_UNSUBSCRIBED,
    BadFrame,
    Codec,
    Output,
    quote_side,
)
from ingestd.exchanges.derivs import LatestValues
from ingestd.exchanges.trades import TradeIds, admit_opaque_trade
from ingestd.schema import BUY, EV_EMPTY_SNAPSHOT, SELL, UNKNOWN

# Hyperliquid subscription types per contract channel.
SUB_TRADES: Final = "trades"
SUB_BOOK: Final = "l2Book"
SUB_BBO: Final = "bbo"
SUB_CTX: Final = "activeAssetCtx"
CHANNEL_TYPES: Final[dict[str, str]] = {"trades": SUB_TRADES, "book": SUB_BOOK,
                                        "quotes": SUB_BBO, "derivatives": SUB_CTX}
# Data channels this codec knows but may not have subscribed (then: dropped, counted).
_DATA_CHANNELS: Final = frozenset(CHANNEL_TYPES.values())

KEEPALIVE_S: Final = 20.0
PING: Final = '{"method":"ping"}'
MAX_SUBSCRIPTIONS: Final = 1000   # per IP (Hyperliquid's rate-limit docs)
# Trade ids remembered per coin: a (re)subscribe replays the last ~30 fills, so 1000 covers
# it with a wide margin while a feed of the allowed 250 coins x 4 channels holds 27 MB of
# ids (measured: 106 B per id; 10,000 per coin would be ~270 MB).
TRADE_ID_WINDOW: Final = 1000

DROP_STALE_QUOTE: Final = "stale_quote"

_SIDES: Final[dict[str, str]] = {"B": BUY, "A": SELL}
_MAX_I64: Final = 2**63 - 1
_MAX_MS: Final = _MAX_I64 // 1_000_000
Ms = Annotated[int, msgspec.Meta(ge=0, le=_MAX_MS)]
Tid = Annotated[int, msgspec.Meta(ge=0, le=_MAX_I64)]
_INF: Final = math.inf

_PERP: Final = r"[A-Za-z0-9]{1,32}"
_SYMBOL: Final = re.compile(rf"{_PERP}|[a-z0-9]{{1,16}}:{_PERP}|@[0-9]{{1,9}}"
                            r"|[A-Za-z0-9]{1,32}/[A-Za-z0-9]{1,32}")
# A coin quoted in a venue error's echo of our request: "coin": "BTC" or "coin":"BTC".
_ERROR_COIN: Final = re.compile(r'\\?"coin\\?"\s*:\s*\\?"([^"\\]{1,64})\\?"')


def is_spot(symbol: str) -> bool:
    """A spot coin: "@<index>" or a "BASE/QUOTE" pair name."""
    return symbol.startswith("@") or "/" in symbol


# ---- wire structs ----------------------------------------------------------------------------
class _Envelope(msgspec.Struct, gc=False):
    channel: str
    data: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)


# Prices and sizes are decimal strings on the wire; the decoders are built with
# `strict=False`, so msgspec converts them to floats in C (a JSON number is taken too; text
# that is not a number - "1_000", " 1", "0x10" - is refused, unlike Python's float()).
class _Level(msgspec.Struct, gc=False):
    px: float
    sz: float


class _Trade(msgspec.Struct, gc=False):
    coin: str
    side: str
    px: float
    sz: float
    time: Ms
    tid: Tid


class _Book(msgspec.Struct, gc=False):
    coin: str
    time: Ms
    levels: tuple[list[_Level], list[_Level]]


class _Bbo(msgspec.Struct, gc=False):
    coin: str
    time: Ms
    bbo: tuple[_Level | None, _Level | None]


class _Ctx(msgspec.Struct, gc=False):
    funding: float | None = None
    openInterest: float | None = None
    oraclePx: float | None = None
    markPx: float | None = None


class _AssetCtx(msgspec.Struct, gc=False):
    coin: str
    ctx: _Ctx


class _Subscription(msgspec.Struct, gc=False):
    type: str
    coin: str | None = None


class _SubResponse(msgspec.Struct, gc=False):
    method: str
    subscription: _Subscription


_ENVELOPE = msgspec.json.Decoder(_Envelope)
_TRADES = msgspec.json.Decoder(list[_Trade], strict=False)
_BOOK = msgspec.json.Decoder(_Book, strict=False)
_BBO = msgspec.json.Decoder(_Bbo, strict=False)
_CTX = msgspec.json.Decoder(_AssetCtx, strict=False)
_SUB_RESPONSE = msgspec.json.Decoder(_SubResponse)
_ANY = msgspec.json.Decoder()


# ---- field helpers ---------------------------------------------------------------------------
def _number(v: float | None, what: str, *, positive: bool = False,
            signed: bool = False) -> float | None:
    """A context value: None if absent; finite; > 0 (`positive`), >= 0, or any sign."""
    if v is None:
        return None
    ok = (-_INF < v < _INF) if signed else (0.0 < v < _INF if positive else 0.0 <= v < _INF)
    if not ok:
        raise BadFrame(f"{what} out of range: {v!r}"[:80])
    return v


def _levels(raw: list[_Level]) -> list[tuple[float, float]]:
    """A side of a snapshot: its levels of positive size (0 is not a level); every price
    finite and > 0, every size finite and >= 0 (else BadFrame)."""
    levels = [(x.px, x.sz) for x in raw]
    zero = False
    for px, sz in levels:
        if not (0.0 < px < _INF and 0.0 < sz < _INF):
            if sz == 0.0 and 0.0 < px < _INF:
                zero = True
            else:
                raise BadFrame(f"book level {px!r} {sz!r} out of range")
    return [lv for lv in levels if lv[1]] if zero else levels


# ---- explicit state --------------------------------------------------------------------------
class _LastTimes:
    """The venue `time` (ms) of the last book and quote written per coin."""

    KINDS: ClassVar[tuple[str, ...]] = ("book", "quotes")

    def __init__(self) -> None:
        self.last: dict[str, dict[str, int]] = {k: {} for k in self.KINDS}

    def state(self) -> dict[str, dict[str, int]]:
        return {k: dict(v) for k, v in self.last.items()}

    def restore(self, state: Any) -> None:
        if not isinstance(state, dict) or set(state) != set(self.KINDS):
            raise BadFrame("last times state is not {book, quotes}")
        last: dict[str, dict[str, int]] = {}
        for kind, times in state.items():
            if not isinstance(times, dict) or not all(
                    isinstance(s, str) and type(t) is int and 0 <= t <= _MAX_MS
                    for s, t in times.items()):
                raise BadFrame(f"last {kind} times are not coin -> ms")
            last[kind] = dict(times)
        self.last = last


# ---- the codec -------------------------------------------------------------------------------
class Hyperliquid(Codec):
    exchange: ClassVar[str] = "hyperliquid"
    default_ws_url: ClassVar[str] = "wss://api.hyperliquid.xyz/ws"
    keepalive_interval_s: ClassVar[float | None] = KEEPALIVE_S
    ws_ping_interval_s: ClassVar[float | None] = None
    default_stale_after_s: ClassVar[float] = 45.0
    connect_limit: ClassVar[tuple[int, float]] = (10, 20.0)
    CHANNELS: ClassVar[tuple[str, ...]] = ("trades", "quotes", "book", "derivatives")
    symbol_pattern: ClassVar[re.Pattern[str] | None] = _SYMBOL
    symbol_spelling: ClassVar[str] = ("a Hyperliquid coin (perpetual 'BTC', 'kPEPE', "
                                      "HIP-3 'dex:COIN', spot '@107' or 'PURR/USDC')")

    @classmethod
    def check_feed(cls, feed: FeedConfig) -> list[str]:
        problems = super().check_feed(feed)
        if "derivatives" in feed.channels:
            spot = [s for s in feed.symbols if is_spot(s)]
            if spot:
                problems.append(f"channels: 'derivatives' is not offered for spot coins "
                                f"({', '.join(map(repr, spot))}): Hyperliquid has no "
                                "funding, oracle or open interest for them")
        n = len(set(feed.symbols)) * len({c for c in feed.channels if c in CHANNEL_TYPES})
        if n > MAX_SUBSCRIPTIONS:
            problems.append(f"symbols: {n} subscriptions (symbols x channels) exceed "
                            f"Hyperliquid's {MAX_SUBSCRIPTIONS} per IP")
        return problems

    def __init__(self, feed: FeedConfig) -> None:
        super().__init__(feed)
        self.types = [CHANNEL_TYPES[c] for c in ("book", "trades", "quotes", "derivatives")
                      if c in self.channels]
        self._wanted = frozenset(self.types)
        self.trade_ids: TradeIds = self.stateful("trades", TradeIds(
            consecutive=False, opaque=True, window=TRADE_ID_WINDOW))
        self.derivs: LatestValues = self.stateful("derivs", LatestValues())
        self.times: _LastTimes = self.stateful("times", _LastTimes())

    # ---- connection ------------------------------------------------------------------------
    def subscribe_messages(self) -> Sequence[str]:
        return [orjson.dumps({"method": "subscribe",
                              "subscription": {"type": t, "coin": coin}}).decode()
                for coin in self.feed.symbols for t in self.types]

    def keepalive_message(self) -> str | None:
        return PING

    # ---- frames ----------------------------------------------------------------------------
    def parse_frame(self, frame: bytes | str, ts_recv_ns: int, recv_seq: int,
                    out: Output) -> None:
        env = _ENVELOPE.decode(frame)
        ch, data = env.channel, env.data
        if ch in _DATA_CHANNELS:
            if not data:
                raise BadFrame(f"{ch} without data")
            if ch not in self._wanted:
                out.drop(DROP_UNSUBSCRIBED)
            elif ch == SUB_BOOK:
                self._book(_BOOK.decode(data), ts_recv_ns, recv_seq, out)
            elif ch == SUB_TRADES:
                self._trades(_TRADES.decode(data), ts_recv_ns, recv_seq, out)
            elif ch == SUB_BBO:
                self._quote(_BBO.decode(data), ts_recv_ns, recv_seq, out)
            else:
                self._ctx(_CTX.decode(data), ts_recv_ns, recv_seq, out)
        elif ch == "pong":
            return
        elif ch == "subscriptionResponse":
            self._ack(_SUB_RESPONSE.decode(data), ts_recv_ns, recv_seq, out)
        elif ch == "error":
            self._error(_ANY.decode(data) if data else None, ts_recv_ns, recv_seq, out)
        else:
            out.unknown += 1

    def _ack(self, r: _SubResponse, ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        if r.method != "subscribe":
            if r.method != "unsubscribe":
                out.unknown += 1
            return
        sub = r.subscription
        coin = sub.coin if sub.coin in self.symbols else None
        self.subscribed(out, coin, ts_recv_ns, recv_seq,
                        f"{sub.type} {sub.coin}" if sub.coin is not None else sub.type)

    def _error(self, data: Any, ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        text = data if isinstance(data, str) else orjson.dumps(data).decode()
        detail = text[:500]
        if "subscri" in text.lower():
            m = _ERROR_COIN.search(text)
            coin = m.group(1) if m is not None and m.group(1) in self.symbols else None
            self.refused(out, coin, ts_recv_ns, recv_seq, detail)
        else:
            self.venue_error(out, ts_recv_ns, recv_seq, detail)

    # ---- data ------------------------------------------------------------------------------
    def _trades(self, trades: list[_Trade], ts_recv_ns: int, recv_seq: int,
                out: Output) -> None:
        # The whole frame is checked before any id is recorded.
        checked = []
        for t in trades:
            px, qty = t.px, t.sz
            if not (0.0 < px < _INF and 0.0 <= qty < _INF):
                raise BadFrame(f"trade price {px!r} or size {qty!r} out of range")
            checked.append((t.coin, str(t.tid), t.time * 1_000_000,
                            _SIDES.get(t.side, UNKNOWN), px, qty))
        symbols, ids = self.symbols, self.trade_ids
        for coin, tid, ts_event, side, px, qty in checked:
            if coin not in symbols:
                out.drop(DROP_UNSUBSCRIBED)
                continue
            if admit_opaque_trade(out, ids, coin, tid):
                out.trades_block().add(coin, ts_event, ts_recv_ns, recv_seq, tid, side, px,
                                       qty)

    def _book(self, b: _Book, ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        coin = b.coin
        if coin not in self.symbols:
            out.drop(DROP_UNSUBSCRIBED)
            return
        bids, asks = _levels(b.levels[0]), _levels(b.levels[1])
        last = self.times.last["book"]
        prev = last.get(coin)
        if prev is not None and b.time < prev:
            out.drop(DROP_STALE_BOOK)
            return
        last[coin] = b.time
        ts_event = b.time * 1_000_000
        if not bids and not asks:
            self.ev(out, EV_EMPTY_SNAPSHOT, ts_recv_ns, recv_seq, coin,
                    "l2Book push with no levels", ts_event)
            return
        out.book_block().add_levels(coin, ts_event, ts_recv_ns, recv_seq, True, bids, asks,
                                    None)

    def _quote(self, q: _Bbo, ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        coin = q.coin
        if coin not in self.symbols:
            out.drop(DROP_UNSUBSCRIBED)
            return
        bid_lv, ask_lv = q.bbo
        bid = (None, None) if bid_lv is None else quote_side(bid_lv.px, bid_lv.sz)
        ask = (None, None) if ask_lv is None else quote_side(ask_lv.px, ask_lv.sz)
        last = self.times.last["quotes"]
        prev = last.get(coin)
        if prev is not None and q.time < prev:
            out.drop(DROP_STALE_QUOTE)
            return
        last[coin] = q.time
        out.quotes_block().add(coin, q.time * 1_000_000, ts_recv_ns, recv_seq, *bid, *ask)

    def _ctx(self, a: _AssetCtx, ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        coin = a.coin
        if coin not in self.symbols:
            out.drop(DROP_UNSUBSCRIBED)
            return
        c = a.ctx
        mark = _number(c.markPx, "markPx", positive=True)
        index = _number(c.oraclePx, "oraclePx", positive=True)
        funding = _number(c.funding, "funding", signed=True)
        oi = _number(c.openInterest, "openInterest")
        self.derivs.update(out, coin, None, ts_recv_ns, recv_seq, mark_price=mark,
                           index_price=index, funding_rate=funding, open_interest=oi)


__all__ = ["CHANNEL_TYPES", "KEEPALIVE_S", "PING", "TRADE_ID_WINDOW", "Hyperliquid", "is_spot"]
