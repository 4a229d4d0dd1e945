"""KuCoin spot public WebSocket codec (`kucoin`).

Owns KuCoin's wire format and rules:

Connecting: every connection needs a fresh public token. Before each connection the
reader POSTs `/api/v1/bullet-public` (`connect_request`, see exchanges/connect.py) and
hands the answer to `on_connect_answer`: `{"code":"200000","data":{"token":...,
"instanceServers":[{"endpoint","protocol":"websocket","pingInterval","pingTimeout",...}]}}`.
`ws_url()` is then `<endpoint>?token=<token>&connectId=<id>` (a feed's `url` replaces the
endpoint's scheme, host and port, and its path if it has one). A refused or unreadable
answer fails the session (backoff, breaker). The venue greets with `welcome`; the token
never reaches an event or a log (the reader strips the query).

Keepalive: `{"id":"<n>","type":"ping"}` every `pingInterval` of the answer (KuCoin's
documented default 18 s; kept within 1..20 s so the `pong` also feeds the stale-stream
timer), answered by `pong` (silent). No protocol-level pings. KuCoin expects a connection
to end after 24 h: a make-before-break rotation after 23 h reuses the session's token
(still valid then); the rotated connection keeps books, trade and quote ids (the venue's
sequences continue across connections), so the overlap is dropped by ids.

Limits (KuCoin "Websocket Rate Limit"): 30 connections per minute (`connect_limit`), at
most 100 topics per subscribe request (symbols are sent in chunks of 100), 400 topics per
connection (`check_feed`: symbols x channels), 100 uplink messages per 10 s (at most 12
subscribe requests and one ping per interval are sent).

Channels (subscribe `{"id","type":"subscribe","topic","privateChannel":false,
"response":true}`, acked by `{"id","type":"ack"}` -> one `subscribed` event per symbol):

- `/market/match:<syms>` (`trade.l3match`) -> trades. `trade_id` = `tradeId` (a 24-hex
  ObjectId: opaque ids, de-duplicated over a window by exchanges/trades.py; KuCoin trade
  ids carry no continuity, and the match `sequence` shares the order book's sequence
  space, so a lost trade cannot be told apart from a book change: no trade gap events).
  `ts_event` = `time` (nanoseconds, exact). `side` is the TAKER's side, as sent: checked
  on the recording (2021-04-25) against the book rebuilt from the REST snapshot and the
  level2 diffs up to the trade's `sequence - 1`: 10/10 checkable DAPPT-BTC `buy` trades
  printed at or above the best ask (sweeping it: 1.117e-7 ... 1.123e-7). The other 8
  recorded trades (2 DAPPT-BTC buys, BCHSV-USDT 2 buys / 3 sells, FET-BTC 1 buy) fall
  after the recorded level2 window of their symbol and could not be checked; no `sell`
  could be checked.
- `/market/ticker:<syms>` (`trade.ticker`) -> quotes: `bestBid`/`bestBidSize`,
  `bestAsk`/`bestAskSize`, `ts_event` = `time` (ms). The symbol is in the topic only.
  `sequence` (the book's sequence; rises strictly per symbol over the recording) drops a
  repeated or older ticker (`duplicate_quote`); it is forgotten on reconnect.
- `/market/level2:<syms>` (`trade.l2update`) -> book, synced by KuCoin's documented
  procedure on the shared `BookSync` (REST mode, `KucoinRules`): diffs are buffered from
  the first one and a REST snapshot is fetched (`GET /api/v1/market/orderbook/level2_100`
  or `level2_20` with `book_depth = 20`: the public ones; the full book `/api/v3/...`
  needs an API key). A snapshot older than the first buffered diff is fetched again;
  buffered diffs with `sequenceEnd <= sequence` are dropped; a diff applies if
  `sequenceStart <= last sequenceEnd + 1` and `sequenceEnd > last sequenceEnd` (the
  documented rule; the recording always has `sequenceStart == previous sequenceEnd + 1`:
  0 breaks over 3853 frames, fixtures README). Anything else is a `gap` event, a new
  snapshot and a `resync` event. Changes are `[price, size, sequence]`: price "0" is a
  sequence-only change (ignored; 122 of the 300 recorded frames), size "0" removes the
  level. A change's own sequence is the last modification of that price (KuCoin: "does
  not serve as a basis for judging message continuity"), so each price appears once per
  side and a change already contained in the snapshot restates its level: whole messages
  are applied. `update_id` = `sequenceEnd` (the snapshot's `sequence`); `ts_event` =
  `time` (ms; absent in 2021 frames: null). The public snapshot holds the best 100 (20)
  levels: after a snapshot the book is exact to that depth; deeper levels appear as
  diffs touch them (no truncation is written: every level kept has its true size).

Control frames: `welcome` and `pong` are silent; `error` with the id of one of our
subscribe requests -> `refused` for its topic; other errors -> an `error` event. Data of
symbols or channels the feed did not subscribe is dropped and counted; other subjects and
types are unknown messages.

State (`state()` / `restore()`): trade ids (`trades`), last ticker sequence per symbol
(`quotes`), every book's sync position and buffered diffs (`books`).

Must not: do I/O, read a clock or log (see exchanges/base.py); catch decode errors itself
(the base rejects the frame); change any state before a frame is known to be well-formed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, ClassVar, Final
from urllib.parse import quote, urlsplit

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
    ms_to_ns,
    override_url,
    parse_levels,
    price,
    quote_side,
)
from ingestd.exchanges.book import BookSync, Diff, Levels, RangeRules, RestSnapshot
from ingestd.exchanges.connect import ConnectRequest
from ingestd.exchanges.trades import TradeIds, admit_trade_id, trade_id
from ingestd.schema import BUY, SELL, UNKNOWN

TOPIC_TRADES: Final = "/market/match:"
TOPIC_QUOTES: Final = "/market/ticker:"
TOPIC_BOOK: Final = "/market/level2:"
# (feed channel, topic prefix) in subscription order.
TOPICS: Final = (("trades", TOPIC_TRADES), ("quotes", TOPIC_QUOTES), ("book", TOPIC_BOOK))
SYMBOLS_PER_TOPIC: Final = 100      # "Maximum number of batch subscriptions at a time"
TOPICS_PER_CONNECTION: Final = 400  # "Subscription limit for each connection"
BULLET_PATH: Final = "/api/v1/bullet-public"
SNAPSHOT_PATHS: Final[dict[int, str]] = {
    100: "/api/v1/market/orderbook/level2_100", 20: "/api/v1/market/orderbook/level2_20"}
DEFAULT_BOOK_DEPTH: Final = 100
OK_CODE: Final = "200000"
DEFAULT_PING_INTERVAL_S: Final = 18.0
MIN_PING_INTERVAL_S: Final = 1.0
MAX_PING_INTERVAL_S: Final = 20.0
DROP_DUPLICATE_QUOTE: Final = "duplicate_quote"

_MAX_I64: Final = 2**63 - 1
_SIDES: Final[dict[str, str]] = {"buy": BUY, "sell": SELL}


# ---- wire structs (no reference cycles: untracked by the GC) -------------------------------
class _MatchData(msgspec.Struct, gc=False):
    symbol: str
    side: str
    price: str
    size: str
    tradeId: str | int
    time: str | int              # nanoseconds
    sequence: str | int | None = None


class _TickerData(msgspec.Struct, gc=False):
    sequence: str | int
    bestBid: str | None = None
    bestBidSize: str | None = None
    bestAsk: str | None = None
    bestAskSize: str | None = None
    time: str | int | None = None  # milliseconds


class _Changes(msgspec.Struct, gc=False):
    asks: list[list[str]]        # [price, size, sequence]
    bids: list[list[str]]


class _Level2Data(msgspec.Struct, gc=False):
    symbol: str
    sequenceStart: str | int
    sequenceEnd: str | int
    changes: _Changes
    time: str | int | None = None  # milliseconds (2022+)


class _Match(msgspec.Struct, tag_field="subject", tag="trade.l3match", gc=False):
    topic: str
    data: _MatchData


class _Ticker(msgspec.Struct, tag_field="subject", tag="trade.ticker", gc=False):
    topic: str
    data: _TickerData


class _Level2(msgspec.Struct, tag_field="subject", tag="trade.l2update", gc=False):
    topic: str
    data: _Level2Data


class _Control(msgspec.Struct, gc=False):
    """Every frame off the fast path: welcome, ack, pong, error, other subjects."""

    type: str
    id: str | int | None = None
    code: str | int | None = None
    data: Any = None
    topic: str | None = None
    subject: str | None = None


class _Server(msgspec.Struct, gc=False):
    endpoint: str
    pingInterval: int
    protocol: str = "websocket"
    pingTimeout: int | None = None


class _BulletData(msgspec.Struct, gc=False):
    token: str
    instanceServers: list[_Server]


class _Bullet(msgspec.Struct, gc=False):
    code: str | int
    data: _BulletData | None = None
    msg: str | None = None


class _SnapshotData(msgspec.Struct, gc=False):
    sequence: str | int
    bids: list[list[str]]
    asks: list[list[str]]
    time: int | None = None


class _Snapshot(msgspec.Struct, gc=False):
    code: str | int
    data: _SnapshotData | None = None
    msg: str | None = None


_MESSAGE = msgspec.json.Decoder(_Match | _Ticker | _Level2)
_CONTROL = msgspec.json.Decoder(_Control)
_BULLET = msgspec.json.Decoder(_Bullet)
_SNAPSHOT = msgspec.json.Decoder(_Snapshot)
_SUBJECTS: Final = frozenset({"trade.l3match", "trade.ticker", "trade.l2update"})


# ---- field helpers ---------------------------------------------------------------------------
def _int(v: str | int, what: str) -> int:
    """A non-negative int64 sent as a JSON integer or a digit string."""
    if isinstance(v, str):
        if not (v.isascii() and v.isdigit() and len(v) <= 19):
            raise BadFrame(f"bad {what}: {v!r}"[:80])
        v = int(v)
    if not 0 <= v <= _MAX_I64:
        raise BadFrame(f"{what} out of range: {v}"[:80])
    return v


def _ms(v: str | int | None) -> int | None:
    return None if v is None else ms_to_ns(_int(v, "time"))


def _changes(raw: list[list[str]]) -> Levels:
    """One side's `[price, size, sequence]` changes -> levels to apply, in sequence order;
    price 0 is a sequence-only change (skipped)."""
    if len(raw) > 1 and len({lv[0] for lv in raw}) != len(raw):
        # A price twice in one message: apply its changes in their sequence order.
        raw = sorted(raw, key=lambda lv: _int(lv[2], "change sequence"))
    return parse_levels([(lv[0], lv[1]) for lv in raw if float(lv[0]) != 0.0])


def _text(body: bytes) -> str:
    return body[:200].decode("utf-8", "replace")


# ---- continuity rules -------------------------------------------------------------------------
class KucoinRules(RangeRules):
    """KuCoin level2: a diff is contained in the book if `sequenceEnd <= last`; the first
    one applied after a snapshot and every later one needs `sequenceStart <= last + 1`
    (and, not contained, `sequenceEnd > last`)."""

    FIRST = "sequenceStart"
    LAST = "sequenceEnd"
    CONTIGUOUS = False


class _QuoteSeqs:
    """The last ticker `sequence` per symbol (a ticker at or below it is a repeat)."""

    def __init__(self) -> None:
        self.last: dict[str, int] = {}

    def state(self) -> dict[str, int]:
        return dict(self.last)

    def restore(self, state: Any) -> None:
        if not isinstance(state, dict) or not all(
                isinstance(k, str) and type(v) is int and 0 <= v <= _MAX_I64
                for k, v in state.items()):
            raise BadFrame("quote sequences are not an object of int64 values")
        self.last = dict(state)


class Kucoin(Codec):
    exchange: ClassVar[str] = "kucoin"
    # The usual endpoint; each connection uses the one the bullet-public answer names.
    default_ws_url: ClassVar[str] = "wss://ws-api-spot.kucoin.com/"
    default_rest_url: ClassVar[str | None] = "https://api.kucoin.com"
    # Until an answer says otherwise (each answer sets this codec's own value).
    keepalive_interval_s: ClassVar[float | None] = DEFAULT_PING_INTERVAL_S
    ws_ping_interval_s: ClassVar[float | None] = None
    default_stale_after_s: ClassVar[float] = 30.0
    default_rotate_after_s: ClassVar[float | None] = 82_800.0
    # "Connection Limit: 30 per minute".
    connect_limit: ClassVar[tuple[int, float]] = (30, 60.0)
    CHANNELS: ClassVar[tuple[str, ...]] = ("trades", "quotes", "book")
    book_depths: ClassVar[tuple[int, ...]] = tuple(sorted(SNAPSHOT_PATHS))
    book_depth_note: ClassVar[str] = "the public REST snapshots level2_20, level2_100"
    symbol_pattern: ClassVar[re.Pattern[str] | None] = re.compile(r"[A-Z0-9]+-[A-Z0-9]+")
    symbol_spelling: ClassVar[str] = "a KuCoin symbol (e.g. 'BTC-USDT')"

    def __init__(self, feed: FeedConfig) -> None:
        super().__init__(feed)
        self.depth = feed.book_depth or DEFAULT_BOOK_DEPTH
        self._want_trades = "trades" in self.channels
        self._want_quotes = "quotes" in self.channels
        self._want_book = "book" in self.channels
        self.trade_ids = self.stateful("trades", TradeIds(consecutive=False))
        self.quote_seqs = self.stateful("quotes", _QuoteSeqs())
        self.books: BookSync = self.stateful("books", BookSync(
            self, KucoinRules(), snapshot_request=self._snapshot_url))
        # From the last bullet-public answer (never saved: a token is per session).
        self._endpoint: str | None = None
        self._token: str | None = None
        self._ids = 0                          # request ids and connectIds, per codec
        self._topics: dict[str, str] = {}      # subscribe request id -> topic

    # ---- config ----------------------------------------------------------------------------
    @classmethod
    def check_feed(cls, feed: FeedConfig) -> list[str]:
        problems = super().check_feed(feed)
        topics = len(feed.symbols) * len(feed.channels)
        if topics > TOPICS_PER_CONNECTION:
            problems.append(f"symbols: {topics} topics (symbols x channels) exceed KuCoin's "
                            f"{TOPICS_PER_CONNECTION} per connection")
        return problems

    # ---- connecting: the bullet-public token ------------------------------------------------
    def connect_request(self) -> ConnectRequest:
        return ConnectRequest(self.rest_url(BULLET_PATH), "POST")

    def on_connect_answer(self, status: int, body: bytes) -> str | None:
        """Take the token, endpoint and ping interval of a bullet-public answer."""
        if status != 200:
            return (f"bullet-public HTTP {status}: {_text(body)}" if status
                    else f"bullet-public no answer: {_text(body)}")
        try:
            answer = _BULLET.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            return f"bullet-public answer unreadable: {e}"[:200]
        if str(answer.code) != OK_CODE or answer.data is None:
            return f"bullet-public code {answer.code}: {answer.msg or ''}"[:200]
        token = answer.data.token
        server = next((s for s in answer.data.instanceServers
                       if s.protocol == "websocket" and _ws_endpoint(s.endpoint)), None)
        if not token or server is None or server.pingInterval <= 0:
            return "bullet-public answer has no token, websocket endpoint or ping interval"
        self._endpoint, self._token = server.endpoint, token
        # Codec.keepalive_interval_s is a class default; KuCoin's comes with each answer.
        vars(self)["keepalive_interval_s"] = min(
            MAX_PING_INTERVAL_S, max(MIN_PING_INTERVAL_S, server.pingInterval / 1000))
        return None

    def ws_url(self) -> str:
        if self._endpoint is None or self._token is None:
            raise RuntimeError("kucoin connects with a bullet-public token: none yet")
        base = override_url(self._endpoint, self.feed.url)
        sep = "&" if urlsplit(base).query else "?"
        return f"{base}{sep}token={quote(self._token, safe='')}&connectId={self._next_id()}"

    def _next_id(self) -> str:
        self._ids += 1
        return str(self._ids)

    # ---- connection ------------------------------------------------------------------------
    def topics(self) -> list[str]:
        """Every topic this feed subscribes to (at most 100 symbols each)."""
        syms = list(self.feed.symbols)
        return [prefix + ",".join(syms[i:i + SYMBOLS_PER_TOPIC])
                for channel, prefix in TOPICS if channel in self.channels
                for i in range(0, len(syms), SYMBOLS_PER_TOPIC)]

    def subscribe_messages(self) -> Sequence[str]:
        msgs = []
        self._topics = {}
        for topic in self.topics():
            rid = self._next_id()
            self._topics[rid] = topic
            msgs.append(orjson.dumps({"id": rid, "type": "subscribe", "topic": topic,
                                      "privateChannel": False, "response": True}).decode())
        return msgs

    def keepalive_message(self) -> str | None:
        return orjson.dumps({"id": self._next_id(), "type": "ping"}).decode()

    def on_connect(self) -> None:
        # A new connection: books are rebuilt from fresh snapshots; tickers start again.
        self.books.reset()
        self.quote_seqs.last.clear()

    def on_rotate(self) -> None:
        # Make-before-break: the venue's sequences continue; the overlap is dropped by them.
        pass

    def _snapshot_url(self, symbol: str) -> str:
        return self.rest_url(f"{SNAPSHOT_PATHS[self.depth]}?symbol={quote(symbol, safe='-')}")

    # ---- frames ----------------------------------------------------------------------------
    def parse_frame(self, frame: bytes | str, ts_recv_ns: int, recv_seq: int,
                    out: Output) -> None:
        raw = frame.encode() if isinstance(frame, str) else frame
        try:
            msg = _MESSAGE.decode(raw)
        except msgspec.ValidationError as e:
            self._control(raw, e, ts_recv_ns, recv_seq, out)
            return
        cls = type(msg)
        if cls is _Level2:
            self._level2(msg.data, len(raw), ts_recv_ns, recv_seq, out)
        elif cls is _Ticker:
            self._ticker(msg.topic, msg.data, ts_recv_ns, recv_seq, out)
        else:
            self._trade(msg.data, ts_recv_ns, recv_seq, out)

    def _control(self, raw: bytes, error: msgspec.ValidationError, ts_recv_ns: int,
                 recv_seq: int, out: Output) -> None:
        """Frames off the fast path: control frames, unknown subjects, and bad data frames
        (whose precise error is re-raised)."""
        ctl = _CONTROL.decode(raw)
        kind = ctl.type
        if kind == "message":
            if ctl.subject in _SUBJECTS:
                raise error
            out.unknown += 1
        elif kind == "ack":
            topic = self._topics.get(str(ctl.id))
            if topic is None:
                return  # an ack of a request of an earlier connection
            channel, _, syms = topic.partition(":")
            for sym in syms.split(","):
                self.subscribed(out, sym, ts_recv_ns, recv_seq, channel)
        elif kind == "error":
            detail = f"{ctl.code}: {ctl.data}"[:300]
            topic = self._topics.get(str(ctl.id))
            if topic is not None:
                self.refused(out, None, ts_recv_ns, recv_seq, f"{topic[:150]}: {detail}")
            else:
                self.venue_error(out, ts_recv_ns, recv_seq, detail)
        elif kind not in ("welcome", "pong"):
            out.unknown += 1

    # ---- trades ----------------------------------------------------------------------------
    def _trade(self, d: _MatchData, ts_recv_ns: int, recv_seq: int, out: Output) -> None:
        sym = d.symbol
        if not self._want_trades or sym not in self.symbols:
            out.drop(DROP_UNSUBSCRIBED)
            return
        px, qty = price(d.price), amount(d.size)
        ts_event = _int(d.time, "trade time")
        text, tid = trade_id(d.tradeId)
        if admit_trade_id(self, out, self.trade_ids, sym, text, tid, ts_recv_ns, recv_seq):
            out.trades_block().add(sym, ts_event, ts_recv_ns, recv_seq, text,
                                   _SIDES.get(d.side, UNKNOWN), px, qty)

    # ---- quotes ----------------------------------------------------------------------------
    def _ticker(self, topic: str, d: _TickerData, ts_recv_ns: int, recv_seq: int,
                out: Output) -> None:
        if not topic.startswith(TOPIC_QUOTES):
            raise BadFrame(f"ticker on topic {topic!r}"[:80])
        sym = topic[len(TOPIC_QUOTES):]
        if not self._want_quotes or sym not in self.symbols:
            out.drop(DROP_UNSUBSCRIBED)
            return
        seq = _int(d.sequence, "ticker sequence")
        bid = quote_side(d.bestBid, d.bestBidSize)
        ask = quote_side(d.bestAsk, d.bestAskSize)
        ts_event = _ms(d.time)
        last = self.quote_seqs.last
        prev = last.get(sym)
        if prev is not None and seq <= prev:
            out.drop(DROP_DUPLICATE_QUOTE)
            return
        out.quotes_block().add(sym, ts_event, ts_recv_ns, recv_seq, bid[0], bid[1],
                               ask[0], ask[1])
        last[sym] = seq

    # ---- order book ------------------------------------------------------------------------
    def _level2(self, d: _Level2Data, nbytes: int, ts_recv_ns: int, recv_seq: int,
                out: Output) -> None:
        sym = d.symbol
        if not self._want_book or sym not in self.symbols:
            out.drop(DROP_UNSUBSCRIBED)
            return
        first = _int(d.sequenceStart, "sequenceStart")
        last = _int(d.sequenceEnd, "sequenceEnd")
        if last < first:
            raise BadFrame(f"sequenceEnd {last} < sequenceStart {first}")
        diff = Diff(first, last, -1, last, _ms(d.time), ts_recv_ns, _changes(d.changes.bids),
                    _changes(d.changes.asks), nbytes)
        self.books.diff(sym, diff, out, recv_seq)

    def on_rest(self, request: RestRequest, status: int, body: bytes,
                ts_recv_ns: int, recv_seq: int) -> Output:
        return self.books.rest_answer(request, status, body, ts_recv_ns, recv_seq,
                                      _rest_snapshot)


def _ws_endpoint(url: str) -> bool:
    """A WebSocket URL with a host (what a bullet-public answer must name)."""
    try:
        parts = urlsplit(url)
        return parts.scheme in ("ws", "wss") and bool(parts.hostname)
    except ValueError:
        return False


__all__ = ["Kucoin", "KucoinRules"]


def _rest_snapshot(body: bytes) -> RestSnapshot:
    """The REST `level2_100` / `level2_20` answer: `{code, data: {sequence, time, bids,
    asks}}`; its `sequence` is what buffered diffs are bridged from (KucoinRules)."""
    snap = _SNAPSHOT.decode(body)
    if str(snap.code) != OK_CODE or snap.data is None:
        raise BadFrame(f"code {snap.code}: {snap.msg or ''}"[:200])
    data = snap.data
    seq = _int(data.sequence, "snapshot sequence")
    return RestSnapshot(parse_levels(data.bids), parse_levels(data.asks), snapshot_id=seq,
                        update_id=seq, ts_event_ns=_ms(data.time),
                        detail=f"snapshot sequence={seq}")
