"""`format = "delta"`: Delta Lake tables appended to exactly once, by one daemon or several,
on a local root and on a real S3 server (SeaweedFS on loopback: tests/s3server.py)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest
import structlog.testing
from deltalake import DeltaTable, write_deltalake

from ingestd.config import parse_config
from ingestd.schema import TradesBlock
from ingestd.sim import SimServer
from ingestd.sim.generate import GenBinanceVenue
from ingestd.sink.batcher import Batch
from ingestd.sink.delta import (
    DeltaCommitError,
    DeltaPublisher,
    app_id,
    delta_schema,
    storage_options,
)
from tests.support import feed_for, make_config, run_daemon
from tests.test_journal import _read_until_event, _start, durable_frames

SYMBOLS = ["NKNUSDT", "BLZETH", "LRCBTC", "RUNEEUR", "ZILUSDT", "DENTUSDT", "MANAUSDT"]
TRADE_SYMBOLS = ["ZILUSDT", "DENTUSDT", "MANAUSDT"]


def read_delta(root: Path | str, table: str, **options: Any) -> pl.DataFrame:
    return pl.read_delta(f"{root}/{table}", storage_options=options or None) \
        .sort("recv_seq", maintain_order=True)


def sent_trades(sim: SimServer, conn_ids: set[int] | None = None) -> list[tuple[str, str]]:
    """(symbol, trade id) of every aggTrade the simulated venue sent (on `conn_ids`)."""
    out = []
    for s in sim.sent:
        data = json.loads(s.frame).get("data", {})
        if data.get("e") == "aggTrade" and (conn_ids is None or s.conn_id in conn_ids):
            out.append((data["s"], str(data["a"])))
    return out


def trade_ids(df: pl.DataFrame) -> list[tuple[str, str]]:
    return list(zip(df["symbol"].to_list(), df["trade_id"].to_list(), strict=True))


def storage(root: Path | str, **keys: Any) -> Any:
    return parse_config({"storage": {"root": str(root), "format": "delta", **keys},
                         "feeds": [{"name": "f", "exchange": "binance",
                                    "symbols": ["X"], "channels": ["trades"]}]}).storage


def trades_batch(feed_key: str, seqs: list[int], date: str = "2026-12-03",
                 exchange: str = "binance") -> Batch:
    block = TradesBlock()
    day_ns = int(pa.scalar(date, pa.string()).cast(pa.date32()).cast(pa.timestamp("ns"))
                 .cast(pa.int64()).as_py())
    for seq in seqs:
        block.add("BTCUSDT", day_ns + seq * 1_000 + 7, day_ns + seq * 1_000 + 999, seq,
                  str(seq), "buy", 100.0 + seq, 1.0)
    return Batch("trades", exchange, date, [block], len(seqs),
                 {feed_key: [min(seqs), max(seqs)]}, [], day_ns + seqs[0] * 1_000)


# ---- the publisher on its own ------------------------------------------------------------
def test_schema_is_the_contract_in_microseconds_plus_the_date_partition(tmp_path: Path) -> None:
    pub = DeltaPublisher(storage(tmp_path / "data"), tmp_path / "local", "inst1")
    pub.open()
    try:
        done = pub.publish(trades_batch("inst1/f", [1, 2, 3]))
    finally:
        pub.close()
    assert done.rows == 3
    table = DeltaTable(str(tmp_path / "data" / "trades"))
    # The bytes are the data file's (a local commit reads its own log entry to fsync it).
    assert done.bytes == sum(Path(f).stat().st_size for f in table.file_uris())
    assert table.metadata().partition_columns == ["exchange", "date"]
    arrow = table.to_pyarrow_table()
    assert arrow.schema == delta_schema("trades")
    for name in ("ts_event", "ts_recv"):
        assert arrow.schema.field(name).type == pa.timestamp("us", tz="UTC")
    # ns are floored to us: 7 ns -> 0 us, 999 ns -> 0 us past the row's microsecond.
    ts = arrow.column("ts_recv").cast(pa.int64()).to_pylist()
    assert [t % 1_000_000 for t in ts] == [1, 2, 3]
    assert arrow.column("date").to_pylist()[0].isoformat() == "2026-12-03"


def test_versions_are_watermarks_per_feed_table_and_partition(tmp_path: Path) -> None:
    pub = DeltaPublisher(storage(tmp_path / "data"), tmp_path / "local", "inst1")
    pub.open()
    try:
        pub.publish_many([trades_batch("inst1/a", [1, 5, 9]),
                          trades_batch("inst1/b", [2, 4]),
                          trades_batch("inst1/a", [3, 4], date="2026-12-04")])
        pub.publish(trades_batch("inst1/a", [12, 20]))
        cov = pub.coverage()
    finally:
        pub.close()
    table = DeltaTable(str(tmp_path / "data" / "trades"))
    assert table.version() == 2  # create, then one commit per publish call
    assert table.metadata().configuration["delta.setTransactionRetentionDuration"] == \
        "interval 30 days"
    # Each transaction carries its time, so the retention can forget old ones.
    log = (tmp_path / "data" / "trades" / "_delta_log" / f"{2:020d}.json").read_text()
    txns = [json.loads(x)["txn"] for x in log.splitlines() if '"txn"' in x]
    assert txns and all(t["lastUpdated"] > 1_700_000_000_000 for t in txns)
    assert table.transaction_version(app_id("inst1/a", "trades", "binance", "2026-12-03")) == 20
    assert table.transaction_version(app_id("inst1/b", "trades", "binance", "2026-12-03")) == 4
    assert table.transaction_version(app_id("inst1/a", "trades", "binance", "2026-12-04")) == 4
    day = (dt.date(2026, 12, 3) - dt.date(1970, 1, 1)).days
    cov.load("trades", "binance", day, "inst1/", 0)
    assert cov.covers("inst1/a", "trades", "binance", day, 20)
    assert not cov.covers("inst1/a", "trades", "binance", day, 21)
    assert cov.covers("inst1/a", "trades", "binance", day + 1, 4)
    assert not cov.covers("inst1/a", "trades", "binance", day + 1, 5)
    assert not cov.covers("inst1/b", "trades", "binance", day, 5)
    assert not cov.covers("inst2/a", "trades", "binance", day, 1)
    cov.load("quotes", "binance", day, "inst1/", 0)  # no such table yet: nothing covered
    assert not cov.covers("inst1/a", "quotes", "binance", day, 1)
    assert read_delta(tmp_path / "data", "trades")["recv_seq"].to_list() == \
        [1, 2, 3, 4, 4, 5, 9, 12, 20]


def test_a_failed_commit_holds_back_later_batches_of_its_partition(tmp_path: Path) -> None:
    """A commit that fails (here: the table has a column ingestd does not write) is checked
    against the table (it did not land) and raised; a later batch of the same feed and
    partition is refused until the failed rows are committed, so the version never
    passes rows that are not in the table."""
    root = tmp_path / "data"
    uri = str(root / "trades")
    bad = delta_schema("trades").append(pa.field("extra", pa.int64(), nullable=False))
    write_deltalake(uri, bad.empty_table(), partition_by=["exchange", "date"])
    pub = DeltaPublisher(storage(root), tmp_path / "local", "inst1")
    pub.open()
    try:
        first = trades_batch("inst1/a", [1, 2])
        with pytest.raises(DeltaCommitError, match="failed"):
            pub.publish(first)
        with pytest.raises(DeltaCommitError, match="waits for them"):
            pub.publish(trades_batch("inst1/a", [3, 4]))
        # Other partitions and feeds are not held back by it (they fail here only because
        # the table is wrong, not because of the order rule).
        with pytest.raises(DeltaCommitError, match="failed") as other:
            pub.publish(trades_batch("inst1/b", [3]))
        assert "waits for them" not in str(other.value)
        # The table is fixed; the writer retries the failed rows first (with the later
        # ones behind them, as its buffer holds them), then the order rule lets go.
        write_deltalake(uri, delta_schema("trades").empty_table(), mode="overwrite",
                        schema_mode="overwrite", partition_by=["exchange", "date"])
        retried = trades_batch("inst1/a", [1, 2, 3, 4])
        try:
            pub.publish(retried)
        except DeltaCommitError:  # the cached table saw the schema change: one more try
            pub.publish(retried)
        pub.publish(trades_batch("inst1/a", [5]))
    finally:
        pub.close()
    assert read_delta(root, "trades")["recv_seq"].to_list() == [1, 2, 3, 4, 5]
    assert DeltaTable(uri).transaction_version(
        app_id("inst1/a", "trades", "binance", "2026-12-03")) == 5


def test_storage_options_map_the_contract_keys_and_default_conditional_put(
        tmp_path: Path) -> None:
    s3 = storage("s3://bucket/prefix", local_dir=str(tmp_path),
                 options={"endpoint_url": "http://127.0.0.1:9", "region": "us-east-1",
                          "allow_http": True})
    assert storage_options(s3) == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9",
                                   "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true",
                                   "conditional_put": "etag"}
    own = storage("s3://bucket/prefix", local_dir=str(tmp_path),
                  options={"aws_conditional_put": "dynamo:locks"})
    assert storage_options(own) == {"aws_conditional_put": "dynamo:locks"}
    assert storage_options(storage(tmp_path)) == {}


# ---- the daemon ------------------------------------------------------------------------------
async def test_the_daemon_lands_every_trade_once_in_delta(root: Path) -> None:
    async with SimServer("binance", rate_msgs_s=2000) as sim:
        feed = feed_for(sim, symbols=SYMBOLS, channels=["trades", "quotes", "book"],
                        trade_stream="aggTrade")
        cfg = make_config(root, [feed], storage={"format": "delta"})
        daemon = await run_daemon(
            cfg, lambda d: feed["name"] in d.feed_stats
            and d.feed_stats[feed["name"]].messages >= 406 and len(sim.rest_requests) >= 4,
            settle_s=0.3)
    trades = read_delta(root, "trades")
    want = sent_trades(sim)
    assert len(want) == 145 and Counter(trade_ids(trades)) == Counter(want)
    quotes = read_delta(root, "quotes")
    assert quotes.height == 84
    for table in ("trades", "quotes", "book", "events"):
        df = read_delta(root, table)
        assert df.schema["ts_recv"] == pl.Datetime("us", "UTC"), table
        assert set(df["exchange"]) == {"binance"} and df["date"].n_unique() == 1
    # Every commit carried the watermark of its rows.
    table = DeltaTable(str(root / "trades"))
    key = f"{daemon.instance}/{feed['name']}"
    date = trades["date"][0].isoformat()
    assert table.transaction_version(app_id(key, "trades", "binance", date)) == \
        trades["recv_seq"].max()
    # Only Delta tables (and dot-directories) under the root.
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == \
        ["book", "events", "quotes", "trades"]


async def test_two_daemons_append_to_one_table_at_once(root: Path) -> None:
    """Two daemons (own journals, own feeds, one root) commit to the same tables and
    partitions concurrently: optimistic concurrency retries, nothing lost or doubled."""
    async with SimServer("binance", rate_msgs_s=150) as sim_a, \
            SimServer("binance", rate_msgs_s=150) as sim_b:
        feeds = [feed_for(sim, name=name, symbols=TRADE_SYMBOLS, channels=["trades"],
                          trade_stream="aggTrade")
                 for sim, name in ((sim_a, "a"), (sim_b, "b"))]
        cfgs = [make_config(root, [f], storage={"format": "delta", "flush_interval_s": 0.05})
                for f in feeds]

        def done(name: str) -> Any:
            return lambda d: name in d.feed_stats and d.feed_stats[name].messages >= 145

        daemons = await asyncio.gather(*(run_daemon(c, done(f["name"]), timeout_s=60)
                                         for c, f in zip(cfgs, feeds, strict=True)))
    trades = read_delta(root, "trades")
    assert len(sent_trades(sim_a)) == len(sent_trades(sim_b)) == 145
    # Both daemons recorded the same venue timeline: every trade exactly twice.
    assert Counter(trade_ids(trades)) == Counter(sent_trades(sim_a) + sent_trades(sim_b))
    history = DeltaTable(str(root / "trades")).history()
    by_instance: dict[str, list[int]] = {}
    for h in history:
        inst = h.get("ingestd.instance")
        if inst is not None:
            by_instance.setdefault(inst, []).append(h["version"])
    assert set(by_instance) == {d.instance for d in daemons}
    a, b = by_instance.values()
    # Their commits interleave: they were appending at the same time.
    assert min(a) < max(b) and min(b) < max(a)


DELTA_CONFIG = """
[storage]
root = "{root}"
format = "delta"
flush_interval_s = {flush}

