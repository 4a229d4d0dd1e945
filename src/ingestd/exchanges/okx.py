"""OKX v5 public WebSocket codec (`okx`).

Owns: the subscribe / unsubscribe requests of OKX's public endpoint
(`wss://ws.okx.com:8443/ws/v5/public`), its plain-text `ping`/`pong` keepalive, and the
decoding of these channels into rows:

- `trades` -> trades. `side` is the taker's side as sent (checked against the recorded
  2022 capture: 46/46 `buy` trades printed at the best ask, 25/25 `sell` at the best bid).
  `trade_id` = `tradeId` (in 2023+ frames the last id of an aggregation of `count` fills).
  Duplicates are dropped per instId: `tradeId` is a per-instrument increasing integer
  (observed), so a watermark suffices; a non-integer id falls back to a bounded set of
  recently seen ids. For SWAP / FUTURES / OPTION instruments `sz` is in contracts (OKX's
  unit; no instrument metadata is fetched to convert it).
- `bbo-tbt` -> quotes (the `quotes` channel). Chosen over `tickers` because it is the true
  best bid/offer pushed tick by tick (10 ms) with both sides in every push, whereas
  `tickers` is a throttled (100 ms) 24 h statistics message whose bid/ask are a side
  product. An empty side (empty list) is written as nulls.
- `books` (400 levels, the default; `book_depth = 400`) -> book: `action: snapshot` is a
  snapshot block (one `recv_seq`), `action: update` rows are deltas (size "0" deletes).
  OKX itself keeps the book to 400 levels per side (it sends the deletions and the levels
  that move into range; observed: BTC-USDT stays at exactly 400/400 over the capture), so
  no client-side truncation is written. `book_depth = 5` uses `books5` instead: every push
  is the full top 5, written as a snapshot block.

Continuity of `books` (per instId):
- `seqId`/`prevSeqId` (2023+): each update's `prevSeqId` must equal the previous message's
  `seqId` (updates that change nothing repeat `seqId == prevSeqId`; after a venue-side
  sequence reset `seqId` may go down but the chain by `prevSeqId` still holds);
- `checksum`: signed CRC32 of the top 25 levels interleaved `bidPx:bidSz:askPx:askSz`,
  verified on every snapshot and update whose checksum is non-zero. A checksum of 0 is
  treated as "not provided": OKX has been reported to send 0 on every `books` frame since
  2025, and a genuine CRC of 0 (odds 2**-32) merely skips one check. Frames recorded in
  2022 predate `seqId`: for them the checksum is the only continuity check.
A break (or a checksum mismatch) writes a `gap` event (expected vs received), sends
`unsubscribe` + `subscribe` for that instId (`Output.replies`), drops (and counts) updates
until the new snapshot, and writes a `resync` event with that snapshot. `update_id` is
`seqId` when present.

Control frames: subscribe acks -> `subscribed` events; unsubscribe acks and
`channel-conn-count` are silent; `error` -> `refused` (when it names one of our
channel/instId pairs) or a venue `error` event; a `notice` (64008: service upgrade) -> an
event and a reconnect; `pong` -> nothing. Data for instIds or channels the feed did not
subscribe to is dropped and counted.

Must not: do I/O, read a clock or log (see exchanges/base.py); raise from `parse`; mutate
its state from a frame that turns out to be malformed.
"""

from __future__ import annotations

import heapq
import re
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

import orjson

from ingestd.config import FeedConfig
from ingestd.exchanges.base import (
    DROP_DUPLICATE_TRADE,
    DROP_UNSUBSCRIBED,
    DROP_UNSYNCED_BOOK,
    BadFrame,
    Codec,
    Output,
    amount,
    ms_to_ns,
    price,
)
from ingestd.schema import ASK, BID, BUY, SELL, UNKNOWN, BookRow, QuoteRow, TradeRow

# Channels (OKX names) by the feed channel they serve.
CH_TRADES: Final = "trades"
CH_BBO: Final = "bbo-tbt"
CH_BOOKS: Final = "books"
CH_BOOKS5: Final = "books5"
BOOK_CHANNELS: Final[dict[int, str]] = {400: CH_BOOKS, 5: CH_BOOKS5}
DEFAULT_BOOK_DEPTH: Final = 400

