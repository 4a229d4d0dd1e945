"""OKX codec (exchanges/okx.py) and simulated venue (sim/venues/okx.py).

Golden values come from the recorded frames shipped in ingestd/sim/data/okx (copied
byte for byte from the project's fixtures). Frames built here (sequence breaks, zero
checksums, garbage) are derived from those recordings and say so.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Callable
from decimal import Decimal
from typing import Any, cast

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingestd.config import FeedConfig, parse_config
from ingestd.exchanges import CODECS
from ingestd.exchanges.base import DROP_BOOK_MISMATCH as DROP_CHECKSUM_MISMATCH
from ingestd.exchanges.base import (
    DROP_DUPLICATE_TRADE,
    DROP_UNSUBSCRIBED,
    DROP_UNSYNCED_BOOK,
    Output,
    StateError,
)
from ingestd.exchanges.okx import Okx, checksum
from ingestd.schema import (
    EV_GAP,
    EV_OUT_OF_ORDER,
    EV_REFUSED,
    EV_RESYNC,
    EV_SUBSCRIBED,
    ROW_WIDTH,
)
from ingestd.sim import SimServer
from ingestd.sim.venues import VENUES
from tests.support import (
    feed_for,
    make_config,
    read_table,
    rebuild_books,
    recorded_frames,
    run_daemon,
)

SYMS = ("BTC-USDT", "BTC-USD-220527", "UNI-USD-SWAP")
TS = 1_700_000_000_000_000_000


def frames(name: str) -> tuple[bytes, ...]:
    return recorded_frames("okx", name)


def codec(symbols: tuple[str, ...] = SYMS,
          channels: tuple[str, ...] = ("trades", "quotes", "book"),
          **keys: Any) -> Okx:
    feed = FeedConfig(name="okx-t", exchange="okx", symbols=symbols,
                      channels=channels, **keys)  # type: ignore[arg-type]
    c = CODECS["okx"](feed)
    assert isinstance(c, Okx)
    return c


def events(out: Output) -> list[tuple[Any, ...]]:
    return out.rows("events")


# ---- connection ----------------------------------------------------------------------------
def test_subscribe_keepalive_and_url() -> None:
    c = codec(("BTC-USDT",))
    assert c.ws_url() == "wss://ws.okx.com:8443/ws/v5/public"
    assert [orjson.loads(m) for m in c.subscribe_messages()] == [
        {"op": "subscribe", "args": [{"channel": "trades", "instId": "BTC-USDT"},
                                     {"channel": "bbo-tbt", "instId": "BTC-USDT"},
                                     {"channel": "books", "instId": "BTC-USDT"}]}]
    assert c.keepalive_message() == "ping"
    assert c.keepalive_interval_s is not None and c.keepalive_interval_s < 30
    c5 = codec(("BTC-USDT",), ("book",), book_depth=5)
    assert orjson.loads(c5.subscribe_messages()[0])["args"] == [
        {"channel": "books5", "instId": "BTC-USDT"}]
    # Long symbol lists are split into several requests (OKX caps a request at 64 KB).
    many = tuple(f"C{i}-USDT" for i in range(150))
    msgs = codec(many).subscribe_messages()
    assert len(msgs) == 3
    assert sum(len(orjson.loads(m)["args"]) for m in msgs) == 450
    local = codec(("A-B",), ("book",), url="ws://127.0.0.1:9")
    assert local.ws_url() == "ws://127.0.0.1:9/ws/v5/public"


def test_check_feed() -> None:
    ok = {"name": "o", "exchange": "okx", "symbols": ["BTC-USDT", "ETH-USD-240628-1400-P"],
          "channels": ["book"]}
    parse_config({"storage": {"root": "/tmp/x"}, "feeds": [ok]})
    parse_config({"storage": {"root": "/tmp/x"}, "feeds": [{**ok, "book_depth": 5}]})
    bad = FeedConfig(name="o", exchange="okx", symbols=("btcusdt", "BTC-USDT"),
                     channels=("book",), book_depth=50, trade_stream="aggTrade")
    problems = Okx.check_feed(bad)
    assert any(p.startswith("symbols: 'btcusdt'") for p in problems)
    assert any(p.startswith("book_depth: 50") for p in problems)
    assert any(p.startswith("trade_stream:") for p in problems)
    assert len(problems) == 3


# ---- trades --------------------------------------------------------------------------------
def test_trades_golden() -> None:
    c = codec()
    t = frames("trades.jsonl")
    assert c.parse(t[0], TS, 7).rows("trades") == [
        ("BTC-USD-220527", 1652459199958_000_000, TS, 7, "7849", "buy", 30218.8, 1.0)]
    assert c.parse(t[1], TS, 8).rows("trades") == [
        ("UNI-USD-SWAP", 1652459215150_000_000, TS, 8, "12883020", "sell", 5.123, 100.0)]
    assert c.parse(frames("trades_2026.jsonl")[0], TS, 9).rows("trades") == [
        ("BTC-USDT", 1790358565298_000_000, TS, 9, "1062992715", "buy", 83772.6, 0.0000178)]


def test_trades_all_frames_and_dedupe() -> None:
    c = codec()
    rows = []
    for i, f in enumerate(frames("trades.jsonl")):
        out = c.parse(f, TS, i)
        assert out.error is None and not out.drops
        rows += out.rows("trades")
        assert out.events is None  # consecutive ids: no gap
    assert len(rows) == 74
    # Finding: tradeId goes up by exactly one per fill per instId (68/68 and 3/3 steps in
    # the capture), so the codec treats a jump as a gap (TradeIds(consecutive=True)).
    for sym in SYMS:
        ids = [int(r[4]) for r in rows if r[0] == sym]
        assert ids and ids == list(range(ids[0], ids[0] + len(ids)))
    assert codec().trade_ids.consecutive
    # Replayed (re-subscribe) or older trades are dropped and counted.
    again = c.parse(frames("trades.jsonl")[-1], TS, 100)
    assert not again.trades and again.drops == {DROP_DUPLICATE_TRADE: 1}
    older = c.parse(frames("trades.jsonl")[3], TS, 101)
    assert not older.trades and older.drops == {DROP_DUPLICATE_TRADE: 1}
    # Non-integer ids (never seen from OKX) fall back to remembering recent ids.
    f = (b'{"arg":{"channel":"trades","instId":"BTC-USDT"},"data":[{"instId":"BTC-USDT",'
         b'"tradeId":"x-1","px":"1","sz":"1","side":"buy","ts":"1"},{"instId":"BTC-USDT",'
         b'"tradeId":"x-1","px":"1","sz":"1","side":"buy","ts":"1"}]}')
    out = c.parse(f, TS, 102)
    assert len(out.rows("trades")) == 1
    assert out.drops == {DROP_DUPLICATE_TRADE: 1}


def test_trade_id_gap_out_of_order_and_replay() -> None:
    """A lost trade is a gap; arriving late it is stored with an `out_of_order` event (it
    was never seen); its replay is dropped and counted."""
    c = codec(("BTC-USDT",), ("trades",))
    btc = [f for f in frames("trades.jsonl") if b'"instId":"BTC-USDT"' in f[:80]]
    lost = int(orjson.loads(btc[1])["data"][0]["tradeId"])  # 338476308
    assert c.parse(btc[0], TS, 1).rows("trades")
    jump = c.parse(btc[2], TS, 2)
    assert [r[4] for r in jump.rows("trades")] == [str(lost + 1)]
    assert events(jump) == [("BTC-USDT", None, TS, 2, "okx-t", EV_GAP,
                             f"trade id expected {lost}, got {lost + 1} (1 missing)")]
    late = c.parse(btc[1], TS, 3)
    assert late.rows("trades") == [
        ("BTC-USDT", 1652459226050_000_000, TS, 3, "338476308", "buy", 30243.5, 0.001)]
    assert events(late) == [("BTC-USDT", None, TS, 3, "okx-t", EV_OUT_OF_ORDER,
                             f"trade id {lost} never seen, below the highest seen "
                             f"({lost + 1})")]
    replay = c.parse(btc[1], TS, 4)
    assert not replay.trades and replay.drops == {DROP_DUPLICATE_TRADE: 1}
    assert replay.events is None
    # The hole is filled: the next trade continues without an event.
    nxt = c.parse(btc[3], TS, 5)
    assert nxt.events is None and [r[4] for r in nxt.rows("trades")] == [str(lost + 2)]
    assert c.trade_ids.state()["ints"] == {"BTC-USDT": [[lost - 1], [lost + 2]]}


def _push(last_id: int, count: int | str) -> bytes:
    """The recorded 2026 trade (count "1") as a push aggregating `count` fills whose last
    id is `last_id` (derived, not recorded)."""
    m = orjson.loads(frames("trades_2026.jsonl")[0])
    m["data"][0] = {**m["data"][0], "tradeId": str(last_id), "count": str(count)}
    return orjson.dumps(m)


def test_aggregated_trade_push_covers_count_fills() -> None:
    """Since 2023 a push aggregates `count` fills of one taker order at one price and
    `tradeId` is the last fill's id: the push covers `tradeId - count + 1 .. tradeId`."""
    c = codec(("BTC-USDT",), ("trades",))
    tid = 1062992715
    assert c.parse(frames("trades_2026.jsonl")[0], TS, 1).rows("trades")
    agg = c.parse(_push(tid + 3, 3), TS, 2)  # fills tid+1 .. tid+3
    assert [r[4] for r in agg.rows("trades")] == [str(tid + 3)] and agg.events is None
    nxt = c.parse(_push(tid + 4, 1), TS, 3)  # continues: not a gap
    assert nxt.rows("trades") and nxt.events is None
    again = c.parse(_push(tid + 3, 3), TS, 4)  # a replay of the aggregated push
    assert not again.trades and again.drops == {DROP_DUPLICATE_TRADE: 1}
    jump = c.parse(_push(tid + 10, 2), TS, 5)  # fills tid+9, tid+10: tid+5 .. tid+8 lost
    assert jump.rows("trades") and [e[5:] for e in events(jump)] == [
        (EV_GAP, f"trade id expected {tid + 5}, got {tid + 9} (4 missing)")]
    # Every fill of a push is recorded as seen: one interval per run of ids.
    assert c.trade_ids.state()["ints"] == {"BTC-USDT": [[tid, tid + 9], [tid + 4, tid + 10]]}
    for bad in (_push(tid + 20, 0), _push(tid + 20, "x"), _push(5, 7)):
        out = c.parse(bad, TS, 6)
        assert out.error is not None and not out.has_rows
    assert c.trade_ids.state()["ints"] == {"BTC-USDT": [[tid, tid + 9], [tid + 4, tid + 10]]}


