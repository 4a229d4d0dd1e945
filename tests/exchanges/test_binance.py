"""Binance spot and USD-M codecs on the recorded frames: goldens, book sync, bad input."""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingestd.config import parse_config
from ingestd.exchanges.base import Output, RestRequest
from ingestd.exchanges.binance import BinanceSpot, BinanceUsdm
from ingestd.schema import ROW_WIDTH
from ingestd.sim.recorded import frames
from tests.support import mutate_json, rebuild_books

SPOT_BOOK = ["NKNUSDT", "BLZETH", "LRCBTC", "RUNEEUR"]
USDM_BOOK = ["SUSHIUSDT", "AKROUSDT", "KEEPUSDT", "CTKUSDT"]


def codec(cls: type[BinanceSpot], symbols: list[str], channels: list[str],
          **keys: Any) -> BinanceSpot:
    cfg = parse_config({"storage": {"root": "/tmp/x"}, "feeds": [
        {"name": "f", "exchange": cls.exchange, "symbols": symbols, "channels": channels,
         **keys}]})
    return cls(cfg.feeds[0])


def data(frame: bytes) -> dict[str, Any]:
    return json.loads(frame)["data"]


# ---- trades ---------------------------------------------------------------------------------
def test_agg_trades_golden() -> None:
    recorded = frames("binance_spot", "aggTrade.jsonl")
    symbols = sorted({data(f)["s"] for f in recorded})
    c = codec(BinanceSpot, symbols, ["trades"], trade_stream="aggTrade")
    rows = []
    for i, f in enumerate(recorded):
        out = c.parse(f, 1_000 + i, 5_000 + i)
        assert out.error is None
        rows.extend(out.rows("trades"))
    assert len(rows) == len(recorded) == 150
    for i, (row, f) in enumerate(zip(rows, recorded, strict=True)):
        d = data(f)
        assert row == (d["s"], d["T"] * 1_000_000, 1_000 + i, 5_000 + i, str(d["a"]),
                       "sell" if d["m"] else "buy", float(d["p"]), float(d["q"]))
    # The first recorded frame, spelled out: ZILUSDT a=18938405, buyer taker.
    assert rows[0] == ("ZILUSDT", 1617647603483_000_000, 1000, 5000, "18938405", "buy",
                       0.21448, 2062.9)


def test_raw_trades_golden_and_sides() -> None:
    recorded = frames("binance_spot", "trade.jsonl")
    symbols = sorted({data(f)["s"] for f in recorded})
    c = codec(BinanceSpot, symbols, ["trades"])
    assert c.streams()[0].endswith("@trade")
    first = c.parse(recorded[0], 7, 8).rows("trades")
    assert first == [("BTCUSDT", 1751132780368_000_000, 7, 8, "5052328858", "sell",
                      107407.88, 0.00024)]


def test_duplicate_trade_ids_are_dropped_and_counted() -> None:
    f = frames("binance_spot", "aggTrade.jsonl")
    c = codec(BinanceSpot, ["ZILUSDT", "DENTUSDT", "MANAUSDT", "QTUMETH", "ETHBRL",
                            "BTCSTUSDT"], ["trades"], trade_stream="aggTrade")
    assert c.parse(f[1], 1, 1).trades
    again = c.parse(f[1], 2, 2)
    assert not again.trades and again.drops == {"duplicate_trade": 1}


