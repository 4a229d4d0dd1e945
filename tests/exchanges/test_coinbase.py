"""Coinbase Advanced Trade codec and simulator: goldens on the recorded frames, the book
rebuilt from rows, sequence gaps and resync by re-subscription, replayed trades, bad
input (hand-picked and hypothesis), and the real daemon end to end on loopback."""

from __future__ import annotations

import copy
import json
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import orjson
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingestd.checks import parse_config
from ingestd.config import ConfigError, FeedConfig
from ingestd.exchanges import CODECS
from ingestd.exchanges.base import (
    DROP_DUPLICATE_TRADE,
    DROP_STALE_BOOK,
    DROP_UNSUBSCRIBED,
    DROP_UNSYNCED_BOOK,
    Output,
    StateError,
)
from ingestd.exchanges.book import SNAPSHOT_WAIT_S as RESYNC_TIMEOUT_S
from ingestd.exchanges.coinbase import Coinbase
from ingestd.schema import EV_OUT_OF_ORDER, ROW_WIDTH
from ingestd.sim import SimServer
from ingestd.sim.recorded import frames
from ingestd.sim.venues import VENUES
from ingestd.sim.venues.coinbase import CoinbaseStream, CoinbaseVenue
from tests.support import apply_book_rows, feed_for, make_config, read_table, run_daemon

PRODUCTS = ["BTC-USD", "ETH-USD"]
ALL = ["trades", "quotes", "book"]
T0 = 1_786_309_600_000_000_000  # receive times used in tests (after the recording)
S = 1_000_000_000

TRADES = frames("coinbase", "market_trades.jsonl")
TICKERS = frames("coinbase", "ticker.jsonl")
L2 = frames("coinbase", "level2.jsonl")
SUBSCRIBE = frames("coinbase", "subscribe.jsonl")
HEARTBEATS = frames("coinbase", "heartbeats.jsonl")


# ---- helpers --------------------------------------------------------------------------------
def feed_cfg(symbols: list[str] | None = None, channels: list[str] | None = None,
             **keys: Any) -> FeedConfig:
    cfg = parse_config({"storage": {"root": "/tmp/x"}, "feeds": [
        {"name": "cb", "exchange": "coinbase", "symbols": symbols or PRODUCTS,
         "channels": channels or ALL, **keys}]})
    return cfg.feeds[0]


def codec(symbols: list[str] | None = None, channels: list[str] | None = None) -> Coinbase:
    c = Coinbase(feed_cfg(symbols, channels))
    c.on_connect()
    return c


