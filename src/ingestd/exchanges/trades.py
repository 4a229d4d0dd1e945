"""Exact trade de-duplication per symbol, shared by every codec.

Owns: which trade ids of each symbol were already stored, exactly over the replay window
a venue repeats on (re)subscribe, and the verdict on a new id: new in order, new after a
jump (`gap`: ids were skipped, for venues whose ids are consecutive), new but lower than
the highest seen (`backwards`: stored, and the codec writes an event), or a duplicate
(dropped and counted). Its state is explicit JSON-able data (`state()` / `restore()`).

Must not: emit rows or events itself (codecs do, through `Codec.admit_trade`), or grow
without bound.

Two id kinds:
- integer ids (Binance `t`/`a`, Kraken, OKX, Coinbase, Bybit spot): the ids seen are kept
  as sorted disjoint intervals, so a gap-free stream is one interval and a replay of any
  length is checked exactly. At most `max_intervals` intervals are kept per symbol (the
  oldest are forgotten); an id below everything remembered is taken as a duplicate (a
  replay reaches back seconds, never past that many gaps). A message that bundles the
  fills `first..last` of one taker order (OKX `count`, Binance aggTrade `f`/`l`) is
  admitted as one range (`admit_range`): the verdict is on `first`, the range is recorded;
- opaque ids (Bybit linear UUIDs, anything that is not a canonical int64 digit string):
  the last `window` ids per symbol, in a set.

`trade_id(raw)` is the one rule that tells the two kinds apart; `admit_trade_id` gives the
verdict (with its event or drop) on either.
"""

from __future__ import annotations

import bisect
from collections import deque
from typing import Any, Final

from ingestd.exchanges.base import DROP_DUPLICATE_TRADE, BadFrame, Codec, Output
from ingestd.schema import EV_OUT_OF_ORDER

NEW: Final = 0
DUPLICATE: Final = 1
GAP: Final = 2         # new, and ids between the previous highest and this one are missing
BACKWARDS: Final = 3   # new, but lower than the highest id seen (out of order)

MAX_INTERVALS: Final = 4096
_MAX_I64: Final = 2**63 - 1
OPAQUE_WINDOW: Final = 10_000
# Opaque ids kept per symbol in saved state (a replay window, not the whole memory).
OPAQUE_STATE_IDS: Final = 2_000


class _Intervals:
    """Sorted disjoint closed intervals [lo, hi] of integer ids, in two parallel lists."""

    __slots__ = ("his", "los")

    def __init__(self, los: list[int], his: list[int]) -> None:
        self.los = los
        self.his = his