def test_never_seen_lower_trade_id_is_stored_with_an_event() -> None:
    """A trade id below the highest seen but never seen before is a real trade (e.g. the
    venue delivered out of order): stored once, with an `out_of_order` event; its
    replay is then a duplicate."""
    t = data(frames("binance_spot", "trade.jsonl")[0])
    c = codec(BinanceSpot, ["BTCUSDT"], ["trades"])

    def frame(tid: int) -> bytes:
        return orjson.dumps({"stream": "btcusdt@trade", "data": {**t, "t": tid}})

    assert c.parse(frame(100), 1, 1).rows("trades")[0][4] == "100"
    assert c.parse(frame(101), 2, 2).rows("trades")[0][4] == "101"
    gap = c.parse(frame(105), 3, 3)
    assert gap.rows("trades") and gap.rows("events")[0][5] == "gap"
    late = c.parse(frame(103), 4, 4)
    assert late.rows("trades")[0][4] == "103"
    ((_s, _te, _tr, _q, _feed, event, detail),) = late.rows("events")
    assert event == "out_of_order" and "103" in detail
    replay = c.parse_batch([frame(t) for t in (100, 101, 103, 105)], 5, 5)
    assert not replay.trades and replay.drops == {"duplicate_trade": 4}
    assert c.parse(frame(104), 9, 9).rows("trades")[0][4] == "104"


def test_state_round_trips_as_json_and_garbage_is_refused() -> None:
    from ingestd.exchanges.base import StateError

    f = frames("binance_spot", "aggTrade.jsonl")
    syms = ["ZILUSDT", "DENTUSDT", "MANAUSDT", "QTUMETH", "ETHBRL", "BTCSTUSDT"]
    c = codec(BinanceSpot, syms, ["trades"], trade_stream="aggTrade")
    kept = c.parse_batch(f[:20], 1, 1)
    saved = orjson.loads(orjson.dumps(c.state()))
    fresh = codec(BinanceSpot, syms, ["trades"], trade_stream="aggTrade")
    fresh.restore(saved)
    replay = fresh.parse_batch(f[:20], 2, 100)
    assert not replay.trades and replay.drops == {"duplicate_trade": len(kept.rows("trades"))}
    for bad in (None, [], {"v": 999, "exchange": "binance", "parts": {}},
                {**saved, "exchange": "kraken"},
                {**saved, "parts": {"trades": {"ints": {"X": [[5, 1], [2]]}}}}):
        with pytest.raises(StateError):
            codec(BinanceSpot, syms, ["trades"]).restore(bad)


def test_a_bad_frame_in_a_batch_keeps_its_neighbours() -> None:
    f = frames("binance_spot", "trade.jsonl")[:3]
    c = codec(BinanceSpot, ["BTCUSDT", "BTCFDUSD"], ["trades"])
    out = c.parse_batch([f[0], b'{"stream":"x","data":{"e":"trade","s":"BTCUSDT","t":1,'
                         b'"p":"abc","q":"1","T":1,"m":true}}', f[1], f[2]], 10, 20)
    assert out.rejects is not None and [i for i, _ in out.rejects] == [1]
    assert [r[3] for r in out.rows("trades")] == [20, 22, 23]


def test_unsubscribed_symbol_rows_are_dropped_and_counted() -> None:
    c = codec(BinanceSpot, ["BTCUSDT"], ["trades"], trade_stream="aggTrade")
    out = c.parse(frames("binance_spot", "aggTrade.jsonl")[0], 1, 1)
    assert not out.trades and out.drops == {"unsubscribed_symbol": 1}


# ---- quotes ---------------------------------------------------------------------------------
def test_book_ticker_quotes_golden() -> None:
    recorded = frames("binance_spot", "bookTicker.jsonl")
    c = codec(BinanceSpot, SPOT_BOOK, ["quotes"])
    for i, f in enumerate(recorded):
        d = data(f)
        out = c.parse(f, i, i)
        assert out.rows("quotes") == [(d["s"], None, i, i, float(d["b"]), float(d["B"]),
                               float(d["a"]), float(d["A"]))]


def test_usdm_quotes_carry_transaction_time() -> None:
    f = frames("binance_usdm", "bookTicker.jsonl")[0]
    c = codec(BinanceUsdm, USDM_BOOK, ["quotes"])
    q = c.parse(f, 1, 1).rows("quotes")
    assert q and q[0][1] == data(f)["T"] * 1_000_000