CHECKSUM_DEPTH: Final = 25
# Subscribe args per request: OKX caps a request at 64 KB (an arg is ~45 bytes).
ARGS_PER_REQUEST: Final = 200
# Recently seen non-integer trade ids remembered per instId (integer ids use a watermark).
RECENT_TRADE_IDS: Final = 4096

DROP_CHECKSUM_MISMATCH: Final = "book_checksum_mismatch"

_SIDES: Final[dict[object, str]] = {"buy": BUY, "sell": SELL}
_INST_ID = re.compile(r"^[A-Z0-9]+(?:-[A-Z0-9]+)+$")
# "...channel:trades,instId:FOO-BAR doesn't exist..." (code 60018)
_REFUSED = re.compile(r"channel:\s*([\w-]+)\s*,\s*instId:\s*([\w-]+)")

_ERRORS = (orjson.JSONDecodeError, BadFrame, KeyError, TypeError, ValueError, IndexError,
           AttributeError, OverflowError)

# A parsed level: (price, price text, size, size text).
Level = tuple[float, str, float, str]


def signed_crc32(text: str) -> int:
    """CRC32 of `text` (UTF-8) as a signed 32-bit integer, as OKX sends it."""
    crc = zlib.crc32(text.encode())
    return crc - (1 << 32) if crc >= 1 << 31 else crc


def checksum(bids: Sequence[tuple[str, str]], asks: Sequence[tuple[str, str]]) -> int:
    """OKX's book checksum over sorted levels (best first) given as (price, size) texts."""
    parts: list[str] = []
    for i in range(CHECKSUM_DEPTH):
        if i < len(bids):
            parts.append(bids[i][0])
            parts.append(bids[i][1])
        if i < len(asks):
            parts.append(asks[i][0])
            parts.append(asks[i][1])
    return signed_crc32(":".join(parts))


@dataclass(slots=True)
class _Book:
    synced: bool = False
    ever_synced: bool = False
    seq_id: int | None = None
    # price -> (price text, size text) as sent (the checksum is computed on the texts)
    bids: dict[float, tuple[str, str]] = field(default_factory=dict)
    asks: dict[float, tuple[str, str]] = field(default_factory=dict)

    def checksum(self) -> int:
        bids, asks = self.bids, self.asks
        top_b = [bids[p] for p in heapq.nlargest(CHECKSUM_DEPTH, bids)]
        top_a = [asks[p] for p in heapq.nsmallest(CHECKSUM_DEPTH, asks)]
        return checksum(top_b, top_a)

    def apply(self, bids: Iterable[Level], asks: Iterable[Level]) -> None:
        for side, levels in ((self.bids, bids), (self.asks, asks)):
            for px, px_t, sz, sz_t in levels:
                if sz == 0.0:
                    side.pop(px, None)
                else:
                    side[px] = (px_t, sz_t)


@dataclass(slots=True)
class _Trades:
    """Seen trade ids of one instId: a watermark, or recent ids for non-integer ones."""

    last_id: int | None = None
    recent: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def is_new(self, tid: str) -> bool:
        if tid.isascii() and tid.isdigit():
            n = int(tid)
            return self.last_id is None or n > self.last_id
        return tid not in self.recent

    def add(self, tid: str) -> None:
        if tid.isascii() and tid.isdigit():
            n = int(tid)
            if self.last_id is None or n > self.last_id:
                self.last_id = n
            return
        self.recent[tid] = None
        if len(self.recent) > RECENT_TRADE_IDS:
            self.recent.popitem(last=False)


# ---- field helpers ---------------------------------------------------------------------------
def _text(v: object, what: str) -> str:
    if not isinstance(v, str):
        raise BadFrame(f"{what} is not a string")
    return v


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _int(v: object, what: str) -> int:
    """A JSON integer (or a digit string) that fits the int64 `update_id` column."""
    if isinstance(v, str) and v.isascii() and v.removeprefix("-").isdigit():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadFrame(f"{what} is not an integer")
    if not _INT64_MIN <= v <= _INT64_MAX:
        raise BadFrame(f"{what} out of range")
    return v


def _ts(v: object) -> int:
    """OKX `ts`: milliseconds since the epoch as a digit string."""
    if isinstance(v, str):
        if not (v.isascii() and v.isdigit()):
            raise BadFrame(f"bad ts: {v!r}")
        return ms_to_ns(v)
    return ms_to_ns(_int(v, "ts"))


