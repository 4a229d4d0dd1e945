"""The entry of the bounded queue between readers and the writer.

Owns: the `when_full` policy - "block" waits for room (backpressure reaches the
sockets), "drop_newest" drops the message and counts it - strict FIFO among waiting
producers (asyncio.Queue alone lets a new put overtake a woken waiter; per-feed order
matters to the journal's commit bookkeeping), and queue statistics.

Must not: look inside items or buffer anything itself.
"""

from __future__ import annotations

import asyncio

from ingestd.sink.writer import QueueItem
from ingestd.stats import QueueStats

DROP_QUEUE_FULL = "queue_full"


class Intake:
    def __init__(self, queue: asyncio.Queue[QueueItem], when_full: str,
                 stats: QueueStats) -> None:
        self.queue = queue
        self.block = when_full == "block"
        self.stats = stats
        self._lock = asyncio.Lock()

    def try_put(self, item: QueueItem) -> bool:
        """Hand one item on without waiting, if there is room and nobody is waiting."""
        q = self.queue
        if self._lock.locked() or q.full():
            return False
        q.put_nowait(item)
        depth = q.qsize()
        if depth > self.stats.peak_depth:
            self.stats.peak_depth = depth
        return True

    async def put(self, item: QueueItem) -> bool:
        """Hand one item on; False if it was dropped (counted)."""
        q = self.queue
        if not self._lock.locked() and not q.full():
            q.put_nowait(item)
        elif not self.block:
            self.stats.dropped[DROP_QUEUE_FULL] += 1
            return False
        else:
            async with self._lock:
                await q.put(item)
        depth = q.qsize()
        if depth > self.stats.peak_depth:
            self.stats.peak_depth = depth
        return True
