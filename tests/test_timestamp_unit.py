"""`timestamp_unit = "us"`: every timestamp column in microseconds (Spark, Delta and Iceberg
read only those), `recv_seq` keeping the full receive order; ns stays the default."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from ingestd.schema import SCHEMAS, TABLES, TradesBlock, schema_for, to_arrow_table
from ingestd.sim import SimServer
from ingestd.sim.venues import VENUES
from ingestd.sink.batcher import Batch
from ingestd.sink.compact import compact
from ingestd.sink.parquet import Staging, commit
from tests.support import feed_for, make_config, read_table, run_daemon

US = pa.timestamp("us", tz="UTC")


def test_us_floors_each_timestamp_and_recv_seq_keeps_the_order() -> None:
    block = TradesBlock()
    # Three trades within one microsecond, received in this order; one without ts_event.
    base = 1_764_720_000_123_456_000
    for i, (te, tr) in enumerate([(base + 1, base + 10), (base + 999, base + 500),
                                  (None, base + 999)]):
        block.add("BTCUSDT", te, tr, 1_000 + i, str(i), "buy", 1.0, 1.0)
    ns = block.to_arrow("binance")
    us = block.to_arrow("binance", "us")
    assert us.schema == schema_for("trades", "us")
    assert us.schema.field("ts_recv").type == US and ns.schema.field("ts_recv").type == \
        pa.timestamp("ns", tz="UTC")
    assert us.column("ts_recv").cast(pa.int64()).to_pylist() == [base // 1000] * 3
    assert us.column("ts_event").cast(pa.int64()).to_pylist() == [base // 1000] * 2 + [None]
    # The microseconds tie; recv_seq still orders the rows exactly as received.
    assert us.column("recv_seq").to_pylist() == ns.column("recv_seq").to_pylist() == \
        [1000, 1001, 1002]
    # Every other column is unchanged.
    for name in ("exchange", "symbol", "trade_id", "side", "price", "amount"):
        assert us.column(name) == ns.column(name)


def test_schema_for_changes_only_timestamp_columns() -> None:
    for table in TABLES:
        ns, us = SCHEMAS[table], schema_for(table, "us")
        assert us.metadata == ns.metadata and us.names == ns.names
        for f_ns, f_us in zip(ns, us, strict=True):
            if pa.types.is_timestamp(f_ns.type):
                assert f_us.type == US and f_us.nullable == f_ns.nullable
            else:
                assert f_us == f_ns
    # derivatives.next_funding_time is a timestamp too.
    assert schema_for("derivatives", "us").field("next_funding_time").type == US


async def test_the_daemon_writes_every_table_in_us(root: Path) -> None:
    """binance-usdm's demo feed lands all six tables; with timestamp_unit = "us" every file
    of each has the contract's schema in us, and what the venue sent is what is stored."""
    async with SimServer("binance-usdm", rate_msgs_s=3000) as sim:
        feed = feed_for(sim, **VENUES["binance-usdm"].demo_feed)
        cfg = make_config(root, [feed], storage={"timestamp_unit": "us"})
        await run_daemon(cfg, lambda d: all(d.writer_stats.rows_written[t] > 0 for t in TABLES)
                         and d.feed_stats[feed["name"]].messages >= 91 + 200 + 400,
                         timeout_s=60, settle_s=0.3)
    for table in TABLES:
        files = list((root / table).glob("exchange=*/date=*/*.parquet"))
        assert files, table
        for f in files:
            assert pq.read_schema(f).remove_metadata() == \
                schema_for(table, "us").remove_metadata(), f
        df = read_table(root, table)
        assert df.schema["ts_recv"] == pl.Datetime("us", "UTC")
        # recv_seq is still the full order: strictly increasing from one frame to the next.
        seqs = df["recv_seq"].unique(maintain_order=True)
        assert seqs.is_sorted() and seqs.n_unique() == seqs.len()
    trades = read_table(root, "trades")
    sent = [json.loads(s.frame)["data"] for s in sim.sent
            if json.loads(s.frame).get("stream", "").endswith("@aggTrade")]
    got = list(trades.select("symbol", "trade_id", pl.col("ts_event").dt.epoch("us"))
               .iter_rows())
    assert got == [(d["s"], str(d["a"]), d["T"] * 1_000) for d in sent]


def _us_batch(day: str, seqs: list[int]) -> Batch:
    block = TradesBlock()
    t0 = int(pa.scalar(day).cast(pa.date32()).cast(pa.timestamp("ns")).cast(pa.int64())
             .as_py())
    for s in seqs:
        block.add("BTCUSDT", t0 + s * 1_001, t0 + s * 1_003, s, str(s), "sell", 2.0, 3.0)
    return Batch("trades", "binance", day, [block], len(seqs), {"i/f": [seqs[0], seqs[-1]]},
                 [], t0 + seqs[0] * 1_003)


def _rows(paths: list[Path]) -> list[tuple[Any, ...]]:
    return sorted(pa.concat_tables([pq.read_table(p) for p in paths]).to_pylist(),
                  key=lambda r: r["recv_seq"])


def test_compaction_keeps_us_files_in_us(root: Path) -> None:
    staging = Staging(root)
    staging.open()
    try:
        for seqs in ([1, 2], [3, 4, 5], [6]):
            commit(root, staging.path, _us_batch("2026-11-30", seqs), unit="us")
    finally:
        staging.close()
    part = root / "trades" / "exchange=binance" / "date=2026-11-30"
    before = _rows(sorted(part.glob("*.parquet")))
    result = compact(root, "2026-12-01")
    assert result.files_in == 3 and result.files_out == 1
    (out,) = part.glob("*.parquet")
    assert pq.read_schema(out).field("ts_recv").type == US
    assert _rows([out]) == before


def test_to_arrow_table_of_us_converts_ns_integers() -> None:
    t = to_arrow_table("events", "x", [["s"], [None], [1_500], [1], ["f"], ["gap"], [None]],
                       "us")
    assert t.column("ts_recv").cast(pa.int64()).to_pylist() == [1]
