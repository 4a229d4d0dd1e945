"""when_full: "block" loses nothing; "drop_newest" drops and counts, and everything adds up."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingestd.daemon import Daemon
from ingestd.feed.transport import GROUP_MAX_FRAMES
from ingestd.sim import SimServer
from tests.support import feed_for, make_config, read_table, run_daemon

SYMBOLS = ["ZILUSDT", "DENTUSDT", "MANAUSDT"]


@pytest.mark.parametrize("when_full", ["block", "drop_newest"])
async def test_tiny_queue_under_a_burst(root: Path, when_full: str) -> None:
    async with SimServer("binance", rate_msgs_s=None) as sim:  # unthrottled burst
        feed = feed_for(sim, symbols=SYMBOLS, channels=["trades"], trade_stream="aggTrade")
        cfg = make_config(root, [feed], queue={"capacity": 1, "when_full": when_full})

        def done(d: Daemon) -> bool:
            st = d.feed_stats.get(feed["name"])
            return st is not None and st.messages >= 145

        daemon = await run_daemon(cfg, done, settle_s=0.3)
    dropped = daemon.queue_stats.dropped.get("queue_full", 0)
    st = daemon.feed_stats[feed["name"]]
    stored = read_table(root, "trades").height + read_table(root, "events").height
    # Every message is either stored or counted as dropped (145 trades + connected +
    # disconnected; the queue's items are socket reads, counted in messages).
    assert st.messages == 145
    assert stored + dropped == 145 + 2
    if when_full == "block":
        assert dropped == 0
    else:
        assert dropped > 0
    # Capacity 1: a read enters only an empty queue, so the depth never exceeds the
    # largest read (at most GROUP_MAX_FRAMES messages), never two reads' worth.
    assert daemon.queue_stats.peak_depth <= GROUP_MAX_FRAMES
