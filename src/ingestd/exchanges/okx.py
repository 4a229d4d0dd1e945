"""OKX v5 public WebSocket codec (`okx`).

Owns OKX's wire format and rules: the subscribe / unsubscribe requests of the public
endpoint (`wss://ws.okx.com:8443/ws/v5/public`; at most `ARGS_PER_REQUEST` args per
request), its plain-text `ping`/`pong` keepalive, typed msgspec structs per message kind
(prices and sizes kept as the venue's text until checked: the book checksum is computed on
the text as sent), and the decoding of these channels:

- `trades` -> trades. `side` is the taker's side as sent (checked against the recorded
  2022 capture: 46/46 `buy` trades printed at the best ask, 25/25 `sell` at the best bid).
  `trade_id` = `tradeId`; `ts_event` = `ts` (ms). For SWAP / FUTURES / OPTION instruments
  `sz` is in contracts (OKX's unit; no instrument metadata is fetched to convert it).
  Trade ids go through the shared exact de-duplication (exchanges/trades.py) as integers
  per instId that go up by one per fill (observed: 68/68 and 3/3 steps of +1 in the 2022
  capture), so a jump is a `gap` event, a replayed id is dropped (counted) and a
  never-seen id below the highest seen is stored with an `out_of_order` event. Since 2023
  a push may aggregate `count` fills of one taker order at one price and `tradeId` is the
  LAST fill's id: such a push covers ids `tradeId - count + 1 .. tradeId` (admitted as one
  range: the continuity check is on the first). A non-integer id (never seen from OKX) is
  de-duplicated as an opaque id. A frame is checked whole before any id is recorded.
- `bbo-tbt` -> quotes (the `quotes` channel). Chosen over `tickers` because it is the true
  best bid/offer pushed tick by tick (10 ms) with both sides in every push, whereas
  `tickers` is a throttled (100 ms) 24 h statistics message whose bid/ask are a side
  product. An empty side (empty list) is written as nulls.
- `books` (400 levels, the default; `book_depth = 400`) -> book, on the shared `BookSync`
  with channel snapshots (`resubscribe`) and kept levels (`BookSide` with the level text):
  `action: snapshot` is a snapshot block (one `recv_seq`), `action: update` rows are
  deltas (size "0" deletes). OKX itself keeps the book to 400 levels per side (it sends
  the deletions and the levels that move into range; observed: BTC-USDT stays at exactly
  400/400 over the capture), so no client-side truncation is written. `book_depth = 5`
  uses `books5` instead: every push is the full top 5, written as a snapshot block.
- derivatives (SWAP / FUTURES instIds only; spot instIds subscribe none of these):
  `funding-rate` (SWAP: `fundingRate` paid at `fundingTime` = `next_funding_time`,
  `nextFundingRate` as `predicted_funding_rate`, "" = not sent), `mark-price` (`markPx`),
  `open-interest` (`oi`, contracts), merged per instId into the latest values
  (exchanges/derivs.py); `ts_event` = `ts` (the 2022 funding-rate shape has none: null).
- `liquidation-orders` (one all-market stream per instType of the subscribed instIds) ->
  liquidations: side `details[].side` (the order's), price `bkPx`, amount `sz`
  (contracts), `ts_event` = `details[].ts`; rows of instIds not subscribed are dropped.

Continuity of `books` (per instId, `OkxRules`):
- `seqId`/`prevSeqId` (2023+): each update's `prevSeqId` must equal the previous message's
  `seqId` (the snapshot's for the first update; updates that change nothing repeat
  `seqId == prevSeqId`; after a venue-side sequence reset `seqId` may go down but the
  chain by `prevSeqId` still holds). Frames recorded in 2022 predate `seqId`: for them the
  checksum is the only continuity check, and `update_id` is null (else it is `seqId`);
- `checksum`: signed CRC32 of the top 25 levels interleaved `bidPx:bidSz:askPx:askSz`
  (the text as sent), verified (BookSync's `verify`: `_verify`) on the book after every
  snapshot and update whose checksum is non-zero. A checksum of 0 is treated as "not
  provided": OKX has been reported to send 0 on every `books` frame since 2025, and a
  genuine CRC of 0 (odds 2**-32) merely skips one check. A snapshot that fails it
  `MAX_VERIFY_FAILURES` times in a row is kept unverified until the next connection (an
  `error` event says so; BookSync's rule).
A break (or a checksum mismatch, also counted as `book_checksum_mismatch`; the mismatching
update's rows are not written) writes a `gap` event (expected vs received), sends
`unsubscribe` + `subscribe` for that instId (`Output.replies`), drops (and counts) updates
until the new snapshot, and writes a `resync` event with that snapshot. An update before
the first snapshot of a connection's subscription is dropped (counted) without a
resubscribe: the subscription brings the snapshot (if it does not come, the shared rule of
`BookSync` resubscribes: exchanges/book.py, SNAPSHOT_WAIT_S).

Connections: `on_connect` (and a make-before-break rotation, which OKX does not need)
forgets every book: a new connection's subscriptions start with snapshots (followed by a
`resync` event for a book that was synced before). Trade ids are kept.

Control frames: subscribe acks -> `subscribed` events; unsubscribe acks and
`channel-conn-count` are silent; `error` -> `refused` (when it names one of our
channel/instId pairs) or a venue `error` event; a `notice` (64008: service upgrade) -> an
event and a reconnect; `pong` -> nothing. Data for instIds or channels the feed did not
subscribe to is dropped and counted; other channels and shapes are unknown messages.

State (`state()` / `restore()`): trade ids (`trades`), every book's sync position (last
`seqId`, what it waits for) and levels with their text (`books`).

Must not: do I/O, read a clock or log (see exchanges/base.py); catch decode errors itself
(the base rejects the frame); change any state before a frame is known to be well-formed.
"""

