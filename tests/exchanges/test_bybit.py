"""Bybit spot and linear: codec goldens on recorded frames, sequencing, bad input, pipeline.

The recordings are linear (sim/data/bybit/, copied from the shared fixtures). The spot
codec shares every decoder with the linear one, so the spot tests cover what differs:
endpoint, request splitting, symbol rules, and the pipeline against the spot venue.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingestd.checks import parse_config
from ingestd.config import ConfigError
from ingestd.exchanges import CODECS
from ingestd.exchanges.base import Output, StateError
from ingestd.exchanges.book import SYNCED
from ingestd.exchanges.bybit import BybitLinear, BybitSpot
from ingestd.schema import ROW_WIDTH
from ingestd.sim import SimServer
from ingestd.sim.recorded import frames
from ingestd.sim.venues import VENUES
from tests.support import feed_for, make_config, mutate_json, read_table, rebuild_books, run_daemon

BOOK_SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT", "DOGEUSDT"]   # publicTrade + orderbook.200
BBO_SYMBOLS = ["BANDUSDT", "RADUSDT", "SNTUSDT", "AIOZUSDT"]   # orderbook.1
ALL_SYMBOLS = BOOK_SYMBOLS + BBO_SYMBOLS
CHANNELS = ["trades", "quotes", "book"]

TRADES = frames("bybit", "publicTrade_linear.jsonl")
BOOK = frames("bybit", "orderbook200_linear.jsonl")
BBO = tuple(f for f in frames("bybit", "orderbook1_bbo_linear.jsonl") if b'"topic"' in f)
BBO_FILE = frames("bybit", "orderbook1_bbo_linear.jsonl")  # with the client's requests, acks
TICKERS = frames("bybit", "tickers_linear.jsonl")
PING = frames("bybit", "ping.jsonl")
SUBSCRIBE = frames("bybit", "subscribe_linear.jsonl")

Books = dict[str, dict[str, dict[float, float]]]


def codec(cls: type[BybitSpot], symbols: list[str], channels: list[str],
          **keys: Any) -> BybitSpot:
    cfg = parse_config({"storage": {"root": "/tmp/x"}, "feeds": [
        {"name": "f", "exchange": cls.exchange, "symbols": symbols, "channels": channels,
         **keys}]})
    return cls(cfg.feeds[0])


def msg(frame: bytes) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(frame)
    return result


def topic_frames(topic: str) -> list[bytes]:
    return [f for f in BOOK + BBO if msg(f)["topic"] == topic]


def with_data(frame: bytes, kind: str | None = None, **changes: Any) -> bytes:
    """A recorded frame with its `type` or fields of its `data` replaced (sequence tests)."""
    m = msg(frame)
    m["data"] = {**m["data"], **changes}
    if kind is not None:
        m["type"] = kind
    return dumps(m)


def dumps(obj: Any) -> bytes:
    """JSON text of anything (json, unlike orjson, writes integers beyond 64 bits)."""
    return json.dumps(obj, separators=(",", ":")).encode()


def apply(books: Books, m: dict[str, Any]) -> None:
    """Bybit's documented procedure, written independently: snapshot resets, "0" deletes."""
    d = m["data"]
    if m["type"] == "snapshot":
        books[d["s"]] = {"bid": {}, "ask": {}}
    for side, levels in (("bid", d["b"]), ("ask", d["a"])):
        for p, q in levels:
            if float(q) == 0:
                books[d["s"]][side].pop(float(p), None)
            else:
                books[d["s"]][side][float(p)] = float(q)


def reference_books(recorded: list[bytes] | tuple[bytes, ...]) -> Books:
    books: Books = {}
    for f in recorded:
        apply(books, msg(f))
    return books


rebuild = rebuild_books

def feed_all(c: BybitSpot, recorded: list[bytes] | tuple[bytes, ...], start: int = 1
             ) -> tuple[list[Output], list[tuple[Any, ...]]]:
    outs, rows = [], []
    for i, f in enumerate(recorded, start):
        out = c.parse(f, i * 10, i)
        assert out.error is None, out.error
        outs.append(out)
        rows.extend(out.rows("book"))
    return outs, rows


def events(outs: list[Output]) -> list[tuple[Any, ...]]:
    return [e for o in outs for e in o.rows("events")]


# ---- registry, config, connection ----------------------------------------------------------
def test_registered_with_their_venues() -> None:
    assert CODECS["bybit-spot"] is BybitSpot and CODECS["bybit-linear"] is BybitLinear
    assert {"bybit-spot", "bybit-linear"} <= set(VENUES)
    for ex in ("bybit-spot", "bybit-linear"):
        cfg = parse_config({"storage": {"root": "/tmp/x"}, "feeds": [
            {"name": "d", "exchange": ex, **VENUES[ex].demo_feed}]})
        assert cfg.feeds[0].exchange == ex


def test_urls_keepalive_and_override_keeps_the_venue_path() -> None:
    spot = codec(BybitSpot, ["BTCUSDT"], ["trades"])
    linear = codec(BybitLinear, ["BTCUSDT"], ["trades"], url="ws://127.0.0.1:9000")
    assert spot.ws_url() == "wss://stream.bybit.com/v5/public/spot"
    assert linear.ws_url() == "ws://127.0.0.1:9000/v5/public/linear"
    assert BybitSpot.keepalive_interval_s == BybitLinear.keepalive_interval_s == 20.0
    assert spot.keepalive_message() == '{"op":"ping"}'


def test_spot_splits_subscriptions_at_ten_args_linear_sends_one() -> None:
    spot = codec(BybitSpot, ALL_SYMBOLS, CHANNELS)
    msgs = [json.loads(m) for m in spot.subscribe_messages()]
    assert [len(m["args"]) for m in msgs] == [10, 10, 4]
    assert all(m["op"] == "subscribe" for m in msgs)
    assert len({m["req_id"] for m in msgs}) == 3
    args = [a for m in msgs for a in m["args"]]
    assert args[:3] == ["publicTrade.BTCUSDT", "orderbook.1.BTCUSDT", "orderbook.200.BTCUSDT"]
    linear = codec(BybitLinear, ALL_SYMBOLS, CHANNELS, book_depth=50)
    (one,) = [json.loads(m) for m in linear.subscribe_messages()]
    assert len(one["args"]) == 24 and "orderbook.50.SNTUSDT" in one["args"]


@pytest.mark.parametrize(("exchange", "keys", "problem"), [
    ("bybit-spot", {"book_depth": 25}, "book_depth: 25 is not one of 50, 200, 1000"),
    ("bybit-spot", {"book_depth": 1}, "book_depth: 1 is not one of"),
    ("bybit-linear", {"trade_stream": "trade"}, "trade_stream: not used by bybit-linear"),
    ("bybit-spot", {"symbols": ["btcusdt"]}, "symbols: 'btcusdt' is not Bybit-native"),
    ("bybit-spot", {"symbols": ["BTC-26DEC25"]}, "is not Bybit-native"),
    ("bybit-linear", {"symbols": ["BTC/USDT"]}, "is not Bybit-native"),
    ("bybit-linear", {"symbols": [f"SYM{i:05d}USDT" for i in range(600)]},
     "characters, more than Bybit's 21000 per connection"),
])
def test_check_feed(exchange: str, keys: dict[str, Any], problem: str) -> None:
    feed = {"name": "f", "exchange": exchange, "symbols": ["BTCUSDT"], "channels": CHANNELS,
            **keys}
    with pytest.raises(ConfigError) as e:
        parse_config({"storage": {"root": "/tmp/x"}, "feeds": [feed]})
    assert any(problem in p for p in e.value.problems), e.value.problems


