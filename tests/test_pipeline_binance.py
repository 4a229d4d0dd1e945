"""The whole pipeline against the simulator: what the venue served is what lands in Parquet."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow.parquet as pq

from ingestd.schema import SCHEMAS
from ingestd.sim import SimServer
from tests.exchanges.test_binance import SPOT_BOOK, USDM_BOOK, reference_books
from tests.support import (
    Books,
    apply_book_rows,
    book_table_rows,
    feed_for,
    make_config,
    read_table,
    run_daemon,
)

TRADE_SYMBOLS = ["ZILUSDT", "DENTUSDT", "MANAUSDT"]


def served(server: SimServer, kind: str) -> list[dict[str, Any]]:
    out = []
    for s in server.sent:
        msg = json.loads(s.frame)
        if msg.get("stream", "").endswith(kind):
            out.append(msg["data"])
    return out


def book_from_table(df: pl.DataFrame) -> Books:
    """Rebuild every symbol's book from the book table alone, as a researcher would."""
    return apply_book_rows(book_table_rows(df))

async def test_binance_spot_lands_exactly_what_was_served(root: Path) -> None:
    async with SimServer("binance", rate_msgs_s=2000) as sim:
        feed = feed_for(sim, symbols=SPOT_BOOK + TRADE_SYMBOLS,
                        channels=["trades", "quotes", "book"], trade_stream="aggTrade")
        cfg = make_config(root, [feed])
        expected_frames = 145 + 84 + 177  # aggTrade of 3 symbols, bookTicker, depth

        def done(d: Any) -> bool:
            st = d.feed_stats.get(feed["name"])
            return (st is not None and st.messages >= expected_frames
                    and len(sim.rest_requests) >= 4 and d.writer_stats.buffered_rows > 0)

        daemon = await run_daemon(cfg, done, settle_s=0.3)
    stats = daemon.feed_stats[feed["name"]]
    assert stats.parse_errors == {} and stats.gaps == 0

    trades = read_table(root, "trades")
    sent_trades = served(sim, "@aggTrade")
    assert len(sent_trades) == 145
    assert trades.height == len(sent_trades)
    got = list(trades.select("symbol", "trade_id", "price", "amount", "side", "ts_event")
               .with_columns(pl.col("ts_event").dt.epoch("ns")).iter_rows())
    want = [(d["s"], str(d["a"]), float(d["p"]), float(d["q"]), "sell" if d["m"] else "buy",
             d["T"] * 1_000_000) for d in sent_trades]
    assert got == want

    quotes = read_table(root, "quotes")
    sent_quotes = served(sim, "@bookTicker")
    assert list(quotes.select("symbol", "bid_price", "bid_amount", "ask_price", "ask_amount")
                .iter_rows()) == [(d["s"], float(d["b"]), float(d["B"]), float(d["a"]),
                                   float(d["A"])) for d in sent_quotes]
    assert quotes["ts_event"].null_count() == quotes.height  # spot bookTicker has no time

    book = read_table(root, "book")
    assert book_from_table(book) == reference_books("binance_spot", SPOT_BOOK, futures=False)
    # recv_seq strictly increases per frame, shared within a frame; ts_recv is set.
    seqs = book.group_by("recv_seq", maintain_order=True).agg(pl.len())["recv_seq"]
    assert seqs.is_sorted() and seqs.n_unique() == seqs.len()

    events = read_table(root, "events")
    assert events["event"].to_list()[:1] == ["connected"]
    assert events["event"].to_list()[-1] == "disconnected"


async def test_binance_usdm_lands_book_trades_quotes(root: Path) -> None:
    async with SimServer("binance-usdm", rate_msgs_s=3000) as sim:
        feed = feed_for(sim, symbols=USDM_BOOK, channels=["trades", "quotes", "book"],
                        trade_stream="aggTrade")
        cfg = make_config(root, [feed])

        def done(d: Any) -> bool:
            st = d.feed_stats.get(feed["name"])
            return st is not None and st.messages >= 91 + 200 + 400 \
                and len(sim.rest_requests) >= 4

        await run_daemon(cfg, done, settle_s=0.3)
    assert read_table(root, "trades").height == 91
    assert read_table(root, "quotes").height == 200
    assert book_from_table(read_table(root, "book")) == reference_books(
        "binance_usdm", USDM_BOOK, futures=True)


async def test_output_layout_schema_and_readers(root: Path) -> None:
    async with SimServer("binance", rate_msgs_s=5000) as sim:
        feed = feed_for(sim, symbols=SPOT_BOOK + TRADE_SYMBOLS,
                        channels=["trades", "quotes", "book"], trade_stream="aggTrade")
        cfg = make_config(root, [feed])
        await run_daemon(cfg, lambda d: feed["name"] in d.feed_stats
                         and d.feed_stats[feed["name"]].messages >= 406
                         and len(sim.rest_requests) >= 4, settle_s=0.3)
    # Only complete Parquet files under table directories; staging is a dot-directory.
    # (Spot Binance has no derivatives or liquidations: those tables stay absent.)
    spot_tables = ("trades", "quotes", "book", "events")
    assert not (root / "derivatives").exists() and not (root / "liquidations").exists()
    for table, schema in SCHEMAS.items():
        if table not in spot_tables:
            continue
        files = list((root / table).rglob("*"))
        parquet = [f for f in files if f.is_file()]
        assert parquet, table
        for f in parquet:
            assert f.suffix == ".parquet"
            rel = f.relative_to(root / table).parts
            assert rel[0] == "exchange=binance" and rel[1].startswith("date=")
            assert pq.read_schema(f).remove_metadata() == schema.remove_metadata()
            assert pq.read_schema(f).metadata[b"ingestd.schema_version"] == b"1"
    assert not any(p.suffix == ".parquet" for p in (root / ".staging").rglob("*"))
    # The contract's two one-liners read every table.
    for table in spot_tables:
        lazy = pl.scan_parquet(f"{root}/{table}/**/*.parquet", hive_partitioning=True)
        n_polars = lazy.select(pl.len()).collect().item()
        n_duck = duckdb.sql(f"SELECT count(*) FROM read_parquet('{root}/{table}/**/*.parquet',"
                            " hive_partitioning=true)").fetchall()
        assert n_polars == n_duck[0][0] > 0
