"""Gate spot v4 codec on the recorded frames in ingestd/sim/data/gate (2021-04-22)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingestd.checks import parse_config as check_config
from ingestd.config import ConfigError, FeedConfig
from ingestd.exchanges.base import RestRequest, StateError
from ingestd.exchanges.gate import Gate, ms_decimal_to_ns
from ingestd.schema import EV_GAP, EV_RESYNC
from ingestd.sim.venues.gate import SNAPSHOT_PAIRS
from tests.support import mutate_json

DATA = Path(__file__).resolve().parents[2] / "src/ingestd/sim/data/gate"
TS = 1_700_000_000_000_000_000


def lines(name: str) -> list[bytes]:
    return [ln.strip() for ln in (DATA / name).read_bytes().splitlines() if ln.strip()]


SNAPS = dict(zip(SNAPSHOT_PAIRS, lines("order_book_snapshot_rest.jsonl"), strict=True))


def codec() -> Gate:
    return Gate(FeedConfig("g", "gate", (*SNAPSHOT_PAIRS, "BTC_USDT"),
                           ("trades", "quotes", "book")))


def sync_all(c: Gate) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    rows: list[tuple[Any, ...]] = []
    events: list[tuple[Any, ...]] = []
    seq = 1
    for frame in lines("order_book_update.jsonl"):
        out = c.parse(frame, TS, seq)
        assert not out.rejects
        rows += out.rows("book")
        events += out.rows("events")
        for r in out.requests or []:
            seq += 1000
            o = c.on_rest(r, 200, SNAPS[r.key], TS, seq)
            rows += o.rows("book")
            events += o.rows("events")
        seq += 1
    return rows, events


def test_trade_golden() -> None:
    out = codec().parse(lines("trades.jsonl")[0], TS, 1)
    (row,) = out.rows("trades")
    assert row[0] == "DIS_USDT" and row[4] == "816995772" and row[5] == "sell"
    assert row[6] == 121.58 and row[7] == 0.201
    assert row[1] == 1619093543708264200
    assert ms_decimal_to_ns("1619093546958.116") == 1619093546958116000


def test_quote_golden() -> None:
    (row,) = codec().parse(lines("book_ticker.jsonl")[0], TS, 1).rows("quotes")
    assert row[0] == "BTC_USDT" and row[1] == 1654029559473 * 1_000_000
    assert row[4:] == (31738.93, 2.3039, 31738.94, 0.335)


def reference_books() -> dict[str, tuple[dict[float, float], dict[float, float]]]:
    """Gate's documented procedure, independently: snapshot, drop u < id+1, first
    applied U <= id+1 <= u, then U == prev u + 1."""
    books = {}
    for pair, body in SNAPS.items():
        s = orjson.loads(body)
        books[pair] = [s["id"], {float(p): float(q) for p, q in s["bids"]},
                       {float(p): float(q) for p, q in s["asks"]}, False]
    for frame in lines("order_book_update.jsonl"):
        r = orjson.loads(frame)["result"]
        b = books[r["s"]]
        if r["u"] < b[0] + 1:
            continue
        assert (r["U"] <= b[0] + 1 <= r["u"]) if not b[3] else r["U"] == b[0] + 1
        b[3] = True
        for side, key in ((1, "b"), (2, "a")):
            for p, q in r[key]:
                if float(q) == 0:
                    b[side].pop(float(p), None)
                else:
                    b[side][float(p)] = float(q)
        b[0] = r["u"]
    return {k: (v[1], v[2]) for k, v in books.items()}


def test_book_rebuild_matches_reference() -> None:
    rows, events = sync_all(codec())
    assert not [e for e in events if e[5] == EV_GAP]
    got: dict[str, tuple[dict[float, float], dict[float, float]]] = {}
    for r in sorted(rows, key=lambda r: r[3]):
        sym, side, px, amt = r[0], r[5], r[6], r[7]
        book = got.setdefault(sym, ({}, {}))
        if r[4]:  # snapshot rows start the book afresh on their first row
            pass
        levels = book[0] if side == "bid" else book[1]
        if amt == 0:
            levels.pop(px, None)
        else:
            levels[px] = amt
    assert got == reference_books()


def test_gap_then_resync() -> None:
    c = codec()
    sync_all(c)
    frames = [f for f in lines("order_book_update.jsonl") if b'"NEO_BTC"' in f]
    # replay a later NEO_BTC diff out of sequence: a gap, a snapshot request
    fresh = codec()
    seq = 1
    for f in frames[:5]:
        out = fresh.parse(f, TS, seq)
        for r in out.requests or []:
            fresh.on_rest(r, 200, SNAPS[r.key], TS, seq + 500)
        seq += 1
    out = fresh.parse(frames[10], TS, seq)
    assert [e[5] for e in out.rows("events")] == [EV_GAP]
    assert out.requests and out.requests[0].key == "NEO_BTC"
    body = orjson.dumps({"id": 31244120, "bids": [["0.0018", "1"]], "asks": [["0.0019", "2"]]})
    after = fresh.on_rest(out.requests[0], 200, body, TS, seq + 1)
    assert EV_RESYNC in [e[5] for e in after.rows("events")]


def test_snapshot_failure_is_an_event() -> None:
    c = codec()
    out = c.parse(lines("order_book_update.jsonl")[0], TS, 1)
    (req,) = out.requests or []
    o = c.on_rest(req, 500, b"boom", TS, 2)
    assert o.rows("events") and o.requests


def test_state_round_trip_and_garbage() -> None:
    c = codec()
    sync_all(c)
    c2 = codec()
    c2.restore(orjson.loads(orjson.dumps(c.state())))
    assert c2.state() == c.state()
    for bad in (None, {"v": 99}, {**c.state(), "parts": {"books": "x"}},
                {**c.state(), "parts": {"trades": [1]}}):
        with pytest.raises(StateError):
            codec().restore(bad)


def test_bad_frame_keeps_its_neighbours() -> None:
    t = lines("trades.jsonl")
    out = codec().parse_batch([t[0], b'{"channel":"spot.trades","event":"update",'
                               b'"result":{"id":-1}}', t[1]], TS, 1)
    assert len(out.rows("trades")) == 2 and out.rejects and out.rejects[0][0] == 1


def test_control_frames() -> None:
    c = codec()
    ack = next(f for f in lines("subscribe.jsonl") if b'"result"' in f)
    assert c.parse(ack, TS, 1).rows("events")
    assert not c.parse(b'{"time":1,"channel":"spot.pong","event":"","result":null}',
                       TS, 2).rows("events")
    err = c.parse(b'{"time":1,"channel":"spot.trades","event":"subscribe","error":'
                  b'{"code":2,"message":"unknown currency pair"},"result":null}', TS, 3)
    assert err.rows("events")[0][5] == "refused"
    assert c.subscribe_messages()[-1].startswith('{"time":0,"channel":"spot.book_ticker"')


ALL = lines("trades.jsonl") + lines("order_book_update.jsonl") + lines("book_ticker.jsonl")


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(ALL), st.lists(st.integers(0, 50), min_size=1, max_size=4),
       st.one_of(st.none(), st.just(...), st.integers(-2**64, 2**64), st.text(max_size=5),
                 st.floats(), st.just("-1"), st.just("nan"), st.just([])))
def test_mutated_frames_never_raise_nor_emit_bad_rows(frame: bytes, path: list[int],
                                                      value: Any) -> None:
    c = codec()
    # json, not orjson: the mutation may hold integers beyond 64 bits, as a venue could send
    mutated = json.dumps(mutate_json(orjson.loads(frame), path, value),
                         separators=(",", ":")).encode()
    out = c.parse(mutated, TS, 1)
    for r in out.rows("trades"):
        assert r[6] > 0 and math.isfinite(r[6]) and r[7] >= 0 and math.isfinite(r[7])
    for r in out.rows("quotes"):
        assert all(v is None or (math.isfinite(v) and v >= 0) for v in r[4:])


def test_check_accepts_offered_channels_only() -> None:
    feed = {"name": "g", "exchange": "gate", "symbols": ["BTC_USDT"],
            "channels": ["trades", "quotes", "book"]}
    check_config({"storage": {"root": "/tmp/x"}, "feeds": [feed]})
    with pytest.raises(ConfigError):
        check_config({"storage": {"root": "/tmp/x"},
                      "feeds": [{**feed, "channels": ["derivatives"]}]})
    with pytest.raises(ConfigError):
        check_config({"storage": {"root": "/tmp/x"}, "feeds": [{**feed, "symbols": ["btc-usdt"]}]})


def test_rest_request_url() -> None:
    out = codec().parse(lines("order_book_update.jsonl")[0], TS, 1)
    (req,) = out.requests or []
    assert isinstance(req, RestRequest)
    assert req.url.endswith("/api/v4/spot/order_book?currency_pair=HAI_ETH&limit=100"
                            "&with_id=true")
