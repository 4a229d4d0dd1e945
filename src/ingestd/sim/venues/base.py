"""The shape of a simulated venue: its REST answers and its WebSocket session protocol.

Owns: the `Venue` interface that sim/server.py drives.
Must not: open sockets (the server does) or invent market data: served frames come from
recordings (sim/recorded.py), byte for byte.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from ingestd.sim.server import SimConn


def without_nth(frames: list[bytes], n: int, marker: bytes) -> list[bytes]:
    """`frames` minus the n-th one containing `marker` (a lost update, for gap tests)."""
    seen = 0
    kept = []
    for frame in frames:
        if marker in frame:
            seen += 1
            if seen == n:
                continue
        kept.append(frame)
    return kept


class Venue(ABC):
    exchange: ClassVar[str]
    # A feed (the `[[feeds]]` keys other than name/exchange/url) that shows this venue's
    # recorded data in `ingestd demo`.
    demo_feed: ClassVar[dict[str, object]] = {}

    def rest(self, path: str, query: dict[str, list[str]]) -> tuple[int, bytes] | None:
        """Answer a REST GET: (status, JSON body), or None for 404."""
        return None

    def timeline(self) -> list[tuple[str, bytes]]:
        """Every recorded data frame with the subscription key that selects it, in the
        order live mode publishes them (venues that support live mode override this)."""
        raise RuntimeError(f"the {self.exchange} simulator has no live mode")

    @abstractmethod
    async def session(self, conn: SimConn) -> None:
        """Run one WebSocket connection: handle subscriptions, serve frames, answer pings."""