def _book_history() -> dict[str, tuple[list[int], list[tuple[Decimal, Decimal]]]]:
    """Best bid/ask after every recorded books frame, per instId, computed independently."""
    books: dict[str, dict[str, dict[Decimal, Decimal]]] = {}
    hist: dict[str, tuple[list[int], list[tuple[Decimal, Decimal]]]] = {}
    for f in frames("books.jsonl"):
        m = orjson.loads(f)
        inst, d = m["arg"]["instId"], m["data"][0]
        if m["action"] == "snapshot":
            books[inst] = {"bids": {}, "asks": {}}
        for side in ("bids", "asks"):
            for px, sz, *_ in d[side]:
                if Decimal(sz) == 0:
                    books[inst][side].pop(Decimal(px), None)
                else:
                    books[inst][side][Decimal(px)] = Decimal(sz)
        ts, best = hist.setdefault(inst, ([], []))
        ts.append(int(d["ts"]))
        best.append((max(books[inst]["bids"]), min(books[inst]["asks"])))
    return hist


def test_trade_side_is_the_takers_side() -> None:
    """Finding: OKX `side` is the taker's side (buys print at the ask, sells at the bid)."""
    hist = _book_history()
    checked = {"buy": 0, "sell": 0}
    for f in frames("trades.jsonl"):
        d = orjson.loads(f)["data"][0]
        ts, best = hist[d["instId"]]
        i = bisect.bisect_right(ts, int(d["ts"])) - 1
        if i < 0:
            continue  # before the first book snapshot of the capture
        bid, ask = best[i]
        px = Decimal(d["px"])
        if d["side"] == "buy":
            assert px >= ask
        else:
            assert d["side"] == "sell" and px <= bid
        checked[d["side"]] += 1
    assert checked == {"buy": 46, "sell": 25}
    c = codec()
    row = c.parse(frames("trades.jsonl")[1], TS, 1).rows("trades")
    assert row[0][5] == "sell"


# ---- quotes --------------------------------------------------------------------------------
def test_bbo_tbt_golden() -> None:
    c = codec(("BTC-USDT", "BTC-USDT-SWAP"))
    b = frames("bbo_tbt.jsonl")
    assert c.parse(b[0], TS, 1).rows("quotes") == [
        ("BTC-USDT", 1739657990337_000_000, TS, 1, 97687.5, 0.84129164, 97687.6, 0.00445824)]
    assert c.parse(b[2], TS, 2).rows("quotes") == [
        ("BTC-USDT", 1654032991947_000_000, TS, 2, 31774.6, 0.3392211, 31774.7, 0.14368878)]
    assert c.parse(b[3], TS, 3).rows("quotes") == [
        ("BTC-USDT-SWAP", 1656642503092_000_000, TS, 3, 20386.7, 50.0, 20386.8, 7.0)]
    # Derived from line 1: an empty side is null, never "unchanged".
    m = orjson.loads(b[0])
    m["data"][0]["bids"] = []
    assert c.parse(orjson.dumps(m), TS, 4).rows("quotes") == [
        ("BTC-USDT", 1739657990337_000_000, TS, 4, None, None, 97687.6, 0.00445824)]


