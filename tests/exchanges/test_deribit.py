"""Deribit codec (exchanges/deribit.py) and simulated venue (sim/venues/deribit.py).

Golden values come from the recorded frames shipped in ingestd/sim/data/deribit (copied
byte for byte from the project's fixtures; see the README there). Frames built here
(liquidation flags, sequence changes, answers with our request ids, garbage) are derived
from those recordings and say so: no recorded trade carries a liquidation flag.
"""

from __future__ import annotations

import bisect
import json
import math
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
    DROP_UNSUBSCRIBED,
    DROP_UNSYNCED_BOOK,
    Output,
    StateError,
)
from ingestd.exchanges.deribit import (
    HEARTBEAT_INTERVAL_S,
    ID_STRIDE,
    M_SUBSCRIBE,
    M_TEST,
    M_UNSUBSCRIBE,
    Deribit,
)
from ingestd.schema import (
    EV_ERROR,
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
    mutate_json,
    read_table,
    rebuild_books,
    recorded_frames,
    run_daemon,
)

TS = 1_700_000_000_000_000_000
ALL = ("trades", "quotes", "book", "derivatives", "liquidations")
# The ten options of the 2021-04-05 capture (books and tickers).
OPTIONS = ("ETH-9APR21-1950-C", "ETH-6APR21-2400-P", "ETH-30APR21-2240-P",
           "ETH-16APR21-1600-C", "ETH-23APR21-2000-C", "ETH-16APR21-1400-P",
           "ETH-24SEP21-320-P", "BTC-30APR21-20000-C", "BTC-25MAR22-400000-C",
           "BTC-31DEC21-300000-P")
# The ten options of the 2021-07-22 capture (books only).
OPTIONS_07 = ("BTC-24SEP21-8000-P", "BTC-30JUL21-24000-P", "ETH-30JUL21-2800-C",
              "BTC-31DEC21-34000-P", "BTC-24SEP21-34000-P", "BTC-24JUN22-15000-C",
              "BTC-31DEC21-300000-C", "ETH-27AUG21-4000-P", "BTC-25MAR22-30000-C",
              "ETH-23JUL21-2300-C")
DEMO = tuple(cast(list[str], VENUES["deribit"].demo_feed["symbols"]))


def frames(name: str) -> tuple[bytes, ...]:
    return recorded_frames("deribit", name)


BOOK = frames("book_raw.jsonl")
BOOK_07 = frames("book_raw_2021_07.jsonl")
TICKER = frames("ticker.jsonl")
TRADES = frames("trades.jsonl")
PERP = frames("perpetual_100ms.jsonl")
BEATS = frames("heartbeat.jsonl")
SUBSCRIBE = frames("subscribe.jsonl")


def codec(symbols: tuple[str, ...] = DEMO, channels: tuple[str, ...] = ALL,
          interval: str | None = "raw", **keys: Any) -> Deribit:
    feed = FeedConfig(name="drb", exchange="deribit", symbols=symbols,
                      channels=channels, trade_stream=interval, **keys)  # type: ignore[arg-type]
    c = CODECS["deribit"](feed)
    assert isinstance(c, Deribit)
    return c


def events(out: Output) -> list[tuple[Any, ...]]:
    return out.rows("events")


def msg(frame: bytes) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(frame)
    return result


def data(frame: bytes) -> Any:
    return msg(frame)["params"]["data"]


def channel_frames(name: str, fs: tuple[bytes, ...] = BOOK) -> list[bytes]:
    return [f for f in fs if msg(f)["params"]["channel"] == name]


def derived(frame: bytes, change: Any) -> bytes:
    """A recorded frame with its `data` changed by `change` (derived, not recorded)."""
    m = msg(frame)
    change(m["params"]["data"])
    return orjson.dumps(m)


# ---- registration, connection, config ------------------------------------------------------
def test_registered_with_a_simulator_and_demo_feed() -> None:
    assert CODECS["deribit"] is Deribit
    assert VENUES["deribit"].exchange == "deribit"
    demo = VENUES["deribit"].demo_feed
    assert set(cast(list[str], demo["channels"])) == set(ALL)
    assert set(OPTIONS) <= set(DEMO)


def test_url_subscribe_and_heartbeat_requests() -> None:
    c = codec(("BTC-PERPETUAL",), interval=None)
    assert c.ws_url() == "wss://www.deribit.com/ws/api/v2"
    assert codec(url="ws://127.0.0.1:9").ws_url() == "ws://127.0.0.1:9/ws/api/v2"
    beat, sub = (orjson.loads(m) for m in c.subscribe_messages())
    assert beat == {"jsonrpc": "2.0", "id": 1 * ID_STRIDE + 1,
                    "method": "public/set_heartbeat", "params": {"interval": 15}}
    assert 10 <= HEARTBEAT_INTERVAL_S < c.default_stale_after_s / 2
    # The default interval is 100ms: the one Deribit serves without authorization.
    assert sub == {"jsonrpc": "2.0", "id": 2 * ID_STRIDE + M_SUBSCRIBE,
                   "method": "public/subscribe", "params": {"channels": [
                       "trades.BTC-PERPETUAL.100ms", "ticker.BTC-PERPETUAL.100ms",
                       "book.BTC-PERPETUAL.100ms"]}}
    assert c.keepalive_message() is None and c.keepalive_interval_s is None
    assert c.connect_limit == (10, 3.0)
    # Liquidations come from the trades channel; quotes and derivatives share the ticker.
    only = codec(("BTC-PERPETUAL",), ("liquidations", "derivatives"), interval="agg2")
    assert orjson.loads(only.subscribe_messages()[1])["params"]["channels"] == [
        "trades.BTC-PERPETUAL.agg2", "ticker.BTC-PERPETUAL.agg2"]


def _cfg(**feed: Any) -> dict[str, Any]:
    base = {"name": "d", "exchange": "deribit", "symbols": ["BTC-PERPETUAL"],
            "channels": list(ALL)}
    return {"storage": {"root": "/tmp/x"}, "feeds": [{**base, **feed}]}


