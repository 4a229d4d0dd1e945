"""Endless generated market data for soaks of any length, made from recorded templates.

Owns: `EndlessVenue` (the interface the server's live mode uses for a timeline that never
ends: `next_frame`, `join`) and three generated venues - Binance spot (`GenBinanceVenue`),
Bybit linear (`GenBybitVenue`) and OKX (`GenOkxVenue`) - that speak the recorded venues'
session protocols (they subclass the recorded venues) but serve NEW trades and book
changes forever, from a seed: a 30-minute soak never repeats a trade id, and every book
stays rebuildable by an independent reference.

Templates are recorded frames (sim/data/, byte for byte as the venue sent them): each
generated frame is a recorded frame of the same stream, decoded, with only the fields
below replaced, and encoded again compactly in the recorded key order:
- Binance `@aggTrade`: `E`, `a` (+1 per trade per symbol), `p`, `q`, `f`/`l` (first/last
  trade id, contiguous), `T`, `m`. `@depth@100ms`: `E`, `U` (= previous `u` + 1), `u`,
  `b`, `a`. `@bookTicker`: `u`, `b`, `B`, `a`, `A` (the generated book's best levels).
  `/api/v3/depth`: `lastUpdateId` (the last `u` published), `bids`, `asks` (the whole
  generated book, at most `limit` levels a side).
- Bybit `publicTrade.<S>`: `ts`, and per trade `T`, `S`, `v`, `p`, `i` (a UUID drawn from
  the seed: Bybit's linear trade ids are UUIDs), `seq` (increasing).
  `orderbook.200.<S>`: `type`, `ts`, `cts`, `data.b`, `data.a`, `data.u` (+1 per message),
  `data.seq`. Each subscription gets a `snapshot` of the current book first (as Bybit does).
- OKX `trades`: `tradeId` (+1 per trade per instId), `px`, `sz`, `side`, `ts`. `books`:
  `action`, `asks`/`bids` (`[px, sz, "0", orders]`), `ts`, `checksum` (CRC32 of the top
  25 levels, as OKX documents it), `seqId` (increasing), `prevSeqId` (the previous
  `seqId`; -1 on a snapshot). The update template is a recorded 2022 `update` frame, which
  predates `seqId`/`prevSeqId`: those two keys are added in the order of the recorded 2023
  snapshot (`checksum`, `seqId`, `prevSeqId`). Each subscription gets a snapshot first.

Books live on a fixed price window around the recorded price (bids below, asks above the
mid, at most `depth` levels a side), so they never cross and never exceed the venue's
depth (no truncation to model). Each book keeps a digest of itself every
`checkpoint_every` updates (by update id) so a soak can prove the table's rebuild equals
the venue's book all along, not only at the end.

Must not: open sockets or pace frames (the server does), invent a frame shape (only
recorded frames are templates), or be imported by the daemon.
"""

from __future__ import annotations

import copy
import hashlib
import random
import time
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson

from ingestd.sim import recorded
from ingestd.sim.endless import EndlessVenue
from ingestd.sim.venues.binance import BinanceSpotVenue
from ingestd.sim.venues.bybit import BybitLinearVenue
from ingestd.sim.venues.okx import OkxVenue

BID, ASK = "bid", "ask"


def fixed(n: int, decimals: int) -> str:
    """The integer `n` scaled by 10**-decimals as fixed-point text ("0.35130000")."""
    if decimals <= 0:
        return str(n)
    sign = "-" if n < 0 else ""
    s = str(abs(n)).rjust(decimals + 1, "0")
    return f"{sign}{s[:-decimals]}.{s[-decimals:]}"


def decimals_of(text: str, significant: bool) -> int:
    """Digits after the point in `text` (only up to the last non-zero one if `significant`)."""
    if "." not in text:
        return 0
    frac = text.split(".", 1)[1]
    return len(frac.rstrip("0")) if significant else len(frac)


