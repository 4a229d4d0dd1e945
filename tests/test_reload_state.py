"""A feed changed by a reload (SIGHUP) keeps its trade de-duplication state: the venue's
replay of recent trades on the new connection is not stored a second time."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from ingestd.daemon import Daemon
from ingestd.sim import SimServer
from tests.support import feed_for, read_table

CONFIG = """
[storage]
root = "{root}"
flush_interval_s = 0.2

[health]
listen = "127.0.0.1:0"

[log]
level = "warning"
format = "console"

[[feeds]]
name = "replaying"
exchange = "{exchange}"
url = "{url}"
symbols = ["{symbol}"]
channels = ["trades"]
stale_after_s = {stale}
"""


async def wait_for(cond: Any, timeout_s: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(("exchange", "symbol"), [("kraken", "BTC/USD"),
                                                   ("coinbase", "BTC-USD")])
async def test_a_changed_feed_does_not_store_the_venues_replay_twice(
        tmp_path: Path, exchange: str, symbol: str) -> None:
    root = tmp_path / "data"
    path = tmp_path / "feeds.toml"
    async with SimServer(exchange, rate_msgs_s=500) as sim:
        url = feed_for(sim)["url"]
        path.write_text(CONFIG.format(root=root, exchange=exchange, url=url, symbol=symbol,
                                      stale=30.0))
        from ingestd.checks import load_config

        daemon = Daemon(load_config(str(path)), config_path=str(path))
        task = asyncio.create_task(daemon.run(install_signals=False))
        try:
            await wait_for(lambda: daemon.writer_stats.rows_written["trades"] > 0)
            stored_before = daemon.feed_stats["replaying"].rows["trades"]
            # Change the feed (same venue, same symbol): it restarts on a new connection,
            # and the venue replays the same recent trades there.
            path.write_text(CONFIG.format(root=root, exchange=exchange, url=url,
                                          symbol=symbol, stale=31.0))
            assert await daemon.reload()
            await wait_for(lambda: sim.connections == 2)
            await wait_for(lambda: daemon.feed_stats.get("replaying") is not None
                           and daemon.feed_stats["replaying"].messages >= 1)
            await asyncio.sleep(0.5)   # the replay is a burst on subscribe
            replay_drops = daemon.feed_stats["replaying"].drops["duplicate_trade"]
        finally:
            daemon.request_stop("test done")
            assert await asyncio.wait_for(task, 30) == 0
    trades = read_table(root, "trades")
    assert trades.height == stored_before > 0
    assert trades.select(pl.struct("symbol", "trade_id").is_unique().all()).item()
    assert replay_drops == stored_before   # every replayed trade recognised and counted
