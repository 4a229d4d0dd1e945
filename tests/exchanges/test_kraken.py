"""Kraken spot WebSocket v2 codec and simulated venue, on the recorded frames."""

from __future__ import annotations

import calendar
import json
import math
import re
import zlib
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

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
from ingestd.exchanges.book import MAX_VERIFY_FAILURES as MAX_RESYNC_ATTEMPTS
from ingestd.exchanges.book import SNAPSHOT_WAIT_DROPS, SNAPSHOT_WAIT_S
from ingestd.exchanges.kraken import Kraken, book_checksum
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
from ingestd.sim.recorded import frames
from ingestd.sim.venues import VENUES
from ingestd.sim.venues.kraken import KrakenVenue
from tests.support import (
    Books,
    apply_book_rows,
    book_table_rows,
    feed_for,
    make_config,
    read_table,
    run_daemon,
)

BOOK = frames("kraken", "book.jsonl")
TRADES = frames("kraken", "trade.jsonl")
TICKER = frames("kraken", "ticker.jsonl")
CONTROL = frames("kraken", "subscribe.jsonl")
PING = frames("kraken", "ping.jsonl")
HEARTBEAT = frames("kraken", "heartbeat.jsonl")
SYM = "BTC/USD"
TS = 1_800_000_000_000_000_000


def codec(symbols: tuple[str, ...] = (SYM,),
          channels: tuple[str, ...] = ("trades", "quotes", "book"),
          depth: int | None = None) -> Kraken:
    feed = FeedConfig(name="kraken-test", exchange="kraken", symbols=symbols,
                      channels=channels, book_depth=depth)  # type: ignore[arg-type]
    return Kraken(feed)