@dataclass(frozen=True)
class Fmt:
    """How a venue writes one number: values are integers of 10**-step steps, written with
    `text` decimals (`strip`: trailing zeros removed, as OKX does)."""

    step: int
    text: int
    strip: bool = False

    def __call__(self, n: int) -> str:
        s = fixed(n * 10 ** (self.text - self.step), self.text)
        if self.strip and "." in s:
            s = s.rstrip("0").rstrip(".")
        return s

    @classmethod
    def like(cls, samples: Iterable[str], strip: bool = False) -> Fmt:
        samples = list(samples)
        text = max(decimals_of(s, False) for s in samples)
        step = max(decimals_of(s, True) for s in samples)
        return cls(step=min(step, text) if not strip else step,
                   text=text if not strip else step, strip=strip)


def signed_crc32(text: str) -> int:
    crc = zlib.crc32(text.encode())
    return crc - (1 << 32) if crc >= 1 << 31 else crc


@dataclass
class Book:
    """One generated order book: integer price steps -> integer size steps, per side."""

    rng: random.Random
    mid: int                      # price steps; bids below, asks above
    depth: int                    # levels a side at most (the price window)
    max_size: int                 # size steps
    price: Fmt
    size: Fmt
    checkpoint_every: int = 20
    bids: dict[int, int] = field(default_factory=dict)
    asks: dict[int, int] = field(default_factory=dict)
    updates: int = 0
    checkpoints: dict[int, bytes] = field(default_factory=dict)   # update id -> digest

    def __post_init__(self) -> None:
        for d in range(1, self.depth + 1):
            if self.rng.random() < 0.7:
                self.bids[self.mid - d] = self.rng.randint(1, self.max_size)
            if self.rng.random() < 0.7:
                self.asks[self.mid + d] = self.rng.randint(1, self.max_size)

    def change(self) -> list[tuple[str, int, int]]:
        """1-4 random level changes (size 0 deletes), applied; returns them."""
        out: list[tuple[str, int, int]] = []
        touched: set[tuple[str, int]] = set()
        for _ in range(self.rng.randint(1, 4)):
            side = BID if self.rng.random() < 0.5 else ASK
            levels = self.bids if side == BID else self.asks
            if levels and len(levels) > 3 and self.rng.random() < 0.3:
                px = self.rng.choice(list(levels))
                qty = 0
            else:
                d = self.rng.randint(1, self.depth)
                px = self.mid - d if side == BID else self.mid + d
                qty = self.rng.randint(1, self.max_size)
            if (side, px) in touched:
                continue
            touched.add((side, px))
            if qty:
                levels[px] = qty
            else:
                levels.pop(px, None)
            out.append((side, px, qty))
        return out

    def updated(self, update_id: int) -> None:
        """Count one published update; keep a digest every `checkpoint_every` updates."""
        self.updates += 1
        if self.updates % self.checkpoint_every == 0:
            self.checkpoints[update_id] = self.digest()

    def sorted_side(self, side: str) -> list[tuple[int, int]]:
        levels = self.bids if side == BID else self.asks
        return sorted(levels.items(), reverse=side == BID)

    def text_side(self, side: str, limit: int | None = None) -> list[tuple[str, str]]:
        return [(self.price(p), self.size(q)) for p, q in self.sorted_side(side)[:limit]]

    def as_floats(self) -> dict[str, dict[float, float]]:
        """The book as a reader of the `book` table rebuilds it (floats of the texts)."""
        return {side: {float(p): float(q) for p, q in self.text_side(side)}
                for side in (BID, ASK)}

    def digest(self) -> bytes:
        return book_digest(self.as_floats())

    def best(self, side: str) -> tuple[int, int] | None:
        levels = self.bids if side == BID else self.asks
        if not levels:
            return None
        px = max(levels) if side == BID else min(levels)
        return px, levels[px]


def book_digest(book: dict[str, dict[float, float]]) -> bytes:
    """A digest of a book given as {"bid"|"ask": {price: amount}} (order-independent)."""
    items = sorted((side, p, q) for side, levels in book.items() for p, q in levels.items()
                   if q != 0)
    return hashlib.blake2b(repr(items).encode(), digest_size=16).digest()


def now_ms() -> int:
    return int(time.time() * 1000)


