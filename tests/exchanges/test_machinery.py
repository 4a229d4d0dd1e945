"""The shared codec machinery on its own: `TradeIds` (exact de-duplication) and `BookSync` /
`BookSide` (sequenced book sync), driven through a stub codec with no wire format, so
every venue's rules rest on behaviour tested here once."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import orjson
import pytest

from ingestd.config import FeedConfig
from ingestd.exchanges.base import (
    DROP_DUPLICATE_TRADE,
    BadFrame,
    Codec,
    Output,
)
from ingestd.exchanges.book import BookSide, BookSync, Diff, Levels, TextLevels
from ingestd.exchanges.trades import (
    BACKWARDS,
    DUPLICATE,
    GAP,
    NEW,
    TradeIds,
    admit_trade,
    admit_trade_id,
    trade_id,
)
from ingestd.schema import EV_GAP, EV_OUT_OF_ORDER

TS = 1_800_000_000_000_000_000
S = 1_000_000_000


class Stub(Codec):
    """A codec with no wire format: what the machinery needs of one (events, a name)."""

    exchange = "stub"
    default_ws_url = "ws://stub"
    default_rest_url = "http://stub"

    def subscribe_messages(self) -> Sequence[str]:
        return ()

    def parse_frame(self, frame: bytes | str, ts_recv_ns: int, recv_seq: int,
                    out: Output) -> None:
        raise NotImplementedError


def stub() -> Stub:
    return Stub(FeedConfig(name="stub-feed", exchange="stub", symbols=("A", "B"),
                           channels=("trades", "book")))


def events(out: Output, kind: str | None = None) -> list[tuple[Any, ...]]:
    return [e for e in out.rows("events") if kind is None or e[5] == kind]


def json_round_trip(state: Any) -> Any:
    return orjson.loads(orjson.dumps(state))


# ---- TradeIds: integer ids ------------------------------------------------------------------
def test_trade_ids_in_order_are_one_interval() -> None:
    ids = TradeIds(consecutive=True)
    assert [ids.admit("A", i) for i in range(100, 110)] == [NEW] * 10
    assert ids.state()["ints"] == {"A": [[100], [109]]}
    assert ids.last("A") == 109 and ids.last("B") is None


def test_trade_ids_jump_is_a_gap_only_for_consecutive_venues() -> None:
    ids = TradeIds(consecutive=True)
    ids.admit("A", 1)
    assert ids.admit("A", 5) == GAP and ids.expected == 2
    assert ids.state()["ints"] == {"A": [[1, 5], [1, 5]]}
    loose = TradeIds(consecutive=False)
    loose.admit("A", 1)
    assert loose.admit("A", 5) == NEW


def test_trade_ids_replays_are_duplicates_exactly() -> None:
    ids = TradeIds(consecutive=True)
    for i in (*range(10, 20), *range(30, 40)):
        ids.admit("A", i)
    for i in (*range(10, 20), *range(30, 40)):
        assert ids.admit("A", i) == DUPLICATE, i
    # Holes are not duplicates: never seen, below the highest seen -> BACKWARDS.
    assert ids.admit("A", 25) == BACKWARDS and ids.expected == 40
    assert ids.admit("A", 25) == DUPLICATE
    # Filling a hole merges intervals.
    for i in (*range(20, 25), *range(26, 30)):
        assert ids.admit("A", i) == BACKWARDS
    assert ids.state()["ints"] == {"A": [[10], [39]]}
    # Symbols are independent.
    assert ids.admit("B", 15) == NEW


def test_trade_ids_below_everything_remembered() -> None:
    ids = TradeIds(consecutive=True, max_intervals=3)
    ids.admit("A", 100)
    assert ids.admit("A", 50) == BACKWARDS       # nothing forgotten yet: a real trade
    assert ids.admit("A", 49) == BACKWARDS       # extends the lowest interval
    assert ids.state()["ints"] == {"A": [[49, 100], [50, 100]]}
    ids.admit("A", 200)
    ids.admit("A", 300)                         # 4 intervals: the oldest is forgotten
    assert ids.state()["ints"] == {"A": [[100, 200, 300], [100, 200, 300]]}
    assert ids.admit("A", 10) == DUPLICATE       # below the memory: taken as seen


def test_trade_ids_memory_is_bounded() -> None:
    ids = TradeIds(consecutive=False, max_intervals=64, window=100)
    rng = random.Random(7)
    for i in range(20_000):
        ids.admit("A", i * 2)                    # every id a new interval
        ids.admit_opaque("B", f"u{rng.random()}")
    state = ids.state()
    assert len(state["ints"]["A"][0]) == 64
    assert len(state["opaque"]["B"]) == 100
    assert ids.admit("A", 39_998) == DUPLICATE and ids.admit("A", 40_000) == NEW


def test_trade_ids_admit_range() -> None:
    ids = TradeIds(consecutive=True)
    assert ids.admit_range("A", 10, 14) == NEW
    assert ids.state()["ints"] == {"A": [[10], [14]]}
    assert ids.admit_range("A", 15, 15) == NEW and ids.admit("A", 16) == NEW
    # A replay of a bundle: its first id decides.
    assert ids.admit_range("A", 10, 14) == DUPLICATE
    # A jump: a gap reported from the first fill; the range is recorded.
    assert ids.admit_range("A", 20, 29) == GAP and ids.expected == 17
    assert ids.state()["ints"] == {"A": [[10, 20], [16, 29]]}
    # A late bundle filling the hole merges everything it reaches.
    assert ids.admit_range("A", 17, 19) == BACKWARDS
    assert ids.state()["ints"] == {"A": [[10], [29]]}
    # A bundle reaching over later intervals swallows them.
    ids.admit("A", 40)
    ids.admit("A", 45)
    assert ids.admit_range("A", 31, 42) == BACKWARDS
    assert ids.state()["ints"] == {"A": [[10, 31, 45], [29, 42, 45]]}
    assert ids.admit_range("A", 43, 50) == BACKWARDS
    assert ids.state()["ints"] == {"A": [[10, 31], [29, 50]]}
    with pytest.raises(BadFrame):
        ids.admit_range("A", 60, 59)


def test_trade_ids_out_of_order_stream_matches_a_set() -> None:
    """Any order of arrival: every id is stored once, every repeat is a duplicate."""
    rng = random.Random(3)
    ids = TradeIds(consecutive=True)
    seen: set[int] = set()
    for _ in range(5_000):
        tid = rng.randrange(0, 2_000)
        verdict = ids.admit("A", tid)
        assert (verdict == DUPLICATE) == (tid in seen)
        seen.add(tid)


# ---- TradeIds: opaque ids, ids from the wire ------------------------------------------------
def test_opaque_ids_window() -> None:
    ids = TradeIds(consecutive=False, window=3)
    assert [ids.admit_opaque("A", t) for t in ("a", "b", "a", "c", "d")] == [
        NEW, NEW, DUPLICATE, NEW, NEW]
    assert ids.admit_opaque("A", "a") == NEW   # forgotten beyond the window
    assert ids.state()["opaque"] == {"A": ["c", "d", "a"]}


def test_trade_id_tells_integer_from_opaque_ids() -> None:
    assert trade_id("123") == ("123", 123)
    assert trade_id(123) == ("123", 123)
    assert trade_id("0") == ("0", 0)
    assert trade_id(str(2**63 - 1)) == (str(2**63 - 1), 2**63 - 1)
    for opaque in ("007", str(2**63), "12a", "-5", "1.0", "de1c3f4a-5b", "١٢"):
        assert trade_id(opaque) == (opaque, None), opaque
    assert trade_id(-5) == ("-5", None)
    with pytest.raises(BadFrame):
        trade_id("")


def test_admit_helpers_write_events_and_count_drops() -> None:
    c, ids = stub(), TradeIds(consecutive=True)
    out = c.new_output()
    assert admit_trade(c, out, ids, "A", 1, TS, 1)
    assert admit_trade(c, out, ids, "A", 5, TS, 2)                   # gap
    assert admit_trade(c, out, ids, "A", 3, TS, 3)                   # out of order
    assert not admit_trade(c, out, ids, "A", 3, TS, 4)               # duplicate
    assert admit_trade(c, out, ids, "A", 10, TS, 5, last=12)         # a bundle: gap at 10
    assert not admit_trade_id(c, out, ids, "A", "11", 11, TS, 6)     # inside the bundle
    assert admit_trade_id(c, out, ids, "A", "x-1", None, TS, 7)      # opaque
    assert not admit_trade_id(c, out, ids, "A", "x-1", None, TS, 8)
    assert [(e[0], e[3], e[5], e[6]) for e in events(out)] == [
        ("A", 2, EV_GAP, "trade id expected 2, got 5 (3 missing)"),
        ("A", 3, EV_OUT_OF_ORDER, "trade id 3 never seen, below the highest seen (5)"),
        ("A", 5, EV_GAP, "trade id expected 6, got 10 (4 missing)")]
    assert out.drops == {DROP_DUPLICATE_TRADE: 3}


# ---- TradeIds: state ------------------------------------------------------------------------
def test_trade_ids_state_round_trips() -> None:
    ids = TradeIds(consecutive=True)
    for i in (1, 2, 3, 7, 8, 20):
        ids.admit("A", i)
    ids.admit_opaque("B", "u-1")
    saved = json_round_trip(ids.state())
    fresh = TradeIds(consecutive=True)
    fresh.restore(saved)
    assert fresh.state() == saved
    assert fresh.admit("A", 8) == DUPLICATE and fresh.admit("A", 21) == NEW
    assert fresh.admit("A", 5) == BACKWARDS
    assert fresh.admit_opaque("B", "u-1") == DUPLICATE


@pytest.mark.parametrize("bad", [
    None, [], "ints", {"ints": []}, {"ints": {"A": [[1], [2], [3]]}},
    {"ints": {"A": [[5], [1]]}}, {"ints": {"A": [[1, 3], [4, 5]]}},   # unsorted, overlapping
    {"ints": {"A": [[], []]}}, {"ints": {"A": [[1, 5], [2]]}},
    {"ints": {"A": [["1"], ["2"]]}}, {"ints": {"A": [[1.0], [2.0]]}},
    {"ints": {"A": [[True], [True]]}}, {"ints": {"A": [[-1], [2]]}},
    {"ints": {"A": [[2**63], [2**63]]}}, {"opaque": {"A": "abc"}}, {"opaque": {"A": [1]}},
    {"opaque": {"A": [""]}}, {"opaque": []},
])
def test_trade_ids_restore_refuses_garbage(bad: Any) -> None:
    ids = TradeIds(consecutive=True)
    ids.admit("A", 1)
    with pytest.raises((BadFrame, TypeError, ValueError)):
        ids.restore(bad)
    assert ids.admit("A", 1) == DUPLICATE   # a refused state changes nothing


def test_trade_ids_restore_refuses_more_intervals_than_kept() -> None:
    ids = TradeIds(consecutive=True, max_intervals=2)
    with pytest.raises(BadFrame):
        ids.restore({"ints": {"A": [[1, 3, 5], [1, 3, 5]]}})


# ---- BookSide -------------------------------------------------------------------------------
def test_book_side_sorted_best_first_with_text() -> None:
    bids, asks = BookSide(True), BookSide(False)
    for px, amt in ((10.0, 1.0), (12.0, 2.0), (11.0, 3.0)):
        bids.set(px, amt, (f"{px:.2f}", f"{amt}"))
        asks.set(px + 10, amt)
    assert bids.top() == [(12.0, 2.0), (11.0, 3.0), (10.0, 1.0)]
    assert bids.top_text(2) == [("12.00", "2.0"), ("11.00", "3.0")]
    assert asks.top(1) == [(20.0, 1.0)] and asks.best() == (20.0, 1.0)
    bids.set(12.0, 0.0)
    assert bids.best() == (11.0, 3.0) and 12.0 not in bids
    assert bids.truncate(1) == [10.0] and bids.top() == [(11.0, 3.0)]
    assert asks.truncate(2) == [22.0] and len(asks) == 2


def test_book_side_load_replaces_everything_in_one_sort() -> None:
    side = BookSide(True)
    side.set(1.0, 1.0, ("1", "1"))
    side.load([(3.0, 1.0), (2.0, 0.0), (5.0, 2.0), (3.0, 4.0), (5.0, 0.0)],
              [("3", "1"), ("2", "0"), ("5", "2"), ("3.0", "4"), ("5", "0")])
    assert side.top() == [(3.0, 4.0)] and side.top_text() == [("3.0", "4")]


def test_book_side_state_round_trips_and_refuses_garbage() -> None:
    side = BookSide(False)
    side.load([(1.5, 2.0), (0.000051, 3.0)], [("1.50", "2"), ("0.00005100", "3.000")])
    saved = json_round_trip(side.state())
    assert saved == [[0.000051, 3.0, "0.00005100", "3.000"], [1.5, 2.0, "1.50", "2"]]
    fresh = BookSide(False)
    fresh.restore(saved, texts=True)
    assert fresh.top_text() == side.top_text() and fresh.top() == side.top()
    plain = BookSide(False)
    plain.restore([[1.0, 2.0], [3.0, 4.0]])
    assert plain.top() == [(1.0, 2.0), (3.0, 4.0)]
    for bad in ("x", [[1.0]], [[1.0, 2.0, "1"]], [[1.0, 0.0]], [[1.0, -2.0]],
                [[0.0, 1.0]], [[float("inf"), 1.0]], [["1", 1.0]], [[1, 1.0]],
                [[2.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 2.0]],
                [[1.0, 1.0, "1.5", "1"]], [[1.0, 1.0, "1", "1_0"]], [[1.0, 1.0, 1, "1"]],
                [[1.0, 1.0, " 1", "1"]], [[1.0, 1.0, "nan", "1"]]):
        with pytest.raises(BadFrame):
            BookSide(False).restore(bad)
    with pytest.raises(BadFrame):
        BookSide(False).restore([[1.0, 2.0]], texts=True)   # a verified book needs texts


# ---- BookSync: helpers ----------------------------------------------------------------------
class SeqRules:
    """Test rules: a diff's ids are first..last; the next diff starts at last + 1; the
    first after a snapshot straddles snapshot id + 1 (Binance spot's shape)."""

    @staticmethod
    def stale(diff: Diff, last_id: int, just_synced: bool) -> bool:
        return diff.last_id <= last_id

    @staticmethod
    def bridges(diff: Diff, snapshot_id: int) -> bool:
        return diff.first_id <= snapshot_id + 1 <= diff.last_id

    @staticmethod
    def continues(diff: Diff, last_id: int) -> bool:
        return diff.first_id == last_id + 1

    @staticmethod
    def too_old(snapshot_id: int, first_buffered: Diff) -> bool:
        return snapshot_id + 1 < first_buffered.first_id

    @staticmethod
    def gap_detail(symbol: str, diff: Diff, last_id: int) -> str:
        return f"{symbol}: expected {last_id + 1}, got {diff.first_id}"


def diff(first: int, last: int | None = None, bids: Levels | None = None,
         asks: Levels | None = None, ts: int = TS, nbytes: int = 100,
         texts: tuple[TextLevels, TextLevels] | None = None) -> Diff:
    last = first if last is None else last
    return Diff(first, last, -1, last, None, ts, bids or [], asks or [], nbytes, texts)


def level_diff(bids: Levels, asks: Levels, ts: int = TS) -> Diff:
    """A diff of a venue without ids (rules=None)."""
    return Diff(0, 0, -1, None, None, ts, bids, asks, 0,
                ([(str(p), str(q)) for p, q in bids], [(str(p), str(q)) for p, q in asks]))


class Channel:
    """A channel-snapshot venue's side of BookSync: what was resubscribed."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def resubscribe(self, symbol: str, out: Output) -> None:
        self.asked.append(symbol)
        out.reply(f"resubscribe {symbol}")


def channel_sync(**keys: Any) -> tuple[BookSync, Channel]:
    ch = Channel()
    return BookSync(stub(), keys.pop("rules", None), resubscribe=ch.resubscribe,
                    **keys), ch


def snap(sync: BookSync, out: Output, seq: int, bids: Levels, asks: Levels,
         **keys: Any) -> int:
    texts = ([(str(p), str(q)) for p, q in bids], [(str(p), str(q)) for p, q in asks])
    return sync.snapshot("A", out, ts_event_ns=None, ts_recv_ns=keys.pop("ts", TS),
                         recv_seq=seq, bids=bids, asks=asks,
                         snapshot_id=keys.pop("snapshot_id", None),
                         update_id=keys.pop("update_id", None),
                         texts=texts if sync.keep_text else None, **keys)


def book_rows(out: Output) -> list[tuple[Any, ...]]:
    """(recv_seq, is_snapshot, side, price, amount, update_id) of every book row."""
    return [(r[3], r[4], r[5], r[6], r[7], r[8]) for r in out.rows("book")]


# ---- BookSync: kept levels, depth, rows, resync control -------------------------------------
def test_depth_truncation_writes_removals_and_nets_rows() -> None:
    sync, _ = channel_sync(keep_text=True, depth=2)
    out = Output()
    snap(sync, out, 1, [(10.0, 1.0), (9.0, 1.0), (8.0, 1.0)], [(11.0, 1.0), (12.0, 0.0)])
    # The snapshot block is the book as kept: depth 2, no zero sizes, best first.
    assert book_rows(out) == [(1, True, "bid", 10.0, 1.0, None),
                              (1, True, "bid", 9.0, 1.0, None),
                              (1, True, "ask", 11.0, 1.0, None)]
    out = Output()
    # A new best bid pushes 9.0 out of depth 2: written as removed.
    assert sync.diff("A", level_diff([(10.5, 2.0)], [(11.5, 1.0)]), out, 2)
    assert book_rows(out) == [(2, False, "bid", 10.5, 2.0, None),
                              (2, False, "bid", 9.0, 0.0, None),
                              (2, False, "ask", 11.5, 1.0, None)]
    # A level inserted beyond the depth, and one set twice: one row each, as it ends.
    out = Output()
    assert sync.diff("A", level_diff([(1.0, 5.0), (10.0, 3.0), (10.0, 4.0)], []), out, 3)
    assert book_rows(out) == [(3, False, "bid", 1.0, 0.0, None),
                              (3, False, "bid", 10.0, 4.0, None)]
    b = sync.book("A")
    assert b.bids is not None and b.bids.top_text() == [("10.5", "2.0"), ("10.0", "4.0")]


def test_rows_false_keeps_the_book_and_writes_nothing() -> None:
    sync, _ = channel_sync(keep_levels=True, depth=1, rows=False)
    out = Output()
    snap(sync, out, 1, [(10.0, 1.0), (9.0, 1.0)], [(11.0, 1.0)])
    assert sync.diff("A", level_diff([(10.2, 1.0)], []), out, 2)
    assert out.book is None
    b = sync.book("A")
    assert b.bids is not None and b.bids.top() == [(10.2, 1.0)]


def test_resync_event_default_forced_and_suppressed() -> None:
    sync, _ = channel_sync()
    out = Output()
    snap(sync, out, 1, [(1.0, 1.0)], [], detail="first")
    assert events(out) == []                               # the first sync is no resync
    snap(sync, out, 2, [(1.0, 1.0)], [], detail="again")   # synced before: a resync
    snap(sync, out, 3, [(1.0, 1.0)], [], detail="repeat", resync=False)
    assert [(e[3], e[5], e[6]) for e in events(out)] == [(2, "resync", "again")]
    fresh, _ = channel_sync()
    out = Output()
    snap(fresh, out, 1, [(1.0, 1.0)], [], detail="forced", resync=True)
    assert [e[6] for e in events(out)] == ["forced"]
    # A gap before the first sync: its snapshot is a resync.
    other, _ = channel_sync()
    out = Output()
    other.break_sync("A", out, "lost", TS, 1)
    snap(other, out, 2, [(1.0, 1.0)], [], detail="after gap")
    assert [(e[5], e[6]) for e in events(out)] == [("gap", "lost"), ("resync", "after gap")]