def ns(text: str) -> int:
    """RFC 3339 'Z' time to ns, independently of the codec's helper."""
    base, _, frac = text.rstrip("Z").partition(".")
    dt = datetime.strptime(base, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    return int(dt.timestamp()) * S + int(frac.ljust(9, "0") or 0)


def msg(frame: bytes) -> dict[str, Any]:
    return cast(dict[str, Any], orjson.loads(frame))


def renumber(frame: bytes, seq: int) -> bytes:
    d = msg(frame)
    d["sequence_num"] = seq
    return orjson.dumps(d)


def rows(outs: Iterable[Output], kind: str) -> list[Any]:
    got: list[Any] = []
    for out in outs:
        got.extend(out.rows(kind))
    return got


def events(outs: Iterable[Output], name: str | None = None) -> list[Any]:
    return [e for e in rows(outs, "events") if name is None or e[5] == name]


@dataclass
class Run:
    stream: CoinbaseStream
    frames: list[bytes] = field(default_factory=list)
    outs: list[Output] = field(default_factory=list)


def drive(c: Coinbase, venue: CoinbaseVenue | None = None) -> Run:
    """The codec against the simulated venue's sequence, without sockets: subscribe, feed
    every frame (1 ms apart), hand the codec's replies back to the venue."""
    stream = (venue or CoinbaseVenue()).new_stream()
    for m in c.subscribe_messages():
        assert stream.request(m) == []
    run = Run(stream)
    i = 0
    while (item := stream.next()) is not None:
        frame = item[1]
        if frame is None:
            continue
        out = c.parse(frame, T0 + i * 1_000_000, T0 + i)
        i += 1
        assert out.error is None, out.error
        run.frames.append(frame)
        run.outs.append(out)
        for reply in out.replies or []:
            assert stream.request(reply) == []
    return run


Book = dict[str, dict[str, dict[float, float]]]


book_from_rows = apply_book_rows

def reference_book(n_frames: int | None = None) -> dict[str, dict[float, float]]:
    """ETH-USD: the recorded snapshot with the recorded updates applied, from the JSON."""
    book: dict[str, dict[float, float]] = {"bid": {}, "ask": {}}
    for frame in L2[:n_frames]:
        for ev in msg(frame)["events"]:
            if ev["type"] == "snapshot":
                book = {"bid": {}, "ask": {}}
            for u in ev["updates"]:
                side = "bid" if u["side"] == "bid" else "ask"
                qty = float(u["new_quantity"])
                if qty == 0:
                    book[side].pop(float(u["price_level"]), None)
                else:
                    book[side][float(u["price_level"])] = qty
    return book


def check_rows(out: Output) -> None:
    """Every row has its table's width and types; prices finite and positive."""
    def price_ok(v: Any) -> bool:
        return isinstance(v, float) and math.isfinite(v) and v > 0

    def amount_ok(v: Any) -> bool:
        return isinstance(v, float) and math.isfinite(v) and v >= 0

    def common_ok(r: tuple[Any, ...]) -> bool:
        return (isinstance(r[0], str) and (r[1] is None or isinstance(r[1], int))
                and isinstance(r[2], int) and isinstance(r[3], int))

    r: tuple[Any, ...]
    for r in out.rows("trades"):
        assert len(r) == ROW_WIDTH["trades"] and common_ok(r)
        assert r[4] is None or isinstance(r[4], str)
        assert r[5] in ("buy", "sell", "unknown") and price_ok(r[6]) and amount_ok(r[7])
    for r in out.rows("quotes"):
        assert len(r) == ROW_WIDTH["quotes"] and common_ok(r)
        assert all(v is None or price_ok(v) for v in (r[4], r[6]))
        assert all(v is None or amount_ok(v) for v in (r[5], r[7]))
    for r in out.rows("book"):
        assert len(r) == ROW_WIDTH["book"] and common_ok(r)
        assert isinstance(r[4], bool) and r[5] in ("bid", "ask")
        assert price_ok(r[6]) and amount_ok(r[7]) and (r[8] is None or isinstance(r[8], int))
    for r in out.rows("events"):
        assert len(r) == ROW_WIDTH["events"]
        assert r[0] is None or isinstance(r[0], str)
        assert isinstance(r[4], str) and isinstance(r[5], str)
        assert r[6] is None or isinstance(r[6], str)
    if out.error is not None:  # a rejected frame leaves no trace at all
        assert not out.has_rows and not out.replies and not out.drops and not out.unknown


# ---- config and subscription ------------------------------------------------------------------
def test_registered_and_config_checks() -> None:
    assert CODECS["coinbase"] is Coinbase and VENUES["coinbase"] is CoinbaseVenue
    assert Coinbase.check_feed(feed_cfg()) == []
    bad = Coinbase.check_feed(FeedConfig(
        name="cb", exchange="coinbase", symbols=("BTCUSD", "btc-usd", "BTC-USD-"),
        channels=("book",), trade_stream="trade", max_frame_bytes=1 << 20))
    assert sum("is not a Coinbase product id" in p for p in bad) == 3
    assert any(p.startswith("trade_stream:") for p in bad)
    assert any(p.startswith("max_frame_bytes:") for p in bad)
    with pytest.raises(ConfigError, match=r"feeds\[0\] \(cb\)\.symbols: 'BTCUSD'"):
        feed_cfg(["BTCUSD"])
    # Without the book, small frames are fine.
    assert Coinbase.check_feed(feed_cfg(channels=["trades"], max_frame_bytes=1 << 20)) == []
    c = Coinbase(feed_cfg())
    assert c.ws_url() == "wss://advanced-trade-ws.coinbase.com"
    assert Coinbase(feed_cfg(url="ws://127.0.0.1:9")).ws_url() == "ws://127.0.0.1:9"
    assert c.keepalive_interval_s is None and c.keepalive_message() is None
    assert c.default_stale_after_s == 10.0


def test_subscribe_messages_are_the_recorded_ones() -> None:
    # The recording subscribed market_trades, candles, ticker, level2, heartbeats.
    recorded = [SUBSCRIBE[i].decode() for i in (0, 2, 3, 4)]
    assert list(codec().subscribe_messages()) == recorded


def test_subscribe_messages_follow_channels() -> None:
    sent = [msg(m.encode()) for m in codec(["ETH-USD"], ["book"]).subscribe_messages()]
    assert [(m["type"], m["channel"], m["product_ids"]) for m in sent] == [
        ("subscribe", "level2", ["ETH-USD"]), ("subscribe", "heartbeats", ["ETH-USD"])]


# ---- trades -----------------------------------------------------------------------------------
def test_trades_golden() -> None:
    c = codec(channels=["trades"])
    outs = [c.parse(f, T0 + i, T0 + i) for i, f in enumerate(TRADES)]
    assert all(o.error is None for o in outs)
    got = rows(outs, "trades")
    # Every recorded trade once, oldest first within a frame, taker side = opposite of the
    # venue's (maker) side, exact ns times, values from the decimal strings.
    want = []
    for i, f in enumerate(TRADES):
        for ev in msg(f)["events"]:
            for t in sorted(ev["trades"], key=lambda t: int(t["trade_id"])):
                want.append((t["product_id"], ns(t["time"]), T0 + i, T0 + i, t["trade_id"],
                             {"SELL": "buy", "BUY": "sell"}[t["side"]], float(t["price"]),
                             float(t["size"])))
    assert got == want and len(got) == 147 + 132
    # Spelled out: the oldest BTC-USD trade of the first snapshot, and a two-fill update.
    assert got[0] == ("BTC-USD", ns("2026-08-09T21:04:35.345704Z"), T0, T0, "1068571991",
                      "sell", 65090.99, 0.00310335)
    assert got[99] == ("BTC-USD", 1_786_309_542_514_318_000, T0, T0, "1068572090", "buy",
                       65083.67, 0.002186)
    two = rows([outs[7]], "trades")
    assert [(r[4], r[5], r[6], r[7]) for r in two] == [
        ("1068572095", "buy", 65083.67, 0.00322434),
        ("1068572096", "sell", 65083.66, 0.00100346)]
    # Feeding the per-channel file alone skips the other channels' numbers: gaps, no loss.
    assert events(outs, "gap")[0][6] == "sequence_num: expected 2, received 9 " \
                                        "(7 messages missing)"


def test_taker_side_against_best_bid_ask() -> None:
    """The finding in the codec's docstring, as an invariant of the emitted rows: a taker
    buy never prints at or below the best bid, a taker sell never at or above the ask."""
    run = drive(codec())
    bbo: dict[str, tuple[Any, Any]] = {}
    touch: Counter[tuple[str, bool]] = Counter()
    last_ticker = msg(TICKERS[-1])["sequence_num"]  # later quotes were not recorded
    for frame, out in zip(run.frames, run.outs, strict=True):
        if msg(frame)["sequence_num"] > last_ticker:
            break
        for sym, _, _, _, bid, _, ask, _ in out.rows("quotes"):
            bbo[sym] = (bid, ask)
        for sym, ts, _, _, _, side, px, _ in out.rows("trades"):
            if sym not in bbo or (ts or 0) < ns("2026-08-09T21:05:48Z"):
                continue  # snapshot history, before any quote
            bid, ask = bbo[sym]
            assert (px > bid) if side == "buy" else (px < ask), (sym, side, px, bid, ask)
            touch[side, px >= ask if side == "buy" else px <= bid] += 1
    # All 42 taker buys at the ask; 19 of 21 taker sells at the bid, 2 inside (a sweep).
    assert touch == {("buy", True): 42, ("sell", True): 19, ("sell", False): 2}


def test_replayed_trades_are_not_emitted_twice() -> None:
    c = codec(channels=["trades"])
    first = rows([c.parse(f, T0, T0) for f in TRADES[:10]], "trades")
    c.on_connect()  # a reconnect: the venue replays the last 100 trades of each product
    out = c.parse(TRADES[0], T0 + 1, T0 + 1)
    assert not out.trades and out.drops == {DROP_DUPLICATE_TRADE: 100}
    again = rows([c.parse(renumber(f, i + 1), T0 + 2, T0 + 2)
                  for i, f in enumerate(TRADES[1:15])], "trades")
    ids = [r[4] for r in first + again]
    recorded_ids = {t["trade_id"] for f in TRADES[:15] for ev in msg(f)["events"]
                    for t in ev["trades"]}
    assert len(ids) == len(set(ids)) and set(ids) == recorded_ids
    assert len(again) == 6  # only the updates not seen before the reconnect


def test_trade_id_gap_is_an_event_and_a_replay_fills_it() -> None:
    c = codec(channels=["trades"])
    c.parse(TRADES[0], T0, T0)                      # BTC-USD ..1068572090
    out = c.parse(renumber(TRADES[3], 1), T0, T0)   # 1068572092: 091 was lost
    assert [(e[0], e[5], e[6]) for e in out.rows("events")] == [
        ("BTC-USD", "gap", "trade id expected 1068572091, got 1068572092 (1 missing)")]
    assert [r[4] for r in out.rows("trades")] == ["1068572092"]
    # A later replay (e.g. the snapshot after a reconnect) holds 091: written once, late,
    # with an `out_of_order` event (it is below the highest id seen).
    replay = msg(TRADES[2])
    replay["sequence_num"] = 2
    out = c.parse(orjson.dumps(replay), T0, T0)
    assert [r[4] for r in out.rows("trades")] == ["1068572091"]
    assert [(e[0], e[5]) for e in out.rows("events")] == [("BTC-USD", EV_OUT_OF_ORDER)]
    out = c.parse(renumber(TRADES[2], 3), T0, T0)
    assert not out.trades and not out.events and out.drops == {DROP_DUPLICATE_TRADE: 1}


def trades_frame(seq: int, ids: list[int], kind: str = "update") -> bytes:
    """A BTC-USD market_trades frame with these trade ids, in the order given (the venue
    lists newest first), each a copy of a recorded trade."""
    template = msg(TRADES[2])["events"][0]["trades"][0]
    trades = [{**template, "trade_id": str(i)} for i in ids]
    return orjson.dumps({"channel": "market_trades", "timestamp": "2026-08-09T21:05:49Z",
                         "sequence_num": seq, "events": [{"type": kind, "trades": trades}]})


def test_never_seen_lower_trade_id_is_stored_and_replays_are_dropped() -> None:
    """A never-seen id below the highest seen (a hole filled by a later snapshot) is a
    real trade: stored once, with an `out_of_order` event; a replayed id is dropped."""
    c = codec(channels=["trades"])
    out = c.parse(trades_frame(0, [105, 101, 100]), T0, 1)
    assert [r[4] for r in out.rows("trades")] == ["100", "101", "105"]
    assert [e[6] for e in out.rows("events")] == [
        "trade id expected 102, got 105 (3 missing)"]
    late = c.parse(trades_frame(1, [103]), T0 + 1, 2)
    assert late.rows("trades") == [("BTC-USD", ns("2026-08-09T21:05:48.167634Z"), T0 + 1, 2,
                                    "103", "buy", 65083.67, 0.01034361)]
    ((sym, _te, _tr, seq, feed, event, detail),) = late.rows("events")
    assert (sym, seq, feed, event) == ("BTC-USD", 2, "cb", EV_OUT_OF_ORDER)
    assert "103" in detail and "105" in detail
    # A (re)subscribe snapshot, newest first, over everything: taken in ascending id
    # order, so only the two ids of the hole never seen are new (and out of order), 106
    # continues, and every replayed id is dropped without an event.
    snap = c.parse(trades_frame(2, [106, 105, 104, 103, 102, 101, 100], "snapshot"), T0, 3)
    assert [r[4] for r in snap.rows("trades")] == ["102", "104", "106"]
    assert [e[5] for e in snap.rows("events")] == [EV_OUT_OF_ORDER, EV_OUT_OF_ORDER]
    assert snap.drops == {DROP_DUPLICATE_TRADE: 4}
    again = c.parse(trades_frame(3, [106, 105, 104, 103, 102, 101, 100], "snapshot"), T0, 4)
    assert not again.trades and not again.events
    assert again.drops == {DROP_DUPLICATE_TRADE: 7}


def test_a_normal_snapshot_after_a_reconnect_is_replays_then_new_ids() -> None:
    """The usual case: the snapshot after a reconnect overlaps what was stored and goes on
    past it. Newest first on the wire, but no event: duplicates, then consecutive ids."""
    c = codec(channels=["trades"])
    c.parse(trades_frame(0, list(range(199, 99, -1)), "snapshot"), T0, 1)   # 100..199
    c.on_connect()
    out = c.parse(trades_frame(0, list(range(203, 103, -1)), "snapshot"), T0, 2)
    assert [r[4] for r in out.rows("trades")] == ["200", "201", "202", "203"]
    assert not out.events and out.drops == {DROP_DUPLICATE_TRADE: 96}


def test_non_numeric_trade_ids_are_deduplicated() -> None:
    c = codec(channels=["trades"])
    d = msg(TRADES[2])
    d["events"][0]["trades"][0]["trade_id"] = "a1b2-c3"
    out1 = c.parse(orjson.dumps(d), T0, T0)
    d["sequence_num"] += 1
    out2 = c.parse(orjson.dumps(d), T0, T0)
    assert [r[4] for r in out1.rows("trades")] == ["a1b2-c3"]
    assert not out2.trades and out2.drops == {DROP_DUPLICATE_TRADE: 1}


def test_unsubscribed_symbols_and_channels_are_dropped_and_counted() -> None:
    c = codec(["BTC-USD"], ["trades", "book"])
    out = c.parse(TRADES[1], T0, T0)  # ETH-USD snapshot
    assert not out.trades and out.drops == {DROP_UNSUBSCRIBED: 100}
    out = c.parse(renumber(TICKERS[0], 1), T0, T0)  # quotes not subscribed
    assert not out.quotes and out.drops == {DROP_UNSUBSCRIBED: 1}
    out = c.parse(renumber(L2[1], 2), T0, T0)  # ETH-USD book
    assert not out.book and out.drops == {DROP_UNSUBSCRIBED: 1}
    assert not rows([out], "events")


# ---- quotes -----------------------------------------------------------------------------------
def test_quotes_golden() -> None:
    c = codec(channels=["quotes"])
    outs = [c.parse(f, T0 + i, T0 + i) for i, f in enumerate(TICKERS)]
    got = rows(outs, "quotes")
    want = []
    for i, f in enumerate(TICKERS):
        m = msg(f)
        t = m["events"][0]["tickers"][0]
        want.append((t["product_id"], ns(m["timestamp"]), T0 + i, T0 + i,
                     float(t["best_bid"]), float(t["best_bid_quantity"]),
                     float(t["best_ask"]), float(t["best_ask_quantity"])))
    assert got == want and len(got) == 120
    assert got[0] == ("BTC-USD", 1_786_309_548_229_198_328, T0, T0, 65083.66, 0.20371215,
                      65083.67, 0.24290402)


def test_empty_ticker_side_is_null_not_zero() -> None:
    d = msg(TICKERS[0])
    t = d["events"][0]["tickers"][0]
    t["best_ask"], t["best_ask_quantity"] = "", ""
    t["best_bid"], t["best_bid_quantity"] = "0", "0"
    out = codec(channels=["quotes"]).parse(orjson.dumps(d), T0, T0)
    assert out.rows("quotes") == [
        ("BTC-USD", ns(d["timestamp"]), T0, T0, None, None, None, None)]


# ---- book -------------------------------------------------------------------------------------
def test_book_snapshot_and_update_golden() -> None:
    c = codec(["ETH-USD"], ["book"])
    snap = c.parse(renumber(L2[0], 0), T0, 7)
    levels = msg(L2[0])["events"][0]["updates"]
    book = snap.rows("book")
    assert len(book) == len(levels) == 23_334
    assert {r[3] for r in book} == {7} and all(r[4] for r in book)
    assert book[0] == ("ETH-USD", 1_786_309_548_351_610_000, T0, 7, True, "bid",
                            1919.44, 0.02858092, None)
    assert book[-1] == ("ETH-USD", 1_786_309_548_351_610_000, T0, 7, True, "ask",
                             100000000.0, 0.00000003, None)
    assert sum(r[5] == "ask" for r in book) == 16_399
    assert not snap.events  # the first snapshot is a sync, not a resync
    upd = c.parse(renumber(L2[1], 1), T0 + 1, 8)
    assert upd.rows("book") == [
        ("ETH-USD", 1_786_309_548_464_857_000, T0 + 1, 8, False, "bid", 1918.55, 0.00000131,
         None),
        ("ETH-USD", 1_786_309_548_464_857_000, T0 + 1, 8, False, "bid", 1917.95, 1.1531, None),
        ("ETH-USD", 1_786_309_548_464_857_000, T0 + 1, 8, False, "bid", 1917.35, 0.0, None)]


def test_book_rebuilt_from_rows_equals_the_venue_book() -> None:
    run = drive(codec())
    assert not events(run.outs, "gap") and not any(o.drops for o in run.outs)
    books = book_from_rows(rows(run.outs, "book"))
    assert books == {"ETH-USD": reference_book()}
    assert len(books["ETH-USD"]["bid"]) + len(books["ETH-USD"]["ask"]) == 23_325
    # The stream the codec saw: contiguous numbers, recorded frames verbatim.
    assert [msg(f)["sequence_num"] for f in run.frames] == list(range(len(run.frames)))
    recorded = set(TRADES) | set(TICKERS) | set(L2) | set(HEARTBEATS)
    assert sum(f in recorded for f in run.frames) == len(recorded)


def test_book_updates_before_any_snapshot_wait_and_resubscribe_after_timeout() -> None:
    c = codec(["ETH-USD"], ["book"])
    out = c.parse(renumber(L2[1], 0), T0, T0)
    assert not out.book and out.drops == {DROP_UNSYNCED_BOOK: 1} and not out.replies
    out = c.parse(renumber(L2[2], 1), T0 + int(RESYNC_TIMEOUT_S * S), T0 + 1)
    assert out.drops == {DROP_UNSYNCED_BOOK: 1}
    assert out.replies == [
        '{"type":"unsubscribe","product_ids":["ETH-USD"],"channel":"level2"}',
        '{"type":"subscribe","product_ids":["ETH-USD"],"channel":"level2"}']


# ---- sequence gaps and resync -----------------------------------------------------------------
def test_gap_resubscribes_the_book_and_the_next_snapshot_resyncs() -> None:
    c = codec(["ETH-USD"], ["book", "trades"])
    assert c.parse(renumber(L2[0], 0), T0, 1).book
    assert c.parse(renumber(L2[1], 1), T0, 2).book
    out = c.parse(renumber(L2[2], 3), T0 + S, 3)  # number 2 was lost
    assert [(e[0], e[5], e[6]) for e in out.rows("events")] == [
        (None, "gap", "sequence_num: expected 2, received 3 (1 messages missing)")]
    assert out.replies == [
        '{"type":"unsubscribe","product_ids":["ETH-USD"],"channel":"level2"}',
        '{"type":"subscribe","product_ids":["ETH-USD"],"channel":"level2"}']
    assert not out.book and out.drops == {DROP_UNSYNCED_BOOK: 1}
    # Trades are not affected by the book being out of sync.
    assert c.parse(renumber(TRADES[1], 4), T0 + S, 4).trades
    # A second gap within the re-subscription interval does not ask again.
    out = c.parse(renumber(L2[3], 6), T0 + S + 1, 5)
    assert len(events([out], "gap")) == 1 and not out.replies
    # The new snapshot: a snapshot block, a resync event, then deltas again.
    snap = c.parse(renumber(L2[0], 7), T0 + 2 * S, 6)
    assert snap.book and all(r[4] and r[3] == 6 for r in snap.rows("book"))
    assert [(e[0], e[5]) for e in snap.rows("events")] == [("ETH-USD", "resync")]
    assert c.parse(renumber(L2[4], 8), T0 + 2 * S, 7).book


def test_gap_on_the_frame_that_is_a_snapshot_does_not_resubscribe_that_book() -> None:
    c = codec(["ETH-USD"], ["book"])
    out = c.parse(L2[0], T0, T0)  # sequence_num 21 on a fresh connection
    assert len(events([out], "gap")) == 1 and not out.replies and out.book


def test_sequence_going_back_is_reported_and_its_book_content_dropped() -> None:
    c = codec(["ETH-USD"], ["book"])
    c.parse(renumber(L2[0], 0), T0, 1)
    c.parse(renumber(L2[1], 1), T0, 2)
    out = c.parse(renumber(L2[2], 1), T0, 3)
    assert [e[6] for e in out.rows("events")] == [
        "sequence_num went back: expected 2, received 1"]
    assert not out.book and out.drops == {DROP_STALE_BOOK: 1} and not out.replies
    assert c.parse(renumber(L2[2], 2), T0, 4).book  # the expected number still continues


def test_reconnect_restarts_the_sequence_and_resyncs_books() -> None:
    c = codec(["ETH-USD"], ["book"])
    c.parse(renumber(L2[0], 0), T0, 1)
    c.on_connect()
    out = c.parse(renumber(L2[1], 0), T0, 2)  # an update before the new snapshot
    assert not events([out], "gap") and out.drops == {DROP_UNSYNCED_BOOK: 1}
    snap = c.parse(renumber(L2[0], 1), T0, 3)
    assert [e[5] for e in snap.rows("events")] == ["resync"]


def test_rotation_to_a_connection_that_replays_everything() -> None:
    """Make-before-break rotation (default `on_rotate`): the new connection numbers from 0
    again and replays snapshots; no gap, trades once, the book resynced to the same state."""
    c = codec()
    first = drive(c)
    c.on_rotate()
    second = drive(c)
    assert not events(first.outs + second.outs, "gap")
    assert len(rows(first.outs, "trades")) == 279 and not rows(second.outs, "trades")
    assert sum((o.drops or {}).get(DROP_DUPLICATE_TRADE, 0) for o in second.outs) == 279
    assert [(e[0], e[5]) for e in events(second.outs, "resync")] == [("ETH-USD", "resync")]
    assert book_from_rows(rows(first.outs + second.outs, "book")) == {
        "ETH-USD": reference_book()}


def test_lost_frame_through_the_simulated_venue_resyncs_exactly() -> None:
    # Number 27 is an ETH-USD l2 update: lost, detected, re-subscribed, re-snapshotted.
    run = drive(codec(), CoinbaseVenue(skip_seqs=[27]))
    gaps = events(run.outs, "gap")
    assert [e[6] for e in gaps] == ["sequence_num: expected 27, received 28 "
                                    "(1 messages missing)"]
    assert [(e[0], e[5]) for e in events(run.outs, "resync")] == [("ETH-USD", "resync")]
    # The rebuilt book includes the lost update (the new snapshot carries it).
    assert book_from_rows(rows(run.outs, "book")) == {"ETH-USD": reference_book()}
    assert len(rows(run.outs, "trades")) == 279


def test_update_levels_keep_their_own_event_time() -> None:
    """Each update row carries its level's event_time; a snapshot block carries the latest
    event_time of its levels (the venue's re-subscription snapshots mix them)."""
    c = codec(["ETH-USD"], ["book"])
    snap = msg(_small_snapshot())
    snap["sequence_num"] = 0
    snap["events"][0]["updates"][-1]["event_time"] = "2026-08-09T21:05:48.4Z"
    out = c.parse(orjson.dumps(snap), T0, 1)
    assert {r[1] for r in out.rows("book")} == {ns("2026-08-09T21:05:48.4Z")}
    d = msg(L2[1])
    d["sequence_num"] = 1
    d["events"][0]["updates"][1]["event_time"] = "2026-08-09T21:05:48.5Z"
    d["events"][0]["updates"].append({"side": "offer", "event_time": "2026-08-09T21:05:48.5Z",
                                      "price_level": "1920.01", "new_quantity": "2"})
    out = c.parse(orjson.dumps(d), T0, 2)
    t1, t2 = 1_786_309_548_464_857_000, ns("2026-08-09T21:05:48.5Z")
    # In the order sent: one diff per run of levels sharing an event_time.
    assert [(r[1], r[5], r[6], r[7]) for r in out.rows("book")] == [
        (t1, "bid", 1918.55, 0.00000131), (t2, "bid", 1917.95, 1.1531),
        (t1, "bid", 1917.35, 0.0), (t2, "ask", 1920.01, 2.0)]
    assert {r[3] for r in out.rows("book")} == {2} and not out.events


# ---- explicit state and the batch policy ------------------------------------------------------
BOOK_AND_TRADES = ["book", "trades", "quotes"]


def test_state_round_trips_as_json_and_the_connection_continues() -> None:
    """state() -> JSON -> a fresh codec (what a journal replay is seeded with): the same
    connection goes on - no sequence gap, the book is applied without a resync, and a
    replay of stored trades is dropped."""
    c = codec(["ETH-USD"], BOOK_AND_TRADES)
    kept = c.parse_batch([renumber(L2[0], 0), renumber(TRADES[1], 1), renumber(L2[1], 2),
                          renumber(SUBSCRIBE[9], 3)], T0, 1)
    assert kept.rejects is None and len(kept.rows("trades")) == 100
    saved = orjson.loads(orjson.dumps(c.state()))
    assert saved["v"] == Coinbase.STATE_VERSION and saved["exchange"] == "coinbase"
    assert set(saved["parts"]) == {"trades", "books", "connection"}
    assert saved["parts"]["trades"]["ints"] == {"ETH-USD": [[833140679], [833140778]]}
    assert saved["parts"]["connection"]["expected"] == 4
    assert ["level2", "ETH-USD"] in saved["parts"]["connection"]["acked"]
    fresh = codec(["ETH-USD"], BOOK_AND_TRADES)
    fresh.restore(saved)
    assert orjson.loads(orjson.dumps(fresh.state())) == saved
    later = [renumber(TRADES[1], 4), renumber(SUBSCRIBE[9], 5),
             *[renumber(f, 6 + i) for i, f in enumerate(L2[2:40])]]
    cont = c.parse_batch(later, T0 + S, 10)
    restored = fresh.parse_batch(later, T0 + S, 10)
    assert restored.rejects is None and not restored.events and restored.replies is None
    assert restored.drops == {DROP_DUPLICATE_TRADE: 100} and not restored.trades
    assert restored.rows("book") and restored.rows("book") == cont.rows("book")
    assert book_from_rows(kept.rows("book") + restored.rows("book")) == {
        "ETH-USD": reference_book(40)}


def test_state_taken_while_waiting_for_a_snapshot_resumes_the_resync() -> None:
    c = codec(["ETH-USD"], ["book"])
    c.parse(renumber(L2[0], 0), T0, 1)
    assert c.parse(renumber(L2[1], 2), T0 + S, 2).replies  # number 1 lost: re-subscribed
    fresh = codec(["ETH-USD"], ["book"])
    fresh.restore(orjson.loads(orjson.dumps(c.state())))
    # Still waiting: updates dropped; another gap within the interval does not ask again.
    out = fresh.parse(renumber(L2[2], 4), T0 + S + 1, 3)
    assert len(events([out], "gap")) == 1 and not out.replies
    assert out.drops == {DROP_UNSYNCED_BOOK: 1}
    # No snapshot RESYNC_TIMEOUT_S after asking: asked again.
    out = fresh.parse(renumber(L2[3], 5), T0 + S + int(RESYNC_TIMEOUT_S * S), 4)
    assert out.replies == [
        '{"type":"unsubscribe","product_ids":["ETH-USD"],"channel":"level2"}',
        '{"type":"subscribe","product_ids":["ETH-USD"],"channel":"level2"}']
    snap = fresh.parse(renumber(L2[0], 6), T0 + 7 * S, 5)
    assert snap.book and [(e[0], e[5]) for e in events([snap])] == [("ETH-USD", "resync")]


def test_restore_refuses_garbage_and_other_versions() -> None:
    c = codec()
    c.parse_batch([renumber(L2[0], 0), renumber(TRADES[0], 1), renumber(SUBSCRIBE[9], 2)],
                  T0, 1)
    saved = orjson.loads(orjson.dumps(c.state()))
    parts = saved["parts"]
    conn = parts["connection"]

    def with_part(name: str, value: Any) -> dict[str, Any]:
        return {**saved, "parts": {**parts, name: value}}

    bad: Any
    for bad in (None, [], "x", {"v": 999, "exchange": "coinbase", "parts": {}},
                {**saved, "v": saved["v"] + 1}, {**saved, "exchange": "kraken"},
                {**saved, "parts": None},
                with_part("trades", {"ints": {"BTC-USD": [[5, 1], [2]]}}),
                with_part("trades", {"ints": {"BTC-USD": [[5], [1]]}}),
                with_part("books", [1, 2]),
                with_part("books", {"ETH-USD": {**parts["books"]["ETH-USD"], "status": 7}}),
                with_part("connection", []),
                with_part("connection", {**conn, "expected": -1}),
                with_part("connection", {**conn, "expected": "3"}),
                with_part("connection", {**conn, "expected": True}),
                with_part("books", {"ETH-USD": {**parts["books"]["ETH-USD"],
                                                "asked_ns": "soon"}}),
                with_part("connection", {**conn, "acked": [["level2"]]}),
                with_part("connection", {k: v for k, v in conn.items() if k != "expected"})):
        with pytest.raises(StateError):
            codec().restore(bad)
    codec().restore(saved)  # the untouched state is fine


def test_a_bad_frame_in_a_batch_keeps_its_neighbours() -> None:
    c = codec(["ETH-USD"], ["book", "trades"])
    bad = renumber(L2[2], 2).replace(b'"new_quantity":"', b'"new_quantity":"x', 1)
    out = c.parse_batch([renumber(L2[0], 0), renumber(L2[1], 1), bad, renumber(L2[2], 2),
                         renumber(TRADES[1], 3)], T0, 20)
    assert out.rejects is not None and [i for i, _ in out.rejects] == [2]
    assert sorted({r[3] for r in out.rows("book")}) == [20, 21, 23]
    assert {r[3] for r in out.rows("trades")} == {24} and len(out.rows("trades")) == 100
    # The rejected frame changed nothing: its number is still the expected one (no gap),
    # nothing was counted or asked for.
    assert not out.events and out.drops is None and out.replies is None
    assert book_from_rows(out.rows("book")) == {"ETH-USD": reference_book(3)}


# ---- acks, errors, unknown, heartbeats ------------------------------------------------------
def test_acks_become_subscribed_events_once_per_channel_and_product() -> None:
    c = codec()
    outs = [c.parse(SUBSCRIBE[i], T0, T0) for i in range(5, 10)]
    got = [(e[0], e[6]) for e in events(outs, "subscribed")]
    assert got == [("BTC-USD", "market_trades"), ("ETH-USD", "market_trades"),
                   ("BTC-USD", "candles"), ("ETH-USD", "candles"),
                   ("BTC-USD", "ticker"), ("ETH-USD", "ticker"),
                   ("BTC-USD", "level2"), ("ETH-USD", "level2")]


def test_venue_error_and_refused_product() -> None:
    c = codec(["BTC-USD", "XRP-USDX"])
    out = c.parse(b'{"type":"error","message":"Failed to subscribe",'
                  b'"reason":"XRP-USDX is not a valid product"}', T0, 5)
    assert [(e[0], e[5], e[6]) for e in out.rows("events")] == [
        (None, "error", "Failed to subscribe: XRP-USDX is not a valid product"),
        ("XRP-USDX", "refused", "Failed to subscribe: XRP-USDX is not a valid product")]
    out = c.parse(b'{"type":"error","message":"failure to subscribe"}', T0, 6)
    assert [(e[0], e[5]) for e in out.rows("events")] == [(None, "error"), (None, "refused")]
    out = c.parse(b'{"type":"error","message":"subscribe or unsubscribe required"}', T0, 7)
    assert [e[5] for e in out.rows("events")] == ["error"]


def test_heartbeats_unknown_channels_and_foreign_messages() -> None:
    c = codec()
    out = c.parse(renumber(HEARTBEATS[0], 0), T0, 1)
    assert not out.has_rows and not out.unknown and out.error is None
    out = c.parse(b'{"channel":"candles","timestamp":"2026-08-09T21:05:48Z",'
                  b'"sequence_num":1,"events":[]}', T0, 2)
    assert out.unknown and not out.has_rows
    out = c.parse(renumber(HEARTBEATS[1], 2), T0, 3)  # the unknown frame took number 1
    assert not out.events
    out = c.parse(b'{"hello":"world"}', T0, 4)
    assert out.unknown and out.error is None


@pytest.mark.parametrize("frame", [
    b"", b"{", b"\xff\xfe", b"[]", b'"text"', b"null",
    b'{"channel":"ticker","sequence_num":"0","events":[]}',
    b'{"channel":"ticker","sequence_num":true,"events":[]}',
    b'{"channel":"ticker","sequence_num":0,"events":{}}',
    b'{"channel":7,"sequence_num":0,"events":[]}',
    b'{"channel":"market_trades","sequence_num":0,"events":[{"trades":[{"product_id":'
    b'"BTC-USD","trade_id":"1","price":"-1","size":"1","time":"2026-08-09T21:05:48Z",'
    b'"side":"BUY"}]}]}',
    b'{"channel":"market_trades","sequence_num":0,"events":[{"trades":[{"product_id":'
    b'"BTC-USD","trade_id":"1","price":"NaN","size":"1","time":"2026-08-09T21:05:48Z",'
    b'"side":"BUY"}]}]}',
    b'{"channel":"market_trades","sequence_num":0,"events":[{"trades":[{"product_id":'
    b'"BTC-USD","trade_id":1.5,"price":"1","size":"1","time":"2026-08-09T21:05:48Z"}]}]}',
    b'{"channel":"market_trades","sequence_num":0,"events":[{"trades":[{"product_id":'
    b'"BTC-USD","trade_id":"1","price":"1","size":"1","time":"yesterday"}]}]}',
    b'{"channel":"l2_data","sequence_num":0,"events":[{"type":"update","product_id":'
    b'"ETH-USD","updates":[{"side":"middle","event_time":"2026-08-09T21:05:48Z",'
    b'"price_level":"1","new_quantity":"1"}]}]}',
    b'{"channel":"l2_data","sequence_num":0,"events":[{"type":"delta","product_id":'
    b'"ETH-USD","updates":[]}]}',
    b'{"channel":"ticker","sequence_num":0,"timestamp":"2026-08-09T21:05:48Z","events":'
    b'[{"tickers":[{"product_id":"BTC-USD","best_bid":"1","best_bid_quantity":"1"}]}]}',
])
def test_malformed_frames_are_rejected_and_leave_no_trace(frame: bytes) -> None:
    c = codec()
    out = c.parse(frame, T0, 1)
    assert out.error is not None and not out.has_rows and not out.unknown
    # Nothing of it was applied: the next number is still 0, and no trade id was taken.
    nxt = c.parse(TRADES[0], T0, 2)
    assert not events([nxt], "gap") and len(nxt.rows("trades")) == 100


# ---- property-based: bad input never raises, rows always well-formed --------------------------
def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.extend(_paths(v, (*prefix, i)))
    return out


def _small_snapshot() -> bytes:
    d = msg(L2[0])
    d["events"][0]["updates"] = d["events"][0]["updates"][:5] + \
        d["events"][0]["updates"][-5:]
    return orjson.dumps(d)


SAMPLES = [TRADES[0], TRADES[7], TRADES[22], TICKERS[0], TICKERS[5], L2[1], L2[2],
           _small_snapshot(), HEARTBEATS[0], SUBSCRIBE[9]]
SWAPS: list[Any] = [None, 0, -1, 1.5, "1e400", "", "x", "0", "-5", "nan", "inf", True, [], {},
                    [1], {"a": 1}, "2026-13-45T99:99:99Z", 2**70]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    out = codec().parse(data, T0, 1)
    check_rows(out)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(range(len(SAMPLES))), st.data())
