"""Bitstamp codec (exchanges/bitstamp.py) and simulated venue (sim/venues/bitstamp.py).

Golden values come from the recorded frames shipped in ingestd/sim/data/bitstamp (copied
byte for byte from the project's fixtures). Frames built here (a same-microsecond diff,
an older quote, control frames the recording lacks, garbage) are derived from those
recordings or from Bitstamp's documented shapes, and say so.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from decimal import Decimal
from typing import Any, cast

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingestd.checks import parse_config as check_config
from ingestd.config import ConfigError, FeedConfig
from ingestd.exchanges import CODECS
from ingestd.exchanges.base import (
    DROP_DUPLICATE_TRADE,
    DROP_STALE_BOOK,
    DROP_UNSUBSCRIBED,
    Output,
    RestRequest,
    StateError,
)
from ingestd.exchanges.bitstamp import (
    DROP_STALE_QUOTE,
    DROP_UNCHANGED_QUOTE,
    EV_RECONNECT_REQUESTED,
    Bitstamp,
)
from ingestd.schema import (
    EV_ERROR,
    EV_OUT_OF_ORDER,
    EV_REFUSED,
    EV_RESYNC,
    EV_SNAPSHOT_FAILED,
    EV_SUBSCRIBED,
    ROW_WIDTH,
)
from ingestd.sim import Faults, SimServer
from ingestd.sim.venues import VENUES
from ingestd.sim.venues.bitstamp import BitstampVenue
from tests.support import (
    feed_for,
    make_config,
    read_table,
    rebuild_books,
    recorded_frames,
    run_daemon,
)

TS = 1_700_000_000_000_000_000
# The recording's pairs, in the order of its REST snapshot URLs (fixture README).
SNAPSHOT_PAIRS = ("sgbeur", "ethusd", "xrpeur", "bateur", "usdteur", "usdtusd", "xlmgbp",
                  "adaeur", "batbtc", "galaeur")
BOOK_PAIRS = SNAPSHOT_PAIRS[1:]  # sgbeur has no diff in the recording
TRADE_PAIRS = ("ethusd", "linketh", "xrpbtc", "xlmeur", "ethgbp", "bcheur", "btcusdc")
BOOK_AND_TRADE_PAIRS = tuple(dict.fromkeys(BOOK_PAIRS + TRADE_PAIRS))
ALL_PAIRS: tuple[str, ...] = tuple(cast(list[str], VENUES["bitstamp"].demo_feed["symbols"]))

D = Decimal
Side = dict[Decimal, Decimal]


def frames(name: str) -> tuple[bytes, ...]:
    return recorded_frames("bitstamp", name)


def codec(symbols: tuple[str, ...] = ALL_PAIRS,
          channels: tuple[str, ...] = ("trades", "quotes", "book"), **keys: Any) -> Bitstamp:
    feed = FeedConfig(name="bitstamp-t", exchange="bitstamp", symbols=symbols,
                      channels=channels, **keys)  # type: ignore[arg-type]
    c = CODECS["bitstamp"](feed)
    assert isinstance(c, Bitstamp)
    return c


def events(out: Output) -> list[tuple[Any, ...]]:
    return out.rows("events")


def data(frame: bytes) -> dict[str, Any]:
    return cast(dict[str, Any], orjson.loads(frame)["data"])


def pair_of(frame: bytes) -> str:
    return str(orjson.loads(frame)["channel"]).rsplit("_", 1)[1]


def diffs_of(pair: str) -> list[bytes]:
    return [f for f in frames("diff_order_book.jsonl") if pair_of(f) == pair]


def snapshot_of(pair: str) -> bytes:
    return dict(zip(SNAPSHOT_PAIRS, frames("order_book_snapshot_rest.jsonl"),
                    strict=True))[pair]


def mts(obj: bytes | dict[str, Any]) -> int:
    d = obj if isinstance(obj, dict) else orjson.loads(obj)
    d = d.get("data", d)
    return int(d["microtimestamp"])


def request(pair: str) -> RestRequest:
    return RestRequest(pair, f"https://www.bitstamp.net/api/v2/order_book/{pair}/")


# ---- the documented procedure, written independently (Decimal, no shared code) ----------------
def reference_book(pair: str, until_us: int | None = None) -> tuple[Side, Side]:
    """Bitstamp's procedure: the REST snapshot, then every diff with a microtimestamp
    after the snapshot's (before `until_us` if given), in order; amount 0 deletes."""
    snap = orjson.loads(snapshot_of(pair))
    bids = {D(p): D(q) for p, q in snap["bids"]}
    asks = {D(p): D(q) for p, q in snap["asks"]}
    x = int(snap["microtimestamp"])
    for f in diffs_of(pair):
        d = data(f)
        t = int(d["microtimestamp"])
        if t <= x or (until_us is not None and t >= until_us):
            continue
        for side, levels in ((bids, d["bids"]), (asks, d["asks"])):
            for p, q in levels:
                if D(q) == 0:
                    side.pop(D(p), None)
                else:
                    side[D(p)] = D(q)
    return bids, asks


def reference_books(pairs: tuple[str, ...] = BOOK_PAIRS
                    ) -> dict[str, dict[str, dict[float, float]]]:
    out = {}
    for pair in pairs:
        bids, asks = reference_book(pair)
        out[pair] = {"bid": {float(p): float(q) for p, q in bids.items()},
                     "ask": {float(p): float(q) for p, q in asks.items()}}
    return out