# ---- book sync ------------------------------------------------------------------------------
def reference_books(venue: str, symbols: list[str], futures: bool
                    ) -> dict[str, dict[str, dict[float, float]]]:
    """The documented procedure, written independently: snapshot + every later diff."""
    snaps = [json.loads(b) for b in frames(venue, "depth_snapshot_rest.jsonl")]
    books = {}
    for sym, snap in zip(symbols, snaps, strict=True):
        bids = {float(p): float(q) for p, q in snap["bids"]}
        asks = {float(p): float(q) for p, q in snap["asks"]}
        last = snap["lastUpdateId"]
        for f in frames(venue, "depthUpdate.jsonl"):
            d = data(f)
            if d["s"] != sym or (d["u"] < last if futures else d["u"] <= last):
                continue
            for side, levels in ((bids, d["b"]), (asks, d["a"])):
                for p, q in levels:
                    if float(q) == 0:
                        side.pop(float(p), None)
                    else:
                        side[float(p)] = float(q)
        books[sym] = {"bid": bids, "ask": asks}
    return books


rebuild = rebuild_books

def drive_book(c: BinanceSpot, venue: str, symbols: list[str], answer_after: int
               ) -> list[tuple[Any, ...]]:
    """Feed all diffs; answer each snapshot request after `answer_after` more frames."""
    snaps = dict(zip(symbols, frames(venue, "depth_snapshot_rest.jsonl"), strict=True))
    pending: list[tuple[int, RestRequest]] = []
    rows: list[tuple[Any, ...]] = []
    seq = 0

    def take(out: Output) -> None:
        nonlocal seq
        assert out.error is None, out.error
        rows.extend(out.rows("book"))
        seq = max(seq, out.last_seq)
        for r in out.requests or []:
            pending.append((seq + answer_after, r))

    for f in frames(venue, "depthUpdate.jsonl"):
        seq += 1
        take(c.parse(f, seq, seq))
        for due, req in list(pending):
            if seq >= due:
                pending.remove((due, req))
                seq += 1
                take(c.on_rest(req, 200, snaps[req.key], seq, seq))
    for _, req in pending:
        seq += 1
        take(c.on_rest(req, 200, snaps[req.key], seq, seq))
    return rows


@pytest.mark.parametrize("answer_after", [0, 1, 3, 50])
def test_spot_book_rebuilds_to_the_documented_procedure(answer_after: int) -> None:
    c = codec(BinanceSpot, SPOT_BOOK, ["book"])
    rows = drive_book(c, "binance_spot", SPOT_BOOK, answer_after)
    assert all(len(r) == ROW_WIDTH["book"] for r in rows)
    assert rebuild(rows) == reference_books("binance_spot", SPOT_BOOK, futures=False)


@pytest.mark.parametrize("answer_after", [0, 2, 40])
def test_usdm_book_rebuilds_with_pu_continuity(answer_after: int) -> None:
    c = codec(BinanceUsdm, USDM_BOOK, ["book"])
    rows = drive_book(c, "binance_usdm", USDM_BOOK, answer_after)
    assert rebuild(rows) == reference_books("binance_usdm", USDM_BOOK, futures=True)


