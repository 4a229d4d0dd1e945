"""An object-store root against a real S3 server (SeaweedFS on loopback, tests/s3server.py):
the contract layout under the prefix, no partial object ever listed, the store down for
30 s and back, kill -9 mid-upload, and the config check."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from pyarrow import fs as pafs

from ingestd.config import Config
from ingestd.daemon import Daemon
from ingestd.schema import SCHEMAS
from ingestd.sim import SimServer
from ingestd.sink.batcher import NS_PER_DAY
from ingestd.sink.journal import FRAME, FRAMES, iter_segments, read_segment
from ingestd.sink.objstore import (
    OUTBOX_DIR,
    PENDING_SUFFIX,
    ObjectStoreParquetPublisher,
    OutboxCoverage,
    oldest_journal_ns,
)
from ingestd.sink.recovery import recover
from tests.exchanges.test_binance import SPOT_BOOK
from tests.s3server import S3Server
from tests.support import feed_for, make_config

TRADE_SYMBOLS = ["ZILUSDT", "DENTUSDT", "MANAUSDT"]
PREFIX = "md/v1"
KEY_RE = re.compile(r"^(?P<table>[a-z]+)/exchange=(?P<ex>[a-z0-9_-]+)/"
                    r"date=\d{4}-\d{2}-\d{2}/\d{19}-[0-9a-f]{32}\.parquet$")


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The store's credentials in this process's standard environment (the in-process
    daemon's client reads them from there, never from the config)."""
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    return s3_server


def s3_config(bucket: str, local_dir: Path, server: S3Server,
              feeds: list[dict[str, Any]]) -> Config:
    return make_config(local_dir, feeds, storage={
        "root": f"s3://{bucket}/{PREFIX}", "local_dir": str(local_dir),
        "options": server.options})


def objects(fs: pafs.FileSystem, bucket: str) -> list[pafs.FileInfo]:
    return [i for i in fs.get_file_info(pafs.FileSelector(bucket, recursive=True,
                                                          allow_not_found=True))
            if i.type == pafs.FileType.File]


def read_s3_table(fs: pafs.FileSystem, bucket: str, table: str) -> pl.DataFrame:
    """Every row of a table over S3 (pyarrow dataset, hive partitions), by recv_seq."""
    base = f"{bucket}/{PREFIX}/{table}"
    if fs.get_file_info(base).type == pafs.FileType.NotFound:
        return pl.DataFrame()
    data = pads.dataset(base, filesystem=fs, format="parquet",
                        partitioning="hive").to_table()
    return pl.from_arrow(data).sort("recv_seq", maintain_order=True)  # type: ignore[return-value]


def sent_trades(sim: SimServer) -> list[tuple[str, str]]:
    out = []
    for s in sim.sent:
        msg = json.loads(s.frame)
        data = msg.get("data", {})
        if msg.get("stream", "").endswith("@aggTrade"):
            out.append((data["s"], str(data["a"])))
    return out


class Lister:
    """Polls the bucket while the daemon runs: every object listed must be a complete
    Parquet file under its final name (never a temporary or partial one)."""

    def __init__(self, fs: pafs.FileSystem, bucket: str) -> None:
        self.fs = fs
        self.bucket = bucket
        self.seen: dict[str, int] = {}
        self.problems: list[str] = []
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Lister:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                listed = objects(self.fs, self.bucket)
            except OSError:
                continue
            self.polls += 1
            for info in listed:
                if info.path in self.seen:
                    continue
                rel = info.path.removeprefix(f"{self.bucket}/{PREFIX}/")
                if not KEY_RE.match(rel):
                    self.problems.append(f"unexpected object {info.path}")
                try:
                    with self.fs.open_input_file(info.path) as f:
                        meta = pq.read_metadata(f)
                except OSError as e:
                    self.problems.append(f"{info.path} is not valid Parquet: {e}")
                    continue
                self.seen[info.path] = meta.num_rows