def test_check_accepts_every_deribit_channel_and_rejects_what_it_does_not_offer() -> None:
    parse_config(_cfg(symbols=["BTC-PERPETUAL", "ETH-9APR21-1950-C", "BTC_USDC-PERPETUAL",
                               "XRP_USDC-30MAY25-2d2-C", "BTC-26MAR21"]))
    for interval in ("100ms", "raw", "agg2"):
        parse_config(_cfg(trade_stream=interval))
    with pytest.raises(ConfigError) as e:
        parse_config(_cfg(channels=["trades", "funding"]))
    assert any("funding" in p for p in e.value.problems)
    with pytest.raises(ConfigError) as e:
        parse_config(_cfg(symbols=["btc-perpetual", "BTC.PERPETUAL"], trade_stream="1s",
                          book_depth=10))
    problems = e.value.problems
    assert len(problems) == 4, problems
    assert any("'btc-perpetual'" in p for p in problems)
    assert any("'BTC.PERPETUAL'" in p for p in problems)
    assert any("trade_stream: '1s'" in p for p in problems)
    assert any("book_depth: not used by deribit" in p for p in problems)


# ---- trades ----------------------------------------------------------------------------------
def test_trades_golden() -> None:
    c = codec(("BTC-26MAR21", "BTC-PERPETUAL"), ("trades",))
    assert c.parse(TRADES[0], TS, 1).rows("trades") == [
        ("BTC-26MAR21", 1616321287195_000_000, TS, 1, "137486952", "buy", 56273.5, 6000.0)]
    assert c.parse(TRADES[1], TS, 2).rows("trades") == [
        ("BTC-PERPETUAL", 1616321478553_000_000, TS, 2, "137487241", "buy", 56168.0, 5580.0),
        ("BTC-PERPETUAL", 1616321478553_000_000, TS, 2, "137487242", "buy", 56168.0, 60.0)]
    c100 = codec(("BTC-PERPETUAL",), ("trades",), interval="100ms")
    out = c100.parse(TRADES[3], TS, 3)
    assert out.rows("trades") == [
        ("BTC-PERPETUAL", 1765531356452_000_000, TS, 3, "403691824", "sell", 92294.5, 10.0),
        ("BTC-PERPETUAL", 1765531356452_000_000, TS, 3, "403691825", "sell", 92288.5, 750.0)]
    assert out.events is None and out.liquidations is None


def test_trade_seq_dedupe_gap_and_out_of_order() -> None:
    c = codec(("BTC-PERPETUAL",), ("trades",), interval="100ms")
    assert len(c.parse(TRADES[3], TS, 1).rows("trades")) == 2
    # Two recorded frames six months apart: trade_seq jumps, a gap.
    jump = c.parse(TRADES[4], TS, 2)
    assert [r[4] for r in jump.rows("trades")] == ["433949015"]
    assert events(jump) == [("BTC-PERPETUAL", None, TS, 2, "drb", EV_GAP,
                             "trade id expected 271252856, got 291801232 "
                             "(20548376 missing)")]
    # A replay (resubscribe) is dropped and counted.
    again = c.parse(TRADES[3], TS, 3)
    assert not again.trades and again.drops == {DROP_DUPLICATE_TRADE: 2}
    # A never-seen sequence below the highest is stored with an event (derived frame).
    late = derived(TRADES[4], lambda d: d[0].update(trade_seq=291801230, trade_id="x-1"))
    out = c.parse(late, TS, 4)
    assert [r[4] for r in out.rows("trades")] == ["x-1"]
    assert [e[5] for e in events(out)] == [EV_OUT_OF_ORDER]
    assert c.trade_seqs.consecutive


def test_trade_side_is_the_takers_direction() -> None:
    """Finding: no recording holds trades and a best bid/ask of the same moment, so the
    taker-side convention (Deribit documents `direction` as the taker's) could not be
    checked against quotes: 0 trades checkable. The one multi-fill frame is consistent:
    two `sell` fills in one millisecond walk down the bids (92294.5, then 92288.5)."""
    quote_times: dict[str, list[int]] = {}
    for f in (*TICKER, *frames("quote.jsonl"), PERP[2]):
        d = data(f)
        quote_times.setdefault(d["instrument_name"], []).append(d["timestamp"])
    checkable = 0
    for f in TRADES:
        for t in data(f):
            ts = sorted(quote_times.get(t["instrument_name"], []))
            i = bisect.bisect_left(ts, t["timestamp"] - 1000)
            checkable += i < len(ts) and ts[i] <= t["timestamp"] + 1000
    assert checkable == 0
    sweep = data(TRADES[3])
    assert [t["direction"] for t in sweep] == ["sell", "sell"]
    assert sweep[0]["timestamp"] == sweep[1]["timestamp"]
    assert sweep[0]["price"] > sweep[1]["price"]
    rows = codec(("BTC-PERPETUAL",), ("trades",), interval="100ms").parse(
        TRADES[3], TS, 1).rows("trades")
    assert [r[5] for r in rows] == ["sell", "sell"]


def _liquidated(flags: list[str | None]) -> bytes:
    """The recorded 2025-12-12 BTC-PERPETUAL frame with `liquidation` flags (derived)."""
    def change(d: Any) -> None:
        for t, flag in zip(d, flags, strict=True):
            if flag is not None:
                t["liquidation"] = flag
    return derived(TRADES[3], change)


def test_liquidation_flags_are_liquidation_orders() -> None:
    """"T": the taker was liquidated (its direction); "M": the maker (the opposite);
    "MT": both. The recorded trades are sells, so a liquidated taker sold."""
    ts = 1765531356452_000_000
    c = codec(("BTC-PERPETUAL",), ("trades", "liquidations"), interval="100ms")
    out = c.parse(_liquidated(["T", "M"]), TS, 1)
    assert len(out.rows("trades")) == 2
    assert out.rows("liquidations") == [
        ("BTC-PERPETUAL", ts, TS, 1, "sell", 92294.5, 10.0, None),
        ("BTC-PERPETUAL", ts, TS, 1, "buy", 92288.5, 750.0, None)]
    c = codec(("BTC-PERPETUAL",), ("trades", "liquidations"), interval="100ms")
    out = c.parse(_liquidated(["MT", None]), TS, 2)
    assert out.rows("liquidations") == [
        ("BTC-PERPETUAL", ts, TS, 2, "sell", 92294.5, 10.0, None),
        ("BTC-PERPETUAL", ts, TS, 2, "buy", 92294.5, 10.0, None)]
    # A replayed trade writes neither the trade nor its liquidation again.
    again = c.parse(_liquidated(["MT", None]), TS, 3)
    assert not again.has_rows and again.drops == {DROP_DUPLICATE_TRADE: 2}
    # A flag of another value keeps the trade and is counted.
    c = codec(("BTC-PERPETUAL",), ("trades", "liquidations"), interval="100ms")
    odd = c.parse(_liquidated(["X", None]), TS, 4)
    assert len(odd.rows("trades")) == 2 and odd.liquidations is None
    assert odd.drops == {"unreadable_liquidation": 1}