def test_snapshot_block_shares_one_recv_seq_and_deltas_follow() -> None:
    c = codec(BinanceSpot, ["NKNUSDT"], ["book"])
    diffs = [f for f in frames("binance_spot", "depthUpdate.jsonl")
             if data(f)["s"] == "NKNUSDT"]
    out = c.parse(diffs[0], 10, 10)
    assert not out.book and out.requests and out.requests[0].url.endswith(
        "/api/v3/depth?symbol=NKNUSDT&limit=1000")
    c.parse(diffs[1], 11, 11)
    c.parse(diffs[2], 12, 12)
    snap = frames("binance_spot", "depth_snapshot_rest.jsonl")[0]
    done = c.on_rest(out.requests[0], 200, snap, 13, 13)
    assert done.book is not None
    book = done.rows("book")
    snap_rows = [r for r in book if r[4]]
    assert {r[3] for r in snap_rows} == {13}
    assert len(snap_rows) == 609 + 1000
    assert {r[8] for r in snap_rows} == {499869752}
    # diffs[0] (u = lastUpdateId) is dropped; diffs[1..2] follow with their own seqs.
    delta_seqs = sorted({r[3] for r in book if not r[4]})
    assert delta_seqs == [14, 15] and done.last_seq == 15
    assert done.drops == {"stale_book_update": 1}
    assert {r[2] for r in book if not r[4]} == {11, 12}  # their own receive times


def test_gap_records_event_and_resyncs_with_new_snapshot() -> None:
    c = codec(BinanceSpot, ["NKNUSDT"], ["book"])
    diffs = [f for f in frames("binance_spot", "depthUpdate.jsonl")
             if data(f)["s"] == "NKNUSDT"]
    snap = frames("binance_spot", "depth_snapshot_rest.jsonl")[0]
    req = c.parse(diffs[0], 1, 1).requests
    assert req
    c.on_rest(req[0], 200, snap, 2, 2)
    assert c.parse(diffs[1], 3, 3).book
    skipped = c.parse(diffs[3], 4, 4)  # diffs[2] never arrives
    assert not skipped.book
    (ev,) = skipped.rows("events")
    assert ev[5] == "gap" and ev[0] == "NKNUSDT"
    assert ev[6] == "expected U=499869755, got U=499869758 u=499869759"
    assert skipped.requests, "a gap asks for a new snapshot"
    # A fresh snapshot that bridges the buffered diff: here a synthetic one at u=499869757.
    body = orjson.dumps({"lastUpdateId": 499869757, "bids": [["0.1", "1"]],
                         "asks": [["0.2", "2"]]})
    again = c.on_rest(skipped.requests[0], 200, body, 5, 5)
    assert again.rows("events")[0][5] == "resync"
    book = again.rows("book")
    assert [r[4] for r in book] == [True, True] + [False] * (len(book) - 2)


def test_snapshot_older_than_first_buffered_diff_is_fetched_again() -> None:
    c = codec(BinanceSpot, ["NKNUSDT"], ["book"])
    diffs = [f for f in frames("binance_spot", "depthUpdate.jsonl")
             if data(f)["s"] == "NKNUSDT"]
    req = c.parse(diffs[5], 1, 1).requests
    assert req
    old = frames("binance_spot", "depth_snapshot_rest.jsonl")[0]  # lastUpdateId < U
    out = c.on_rest(req[0], 200, old, 2, 2)
    assert not out.book and out.requests and out.requests[0].delay_s > 0


def test_snapshot_http_error_is_an_event_and_a_retry() -> None:
    c = codec(BinanceSpot, ["NKNUSDT"], ["book"])
    req = c.parse(frames("binance_spot", "depthUpdate.jsonl")[0], 1, 1).requests
    assert req
    out = c.on_rest(req[0], 503, b"busy", 2, 2)
    assert out.rows("events")[0][5] == "snapshot_failed"
    assert out.requests and not out.book


def test_reconnect_discards_book_state() -> None:
    c = codec(BinanceSpot, ["NKNUSDT"], ["book"])
    diffs = [f for f in frames("binance_spot", "depthUpdate.jsonl")
             if data(f)["s"] == "NKNUSDT"]
    req = c.parse(diffs[0], 1, 1).requests
    assert req
    c.on_rest(req[0], 200, frames("binance_spot", "depth_snapshot_rest.jsonl")[0], 2, 2)
    c.on_connect()
    out = c.parse(diffs[4], 3, 3)
    assert not out.book and out.requests  # buffered until a new snapshot


