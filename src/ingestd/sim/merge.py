"""How the simulator interleaves recorded streams (used by the server and every venue).

Owns: `merge_streams`. Must not: import the server or the venue registry (the venues
import this module; a cycle through the server was what this module removed).
"""

from __future__ import annotations


def merge_streams(streams: list[list[bytes]]) -> list[bytes]:
    """Interleave recorded per-stream sequences by their relative position in each.

    Each sequence keeps its own order; sequences of different lengths spread evenly.
    """
    keyed = [((i + 0.5) / len(seq), j, i, frame)
             for j, seq in enumerate(streams) for i, frame in enumerate(seq)]
    keyed.sort(key=lambda k: (k[0], k[1], k[2]))
    return [k[3] for k in keyed]