def test_mutated_real_frames_never_raise(which: int, data: st.DataObject) -> None:
    frame = msg(SAMPLES[which])
    paths = _paths(frame)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        parent: Any = frame
        try:
            for key in path[:-1]:
                parent = parent[key]
            if data.draw(st.booleans()):
                del parent[path[-1]]
            else:
                # A copy: the swap values are shared by every example and must not be
                # mutated (later mutations could make one contain itself).
                parent[path[-1]] = copy.deepcopy(data.draw(st.sampled_from(SWAPS)))
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced this path
    c = codec()
    out = c.parse(json.dumps(frame).encode(), T0, 1)  # stdlib: also writes ints > 64 bit
    check_rows(out)
    # And the codec keeps working afterwards.
    check_rows(c.parse(SAMPLES[which], T0, 2))


# ---- the simulated venue ----------------------------------------------------------------------
def test_sim_refuses_unknown_products_and_channels() -> None:
    stream = CoinbaseVenue().new_stream()
    err = stream.request('{"type":"subscribe","product_ids":["DOGE-EUR"],"channel":"ticker"}')
    assert [msg(e) for e in err] == [{"type": "error", "message": "Failed to subscribe",
                                      "reason": "DOGE-EUR is not a valid product"}]
    assert stream.request('{"type":"subscribe","product_ids":[],"channel":"full"}')
    assert stream.request(b"{") and stream.subs == {}
    assert stream.request('{"type":"subscribe","product_ids":["BTC-USD"],'
                          '"channel":"ticker"}') == []
    seq, ack, data = cast(tuple[int, bytes, bool], stream.next())
    # Trade snapshots (numbers 0, 1) are not subscribed: the ack takes number 0.
    assert (seq, data) == (0, False)
    assert msg(ack)["events"] == [{"subscriptions": {"ticker": ["BTC-USD"]}}]


