"""ingestd latency and throughput benchmark (the script the README points to).

For each offered rate and message mix it starts the load generator (its own process),
runs the real daemon (`python -m ingestd --config ...`, the same code path as in
production, journal on) against it, and reports:

- received msg/s;
- daemon CPU per message (user+sys of the daemon process, all threads, from the OS),
  from the first frame until every row is committed;
- ingest latency: frame sent -> its row handed to the writer (p50/p99/p99.9/max);
- receive-stamp lateness: frame sent -> the row's `ts_recv` as stored in Parquet (trades
  by trade id, book diffs by update id, one value per diff) (p50/p99/p99.9/max): how
  late the daemon stamps a frame it received (a blocked event loop stamps late). Over
  every trade and diff, whereas ingest latency is over the rows the daemon's trace
  records (the last row of each queue item), so its max can be the lower one. When the
  daemon falls behind, frames wait in socket buffers unread: that counts as lateness;
- durable latency: frame sent -> its row in a committed Parquet file (p50/p99);
- peak RSS (VmHWM) and rows lost (trades and book diffs the venue sent that are not in
  Parquet; must be 0).

With `--peer cryptofeed` (and cryptofeed installed: `pip install -e '.[bench]'
cryptofeed`), the same frames and rates are measured for cryptofeed, callback only, in
the same run (see benchmarks/peer_cryptofeed.py) and ingestd/cryptofeed ratios printed;
its receive-stamp lateness is that of its own `receipt_timestamp`.

Send times are the load generator's (wall clock, taken right before the batch holding
the frame is written to the socket), as are `ts_recv` and cryptofeed's stamps (same
host, same clock).

Output: two tables on stdout (throughput, CPU, RSS, loss; latencies), JSON (`--json`),
and a PNG of ingest latency percentiles by rate (`--plot`).

    python benchmarks/latency.py                       # 10k, 50k, 100k, unthrottled
    python benchmarks/latency.py --rates 50000 --duration 20 --mix book
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


@dataclass
class Result:
    system: str
    mix: str
    offered_rate: float            # msg/s, 0 = unthrottled
    frames_sent: int = 0
    frames_received: int = 0
    received_rate: float = 0.0
    cpu_us_per_msg: float = 0.0
    ingest_p50_ms: float | None = None
    ingest_p99_ms: float | None = None
    ingest_p999_ms: float | None = None
    ingest_max_ms: float | None = None
    durable_p50_ms: float | None = None
    durable_p99_ms: float | None = None
    # frame sent -> its receive stamp (ingestd: ts_recv in Parquet; cryptofeed:
    # receipt_timestamp); None in results from before these fields existed
    recv_late_p50_ms: float | None = None
    recv_late_p99_ms: float | None = None
    recv_late_p999_ms: float | None = None
    recv_late_max_ms: float | None = None
    peak_rss_mb: float = 0.0
    rows_lost: int = 0
    rss_samples: list[tuple[int, float]] = field(default_factory=list)  # (msgs, MB)
    notes: list[str] = field(default_factory=list)


async def start_loadgen(rate: float, duration: float, mix: str, times_out: Path
                        ) -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "loadgen.py"), "--rate", str(rate), "--duration",
        str(duration), "--mix", mix, "--times-out", str(times_out),
        stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    line = (await proc.stdout.readline()).decode().split()
    assert line[0] == "PORT", line
    return proc, int(line[1])


def config_text(root: Path, port: int, mix: str) -> str:
    channels = '["trades"]' if mix == "trades" else '["trades", "quotes", "book"]'
    return f"""
[storage]
root = "{root}"
flush_interval_s = 1.0

[journal]
enabled = true
fsync_interval_s = 0.2

[queue]
capacity = 100000
when_full = "block"

[health]
listen = "127.0.0.1:0"

[log]
level = "warning"
format = "json"

