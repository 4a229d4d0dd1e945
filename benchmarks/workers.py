"""Zero-loss throughput of `[service] workers = 1` vs `2` (and more) on this machine.

For each worker count it starts `--feeds` load generators (benchmarks/loadgen.py, one
Binance-format venue per feed, unthrottled: each sends as fast as its client reads, up to
an 8 MiB socket backlog), all pinned to ONE core (`--loadgen-cpu`, sched_setaffinity), and
the real daemon (`python -m ingestd --config ...`, journal on, the production code path:
one process with `workers = 1`, the supervisor and its worker processes otherwise), not
pinned. It measures, from the first frame until every frame sent is a committed row:

- msg/s: frames received from that point until the last frame was read / that time
  (frames received before it - the feeds start one worker at a time - are left out).
  The daemon never drops (`when_full = "block"`): a daemon that cannot keep up slows
  the generators down through TCP backpressure, so the rate reached IS the zero-loss
  rate of this machine;
- CPU of the daemon's process tree (user+sys, all processes and threads) in % of one
  core and in us per message, and the load generators' CPU (a generator core near 100 %
  means the generator, not the daemon, was the limit);
- rows lost: frames sent - trade rows in Parquet (must be 0) and duplicates (must be 0).

    python benchmarks/workers.py                         # workers 1,2; 4 feeds; 15 s each
    python benchmarks/workers.py --workers 1,2 --feeds 4 --duration 20 --loadgen-cpu 1

Output: a table on stdout and JSON (`--json`). The load average before each run is
recorded: the machine may be shared, and every figure here depends on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import psutil

HERE = Path(__file__).resolve().parent
FIRST_TRADE_ID = 1_000_000_001   # loadgen.py's first trade id


@dataclass
class Run:
    workers: int
    feeds: int
    duration_s: float
    loadavg_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    frames_sent: int = 0
    rows: int = 0
    duplicates: int = 0
    rows_lost: int = 0
    seconds: float = 0.0
    msg_s: float = 0.0
    daemon_cpu_pct: float = 0.0        # % of one core, the whole process tree
    cpu_us_per_msg: float = 0.0
    loadgen_cpu_pct: float = 0.0       # % of one core, all generators (pinned to one core)
    processes: int = 0
    exit_code: int | None = None
    notes: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def config_text(root: Path, ports: list[int], workers: int, health_port: int) -> str:
    out = [f"""
[storage]
root = "{root}"
flush_interval_s = 1.0

[journal]
enabled = true
fsync_interval_s = 0.2

[queue]
capacity = 100000
when_full = "block"

[service]
workers = {workers}
shutdown_timeout_s = 30.0

[health]
listen = "127.0.0.1:{health_port}"

[log]
level = "warning"
format = "json"
"""]
    for i, port in enumerate(ports):
        out.append(f"""
