"""Sequenced order-book sync and sorted book sides, shared by every codec.

Owns:
- `BookSide`: one side of a book, sorted best first, keeping the venue's level text
  (checksums are computed on the numbers as sent) - for venues that must keep levels
  (checksums, truncation to the subscribed depth, best bid/ask from the book);
- `BookSync`: the per-symbol state machine every venue's book follows -
  unsynced -> awaiting a snapshot (from REST, or from the channel: asked for by a
  resubscribe, or expected because a (re)subscription brings it) -> synced; diffs received
  meanwhile are buffered (REST snapshots: bounded by a byte cap per feed; a hit is a
  `gap` event) or dropped (channel snapshots: the venue sends a new one); the snapshot is
  written as a snapshot block (rows sharing one recv_seq, followed by a `resync` event
  after the first sync or a gap; the venue may force or suppress it); buffered diffs are
  bridged to it by the venue's rule and released in order with their own recv_seq;
  every later diff must continue the previous one by the venue's rule; a break is a
  `gap` event and a resync (several books broken together are asked for at once).
  A book is never left waiting: a REST request that fails (no answer, not HTTP, cut
  short, garbage, an HTTP error) is a `snapshot_failed` event and is retried with capped
  exponential backoff; a channel snapshot that does not come (SNAPSHOT_WAIT_S of receive
  time, or SNAPSHOT_WAIT_DROPS dropped diffs) is asked for again, with backoff.
  Books may keep their levels (truncated to the subscribed depth, the removals written as
  `amount = 0` rows), be verified after every message by the venue's checksum (a mismatch
  writes nothing of the message and is a gap), and write no rows at all (a best-bid/ask
  stream read for quotes);
- explicit, checked state (`state()` / `restore()`) of all of it, for journal checkpoints.

Must not: know any venue's wire format: venues pass `Diff`s, snapshots and their
continuity `Rules`; do I/O, read a clock or log.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Protocol

from ingestd.exchanges.base import (
    DROP_BOOK_MISMATCH,
    DROP_BUFFER_OVERFLOW,
    DROP_STALE_BOOK,
    DROP_UNSYNCED_BOOK,
    BadFrame,
    Codec,
    Output,
    RestRequest,
    parse_levels,
)
from ingestd.schema import EV_EMPTY_SNAPSHOT, EV_ERROR, EV_SNAPSHOT_FAILED

Levels = list[tuple[float, float]]
TextLevels = list[tuple[str, str]]

# REST snapshots: a failed request is retried after 0.5 s, doubling up to 30 s.
SNAPSHOT_RETRY_MIN_S: Final = 0.5
SNAPSHOT_RETRY_MAX_S: Final = 30.0
# Channel snapshots: a book still waiting SNAPSHOT_WAIT_S of receive time after asking
# (or after the first diff dropped while waiting for the snapshot its subscription
# brings), or after SNAPSHOT_WAIT_DROPS dropped diffs, asks again; each further attempt
# doubles both, up to SNAPSHOT_WAIT_MAX_FACTOR times. A book is never left waiting.
SNAPSHOT_WAIT_S: Final = 5.0
SNAPSHOT_WAIT_DROPS: Final = 500
SNAPSHOT_WAIT_MAX_FACTOR: Final = 8
# A book whose snapshot was asked for less than this long ago is not asked again when
# its continuity breaks once more (the answer is on its way).
REASK_MIN_S: Final = 1.0
# Snapshots in a row that fail the venue's checksum before a book is kept unverified until
# the next connection (an `error` event says so) rather than resubscribed forever.
MAX_VERIFY_FAILURES: Final = 3
_NS: Final = 1_000_000_000
# Diffs buffered while snapshots are pending, per feed (all symbols), in frame bytes.
MAX_BUFFER_BYTES: Final = 32 * 1024 * 1024


_INF: Final = float("inf")
_NUMBER: Final = re.compile(r"-?[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?")


def _number(text: str) -> float | None:
    """The value of a level's text as a venue spells numbers (None if it is not one:
    float() alone would also take "1_000", " 1", "inf", "nan")."""
    return float(text) if _NUMBER.fullmatch(text) else None


# ---- sorted sides ------------------------------------------------------------------------
class BookSide:
    """Price -> amount of one side, sorted; best first for `top`. Keeps each level's text
    (price text, amount text) when given, for checksums over the numbers as sent."""

    __slots__ = ("_amounts", "_prices", "_texts", "descending")

    def __init__(self, descending: bool) -> None:
        self.descending = descending          # bids: best is the highest price
        self._prices: list[float] = []        # ascending
        self._amounts: dict[float, float] = {}
        self._texts: dict[float, tuple[str, str]] = {}

    def __len__(self) -> int:
        return len(self._prices)

    def __contains__(self, px: float) -> bool:
        return px in self._amounts

    def set(self, px: float, amt: float, text: tuple[str, str] | None = None) -> None:
        """Set a level's absolute amount (0 removes it)."""
        if amt == 0.0:
            self.remove(px)
            return
        if px not in self._amounts:
            bisect.insort(self._prices, px)
        self._amounts[px] = amt
        if text is not None:
            self._texts[px] = text

    def remove(self, px: float) -> None:
        if self._amounts.pop(px, None) is not None:
            i = bisect.bisect_left(self._prices, px)
            del self._prices[i]
        self._texts.pop(px, None)

    def clear(self) -> None:
        self._prices.clear()
        self._amounts.clear()
        self._texts.clear()

    def amount(self, px: float) -> float:
        return self._amounts.get(px, 0.0)

    def _best_prices(self, n: int | None) -> list[float]:
        p = self._prices
        if self.descending:
            sel = p[::-1] if n is None else p[:-n - 1:-1] if n else []
        else:
            sel = p[:] if n is None else p[:n]
        return sel

    def top(self, n: int | None = None) -> Levels:
        """The best `n` levels (all when None), best first."""
        a = self._amounts
        return [(px, a[px]) for px in self._best_prices(n)]

    def top_text(self, n: int | None = None) -> TextLevels:
        """The best `n` levels as the venue's text, best first."""
        t = self._texts
        return [t[px] for px in self._best_prices(n)]

    def best(self) -> tuple[float, float] | None:
        if not self._prices:
            return None
        px = self._prices[-1] if self.descending else self._prices[0]
        return px, self._amounts[px]

    def truncate(self, depth: int) -> list[float]:
        """Remove every level beyond the best `depth`; returns the removed prices."""
        extra = len(self._prices) - depth
        if extra <= 0:
            return []
        if self.descending:
            removed = self._prices[:extra]
            del self._prices[:extra]
        else:
            removed = self._prices[depth:]
            del self._prices[depth:]
        for px in removed:
            del self._amounts[px]
            self._texts.pop(px, None)
        return removed

    def load(self, levels: Levels, texts: TextLevels | None = None) -> None:
        """Replace every level (a snapshot): one sort, not one insertion per level. A size
        of 0 removes the price, as in an update."""
        amounts: dict[float, float] = {}
        kept: dict[float, tuple[str, str]] = {}
        if texts is None:
            for px, amt in levels:
                if amt:
                    amounts[px] = amt
                else:
                    amounts.pop(px, None)
        else:
            for (px, amt), text in zip(levels, texts, strict=True):
                if amt:
                    amounts[px] = amt
                    kept[px] = text
                else:
                    amounts.pop(px, None)
                    kept.pop(px, None)
        self._amounts = amounts
        self._texts = kept
        self._prices = sorted(amounts)

    def state(self) -> list[Any]:
        t = self._texts
        return [[px, self._amounts[px], *t.get(px, ())] for px in self._prices]

    def restore(self, levels: Any, *, texts: bool = False) -> None:
        """Take a `state()` back, checked: [price, amount] or [price, amount, price text,
        amount text] levels in ascending price order, each price once, prices > 0 and
        amounts > 0 (finite); the texts, when kept, must be the numbers' own spelling.
        `texts`: every level must carry its text (books verified by a checksum)."""
        if not isinstance(levels, list):
            raise BadFrame("book side is not a list of levels")
        prices: list[float] = []
        amounts: dict[float, float] = {}
        kept: dict[float, tuple[str, str]] = {}
        for lv in levels:
            if not isinstance(lv, list) or len(lv) not in (2, 4) or (texts and len(lv) != 4):
                raise BadFrame(f"book level {lv!r} is not [price, amount, texts]"[:120])
            px, amt = lv[0], lv[1]
            if (type(px) is not float or type(amt) is not float
                    or not (0.0 < px < _INF and 0.0 < amt < _INF)):
                raise BadFrame(f"book level {lv!r} has no positive finite price and amount"[:120])
            if prices and px <= prices[-1]:
                raise BadFrame(f"book level prices are not ascending and unique at {px}")
            if len(lv) == 4:
                px_text, amt_text = lv[2], lv[3]
                if not (isinstance(px_text, str) and isinstance(amt_text, str)
                        and _number(px_text) == px and _number(amt_text) == amt):
                    raise BadFrame(f"book level text {lv[2:]!r} is not {px} {amt}"[:120])
                kept[px] = (px_text, amt_text)
            prices.append(px)
            amounts[px] = amt
        self._prices, self._amounts, self._texts = prices, amounts, kept


