"""The shape every exchange codec has, and the helpers codecs share.

Owns: `Codec` (the sans-I/O protocol object for one feed), `Output` (what one input
produced), `RestRequest` (a REST fetch the codec needs, e.g. a book snapshot), and exact
conversions (decimal strings and venue timestamps to floats and integer nanoseconds).

Must not: do I/O, read a clock, log, sleep or touch asyncio. A codec only turns inputs
(WebSocket frames and REST bodies, each with its receive time and `recv_seq`) into rows,
events, requests and replies. The reader (feed/reader.py) is the only socket owner; the
journal replays the same inputs through the same codec, so a codec must be deterministic
given its inputs.

Lifecycle, driven by the reader:
  codec = CodecClass(feed_config)
  per connection: codec.ws_url(); codec.on_connect(); send codec.subscribe_messages()
  per frame:      out = codec.parse(frame, ts_recv_ns, recv_seq)
                  send out.replies, fetch out.requests (then codec.on_rest(...)),
                  reconnect if out.reconnect is set
  every `keepalive_interval_s` of the codec: send codec.keepalive_message()

`recv_seq` is allocated by the reader, strictly increasing per feed. Rows decoded from one
input carry that input's value. A codec that releases rows it held back (e.g. book diffs
buffered until a REST snapshot arrives) gives them `recv_seq + 1, + 2, ...` and reports the
highest value it used in `Output.last_seq`, so replaying by `recv_seq` is exact.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar
from urllib.parse import urlsplit, urlunsplit

from ingestd.config import FeedConfig
from ingestd.schema import (
    EV_ERROR,
    EV_GAP,
    EV_REFUSED,
    EV_RESYNC,
    EV_SUBSCRIBED,
    BookRow,
    EventRow,
    QuoteRow,
    TradeRow,
)

__all__ = [
    "BadFrame",
    "Codec",
    "Output",
    "RestRequest",
    "amount",
    "iso_to_ns",
    "ms_to_ns",
    "override_url",
    "price",
    "s_decimal_to_ns",
    "us_to_ns",
]

# Reasons a codec counts rows or frames it deliberately did not store (not errors).
DROP_UNSUBSCRIBED = "unsubscribed_symbol"
DROP_DUPLICATE_TRADE = "duplicate_trade"
DROP_STALE_BOOK = "stale_book_update"
DROP_UNSYNCED_BOOK = "book_not_synced"
DROP_BUFFER_OVERFLOW = "book_buffer_overflow"


class BadFrame(ValueError):
    """A frame that does not have the shape its type promises (counted, kept raw)."""


@dataclass(frozen=True, slots=True)
class RestRequest:
    """A REST GET the codec needs answered; the reply goes back through `Codec.on_rest`."""

    key: str            # what the codec uses to match the answer (e.g. the symbol)
    url: str            # absolute URL
    delay_s: float = 0.0  # wait this long before fetching (retry spacing decided by the codec)


class Output:
    """Everything one input (frame or REST body) produced. Lists are created on demand."""

    __slots__ = ("book", "drops", "error", "events", "last_seq", "quotes", "reconnect",
                 "replies", "requests", "trades", "unknown")

    def __init__(self) -> None:
        self.trades: list[TradeRow] | None = None
        self.quotes: list[QuoteRow] | None = None
        self.book: list[BookRow] | None = None
        self.events: list[EventRow] | None = None
        self.requests: list[RestRequest] | None = None
        self.replies: list[str] | None = None    # text frames to send back (e.g. pong)
        self.error: str | None = None            # why the frame was rejected (kept raw)
        self.unknown: bool = False               # valid JSON of a type we do not handle
        self.drops: dict[str, int] | None = None  # rows/frames deliberately dropped, by reason
        self.reconnect: str | None = None        # the venue asked us to reconnect (reason)
        self.last_seq: int = 0                   # highest recv_seq used, if above the input's

    # Small helpers so codecs read clearly; not used on the per-trade hot path.
    def event(self, row: EventRow) -> None:
        if self.events is None:
            self.events = []
        self.events.append(row)

    def request(self, req: RestRequest) -> None:
        if self.requests is None:
            self.requests = []
        self.requests.append(req)

    def reply(self, text: str) -> None:
        if self.replies is None:
            self.replies = []
        self.replies.append(text)

    def drop(self, reason: str, n: int = 1) -> None:
        if self.drops is None:
            self.drops = {}
        self.drops[reason] = self.drops.get(reason, 0) + n

    @property
    def has_rows(self) -> bool:
        return bool(self.trades or self.quotes or self.book or self.events)


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

    def __init__(self, feed: FeedConfig) -> None:
        self.feed = feed
        self.name = feed.name
        self.symbols: frozenset[str] = frozenset(feed.symbols)
        self.channels: frozenset[str] = frozenset(feed.channels)

    @classmethod
    def check_feed(cls, feed: FeedConfig) -> list[str]:
        """Venue-specific config problems as `key: what is wrong` strings."""
        problems = []
        if feed.trade_stream is not None:
            problems.append(f"trade_stream: not used by {cls.exchange}")
        if feed.book_depth is not None:
            problems.append(f"book_depth: not used by {cls.exchange}")
        return problems

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

    @abstractmethod
    def parse(self, frame: bytes | str, ts_recv_ns: int, recv_seq: int) -> Output:
        """Decode one frame. Never raises: problems become `Output.error`."""

    def on_rest(self, request: RestRequest, status: int, body: bytes,
                ts_recv_ns: int, recv_seq: int) -> Output:
        """Handle the answer to a `RestRequest` (status 0: the request failed to connect)."""
        out = Output()
        out.error = f"unexpected REST answer for {request.key}"
        return out

    def keepalive_message(self) -> str | None:
        """The application-level ping to send every `keepalive_interval_s` (None: none)."""
        return None

    # ---- event helpers -------------------------------------------------------------------
    def ev(self, out: Output, event: str, ts_recv_ns: int, recv_seq: int,
           symbol: str | None = None, detail: str | None = None,
           ts_event_ns: int | None = None) -> None:
        out.event((symbol, ts_event_ns, ts_recv_ns, recv_seq, self.name, event, detail))

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


_MAX_NS = 2**63 - 1


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