def test_check_feed_accepts_usdc_contract_names_on_linear() -> None:
    c = codec(BybitLinear, ["BTC-26DEC25", "BTCPERP"], CHANNELS, book_depth=1000)
    assert c.depth == 1000
    assert codec(BybitSpot, ["BTCUSDT"], CHANNELS).depth == 200  # the default


# ---- trades ---------------------------------------------------------------------------------
def test_trades_golden() -> None:
    c = codec(BybitLinear, BOOK_SYMBOLS, ["trades"])
    outs, _ = feed_all(c, TRADES)
    rows = [r for o in outs for r in o.rows("trades")]
    want = []
    for i, f in enumerate(TRADES, 1):
        for t in msg(f)["data"]:
            want.append((t["s"], t["T"] * 1_000_000, i * 10, i, t["i"],
                         {"Buy": "buy", "Sell": "sell"}[t["S"]], float(t["p"]), float(t["v"])))
    assert rows == want and len(rows) == 327
    assert rows[0] == ("BTCUSDT", 1786310819680_000_000, 10, 1,
                       "a9188a0a-82bc-50de-be60-03eedbe3cdd7", "sell", 65114.2, 0.004)
    assert all(o.drops is None and not o.unknown for o in outs)


def test_side_is_the_takers_side_checked_against_the_recorded_book() -> None:
    """`S` = taker side: trades at the best ask say Buy, trades at the best bid say Sell."""
    states: dict[str, list[tuple[int, float, float]]] = {}
    books: Books = {}
    for f in BOOK:
        m = msg(f)
        apply(books, m)
        bk = books[m["data"]["s"]]
        states.setdefault(m["data"]["s"], []).append((m["cts"], max(bk["bid"]),
                                                      min(bk["ask"])))
    checked = {"Buy": 0, "Sell": 0}
    for f in TRADES:
        for t in msg(f)["data"]:
            hist = [h for h in states[t["s"]] if h[0] <= t["T"]]
            if not hist or t["T"] > states[t["s"]][-1][0]:
                continue  # outside the recorded book's time span
            _, bid, ask = hist[-1]
            p = float(t["p"])
            assert (p >= ask) if t["S"] == "Buy" else (p <= bid), t
            checked[t["S"]] += 1
    assert checked["Buy"] >= 5 and checked["Sell"] >= 5


def test_duplicate_trades_are_dropped_and_counted() -> None:
    c = codec(BybitLinear, BOOK_SYMBOLS, ["trades"])
    first = c.parse(TRADES[1], 1, 1)
    assert len(first.rows("trades")) == 5
    again = c.parse(TRADES[1], 2, 2)
    assert not again.trades and again.drops == {"duplicate_trade": 5}
    m = msg(TRADES[0])
    m["data"] = m["data"] * 2  # the same trade twice in one frame
    twice = c.parse(orjson.dumps(m), 3, 3)
    assert len(twice.rows("trades")) == 1
    assert twice.drops == {"duplicate_trade": 1}


def test_remembered_trade_ids_are_bounded() -> None:
    """Linear UUIDs are remembered in a bounded window per symbol: the oldest is forgotten."""
    c = codec(BybitLinear, ["BTCUSDT"], ["trades"])
    assert c.trade_ids.window >= 1024
    c.trade_ids.window = 3
    assert all(c.parse(_trade(i=tid), 1, 1).trades for tid in "abcd")
    assert not c.parse(_trade(i="d"), 2, 2).trades  # remembered
    assert c.parse(_trade(i="a"), 3, 3).trades  # forgotten: the window holds b, c, d
    assert len(c.state()["parts"]["trades"]["opaque"]["BTCUSDT"]) == 3


def test_spot_never_seen_lower_trade_id_is_stored_with_an_event() -> None:
    """Spot ids are digit strings: a never-seen id below the highest seen is stored with an
    `out_of_order` event (they are not consecutive: a jump is no gap); a replay is
    dropped, also after the state went through JSON into a fresh codec."""
    c = codec(BybitSpot, ["BTCUSDT"], ["trades"])

    def ids(out: Output) -> list[str]:
        return [r[4] for r in out.rows("trades")]

    assert ids(c.parse(_trade(i="2290000000061666327"), 1, 1)) == ["2290000000061666327"]
    c = codec(BybitSpot, ["BTCUSDT"], ["trades"])
    assert ids(c.parse_batch([_trade(i=str(t)) for t in (100, 101, 105)], 1, 1)) == \
        ["100", "101", "105"]
    late = c.parse(_trade(i="103"), 4, 4)
    assert ids(late) == ["103"]
    ((_s, _te, _tr, _q, _feed, event, detail),) = late.rows("events")
    assert event == "out_of_order" and "103" in detail
    replay = c.parse_batch([_trade(i=str(t)) for t in (100, 101, 103, 105)], 5, 5)
    assert not replay.trades and replay.drops == {"duplicate_trade": 4}
    fresh = codec(BybitSpot, ["BTCUSDT"], ["trades"])
    fresh.restore(orjson.loads(orjson.dumps(c.state())))
    again = fresh.parse_batch([_trade(i=str(t)) for t in (100, 105, 104)], 9, 9)
    assert ids(again) == ["104"] and again.drops == {"duplicate_trade": 2}
    assert [e[5] for e in again.rows("events")] == ["out_of_order"]
    # Not the canonical spelling of an integer: an opaque id of its own.
    assert ids(c.parse(_trade(i="0100"), 12, 12)) == ["0100"]
    # Linear ids are opaque: no order, so no event for a lower one.
    lin = codec(BybitLinear, ["BTCUSDT"], ["trades"])
    out = lin.parse_batch([_trade(i=str(t)) for t in (100, 105, 103, 103)], 1, 1)
    assert ids(out) == ["100", "105", "103"] and not out.events
    assert out.drops == {"duplicate_trade": 1}


def test_unsubscribed_symbols_and_channels_are_dropped_and_counted() -> None:
    c = codec(BybitLinear, ["BTCUSDT"], ["trades", "quotes"])
    eth = c.parse(TRADES[1], 1, 1)
    assert not eth.trades and eth.drops == {"unsubscribed_symbol": 5}
    book = c.parse(BOOK[0], 2, 2)  # orderbook.200: channel "book" not subscribed
    assert not book.book and book.drops == {"unsubscribed_symbol": 1}
    other_depth = codec(BybitLinear, ["BTCUSDT"], ["book"], book_depth=50).parse(BOOK[0], 3, 3)
    assert not other_depth.book and other_depth.drops == {"unsubscribed_symbol": 1}


# ---- topics ------------------------------------------------------------------------------------
def respelled(frame: bytes, topic: str) -> bytes:
    m = msg(frame)
    m["topic"] = topic
    return dumps(m)


