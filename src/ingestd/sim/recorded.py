"""Recorded exchange frames shipped with ingestd (copied from the project's fixtures).

Owns: locating `ingestd/sim/data/<venue>/<file>.jsonl` and reading it as a list of frames,
byte for byte, one per line (the trailing newline is not part of the frame).

Must not: modify frames. The simulator serves exactly what the exchange sent.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"


def path(venue: str, name: str) -> Path:
    return DATA_DIR / venue / name


@cache
def frames(venue: str, name: str) -> tuple[bytes, ...]:
    """Every line of `data/<venue>/<name>` as bytes, without its line terminator."""
    with open(path(venue, name), "rb") as f:
        return tuple(line.rstrip(b"\r\n") for line in f if line.strip())