from __future__ import annotations

import re
import zlib
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
)
from ingestd.exchanges.book import (
    BookSync,
    Diff,
    Levels,
    SymbolBook,
    TextLevels,
    levels_with_text,
)
from ingestd.exchanges.derivs import LatestValues
from ingestd.exchanges.trades import TradeIds, admit_trade_id, trade_id
from ingestd.schema import BUY, SELL, UNKNOWN

# Channels (OKX names) by the feed channel they serve.
CH_TRADES: Final = "trades"
CH_BBO: Final = "bbo-tbt"
CH_BOOKS: Final = "books"
CH_BOOKS5: Final = "books5"
CH_FUNDING: Final = "funding-rate"
CH_MARK: Final = "mark-price"
CH_OI: Final = "open-interest"
CH_LIQUIDATIONS: Final = "liquidation-orders"
DERIVATIVE_CHANNELS: Final = (CH_FUNDING, CH_MARK, CH_OI)
BOOK_CHANNELS: Final[dict[int, str]] = {400: CH_BOOKS, 5: CH_BOOKS5}
DEFAULT_BOOK_DEPTH: Final = 400
# Data channels this codec knows (`tickers` is never subscribed: its data is dropped).
_KNOWN_CHANNELS: Final = frozenset({CH_TRADES, CH_BBO, CH_BOOKS, CH_BOOKS5, "tickers",
                                    *DERIVATIVE_CHANNELS, CH_LIQUIDATIONS})
# instType of a swap (`BTC-USDT-SWAP`) or an expiring future (`BTC-USD-220527`), the
# instruments with funding / open interest / liquidation orders.
_SWAP = re.compile(r"[A-Z0-9]+-[A-Z0-9]+-SWAP")
_FUTURES = re.compile(r"[A-Z0-9]+-[A-Z0-9]+-[0-9]{6}")

CHECKSUM_DEPTH: Final = 25
# Subscribe args per request: OKX caps a request at 64 KB (an arg is ~45 bytes).
ARGS_PER_REQUEST: Final = 200


_INF: Final = float("inf")
_MAX_I64: Final = 2**63 - 1
# The sync position of a book message without `seqId` (2022 frames): never a real seqId.
NO_SEQ: Final = -(2**63)
SeqId = Annotated[int, msgspec.Meta(ge=NO_SEQ + 1, le=_MAX_I64)]
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=_MAX_I64)]

