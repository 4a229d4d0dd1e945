"""Raw frames kept (`[journal] keep_raw_days`) and `ingestd replay`: exact re-derivation.

The live run is the real daemon against the simulators (Binance with REST book snapshots,
OKX with checksummed books), segments rotating every half second so that retention moves
committed segments to `<root>/.raw/` while it runs. Replay must give back every table
exactly; a codec fix passed through replay's `codecs` hook changes exactly the rows it
should; the live root is never touched.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from ingestd.exchanges.base import Output
from ingestd.exchanges.binance import BinanceSpot
from ingestd.replay import ReplayError, kept_journals, replay
from ingestd.schema import TABLES
from ingestd.sim import SimServer
from ingestd.sink.journal import RAW_DIR, Journal, iter_segments, prune_raw
from ingestd.sink.parquet import Staging
from ingestd.sink.recovery import recover
from tests.support import feed_for, make_config, read_table, run_daemon
from tests.test_journal import write_dead_journal

BINANCE_SYMBOLS = ["NKNUSDT", "BLZETH", "ZILUSDT", "DENTUSDT", "MANAUSDT"]
FLIPPED = "ZILUSDT"


@dataclass
class LiveRun:
    root: Path
    config: Path
    tables: dict[str, pl.DataFrame]
    files: dict[str, tuple[int, int]]     # every file under the root: (size, mtime_ns)


def ingestd_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The real command line in its own process (its logging set-up stays there)."""
    return subprocess.run([sys.executable, "-m", "ingestd", *args], capture_output=True,
                          text=True, timeout=60)


