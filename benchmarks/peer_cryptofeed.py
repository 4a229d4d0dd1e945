"""Peer comparison for the latency benchmark: the same frames and rates, into cryptofeed.

Owns: `run_cryptofeed(rate, duration, mix, workdir) -> Result`, called by latency.py
with `--peer cryptofeed`. Per run it starts the same load generator as the ingestd run
(latency.start_loadgen), starts cryptofeed_runner.py (cryptofeed's Binance feed pointed
at it, callback only) in its own process, and turns what both recorded into a `Result`
with the same fields and definitions as ingestd's where they apply:

- frames received: frames that reached cryptofeed's feed message handler;
- received msg/s: frames received / max(send window, first send -> last frame handled);
- CPU us/msg: user+sys of the cryptofeed process (all threads, psutil), from its first
  frame until it has been idle for the runner's `--idle-s`, per frame received;
- ingest latency: frame sent (load generator, by trade `t` / depth `u`) -> callback
  invoked (`time.time_ns()` at callback entry), trades plus book diffs;
- receive-stamp lateness (`recv_late_*`): frame sent -> cryptofeed's own receipt stamp
  of it (the `receipt_timestamp` passed to the callback: `time.time()` when its
  websocket connection yielded the frame), trades plus book diffs - cryptofeed's
  equivalent of ingestd's `ts_recv` lateness;
- durable latency: None (callback only: cryptofeed stores nothing here);
- peak RSS: VmHWM of the cryptofeed process;
- rows lost: trades sent but never seen by the trade callback, plus (mix `book`) diffs
  from the first applied one on that never reached the book callback (the same rule
  as ingestd's: earlier diffs are covered by the REST snapshot).

The interpreter that runs cryptofeed is `$INGESTD_PEER_PYTHON`, default sys.executable
(cryptofeed must then be installed in the benchmark's venv).

Must not: import cryptofeed itself (only the runner does), touch ingestd's run or
change what latency.py measures for ingestd.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from latency import Result, percentiles, start_loadgen, wait_done

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "cryptofeed_runner.py"
IDLE_S = 3.0            # no frame for this long after the first one = stream over
START_TIMEOUT_S = 60.0  # runner start-up (imports, connect) until its first frame


def peer_python() -> str:
    return os.environ.get("INGESTD_PEER_PYTHON") or sys.executable


async def _read_line(proc: asyncio.subprocess.Process, word: str, timeout_s: float
                     ) -> list[str]:
    assert proc.stdout is not None
    while True:
        raw = await asyncio.wait_for(proc.stdout.readline(), timeout_s)
        if not raw:
            raise RuntimeError(f"cryptofeed runner exited before {word}")
        parts = raw.decode().split()
        if parts and parts[0] == word:
            return parts


def _peak_rss_mb(pid: int, ps: psutil.Process) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        hwm = next(int(x.split()[1]) for x in status.splitlines() if x.startswith("VmHWM"))
        return hwm / 1024
    except (OSError, StopIteration):
        return float(ps.memory_info().rss) / 2**20


async def run_cryptofeed(rate: float, duration: float, mix: str, workdir: Path) -> Result:
    res = Result("cryptofeed", mix, rate)
    times_path, out = workdir / "times.json", workdir / "cryptofeed"
    loadgen, port = await start_loadgen(rate, duration, mix, times_path)
    err_path = workdir / "runner.stderr"
    with open(err_path, "wb") as err:
        runner = await asyncio.create_subprocess_exec(
            peer_python(), str(RUNNER), "--port", str(port), "--mix", mix, "--out", str(out),
            "--idle-s", str(IDLE_S), "--exit-after-idle", "120",
            stdout=asyncio.subprocess.PIPE, stderr=err,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    ps = psutil.Process(runner.pid)
    cpu0 = cpu1 = None
    try:
        await _read_line(runner, "FIRST", START_TIMEOUT_S)
        cpu0 = ps.cpu_times()   # from the first frame on, like ingestd's
        res.frames_sent = await wait_done(loadgen, duration + 120)
        # The runner reports IDLE once frames stop (its backlog, if any, is drained).
        await _read_line(runner, "IDLE", 600)
        cpu1 = ps.cpu_times()
        res.peak_rss_mb = _peak_rss_mb(runner.pid, ps)
    except (RuntimeError, TimeoutError, AssertionError) as e:
        res.notes.append(f"run incomplete: {e!r}")
    finally:
        if runner.returncode is None:
            runner.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(runner.wait(), 60)
        except TimeoutError:
            runner.kill()
            await runner.wait()
            res.notes.append("runner did not stop on SIGTERM; killed")
        loadgen.kill()
        await loadgen.wait()
    if runner.returncode not in (0, -signal.SIGTERM):
        res.notes.append(f"runner exit {runner.returncode}: "
                         f"{err_path.read_bytes().decode(errors='replace')[-500:]}")
    if not (out / "meta.json").exists() or not times_path.exists():
        res.notes.append("no measurements written")
        return res
    times = json.loads(times_path.read_bytes())
    if not res.frames_sent:
        res.frames_sent = int(times["frames"])
    cpu_s = 0.0 if cpu0 is None or cpu1 is None else \
        (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    analyse(res, out, times, cpu_s)
    return res


def _load(out: Path, name: str) -> np.ndarray[Any, np.dtype[np.int64]]:
    path = out / f"{name}.i64"
    if not path.exists():   # a runner that does not record it (receipt stamps)
        return np.zeros(0, dtype=np.int64)
    return np.fromfile(path, dtype=np.int64)


def _match(sent_ns: list[int], first_id: int, ids: np.ndarray[Any, np.dtype[np.int64]],
           cb_ns: np.ndarray[Any, np.dtype[np.int64]], from_first_seen: bool
           ) -> tuple[np.ndarray[Any, np.dtype[np.int64]], int]:
    """(latencies ns of the seen ids, ids expected but never seen)."""
    sent = np.asarray(sent_ns, dtype=np.int64)
    idx = ids - first_id
    ok = (idx >= 0) & (idx < sent.size)
    idx, cb = idx[ok], cb_ns[ok]
    seen = np.zeros(sent.size, dtype=bool)
    seen[idx] = True
    start = int(idx.min()) if from_first_seen and idx.size else 0
    lost = int((~seen[start:]).sum())
    return cb - sent[idx], lost


def analyse(res: Result, out: Path, times: dict[str, Any], cpu_s: float) -> None:
    meta = json.loads((out / "meta.json").read_text())
    trade_ids, depth_ids = _load(out, "trade_ids"), _load(out, "depth_ids")
    lat_t, lost_t = _match(times["trade_ns"], times["trade_first_id"],
                           trade_ids, _load(out, "trade_ns"), False)
    parts = [lat_t]
    late_parts = []
    rts = _load(out, "trade_rts")
    if rts.size == trade_ids.size:
        late_parts.append(_match(times["trade_ns"], times["trade_first_id"],
                                 trade_ids, rts, False)[0])
    res.rows_lost = lost_t
    if times["depth_ns"]:
        lat_d, lost_d = _match(times["depth_ns"], times["depth_first_id"],
                               depth_ids, _load(out, "depth_ns"), True)
        parts.append(lat_d)
        rts = _load(out, "depth_rts")
        if rts.size == depth_ids.size:
            late_parts.append(_match(times["depth_ns"], times["depth_first_id"],
                                     depth_ids, rts, True)[0])
        res.rows_lost += lost_d
        res.notes.append(f"book: {meta['depth']} diffs, {meta['snapshots']} snapshot(s), "
                         f"{meta['tickers']} tickers via callbacks")
    lat = np.concatenate(parts)
    p = percentiles(lat)
    res.ingest_p50_ms, res.ingest_p99_ms = p.get("p50"), p.get("p99")
    res.ingest_p999_ms, res.ingest_max_ms = p.get("p999"), p.get("max")
    if len(late_parts) == len(parts):
        q = percentiles(np.concatenate(late_parts))
        res.recv_late_p50_ms, res.recv_late_p99_ms = q.get("p50"), q.get("p99")
        res.recv_late_p999_ms, res.recv_late_max_ms = q.get("p999"), q.get("max")
    else:
        res.notes.append("no receipt_timestamp recorded: receive-stamp lateness n/a")
    res.frames_received = int(meta["frames"])
    first_sent = min([x[0] for x in (times["trade_ns"], times["depth_ns"]) if x],
                     default=meta["first_frame_ns"])
    span_s = max(float(times["seconds"]), (meta["last_frame_ns"] - first_sent) / 1e9)
    res.received_rate = res.frames_received / span_s if span_s > 0 else 0.0
    res.cpu_us_per_msg = cpu_s / max(1, res.frames_received) * 1e6
    res.notes.append("callback only: no storage, durable latency n/a")