_SIDES: Final[dict[str | None, str]] = {"buy": BUY, "sell": SELL}
# "...channel:trades,instId:FOO-BAR doesn't exist..." (code 60018)
_REFUSED = re.compile(r"channel:\s*([\w-]+)\s*,\s*instId:\s*([\w-]+)")


# ---- wire structs (no reference cycles: untracked by the GC) -------------------------------
class _Arg(msgspec.Struct, gc=False):
    channel: str
    instId: str


class _AnyArg(msgspec.Struct, gc=False):
    """`arg` of control frames and of data frames off the fast path (fields optional)."""

    channel: str | None = None
    instId: str | None = None
    instType: str | None = None


class _FundingRate(msgspec.Struct, gc=False):
    """`funding-rate`: `fundingRate` is paid at `fundingTime`; `nextFundingRate` is the
    predicted next rate ("" since OKX stopped predicting it)."""

    instId: str
    fundingRate: str
    fundingTime: str
    nextFundingRate: str | None = None
    ts: str | None = None


class _MarkPrice(msgspec.Struct, gc=False):
    instId: str
    markPx: str
    ts: str


class _OpenInterest(msgspec.Struct, gc=False):
    """`open-interest`: `oi` in contracts (the table's unit for OKX)."""

    instId: str
    oi: str
    ts: str


class _LiquidationDetail(msgspec.Struct, gc=False):
    side: str
    bkPx: str
    sz: str
    ts: str


class _Liquidation(msgspec.Struct, gc=False):
    instId: str
    details: list[_LiquidationDetail]


class _Trade(msgspec.Struct, gc=False):
    tradeId: str | int
    px: str
    sz: str
    ts: str | int
    side: str | None = None
    count: str | int | None = None    # fills aggregated in this push (2023+)


class _Quote(msgspec.Struct, gc=False):
    """bbo-tbt: levels are [px, sz, "0", orders]."""

    bids: list[list[str]]
    asks: list[list[str]]
    ts: str | int | None = None


class _Book(msgspec.Struct, gc=False):
    """books / books5: levels are [px, sz, "0", orders]."""

    bids: list[list[str]]
    asks: list[list[str]]
    ts: str | int | None = None
    seqId: SeqId | None = None
    prevSeqId: SeqId | None = None
    checksum: Int64 | None = None


class _TradesMsg(msgspec.Struct, gc=False):
    arg: _Arg
    data: list[_Trade]


class _QuotesMsg(msgspec.Struct, gc=False):
    arg: _Arg
    data: list[_Quote]


class _BooksMsg(msgspec.Struct, gc=False):
    arg: _Arg
    data: list[_Book]
    action: str | None = None


class _Envelope(msgspec.Struct, gc=False):
    """Every frame off the fast path: control frames and data in another key order."""

    arg: _AnyArg | None = None
    data: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)
    action: str | None = None
    event: str | None = None
    code: str | int | None = None
    msg: str | None = None


_ENVELOPE = msgspec.json.Decoder(_Envelope)
_TRADE_LIST = msgspec.json.Decoder(list[_Trade])
_QUOTE_LIST = msgspec.json.Decoder(list[_Quote])
_BOOK_LIST = msgspec.json.Decoder(list[_Book])
_FUNDING_LIST = msgspec.json.Decoder(list[_FundingRate])
_MARK_LIST = msgspec.json.Decoder(list[_MarkPrice])
_OI_LIST = msgspec.json.Decoder(list[_OpenInterest])
_LIQUIDATION_LIST = msgspec.json.Decoder(list[_Liquidation])
# The fast path: OKX sends `arg` (channel first) as the first key of every data frame.
_DATA_HEAD: Final = b'{"arg":{"channel":"'
_FAST: Final[dict[bytes, tuple[str, msgspec.json.Decoder[Any]]]] = {
    b"trades": (CH_TRADES, msgspec.json.Decoder(_TradesMsg)),
    b"bbo-tbt": (CH_BBO, msgspec.json.Decoder(_QuotesMsg)),
    b"books": (CH_BOOKS, msgspec.json.Decoder(_BooksMsg)),
    b"books5": (CH_BOOKS5, msgspec.json.Decoder(_BooksMsg)),
}


