"""One daemon, one feed per exchange id of the contract, all against the simulator."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from ingestd.config import parse_config
from ingestd.daemon import Daemon
from ingestd.demo import demo_config
from ingestd.exchanges import CODECS
from ingestd.sim import SimServer
from ingestd.sim.venues import VENUES
from tests.support import read_table, run_daemon

# The contract's exchange ids (DESIGN.md); venues added since register themselves.
CONTRACT_IDS = {"binance", "binance-usdm", "coinbase", "kraken", "bybit-spot", "bybit-linear",
                "okx"} | set(CODECS)


def test_every_contract_exchange_has_a_codec_and_a_simulator() -> None:
    assert {"binance", "binance-usdm", "coinbase", "kraken", "bybit-spot", "bybit-linear",
            "okx"} <= set(CODECS)
    assert set(VENUES) == CONTRACT_IDS


async def test_all_seven_exchanges_land_trades_quotes_and_books(root: Path) -> None:
    servers = {ex: await SimServer(ex, rate_msgs_s=3000).start() for ex in sorted(VENUES)}
    try:
        cfg = parse_config(demo_config(root, servers, flush_interval_s=0.2))

        def done(d: Daemon) -> bool:
            for ex, server in servers.items():
                st = d.feed_stats.get(f"{ex}-demo")
                if st is None or st.messages < len(server.sent) or not server.sent:
                    return False
            return True

        daemon = await run_daemon(cfg, done, timeout_s=60, settle_s=1.0)
    finally:
        for s in servers.values():
            await s.stop()
    for name, st in daemon.feed_stats.items():
        assert st.parse_errors == {}, (name, st.parse_errors)
        assert st.reconnects == 0, name
    trades, quotes, book = (read_table(root, t) for t in ("trades", "quotes", "book"))
    for table in (trades, quotes, book):
        assert set(table["exchange"].unique()) == CONTRACT_IDS
    # Each trade once; taker sides only; finite positive prices.
    keys = trades.select("exchange", "symbol", "trade_id")
    assert keys.n_unique() == trades.height
    assert set(trades["side"].unique()) <= {"buy", "sell"}
    assert trades.filter(pl.col("price") <= 0).height == 0
    # Quotes are never crossed (a swapped side would show up here).
    both = quotes.drop_nulls(["bid_price", "ask_price"])
    assert both.filter(pl.col("bid_price") > pl.col("ask_price")).height == 0
    # Every book starts with a snapshot block, then deltas in recv_seq order.
    first = book.sort("recv_seq").group_by(["exchange", "symbol"], maintain_order=True).first()
    assert first["is_snapshot"].all()
    connected = read_table(root, "events").filter(pl.col("event") == "connected")
    assert connected.height == len(CONTRACT_IDS)
