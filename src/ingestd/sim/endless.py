"""The interface of a simulated venue whose live timeline never ends (sim/generate.py).

Owns: `EndlessVenue`, what the server's live mode needs from such a venue.
Must not: import the server or any venue (the server imports this module; a venue
importing the server for types would otherwise close an import cycle).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any


class EndlessVenue(ABC):
    """A venue whose live timeline never ends (the server publishes `next_frame()` at its
    rate) and whose subscriptions may start with frames of their own (`join`)."""

    books: dict[str, Any]   # symbol -> generated book (sim/generate.py's Book)

    @abstractmethod
    def next_frame(self) -> tuple[str, bytes]:
        """The next frame to publish and the subscription key that selects it."""

    def join(self, keys: Iterable[str]) -> list[bytes]:
        """Frames a new subscription to `keys` gets before the live ones (snapshots)."""
        return []

    def trade_symbols(self) -> list[str]:
        """Symbols this venue generates trades for."""
        return []


__all__ = ["EndlessVenue"]
