"""The output tables, their Arrow schemas, and the columnar blocks codecs fill.

Owns: the tables, the Arrow schema every file of a table is written with (timestamps in
ns, or in us for `timestamp_unit = "us"`), and the block builders - one class per table
with one named Python list per column - that are the whole contract between codecs and
the sink: a codec appends the rows of one socket read to at most one block per table;
queue, batcher, writer, Parquet commit and recovery move blocks and build one Arrow
array per column in bulk. Nothing downstream of a codec reads a row by position.

Must not: parse anything from the wire, or do I/O.

Blocks never carry `exchange`: every file holds one exchange (a partition key), so the
writer adds it as a constant column. Timestamps in blocks are integer ns (UTC).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Final

import pyarrow as pa
import pyarrow.compute as pc

SCHEMA_VERSION: Final = "1"

TRADES: Final = "trades"
QUOTES: Final = "quotes"
BOOK: Final = "book"
EVENTS: Final = "events"
DERIVATIVES: Final = "derivatives"
LIQUIDATIONS: Final = "liquidations"
TABLES: Final = (TRADES, QUOTES, BOOK, EVENTS, DERIVATIVES, LIQUIDATIONS)

# Trade sides (the taker's / aggressor's side) and book sides.
BUY: Final = "buy"
SELL: Final = "sell"
UNKNOWN: Final = "unknown"
BID: Final = "bid"
ASK: Final = "ask"

# Event names written to the `events` table.
EV_CONNECTED: Final = "connected"
EV_DISCONNECTED: Final = "disconnected"
EV_GAP: Final = "gap"
EV_RESYNC: Final = "resync"
EV_STALE: Final = "stale"
EV_SUBSCRIBED: Final = "subscribed"
EV_REFUSED: Final = "refused"
EV_ERROR: Final = "error"
EV_BREAKER_OPEN: Final = "breaker_open"
EV_BREAKER_HALF_OPEN: Final = "breaker_half_open"
EV_BREAKER_CLOSED: Final = "breaker_closed"
# A trade id never seen before but lower than the highest seen (stored).
EV_OUT_OF_ORDER: Final = "out_of_order"
# A snapshot request failed (no answer, not HTTP, cut short, garbage); it is retried.
EV_SNAPSHOT_FAILED: Final = "snapshot_failed"
# A periodic REST poll got no usable answer (timeout, HTTP error, garbage); polling goes on.
EV_POLL_FAILED: Final = "poll_failed"
# A book snapshot with no level at all: it empties the book (no book row can say so).
EV_EMPTY_SNAPSHOT: Final = "empty_snapshot"

_TS = pa.timestamp("ns", tz="UTC")

_COMMON: Final = [
    pa.field("exchange", pa.string(), nullable=False),
    pa.field("symbol", pa.string(), nullable=False),
    pa.field("ts_event", _TS, nullable=True),
    pa.field("ts_recv", _TS, nullable=False),
    pa.field("recv_seq", pa.int64(), nullable=False),
]


def _schema(table: str, extra: list[pa.Field]) -> pa.Schema:
    fields = list(_COMMON) + extra
    if table == EVENTS:
        # Feed-level events have no symbol.
        fields[1] = pa.field("symbol", pa.string(), nullable=True)
    return pa.schema(fields, metadata={b"ingestd.table": table.encode(),
                                       b"ingestd.schema_version": SCHEMA_VERSION.encode()})


SCHEMAS: Final[dict[str, pa.Schema]] = {
    TRADES: _schema(TRADES, [
        pa.field("trade_id", pa.string(), nullable=True),
        pa.field("side", pa.string(), nullable=False),
        pa.field("price", pa.float64(), nullable=False),
        pa.field("amount", pa.float64(), nullable=False),
    ]),
    QUOTES: _schema(QUOTES, [
        pa.field("bid_price", pa.float64(), nullable=True),
        pa.field("bid_amount", pa.float64(), nullable=True),
        pa.field("ask_price", pa.float64(), nullable=True),
        pa.field("ask_amount", pa.float64(), nullable=True),
    ]),
    BOOK: _schema(BOOK, [
        pa.field("is_snapshot", pa.bool_(), nullable=False),
        pa.field("side", pa.string(), nullable=False),
        pa.field("price", pa.float64(), nullable=False),
        pa.field("amount", pa.float64(), nullable=False),
        pa.field("update_id", pa.int64(), nullable=True),
    ]),
    DERIVATIVES: _schema(DERIVATIVES, [
        pa.field("mark_price", pa.float64(), nullable=True),
        pa.field("index_price", pa.float64(), nullable=True),
        pa.field("funding_rate", pa.float64(), nullable=True),
        pa.field("predicted_funding_rate", pa.float64(), nullable=True),
        pa.field("open_interest", pa.float64(), nullable=True),
        pa.field("next_funding_time", _TS, nullable=True),
    ]),
    LIQUIDATIONS: _schema(LIQUIDATIONS, [
        pa.field("side", pa.string(), nullable=False),
        pa.field("price", pa.float64(), nullable=False),
        pa.field("amount", pa.float64(), nullable=False),
        pa.field("order_id", pa.string(), nullable=True),
    ]),
    EVENTS: _schema(EVENTS, [
        pa.field("feed", pa.string(), nullable=False),
        pa.field("event", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=True),
    ]),
}

# Number of columns a block of each table has (the schema minus `exchange`).
ROW_WIDTH: Final[dict[str, int]] = {t: len(s) - 1 for t, s in SCHEMAS.items()}


# ---- the columnar codec -> sink contract -----------------------------------------------
class Block:
    """The rows of one table, as named columns (Python lists), built by one codec call.

    A codec appends to the columns of the blocks of one `Output` (one socket read of one
    feed); the sink concatenates blocks of a partition and builds each Arrow column from
    one list in bulk. Every column has the same length. Timestamps are integer ns since
    the Unix epoch (UTC). `exchange` is not a column: it is constant per file (a
    partition key) and added at write time.
    """

    __slots__ = ()
    TABLE: ClassVar[str]
    COLUMNS: ClassVar[tuple[str, ...]]

    def __init__(self) -> None:
        for name in self.COLUMNS:
            setattr(self, name, [])

    def __len__(self) -> int:
        return len(self.recv_seq)  # type: ignore[attr-defined]

    def columns(self) -> list[list[Any]]:
        """The column lists in schema order (without `exchange`)."""
        return [getattr(self, name) for name in self.COLUMNS]

    def extend(self, other: Block) -> None:
        """Append `other`'s rows (same table) after this block's."""
        for name in self.COLUMNS:
            getattr(self, name).extend(getattr(other, name))

    def truncate(self, n_rows: int) -> None:
        """Drop every row from index `n_rows` on (undo a frame that failed half-way)."""
        for name in self.COLUMNS:
            del getattr(self, name)[n_rows:]

    def take(self, indices: Sequence[int]) -> Block:
        """A new block of the rows at `indices` (in that order)."""
        new = type(self)()
        for name in self.COLUMNS:
            col = getattr(self, name)
            getattr(new, name).extend([col[i] for i in indices])
        return new

    def rows(self) -> list[tuple[Any, ...]]:
        """Row tuples in schema order: for tests and debugging, never on a hot path."""
        return list(zip(*self.columns(), strict=True))

    def to_arrow(self, exchange: str, unit: str = "ns") -> pa.Table:
        return to_arrow_table(self.TABLE, exchange, self.columns(), unit)


class TradesBlock(Block):
    __slots__ = ("amount", "price", "recv_seq", "side", "symbol", "trade_id", "ts_event",
                 "ts_recv")
    TABLE = TRADES
    COLUMNS = ("symbol", "ts_event", "ts_recv", "recv_seq", "trade_id", "side", "price",
               "amount")
    symbol: list[str]
    ts_event: list[int | None]
    ts_recv: list[int]
    recv_seq: list[int]
    trade_id: list[str | None]
    side: list[str]
    price: list[float]
    amount: list[float]

    def __init__(self) -> None:  # explicit: cheaper than the generic loop
        self.symbol = []
        self.ts_event = []
        self.ts_recv = []
        self.recv_seq = []
        self.trade_id = []
        self.side = []
        self.price = []
        self.amount = []

    def extend(self, other: Block) -> None:  # explicit: the writer's hot path
        assert isinstance(other, TradesBlock)
        self.symbol.extend(other.symbol)
        self.ts_event.extend(other.ts_event)
        self.ts_recv.extend(other.ts_recv)
        self.recv_seq.extend(other.recv_seq)
        self.trade_id.extend(other.trade_id)
        self.side.extend(other.side)
        self.price.extend(other.price)
        self.amount.extend(other.amount)

    def add(self, symbol: str, ts_event_ns: int | None, ts_recv_ns: int, recv_seq: int,
            trade_id: str | None, side: str, price: float, amount: float) -> None:
        self.symbol.append(symbol)
        self.ts_event.append(ts_event_ns)
        self.ts_recv.append(ts_recv_ns)
        self.recv_seq.append(recv_seq)
        self.trade_id.append(trade_id)
        self.side.append(side)
        self.price.append(price)
        self.amount.append(amount)


class QuotesBlock(Block):
    __slots__ = ("ask_amount", "ask_price", "bid_amount", "bid_price", "recv_seq", "symbol",
                 "ts_event", "ts_recv")
    TABLE = QUOTES
    COLUMNS = ("symbol", "ts_event", "ts_recv", "recv_seq", "bid_price", "bid_amount",
               "ask_price", "ask_amount")
    symbol: list[str]
    ts_event: list[int | None]
    ts_recv: list[int]
    recv_seq: list[int]
    bid_price: list[float | None]
    bid_amount: list[float | None]
    ask_price: list[float | None]
    ask_amount: list[float | None]

    def __init__(self) -> None:  # explicit: cheaper than the generic loop
        self.symbol = []
        self.ts_event = []
        self.ts_recv = []
        self.recv_seq = []
        self.bid_price = []
        self.bid_amount = []
        self.ask_price = []
        self.ask_amount = []

    def extend(self, other: Block) -> None:  # explicit: the writer's hot path
        assert isinstance(other, QuotesBlock)
        self.symbol.extend(other.symbol)
        self.ts_event.extend(other.ts_event)
        self.ts_recv.extend(other.ts_recv)
        self.recv_seq.extend(other.recv_seq)
        self.bid_price.extend(other.bid_price)
        self.bid_amount.extend(other.bid_amount)
        self.ask_price.extend(other.ask_price)
        self.ask_amount.extend(other.ask_amount)

    def add(self, symbol: str, ts_event_ns: int | None, ts_recv_ns: int, recv_seq: int,
            bid_price: float | None, bid_amount: float | None, ask_price: float | None,
            ask_amount: float | None) -> None:
        self.symbol.append(symbol)
        self.ts_event.append(ts_event_ns)
        self.ts_recv.append(ts_recv_ns)
        self.recv_seq.append(recv_seq)
        self.bid_price.append(bid_price)
        self.bid_amount.append(bid_amount)
        self.ask_price.append(ask_price)
        self.ask_amount.append(ask_amount)


class BookBlock(Block):
    __slots__ = ("amount", "is_snapshot", "price", "recv_seq", "side", "symbol", "ts_event",
                 "ts_recv", "update_id")
    TABLE = BOOK
    COLUMNS = ("symbol", "ts_event", "ts_recv", "recv_seq", "is_snapshot", "side", "price",
               "amount", "update_id")
    symbol: list[str]
    ts_event: list[int | None]
    ts_recv: list[int]
    recv_seq: list[int]
    is_snapshot: list[bool]
    side: list[str]
    price: list[float]
    amount: list[float]
    update_id: list[int | None]

    def __init__(self) -> None:  # explicit: cheaper than the generic loop
        self.symbol = []
        self.ts_event = []
        self.ts_recv = []
        self.recv_seq = []
        self.is_snapshot = []
        self.side = []
        self.price = []
        self.amount = []
        self.update_id = []

    def extend(self, other: Block) -> None:  # explicit: the writer's hot path
        assert isinstance(other, BookBlock)
        self.symbol.extend(other.symbol)
        self.ts_event.extend(other.ts_event)
        self.ts_recv.extend(other.ts_recv)
        self.recv_seq.extend(other.recv_seq)
        self.is_snapshot.extend(other.is_snapshot)
        self.side.extend(other.side)
        self.price.extend(other.price)
        self.amount.extend(other.amount)
        self.update_id.extend(other.update_id)

    def add(self, symbol: str, ts_event_ns: int | None, ts_recv_ns: int, recv_seq: int,
            is_snapshot: bool, side: str, price: float, amount: float,
            update_id: int | None) -> None:
        self.symbol.append(symbol)
        self.ts_event.append(ts_event_ns)
        self.ts_recv.append(ts_recv_ns)
        self.recv_seq.append(recv_seq)
        self.is_snapshot.append(is_snapshot)
        self.side.append(side)
        self.price.append(price)
        self.amount.append(amount)
        self.update_id.append(update_id)

    def add_levels(self, symbol: str, ts_event_ns: int | None, ts_recv_ns: int,
                   recv_seq: int, is_snapshot: bool, bids: Sequence[tuple[float, float]],
                   asks: Sequence[tuple[float, float]], update_id: int | None) -> None:
        """All levels of one message (bids, then asks) in one extend per column."""
        n = len(bids) + len(asks)
        if not n:
            return
        self.symbol.extend([symbol] * n)
        self.ts_event.extend([ts_event_ns] * n)
        self.ts_recv.extend([ts_recv_ns] * n)
        self.recv_seq.extend([recv_seq] * n)
        self.is_snapshot.extend([is_snapshot] * n)
        self.side.extend([BID] * len(bids))
        self.side.extend([ASK] * len(asks))
        for levels in (bids, asks):
            for px, amt in levels:
                self.price.append(px)
                self.amount.append(amt)
        self.update_id.extend([update_id] * n)


class EventsBlock(Block):
    __slots__ = ("detail", "event", "feed", "recv_seq", "symbol", "ts_event", "ts_recv")
    TABLE = EVENTS
    COLUMNS = ("symbol", "ts_event", "ts_recv", "recv_seq", "feed", "event", "detail")
    symbol: list[str | None]
    ts_event: list[int | None]
    ts_recv: list[int]
    recv_seq: list[int]
    feed: list[str]
    event: list[str]
    detail: list[str | None]

    def __init__(self) -> None:  # explicit: cheaper than the generic loop
        self.symbol = []
        self.ts_event = []
        self.ts_recv = []
        self.recv_seq = []
        self.feed = []
        self.event = []
        self.detail = []

    def extend(self, other: Block) -> None:  # explicit: the writer's hot path
        assert isinstance(other, EventsBlock)
        self.symbol.extend(other.symbol)
        self.ts_event.extend(other.ts_event)
        self.ts_recv.extend(other.ts_recv)
        self.recv_seq.extend(other.recv_seq)
        self.feed.extend(other.feed)
        self.event.extend(other.event)
        self.detail.extend(other.detail)

    def add(self, symbol: str | None, ts_event_ns: int | None, ts_recv_ns: int,
            recv_seq: int, feed: str, event: str, detail: str | None) -> None:
        self.symbol.append(symbol)
        self.ts_event.append(ts_event_ns)
        self.ts_recv.append(ts_recv_ns)
        self.recv_seq.append(recv_seq)
        self.feed.append(feed)
        self.event.append(event)
        self.detail.append(detail)


class DerivativesBlock(Block):
    __slots__ = ("funding_rate", "index_price", "mark_price", "next_funding_time",
                 "open_interest", "predicted_funding_rate", "recv_seq", "symbol", "ts_event",
                 "ts_recv")
    TABLE = DERIVATIVES
    COLUMNS = ("symbol", "ts_event", "ts_recv", "recv_seq", "mark_price", "index_price",
               "funding_rate", "predicted_funding_rate", "open_interest", "next_funding_time")
    symbol: list[str]
    ts_event: list[int | None]
    ts_recv: list[int]
    recv_seq: list[int]
    mark_price: list[float | None]
    index_price: list[float | None]
    funding_rate: list[float | None]
    predicted_funding_rate: list[float | None]
    open_interest: list[float | None]
    next_funding_time: list[int | None]

    def add(self, symbol: str, ts_event_ns: int | None, ts_recv_ns: int, recv_seq: int,
            values: Sequence[float | int | None]) -> None:
        """`values`: mark, index, funding, predicted funding, open interest, next funding
        time (ns) - the symbol's latest values after the message (see exchanges/derivs)."""
        self.symbol.append(symbol)
        self.ts_event.append(ts_event_ns)
        self.ts_recv.append(ts_recv_ns)
        self.recv_seq.append(recv_seq)
        mark, index, funding, predicted, oi, next_ns = values
        self.mark_price.append(mark)
        self.index_price.append(index)
        self.funding_rate.append(funding)
        self.predicted_funding_rate.append(predicted)
        self.open_interest.append(oi)
        self.next_funding_time.append(None if next_ns is None else int(next_ns))