[[feeds]]
name = "bench"
exchange = "binance"
url = "ws://127.0.0.1:{port}"
rest_url = "http://127.0.0.1:{port}"
symbols = ["BTCUSDT"]
channels = {channels}
stale_after_s = 120
"""


def percentiles(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    p50, p99, p999 = np.percentile(values, [50, 99, 99.9])
    return {"p50": float(p50) / 1e6, "p99": float(p99) / 1e6, "p999": float(p999) / 1e6,
            "max": float(values.max()) / 1e6}


async def wait_done(loadgen: asyncio.subprocess.Process, timeout_s: float) -> int:
    assert loadgen.stdout is not None
    line = await asyncio.wait_for(loadgen.stdout.readline(), timeout_s)
    parts = line.decode().split()
    assert parts and parts[0] == "DONE", parts
    return int(parts[1])


def committed_rows(root: Path) -> tuple[int, int]:
    """(rows in Parquet for trades, and for book deltas) - read by the benchmark."""
    n_trades = n_book = 0
    for table in ("trades", "book"):
        files = list((root / table).glob("exchange=*/date=*/*.parquet"))
        if files:
            n = pl.scan_parquet([str(f) for f in files]).select(pl.len()).collect().item()
            if table == "trades":
                n_trades = n
            else:
                n_book = n
    return n_trades, n_book


async def run_ingestd(rate: float, duration: float, mix: str, work: Path) -> Result:
    res = Result("ingestd", mix, rate)
    times_path, trace_path = work / "times.json", work / "trace.json"
    root = work / "data"
    loadgen, port = await start_loadgen(rate, duration, mix, times_path)
    cfg = work / "bench.toml"
    cfg.write_text(config_text(root, port, mix))
    # Sample the trace on long runs so the benchmark's own bookkeeping does not grow RSS.
    every = max(1, int((rate or 100_000) * duration) // 100_000)
    env = {**os.environ, "INGESTD_LATENCY_TRACE": str(trace_path),
           "INGESTD_LATENCY_TRACE_EVERY": str(every), "PYTHONUNBUFFERED": "1"}
    daemon = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ingestd", "--config", str(cfg), env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    ps = psutil.Process(daemon.pid)
    # CPU from the first frame on (the daemon's start-up imports are not per message).
    while loadgen.stdout is not None:
        await asyncio.sleep(0.005)
        if (root / ".journal").exists() and any((root / ".journal").iterdir()):
            break
    cpu0 = ps.cpu_times()
    t0 = time.monotonic()

    async def sample_rss() -> None:
        # RSS against messages offered so far (the daemon keeps up when lost == 0).
        while True:
            await asyncio.sleep(1.0)
            offered = int((time.monotonic() - t0) * (rate or 100_000))
            res.rss_samples.append((offered, ps.memory_info().rss / 2**20))

    sampler = asyncio.create_task(sample_rss())
    sent = await wait_done(loadgen, duration + 120)
    sampler.cancel()
    # Wait until the daemon has taken everything in and committed it (rows stop growing).
    last, stable_since = -1, time.monotonic()
    while time.monotonic() - stable_since < 2.5:
        await asyncio.sleep(0.25)
        n = sum(committed_rows(root))
        if n != last:
            last, stable_since = n, time.monotonic()
    cpu1 = ps.cpu_times()
    try:
        status = Path(f"/proc/{daemon.pid}/status").read_text()
        hwm = next(int(x.split()[1]) for x in status.splitlines() if x.startswith("VmHWM"))
        res.peak_rss_mb = hwm / 1024
    except (OSError, StopIteration):
        res.peak_rss_mb = ps.memory_info().rss / 2**20
    daemon.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(daemon.communicate(), 60)
    loadgen.kill()
    await loadgen.wait()
    if daemon.returncode != 0:
        res.notes.append(f"daemon exit {daemon.returncode}: {err.decode()[-500:]}")
    times = json.loads(times_path.read_bytes())
    trace = json.loads(trace_path.read_bytes())
    res.frames_sent = sent
    cpu_s = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    analyse(res, root, times, trace, cpu_s)
    return res


def analyse(res: Result, root: Path, times: dict[str, Any], trace: dict[str, Any],
            cpu_s: float) -> None:
    accepted = pl.DataFrame({"recv_seq": trace["seqs"], "accepted_ns": trace["accepted_ns"]})
    commits = pl.DataFrame({"file": [c[0] for c in trace["commits"]],
                            "committed_ns": [c[1] for c in trace["commits"]]},
                           schema={"file": pl.String, "committed_ns": pl.Int64})
    parts = []
    trade_files = list((root / "trades").glob("exchange=*/date=*/*.parquet"))
    if trade_files:
        trades = (pl.scan_parquet([str(f) for f in trade_files], include_file_paths="file")
                  .select(pl.col("trade_id").cast(pl.Int64).alias("id"), "recv_seq", "file",
                          pl.col("ts_recv").dt.epoch("ns").alias("ts_recv_ns"))
                  .collect())
        sent = pl.DataFrame({"id": np.arange(len(times["trade_ns"]), dtype=np.int64)
                             + times["trade_first_id"], "sent_ns": times["trade_ns"]})
        res.rows_lost += sent.height - sent.join(trades, on="id", how="semi").height
        parts.append(trades.join(sent, on="id"))
    book_files = list((root / "book").glob("exchange=*/date=*/*.parquet"))
    if book_files and times["depth_ns"]:
        # One row per diff (its levels share update_id, recv_seq and ts_recv).
        book = (pl.scan_parquet([str(f) for f in book_files], include_file_paths="file")
                .filter(~pl.col("is_snapshot"))
                .group_by("update_id", "recv_seq", "file")
                .agg(pl.col("ts_recv").dt.epoch("ns").min().alias("ts_recv_ns"),
                     (pl.col("ts_recv").n_unique() > 1).alias("mixed"))
                .rename({"update_id": "id"}).collect())
        if (mixed := int(book["mixed"].sum())):
            res.notes.append(f"{mixed} book diff(s) with levels of different ts_recv "
                             "(earliest taken)")
        book = book.drop("mixed")
        sent_d = pl.DataFrame({"id": np.arange(len(times["depth_ns"]), dtype=np.int64)
                               + times["depth_first_id"], "sent_ns": times["depth_ns"]})
        # Diffs before the first applied one were covered by the REST snapshot (Binance's
        # procedure drops them by design); every later diff must be there.
        first = book["id"].min() if book.height else None
        expected = sent_d.filter(pl.col("id") >= first) if first is not None else sent_d
        res.rows_lost += expected.height - expected.join(book, on="id", how="semi").height
        parts.append(book.join(sent_d, on="id"))
    joined = pl.concat(parts).join(accepted, on="recv_seq", how="left").join(
        commits, on="file", how="left")
    ingest = (joined["accepted_ns"] - joined["sent_ns"]).drop_nulls().to_numpy()
    durable = (joined["committed_ns"] - joined["sent_ns"]).drop_nulls().to_numpy()
    late = (joined["ts_recv_ns"] - joined["sent_ns"]).drop_nulls().to_numpy()
    pi, pd, pr = percentiles(ingest), percentiles(durable), percentiles(late)
    res.recv_late_p50_ms, res.recv_late_p99_ms = pr.get("p50"), pr.get("p99")
    res.recv_late_p999_ms, res.recv_late_max_ms = pr.get("p999"), pr.get("max")
    res.ingest_p50_ms, res.ingest_p99_ms = pi.get("p50"), pi.get("p99")
    res.ingest_p999_ms, res.ingest_max_ms = pi.get("p999"), pi.get("max")
    res.durable_p50_ms, res.durable_p99_ms = pd.get("p50"), pd.get("p99")
    res.frames_received = res.frames_sent  # every frame is accounted for by rows_lost
    res.received_rate = res.frames_sent / times["seconds"]
    res.cpu_us_per_msg = cpu_s / max(1, res.frames_sent) * 1e6


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _rate(r: Result) -> str:
    return "max" if not r.offered_rate else f"{r.offered_rate:.0f}"


def _grid(cols: list[tuple[str, str]], rows: list[tuple[str, ...]]) -> list[str]:
    """Right-aligned columns under (group, name) headers; a group's label spans its
    consecutive columns (left-aligned over them), blank groups print nothing."""
    names = tuple(name for _, name in cols)
    widths = [max(len(row[i]) for row in [names, *rows]) for i in range(len(cols))]
    spans: list[tuple[str, int, int]] = []          # (group, first column, last column)
    for i, (group, _) in enumerate(cols):
        if spans and spans[-1][0] == group:
            spans[-1] = (group, spans[-1][1], i)
        else:
            spans.append((group, i, i))
    # Widen a group's last column if its label is longer than the columns under it.
    for group, a, b in spans:
        need = len(group) - (sum(widths[a:b + 1]) + 2 * (b - a))
        if group and need > 0:
            widths[b] += need
    groups = "  ".join(group.ljust(sum(widths[a:b + 1]) + 2 * (b - a))
                       for group, a, b in spans).rstrip()
    lines = [groups] if groups else []
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True))
              for row in [names, *rows]]
    return lines


def table(results: list[Result]) -> str:
    """Two tables: throughput, CPU, RSS and loss; then latencies (ms)."""
    key = [("", "system"), ("", "mix"), ("", "offered/s")]
    first = _grid([*key, ("", "recv/s"), ("", "cpu us/msg"), ("", "rss MB"), ("", "lost")],
                  [(r.system, r.mix, _rate(r), f"{r.received_rate:.0f}",
                    f"{r.cpu_us_per_msg:.2f}", f"{r.peak_rss_mb:.0f}", str(r.rows_lost))
                   for r in results])
    pcts = ("p50", "p99", "p99.9", "max")
    second = _grid(key + [("ingest", p) for p in pcts] + [("recv stamp late", p) for p in pcts]
                   + [("durable", "p50"), ("durable", "p99")],
                   [(r.system, r.mix, _rate(r), _ms(r.ingest_p50_ms), _ms(r.ingest_p99_ms),
                     _ms(r.ingest_p999_ms), _ms(r.ingest_max_ms), _ms(r.recv_late_p50_ms),
                     _ms(r.recv_late_p99_ms), _ms(r.recv_late_p999_ms),
                     _ms(r.recv_late_max_ms), _ms(r.durable_p50_ms), _ms(r.durable_p99_ms))
                    for r in results])
    return "\n".join([*first, "", *second,
                      "(latencies in ms from the frame's send time; ingest: to the row handed "
                      "to the writer (cryptofeed:\n callback entry); recv stamp late: to the "
                      "receive stamp (ingestd: ts_recv in Parquet; cryptofeed:\n "
                      "receipt_timestamp); durable: to the row in a committed Parquet file)"])


def progress(r: Result) -> str:
    """One line per finished run."""
    return (f"{r.system} {r.mix} {_rate(r)}/s: recv {r.received_rate:.0f}/s, "
            f"cpu {r.cpu_us_per_msg:.2f} us/msg, ingest p50/p99 {_ms(r.ingest_p50_ms)}/"
            f"{_ms(r.ingest_p99_ms)} ms, recv stamp late p50/p99 {_ms(r.recv_late_p50_ms)}/"
            f"{_ms(r.recv_late_p99_ms)} ms, rss {r.peak_rss_mb:.0f} MB, lost {r.rows_lost}")


def plot(results: list[Result], path: Path) -> None:
    """Latency percentiles by offered rate, one panel per message mix."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixes = sorted({r.mix for r in results}, reverse=True)
    fig, axes = plt.subplots(1, len(mixes), figsize=(6 * len(mixes), 4.5), squeeze=False)
    for ax, mix in zip(axes[0], mixes, strict=True):
        rates = sorted({r.offered_rate for r in results if r.mix == mix},
                       key=lambda x: x or float("inf"))
        labels = [f"{x / 1000:g}k" if x else "max" for x in rates]
        for system, color in (("ingestd", "tab:blue"), ("cryptofeed", "tab:orange")):
            by_rate = {r.offered_rate: r for r in results if r.system == system
                       and r.mix == mix}
            if not by_rate:
                continue
            for attr, style in (("ingest_p50_ms", "o-"), ("ingest_p99_ms", "s--"),
                                ("ingest_p999_ms", "^:")):
                xs = [i for i, x in enumerate(rates) if x in by_rate]
                ys = [getattr(by_rate[rates[i]], attr) for i in xs]
                ax.plot(xs, ys, style, color=color,
                        label=f"{system} {attr.split('_')[1].replace('p999', 'p99.9')}")
        ax.set_xticks(range(len(rates)), labels)
        ax.set_xlabel("offered msg/s")
        ax.set_ylabel("frame sent -> row handed on (ms)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(f"{mix} mix")
        ax.legend(fontsize=7)
    fig.suptitle("ingest latency (ingestd: row handed to the writer; cryptofeed: callback)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def replot(json_path: Path, png_path: Path) -> None:
    """Redraw the plot from a results JSON (python benchmarks/latency.py --replot)."""
    data = json.loads(json_path.read_text())
    known = {f.name for f in fields(Result)}   # fields added later default to None
    plot([Result(**{k: v for k, v in r.items() if k in known}) for r in data["results"]],
         png_path)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rates", default="10000,50000,100000,0",
                    help="offered msg/s, comma separated; 0 = unthrottled")
    ap.add_argument("--mix", default="trades,book", help="trades, book or both")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    ap.add_argument("--peer", choices=["none", "cryptofeed"], default="none")
    ap.add_argument("--rss-report", action="store_true",
                    help="print RSS at 10%% and 100%% of each run (flatness check)")
    ap.add_argument("--json", default=str(HERE / "results" / "latest.json"))
    ap.add_argument("--plot", default=str(HERE / "results" / "latency.png"))
    ap.add_argument("--replot", action="store_true",
                    help="only redraw --plot from the results in --json")
    args = ap.parse_args()
    if args.replot:
        replot(Path(args.json), Path(args.plot))
        return 0
    rates = [float(x) for x in args.rates.split(",")]
    mixes = args.mix.split(",")
    results: list[Result] = []
    for mix in mixes:
        for rate in rates:
            with tempfile.TemporaryDirectory(prefix="ingestd-bench-") as tmp:
                r = await run_ingestd(rate, args.duration, mix, Path(tmp))
            results.append(r)
            print(progress(r), flush=True)
            if args.peer == "cryptofeed":
                from peer_cryptofeed import run_cryptofeed  # type: ignore[import-not-found]
                with tempfile.TemporaryDirectory(prefix="cryptofeed-bench-") as tmp:
                    results.append(await run_cryptofeed(rate, args.duration, mix, Path(tmp)))
                print(progress(results[-1]), flush=True)
    print()
    print(table(results))
    if args.rss_report:
        for r in results:
            if len(r.rss_samples) >= 10:
                early = r.rss_samples[len(r.rss_samples) // 10]
                late = r.rss_samples[-1]
                print(f"RSS {r.system} {r.mix} {r.offered_rate:.0f}/s: {early[1]:.0f} MB at "
                      f"~{early[0] / 1e6:.1f}M msgs -> {late[1]:.0f} MB at "
                      f"~{late[0] / 1e6:.1f}M msgs ({(late[1] / early[1] - 1) * 100:+.1f}%)")
    if args.peer == "cryptofeed":
        print(ratios(results))
    machine = {"python": platform.python_version(), "cpu": platform.processor()
               or platform.machine(), "cores": os.cpu_count(),
               "cpu_model": _cpu_model(), "kernel": platform.release()}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"machine": machine,
                                           "results": [asdict(r) for r in results]}, indent=2))
    plot(results, Path(args.plot))
    print(f"\nJSON: {args.json}\nplot: {args.plot}\nmachine: {machine}")
    return 0 if all(r.rows_lost == 0 for r in results if r.system == "ingestd") else 1


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def ratios(results: list[Result]) -> str:
    """ingestd/cryptofeed per mix and offered rate: CPU per message, received rate."""
    peer = {(r.mix, r.offered_rate): r for r in results if r.system == "cryptofeed"}
    rows = [("mix", "offered/s", "cpu us/msg i/c", "recv/s i/c")]

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}" if b else "-"

    for r in results:
        c = peer.get((r.mix, r.offered_rate))
        if r.system != "ingestd" or c is None:
            continue
        rows.append((r.mix, "max" if not r.offered_rate else f"{r.offered_rate:.0f}",
                     ratio(r.cpu_us_per_msg, c.cpu_us_per_msg),
                     ratio(r.received_rate, c.received_rate)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\nratios ingestd/cryptofeed (cpu < 1: ingestd cheaper; recv > 1: ingestd faster)\n" \
        + "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True))
                    for row in rows)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(asyncio.run(main()))