def test_sim_unsubscribe_stops_frames_and_is_acked() -> None:
    stream = CoinbaseVenue().new_stream()
    stream.request('{"type":"subscribe","product_ids":["BTC-USD","ETH-USD"],'
                   '"channel":"market_trades"}')
    stream.request('{"type":"unsubscribe","product_ids":["ETH-USD"],'
                   '"channel":"market_trades"}')
    served = []
    while (item := stream.next()) is not None:
        served.append(cast(bytes, item[1]))
    assert stream.subs == {"market_trades": ["BTC-USD"]}
    acks = [msg(f)["events"][0]["subscriptions"] for f in served
            if msg(f)["channel"] == "subscriptions"]
    assert acks == [{"market_trades": ["BTC-USD", "ETH-USD"]},
                    {"market_trades": ["BTC-USD"]}]
    trade_frames = [f for f in served if f in set(TRADES)]
    assert trade_frames == [f for f in TRADES if b"BTC-USD" in f]


# ---- end to end: the real daemon against the simulator ----------------------------------------
def _venue(sim: SimServer) -> CoinbaseVenue:
    return cast(CoinbaseVenue, sim.venue)


def _caught_up(sim: SimServer, name: str) -> Any:
    def done(d: Any) -> bool:
        st_ = d.feed_stats.get(name)
        streams = _venue(sim).streams
        return (st_ is not None and bool(streams) and streams[-1].finished
                and st_.messages >= sum(s.frames_out for s in streams))
    return done