[[feeds]]
name = "bench-{i}"
exchange = "binance"
url = "ws://127.0.0.1:{port}"
rest_url = "http://127.0.0.1:{port}"
symbols = ["BTCUSDT"]
channels = ["trades"]
stale_after_s = 120
""")
    return "".join(out)


async def start_loadgen(duration_s: float, times_out: Path, cpu: int
                        ) -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "loadgen.py"), "--rate", "0", "--duration",
        str(duration_s), "--mix", "trades", "--times-out", str(times_out),
        stdout=asyncio.subprocess.PIPE, preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    assert proc.stdout is not None
    line = (await proc.stdout.readline()).decode().split()
    assert line[0] == "PORT", line
    return proc, int(line[1])


def health(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
        body: dict[str, Any] = json.loads(r.read())
    return body


async def health_async(port: int) -> dict[str, Any] | None:
    try:
        return await asyncio.to_thread(health, port)
    except (OSError, ValueError):
        return None


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def cpu_s(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


async def one_run(workers: int, feeds: int, duration_s: float, cpu: int, work: Path) -> Run:
    res = Run(workers, feeds, duration_s, loadavg_before=os.getloadavg())
    gens = [await start_loadgen(duration_s, work / f"times-{i}.json", cpu)
            for i in range(feeds)]
    root = work / "data"
    hport = free_port()
    cfg = work / "bench.toml"
    cfg.write_text(config_text(root, [p for _, p in gens], workers, hport))
    daemon = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ingestd", "--config", str(cfg),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    # The first frame: every feed has received something (all generators are streaming).
    while True:
        h = await health_async(hport)
        if h and len(h["feeds"]) == feeds and all(f["messages"] > 0
                                                  for f in h["feeds"].values()):
            break
        if daemon.returncode is not None:
            raise RuntimeError(f"daemon exited {daemon.returncode}")
        await asyncio.sleep(0.05)
    procs = tree(daemon.pid)
    res.processes = len(procs)
    gen_procs = [psutil.Process(p.pid) for p, _ in gens]
    # Frames already received before this point (feeds start one worker at a time) are
    # left out of both the count and the CPU.
    cpu0, gen0, t0 = cpu_s(procs), cpu_s(gen_procs), time.monotonic()
    msgs0 = sum(f["messages"] for f in h["feeds"].values())
    per_gen = []
    for proc, _ in gens:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), duration_s + 300)).decode()
        assert line.startswith("DONE"), line
        per_gen.append(int(line.split()[1]))
    sent = sum(per_gen)
    gen1 = cpu_s(gen_procs)
    t_gen = time.monotonic()
    # Every frame sent is a trade row: wait until the daemon read them all (t_read), then
    # until the writers committed them all (the CPU counts up to there).
    rows_seen, stable_since = -1, time.monotonic()
    t_read: float | None = None
    while True:
        h = await health_async(hport)
        rows = 0 if h is None else int(h["writer"]["rows_written"].get("trades", 0))
        if t_read is None and h is not None \
                and sum(f["messages"] for f in h["feeds"].values()) >= sent:
            t_read = time.monotonic()
        if rows >= sent:
            break
        if rows != rows_seen:
            rows_seen, stable_since = rows, time.monotonic()
        elif time.monotonic() - stable_since > 20:
            res.notes.append(f"rows stopped at {rows} of {sent}")
            break
        await asyncio.sleep(0.1)
    t1 = time.monotonic()
    cpu1 = cpu_s(procs)
    daemon.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(daemon.communicate(), 120)
    res.exit_code = daemon.returncode
    if daemon.returncode != 0:
        res.notes.append(f"daemon exit {daemon.returncode}: {err.decode()[-400:]}")
    for proc, _ in gens:
        proc.kill()
        await proc.wait()
    # Every generator numbers its trades FIRST_TRADE_ID, +1, ...: an id offset k must be
    # in Parquet exactly as many times as there are generators that sent more than k.
    trades = pl.scan_parquet(f"{root}/trades/**/*.parquet", hive_partitioning=True)
    counts = (trades.group_by("trade_id").len()
              .with_columns(k=pl.col("trade_id").cast(pl.Int64) - FIRST_TRADE_ID)
              .with_columns(expected=pl.sum_horizontal(
                  [(pl.lit(n) > pl.col("k")).cast(pl.Int64) for n in per_gen]))
              .collect())
    res.rows = int(counts["len"].sum())
    res.duplicates = int((counts["len"] - counts["expected"]).clip(lower_bound=0).sum())
    res.frames_sent = sent
    res.rows_lost = sent - (res.rows - res.duplicates)
    res.seconds = (t_read or t1) - t0
    measured = sent - msgs0
    res.msg_s = measured / res.seconds if res.seconds > 0 else 0.0
    res.daemon_cpu_pct = 100 * (cpu1 - cpu0) / (t1 - t0) if t1 > t0 else 0.0
    res.cpu_us_per_msg = 1e6 * (cpu1 - cpu0) / measured if measured else 0.0
    res.loadgen_cpu_pct = 100 * (gen1 - gen0) / max(1e-9, t_gen - t0)
    return res


def table(runs: list[Run]) -> str:
    head = ("workers", "feeds", "msg/s", "daemon CPU %", "us/msg", "loadgen CPU %",
            "rows lost", "dup", "procs", "load avg before")
    rows = [head]
    for r in runs:
        rows.append((str(r.workers), str(r.feeds), f"{r.msg_s:,.0f}", f"{r.daemon_cpu_pct:.0f}",
                     f"{r.cpu_us_per_msg:.1f}", f"{r.loadgen_cpu_pct:.0f}", str(r.rows_lost),
                     str(r.duplicates), str(r.processes),
                     " ".join(f"{x:.2f}" for x in r.loadavg_before)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True))
                     for row in rows)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workers", default="1,2", help="worker counts, comma separated")
    ap.add_argument("--feeds", type=int, default=4, help="feeds (one generator each)")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of load per run")
    ap.add_argument("--loadgen-cpu", type=int, default=max(os.sched_getaffinity(0)),
                    help="the one core every load generator runs on (default: the last)")
    ap.add_argument("--json", default=str(HERE / "results" / "workers.json"))
    args = ap.parse_args()
    runs: list[Run] = []
    for n in (int(x) for x in args.workers.split(",")):
        with tempfile.TemporaryDirectory(prefix="ingestd-workers-") as tmp:
            r = await one_run(n, args.feeds, args.duration, args.loadgen_cpu, Path(tmp))
        runs.append(r)
        print(f"workers={r.workers}: {r.msg_s:,.0f} msg/s, daemon CPU {r.daemon_cpu_pct:.0f} %, "
              f"lost {r.rows_lost}, dup {r.duplicates} {r.notes or ''}", flush=True)
    print()
    print(table(runs))
    machine = {"python": platform.python_version(), "cores": os.cpu_count(),
               "kernel": platform.release(), "loadgen_cpu": args.loadgen_cpu}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"machine": machine,
                                           "runs": [asdict(r) for r in runs]}, indent=2))
    print(f"\nJSON: {args.json}\nmachine: {machine}")
    return 0 if all(r.rows_lost == 0 and r.duplicates == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