# ---- connection ------------------------------------------------------------------------------
def test_subscribe_keepalive_urls() -> None:
    c = codec(BOOK_PAIRS, ("trades", "book"))
    assert c.ws_url() == "wss://ws.bitstamp.net"
    # Byte for byte the requests the recording sent (diff_order_book first, then trades).
    recorded = [f.decode() for f in frames("subscribe.jsonl")
                if f.startswith(b'{"event":"bts:subscribe"')]
    mine = list(c.subscribe_messages())
    assert mine == [r for r in recorded if "sgbeur" not in r]
    assert len(mine) == 18
    q = codec(("btcusd",), ("quotes",))
    assert list(q.subscribe_messages()) == [
        '{"event":"bts:subscribe","data":{"channel":"order_book_btcusd"}}']
    assert c.keepalive_message() == '{"event":"bts:heartbeat"}'
    assert c.keepalive_interval_s is not None and c.keepalive_interval_s < c.default_stale_after_s
    assert c.ws_ping_interval_s is None
    assert c.default_rotate_after_s is not None and c.default_rotate_after_s < 90 * 86_400
    local = codec(("btcusd",), ("book",), url="ws://127.0.0.1:9", rest_url="http://h:1")
    assert local.ws_url() == "ws://127.0.0.1:9"
    assert local.books.snapshot_url is not None
    assert local.books.snapshot_url("btcusd") == "http://h:1/api/v2/order_book/btcusd/"
    assert Bitstamp.CHANNELS == ("trades", "quotes", "book")


def test_check_accepts_the_offered_channels_and_rejects_others() -> None:
    feed = {"name": "b", "exchange": "bitstamp", "symbols": ["btcusd", "btcusd-perp"],
            "channels": ["trades", "quotes", "book"]}
    check_config({"storage": {"root": "/tmp/x"}, "feeds": [feed]})
    for extra in ("derivatives", "liquidations"):
        with pytest.raises(ConfigError) as e:
            check_config({"storage": {"root": "/tmp/x"},
                          "feeds": [{**feed, "channels": ["trades", extra]}]})
        (problem,) = e.value.problems
        assert "channels" in problem and extra in problem and "bitstamp" in problem
    with pytest.raises(ConfigError) as e:
        check_config({"storage": {"root": "/tmp/x"}, "feeds": [
            {**feed, "symbols": ["BTCUSD", "btc/usd"], "book_depth": 100,
             "trade_stream": "x"}]})
    problems = e.value.problems
    assert sum("'BTCUSD'" in p or "'btc/usd'" in p for p in problems) == 2
    assert any("book_depth" in p for p in problems)
    assert any("trade_stream" in p for p in problems)


# ---- trades ----------------------------------------------------------------------------------
def test_trades_golden() -> None:
    c = codec(TRADE_PAIRS, ("trades",))
    rows = []
    for i, f in enumerate(frames("live_trades.jsonl")):
        out = c.parse(f, TS + i, 10 + i)
        assert out.error is None and not out.drops and out.events is None
        rows += out.rows("trades")
    assert len(rows) == 42
    for i, (row, f) in enumerate(zip(rows, frames("live_trades.jsonl"), strict=True)):
        d = data(f)
        assert row == (pair_of(f), int(d["microtimestamp"]) * 1000, TS + i, 10 + i,
                       str(d["id"]), "buy" if d["type"] == 0 else "sell",
                       float(d["price_str"]), float(d["amount_str"]))
    # Spelled out: the first frame (2022, compact) and one of the 2021 capture (spaces,
    # `channel` first, price as a float in exponent form next to its exact text).
    assert rows[0] == ("ethusd", 1641343699596000_000, TS, 10, "216000477", "buy",
                       3805.44, 0.0792)
    assert rows[-1] == ("xrpbtc", 1617654470128000_000, TS + 41, 51, "161009988", "buy",
                        0.0000144, 53763.70097532)


def test_trade_side_is_the_takers_side() -> None:
    """Finding: `type` 0 is a buy taker, 1 a sell taker. The taker is the newer order (its
    id is the higher one) in 42/42 recorded trades; against the book rebuilt from the
    same capture, the buy prints at the ask and the sells at or below the bid."""
    ids = {"buy": [0, 0], "sell": [0, 0]}
    for f in frames("live_trades.jsonl"):
        d = data(f)
        side = "buy" if d["type"] == 0 else "sell"
        taker_newer = (d["buy_order_id"] > d["sell_order_id"]) == (side == "buy")
        ids[side][0 if taker_newer else 1] += 1
    assert ids == {"buy": [13, 0], "sell": [29, 0]}
    last_diff = mts(diffs_of("ethusd")[-1])
    at_book = {"buy": 0, "sell": 0}
    inside_diffs = 0
    for f in frames("live_trades.jsonl"):
        if pair_of(f) != "ethusd":
            continue
        d = data(f)
        t = int(d["microtimestamp"])
        bids, asks = reference_book("ethusd", until_us=t)
        px = D(d["price_str"])
        if d["type"] == 0:
            assert px >= min(asks)
            at_book["buy"] += 1
        else:
            assert px <= max(bids)
            at_book["sell"] += 1
        inside_diffs += t <= last_diff
    assert at_book == {"buy": 1, "sell": 9} and inside_diffs == 1
    c = codec(("ethusd",), ("trades",))
    assert [r[5] for r in c.parse_batch(frames("live_trades.jsonl")[:2], TS, 1)
            .rows("trades")] == ["buy", "sell"]


def test_trade_ids_are_venue_wide_so_jumps_are_not_gaps() -> None:
    """Finding: ids increase across all pairs (one counter), so each pair's ids jump."""
    ids = [data(f)["id"] for f in frames("live_trades.jsonl")[10:]]  # the 2021 capture
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert not codec().trade_ids.consecutive
    c = codec(TRADE_PAIRS, ("trades",))
    out = c.parse_batch(frames("live_trades.jsonl"), TS, 1)
    assert out.events is None and len(out.rows("trades")) == 42


def test_duplicate_and_out_of_order_trades() -> None:
    c = codec(("ethusd",), ("trades",))
    eth = [f for f in frames("live_trades.jsonl") if pair_of(f) == "ethusd"]
    assert c.parse(eth[0], TS, 1).rows("trades")
    assert c.parse(eth[2], TS, 2).rows("trades")
    late = c.parse(eth[1], TS, 3)  # never seen, below the highest seen
    assert [r[4] for r in late.rows("trades")] == ["216000484"]
    assert [e[5] for e in events(late)] == [EV_OUT_OF_ORDER]
    again = c.parse_batch(eth[:3], TS, 4)
    assert not again.trades and again.drops == {DROP_DUPLICATE_TRADE: 3}
    assert again.events is None


