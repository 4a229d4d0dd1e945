"""Run inside `unshare -Urm` by test_disk_faults.py: the output root is a tiny tmpfs that
fills up mid-stream (real ENOSPC from the kernel), then gets space back.

Usage: python tests/enospc_scenario.py WORKDIR   (prints a JSON summary on stdout)
"""

from __future__ import annotations

import asyncio
import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ingestd.daemon import Daemon
from ingestd.sim import SimServer
from tests.support import feed_for, make_config


def fill(path: Path) -> int:
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


async def wait_for(cond, timeout_s: float) -> bool:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while loop.time() < end:
        if cond():
            return True
        await asyncio.sleep(0.02)
    return False


async def main(work: Path) -> dict[str, object]:
    data = work / "data"
    data.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(data)], check=True)
    summary: dict[str, object] = {}
    async with SimServer("binance", rate_msgs_s=150, live=True) as sim:
        feed = feed_for(sim, symbols=["ZILUSDT", "DENTUSDT", "MANAUSDT", "NKNUSDT", "LRCBTC"],
                        channels=["trades", "quotes"], trade_stream="aggTrade")
        cfg = make_config(data, [feed], storage={"flush_interval_s": 0.1},
                          journal={"fsync_interval_s": 0.05, "max_pending_bytes": 20_000})
        daemon = Daemon(cfg)
        task = asyncio.create_task(daemon.run(install_signals=False))
        ws, js = daemon.writer_stats, daemon.journal.stats  # type: ignore[union-attr]
        summary["committed_before"] = await wait_for(lambda: ws.files_written >= 2, 10)
        filler = data / "filler"
        summary["filled_bytes"] = await asyncio.to_thread(fill, filler)
        summary["writer_degraded"] = await wait_for(lambda: not ws.healthy, 10)
        summary["journal_degraded"] = await wait_for(lambda: not js.healthy, 10)
        summary["journal_blocked_intake"] = await wait_for(
            lambda: daemon.journal.full, 10)  # type: ignore[union-attr]
        await asyncio.sleep(0.5)
        summary["visible_tmp_during_fault"] = [str(p) for p in data.glob("*/**/*.tmp")
                                               if ".staging" not in p.parts]
        filler.unlink()
        summary["writer_recovered"] = await wait_for(lambda: ws.healthy and ws.flush_errors > 0,
                                                     30)
        summary["journal_recovered"] = await wait_for(lambda: js.healthy, 30)
        await wait_for(lambda: sim.timeline_done, 30)
        await asyncio.sleep(0.5)
        daemon.request_stop("scenario done")
        summary["exit_code"] = await asyncio.wait_for(task, 30)
        summary["flush_errors"] = ws.flush_errors
        summary["journal_failures"] = js.fsync_failures
        summary["sent"] = [s.frame.decode() for s in sim.sent]
    shutil.copytree(data, work / "out", ignore=shutil.ignore_patterns("filler"))
    return summary


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(Path(sys.argv[1])))))
