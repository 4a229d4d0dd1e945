"""The bounded queue between readers and the writer, and each feed's ordered way into it.

Owns:
- `MessageQueue`: items are codec Outputs (the blocks of one socket read of one feed, or
  of one REST answer) and the STOP marker; capacity is counted in messages (frames), not
  items: an item enters when it fits, or alone when the queue is empty (a read larger
  than the capacity is never split), so the depth never exceeds max(capacity, the largest
  read); one consumer (the writer) takes everything queued at once. While the writer is
  behind, an item of the same feed as the queue's last one is merged into it (its
  blocks' columns appended): a backlog costs its rows, not one set of containers per
  read (measured: ~2 KB per queued read of ~4 frames before, the rows alone after);
- `FeedOutbox`: one feed's hand-off. `push` is synchronous, so a producer that allocated
  recv_seq values and ran the codec hands its output on before anything else of that feed
  can run: a feed's items reach the writer in recv_seq order, always (a commit then never
  covers a recv_seq that lies after one not yet committed). When the queue is full,
  `block` keeps the feed's items in order in the outbox and the reader waits for it to
  drain (backpressure reaches the socket); `drop_newest` drops the item and counts what
  it held (messages, rows and rejects) in the named drop counters.

Must not: look inside items beyond their weight and counts, or reorder one feed's items.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

import structlog

from ingestd.exchanges.base import Output
from ingestd.stats import QueueStats

log = structlog.get_logger("ingestd.intake")

DROP_QUEUE_FULL = "queue_full"

QueueItem = Output | None
STOP: QueueItem = None


class MessageQueue:
    """FIFO of Outputs with a capacity in messages; one consumer."""

    def __init__(self, capacity: int, stats: QueueStats) -> None:
        self.capacity = capacity
        self.stats = stats
        self.messages = 0
        self._items: deque[QueueItem] = deque()
        self._has_items = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    def full(self) -> bool:
        return self.messages >= self.capacity

    def has_room(self, weight: int) -> bool:
        return self.messages == 0 or self.messages + weight <= self.capacity

    def qsize(self) -> int:
        """Messages queued."""
        return self.messages

    def put_nowait(self, item: QueueItem) -> None:
        """Append regardless of room (callers check `has_room()`)."""
        items = self._items
        if item is not None:
            self.messages += item.messages or 1
            tail = items[-1] if items else None
            if tail is not None and tail.feed == item.feed and tail.absorb(item):
                return
        items.append(item)
        st = self.stats
        if self.messages > st.peak_depth:
            st.peak_depth = self.messages
        self._has_items.set()
        self._room.clear()  # set again when the consumer empties the queue

    async def wait_room(self) -> None:
        await self._room.wait()

    async def get_all(self) -> list[QueueItem]:
        """Everything queued (at least one item), oldest first."""
        while not self._items:
            self._has_items.clear()
            await self._has_items.wait()
        items = list(self._items)
        self._items.clear()
        self.messages = 0
        self._has_items.clear()
        self._room.set()
        return items


class FeedOutbox:
    """One feed's ordered hand-off into the queue (see the module docstring)."""

    def __init__(self, queue: MessageQueue, block: bool, stats: QueueStats,
                 on_drop: Callable[[Output], None] | None = None) -> None:
        self.queue = queue
        self.block = block
        self.stats = stats
        self.on_drop = on_drop
        self._pending: deque[Output] = deque()
        self._pump: asyncio.Task[None] | None = None
        self._drained = asyncio.Event()
        self._drained.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def push(self, item: Output) -> bool:
        """Hand `item` on, after every earlier item of this feed. False: dropped."""
        q = self.queue
        if not self._pending and q.has_room(item.messages or 1):
            q.put_nowait(item)
            return True
        if not self.block:
            self.stats.dropped[DROP_QUEUE_FULL] += item.messages or 1
            if self.on_drop is not None:
                self.on_drop(item)
            return False
        self._pending.append(item)
        self._drained.clear()
        if self._pump is None:
            self._pump = asyncio.get_running_loop().create_task(self._run_pump(),
                                                                name="outbox-pump")
        return True

    async def drained(self) -> None:
        """Wait until everything pushed is in the queue (backpressure for the reader)."""
        await self._drained.wait()

    async def _run_pump(self) -> None:
        q, pending = self.queue, self._pending
        try:
            while pending:
                while not q.has_room(pending[0].messages or 1):
                    await q.wait_room()
                q.put_nowait(pending.popleft())
        finally:
            self._pump = None
            if not pending:
                self._drained.set()
            else:  # cancelled with items left (shutdown): hand them on anyway, in order
                while pending:
                    q.put_nowait(pending.popleft())
                self._drained.set()


class Intake:
    """The `when_full` policy and one outbox per feed."""

    def __init__(self, queue: MessageQueue, when_full: str, stats: QueueStats) -> None:
        self.queue = queue
        self.block = when_full == "block"
        self.stats = stats

    def outbox(self, on_drop: Callable[[Output], None] | None = None) -> FeedOutbox:
        return FeedOutbox(self.queue, self.block, self.stats, on_drop)
