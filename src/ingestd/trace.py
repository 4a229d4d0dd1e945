"""Opt-in latency trace for the benchmark: when rows reach the writer, when files commit.

Owns: with `INGESTD_LATENCY_TRACE=<path>` in the environment, recording the recv_seq of
the last row of a queue item with the wall-clock ns when the writer took it (every item,
or one in `INGESTD_LATENCY_TRACE_EVERY` to bound memory on long runs), and each committed
file with the wall-clock ns of its commit; all written to `<path>` as JSON at shutdown.
Without the variable nothing is recorded and the writer's only cost is an `is None`
check per item.

Must not: change what is written, or do I/O before shutdown.
"""

from __future__ import annotations

import os
import time
from array import array
from pathlib import Path

import orjson

ENV = "INGESTD_LATENCY_TRACE"


class LatencyTrace:
    def __init__(self, path: str, every: int = 1) -> None:
        self.path = Path(path)
        self.every = max(1, every)     # record one item in `every` (bounded memory)
        self._n = 0
        self.seqs = array("q")
        self.accepted_ns = array("q")
        self.commits: list[tuple[str, int]] = []

    def accepted(self, seq: int) -> None:
        self._n += 1
        if self._n % self.every:
            return
        self.seqs.append(seq)
        self.accepted_ns.append(time.time_ns())

    def committed(self, path: str) -> None:
        self.commits.append((path, time.time_ns()))

    def dump(self) -> None:
        with open(self.path, "wb") as f:
            f.write(orjson.dumps({"seqs": list(self.seqs),
                                  "accepted_ns": list(self.accepted_ns),
                                  "commits": self.commits}))


def from_env() -> LatencyTrace | None:
    path = os.environ.get(ENV)
    every = os.environ.get(ENV + "_EVERY", "1")
    return LatencyTrace(path, int(every) if every.isdigit() else 1) if path else None