def _served(sim: SimServer, channel: str) -> list[dict[str, Any]]:
    return [m for m in (msg(s.frame) for s in sim.sent) if m.get("channel") == channel]


async def test_daemon_lands_exactly_what_the_venue_served(root: Path) -> None:
    async with SimServer("coinbase", rate_msgs_s=4000) as sim:
        feed = feed_for(sim, symbols=PRODUCTS, channels=ALL)
        daemon = await run_daemon(make_config(root, [feed]), _caught_up(sim, feed["name"]))
    stats = daemon.feed_stats[feed["name"]]
    assert stats.gaps == 0 and stats.parse_errors == {} and stats.unknown_messages == 0
    assert sim.connections == 1

    trades = read_table(root, "trades")
    want_trades = [(t["product_id"], t["trade_id"], {"SELL": "buy", "BUY": "sell"}[t["side"]],
                    float(t["price"]), float(t["size"]), ns(t["time"]))
                   for m in _served(sim, "market_trades") for ev in m["events"]
                   for t in sorted(ev["trades"], key=lambda t: int(t["trade_id"]))]
    got_trades = list(trades.select("symbol", "trade_id", "side", "price", "amount",
                                    pl.col("ts_event").dt.epoch("ns")).iter_rows())
    assert got_trades == want_trades and len(got_trades) == 279

    quotes = read_table(root, "quotes")
    want_quotes = [(t["product_id"], float(t["best_bid"]), float(t["best_bid_quantity"]),
                    float(t["best_ask"]), float(t["best_ask_quantity"]), ns(m["timestamp"]))
                   for m in _served(sim, "ticker") for ev in m["events"]
                   for t in ev["tickers"]]
    assert list(quotes.select("symbol", "bid_price", "bid_amount", "ask_price", "ask_amount",
                              pl.col("ts_event").dt.epoch("ns")).iter_rows()) == want_quotes
    assert len(want_quotes) == 120

    book = read_table(root, "book")
    assert book_from_rows(book.select("symbol", "ts_event", "ts_recv", "recv_seq",
                                      "is_snapshot", "side", "price", "amount",
                                      "update_id").iter_rows()) == {
        "ETH-USD": reference_book()}
    snap = book.filter(pl.col("is_snapshot"))
    assert snap.height == 23_334 and snap["recv_seq"].n_unique() == 1

    ev = read_table(root, "events")
    names = ev["event"].to_list()
    assert names[0] == "connected" and names[-1] == "disconnected"
    assert sorted(ev.filter(pl.col("event") == "subscribed")
                  .select("symbol", "detail").iter_rows()) == sorted(
        (p, ch) for p in PRODUCTS for ch in ("market_trades", "ticker", "level2"))
    assert "gap" not in names and "resync" not in names