def test_liquidations_channel_alone_writes_no_trades() -> None:
    c = codec(("BTC-PERPETUAL",), ("liquidations",), interval="100ms")
    out = c.parse(_liquidated(["T", None]), TS, 1)
    assert out.trades is None and len(out.rows("liquidations")) == 1
    # Trades without the channel: the flag is ignored.
    c = codec(("BTC-PERPETUAL",), ("trades",), interval="100ms")
    out = c.parse(_liquidated(["T", None]), TS, 1)
    assert len(out.rows("trades")) == 2 and out.liquidations is None


# ---- ticker: quotes and derivatives -----------------------------------------------------------
def test_ticker_golden_quotes_and_derivatives() -> None:
    c = codec(OPTIONS, ("quotes", "derivatives"))
    out = c.parse(TICKER[0], TS, 1)
    ts = 1617644856302_000_000
    assert out.rows("quotes") == [("ETH-9APR21-1950-C", ts, TS, 1, 0.0795, 4.0, 0.0945, 5.0)]
    assert out.rows("derivatives") == [
        ("ETH-9APR21-1950-C", ts, TS, 1, 0.084155, 2103.4, None, None, 3963.0, None)]
    # An option with no bids or asks (price and amount 0): empty sides are null.
    empty = c.parse(TICKER[1], TS, 2)
    assert empty.rows("quotes") == [("ETH-6APR21-2400-P", ts, TS, 2, None, None, None, None)]
    # The perpetual's ticker (100ms) carries current_funding and open interest (USD).
    p = codec(("BTC-PERPETUAL",), ("quotes", "derivatives"), interval="100ms")
    out = p.parse(PERP[2], TS, 3)
    ts = 1654161785818_000_000
    assert out.rows("quotes") == [("BTC-PERPETUAL", ts, TS, 3, 29930.5, 149910.0, 29931.0,
                                   62850.0)]
    assert out.rows("derivatives") == [
        ("BTC-PERPETUAL", ts, TS, 3, 29932.79, 29930.44, 0.0, None, 559791310.0, None)]


def test_quote_rows_only_when_the_best_bid_ask_changes() -> None:
    c = codec(OPTIONS, ("quotes", "derivatives"))
    out = c.parse_batch(TICKER, TS, 1)
    assert out.error is None and len(out.rows("derivatives")) == 150
    quotes = out.rows("quotes")
    assert len(quotes) == 51
    last: dict[str, tuple[Any, ...]] = {}
    for r in quotes:  # consecutive rows of an instrument always differ
        assert last.get(r[0]) != r[4:]
        last[r[0]] = r[4:]
    # Every change of the best bid/ask in the recording is a row.
    changes = 0
    seen: dict[str, tuple[Any, ...]] = {}
    for f in TICKER:
        d = data(f)
        q = tuple(v or None for v in (d["best_bid_price"], d["best_bid_amount"],
                                      d["best_ask_price"], d["best_ask_amount"]))
        if seen.get(d["instrument_name"]) != q:
            changes += 1
            seen[d["instrument_name"]] = q
    assert changes == 51


def test_derivatives_carry_forward_what_a_message_leaves_out() -> None:
    c = codec(("BTC-PERPETUAL",), ("derivatives",), interval="100ms")
    c.parse(PERP[2], TS, 1)
    lean = derived(PERP[2], lambda d: [d.pop(k) for k in ("open_interest",
                                                          "current_funding")])
    lean = derived(lean, lambda d: d.update(mark_price=29940.0))
    assert c.parse(lean, TS, 2).rows("derivatives") == [
        ("BTC-PERPETUAL", 1654161785818_000_000, TS, 2, 29940.0, 29930.44, 0.0, None,
         559791310.0, None)]


def reference_books(fs: tuple[bytes, ...] | list[bytes]) -> dict[str, dict[str, dict[float,
                                                                                     float]]]:
    """Deribit's documented procedure, independently: a snapshot replaces the book;
    `new` and `change` set a level's amount, `delete` removes it."""
    books: dict[str, dict[str, dict[float, float]]] = {}
    for f in fs:
        d = data(f)
        inst = d["instrument_name"]
        if d["type"] == "snapshot":
            books[inst] = {"bid": {}, "ask": {}}
        for key, side in (("bids", "bid"), ("asks", "ask")):
            for action, px, amt in d[key]:
                if action == "delete":
                    books[inst][side].pop(px, None)
                else:
                    books[inst][side][px] = amt
    return books


def test_ticker_best_bid_ask_equals_the_recorded_book() -> None:
    """Finding: all 150 recorded ticker best bid/asks equal the best levels of the book
    rebuilt (independently) from the same capture at the ticker's timestamp."""
    history: dict[str, list[tuple[int, Any, Any]]] = {}
    for i in range(len(BOOK)):
        d = data(BOOK[i])
        book = reference_books([f for f in BOOK[:i + 1]
                                if data(f)["instrument_name"] == d["instrument_name"]])
        b = book[d["instrument_name"]]
        history.setdefault(d["instrument_name"], []).append(
            (d["timestamp"], max(b["bid"], default=None), min(b["ask"], default=None)))
    rows = codec(OPTIONS, ("quotes",)).parse_batch(TICKER, TS, 1).rows("quotes")
    matched = 0
    for f in TICKER:
        d = data(f)
        h = history[d["instrument_name"]]
        k = bisect.bisect_right([x[0] for x in h], d["timestamp"]) - 1
        assert k >= 0
        assert (d["best_bid_price"] or None, d["best_ask_price"] or None) == h[k][1:]
        matched += 1
    assert matched == 150
    assert all(r[4] is None or r[6] is None or r[4] < r[6] for r in rows)