def test_trade_type_other_than_0_or_1_is_unknown_side() -> None:
    m = orjson.loads(frames("live_trades.jsonl")[0])
    m["data"]["type"] = 2  # derived: a type Bitstamp does not document
    out = codec(("ethusd",), ("trades",)).parse(orjson.dumps(m), TS, 1)
    assert [r[5] for r in out.rows("trades")] == ["unknown"]


def test_trade_without_text_falls_back_to_the_float_fields() -> None:
    m = orjson.loads(frames("live_trades.jsonl")[0])
    del m["data"]["price_str"], m["data"]["amount_str"]  # derived
    out = codec(("ethusd",), ("trades",)).parse(orjson.dumps(m), TS, 1)
    assert [r[6:] for r in out.rows("trades")] == [(3805.44, 0.0792)]
    del m["data"]["price"]
    bad = codec(("ethusd",), ("trades",)).parse(orjson.dumps(m), TS, 1)
    assert bad.error is not None and not bad.has_rows


# ---- quotes ----------------------------------------------------------------------------------
def test_quotes_golden_and_deduplicated() -> None:
    c = codec(("btcusd",), ("quotes",))
    top = frames("order_book_top100.jsonl")[0]
    out = c.parse(top, TS, 1)
    assert out.rows("quotes") == [("btcusd", 1653978373164007_000, TS, 1, 31524.5, 0.364,
                                   31535.44, 0.31708837)]
    m = orjson.loads(top)
    # Derived: a later push changing only the second bid level -> nothing to write.
    deeper = json.loads(json.dumps(m))
    deeper["data"]["microtimestamp"] = str(mts(top) + 5)
    deeper["data"]["bids"][1][1] = "1.00000000"
    same = c.parse(orjson.dumps(deeper), TS, 2)
    assert not same.has_rows and same.drops == {DROP_UNCHANGED_QUOTE: 1}
    # Derived: a later push with a new best ask -> a row.
    better = json.loads(json.dumps(deeper))
    better["data"]["microtimestamp"] = str(mts(top) + 9)
    better["data"]["asks"][0] = ["31530.00", "0.5"]
    assert c.parse(orjson.dumps(better), TS, 3).rows("quotes") == [
        ("btcusd", (mts(top) + 9) * 1000, TS, 3, 31524.5, 0.364, 31530.0, 0.5)]
    # The recorded push again (older microtimestamp: a rotation overlap) -> dropped.
    stale = c.parse(top, TS, 4)
    assert not stale.has_rows and stale.drops == {DROP_STALE_QUOTE: 1}
    # A new connection writes its first quote whatever it is.
    c.on_connect()
    assert c.parse(top, TS, 5).rows("quotes")


def test_quote_with_an_empty_side_is_null() -> None:
    m = orjson.loads(frames("order_book_top100.jsonl")[0])
    m["data"]["asks"] = []  # derived
    out = codec(("btcusd",), ("quotes",)).parse(orjson.dumps(m), TS, 1)
    assert [r[4:] for r in out.rows("quotes")] == [(31524.5, 0.364, None, None)]


# ---- book --------------------------------------------------------------------------------
def test_snapshot_holds_exactly_the_diffs_up_to_its_microtimestamp() -> None:
    """Finding behind BitstampRules: every level last set by a diff with microtimestamp
    <= the snapshot's equals the snapshot (214/214); no level first touched by a later
    diff repeats the snapshot's value (0/219)."""
    held = [0, 0]
    repeated = [0, 0]
    for pair in BOOK_PAIRS:
        snap = orjson.loads(snapshot_of(pair))
        book = {"bids": {D(p): D(q) for p, q in snap["bids"]},
                "asks": {D(p): D(q) for p, q in snap["asks"]}}
        x = int(snap["microtimestamp"])
        last: dict[tuple[str, Decimal], Decimal] = {}
        first: dict[tuple[str, Decimal], Decimal] = {}
        for f in diffs_of(pair):
            d = data(f)
            target = last if int(d["microtimestamp"]) <= x else first
            for side in ("bids", "asks"):
                for p, q in d[side]:
                    if target is last or (side, D(p)) not in first:
                        target[(side, D(p))] = D(q)
        held[0] += sum(book[s].get(p, D(0)) == q for (s, p), q in last.items())
        held[1] += len(last)
        repeated[0] += sum(book[s].get(p, D(0)) == q for (s, p), q in first.items())
        repeated[1] += len(first)
    assert held == [214, 214] and repeated == [0, 219]


def drive_book(c: Bitstamp, answer_after: int | None, diff_frames: list[bytes] | None = None
               ) -> tuple[list[tuple[Any, ...]], Output]:
    """Feed the recorded diffs in order; answer each snapshot request after `answer_after`
    more frames (None: only after the last one). Returns the book rows and every output
    merged (events, drops)."""
    pending: list[tuple[int, RestRequest]] = []
    rows: list[tuple[Any, ...]] = []
    merged = Output()
    seq = 0

    def take(out: Output) -> None:
        nonlocal seq
        assert out.error is None, out.error
        rows.extend(out.rows("book"))
        merged.absorb(out)
        for reason, n in (out.drops or {}).items():
            merged.drop(reason, n)
        seq = max(seq, out.last_seq)
        for r in out.requests or []:
            pending.append((seq + (answer_after if answer_after is not None else 10**9), r))

    for f in diff_frames if diff_frames is not None else frames("diff_order_book.jsonl"):
        seq += 1
        take(c.parse(f, TS + seq, seq))
        for due, req in list(pending):
            if seq >= due:
                pending.remove((due, req))
                seq += 1
                take(c.on_rest(req, 200, snapshot_of(req.key), TS + seq, seq))
    for _, req in pending:
        seq += 1
        take(c.on_rest(req, 200, snapshot_of(req.key), TS + seq, seq))
    return rows, merged