[journal]
fsync_interval_s = 0.05

[health]
listen = "127.0.0.1:0"

[log]
level = "info"
format = "json"

[[feeds]]
name = "spot"
exchange = "binance"
url = "{url}"
rest_url = "{rest}"
symbols = {symbols}
channels = ["trades", "quotes"]
trade_stream = "aggTrade"
reconnect_min_delay_s = 0.05
"""


@pytest.mark.parametrize("flush", [0.1, 60.0])
async def test_kill_9_then_restart_commits_every_journaled_trade_once(
        tmp_path: Path, flush: float) -> None:
    """kill -9 mid-stream, restart: recovery replays the dead journal, skipping what the
    Delta transaction versions say is committed (flush 0.1: most of it; flush 60: none),
    then streams on. Every trade the journal made durable is in the table exactly once."""
    root = tmp_path / "data"
    async with SimServer("binance", rate_msgs_s=250, live=True) as sim:
        cfg = tmp_path / "feeds.toml"
        cfg.write_text(DELTA_CONFIG.format(root=root, url=sim.url, rest=sim.rest_url,
                                           flush=flush, symbols=json.dumps(SYMBOLS)))
        proc = await _start(cfg)
        log = root / "trades" / "_delta_log"
        # flush 0.1: kill once trades were committed (recovery must skip them); flush 60:
        # nothing is committed before the kill.
        while len(sent_trades(sim)) < 60 or (
                flush < 1 and len(list(log.glob("*.json")) if log.is_dir() else []) < 2):
            await asyncio.sleep(0.01)
        proc.kill()
        await proc.wait()
        durable = durable_frames(root)
        journaled = [(d["s"], str(d["a"])) for f in durable.values()
                     if (d := json.loads(f).get("data", {})).get("e") == "aggTrade"]
        assert journaled, "the journal holds trades received before the crash"
        first_conns = {s.conn_id for s in sim.sent}
        proc2 = await _start(cfg)
        head = await _read_until_event(proc2, "starting")
        while not sim.timeline_done:
            await asyncio.sleep(0.01)
        proc2.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc2.communicate(), 60)
    assert proc2.returncode == 0, err.decode()
    logs = [json.loads(x) for x in (head + out).decode().splitlines() if x.startswith("{")]
    recovered = [e for e in logs if e["event"] == "recovered_from_journal"]
    assert len(recovered) == 1 and recovered[0]["journals"] == 1
    if flush == 60.0:
        assert recovered[0]["rows_already_committed"] == 0
        assert recovered[0]["rows_committed"] > 0
    else:
        assert recovered[0]["rows_already_committed"] > 0
    trades = read_delta(root, "trades")
    got = Counter(trade_ids(trades))
    assert max(got.values()) == 1, "a trade is stored twice"
    assert all(got[t] == 1 for t in journaled), "a journaled trade is missing"
    after = sent_trades(sim, {s.conn_id for s in sim.sent} - first_conns)
    assert all(got[t] == 1 for t in after), "a trade received after the restart is missing"
    # Nothing else: every stored trade was journaled by the first process or received by
    # the second.
    assert set(got) <= set(journaled) | set(after)


async def test_one_commit_per_table_per_flush_carries_every_due_partition(root: Path) -> None:
    """Two venues (two `exchange` partitions of `trades`): the writer hands every due
    partition of a table to one Delta commit, so commits per table are bounded by the
    flush interval, not by the number of partitions."""
    async with SimServer("binance", rate_msgs_s=400) as spot, \
            SimServer("binance-usdm", rate_msgs_s=400) as usdm:
        feeds = [feed_for(spot, name="spot", symbols=TRADE_SYMBOLS, channels=["trades"],
                          trade_stream="aggTrade"),
                 feed_for(usdm, name="usdm", symbols=["SUSHIUSDT", "AKROUSDT", "KEEPUSDT",
                                                      "CTKUSDT", "BTCUSDT", "XRPUSDT"],
                          channels=["trades"], trade_stream="aggTrade")]
        cfg = make_config(root, feeds, storage={"format": "delta", "flush_interval_s": 0.3})
        daemon = await run_daemon(
            cfg, lambda d: all(f["name"] in d.feed_stats for f in feeds)
            and d.feed_stats["spot"].messages >= 145 and d.feed_stats["usdm"].messages >= 91,
            timeout_s=60)
    trades = read_delta(root, "trades")
    assert Counter(trade_ids(trades)) == Counter(sent_trades(spot) + sent_trades(usdm))
    commits = []
    for entry in sorted((root / "trades" / "_delta_log").glob("*.json")):
        actions = [json.loads(line) for line in entry.read_text().splitlines()]
        adds = [a["add"] for a in actions if "add" in a]
        if adds:
            commits.append({a["partitionValues"]["exchange"] for a in adds})
    assert {"binance", "binance-usdm"} in commits, "no commit held both partitions"
    # Fewer commits than partitions committed (one commit per partition would be equal).
    assert len(commits) < sum(len(c) for c in commits)
    assert daemon.writer_stats.rows_written["trades"] == trades.height


# ---- compaction --------------------------------------------------------------------------------
def _publish_days(pub: DeltaPublisher, days: list[str], batches_per_day: int) -> None:
    seq = 1
    for day in days:
        for _ in range(batches_per_day):
            pub.publish(trades_batch("inst1/a", [seq, seq + 1, seq + 2], date=day))
            seq += 3


def _all_rows(df: pl.DataFrame) -> list[tuple[Any, ...]]:
    return sorted(df.select(sorted(df.columns)).iter_rows())


def test_ingestd_compact_on_a_local_delta_table_keeps_every_row(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = tmp_path / "data"
    pub = DeltaPublisher(storage(root), root, "inst1")
    pub.open()
    try:
        _publish_days(pub, ["2026-11-30", "2026-12-01"], 6)
    finally:
        pub.close()
    before = read_delta(root, "trades")
    files_before = len(DeltaTable(str(root / "trades")).file_uris())
    cfg = tmp_path / "feeds.toml"
    cfg.write_text(f'[storage]\nroot = "{root}"\nformat = "delta"\n\n[[feeds]]\nname = "f"\n'
                   'exchange = "binance"\nsymbols = ["BTCUSDT"]\nchannels = ["trades"]\n')
    run = subprocess.run([sys.executable, "-m", "ingestd", "compact", "--config", str(cfg),
                          "--before", "2026-12-01"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    table = DeltaTable(str(root / "trades"))
    # 2026-11-30 (before the cutoff) became one file; 2026-12-01 was left as it was.
    assert files_before == 12 and len(table.file_uris()) == 1 + 6
    assert (root / "trades" / "_delta_log" / "_last_checkpoint").exists()
    assert _all_rows(read_delta(root, "trades")) == _all_rows(before)
    assert "compacted 1 partition(s): 6 files -> 1" in run.stdout
    # The transaction versions (recovery's watermarks) survive the compaction.
    assert table.transaction_version(
        app_id("inst1/a", "trades", "binance", "2026-12-01")) == 36


def test_compact_on_an_s3_delta_table_optimizes_checkpoints_vacuums(
        tmp_path: Path, s3_server: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from ingestd.sink.compact import compact_storage

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    cfg = storage(f"s3://{s3_bucket}/lake", local_dir=str(tmp_path / "local"),
                  options=s3_server.options)
    pub = DeltaPublisher(cfg, tmp_path / "local", "inst1")
    pub.open()
    try:
        _publish_days(pub, ["2026-11-30", "2026-12-01"], 5)
    finally:
        pub.close()
    uri = f"s3://{s3_bucket}/lake/trades"
    opts = s3_server.storage_options()
    before = read_delta(f"s3://{s3_bucket}/lake", "trades", **opts)
    fs = s3_server.filesystem()

    def data_objects() -> int:
        from pyarrow import fs as pafs

        infos = fs.get_file_info(pafs.FileSelector(f"{s3_bucket}/lake/trades", recursive=True))
        return sum(1 for i in infos if i.path.endswith(".parquet")
                   and "_delta_log" not in i.path)

    assert data_objects() == 10
    result = compact_storage(cfg, "2026-12-02", vacuum_retention_hours=0)
    assert result.files_in == 10 and result.files_out == 2
    table = DeltaTable(uri, storage_options=opts)
    assert len(table.file_uris()) == 2
    # Vacuum deleted the compacted-away objects: only the table's two files are left.
    assert data_objects() == 2
    assert fs.get_file_info(f"{s3_bucket}/lake/trades/_delta_log/_last_checkpoint").is_file
    assert _all_rows(read_delta(f"s3://{s3_bucket}/lake", "trades", **opts)) == \
        _all_rows(before)


# ---- on S3 (SeaweedFS) -----------------------------------------------------------------------
S3_CONFIG = """
[storage]
root = "s3://{bucket}/lake"
local_dir = "{local}"
format = "delta"
flush_interval_s = 0.2