def test_a_topic_is_parsed_strictly_other_spellings_are_unknown_not_books() -> None:
    """`orderbook.01.X`, `orderbook.001.X` (for `orderbook.1.X`) or `orderbook.0200.X` are not
    the topics the feed subscribed: unknown messages (counted), no rows, no book of their
    own, and the subscribed topics continue as if they had not come."""
    band = [f for f in BBO if msg(f)["data"]["s"] == "BANDUSDT"]
    btc = topic_frames("orderbook.200.BTCUSDT")
    misspelled = [respelled(band[1], "orderbook.01.BANDUSDT"),
                  respelled(band[1], "orderbook.001.BANDUSDT"),
                  respelled(btc[0], "orderbook.0200.BTCUSDT"),
                  respelled(btc[1], "orderbook.+200.BTCUSDT"),
                  respelled(btc[1], "orderbook.200.0.BTCUSDT")]
    c = codec(BybitLinear, ["BANDUSDT", "BTCUSDT"], ["quotes", "book"])
    for i, f in enumerate(misspelled):  # before any snapshot: no book starts from them
        out = c.parse(f, i, i)
        assert out.unknown == 1 and out.error is None and not out.has_rows, f
    assert c.parse(band[0], 10, 10).quotes
    first = c.parse(btc[0], 11, 11).rows("book")
    assert first
    for i, f in enumerate(misspelled, 20):
        out = c.parse(f, i, i)
        assert out.unknown == 1 and out.error is None, f
        assert not out.has_rows and out.drops is None and out.replies is None, f
    # Only the subscribed topics' books exist (waiting for the snapshots the subscription
    # brings); only BANDUSDT's orderbook.1 and BTCUSDT's orderbook.200 got one.
    parts = c.state()["parts"]
    assert sorted(parts["bbo"]) == sorted(parts["book"]) == ["BANDUSDT", "BTCUSDT"]
    assert [s for s, b in parts["bbo"].items() if b["status"] == SYNCED] == ["BANDUSDT"]
    assert [s for s, b in parts["book"].items() if b["status"] == SYNCED] == ["BTCUSDT"]
    outs, rows = feed_all(c, [band[1], *btc[1:]], start=30)
    assert outs[0].rows("quotes") and not events(outs)
    assert all(o.drops is None and not o.unknown for o in outs)
    assert rebuild(first + rows) == reference_books(btc)
    # Bybit's own spelling of another depth, or of a symbol not subscribed: dropped.
    other = c.parse(respelled(btc[0], "orderbook.50.BTCUSDT"), 40, 40)
    assert other.drops == {"unsubscribed_symbol": 1} and not other.unknown
    # The topic must name the data's symbol.
    assert c.parse(respelled(band[1], "orderbook.1.BTCUSDT"), 41, 41).error is not None


# ---- quotes (orderbook.1) ---------------------------------------------------------------------
def test_quotes_golden() -> None:
    c = codec(BybitLinear, BBO_SYMBOLS, ["quotes"])
    outs, _ = feed_all(c, BBO)
    rows = [r for o in outs for r in o.rows("quotes")]
    want = []
    for i, f in enumerate(BBO, 1):
        m = msg(f)
        (bp, bq), (ap, aq) = m["data"]["b"][0], m["data"]["a"][0]
        want.append((m["data"]["s"], m["cts"] * 1_000_000, i * 10, i,
                     float(bp), float(bq), float(ap), float(aq)))
    assert rows == want and len(rows) == 198
    assert rows[0] == ("BANDUSDT", 1749833474768_000_000, 10, 1, 0.6131, 17.9, 0.6134, 35.4)
    assert not events(outs)  # resent snapshots (same u) are neither gaps nor resyncs


def test_quote_deltas_keep_the_full_best_bid_ask() -> None:
    c = codec(BybitLinear, ["BANDUSDT"], ["quotes"])
    snap = BBO[0]
    u = msg(snap)["data"]["u"]
    assert c.parse(snap, 1, 1).quotes
    only_bid = c.parse(with_data(snap, "delta", u=u + 1,
                                 b=[["0.6131", "0"], ["0.6132", "5"]], a=[]), 2, 2)
    assert only_bid.rows("quotes") == [("BANDUSDT", 1749833474768_000_000, 2, 2, 0.6132, 5.0,
                                0.6134, 35.4)]
    ask_gone = c.parse(with_data(snap, "delta", u=u + 2, b=[], a=[["0.6134", "0"]]), 3, 3)
    assert ask_gone.rows("quotes") == [("BANDUSDT", 1749833474768_000_000, 3, 3, 0.6132, 5.0,
                                None, None)]
    # A delta naming a new best without deleting the old one: depth 1 keeps the best.
    better = c.parse(with_data(snap, "delta", u=u + 3, b=[["0.6133", "1"]],
                               a=[["0.6140", "2"]]), 4, 4)
    assert better.rows("quotes") == [("BANDUSDT", 1749833474768_000_000, 4, 4, 0.6133, 1.0,
                              0.614, 2.0)]
    empty_snapshot = c.parse(with_data(snap, u=u + 4, b=[], a=[]), 5, 5)
    assert empty_snapshot.rows("quotes") == [("BANDUSDT", 1749833474768_000_000, 5, 5,
                                      None, None, None, None)]


def test_quote_stream_gap_resubscribes_and_resyncs() -> None:
    c = codec(BybitLinear, ["BANDUSDT"], ["quotes"])
    snap = BBO[0]
    u = msg(snap)["data"]["u"]
    c.parse(snap, 1, 1)
    gap = c.parse(with_data(snap, "delta", u=u + 5, b=[["0.6132", "1"]], a=[]), 2, 2)
    assert not gap.quotes and gap.rows("events")[0][5] == "gap"
    assert [json.loads(r)["op"] for r in gap.replies or []] == ["unsubscribe", "subscribe"]
    back = c.parse(snap, 3, 3)
    assert back.quotes and back.rows("events")[0][5] == "resync"


# ---- book (orderbook.200) -----------------------------------------------------------------------
def test_book_snapshot_block_and_delta_golden() -> None:
    c = codec(BybitLinear, ["BTCUSDT"], ["book"])
    btc = topic_frames("orderbook.200.BTCUSDT")
    snap = c.parse(btc[0], 100, 7)
    rows = snap.rows("book")
    assert len(rows) == 400
    assert rows[0] == ("BTCUSDT", 1786310818027_000_000, 100, 7, True, "bid",
                            65114.2, 6.054, 15076952)
    assert rows[200] == ("BTCUSDT", 1786310818027_000_000, 100, 7, True, "ask",
                              65114.3, 10.486, 15076952)
    assert {r[3] for r in rows} == {7} and all(r[4] for r in rows)
    assert not snap.events  # the first snapshot of a subscription is no resync
    delta = c.parse(btc[1], 101, 8)
    drows = delta.rows("book")
    assert len(drows) == 22
    assert drows[2] == ("BTCUSDT", 1786310818129_000_000, 101, 8, False, "bid",
                             65093.1, 0.0, 15076953)
    assert drows[6] == ("BTCUSDT", 1786310818129_000_000, 101, 8, False, "ask",
                             65116.6, 0.0, 15076953)


def test_book_rebuilt_from_rows_equals_the_venue_book() -> None:
    c = codec(BybitLinear, BOOK_SYMBOLS, ["book"])
    outs, rows = feed_all(c, BOOK)
    assert not events(outs) and all(o.drops is None for o in outs)  # u has no breaks
    assert all(len(r) == ROW_WIDTH["book"] for r in rows)
    assert len(rows) == sum(len(msg(f)["data"]["b"]) + len(msg(f)["data"]["a"]) for f in BOOK)
    want = reference_books(BOOK)
    assert rebuild(rows) == want
    assert all(len(b["bid"]) == len(b["ask"]) == 200 for b in want.values())
    assert [r[8] for r in rows if r[0] == "SOLUSDT"][-1] == 13783375