async def test_parquet_on_s3_in_the_contract_layout_no_partial_object(
        s3_env: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    server, bucket = s3_env, s3_bucket
    local = tmp_path / "local"
    fs = server.filesystem()
    async with SimServer("binance", rate_msgs_s=400) as sim:
        feed = feed_for(sim, symbols=SPOT_BOOK + TRADE_SYMBOLS,
                        channels=["trades", "quotes", "book"], trade_stream="aggTrade")
        cfg = s3_config(bucket, local, server, [feed])
        daemon = Daemon(cfg)
        with Lister(fs, bucket) as lister:
            task = asyncio.create_task(daemon.run(install_signals=False))
            try:
                await wait_for(lambda: task.done() or (
                    feed["name"] in daemon.feed_stats
                    and daemon.feed_stats[feed["name"]].messages >= 406
                    and len(sim.rest_requests) >= 4
                    and daemon.publisher.store_stats is not None
                    and daemon.publisher.store_stats.files_uploaded >= 3), 60)
            finally:
                daemon.request_stop("test done")
                assert await asyncio.wait_for(task, 60) == 0
            polls_before = lister.polls
            await wait_for(lambda: lister.polls >= polls_before + 2, 30)
    assert not lister.problems, lister.problems[:5]
    assert lister.polls > 2 and lister.seen
    # Everything committed was uploaded at the clean shutdown; the outbox is empty.
    assert not list((local / OUTBOX_DIR).rglob(f"*{PENDING_SUFFIX}"))
    store = daemon.stats_snapshot().store
    assert store is not None and store.state == "ok" and store.files_waiting == 0
    # The contract layout under the prefix, one schema per table.
    keys = [i.path for i in objects(fs, bucket)]
    rels = [k.removeprefix(f"{bucket}/{PREFIX}/") for k in keys]
    assert all(KEY_RE.match(r) for r in rels), rels
    tables = {r.split("/")[0] for r in rels}
    assert tables == {"trades", "quotes", "book", "events"}
    for k in keys:
        table = k.removeprefix(f"{bucket}/{PREFIX}/").split("/")[0]
        with fs.open_input_file(k) as f:
            schema = pq.read_schema(f)
        assert schema.remove_metadata() == SCHEMAS[table].remove_metadata()
    # Nothing is ever written next to the layout (no staging, no temporaries).
    assert len(keys) == daemon.writer_stats.files_written
    # Every trade the venue sent, exactly once: read with pyarrow and with polars.
    trades = read_s3_table(fs, bucket, "trades")
    want = sent_trades(sim)
    assert len(want) == 145
    assert sorted(zip(trades["symbol"], trades["trade_id"], strict=True)) == sorted(want)
    lazy = pl.scan_parquet(f"s3://{bucket}/{PREFIX}/trades/**/*.parquet",
                           hive_partitioning=True,
                           storage_options=server.storage_options())
    assert lazy.select(pl.len()).collect().item() == 145


async def wait_for(cond: Any, timeout_s: float, interval_s: float = 0.05) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        if loop.time() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(interval_s)


def get_json(port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get_text(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.read().decode()


@pytest.mark.timeout(300)
async def test_store_down_30_s_then_back_every_trade_exactly_once(
        s3_env: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    server, bucket = s3_env, s3_bucket
    local = tmp_path / "local"
    fs = server.filesystem()
    outage_s = 30.0
    try:
        async with SimServer("binance", rate_msgs_s=10, live=True) as sim:
            feed = feed_for(sim, symbols=TRADE_SYMBOLS, channels=["trades"],
                            trade_stream="aggTrade")
            cfg = s3_config(bucket, local, server, [feed])
            daemon = Daemon(cfg)
            pub = daemon.publisher
            assert isinstance(pub, ObjectStoreParquetPublisher)
            # A short backoff cap: the store is retried often enough to be seen back
            # within a second or two of its return.
            pub.retry_max_s = 1.0
            task = asyncio.create_task(daemon.run(install_signals=False))
            seen: list[str] = []

            def health() -> dict[str, Any]:
                assert daemon.health_port is not None
                return get_json(daemon.health_port, "/health")[1]

            try:
                await wait_for(lambda: task.done() or (
                    daemon.health_port is not None and pub.stats.files_uploaded >= 2), 60)
                seen.append((await asyncio.to_thread(health))["store"]["state"])
                server.kill()
                down_at = time.monotonic()
                await wait_for(lambda: pub.stats.state == "unreachable", 30)
                code, body = await asyncio.to_thread(get_json, daemon.health_port, "/health")
                assert code == 503 and body["status"] == "degraded"
                assert body["store"]["state"] == "unreachable" and body["store"]["last_error"]
                seen.append(body["store"]["state"])
                # Rows keep committing locally while the store is down (the outbox).
                await wait_for(lambda: pub.stats.files_waiting >= 2, 30)
                metrics = await asyncio.to_thread(get_text, daemon.health_port, "/metrics")
                assert "ingestd_store_up 0.0" in metrics
                assert re.search(r"^ingestd_store_files_waiting [1-9]", metrics, re.M)
                await wait_for(lambda: time.monotonic() - down_at >= outage_s
                               and pub.stats.upload_failures >= 5, outage_s + 30,
                               interval_s=0.5)
                assert pub.stats.state == "unreachable"
                await asyncio.to_thread(server.start)
                await wait_for(lambda: pub.stats.state == "ok"
                               and pub.stats.files_waiting == 0, 60)
                body = (await asyncio.to_thread(health))
                assert body["store"]["state"] == "ok" and body["store"]["files_waiting"] == 0
                seen.append(body["store"]["state"])
                await wait_for(lambda: sim.timeline_done, 120, interval_s=0.2)
                # Everything received reached the writer and was taken off the queue.
                await wait_for(lambda: daemon.queue.qsize() == 0, 10)
            finally:
                daemon.request_stop("test done")
                assert await asyncio.wait_for(task, 60) == 0
    finally:
        server.start()
    assert seen == ["ok", "unreachable", "ok"]
    trades = read_s3_table(fs, bucket, "trades")
    got = list(zip(trades["symbol"], trades["trade_id"], strict=True))
    want = sent_trades(sim)
    assert len(want) == 145
    assert Counter(got) == Counter(want), "every trade the venue sent, exactly once"
    assert not list((local / OUTBOX_DIR).rglob(f"*{PENDING_SUFFIX}"))


CONFIG = """
[storage]
root = "s3://{bucket}/{prefix}"
local_dir = "{local}"
flush_interval_s = 0.1

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
name = "spot"
exchange = "binance"
url = "{url}"
rest_url = "{rest}"
symbols = ["NKNUSDT", "BLZETH", "LRCBTC", "RUNEEUR", "ZILUSDT", "DENTUSDT", "MANAUSDT"]
channels = ["trades", "quotes", "book"]
trade_stream = "aggTrade"
reconnect_min_delay_s = 0.05
"""


async def _start(cfg: Path, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ingestd", "--config", str(cfg),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"})


class Logs:
    """Reads a daemon's stdout to the end in the background (a full pipe would stall its
    logging): the JSON lines, and the health port from its `starting` line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[dict[str, Any]] = []
        self.text: list[bytes] = []
        self.port: int | None = None
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.text.append(line)
            if line.startswith(b"{"):
                rec = json.loads(line)
                self.lines.append(rec)
                if rec.get("event") == "starting":
                    self.port = int(rec["health"].rpartition(":")[2])

    async def started(self) -> int:
        await wait_for(lambda: self.port is not None or self.task.done(), 60)
        assert self.port is not None, b"".join(self.text[-20:]).decode()
        return self.port


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def metric_at_least(port: int, name: str, value: float,
                          timeout_s: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while _metric(await asyncio.to_thread(get_text, port, "/metrics"), name) < value:
        if loop.time() > deadline:
            raise TimeoutError(f"{name} never reached {value}")
        await asyncio.sleep(0.02)


def journaled_trades(local: Path) -> set[int]:
    """recv_seq of every aggTrade frame the dead process made durable."""
    out = set()
    for d in (local / ".journal").iterdir():
        for seg in iter_segments(d):
            for rec in read_segment(seg)[0]:
                frames = [rec.data] if rec.kind == FRAME else (
                    rec.frames or [] if rec.kind == FRAMES else [])
                for i, frame in enumerate(frames):
                    if json.loads(frame).get("data", {}).get("e") == "aggTrade":
                        out.add(rec.seq + i)
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("when", ["uploading", "store_down"])
async def test_kill_9_mid_upload_then_restart_no_duplicate_nothing_lost(
        s3_server: S3Server, s3_bucket: str, tmp_path: Path, when: str) -> None:
    """`uploading`: killed while files are being uploaded one after the other;
    `store_down`: killed while committed files wait for a store that is down (the next
    start uploads them under their own names)."""
    server, bucket = s3_server, s3_bucket
    local = tmp_path / "local"
    fs = server.filesystem()
    async with SimServer("binance", rate_msgs_s=60, live=True) as sim:
        cfg = tmp_path / "feeds.toml"
        cfg.write_text(CONFIG.format(bucket=bucket, prefix=PREFIX, local=local,
                                     endpoint=server.endpoint, url=sim.url,
                                     rest=sim.rest_url))
        proc = await _start(cfg, server.env)
        logs1 = Logs(proc)
        port = await logs1.started()
        # Kill while uploads are going on: some objects are up, more are coming.
        await metric_at_least(port, "ingestd_store_files_uploaded_total", 3)
        if when == "store_down":
            server.kill()
            await metric_at_least(port, "ingestd_store_files_waiting", 2)
        assert not sim.timeline_done, "the venue's timeline outlasts the first run"
        proc.kill()
        await proc.wait()
        await logs1.task
        journaled = journaled_trades(local)
        assert journaled, "the journal holds trades received before the crash"
        pending_at_kill = list((local / OUTBOX_DIR).rglob(f"*{PENDING_SUFFIX}"))
        if when == "store_down":
            assert len(pending_at_kill) >= 2
            await asyncio.to_thread(server.start)
        # Restart: recovery, pending uploads, then streaming to the end of the timeline.
        proc2 = await _start(cfg, server.env)
        logs2 = Logs(proc2)
        port2 = await logs2.started()
        await wait_for(lambda: sim.timeline_done, 120, interval_s=0.1)

        def uploaded_all() -> bool:
            body = get_json(port2, "/health")[1]
            return body["store"]["files_waiting"] == 0 and body["store"]["state"] == "ok"

        while not await asyncio.to_thread(uploaded_all):
            await asyncio.sleep(0.1)
        proc2.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc2.wait(), 60)
        await logs2.task
    assert proc2.returncode == 0, b"".join(logs2.text[-30:]).decode()
    recovered = [e for e in logs2.lines if e["event"] == "recovered_from_journal"]
    assert len(recovered) == 1 and recovered[0]["journals"] == 1
    # Recovery found rows of the journal already committed (uploaded or in the outbox)
    # and skipped them.
    assert recovered[0]["rows_already_committed"] > 0
    trades = read_s3_table(fs, bucket, "trades")
    ids = list(zip(trades["symbol"], trades["trade_id"], strict=True))
    assert len(ids) == len(set(ids)), "a trade is stored twice"
    seqs = Counter(trades["recv_seq"].to_list())
    assert max(seqs.values()) == 1
    missing = journaled - set(seqs)
    assert not missing, f"{len(missing)} journaled trades missing"
    # Every object is complete, in the layout; the outbox is empty after a clean stop.
    for info in objects(fs, bucket):
        assert KEY_RE.match(info.path.removeprefix(f"{bucket}/{PREFIX}/")), info.path
        with fs.open_input_file(info.path) as f:
            pq.read_metadata(f)
    assert not list((local / OUTBOX_DIR).rglob(f"*{PENDING_SUFFIX}"))
    # The files pending at the kill were uploaded under their own names, once.
    names = {Path(i.path).name for i in objects(fs, bucket)}
    for p in pending_at_kill:
        assert p.name.removesuffix(PENDING_SUFFIX) in names


def test_check_rejects_an_s3_root_without_local_dir(tmp_path: Path) -> None:
    cfg = tmp_path / "feeds.toml"
    cfg.write_text("""
[storage]
root = "s3://bucket/prefix"

[[feeds]]
name = "spot"
exchange = "binance"
symbols = ["BTCUSDT"]
channels = ["trades"]
""")
    r = subprocess.run([sys.executable, "-m", "ingestd", "check", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 78, r.stdout + r.stderr
    assert "storage.local_dir" in r.stdout + r.stderr


def test_an_http_endpoint_without_allow_http_is_a_config_error(tmp_path: Path) -> None:
    cfg = tmp_path / "feeds.toml"
    cfg.write_text(f"""
[storage]
root = "s3://bucket/prefix"
local_dir = "{tmp_path / 'local'}"

[storage.options]
endpoint_url = "http://127.0.0.1:9"

[health]
listen = "127.0.0.1:0"

[[feeds]]
name = "spot"
exchange = "binance"
symbols = ["BTCUSDT"]
channels = ["trades"]
""")
    r = subprocess.run([sys.executable, "-m", "ingestd", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 78, r.stdout + r.stderr
    assert "allow_http" in r.stderr and "Traceback" not in r.stderr


def store_config(bucket: str, local: Path, endpoint: str) -> Config:
    return make_config(local, [{"name": "spot", "exchange": "binance",
                                "symbols": ["ZILUSDT"], "channels": ["trades"]}],
                       storage={"root": f"s3://{bucket}/{PREFIX}", "local_dir": str(local),
                                "options": {"endpoint_url": endpoint, "region": "us-east-1",
                                            "allow_http": True}})


def count_rows(fs: pafs.FileSystem, bucket: str, table: str) -> int:
    return read_s3_table(fs, bucket, table).height


def test_recovery_through_the_store_commits_each_row_once(
        s3_env: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    """A dead journal replayed while the store is down lands in the outbox; replaying it
    again skips every row (the pending files' footers), and again after the upload (the
    uploaded index): the bucket holds each row once."""
    from tests.test_journal import write_dead_journal

    server, bucket = s3_env, s3_bucket
    fs = server.filesystem()
    local = tmp_path / "local"
    journal = local / ".journal" / "deadbeef0001"
    n = write_dead_journal(journal, "json")
    shutil.copytree(journal, tmp_path / "copy")
    pub = ObjectStoreParquetPublisher(store_config(bucket, local, server.endpoint).storage,
                                      local, "live", retry_max_s=0.5)
    pub.open()
    try:
        server.kill()
        first = recover(local, "zstd", pub.staging_dir, publisher=pub)
        assert (first.rows_committed, first.rows_already_committed) == (n, 0)
        assert not journal.exists()
        assert pub.stats.files_waiting >= 1
        shutil.copytree(tmp_path / "copy", journal)   # as if it died before the delete
        second = recover(local, "zstd", pub.staging_dir, publisher=pub)
        assert (second.rows_committed, second.rows_already_committed) == (0, n)
        server.start()
        assert pub.wait_uploaded(60)
        assert pub.stats.state == "ok"
        shutil.copytree(tmp_path / "copy", journal)
        third = recover(local, "zstd", pub.staging_dir, publisher=pub)
        assert (third.rows_committed, third.rows_already_committed) == (0, n)
    finally:
        server.start()
        pub.close()
    assert count_rows(fs, bucket, "trades") == n


DEAD_PUBLISHER = """
import os, sys
from pathlib import Path
from ingestd.config import parse_config
from ingestd.schema import TradesBlock
from ingestd.sink.batcher import NS_PER_DAY, Batch, day_to_date
from ingestd.sink.objstore import ObjectStoreParquetPublisher

local, endpoint, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
cfg = parse_config({"storage": {"root": "s3://bucket/md/v1", "local_dir": str(local),
                    "options": {"endpoint_url": endpoint, "allow_http": True}},
                    "feeds": [{"name": "spot", "exchange": "binance", "symbols": ["ZILUSDT"],
                               "channels": ["trades"]}]})
pub = ObjectStoreParquetPublisher(cfg.storage, local, "deadinstance")
pub.open()
t0 = 1_700_000_000_000_000_000
block = TradesBlock()
for i in range(n):
    block.add("ZILUSDT", t0 + i, t0 + i, t0 + i, str(i), "buy", 0.1, 1.0)
pub.publish(Batch("trades", "binance", day_to_date(t0 // NS_PER_DAY), [block], n,
                  {"deadinstance/spot": [t0, t0 + n - 1]}, first_ts_recv_ns=t0))
print("published", flush=True)
os._exit(0)  # dies with its file pending: the store it was given never answers
"""


def test_a_dead_process_outbox_is_adopted_uploaded_and_pruned(
        s3_env: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    server, bucket = s3_env, s3_bucket
    fs = server.filesystem()
    local = tmp_path / "local"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-c", DEAD_PUBLISHER, str(local),
                        f"http://127.0.0.1:{closed_port}", "50"],
                       capture_output=True, text=True, timeout=60, check=False,
                       env={**os.environ, **server.env})
    assert r.returncode == 0 and "published" in r.stdout, r.stderr
    dead = local / OUTBOX_DIR / "deadinstance"
    (pending,) = dead.rglob(f"*{PENDING_SUFFIX}")
    # Recovery sees the dead process's committed rows while they wait.
    cov = OutboxCoverage(local / OUTBOX_DIR)
    day = 1_700_000_000_000_000_000 // NS_PER_DAY
    cov.load("trades", "binance", day, "deadinstance/", 1_700_000_000_000_000_000)
    assert cov.covers("deadinstance/spot", "trades", "binance", day,
                      1_700_000_000_000_000_010)
    # Written two hours ago: once uploaded, no journal on disk can need its coverage.
    old_s = time.time() - 7200
    os.utime(pending, (old_s, old_s))
    pub = ObjectStoreParquetPublisher(store_config(bucket, local, server.endpoint).storage,
                                      local, "live", prune_interval_s=0.05)
    pub.open()
    try:
        assert pub.wait_uploaded(60)
        deadline = time.monotonic() + 30
        while dead.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not dead.exists(), "the adopted outbox is removed once nothing needs it"
    finally:
        pub.close()
    names = [Path(i.path).name for i in objects(fs, bucket)]
    assert names == [pending.name.removesuffix(PENDING_SUFFIX)]
    assert count_rows(fs, bucket, "trades") == 50


def test_the_oldest_journal_time_bounds_the_index(tmp_path: Path) -> None:
    from tests.test_journal import write_dead_journal

    local = tmp_path / "local"
    assert oldest_journal_ns(local, {}, tmp_path) is None
    write_dead_journal(local / ".journal" / "deadbeef0001", "json")
    cache: dict[Path, int] = {}
    assert oldest_journal_ns(local, cache, tmp_path) == 1_700_000_000_000_000_000
    assert list(cache.values()) == [1_700_000_000_000_000_000]
    assert not list(tmp_path.glob("head-*"))  # the scratch copy is gone


BIG_PUBLISHER = """
import random, sys, time
from pathlib import Path
from ingestd.config import parse_config
from ingestd.schema import TradesBlock
from ingestd.sink.batcher import NS_PER_DAY, Batch, day_to_date
from ingestd.sink.objstore import ObjectStoreParquetPublisher

local, root, endpoint, n = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
cfg = parse_config({"storage": {"root": root, "local_dir": str(local), "compression": "none",
                    "options": {"endpoint_url": endpoint, "allow_http": True}},
                    "feeds": [{"name": "spot", "exchange": "binance", "symbols": ["ZILUSDT"],
                               "channels": ["trades"]}]})
rng = random.Random(7)
t0 = 1_700_000_000_000_000_000
block = TradesBlock()
for i in range(n):
    block.add("ZILUSDT", t0 + i, t0 + i, t0 + i, f"{rng.getrandbits(64):x}", "buy",
              rng.random(), rng.random())
pub = ObjectStoreParquetPublisher(cfg.storage, local, "bigwriter", uploaders=1)
pub.open()
pub.publish(Batch("trades", "binance", day_to_date(t0 // NS_PER_DAY), [block], n,
                  {"bigwriter/spot": [t0, t0 + n - 1]}, first_ts_recv_ns=t0))
print("published", flush=True)
time.sleep(600)  # uploading; the test kills this process
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("delay_ms", [0, 150, 400])
def test_kill_9_during_a_multipart_upload_never_leaves_a_partial_object(
        s3_env: S3Server, s3_bucket: str, tmp_path: Path, delay_ms: int) -> None:
    """A file bigger than one upload part (a multipart upload) whose uploader is killed
    -9 at some point of its upload: the object is absent or complete, never partial; the
    next owner uploads it under the same name, once."""
    server, bucket = s3_env, s3_bucket
    fs = server.filesystem()
    local = tmp_path / "local"
    n = 400_000
    proc = subprocess.Popen([sys.executable, "-c", BIG_PUBLISHER, str(local),
                             f"s3://{bucket}/{PREFIX}", server.endpoint, str(n)],
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **server.env})
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == "published":
                break
        else:
            raise AssertionError("the publisher ended before publishing")
        (pending,) = (local / OUTBOX_DIR).rglob(f"*{PENDING_SUFFIX}")
        size = pending.stat().st_size
        assert size > 12 * 1024 * 1024, "bigger than one part: a multipart upload"
        # Fault injection: the kill lands at a different point of the upload each time
        # (the 23 MB upload takes 0.6-1 s against SeaweedFS on loopback here).
        time.sleep(delay_ms / 1000)
    finally:
        proc.kill()
        proc.wait()
    for info in objects(fs, bucket):
        assert info.size == size, f"a partial object is visible: {info.size} of {size}"
    pub = ObjectStoreParquetPublisher(store_config(bucket, local, server.endpoint).storage,
                                      local, "next")
    pub.open()
    try:
        assert pub.wait_uploaded(120)
    finally:
        pub.close()
    listed = objects(fs, bucket)
    assert [Path(i.path).name for i in listed] == [pending.name.removesuffix(PENDING_SUFFIX)]
    assert listed[0].size == size
    assert count_rows(fs, bucket, "trades") == n