# ---- checksum --------------------------------------------------------------------------------
def signed_crc32(text: str) -> int:
    """CRC32 of `text` (UTF-8) as a signed 32-bit integer, as OKX sends it."""
    crc = zlib.crc32(text.encode())
    return crc - (1 << 32) if crc >= 1 << 31 else crc


def checksum(bids: Sequence[tuple[str, str]], asks: Sequence[tuple[str, str]]) -> int:
    """OKX's book checksum over sorted levels (best first) given as (price, size) texts."""
    b, a = bids[:CHECKSUM_DEPTH], asks[:CHECKSUM_DEPTH]
    n = min(len(b), len(a))
    # bid, ask, bid, ask, ... then the rest of the deeper side
    parts = [text for pair in zip(b, a, strict=False) for level in pair for text in level]
    parts.extend(text for level in (b[n:] or a[n:]) for text in level)
    return signed_crc32(":".join(parts))


# ---- field helpers ---------------------------------------------------------------------------
def _ms(v: str | int) -> int:
    """OKX `ts`: milliseconds since the epoch as a digit string (or a JSON integer)."""
    if isinstance(v, str) and not (v.isascii() and v.isdigit()):
        raise BadFrame(f"bad ts: {v!r}"[:80])
    return ms_to_ns(v)


def _ms_opt(v: str | int | None) -> int | None:
    return None if v is None else _ms(v)


def _count(raw: str | int | None) -> int:
    """Fills aggregated in one trade push (absent before 2023: one)."""
    if raw is None:
        return 1
    if isinstance(raw, str):
        if not (raw.isascii() and raw.isdigit()):
            raise BadFrame(f"bad trade count: {raw!r}"[:80])
        raw = int(raw)
    if raw < 1:
        raise BadFrame(f"trade count {raw} is not positive")
    return raw


def _arg(channel: str, inst_id: str) -> dict[str, str]:
    return {"channel": channel, "instId": inst_id}


def inst_type(inst_id: str) -> str | None:
    """SWAP / FUTURES for a derivative instId, None for spot (and anything else)."""
    if _SWAP.fullmatch(inst_id):
        return "SWAP"
    if _FUTURES.fullmatch(inst_id):
        return "FUTURES"
    return None


def _number(text: str | None, what: str, positive: bool) -> float | None:
    """A decimal text field; absent or "" is not sent (None)."""
    if text is None or text == "":
        return None
    v = float(text)
    if not (0.0 < v < _INF if positive else -_INF < v < _INF):
        raise BadFrame(f"{what} out of range: {text!r}"[:80])
    return v


def _request(op: str, args: list[dict[str, str]]) -> str:
    return orjson.dumps({"op": op, "args": args}).decode()


# ---- continuity rules and the book sync ------------------------------------------------------
class OkxRules:
    """`prevSeqId` == the previous message's `seqId` (the snapshot's for the first update).
    Messages without `seqId` (2022 frames, `NO_SEQ`) are not chained: the checksum is
    their only check. Channel snapshots: nothing is buffered, nothing is stale."""

    @staticmethod
    def stale(diff: Diff, last_id: int, just_synced: bool) -> bool:
        return False

    @staticmethod
    def bridges(diff: Diff, snapshot_id: int) -> bool:
        return OkxRules.continues(diff, snapshot_id)

    @staticmethod
    def continues(diff: Diff, last_id: int) -> bool:
        return (diff.prev_id == last_id or diff.last_id == NO_SEQ or diff.prev_id == NO_SEQ
                or last_id == NO_SEQ)

    @staticmethod
    def too_old(snapshot_id: int, first_buffered: Diff) -> bool:
        return False

    @staticmethod
    def gap_detail(symbol: str, diff: Diff, last_id: int) -> str:
        return (f"expected prevSeqId={last_id}, received prevSeqId={diff.prev_id} "
                f"seqId={diff.last_id}")