# ---- sequenced sync ----------------------------------------------------------------------
@dataclass(slots=True)
class Diff:
    """One incremental book message of one symbol, decoded and validated."""

    first_id: int                  # the venue's first update id in it (or its only id)
    last_id: int                   # the venue's last update id in it (continuity)
    prev_id: int                   # the venue's "previous id" field (-1 if it has none)
    update_id: int | None          # the `update_id` column (None: the venue sends no id)
    ts_event_ns: int | None
    ts_recv_ns: int
    bids: Levels
    asks: Levels
    nbytes: int = 0                # what buffering it costs (frame bytes)
    texts: tuple[TextLevels, TextLevels] | None = None  # levels as sent (checksum venues)
    check: int | None = None       # the venue's checksum of the book after it (None: none)

    def to_state(self) -> list[Any]:
        return [self.first_id, self.last_id, self.prev_id, self.update_id, self.ts_event_ns,
                self.ts_recv_ns, self.bids, self.asks, self.nbytes,
                None if self.texts is None else [self.texts[0], self.texts[1]], self.check]

    @classmethod
    def from_state(cls, s: Any) -> Diff:
        if not isinstance(s, list) or len(s) != 11:
            raise BadFrame("buffered diff is not a list of 11 fields")
        first, last, prev, uid, ts_event, ts_recv, bids, asks, nbytes, texts, check = s
        for v in (first, last, prev, ts_recv, nbytes):
            _int(v, "diff id, time or size")
        for v in (uid, ts_event, check):
            if v is not None:
                _int(v, "diff update id, event time or checksum")
        sides = (parse_levels(bids), parse_levels(asks))
        kept = None
        if texts is not None:
            kept = (_text_levels(texts[0], sides[0]), _text_levels(texts[1], sides[1]))
        return cls(first, last, prev, uid, ts_event, ts_recv, *sides, nbytes, kept, check)