def test_gap_resubscribes_drops_until_snapshot_then_resyncs() -> None:
    topic = "orderbook.200.BTCUSDT"
    btc = topic_frames(topic)
    c = codec(BybitLinear, ["BTCUSDT"], ["book"])
    _, rows = feed_all(c, btc[:5])
    gap = c.parse(btc[6], 60, 6)  # btc[5] never arrived
    assert not gap.book and gap.drops == {"book_not_synced": 1}
    assert gap.rows("events") == [("BTCUSDT", None, 60, 6, "f", "gap",
                           f"{topic}: expected u=15076957, received u=15076958")]
    assert [json.loads(r) for r in gap.replies or []] == [
        {"op": "unsubscribe", "args": [topic], "req_id": "unsub-1"},
        {"op": "subscribe", "args": [topic], "req_id": "sub-2"}]
    late = c.parse(btc[7], 70, 7)
    assert not late.book and late.drops == {"book_not_synced": 1}
    # The acks of the resubscription: one `subscribed` event naming the topic.
    unsub_ack = c.parse(b'{"success":true,"ret_msg":"","conn_id":"x","req_id":"unsub-1",'
                        b'"op":"unsubscribe"}', 71, 71)
    assert not unsub_ack.has_rows and not unsub_ack.unknown and unsub_ack.error is None
    sub_ack = c.parse(b'{"success":true,"ret_msg":"","conn_id":"x","req_id":"sub-2",'
                      b'"op":"subscribe"}', 72, 72)
    assert sub_ack.rows("events") == [(None, None, 72, 72, "f", "subscribed", topic)]
    # The venue starts the topic again with a snapshot (the simulator replays it).
    outs, more = feed_all(c, btc, start=100)
    assert [e[5] for e in events(outs)] == ["resync"]
    assert events(outs)[0][6] == f"{topic}: snapshot u=15076952 (after gap at u=15076958)"
    assert rebuild(rows + more) == reference_books(btc)


def test_u_equal_1_is_a_service_restart_written_as_a_snapshot() -> None:
    btc = topic_frames("orderbook.200.BTCUSDT")
    c = codec(BybitLinear, ["BTCUSDT"], ["book"])
    feed_all(c, btc[:3])
    restart = c.parse(with_data(btc[3], u=1), 40, 40)
    rrows = restart.rows("book")
    assert rrows and all(r[4] and r[8] == 1 for r in rrows)
    assert {r[3] for r in rrows} == {40}
    (ev,) = restart.rows("events")
    assert ev[5] == "resync" and "u=1" in (ev[6] or "")
    follow = c.parse(with_data(btc[4], u=2), 41, 41)
    assert follow.book and not any(r[4] for r in follow.rows("book")) and not follow.events


def test_repeated_delta_is_stale_and_unsolicited_snapshot_is_a_resync() -> None:
    btc = topic_frames("orderbook.200.BTCUSDT")
    c = codec(BybitLinear, ["BTCUSDT"], ["book"])
    feed_all(c, btc[:4])
    repeat = c.parse(btc[3], 50, 50)
    assert not repeat.book and repeat.drops == {"stale_book_update": 1}
    again = c.parse(btc[0], 51, 51)  # a snapshot while in sync: the venue reset the book
    assert again.book and again.rows("events")[0][5] == "resync"


def test_deltas_before_any_snapshot_are_dropped_then_resubscribed() -> None:
    btc = topic_frames("orderbook.200.BTCUSDT")
    c = codec(BybitLinear, ["BTCUSDT"], ["book"])
    out = c.parse(btc[1], 1, 1)
    assert not out.book and out.drops == {"book_not_synced": 1} and out.replies is None
    replies = []
    for i in range(600):
        replies += c.parse(btc[1 + i % 60], 2 + i, 2 + i).replies or []
    assert [json.loads(r)["op"] for r in replies] == ["unsubscribe", "subscribe"]


def test_reconnect_waits_for_a_snapshot_and_records_a_resync() -> None:
    btc = topic_frames("orderbook.200.BTCUSDT")
    c = codec(BybitLinear, ["BTCUSDT"], ["book"])
    feed_all(c, btc[:4])
    c.on_connect()
    assert c.parse(btc[4], 5, 5).drops == {"book_not_synced": 1}
    snap = c.parse(btc[0], 6, 6)
    assert snap.book and snap.rows("events")[0][6] == (
        "orderbook.200.BTCUSDT: snapshot u=15076952 (new connection)")


def test_rotation_keeps_books_and_skips_the_new_connections_overlap() -> None:
    btc = topic_frames("orderbook.200.BTCUSDT")
    band = [f for f in BBO if msg(f)["data"]["s"] == "BANDUSDT"]
    c = codec(BybitLinear, ["BTCUSDT", "BANDUSDT"], ["quotes", "book"])
    outs, rows = feed_all(c, btc[:10] + band[:5])
    (sub,) = c.subscribe_messages()  # the new connection subscribes before the switch
    c.on_rotate()
    # The new connection: its snapshot, deltas the old one already delivered, then more.
    more_outs, more = feed_all(c, [btc[0], band[0], *btc[6:], *band[3:]], start=100)
    assert not events(outs + more_outs)
    drops = sum((o.drops or {}).get("stale_book_update", 0) for o in more_outs)
    assert drops == 1 + 4 + 1 + 2  # btc snapshot, btc[6..9], band snapshot, band[3..4]
    assert rebuild(rows + more) == reference_books(btc)
    quotes = [q for o in more_outs for q in o.rows("quotes")]
    assert len(quotes) == len(band) - 5
    ack = c.parse(orjson.dumps({"success": True, "ret_msg": "", "conn_id": "new",
                                "req_id": json.loads(sub)["req_id"], "op": "subscribe"}), 1, 1)
    assert ack.rows("events")[0][6] == "orderbook.1.BTCUSDT orderbook.200.BTCUSDT " \
        "orderbook.1.BANDUSDT orderbook.200.BANDUSDT"


def test_rotation_onto_a_newer_snapshot_applies_it_without_a_resync() -> None:
    btc = topic_frames("orderbook.200.BTCUSDT")
    c = codec(BybitLinear, ["BTCUSDT"], ["book"])
    feed_all(c, btc[:5])
    c.on_rotate()
    newer = c.parse(with_data(btc[0], u=msg(btc[8])["data"]["u"]), 50, 50)
    assert newer.book and all(r[4] for r in newer.rows("book")) and not newer.events
    assert c.parse(btc[9], 51, 51).book  # continues from the new snapshot


def test_ids_that_keep_going_back_are_a_gap() -> None:
    btc = topic_frames("orderbook.200.BTCUSDT")
    c = codec(BybitLinear, ["BTCUSDT"], ["book"])
    feed_all(c, btc[:3])
    outs = [c.parse(btc[1], 10 + i, 10 + i) for i in range(500)]
    assert all(o.drops == {"stale_book_update": 1} for o in outs)
    assert [e[5] for e in events(outs)] == ["gap"]
    assert [json.loads(r)["op"] for r in outs[-1].replies or []] == ["unsubscribe", "subscribe"]