def test_tickers_are_not_subscribed_and_dropped() -> None:
    c = codec()
    out = c.parse(frames("tickers.jsonl")[0], TS, 1)
    assert not out.quotes and out.drops == {DROP_UNSUBSCRIBED: 1} and not out.unknown


# ---- book ----------------------------------------------------------------------------------
def test_books_snapshot_and_update_golden() -> None:
    c = codec()
    b = frames("books.jsonl")
    snap = c.parse(b[0], TS, 1)
    raw = orjson.loads(b[0])["data"][0]
    rows = snap.rows("book")
    assert len(rows) == len(raw["bids"]) + len(raw["asks"]) == 72 + 64
    assert all(r[4] is True and r[3] == 1 for r in rows)
    assert rows[0] == ("BTC-USD-220527", 1652459225393_000_000, TS, 1, True, "bid",
                            float(raw["bids"][0][0]), float(raw["bids"][0][1]), None)
    assert ("BTC-USD-220527", 1652459225393_000_000, TS, 1, True, "ask", 30238.8, 2.0,
            None) in rows
    assert snap.events is None  # the first snapshot is a sync, not a resync
    c.parse(b[1], TS, 2)
    c.parse(b[2], TS, 3)
    upd = c.parse(b[3], TS, 4)
    ts = 1652459225464_000_000
    assert upd.rows("book") == [
        ("BTC-USD-220527", ts, TS, 4, False, "bid", 30182.6, 452.0, None),
        ("BTC-USD-220527", ts, TS, 4, False, "ask", 30249.4, 0.0, None),
        ("BTC-USD-220527", ts, TS, 4, False, "ask", 30261.0, 4.0, None),
        ("BTC-USD-220527", ts, TS, 4, False, "ask", 30310.3, 19.0, None),
    ]


def test_checksum_verified_on_every_recorded_books_frame() -> None:
    c = codec()
    for i, f in enumerate(frames("books.jsonl")):
        out = c.parse(f, TS, i)
        assert out.error is None and out.events is None and out.replies is None, i
        assert not out.drops
    assert (c.checksums_verified, c.checksums_absent) == (290, 0)
    # The 2023 snapshot with seqId (an options book).
    c = codec(("ETH-USD-240628-1400-P",), ("book",))
    out = c.parse(frames("books_seqid_2023.jsonl")[0], TS, 1)
    assert (c.checksums_verified, c.checksums_absent) == (1, 0)
    assert out.rows("book") == [
        ("ETH-USD-240628-1400-P", 1701388800300_000_000, TS, 1, True, side, px, sz, 7966474)
        for side, px, sz in [("bid", 0.035, 1550.0), ("bid", 0.031, 200.0),
                             ("bid", 0.0305, 2888.0), ("bid", 0.0285, 1500.0),
                             ("bid", 0.026, 500.0), ("ask", 0.038, 200.0),
                             ("ask", 0.0385, 1550.0), ("ask", 0.0395, 2888.0),
                             ("ask", 0.0435, 1500.0)]]


def test_checksum_function_on_recorded_snapshot() -> None:
    d = orjson.loads(frames("books_seqid_2023.jsonl")[0])["data"][0]
    def levels(side: str) -> list[tuple[str, str]]:
        return [(lv[0], lv[1]) for lv in d[side]]
    assert checksum(levels("bids"), levels("asks")) == d["checksum"] == 750243667


def independent_books() -> dict[str, dict[str, dict[Decimal, Decimal]]]:
    books: dict[str, dict[str, dict[Decimal, Decimal]]] = {}
    for f in frames("books.jsonl"):
        m = orjson.loads(f)
        inst, d = m["arg"]["instId"], m["data"][0]
        if m["action"] == "snapshot":
            books[inst] = {"bid": {}, "ask": {}}
        for key, side in (("bids", "bid"), ("asks", "ask")):
            for px, sz, *_ in d[key]:
                if Decimal(sz) == 0:
                    books[inst][side].pop(Decimal(px), None)
                else:
                    books[inst][side][Decimal(px)] = Decimal(sz)
    return books


rebuild = rebuild_books

def as_float(books: dict[str, dict[str, dict[Decimal, Decimal]]]
             ) -> dict[str, dict[str, dict[float, float]]]:
    return {s: {side: {float(p): float(q) for p, q in lv.items()} for side, lv in b.items()}
            for s, b in books.items()}


def test_book_rebuilt_from_rows_equals_independent_book() -> None:
    c = codec()
    rows: list[tuple[Any, ...]] = []
    for i, f in enumerate(frames("books.jsonl")):
        rows += c.parse(f, TS, i).rows("book")
    expected = as_float(independent_books())
    assert rebuild(rows) == expected
    assert {s: (len(b["bid"]), len(b["ask"])) for s, b in expected.items()}["BTC-USDT"] == (
        400, 400)  # OKX keeps `books` at 400 levels itself: no truncation rows needed


def test_books5_golden() -> None:
    c = codec(("BTC-USDT",), ("book",), book_depth=5)
    out = c.parse(frames("books5_2026.jsonl")[0], TS, 3)
    rows = out.rows("book")
    assert len(rows) == 10
    assert all(r[4] is True and r[8] == 81625379489 and r[1] == 1790358564306_000_000
               and r[3] == 3 for r in rows)
    assert rows[0][5:8] == ("bid", 83774.1, 0.54571131)
    assert rows[5][5:8] == ("ask", 83774.2, 0.25697131)
    # A `books` frame is not what this feed subscribed to.
    assert codec(("BTC-USD-220527",), ("book",), book_depth=5).parse(
        frames("books.jsonl")[0], TS, 1).drops == {DROP_UNSUBSCRIBED: 1}


# ---- continuity ----------------------------------------------------------------------------
def _seq_update(seq: int, prev: int, bids: list[list[str]] | None = None,
                asks: list[list[str]] | None = None, crc: int = 0,
                action: str = "update") -> bytes:
    """An update for the recorded 2023 options book (derived, not recorded)."""
    return orjson.dumps({
        "arg": {"channel": "books", "instId": "ETH-USD-240628-1400-P"}, "action": action,
        "data": [{"asks": asks or [], "bids": bids or [], "ts": "1701388800400",
                  "checksum": crc, "seqId": seq, "prevSeqId": prev}]})