def _weighted(rng: random.Random, choices: list[tuple[float, Any]]) -> Any:
    total = sum(w for w, _ in choices)
    x = rng.random() * total
    for w, item in choices:
        x -= w
        if x < 0:
            return item
    return choices[-1][1]


# ---- Binance spot -------------------------------------------------------------------------
class GenBinanceVenue(BinanceSpotVenue, EndlessVenue):
    """Binance spot, generated: aggTrades of the recorded trade symbols, depth diffs and
    bookTickers of the recorded book symbols, REST snapshots of the generated books."""

    def __init__(self, seed: int = 1, depth: int = 40) -> None:
        super().__init__()
        self.rng = random.Random(f"binance-{seed}")
        self.trade_tpl: dict[str, dict[str, Any]] = {}
        self.depth_tpl: dict[str, dict[str, Any]] = {}
        self.ticker_tpl: dict[str, dict[str, Any]] = {}
        for stream, frames in self.by_stream.items():
            msg = orjson.loads(frames[0])
            sym = msg["data"]["s"]
            if stream.endswith("@aggTrade"):
                self.trade_tpl[sym] = msg
            elif stream.endswith("@depth@100ms"):
                self.depth_tpl[sym] = msg
            elif stream.endswith("@bookTicker"):
                self.ticker_tpl[sym] = msg
        self.books = {}
        self.last_u: dict[str, int] = {}
        for sym, body in self.snapshots.items():
            snap = orjson.loads(body)
            texts = [p for p, _ in snap["bids"] + snap["asks"]]
            qtys = [q for _, q in snap["bids"] + snap["asks"]]
            price = Fmt.like(texts)
            size = Fmt.like(qtys)
            best = snap["bids"][0][0]
            mid = round(float(best) * 10 ** price.step) + 1
            self.books[sym] = Book(self.rng, mid, depth, 5000 * 10 ** size.step, price, size)
            self.last_u[sym] = int(snap["lastUpdateId"])
        self.trade_state: dict[str, dict[str, int]] = {}
        self.trade_fmt: dict[str, tuple[Fmt, Fmt]] = {}
        for sym, msg in self.trade_tpl.items():
            d = msg["data"]
            price, size = Fmt.like([d["p"]]), Fmt.like([d["q"]])
            # A recorded price may have few significant decimals: trade on a finer grid.
            price = Fmt(step=max(price.step, 4), text=price.text)
            self.trade_fmt[sym] = (price, size)
            self.trade_state[sym] = {"a": int(d["a"]), "l": int(d["l"]),
                                     "px": round(float(d["p"]) * 10 ** price.step)}

    def trade_symbols(self) -> list[str]:
        return sorted(self.trade_tpl)

    def next_frame(self) -> tuple[str, bytes]:
        kind = _weighted(self.rng, [(0.4, "trade"), (0.45, "depth"), (0.15, "ticker")])
        if kind == "trade":
            return self._trade(self.rng.choice(sorted(self.trade_tpl)))
        syms = sorted(self.books) if kind == "depth" else sorted(self.ticker_tpl)
        sym = self.rng.choice(syms)
        return self._depth(sym) if kind == "depth" else self._ticker(sym)

    def _trade(self, sym: str) -> tuple[str, bytes]:
        msg = copy.deepcopy(self.trade_tpl[sym])
        st = self.trade_state[sym]
        price, size = self.trade_fmt[sym]
        st["a"] += 1
        st["px"] = max(1, st["px"] + self.rng.randint(-2, 2))
        first = st["l"] + 1
        st["l"] = first + self.rng.randint(0, 2)
        t = now_ms()
        d = msg["data"]
        d.update(E=t, a=st["a"], p=price(st["px"]),
                 q=size(self.rng.randint(1, 1000 * 10 ** size.step)),
                 f=first, l=st["l"], T=t - 1, m=self.rng.random() < 0.5)
        return msg["stream"], orjson.dumps(msg)

    def _depth(self, sym: str) -> tuple[str, bytes]:
        book = self.books[sym]
        msg = copy.deepcopy(self.depth_tpl[sym])
        changes = book.change()
        first = self.last_u[sym] + 1
        last = first + self.rng.randint(0, 3)
        self.last_u[sym] = last
        book.updated(last)
        zero = book.size(0)
        d = msg["data"]
        d.update(E=now_ms(), U=first, u=last,
                 b=[[book.price(p), book.size(q) if q else zero]
                    for s, p, q in changes if s == BID],
                 a=[[book.price(p), book.size(q) if q else zero]
                    for s, p, q in changes if s == ASK])
        return msg["stream"], orjson.dumps(msg)

    def _ticker(self, sym: str) -> tuple[str, bytes]:
        book = self.books[sym]
        msg = copy.deepcopy(self.ticker_tpl[sym])
        bid, ask = book.best(BID), book.best(ASK)
        d = msg["data"]
        d.update(u=self.last_u[sym],
                 b=book.price(bid[0]) if bid else book.price(0),
                 B=book.size(bid[1]) if bid else book.size(0),
                 a=book.price(ask[0]) if ask else book.price(0),
                 A=book.size(ask[1]) if ask else book.size(0))
        return msg["stream"], orjson.dumps(msg)

    def rest(self, path: str, query: dict[str, list[str]]) -> tuple[int, bytes] | None:
        if path != self.depth_path:
            return None
        symbol = (query.get("symbol") or [""])[0]
        book = self.books.get(symbol)
        if book is None:
            return 400, b'{"code":-1121,"msg":"Invalid symbol."}'
        try:
            limit = int((query.get("limit") or ["100"])[0])
        except ValueError:
            return 400, b'{"code":-1100,"msg":"Illegal characters found in parameter."}'
        body = {"lastUpdateId": self.last_u[symbol],
                "bids": [list(x) for x in book.text_side(BID, limit)],
                "asks": [list(x) for x in book.text_side(ASK, limit)]}
        return 200, orjson.dumps(body)