# ---- book ------------------------------------------------------------------------------------
def test_book_snapshot_and_change_golden() -> None:
    c = codec(OPTIONS, ("book",))
    snap = c.parse(BOOK[0], TS, 1)
    raw = data(BOOK[0])
    rows = snap.rows("book")
    assert len(rows) == len(raw["bids"]) + len(raw["asks"]) == 14
    assert all(r[3] == 1 and r[4] is True and r[8] == 8973366012 for r in rows)
    assert rows[0] == ("ETH-9APR21-1950-C", 1617644854288_000_000, TS, 1, True, "bid",
                       0.0795, 4.0, 8973366012)
    assert snap.events is None  # the first snapshot is a sync, not a resync
    for i, f in enumerate(BOOK[1:10], 2):
        c.parse(f, TS, i)
    out = c.parse(BOOK[10], TS, 11)
    ts = 1617644858339_000_000
    assert out.rows("book") == [
        ("ETH-30APR21-2240-P", ts, TS, 11, False, "bid", 0.0255, 0.0, 8973367846),
        ("ETH-30APR21-2240-P", ts, TS, 11, False, "bid", 0.026, 299.0, 8973367846)]
    assert out.events is None and out.replies is None and not out.drops


@pytest.mark.parametrize(("fs", "symbols"), [(BOOK, OPTIONS), (BOOK_07, OPTIONS_07)])
def test_book_rebuilt_from_rows_equals_the_reference_book(fs: tuple[bytes, ...],
                                                          symbols: tuple[str, ...]) -> None:
    c = codec(symbols, ("book",))
    rows: list[tuple[Any, ...]] = []
    emptied: list[str] = []
    for i, f in enumerate(fs):
        out = c.parse(f, TS, i)
        assert out.error is None and not out.drops
        emptied += [e[0] for e in out.rows("events") if e[5] == "empty_snapshot"]
        assert all(e[5] == "empty_snapshot" for e in out.rows("events"))
        rows += out.rows("book")
    expected = reference_books(fs)
    rebuilt = rebuild_books(rows)
    # A recorded empty snapshot (change_id 0, no levels) writes no book rows: an
    # `empty_snapshot` event says that the book of that instrument is empty.
    empty = {s for s, b in expected.items() if not b["bid"] and not b["ask"]}
    assert set(emptied) == empty
    assert {s: b for s, b in expected.items() if s not in empty} == rebuilt
    assert all(c.books.synced(s) for s in expected)


def test_prev_change_id_break_is_gap_resubscribe_resync() -> None:
    """The two recorded BTC-PERPETUAL 100ms book frames are not consecutive: a real break."""
    c = codec(("BTC-PERPETUAL",), ("book",), interval="100ms")
    assert len(c.parse(PERP[0], TS, 1).rows("book")) == 6
    brk = c.parse(PERP[1], TS, 2)
    assert not brk.book
    assert events(brk) == [("BTC-PERPETUAL", None, TS, 2, "drb", EV_GAP,
                            "expected prev_change_id=31479596557, received "
                            "prev_change_id=31479598064 change_id=31479598217")]
    unsub, sub = (orjson.loads(r) for r in brk.replies or [])
    assert unsub["method"] == "public/unsubscribe" and unsub["id"] % ID_STRIDE == M_UNSUBSCRIBE
    assert sub["method"] == "public/subscribe" and sub["id"] % ID_STRIDE == M_SUBSCRIBE
    assert unsub["params"] == sub["params"] == {"channels": ["book.BTC-PERPETUAL.100ms"]}
    assert brk.drops == {DROP_UNSYNCED_BOOK: 1}
    # Until the new snapshot, changes are dropped (counted), without asking again.
    late = c.parse(PERP[1], TS, 3)
    assert not late.book and late.drops == {DROP_UNSYNCED_BOOK: 1} and late.replies is None
    # The resubscription's ack (derived: our id, Deribit's result shape) is quiet for the
    # unsubscribe and `subscribed` for the subscribe.
    for req in (unsub, sub):
        ack = orjson.dumps({"jsonrpc": "2.0", "id": req["id"],
                            "result": req["params"]["channels"]})
        out = c.parse(ack, TS, 4)
        assert [e[5] for e in events(out)] == ([] if req is unsub else [EV_SUBSCRIBED])
    again = c.parse(PERP[0], TS, 5)
    assert len(again.rows("book")) == 6
    assert events(again) == [("BTC-PERPETUAL", None, TS, 5, "drb", EV_RESYNC,
                              "snapshot change_id=31479596557")]
    assert c.requests.pending == {}


def test_change_before_the_snapshot_is_dropped_without_resubscribing() -> None:
    c = codec(OPTIONS, ("book",))
    out = c.parse(BOOK[10], TS, 1)
    assert not out.book and out.drops == {DROP_UNSYNCED_BOOK: 1}
    assert out.events is None and out.replies is None


def test_reconnect_waits_for_the_snapshot_and_resyncs() -> None:
    c = codec(OPTIONS, ("book",))
    eth = channel_frames("book.ETH-30APR21-2240-P.raw")
    c.parse(eth[0], TS, 1)
    c.parse(eth[1], TS, 2)
    c.on_connect()
    assert c.parse(eth[2], TS, 3).drops == {DROP_UNSYNCED_BOOK: 1}
    out = c.parse(eth[0], TS, 4)
    assert [e[5] for e in events(out)] == [EV_RESYNC]


def test_book_actions() -> None:
    c = codec(OPTIONS, ("book",))
    c.parse(BOOK[0], TS, 1)
    ok = derived(BOOK[0], lambda d: d.update(
        type="change", prev_change_id=8973366012, change_id=8973366013,
        bids=[["change", 0.0795, 7.0], ["delete", 0.079, 0.0]], asks=[]))
    assert [r[6:8] for r in c.parse(ok, TS, 2).rows("book")] == [(0.0795, 7.0), (0.079, 0.0)]
    for bad in (
            derived(ok, lambda d: d.update(bids=[["move", 0.0795, 7.0]])),
            derived(ok, lambda d: d.update(bids=[["new", -1.0, 7.0]])),
            derived(ok, lambda d: d.update(bids=[["new", 0.1, 7.0, 1]])),
            derived(ok, lambda d: d.pop("prev_change_id")),
            derived(ok, lambda d: d.update(type="partial")),
            derived(ok, lambda d: d.update(instrument_name="ETH-6APR21-2400-P"))):
        out = c.parse(bad, TS, 3)
        assert out.error is not None and not out.has_rows
    # None of them touched the book: the next change still continues it.
    nxt = derived(ok, lambda d: d.update(prev_change_id=8973366013, change_id=8973366020))
    assert c.parse(nxt, TS, 4).events is None