# ---- explicit state, batches --------------------------------------------------------------------
def test_state_round_trips_as_json_and_books_continue_without_a_resync() -> None:
    """state() -> JSON -> a fresh codec: a replay of stored trades is dropped, the book and
    the best bid/ask continue exactly as in the codec that never stopped, and a pending
    request's ack still names its topics."""
    btc = topic_frames("orderbook.200.BTCUSDT")
    band = [f for f in BBO if msg(f)["data"]["s"] == "BANDUSDT"]
    syms = [*BOOK_SYMBOLS, "BANDUSDT"]
    c = codec(BybitLinear, syms, CHANNELS)
    (sub,) = c.subscribe_messages()
    kept = c.parse_batch([*TRADES[:10], *btc[:5], *band[:5]], 1, 1)
    assert kept.rejects is None and kept.rows("trades")
    saved = orjson.loads(orjson.dumps(c.state()))
    fresh = codec(BybitLinear, syms, CHANNELS)
    fresh.restore(saved)
    assert orjson.loads(orjson.dumps(fresh.state())) == saved
    replay = fresh.parse_batch(list(TRADES[:10]), 2, 100)
    assert not replay.trades and replay.drops == {"duplicate_trade": len(kept.rows("trades"))}
    last = msg(band[4])["data"]
    bid_gone = with_data(band[4], "delta", u=last["u"] + 1, b=[[last["b"][0][0], "0"]], a=[])
    more = [bid_gone, *btc[5:], *band[5:]]
    cont, restored = c.parse_batch(more, 3, 200), fresh.parse_batch(more, 3, 200)
    assert not restored.events and restored.drops is None and restored.rejects is None
    assert restored.rows("quotes")[0][4:] == (None, None, float(last["a"][0][0]),
                                              float(last["a"][0][1]))
    for table in ("book", "quotes"):
        assert restored.rows(table) == cont.rows(table)
    assert rebuild(kept.rows("book") + restored.rows("book")) == reference_books(btc)
    ack = fresh.parse(orjson.dumps({"success": True, "ret_msg": "", "conn_id": "c",
                                    "req_id": json.loads(sub)["req_id"], "op": "subscribe"}),
                      4, 300)
    assert ack.rows("events")[0][6] == " ".join(json.loads(sub)["args"])


def test_restore_refuses_garbage_and_other_versions() -> None:
    c = codec(BybitLinear, ["BTCUSDT", "BANDUSDT"], CHANNELS)
    c.parse(topic_frames("orderbook.200.BTCUSDT")[0], 1, 1)
    saved = orjson.loads(orjson.dumps(c.state()))
    parts = saved["parts"]
    bad: Any
    for bad in (None, [], "x", {"v": 999, "exchange": "bybit-linear", "parts": {}},
                {**saved, "v": saved["v"] + 1}, {**saved, "exchange": "bybit-spot"},
                {**saved, "parts": None},
                {**saved, "parts": {**parts, "trades": {"ints": {"X": [[5, 1], [2]]}}}},
                {**saved, "parts": {**parts, "book": {"BTCUSDT": {
                    **parts["book"]["BTCUSDT"], "status": 7}}}},
                {**saved, "parts": {**parts, "book": [1, 2]}},
                {**saved, "parts": {**parts, "bbo": {"BANDUSDT": {}}}},
                {**saved, "parts": {**parts, "book": {"BTCUSDT": {
                    **parts["book"]["BTCUSDT"], "dropped": "x"}}}},
                {**saved, "parts": {**parts, "topics": {**parts["topics"], "rotating": "x"}}},
                {**saved, "parts": {**parts, "topics": {**parts["topics"],
                                                        "stale": {"t": "1"}}}},
                {**saved, "parts": {**parts, "topics": []}},
                {**saved, "parts": {**parts, "requests": {"seq": -1, "pending": []}}},
                {**saved, "parts": {**parts, "requests": {"seq": 1, "pending": {"abc": 1}}}},
                {**saved, "parts": {**parts, "requests": {"seq": 1,
                                                          "pending": [["r", "op", [1]]]}}}):
        with pytest.raises(StateError):
            codec(BybitLinear, ["BTCUSDT", "BANDUSDT"], CHANNELS).restore(bad)


def test_a_bad_frame_in_a_batch_keeps_its_neighbours() -> None:
    btc = topic_frames("orderbook.200.BTCUSDT")
    c = codec(BybitLinear, BOOK_SYMBOLS, CHANNELS)
    bad = with_data(btc[2], a=[["x", "1"]])
    out = c.parse_batch([btc[0], btc[1], bad, btc[2], TRADES[0]], 10, 20)
    assert out.rejects is not None and [i for i, _ in out.rejects] == [2]
    assert "not a decimal string" in out.rejects[0][1]
    assert sorted({r[3] for r in out.rows("book")}) == [20, 21, 23]
    assert [r[3] for r in out.rows("trades")] == [24]
    assert not out.events and out.drops is None
    assert rebuild(out.rows("book")) == reference_books(btc[:3])


# ---- control frames and bad input -----------------------------------------------------------
def test_pongs_are_silent_in_every_recorded_shape() -> None:
    c = codec(BybitSpot, ["BTCUSDT"], CHANNELS)
    for f in PING:  # the client's ping, spot pong, linear pong, `op:pong`
        out = c.parse(f, 1, 1)
        assert not out.has_rows and not out.unknown and out.error is None, f


def test_recorded_acks_are_subscribed_events() -> None:
    c = codec(BybitLinear, ["BTCUSDT"], CHANNELS)
    acks = [f for f in SUBSCRIBE if b'"success"' in f]
    assert len(acks) == 17
    for f in acks:
        out = c.parse(f, 1, 1)
        assert out.rows("events") == [(None, None, 1, 1, "f", "subscribed", None)]
    spot_ack = b'{"success":true,"ret_msg":"subscribe","conn_id":"c","op":"subscribe"}'
    assert c.parse(spot_ack, 2, 2).rows("events") == [(None, None, 2, 2, "f", "subscribed", None)]
    # A request we sent is named in its ack.
    (sub,) = c.subscribe_messages()
    req_id = json.loads(sub)["req_id"]
    ack = c.parse(orjson.dumps({"success": True, "ret_msg": "", "conn_id": "c",
                                "req_id": req_id, "op": "subscribe"}), 3, 3)
    assert ack.rows("events") == [(None, None, 3, 3, "f", "subscribed",
                           "publicTrade.BTCUSDT orderbook.1.BTCUSDT orderbook.200.BTCUSDT")]


def test_refusals_are_refused_events_with_the_venue_message() -> None:
    c = codec(BybitLinear, ["BTCUSDT"], CHANNELS)
    (sub,) = c.subscribe_messages()
    req_id = json.loads(sub)["req_id"]
    out = c.parse(orjson.dumps({
        "success": False, "ret_msg": "error:handler not found,topic:orderbook.200.BTCUSDT",
        "conn_id": "c", "req_id": req_id, "op": "subscribe"}), 1, 1)
    (ev,) = out.rows("events")
    assert ev[:6] == ("BTCUSDT", None, 1, 1, "f", "refused")
    assert ev[6] == ("subscribe publicTrade.BTCUSDT orderbook.1.BTCUSDT orderbook.200.BTCUSDT:"
                     " error:handler not found,topic:orderbook.200.BTCUSDT")
    spot = c.parse(b'{"success":false,"ret_msg":"args size >10","conn_id":"c",'
                   b'"op":"subscribe"}', 2, 2)
    assert spot.rows("events") == [(None, None, 2, 2, "f", "refused", "subscribe: args size >10")]


