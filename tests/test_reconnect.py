"""A dropped connection reconnects with backoff instead of ending the feed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ingestd.sim import Faults, SimServer
from tests.support import feed_for, make_config, read_table, run_daemon


@pytest.mark.parametrize("mode", ["clean", "reset", "no_close_frame"])
async def test_feed_survives_dropped_connections(root: Path, mode: str) -> None:
    faults = Faults(close_every_n_frames=40, close_mode=mode)
    async with SimServer("binance", rate_msgs_s=4000, faults=faults) as sim:
        feed = feed_for(sim, symbols=["ZILUSDT", "DENTUSDT", "MANAUSDT"], channels=["trades"],
                        trade_stream="aggTrade", reconnect_min_delay_s=0.01,
                        reconnect_max_delay_s=0.05)
        cfg = make_config(root, [feed])

        def done(d: Any) -> bool:
            st = d.feed_stats.get(feed["name"])
            return st is not None and st.reconnects >= 3

        daemon = await run_daemon(cfg, done, settle_s=0.2)
    st = daemon.feed_stats[feed["name"]]
    assert st.reconnects >= 3 and st.state == "stopped"
    # Each connection replays the recording from the start: the trade-id watermark keeps
    # every trade exactly once.
    trades = read_table(root, "trades")
    served = {(json.loads(s.frame)["data"]["s"], str(json.loads(s.frame)["data"]["a"]))
              for s in sim.sent}
    got = list(zip(trades["symbol"], trades["trade_id"], strict=True))
    assert len(got) == len(set(got)) == len(served)
    assert set(got) == served
    assert st.drops["duplicate_trade"] > 0
    events = read_table(root, "events")
    kinds = events["event"].to_list()
    assert kinds.count("connected") == st.connects >= 4
    assert kinds.count("disconnected") == st.connects
    details = events.filter(events["event"] == "disconnected")["detail"].to_list()
    assert any(d != "shutdown" for d in details)


async def test_refused_handshake_is_retried(root: Path) -> None:
    faults = Faults(handshake_status=503, refuse_first_n=2)
    async with SimServer("binance", faults=faults) as sim:
        feed = feed_for(sim, symbols=["ZILUSDT"], channels=["trades"], trade_stream="aggTrade",
                        reconnect_min_delay_s=0.01, reconnect_max_delay_s=0.02)
        cfg = make_config(root, [feed])
        daemon = await run_daemon(
            cfg, lambda d: feed["name"] in d.feed_stats
            and d.feed_stats[feed["name"]].messages >= 60)
    assert sim.handshakes >= 3
    assert daemon.feed_stats[feed["name"]].connects == 1
    assert read_table(root, "trades").height == 60