async def test_daemon_resyncs_the_book_after_a_lost_frame(root: Path) -> None:
    async with SimServer("coinbase", rate_msgs_s=4000, skip_seqs=[27]) as sim:
        feed = feed_for(sim, symbols=PRODUCTS, channels=ALL)
        caught_up = _caught_up(sim, feed["name"])
        # The re-subscription may reach the venue after it passed its last recorded frame.
        daemon = await run_daemon(make_config(root, [feed]), lambda d: caught_up(d) and bool(
            d.feed_stats[feed["name"]].resyncs))
    stats = daemon.feed_stats[feed["name"]]
    assert stats.gaps == 1 and stats.resyncs == 1 and sim.connections == 1
    ev = read_table(root, "events")
    gap = ev.filter(pl.col("event") == "gap")
    assert gap["detail"].to_list() == ["sequence_num: expected 27, received 28 "
                                       "(1 messages missing)"]
    resync = ev.filter(pl.col("event") == "resync")
    assert resync["symbol"].to_list() == ["ETH-USD"]
    assert resync["recv_seq"][0] > gap["recv_seq"][0]
    book = read_table(root, "book")
    assert book.filter(pl.col("is_snapshot"))["recv_seq"].n_unique() == 2
    assert book_from_rows(book.select("symbol", "ts_event", "ts_recv", "recv_seq",
                                      "is_snapshot", "side", "price", "amount",
                                      "update_id").iter_rows()) == {
        "ETH-USD": reference_book()}
    assert read_table(root, "trades").height == 279


async def test_daemon_records_a_refused_product(root: Path) -> None:
    async with SimServer("coinbase", rate_msgs_s=4000) as sim:
        feed = feed_for(sim, symbols=["BTC-USD", "XRP-USDX"], channels=["trades"])
        await run_daemon(make_config(root, [feed]), _caught_up(sim, feed["name"]))
    ev = read_table(root, "events")
    refused = ev.filter(pl.col("event") == "refused")
    assert refused["symbol"].to_list() == ["XRP-USDX"]
    assert refused["detail"].to_list() == [
        "Failed to subscribe: XRP-USDX is not a valid product"]
    assert ev.filter(pl.col("event") == "error").height == 1
    assert read_table(root, "trades").height == 0  # the whole subscription was refused