# ---- Bybit linear ---------------------------------------------------------------------------
class GenBybitVenue(BybitLinearVenue, EndlessVenue):
    """Bybit linear, generated: publicTrade and orderbook.200 of the recorded symbols."""

    symbols: ClassVar[tuple[str, ...]] = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "DOGEUSDT")

    def __init__(self, seed: int = 1, depth: int = 60) -> None:
        super().__init__()
        self.rng = random.Random(f"bybit-{seed}")
        self.trade_tpl: dict[str, dict[str, Any]] = {}
        self.snap_tpl: dict[str, dict[str, Any]] = {}
        self.delta_tpl: dict[str, dict[str, Any]] = {}
        self.books = {}
        self.u: dict[str, int] = {}
        self.seq: dict[str, int] = {}
        self.trade_seq: dict[str, int] = {}
        for sym in self.symbols:
            trade = orjson.loads(self.by_topic[f"publicTrade.{sym}"][0])
            self.trade_tpl[sym] = trade
            self.trade_seq[sym] = int(trade["data"][0]["seq"])
            frames = [orjson.loads(f) for f in self.by_topic[f"orderbook.200.{sym}"]]
            snap = next(f for f in frames if f["type"] == "snapshot")
            delta = next(f for f in frames if f["type"] == "delta")
            self.snap_tpl[sym], self.delta_tpl[sym] = snap, delta
            levels = snap["data"]["b"] + snap["data"]["a"]
            price = Fmt.like([p for p, _ in levels])
            size = Fmt.like([q for _, q in levels])
            mid = round(float(snap["data"]["b"][0][0]) * 10 ** price.step) + 1
            self.books[sym] = Book(self.rng, mid, depth, 50 * 10 ** size.step, price, size)
            self.u[sym] = int(snap["data"]["u"])
            self.seq[sym] = int(snap["data"]["seq"])

    def trade_symbols(self) -> list[str]:
        return list(self.symbols)

    def next_frame(self) -> tuple[str, bytes]:
        sym = self.rng.choice(self.symbols)
        if self.rng.random() < 0.45:
            return self._trade(sym)
        book = self.books[sym]
        changes = book.change()
        self.u[sym] += 1
        self.seq[sym] += self.rng.randint(1, 50)
        book.updated(self.u[sym])
        msg = copy.deepcopy(self.delta_tpl[sym])
        t = now_ms()
        d = msg["data"]
        d.update(b=[[book.price(p), book.size(q) if q else "0"]
                    for s, p, q in changes if s == BID],
                 a=[[book.price(p), book.size(q) if q else "0"]
                    for s, p, q in changes if s == ASK],
                 u=self.u[sym], seq=self.seq[sym])
        msg.update(ts=t, cts=t - 1)
        return msg["topic"], orjson.dumps(msg)

    def _trade(self, sym: str) -> tuple[str, bytes]:
        msg = copy.deepcopy(self.trade_tpl[sym])
        tpl = msg["data"][0]
        book = self.books[sym]
        t = now_ms()
        trades = []
        for _ in range(self.rng.randint(1, 3)):
            buy = self.rng.random() < 0.5
            best = book.best(ASK if buy else BID)
            px = best[0] if best else book.mid
            self.trade_seq[sym] += self.rng.randint(1, 9)
            tr = dict(tpl)
            tr.update(T=t - 1, S="Buy" if buy else "Sell",
                      v=book.size(self.rng.randint(1, 10 * 10 ** book.size.step)),
                      p=book.price(px), i=str(uuid.UUID(int=self.rng.getrandbits(128),
                                                        version=4)),
                      seq=self.trade_seq[sym])
            trades.append(tr)
        msg.update(ts=t, data=trades)
        return msg["topic"], orjson.dumps(msg)

    def join(self, keys: Iterable[str]) -> list[bytes]:
        out = []
        for key in keys:
            if not key.startswith("orderbook.200."):
                continue
            sym = key.rsplit(".", 1)[1]
            book = self.books.get(sym)
            if book is None:
                continue
            msg = copy.deepcopy(self.snap_tpl[sym])
            t = now_ms()
            msg["data"].update(b=[list(x) for x in book.text_side(BID)],
                               a=[list(x) for x in book.text_side(ASK)],
                               u=self.u[sym], seq=self.seq[sym])
            msg.update(ts=t, cts=t - 1)
            out.append(orjson.dumps(msg))
        return out


