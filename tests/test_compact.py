"""Compaction keeps the exact multiset of rows, sorts, is idempotent and crash-safe."""

from __future__ import annotations

import shutil
from pathlib import Path

import orjson
import polars as pl
import pyarrow.parquet as pq

from ingestd.schema import TradesBlock
from ingestd.sink.batcher import Batcher
from ingestd.sink.compact import MANIFEST_DIR, compact
from ingestd.sink.parquet import COVERAGE_KEY, Staging, commit
from ingestd.sink.recovery import CoverageIndex

DAY_NS = 86_400 * 1_000_000_000
T0 = 19_000 * DAY_NS  # 2022-01-08


def write_parts(root: Path, n_files: int = 6, per_file: int = 50) -> None:
    staging = Staging(root)
    staging.open()
    seq = 0
    for f in range(n_files):
        b = Batcher(1.0, 10**9)
        for i in range(per_file):
            seq += 1
            sym = ["ETHUSDT", "BTCUSDT", "ADAUSDT"][(f + i) % 3]
            block = TradesBlock()
            block.add(sym, T0 + seq, T0 + seq * 1000, seq, str(seq), "buy", 100.0 + i, 1.5)
            b.add("trades", "binance", block, 0.0, "inst/feed")
        commit(root, staging.path, b.take(b.partitions()[0]))
    staging.close()


def rows(root: Path) -> list[tuple[object, ...]]:
    df = pl.read_parquet(f"{root}/trades/**/*.parquet", hive_partitioning=False)
    return sorted(df.rows())


def test_compaction_preserves_the_multiset_sorts_and_is_idempotent(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_parts(root)
    before = rows(root)
    part = root / "trades" / "exchange=binance" / "date=2022-01-08"
    assert len(list(part.glob("*.parquet"))) == 6
    r = compact(root, before_date="2022-01-09", row_group_rows=100)
    assert (r.partitions, r.files_in, r.files_out, r.rows) == (1, 6, 1, 300)
    (out,) = part.glob("*.parquet")
    assert rows(root) == before
    table = pq.read_table(out)
    keys = list(zip(table["symbol"].to_pylist(), table["ts_recv"].to_pylist(), strict=True))
    assert keys == sorted(keys)
    assert pq.ParquetFile(out).metadata.num_row_groups == 3
    cov = orjson.loads(table.schema.metadata[COVERAGE_KEY.encode()])
    assert cov == {"inst/feed": [[1, 300]]}
    # Recovery still sees exactly which rows are committed.
    index = CoverageIndex()
    index.load(root, "trades", "binance", 19_000, "inst/", T0)
    assert index.covers("inst/feed", "trades", "binance", 19_000, 150)
    assert not index.covers("inst/feed", "trades", "binance", 19_000, 301)
    # Idempotent.
    again = compact(root, before_date="2022-01-09")
    assert again.partitions == 0 and rows(root) == before


def test_today_is_never_compacted(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_parts(root, n_files=3)
    assert compact(root, before_date="2022-01-08").partitions == 0
    assert len(list(root.rglob("*.parquet"))) == 3


def test_interrupted_compaction_is_finished_without_duplicates(tmp_path: Path) -> None:
    """A crash after the output was published but before the inputs were deleted."""
    root = tmp_path / "data"
    write_parts(root, n_files=4)
    before = rows(root)
    part = root / "trades" / "exchange=binance" / "date=2022-01-08"
    inputs = sorted(part.glob("*.parquet"))
    saved = tmp_path / "saved"
    saved.mkdir()
    for f in inputs:
        shutil.copy2(f, saved / f.name)
    compact(root, before_date="2022-01-09")
    (output,) = part.glob("*.parquet")
    for f in saved.iterdir():  # the inputs are back: as if the deletes never happened
        shutil.copy2(f, part / f.name)
    (root / MANIFEST_DIR).mkdir(exist_ok=True)
    (root / MANIFEST_DIR / "x.json").write_bytes(orjson.dumps(
        {"output": str(output), "inputs": [str(part / f.name) for f in inputs]}))
    r = compact(root, before_date="2022-01-09")
    assert r.resumed == 1
    assert list(part.glob("*.parquet")) == [output]
    assert rows(root) == before