@pytest.mark.parametrize("frame", [TICKERS[0], TICKERS[1], BBO_FILE[0],
                                   b'{"topic":"kline.1.BTCUSDT","data":[]}', b'{"a":1}',
                                   b'{"op":"auth","success":null}'])
def test_unknown_messages_are_counted_not_errors(frame: bytes) -> None:
    c = codec(BybitLinear, ALL_SYMBOLS, CHANNELS)
    out = c.parse(frame, 1, 1)
    assert out.unknown == 1 and out.error is None and not out.has_rows


def _trade(**over: Any) -> bytes:
    t = {"T": 1786310819680, "s": "BTCUSDT", "S": "Sell", "v": "0.004", "p": "65114.20",
         "i": "a9188a0a", **over}
    return dumps({"topic": "publicTrade.BTCUSDT", "type": "snapshot", "ts": 1786310819681,
                  "data": [t]})


@pytest.mark.parametrize("frame", [
    b"", b"not json", b"\x00\xff\xfe", b"[1,2]", b'"pong"', b"null", b'{"topic":5}',
    b'{"topic":"publicTrade.BTCUSDT","data":{}}',
    b'{"topic":"orderbook.200.BTCUSDT","type":"delta","data":[]}',
    b'{"topic":"orderbook.x.BTCUSDT","type":"delta","data":{}}',
    _trade(p="abc"), _trade(p="-1"), _trade(p="NaN"), _trade(p="0"), _trade(p=65114.2),
    _trade(p="1_000"), _trade(v="-1"), _trade(T=1.5), _trade(T=-1), _trade(T=True),
    _trade(T=10**20), _trade(S=1), _trade(i=None), _trade(i=""), _trade(s=None),
    with_data(BOOK[0], u="15076952"), with_data(BOOK[0], u=-1), with_data(BOOK[0], b=[["1"]]),
    with_data(BOOK[0], b={"1": "2"}), with_data(BOOK[0], a=[["1", "2", "3"]]),
    with_data(BOOK[0], a=[["0", "2"]]), with_data(BOOK[0], s="ETHUSDT"),
    orjson.dumps({**msg(BOOK[0]), "type": "partial"}),
    orjson.dumps({k: v for k, v in msg(BOOK[0]).items() if k not in ("cts", "ts")}),
])
def test_malformed_frames_are_errors_not_exceptions(frame: bytes) -> None:
    c = codec(BybitLinear, BOOK_SYMBOLS, CHANNELS)
    out = c.parse(frame, 1, 1)
    assert out.error is not None and not out.has_rows and out.replies is None


def test_a_malformed_frame_changes_no_state() -> None:
    btc = topic_frames("orderbook.200.BTCUSDT")
    c = codec(BybitLinear, BOOK_SYMBOLS, CHANNELS)
    feed_all(c, btc[:3])
    bad = c.parse(with_data(btc[5], a=[["x", "1"]]), 9, 9)  # would be a gap if it counted
    assert bad.error is not None and not bad.events
    assert c.parse(btc[3], 10, 10).book  # still in sequence
    bad_trade = msg(TRADES[1])
    bad_trade["data"][-1]["p"] = "oops"
    assert c.parse(orjson.dumps(bad_trade), 11, 11).error is not None
    assert c.parse(TRADES[1], 12, 12).trades  # its good trades were not remembered


# ---- properties --------------------------------------------------------------------------------
def _valid_row(table: str, row: tuple[Any, ...]) -> bool:
    if len(row) != ROW_WIDTH[table] or type(row[2]) is not int or type(row[3]) is not int:
        return False
    if row[1] is not None and type(row[1]) is not int:
        return False
    if table == "trades":
        return type(row[0]) is str and type(row[4]) is str and row[5] in ("buy", "sell",
                                                                          "unknown") \
            and math.isfinite(row[6]) and row[6] > 0 and math.isfinite(row[7]) and row[7] >= 0
    if table == "book":
        return type(row[0]) is str and type(row[4]) is bool and row[5] in ("bid", "ask") \
            and math.isfinite(row[6]) and row[6] > 0 and math.isfinite(row[7]) \
            and row[7] >= 0 and type(row[8]) is int
    if table == "quotes":
        px_ok = all(v is None or (math.isfinite(v) and v > 0) for v in (row[4], row[6]))
        sz_ok = all(v is None or (math.isfinite(v) and v >= 0) for v in (row[5], row[7]))
        return type(row[0]) is str and px_ok and sz_ok
    return row[4] == "f" and type(row[5]) is str and (row[6] is None or type(row[6]) is str)


def _check(out: Output) -> None:
    for table in ("trades", "quotes", "book", "events"):
        for row in out.rows(table):
            assert _valid_row(table, row), (table, row)
    if out.error is not None:
        assert not out.has_rows and out.replies is None


ALL_FRAMES = [*TRADES[:20], *BOOK[:40], *BBO[:20], *TICKERS[:5], *PING, *SUBSCRIBE[-3:]]


_mutate = mutate_json


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blob=st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(blob: bytes) -> None:
    c = codec(BybitSpot, ALL_SYMBOLS, CHANNELS)
    _check(c.parse(blob, 1, 1))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(idx=st.integers(0, len(ALL_FRAMES) - 1),
       path=st.lists(st.integers(0, 400), min_size=1, max_size=5),
       value=st.one_of(st.just(...), st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                       st.floats(allow_nan=True), st.text(max_size=8),
                       st.sampled_from(["0", "1", "-1", "1e400", "inf", "nan", "1.5", "Buy",
                                        "BTCUSDT", "delta", "snapshot"]),
                       st.lists(st.text(max_size=4), max_size=3), st.dictionaries(
                           st.text(max_size=3), st.integers(), max_size=2)))
def test_mutated_real_frames_never_raise_or_emit_bad_rows(idx: int, path: list[int],
                                                          value: Any) -> None:
    c = codec(BybitLinear, ALL_SYMBOLS, CHANNELS)
    for f in (BOOK[0], BBO[0]):  # in sync first, so mutated deltas reach the apply path
        c.parse(f, 1, 1)
    mutated = dumps(_mutate(orjson.loads(ALL_FRAMES[idx]), path, value))
    _check(c.parse(mutated, 2, 2))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lost=st.sets(st.integers(1, 61), max_size=6),
       repeated=st.sets(st.integers(1, 61), max_size=3))
def test_any_lost_or_repeated_deltas_are_detected_and_healed(lost: set[int],
                                                              repeated: set[int]) -> None:
    """Drop/repeat deltas at random; then the venue restarts the topic (as on resubscribe)."""
    btc = topic_frames("orderbook.200.BTCUSDT")
    c = codec(BybitLinear, ["BTCUSDT"], ["book"])
    rows: list[tuple[Any, ...]] = []
    evs: list[tuple[Any, ...]] = []
    served = [f for i, f in enumerate(btc) if i not in lost]
    served += [btc[i] for i in sorted(repeated) if i not in lost]
    for seq, f in enumerate(served + list(btc), 1):
        out = c.parse(f, seq, seq)
        _check(out)
        assert out.error is None
        rows += out.rows("book")
        evs += out.rows("events")
    gaps = [e for e in evs if e[5] == "gap"]
    detectable = bool(lost) and min(lost) < 61 and any(i > min(lost) for i in range(62)
                                                       if i not in lost)
    assert bool(gaps) == detectable
    assert rebuild(rows) == reference_books(btc)


