"""The simulator's endless generated venues (sim/generate.py) and its new faults
(sim/faults.py broken REST answers, `SimServer.inject`): continuity a client can check
from the frames alone, books that a reference rebuilds exactly, snapshots on subscribe
that match what was published before them, and each broken answer served once, in order.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from typing import Any

import orjson
from websockets.asyncio.client import connect

from ingestd.exchanges.okx import checksum as codec_checksum
from ingestd.feed.rest import http_get
from ingestd.sim import SimServer
from ingestd.sim.faults import REST_FAULT_KINDS, RestFaults
from ingestd.sim.generate import GenBinanceVenue, GenBybitVenue, GenOkxVenue

Levels = dict[str, dict[float, float]]


def apply(book: Levels, side: str, levels: list[list[str]]) -> None:
    for lv in levels:
        p, q = float(lv[0]), float(lv[1])
        if q == 0:
            book[side].pop(p, None)
        else:
            book[side][p] = q


def from_snapshot(bids: list[list[str]], asks: list[list[str]]) -> Levels:
    book: Levels = {"bid": {}, "ask": {}}
    apply(book, "bid", bids)
    apply(book, "ask", asks)
    return book


def test_binance_trades_and_diffs_continue_and_rebuild_the_rest_snapshot() -> None:
    venue = GenBinanceVenue(seed=3)
    q = {"limit": ["1000"]}
    start = {s: orjson.loads(venue.rest("/api/v3/depth", {"symbol": [s], **q})[1])  # type: ignore[index]
             for s in venue.books}
    books = {s: from_snapshot(b["bids"], b["asks"]) for s, b in start.items()}
    last_u = {s: b["lastUpdateId"] for s, b in start.items()}
    last_a: dict[str, int] = {}
    last_l: dict[str, int] = {}
    kinds: dict[str, int] = defaultdict(int)
    for _ in range(6000):
        key, frame = venue.next_frame()
        d = json.loads(frame)["data"]
        assert json.loads(frame)["stream"] == key
        if d.get("e") == "aggTrade":
            kinds["trade"] += 1
            s = d["s"]
            if s in last_a:
                assert d["a"] == last_a[s] + 1 and d["f"] == last_l[s] + 1
            assert d["l"] >= d["f"]
            last_a[s], last_l[s] = d["a"], d["l"]
        elif d.get("e") == "depthUpdate":
            kinds["depth"] += 1
            s = d["s"]
            assert d["U"] == last_u[s] + 1 and d["u"] >= d["U"]
            last_u[s] = d["u"]
            apply(books[s], "bid", d["b"])
            apply(books[s], "ask", d["a"])
            assert max(books[s]["bid"]) < min(books[s]["ask"])   # never crossed
        else:
            kinds["ticker"] += 1
            s = d["s"]
            assert d["u"] == last_u[s]
            assert (float(d["b"]), float(d["B"])) == max(books[s]["bid"].items())
            assert (float(d["a"]), float(d["A"])) == min(books[s]["ask"].items())
    assert set(kinds) == {"trade", "depth", "ticker"}
    for s, book in books.items():
        end = orjson.loads(venue.rest("/api/v3/depth", {"symbol": [s], **q})[1])  # type: ignore[index]
        assert end["lastUpdateId"] == last_u[s]
        assert from_snapshot(end["bids"], end["asks"]) == book
        assert venue.books[s].checkpoints   # digests kept along the way


def test_okx_books_chain_seq_ids_and_carry_the_documented_checksum() -> None:
    venue = GenOkxVenue(seed=4)
    books: dict[str, Levels] = {}
    seq: dict[str, int] = {}
    texts: dict[str, dict[str, dict[str, str]]] = {}
    for frame in venue.join([f"books:{i}" for i in venue.insts]):
        msg = orjson.loads(frame)
        d = msg["data"][0]
        inst = msg["arg"]["instId"]
        assert msg["action"] == "snapshot" and d["prevSeqId"] == -1
        books[inst] = from_snapshot(d["bids"], d["asks"])
        texts[inst] = {"bid": {p: q for p, q, *_ in d["bids"]},
                       "ask": {p: q for p, q, *_ in d["asks"]}}
        seq[inst] = d["seqId"]
    trade_ids: dict[str, int] = {}
    for _ in range(4000):
        key, frame = venue.next_frame()
        msg = orjson.loads(frame)
        inst = msg["arg"]["instId"]
        assert key == f"{msg['arg']['channel']}:{inst}"
        d = msg["data"][0]
        if key.startswith("trades:"):
            tid = int(d["tradeId"])
            assert tid == trade_ids.get(inst, tid - 1) + 1
            trade_ids[inst] = tid
            continue
        assert msg["action"] == "update" and d["prevSeqId"] == seq[inst] < d["seqId"]
        seq[inst] = d["seqId"]
        for side, key_ in (("bid", "bids"), ("ask", "asks")):
            for p, q, *_ in d[key_]:
                if q == "0":
                    texts[inst][side].pop(p, None)
                else:
                    texts[inst][side][p] = q
        bids = sorted(texts[inst]["bid"].items(), key=lambda x: -float(x[0]))
        asks = sorted(texts[inst]["ask"].items(), key=lambda x: float(x[0]))
        assert d["checksum"] == codec_checksum(bids, asks)
    assert len(trade_ids) == len(venue.insts)


def test_bybit_deltas_follow_the_snapshot_and_trade_ids_never_repeat() -> None:
    venue = GenBybitVenue(seed=5)
    snaps = [orjson.loads(f) for f in venue.join([f"orderbook.200.{s}" for s in venue.symbols])]
    books = {m["data"]["s"]: from_snapshot(m["data"]["b"], m["data"]["a"]) for m in snaps}
    u = {m["data"]["s"]: m["data"]["u"] for m in snaps}
    ids: set[str] = set()
    n_trades = 0
    for _ in range(4000):
        key, frame = venue.next_frame()
        msg = orjson.loads(frame)
        assert msg["topic"] == key
        if key.startswith("publicTrade."):
            for t in msg["data"]:
                ids.add(t["i"])
                n_trades += 1
            continue
        d = msg["data"]
        assert msg["type"] == "delta" and d["u"] == u[d["s"]] + 1
        u[d["s"]] = d["u"]
        apply(books[d["s"]], "bid", d["b"])
        apply(books[d["s"]], "ask", d["a"])
    assert n_trades and len(ids) == n_trades
    for m in (orjson.loads(f) for f in venue.join([f"orderbook.200.{s}" for s in books])):
        d = m["data"]
        assert d["u"] == u[d["s"]]
        assert from_snapshot(d["b"], d["a"]) == books[d["s"]]


async def test_live_subscription_starts_with_a_snapshot_of_what_was_published() -> None:
    """The join snapshot and the publisher share one loop step: the first update after
    it chains to it, also when the client subscribes while frames are flowing."""
    async with SimServer("okx", live=True, rate_msgs_s=400, venue=GenOkxVenue(seed=6)) as sim:
        async with connect(sim.url + "/ws/v5/public") as early:
            await early.send(json.dumps({"op": "subscribe", "args": [
                {"channel": "trades", "instId": "BTC-USDT"}]}))
            await early.recv()   # ack; the publisher starts with this first subscriber
            while sim.published < 50:   # frames are flowing before the subscription
                await asyncio.sleep(0.01)
            async with connect(sim.url + "/ws/v5/public") as ws:
                await ws.send(json.dumps({"op": "subscribe", "args": [
                    {"channel": "books", "instId": "BTC-USDT"}]}))
                frames: list[dict[str, Any]] = []
                while len(frames) < 15:
                    msg = json.loads(await ws.recv())
                    if "data" in msg:
                        frames.append(msg)
        assert sim.published > 50
    assert frames[0]["action"] == "snapshot"
    prev = frames[0]["data"][0]["seqId"]
    for f in frames[1:]:
        assert f["data"][0]["prevSeqId"] == prev
        prev = f["data"][0]["seqId"]


async def test_broken_rest_answers_are_served_once_each_in_order() -> None:
    faults = RestFaults(hang_s=3.0)
    for kind in REST_FAULT_KINDS:
        faults.arm(kind)
    async with SimServer("binance", venue=GenBinanceVenue(seed=1), rest_faults=faults) as sim:
        assert sim.rest_url != f"http://{sim.host}:{sim.port}"   # its own listener
        url = sim.rest_url + "/api/v3/depth?symbol=NKNUSDT&limit=100"
        answers = [await http_get(url, 1.0) for _ in range(len(REST_FAULT_KINDS) + 1)]
    assert [k for _, k, _ in faults.applied] == list(REST_FAULT_KINDS)
    not_http, cut, garbage, hung, good = answers
    assert not_http.status == 0 and (not_http.error or "").startswith("not_http")
    assert cut.status == 0 and cut.error
    assert garbage.status == 200
    try:
        orjson.loads(garbage.body)
        raise AssertionError("garbage_json answered valid JSON")
    except orjson.JSONDecodeError:
        pass
    assert hung.status == 0 and "timeout" in (hung.error or "")
    assert good.status == 200 and orjson.loads(good.body)["lastUpdateId"] > 0


async def test_inject_sends_a_raw_frame_on_every_open_connection() -> None:
    async with SimServer("binance", live=True, rate_msgs_s=50,
                         venue=GenBinanceVenue(seed=2)) as sim:
        async with connect(sim.url + "/stream?streams=zilusdt@aggTrade") as ws:
            while not sim.open_conns:
                await asyncio.sleep(0.01)
            sent_to = await sim.inject(b"\x01not json {")
            got = []
            while "\x01not json {" not in got:
                got.append(await ws.recv())
        assert sent_to == [1] and sim.injected[0][1:] == (1, b"\x01not json {")
        while 1 not in sim.conn_ended:
            await asyncio.sleep(0.01)
    assert sim.conn_ended[1] >= sim.conn_opened[1]