# ---- control and bad input ---------------------------------------------------------------
def test_acks_errors_shutdown_and_unknown() -> None:
    c = codec(BinanceSpot, ["BTCUSDT"], ["trades"])
    sub = frames("binance_spot", "subscribe.jsonl")
    ack = c.parse(sub[1], 1, 1)
    assert not ack.has_rows and ack.error is None and not ack.unknown
    err = c.parse(sub[10], 2, 2)
    assert err.rows("events")[0][5] == "error"
    shutdown = c.parse(sub[11], 3, 3)
    assert shutdown.reconnect == "serverShutdown"
    unknown = c.parse(b'{"stream":"btcusdt@kline_1m","data":{"e":"kline"}}', 4, 4)
    assert unknown.unknown and unknown.error is None


@pytest.mark.parametrize("frame", [
    b"", b"not json", b"\x00\xff\xfe", b"[1,2]", b'{"data": 5}',
    b'{"stream":"x","data":{"e":"trade","s":"BTCUSDT","t":1,"p":"abc","q":"1","T":1,"m":true}}',
    b'{"stream":"x","data":{"e":"trade","s":"BTCUSDT","t":1,"p":"-1","q":"1","T":1,"m":true}}',
    b'{"stream":"x","data":{"e":"trade","s":"BTCUSDT","t":1,"p":"NaN","q":"1","T":1,"m":true}}',
    b'{"stream":"x","data":{"e":"trade","s":"BTCUSDT","t":1,"p":"1","q":"1","T":1,"m":"x"}}',
    b'{"stream":"x","data":{"e":"depthUpdate","s":"BTCUSDT","U":1,"u":2,"b":[["1"]],"a":[]}}',
])
def test_malformed_frames_are_errors_not_exceptions(frame: bytes) -> None:
    c = codec(BinanceSpot, ["BTCUSDT"], ["trades", "book"])
    out = c.parse(frame, 1, 1)
    assert out.error is not None and not out.has_rows


def _valid_row(table: str, row: tuple[Any, ...]) -> bool:
    if len(row) != ROW_WIDTH[table] or not isinstance(row[2], int):
        return False
    if table == "trades":
        return row[5] in ("buy", "sell") and math.isfinite(row[6]) and row[6] > 0 \
            and math.isfinite(row[7]) and row[7] >= 0
    if table == "book":
        return row[5] in ("bid", "ask") and row[6] > 0 and math.isfinite(row[6]) \
            and row[7] >= 0 and math.isfinite(row[7])
    return True


def _check(out: Output) -> None:
    for table in ("trades", "quotes", "book", "events"):
        for row in out.rows(table):
            assert _valid_row(table, row), (table, row)


ALL_FRAMES = [f for name in ("aggTrade.jsonl", "trade.jsonl", "bookTicker.jsonl",
                             "depthUpdate.jsonl", "subscribe.jsonl")
              for f in frames("binance_spot", name)]


_mutate = mutate_json


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blob=st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(blob: bytes) -> None:
    c = codec(BinanceSpot, SPOT_BOOK, ["trades", "quotes", "book"])
    _check(c.parse(blob, 1, 1))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(idx=st.integers(0, len(ALL_FRAMES) - 1),
       path=st.lists(st.integers(0, 20), min_size=1, max_size=4),
       value=st.one_of(st.just(...), st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
                       st.floats(allow_nan=True), st.text(max_size=8),
                       st.lists(st.text(max_size=4), max_size=3)))
def test_mutated_real_frames_never_raise_or_emit_bad_rows(idx: int, path: list[int],
                                                          value: Any) -> None:
    c = codec(BinanceSpot, [*SPOT_BOOK, "ZILUSDT", "DENTUSDT", "BTCUSDT"],
              ["trades", "quotes", "book"])
    # Put the book in sync first so mutated diffs reach the apply path.
    c.parse(frames("binance_spot", "depthUpdate.jsonl")[0], 1, 1)
    mutated = orjson.dumps(_mutate(orjson.loads(ALL_FRAMES[idx]), path, value))
    _check(c.parse(mutated, 2, 2))