[storage.options]
endpoint_url = "{endpoint}"
region = "us-east-1"
allow_http = true

[journal]
fsync_interval_s = 0.05

[health]
listen = "127.0.0.1:0"

[log]
level = "info"
format = "json"

[[feeds]]
name = "{name}"
exchange = "binance"
url = "{url}"
rest_url = "{rest}"
symbols = {symbols}
channels = ["trades"]
trade_stream = "aggTrade"
reconnect_min_delay_s = 0.05
"""


async def _start_env(cfg: Path, env: dict[str, str]) -> asyncio.subprocess.Process:
    import os
    import sys

    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ingestd", "--config", str(cfg),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"})


async def _drain_stdout(proc: asyncio.subprocess.Process, into: list[bytes]) -> None:
    assert proc.stdout is not None
    while line := await proc.stdout.readline():
        into.append(line)


async def test_s3_two_daemons_append_while_one_is_killed_and_restarted(
        tmp_path: Path, s3_server: Any, s3_bucket: str) -> None:
    """Daemons A and B append to one Delta table on S3 (conditional PUT arbitrates). A is
    killed -9 mid-stream and restarted: its recovery commits what its journal holds and
    the table's transaction versions say is missing. Every trade B received is stored
    once; every trade A received is stored once, except those of A's last fsync window
    before the kill (sent by the venue but, at the kill, still on the socket or in the
    reader, not yet in the journal's files, nor committed): such a trade is missing,
    never doubled: the missing ones are exactly the trades sent after the last one A
    journaled. Trades the venue sent while A was down never reached A (that gap is the
    venue's; A logs it as a reconnect)."""
    opts = s3_server.storage_options()
    uri = f"s3://{s3_bucket}/lake/trades"
    # Endless generated venues (new trade ids forever): A still has trades to receive
    # after its restart, however long that takes.
    async with SimServer("binance", rate_msgs_s=100, live=True,
                         venue=GenBinanceVenue(seed=1)) as sim_a, \
            SimServer("binance", rate_msgs_s=100, live=True,
                      venue=GenBinanceVenue(seed=2)) as sim_b:
        cfgs = {}
        for name, sim in (("a", sim_a), ("b", sim_b)):
            cfgs[name] = tmp_path / f"{name}.toml"
            cfgs[name].write_text(S3_CONFIG.format(
                bucket=s3_bucket, local=tmp_path / name, endpoint=s3_server.endpoint,
                name=name, url=sim.url, rest=sim.rest_url, symbols=json.dumps(TRADE_SYMBOLS)))
        proc_a = await _start_env(cfgs["a"], s3_server.env)
        proc_b = await _start_env(cfgs["b"], s3_server.env)
        out_b: list[bytes] = []
        drain_b = asyncio.create_task(_drain_stdout(proc_b, out_b))
        # Kill A once both have committed trades to the shared table.
        deadline = asyncio.get_running_loop().time() + 60
        while True:
            assert asyncio.get_running_loop().time() < deadline, "no commits from both"
            try:
                hist = DeltaTable(uri, storage_options=opts).history()
            except Exception:  # not created yet
                hist = []
            writers = {h.get("ingestd.instance") for h in hist} - {None}
            if len(writers) == 2 and len(sent_trades(sim_a)) >= 40:
                break
            assert proc_a.returncode is None and proc_b.returncode is None
            await asyncio.sleep(0.05)
        proc_a.kill()
        await proc_a.wait()
        durable = durable_frames(tmp_path / "a")
        journaled_a = [(d["s"], str(d["a"])) for f in durable.values()
                       if (d := json.loads(f).get("data", {})).get("e") == "aggTrade"]
        first_conns = {s.conn_id for s in sim_a.sent}
        sent_before_kill = sent_trades(sim_a)
        proc_a2 = await _start_env(cfgs["a"], s3_server.env)
        out_a: list[bytes] = [await _read_until_event(proc_a2, "starting")]
        drain_a = asyncio.create_task(_drain_stdout(proc_a2, out_a))
        while len(sent_trades(sim_a, {s.conn_id for s in sim_a.sent} - first_conns)) < 40:
            assert proc_a2.returncode is None
            await asyncio.sleep(0.05)
        # The venues stop; once both daemons have committed all they were sent, stop them.
        sim_a.stop_publishing()
        sim_b.stop_publishing()
        want = Counter(sent_trades(sim_b)) + Counter(
            sent_trades(sim_a, {s.conn_id for s in sim_a.sent} - first_conns))
        for _ in range(600):
            stored = Counter(trade_ids(pl.read_delta(uri, storage_options=opts)))
            if not want - stored:
                break
            await asyncio.sleep(0.1)
        for p in (proc_a2, proc_b):
            p.send_signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(proc_a2.wait(), proc_b.wait()), 90)
        await asyncio.gather(drain_a, drain_b)
    assert proc_a2.returncode == 0 and proc_b.returncode == 0
    logs = [json.loads(x) for x in b"".join(out_a).decode().splitlines() if x.startswith("{")]
    recovered = [e for e in logs if e["event"] == "recovered_from_journal"]
    assert len(recovered) == 1 and recovered[0]["journals"] == 1
    trades = pl.read_delta(uri, storage_options=opts)
    got = Counter(trade_ids(trades))
    b_sent = Counter(sent_trades(sim_b))
    a_after = sent_trades(sim_a, {s.conn_id for s in sim_a.sent} - first_conns)
    assert journaled_a and a_after
    # B: every trade once. A: every trade of its journal and every trade after the restart
    # once; of the trades sent before the kill, only the tail after the last one A
    # journaled may be missing (A's last fsync window), and nothing else is stored.
    from_a = {t: got[t] - b_sent[t] for t in set(got) | set(b_sent)}
    assert all(n in (0, 1) for n in from_a.values()), "a trade is stored twice"
    assert all(got[t] >= b_sent[t] for t in b_sent), "a trade B received is missing"
    journaled = set(journaled_a)
    last = max(i for i, t in enumerate(sent_before_kill) if t in journaled)
    for i, t in enumerate(sent_before_kill):
        assert from_a.get(t, 0) == (1 if i <= last else 0), (i, last, t)
    assert all(from_a.get(t, 0) == 1 for t in a_after)
    stored_from_a = {t for t, n in from_a.items() if n}
    assert stored_from_a == set(sent_before_kill[:last + 1]) | set(a_after)
    history = DeltaTable(uri, storage_options=opts).history()
    assert len({h.get("ingestd.instance") for h in history} - {None}) == 3  # A, B, A again


def test_a_commit_during_a_store_outage_waits_then_lands_once(
        tmp_path: Path, s3_server: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store dies before a commit: `publish` fails, cannot tell whether the commit
    landed (the store does not answer), reports the store unreachable and keeps asking;
    once the store is back it learns the commit did not land and raises, the writer's
    retry commits the rows once."""
    import threading

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    cfg = storage(f"s3://{s3_bucket}/lake", local_dir=str(tmp_path / "local"),
                  options={**s3_server.options, "timeout": "2s", "connect_timeout": "1s"})
    pub = DeltaPublisher(cfg, tmp_path / "local", "inst1")
    pub.open()
    outcome: list[object] = []
    try:
        pub.publish(trades_batch("inst1/a", [1, 2]))
        assert pub.store_stats is not None and pub.store_stats.state == "ok"
        s3_server.kill()
        try:
            worker = threading.Thread(target=lambda: outcome.append(_try_publish(
                pub, trades_batch("inst1/a", [3, 4]))))
            worker.start()
            while pub.store_stats.state != "unreachable":
                assert worker.is_alive(), outcome
                worker.join(0.05)
            assert pub.store_stats.last_error
        finally:
            s3_server.start()
        worker.join(120)
        assert not worker.is_alive()
        assert isinstance(outcome[0], DeltaCommitError) and pub.store_stats.state == "ok"
        pub.publish(trades_batch("inst1/a", [3, 4]))  # the writer's retry
    finally:
        pub.close()
    trades = read_delta(f"s3://{s3_bucket}/lake", "trades", **s3_server.storage_options())
    assert trades["recv_seq"].to_list() == [1, 2, 3, 4]


def _try_publish(pub: DeltaPublisher, batch: Batch) -> object:
    try:
        return pub.publish(batch)
    except DeltaCommitError as e:
        return e


class AnswerDroppingProxy:
    """A loopback TCP proxy in front of the S3 server that, once armed, forwards the next
    PUT of a Delta log entry (`_delta_log/<version>.json`) but never returns the store's
    answer: the commit lands, the client sees a broken connection."""

    def __init__(self, upstream_port: int) -> None:
        import socket
        import threading

        self.upstream_port = upstream_port
        self.armed = threading.Event()
        self.dropped = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            swallow = threading.Event()
            threading.Thread(target=self._up, args=(client, upstream, swallow),
                             daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, swallow),
                             daemon=True).start()

    def _up(self, client: Any, upstream: Any, swallow: Any) -> None:
        import re

        while data := _recv(client):
            if self.armed.is_set() and re.search(rb"PUT \S*_delta_log/\d+\.json", data):
                self.armed.clear()
                swallow.set()
            try:
                upstream.sendall(data)
            except OSError:
                return

    def _down(self, upstream: Any, client: Any, swallow: Any) -> None:
        while data := _recv(upstream):
            if swallow.is_set():  # the store answered the PUT: drop it, cut the client
                import socket

                self.dropped += 1
                for s in (client, upstream):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    s.close()
                return
            try:
                client.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


def _recv(sock: Any) -> bytes:
    try:
        return bytes(sock.recv(65536))
    except OSError:
        return b""


def test_a_commit_whose_answer_is_lost_is_not_committed_twice(
        tmp_path: Path, s3_server: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store writes the log entry but its answer never arrives (a proxy drops it):
    delta-rs reports a failure (or retries into its own commit); the publisher reads the
    table, sees its transaction version there, and reports success - the rows are in the
    table once, and the next batch follows."""
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    proxy = AnswerDroppingProxy(s3_server.port)
    try:
        cfg = storage(f"s3://{s3_bucket}/lake", local_dir=str(tmp_path / "local"),
                      options={**s3_server.options,
                               "endpoint_url": f"http://127.0.0.1:{proxy.port}"})
        pub = DeltaPublisher(cfg, tmp_path / "local", "inst1")
        pub.open()
        try:
            pub.publish(trades_batch("inst1/a", [1, 2]))
            proxy.armed.set()
            done = pub.publish(trades_batch("inst1/a", [3, 4]))
            assert proxy.dropped == 1 and done.rows == 2
            pub.publish(trades_batch("inst1/a", [5]))
        finally:
            pub.close()
    finally:
        proxy.close()
    opts = s3_server.storage_options()
    trades = read_delta(f"s3://{s3_bucket}/lake", "trades", **opts)
    assert trades["recv_seq"].to_list() == [1, 2, 3, 4, 5]
    table = DeltaTable(f"s3://{s3_bucket}/lake/trades", storage_options=opts)
    assert table.transaction_version(app_id("inst1/a", "trades", "binance", "2026-12-03")) == 5


def test_recovery_waits_for_an_unreachable_store_never_taking_it_for_no_table(
        tmp_path: Path, s3_server: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recovery asks the table what is committed; with the store down that read fails -
    which must never mean "no table, nothing committed" (every row would be replayed
    twice). It waits for the store, then answers from the table."""
    import threading

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    cfg = storage(f"s3://{s3_bucket}/lake", local_dir=str(tmp_path / "local"),
                  options={**s3_server.options, "timeout": "2s", "connect_timeout": "1s"})
    pub = DeltaPublisher(cfg, tmp_path / "local", "dead1")
    pub.open()
    try:
        pub.publish(trades_batch("dead1/a", [1, 2, 3]))
    finally:
        pub.close()
    cov = DeltaPublisher(cfg, tmp_path / "local", "new1").coverage()
    day = (dt.date(2026, 12, 3) - dt.date(1970, 1, 1)).days
    errors: list[BaseException] = []

    def load() -> None:
        try:
            cov.load("trades", "binance", day, "dead1/", 0)
        except BaseException as e:
            errors.append(e)

    s3_server.kill()
    with structlog.testing.capture_logs() as logs:
        try:
            worker = threading.Thread(target=load)
            worker.start()
            # Down: the read fails and recovery keeps asking (the store stays down).
            while not any(e["event"] == "delta_recovery_store_unreachable" for e in logs):
                assert worker.is_alive() and not errors
                worker.join(0.05)
        finally:
            s3_server.start()
        worker.join(60)
    assert not worker.is_alive() and not errors
    assert cov.covers("dead1/a", "trades", "binance", day, 3)
    assert not cov.covers("dead1/a", "trades", "binance", day, 4)


async def test_the_daemon_rides_out_a_store_outage_with_delta_on_s3(
        tmp_path: Path, s3_server: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store goes down mid-stream: the commit in flight waits (the store shows as
    unreachable), rows wait in the buffer and the journal; the store comes back: every
    trade the venue sent is in the table exactly once."""
    from ingestd.daemon import Daemon

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    uri = f"s3://{s3_bucket}/lake/trades"
    opts = s3_server.storage_options()
    async with SimServer("binance", rate_msgs_s=100, live=True,
                         venue=GenBinanceVenue(seed=3)) as sim:
        feed = feed_for(sim, name="spot", symbols=TRADE_SYMBOLS, channels=["trades"],
                        trade_stream="aggTrade")
        cfg = make_config(tmp_path / "unused", [feed], storage={
            "root": f"s3://{s3_bucket}/lake", "local_dir": str(tmp_path / "local"),
            "format": "delta", "flush_interval_s": 0.2,
            "options": {**s3_server.options, "timeout": "2s", "connect_timeout": "1s"}})
        daemon = Daemon(cfg)
        task = asyncio.create_task(daemon.run(install_signals=False))
        store = daemon.publisher.store_stats
        assert store is not None

        async def until(cond: Any, what: str, timeout_s: float = 60) -> None:
            deadline = asyncio.get_running_loop().time() + timeout_s
            while not cond():
                assert not task.done(), task.result()
                assert asyncio.get_running_loop().time() < deadline, what
                await asyncio.sleep(0.05)

        await until(lambda: daemon.writer_stats.rows_written["trades"] >= 20, "first commits")
        await asyncio.to_thread(s3_server.kill)
        try:
            await until(lambda: store.state == "unreachable", "the outage is seen")
            sent_in_outage = len(sent_trades(sim))
            await until(lambda: len(sent_trades(sim)) >= sent_in_outage + 30, "trades flow on")
        finally:
            await asyncio.to_thread(s3_server.start)
        await until(lambda: store.state == "ok", "the store is back")
        written = daemon.writer_stats.rows_written["trades"]
        await until(lambda: daemon.writer_stats.rows_written["trades"] > written + 10,
                    "commits resume")
        sim.stop_publishing()
        want = Counter(sent_trades(sim))
        await until(lambda: daemon.writer_stats.rows_written["trades"] >= sum(want.values()),
                    "everything sent is committed")
        daemon.request_stop("test done")
        assert await asyncio.wait_for(task, 60) == 0
    got = Counter(trade_ids(pl.read_delta(uri, storage_options=opts)))
    assert got == want


def test_ingestd_compact_refuses_parquet_under_an_object_store_root(tmp_path: Path) -> None:
    import subprocess
    import sys

    cfg = tmp_path / "feeds.toml"
    cfg.write_text(f'[storage]\nroot = "s3://bucket/lake"\nlocal_dir = "{tmp_path}"\n\n'
                   '[[feeds]]\nname = "f"\nexchange = "binance"\nsymbols = ["BTCUSDT"]\n'
                   'channels = ["trades"]\n')
    run = subprocess.run([sys.executable, "-m", "ingestd", "compact", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 78 and "not compacted" in run.stderr