@pytest.mark.parametrize("answer_after", [0, 1, 5, 40, None])
def test_book_rebuilds_to_the_documented_procedure(answer_after: int | None) -> None:
    c = codec(BOOK_PAIRS, ("book",))
    rows, merged = drive_book(c, answer_after)
    assert all(len(r) == ROW_WIDTH["book"] for r in rows)
    assert rebuild_books(rows) == reference_books()
    assert {r[8] for r in rows} == {None}  # no venue update id
    assert merged.events is None  # a first sync: no resync, no gap
    for pair in BOOK_PAIRS:
        snap_rows = [r for r in rows if r[0] == pair and r[4]]
        assert len({r[3] for r in snap_rows}) == 1  # one block, one recv_seq
        assert {r[1] for r in snap_rows} == {mts(snapshot_of(pair)) * 1000}


def test_snapshot_block_then_buffered_diffs_with_their_own_seqs() -> None:
    c = codec(("ethusd",), ("book",))
    diffs = diffs_of("ethusd")
    x = mts(snapshot_of("ethusd"))
    older = [f for f in diffs if mts(f) <= x]
    assert len(older) == 12
    first = c.parse(diffs[0], TS, 1)
    assert not first.book and first.requests == [request("ethusd")]
    n = 20  # 12 diffs the snapshot holds, then 8 newer ones, all buffered
    for i, f in enumerate(diffs[1:n], start=2):
        out = c.parse(f, TS + i, i)
        assert not out.has_rows and not out.requests
    done = c.on_rest(first.requests[0], 200, snapshot_of("ethusd"), TS + 100, 100)
    book = done.rows("book")
    snap = [r for r in book if r[4]]
    assert {r[3] for r in snap} == {100} and len(snap) == 2023 + 1971
    assert done.drops == {DROP_STALE_BOOK: 12}
    deltas = [r for r in book if not r[4]]
    assert sorted({r[3] for r in deltas}) == list(range(101, 109)) and done.last_seq == 108
    assert sorted({r[2] for r in deltas}) == [TS + i for i in range(13, 21)]  # own ts_recv
    assert sorted({r[1] for r in deltas}) == sorted(mts(f) * 1000 for f in diffs[12:20])
    assert done.events is None
    # Then diffs apply as they come.
    assert c.parse(diffs[n], TS, 200).rows("book")


def test_snapshot_older_than_the_first_buffered_diff_is_fetched_again() -> None:
    c = codec(("ethusd",), ("book",))
    diffs = diffs_of("ethusd")
    late = [f for f in diffs if mts(f) > mts(snapshot_of("ethusd"))]
    req = c.parse(late[0], TS, 1).requests
    assert req
    out = c.on_rest(req[0], 200, snapshot_of("ethusd"), TS, 2)
    assert not out.book and out.requests == [
        RestRequest("ethusd", request("ethusd").url, 0.5)]
    assert c.books.awaiting("ethusd")


@pytest.mark.parametrize(("status", "body"), [
    (503, b"busy"), (0, b"connection refused"), (200, b"<html>"),
    (200, b'{"status": "error", "reason": "Invalid currency pair."}'),
    (200, b'{"timestamp": "1", "microtimestamp": "x1", "bids": [], "asks": []}'),
    (200, b'{"timestamp": "1", "microtimestamp": "1", "bids": [["-1", "1"]], "asks": []}'),
])
def test_failed_snapshot_is_an_event_and_a_retry(status: int, body: bytes) -> None:
    c = codec(("ethusd",), ("book",))
    req = c.parse(diffs_of("ethusd")[0], TS, 1).requests
    assert req
    out = c.on_rest(req[0], status, body, TS, 2)
    assert [e[5] for e in events(out)] == [EV_SNAPSHOT_FAILED]
    assert out.requests and not out.book
    # A good answer still syncs the book.
    good = c.on_rest(out.requests[0], 200, snapshot_of("ethusd"), TS, 3)
    assert good.book and c.books.synced("ethusd")


def test_reconnect_resyncs_the_book_with_a_new_snapshot() -> None:
    """The discontinuity Bitstamp lets a client see - a lost connection - resyncs: the
    book is reset, the new connection's first diff fetches a snapshot, whose block is
    followed by a `resync` event."""
    c = codec(("ethusd",), ("book",))
    diffs = diffs_of("ethusd")
    req = c.parse(diffs[0], TS, 1).requests
    assert req
    assert c.on_rest(req[0], 200, snapshot_of("ethusd"), TS, 2).book
    c.on_connect()
    out = c.parse(diffs[1], TS, 3)
    assert not out.book and out.requests == [request("ethusd")]
    again = c.on_rest(out.requests[0], 200, snapshot_of("ethusd"), TS, 4)
    assert [e[5] for e in events(again)] == [EV_RESYNC]
    assert events(again)[0][6] == f"snapshot microtimestamp={mts(snapshot_of('ethusd'))}"
    # A late answer for the old connection's request is ignored once synced.
    assert not c.on_rest(req[0], 200, snapshot_of("ethusd"), TS, 5).has_rows


def test_rotation_keeps_the_book_and_drops_the_overlap() -> None:
    c = codec(BOOK_PAIRS, ("book",))
    rows, _ = drive_book(c, 0)
    c.on_rotate()
    # The new connection delivers everything again (the simulator replays from the start).
    replay = c.parse_batch(frames("diff_order_book.jsonl"), TS, 10_000)
    assert not replay.requests and replay.events is None
    # Only the last diff of each pair (same microtimestamp) is applied again: harmless.
    again = replay.rows("book")
    assert {r[1] for r in again} == {mts(diffs_of(p)[-1]) * 1000 for p in BOOK_PAIRS}
    assert replay.drops == {DROP_STALE_BOOK: 300 - len(BOOK_PAIRS)}
    assert rebuild_books(rows + again) == reference_books()