def test_seqid_chain_break_gap_resubscribe_resync() -> None:
    c = codec(("ETH-USD-240628-1400-P",), ("book",))
    snap = frames("books_seqid_2023.jsonl")[0]
    assert c.parse(snap, TS, 1).book
    ok = c.parse(_seq_update(7966480, 7966474, bids=[["0.036", "10", "0", "1"]]), TS, 2)
    assert ok.rows("book") == [("ETH-USD-240628-1400-P", 1701388800400_000_000, TS, 2, False, "bid",
                        0.036, 10.0, 7966480)]
    # No change: OKX repeats seqId == prevSeqId.
    same = c.parse(_seq_update(7966480, 7966480), TS, 3)
    assert same.error is None and same.events is None and not same.book
    # A sequence reset (seqId goes down) still chains by prevSeqId.
    reset = c.parse(_seq_update(12, 7966480, asks=[["0.04", "1", "0", "1"]]), TS, 4)
    assert reset.events is None and reset.rows("book") == [
        ("ETH-USD-240628-1400-P", 1701388800400_000_000, TS, 4, False, "ask", 0.04, 1.0, 12)]
    # Break: prevSeqId does not name the last seqId.
    brk = c.parse(_seq_update(30, 20, asks=[["0.05", "1", "0", "1"]]), TS, 5)
    assert not brk.book
    assert events(brk) == [("ETH-USD-240628-1400-P", None, TS, 5, "okx-t", EV_GAP,
                            "expected prevSeqId=12, received prevSeqId=20 seqId=30")]
    assert [orjson.loads(r) for r in brk.replies or []] == [
        {"op": "unsubscribe", "args": [{"channel": "books",
                                        "instId": "ETH-USD-240628-1400-P"}]},
        {"op": "subscribe", "args": [{"channel": "books", "instId": "ETH-USD-240628-1400-P"}]}]
    assert brk.drops == {DROP_UNSYNCED_BOOK: 1}
    # Until a new snapshot, updates are dropped (counted), even if they chain.
    late = c.parse(_seq_update(31, 30, asks=[["0.06", "1", "0", "1"]]), TS, 6)
    assert not late.book and late.drops == {DROP_UNSYNCED_BOOK: 1} and late.replies is None
    again = c.parse(snap, TS, 7)
    assert len(again.rows("book")) == 9
    assert events(again) == [("ETH-USD-240628-1400-P", None, TS, 7, "okx-t", EV_RESYNC,
                              "snapshot seqId=7966474")]
    assert c.parse(_seq_update(7966475, 7966474), TS, 8).events is None


def test_checksum_mismatch_gap_and_resync() -> None:
    c = codec(("BTC-USDT",), ("book",))
    books = [f for f in frames("books.jsonl") if b'"instId":"BTC-USDT"' in f[:80]]
    assert c.parse(books[0], TS, 1).book
    assert c.parse(books[1], TS, 2).book
    # Lose one update: the next one's checksum no longer matches our book.
    out = c.parse(books[3], TS, 4)
    assert not out.book
    [gap] = events(out)
    assert gap[5] == EV_GAP and gap[0] == "BTC-USDT"
    expected = orjson.loads(books[3])["data"][0]["checksum"]
    assert gap[6].startswith(f"checksum expected={expected} computed=")
    assert out.drops == {DROP_CHECKSUM_MISMATCH: 1}
    assert len(out.replies or []) == 2
    assert c.parse(books[4], TS, 5).drops == {DROP_UNSYNCED_BOOK: 1}
    resync = c.parse(books[0], TS, 6)
    assert [e[5] for e in events(resync)] == [EV_RESYNC]
    # A tampered size in an otherwise correct sequence is caught too (derived frame).
    c = codec(("BTC-USDT",), ("book",))
    c.parse(books[0], TS, 1)
    m = orjson.loads(books[1])
    lvl = m["data"][0]["bids"][0] if m["data"][0]["bids"] else m["data"][0]["asks"][0]
    lvl[1] = "123.456"
    bad = c.parse(orjson.dumps(m), TS, 2)
    assert [e[5] for e in events(bad)] == [EV_GAP]


def test_zero_checksum_is_not_verified_and_not_a_mismatch() -> None:
    c = codec(("BTC-USDT",), ("book",))
    books = [f for f in frames("books.jsonl") if b'"instId":"BTC-USDT"' in f[:80]]
    c.parse(books[0], TS, 1)
    # As 2026 frames reportedly carry: checksum 0 (derived frames). Even after a lost
    # update it cannot be checked, so nothing is reported; with seqId it would be.
    for i, f in enumerate(books[2:10], 2):
        m = orjson.loads(f)
        m["data"][0]["checksum"] = 0
        out = c.parse(orjson.dumps(m), TS, i)
        assert out.events is None and out.book
    assert (c.checksums_verified, c.checksums_absent) == (1, 8)


def test_update_before_snapshot_is_dropped() -> None:
    c = codec()
    out = c.parse(frames("books.jsonl")[3], TS, 1)
    assert not out.book and out.drops == {DROP_UNSYNCED_BOOK: 1}
    assert out.events is None and out.replies is None


def test_reconnect_starts_books_again() -> None:
    c = codec()
    b = frames("books.jsonl")
    c.parse(b[0], TS, 1)
    c.on_connect()
    assert c.parse(b[3], TS, 2).drops == {DROP_UNSYNCED_BOOK: 1}
    out = c.parse(b[0], TS, 3)
    assert [e[5] for e in events(out)] == [EV_RESYNC]


# ---- control frames, errors ----------------------------------------------------------------
def test_text_pong_is_silent() -> None:
    c = codec()
    for f in (b"pong", "pong"):
        out = c.parse(f, TS, 1)
        assert out.error is None and not out.unknown and not out.has_rows
        assert out.drops is None and out.replies is None


def test_acks_and_errors() -> None:
    c = codec(("BTC-USDT", "UNI-USD-SWAP", "BTC-USD-220527"))
    acks = [f for f in frames("subscribe.jsonl") if b'"event"' in f]
    assert len(acks) == 18
    out = c.parse(acks[-1], TS, 1)
    assert events(out) == [("BTC-USDT", None, TS, 1, "okx-t", EV_SUBSCRIBED, "books")]
    ack26, err26 = frames("subscribe_2026.jsonl")
    assert events(c.parse(ack26, TS, 2))[0][5] == EV_SUBSCRIBED
    # A channel this feed never asks for: a venue error, not a refusal of our symbol.
    out = c.parse(err26, TS, 3)
    assert events(out) == [(None, None, TS, 3, "okx-t", "error", "60018: " + orjson.loads(
        err26)["msg"])]
    # The same error naming one of our (channel, instId) pairs is a refusal (derived).
    m = orjson.loads(err26)
    m["msg"] = m["msg"].replace("candle1m,instId:BTC-USDT", "trades,instId:UNI-USD-SWAP")
    out = c.parse(orjson.dumps(m), TS, 4)
    [ev] = events(out)
    assert ev[0] == "UNI-USD-SWAP" and ev[5] == EV_REFUSED and ev[6].startswith("60018: ")
    unsub = c.parse(b'{"event":"unsubscribe","arg":{"channel":"books","instId":"BTC-USDT"},'
                    b'"connId":"a"}', TS, 5)
    assert not unsub.has_rows and not unsub.unknown and unsub.error is None
    notice = c.parse(b'{"event":"notice","code":"64008","msg":"The connection will soon be '
                     b'closed for a service upgrade. Please reconnect.","connId":"a"}', TS, 6)
    assert notice.reconnect and events(notice)[0][5] == "notice"