class Okx(Codec):
    exchange: ClassVar[str] = "okx"
    default_ws_url: ClassVar[str] = "wss://ws.okx.com:8443/ws/v5/public"
    # OKX closes connections idle for 30 s; its keepalive is the text `ping` (answered by
    # the text `pong`, which also keeps our stale-stream timer fed on quiet feeds).
    keepalive_interval_s: ClassVar[float | None] = 20.0
    # The text ping/pong is OKX's documented liveness check; protocol-level pings are
    # not needed on top of it.
    ws_ping_interval_s: ClassVar[float | None] = None
    default_stale_after_s: ClassVar[float] = 30.0
    # OKX: 3 connection requests per second per IP.
    connect_limit: ClassVar[tuple[int, float]] = (3, 1.0)
    book_depths: ClassVar[tuple[int, ...]] = tuple(sorted(BOOK_CHANNELS))
    book_depth_note: ClassVar[str] = "OKX channels books5, books"
    symbol_pattern: ClassVar[re.Pattern[str] | None] = re.compile(r"[A-Z0-9]+(?:-[A-Z0-9]+)+")
    symbol_spelling: ClassVar[str] = "an OKX instId (e.g. 'BTC-USDT', 'BTC-USDT-SWAP')"
    CHANNELS: ClassVar[tuple[str, ...]] = ("trades", "quotes", "book", "derivatives",
                                           "liquidations")

    def __init__(self, feed: FeedConfig) -> None:
        super().__init__(feed)
        self.book_channel = BOOK_CHANNELS.get(feed.book_depth or DEFAULT_BOOK_DEPTH, CH_BOOKS)
        want_derivs = "derivatives" in self.channels
        self._channels: frozenset[str] = frozenset(
            ch for ch, want in ((CH_TRADES, "trades" in self.channels),
                                (CH_BBO, "quotes" in self.channels),
                                (self.book_channel, "book" in self.channels),
                                (CH_FUNDING, want_derivs), (CH_MARK, want_derivs),
                                (CH_OI, want_derivs),
                                (CH_LIQUIDATIONS, "liquidations" in self.channels)) if want)
        self.derivs: LatestValues = self.stateful("derivatives", LatestValues())
        self.trade_ids = self.stateful("trades", TradeIds(consecutive=True))
        self.books = self.stateful("books", BookSync(
            self, OkxRules(), resubscribe=self._resubscribe, keep_text=True,
            verify=self._verify))
        self.books.reset(expect=self._book_symbols())
        # Checksum statistics (for tests and diagnostics): verified / absent (0 or missing).
        self.checksums_verified = 0
        self.checksums_absent = 0

    # ---- config ----------------------------------------------------------------------------
    # ---- connection ------------------------------------------------------------------------
    def args(self) -> list[dict[str, str]]:
        """Every (channel, instId) this feed subscribes to."""
        out = []
        liquidation_types: list[str] = []
        for sym in self.feed.symbols:
            for ch in (CH_TRADES, CH_BBO, self.book_channel):
                if ch in self._channels:
                    out.append(_arg(ch, sym))
            kind = inst_type(sym)
            if kind is None:
                continue  # spot: no funding, mark price, open interest or liquidations
            for ch in DERIVATIVE_CHANNELS:
                if ch in self._channels and (ch != CH_FUNDING or kind == "SWAP"):
                    out.append(_arg(ch, sym))
            if CH_LIQUIDATIONS in self._channels and kind not in liquidation_types:
                liquidation_types.append(kind)
        # One all-market stream per instType; rows of instIds not subscribed are dropped.
        out.extend({"channel": CH_LIQUIDATIONS, "instType": kind}
                   for kind in liquidation_types)
        return out

    def _book_symbols(self) -> tuple[str, ...]:
        return tuple(self.feed.symbols) if CH_BOOKS in self._channels else ()

    def on_connect(self) -> None:
        # A new connection: every book starts again from the snapshot OKX sends on subscribe.
        self.books.reset(expect=self._book_symbols())

    def subscribe_messages(self) -> Sequence[str]:
        args = self.args()
        return [_request("subscribe", args[i:i + ARGS_PER_REQUEST])
                for i in range(0, len(args), ARGS_PER_REQUEST)]

    def keepalive_message(self) -> str | None:
        return "ping"

    def _resubscribe(self, symbols: list[str], out: Output) -> None:
        """Ask OKX for fresh `books` snapshots (BookSync's `resubscribe`)."""
        args = [_arg(self.book_channel, symbol) for symbol in symbols]
        out.reply(_request("unsubscribe", args))
        out.reply(_request("subscribe", args))

    # ---- frames ----------------------------------------------------------------------------
    def parse_frame(self, frame: bytes | str, ts_recv_ns: int, recv_seq: int,
                    out: Output) -> None:
        raw = frame.encode() if isinstance(frame, str) else frame
        if raw.startswith(_DATA_HEAD):
            fast = _FAST.get(raw[19:raw.find(b'"', 19)])
            if fast is not None:
                channel, decoder = fast
                msg = decoder.decode(raw)
                arg = msg.arg
                if arg.channel != channel:
                    raise BadFrame("arg repeated with another channel")
                if self._wanted(channel, arg.instId, out):
                    self._data(channel, arg.instId, msg, ts_recv_ns, recv_seq, out)
                return
        elif raw == b"pong":
            return
        self._generic(raw, ts_recv_ns, recv_seq, out)

    def _wanted(self, channel: str, sym: str, out: Output) -> bool:
        if channel not in _KNOWN_CHANNELS:
            out.unknown += 1
            return False
        if channel not in self._channels or sym not in self.symbols:
            out.drop(DROP_UNSUBSCRIBED)
            return False
        return True

    def _data(self, channel: str, sym: str, msg: Any, ts_recv_ns: int, recv_seq: int,
              out: Output) -> None:
        if channel == CH_TRADES:
            self._trades(sym, msg.data, ts_recv_ns, recv_seq, out)
        elif channel == CH_BBO:
            self._quotes(sym, msg.data, ts_recv_ns, recv_seq, out)
        elif channel == CH_BOOKS5:
            self._books5(sym, msg.data, ts_recv_ns, recv_seq, out)
        else:
            self._books(sym, msg.action, msg.data, ts_recv_ns, recv_seq, out)

    def _generic(self, raw: bytes, ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        """Frames off the fast path: control frames, data in another key order, unknown
        kinds, and bad frames (which raise here with a precise reason)."""
        env = _ENVELOPE.decode(raw)
        if env.event is not None:
            self._control(env, ts_recv_ns, recv_seq, out)
            return
        arg, data = env.arg, env.data
        if arg is None or not data or (len(data) == 4 and bytes(data) == b"null"):
            out.unknown += 1
            return
        if arg.channel == CH_LIQUIDATIONS:
            if CH_LIQUIDATIONS not in self._channels:
                out.drop(DROP_UNSUBSCRIBED)
                return
            self._liquidations(_LIQUIDATION_LIST.decode(data), ts_recv_ns, recv_seq, out)
            return
        channel, sym = arg.channel, arg.instId
        if channel is None or sym is None:
            raise BadFrame("arg without channel/instId")
        if not self._wanted(channel, sym, out):
            return
        if channel == CH_FUNDING:
            for f in _FUNDING_LIST.decode(data):
                self._derivative(sym, f.instId, _ms_opt(f.ts), ts_recv_ns, recv_seq, out,
                                 funding_rate=_number(f.fundingRate, "fundingRate", False),
                                 predicted_funding_rate=_number(
                                     f.nextFundingRate, "nextFundingRate", False),
                                 next_funding_time=_ms(f.fundingTime))
            return
        if channel == CH_MARK:
            for m in _MARK_LIST.decode(data):
                self._derivative(sym, m.instId, _ms(m.ts), ts_recv_ns, recv_seq, out,
                                 mark_price=_number(m.markPx, "markPx", True))
            return
        if channel == CH_OI:
            self._open_interest(sym, _OI_LIST.decode(data), ts_recv_ns, recv_seq, out)
            return
        if channel == CH_TRADES:
            msg: Any = _TradesMsg(_Arg(channel, sym), _TRADE_LIST.decode(data))
        elif channel == CH_BBO:
            msg = _QuotesMsg(_Arg(channel, sym), _QUOTE_LIST.decode(data))
        else:
            msg = _BooksMsg(_Arg(channel, sym), _BOOK_LIST.decode(data), env.action)
        self._data(channel, sym, msg, ts_recv_ns, recv_seq, out)

    def _control(self, env: _Envelope, ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        event = env.event
        code = "" if env.code is None else str(env.code)
        text = env.msg or ""
        if event == "subscribe":
            if env.arg is None:
                raise BadFrame("subscribe ack without arg")
            self.subscribed(out, env.arg.instId, ts_recv_ns, recv_seq, env.arg.channel)
        elif event in ("unsubscribe", "channel-conn-count"):
            pass
        elif event == "error":
            detail = f"{code}: {text}"[:500]
            m = _REFUSED.search(text)
            if m is not None and m.group(1) in self._channels and m.group(2) in self.symbols:
                self.refused(out, m.group(2), ts_recv_ns, recv_seq, detail)
            else:
                self.venue_error(out, ts_recv_ns, recv_seq, detail)
        elif event == "notice":
            self.ev(out, "notice", ts_recv_ns, recv_seq, None, f"{code}: {text}"[:500])
            if code == "64008":  # "The connection will soon be closed for a service upgrade"
                out.reconnect = f"notice {code}"
        elif event == "channel-conn-count-error":
            self.venue_error(out, ts_recv_ns, recv_seq, f"{code}: {text}"[:500])
        else:
            out.unknown += 1

    # ---- derivatives and liquidations --------------------------------------------------------
    def _derivative(self, sym: str, inst_id: str, ts_event: int | None, ts_recv_ns: int,
                    recv_seq: int, out: Output, **values: float | int | None) -> None:
        if inst_id != sym:
            raise BadFrame(f"data of {inst_id!r} on {sym!r}'s channel"[:120])
        self.derivs.update(out, sym, ts_event, ts_recv_ns, recv_seq, **values)

    def _open_interest(self, sym: str, data: list[_OpenInterest], ts_recv_ns: int,
                       recv_seq: int, out: Output) -> None:
        for o in data:
            oi = _number(o.oi, "oi", False)
            if oi is not None and oi < 0:
                raise BadFrame(f"oi out of range: {o.oi!r}"[:80])
            self._derivative(sym, o.instId, _ms(o.ts), ts_recv_ns, recv_seq, out,
                             open_interest=oi)

    def _liquidations(self, data: list[_Liquidation], ts_recv_ns: int, recv_seq: int,
                      out: Output) -> None:
        """`liquidation-orders` (one stream per instType): side `details[].side` (the
        order's), price `bkPx`, amount `sz` (contracts), time `details[].ts`."""
        rows = []
        for item in data:
            for d in item.details:
                side = _SIDES.get(d.side)
                if side is None:
                    raise BadFrame(f"liquidation side {d.side!r}"[:80])
                rows.append((item.instId, _ms(d.ts), side, price(d.bkPx), amount(d.sz)))
        unsubscribed = 0
        for sym, ts_event, side, px, qty in rows:
            if sym not in self.symbols:
                unsubscribed += 1
                continue
            out.liquidations_block().add(sym, ts_event, ts_recv_ns, recv_seq, side, px, qty,
                                         None)
        if unsubscribed:
            out.drop(DROP_UNSUBSCRIBED, unsubscribed)

    # ---- trades ----------------------------------------------------------------------------
    def _trades(self, sym: str, data: list[_Trade], ts_recv_ns: int, recv_seq: int,
                out: Output) -> None:
        # The whole frame is checked before any id is recorded.
        checked = []
        for t in data:
            text, tid = trade_id(t.tradeId)
            count = _count(t.count)
            last = None
            if tid is not None and count > 1:
                if count > tid + 1:
                    raise BadFrame(f"trade count {count} exceeds tradeId {tid}")
                tid, last = tid - count + 1, tid   # the push covers its count fills
            checked.append((text, tid, last, _ms(t.ts), _SIDES.get(t.side, UNKNOWN),
                            price(t.px), amount(t.sz)))
        ids = self.trade_ids
        block = None
        for text, tid, last, ts_event, side, px, qty in checked:
            if admit_trade_id(self, out, ids, sym, text, tid, ts_recv_ns, recv_seq, last):
                if block is None:
                    block = out.trades_block()
                block.add(sym, ts_event, ts_recv_ns, recv_seq, text, side, px, qty)

    # ---- quotes ----------------------------------------------------------------------------
    def _quotes(self, sym: str, data: list[_Quote], ts_recv_ns: int, recv_seq: int,
                out: Output) -> None:
        for d in data:
            bids, _ = levels_with_text(d.bids)
            asks, _ = levels_with_text(d.asks)
            bid = bids[0] if bids else (None, None)
            ask = asks[0] if asks else (None, None)
            out.quotes_block().add(sym, _ms_opt(d.ts), ts_recv_ns, recv_seq, bid[0], bid[1],
                                   ask[0], ask[1])

    # ---- books5: every push is the whole top 5 ---------------------------------------------
    def _books5(self, sym: str, data: list[_Book], ts_recv_ns: int, recv_seq: int,
                out: Output) -> None:
        if not data:
            return
        d = data[-1]  # one element; if several, the last is the current book
        bids, _ = levels_with_text(d.bids)
        asks, _ = levels_with_text(d.asks)
        out.book_block().add_levels(sym, _ms_opt(d.ts), ts_recv_ns, recv_seq, True, bids,
                                    asks, d.seqId)

    # ---- books: snapshot + updates, seqId chain and checksum -------------------------------
    def _books(self, sym: str, action: str | None, data: list[_Book], ts_recv_ns: int,
               recv_seq: int, out: Output) -> None:
        if action not in ("snapshot", "update"):
            raise BadFrame(f"unknown books action {action!r}"[:80])
        # Validate everything before touching the book.
        msgs = []
        for d in data:
            bids, bid_texts = levels_with_text(d.bids)
            asks, ask_texts = levels_with_text(d.asks)
            msgs.append((bids, asks, (bid_texts, ask_texts), _ms_opt(d.ts), d.seqId,
                         d.prevSeqId, d.checksum or None))  # 0: not provided
        if action == "snapshot":
            if msgs:  # one element in practice; if several, the last is the book
                self._snapshot(sym, *msgs[-1], ts_recv_ns, recv_seq, out)
            return
        for m in msgs:
            self._update(sym, *m, ts_recv_ns, recv_seq, out)

    def _snapshot(self, sym: str, bids: Levels, asks: Levels,
                  texts: tuple[TextLevels, TextLevels], ts_event: int | None,
                  seq: int | None, prev: int | None, crc: int | None, ts_recv_ns: int,
                  recv_seq: int, out: Output) -> None:
        if crc is None:
            self.checksums_absent += 1
        self.books.snapshot(sym, out, ts_event_ns=ts_event, ts_recv_ns=ts_recv_ns,
                            recv_seq=recv_seq, bids=bids, asks=asks,
                            snapshot_id=NO_SEQ if seq is None else seq, update_id=seq,
                            texts=texts, check=crc,
                            detail="snapshot" if seq is None else f"snapshot seqId={seq}")

    def _update(self, sym: str, bids: Levels, asks: Levels,
                texts: tuple[TextLevels, TextLevels], ts_event: int | None, seq: int | None,
                prev: int | None, crc: int | None, ts_recv_ns: int, recv_seq: int,
                out: Output) -> None:
        sid = NO_SEQ if seq is None else seq
        diff = Diff(sid, sid, NO_SEQ if prev is None else prev, seq, ts_event, ts_recv_ns,
                    bids, asks, 0, texts, crc)
        if self.books.diff(sym, diff, out, recv_seq) and crc is None:
            self.checksums_absent += 1

    def _verify(self, book: SymbolBook, crc: int, snapshot: bool) -> str | None:
        """BookSync's `verify`: OKX's checksum of the book as kept against the one sent."""
        assert book.bids is not None and book.asks is not None
        mine = checksum(book.bids.top_text(CHECKSUM_DEPTH), book.asks.top_text(CHECKSUM_DEPTH))
        if mine == crc:
            self.checksums_verified += 1
            return None
        seq = None if book.last_id == NO_SEQ else book.last_id
        return (f"checksum expected={crc} computed={mine} "
                f"({'snapshot' if snapshot else 'update'} seqId={seq})")


__all__ = ["NO_SEQ", "Okx", "OkxRules", "checksum", "signed_crc32"]