# ---- control frames ------------------------------------------------------------------------
def test_heartbeats_test_requests_and_answers() -> None:
    c = codec()
    c.subscribe_messages()
    _, ok, beat, test_request, _, version, err = BEATS
    assert not c.parse(beat, TS, 1).has_rows
    out = c.parse(test_request, TS, 2)
    [reply] = out.replies or []
    answer = orjson.loads(reply)
    assert answer["method"] == "public/test" and answer["params"] == {}
    assert answer["id"] % ID_STRIDE == M_TEST
    for quiet in (ok, version, beat):
        out = c.parse(quiet, TS, 3)
        assert not out.has_rows and out.error is None and not out.unknown, quiet
        assert out.replies is None
    # The documented rate-limit error (Deribit then closes the session).
    out = c.parse(err, TS, 4)
    [ev] = events(out)
    assert ev[5] == EV_ERROR and ev[6].endswith("10028: too_many_requests")


def test_recorded_acks_and_refusals() -> None:
    c = codec(OPTIONS, ("trades", "quotes", "book"))
    # The recorded 2021-04-05 ack: one `subscribed` event per channel of ours.
    out = c.parse(SUBSCRIBE[3], TS, 1)
    evs = events(out)
    assert len(evs) == 30 and {e[5] for e in evs} == {EV_SUBSCRIBED}
    assert ("ETH-9APR21-1950-C", None, TS, 1, "drb", EV_SUBSCRIBED,
            "trades.ETH-9APR21-1950-C.raw") in evs
    # Our own subscribe answered without one channel (Deribit leaves out a channel it does
    # not subscribe, e.g. an unknown instrument): that one is refused (derived answer).
    _, sub = (orjson.loads(m) for m in c.subscribe_messages())
    asked = sub["params"]["channels"]
    out = c.parse(orjson.dumps({"jsonrpc": "2.0", "id": sub["id"], "result": asked[1:],
                                "usIn": 1, "usOut": 2, "usDiff": 1, "testnet": False}), TS, 2)
    refused = [e for e in events(out) if e[5] == EV_REFUSED]
    assert refused == [("ETH-9APR21-1950-C", None, TS, 2, "drb", EV_REFUSED,
                        f"{asked[0]}: not in Deribit's subscribe result (unknown "
                        "instrument or channel)")]
    # An error answering our subscribe refuses its channels (the recorded error shape,
    # derived: our id; 13778 is the code Deribit gives unauthorized .raw subscriptions).
    _, sub = (orjson.loads(m) for m in c.subscribe_messages())
    error = orjson.loads(BEATS[6])
    error["id"] = sub["id"]
    error["error"].update(code=13778, message="raw_subscriptions_not_available_for_"
                                              "unauthorized")
    out = c.parse(orjson.dumps(error), TS, 3)
    assert len(events(out)) == 30 and {e[5] for e in events(out)} == {EV_REFUSED}
    assert events(out)[0][6] == ("trades.ETH-9APR21-1950-C.raw: 13778: raw_subscriptions_"
                                 "not_available_for_unauthorized")
    # The client's own requests, echoed, are unknown messages.
    assert c.parse(SUBSCRIBE[0], TS, 4).unknown == 1


def test_channels_not_subscribed_are_dropped_and_unknown_ones_counted() -> None:
    c = codec(("BTC-PERPETUAL", "BTC-26MAR21-62000-C"), ("trades", "quotes", "book"))
    for f in (TRADES[2], TRADES[3], PERP[0], frames("quote.jsonl")[1], BOOK[0], TICKER[0]):
        out = c.parse(f, TS, 1)  # option.any, another interval, quote.*, other symbols
        assert not out.has_rows and out.drops == {DROP_UNSUBSCRIBED: 1}, f[:90]
        assert out.error is None
    # A channel this feed did subscribe carrying another instrument is a bad frame.
    wrong = orjson.loads(TRADES[1])
    wrong["params"]["channel"] = "trades.BTC-26MAR21-62000-C.raw"
    assert c.parse(orjson.dumps(wrong), TS, 2).error is not None
    for f in (b'{"jsonrpc":"2.0","method":"subscription","params":{"channel":'
              b'"deribit_price_index.btc_usd","data":{"price":1}}}',
              b'{"jsonrpc":"2.0","method":"private/buy"}', b'{"jsonrpc":"2.0"}',
              b'{"jsonrpc":"2.0","method":"heartbeat","params":{"type":"other"}}'):
        out = c.parse(f, TS, 3)
        assert out.unknown == 1 and out.error is None and not out.has_rows


def test_str_frames_and_other_key_orders_parse_like_recorded_bytes() -> None:
    c1, c2 = codec(OPTIONS), codec(OPTIONS)
    for f in BOOK[:20]:
        reordered = orjson.dumps({"params": msg(f)["params"], "method": "subscription",
                                  "jsonrpc": "2.0"})
        assert c1.parse(f.decode(), TS, 1).rows("book") == c2.parse(reordered, TS, 1).rows(
            "book")