# ---- the pipeline against the simulated venues ---------------------------------------------
def served(sim: SimServer) -> list[dict[str, Any]]:
    return [msg(s.frame) for s in sim.sent]


def expected_trades(msgs: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    seen: set[tuple[str, str]] = set()
    rows = []
    for m in msgs:
        if m["topic"].startswith("publicTrade."):
            for t in m["data"]:
                if (t["s"], t["i"]) not in seen:
                    seen.add((t["s"], t["i"]))
                    rows.append((t["s"], t["i"], t["S"].lower(), float(t["p"]), float(t["v"]),
                                 t["T"] * 1_000_000))
    return rows


def expected_quotes(msgs: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    rows = []
    for m in msgs:
        if m["topic"].startswith("orderbook.1."):
            (bp, bq), (ap, aq) = m["data"]["b"][0], m["data"]["a"][0]
            rows.append((m["data"]["s"], float(bp), float(bq), float(ap), float(aq),
                         m["cts"] * 1_000_000))
    return rows


def book_rows(df: pl.DataFrame) -> list[tuple[Any, ...]]:
    return list(df.select("symbol", pl.col("ts_event").dt.epoch("ns"), "ts_recv", "recv_seq",
                          "is_snapshot", "side", "price", "amount", "update_id").iter_rows())


async def _run_pipeline(root: Path, exchange: str) -> tuple[SimServer, Any]:
    async with SimServer(exchange, rate_msgs_s=3000) as sim:
        feed = feed_for(sim, symbols=ALL_SYMBOLS, channels=CHANNELS, book_depth=200)
        cfg = make_config(root, [feed])
        n_data = len(TRADES) + len(BOOK) + len(BBO)
        n_acks = 3 if exchange == "bybit-spot" else 1

        def done(d: Any) -> bool:
            st = d.feed_stats.get(feed["name"])
            return st is not None and len(sim.sent) == n_data \
                and st.messages >= n_data + n_acks

        daemon = await run_daemon(cfg, done, timeout_s=8.0, settle_s=0.2)
    return sim, daemon.feed_stats[feed["name"]]


@pytest.mark.parametrize("exchange", ["bybit-linear", "bybit-spot"])
async def test_pipeline_lands_exactly_what_was_served(root: Path, exchange: str) -> None:
    sim, stats = await _run_pipeline(root, exchange)
    assert stats.parse_errors == {} and stats.gaps == 0 and stats.unknown_messages == 0
    assert dict(stats.drops) == {}
    msgs = served(sim)

    requests = sim.venue.requests  # type: ignore[attr-defined]
    assert [len(r["args"]) for r in requests] == ([10, 10, 4] if exchange == "bybit-spot"
                                                  else [24])

    trades = read_table(root, "trades")
    assert list(trades.select("symbol", "trade_id", "side", "price", "amount",
                              pl.col("ts_event").dt.epoch("ns")).iter_rows()) \
        == expected_trades(msgs)
    assert trades.height == 327 and set(trades["exchange"]) == {exchange}

    quotes = read_table(root, "quotes")
    assert list(quotes.select("symbol", "bid_price", "bid_amount", "ask_price", "ask_amount",
                              pl.col("ts_event").dt.epoch("ns")).iter_rows()) \
        == expected_quotes(msgs)

    book = read_table(root, "book")
    book_msgs = [m for m in msgs if m["topic"].startswith("orderbook.200.")]
    assert book.height == sum(len(m["data"]["b"]) + len(m["data"]["a"]) for m in book_msgs)
    assert rebuild(book_rows(book)) == reference_books(BOOK)
    # Every frame's rows share one recv_seq; frames are in served order per topic.
    per_frame = book.group_by("recv_seq", maintain_order=True).agg(
        pl.col("update_id").first(), pl.col("symbol").first(), pl.len())
    assert per_frame["recv_seq"].is_sorted() and per_frame["recv_seq"].n_unique() == \
        len(book_msgs)
    assert list(per_frame.select("symbol", "update_id").iter_rows()) == [
        (m["data"]["s"], m["data"]["u"]) for m in book_msgs]

    ev = read_table(root, "events")
    names = ev["event"].to_list()
    assert names[0] == "connected" and names[-1] == "disconnected"
    assert names.count("subscribed") == (3 if exchange == "bybit-spot" else 1)
    assert "gap" not in names and "refused" not in names


async def test_pipeline_heals_a_real_gap_by_resubscribing(root: Path) -> None:
    topic = "orderbook.200.BTCUSDT"
    async with SimServer("bybit-linear", rate_msgs_s=1500,
                         skip_frames=[(topic, 10)]) as sim:
        feed = feed_for(sim, symbols=BOOK_SYMBOLS, channels=["book"], book_depth=200)
        cfg = make_config(root, [feed])
        btc = topic_frames(topic)

        def done(d: Any) -> bool:
            st = d.feed_stats.get(feed["name"])
            sent = [s.frame for s in sim.sent]
            # The topic was served again from its snapshot, to its last frame, and read.
            return st is not None and sent.count(btc[0]) == 2 and sent[-1:] != [] \
                and btc[-1] in sent[sent.index(btc[0], 1):] \
                and st.messages >= len(sent) + 3  # + subscribe, unsubscribe, subscribe acks

        daemon = await run_daemon(cfg, done, timeout_s=8.0, settle_s=0.2)
    stats = daemon.feed_stats[feed["name"]]
    assert stats.gaps == 1 and stats.resyncs == 1 and stats.parse_errors == {}
    assert stats.drops["book_not_synced"] >= 1
    requests = sim.venue.requests  # type: ignore[attr-defined]
    assert [(r["op"], r["args"]) for r in requests[1:]] == [
        ("unsubscribe", [topic]), ("subscribe", [topic])]
    ev = read_table(root, "events").filter(pl.col("event").is_in(["gap", "resync"]))
    assert list(ev.select("symbol", "event").iter_rows()) == [("BTCUSDT", "gap"),
                                                              ("BTCUSDT", "resync")]
    assert ev["detail"][0] == f"{topic}: expected u=15076962, received u=15076963"
    assert rebuild(book_rows(read_table(root, "book"))) == reference_books(BOOK)


async def test_pipeline_rotation_is_seamless_in_live_mode(root: Path) -> None:
    """Make-before-break on the live timeline: the new connection's overlap is dropped by
    `u` and trade ids; no gap, no resync, nothing doubled."""
    async with SimServer("bybit-linear", rate_msgs_s=200, live=True) as sim:
        feed = feed_for(sim, symbols=ALL_SYMBOLS, channels=CHANNELS, rotate_after_s=0.7)
        cfg = make_config(root, [feed])
        daemon = await run_daemon(cfg, lambda d: sim.timeline_done, timeout_s=9.0,
                                  settle_s=0.3)
    st = daemon.feed_stats[feed["name"]]
    assert st.reconnects >= 1 and st.gaps == 0 and st.resyncs == 0
    assert st.parse_errors == {} and st.drops["stale_book_update"] >= 1
    trades = read_table(root, "trades")
    assert trades.height == trades.select("symbol", "trade_id").n_unique() == 327
    book = read_table(root, "book")
    assert book.height == sum(len(msg(f)["data"]["b"]) + len(msg(f)["data"]["a"])
                              for f in BOOK)
    assert rebuild(book_rows(book)) == reference_books(BOOK)
    quotes = read_table(root, "quotes")
    states = {(m["data"]["s"], float(m["data"]["b"][0][0]), float(m["data"]["b"][0][1]),
               float(m["data"]["a"][0][0]), float(m["data"]["a"][0][1]))
              for m in map(msg, BBO)}
    assert set(quotes.select("symbol", "bid_price", "bid_amount", "ask_price",
                             "ask_amount").iter_rows()) == states
    assert quotes.height <= len(BBO)
    ev = read_table(root, "events")
    assert ev.filter(pl.col("detail").str.starts_with("rotated")).height == st.reconnects


async def test_simulated_venues_speak_the_bybit_protocol() -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    async with SimServer("bybit-spot") as sim:
        async with connect(f"{sim.url}/v5/public/spot") as ws:
            await ws.send('{"op":"ping"}')
            pong = json.loads(await ws.recv())
            assert pong["success"] is True and pong["ret_msg"] == "pong" \
                and pong["op"] == "ping" and "req_id" not in pong  # spot's pong shape
            eleven = [f"publicTrade.SYM{i}" for i in range(11)]
            await ws.send(json.dumps({"op": "subscribe", "args": eleven, "req_id": "a"}))
            refused = json.loads(await ws.recv())
            assert refused["success"] is False and refused["req_id"] == "a"
            await ws.send('{"op":"subscribe","args":["nonsense.BTCUSDT"]}')
            assert json.loads(await ws.recv())["ret_msg"] == \
                "error:handler not found,topic:nonsense.BTCUSDT"
            await ws.send('{"op":"subscribe","args":["publicTrade.BTCUSDT"]}')
            ack = json.loads(await ws.recv())
            assert ack == {"success": True, "ret_msg": "subscribe", "conn_id": ack["conn_id"],
                           "op": "subscribe"}  # the recorded spot ack shape
            want = [f for f in TRADES if msg(f)["topic"] == "publicTrade.BTCUSDT"]
            got = [await ws.recv(decode=False) for _ in want]
            assert got == want  # byte for byte
        with pytest.raises(ConnectionClosed):  # the linear path is not served here
            async with connect(f"{sim.url}/v5/public/linear") as ws:
                await ws.recv()
    async with SimServer("bybit-linear") as sim, \
            connect(f"{sim.url}/v5/public/linear") as ws:
        await ws.send('{"op":"ping","req_id":"p"}')
        assert json.loads(await ws.recv()) == {
            "success": True, "ret_msg": "pong", "conn_id": "sim0001-bybit-linear",
            "req_id": "p", "op": "ping"}


# ---- linear derivatives and liquidations ------------------------------------------------------
def test_linear_tickers_derivatives_merge_deltas_golden() -> None:
    recorded = frames("bybit", "tickers_linear_ETHUSDT.jsonl")
    c = codec(BybitLinear, ["ETHUSDT"], ["derivatives"])
    rows = []
    for i, f in enumerate(recorded):
        out = c.parse(f, 10 + i, 100 + i)
        assert out.error is None
        rows.extend(out.rows("derivatives"))
    # The snapshot, spelled out (mark, index, funding, predicted, oi, next funding).
    assert rows[0] == ("ETHUSDT", 1786310818974_000_000, 10, 100, 1922.43, 1923.16,
                       0.00004617, None, 830090.65, 1786320000000_000_000)
    # Replaying the deltas by hand: every row is the merge of all fields sent so far;
    # a delta carrying none of them (best bid/ask only) writes no row.
    latest: dict[str, Any] = {}
    expected = []
    for i, f in enumerate(recorded):
        msg = json.loads(f)
        d = msg["data"]
        sent = {k: d[k] for k in ("markPrice", "indexPrice", "fundingRate", "openInterest",
                                  "nextFundingTime") if k in d}
        latest.update(sent)
        if sent:
            expected.append(("ETHUSDT", msg["ts"] * 1_000_000, 10 + i, 100 + i,
                             float(latest["markPrice"]), float(latest["indexPrice"]),
                             float(latest["fundingRate"]), None,
                             float(latest["openInterest"]),
                             int(latest["nextFundingTime"]) * 1_000_000))
    assert rows == expected and len(rows) == 21
    # The recorded fundingRate change delta is carried into every later row.
    assert rows[-1][6] == 0.00004709
    assert any(r[6] == 0.00004617 for r in rows) and rows[-1][4:6] == (1922.58, 1923.2)


def test_linear_tickers_btc_golden_and_unsubscribed_dropped() -> None:
    recorded = frames("bybit", "tickers_linear_BTCUSDT.jsonl")
    c = codec(BybitLinear, ["BTCUSDT"], ["derivatives"])
    rows = [r for i, f in enumerate(recorded) for r in c.parse(f, i, i).rows("derivatives")]
    assert len(rows) == 64
    assert rows[1] == ("BTCUSDT", 1786310818183_000_000, 2, 2, 65117.43, 65137.76, 0.0001,
                       None, 59891.732, 1786320000000_000_000)
    eth = codec(BybitLinear, ["BTCUSDT"], ["derivatives"]).parse(
        frames("bybit", "tickers_linear_ETHUSDT.jsonl")[0], 1, 1)
    assert eth.drops == {"unsubscribed_symbol": 1} and not eth.has_rows


def test_linear_all_liquidation_golden_side_is_the_order_side() -> None:
    recorded = frames("bybit", "allLiquidation.jsonl")
    c = codec(BybitLinear, ["BTCUSDT"], ["liquidations"])
    first = c.parse(recorded[0], 1, 1)   # STRKUSDT: not subscribed
    assert first.drops == {"unsubscribed_symbol": 1} and not first.has_rows
    out = c.parse(recorded[1], 2, 2)
    # S = "Buy" names the liquidated long: the liquidation order sells.
    assert out.rows("liquidations") == [
        ("BTCUSDT", 1791565600992_000_000, 2, 2, "sell", 82396.9, 0.006, None),
        ("BTCUSDT", 1791565601058_000_000, 2, 2, "sell", 82394.3, 0.038, None)]


def test_linear_derivative_topics_and_spot_rejects_them() -> None:
    c = codec(BybitLinear, ["BTCUSDT"], ["trades", "derivatives", "liquidations"])
    assert json.loads(c.subscribe_messages()[0])["args"] == [
        "publicTrade.BTCUSDT", "tickers.BTCUSDT", "allLiquidation.BTCUSDT"]
    for channel in ("derivatives", "liquidations"):
        with pytest.raises(ConfigError) as e:
            parse_config({"storage": {"root": "/x"}, "feeds": [
                {"name": "s", "exchange": "bybit-spot", "symbols": ["BTCUSDT"],
                 "channels": ["trades", channel]}]})
        assert channel in str(e.value.problems)


def test_linear_derivatives_state_round_trips() -> None:
    recorded = frames("bybit", "tickers_linear_ETHUSDT.jsonl")
    c = codec(BybitLinear, ["ETHUSDT"], ["derivatives"])
    c.parse(recorded[0], 1, 1)
    again = codec(BybitLinear, ["ETHUSDT"], ["derivatives"])
    again.restore(json.loads(json.dumps(c.state())))
    delta = next(f for f in recorded[1:] if b'"markPrice"' in f)
    assert again.parse(delta, 2, 2).rows("derivatives") == c.parse(delta, 2, 2).rows(
        "derivatives")
