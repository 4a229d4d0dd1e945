"""The latest derivatives values of each symbol, shared by every venue that sends them.

Owns: per symbol, the last known mark price, index price, funding rate, predicted funding
rate, open interest and next funding time, merged from messages that each carry only some
of them (Bybit `tickers` deltas carry only what changed; Binance's open interest comes
from a REST poll, its funding from `markPrice`), and the full row written after each
message: every value the venue has sent so far, null until it has sent one. Explicit
state (`state()` / `restore()`), so a restart or a journal replay continues the rows.

Must not: decode any venue's format, or invent a value (a field a message does not carry
keeps its last value; there is no default).
"""

from __future__ import annotations

from typing import Any, Final

from ingestd.exchanges.base import BadFrame, Output

FIELDS: Final = ("mark_price", "index_price", "funding_rate", "predicted_funding_rate",
                 "open_interest", "next_funding_time")
_INDEX: Final = {name: i for i, name in enumerate(FIELDS)}

Values = list[float | int | None]


class LatestValues:
    """Per-symbol latest derivatives values."""

    __slots__ = ("_latest",)

    def __init__(self) -> None:
        self._latest: dict[str, Values] = {}

    def update(self, out: Output, symbol: str, ts_event_ns: int | None, ts_recv_ns: int,
               recv_seq: int, **changed: float | int | None) -> None:
        """Merge the fields a message carried (None: not carried) and write the row."""
        row = self._latest.get(symbol)
        if row is None:
            row = self._latest[symbol] = [None] * len(FIELDS)
        for name, value in changed.items():
            if value is not None:
                row[_INDEX[name]] = value
        out.derivatives_block().add(symbol, ts_event_ns, ts_recv_ns, recv_seq, row)

    def get(self, symbol: str) -> dict[str, float | int | None]:
        row = self._latest.get(symbol) or [None] * len(FIELDS)
        return dict(zip(FIELDS, row, strict=True))

    def state(self) -> dict[str, Values]:
        return {s: list(v) for s, v in self._latest.items()}

    def restore(self, state: Any) -> None:
        latest: dict[str, Values] = {}
        for sym, values in dict(state).items():
            if not isinstance(values, list) or len(values) != len(FIELDS):
                raise BadFrame(f"derivatives state of {sym!r} is not {len(FIELDS)} values")
            row: Values = []
            for name, v in zip(FIELDS, values, strict=True):
                if v is not None and not isinstance(v, int | float):
                    raise BadFrame(f"derivatives {name} of {sym!r} is not a number")
                row.append(int(v) if name == "next_funding_time" and v is not None else v)
            latest[str(sym)] = row
        self._latest = latest