def test_a_diff_of_the_same_microsecond_is_applied() -> None:
    c = codec(("ethusd",), ("book",))
    diffs = diffs_of("ethusd")
    drive_book(c, 0, diffs)
    d = orjson.loads(diffs[-1])
    d["data"]["bids"] = [["3000.00", "1.5"]]  # derived: another change in that microsecond
    d["data"]["asks"] = []
    out = c.parse(orjson.dumps(d), TS, 500)
    assert [r[5:8] for r in out.rows("book")] == [("bid", 3000.0, 1.5)]
    older = orjson.loads(diffs[-2])
    stale = c.parse(orjson.dumps(older), TS, 501)
    assert not stale.has_rows and stale.drops == {DROP_STALE_BOOK: 1}


# ---- control frames and bad input ----------------------------------------------------------
def test_acks_heartbeat_errors_reconnect_and_unknown() -> None:
    c = codec(("ethusd", "sgbeur"), ("book",))
    acks = [f for f in frames("subscribe.jsonl") if b"subscription_succeeded" in f]
    assert len(acks) == 20
    ours = c.parse(acks[1], TS, 1)  # diff_order_book_ethusd
    assert events(ours) == [("ethusd", None, TS, 1, "bitstamp-t", EV_SUBSCRIBED,
                             "diff_order_book_ethusd")]
    other = c.parse(acks[-1], TS, 2)  # live_trades_galaeur: not ours
    assert events(other) == [(None, None, TS, 2, "bitstamp-t", EV_SUBSCRIBED,
                              "live_trades_galaeur")]
    # Derived from Bitstamp's documented shapes (no recording of these exists).
    hb = c.parse(b'{"event":"bts:heartbeat","channel":"","data":{"status":"success"}}', TS, 3)
    assert not hb.has_rows and not hb.unknown and hb.error is None
    unsub = c.parse(b'{"event":"bts:unsubscription_succeeded","channel":'
                    b'"diff_order_book_ethusd","data":{}}', TS, 4)
    assert not unsub.has_rows and not unsub.unknown
    rr = c.parse(b'{"event":"bts:request_reconnect","channel":"","data":""}', TS, 5)
    assert rr.reconnect == "bts:request_reconnect"
    assert [e[5] for e in events(rr)] == [EV_RECONNECT_REQUESTED]
    for data_ in (b'{}', b'null'):
        assert c.parse(b'{"event":"bts:request_reconnect","channel":"","data":' + data_ + b'}',
                       TS, 6).reconnect
    err = c.parse(b'{"event":"bts:error","channel":"","data":{"code":null,'
                  b'"message":"Incorrect JSON format."}}', TS, 7)
    assert [e[5:] for e in events(err)] == [(EV_ERROR, "None: Incorrect JSON format.")]
    refused = c.parse(b'{"event":"bts:error","channel":"diff_order_book_sgbeur","data":'
                      b'{"code":null,"message":"Invalid channel provided."}}', TS, 8)
    assert [e[0] for e in events(refused)] == ["sgbeur"]
    assert events(refused)[0][5] == EV_REFUSED
    for unknown in (b'{"data":{"id":1},"channel":"live_orders_btcusd","event":"order_created"}',
                    b'{"data":{},"channel":"detail_order_book_btcusd","event":"data"}',
                    b'{"event":"bts:something_new","channel":"","data":{}}'):
        out = c.parse(unknown, TS, 9)
        assert out.unknown == 1 and out.error is None and not out.has_rows


def test_unsubscribed_pairs_and_channels_are_dropped() -> None:
    c = codec(("ethusd",), ("trades",))
    for f in (diffs_of("bateur")[0], diffs_of("ethusd")[0], frames("order_book_top100.jsonl")[0],
              frames("live_trades.jsonl")[-1]):
        out = c.parse(f, TS, 1)
        assert not out.has_rows and out.drops == {DROP_UNSUBSCRIBED: 1} and not out.requests


@pytest.mark.parametrize("frame", [
    b"", b"not json", b"\x00\xff", b"[1,2]", b'{"channel":"x"}', b'{"event":5}',
    b'{"event":"trade","channel":"live_trades_ethusd"}',
    b'{"event":"trade","channel":"live_trades_ethusd","data":{"id":1,"type":0,'
    b'"microtimestamp":"1","price_str":"abc","amount_str":"1"}}',
    b'{"event":"trade","channel":"live_trades_ethusd","data":{"id":1,"type":0,'
    b'"microtimestamp":"1","price_str":"-1","amount_str":"1"}}',
    b'{"event":"trade","channel":"live_trades_ethusd","data":{"id":-1,"type":0,'
    b'"microtimestamp":"1","price_str":"1","amount_str":"1"}}',
    b'{"event":"trade","channel":"live_trades_ethusd","data":{"id":1,"type":0,'
    b'"microtimestamp":"+1","price_str":"1","amount_str":"1"}}',
    b'{"event":"data","channel":"diff_order_book_ethusd","data":{"microtimestamp":"1",'
    b'"bids":[["1"]],"asks":[]}}',
    b'{"event":"data","channel":"diff_order_book_ethusd","data":{"microtimestamp":"1",'
    b'"bids":[["nan","1"]],"asks":[]}}',
    b'{"event":"data","channel":"order_book_ethusd","data":{"microtimestamp":"1",'
    b'"bids":[["0","1"]],"asks":[]}}',
    b'{"event":"bts:error","channel":"","data":[1]}',
])
def test_malformed_frames_are_errors_not_exceptions(frame: bytes) -> None:
    c = codec(("ethusd",))
    out = c.parse(frame, TS, 1)
    assert out.error is not None and not out.has_rows and not out.requests
    assert not out.error.startswith("codec_error"), out.error


def test_a_bad_frame_in_a_batch_keeps_its_neighbours() -> None:
    c = codec(("btcusd", *BOOK_AND_TRADE_PAIRS))
    t = frames("live_trades.jsonl")
    bad_trade = orjson.loads(t[2])
    bad_trade["data"]["price_str"] = "abc"  # derived
    batch = [t[0], t[1], orjson.dumps(bad_trade), t[3], t[4][:40], t[5],
             frames("order_book_top100.jsonl")[0]]
    out = c.parse_batch(batch, TS, 100)
    assert [i for i, _ in out.rejects or []] == [2, 4]
    assert [r[3] for r in out.rows("trades")] == [100, 101, 103, 105]
    assert [r[3] for r in out.rows("quotes")] == [106]
    # The bad trade's id was not recorded: the good frame with that id is stored later.
    assert c.parse(t[2], TS, 200).rows("trades")


