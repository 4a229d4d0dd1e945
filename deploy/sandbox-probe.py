"""Stand-in for `ingestd --config ...` used by deploy/check-runtime.sh.

It runs as ExecStart of the real deploy/ingestd.service (same user, sandbox, seccomp filter,
MemoryDenyWriteExecute) and exercises what the daemon needs from that sandbox:

- imports ingestd and every runtime dependency (pyarrow, polars, uvloop, orjson, websockets,
  structlog, msgspec);
- a uvloop event loop with a loopback WebSocket round trip (the reader's I/O path);
- Parquet written by pyarrow and polars into $STATE_DIRECTORY and read back with
  pl.scan_parquet(..., hive_partitioning=True) on polars' thread pool;
- a libffi closure (ctypes callback), which needs executable trampolines;
- sd_notify over $NOTIFY_SOCKET: READY=1, STATUS=, WATCHDOG=1 at half of $WATCHDOG_USEC,
  STOPPING=1; SIGHUP counted (reload), SIGTERM -> clean exit 0.

It also probes that the sandbox is really in force (so the test cannot pass vacuously): a
writable+executable mapping must be refused, a @resources syscall must fail with EPERM,
Seccomp must be 2 and the effective capabilities empty.

Behaviour is chosen by the first word of /etc/ingestd/probe-mode (ConfigurationDirectory):
`run` (default), `exit=N` (exit N before READY, like a config error), `nowatchdog` (READY,
then never WATCHDOG=1). The report goes to $STATE_DIRECTORY/probe-report.json.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import mmap
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

STATE = Path(os.environ.get("STATE_DIRECTORY", "/var/lib/ingestd"))
REPORT = STATE / "probe-report.json"
report: dict[str, Any] = {"pid": os.getpid(), "started": time.time()}


def save() -> None:
    tmp = REPORT.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1, sort_keys=True))
    os.replace(tmp, REPORT)


def notify(msg: str) -> None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(addr)
        s.sendall(msg.encode())


def probe(name: str, fn: Any) -> None:
    try:
        report[name] = fn()
    except Exception as e:
        report[name] = f"ERROR {type(e).__name__}: {e}"
        report.setdefault("errors", []).append(f"{name}: {traceback.format_exc()}")


def listable(path: str) -> bool:
    """True if `path` can be listed and shows something (ProtectHome=yes: inaccessible)."""
    try:
        return bool(os.listdir(path))
    except OSError:
        return False


def identity() -> dict[str, Any]:
    status = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("Seccomp", "NoNewPrivs", "CapEff", "CapBnd", "CapAmb", "Uid", "Gid"):
            status[k] = v.strip()
    umask = os.umask(0)
    os.umask(umask)
    import grp
    import pwd
    return {
        "user": pwd.getpwuid(os.getuid()).pw_name,
        "group": grp.getgrgid(os.getgid()).gr_name,
        "umask": oct(umask),
        "status": status,
        "watchdog_usec": os.environ.get("WATCHDOG_USEC"),
        "notify_socket": bool(os.environ.get("NOTIFY_SOCKET")),
        "state_directory": os.environ.get("STATE_DIRECTORY"),
        "configuration_directory": os.environ.get("CONFIGURATION_DIRECTORY"),
        "proc_meminfo_visible": Path("/proc/meminfo").exists(),
        "home_visible": listable("/home"),
        "root_home_readable": listable("/root"),
        "tmp_entries": len(os.listdir("/tmp")),
        "etc_writable": os.access("/etc", os.W_OK),
    }


def wx_mapping() -> str:
    try:
        m = mmap.mmap(-1, mmap.PAGESIZE,
                      prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except PermissionError:
        return "denied"
    m.close()
    return "allowed"


def resources_syscall() -> str:
    try:
        os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) + 1)
    except OSError as e:
        return "EPERM" if e.errno == errno.EPERM else f"errno {e.errno}"
    return "allowed"


def ffi_closure() -> str:
    cb_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)
    cb = cb_type(lambda x: x * 2)
    libc = ctypes.CDLL(None)
    # qsort calls the closure through its executable trampoline
    arr = (ctypes.c_int * 4)(3, 1, 2, 0)
    cmp_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int),
                                ctypes.POINTER(ctypes.c_int))
    cmp = cmp_type(lambda a, b: a[0] - b[0])
    libc.qsort(arr, 4, ctypes.sizeof(ctypes.c_int), cmp)
    assert list(arr) == [0, 1, 2, 3], list(arr)
    assert cb(21) == 42
    return "ok"


def imports() -> dict[str, str]:
    import msgspec
    import orjson
    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet
    import structlog
    import uvloop
    import websockets

    import ingestd
    import ingestd.cli
    import ingestd.daemon
    return {"ingestd": ingestd.__version__, "pyarrow": pa.__version__,
            "polars": pl.__version__, "uvloop": uvloop.__version__,
            "orjson": orjson.__version__, "websockets": websockets.__version__,
            "structlog": structlog.__version__, "msgspec": msgspec.__version__}


def parquet() -> dict[str, Any]:
    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = STATE / "probe-data"
    part = root / "trades" / "exchange=probe" / "date=2024-01-01"
    part.mkdir(parents=True, exist_ok=True)
    n = 200_000
    table = pa.table({"symbol": pa.array(["BTCUSDT", "ETHUSDT"] * (n // 2)),
                      "recv_seq": pa.array(range(n), pa.int64()),
                      "price": pa.array([float(i % 997) for i in range(n)])})
    staging = root / ".staging"
    staging.mkdir(exist_ok=True)
    tmp = staging / "a.parquet.tmp"
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, part / "a.parquet")
    df = pl.DataFrame({"symbol": ["BTCUSDT"] * 1000, "recv_seq": list(range(n, n + 1000)),
                       "price": [1.0] * 1000})
    df.write_parquet(part / "b.parquet", compression="zstd")
    out = (pl.scan_parquet(f"{root}/trades/**/*.parquet", hive_partitioning=True)
           .group_by("exchange", "symbol").agg(pl.len(), pl.col("price").mean())
           .sort("symbol").collect())
    mode = oct((part / "a.parquet").stat().st_mode & 0o777)
    dmode = oct(part.stat().st_mode & 0o777)
    return {"rows": int(out["len"].sum()), "groups": out.height, "file_mode": mode,
            "dir_mode": dmode, "threads": pl.thread_pool_size()}


async def ws_roundtrip() -> str:
    import websockets

    async def echo(ws: Any) -> None:
        async for msg in ws:
            await ws.send(msg)

    async with websockets.serve(echo, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        async with websockets.connect(f"ws://127.0.0.1:{port}") as ws:
            await ws.send('{"ping": 1}')
            got = await asyncio.wait_for(ws.recv(), 5)
    assert got == '{"ping": 1}', got
    return f"ok ({type(asyncio.get_running_loop()).__module__})"


async def serve(mode: str) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    report["reloads"] = 0

    def on_hup() -> None:
        report["reloads"] += 1
        notify(f"STATUS=reloaded {report['reloads']} time(s)")
        save()

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    report["uvloop_ws"] = await ws_roundtrip()
    save()
    notify("READY=1\nSTATUS=probe serving")
    usec = int(os.environ.get("WATCHDOG_USEC", "0"))
    interval = usec / 2e6 if usec else 5.0
    while not stop.is_set():
        if mode != "nowatchdog":
            notify("WATCHDOG=1")
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            pass
    notify("STOPPING=1\nSTATUS=draining")
    report["stopped_cleanly"] = True
    save()
    return 0


def main() -> int:
    try:
        mode = Path("/etc/ingestd/probe-mode").read_text().split()[0]
    except (OSError, IndexError):
        mode = "run"
    report["mode"] = mode
    if mode.startswith("exit="):
        code = int(mode.partition("=")[2])
        print(f"probe: exiting {code} before READY (mode {mode})", file=sys.stderr)
        return code
    probe("identity", identity)
    probe("imports", imports)
    probe("wx_mapping", wx_mapping)
    probe("resources_syscall", resources_syscall)
    probe("ffi_closure", ffi_closure)
    probe("parquet", parquet)
    save()
    print("probe: " + json.dumps({k: v for k, v in report.items() if k != "errors"}),
          flush=True)
    import uvloop
    return uvloop.run(serve(mode))


if __name__ == "__main__":
    sys.exit(main())