@pytest.mark.parametrize("frame", [
    b"", b"{", b"\xff\xfe", b"[1,2]", b'"text"', b"null",
    b'{"jsonrpc":"2.0","method":"subscription","params":{"channel":"trades.BTC-PERPETUAL'
    b'.raw","data":[{"trade_seq":1}]}}',
    b'{"jsonrpc":"2.0","method":"subscription","params":{"channel":"trades.BTC-PERPETUAL'
    b'.raw","data":[{"trade_seq":1,"trade_id":"1","timestamp":1,"price":-1,"amount":1,'
    b'"direction":"buy","instrument_name":"BTC-PERPETUAL"}]}}',
    b'{"jsonrpc":"2.0","method":"subscription","params":{"channel":"trades.BTC-PERPETUAL'
    b'.raw","data":[{"trade_seq":1,"trade_id":"","timestamp":1,"price":1,"amount":1,'
    b'"direction":"buy","instrument_name":"BTC-PERPETUAL"}]}}',
    b'{"jsonrpc":"2.0","method":"subscription","params":{"channel":"ticker.BTC-PERPETUAL'
    b'.raw","data":{"timestamp":1,"instrument_name":"BTC-PERPETUAL","best_bid_price":1,'
    b'"best_bid_amount":-2}}}',
    b'{"jsonrpc":"2.0","method":"subscription","params":{"channel":"ticker.BTC-PERPETUAL'
    b'.raw","data":{"timestamp":1,"instrument_name":"BTC-PERPETUAL","mark_price":1e400}}}',
    b'{"jsonrpc":"2.0","method":"subscription","params":{"channel":"ticker.BTC-PERPETUAL'
    b'.raw","data":{"timestamp":-5,"instrument_name":"BTC-PERPETUAL"}}}',
    b'{"jsonrpc":"2.0","method":"heartbeat","params":{}}',
    b'{"jsonrpc":"2.0","id":18,"result":[1,2]}',
])
def test_malformed_frames_are_errors_not_exceptions(frame: bytes) -> None:
    out = codec().parse(frame, TS, 1)
    assert out.error is not None and not out.has_rows
    assert not out.error.startswith("codec_error"), out.error


def test_a_bad_frame_does_not_touch_state() -> None:
    c = codec(("BTC-PERPETUAL",), ("trades",), interval="100ms")
    bad = derived(TRADES[3], lambda d: d[1].update(price="x"))
    assert c.parse(bad, TS, 1).error is not None
    out = c.parse(TRADES[3], TS, 2)  # the first trade was not recorded as seen
    assert len(out.rows("trades")) == 2 and out.drops is None


def test_a_bad_frame_in_a_batch_keeps_its_neighbours() -> None:
    c = codec()
    eth = channel_frames("book.ETH-30APR21-2240-P.raw")
    bad_book = derived(eth[1], lambda d: d["bids"].append(["new", "abc", 1.0]))
    bad_ticker = derived(TICKER[0], lambda d: d.update(timestamp="soon"))
    batch = [TRADES[0], TRADES[1][:60], eth[0], bad_book, eth[1], bad_ticker, TICKER[0]]
    out = c.parse_batch(batch, TS, 100)
    assert [i for i, _ in out.rejects or []] == [1, 3, 5]
    assert [r[3] for r in out.rows("trades")] == [100]
    assert sorted({r[3] for r in out.rows("book")}) == [102, 104]
    assert [r[3] for r in out.rows("quotes")] == [106]
    assert [r[3] for r in out.rows("derivatives")] == [106]
    assert out.events is None and out.replies is None and not out.drops


# ---- explicit state ----------------------------------------------------------------------------
def _busy() -> Deribit:
    c = codec((*OPTIONS, "BTC-PERPETUAL"), interval="raw")
    c.subscribe_messages()
    c.parse_batch(BOOK[:100], TS, 1)
    c.parse_batch(TICKER[:80], TS, 200)
    c.parse(TRADES[1], TS, 300)
    return c


def test_state_round_trips_as_json_and_everything_continues() -> None:
    c = _busy()
    saved = orjson.dumps(c.state())
    r = codec((*OPTIONS, "BTC-PERPETUAL"), interval="raw")
    r.restore(orjson.loads(saved))
    assert orjson.dumps(r.state()) == saved
    # Books continue without a resync, exactly as the uninterrupted codec.
    rest_a, rest_b = r.parse_batch(BOOK[100:], TS, 400), c.parse_batch(BOOK[100:], TS, 400)
    assert rest_a.rows("book") == rest_b.rows("book") and rest_a.rows("book")
    assert rest_a.events is None and rest_a.replies is None and not rest_a.drops
    # Quotes and derivatives continue (last quote, carried values) the same way.
    t_a, t_b = r.parse_batch(TICKER[80:], TS, 600), c.parse_batch(TICKER[80:], TS, 600)
    assert t_a.rows("quotes") == t_b.rows("quotes")
    assert t_a.rows("derivatives") == t_b.rows("derivatives")
    # A replayed trade is dropped; request ids keep counting.
    assert r.parse(TRADES[1], TS, 700).drops == {DROP_DUPLICATE_TRADE: 2}
    assert r.requests.seq == c.requests.seq == 2


def _state() -> dict[str, Any]:
    return cast(dict[str, Any], orjson.loads(orjson.dumps(_busy().state())))


def _set(path: list[str], value: Any) -> Any:
    def spoil(s: dict[str, Any]) -> dict[str, Any]:
        node = s
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return s
    return spoil


@pytest.mark.parametrize("spoil", [
    lambda s: None,
    lambda s: [],
    lambda s: {**s, "v": s["v"] + 1},
    lambda s: {**s, "exchange": "okx"},
    lambda s: {"v": s["v"], "exchange": "deribit"},
    _set(["parts", "books"], "garbage"),
    _set(["parts", "books", "ETH-9APR21-1950-C", "status"], 9),
    _set(["parts", "books", "ETH-9APR21-1950-C", "last_id"], "x"),
    _set(["parts", "trades", "ints", "BTC-PERPETUAL"], [[9, 1], [10, 2]]),
    _set(["parts", "quotes", "ETH-9APR21-1950-C"], [1.0, "x", None, None]),
    _set(["parts", "quotes"], [1]),
    _set(["parts", "derivs", "ETH-9APR21-1950-C"], [1.0]),
    _set(["parts", "derivs"], "x"),
    _set(["parts", "requests", "seq"], -1),
    _set(["parts", "requests", "pending"], [[1, [2]]]),
    _set(["parts", "requests"], []),
])
def test_restore_refuses_garbage_and_other_versions(spoil: Any) -> None:
    codec((*OPTIONS, "BTC-PERPETUAL")).restore(_state())  # unspoiled: fine
    with pytest.raises(StateError):
        codec((*OPTIONS, "BTC-PERPETUAL")).restore(spoil(_state()))