def _int(v: Any, what: str, lo: int = -(2**63)) -> int:
    if type(v) is not int or not lo <= v < 2**63:
        raise BadFrame(f"{what} {v!r} is not an integer"[:120])
    return v


def _bool(v: Any, what: str) -> bool:
    if type(v) is not bool:
        raise BadFrame(f"{what} {v!r} is not a boolean"[:120])
    return v


def _text_levels(raw: Any, levels: Levels) -> TextLevels:
    if not isinstance(raw, list) or len(raw) != len(levels):
        raise BadFrame("diff level texts do not match its levels")
    texts = []
    for lv, (px, amt) in zip(raw, levels, strict=True):
        if not (isinstance(lv, list) and len(lv) == 2 and all(isinstance(t, str) for t in lv)
                and _number(lv[0]) == px and _number(lv[1]) == amt):
            raise BadFrame(f"diff level text {lv!r} is not {px} {amt}"[:120])
        texts.append((lv[0], lv[1]))
    return texts


@dataclass(frozen=True, slots=True)
class RestSnapshot:
    """A REST snapshot answer as a venue's parser read it (see `BookSync.rest_answer`)."""

    bids: Levels
    asks: Levels
    snapshot_id: int | None        # what the rules bridge buffered diffs from
    update_id: int | None          # the `update_id` column of its rows
    ts_event_ns: int | None = None
    detail: str | None = None      # the resync event's detail
    texts: tuple[TextLevels, TextLevels] | None = None
    check: int | None = None


class Rules(Protocol):
    """A venue's continuity rules for sequenced diffs (see BinanceRules for an example)."""

    def stale(self, diff: Diff, last_id: int, just_synced: bool) -> bool:
        """Already contained in the book (drop it silently, counted)."""
        ...

    def bridges(self, diff: Diff, snapshot_id: int) -> bool:
        """May be the first diff applied after a snapshot whose id is `snapshot_id`."""
        ...

    def continues(self, diff: Diff, last_id: int) -> bool:
        """Follows the previously applied diff (whose last id is `last_id`)."""
        ...

    def too_old(self, snapshot_id: int, first_buffered: Diff) -> bool:
        """The snapshot predates the first buffered diff: it cannot be bridged."""
        ...

    def gap_detail(self, symbol: str, diff: Diff, last_id: int) -> str:
        """The `gap` event's detail when `diff` does not continue `last_id`."""
        ...


class RangeRules:
    """The common rule of venues whose diffs carry a first and a last update id
    (Binance spot `U`/`u`, KuCoin `sequenceStart`/`sequenceEnd`, Gate `U`/`u`): a diff whose
    last id is at or below the book's is already contained; the first applied after a
    snapshot has `first <= snapshot id + 1 <= last`; a snapshot older than the first
    buffered diff cannot be bridged; each later diff starts right after the previous one
    (`CONTIGUOUS`; a venue whose diffs may overlap sets it False: `first <= last + 1`).
    Venues subclass it to name their fields in gap events."""

    FIRST: ClassVar[str] = "first"
    LAST: ClassVar[str] = "last"
    CONTIGUOUS: ClassVar[bool] = True

    @staticmethod
    def stale(diff: Diff, last_id: int, just_synced: bool) -> bool:
        return diff.last_id <= last_id

    @staticmethod
    def bridges(diff: Diff, snapshot_id: int) -> bool:
        return diff.first_id <= snapshot_id + 1 <= diff.last_id

    def continues(self, diff: Diff, last_id: int) -> bool:
        if self.CONTIGUOUS:
            return diff.first_id == last_id + 1
        return diff.first_id <= last_id + 1 <= diff.last_id

    @staticmethod
    def too_old(snapshot_id: int, first_buffered: Diff) -> bool:
        return snapshot_id + 1 < first_buffered.first_id

    def gap_detail(self, symbol: str, diff: Diff, last_id: int) -> str:
        relation = "=" if self.CONTIGUOUS else "<="
        return (f"expected {self.FIRST}{relation}{last_id + 1}, got {self.FIRST}="
                f"{diff.first_id} {self.LAST}={diff.last_id}")


