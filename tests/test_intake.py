"""The queue of blocks and each feed's ordered outbox: recv_seq order under contention."""

from __future__ import annotations

import asyncio

from ingestd.exchanges.base import Output
from ingestd.feed.intake import STOP, Intake, MessageQueue
from ingestd.stats import QueueStats


def item(feed: str, seq: int, messages: int = 1) -> Output:
    out = Output(feed, "binance")
    out.event(None, None, seq, seq, feed, "x", None)
    out.last_seq = seq
    out.messages = messages
    return out


async def consume(q: MessageQueue, seen: list[tuple[str, int]]) -> None:
    while True:
        for it in await q.get_all():
            if it is None:
                return
            assert it.events is not None
            seen.extend((it.feed, seq) for seq in it.events.recv_seq)
            await asyncio.sleep(0)


async def test_a_feed_s_items_reach_the_writer_in_recv_seq_order_under_contention() -> None:
    """A producer that waits for room (e.g. a REST snapshot's release) must not be
    overtaken by a later push of the same feed (the reader's next read): today's
    asyncio.Queue + lock intake let a fresh put slip in front of a woken waiter."""
    stats = QueueStats(2)
    q = MessageQueue(2, stats)
    intake = Intake(q, "block", stats)
    a, b = intake.outbox(), intake.outbox()
    seen: list[tuple[str, int]] = []
    # Fill the queue, then push from two producers of feed A and one of feed B while
    # it is full; the consumer starts only afterwards.
    seq = 0
    for _ in range(2):
        seq += 1
        assert a.push(item("A", seq))
    for _ in range(50):
        seq += 1
        a.push(item("A", seq, messages=1 + seq % 3))   # pending, in order
        b.push(item("B", seq))
    assert a.pending and b.pending
    consumer = asyncio.create_task(consume(q, seen))
    # While A's backlog drains, keep pushing: a push must queue behind the backlog.
    for _ in range(50):
        seq += 1
        a.push(item("A", seq))
        await asyncio.sleep(0)
    await asyncio.wait_for(a.drained(), 5)
    await asyncio.wait_for(b.drained(), 5)
    q.put_nowait(STOP)
    await asyncio.wait_for(consumer, 5)
    a_seqs = [s for f, s in seen if f == "A"]
    b_seqs = [s for f, s in seen if f == "B"]
    assert a_seqs == sorted(a_seqs) and len(a_seqs) == 102
    assert b_seqs == sorted(b_seqs) and len(b_seqs) == 50
    assert stats.peak_depth <= 3  # capacity 2, and a read of up to 3 messages alone


async def test_drop_newest_counts_what_it_drops_and_never_reorders() -> None:
    stats = QueueStats(3)
    q = MessageQueue(3, stats)
    intake = Intake(q, "drop_newest", stats)
    dropped: list[Output] = []
    box = intake.outbox(dropped.append)
    kept = [box.push(item("A", s)) for s in range(1, 6)]
    assert kept == [True, True, True, False, False]
    assert stats.dropped["queue_full"] == 2 and [d.last_seq for d in dropped] == [4, 5]
    items = await q.get_all()
    # Items of one feed queued back to back are merged into one (a backlog costs rows,
    # not containers); their rows keep their order.
    assert len(items) == 1 and items[0] is not None and items[0].events is not None
    assert items[0].events.recv_seq == [1, 2, 3] and items[0].last_seq == 3
    assert box.push(item("A", 6))


async def test_a_read_larger_than_the_capacity_enters_an_empty_queue_alone() -> None:
    stats = QueueStats(10)
    q = MessageQueue(10, stats)
    box = Intake(q, "block", stats).outbox()
    assert box.push(item("A", 1, messages=200))   # never split, never refused
    box.push(item("A", 2, messages=1))             # waits: the queue holds 200 > 10
    assert box.pending == 1 and q.qsize() == 200
    first = await q.get_all()
    await asyncio.wait_for(box.drained(), 5)
    second = await q.get_all()
    assert [i.last_seq for i in first if i] == [1] and [i.last_seq for i in second if i] == [2]
