"""A clean restart keeps trade-id watermarks: replayed trades are not stored twice."""

from __future__ import annotations

from pathlib import Path

from ingestd.sim import SimServer
from tests.support import feed_for, make_config, read_table, run_daemon


async def test_trades_replayed_after_a_clean_restart_are_not_duplicated(root: Path) -> None:
    # The simulator replays its whole recording to every new connection, like a venue
    # that sends recent trades on subscribe.
    async with SimServer("binance", rate_msgs_s=3000) as sim:
        feed = feed_for(sim, symbols=["ZILUSDT", "DENTUSDT", "MANAUSDT"], channels=["trades"],
                        trade_stream="aggTrade")
        cfg = make_config(root, [feed])
        first = await run_daemon(cfg, lambda d: feed["name"] in d.feed_stats
                                 and d.feed_stats[feed["name"]].messages >= 145)
        second = await run_daemon(cfg, lambda d: feed["name"] in d.feed_stats
                                  and d.feed_stats[feed["name"]].messages >= 145)
    assert first.feed_stats[feed["name"]].drops.get("duplicate_trade", 0) == 0
    assert second.feed_stats[feed["name"]].drops["duplicate_trade"] == 145
    trades = read_table(root, "trades")
    assert trades.height == 145
    # recv_seq keeps growing across the restart.
    events = read_table(root, "events")
    assert events["recv_seq"].is_sorted() and events["recv_seq"].n_unique() == events.height