# ---- properties --------------------------------------------------------------------------------
def _valid(table: str, r: tuple[Any, ...]) -> bool:
    def num(v: Any, lo: float, strict: bool = False) -> bool:
        return isinstance(v, float) and math.isfinite(v) and (v > lo if strict else v >= lo)

    if len(r) != ROW_WIDTH[table] or type(r[2]) is not int or type(r[3]) is not int:
        return False
    if r[1] is not None and not (type(r[1]) is int and 0 <= r[1] < 2**63):
        return False
    if table == "trades":
        return (type(r[0]) is str and type(r[4]) is str and r[5] in ("buy", "sell", "unknown")
                and num(r[6], 0, True) and num(r[7], 0))
    if table == "quotes":
        return all((px is None) == (sz is None) and (px is None or (num(px, 0, True)
                                                                    and num(sz, 0)))
                   for px, sz in ((r[4], r[5]), (r[6], r[7])))
    if table == "book":
        return (type(r[4]) is bool and r[5] in ("bid", "ask") and num(r[6], 0, True)
                and num(r[7], 0) and type(r[8]) is int)
    if table == "derivatives":
        return all(v is None or (isinstance(v, float) and math.isfinite(v)) for v in r[4:9]) \
            and r[9] is None
    if table == "liquidations":
        return r[4] in ("buy", "sell") and num(r[5], 0, True) and num(r[6], 0) and r[7] is None
    return type(r[4]) is str and type(r[5]) is str and (r[6] is None or type(r[6]) is str)


def _check(out: Output) -> None:
    assert not (out.error or "").startswith("codec_error"), out.error
    for table in ("trades", "quotes", "book", "events", "derivatives", "liquidations"):
        for r in out.rows(table):
            assert _valid(table, r), (table, r)
    if out.error is not None:
        assert not out.has_rows and out.replies is None


ALL_FRAMES = [*BOOK[:40], *TICKER[:10], *TRADES, *PERP, *BEATS, *SUBSCRIBE,
              *frames("quote.jsonl"), _liquidated(["MT", "T"])]
PROP_SYMS = (*OPTIONS, "BTC-PERPETUAL", "BTC-26MAR21")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blob=st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(blob: bytes) -> None:
    _check(codec(PROP_SYMS).parse(blob, TS, 1))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(idx=st.integers(0, len(ALL_FRAMES) - 1),
       path=st.lists(st.integers(0, 400), min_size=1, max_size=6),
       value=st.one_of(st.just(...), st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                       st.floats(allow_nan=True), st.text(max_size=8),
                       st.sampled_from(["new", "change", "delete", "snapshot", "T", "M",
                                        "MT", "buy", "sell", "test_request",
                                        "BTC-PERPETUAL", "book.BTC-PERPETUAL.raw"]),
                       st.lists(st.floats(), max_size=3),
                       st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)),
       interval=st.sampled_from(["raw", "100ms"]))
def test_mutated_real_frames_never_raise_or_emit_bad_rows(idx: int, path: list[int],
                                                          value: Any, interval: str) -> None:
    c = codec(PROP_SYMS, interval=interval)
    c.parse_batch([f for f in BOOK if b'"snapshot"' in f[:150]], TS, 0)  # synced books
    c.parse(PERP[0], TS, 0)
    mutated = json.dumps(mutate_json(orjson.loads(ALL_FRAMES[idx]), path, value)).encode()
    for seq in (1, 2):  # twice: the state the first left must not break the second
        _check(c.parse(mutated, TS, seq))


ETH_9APR = channel_frames("book.ETH-9APR21-1950-C.raw")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lost=st.sets(st.integers(1, len(ETH_9APR) - 1), max_size=5),
       repeated=st.sets(st.integers(1, len(ETH_9APR) - 1), max_size=3))
def test_any_lost_or_repeated_change_is_detected_and_healed(lost: set[int],
                                                            repeated: set[int]) -> None:
    """Lose or repeat changes at random, then the venue serves the channel again from its
    snapshot (as it does on the resubscribe): every loss is a gap, the book ends exact."""
    c = codec(OPTIONS, ("book",))
    served = [f for i, f in enumerate(ETH_9APR) if i not in lost]
    for i in sorted(repeated - lost):
        served.insert(served.index(ETH_9APR[i]) + 1, ETH_9APR[i])
    rows: list[tuple[Any, ...]] = []
    gaps = 0
    for seq, f in enumerate([*served, *ETH_9APR], 1):
        out = c.parse(f, TS, seq)
        _check(out)
        assert out.error is None
        rows += out.rows("book")
        gaps += sum(e[5] == EV_GAP for e in events(out))
    # A loss shows when a later change arrives; a repeat shows at once.
    detectable = any(j not in lost for i in lost for j in range(i + 1, len(ETH_9APR))) \
        or bool(repeated - lost)
    assert (gaps > 0) == detectable
    assert rebuild_books(rows) == reference_books(ETH_9APR)


# ---- the simulator and the daemon ---------------------------------------------------------------
async def _drain(ws: Any) -> None:
    while True:
        await ws.recv()


async def test_simulated_venue_speaks_json_rpc_and_heartbeats() -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    async with SimServer("deribit", heartbeat_interval_s=0.2) as sim, \
            connect(sim.url + "/ws/api/v2") as ws:
        await ws.send('{"jsonrpc":"2.0","id":1,"method":"public/set_heartbeat",'
                      '"params":{"interval":5}}')
        err = orjson.loads(await ws.recv())
        assert err["id"] == 1 and err["error"]["code"] == -32602
        await ws.send('{"jsonrpc":"2.0","id":2,"method":"public/subscribe","params":'
                      '{"channels":["trades.BTC-PERPETUAL.raw","book.NOPE-1.raw"]}}')
        ack = orjson.loads(await ws.recv())
        assert ack["id"] == 2 and ack["result"] == ["trades.BTC-PERPETUAL.raw"]
        assert await ws.recv(decode=False) == TRADES[1]  # byte for byte
        await ws.send('{"jsonrpc":"2.0","id":3,"method":"public/set_heartbeat",'
                      '"params":{"interval":10}}')
        assert orjson.loads(await ws.recv())["result"] == "ok"
        assert await ws.recv(decode=False) == BEATS[2]
        assert await ws.recv(decode=False) == BEATS[3]   # test_request
        await ws.send('{"jsonrpc":"2.0","id":4,"method":"public/test","params":{}}')
        assert orjson.loads(await ws.recv())["result"] == {"version": "1.2.26"}
        assert await ws.recv(decode=False) == BEATS[2]
        assert await ws.recv(decode=False) == BEATS[3]
        # Not answered: Deribit closes the connection.
        with pytest.raises(ConnectionClosed):
            await _drain(ws)