def tree(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for p in root.rglob("*"):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def table(root: Path, name: str) -> pl.DataFrame:
    """A table's rows in one canonical order (file names and row order do not matter)."""
    df = read_table(root, name)
    return df.sort(df.columns, nulls_last=True) if df.height else df


def all_tables(root: Path) -> dict[str, pl.DataFrame]:
    return {t: table(root, t) for t in TABLES}


async def _live_run(base: Path) -> LiveRun:
    root = base / "live"
    async with SimServer("binance", rate_msgs_s=300, live=True) as binance, \
            SimServer("okx", rate_msgs_s=300, live=True) as okx:
        feeds = [
            feed_for(binance, name="spot", symbols=BINANCE_SYMBOLS,
                     channels=["trades", "quotes", "book"], trade_stream="aggTrade"),
            feed_for(okx, name="okx", symbols=["BTC-USDT", "BTC-USD-220527", "UNI-USD-SWAP"],
                     channels=["trades", "quotes", "book"]),
        ]
        cfg = make_config(root, feeds, storage={"flush_interval_s": 0.2},
                          journal={"fsync_interval_s": 0.05, "segment_max_s": 0.5,
                                   "keep_raw_days": 1})
        config = base / "live.toml"
        config.write_text(
            f'[storage]\nroot = "{root}"\n[journal]\nkeep_raw_days = 1\n[log]\n'
            'level = "warning"\n[[feeds]]\nname = "x"\nexchange = "binance"\n'
            'symbols = ["ZILUSDT"]\nchannels = ["trades"]\n')

        def done(d: Any) -> bool:
            js = d.journal.stats
            return (binance.timeline_done and okx.timeline_done and js.segments_deleted >= 2
                    and sum(d.writer_stats.rows_written.values()) > 0)

        daemon = await run_daemon(cfg, done, timeout_s=60, settle_s=0.5)
    assert daemon.journal is not None and daemon.journal.stats.raw_kept_bytes > 0
    return LiveRun(root, config, all_tables(root), tree(root))


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> LiveRun:
    return asyncio.run(_live_run(tmp_path_factory.mktemp("replay")))


def test_committed_segments_are_kept_not_deleted(live: LiveRun) -> None:
    assert not any((live.root / ".journal").iterdir()), "a clean stop leaves no journal"
    ((_instance, segments),) = kept_journals(live.root)
    assert len(segments) >= 3
    numbers = [int(p.stem.split("-")[1]) for p in segments]
    assert numbers == list(range(1, len(segments) + 1)), "every segment is kept, in order"
    assert all(t.height for name, t in live.tables.items()
               if name in ("trades", "quotes", "book", "events"))


def test_replay_gives_back_every_table_exactly(live: LiveRun, tmp_path: Path) -> None:
    out = tmp_path / "replayed"
    progress: list[int] = []
    r = replay(live.root, out, progress=lambda p: progress.append(p.segments_done))
    assert r.segments == len(kept_journals(live.root)[0][1]) and r.unreadable_checkpoints == 0
    assert progress == list(range(1, r.segments + 1))
    for name, live_rows in live.tables.items():
        assert table(out, name).equals(live_rows), name
    assert tree(live.root) == live.files, "replay changed something under the live root"


class ZilSideFixed(BinanceSpot):
    """A codec "fix" for the test: the taker side of one symbol's trades was inverted."""

    def parse_batch(self, frames: Sequence[bytes | str], ts_recv_ns: int,
                    first_seq: int) -> Output:
        out = super().parse_batch(frames, ts_recv_ns, first_seq)
        t = out.trades
        if t is not None:
            for i, symbol in enumerate(t.symbol):
                if symbol == FLIPPED:
                    t.side[i] = {"buy": "sell", "sell": "buy"}.get(t.side[i], t.side[i])
        return out


def test_a_codec_fix_changes_exactly_the_affected_rows(live: LiveRun, tmp_path: Path) -> None:
    out = tmp_path / "fixed"
    replay(live.root, out, codecs={"binance": ZilSideFixed})
    for name, live_rows in live.tables.items():
        if name != "trades":
            assert table(out, name).equals(live_rows), name
    before = live.tables["trades"]
    after = table(out, "trades")
    assert after.height == before.height
    keys = ["exchange", "symbol", "recv_seq", "trade_id"]
    joined = before.join(after, on=keys, how="inner", suffix="_replayed")
    assert joined.height == before.height
    changed = joined.filter(pl.col("side") != pl.col("side_replayed"))
    flipped = before.filter((pl.col("symbol") == FLIPPED) & (pl.col("side") != "unknown"))
    assert changed.height == flipped.height > 0
    assert set(changed["symbol"]) == {FLIPPED}
    others = [c for c in before.columns if c not in keys and c != "side"]
    assert joined.select(others).equals(
        joined.select([pl.col(f"{c}_replayed").alias(c) for c in others]))


def test_replay_command_with_a_window(live: LiveRun, tmp_path: Path) -> None:
    """`ingestd replay --since --until`: the rows received in the window, exactly."""
    from datetime import UTC, datetime

    seqs = live.tables["trades"].sort("ts_recv")["ts_recv"]
    since, until = seqs[len(seqs) // 4], seqs[3 * len(seqs) // 4]

    def iso(ts: Any) -> str:
        return ts.astimezone(UTC).isoformat() if isinstance(ts, datetime) else str(ts)

    out = tmp_path / "window"
    r = ingestd_cli("replay", "--config", str(live.config), "--out", str(out),
                    "--since", iso(since), "--until", iso(until))
    assert r.returncode == 0, r.stderr
    assert "replay [" not in r.stderr  # no progress line when stderr is not a terminal
    for name, live_rows in live.tables.items():
        if not live_rows.height:
            continue
        want = live_rows.filter((pl.col("ts_recv") >= since) & (pl.col("ts_recv") < until))
        got = table(out, name)
        assert got.equals(want) if want.height else got.height == 0, name
    assert tree(live.root) == live.files


def test_replay_refuses_the_live_root(live: LiveRun, tmp_path: Path) -> None:
    with pytest.raises(ReplayError):
        replay(live.root, live.root / "replayed")
    with pytest.raises(ReplayError):
        replay(live.root, live.root)
    r = ingestd_cli("replay", "--config", str(live.config), "--out", str(live.root / "x"))
    assert r.returncode == 78 and "inside the live root" in r.stderr
    assert tree(live.root) == live.files


def test_recovered_journals_are_kept_as_raw_frames(tmp_path: Path) -> None:
    """After a crash, the recovered journal's segments join the raw frames (else replay
    would miss what the dead process received)."""
    root = tmp_path / "data"
    write_dead_journal(root / ".journal" / "deadbeef0001", "json")
    staging = Staging(root)
    staging.open()
    result = recover(root, "zstd", staging.path, keep_raw=True)
    staging.close()
    assert result.raw_segments_kept == 1
    assert [name for name, _ in kept_journals(root)] == ["deadbeef0001"]
    out = tmp_path / "replayed"
    replay(root, out)
    assert table(out, "trades").equals(table(root, "trades"))


def test_raw_frames_are_pruned_by_age_then_size(tmp_path: Path) -> None:
    root = tmp_path / "data"
    now_ns = 1_800_000_000_000_000_000
    day_ns = 86_400 * 1_000_000_000
    sizes = {}
    for inst, ages_h in (("a", (50, 30, 20)), ("b", (10, 5, 1))):
        d = root / RAW_DIR / inst
        d.mkdir(parents=True)
        for i, age_h in enumerate(ages_h, 1):
            p = d / f"seg-{i:08d}.wal"
            p.write_bytes(b"x" * 1000)
            t = now_ns - age_h * 3600 * 1_000_000_000
            os.utime(p, ns=(t, t))
            sizes[p] = 1000
    # One day: the two older than 24 h go; then the cap leaves the newest three.
    r = prune_raw(root, now_ns=now_ns, keep_s=86_400, max_bytes=3500)
    assert (r.deleted_segments, r.kept_segments, r.kept_bytes) == (3, 3, 3000)
    left = sorted(str(p.relative_to(root / RAW_DIR)) for p in (root / RAW_DIR).rglob("*.wal"))
    assert left == ["b/seg-00000001.wal", "b/seg-00000002.wal", "b/seg-00000003.wal"]
    assert not (root / RAW_DIR / "a").exists()
    assert prune_raw(root, now_ns=now_ns + 2 * day_ns, keep_s=86_400,
                     max_bytes=0).kept_segments == 0


async def test_the_journal_counts_what_it_keeps_and_prunes(tmp_path: Path) -> None:
    """The daemon's journal moves retired segments to the raw area and prunes it on its
    injected clock: the stats say how much is kept and how many segments were deleted."""
    from ingestd.clock import SeqAllocator
    from ingestd.config import parse_config

    class Clock:
        def __init__(self) -> None:
            self.wall_ns = 0

        def time_ns(self) -> int:
            return time.time_ns() + self.wall_ns

        def monotonic(self) -> float:
            return asyncio.get_running_loop().time() + self.wall_ns / 1e9

    clock = Clock()
    j = Journal(tmp_path, fsync_interval_s=0.02, clock=clock, segment_max_s=3600,
                keep_raw_s=86_400.0, keep_raw_max_bytes=10**9)
    j.open()
    j.start()
    cfg = parse_config({"storage": {"root": str(tmp_path)}, "feeds": [
        {"name": "f", "exchange": "binance", "symbols": ["BTCUSDT"], "channels": ["trades"]}]})
    j.register(cfg.feeds[0], BinanceSpot(cfg.feeds[0]), SeqAllocator())
    for _ in range(2):
        before = len(iter_segments(j.dir))
        clock.wall_ns += 7200 * 1_000_000_000  # segment_max_s passed: the flush loop rotates
        for _ in range(500):
            if len(iter_segments(j.dir)) > before:
                break
            await asyncio.sleep(0.01)
    await j.delete_segments(j.deletable({}))
    assert j.stats.segments_deleted == 2
    await j.prune_raw()
    assert j.stats.raw_kept_segments == 2 and j.stats.raw_kept_bytes > 0
    assert j.stats.raw_deleted == 0
    clock.wall_ns += 3 * 86_400 * 1_000_000_000
    await j.prune_raw(force=True)
    assert (j.stats.raw_deleted, j.stats.raw_kept_segments, j.stats.raw_kept_bytes) == (2, 0, 0)
    # What /metrics says of it.
    from ingestd.metrics import exposition, registry_for
    from ingestd.stats import QueueStats, WriterStats, daemon_snapshot

    text = exposition(registry_for(lambda: daemon_snapshot(
        state="ok", now_mono=0.0, loop_lag_s=0.0, loop_lag_max_s=0.0, feeds=[],
        queue=QueueStats(1), writer=WriterStats(), journal=j.stats))).decode()
    assert "ingestd_raw_kept_bytes 0.0" in text and "ingestd_raw_deleted_total 2.0" in text
    await j.close(removable=True)  # the current segment joins the raw frames
    assert j.stats.raw_kept_bytes > 0 and kept_journals(tmp_path)


def test_progress_is_a_line_on_a_terminal_and_nothing_otherwise() -> None:
    import io

    from ingestd.replay import Progress, terminal_progress

    assert terminal_progress(io.StringIO()) is None
    primary, secondary = os.openpty()
    with os.fdopen(secondary, "w") as tty:
        show = terminal_progress(tty)
        assert show is not None
        show(Progress(1, 2, 10))
        show(Progress(2, 2, 25))
    text = ""
    while True:  # everything written, until the closed terminal reads as EOF (EIO)
        try:
            chunk = os.read(primary, 4096)
        except OSError:
            break
        if not chunk:
            break
        text += chunk.decode()
    os.close(primary)
    assert text.count("\rreplay") == 2 and "1/2 segments, 10 rows" in text
    assert text.rstrip().endswith("2/2 segments, 25 rows")
