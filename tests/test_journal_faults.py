"""A full disk at shutdown: the journal's close is bounded, says what it could not write,
and keeps the journal for the next start, which recovers what reached the disk.

The disk is a real 8 MiB tmpfs filled up until the kernel says ENOSPC, mounted in a user
namespace (`unshare -Urm`, as tests/test_disk_faults.py does): each scenario runs this
file as a script inside one. Skipped where the machine does not allow user namespaces.

    python tests/test_journal_faults.py SCENARIO WORKDIR   (prints a JSON summary last)
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHUTDOWN_TIMEOUT_S = 2.0


def _userns_unshare() -> str | None:
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    ok = subprocess.run([unshare, "-Urm", "true"], capture_output=True, timeout=30)
    return unshare if ok.returncode == 0 else None


def run_scenario(name: str, work: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run a scenario in its own user and mount namespace: (summary, log events)."""
    unshare = _userns_unshare()
    if unshare is None:
        pytest.skip("user namespaces (unshare -Urm) are not allowed here")
    r = subprocess.run([unshare, "-Urm", sys.executable, __file__, name, str(work)],
                       capture_output=True, text=True, timeout=180,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    return lines[-1], [e for e in lines[:-1] if "event" in e]


def test_close_on_a_full_disk_returns_within_its_bound(tmp_path: Path) -> None:
    """Writes fail with ENOSPC: close() gives up at its bound instead of retrying for
    ever, logs how many bytes it could not write, and leaves the journal in place; once
    space is back, recovery commits every frame that did reach the disk."""
    s, events = run_scenario("journal_close", tmp_path)
    assert s["write_failed"] and s["closed"]
    assert s["unwritten_bytes"] > 0 and s["unwritten_bytes"] == s["pending_bytes"]
    assert s["journal_kept"] and s["segments"] >= 1
    incomplete = [e for e in events if e["event"] == "journal_close_incomplete"]
    assert len(incomplete) == 1 and incomplete[0]["unwritten_bytes"] == s["unwritten_bytes"]
    # Recovered after the disk got space back: the durable frames, exactly once.
    assert s["recovered_rows"] == s["durable_trade_rows"] > 0
    assert s["trades_in_table"] == s["durable_trade_rows"]


def test_sigterm_on_a_full_disk_ends_within_shutdown_timeout(tmp_path: Path) -> None:
    """The daemon stops within `shutdown_timeout_s` although neither the writer nor the
    journal can write; it exits non-zero, reports the unwritten journal bytes and keeps
    the journal, which the next start recovers (every durable frame exactly once)."""
    from tests.test_journal import assert_exactly_once

    s, events = run_scenario("daemon_shutdown", tmp_path)
    assert s["degraded"] and s["stopped"]
    assert s["exit_code"] == 1
    assert s["journals_kept"] == 1
    incomplete = [e for e in events if e["event"] == "journal_close_incomplete"]
    assert len(incomplete) == 1 and incomplete[0]["unwritten_bytes"] > 0
    assert s["recovered_journals"] == 1 and s["restart_exit_code"] == 0
    durable = {int(k): v.encode() for k, v in s["durable"].items()}
    assert durable
    assert_exactly_once(tmp_path / "out", durable)


# ---- the scenarios (run inside the namespace) -------------------------------------------
def _mount_small_tmpfs(path: Path) -> None:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(path)], check=True)


def _fill(path: Path) -> int:
    """Write until the filesystem says ENOSPC; returns bytes written."""
    n = 0
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
                n += 65536
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    return n


async def _wait_for(cond: Callable[[], bool], timeout_s: float) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while loop.time() < end:
        if cond():
            return True
        await asyncio.sleep(0.02)
    return False