@pytest.mark.parametrize("frame", [
    b"", b"ping", b"\xff\xfe", b"[1,2,3]", b'"text"', b"{", b'{"arg":1,"data":[]}',
    b'{"arg":{"channel":"trades","instId":"BTC-USDT"},"data":[{"tradeId":"1"}]}',
    b'{"arg":{"channel":"trades","instId":"BTC-USDT"},"data":[{"instId":"BTC-USDT",'
    b'"tradeId":"9","px":"-1","sz":"1","side":"buy","ts":"1"}]}',
    b'{"arg":{"channel":"trades","instId":"BTC-USDT"},"data":[{"instId":"BTC-USDT",'
    b'"tradeId":"9","px":"NaN","sz":"1","side":"buy","ts":"1"}]}',
    b'{"arg":{"channel":"books","instId":"BTC-USDT"},"action":"snapshot","data":[{"bids":'
    b'[["1",1]],"asks":[],"ts":"1"}]}',
    b'{"arg":{"channel":"books","instId":"BTC-USDT"},"action":"partial","data":[]}',
    b'{"arg":{"channel":"bbo-tbt","instId":"BTC-USDT"},"data":[{"bids":[["x","1"]],'
    b'"asks":[],"ts":"1"}]}',
    b'{"arg":{"channel":"bbo-tbt","instId":"BTC-USDT"},"data":[{"bids":[],"asks":[],'
    b'"ts":"1e3"}]}',
])
def test_malformed_frames_are_errors(frame: bytes) -> None:
    c = codec()
    out = c.parse(frame, TS, 1)
    assert out.error is not None and not out.has_rows


@pytest.mark.parametrize("frame", [
    b'{"foo":1}', b'{"event":"login","code":"0"}', b'{"arg":{"channel":"candle1m",'
    b'"instId":"BTC-USDT"},"data":[]}', b'{"id":"1","op":"order"}'])
def test_unknown_frames(frame: bytes) -> None:
    out = codec().parse(frame, TS, 1)
    assert out.unknown and out.error is None and not out.has_rows


def test_unsubscribed_symbol_dropped() -> None:
    c = codec(("BTC-USDT",))
    for name in ("trades.jsonl", "books.jsonl"):
        out = c.parse(frames(name)[0], TS, 1)  # BTC-USD-220527
        assert not out.has_rows and out.drops == {DROP_UNSUBSCRIBED: 1}
    c = codec(("BTC-USDT",), ("trades",))
    assert c.parse(frames("bbo_tbt.jsonl")[0], TS, 1).drops == {DROP_UNSUBSCRIBED: 1}


def test_bad_frame_does_not_touch_state() -> None:
    c = codec(("BTC-USDT",))
    # A frame whose second trade is bad: the first must not be recorded as seen.
    f = (b'{"arg":{"channel":"trades","instId":"BTC-USDT"},"data":[{"instId":"BTC-USDT",'
         b'"tradeId":"5","px":"1","sz":"1","side":"buy","ts":"1"},{"instId":"BTC-USDT",'
         b'"tradeId":"6","px":"bad","sz":"1","side":"buy","ts":"1"}]}')
    assert c.parse(f, TS, 1).error is not None
    out = c.parse(f.replace(b'"bad"', b'"2"'), TS, 2)
    assert [r[4] for r in out.rows("trades")] == ["5", "6"]


# ---- batches and explicit state -------------------------------------------------------------
def btc_books() -> list[bytes]:
    return [f for f in frames("books.jsonl") if b'"instId":"BTC-USDT"' in f[:80]]


def test_batch_with_corrupt_frames_keeps_their_neighbours() -> None:
    c = codec()
    t, b = frames("trades.jsonl"), btc_books()
    bad_book = orjson.loads(b[1])
    bad_book["data"][0]["asks"].append(["abc", "1", "0", "1"])  # derived: a bad price
    q = orjson.loads(frames("bbo_tbt.jsonl")[0])
    q["data"].append({**q["data"][0], "ts": "soon"})  # derived: the 2nd quote is bad
    batch = [t[0], t[1], t[2][:50], t[3], b[0], orjson.dumps(bad_book), b[1],
             orjson.dumps(q), frames("bbo_tbt.jsonl")[0]]
    out = c.parse_batch(batch, TS, 100)
    assert [i for i, _ in out.rejects or []] == [2, 5, 7]
    assert [r[3] for r in out.rows("trades")] == [100, 101, 103]
    assert sorted({r[3] for r in out.rows("book")}) == [104, 106]  # the snapshot, b[1]
    assert [r[3] for r in out.rows("quotes")] == [108]  # the half-decoded frame rolled back
    # The book was not touched by the bad frame: b[1]'s checksum matched.
    assert out.events is None and out.replies is None and not out.drops
    assert (c.checksums_verified, c.checksums_absent) == (2, 0)


def test_state_json_round_trip_continues_without_resync() -> None:
    symbols = (*SYMS, "ETH-USD-240628-1400-P")
    c = codec(symbols)
    t, b = frames("trades.jsonl"), btc_books()
    c.parse_batch(t[:40], TS, 1)
    c.parse_batch(b[:10], TS, 100)
    c.parse(frames("books_seqid_2023.jsonl")[0], TS, 200)
    c.parse(_seq_update(7966480, 7966474, bids=[["0.036", "10", "0", "1"]]), TS, 201)
    saved = orjson.dumps(c.state())
    r = codec(symbols)
    r.restore(orjson.loads(saved))
    assert orjson.dumps(r.state()) == saved
    # A replay of trades already stored is dropped; the next ones continue (no gap).
    replay = r.parse_batch(t[:40], TS, 300)
    assert not replay.trades and replay.drops == {DROP_DUPLICATE_TRADE: 40}
    assert replay.events is None
    rest = r.parse_batch(t[40:], TS, 400)
    assert len(rest.rows("trades")) == 34 and rest.events is None
    # The books continue where they were: the next update applies, its checksum matches
    # the restored levels (their text kept), no gap, resync or resubscribe.
    nxt, ref = r.parse(b[10], TS, 500), c.parse(b[10], TS, 500)
    assert nxt.rows("book") == ref.rows("book") and nxt.rows("book")
    assert nxt.events is None and nxt.replies is None and not nxt.drops
    assert r.checksums_verified == 1
    # The restored seqId chain: a continuation applies, a break is a gap.
    ok = r.parse(_seq_update(7966481, 7966480, asks=[["0.04", "1", "0", "1"]]), TS, 501)
    assert ok.rows("book") and ok.events is None
    brk = r.parse(_seq_update(7966490, 7966485), TS, 502)
    assert [e[5:] for e in events(brk)] == [
        (EV_GAP, "expected prevSeqId=7966481, received prevSeqId=7966485 seqId=7966490")]
    assert len(brk.replies or []) == 2


