"""The shared codec machinery on its own: `TradeIds` (exact de-duplication) and `BookSync` /
`BookSide` (sequenced book sync), driven through a stub codec with no wire format, so
every venue's rules rest on behaviour tested here once."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

import orjson
import pytest

from ingestd.config import FeedConfig
from ingestd.exchanges.base import (
    DROP_BOOK_MISMATCH,
    DROP_BUFFER_OVERFLOW,
    DROP_DUPLICATE_TRADE,
    DROP_STALE_BOOK,
    DROP_UNSYNCED_BOOK,
    BadFrame,
    Codec,
    Output,
    RestRequest,
    StateError,
    quote_side,
)
from ingestd.exchanges.book import (
    AWAITING,
    MAX_VERIFY_FAILURES,
    REASK_MIN_S,
    SNAPSHOT_RETRY_MAX_S,
    SNAPSHOT_RETRY_MIN_S,
    SNAPSHOT_WAIT_DROPS,
    SNAPSHOT_WAIT_MAX_FACTOR,
    SNAPSHOT_WAIT_S,
    SYNCED,
    UNSYNCED,
    BookSide,
    BookSync,
    Diff,
    Levels,
    RestSnapshot,
    SymbolBook,
    TextLevels,
)
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
from ingestd.schema import EV_ERROR, EV_GAP, EV_OUT_OF_ORDER, EV_RESYNC, EV_SNAPSHOT_FAILED

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
        raise AssertionError("the machinery tests drive BookSync directly, never frames")


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
        self.asked: list[list[str]] = []

    def resubscribe(self, symbols: list[str], out: Output) -> None:
        self.asked.append(symbols)
        out.reply(f"resubscribe {' '.join(symbols)}")


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


def test_an_empty_snapshot_is_an_event_readers_can_see() -> None:
    """A snapshot with no levels writes no book rows (the table has no row for "no level"),
    yet it replaces the book: an `empty_snapshot` event at its recv_seq says so."""
    sync, _ = channel_sync()
    out = Output()
    snap(sync, out, 1, [(10.0, 1.0)], [(11.0, 1.0)])
    snap(sync, out, 2, [], [], resync=False)
    assert [r for r in book_rows(out) if r[0] == 2] == []
    assert [(e[3], e[5], e[6]) for e in events(out)] == [
        (2, "empty_snapshot", "the venue's book is empty: every level is removed")]
    assert sync.synced("A")
    out = Output()
    snap(sync, out, 3, [(10.0, 1.0)], [], resync=False)  # one empty side: an ordinary book
    assert events(out) == [] and len(book_rows(out)) == 1


# ---- BookSync: REST snapshots ---------------------------------------------------------------
def rest_sync(**keys: Any) -> BookSync:
    return BookSync(stub(), SeqRules(), snapshot_request=lambda s: f"http://stub/depth?s={s}",
                    **keys)


def rest_snap(sync: BookSync, out: Output, seq: int, snapshot_id: int,
              bids: Levels | None = None) -> int:
    bids = bids or [(1.0, 1.0)]
    return sync.snapshot("A", out, ts_event_ns=None, ts_recv_ns=TS + seq, recv_seq=seq,
                         bids=bids, asks=[(2.0, 1.0)], snapshot_id=snapshot_id,
                         update_id=snapshot_id,
                         texts=([(str(p), str(q)) for p, q in bids], [("2.0", "1.0")])
                         if sync.keep_text else None)


def test_rest_diffs_buffered_then_released_with_their_own_recv_seq() -> None:
    sync = rest_sync()
    out = Output()
    for seq, (first, last) in enumerate([(10, 12), (13, 15), (16, 16), (17, 20)], 1):
        assert not sync.diff("A", diff(first, last, bids=[(1.0, float(seq))],
                                       ts=TS + seq), out, seq)
    # One request, at the first diff; the diffs wait, nothing is written.
    assert [r.key for r in out.requests or []] == ["A"] and out.book is None
    assert out.requests is not None and out.requests[0].url == "http://stub/depth?s=A"
    assert sync.awaiting("A") and sync.buffer_bytes == 400
    answer = Output()
    # The snapshot (id 14) makes (10, 12) stale and is bridged by (13, 15).
    last = rest_snap(sync, answer, 100, 14)
    assert last == 103 and sync.synced("A") and sync.buffer_bytes == 0
    assert answer.drops == {DROP_STALE_BOOK: 1}
    assert [(r[0], r[1], r[2], r[4], r[5]) for r in book_rows(answer)] == [
        (100, True, "bid", 1.0, 14), (100, True, "ask", 1.0, 14),
        (101, False, "bid", 2.0, 15), (102, False, "bid", 3.0, 16),
        (103, False, "bid", 4.0, 20)]
    # Each released diff keeps its own receive time.
    assert [r[2] for r in answer.rows("book")][2:] == [TS + 2, TS + 3, TS + 4]
    assert events(answer) == []
    # Streaming on: continuity, then a gap (event, a new request, the diff buffered).
    out = Output()
    assert sync.diff("A", diff(21), out, 104)
    assert not sync.diff("A", diff(25), out, 105)
    assert [(e[3], e[5], e[6]) for e in events(out)] == [(105, EV_GAP, "A: expected 22, got 25")]
    assert [r.key for r in out.requests or []] == ["A"] and len(sync.book("A").buffer) == 1
    again = Output()
    assert rest_snap(sync, again, 200, 24) == 201
    assert [(e[5], e[6]) for e in events(again)] == [(EV_RESYNC, "snapshot id 24")]


def test_rest_snapshot_older_than_the_buffer_is_fetched_again() -> None:
    sync = rest_sync()
    out = Output()
    sync.diff("A", diff(50, 52), out, 1)
    answer = Output()
    assert rest_snap(sync, answer, 2, 40) == 2       # 40 + 1 < 50: cannot be bridged
    assert answer.book is None and not sync.synced("A")
    assert answer.requests is not None and answer.requests[0].delay_s == SNAPSHOT_RETRY_MIN_S
    assert len(sync.book("A").buffer) == 1           # still waiting for a usable one
    assert rest_snap(sync, Output(), 3, 50) == 4 and sync.synced("A")


def test_rest_buffer_byte_cap_is_a_gap_and_bounds_memory() -> None:
    sync = rest_sync(max_buffer_bytes=250)
    out = Output()
    sync.diff("A", diff(1), out, 1)
    sync.diff("A", diff(2), out, 2)
    assert sync.buffer_bytes == 200
    sync.diff("A", diff(3), out, 3)                  # 300 > 250: the buffer is forgotten
    assert sync.buffer_bytes == 0 and sync.book("A").buffer == []
    assert [(e[0], e[3], e[5]) for e in events(out)] == [("A", 3, EV_GAP)]
    assert "buffer cap of 250 bytes" in events(out)[0][6]
    assert out.drops == {DROP_BUFFER_OVERFLOW: 3}
    assert len(out.requests or []) == 1              # the request already out still counts
    sync.diff("A", diff(4), out, 4)
    assert sync.buffer_bytes == 100
    # The cap is per feed: B's diffs count against the same bytes.
    other = Output()
    sync.diff("B", diff(1), other, 5)
    sync.diff("B", diff(2), other, 6)                # 300 > 250: B's buffer goes, A's stays
    assert [(e[0], e[5]) for e in events(other)] == [("B", EV_GAP)]
    assert sync.buffer_bytes == 100 and len(sync.book("A").buffer) == 1
    # The snapshot that comes is bridged to the diffs after the cap; it is a resync.
    answer = Output()
    assert rest_snap(sync, answer, 10, 3) == 11
    assert [e[5] for e in events(answer)] == [EV_RESYNC]


def test_rest_snapshot_failure_is_an_event_and_a_capped_backoff_retry() -> None:
    sync = rest_sync()
    out = Output()
    sync.diff("A", diff(1), out, 1)
    delays = []
    for i in range(12):
        failed = Output()
        sync.snapshot_failed("A", failed, f"HTTP 503 #{i}", TS + i, 10 + i)
        [(sym, _, ts, seq, feed, event, detail)] = failed.rows("events")
        assert (sym, ts, seq, feed, event) == ("A", TS + i, 10 + i, "stub-feed",
                                               EV_SNAPSHOT_FAILED)
        assert detail == f"HTTP 503 #{i}; attempt {i + 1}, retrying"
        [req] = failed.requests or []
        assert req == RestRequest("A", "http://stub/depth?s=A", req.delay_s)
        delays.append(req.delay_s)
    assert delays[:4] == [0.5, 1.0, 2.0, 4.0]
    assert max(delays) == delays[-1] == SNAPSHOT_RETRY_MAX_S
    # The book syncs when an answer finally comes, with the buffered diff released.
    answer = Output()
    assert rest_snap(sync, answer, 50, 0) == 51 and sync.synced("A")
    assert sync.book("A").attempts == 0
    # A late failure for a book that is no longer waiting changes nothing.
    late = Output()
    sync.snapshot_failed("A", late, "late", TS, 60)
    assert late.events is None and late.requests is None


def test_rest_reset_forgets_books_and_buffers() -> None:
    sync = rest_sync()
    out = Output()
    sync.diff("A", diff(1), out, 1)
    rest_snap(sync, out, 2, 0)
    sync.diff("B", diff(7), out, 3)
    sync.reset()
    assert sync.buffer_bytes == 0
    assert {s: b.status for s, b in sync.books.items()} == {"A": UNSYNCED, "B": UNSYNCED}
    again = Output()
    assert not sync.diff("A", diff(2), again, 4) and again.requests


# ---- BookSync: channel snapshots, expectation and escalation ------------------------------------
def test_channel_diffs_before_a_snapshot_are_dropped_and_asked_for_once() -> None:
    sync, ch = channel_sync(rules=SeqRules())
    out = Output()
    for seq in range(1, 4):
        assert not sync.diff("A", diff(seq), out, seq)
    assert out.drops == {DROP_UNSYNCED_BOOK: 3} and ch.asked == [["A"]]
    assert sync.requested("A")
    snap(sync, out, 4, [(1.0, 1.0)], [], snapshot_id=3)
    assert sync.synced("A") and sync.diff("A", diff(4), out, 5)
    assert not sync.requested("A")


def test_expected_snapshot_is_awaited_without_asking_then_asked_when_late() -> None:
    sync, ch = channel_sync(rules=SeqRules())
    sync.reset(expect=["A", "B"])
    assert sync.book("A").status == AWAITING and not sync.requested("A")
    out = Output()
    wait = int(SNAPSHOT_WAIT_S * S)
    # The wait counts from the first diff dropped; nothing is asked before it is over.
    assert not sync.diff("A", diff(1, ts=TS), out, 1)
    assert not sync.diff("A", diff(2, ts=TS + wait - 1), out, 2)
    assert ch.asked == [] and out.replies is None
    assert not sync.diff("A", diff(3, ts=TS + wait), out, 3)
    assert ch.asked == [["A"]] and sync.requested("A")
    # Unanswered: asked again after the same wait, then twice, four times ... as long,
    # up to the cap - never left waiting.
    t, asks = TS + wait, []
    for step in range(1, 40):
        t += wait // 2
        before = len(ch.asked)
        sync.diff("A", diff(10 + step, ts=t), out, 10 + step)
        if len(ch.asked) > before:
            asks.append(t)
    gaps = [(b - a) // wait for a, b in zip([TS + wait, *asks], asks, strict=False)]
    assert gaps[:4] == [1, 2, 4, 8] and set(gaps[4:]) <= {SNAPSHOT_WAIT_MAX_FACTOR}
    assert all(r == "resubscribe A" for r in out.replies or [])
    # B never had a diff: still waiting, never asked.
    assert sync.book("B").status == AWAITING and sync.book("B").asked_ns is None


def test_escalation_counts_dropped_diffs_too() -> None:
    sync, ch = channel_sync()
    sync.expect_snapshot("A")
    out = Output()
    for seq in range(SNAPSHOT_WAIT_DROPS):
        sync.diff("A", level_diff([(1.0, 1.0)], []), out, seq)   # all at one receive time
    assert ch.asked == [["A"]]
    assert out.drops == {DROP_UNSYNCED_BOOK: SNAPSHOT_WAIT_DROPS}
    snap(sync, out, 1000, [(1.0, 1.0)], [])
    assert sync.synced("A") and sync.book("A").dropped == 0 and sync.book("A").attempts == 0


def test_break_many_asks_once_for_all_and_not_again_too_soon() -> None:
    sync, ch = channel_sync(rules=SeqRules())
    out = Output()
    for sym in ("A", "B", "C"):
        sync.snapshot(sym, out, ts_event_ns=None, ts_recv_ns=TS, recv_seq=1, bids=[],
                      asks=[], snapshot_id=0, update_id=0)
    out = Output()
    sync.break_many(["A", "B"], out, "lost a frame", TS, 2)
    assert ch.asked == [["A", "B"]] and out.replies == ["resubscribe A B"]
    assert [(e[0], e[5], e[6]) for e in events(out)] == [("A", EV_GAP, "lost a frame"),
                                                         ("B", EV_GAP, "lost a frame")]
    # Another break within REASK_MIN_S: the answer is on its way (C is synced: asked).
    soon = TS + int(REASK_MIN_S * S) - 1
    out = Output()
    sync.break_many(["A", "B", "C"], out, "", soon, 3, event=False)
    assert ch.asked[-1] == ["C"] and out.events is None
    later = Output()
    sync.break_many(["A"], later, "", TS + int(REASK_MIN_S * S), 4, event=False)
    assert ch.asked[-1] == ["A"]
    # The snapshot after a gap is a resync even for a book never synced before.
    fresh, _ = channel_sync()
    out = Output()
    fresh.break_many(["A"], out, "x", TS, 1)
    snap(fresh, out, 2, [(1.0, 1.0)], [])
    assert [e[5] for e in events(out)] == [EV_GAP, EV_RESYNC]


# ---- BookSync: state ---------------------------------------------------------------------------
def test_book_sync_state_round_trips_mid_resync() -> None:
    sync = rest_sync(keep_text=True)
    out = Output()
    texts = ([("1.0", "2.5")], [])
    sync.diff("A", Diff(1, 1, -1, 1, 7, TS, [(1.0, 2.5)], [], 120, texts), out, 1)
    sync.diff("B", diff(1, bids=[(1.0, 1.0)], texts=([("1.0", "1.0")], [])), out, 2)
    rest_snap(sync, out, 3, 0)
    saved = json_round_trip(sync.state())
    assert saved["B"]["status"] == AWAITING and saved["A"]["status"] == SYNCED
    fresh = rest_sync(keep_text=True)
    fresh.restore(saved)
    assert json_round_trip(fresh.state()) == saved and fresh.buffer_bytes == 100
    # Both continue identically: A applies its next diff, B's buffer is bridged.
    for s in (sync, fresh):
        o = Output()
        assert s.diff("A", diff(2, bids=[(1.0, 0.0)]), o, 10)
        s.snapshot("B", o, ts_event_ns=None, ts_recv_ns=TS, recv_seq=11, bids=[], asks=[],
                   snapshot_id=0, update_id=0, texts=([], []))
        assert book_rows(o) == [(10, False, "bid", 1.0, 0.0, 2),
                                (12, False, "bid", 1.0, 1.0, 1)]
    channel, _ = channel_sync(keep_text=True, depth=5)
    channel.reset(expect=["A"])
    channel.diff("A", level_diff([], [(3.0, 1.0)], ts=TS), Output(), 1)
    saved = json_round_trip(channel.state())
    assert saved["A"]["asked_ns"] == TS and saved["A"]["dropped"] == 1
    again, _ = channel_sync(keep_text=True, depth=5)
    again.restore(saved)
    assert json_round_trip(again.state()) == saved


def _book_state() -> dict[str, Any]:
    sync = rest_sync(keep_text=True)
    out = Output()
    sync.diff("A", Diff(1, 1, -1, 1, 7, TS, [(1.0, 2.5)], [], 120,
                        ([("1.0", "2.5")], [])), out, 1)
    sync.snapshot("B", out, ts_event_ns=None, ts_recv_ns=TS, recv_seq=2,
                  bids=[(5.0, 1.0)], asks=[(6.0, 1.0)], snapshot_id=3, update_id=3,
                  texts=([("5", "1")], [("6", "1")]))
    state: dict[str, Any] = json_round_trip(sync.state())
    return state


def _in_place(change: Any) -> Any:
    """A spoiler that changes the state in place and returns it."""
    def spoil(state: dict[str, Any]) -> dict[str, Any]:
        change(state)
        return state
    return spoil


@pytest.mark.parametrize("spoil", [
    lambda s: None, lambda s: [], lambda s: {"A": []},
    _in_place(lambda s: s["A"].update(status=7)),
    _in_place(lambda s: s["A"].update(status="1")),
    _in_place(lambda s: s["A"].update(last_id=1.5)),
    _in_place(lambda s: s["A"].update(just_synced=0)),
    _in_place(lambda s: s["A"].update(attempts=-1)),
    _in_place(lambda s: s["A"].update(asked_ns="soon")),
    _in_place(lambda s: s["A"].update(dropped=None)),
    _in_place(lambda s: s["A"].update(after_gap="yes")),
    _in_place(lambda s: s["A"].pop("buffer")),
    _in_place(lambda s: s["A"].update(buffer={})),
    _in_place(lambda s: s["A"]["buffer"][0].pop()),
    _in_place(lambda s: s["A"]["buffer"][0].__setitem__(0, "1")),
    _in_place(lambda s: s["A"]["buffer"][0].__setitem__(6, [[1.0, -1.0]])),
    _in_place(lambda s: s["A"]["buffer"][0].__setitem__(9, [[["1.0", "9"]], []])),
    _in_place(lambda s: s["B"].pop("bids")),
    _in_place(lambda s: s["B"]["bids"][0].pop()),
    _in_place(lambda s: s["B"].update(asks=[[6.0, 1.0, "6", "1"], [6.0, 2.0, "6", "2"]])),
    _in_place(lambda s: s["B"].update(asks=[[6.0, 1.0, "6.5", "1"]])),
])
def test_book_sync_restore_refuses_garbage(spoil: Any) -> None:
    rest_sync(keep_text=True).restore(_book_state())   # unspoiled: fine
    sync = rest_sync(keep_text=True)
    with pytest.raises((BadFrame, KeyError, TypeError, ValueError, IndexError)):
        sync.restore(spoil(_book_state()))
    assert sync.books == {}


def test_codec_restore_turns_bad_book_state_into_state_error() -> None:
    c = stub()
    c.books = c.stateful("books", BookSync(c, None, resubscribe=lambda s, o: None))
    saved = json_round_trip(c.state())
    c.restore(saved)
    with pytest.raises(StateError):
        c.restore({**saved, "parts": {"books": {"A": {"status": 9}}}})
    with pytest.raises(StateError):
        c.restore({**saved, "parts": {"books": "x"}})


# ---- BookSync: checked apply (checksum venues) --------------------------------------------------
def text_sum(book: SymbolBook) -> int:
    """A toy checksum over the kept text: sum of the digits of the top 2 levels."""
    assert book.bids is not None and book.asks is not None
    return sum(int(ch) for side in (book.bids.top_text(2), book.asks.top_text(2))
               for px, qty in side for ch in px + qty if ch.isdigit())


def checked_sync(**keys: Any) -> tuple[BookSync, Channel, list[tuple[int, bool]]]:
    calls: list[tuple[int, bool]] = []

    def verify(book: SymbolBook, check: int, snapshot: bool) -> str | None:
        calls.append((check, snapshot))
        mine = text_sum(book)
        return None if mine == check else f"expected {check}, computed {mine}"

    sync, ch = channel_sync(keep_text=True, verify=verify, **keys)
    return sync, ch, calls


def test_checked_apply_verifies_after_apply_and_truncation() -> None:
    sync, _, calls = checked_sync(depth=2)
    out = Output()
    # 1+1 2+1 | 3+1: the third bid is beyond depth 2, so it is not in the checksum.
    snap(sync, out, 1, [(1.0, 1.0), (2.0, 1.0), (0.5, 9.0)], [(3.0, 1.0)], check=9)
    assert calls == [(9, True)] and sync.synced("A") and len(out.rows("book")) == 3
    out = Output()
    ok = level_diff([(2.5, 1.0)], [])   # pushes bid 1.0 out: 2.5 1.0 | 2.0 1.0 | 3.0 1.0
    ok.check = 15
    assert sync.diff("A", ok, out, 2)
    assert book_rows(out) == [(2, False, "bid", 2.5, 1.0, None),
                              (2, False, "bid", 1.0, 0.0, None)]
    # A diff without a checksum is applied unchecked.
    assert sync.diff("A", level_diff([], [(3.0, 2.0)]), Output(), 3)
    assert calls == [(9, True), (15, False)]


def test_checked_apply_mismatch_breaks_and_writes_nothing() -> None:
    sync, ch, _ = checked_sync(depth=2)
    snap(sync, Output(), 1, [(1.0, 1.0)], [(3.0, 1.0)], check=6)
    bad = level_diff([(2.0, 1.0)], [])
    bad.check = 1
    out = Output()
    assert not sync.diff("A", bad, out, 2)
    assert out.book is None and out.drops == {DROP_BOOK_MISMATCH: 1}
    assert [(e[5], e[6]) for e in events(out)] == [(EV_GAP, "expected 1, computed 9")]
    assert ch.asked == [["A"]] and not sync.synced("A")
    assert sync.book("A").bids is not None and len(sync.book("A").bids or ()) == 0
    again = Output()
    snap(sync, again, 3, [(1.0, 1.0)], [(3.0, 1.0)], check=6)
    assert [e[5] for e in events(again)] == [EV_RESYNC]


def test_snapshot_failing_verification_is_retried_then_kept_unverified() -> None:
    sync, ch, calls = checked_sync()
    sync.reset(expect=["A"])
    for attempt in range(1, MAX_VERIFY_FAILURES + 1):
        out = Output()
        snap(sync, out, attempt, [(1.0, 1.0)], [(3.0, 1.0)], check=0, ts=TS)
        assert out.book is None and out.drops == {DROP_BOOK_MISMATCH: 1}
        assert [e[5] for e in events(out)] == [EV_GAP]
        assert len(ch.asked) == attempt          # asked again at once: the snapshot came
    out = Output()
    snap(sync, out, 9, [(1.0, 1.0)], [(3.0, 1.0)], check=0, detail="kept")
    assert len(out.rows("book")) == 2 and sync.synced("A")
    assert [(e[5], e[6]) for e in events(out)] == [
        (EV_ERROR, f"expected 0, computed 6 after {MAX_VERIFY_FAILURES} resubscriptions; "
                   "book kept without checksum verification until reconnect"),
        (EV_RESYNC, "kept")]
    # Unverified: wrong checksums are not checked until the next connection.
    n = len(calls)
    wrong = level_diff([(1.0, 2.0)], [])
    wrong.check = 12345
    assert sync.diff("A", wrong, Output(), 10) and len(calls) == n
    sync.reset(expect=["A"])
    out = Output()
    snap(sync, out, 11, [(1.0, 1.0)], [(3.0, 1.0)], check=0)
    assert out.book is None and [e[5] for e in events(out)] == [EV_GAP]


def test_checked_apply_state_round_trips() -> None:
    sync, _, _ = checked_sync(depth=3)
    snap(sync, Output(), 1, [(1.0, 1.0), (0.000051, 2.0)], [(3.0, 1.0)], check=None)
    saved = json_round_trip(sync.state())
    fresh, _, calls = checked_sync(depth=3)
    fresh.restore(saved)
    # The restored book verifies exactly as the original: the same text was kept.
    assert sync.diff("A", level_diff([(2.0, 1.0)], []), Output(), 2)
    d = level_diff([(2.0, 1.0)], [])
    d.check = text_sum(sync.book("A"))
    assert fresh.diff("A", d, Output(), 2) and calls == [(d.check, False)]
    assert fresh.state() == sync.state()


# ---- Codec: shared config checks and field rules ----------------------------------------------
def test_check_feed_from_the_venue_declarations() -> None:
    class Venue(Stub):
        trade_streams = ("fills",)
        book_depths = (5, 50)
        book_depth_note = "the venue's depths"
        symbol_pattern = re.compile(r"[A-Z]+-[A-Z]+")
        symbol_spelling = "a venue pair (e.g. 'BTC-USD')"

    def feed(**keys: Any) -> FeedConfig:
        return FeedConfig(name="f", exchange="stub", symbols=keys.pop("symbols", ("BTC-USD",)),
                          channels=("book",), **keys)

    assert Venue.check_feed(feed(trade_stream="fills", book_depth=50)) == []
    assert Venue.check_feed(feed(trade_stream="x", book_depth=7, symbols=("btc",))) == [
        "trade_stream: 'x' is not one of 'fills'",
        "book_depth: 7 is not one of 5, 50 (the venue's depths)",
        "symbols: 'btc' is not a venue pair (e.g. 'BTC-USD')"]
    assert Stub.check_feed(feed(trade_stream="x", book_depth=7, symbols=("any thing",))) == [
        "trade_stream: not used by stub", "book_depth: not used by stub"]


def test_quote_side_empty_sides_are_null() -> None:
    assert quote_side("1.5", "2") == (1.5, 2.0)
    assert quote_side(1.5, 0.0) == (1.5, 0.0)
    for empty in ((None, None), (None, 1.0), ("0", "0"), ("", ""), (0.0, 0.0), ("0.0", "")):
        assert quote_side(*empty) == (None, None), empty
    for bad in (("0", "1"), ("-1", "1"), ("1", "-1"), ("inf", "1"), ("x", "1")):
        with pytest.raises((BadFrame, ValueError)):
            quote_side(*bad)


def test_rest_answer_is_the_on_rest_of_a_snapshot_venue() -> None:
    sync = rest_sync()

    def parse(body: bytes) -> RestSnapshot:
        d = orjson.loads(body)
        return RestSnapshot([(float(p), float(q)) for p, q in d["b"]], [], d["id"], d["id"],
                            detail=f"id={d['id']}")

    out = Output()
    sync.diff("A", diff(5, 6, bids=[(1.0, 2.0)]), out, 1)
    [req] = out.requests or []
    failed = sync.rest_answer(req, 503, b"busy" * 100, TS, 2, parse)
    [(_, _, _, seq, _, event, detail)] = failed.rows("events")
    assert (seq, event) == (2, EV_SNAPSHOT_FAILED) and detail.startswith("snapshot HTTP 503: busy")
    assert failed.requests and failed.requests[0].delay_s == SNAPSHOT_RETRY_MIN_S
    nothing = sync.rest_answer(req, 0, b"timeout", TS, 3, parse)
    assert nothing.rows("events")[0][6].startswith("snapshot no answer: timeout")
    for garbage in (b"{", b"[]", b'{"b": [["x", "1"]], "id": 1}'):
        bad = sync.rest_answer(req, 200, garbage, TS, 4, parse)
        assert bad.rows("events")[0][6].startswith("bad snapshot: "), garbage
        assert bad.book is None and bad.requests
    good = sync.rest_answer(req, 200, b'{"b": [["1.5", "1"]], "id": 5}', TS, 10, parse)
    assert good.last_seq == 11 and sync.synced("A")
    assert book_rows(good) == [(10, True, "bid", 1.5, 1.0, 5), (11, False, "bid", 1.0, 2.0, 6)]
    # A late answer (the book is no longer waiting) changes nothing.
    late = sync.rest_answer(req, 200, b'{"b": [], "id": 9}', TS, 20, parse)
    assert not late.has_rows and late.last_seq == 0 and sync.book("A").last_id == 6