# ---- explicit state --------------------------------------------------------------------------
def busy_codec() -> Bitstamp:
    c = codec(("btcusd", *BOOK_AND_TRADE_PAIRS))
    drive_book(c, 3)
    c.parse_batch(frames("live_trades.jsonl")[:20], TS, 1000)
    c.parse(frames("order_book_top100.jsonl")[0], TS, 1100)
    return c


def test_state_json_round_trip_continues_without_resync() -> None:
    c = busy_codec()
    saved = orjson.dumps(c.state())
    r = codec(("btcusd", *BOOK_AND_TRADE_PAIRS))
    r.restore(orjson.loads(saved))
    assert orjson.dumps(r.state()) == saved
    replay = r.parse_batch(frames("live_trades.jsonl")[:20], TS, 2000)
    assert not replay.trades and replay.drops == {DROP_DUPLICATE_TRADE: 20}
    rest = r.parse_batch(frames("live_trades.jsonl")[20:], TS, 2100)
    assert len(rest.rows("trades")) == 22 and rest.events is None
    q = r.parse(frames("order_book_top100.jsonl")[0], TS, 2200)
    assert not q.has_rows and q.drops == {DROP_UNCHANGED_QUOTE: 1}
    # Books continue: a later diff (derived: the last one, one µs later) applies at once.
    d = orjson.loads(diffs_of("ethusd")[-1])
    d["data"]["microtimestamp"] = str(mts(d) + 1)
    nxt = r.parse(orjson.dumps(d), TS, 2300)
    assert nxt.rows("book") == c.parse(orjson.dumps(d), TS, 2300).rows("book")
    assert nxt.rows("book") and not nxt.requests and nxt.events is None


def test_state_keeps_a_pending_snapshot_and_its_buffer() -> None:
    c = codec(("ethusd",), ("book",))
    diffs = diffs_of("ethusd")
    req = c.parse_batch(diffs[:15], TS, 1).requests
    assert req
    r = codec(("ethusd",), ("book",))
    r.restore(orjson.loads(orjson.dumps(c.state())))
    done = r.on_rest(req[0], 200, snapshot_of("ethusd"), TS, 100)
    assert done.drops == {DROP_STALE_BOOK: 12} and done.last_seq == 103


def _spoiled(change: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
    def spoil(state: dict[str, Any]) -> dict[str, Any]:
        change(state)
        return state
    return spoil


@pytest.mark.parametrize("spoil", [
    lambda s: None,
    lambda s: [],
    lambda s: "state",
    lambda s: {**s, "v": s["v"] + 1},
    lambda s: {**s, "exchange": "okx"},
    lambda s: {"v": s["v"], "exchange": "bitstamp"},
    _spoiled(lambda s: s["parts"].update(books="garbage")),
    _spoiled(lambda s: s["parts"]["books"]["ethusd"].update(status=9)),
    _spoiled(lambda s: s["parts"]["books"]["ethusd"].update(last_id="x")),
    _spoiled(lambda s: s["parts"]["books"]["ethusd"].update(buffer=[[1, 2]])),
    _spoiled(lambda s: s["parts"]["trades"]["ints"].update(ethusd=[[9, 1], [10, 2]])),
    _spoiled(lambda s: s["parts"].update(quotes=[1])),
    _spoiled(lambda s: s["parts"]["quotes"].update(btcusd=[1, 2.0])),
    _spoiled(lambda s: s["parts"]["quotes"].update(btcusd=["1", 1.0, 1.0, 2.0, 1.0])),
    _spoiled(lambda s: s["parts"]["quotes"].update(btcusd=[1, "1", 1.0, 2.0, 1.0])),
])
def test_restore_rejects_garbage_and_other_versions(spoil: Any) -> None:
    state = cast(dict[str, Any], orjson.loads(orjson.dumps(busy_codec().state())))
    codec().restore(json.loads(json.dumps(state)))  # unspoiled: fine
    with pytest.raises(StateError):
        codec().restore(spoil(state))


# ---- property tests on mutated real frames ------------------------------------------------
ALL_FRAMES = [f for name in ("live_trades.jsonl", "diff_order_book.jsonl",
                             "order_book_top100.jsonl", "subscribe.jsonl")
              for f in frames(name)]

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True), st.text(max_size=12),
    st.sampled_from(["0", "-1", "1e400", "nan", "inf", "", "data", "trade", "bts:error",
                     "bts:request_reconnect", "0.00000000", "1641343695681418",
                     "99999999999999999999999", "1_0", "live_trades_ethusd"]))
json_value = st.recursive(json_leaf, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)),
    max_leaves=10)


def _check_rows(out: Output) -> None:
    assert not (out.error or "").startswith("codec_error"), out.error  # a bug, not bad input
    for table in ("trades", "quotes", "book", "events"):
        for r in out.rows(table):
            assert len(r) == ROW_WIDTH[table]
            assert r[0] is None or isinstance(r[0], str)
            assert r[1] is None or (isinstance(r[1], int) and 0 <= r[1] < 2**63)
            assert isinstance(r[2], int) and isinstance(r[3], int)
            if table == "trades":
                assert isinstance(r[4], str) and r[5] in ("buy", "sell", "unknown")
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
                assert r[8] is None
            else:
                assert isinstance(r[4], str) and isinstance(r[5], str)
                assert r[6] is None or isinstance(r[6], str)
    for req in out.requests or ():
        assert req.url.endswith(f"/api/v2/order_book/{req.key}/")