def _state_of_a_busy_codec() -> dict[str, Any]:
    c = codec()
    c.parse_batch(frames("trades.jsonl"), TS, 1)
    c.parse_batch(btc_books()[:3], TS, 100)
    return cast(dict[str, Any], orjson.loads(orjson.dumps(c.state())))


def _books_part(state: dict[str, Any]) -> dict[str, Any]:
    return cast(dict[str, Any], state["parts"]["books"]["BTC-USDT"])


def _in_place(change: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
    """A spoiler that changes the state in place and returns it."""
    def spoil(state: dict[str, Any]) -> dict[str, Any]:
        change(state)
        return state
    return spoil


@pytest.mark.parametrize("spoil", [
    lambda s: None,
    lambda s: [],
    lambda s: "state",
    lambda s: {**s, "v": s["v"] + 1},
    lambda s: {**s, "exchange": "bybit-spot"},
    lambda s: {"v": s["v"], "exchange": "okx"},
    _in_place(lambda s: s["parts"].update(books="garbage")),
    _in_place(lambda s: _books_part(s).update(status=7)),
    _in_place(lambda s: _books_part(s).update(last_id="x")),
    _in_place(lambda s: _books_part(s)["bids"][0].__delitem__(slice(2, None))),  # no text
    _in_place(lambda s: s["parts"]["trades"]["ints"].update({"BTC-USDT": [[9, 1], [10, 2]]})),
    _in_place(lambda s: s["parts"].update(trades=[1, 2])),
    _in_place(lambda s: _books_part(s).update(asked_ns="soon")),
    _in_place(lambda s: _books_part(s).update(dropped=-1)),
])
def test_restore_rejects_garbage_and_other_versions(spoil: Any) -> None:
    codec().restore(_state_of_a_busy_codec())  # unspoiled: fine
    with pytest.raises(StateError):
        codec().restore(spoil(_state_of_a_busy_codec()))


# ---- property tests ------------------------------------------------------------------------
ALL_FRAMES = [f for name in ("trades.jsonl", "trades_2026.jsonl", "bbo_tbt.jsonl",
                             "books.jsonl", "books5_2026.jsonl", "books_seqid_2023.jsonl",
                             "tickers.jsonl", "subscribe.jsonl", "subscribe_2026.jsonl")
              for f in frames(name)]
BOOK_SNAPSHOTS = [f for f in frames("books.jsonl") if b'"snapshot"' in f[:90]]
ALL_SYMS = ("BTC-USDT", "BTC-USD-220527", "UNI-USD-SWAP", "ETH-USD-240628-1400-P",
            "BTC-USDT-SWAP")

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False), st.text(max_size=12),
    st.sampled_from(["0", "-1", "1e400", "nan", "inf", "", "snapshot", "update", "buy",
                     "-0", "0.0", "99999999999999999999999", "1_0"]))
json_value = st.recursive(json_leaf, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)),
    max_leaves=10)


def _check_rows(out: Any) -> None:
    assert not (out.error or "").startswith("codec_error"), out.error  # a bug, not bad input
    for table in ("trades", "quotes", "book", "events"):
        for r in out.rows(table):
            assert len(r) == ROW_WIDTH[table]
            assert r[0] is None or isinstance(r[0], str)
            assert r[1] is None or (isinstance(r[1], int) and 0 <= r[1] < 2**63)
            assert isinstance(r[2], int) and isinstance(r[3], int)
            if table == "trades":
                assert r[4] is None or isinstance(r[4], str)
                assert r[5] in ("buy", "sell", "unknown")
                assert isinstance(r[6], float) and math.isfinite(r[6]) and r[6] > 0
                assert isinstance(r[7], float) and math.isfinite(r[7]) and r[7] >= 0
            elif table == "quotes":
                for px, sz in ((r[4], r[5]), (r[6], r[7])):
                    assert (px is None) == (sz is None)
                    if px is not None:
                        assert isinstance(px, float) and math.isfinite(px) and px > 0
                        assert isinstance(sz, float) and math.isfinite(sz) and sz >= 0
            elif table == "book":
                assert isinstance(r[4], bool) and r[5] in ("bid", "ask")
                assert isinstance(r[6], float) and math.isfinite(r[6]) and r[6] > 0
                assert isinstance(r[7], float) and math.isfinite(r[7]) and r[7] >= 0
                assert r[8] is None or (isinstance(r[8], int) and -(2**63) <= r[8] < 2**63)
            else:
                assert isinstance(r[4], str) and isinstance(r[5], str)
                assert r[6] is None or isinstance(r[6], str)