UNSYNCED: Final = 0
AWAITING: Final = 1
SYNCED: Final = 2


@dataclass(slots=True)
class SymbolBook:
    status: int = UNSYNCED
    last_id: int = 0            # last id applied (or the snapshot's id)
    just_synced: bool = False   # nothing applied since the snapshot yet
    ever_synced: bool = False
    attempts: int = 0           # snapshot requests since the last success
    buffer: list[Diff] = field(default_factory=list)
    after_gap: bool = False     # a gap since the last snapshot: the next one is a resync
    asked_ns: int | None = None  # ts_recv when the current wait for a snapshot started
    dropped: int = 0            # diffs dropped during the current wait (channel)
    verify_failures: int = 0    # snapshots in a row that failed the venue's checksum
    unverified: bool = False    # checksums given up until the next connection
    bids: BookSide | None = None
    asks: BookSide | None = None

    def to_state(self) -> dict[str, Any]:
        s: dict[str, Any] = {"status": self.status, "last_id": self.last_id,
                             "just_synced": self.just_synced,
                             "ever_synced": self.ever_synced, "attempts": self.attempts,
                             "buffer": [d.to_state() for d in self.buffer],
                             "after_gap": self.after_gap, "asked_ns": self.asked_ns,
                             "dropped": self.dropped, "verify_failures": self.verify_failures,
                             "unverified": self.unverified}
        if self.bids is not None and self.asks is not None:
            s["bids"] = self.bids.state()
            s["asks"] = self.asks.state()
        return s

    @classmethod
    def from_state(cls, s: Any, sides: bool, texts: bool) -> SymbolBook:
        """A `to_state()` back, checked (BadFrame); `sides`: the book keeps its levels
        (`texts`: with the text of every level)."""
        if not isinstance(s, dict):
            raise BadFrame("book state is not an object")
        status = _int(s["status"], "book status")
        if status not in (UNSYNCED, AWAITING, SYNCED):
            raise BadFrame(f"book status {status}")
        buffer = s["buffer"]
        if not isinstance(buffer, list):
            raise BadFrame("book buffer is not a list")
        b = cls(status, _int(s["last_id"], "last id"), _bool(s["just_synced"], "just_synced"),
                _bool(s["ever_synced"], "ever_synced"), _int(s["attempts"], "attempts", 0),
                [Diff.from_state(d) for d in buffer], _bool(s["after_gap"], "after_gap"),
                None if s["asked_ns"] is None else _int(s["asked_ns"], "asked_ns", 0),
                _int(s["dropped"], "dropped", 0),
                _int(s["verify_failures"], "verify_failures", 0),
                _bool(s["unverified"], "unverified"))
        if sides:
            b.bids, b.asks = BookSide(True), BookSide(False)
            b.bids.restore(s["bids"], texts=texts)
            b.asks.restore(s["asks"], texts=texts)
        elif "bids" in s or "asks" in s:
            raise BadFrame("book levels in the state of a book that keeps none")
        return b