def _mutate(value: Any, data_: st.DataObject) -> Any:
    """Replace one randomly chosen node of a decoded frame with an arbitrary JSON value."""
    if isinstance(value, dict) and value and data_.draw(st.booleans()):
        key = data_.draw(st.sampled_from(sorted(value)))
        return {**value, key: _mutate(value[key], data_)}
    if isinstance(value, list) and value and data_.draw(st.booleans()):
        i = data_.draw(st.integers(0, len(value) - 1))
        return [*value[:i], _mutate(value[i], data_), *value[i + 1:]]
    return data_.draw(json_value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(frame: bytes) -> None:
    _check_rows(codec().parse(frame, TS, 1))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_real_frames_never_raise_or_emit_bad_rows(data_: st.DataObject) -> None:
    c = codec(("btcusd", *BOOK_AND_TRADE_PAIRS))
    for pair in BOOK_PAIRS[:3]:  # synced books, so mutated diffs reach the apply path
        req = c.parse(diffs_of(pair)[0], TS, 0).requests
        assert req
        c.on_rest(req[0], 200, snapshot_of(pair), TS, 0)
    frame = data_.draw(st.sampled_from(ALL_FRAMES))
    if data_.draw(st.booleans()):
        # json, not orjson: it also writes integers beyond 64 bits and Infinity.
        mutated = json.dumps(_mutate(orjson.loads(frame), data_)).encode()
    else:
        i = data_.draw(st.integers(0, len(frame)))
        mutated = frame[:i] + data_.draw(st.binary(max_size=8)) + frame[i + data_.draw(
            st.integers(0, 8)):]
    for seq in (1, 2):  # twice: the state left by the first must not break the second
        _check_rows(c.parse(mutated, TS, seq))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_snapshots_are_failed_snapshots_or_books(data_: st.DataObject) -> None:
    c = codec(("ethusd",), ("book",))
    req = c.parse(diffs_of("ethusd")[0], TS, 0).requests
    assert req
    body = orjson.loads(snapshot_of("ethusd"))
    body["bids"], body["asks"] = body["bids"][:3], body["asks"][:3]  # small, still real
    mutated = json.dumps(_mutate(body, data_)).encode()
    out = c.on_rest(req[0], 200, mutated, TS, 1)
    _check_rows(out)
    assert out.book is not None or out.requests


# ---- simulator and daemon end to end ---------------------------------------------------------
def test_venue_is_registered_with_demo_feed() -> None:
    assert VENUES["bitstamp"] is BitstampVenue
    feed = VENUES["bitstamp"].demo_feed
    assert set(BOOK_PAIRS) | set(TRADE_PAIRS) | {"btcusd"} == set(cast(list[str],
                                                                   feed["symbols"]))
    assert CODECS["bitstamp"] is Bitstamp


async def test_simulated_venue_protocol() -> None:
    """Talk to the simulator directly: recorded ack, heartbeat, error, frames, REST."""
    import urllib.request

    from websockets.asyncio.client import connect

    async with SimServer("bitstamp") as server, connect(server.url) as ws:
        await ws.send('{"event":"bts:heartbeat"}')
        assert orjson.loads(await ws.recv()) == {
            "event": "bts:heartbeat", "channel": "", "data": {"status": "success"}}
        await ws.send("nonsense")
        assert orjson.loads(await ws.recv())["event"] == "bts:error"
        await ws.send('{"event":"bts:subscribe","data":{"channel":"live_trades_ethusd"}}')
        ack = await ws.recv(decode=False)
        assert ack in frames("subscribe.jsonl")
        got = [await ws.recv(decode=False) for _ in range(10)]
        assert got == [f for f in frames("live_trades.jsonl") if pair_of(f) == "ethusd"]
        await ws.send('{"event":"bts:subscribe","data":{"channel":"live_trades_nopenope"}}')
        assert orjson.loads(await ws.recv()) == {
            "event": "bts:subscription_succeeded", "channel": "live_trades_nopenope",
            "data": {}}
        await ws.send('{"event":"bts:unsubscribe","data":{"channel":"live_trades_ethusd"}}')
        assert orjson.loads(await ws.recv())["event"] == "bts:unsubscription_succeeded"

        def get(path: str) -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(server.rest_url + path, timeout=5) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as e:
                return e.code, b""

        import asyncio
        assert await asyncio.to_thread(get, "/api/v2/order_book/ethusd/") == (
            200, snapshot_of("ethusd"))
        assert await asyncio.to_thread(get, "/api/v2/order_book/galaeur") == (
            200, snapshot_of("galaeur"))
        assert (await asyncio.to_thread(get, "/api/v2/order_book/nope/"))[0] == 404


def expected_rows(frames_: list[bytes], symbols: tuple[str, ...]
                  ) -> dict[str, list[tuple[Any, ...]]]:
    """Trade and quote rows the codec decodes from frames, without ts_recv/recv_seq."""
    c = codec(symbols)
    got: dict[str, list[tuple[Any, ...]]] = {"trades": [], "quotes": []}
    for f in frames_:
        out = c.parse(f, TS, 0)
        for table in got:
            got[table] += [r[:2] + r[4:] for r in out.rows(table)]
    return got


def table_rows(df: Any, table: str) -> list[tuple[Any, ...]]:
    if df.is_empty():
        return []
    import polars as pl
    df = df.with_columns(pl.col("ts_event").cast(pl.Int64))
    cols = {"trades": ["trade_id", "side", "price", "amount"],
            "quotes": ["bid_price", "bid_amount", "ask_price", "ask_amount"]}[table]
    return [tuple(r) for r in df.select(["symbol", "ts_event", *cols]).iter_rows()]


def book_rows(root: Any) -> list[tuple[Any, ...]]:
    book = read_table(root, "book")
    return [(r[0], None, 0, r[1], *r[2:]) for r in book.select(
        ["symbol", "recv_seq", "is_snapshot", "side", "price", "amount", "update_id"]
    ).iter_rows()]


N_DATA = 300 + 42 + 1  # diffs, trades, the order_book_btcusd push


async def test_daemon_end_to_end_parquet_equals_served_frames(root: Any) -> None:
    async with SimServer("bitstamp") as server:
        feed = feed_for(server, symbols=list(ALL_PAIRS), channels=["trades", "quotes", "book"])
        cfg = make_config(root, [feed])
        n_acks = 3 * len(ALL_PAIRS)
        daemon = await run_daemon(
            cfg, lambda d: len(server.sent) == N_DATA and
            d.feed_stats["bitstamp-test"].messages >= N_DATA + n_acks, timeout_s=20,
            settle_s=0.5)
        rest = list(server.rest_requests)
    st_ = daemon.feed_stats["bitstamp-test"]
    assert not st_.parse_errors and st_.unknown_messages == 0
    assert st_.gaps == 0 and st_.resyncs == 0 and st_.reconnects == 0
    assert sorted(rest) == sorted(f"/api/v2/order_book/{p}/" for p in BOOK_PAIRS)
    served = [s.frame for s in server.sent]
    assert sorted(served) == sorted([*frames("diff_order_book.jsonl"),
                                     *frames("live_trades.jsonl"),
                                     *frames("order_book_top100.jsonl")])
    expected = expected_rows(served, ALL_PAIRS)
    assert len(expected["trades"]) == 42 and len(expected["quotes"]) == 1
    for table in ("trades", "quotes"):
        assert table_rows(read_table(root, table), table) == expected[table], table
    assert rebuild_books(book_rows(root)) == reference_books()
    ev = read_table(root, "events")
    assert ev.filter(ev["event"] == EV_SUBSCRIBED).height == n_acks
    assert set(ev["exchange"]) == {"bitstamp"}


async def test_daemon_disconnect_resyncs_books_from_new_snapshots(root: Any) -> None:
    """A connection lost mid-stream (the simulator closes the first one after 150 data
    frames): the daemon reconnects, every book is rebuilt from a fresh snapshot with a
    `resync` event, replayed trades are not stored twice, and the table rebuilds the
    venue's book."""
    faults = Faults(close_every_n_frames=150, only_first_n=1)
    # Paced (40 frames/s per channel), so the first connection lives long enough for
    # its snapshots to arrive.
    async with SimServer("bitstamp", faults=faults, rate_msgs_s=40) as server:
        feed = feed_for(server, symbols=list(BOOK_AND_TRADE_PAIRS),
                        channels=["trades", "book"], reconnect_min_delay_s=0.05)
        cfg = make_config(root, [feed])

        def done(d: Any) -> bool:
            by = server.sent_by_conn()
            return (len(by.get(2, [])) == 342 and
                    d.feed_stats["bitstamp-test"].messages >= 150 + 342)

        daemon = await run_daemon(cfg, done, timeout_s=30, settle_s=0.5)
        rest = list(server.rest_requests)
    st_ = daemon.feed_stats["bitstamp-test"]
    assert st_.reconnects == 1 and not st_.parse_errors
    first = server.sent_by_conn()[1]
    with_diffs = {pair_of(f) for f in first if b"diff_order_book" in f}
    ev = read_table(root, "events")
    assert [d for d in ev.filter(ev["event"] == "disconnected")["detail"]
            if d.startswith("closed by venue")] == ["closed by venue: 1001 simulated restart"]
    resynced = set(ev.filter(ev["event"] == EV_RESYNC)["symbol"])
    # A book synced on the first connection is resynced (a snapshot answer still in
    # flight at the disconnect may sync the second connection's book instead: it is
    # newer than the second connection's first diff).
    assert resynced and resynced <= with_diffs and st_.resyncs == len(resynced)
    # One snapshot per book on the second connection, after those of the first.
    assert len(rest) >= len(BOOK_PAIRS) + len(resynced)
    trades = read_table(root, "trades")
    assert trades.height == 42 and trades["trade_id"].n_unique() == 42
    assert st_.drops[DROP_DUPLICATE_TRADE] == sum(b"live_trades" in f for f in first)
    assert rebuild_books(book_rows(root)) == reference_books()
    blocks: dict[str, set[int]] = {}
    for sym, _te, _tr, seq, is_snap, *_ in book_rows(root):
        if is_snap:
            blocks.setdefault(sym, set()).add(seq)
    assert {s: len(b) for s, b in blocks.items()} == {
        p: 2 if p in resynced else 1 for p in BOOK_PAIRS}


async def test_daemon_request_reconnect_rotates_without_loss_or_duplicates(root: Any) -> None:
    """`bts:request_reconnect`: the daemon opens a second connection before the first is
    closed, keeps its books and ids across the switch, and the overlap (the simulator
    serves everything again) is dropped by microtimestamp and trade id: no resync, no
    duplicate, the same book."""
    async with SimServer("bitstamp", reconnect_after_frames=200,
                         reconnect_grace_s=0.5) as server:
        feed = feed_for(server, symbols=[*BOOK_AND_TRADE_PAIRS, "btcusd"],
                        channels=["trades", "quotes", "book"])
        cfg = make_config(root, [feed])

        def done(d: Any) -> bool:
            by = server.sent_by_conn()
            return (len(by.get(1, [])) == N_DATA and len(by.get(2, [])) == N_DATA and
                    d.feed_stats["bitstamp-test"].messages >= 2 * N_DATA)

        daemon = await run_daemon(cfg, done, timeout_s=20, settle_s=0.5)
        rest = list(server.rest_requests)
    st_ = daemon.feed_stats["bitstamp-test"]
    assert not st_.parse_errors and st_.resyncs == 0 and st_.gaps == 0
    assert len(rest) == len(BOOK_PAIRS)  # books were kept: no new snapshot
    ev = read_table(root, "events")
    assert ev.filter(ev["event"] == EV_RECONNECT_REQUESTED).height == 1
    assert "rotated: bts:request_reconnect" in list(ev["detail"])
    trades = read_table(root, "trades")
    assert trades.height == 42 and trades["trade_id"].n_unique() == 42
    assert read_table(root, "quotes").height == 1
    assert st_.drops[DROP_DUPLICATE_TRADE] == 42
    assert rebuild_books(book_rows(root)) == reference_books()
