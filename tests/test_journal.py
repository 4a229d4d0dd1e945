"""Nothing received is ever lost: the journal, crash recovery and exactly-once replay."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from ingestd.sim import SimServer
from ingestd.sink.journal import (
    FRAME,
    FRAMES,
    Journal,
    encode,
    iter_segments,
    read_segment,
)
from ingestd.sink.parquet import Staging
from ingestd.sink.recovery import recover
from tests.support import read_table

CONFIG = """
[storage]
root = "{root}"
flush_interval_s = {flush}

[journal]
fsync_interval_s = 0.05
segment_max_s = {segment_s}

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


def test_record_roundtrip_and_torn_tail(tmp_path: Path) -> None:
    seg = tmp_path / "seg-00000001.wal"
    recs = [encode(FRAME, b"\x01\x00" + (5).to_bytes(8, "little") + (7).to_bytes(8, "little")
                   + b'{"x":1}') for _ in range(3)]
    seg.write_bytes(b"".join(recs))
    records, end, torn = read_segment(seg)
    assert len(records) == 3 and not torn and end == seg.stat().st_size
    assert records[0].ts == 5 and records[0].seq == 7 and records[0].data == b'{"x":1}'
    # A torn tail (half a record) and a corrupted record both end the valid part.
    seg.write_bytes(b"".join(recs) + recs[0][:9])
    assert read_segment(seg)[0:3:2] == (records, True)
    flipped = bytearray(b"".join(recs))
    flipped[len(recs[0]) + 12] ^= 0xFF
    seg.write_bytes(bytes(flipped))
    got, end, torn = read_segment(seg)
    assert len(got) == 1 and torn and end == len(recs[0])