# ---- OKX -------------------------------------------------------------------------------------
def okx_checksum(bids: list[tuple[str, str]], asks: list[tuple[str, str]]) -> int:
    """OKX's documented book checksum: the top 25 levels interleaved
    `bidPx:bidSz:askPx:askSz:...` (the longer side's rest appended), CRC32, signed."""
    b, a = bids[:25], asks[:25]
    parts: list[str] = []
    for i in range(max(len(b), len(a))):
        if i < len(b):
            parts += [b[i][0], b[i][1]]
        if i < len(a):
            parts += [a[i][0], a[i][1]]
    return signed_crc32(":".join(parts))


class GenOkxVenue(OkxVenue, EndlessVenue):
    """OKX, generated: trades and books (with seqId chain and checksum) of three instIds."""

    insts: ClassVar[tuple[str, ...]] = ("BTC-USDT", "BTC-USD-220527", "UNI-USD-SWAP")

    def __init__(self, seed: int = 1, depth: int = 60) -> None:
        super().__init__()
        self.rng = random.Random(f"okx-{seed}")
        snap_2023 = orjson.loads(recorded.frames(self.data_dir, "books_seqid_2023.jsonl")[0])
        self.trade_tpl: dict[str, dict[str, Any]] = {}
        self.update_tpl: dict[str, dict[str, Any]] = {}
        self.snap_tpl: dict[str, dict[str, Any]] = {}
        self.trade_id: dict[str, int] = {}
        self.seq_id: dict[str, int] = {}
        self.books = {}
        for inst in self.insts:
            trade = orjson.loads(self.by_key[("trades", inst)][0])
            self.trade_tpl[inst] = trade
            self.trade_id[inst] = int(trade["data"][0]["tradeId"])
            frames = [orjson.loads(f) for f in self.by_key[("books", inst)]]
            snap = next(f for f in frames if f.get("action") == "snapshot")
            upd = next(f for f in frames if f.get("action") == "update")
            # The 2022 update + the 2023 snapshot's sequencing keys, in that frame's order.
            d = upd["data"][0]
            d.pop("checksum", None)
            d.update(checksum=0, seqId=0, prevSeqId=0)
            self.update_tpl[inst] = upd
            s23 = copy.deepcopy(snap_2023)
            s23["arg"] = snap["arg"]
            self.snap_tpl[inst] = s23
            levels = snap["data"][0]["bids"] + snap["data"][0]["asks"]
            price = Fmt.like([lv[0] for lv in levels], strip=True)
            size = Fmt.like([lv[1] for lv in levels], strip=True)
            mid = round(float(snap["data"][0]["bids"][0][0]) * 10 ** price.step) + 1
            self.books[inst] = Book(self.rng, mid, depth, 500 * 10 ** size.step, price, size)
            self.seq_id[inst] = int(snap_2023["data"][0]["seqId"]) + self.rng.randint(0, 10**6)

    def trade_symbols(self) -> list[str]:
        return list(self.insts)

    @staticmethod
    def _levels(book: Book, items: list[tuple[str, str]]) -> list[list[str]]:
        return [[p, q, "0", "1" if q != "0" else "0"] for p, q in items]

    def next_frame(self) -> tuple[str, bytes]:
        inst = self.rng.choice(self.insts)
        if self.rng.random() < 0.45:
            return self._trade(inst)
        book = self.books[inst]
        changes = book.change()
        prev = self.seq_id[inst]
        self.seq_id[inst] = prev + self.rng.randint(1, 5)
        book.updated(self.seq_id[inst])
        msg = copy.deepcopy(self.update_tpl[inst])
        d = msg["data"][0]
        d.update(asks=self._levels(book, [(book.price(p), book.size(q))
                                          for s, p, q in changes if s == ASK]),
                 bids=self._levels(book, [(book.price(p), book.size(q))
                                          for s, p, q in changes if s == BID]),
                 ts=str(now_ms()),
                 checksum=okx_checksum(book.text_side(BID, 25), book.text_side(ASK, 25)),
                 seqId=self.seq_id[inst], prevSeqId=prev)
        return f"books:{inst}", orjson.dumps(msg)

    def _trade(self, inst: str) -> tuple[str, bytes]:
        msg = copy.deepcopy(self.trade_tpl[inst])
        book = self.books[inst]
        buy = self.rng.random() < 0.5
        best = book.best(ASK if buy else BID)
        self.trade_id[inst] += 1
        d = msg["data"][0]
        d.update(tradeId=str(self.trade_id[inst]),
                 px=book.price(best[0] if best else book.mid),
                 sz=book.size(self.rng.randint(1, 20 * 10 ** book.size.step)),
                 side="buy" if buy else "sell", ts=str(now_ms()))
        return f"trades:{inst}", orjson.dumps(msg)

    def join(self, keys: Iterable[str]) -> list[bytes]:
        out = []
        for key in keys:
            channel, _, inst = key.partition(":")
            if channel != "books" or inst not in self.books:
                continue
            book = self.books[inst]
            msg = copy.deepcopy(self.snap_tpl[inst])
            bids, asks = book.text_side(BID), book.text_side(ASK)
            msg["data"][0].update(asks=self._levels(book, asks), bids=self._levels(book, bids),
                                  ts=str(now_ms()), checksum=okx_checksum(bids, asks),
                                  seqId=self.seq_id[inst], prevSeqId=-1)
            out.append(orjson.dumps(msg))
        return out


GENERATED: dict[str, type[EndlessVenue]] = {
    "binance": GenBinanceVenue,
    "bybit-linear": GenBybitVenue,
    "okx": GenOkxVenue,
}

__all__ = ["GENERATED", "Book", "EndlessVenue", "GenBinanceVenue", "GenBybitVenue",
           "GenOkxVenue", "book_digest", "okx_checksum"]