class LiquidationsBlock(Block):
    __slots__ = ("amount", "order_id", "price", "recv_seq", "side", "symbol", "ts_event",
                 "ts_recv")
    TABLE = LIQUIDATIONS
    COLUMNS = ("symbol", "ts_event", "ts_recv", "recv_seq", "side", "price", "amount",
               "order_id")
    symbol: list[str]
    ts_event: list[int | None]
    ts_recv: list[int]
    recv_seq: list[int]
    side: list[str]
    price: list[float]
    amount: list[float]
    order_id: list[str | None]

    def add(self, symbol: str, ts_event_ns: int | None, ts_recv_ns: int, recv_seq: int,
            side: str, price: float, amount: float, order_id: str | None) -> None:
        """`side`: the liquidation ORDER's side (a long is liquidated by a sell)."""
        self.symbol.append(symbol)
        self.ts_event.append(ts_event_ns)
        self.ts_recv.append(ts_recv_ns)
        self.recv_seq.append(recv_seq)
        self.side.append(side)
        self.price.append(price)
        self.amount.append(amount)
        self.order_id.append(order_id)


BLOCK_TYPES: Final[dict[str, type[Block]]] = {
    b.TABLE: b for b in (TradesBlock, QuotesBlock, BookBlock, EventsBlock, DerivativesBlock,
                         LiquidationsBlock)}