async def test_daemon_lands_exactly_what_the_venue_served(root: Path) -> None:
    async with SimServer("deribit", rate_msgs_s=3000, heartbeat_interval_s=0.2) as sim:
        feed = feed_for(sim, **VENUES["deribit"].demo_feed)
        cfg = make_config(root, [feed])
        n_data = len(BOOK) + len(TICKER) + 2  # + BTC-PERPETUAL's and BTC-26MAR21's trades

        def done(d: Any) -> bool:
            st_ = d.feed_stats.get(feed["name"])
            return (st_ is not None and len(sim.sent) == n_data
                    and st_.messages >= n_data + 2
                    and any(r.get("method") == "public/test"
                            for r in sim.venue.requests))  # type: ignore[attr-defined]

        daemon = await run_daemon(cfg, done, timeout_s=20, settle_s=0.5)
    st_ = daemon.feed_stats[feed["name"]]
    assert st_.parse_errors == {} and st_.gaps == 0 and st_.resyncs == 0
    assert st_.reconnects == 0 and st_.unknown_messages == 0 and not st_.drops
    trades = read_table(root, "trades")
    assert sorted(trades.select("symbol", "trade_id", "side", "price", "amount",
                                pl.col("ts_event").dt.epoch("ns")).iter_rows()) == [
        ("BTC-26MAR21", "137486952", "buy", 56273.5, 6000.0, 1616321287195_000_000),
        ("BTC-PERPETUAL", "137487241", "buy", 56168.0, 5580.0, 1616321478553_000_000),
        ("BTC-PERPETUAL", "137487242", "buy", 56168.0, 60.0, 1616321478553_000_000)]
    assert read_table(root, "quotes").height == 51
    deriv = read_table(root, "derivatives")
    # Options carry no funding (every row lands: see the derivatives-only test below).
    assert 0 < deriv.height <= 150 and deriv["funding_rate"].null_count() == deriv.height
    book = read_table(root, "book")
    rows = list(book.select("symbol", pl.col("ts_event").dt.epoch("ns"), "ts_recv",
                            "recv_seq", "is_snapshot", "side", "price", "amount",
                            "update_id").iter_rows())
    expected = reference_books(BOOK)
    assert rebuild_books(rows) == {s: b for s, b in expected.items() if b["bid"] or b["ask"]}
    assert read_table(root, "liquidations").is_empty()
    ev = read_table(root, "events")
    assert ev.filter(pl.col("event") == EV_SUBSCRIBED).height == len(DEMO) * 3
    assert set(ev["event"]) == {"connected", EV_SUBSCRIBED, "disconnected", "empty_snapshot"}
    # Every instrument whose recorded snapshot is empty has its event (readers see the reset).
    empty = {s for s, b in expected.items() if not b["bid"] and not b["ask"]}
    assert set(ev.filter(pl.col("event") == "empty_snapshot")["symbol"]) == empty


def served_again(sent: list[bytes], stream: list[bytes]) -> bool:
    """The stream's snapshot was served twice, and the whole stream after the second."""
    if sent.count(stream[0]) < 2:
        return False
    second = len(sent) - 1 - sent[::-1].index(stream[0])
    return stream[-1] in sent[second:]


async def test_daemon_heals_a_real_break_by_resubscribing(root: Path) -> None:
    async with SimServer("deribit", rate_msgs_s=3000, skip_book_change=5) as sim:
        feed = feed_for(sim, symbols=list(OPTIONS), channels=["book"], trade_stream="raw")
        cfg = make_config(root, [feed])
        broken = [c for c in sorted({msg(f)["params"]["channel"] for f in BOOK})
                  if len(channel_frames(c)) > 6]

        def done(d: Any) -> bool:
            sent = [s.frame for s in sim.sent]
            st_ = d.feed_stats.get(feed["name"])
            return (st_ is not None and all(served_again(sent, channel_frames(c))
                                            for c in broken)
                    # every request of ours answered and read
                    and st_.messages >= len(sent) + len(
                        sim.venue.requests))  # type: ignore[attr-defined]

        daemon = await run_daemon(cfg, done, timeout_s=20, settle_s=0.3)
    st_ = daemon.feed_stats[feed["name"]]
    assert len(broken) == 4
    assert st_.gaps == 4 and st_.resyncs == 4 and st_.parse_errors == {}
    assert st_.drops["book_not_synced"] >= 4
    reqs = sim.venue.requests  # type: ignore[attr-defined]
    resubscribed = [r["params"]["channels"] for r in reqs
                    if r["method"] == "public/unsubscribe"]
    assert sorted(c for chans in resubscribed for c in chans) == broken
    ev = read_table(root, "events").filter(pl.col("event").is_in([EV_GAP, EV_RESYNC]))
    assert ev.filter(pl.col("event") == EV_GAP)["detail"].str.starts_with(
        "expected prev_change_id=").all()
    assert sorted(ev.filter(pl.col("event") == EV_RESYNC)["symbol"]) == sorted(
        c.split(".")[1] for c in broken)
    book = read_table(root, "book")
    rows = list(book.select("symbol", pl.col("ts_event").dt.epoch("ns"), "ts_recv",
                            "recv_seq", "is_snapshot", "side", "price", "amount",
                            "update_id").iter_rows())
    expected = reference_books(BOOK)
    assert rebuild_books(rows) == {s: b for s, b in expected.items() if b["bid"] or b["ask"]}


async def test_daemon_lands_every_derivatives_and_liquidations_row(root: Path) -> None:
    async with SimServer("deribit", rate_msgs_s=3000) as sim:
        feed = feed_for(sim, symbols=list(OPTIONS), channels=["derivatives"],
                        trade_stream="raw")
        cfg = make_config(root, [feed])

        def done(d: Any) -> bool:
            st_ = d.feed_stats.get(feed["name"])
            return (st_ is not None and len(sim.sent) == len(TICKER)
                    and st_.messages >= len(TICKER) + 2)

        await run_daemon(cfg, done, timeout_s=20, settle_s=0.3)
    deriv = read_table(root, "derivatives")
    expected = codec(OPTIONS, ("derivatives",)).parse_batch(
        [s.frame for s in sim.sent], TS, 1).rows("derivatives")
    assert deriv.height == len(expected) == 150

