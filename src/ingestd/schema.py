"""Normalized row shapes and their Arrow schemas: the contract between codecs and the sink.

Owns: the four output tables, the order of fields in a row tuple for each, and the
Arrow schema every Parquet file of a table is written with.

Must not: parse anything from the wire, or do I/O. Codecs build row tuples in the
field order defined here; the writer turns lists of them into Arrow tables in bulk.

A row tuple never carries `exchange`: every Parquet file holds one exchange (it is a
partition key), so the writer adds it as a constant column.

Row tuples (all timestamps are integer nanoseconds since the Unix epoch, UTC):

- trades: (symbol, ts_event_ns|None, ts_recv_ns, recv_seq, trade_id|None, side, price, amount)
- quotes: (symbol, ts_event_ns|None, ts_recv_ns, recv_seq,
           bid_price|None, bid_amount|None, ask_price|None, ask_amount|None)
- book:   (symbol, ts_event_ns|None, ts_recv_ns, recv_seq, is_snapshot, side, price, amount,
           update_id|None)
- events: (symbol|None, ts_event_ns|None, ts_recv_ns, recv_seq, feed, event, detail|None)
"""

from __future__ import annotations

from typing import Final

import pyarrow as pa

SCHEMA_VERSION: Final = "1"

TRADES: Final = "trades"
QUOTES: Final = "quotes"
BOOK: Final = "book"
EVENTS: Final = "events"
TABLES: Final = (TRADES, QUOTES, BOOK, EVENTS)

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

TradeRow = tuple[str, int | None, int, int, str | None, str, float, float]
QuoteRow = tuple[str, int | None, int, int, float | None, float | None, float | None, float | None]
BookRow = tuple[str, int | None, int, int, bool, str, float, float, int | None]
EventRow = tuple[str | None, int | None, int, int, str, str, str | None]

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
    EVENTS: _schema(EVENTS, [
        pa.field("feed", pa.string(), nullable=False),
        pa.field("event", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=True),
    ]),
}

# Number of fields in a row tuple of each table (the schema minus `exchange`).
ROW_WIDTH: Final[dict[str, int]] = {t: len(s) - 1 for t, s in SCHEMAS.items()}