def schema_for(table: str, unit: str = "ns") -> pa.Schema:
    """The Arrow schema of `table` with timestamps in `unit` ("ns" or "us")."""
    schema = SCHEMAS[table]
    if unit == "ns":
        return schema
    ts = pa.timestamp(unit, tz="UTC")
    return pa.schema([pa.field(f.name, ts, nullable=f.nullable)
                      if pa.types.is_timestamp(f.type) else f for f in schema],
                     metadata=schema.metadata)


_TS_DIVISOR: Final = {"ns": 1, "us": 1_000}


def to_arrow_table(table: str, exchange: str, columns: Sequence[Sequence[Any]],
                   unit: str = "ns") -> pa.Table:
    """Column lists in schema order (without `exchange`) -> an Arrow table, one bulk
    conversion per column. Timestamps are integer ns; with `unit = "us"` they are floored
    to microseconds (`recv_seq` keeps the full receive order)."""
    schema = schema_for(table, unit)
    fields = list(schema)[1:]
    n = len(columns[0]) if columns else 0
    arrays: list[pa.Array] = [pa.array([exchange] * n, pa.string())]
    div = _TS_DIVISOR[unit]
    for fld, col in zip(fields, columns, strict=True):
        if pa.types.is_timestamp(fld.type):
            ints = pa.array(col, pa.int64())
            if div != 1:
                ints = pc.divide(ints, div)  # integer division floors non-negative ns
            arrays.append(ints.cast(fld.type))
        else:
            arrays.append(pa.array(col, fld.type))
    return pa.Table.from_arrays(arrays, schema=schema)

