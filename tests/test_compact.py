"""Compaction keeps the exact multiset of rows, sorts, is idempotent and crash-safe; one run
per root at a time; a day of books is merged in bounded memory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import orjson
import polars as pl
import pyarrow.parquet as pq
import pytest

from ingestd.schema import BookBlock, EventsBlock, TradesBlock
from ingestd.sink.batcher import Batcher
from ingestd.sink.compact import MANIFEST_DIR, CompactionBusy, compact, compaction_lock
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


# ---- one run per root; streaming merge -------------------------------------------------
BOOK_SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT", "ADAUSDT", "DOGEUSDT",
                "BNBUSDT", "LTCUSDT"]
BOOK_PART = "book/exchange=binance/date=2022-01-08"


def write_book_parts(root: Path, n_files: int, rows_per_file: int, levels: int = 10) -> None:
    """Book diffs of 8 interleaved symbols, `levels` rows per message, one part file per
    flush - through the writer's own path (Batcher -> commit)."""
    staging = Staging(root)
    staging.open()
    seq = 0
    for _ in range(n_files):
        b = Batcher(1.0, 10**12)
        block = BookBlock()
        for m in range(rows_per_file // levels):
            seq += 1
            ts = T0 + seq * 1_000_000
            px = 100.0 + seq % 13
            block.add_levels(BOOK_SYMBOLS[seq * 7 % len(BOOK_SYMBOLS)], ts - 5_000, ts, seq,
                             m == 0, [(px - i / 2, 1.0 + i) for i in range(levels // 2)],
                             [(px + 0.5 + i / 2, 2.0 + i) for i in range(levels // 2)],
                             seq * 3)
        b.add("book", "binance", block, 0.0, "inst/feed")
        commit(root, staging.path, b.take(b.partitions()[0]))
    staging.close()


def book_rows(root: Path) -> list[tuple[object, ...]]:
    df = pl.read_parquet(f"{root}/book/**/*.parquet", hive_partitioning=False)
    return sorted(df.rows())


def assert_sorted_file(path: Path) -> None:
    t = pq.read_table(path, columns=["symbol", "ts_recv", "recv_seq"])
    keys = list(zip(*(t[c].to_pylist() for c in t.column_names), strict=True))
    assert keys == sorted(keys, key=lambda k: (k[0] is None, k[0] or "", k[1], k[2]))


def test_two_concurrent_runs_publish_once_and_the_second_reports_the_lock(
        tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_book_parts(root, n_files=40, rows_per_file=10_000)
    before = book_rows(root)
    start = threading.Barrier(2)
    outcomes: list[object] = []

    def run() -> None:
        start.wait()
        try:
            outcomes.append(compact(root, before_date="2022-01-09"))
        except Exception as e:  # the outcome is what the test checks
            outcomes.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert book_rows(root) == before  # not doubled, nothing lost
    assert len(list((root / BOOK_PART).glob("*.parquet"))) == 1
    busy = [o for o in outcomes if isinstance(o, CompactionBusy)]
    done = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(busy) == 1 and len(done) == 1, outcomes
    assert str(root / MANIFEST_DIR) in str(busy[0])
    assert done[0].rows == 400_000  # type: ignore[attr-defined]


CONFIG = """
[storage]
root = "{root}"

[[feeds]]
name = "binance-main"
exchange = "binance"
symbols = ["BTCUSDT"]
channels = ["book"]
"""


def test_cli_second_run_exits_75_or_waits_with_wait(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_book_parts(root, n_files=3, rows_per_file=1_000)
    before = book_rows(root)
    cfg = tmp_path / "feeds.toml"
    cfg.write_text(CONFIG.format(root=root))
    argv = [sys.executable, "-m", "ingestd", "compact", "--config", str(cfg),
            "--before", "2022-01-09"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with compaction_lock(root):  # another compaction holds the root
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env)
        assert r.returncode == 75, r
        assert "another compaction" in r.stderr and "--wait" in r.stderr
        assert "Traceback" not in r.stderr
        assert len(list((root / BOOK_PART).glob("*.parquet"))) == 3  # untouched
        waiter = subprocess.Popen([*argv, "--wait"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env)
        assert waiter.stdout is not None
        for line in waiter.stdout:  # blocks until the waiter says it waits
            if "compaction_waiting" in line:
                break
        else:
            raise AssertionError(f"no compaction_waiting event: {waiter.communicate()}")
        assert waiter.poll() is None
        assert len(list((root / BOOK_PART).glob("*.parquet"))) == 3
    out, err = waiter.communicate(timeout=30)
    assert waiter.returncode == 0, (out, err)
    assert "compacted 1 partition(s): 3 files -> 1" in out
    assert book_rows(root) == before


@pytest.mark.parametrize("run_rows", [64, 320])
def test_many_sorted_runs_merge_with_null_symbols_last(tmp_path: Path, run_rows: int) -> None:
    """Events with and without a symbol, sorted in runs of `run_rows` rows: 50 runs (more
    than are merged at once: two passes) or 10 runs read 10 rows at a time (a merge step
    takes part of a run's batch). The output is one sorted file with the exact multiset."""
    root = tmp_path / "data"
    staging = Staging(root)
    staging.open()
    seq = 0
    for f in range(8):
        b = Batcher(1.0, 10**9)
        block = EventsBlock()
        for i in range(400):
            seq += 1
            sym = [None, "ETHUSDT", "BTCUSDT", "ÄSYM", None][(f * 7 + i) % 5]
            # Equal ts_recv across files, so runs overlap on every key component.
            block.add(sym, None, T0 + (seq % 97) * 1000, seq, "inst/feed", "gap", str(i))
        b.add("events", "binance", block, 0.0, "inst/feed")
        commit(root, staging.path, b.take(b.partitions()[0]))
    staging.close()
    part = root / "events" / "exchange=binance" / "date=2022-01-08"

    def all_rows() -> list[tuple[object, ...]]:
        df = pl.read_parquet(f"{part}/*.parquet", hive_partitioning=False)
        return sorted(df.rows(), key=repr)

    before = all_rows()
    r = compact(root, before_date="2022-01-09", row_group_rows=700, run_rows=run_rows)
    assert (r.files_in, r.files_out, r.rows) == (8, 1, 3200)
    (out,) = part.glob("*.parquet")
    assert all_rows() == before
    assert_sorted_file(out)
    md = pq.ParquetFile(out).metadata
    assert [md.row_group(i).num_rows for i in range(md.num_row_groups)] == [700] * 4 + [400]
    assert orjson.loads(pq.read_schema(out).metadata[COVERAGE_KEY.encode()]) == {
        "inst/feed": [[1, 3200]]}
    assert not list((root / ".staging").rglob("*.tmp"))  # no sorted run left behind


PEAK_RSS = """
import json, sys
from pathlib import Path
from ingestd.sink.compact import compact

def hwm_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
knobs = json.loads(sys.argv[3])
compact(Path(sys.argv[2]), before_date="2022-01-09", **knobs)  # warm-up: a small day
warm_mb = hwm_mb()
r = compact(Path(sys.argv[1]), before_date="2022-01-09", **knobs)
print(json.dumps({"warm_mb": warm_mb, "peak_mb": hwm_mb(), "rows": r.rows}))
"""


def test_a_day_of_books_compacts_in_bounded_memory(tmp_path: Path) -> None:
    """A child process compacts a small day (300k book rows: pays the fixed costs - code,
    thread pools, allocator caches, ~100 MB), then a day five times larger (1.5M rows in
    30 part files). Its peak RSS may grow by the second day only a fraction of what
    loading that day whole takes: the merge holds about `run_rows` rows plus one output
    row group, whatever the size of the day. (Loading the day whole - read, concatenate,
    sort, read back to verify - grew the peak by +375 MB with the old code, 3.4x the day
    in Arrow; the streaming merge: +2 MB.)"""
    small, big = tmp_path / "small", tmp_path / "big"
    write_book_parts(small, n_files=6, rows_per_file=50_000)
    n_files, per_file = 30, 50_000
    write_book_parts(big, n_files=n_files, rows_per_file=per_file)
    sample = pq.read_table(next((big / BOOK_PART).glob("*.parquet")))
    whole_mb = sample.nbytes / sample.num_rows * n_files * per_file / 2**20  # ~110 MB
    knobs = {"run_rows": 50_000, "row_group_rows": 100_000}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, str(big), str(small), json.dumps(knobs)],
        capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["rows"] == n_files * per_file
    grew_mb = m["peak_mb"] - m["warm_mb"]
    assert grew_mb < whole_mb / 4, (grew_mb, whole_mb, m)
    (out,) = (big / BOOK_PART).glob("*.parquet")
    md = pq.ParquetFile(out).metadata
    assert md.num_rows == n_files * per_file and md.num_row_groups == 15