async def journal_close(work: Path) -> dict[str, Any]:
    from ingestd.clock import SYSTEM_CLOCK, SeqAllocator
    from ingestd.config import parse_config
    from ingestd.exchanges.binance import BinanceSpot
    from ingestd.sink.journal import Journal, iter_segments
    from ingestd.sink.parquet import Staging
    from ingestd.sink.recovery import recover
    from tests.support import read_table, recorded_frames
    from tests.test_journal import durable_frames

    data = work / "data"
    _mount_small_tmpfs(data)
    s: dict[str, Any] = {}
    cfg = parse_config({"storage": {"root": str(data)}, "feeds": [
        {"name": "spot", "exchange": "binance", "symbols": ["ZILUSDT", "DENTUSDT", "MANAUSDT"],
         "channels": ["trades"], "trade_stream": "aggTrade"}]}).feeds[0]
    journal = Journal(data, fsync_interval_s=0.02, clock=SYSTEM_CLOCK)
    journal.open()
    journal.start()
    seq = SeqAllocator()
    fid = journal.register(cfg, BinanceSpot(cfg), seq)
    frames = list(recorded_frames("binance_spot", "aggTrade.jsonl"))
    for i in range(0, 60, 3):
        ts = time.time_ns()
        journal.frames("spot", fid, ts, seq.take(ts, 3), frames[i:i + 3])
    await _wait_for(lambda: journal.stats.pending_bytes == 0, 10)
    _fill(data / "filler")
    # More frames than the disk takes (each read is real, the frames are padded out).
    for i in range(60, 145, 5):
        ts = time.time_ns()
        journal.frames("spot", fid, ts, seq.take(ts, len(frames[i:i + 5])),
                       [f + b" " * 20_000 for f in frames[i:i + 5]])
    s["write_failed"] = await _wait_for(lambda: not journal.stats.healthy, 10)
    s["pending_bytes"] = journal.stats.pending_bytes
    # Unbounded, this would never return while the disk stays full.
    s["unwritten_bytes"] = await asyncio.wait_for(
        journal.close(removable=True, timeout_s=0.5), 30)
    s["closed"] = True
    # An attempt started before the bound may still be running (a process's exit waits
    # for it): what the disk holds is known once it is over.
    await _wait_for(lambda: not journal.writing, 10)
    s["journal_kept"] = journal.dir.is_dir()
    s["segments"] = len(iter_segments(journal.dir))
    durable = durable_frames(data)
    s["durable_trade_rows"] = sum(1 for f in durable.values()
                                  if json.loads(f)["data"]["s"] in cfg.symbols)
    (data / "filler").unlink()
    staging = Staging(data)
    staging.open()
    result = recover(data, "zstd", staging.path)
    staging.close()
    s["recovered_rows"] = result.rows_committed  # trades only: the feed has no other table
    s["trades_in_table"] = read_table(data, "trades").height
    return s


async def daemon_shutdown(work: Path) -> dict[str, Any]:
    from ingestd.daemon import Daemon
    from ingestd.sim import SimServer
    from tests.support import feed_for, make_config, run_daemon
    from tests.test_journal import durable_frames

    data = work / "data"
    _mount_small_tmpfs(data)
    s: dict[str, Any] = {}
    async with SimServer("binance", rate_msgs_s=150, live=True) as sim:
        feed = feed_for(sim, symbols=["ZILUSDT", "DENTUSDT", "MANAUSDT", "NKNUSDT", "LRCBTC"],
                        channels=["trades", "quotes"], trade_stream="aggTrade")
        cfg = make_config(data, [feed], storage={"flush_interval_s": 0.1},
                          journal={"fsync_interval_s": 0.05, "max_pending_bytes": 20_000},
                          service={"shutdown_timeout_s": SHUTDOWN_TIMEOUT_S},
                          log={"level": "info", "format": "json"})
        daemon = Daemon(cfg)
        task = asyncio.create_task(daemon.run(install_signals=False))
        ws = daemon.writer_stats
        journal = daemon.journal
        assert journal is not None
        await _wait_for(lambda: ws.files_written >= 2, 10)
        _fill(data / "filler")
        s["degraded"] = await _wait_for(lambda: not ws.healthy and journal.full, 10)
        daemon.request_stop("disk full")
        # Unbounded, this would never return while the disk stays full.
        s["exit_code"] = await asyncio.wait_for(task, SHUTDOWN_TIMEOUT_S + 5.0)
        s["stopped"] = True
        await _wait_for(lambda: not journal.writing, 10)
        s["journals_kept"] = sum(1 for _ in (data / ".journal").iterdir())
        s["durable"] = {str(k): v.decode() for k, v in durable_frames(data).items()}
        (data / "filler").unlink()
        # The next start recovers the kept journal, then streams on.
        restarted = await run_daemon(cfg, lambda d: d.state == "ok", timeout_s=30)
        assert restarted.recovery is not None
        s["recovered_journals"] = restarted.recovery.journals
        s["restart_exit_code"] = restarted.exit_code
    shutil.copytree(data, work / "out")
    return s


SCENARIOS = {"journal_close": journal_close, "daemon_shutdown": daemon_shutdown}

if __name__ == "__main__":
    from ingestd.logs import configure

    configure("info", "json")
    summary = asyncio.run(SCENARIOS[sys.argv[1]](Path(sys.argv[2])))
    print(json.dumps(summary))