def _levels(raw: object) -> list[Level]:
    if not isinstance(raw, list):
        raise BadFrame("levels are not a list")
    out: list[Level] = []
    for lvl in raw:
        if not isinstance(lvl, list) or len(lvl) < 2:
            raise BadFrame("level is not [px, sz, ...]")
        px_t, sz_t = _text(lvl[0], "price"), _text(lvl[1], "size")
        out.append((price(px_t), px_t, amount(sz_t), sz_t))
    return out


def _arg(channel: str, inst_id: str) -> dict[str, str]:
    return {"channel": channel, "instId": inst_id}


def _request(op: str, args: list[dict[str, str]]) -> str:
    return orjson.dumps({"op": op, "args": args}).decode()


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

    def __init__(self, feed: FeedConfig) -> None:
        super().__init__(feed)
        self.book_channel = BOOK_CHANNELS.get(feed.book_depth or DEFAULT_BOOK_DEPTH, CH_BOOKS)
        self._channels: frozenset[str] = frozenset(
            ch for ch, want in ((CH_TRADES, "trades" in self.channels),
                                (CH_BBO, "quotes" in self.channels),
                                (self.book_channel, "book" in self.channels)) if want)
        self._books: dict[str, _Book] = {}
        self._trades: dict[str, _Trades] = {}
        # Checksum statistics (for tests and diagnostics): verified / absent (0 or missing).
        self.checksums_verified = 0
        self.checksums_absent = 0

    # ---- config ----------------------------------------------------------------------------
    @classmethod
    def check_feed(cls, feed: FeedConfig) -> list[str]:
        problems = []
        if feed.trade_stream is not None:
            problems.append(f"trade_stream: not used by {cls.exchange}")
        if feed.book_depth is not None and feed.book_depth not in BOOK_CHANNELS:
            problems.append(f"book_depth: {feed.book_depth} is not one of "
                            f"{', '.join(str(d) for d in sorted(BOOK_CHANNELS))} "
                            "(OKX channels books5, books)")
        for sym in feed.symbols:
            if not _INST_ID.match(sym):
                problems.append(f"symbols: {sym!r} is not an OKX instId (e.g. 'BTC-USDT', "
                                "'BTC-USDT-SWAP')")
        return problems

    # ---- connection ------------------------------------------------------------------------
    def args(self) -> list[dict[str, str]]:
        """Every (channel, instId) this feed subscribes to."""
        out = []
        for sym in self.feed.symbols:
            for ch in (CH_TRADES, CH_BBO, self.book_channel):
                if ch in self._channels:
                    out.append(_arg(ch, sym))
        return out

    def on_connect(self) -> None:
        # A new connection: every book starts again from the snapshot OKX sends on subscribe.
        for book in self._books.values():
            book.synced = False
            book.seq_id = None
            book.bids.clear()
            book.asks.clear()

    def subscribe_messages(self) -> Sequence[str]:
        args = self.args()
        return [_request("subscribe", args[i:i + ARGS_PER_REQUEST])
                for i in range(0, len(args), ARGS_PER_REQUEST)]

    def keepalive_message(self) -> str | None:
        return "ping"

    # ---- frames ----------------------------------------------------------------------------
    def parse(self, frame: bytes | str, ts_recv_ns: int, recv_seq: int) -> Output:
        out = Output()
        if frame == b"pong" or frame == "pong":
            return out
        try:
            msg = orjson.loads(frame)
            if not isinstance(msg, dict):
                raise BadFrame("not a JSON object")
            if "event" in msg:
                self._control(msg, ts_recv_ns, recv_seq, out)
                return out
            arg, data = msg.get("arg"), msg.get("data")
            if arg is None or data is None:
                out.unknown = True
                return out
            if not isinstance(arg, dict) or not isinstance(data, list):
                raise BadFrame("data frame without an arg object and a data list")
            channel, sym = arg.get("channel"), arg.get("instId")
            if not isinstance(channel, str) or not isinstance(sym, str):
                raise BadFrame("arg without channel/instId")
            if channel not in (CH_TRADES, CH_BBO, CH_BOOKS, CH_BOOKS5, "tickers"):
                out.unknown = True
                return out
            if channel not in self._channels or sym not in self.symbols:
                out.drop(DROP_UNSUBSCRIBED)
                return out
            if channel == CH_TRADES:
                self._trades_frame(sym, data, ts_recv_ns, recv_seq, out)
            elif channel == CH_BBO:
                self._bbo(sym, data, ts_recv_ns, recv_seq, out)
            elif channel == CH_BOOKS5:
                self._books5(sym, data, ts_recv_ns, recv_seq, out)
            else:
                self._book_frame(sym, msg.get("action"), data, ts_recv_ns, recv_seq, out)
        except _ERRORS as e:
            fresh = Output()
            fresh.error = f"{type(e).__name__}: {e}"[:200]
            return fresh
        return out

    def _control(self, msg: dict[str, Any], ts_recv_ns: int, recv_seq: int,
                 out: Output) -> None:
        event = msg["event"]
        if event == "subscribe":
            arg = msg.get("arg")
            if not isinstance(arg, dict):
                raise BadFrame("subscribe ack without arg")
            sym, ch = arg.get("instId"), arg.get("channel")
            self.subscribed(out, sym if isinstance(sym, str) else None, ts_recv_ns, recv_seq,
                            ch if isinstance(ch, str) else None)
        elif event in ("unsubscribe", "channel-conn-count"):
            pass
        elif event == "error":
            code, text = str(msg.get("code", "")), str(msg.get("msg", ""))
            detail = f"{code}: {text}"[:500]
            m = _REFUSED.search(text)
            if m is not None and m.group(1) in self._channels and m.group(2) in self.symbols:
                self.refused(out, m.group(2), ts_recv_ns, recv_seq, detail)
            else:
                self.venue_error(out, ts_recv_ns, recv_seq, detail)
        elif event == "notice":
            code, text = str(msg.get("code", "")), str(msg.get("msg", ""))
            self.ev(out, "notice", ts_recv_ns, recv_seq, None, f"{code}: {text}"[:500])
            if code == "64008":  # "The connection will soon be closed for a service upgrade"
                out.reconnect = f"notice {code}"
        elif event == "channel-conn-count-error":
            self.venue_error(out, ts_recv_ns, recv_seq,
                             f"{msg.get('code', '')}: {msg.get('msg', '')}"[:500])
        else:
            out.unknown = True

    # ---- trades ----------------------------------------------------------------------------
    def _trades_frame(self, sym: str, data: list[Any], ts_recv_ns: int, recv_seq: int,
                      out: Output) -> None:
        parsed: list[tuple[str, TradeRow]] = []
        for d in data:
            if not isinstance(d, dict):
                raise BadFrame("trade is not an object")
            raw_id = d["tradeId"]
            if isinstance(raw_id, int) and not isinstance(raw_id, bool):
                raw_id = str(raw_id)
            tid = _text(raw_id, "tradeId")
            parsed.append((tid, (sym, _ts(d["ts"]), ts_recv_ns, recv_seq, tid,
                                 _SIDES.get(d.get("side"), UNKNOWN),
                                 price(_text(d["px"], "px")), amount(_text(d["sz"], "sz")))))
        seen = self._trades.get(sym)
        if seen is None:
            seen = self._trades[sym] = _Trades()
        rows: list[TradeRow] = []
        for tid, row in parsed:
            if not seen.is_new(tid):
                out.drop(DROP_DUPLICATE_TRADE)
                continue
            seen.add(tid)
            rows.append(row)
        if rows:
            out.trades = rows

    # ---- quotes ----------------------------------------------------------------------------
    def _bbo(self, sym: str, data: list[Any], ts_recv_ns: int, recv_seq: int,
             out: Output) -> None:
        rows: list[QuoteRow] = []
        for d in data:
            if not isinstance(d, dict):
                raise BadFrame("bbo is not an object")
            bids, asks = _levels(d["bids"]), _levels(d["asks"])
            bid = (bids[0][0], bids[0][2]) if bids else (None, None)
            ask = (asks[0][0], asks[0][2]) if asks else (None, None)
            ts = d.get("ts")
            rows.append((sym, _ts(ts) if ts is not None else None, ts_recv_ns, recv_seq,
                         bid[0], bid[1], ask[0], ask[1]))
        if rows:
            out.quotes = rows

    # ---- books5: every push is the whole top 5 ---------------------------------------------
    def _books5(self, sym: str, data: list[Any], ts_recv_ns: int, recv_seq: int,
                out: Output) -> None:
        rows: list[BookRow] = []
        for d in data[-1:]:  # one element; if several, the last is the current book
            if not isinstance(d, dict):
                raise BadFrame("book is not an object")
            bids, asks = _levels(d["bids"]), _levels(d["asks"])
            ts = d.get("ts")
            ts_event = _ts(ts) if ts is not None else None
            seq = d.get("seqId")
            uid = _int(seq, "seqId") if seq is not None else None
            for px, _, sz, _ in bids:
                rows.append((sym, ts_event, ts_recv_ns, recv_seq, True, BID, px, sz, uid))
            for px, _, sz, _ in asks:
                rows.append((sym, ts_event, ts_recv_ns, recv_seq, True, ASK, px, sz, uid))
        if rows:
            out.book = rows

    # ---- books: snapshot + updates, seqId chain and checksum -------------------------------
    def _book_frame(self, sym: str, action: object, data: list[Any], ts_recv_ns: int,
               recv_seq: int, out: Output) -> None:
        if action not in ("snapshot", "update"):
            raise BadFrame(f"unknown books action {action!r}")
        # Validate everything before touching the book.
        msgs = []
        for d in data:
            if not isinstance(d, dict):
                raise BadFrame("book is not an object")
            ts = d.get("ts")
            seq, prev, crc = d.get("seqId"), d.get("prevSeqId"), d.get("checksum")
            msgs.append((_levels(d["bids"]), _levels(d["asks"]),
                         _ts(ts) if ts is not None else None,
                         _int(seq, "seqId") if seq is not None else None,
                         _int(prev, "prevSeqId") if prev is not None else None,
                         _int(crc, "checksum") if crc is not None else 0))
        book = self._books.get(sym)
        if book is None:
            book = self._books[sym] = _Book()
        rows: list[BookRow] = []
        for idx, (bids, asks, ts_event, seq, prev, crc) in enumerate(msgs):
            snapshot = action == "snapshot"
            if snapshot:
                book.bids.clear()
                book.asks.clear()
                book.seq_id = None
            elif not book.synced:
                out.drop(DROP_UNSYNCED_BOOK, len(msgs) - idx)
                break
            elif (seq is not None and prev is not None and book.seq_id is not None
                  and prev != book.seq_id):
                self._break(sym, book, f"expected prevSeqId={book.seq_id}, received "
                            f"prevSeqId={prev} seqId={seq}", ts_recv_ns, recv_seq, out)
                out.drop(DROP_UNSYNCED_BOOK, len(msgs) - idx)
                break
            book.apply(bids, asks)
            if crc != 0:
                mine = book.checksum()
                if mine != crc:
                    self._break(sym, book, f"checksum expected={crc} computed={mine} "
                                f"({'snapshot' if snapshot else 'update'} seqId={seq})",
                                ts_recv_ns, recv_seq, out)
                    out.drop(DROP_CHECKSUM_MISMATCH)
                    if len(msgs) - idx - 1:
                        out.drop(DROP_UNSYNCED_BOOK, len(msgs) - idx - 1)
                    break
                self.checksums_verified += 1
            else:
                self.checksums_absent += 1
            if snapshot:
                rows = []  # (one element per message in practice) the last snapshot wins
                if book.ever_synced:
                    self.resync(out, sym, ts_recv_ns, recv_seq,
                                f"snapshot seqId={seq}" if seq is not None else "snapshot")
                book.synced = book.ever_synced = True
            if seq is not None:
                book.seq_id = seq
            for px, _, sz, _ in bids:
                rows.append((sym, ts_event, ts_recv_ns, recv_seq, snapshot, BID, px, sz, seq))
            for px, _, sz, _ in asks:
                rows.append((sym, ts_event, ts_recv_ns, recv_seq, snapshot, ASK, px, sz, seq))
        if rows:
            out.book = rows

    def _break(self, sym: str, book: _Book, detail: str, ts_recv_ns: int, recv_seq: int,
               out: Output) -> None:
        """A discontinuity: record it, forget the book, resubscribe for a new snapshot."""
        self.gap(out, sym, ts_recv_ns, recv_seq, detail)
        book.synced = False
        book.seq_id = None
        book.bids.clear()
        book.asks.clear()
        args = [_arg(self.book_channel, sym)]
        out.reply(_request("unsubscribe", args))
        out.reply(_request("subscribe", args))


__all__ = ["Okx", "checksum", "signed_crc32"]
