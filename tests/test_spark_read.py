"""Spark 4 (pyspark, local[1], no settings) reads what the daemon writes - every table of a
demo-like run - with `timestamp_unit = "us"` and with `format = "delta"`; with the default
ns it cannot (`Illegal Parquet type: INT64 (TIMESTAMP(NANOS,true))`), which is why "us"
exists.

Delta through Spark's own Delta reader needs the delta-spark jars, which come from Maven
at run time (not reachable here); so the Delta table is read as Spark reads any Parquet
dataset: the table's current files (`DeltaTable.file_uris()`, what a Delta reader would
scan), with the table directory as basePath for the partition columns.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest
from deltalake import DeltaTable
from pyspark.sql import SparkSession

from ingestd.schema import TABLES, schema_for
from ingestd.sim import SimServer
from ingestd.sim.venues import VENUES
from tests.support import feed_for, make_config, read_table, run_daemon

VARIANTS = {"parquet-ns": {}, "parquet-us": {"timestamp_unit": "us"},
            "delta": {"format": "delta"}}


async def _record_all(base: Path) -> None:
    """One binance-usdm demo feed (all six tables) per variant, the three at once."""
    async with SimServer("binance-usdm", rate_msgs_s=3000) as sim:
        feed = feed_for(sim, **VENUES["binance-usdm"].demo_feed)

        def done(d: Any) -> bool:
            return all(d.writer_stats.rows_written[t] > 0 for t in TABLES) \
                and d.feed_stats[feed["name"]].messages >= 91 + 200 + 400

        await asyncio.gather(*(
            run_daemon(make_config(base / name, [feed], storage=storage), done,
                       timeout_s=60, settle_s=0.3)
            for name, storage in VARIANTS.items()))


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("spark")
    asyncio.run(_record_all(base))
    return base


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    session = (SparkSession.builder.master("local[1]").appName("ingestd-test")
               .config("spark.ui.enabled", "false").getOrCreate())
    try:
        yield session
    finally:
        session.stop()


def _timestamp_columns(table: str) -> list[str]:
    return [f.name for f in schema_for(table) if pa.types.is_timestamp(f.type)]


def _same_rows(sdf: Any, expected: pl.DataFrame, table: str) -> None:
    """Spark's rows equal Polars' (timestamps compared as epoch microseconds, which Spark
    computes with `unix_micros`, independent of any session time zone)."""
    ts = _timestamp_columns(table)
    for name in ts:
        assert type(sdf.schema[name].dataType).__name__ == "TimestampType", (table, name)
    cols = ["recv_seq", "symbol", *ts]
    got = sorted(tuple(r) for r in sdf.selectExpr(
        "recv_seq", "symbol", *[f"unix_micros({c})" for c in ts]).collect())
    want = sorted(expected.select(
        "recv_seq", "symbol", *[pl.col(c).dt.epoch("us") for c in ts]).select(cols).iter_rows())
    assert got == want, table


@pytest.mark.parametrize("table", TABLES)
def test_spark_reads_us_parquet_with_no_settings(output: Path, spark: Any, table: str) -> None:
    root = output / "parquet-us"
    sdf = spark.read.parquet(str(root / table))
    assert {"exchange", "date"} <= set(sdf.columns)
    expected = read_table(root, table)
    assert expected.height > 0 and sdf.count() == expected.height
    _same_rows(sdf, expected, table)


@pytest.mark.parametrize("table", TABLES)
def test_spark_reads_the_delta_tables_current_files(output: Path, spark: Any,
                                                    table: str) -> None:
    uri = str(output / "delta" / table)
    files = DeltaTable(uri).file_uris()
    assert files
    sdf = spark.read.option("basePath", uri).parquet(*files)
    expected = pl.read_delta(uri)
    assert expected.height > 0 and sdf.count() == expected.height
    _same_rows(sdf, expected, table)


def test_spark_cannot_read_ns_parquet(output: Path, spark: Any) -> None:
    root = output / "parquet-ns"
    assert read_table(root, "trades").height > 0
    with pytest.raises(Exception, match=r"Illegal Parquet type: INT64 \(TIMESTAMP\(NANOS"):
        spark.read.parquet(str(root / "trades")).collect()