async def _start(cfg: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ingestd", "--config", str(cfg),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})


async def _read_until_event(proc: asyncio.subprocess.Process, event: str) -> bytes:
    """The daemon's stdout up to and including its log line `event`."""
    assert proc.stdout is not None
    seen = b""
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line, f"the daemon ended before logging {event}"
        seen += line
        if line.startswith(b"{") and json.loads(line).get("event") == event:
            return seen


def durable_frames(root: Path) -> dict[int, bytes]:
    """recv_seq -> frame of every frame record a dead process made durable."""
    out: dict[int, bytes] = {}
    for d in (root / ".journal").iterdir():
        for seg in iter_segments(d):
            for rec in read_segment(seg)[0]:
                if rec.kind == FRAME:
                    out[rec.seq] = rec.data
                elif rec.kind == FRAMES:
                    assert rec.frames is not None
                    for i, frame in enumerate(rec.frames):
                        out[rec.seq + i] = frame
    return out


def assert_exactly_once(root: Path, durable: dict[int, bytes]) -> None:
    trades, quotes, book = (read_table(root, t) for t in ("trades", "quotes", "book"))
    trade_seqs = Counter(trades["recv_seq"].to_list())
    quote_seqs = Counter(quotes["recv_seq"].to_list())
    assert max(trade_seqs.values()) == 1 and max(quote_seqs.values()) == 1
    ids = list(zip(trades["symbol"], trades["trade_id"], strict=True))
    assert len(ids) == len(set(ids)), "a trade is stored twice"
    for seq, frame in durable.items():
        data = json.loads(frame).get("data", {})
        if data.get("e") == "aggTrade":
            assert trade_seqs[seq] == 1, f"journaled trade {data['a']} missing"
        elif "b" in data and "A" in data:
            assert quote_seqs[seq] == 1, f"journaled quote {data['u']} missing"
    if book.height:
        levels = list(zip(book["recv_seq"], book["side"], book["price"], strict=True))
        assert len(levels) == len(set(levels)), "a book row is stored twice"
    for f in root.glob("*/exchange=*/date=*/*.parquet"):
        pq.read_table(f)  # every visible file is complete and readable
    assert not [p for p in root.rglob("*.parquet") if ".staging" in p.parts]


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
async def test_kill_9_then_restart_loses_nothing_journaled(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    root = tmp_path / "data"
    async with SimServer("binance", rate_msgs_s=250, live=True) as sim:
        cfg = tmp_path / "feeds.toml"
        # Some runs commit often (recovery must skip what is committed), some never.
        flush = rng.choice([0.1, 0.3, 60.0])
        cfg.write_text(CONFIG.format(root=root, url=sim.url, rest=sim.rest_url, flush=flush,
                                     segment_s=rng.choice([0.2, 300])))
        proc = await _start(cfg)
        target = rng.randint(40, 300)
        for _ in range(1000):
            if len(sim.sent) >= target:
                break
            await asyncio.sleep(0.005)
        await asyncio.sleep(rng.random() * 0.05)
        proc.kill()
        await proc.wait()
        durable = durable_frames(root)
        assert durable, "the journal holds the frames received before the crash"
        # Restart: recovery, then normal streaming until the venue's timeline ends.
        proc2 = await _start(cfg)
        head = await _read_until_event(proc2, "starting")  # its signal handlers are set
        for _ in range(2000):
            if sim.timeline_done:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
        proc2.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc2.communicate(), 30)
    assert proc2.returncode == 0, err.decode()
    logs = [json.loads(x) for x in (head + out).decode().splitlines() if x.startswith("{")]
    recovered = [e for e in logs if e["event"] == "recovered_from_journal"]
    assert len(recovered) == 1 and recovered[0]["journals"] == 1
    assert_exactly_once(root, durable)
    # A clean shutdown leaves no journal behind; the dead one was adopted and removed.
    assert not any((root / ".journal").iterdir())


def write_dead_journal(journal_dir: Path, checkpoint: str = "pickle") -> int:
    """A journal as a crashed process would leave it: feed table, checkpoint, a connect,
    then the recorded aggTrade frames (ids, seqs and receive times as if just received)."""
    import pickle
    import struct

    import msgspec
    import orjson

    from ingestd.config import parse_config
    from ingestd.exchanges.binance import BinanceSpot
    from ingestd.sink.journal import CHECKPOINT, CONNECT, FEED
    from tests.support import recorded_frames

    cfg = parse_config({"storage": {"root": "/x"}, "feeds": [
        {"name": "spot", "exchange": "binance", "symbols": ["ZILUSDT", "DENTUSDT", "MANAUSDT"],
         "channels": ["trades"], "trade_stream": "aggTrade"}]}).feeds[0]
    info = orjson.dumps({"name": "spot", "exchange": "binance",
                         "config": msgspec.to_builtins(cfg)})
    state = {
        # What a journal of the previous version holds: the pickled codec object.
        "pickle": pickle.dumps(BinanceSpot(cfg)),
        "json": orjson.dumps(BinanceSpot(cfg).state()),
        "future": orjson.dumps({**BinanceSpot(cfg).state(), "v": 999}),
        "corrupt": b'{"v": 1, "exchange": "binance", "parts": {"trades": {"ints": 5}}}',
    }[checkpoint]
    parts = [encode(FEED, struct.pack("<H", 1) + info),
             encode(CHECKPOINT, struct.pack("<Hq", 1, 0) + state),
             encode(CONNECT, struct.pack("<Hq", 1, 1_700_000_000_000_000_000))]
    frames = recorded_frames("binance_spot", "aggTrade.jsonl")
    for i, frame in enumerate(frames):
        ts = 1_700_000_000_000_000_000 + i * 1_000_000
        parts.append(encode(FRAME, struct.pack("<Hqq", 1, ts, ts) + frame))
    journal_dir.mkdir(parents=True)
    (journal_dir / "seg-00000001.wal").write_bytes(b"".join(parts))
    return sum(1 for f in frames if orjson.loads(f)["data"]["s"] in cfg.symbols)


@pytest.mark.parametrize("checkpoint", ["pickle", "json", "future", "corrupt"])
def test_an_unreadable_checkpoint_never_stops_recovery(tmp_path: Path,
                                                       checkpoint: str) -> None:
    """A journal left by an older version (pickled codec), a newer one or a corrupt one:
    recovery logs it, replays every frame with a fresh codec and commits the rows."""
    root = tmp_path / "data"
    n = write_dead_journal(root / ".journal" / "deadbeef0001", checkpoint)
    staging = Staging(root)
    staging.open()
    result = recover(root, "zstd", staging.path)
    staging.close()
    assert result.rows_committed == n and result.journals == 1
    assert result.unreadable_checkpoints == (0 if checkpoint == "json" else 1)
    assert read_table(root, "trades").height == n
    assert not (root / ".journal" / "deadbeef0001").exists()


def test_a_journal_that_cannot_be_replayed_is_set_aside_not_fatal(tmp_path: Path) -> None:
    """Recovery never crash-loops the daemon: a journal it cannot replay at all is moved
    to .journal-failed/ (kept for inspection) and the others are still recovered."""
    root = tmp_path / "data"
    n = write_dead_journal(root / ".journal" / "aaaa00000001", "json")
    bad = root / ".journal" / "bbbb00000002"
    (bad / "seg-00000001.wal").mkdir(parents=True)   # unreadable as a file
    staging = Staging(root)
    staging.open()
    result = recover(root, "zstd", staging.path)
    staging.close()
    assert result.failed_journals == 1 and result.rows_committed == n
    assert (root / ".journal-failed" / "bbbb00000002").is_dir()
    assert not bad.exists()


def test_recovery_is_idempotent_and_truncates_torn_tails(tmp_path: Path) -> None:
    """Replaying the same journal twice commits its rows once; a torn tail is cut off."""
    root = tmp_path / "data"
    dead = root / ".journal" / "deadbeef0001"
    n = write_dead_journal(dead)
    seg = iter_segments(dead)[-1]
    with open(seg, "ab") as f:
        f.write(b"\x12\x34\x56")  # a torn record header
    keep = tmp_path / "copy"
    shutil.copytree(dead, keep)
    staging = Staging(root)
    staging.open()
    first = recover(root, "zstd", staging.path)
    assert first.journals == 1 and first.torn_segments == 1
    assert read_table(root, "trades").height == n == first.rows_committed
    assert not dead.exists()
    # The same journal again (as if the first recovery died before deleting it).
    shutil.copytree(keep, dead)
    second = recover(root, "zstd", staging.path)
    assert second.rows_committed == 0 and second.rows_already_committed == n
    assert read_table(root, "trades").height == n
    # The replayed codec carries the trade-id watermarks forward to the live feed.
    state = second.feeds["spot"]
    assert state.last_seq == 1_700_000_000_000_000_000 + 149 * 1_000_000
    staging.close()


async def test_journal_makes_frames_durable_within_the_interval(tmp_path: Path) -> None:
    class Clock:
        def time_ns(self) -> int:
            return 1_700_000_000_000_000_000

        def monotonic(self) -> float:
            return asyncio.get_running_loop().time()

    j = Journal(tmp_path, fsync_interval_s=0.05, clock=Clock())
    j.open()
    j.start()
    from ingestd.clock import SeqAllocator
    from ingestd.config import parse_config
    from ingestd.exchanges.binance import BinanceSpot
    cfg = parse_config({"storage": {"root": str(tmp_path)}, "feeds": [
        {"name": "f", "exchange": "binance", "symbols": ["BTCUSDT"], "channels": ["trades"]}]})
    fid = j.register(cfg.feeds[0], BinanceSpot(cfg.feeds[0]), SeqAllocator())
    j.frame("f", fid, 1, 2, b"hello")
    for _ in range(100):
        await asyncio.sleep(0.01)
        if j.stats.pending_bytes == 0:
            break
    assert j.stats.pending_bytes == 0 and j.stats.fsyncs >= 1
    recs = [r for seg in iter_segments(j.dir) for r in read_segment(seg)[0]]
    assert [r.data for r in recs if r.kind == FRAME] == [b"hello"]
    await j.close(removable=True)
    assert not j.dir.exists()


def _commit_journal_rows_as_one_old_batch(root: Path, staging: Path, n_frames: int) -> int:
    """A file as a writer commits it after holding a batch through a long outage: its
    first row was received two hours before the journal's oldest record (so its name says
    "two hours old"), the rest are the rows of the journal's first `n_frames` frames.
    Returns how many of the journal's rows it holds."""
    from ingestd.config import parse_config
    from ingestd.exchanges.binance import BinanceSpot
    from ingestd.schema import TradesBlock
    from ingestd.sink.batcher import NS_PER_DAY, Batch, day_to_date
    from ingestd.sink.parquet import commit
    from tests.support import recorded_frames

    cfg = parse_config({"storage": {"root": "/x"}, "feeds": [
        {"name": "spot", "exchange": "binance", "symbols": ["ZILUSDT", "DENTUSDT", "MANAUSDT"],
         "channels": ["trades"], "trade_stream": "aggTrade"}]}).feeds[0]
    codec = BinanceSpot(cfg)
    t0 = 1_700_000_000_000_000_000
    old = TradesBlock()
    old_ts = t0 - 2 * 3600 * 1_000_000_000
    old.add("ZILUSDT", old_ts, old_ts, old_ts, "1", "buy", 0.1, 1.0)
    blocks: list[Any] = [old]
    rows = 0
    for i, frame in enumerate(recorded_frames("binance_spot", "aggTrade.jsonl")[:n_frames]):
        ts = t0 + i * 1_000_000
        out = codec.parse(frame, ts, ts)
        if out.trades is not None:
            blocks.append(out.trades)
            rows += len(out.trades)
    last = t0 + (n_frames - 1) * 1_000_000
    assert old_ts // NS_PER_DAY == t0 // NS_PER_DAY  # one partition
    batch = Batch("trades", "binance", day_to_date(t0 // NS_PER_DAY), blocks, rows + 1,
                  {"deadbeef0001/spot": [old_ts, last]}, first_ts_recv_ns=old_ts)
    commit(root, staging, batch)
    return rows


def test_recovery_skips_rows_of_a_file_spanning_more_than_an_hour(tmp_path: Path) -> None:
    """A committed file whose first ts_recv (its name) is hours older than the journal
    still holds journaled rows: recovery must see them (not commit them twice)."""
    root = tmp_path / "data"
    n = write_dead_journal(root / ".journal" / "deadbeef0001", "json")
    staging = Staging(root)
    staging.open()
    held = _commit_journal_rows_as_one_old_batch(root, staging.path, 40)
    assert 0 < held < n
    result = recover(root, "zstd", staging.path)
    staging.close()
    assert (result.rows_already_committed, result.rows_committed) == (held, n - held)
    trades = read_table(root, "trades")
    assert trades.height == n + 1
    ids = list(zip(trades["symbol"], trades["trade_id"], strict=True))
    assert len(ids) == len(set(ids)), "a trade is stored twice"


def test_recovery_reads_only_files_written_since_the_journal_began(tmp_path: Path) -> None:
    """The cheap filter that stays: a file last written (mtime) more than the margin
    before the journal's oldest record cannot hold its rows, and is not even opened."""
    from ingestd.sink.recovery import FILE_AGE_MARGIN_NS

    root = tmp_path / "data"
    n = write_dead_journal(root / ".journal" / "deadbeef0001", "json")
    part = root / "trades" / "exchange=binance" / "date=2023-11-14"
    part.mkdir(parents=True)
    t0 = 1_700_000_000_000_000_000
    for i in range(3):  # not Parquet at all: reading one would log an error
        old = part / f"{t0:019d}-old{i}.parquet"
        old.write_bytes(b"not parquet")
        before = t0 - FILE_AGE_MARGIN_NS - 1_000_000_000
        os.utime(old, ns=(before, before))
    staging = Staging(root)
    staging.open()
    result = recover(root, "zstd", staging.path)
    staging.close()
    assert result.rows_committed == n and result.coverage_files_read == 0


def test_a_feed_changed_by_a_reload_replays_from_its_own_checkpoint(tmp_path: Path) -> None:
    """A reload re-registers a changed feed under a new id with a checkpoint carrying its
    trade de-duplication state. In a later segment than the first, replay must still seed
    the new id from it: the trades the venue replays on the new connection are not
    committed again."""
    import struct

    import msgspec
    import orjson

    from ingestd.config import parse_config
    from ingestd.exchanges.binance import BinanceSpot
    from ingestd.sink.journal import CHECKPOINT, CONNECT, FEED
    from tests.support import recorded_frames

    cfg = parse_config({"storage": {"root": "/x"}, "feeds": [
        {"name": "spot", "exchange": "binance", "symbols": ["ZILUSDT", "DENTUSDT", "MANAUSDT"],
         "channels": ["trades"], "trade_stream": "aggTrade"}]}).feeds[0]
    info = orjson.dumps({"name": "spot", "exchange": "binance",
                         "config": msgspec.to_builtins(cfg)})
    frames = recorded_frames("binance_spot", "aggTrade.jsonl")[:60]
    t0 = 1_700_000_000_000_000_000
    live = BinanceSpot(cfg)

    def head(fid: int, codec: BinanceSpot, last_seq: int) -> list[bytes]:
        return [encode(FEED, struct.pack("<H", fid) + info),
                encode(CHECKPOINT, struct.pack("<Hq", fid, last_seq)
                       + orjson.dumps(codec.state()))]

    def stream(fid: int, codec: BinanceSpot, start: int) -> tuple[list[bytes], int]:
        parts = [encode(CONNECT, struct.pack("<Hq", fid, start))]
        rows = 0
        for i, frame in enumerate(frames):
            ts = start + i * 1_000_000
            out = codec.parse(frame, ts, ts)  # what the live feed stored
            rows += len(out.trades) if out.trades is not None else 0
            parts.append(encode(FRAME, struct.pack("<Hqq", fid, ts, ts) + frame))
        return parts, rows

    seg1 = head(1, live, 0)
    parts, rows_before = stream(1, live, t0)
    seg1 += parts
    # A new segment (feed 1 checkpointed), then the reload: feed 2 carries feed 1's state
    # and its new connection gets the same recent trades again.
    t1 = t0 + 10**12
    seg2 = head(1, live, t0 + 10**11) + head(2, live, t0 + 10**11)
    parts, rows_after = stream(2, live, t1)
    seg2 += parts
    assert rows_before > 0 and rows_after == 0  # the live codec stored nothing twice
    dead = tmp_path / "data" / ".journal" / "deadbeef0001"
    dead.mkdir(parents=True)
    (dead / "seg-00000001.wal").write_bytes(b"".join(seg1))
    (dead / "seg-00000002.wal").write_bytes(b"".join(seg2))
    root = tmp_path / "data"
    staging = Staging(root)
    staging.open()
    result = recover(root, "zstd", staging.path)
    staging.close()
    assert result.unreadable_checkpoints == 0
    assert result.rows_committed == rows_before
    assert read_table(root, "trades").height == rows_before