def iso_ns(text: str) -> int:
    """Independent RFC 3339 (µs, Z) -> ns for the golden values."""
    whole, frac = text.rstrip("Z").split(".")
    secs = calendar.timegm(datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").timetuple())
    return secs * 1_000_000_000 + int(frac.ljust(9, "0"))


def raw(frame: bytes) -> dict[str, Any]:
    """A frame with every number kept as its token text."""
    msg: dict[str, Any] = json.loads(frame, parse_float=str, parse_int=str)
    return msg


def events(out: Output, kind: str | None = None) -> list[tuple[Any, ...]]:
    return [e for e in out.rows("events") if kind is None or e[5] == kind]


# ---- a reference book, independent of the codec -----------------------------------------
class RefBook:
    """Kraken's documented client procedure on the token text of the numbers."""

    def __init__(self, depth: int = 25) -> None:
        self.depth = depth
        self.bids: dict[float, tuple[str, str]] = {}
        self.asks: dict[float, tuple[str, str]] = {}

    def apply(self, frame: bytes) -> int:
        """Apply one book frame; return the venue's checksum for it."""
        msg = raw(frame)
        d = msg["data"][0]
        if msg["type"] == "snapshot":
            self.bids, self.asks = {}, {}
        for side, levels in ((self.bids, d["bids"]), (self.asks, d["asks"])):
            for lv in levels:
                p, q = lv["price"], lv["qty"]
                if float(q) == 0:
                    side.pop(float(p), None)
                else:
                    side[float(p)] = (p, q)
        for side, descending in ((self.bids, True), (self.asks, False)):
            for px in sorted(side, reverse=descending)[self.depth:]:
                del side[px]
        return int(d["checksum"])

    def ordered(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        bids = [self.bids[p] for p in sorted(self.bids, reverse=True)]
        asks = [self.asks[p] for p in sorted(self.asks)]
        return bids, asks

    def checksum(self, text: bool = True) -> int:
        bids, asks = self.ordered()
        parts = []
        for p, q in asks[:10] + bids[:10]:
            if not text:  # what a float round-trip would give
                p, q = repr(float(p)), repr(float(q))
            parts.append(p.replace(".", "").lstrip("0") + q.replace(".", "").lstrip("0"))
        return zlib.crc32("".join(parts).encode())

    def as_floats(self) -> dict[str, dict[float, float]]:
        return {"bid": {p: float(q) for p, (_, q) in self.bids.items()},
                "ask": {p: float(q) for p, (_, q) in self.asks.items()}}


rebuild = apply_book_rows

def synthetic_update(ref: RefBook, bids: list[tuple[str, str]], asks: list[tuple[str, str]],
                     checksum: int | None = None) -> bytes:
    """A book update in Kraken's exact shape; its checksum from the reference book."""
    def levels(lv: list[tuple[str, str]]) -> str:
        return ",".join(f'{{"price":{p},"qty":{q}}}' for p, q in lv)
    body = (f'{{"symbol":"{SYM}","bids":[{levels(bids)}],"asks":[{levels(asks)}],'
            f'"checksum":CHECKSUM,"timestamp":"2026-08-16T23:40:00.000001Z"}}')
    frame = ('{"channel":"book","type":"update","data":[' + body + "]}").encode()
    ref.apply(frame.replace(b"CHECKSUM", b"0"))  # the venue's book after this update
    if checksum is None:
        checksum = ref.checksum()
    return frame.replace(b"CHECKSUM", str(checksum).encode())


# ---- config, subscriptions, keepalive ------------------------------------------------------
def test_registered() -> None:
    assert CODECS["kraken"] is Kraken
    assert VENUES["kraken"].exchange == "kraken"


def test_subscribe_messages() -> None:
    msgs = [json.loads(m) for m in codec(symbols=(SYM, "MINA/GBP")).subscribe_messages()]
    assert msgs == [
        {"method": "subscribe", "params": {"channel": "trade", "symbol": [SYM, "MINA/GBP"],
                                           "snapshot": True}, "req_id": 1},
        {"method": "subscribe", "params": {"channel": "ticker", "symbol": [SYM, "MINA/GBP"],
                                           "event_trigger": "bbo", "snapshot": True},
         "req_id": 2},
        {"method": "subscribe", "params": {"channel": "book", "symbol": [SYM, "MINA/GBP"],
                                           "depth": 25, "snapshot": True}, "req_id": 3},
    ]
    only_book = codec(channels=("book",), depth=100).subscribe_messages()
    assert [json.loads(m)["params"]["depth"] for m in only_book] == [100]
    assert Kraken.default_ws_url == "wss://ws.kraken.com/v2"


def test_check_feed() -> None:
    def problems(**keys: Any) -> list[str]:
        feed = {"name": "k", "exchange": "kraken", "symbols": [SYM],
                "channels": ["book"], **keys}
        try:
            parse_config({"storage": {"root": "/tmp/x"}, "feeds": [feed]})
        except ConfigError as e:
            return e.problems
        return []

    assert problems() == []
    assert problems(symbols=["BTC/USD", "MINA/GBP", "1INCH/EUR"]) == []
    for depth in (10, 25, 100, 500, 1000):
        assert problems(book_depth=depth) == []
    assert any("book_depth" in p for p in problems(book_depth=20))
    assert any("trade_stream" in p for p in problems(trade_stream="trade"))
    for bad in ("BTCUSD", "BTC/", "/USD", "BTC/USD/EUR", "BTC USD/X"):
        assert any("Kraken v2 spelling" in p for p in problems(symbols=[bad])), bad
    assert any("BTC" in p and "XBT" in p for p in problems(symbols=["XBT/USD"]))


def test_keepalive_ping_and_pong() -> None:
    c = codec()
    assert Kraken.keepalive_interval_s
    first, second = json.loads(c.keepalive_message() or ""), json.loads(
        c.keepalive_message() or "")
    assert first["method"] == second["method"] == "ping"
    assert second["req_id"] == first["req_id"] + 1
    assert set(first) == {"method", "req_id"}
    # The documented request shape is what we send.
    assert set(json.loads(PING[0])) == set(first)
    pong = c.parse(PING[1], TS, 1)
    assert pong.error is None and not pong.unknown and not pong.has_rows


# ---- trades --------------------------------------------------------------------------------
def test_trades_golden() -> None:
    out = codec().parse(TRADES[0], TS, 7)
    assert out.error is None
    assert out.rows("trades") == [(SYM, iso_ns("2026-09-25T17:48:26.844359Z"), TS, 7, "109116693",
                           "buy", 83744.3, 0.00044780)]
    assert out.rows("trades")[0][1] == 1_790_358_506_844_359_000
    out = codec().parse(TRADES[1], TS, 8)
    assert out.rows("trades") == [(SYM, iso_ns("2024-08-12T19:38:30.575191Z"), TS, 8, "72823289",
                           "sell", 59121.8, 0.00022946)]


def test_side_is_the_takers_side() -> None:
    """The recorded `buy` printed at the ask of the same instant: the taker bought."""
    trade = json.loads(TRADES[0])["data"][0]
    ticker = json.loads(TICKER[0])["data"][0]
    assert trade["timestamp"] == ticker["timestamp"]
    assert trade["price"] == ticker["ask"] == ticker["last"] > ticker["bid"]
    assert trade["side"] == "buy"
    assert codec().parse(TRADES[0], TS, 1).rows("trades")[0][5] == "buy"


def _trade_frame(ids: list[int], kind: str = "update") -> bytes:
    base = json.loads(TRADES[0])["data"][0]
    data = [{**base, "trade_id": i} for i in ids]
    return json.dumps({"channel": "trade", "type": kind, "data": data}).encode()


def test_trade_replays_are_dropped_and_id_jumps_are_gaps() -> None:
    c = codec()
    assert [r[4] for r in c.parse(_trade_frame([100, 101, 102]), TS, 1).rows("trades")] == [
        "100", "101", "102"]
    replay = c.parse(TRADES[0].replace(b"109116693", b"101"), TS, 2)
    assert not replay.trades and replay.drops == {DROP_DUPLICATE_TRADE: 1}
    # A (re)subscribe snapshot overlapping what we have, newest first, with a hole: taken
    # in id order, so the hole is one gap (not an out-of-order story).
    out = c.parse(_trade_frame([106, 105, 102, 101, 103], "snapshot"), TS, 3)
    assert [r[4] for r in out.rows("trades")] == ["103", "105", "106"]
    assert out.drops == {DROP_DUPLICATE_TRADE: 2}
    assert [(e[0], e[5], e[6]) for e in events(out)] == [
        (SYM, EV_GAP, "trade id expected 104, got 105 (1 missing)")]
    # The remembered ids survive a reconnect.
    c.on_connect()
    assert c.parse(_trade_frame([106]), TS, 4).drops == {DROP_DUPLICATE_TRADE: 1}


def test_never_seen_lower_trade_id_is_stored_with_an_event() -> None:
    """A trade id below the highest seen but never seen before (the hole of a gap, filled
    late) is a real trade: stored once with an `out_of_order` event; its replay, like any
    other, is a duplicate."""
    c = codec()
    assert [r[4] for r in c.parse(_trade_frame([100, 101, 105]), TS, 1).rows("trades")] == [
        "100", "101", "105"]
    late = c.parse(_trade_frame([103]), TS, 2)
    assert late.rows("trades") == [(SYM, iso_ns("2026-09-25T17:48:26.844359Z"), TS, 2, "103",
                                    "buy", 83744.3, 0.0004478)]
    ((sym, _te, _tr, seq, feed, event, detail),) = late.rows("events")
    assert (sym, seq, feed, event) == (SYM, 2, "kraken-test", EV_OUT_OF_ORDER)
    assert "103" in detail and "105" in detail
    replay = c.parse(_trade_frame([105, 103, 101, 100]), TS, 3)
    assert not replay.trades and not replay.events
    assert replay.drops == {DROP_DUPLICATE_TRADE: 4}
    # The other hole is still open: 104 is new (out of order), 106 continues.
    out = c.parse(_trade_frame([104, 106]), TS, 4)
    assert [r[4] for r in out.rows("trades")] == ["104", "106"]
    assert [e[5] for e in events(out)] == [EV_OUT_OF_ORDER]


def test_unknown_trade_side_is_unknown() -> None:
    out = codec().parse(TRADES[0].replace(b'"side":"buy"', b'"side":"other"'), TS, 1)
    assert out.rows("trades")[0][5] == "unknown"


# ---- quotes --------------------------------------------------------------------------------
def test_ticker_quotes_golden() -> None:
    out = codec().parse(TICKER[0], TS, 3)
    assert out.rows("quotes") == [(SYM, iso_ns("2026-09-25T17:48:26.844359Z"), TS, 3,
                           83744.2, 0.56251979, 83744.3, 0.00044780)]


def test_ticker_empty_side_is_null() -> None:
    frame = TICKER[0].replace(b'"bid":83744.2,"bid_qty":0.56251979,', b"")
    out = codec().parse(frame, TS, 3)
    assert out.rows("quotes")[0][4:] == (None, None, 83744.3, 0.0004478)


# ---- book ------------------------------------------------------------------------------------
def test_checksum_matches_every_recorded_book_frame() -> None:
    ref = RefBook()
    float_matches = 0
    for frame in BOOK:
        expected = ref.apply(frame)
        assert ref.checksum() == expected
        bids, asks = ref.ordered()
        assert book_checksum(asks, bids) == expected
        float_matches += ref.checksum(text=False) == expected
    assert len(BOOK) == 52
    # The numbers must be taken as sent: a float round-trip breaks most checksums.
    assert float_matches < len(BOOK)

    c = codec()
    for i, frame in enumerate(BOOK):
        out = c.parse(frame, TS + i, i + 1)
        assert out.error is None and out.replies is None
        assert events(out) == [], i


def test_book_snapshot_golden() -> None:
    out = codec().parse(BOOK[0], TS, 5)
    rows = out.rows("book")
    assert len(rows) == 50
    ts = iso_ns("2026-08-16T23:37:03.693545Z")
    assert rows[0] == (SYM, ts, TS, 5, True, "bid", 62802.5, 0.02987767, None)
    assert rows[1] == (SYM, ts, TS, 5, True, "bid", 62800.7, 0.05598472, None)
    assert rows[2] == (SYM, ts, TS, 5, True, "bid", 62800.6, 0.000051, None)
    assert rows[25] == (SYM, ts, TS, 5, True, "ask", 62802.6, 1.09074394, None)
    assert rows[-1] == (SYM, ts, TS, 5, True, "ask", 62818.7, 0.00222509, None)
    assert {r[3] for r in rows} == {5} and all(r[4] for r in rows)
    assert events(out) == []  # the first snapshot is not a resync


def test_book_updates_golden_including_truncation() -> None:
    c = codec()
    outs = [c.parse(f, TS + i, i) for i, f in enumerate(BOOK[:5])]
    ts1 = iso_ns("2026-08-16T23:37:03.745044Z")
    assert outs[1].rows("book") == [
        (SYM, ts1, TS + 1, 1, False, "ask", 62807.0, 0.0, None),
        (SYM, ts1, TS + 1, 1, False, "ask", 62818.8, 0.65540712, None),
        (SYM, ts1, TS + 1, 1, False, "ask", 62803.8, 4.58618079, None),
    ]
    # Frame 4 inserts bid 62791.6: the 26th bid (62786.0) falls out of depth 25 and Kraken
    # does not say so: the codec writes the removal.
    ts4 = iso_ns("2026-08-16T23:37:03.766178Z")
    assert outs[4].rows("book") == [
        (SYM, ts4, TS + 4, 4, False, "bid", 62791.6, 0.15923399, None),
        (SYM, ts4, TS + 4, 4, False, "bid", 62786.0, 0.0, None),
    ]


def test_book_rebuilt_from_rows_equals_venue_book_after_every_frame() -> None:
    c = codec()
    ref = RefBook()
    books: dict[str, dict[str, dict[float, float]]] = {}
    snap_seq: dict[str, int] = {}
    removals = 0
    for i, frame in enumerate(BOOK):
        ref.apply(frame)
        out = c.parse(frame, TS + i, i + 1)
        rows = out.rows("book")
        assert len({(r[5], r[6]) for r in rows}) == len(rows)  # netted: order-free
        assert {r[3] for r in rows} == {i + 1}
        sent = raw(frame)["data"][0]
        sent_qty = {("bid", float(lv["price"])): float(lv["qty"]) for lv in sent["bids"]}
        sent_qty.update({("ask", float(lv["price"])): float(lv["qty"]) for lv in sent["asks"]})
        # Removals the venue did not send: levels truncated at depth 25.
        removals += sum(1 for r in rows if r[7] == 0 and sent_qty.get((r[5], r[6])) != 0)
        rebuild(rows, books, snap_seq)
        assert books[SYM] == ref.as_floats(), i
        assert len(books[SYM]["bid"]) == len(books[SYM]["ask"]) == 25
        levels = c.book_levels(SYM)
        assert levels is not None
        assert dict(levels[0]) == books[SYM]["bid"] and dict(levels[1]) == books[SYM]["ask"]
    assert removals == 26  # levels pushed beyond depth 25 in the recording


def test_depth_10_truncates_the_snapshot_and_keeps_checksums() -> None:
    c = codec(depth=10)
    out = c.parse(BOOK[0], TS, 1)
    rows = out.rows("book")
    assert [r[5] for r in rows] == ["bid"] * 10 + ["ask"] * 10
    assert events(out) == []  # top 10 unchanged: checksum still verified


def test_level_inserted_beyond_depth_is_written_as_removed() -> None:
    c = codec()
    ref = RefBook()
    ref.apply(BOOK[0])
    c.parse(BOOK[0], TS, 1)
    frame = synthetic_update(ref, [("62700.0", "1.00000000")], [])
    out = c.parse(frame, TS, 2)
    assert events(out) == []
    assert out.rows("book") == [(SYM, iso_ns("2026-08-16T23:40:00.000001Z"), TS, 2, False, "bid",
                         62700.0, 0.0, None)]
    # A level inserted inside the book and deleted again in one frame nets to one row.
    frame = synthetic_update(ref, [("62802.9", "1.00000000"), ("62802.9", "0.00000000")], [])
    out = c.parse(frame, TS, 3)
    assert events(out) == []
    assert out.rows("book") == [(SYM, iso_ns("2026-08-16T23:40:00.000001Z"), TS, 3, False, "bid",
                         62802.9, 0.0, None)]


def test_checksum_mismatch_is_a_gap_then_resubscribe_then_resync() -> None:
    c = codec()
    c.parse(BOOK[0], TS, 1)
    expected = raw(BOOK[1])["data"][0]["checksum"]
    bad = BOOK[1].replace(f'"checksum":{expected}'.encode(), b'"checksum":12345')
    out = c.parse(bad, TS, 2)
    assert not out.book
    gaps = events(out, EV_GAP)
    assert len(gaps) == 1 and gaps[0][0] == SYM
    assert re.fullmatch(rf"checksum mismatch: expected 12345, computed {expected}", gaps[0][6])
    assert [json.loads(r) for r in out.replies or []] == [
        {"method": "unsubscribe", "params": {"channel": "book", "symbol": [SYM], "depth": 25},
         "req_id": 4},
        {"method": "subscribe", "params": {"channel": "book", "symbol": [SYM], "depth": 25,
                                           "snapshot": True}, "req_id": 3},
    ]
    assert c.book_levels(SYM) is None
    # Updates still in flight are dropped (counted) until the fresh snapshot.
    for i, frame in enumerate(BOOK[2:6]):
        dropped = c.parse(frame, TS, 3 + i)
        assert not dropped.book and dropped.drops == {DROP_UNSYNCED_BOOK: 1}
    # The unsubscribe/subscribe acks are consumed; the new snapshot is a resync.
    unsub_ack = (b'{"method":"unsubscribe","result":{"channel":"book","depth":25,'
                 b'"symbol":"BTC/USD"},"success":true,"req_id":4}')
    assert not c.parse(unsub_ack, TS, 10).has_rows
    out = c.parse(BOOK[0], TS, 11)
    assert len(out.rows("book")) == 50
    assert [(e[0], e[5], e[6]) for e in events(out)] == [
        (SYM, EV_RESYNC, "book snapshot after checksum gap")]
    # Streaming resumes with verified updates.
    for i, frame in enumerate(BOOK[1:], start=12):
        assert events(c.parse(frame, TS, i)) == []


def test_lost_update_is_caught_by_the_checksum() -> None:
    c = codec()
    c.parse(BOOK[0], TS, 1)
    out = c.parse(BOOK[2], TS, 2)  # BOOK[1] (ask 62807.0 deleted) never arrived
    assert len(events(out, EV_GAP)) == 1 and out.replies is not None


def test_snapshot_that_never_verifies_is_eventually_kept_unverified() -> None:
    c = codec()
    expected = raw(BOOK[0])["data"][0]["checksum"]
    bad = BOOK[0].replace(f'"checksum":{expected}'.encode(), b'"checksum":1')
    for attempt in range(MAX_RESYNC_ATTEMPTS):
        out = c.parse(bad, TS, attempt + 1)
        assert not out.book and len(events(out, EV_GAP)) == 1 and out.replies
    out = c.parse(bad, TS, 10)
    assert len(out.rows("book")) == 50 and out.replies is None
    assert [e[5] for e in events(out)] == [EV_ERROR, EV_RESYNC]
    # Without verification the (correct) updates apply; a reconnect verifies again.
    assert events(c.parse(BOOK[1], TS, 11)) == []
    c.on_connect()
    assert c.book_levels(SYM) is None
    assert events(c.parse(BOOK[0], TS, 12), EV_RESYNC)
    assert events(c.parse(BOOK[1], TS, 13)) == []


def test_reconnect_discards_book_and_next_snapshot_is_resync() -> None:
    c = codec()
    c.parse(BOOK[0], TS, 1)
    c.on_connect()
    dropped = c.parse(BOOK[1], TS, 2)
    assert dropped.drops == {DROP_UNSYNCED_BOOK: 1}
    out = c.parse(BOOK[0], TS, 3)
    assert [e[6] for e in events(out, EV_RESYNC)] == ["book snapshot after reconnect"]


def test_unsolicited_snapshot_on_a_synced_book_is_a_resync() -> None:
    c = codec()
    c.parse_batch(BOOK[:3], TS, 1)
    out = c.parse(BOOK[0], TS, 4)
    assert len(out.rows("book")) == 50 and out.replies is None
    assert [(e[5], e[6]) for e in events(out)] == [
        (EV_RESYNC, "book snapshot replacing a synced book")]
    assert events(c.parse(BOOK[1], TS, 5)) == []


def test_updates_without_snapshot_eventually_resubscribe() -> None:
    """The shared rule (exchanges/book.py): a book still waiting for the snapshot its
    subscription brings is resubscribed after SNAPSHOT_WAIT_DROPS dropped updates (or
    SNAPSHOT_WAIT_S of receive time), then again with backoff - it was a reconnect after
    1000 updates before BookSync had one rule for every venue."""
    c = codec()
    asked = []
    for i in range(SNAPSHOT_WAIT_DROPS):
        out = c.parse(BOOK[1], TS, i + 1)
        assert out.drops == {DROP_UNSYNCED_BOOK: 1} and out.reconnect is None
        if out.replies:
            asked.append(i + 1)
            assert [json.loads(r)["method"] for r in out.replies] == ["unsubscribe",
                                                                      "subscribe"]
    assert asked == [SNAPSHOT_WAIT_DROPS]
    # Receive time counts too; each further attempt waits twice as long.
    wait = int(SNAPSHOT_WAIT_S * 1e9)
    assert c.parse(BOOK[1], TS + wait, 1000).replies
    assert not c.parse(BOOK[1], TS + 2 * wait, 1001).replies
    assert c.parse(BOOK[1], TS + 3 * wait, 1002).replies


# ---- explicit state, batches ------------------------------------------------------------------
def reference_after(frames_: Sequence[bytes]) -> dict[str, dict[str, dict[float, float]]]:
    ref = RefBook()
    for frame in frames_:
        ref.apply(frame)
    return {SYM: ref.as_floats()}


def test_state_round_trips_as_json_and_the_book_continues_without_a_resync() -> None:
    """state() -> JSON -> a fresh codec: a replay of stored trades is dropped, and the book
    continues exactly as in the codec that never stopped, its checksums still verified on
    the level text as sent (kept in the state)."""
    c = codec()
    kept = c.parse_batch([*BOOK[:20], TRADES[1], TRADES[0], TICKER[0]], TS, 1)
    assert kept.rejects is None and len(kept.rows("trades")) == 2
    saved = orjson.loads(orjson.dumps(c.state()))
    assert saved["v"] == Kraken.STATE_VERSION and saved["exchange"] == "kraken"
    assert set(saved["parts"]) == {"trades", "books"}
    # The level text as sent, not a float's repr (0.000051 would be "5.1e-05").
    assert [62800.6, 0.000051, "62800.6", "0.00005100"] in saved["parts"]["books"][SYM]["bids"]
    fresh = codec()
    fresh.restore(saved)
    assert orjson.loads(orjson.dumps(fresh.state())) == saved
    assert fresh.book_levels(SYM) == c.book_levels(SYM) is not None
    replay = fresh.parse_batch([TRADES[1], TRADES[0]], TS, 100)
    assert not replay.trades and not replay.events
    assert replay.drops == {DROP_DUPLICATE_TRADE: 2}
    cont = c.parse_batch(BOOK[20:], TS + 1, 200)
    restored = fresh.parse_batch(BOOK[20:], TS + 1, 200)
    assert restored.rejects is None and not restored.events and restored.replies is None
    assert restored.drops is None
    assert restored.rows("book") and restored.rows("book") == cont.rows("book")
    assert rebuild(kept.rows("book") + restored.rows("book")) == {SYM: final_reference_book()}


def test_state_taken_during_a_resubscription_resumes_it() -> None:
    """Mid-resync state (the pending resubscription) goes through JSON too: the restored
    codec still drops updates until the snapshot, recycles the connection if its own
    resubscription is refused, and writes the snapshot as a resync after the gap."""
    c = codec()
    c.parse(BOOK[0], TS, 1)
    assert events(c.parse(BOOK[2], TS, 2), EV_GAP)  # BOOK[1] lost
    fresh = codec()
    fresh.restore(orjson.loads(orjson.dumps(c.state())))
    assert fresh.book_levels(SYM) is None
    assert fresh.parse(BOOK[3], TS, 3).drops == {DROP_UNSYNCED_BOOK: 1}
    refusal = (b'{"error":"Rate limit exceeded","method":"subscribe","success":false,'
               b'"symbol":"BTC/USD","req_id":3}')
    assert fresh.parse(refusal, TS, 4).reconnect is not None
    out = fresh.parse(BOOK[0], TS, 5)
    assert [(e[5], e[6]) for e in events(out)] == [
        (EV_RESYNC, "book snapshot after checksum gap")]
    for i, frame in enumerate(BOOK[1:], start=6):
        assert events(fresh.parse(frame, TS, i)) == []


def test_restore_refuses_garbage_and_other_versions() -> None:
    c = codec()
    c.parse_batch([BOOK[0], TRADES[0]], TS, 1)
    saved = orjson.loads(orjson.dumps(c.state()))
    parts = saved["parts"]
    book = parts["books"][SYM]

    def with_book(**keys: Any) -> dict[str, Any]:
        return {**saved, "parts": {**parts, "books": {SYM: {**book, **keys}}}}

    first_bid = book["bids"][0]
    bad: Any
    for bad in (None, [], "x", {"v": 999, "exchange": "kraken", "parts": {}},
                {**saved, "v": saved["v"] + 1}, {**saved, "exchange": "binance"},
                {**saved, "parts": None},
                {**saved, "parts": {**parts, "trades": {"ints": {SYM: [[5, 1], [2]]}}}},
                {**saved, "parts": {**parts, "books": [1, 2]}},
                with_book(status=7),
                with_book(bids=[lv[:2] for lv in book["bids"]]),          # no text
                with_book(bids=[[*first_bid[:2], "1.0", first_bid[3]], *book["bids"][1:]]),
                with_book(bids=[[first_bid[0], -1.0, first_bid[2], "-1.0"]]),
                with_book(asks=[["abc", 1.0, "abc", "1.0"]]),
                with_book(asked_ns="soon"), with_book(dropped=-1),
                with_book(after_gap=1), with_book(unverified="x"),
                with_book(verify_failures=-1)):
        with pytest.raises(StateError):
            codec().restore(bad)
    codec().restore(saved)  # the untouched state is fine


def test_a_bad_frame_in_a_batch_keeps_its_neighbours() -> None:
    c = codec()
    bad = BOOK[2].replace(b'"qty":0.01313995', b'"qty":"x"')
    out = c.parse_batch([BOOK[0], BOOK[1], bad, BOOK[2], TRADES[0]], TS, 20)
    assert out.rejects is not None and [i for i, _ in out.rejects] == [2]
    assert sorted({r[3] for r in out.rows("book")}) == [20, 21, 23]
    assert [r[3] for r in out.rows("trades")] == [24]
    # The rejected frame changed nothing: the next one still verifies its checksum.
    assert not out.events and out.drops is None and out.replies is None
    assert rebuild(out.rows("book")) == reference_after(BOOK[:3])


# ---- control frames ------------------------------------------------------------------------
def test_status_acks_refusals_heartbeat() -> None:
    c = codec(symbols=(SYM, "MINA/GBP"))
    outs = [c.parse(f, TS, i) for i, f in enumerate(CONTROL)]
    # Lines 1-2 are the client's own subscribe requests: not something a venue sends.
    assert outs[0].unknown and outs[1].unknown
    assert [e[6] for e in events(outs[6])] == [
        "system=online version=2.0.10 api_version=v2 connection_id=18125794168470749634"]
    assert [(e[0], e[5], e[6]) for e in events(outs[3])] == [
        (SYM, EV_SUBSCRIBED, "book depth=25")]
    assert [(e[0], e[5], e[6]) for e in events(outs[7])] == [(SYM, EV_SUBSCRIBED, "trade")]
    assert [(e[0], e[5], e[6]) for e in events(outs[8])] == [
        ("XBT/USD", EV_REFUSED, "Currency pair not supported XBT/USD")]
    assert [(e[0], e[5]) for e in events(outs[9])] == [(None, EV_REFUSED)]
    assert all(o.error is None for o in outs)
    for hb in HEARTBEAT:
        out = c.parse(hb, TS, 1)
        assert not out.has_rows and not out.unknown and out.error is None


def test_refusal_names_the_channel_from_req_id() -> None:
    frame = (b'{"error":"Currency pair not supported FOO/USD","method":"subscribe",'
             b'"success":false,"symbol":"FOO/USD","req_id":2}')
    out = codec().parse(frame, TS, 1)
    assert [(e[0], e[6]) for e in events(out)] == [
        ("FOO/USD", "ticker: Currency pair not supported FOO/USD")]
    assert out.reconnect is None


def test_refused_book_resubscription_recycles_the_connection() -> None:
    c = codec()
    c.parse(BOOK[0], TS, 1)
    c.parse(BOOK[2], TS, 2)  # checksum gap -> resubscribing
    frame = (b'{"error":"Rate limit exceeded","method":"subscribe","success":false,'
             b'"symbol":"BTC/USD","req_id":3}')
    out = c.parse(frame, TS, 3)
    assert events(out, EV_REFUSED) and out.reconnect is not None


def test_unsubscribed_symbols_and_channels_are_dropped_and_counted() -> None:
    other = codec(symbols=("ETH/USD",))
    assert other.parse(TRADES[0], TS, 1).drops == {DROP_UNSUBSCRIBED: 1}
    assert other.parse(TICKER[0], TS, 2).drops == {DROP_UNSUBSCRIBED: 1}
    assert other.parse(BOOK[0], TS, 3).drops == {DROP_UNSUBSCRIBED: 1}
    no_book = codec(channels=("trades",))
    out = no_book.parse(BOOK[0], TS, 4)
    assert not out.book and out.drops == {DROP_UNSUBSCRIBED: 1}
    assert codec(channels=("book",)).parse(TRADES[0], TS, 5).drops == {DROP_UNSUBSCRIBED: 1}


@pytest.mark.parametrize("frame", [
    b"", b"not json", b"[]", b"42", b'"ping"', b"{", b"\xff\xfe",
    b'{"channel":"book","type":"snapshot"}',
    b'{"channel":"trade","type":"update","data":{}}',
    b'{"channel":"trade","type":"update","data":[{"symbol":"BTC/USD"}]}',
    TRADES[0].replace(b'"price":83744.3', b'"price":-1'),
    TRADES[0].replace(b'"trade_id":109116693', b'"trade_id":"x"'),
    TRADES[0].replace(b"2026-09-25T17:48:26.844359Z", b"yesterday"),
    TICKER[0].replace(b'"ask":83744.3', b'"ask":0'),
    BOOK[1].replace(b'"price":62818.8', b'"price":"abc"'),
    BOOK[1].replace(b'"qty":4.58618079', b'"qty":-4.5'),
    BOOK[1].replace(b'"price":62818.8', b'"price":1e999'),
    BOOK[1].replace(b'"price":62818.8', b'"price":null'),
    BOOK[1].replace(b'"price":62818.8', b'"price":"1_000"'),  # float() would take it
    BOOK[1].replace(b'"checksum":', b'"checksum":1', 1),  # beyond 32 bits: not a CRC32
    TRADES[0].replace(b'"trade_id":109116693', b'"trade_id":-1'),
    TRADES[0].replace(b'"trade_id":109116693', b'"trade_id":9223372036854775808'),
    b'{"channel":5}',
    b'{"method":"subscribe","success":"maybe"}',
])
def test_malformed_frames_are_errors_not_exceptions(frame: bytes) -> None:
    out = codec().parse(frame, TS, 1)
    assert out.error is not None and not out.has_rows


def test_unknown_messages_are_counted() -> None:
    c = codec()
    for frame in (b'{"channel":"ohlc","type":"update","data":[]}', b'{"foo":1}',
                  b'{"channel":"book","type":"weird","data":[]}',
                  b'{"method":"subscribe"}', b'{"method":"whatever","success":true}'):
        out = c.parse(frame, TS, 1)
        assert out.unknown and out.error is None and not out.has_rows, frame


def test_a_bad_level_leaves_the_book_untouched() -> None:
    c = codec()
    c.parse(BOOK[0], TS, 1)
    before = c.book_levels(SYM)
    broken = BOOK[1].replace(b'"qty":4.58618079', b'"qty":"x"')
    assert c.parse(broken, TS, 2).error is not None
    assert c.book_levels(SYM) == before
    assert events(c.parse(BOOK[1], TS, 3)) == []


def test_str_frames_parse_like_bytes() -> None:
    a, b = codec(), codec()
    for i, frame in enumerate([*BOOK[:5], *TRADES, *TICKER]):
        oa, ob = a.parse(frame, TS, i), b.parse(frame.decode(), TS, i)
        for table in ("book", "trades", "quotes", "events"):
            assert oa.rows(table) == ob.rows(table)


# ---- properties ------------------------------------------------------------------------------
def _valid_row(table: str, row: tuple[Any, ...]) -> bool:
    if len(row) != ROW_WIDTH[table]:
        return False
    sym, ts_event, ts_recv, seq = row[:4]
    if not (isinstance(sym, str) or (table == "events" and sym is None)):
        return False
    if not (isinstance(ts_recv, int) and isinstance(seq, int)):
        return False
    if ts_event is not None and not (isinstance(ts_event, int) and 0 <= ts_event < 2**63):
        return False
    if table == "trades":
        tid, side, px, amt = row[4:]
        return ((tid is None or isinstance(tid, str)) and side in ("buy", "sell", "unknown")
                and isinstance(px, float) and math.isfinite(px) and px > 0
                and isinstance(amt, float) and math.isfinite(amt) and amt >= 0)
    if table == "quotes":
        for px, amt in (row[4:6], row[6:8]):
            if (px is None) != (amt is None):
                return False
            if px is not None and not (isinstance(px, float) and math.isfinite(px) and px > 0
                                       and isinstance(amt, float) and math.isfinite(amt)
                                       and amt >= 0):
                return False
        return True
    if table == "book":
        is_snap, side, px, amt, uid = row[4:]
        return (isinstance(is_snap, bool) and side in ("bid", "ask")
                and isinstance(px, float) and math.isfinite(px) and px > 0
                and isinstance(amt, float) and math.isfinite(amt) and amt >= 0
                and (uid is None or isinstance(uid, int)))
    if table == "events":
        return isinstance(row[4], str) and isinstance(row[5], str) and (
            row[6] is None or isinstance(row[6], str))
    return False


def _check(out: Output) -> None:
    if out.error is not None:
        assert isinstance(out.error, str) and not out.has_rows
        return
    for table in ("trades", "quotes", "book", "events"):
        for row in out.rows(table):
            assert _valid_row(table, row), (table, row)
    for text in out.replies or []:
        assert isinstance(json.loads(text), dict)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_raise(blob: bytes) -> None:
    c = codec()
    c.parse(BOOK[0], TS, 1)
    _check(c.parse(blob, TS, 2))


ALL_FRAMES = [*BOOK[:8], *TRADES, *TICKER, *CONTROL, *PING, HEARTBEAT[0]]
NUMBER = re.compile(rb"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(ALL_FRAMES), st.data())
def test_mutated_real_frames_never_raise_or_emit_bad_rows(frame: bytes,
                                                          data: st.DataObject) -> None:
    c = codec()
    c.parse(BOOK[0], TS, 1)
    spans = [m.span() for m in NUMBER.finditer(frame)]
    how = data.draw(st.sampled_from(["number", "bytes", "cut", "token"] if spans
                                    else ["bytes", "cut", "token"]))
    if how == "number":
        a, b = data.draw(st.sampled_from(spans))
        value = data.draw(st.sampled_from([
            b"0", b"-0.0", b"-1", b"1e400", b"-1e400", b"1e-400", b"0.00000000", b"NaN",
            b'"1.5"', b"null", b"true", b"[]", b"{}", b"123456789012345678901234567890",
            b"0.1", b"99999999999999999999.9"]))
        mutated = frame[:a] + value + frame[b:]
    elif how == "bytes":
        pos = data.draw(st.integers(0, len(frame) - 1))
        mutated = frame[:pos] + data.draw(st.binary(min_size=1, max_size=4)) + frame[pos + 1:]
    elif how == "cut":
        mutated = frame[:data.draw(st.integers(0, len(frame)))]
    else:
        old = data.draw(st.sampled_from([b'"snapshot"', b'"update"', b'"book"', b'"trade"',
                                         b'"ticker"', b'"status"', b'"BTC/USD"', b"true",
                                         b'"subscribe"', b'"bids"', b'"asks"']))
        new = data.draw(st.sampled_from([b'"snapshot"', b'"update"', b'"book"', b'"trade"',
                                         b'"ticker"', b'"x"', b"null", b"1", b"false"]))
        mutated = frame.replace(old, new)
    out = c.parse(mutated, TS, 2)
    _check(out)
    # The codec stays usable afterwards.
    _check(c.parse(BOOK[1], TS, 3))


# ---- simulator and the whole pipeline ------------------------------------------------------
def test_venue_serves_recorded_frames_by_channel_and_symbol() -> None:
    assert VENUES["kraken"] is KrakenVenue
    venue = KrakenVenue()
    assert venue.demo_feed["symbols"] == [SYM]
    assert venue.streams_available() == [("book", SYM), ("ticker", SYM), ("trade", SYM)]
    by_key = venue.by_key
    assert by_key[("book", SYM)] == list(BOOK)
    assert by_key[("trade", SYM)] == [TRADES[1], TRADES[0]]  # trade-time order


def book_from_table(df: pl.DataFrame) -> Books:
    return apply_book_rows(book_table_rows(df))

def final_reference_book() -> dict[str, dict[float, float]]:
    ref = RefBook()
    for frame in BOOK:
        ref.apply(frame)
    return ref.as_floats()


def _events(root: Path) -> list[tuple[Any, ...]]:
    ev = read_table(root, "events")
    return list(ev.select("symbol", "event", "detail").iter_rows())


async def test_pipeline_lands_exactly_what_the_venue_served(root: Path) -> None:
    async with SimServer("kraken", rate_msgs_s=2000) as sim:
        feed = feed_for(sim, symbols=[SYM, "FOO/USD"], channels=["trades", "quotes", "book"])
        cfg = make_config(root, [feed])
        served_frames = len(BOOK) + len(TRADES) + len(TICKER)

        def done(d: Any) -> bool:
            st_ = d.feed_stats.get(feed["name"])
            # + status banner + 3 acks + 3 refusals
            return st_ is not None and st_.messages >= served_frames + 7

        daemon = await run_daemon(cfg, done, settle_s=0.2)
    stats = daemon.feed_stats[feed["name"]]
    assert stats.parse_errors == {} and stats.unknown_messages == 0 and stats.resyncs == 0
    sent = [s.frame for s in sim.sent]
    assert sorted(sent) == sorted([*BOOK, *TRADES, *TICKER])

    trades = read_table(root, "trades")
    got = list(trades.select("symbol", "trade_id", "side", "price", "amount", "ts_event")
               .with_columns(pl.col("ts_event").dt.epoch("ns")).iter_rows())
    want = []
    for f in sent:
        m = json.loads(f)
        if m["channel"] == "trade":
            t = m["data"][0]
            want.append((t["symbol"], str(t["trade_id"]), t["side"], t["price"], t["qty"],
                         iso_ns(t["timestamp"])))
    assert got == want and len(got) == 2

    quotes = read_table(root, "quotes")
    t = json.loads(TICKER[0])["data"][0]
    assert list(quotes.select("symbol", "bid_price", "bid_amount", "ask_price", "ask_amount")
                .iter_rows()) == [(SYM, t["bid"], t["bid_qty"], t["ask"], t["ask_qty"])]

    book = read_table(root, "book")
    assert book.filter(pl.col("is_snapshot"))["recv_seq"].n_unique() == 1
    assert book["recv_seq"].n_unique() == len(BOOK)
    assert book_from_table(book) == {SYM: final_reference_book()}

    evs = _events(root)
    assert sorted(e for e in evs if e[1] == EV_SUBSCRIBED) == [
        (SYM, EV_SUBSCRIBED, "book depth=25"), (SYM, EV_SUBSCRIBED, "ticker"),
        (SYM, EV_SUBSCRIBED, "trade")]
    refused = sorted(e[2] for e in evs if e[1] == EV_REFUSED)
    assert refused == [f"{ch}: Currency pair not supported FOO/USD"
                       for ch in ("book", "ticker", "trade")]
    # The two recorded trades are two years apart: a real hole in trade ids.
    assert [e for e in evs if e[1] == EV_GAP] == [
        (SYM, EV_GAP, "trade id expected 72823290, got 109116693 (36293403 missing)")]
    assert any(e[1] == "status" for e in evs)


async def test_pipeline_repairs_a_lost_book_update_by_resubscribing(root: Path) -> None:
    async with SimServer("kraken", rate_msgs_s=2000, skip_book_update=1) as sim:
        feed = feed_for(sim, symbols=[SYM], channels=["book"])
        cfg = make_config(root, [feed])

        def done(d: Any) -> bool:
            st_ = d.feed_stats.get(feed["name"])
            sent = [s.frame for s in sim.sent]
            # Second subscription served to its end, and everything sent was received
            # (+ status banner and three acks).
            return (st_ is not None and st_.resyncs >= 1 and sent.count(BOOK[0]) == 2
                    and sent[-1] == BOOK[-1] and st_.messages >= len(sent) + 4)

        daemon = await run_daemon(cfg, done, settle_s=0.3)
        requests = [json.loads(r) for r in sim.venue.requests]  # type: ignore[attr-defined]
    stats = daemon.feed_stats[feed["name"]]
    assert stats.gaps == 1 and stats.resyncs == 1 and stats.parse_errors == {}
    assert [(r["method"], r["params"]["symbol"]) for r in requests
            if r["method"] != "ping"] == [
        ("subscribe", [SYM]), ("unsubscribe", [SYM]), ("subscribe", [SYM])]

    evs = [e for e in _events(root) if e[1] in (EV_GAP, EV_RESYNC)]
    assert [e[1] for e in evs] == [EV_GAP, EV_RESYNC]
    assert evs[0][2].startswith("checksum mismatch: expected ")
    book = read_table(root, "book")
    assert book.filter(pl.col("is_snapshot"))["recv_seq"].n_unique() == 2
    assert book_from_table(book) == {SYM: final_reference_book()}