class TradeIds:
    """Per-symbol memory of stored trade ids. `consecutive`: the venue's ids increase by
    exactly one per trade, so a jump is a gap worth an event."""

    __slots__ = ("_ints", "_opaque", "consecutive", "expected", "max_intervals", "opaque",
                 "window")

    def __init__(self, *, consecutive: bool, opaque: bool = False,
                 max_intervals: int = MAX_INTERVALS, window: int = OPAQUE_WINDOW) -> None:
        self.consecutive = consecutive
        self.opaque = opaque
        self.max_intervals = max_intervals
        self.window = window
        self._ints: dict[str, _Intervals] = {}
        self._opaque: dict[str, tuple[set[str], deque[str]]] = {}
        self.expected = 0   # after GAP / BACKWARDS: the id that was expected next

    # ---- integer ids -------------------------------------------------------------------
    def admit(self, symbol: str, tid: int) -> int:
        """Record `tid` for `symbol` if it is new; returns NEW, GAP, BACKWARDS or
        DUPLICATE (then nothing is recorded)."""
        iv = self._ints.get(symbol)
        if iv is None:
            self._ints[symbol] = _Intervals([tid], [tid])
            return NEW
        his = iv.his
        top = his[-1]
        if tid == top + 1:          # the common case: the next id
            his[-1] = tid
            return NEW
        if tid > top:
            iv.los.append(tid)
            his.append(tid)
            self._bound(iv)
            self.expected = top + 1
            return GAP if self.consecutive else NEW
        los = iv.los
        i = bisect.bisect_right(los, tid) - 1
        if i < 0:
            # Below everything remembered: seen, unless nothing was ever forgotten.
            if len(los) < self.max_intervals:
                return self._insert_below(iv, tid, top)
            return DUPLICATE
        if tid <= his[i]:
            return DUPLICATE
        # Never seen, between two remembered intervals: stored, and out of order.
        if tid == his[i] + 1:
            his[i] = tid
            if i + 1 < len(los) and los[i + 1] == tid + 1:   # closes a hole
                his[i] = his[i + 1]
                del los[i + 1], his[i + 1]
        elif i + 1 < len(los) and los[i + 1] == tid + 1:
            los[i + 1] = tid
        else:
            los.insert(i + 1, tid)
            his.insert(i + 1, tid)
            self._bound(iv)
        self.expected = top + 1
        return BACKWARDS

    def admit_range(self, symbol: str, first: int, last: int) -> int:
        """Record the ids `first..last` of one bundled message (the fills of one taker
        order). The verdict is `admit(first)`'s - a replay repeats the whole message - and
        unless it is DUPLICATE the whole range is recorded, so the next message continues
        the interval."""
        if last < first:
            raise BadFrame(f"trade id range {first}..{last} is empty")
        verdict = self.admit(symbol, first)
        if verdict != DUPLICATE and last > first:
            self._cover(self._ints[symbol], first, last)
        return verdict

    @staticmethod
    def _cover(iv: _Intervals, first: int, last: int) -> None:
        """Extend the interval that holds `first` to `last`, merging what it reaches."""
        los, his = iv.los, iv.his
        i = bisect.bisect_right(los, first) - 1
        if i < 0 or his[i] < first or his[i] >= last:
            return
        j = bisect.bisect_right(los, last + 1)   # intervals starting by last + 1 merge in
        hi = max(last, his[j - 1])
        del los[i + 1:j], his[i + 1:j]
        his[i] = hi

    def _insert_below(self, iv: _Intervals, tid: int, top: int) -> int:
        if iv.los[0] == tid + 1:
            iv.los[0] = tid
        else:
            iv.los.insert(0, tid)
            iv.his.insert(0, tid)
        self.expected = top + 1
        return BACKWARDS

    def _bound(self, iv: _Intervals) -> None:
        extra = len(iv.los) - self.max_intervals
        if extra > 0:
            del iv.los[:extra], iv.his[:extra]

    def last(self, symbol: str) -> int | None:
        iv = self._ints.get(symbol)
        return None if iv is None else iv.his[-1]

    # ---- opaque ids --------------------------------------------------------------------
    def admit_opaque(self, symbol: str, tid: str) -> int:
        entry = self._opaque.get(symbol)
        if entry is None:
            entry = self._opaque[symbol] = (set(), deque())
        seen, order = entry
        if tid in seen:
            return DUPLICATE
        seen.add(tid)
        order.append(tid)
        if len(order) > self.window:
            seen.discard(order.popleft())
        return NEW

    # ---- state -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "ints": {s: [iv.los[-self.max_intervals:], iv.his[-self.max_intervals:]]
                     for s, iv in self._ints.items()},
            "opaque": {s: list(order)[-OPAQUE_STATE_IDS:]
                       for s, (_seen, order) in self._opaque.items()},
        }

    def restore(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise BadFrame("trade ids state is not an object")
        ints: dict[str, _Intervals] = {}
        for sym, pair in _object(state.get("ints", {}), "ints").items():
            if not (isinstance(pair, list) and len(pair) == 2):
                raise BadFrame(f"trade id intervals of {sym!r} are not [los, his]")
            los, his = _ids(pair[0], sym), _ids(pair[1], sym)
            if len(los) != len(his) or not los or len(los) > self.max_intervals or any(
                    lo > hi for lo, hi in zip(los, his, strict=True)) or any(
                    his[i] >= los[i + 1] for i in range(len(los) - 1)):
                raise BadFrame(f"trade id intervals of {sym!r} are not sorted and disjoint")
            ints[sym] = _Intervals(los, his)
        opaque: dict[str, tuple[set[str], deque[str]]] = {}
        for sym, ids in _object(state.get("opaque", {}), "opaque").items():
            if not isinstance(ids, list) or not all(isinstance(v, str) and v for v in ids):
                raise BadFrame(f"opaque trade ids of {sym!r} are not a list of strings")
            order = deque(ids[-self.window:])
            opaque[sym] = (set(order), order)
        self._ints, self._opaque = ints, opaque


def _object(v: Any, what: str) -> dict[str, Any]:
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise BadFrame(f"{what} is not an object")
    return v


def _ids(v: Any, sym: str) -> list[int]:
    if not isinstance(v, list) or not all(
            type(x) is int and 0 <= x <= _MAX_I64 for x in v):
        raise BadFrame(f"trade ids of {sym!r} are not a list of int64 ids")
    return v


def trade_id(raw: str | int) -> tuple[str, int | None]:
    """A trade id as stored (text) and its integer value when it is one (None: an opaque
    id). Integers are canonical digit strings (or JSON integers) within int64: what JSON
    state can hold, and one spelling per id ("007" is not 7)."""
    text = raw if type(raw) is str else str(raw)
    if not text:
        raise BadFrame("empty trade id")
    if (text.isascii() and text.isdigit() and len(text) <= 19
            and (text[0] != "0" or len(text) == 1)):
        n = int(text)
        if n <= _MAX_I64:
            return text, n
    return text, None

def admit_trade(codec: Codec, out: Output, ids: TradeIds, symbol: str, tid: int,
                ts_recv_ns: int, recv_seq: int, last: int | None = None) -> bool:
    """The shared verdict on an integer trade id (or on the range `tid..last` of a bundled
    message), with its event or drop: True to store."""
    verdict = ids.admit(symbol, tid) if last is None else ids.admit_range(symbol, tid, last)
    return verdict == NEW or report_trade(codec, out, ids, verdict, symbol, tid,
                                          ts_recv_ns, recv_seq)


def admit_trade_id(codec: Codec, out: Output, ids: TradeIds, symbol: str, text: str,
                   tid: int | None, ts_recv_ns: int, recv_seq: int,
                   last: int | None = None) -> bool:
    """The shared verdict on a trade id as `trade_id` split it: integer (`tid`, or the
    range `tid..last`) or opaque (`tid` None: `text`). True to store."""
    if tid is None:
        return admit_opaque_trade(out, ids, symbol, text)
    return admit_trade(codec, out, ids, symbol, tid, ts_recv_ns, recv_seq, last)


def report_trade(codec: Codec, out: Output, ids: TradeIds, verdict: int, symbol: str,
                 tid: int, ts_recv_ns: int, recv_seq: int) -> bool:
    """The event or drop of a verdict other than NEW that `ids.admit` just gave (codecs
    that call `admit` inline on their fast path); True to store the trade."""
    if verdict == NEW:
        return True
    if verdict == DUPLICATE:
        out.drop(DROP_DUPLICATE_TRADE)
        return False
    if verdict == GAP:
        codec.gap(out, symbol, ts_recv_ns, recv_seq,
                  f"trade id expected {ids.expected}, got {tid} "
                  f"({tid - ids.expected} missing)")
        return True
    codec.ev(out, EV_OUT_OF_ORDER, ts_recv_ns, recv_seq, symbol,
             f"trade id {tid} never seen, below the highest seen ({ids.expected - 1})")
    return True


def admit_opaque_trade(out: Output, ids: TradeIds, symbol: str, tid: str) -> bool:
    """The shared verdict on an opaque trade id (no order): True to store."""
    if ids.admit_opaque(symbol, tid) == NEW:
        return True
    out.drop(DROP_DUPLICATE_TRADE)
    return False