def _mutate(value: Any, data: st.DataObject) -> Any:
    """Replace one randomly chosen node of a decoded frame with an arbitrary JSON value."""
    if isinstance(value, dict) and value and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(value)))
        return {**value, key: _mutate(value[key], data)}
    if isinstance(value, list) and value and data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(value) - 1))
        return [*value[:i], _mutate(value[i], data), *value[i + 1:]]
    return data.draw(json_value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(frame: bytes) -> None:
    out = codec(ALL_SYMS).parse(frame, TS, 1)
    _check_rows(out)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_real_frames_never_raise(data: st.DataObject) -> None:
    c = codec(ALL_SYMS)
    for snap in BOOK_SNAPSHOTS:  # synced books, so mutated updates reach the book logic
        c.parse(snap, TS, 0)
    c.parse(frames("books_seqid_2023.jsonl")[0], TS, 0)
    frame = data.draw(st.sampled_from(ALL_FRAMES))
    if data.draw(st.booleans()):
        # json, not orjson: it also writes integers beyond 64 bits and Infinity.
        mutated = json.dumps(_mutate(orjson.loads(frame), data)).encode()
    else:
        i = data.draw(st.integers(0, len(frame)))
        mutated = frame[:i] + data.draw(st.binary(max_size=8)) + frame[i + data.draw(
            st.integers(0, 8)):]
    for seq in (1, 2):  # twice: the state left by the first must not break the second
        _check_rows(c.parse(mutated, TS, seq))


# ---- simulator and daemon end to end --------------------------------------------------------
def expected_rows(frames_: list[bytes], symbols: tuple[str, ...],
                  channels: tuple[str, ...]) -> dict[str, list[tuple[Any, ...]]]:
    """Rows the codec decodes from frames, without ts_recv/recv_seq (not comparable)."""
    c = codec(symbols, channels)
    got: dict[str, list[tuple[Any, ...]]] = {"trades": [], "quotes": [], "book": []}
    for f in frames_:
        out = c.parse(f, TS, 0)
        for table in ("trades", "quotes", "book"):
            got[table] += [r[:2] + r[4:] for r in out.rows(table)]
    return got


def table_rows(df: Any, table: str) -> list[tuple[Any, ...]]:
    if df.is_empty():
        return []
    import polars as pl
    df = df.with_columns(pl.col("ts_event").cast(pl.Int64))
    cols = {"trades": ["trade_id", "side", "price", "amount"],
            "quotes": ["bid_price", "bid_amount", "ask_price", "ask_amount"],
            "book": ["is_snapshot", "side", "price", "amount", "update_id"]}[table]
    return [tuple(r) for r in df.select(["symbol", "ts_event", *cols]).iter_rows()]


def test_venue_is_registered_with_demo_feed() -> None:
    # The 2022 capture's instruments, plus BTC-USDT-SWAP for the derivatives frames.
    assert VENUES["okx"].demo_feed["symbols"] == [*SYMS, "BTC-USDT-SWAP"]


async def test_simulated_venue_protocol() -> None:
    """Talk to the simulator directly: acks, error, text ping/pong, recorded frames."""
    from websockets.asyncio.client import connect

    async with SimServer("okx") as server, connect(server.url + "/ws/v5/public") as ws:
        await ws.send("ping")
        assert await ws.recv() == "pong"
        await ws.send(orjson.dumps({"op": "subscribe", "args": [
            {"channel": "trades", "instId": "UNI-USD-SWAP"},
            {"channel": "trades", "instId": "NOPE-USDT"}]}).decode())
        ack = orjson.loads(await ws.recv())
        assert ack["event"] == "subscribe" and ack["arg"] == {
            "channel": "trades", "instId": "UNI-USD-SWAP"} and ack["connId"]
        err = orjson.loads(await ws.recv())
        assert err["event"] == "error" and err["code"] == "60018"
        assert "instId:NOPE-USDT doesn't exist" in err["msg"]
        data = await ws.recv(decode=False)
        assert data == frames("trades.jsonl")[1]
        # The codec reads the simulator's error as a refusal of its symbol.
        c = codec(("NOPE-USDT",))
        assert events(c.parse(orjson.dumps(err), TS, 1))[0][5] == EV_REFUSED


async def test_daemon_end_to_end_parquet_equals_served_frames(root: Any) -> None:
    async with SimServer("okx") as server:
        feed = feed_for(server, symbols=list(SYMS), channels=["trades", "quotes", "book"])
        cfg = make_config(root, [feed])
        n_data = 74 + 1 + 3 + 290  # trades (2022 + 2026), bbo-tbt of BTC-USDT, books
        n_acks = 9
        daemon = await run_daemon(
            cfg, lambda d: len(server.sent) == n_data and
            d.feed_stats["okx-test"].messages >= n_data + n_acks, timeout_s=20)
    st_ = daemon.feed_stats["okx-test"]
    # The one gap is real: the simulator serves BTC-USDT's 2026 trade after its 2022 ones,
    # and OKX trade ids go up by one per fill.
    assert st_.gaps == 1 and not st_.parse_errors and st_.unknown_messages == 0
    assert not st_.drops
    served = [s.frame for s in server.sent]
    assert sorted(served) == sorted([*frames("trades.jsonl"), *frames("trades_2026.jsonl"),
                                     *frames("bbo_tbt.jsonl")[:3], *frames("books.jsonl")])
    expected = expected_rows(served, SYMS, ("trades", "quotes", "book"))
    assert len(expected["trades"]) == 75 and len(expected["quotes"]) == 3
    for table in ("trades", "quotes", "book"):
        assert table_rows(read_table(root, table), table) == expected[table], table
    book = read_table(root, "book")
    rows = [(r[0], None, 0, r[1], *r[2:]) for r in book.select(
        ["symbol", "recv_seq", "is_snapshot", "side", "price", "amount", "update_id"]
    ).iter_rows()]
    assert rebuild(rows) == as_float(independent_books())
    ev = read_table(root, "events")
    assert ev.filter(ev["event"] == EV_SUBSCRIBED).height == 9
    gaps = ev.filter(ev["event"] == EV_GAP)
    assert list(zip(gaps["symbol"], gaps["detail"], strict=True)) == [
        ("BTC-USDT", "trade id expected 338476376, got 1062992715 (724516339 missing)")]
    assert set(ev["exchange"]) == {"okx"}


async def test_daemon_end_to_end_gap_resubscribe_resync(root: Any) -> None:
    books = [f for f in frames("books.jsonl") if b'"instId":"BTC-USDT"' in f[:80]]
    async with SimServer("okx", skip_book_update=5) as server:
        feed = feed_for(server, symbols=["BTC-USDT"], channels=["book"])
        cfg = make_config(root, [feed])

        def done(d: Any) -> bool:
            sent = [s.frame for s in server.sent]
            if sent.count(books[0]) < 2:
                return False  # not re-served yet
            second = len(sent) - 1 - sent[::-1].index(books[0])
            return (books[-1] in sent[second:] and
                    d.feed_stats["okx-test"].messages >= len(sent) + 3)

        daemon = await run_daemon(cfg, done, timeout_s=20)
    st_ = daemon.feed_stats["okx-test"]
    assert st_.gaps == 1 and st_.resyncs == 1
    assert st_.drops[DROP_CHECKSUM_MISMATCH] == 1
    assert [r for r in server.venue.requests  # type: ignore[attr-defined]
            if '"books"' in r][-2:] == [
        '{"op":"unsubscribe","args":[{"channel":"books","instId":"BTC-USDT"}]}',
        '{"op":"subscribe","args":[{"channel":"books","instId":"BTC-USDT"}]}']
    ev = read_table(root, "events")
    gaps = ev.filter(ev["event"] == EV_GAP)
    assert gaps.height == 1 and gaps["detail"][0].startswith("checksum expected=")
    assert ev.filter(ev["event"] == EV_RESYNC).height == 1
    assert ev.filter(ev["event"] == EV_SUBSCRIBED).height == 2
    book = read_table(root, "book")
    rows = [(r[0], None, 0, r[1], *r[2:]) for r in book.select(
        ["symbol", "recv_seq", "is_snapshot", "side", "price", "amount", "update_id"]
    ).iter_rows()]
    assert rebuild(rows)["BTC-USDT"] == as_float(independent_books())["BTC-USDT"]
    # Two snapshot blocks: the first sync and the resync.
    assert book.filter(book["is_snapshot"])["recv_seq"].n_unique() == 2


async def test_simulated_venue_live_mode() -> None:
    """Live mode: subscriptions join the shared timeline; unsubscribe stops a pair."""
    from websockets.asyncio.client import connect

    async with SimServer("okx", live=True, rate_msgs_s=5000.0) as server, \
            connect(server.url + "/ws/v5/public") as ws:
        await ws.send(orjson.dumps({"op": "subscribe", "args": [
            {"channel": "trades", "instId": "BTC-USD-220527"},
            {"channel": "trades", "instId": "UNI-USD-SWAP"}]}).decode())
        acks = [orjson.loads(await ws.recv()) for _ in range(2)]
        assert [a["event"] for a in acks] == ["subscribe", "subscribe"]
        got = [await ws.recv(decode=False) for _ in range(5)]
        want = [f for f in frames("trades.jsonl") if b"BTC-USD-220527" in f or b"UNI-USD" in f]
        assert sorted(got) == sorted(want)


# ---- derivatives and liquidations -------------------------------------------------------------
SWAP = "BTC-USDT-SWAP"


def test_swap_derivative_subscriptions_and_spot_gets_none() -> None:
    c = codec(("BTC-USDT", SWAP, "BTC-USD-220527"), ("trades", "derivatives", "liquidations"))
    assert orjson.loads(c.subscribe_messages()[0])["args"] == [
        {"channel": "trades", "instId": "BTC-USDT"},
        {"channel": "trades", "instId": SWAP},
        {"channel": "funding-rate", "instId": SWAP},
        {"channel": "mark-price", "instId": SWAP},
        {"channel": "open-interest", "instId": SWAP},
        {"channel": "trades", "instId": "BTC-USD-220527"},
        {"channel": "mark-price", "instId": "BTC-USD-220527"},
        {"channel": "open-interest", "instId": "BTC-USD-220527"},
        {"channel": "liquidation-orders", "instType": "SWAP"},
        {"channel": "liquidation-orders", "instType": "FUTURES"}]


def test_swap_trades_quotes_books_pass_the_inst_id_through() -> None:
    """The recorded UNI-USD-SWAP trades and books land under the swap's instId."""
    c = codec(("UNI-USD-SWAP",))
    rows: dict[str, list[Any]] = {"trades": [], "book": []}
    for name in ("trades.jsonl", "books.jsonl"):
        for i, f in enumerate(frames(name)):
            if b'"UNI-USD-SWAP"' in f:
                out = c.parse(f, i, i)
                assert out.error is None
                for t in rows:
                    rows[t].extend(out.rows(t))
    assert rows["trades"] and rows["book"]
    assert {r[0] for r in rows["trades"] + rows["book"]} == {"UNI-USD-SWAP"}


def test_funding_rate_and_mark_price_golden() -> None:
    c = codec((SWAP,), ("derivatives",))
    funding = frames("funding_rate.jsonl")
    rows = []
    for i, f in enumerate(funding):
        out = c.parse(f, 10 + i, 100 + i)
        assert out.error is None
        rows.extend(out.rows("derivatives"))
    assert c.parse(funding[1], 1, 1).drops == {"unsubscribed_symbol": 1}  # BTC-USD-SWAP
    # fundingRate with fundingTime as next_funding_time, nextFundingRate as predicted; the
    # 2022 shape has no ts; the 2026 frame's nextFundingRate "" is not a value (carried).
    assert rows == [
        (SWAP, None, 10, 100, None, None, 0.0001534702159002, 0.0001542145319804, None,
         1646323200000_000_000),
        (SWAP, 1790358563915_000_000, 12, 102, None, None, 0.0000263463215391,
         0.0001542145319804, None, 1790380800000_000_000)]
    (mark,) = frames("mark_price.jsonl")
    assert c.parse(mark, 20, 200).rows("derivatives") == [
        (SWAP, 1790358817778_000_000, 20, 200, 83679.8, None, 0.0000263463215391,
         0.0001542145319804, None, 1790380800000_000_000)]


def test_open_interest_items_from_the_recorded_rest_body() -> None:
    """No WS `open-interest` frame was recorded; its data items have the REST body's
    shape (instId, instType, oi, oiCcy, ts), decoded by the same code."""
    import msgspec

    from ingestd.exchanges.okx import _OpenInterest
    (body,) = frames("open_interest_rest.jsonl")
    items = msgspec.convert(orjson.loads(body)["data"], list[_OpenInterest])
    c = codec(("BTC-USD-SWAP",), ("derivatives",))
    out = Output()
    c._open_interest("BTC-USD-SWAP", items[:1], 5, 50, out)
    assert out.rows("derivatives") == [
        ("BTC-USD-SWAP", 1654348739678_000_000, 5, 50, None, None, None, None, 4093058.0,
         None)]


def test_liquidation_orders_golden_only_subscribed_inst_ids() -> None:
    c = codec((SWAP,), ("liquidations",))
    celo, btc = frames("liquidation_orders.jsonl")
    first = c.parse(celo, 1, 1)
    assert first.drops == {"unsubscribed_symbol": 1} and not first.has_rows
    # details[].side is the liquidation order's side (a long is closed by a sell).
    assert c.parse(btc, 2, 2).rows("liquidations") == [
        (SWAP, 1791565600771_000_000, 2, 2, "sell", 82655.7, 8.55, None)]
    none = codec((SWAP,), ("trades",)).parse(btc, 3, 3)
    assert not none.has_rows and none.error is None


def test_derivatives_state_round_trips() -> None:
    c = codec((SWAP,), ("derivatives",))
    c.parse(frames("funding_rate.jsonl")[2], 1, 1)
    again = codec((SWAP,), ("derivatives",))
    again.restore(json.loads(json.dumps(c.state())))
    (mark,) = frames("mark_price.jsonl")
    assert again.parse(mark, 2, 2).rows("derivatives") == c.parse(mark, 2, 2).rows(
        "derivatives")


def test_check_accepts_the_new_channels_and_rejects_others() -> None:
    from ingestd.checks import parse_config as check_config
    from ingestd.config import ConfigError
    check_config({"storage": {"root": "/x"}, "feeds": [
        {"name": "o", "exchange": "okx", "symbols": [SWAP],
         "channels": ["derivatives", "liquidations"]}]})
    with pytest.raises(ConfigError) as e:
        check_config({"storage": {"root": "/x"}, "feeds": [
            {"name": "o", "exchange": "okx", "symbols": [SWAP], "channels": ["funding"]}]})
    assert "funding" in str(e.value.problems)