# ---- USD-M derivatives and liquidations ------------------------------------------------------
def test_usdm_mark_price_derivatives_golden() -> None:
    recorded = frames("binance_usdm", "markPrice.jsonl")
    c = codec(BinanceUsdm, ["BTCUSDT"], ["derivatives"])
    rows = []
    for i, f in enumerate(recorded):
        out = c.parse(f, 10 + i, 100 + i)
        assert out.error is None
        rows.extend(out.rows("derivatives"))
    # l.2 is `!markPrice@arr`: its ETHUSDT entry is not subscribed, dropped and counted.
    assert c.parse(recorded[1], 1, 1).drops == {"unsubscribed_symbol": 1}
    assert rows == [
        ("BTCUSDT", 1617308820003_000_000, 10, 100, 58940.14924532, 58857.26693664,
         0.00058455, None, None, 1617321600000_000_000),
        ("BTCUSDT", 1617309024002_000_000, 11, 101, 59022.53514719, 58936.68384,
         0.00058959, None, None, 1617321600000_000_000),
        ("BTCUSDT", 1771263510000_000_000, 12, 102, 68005.80802899, 68035.14043478,
         -0.00004435, None, None, 1771286400000_000_000)]


def test_usdm_force_order_liquidations_golden() -> None:
    recorded = frames("binance_usdm", "forceOrder.jsonl")
    c = codec(BinanceUsdm, ["MANTAUSDT", "XRPUSDT"], ["liquidations"])
    rows = []
    for i, f in enumerate(recorded):
        out = c.parse(f, 10 + i, 100 + i)
        assert out.error is None
        rows.extend(out.rows("liquidations"))
    # Side = o.S (the order), price = o.p (not o.ap), amount = o.z; BTCUSDT of
    # `!forceOrder@arr` is not subscribed.
    assert rows == [
        ("MANTAUSDT", 1791091026103_000_000, 10, 100, "sell", 0.07115, 2049.1, None),
        ("XRPUSDT", 1791091174219_000_000, 11, 101, "buy", 1.4984, 127.2, None)]
    assert c.parse(recorded[2], 1, 1).drops == {"unsubscribed_symbol": 1}


def test_usdm_derivative_streams_and_state() -> None:
    c = codec(BinanceUsdm, ["BTCUSDT"], ["trades", "derivatives", "liquidations"])
    assert c.ws_url().endswith(
        "?streams=btcusdt@trade/btcusdt@markPrice@1s/btcusdt@forceOrder")
    c.parse(frames("binance_usdm", "markPrice.jsonl")[0], 1, 1)
    again = codec(BinanceUsdm, ["BTCUSDT"], ["derivatives"])
    again.restore(json.loads(json.dumps(c.state())))
    out = again.parse(frames("binance_usdm", "markPrice.jsonl")[2], 2, 2)
    assert out.rows("derivatives")[0][4] == 68005.80802899


def test_spot_does_not_offer_derivatives_or_liquidations() -> None:
    from ingestd.checks import parse_config as check_config
    from ingestd.config import ConfigError
    for channel in ("derivatives", "liquidations"):
        with pytest.raises(ConfigError) as e:
            check_config({"storage": {"root": "/x"}, "feeds": [
                {"name": "b", "exchange": "binance", "symbols": ["BTCUSDT"],
                 "channels": ["trades", channel]}]})
        assert channel in str(e.value.problems)
    check_config({"storage": {"root": "/x"}, "feeds": [
        {"name": "b", "exchange": "binance-usdm", "symbols": ["BTCUSDT"],
         "channels": ["derivatives", "liquidations"]}]})
    assert "derivatives" in BinanceUsdm.CHANNELS and "liquidations" in BinanceUsdm.CHANNELS