class BookSync:
    """Every symbol's book of one feed.

    How a snapshot is asked for: `snapshot_request(symbol)` builds the URL of a REST
    snapshot (REST venues; retried with backoff when it fails), or
    `resubscribe(symbols, out)` asks the venue for fresh ones on the channel, once for
    every book broken together (channel venues; asked again while none comes, see
    SNAPSHOT_WAIT_S). After a (re)connect the subscription itself brings a channel
    venue's snapshots: `reset(expect=...)` / `expect_snapshot` make those books wait for
    them without asking. `rules`: the venue's continuity rules (None: the venue has no
    ids; only a snapshot starts a book).

    What is kept: `keep_levels` keeps sorted sides; `keep_text` with every level's text
    as sent (checksums; implies `keep_levels`); `depth` (with kept levels) truncates each
    side to that many levels after every message - the venue expects clients to - and
    writes the levels it removes as `amount = 0` rows (the rows of one message are then
    netted: one per price touched, with its amount after the message, so they rebuild
    the book in any order). `rows=False`: the book is kept but no book rows are written
    (a venue's best-bid/ask stream read for quotes).

    Checked apply (checksum venues): `verify(book, check, snapshot)` is called with the
    book after a message - applied and truncated - and the checksum the message carried
    (`Diff.check`, `snapshot(check=)`; None: nothing to verify); it returns None when they
    agree, else the `gap` detail. On a mismatch the message's rows are not written (a
    `book_checksum_mismatch` drop), the book breaks and a snapshot is asked for. A snapshot
    that fails MAX_VERIFY_FAILURES times in a row is kept unverified until `reset`."""

    def __init__(self, codec: Codec, rules: Rules | None, *,
                 snapshot_request: Callable[[str], str] | None = None,
                 resubscribe: Callable[[list[str], Output], None] | None = None,
                 keep_levels: bool = False, keep_text: bool = False,
                 depth: int | None = None, rows: bool = True,
                 verify: Callable[[SymbolBook, int, bool], str | None] | None = None,
                 max_verify_failures: int = MAX_VERIFY_FAILURES,
                 max_buffer_bytes: int = MAX_BUFFER_BYTES,
                 wait_s: float = SNAPSHOT_WAIT_S,
                 wait_drops: int = SNAPSHOT_WAIT_DROPS) -> None:
        if (snapshot_request is None) == (resubscribe is None):
            raise ValueError("a book is synced either from REST or from its channel")
        if (depth is not None and not (keep_levels or keep_text)) or depth == 0:
            raise ValueError("truncation to a depth needs kept levels, and a depth")
        if verify is not None and not keep_text:
            raise ValueError("checksums are verified on the level text: keep_text")
        self.codec = codec
        self.rules = rules
        self.snapshot_url = snapshot_request
        self.resubscribe = resubscribe
        self.keep_levels = keep_levels or keep_text
        self.keep_text = keep_text
        self.depth = depth
        self.rows = rows
        self.verify = verify
        self.max_verify_failures = max_verify_failures
        self.max_buffer_bytes = max_buffer_bytes
        self.wait_ns = int(wait_s * _NS)
        self.wait_drops = wait_drops
        self.books: dict[str, SymbolBook] = {}
        self.buffer_bytes = 0

    def book(self, symbol: str) -> SymbolBook:
        b = self.books.get(symbol)
        if b is None:
            b = self.books[symbol] = SymbolBook()
            if self.keep_levels:
                b.bids, b.asks = BookSide(True), BookSide(False)
        return b

    def synced(self, symbol: str) -> bool:
        b = self.books.get(symbol)
        return b is not None and b.status == SYNCED

    # ---- connection lifecycle ---------------------------------------------------------
    def reset(self, expect: Iterable[str] = ()) -> None:
        """A new connection: every book must be rebuilt from a fresh snapshot; those of
        `expect` come with the new subscriptions (see `expect_snapshot`)."""
        for b in self.books.values():
            b.status = UNSYNCED
            b.attempts = 0
            b.after_gap = False
            b.asked_ns = None
            b.dropped = 0
            b.verify_failures = 0
            b.unverified = False
            b.buffer.clear()
            if b.bids is not None and b.asks is not None:
                b.bids.clear()
                b.asks.clear()
        self.buffer_bytes = 0
        for symbol in expect:
            self.expect_snapshot(symbol)

    def expect_snapshot(self, symbol: str) -> None:
        """The venue is about to send this book's snapshot unasked (a channel venue's
        (re)subscription brings it): wait for it - its diffs are dropped meanwhile - and
        ask only if it does not come (SNAPSHOT_WAIT_S)."""
        b = self.book(symbol)
        b.status = AWAITING
        b.attempts = 0
        b.asked_ns = None
        b.dropped = 0

    # ---- resync -----------------------------------------------------------------------
    def request_snapshot(self, symbol: str, out: Output, ts_recv_ns: int) -> None:
        """Ask for a snapshot (REST with backoff after failures, or a resubscribe)."""
        self._request((symbol,), out, ts_recv_ns)

    def _request(self, symbols: Sequence[str], out: Output, ts_recv_ns: int) -> None:
        if not symbols:
            return
        url = self.snapshot_url
        for symbol in symbols:
            b = self.book(symbol)
            b.status = AWAITING
            b.asked_ns = ts_recv_ns
            b.dropped = 0
            if url is not None:
                delay = 0.0
                if b.attempts:
                    delay = min(SNAPSHOT_RETRY_MAX_S,
                                SNAPSHOT_RETRY_MIN_S * 2 ** min(b.attempts - 1, 16))
                out.request(RestRequest(symbol, url(symbol), delay))
            b.attempts += 1
        if self.resubscribe is not None:
            self.resubscribe(list(symbols), out)

    def break_sync(self, symbol: str, out: Output, detail: str, ts_recv_ns: int,
                   recv_seq: int, *, event: bool = True) -> None:
        """Continuity is lost: a `gap` event, the book is unsynced and a snapshot asked."""
        self.break_many((symbol,), out, detail, ts_recv_ns, recv_seq, event=event)

    def break_many(self, symbols: Iterable[str], out: Output, detail: str, ts_recv_ns: int,
                   recv_seq: int, *, event: bool = True) -> None:
        """`break_sync` for several books at once (a lost message that may have been any
        of theirs), with one resubscribe for all of them. A book whose snapshot was asked
        for less than REASK_MIN_S ago is not asked again. `event=False`: the codec wrote
        the gap event itself (e.g. one for the whole feed)."""
        ask = []
        for symbol in symbols:
            b = self.book(symbol)
            if event:
                self.codec.gap(out, symbol, ts_recv_ns, recv_seq, detail)
            b.after_gap = True
            self._drop_buffer(b)
            if b.bids is not None and b.asks is not None:
                b.bids.clear()
                b.asks.clear()
            if (b.status == AWAITING and b.asked_ns is not None
                    and ts_recv_ns - b.asked_ns < REASK_MIN_S * _NS):
                continue
            b.status = UNSYNCED
            ask.append(symbol)
        self._request(ask, out, ts_recv_ns)

    def snapshot_failed(self, symbol: str, out: Output, reason: str, ts_recv_ns: int,
                        recv_seq: int) -> None:
        """A snapshot answer was unusable: an event, and a retry after a backoff."""
        b = self.books.get(symbol)
        if b is None or b.status != AWAITING:
            return
        self.codec.ev(out, EV_SNAPSHOT_FAILED, ts_recv_ns, recv_seq, symbol,
                      f"{reason}; attempt {b.attempts}, retrying")
        self._request((symbol,), out, ts_recv_ns)

    def rest_answer(self, request: RestRequest, status: int, body: bytes, ts_recv_ns: int,
                    recv_seq: int, parse: Callable[[bytes], RestSnapshot]) -> Output:
        """A REST venue's `Codec.on_rest` for a snapshot request: an answer for a book
        no longer waiting is ignored; no answer, an HTTP error or a body `parse` cannot
        read (any exception: the decode policy) is `snapshot_failed`; else the snapshot,
        its buffered diffs released after it (`Output.last_seq`)."""
        out = self.codec.new_output()
        symbol = request.key
        if not self.awaiting(symbol):
            return out  # a late answer for a connection that is gone
        if status != 200:
            text = body[:200].decode("utf-8", "replace")
            self.snapshot_failed(symbol, out, f"snapshot HTTP {status}: {text}" if status
                                 else f"snapshot no answer: {text}", ts_recv_ns, recv_seq)
            return out
        try:
            snap = parse(body)
        except Exception as e:  # the decode policy: garbage is a failed snapshot
            self.snapshot_failed(symbol, out, f"bad snapshot: {type(e).__name__}: {e}"[:200],
                                 ts_recv_ns, recv_seq)
            return out
        out.last_seq = self.snapshot(
            symbol, out, ts_event_ns=snap.ts_event_ns, ts_recv_ns=ts_recv_ns,
            recv_seq=recv_seq, bids=snap.bids, asks=snap.asks, snapshot_id=snap.snapshot_id,
            update_id=snap.update_id, texts=snap.texts, check=snap.check, detail=snap.detail)
        return out

    def requested(self, symbol: str) -> bool:
        """Waiting for a snapshot this codec asked for (not one a subscription brings)."""
        b = self.books.get(symbol)
        return b is not None and b.status == AWAITING and b.attempts > 0

    def awaiting(self, symbol: str) -> bool:
        b = self.books.get(symbol)
        return b is not None and b.status == AWAITING

    # ---- diffs ------------------------------------------------------------------------
    def diff(self, symbol: str, diff: Diff, out: Output, recv_seq: int) -> bool:
        """Handle one diff; True if it was applied and written (rows emitted)."""
        b = self.books.get(symbol) or self.book(symbol)
        if b.status != SYNCED:
            self._hold(symbol, b, diff, out, recv_seq)
            return False
        rules = self.rules
        if rules is not None:
            if rules.stale(diff, b.last_id, b.just_synced):
                out.drop(DROP_STALE_BOOK)
                return False
            ok = (rules.bridges(diff, b.last_id) if b.just_synced
                  else rules.continues(diff, b.last_id))
            if not ok:
                self.codec.gap(out, symbol, diff.ts_recv_ns, recv_seq,
                               rules.gap_detail(symbol, diff, b.last_id))
                b.status = UNSYNCED
                b.after_gap = True
                self._hold(symbol, b, diff, out, recv_seq)
                return False
        return self._apply(symbol, b, diff, out, recv_seq)

    def _hold(self, symbol: str, b: SymbolBook, diff: Diff, out: Output,
              recv_seq: int) -> None:
        """A diff for a book that is not synced: buffer it (REST) or drop it (channel)."""
        if self.snapshot_url is None:
            out.drop(DROP_UNSYNCED_BOOK)
            if b.status == UNSYNCED:
                self._request((symbol,), out, diff.ts_recv_ns)
            else:
                self._wait(symbol, b, out, diff.ts_recv_ns)
            return
        if self.buffer_bytes + diff.nbytes > self.max_buffer_bytes:
            # Bounded memory: forget this symbol's buffer; the snapshot that comes will be
            # bridged to later diffs (or fetched again).
            self.codec.gap(out, symbol, diff.ts_recv_ns, recv_seq,
                           f"book buffer cap of {self.max_buffer_bytes} bytes reached while "
                           f"waiting for a snapshot; {len(b.buffer)} buffered diffs dropped")
            b.after_gap = True
            out.drop(DROP_BUFFER_OVERFLOW, len(b.buffer) + 1)
            self._drop_buffer(b)
            if b.status == UNSYNCED:
                self._request((symbol,), out, diff.ts_recv_ns)
            return
        b.buffer.append(diff)
        self.buffer_bytes += diff.nbytes
        if b.status == UNSYNCED:
            self._request((symbol,), out, diff.ts_recv_ns)

    def _wait(self, symbol: str, b: SymbolBook, out: Output, ts_recv_ns: int) -> None:
        """A diff dropped while the channel snapshot is awaited: ask again if it is late
        (SNAPSHOT_WAIT_S or SNAPSHOT_WAIT_DROPS, doubling with every attempt)."""
        b.dropped += 1
        since = b.asked_ns
        if since is None:  # the snapshot a subscription brings: wait from the first drop
            b.asked_ns = ts_recv_ns
            return
        factor = min(1 << min(max(b.attempts - 1, 0), 16), SNAPSHOT_WAIT_MAX_FACTOR)
        if (ts_recv_ns - since >= self.wait_ns * factor
                or b.dropped >= self.wait_drops * factor):
            self._request((symbol,), out, ts_recv_ns)

    def _drop_buffer(self, b: SymbolBook) -> None:
        self.buffer_bytes -= sum(d.nbytes for d in b.buffer)
        b.buffer.clear()

    def _apply(self, symbol: str, b: SymbolBook, diff: Diff, out: Output,
               recv_seq: int) -> bool:
        b.just_synced = False
        b.last_id = diff.last_id
        bids, asks = diff.bids, diff.asks
        if b.bids is not None and b.asks is not None:
            bids, asks = self._apply_levels(b.bids, b.asks, diff)
            verify = self.verify
            if verify is not None and diff.check is not None and not b.unverified:
                why = verify(b, diff.check, False)
                if why is not None:  # not the venue's book: nothing of it is written
                    out.drop(DROP_BOOK_MISMATCH)
                    self.break_sync(symbol, out, why, diff.ts_recv_ns, recv_seq)
                    return False
        if self.rows:
            out.book_block().add_levels(symbol, diff.ts_event_ns, diff.ts_recv_ns, recv_seq,
                                        False, bids, asks, diff.update_id)
        return True

    def _apply_levels(self, bid_side: BookSide, ask_side: BookSide,
                      diff: Diff) -> tuple[Levels, Levels]:
        """Apply a diff to the kept sides and truncate them to `depth`; returns the rows
        to write: the diff's levels, or netted rows where a price repeats or was cut."""
        bids, asks, texts = diff.bids, diff.asks, diff.texts
        if texts is None:
            for px, amt in bids:
                bid_side.set(px, amt)
            for px, amt in asks:
                ask_side.set(px, amt)
        else:
            for (px, amt), text in zip(bids, texts[0], strict=True):
                bid_side.set(px, amt, text)
            for (px, amt), text in zip(asks, texts[1], strict=True):
                ask_side.set(px, amt, text)
        depth = self.depth
        if depth is not None:
            bid_cut, ask_cut = bid_side.truncate(depth), ask_side.truncate(depth)
            if self.rows:
                bids = _netted(bid_side, bids, bid_cut)
                asks = _netted(ask_side, asks, ask_cut)
        return bids, asks

    # ---- snapshots --------------------------------------------------------------------
    def snapshot(self, symbol: str, out: Output, *, ts_event_ns: int | None,
                 ts_recv_ns: int, recv_seq: int, bids: Levels, asks: Levels,
                 snapshot_id: int | None, update_id: int | None,
                 texts: tuple[TextLevels, TextLevels] | None = None,
                 check: int | None = None, detail: str | None = None,
                 resync: bool | None = None) -> int:
        """A full book: written as a snapshot block (`update_id` its column; with kept
        levels, the book as kept: no zero sizes, best first, `depth` deep); buffered
        diffs that follow it (by the rules, from `snapshot_id`) are released with
        recv_seq + 1, + 2, ... Returns the highest recv_seq used.

        `resync`: whether a `resync` event (`detail`) follows the block. None: if the
        book was synced before, or a gap was reported since its last snapshot; True
        forces it, False suppresses it (a snapshot that only repeats the book). `check`:
        the venue's checksum of it (see `verify`)."""
        b = self.book(symbol)
        rules = self.rules
        if (rules is not None and snapshot_id is not None and b.buffer
                and rules.too_old(snapshot_id, b.buffer[0])):
            # Older than the first buffered diff: it cannot be bridged. Fetch again.
            self._request((symbol,), out, ts_recv_ns)
            return recv_seq
        buffered = b.buffer
        b.buffer = []
        self.buffer_bytes -= sum(d.nbytes for d in buffered)
        b.attempts = 0
        b.asked_ns = None
        b.dropped = 0
        if b.bids is not None and b.asks is not None:
            b.bids.load(bids, None if texts is None else texts[0])
            b.asks.load(asks, None if texts is None else texts[1])
            if self.depth is not None:
                b.bids.truncate(self.depth)
                b.asks.truncate(self.depth)
            if self.verify is not None and check is not None and not b.unverified:
                b.last_id = snapshot_id if snapshot_id is not None else 0
                if not self._verified(symbol, b, check, out, ts_recv_ns, recv_seq):
                    return recv_seq
            bids, asks = b.bids.top(), b.asks.top()
        if self.rows:
            out.book_block().add_levels(symbol, ts_event_ns, ts_recv_ns, recv_seq, True,
                                        bids, asks, update_id)
            if not bids and not asks:
                # No row can say "no levels": the event tells readers the book is reset.
                self.codec.ev(out, EV_EMPTY_SNAPSHOT, ts_recv_ns, recv_seq, symbol,
                              "the venue's book is empty: every level is removed",
                              ts_event_ns)
        if (b.ever_synced or b.after_gap) if resync is None else resync:
            self.codec.resync(out, symbol, ts_recv_ns, recv_seq,
                              detail or (f"snapshot id {snapshot_id}"
                                         if snapshot_id is not None else "snapshot"))
        b.status = SYNCED
        b.ever_synced = True
        b.after_gap = False
        b.last_id = snapshot_id if snapshot_id is not None else 0
        b.just_synced = True
        seq = recv_seq
        for idx, diff in enumerate(buffered):
            if b.status != SYNCED:
                # A gap among the buffered diffs: keep the rest for the next snapshot.
                rest = buffered[idx:]
                b.buffer.extend(rest)
                self.buffer_bytes += sum(d.nbytes for d in rest)
                break
            if rules is not None and rules.stale(diff, b.last_id, b.just_synced):
                out.drop(DROP_STALE_BOOK)
                continue
            seq += 1
            self.diff(symbol, diff, out, seq)
        return seq

    def _verified(self, symbol: str, b: SymbolBook, check: int, out: Output,
                  ts_recv_ns: int, recv_seq: int) -> bool:
        """A snapshot's checksum: True to keep it (verified, or given up on)."""
        assert self.verify is not None
        why = self.verify(b, check, True)
        if why is None:
            b.verify_failures = 0
            return True
        if b.verify_failures < self.max_verify_failures:
            b.verify_failures += 1
            out.drop(DROP_BOOK_MISMATCH)
            self.break_sync(symbol, out, why, ts_recv_ns, recv_seq)
            return False
        b.verify_failures = 0
        b.unverified = True
        self.codec.ev(out, EV_ERROR, ts_recv_ns, recv_seq, symbol,
                      f"{why} after {self.max_verify_failures} resubscriptions; book kept "
                      "without checksum verification until reconnect")
        return True

    # ---- state ------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {sym: b.to_state() for sym, b in self.books.items()}

    def restore(self, state: Any) -> None:
        """Take a `state()` back, checked (BadFrame: the caller's StateError)."""
        if not isinstance(state, dict):
            raise BadFrame("books state is not an object")
        books: dict[str, SymbolBook] = {}
        total = 0
        for sym, s in state.items():
            b = SymbolBook.from_state(s, self.keep_levels, self.keep_text)
            total += sum(d.nbytes for d in b.buffer)
            books[sym] = b
        self.books = books
        self.buffer_bytes = total


def _netted(side: BookSide, levels: Levels, cut: list[float]) -> Levels:
    """The rows of one side of a message: `levels` as sent, unless a price repeats or
    levels were cut at the depth - then one row per price touched (in the order first
    touched, then the cut ones) with its amount after the message (0: gone)."""
    if not cut and (len(levels) < 2 or len({px for px, _ in levels}) == len(levels)):
        return levels
    touched = dict.fromkeys([px for px, _ in levels])
    touched.update(dict.fromkeys(cut))
    return [(px, side.amount(px)) for px in touched]


def levels_with_text(raw: Sequence[Sequence[str]]) -> tuple[Levels, TextLevels]:
    """[[price text, amount text, ...], ...] -> float levels and the texts as sent."""
    texts = [(str(lv[0]), str(lv[1])) for lv in raw]
    return parse_levels(texts), texts
