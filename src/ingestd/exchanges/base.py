"""The shape every exchange codec has, and the decode-and-validate policy they share.

Owns: `Codec` (the sans-I/O protocol object for one feed), `Output` (what the frames of
one socket read - or one REST answer - produced: at most one columnar block per table,
plus requests, replies, rejects and counters), `RestRequest`, the one policy for bad
input (`DECODE_ERRORS`: a frame that fails is rejected whole - its rows rolled back -
and its neighbours are kept), explicit versioned codec state (`state()` / `restore()`),
and exact conversions (decimal strings and venue timestamps to floats and integer ns).

Must not: do I/O, read a clock, log, sleep or touch asyncio. A codec only turns inputs
(WebSocket frames and REST bodies, each with its receive time and `recv_seq`) into blocks,
events, requests and replies. The reader (feed/reader.py) is the only socket owner; the
journal replays the same inputs through the same codec, so a codec must be deterministic
given its inputs and its restored state.

Lifecycle, driven by the reader:
  codec = CodecClass(feed_config); codec.restore(saved_state)   (optional)
  per connection: codec.ws_url(); codec.on_connect(); send codec.subscribe_messages()
  per socket read: out = codec.parse_batch(frames, ts_recv_ns, first_seq)
                  frame i has recv_seq first_seq + i; send out.replies, fetch
                  out.requests (then codec.on_rest(...)), rotate if out.reconnect is set
  every `keepalive_interval_s` of the codec: send codec.keepalive_message()
  while connected, every `poll_interval_s()`: fetch codec.poll_requests() (spread over
                  the interval, feed/polls.py); each answer goes to codec.on_rest(...)

`recv_seq` is allocated by the reader, strictly increasing per feed. Rows decoded from one
frame carry that frame's value. Only `on_rest` may release rows it held back (book diffs
buffered until a REST snapshot arrives): it gives them `recv_seq + 1, + 2, ...` and
reports the highest value used in `Output.last_seq`, so replaying by `recv_seq` is exact.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Protocol
from urllib.parse import urlsplit, urlunsplit

import msgspec
import orjson

from ingestd.config import FeedConfig
from ingestd.schema import (
    EV_ERROR,
    EV_GAP,
    EV_REFUSED,
    EV_RESYNC,
    EV_SUBSCRIBED,
    Block,
    BookBlock,
    DerivativesBlock,
    EventsBlock,
    LiquidationsBlock,
    QuotesBlock,
    TradesBlock,
)

__all__ = [
    "DECODE_ERRORS",
    "BadFrame",
    "Codec",
    "Output",
    "RestRequest",
    "StateError",
    "amount",
    "iso_to_ns",
    "ms_to_ns",
    "override_url",
    "parse_levels",
    "price",
    "quote_side",
    "s_decimal_to_ns",
    "us_to_ns",
]

# Reasons a codec counts rows or frames it deliberately did not store (not errors).
DROP_UNSUBSCRIBED = "unsubscribed_symbol"
DROP_DUPLICATE_TRADE = "duplicate_trade"
DROP_STALE_BOOK = "stale_book_update"
DROP_UNSYNCED_BOOK = "book_not_synced"
DROP_BUFFER_OVERFLOW = "book_buffer_overflow"
DROP_BOOK_MISMATCH = "book_checksum_mismatch"  # a message whose book fails the checksum


class BadFrame(ValueError):
    """A frame that does not have the shape its type promises (counted, kept raw)."""


class StateError(ValueError):
    """A saved codec state this version cannot restore (older version, other venue,
    corrupt). The caller logs it and starts from a fresh codec (books resync)."""


# The one list of exceptions that mean "this input is bad" for every codec: decoding
# (msgspec, orjson), validation (BadFrame, msgspec.ValidationError) and the errors Python
# raises on wrong shapes. Anything else escaping a codec is a bug: it is rejected the
# same way (the frame kept raw, reason "codec_error") so a feed never dies of it.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    msgspec.DecodeError, msgspec.ValidationError, orjson.JSONDecodeError, BadFrame,
    KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError,
    UnicodeDecodeError)


@dataclass(frozen=True, slots=True)
class RestRequest:
    """A REST GET the codec needs answered; the reply goes back through `Codec.on_rest`."""

    key: str            # what the codec uses to match the answer (e.g. the symbol)
    url: str            # absolute URL
    delay_s: float = 0.0  # wait this long before fetching (retry spacing decided by the codec)


class Output:
    """Everything one codec call produced: at most one block per table, plus what the
    reader must do. Attributes are None until used (the common read has one table)."""

    __slots__ = ("book", "derivatives", "drops", "events", "exchange", "feed", "last_seq",
                 "liquidations", "messages",
                 "quotes", "raw_rejects", "reconnect", "rejects", "replies", "requests",
                 "trades", "unknown")

    TABLE_ATTRS: ClassVar[tuple[str, ...]] = ("trades", "quotes", "book", "events",
                                              "derivatives", "liquidations")

    def __init__(self, feed: str = "", exchange: str = "") -> None:
        self.feed = feed
        self.exchange = exchange
        self.trades: TradesBlock | None = None
        self.quotes: QuotesBlock | None = None
        self.book: BookBlock | None = None
        self.events: EventsBlock | None = None
        self.derivatives: DerivativesBlock | None = None
        self.liquidations: LiquidationsBlock | None = None
        self.requests: list[RestRequest] | None = None
        self.replies: list[str] | None = None    # text frames to send back (e.g. pong)
        self.rejects: list[tuple[int, str]] | None = None  # (frame index, why) kept raw
        self.raw_rejects: list[Any] | None = None  # the reader's Reject records (sink)
        self.unknown: int = 0                    # valid frames of a type we do not handle
        self.drops: dict[str, int] | None = None  # rows/frames deliberately dropped, by reason
        self.reconnect: str | None = None        # the venue asked us to reconnect (reason)
        self.last_seq: int = 0                   # highest recv_seq used, if above the input's
        self.messages: int = 0                   # frames this output came from (queue weight)

    # ---- blocks ------------------------------------------------------------------------
    def trades_block(self) -> TradesBlock:
        b = self.trades
        if b is None:
            b = self.trades = TradesBlock()
        return b

    def quotes_block(self) -> QuotesBlock:
        b = self.quotes
        if b is None:
            b = self.quotes = QuotesBlock()
        return b

    def book_block(self) -> BookBlock:
        b = self.book
        if b is None:
            b = self.book = BookBlock()
        return b

    def events_block(self) -> EventsBlock:
        b = self.events
        if b is None:
            b = self.events = EventsBlock()
        return b

    def derivatives_block(self) -> DerivativesBlock:
        b = self.derivatives
        if b is None:
            b = self.derivatives = DerivativesBlock()
        return b

    def liquidations_block(self) -> LiquidationsBlock:
        b = self.liquidations
        if b is None:
            b = self.liquidations = LiquidationsBlock()
        return b

    def blocks(self) -> Iterator[Block]:
        """The non-empty blocks, in table order."""
        for attr in self.TABLE_ATTRS:
            b = getattr(self, attr)
            if b is not None and len(b):
                yield b

    def rollback_seq(self, recv_seq: int) -> None:
        """Drop the rows of the frame numbered `recv_seq` (it failed half-way). Frames
        of one call are decoded in order and their rows carry their own recv_seq, so
        they are exactly the trailing rows with that value: no per-frame bookkeeping."""
        for attr in self.TABLE_ATTRS:
            b = getattr(self, attr)
            if b is not None:
                seqs = b.recv_seq
                n = len(seqs)
                while n and seqs[n - 1] == recv_seq:
                    n -= 1
                if n < len(seqs):
                    b.truncate(n)

    def absorb(self, later: Output) -> bool:
        """Append `later`'s rows (the next output of the same feed, in recv_seq order)
        to this one's blocks, for a queue that is backed up. Only rows, counts and
        rejects move (the sink's part); what the reader acts on (requests, replies,
        reconnect) stays on each output, which the reader keeps its own reference to."""
        for attr in self.TABLE_ATTRS:
            b = getattr(later, attr)
            if b is not None and len(b):
                mine = getattr(self, attr)
                if mine is None:
                    setattr(self, attr, b)
                else:
                    mine.extend(b)
        if later.raw_rejects:
            self.raw_rejects = [*(self.raw_rejects or ()), *later.raw_rejects]
        if later.last_seq > self.last_seq:
            self.last_seq = later.last_seq
        self.messages += later.messages
        return True

    # ---- what the reader must do -------------------------------------------------------
    def event(self, symbol: str | None, ts_event_ns: int | None, ts_recv_ns: int,
              recv_seq: int, feed: str, event: str, detail: str | None) -> None:
        self.events_block().add(symbol, ts_event_ns, ts_recv_ns, recv_seq, feed, event,
                                detail)

    def request(self, req: RestRequest) -> None:
        if self.requests is None:
            self.requests = []
        self.requests.append(req)

    def reply(self, text: str) -> None:
        if self.replies is None:
            self.replies = []
        self.replies.append(text)

    def reject(self, index: int, reason: str) -> None:
        if self.rejects is None:
            self.rejects = []
        self.rejects.append((index, reason))

    def drop(self, reason: str, n: int = 1) -> None:
        if self.drops is None:
            self.drops = {}
        self.drops[reason] = self.drops.get(reason, 0) + n

    @property
    def error(self) -> str | None:
        """The reason the first rejected frame was rejected (single-frame calls)."""
        return self.rejects[0][1] if self.rejects else None

    @property
    def has_rows(self) -> bool:
        return any(True for _ in self.blocks())

    def rows(self, table: str) -> list[tuple[Any, ...]]:
        """Row tuples of one table (tests and debugging only)."""
        b = getattr(self, table)
        return [] if b is None else b.rows()


class Stateful(Protocol):
    """A part of a codec whose position must survive restarts (watermarks, sequences)."""

    def state(self) -> Any: ...

    def restore(self, state: Any) -> None: ...


def reject_reason(e: BaseException) -> str:
    if isinstance(e, DECODE_ERRORS):
        return f"{type(e).__name__}: {e}"[:200]
    return f"codec_error: {type(e).__name__}: {e}"[:200]


class Codec(ABC):
    """Protocol object for one feed of one venue. Subclasses register in exchanges/__init__."""

    exchange: ClassVar[str]                 # the contract's exchange id
    default_ws_url: ClassVar[str]           # scheme://host[:port]/path of the venue
    default_rest_url: ClassVar[str | None] = None
    # Application-level keepalive: send `keepalive_message()` this often (None: not needed).
    keepalive_interval_s: ClassVar[float | None] = None
    # Silence longer than this means a stale stream (per-feed `stale_after_s` overrides).
    default_stale_after_s: ClassVar[float] = 30.0
    # Protocol-level WebSocket pings from the client (None disables them).
    ws_ping_interval_s: ClassVar[float | None] = 20.0
    # Planned make-before-break reconnect interval (per-feed `rotate_after_s` overrides).
    default_rotate_after_s: ClassVar[float | None] = None
    # Connection attempts allowed per window, shared by every feed of the venue:
    # (attempts, window_s). Venues ban IPs that exceed their documented limits.
    connect_limit: ClassVar[tuple[int, float]] = (5, 1.0)
    # The contract's channels this venue offers (`ingestd check` rejects the others).
    CHANNELS: ClassVar[tuple[str, ...]] = ("trades", "quotes", "book")
    # What `check_feed` accepts: `trade_stream` values (none: the key is not used), the
    # `book_depth` values (none: not used; `book_depth_note` says what they are), and the
    # spelling of a symbol (`symbol_pattern`, described by `symbol_spelling`).
    trade_streams: ClassVar[tuple[str, ...]] = ()
    book_depths: ClassVar[tuple[int, ...]] = ()
    book_depth_note: ClassVar[str] = ""
    symbol_pattern: ClassVar[re.Pattern[str] | None] = None
    symbol_spelling: ClassVar[str] = ""
    # Periodic REST polls for values a venue has no stream for (Binance USD-M open
    # interest): the default interval (None: this venue polls nothing, and a feed's
    # `poll_interval_s` is a config error).
    default_poll_interval_s: ClassVar[float | None] = None
    # Version of what `state()` returns; bump when its shape changes.
    STATE_VERSION: ClassVar[int] = 2

    def __init__(self, feed: FeedConfig) -> None:
        self.feed = feed
        self.name = feed.name
        self.symbols: frozenset[str] = frozenset(feed.symbols)
        self.channels: frozenset[str] = frozenset(feed.channels)
        self._parts: dict[str, Stateful] = {}

    def stateful(self, name: str, part: Any) -> Any:
        """Register a part whose `state()` is saved and restored (returns the part)."""
        self._parts[name] = part
        return part

    @classmethod
    def check_feed(cls, feed: FeedConfig) -> list[str]:
        """Venue-specific config problems as `key: what is wrong` strings (venues with
        more rules extend it)."""
        problems = []
        stream, streams = feed.trade_stream, cls.trade_streams
        if stream is not None and stream not in streams:
            problems.append(f"trade_stream: {stream!r} is not one of "
                            f"{', '.join(map(repr, streams))}" if streams
                            else f"trade_stream: not used by {cls.exchange}")
        if feed.poll_interval_s is not None and cls.default_poll_interval_s is None:
            problems.append(f"poll_interval_s: not used by {cls.exchange} (it polls nothing)")
        if feed.book_depth is not None:
            problem = cls.book_depth_problem(feed.book_depth)
            if problem is not None:
                problems.append(f"book_depth: {problem}")
        pattern = cls.symbol_pattern
        if pattern is not None:
            problems.extend(f"symbols: {sym!r} is not {cls.symbol_spelling}"
                            for sym in feed.symbols if pattern.fullmatch(sym) is None)
        return problems

    @classmethod
    def book_depth_problem(cls, depth: int) -> str | None:
        """What is wrong with a `book_depth` (None: nothing)."""
        depths = cls.book_depths
        if depth in depths:
            return None
        if not depths:
            return f"not used by {cls.exchange}"
        note = f" ({cls.book_depth_note})" if cls.book_depth_note else ""
        return f"{depth} is not one of {', '.join(map(str, depths))}{note}"

    def ws_url(self) -> str:
        """The URL to connect to (with the feed's `url` override applied)."""
        return override_url(self.default_ws_url, self.feed.url)

    def rest_url(self, path_and_query: str) -> str:
        base = self.feed.rest_url or self.default_rest_url
        if base is None:
            raise RuntimeError(f"{self.exchange} has no REST endpoint")
        return base.rstrip("/") + path_and_query

    def on_connect(self) -> None:  # noqa: B027 - optional hook
        """A new connection is about to subscribe: reset per-connection state."""

    def on_rotate(self) -> None:
        """The feed switched to a fresh connection made before the old one was closed
        (make-before-break). Default: like a new connection. Codecs whose state stays
        valid across connections (ids continue) override this to keep it, so the overlap
        is de-duplicated by exchange ids instead of resynced."""
        self.on_connect()

    @abstractmethod
    def subscribe_messages(self) -> Sequence[str]:
        """Text frames to send right after connecting (may be empty)."""

    def new_output(self) -> Output:
        return Output(self.name, self.exchange)

    def parse_batch(self, frames: Sequence[bytes | str], ts_recv_ns: int,
                    first_seq: int) -> Output:
        """Decode the frames of one socket read (frame i has recv_seq first_seq + i) into
        one Output. Never raises: a frame that fails is rolled back and rejected."""
        out = self.new_output()
        out.messages = len(frames)
        parse_frame = self.parse_frame
        seq = first_seq
        for frame in frames:
            try:
                parse_frame(frame, ts_recv_ns, seq, out)
            except Exception as e:  # the policy: any failure rejects this frame only
                out.rollback_seq(seq)
                out.reject(seq - first_seq, reject_reason(e))
            seq += 1
        return out

    def parse(self, frame: bytes | str, ts_recv_ns: int, recv_seq: int) -> Output:
        """One frame (tests, replay): `parse_batch([frame], ...)`."""
        return self.parse_batch((frame,), ts_recv_ns, recv_seq)

    @abstractmethod
    def parse_frame(self, frame: bytes | str, ts_recv_ns: int, recv_seq: int,
                    out: Output) -> None:
        """Decode one frame into `out`. May raise any of DECODE_ERRORS; must validate
        before it changes its own state (rows it added are rolled back on error). Every
        row it adds carries `recv_seq` (that is how a failed frame's rows are found)."""

    def on_rest(self, request: RestRequest, status: int, body: bytes,
                ts_recv_ns: int, recv_seq: int) -> Output:
        """Handle the answer to a `RestRequest` (status 0: no HTTP answer; body says why)."""
        out = self.new_output()
        self.venue_error(out, ts_recv_ns, recv_seq, f"unexpected REST answer for {request.key}")
        return out

    def poll_requests(self) -> Sequence[RestRequest]:
        """The REST GETs to repeat every `poll_interval_s()` while connected, one cycle
        in order (the poller spreads them over the interval). Their answers come back
        through `on_rest` (match them by `RestRequest.key`, which the journal keeps) and
        are journaled like snapshot answers, so a replay is exact. Default: none."""
        return ()

    def poll_interval_s(self) -> float:
        """Seconds between two polls of the same request (the feed's `poll_interval_s`,
        else the venue's default)."""
        return self.feed.poll_interval_s or self.default_poll_interval_s or 0.0

    def keepalive_message(self) -> str | None:
        """The application-level ping to send every `keepalive_interval_s` (None: none)."""
        return None

    # ---- explicit, versioned state -------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What must survive a restart or seed a journal replay, as JSON-able data:
        never the codec object itself (a reshaped class must not change a file format)."""
        return {"v": self.STATE_VERSION, "exchange": self.exchange,
                "parts": {name: part.state() for name, part in self._parts.items()}}

    def restore(self, state: Any) -> None:
        """Take a `state()` back. Raises StateError if it is not one this version wrote
        for this venue; the caller then discards this codec and starts a fresh one."""
        if not isinstance(state, dict) or state.get("v") != self.STATE_VERSION \
                or state.get("exchange") != self.exchange:
            raise StateError(f"state version {state.get('v') if isinstance(state, dict) else '?'}"
                             f" for {state.get('exchange') if isinstance(state, dict) else '?'}"
                             f" is not {self.STATE_VERSION} for {self.exchange}")
        parts = state.get("parts")
        if not isinstance(parts, dict):
            raise StateError("state has no parts")
        try:
            for name, part in self._parts.items():
                if name in parts:
                    part.restore(parts[name])
        except DECODE_ERRORS as e:
            raise StateError(f"unreadable state part: {type(e).__name__}: {e}") from e

    # ---- event helpers -------------------------------------------------------------------
    def ev(self, out: Output, event: str, ts_recv_ns: int, recv_seq: int,
           symbol: str | None = None, detail: str | None = None,
           ts_event_ns: int | None = None) -> None:
        out.event(symbol, ts_event_ns, ts_recv_ns, recv_seq, self.name, event, detail)

    def gap(self, out: Output, symbol: str | None, ts_recv_ns: int, recv_seq: int,
            detail: str) -> None:
        self.ev(out, EV_GAP, ts_recv_ns, recv_seq, symbol, detail)

    def resync(self, out: Output, symbol: str | None, ts_recv_ns: int, recv_seq: int,
               detail: str) -> None:
        self.ev(out, EV_RESYNC, ts_recv_ns, recv_seq, symbol, detail)

    def refused(self, out: Output, symbol: str | None, ts_recv_ns: int, recv_seq: int,
                detail: str) -> None:
        self.ev(out, EV_REFUSED, ts_recv_ns, recv_seq, symbol, detail)

    def subscribed(self, out: Output, symbol: str | None, ts_recv_ns: int, recv_seq: int,
                   detail: str | None = None) -> None:
        self.ev(out, EV_SUBSCRIBED, ts_recv_ns, recv_seq, symbol, detail)

    def venue_error(self, out: Output, ts_recv_ns: int, recv_seq: int, detail: str) -> None:
        self.ev(out, EV_ERROR, ts_recv_ns, recv_seq, None, detail)


# ---- URL helpers ------------------------------------------------------------------------
def override_url(default: str, override: str | None) -> str:
    """Replace scheme, host and port of `default` (and its path if `override` has one)."""
    if not override:
        return default
    d = urlsplit(default)
    o = urlsplit(override)
    path = o.path if o.path not in ("", "/") else d.path
    query = o.query or d.query
    return urlunsplit((o.scheme, o.netloc, path, query, ""))


# ---- exact number and time conversions -----------------------------------------------------
_INF = math.inf


def price(text: str | bytes | float | int) -> float:
    """A positive, finite price from the venue's decimal string (or JSON number)."""
    v = float(text)
    if not 0.0 < v < _INF:
        raise BadFrame(f"price out of range: {text!r}")
    return v


def amount(text: str | bytes | float | int) -> float:
    """A non-negative, finite size from the venue's decimal string (or JSON number)."""
    v = float(text)
    if not 0.0 <= v < _INF:
        raise BadFrame(f"amount out of range: {text!r}")
    return v


def quote_side(px: str | float | None, sz: str | float | None
               ) -> tuple[float | None, float | None]:
    """One side of a best bid/ask: (None, None) when the venue reports it empty - absent,
    or price and size both 0 (or "") - else a checked price and size (a size without a
    price is BadFrame)."""
    if px is None or sz is None:
        return None, None
    p = float(px) if px != "" else 0.0
    s = float(sz) if sz != "" else 0.0
    if p == 0.0 and s == 0.0:
        return None, None
    return price(p), amount(s)


_MAX_NS = 2**63 - 1


def parse_levels(raw: Any) -> list[tuple[float, float]]:
    """[[price, size], ...] (decimal strings or numbers) -> float pairs; every price
    finite and > 0, every size finite and >= 0 (else BadFrame). One pass of conversions,
    one pass of checks: cheaper than a checked conversion per value on the book hot path."""
    levels = [(float(p), float(q)) for p, q in raw]
    for px, sz in levels:
        if not (0.0 < px < _INF and 0.0 <= sz < _INF):
            price(px)
            amount(sz)  # raise with the offending value
    return levels


def ms_to_ns(ms: int | str | bytes) -> int:
    """Integer (or digit string) milliseconds since the epoch to nanoseconds, exactly."""
    v = int(ms) * 1_000_000
    if not 0 <= v <= _MAX_NS:
        raise BadFrame(f"timestamp out of range: {ms!r}")
    return v


def us_to_ns(us: int | str) -> int:
    """Integer (or digit string) microseconds since the epoch to nanoseconds, exactly."""
    v = int(us) * 1_000
    if not 0 <= v <= _MAX_NS:
        raise BadFrame(f"timestamp out of range: {us!r}")
    return v


_DECIMAL_S = re.compile(r"^(\d+)(?:\.(\d{1,9}))?$")


def s_decimal_to_ns(text: str) -> int:
    """Seconds as a decimal string ("1618678142.557535") to nanoseconds, exactly."""
    m = _DECIMAL_S.match(text)
    if m is None:
        raise BadFrame(f"bad decimal seconds: {text!r}")
    frac = (m.group(2) or "").ljust(9, "0")
    return int(m.group(1)) * 1_000_000_000 + int(frac)


_ISO = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[T ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:?\d{2})?$")


def iso_to_ns(text: str) -> int:
    """An RFC 3339 / ISO 8601 UTC timestamp with up to 9 fraction digits to ns, exactly."""
    m = _ISO.match(text)
    if m is None:
        raise BadFrame(f"bad timestamp: {text!r}")
    date, hh, mm, ss, frac, tz = m.groups()
    base = datetime.fromisoformat(f"{date}T{hh}:{mm}:{ss}+00:00")
    seconds = int(base.timestamp())
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        digits = tz[1:].replace(":", "")
        seconds -= sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    ns = seconds * 1_000_000_000 + int((frac or "").ljust(9, "0") or 0)
    if not 0 <= ns <= _MAX_NS:
        raise BadFrame(f"timestamp out of range: {text!r}")
    return ns