# ---- USD-M open interest (REST polls) --------------------------------------------------------
OI_ANSWERS = frames("binance_usdm", "openInterest_rest.jsonl")


def _oi_request(c: BinanceSpot, symbol: str) -> RestRequest:
    return next(r for r in c.poll_requests() if r.key.endswith(":" + symbol))


def test_usdm_polls_open_interest_per_symbol_only_for_derivatives() -> None:
    c = codec(BinanceUsdm, ["BTCUSDT", "BTCUSDT_220624"], ["trades", "derivatives"],
              rest_url="http://127.0.0.1:9")
    assert [(r.key, r.url) for r in c.poll_requests()] == [
        ("openInterest:BTCUSDT", "http://127.0.0.1:9/fapi/v1/openInterest?symbol=BTCUSDT"),
        ("openInterest:BTCUSDT_220624",
         "http://127.0.0.1:9/fapi/v1/openInterest?symbol=BTCUSDT_220624")]
    assert c.poll_interval_s() == 10.0
    assert codec(BinanceUsdm, ["BTCUSDT"], ["derivatives"],
                 poll_interval_s=2.5).poll_interval_s() == 2.5
    assert codec(BinanceUsdm, ["BTCUSDT"], ["trades", "liquidations"]).poll_requests() == ()
    assert codec(BinanceSpot, ["BTCUSDT"], ["trades"]).poll_requests() == ()


def test_usdm_open_interest_merges_into_the_latest_values_golden() -> None:
    c = codec(BinanceUsdm, ["BTCUSDT", "BTCUSDT_220624"], ["derivatives"])
    mark = frames("binance_usdm", "markPrice.jsonl")[0]
    c.parse(mark, 10, 100)
    out = c.on_rest(_oi_request(c, "BTCUSDT"), 200, OI_ANSWERS[0], 11, 101)
    assert out.error is None
    # The OI row carries the mark price, index and funding the stream sent before it;
    # ts_event is the answer's `time`.
    assert out.rows("derivatives") == [
        ("BTCUSDT", 1654336844754_000_000, 11, 101, 58940.14924532, 58857.26693664,
         0.00058455, None, 84617.188, 1617321600000_000_000)]
    # A later markPrice row keeps the polled open interest.
    later = c.parse(frames("binance_usdm", "markPrice.jsonl")[2], 12, 102)
    assert later.rows("derivatives")[0][8] == 84617.188
    fut = c.on_rest(_oi_request(c, "BTCUSDT_220624"), 200, OI_ANSWERS[1], 13, 103)
    assert fut.rows("derivatives") == [
        ("BTCUSDT_220624", 1654336785074_000_000, 13, 103, None, None, None, None, 1275.028,
         None)]


def test_usdm_open_interest_answer_no_newer_is_dropped_and_state_keeps_it() -> None:
    c = codec(BinanceUsdm, ["BTCUSDT"], ["derivatives"])
    req = _oi_request(c, "BTCUSDT")
    assert len(c.on_rest(req, 200, OI_ANSWERS[0], 1, 1).rows("derivatives")) == 1
    again = c.on_rest(req, 200, OI_ANSWERS[0], 2, 2)
    assert again.rows("derivatives") == [] and again.drops == {"stale_open_interest": 1}
    restored = codec(BinanceUsdm, ["BTCUSDT"], ["derivatives"])
    restored.restore(json.loads(json.dumps(c.state())))
    assert restored.on_rest(req, 200, OI_ANSWERS[0], 3, 3).drops == {"stale_open_interest": 1}
    assert restored.derivs.get("BTCUSDT")["open_interest"] == 84617.188
    # A state written before open interest was polled restores too (no part: none seen).
    old = c.state()
    del old["parts"]["open_interest"]
    fresh = codec(BinanceUsdm, ["BTCUSDT"], ["derivatives"])
    fresh.restore(old)
    assert len(fresh.on_rest(req, 200, OI_ANSWERS[0], 4, 4).rows("derivatives")) == 1


@pytest.mark.parametrize(("status", "body", "detail", "kept"), [
    (429, b'{"code":-1003,"msg":"Too many requests."}',
     'openInterest HTTP 429: {"code":-1003,"msg":"Too many requests."}', False),
    (0, b"timeout: no complete answer within 10 s",
     "openInterest no answer: timeout: no complete answer within 10 s", False),
    (200, b"<html>gateway</html>", "openInterest bad answer: DecodeError", True),
    (200, b'{"symbol":"BTCUSDT","openInterest":"-1","time":1654336844754}',
     "openInterest bad answer: BadFrame: amount out of range", True),
    (200, OI_ANSWERS[1], "openInterest bad answer: BadFrame: answer for 'BTCUSDT_220624'",
     True),
])
def test_usdm_failed_open_interest_answers_are_events(status: int, body: bytes, detail: str,
                                                     kept: bool) -> None:
    c = codec(BinanceUsdm, ["BTCUSDT"], ["derivatives"])
    out = c.on_rest(_oi_request(c, "BTCUSDT"), status, body, 5, 50)
    assert out.rows("derivatives") == []
    (ev,) = out.rows("events")
    assert ev[:4] == ("BTCUSDT", None, 5, 50) and ev[5] == "poll_failed"
    assert ev[6].startswith(detail)
    assert (out.rejects is not None) == kept
    # The next good answer lands: a failure leaves no state behind.
    assert len(c.on_rest(_oi_request(c, "BTCUSDT"), 200, OI_ANSWERS[0], 6, 51)
               .rows("derivatives")) == 1


def test_usdm_snapshot_answers_still_go_to_the_book() -> None:
    c = codec(BinanceUsdm, ["BTCUSDT"], ["book", "derivatives"])
    out = c.on_rest(RestRequest("BTCUSDT", "http://x/fapi/v1/depth"), 200,
                    b'{"lastUpdateId":1,"bids":[],"asks":[]}', 1, 1)
    assert out.rows("events") == [] and out.rows("derivatives") == []


def test_usdm_poll_config_is_checked_against_the_request_weight_budget() -> None:
    from ingestd.checks import parse_config as check_config
    from ingestd.config import ConfigError

    def feed(**keys: Any) -> dict[str, Any]:
        return {"storage": {"root": "/x"}, "feeds": [
            {"name": "b", "exchange": "binance-usdm", "channels": ["derivatives"], **keys}]}

    check_config(feed(symbols=["BTCUSDT", "BTCUSDT_220624"], poll_interval_s=0.5))
    many = [f"S{i}USDT" for i in range(201)]
    check_config(feed(symbols=many[:200]))  # 200 symbols every 10 s: 1200 weight/min
    with pytest.raises(ConfigError) as e:
        check_config(feed(symbols=many))
    assert "poll_interval_s: open interest of 201 symbols every 10 s is 1206 request " \
           "weight/min, above the 1200" in str(e.value.problems)
    with pytest.raises(ConfigError) as e:
        check_config(feed(symbols=["BTCUSDT"], poll_interval_s=0.1))
    assert "poll_interval_s" in str(e.value.problems)
    with pytest.raises(ConfigError) as e:
        check_config({"storage": {"root": "/x"}, "feeds": [
            {"name": "b", "exchange": "binance", "symbols": ["BTCUSDT"],
             "channels": ["trades"], "poll_interval_s": 5}]})
    assert "poll_interval_s: not used by binance" in str(e.value.problems)
    with pytest.raises(ConfigError) as e:
        check_config({"storage": {"root": "/x"}, "feeds": [
            {"name": "b", "exchange": "binance-usdm", "symbols": ["BTCUSDT"],
             "channels": ["trades"], "poll_interval_s": 5}]})
    assert "poll_interval_s: only used with the derivatives channel" in str(e.value.problems)
