"""`ingestd demo`: the daemon against the built-in simulator, no internet needed.

Owns: starting one simulated venue per exchange on 127.0.0.1, a config pointing the
daemon's feeds at them, running the real daemon for a few seconds, then printing where
the data went, row counts read back with Polars, and a one-line query to try that works
right after `pip install` (this interpreter, with Polars; the DuckDB command line, which
pip does not install, only as an alternative).

Must not: take any shortcut around the daemon: the data goes through the same reader,
codec, queue and writer as in production.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from ingestd.checks import parse_config
from ingestd.config import ConfigError
from ingestd.runner import EX_CONFIG, EX_OK, run_loop
from ingestd.schema import TABLES


def demo_config(root: Path, servers: dict[str, Any], flush_interval_s: float = 0.5
                ) -> dict[str, Any]:
    from ingestd.sim.venues import VENUES

    feeds = []
    for exchange, server in servers.items():
        feeds.append({"name": f"{exchange}-demo", "exchange": exchange,
                      "url": server.url, "rest_url": server.rest_url,
                      **VENUES[exchange].demo_feed})
    return {
        "storage": {"root": str(root), "flush_interval_s": flush_interval_s},
        "health": {"listen": "127.0.0.1:0"},
        "log": {"level": "warning", "format": "console"},
        "feeds": feeds,
    }


async def _demo(seconds: float, root: Path, exchanges: list[str]) -> int:
    from ingestd.daemon import Daemon
    from ingestd.logs import configure
    from ingestd.sim import SimServer

    servers = {}
    for ex in exchanges:
        servers[ex] = await SimServer(ex, rate_msgs_s=400.0).start()
        print(f"simulator: {ex:<14} {servers[ex].url}  (recorded frames, REST on the same port)")
    try:
        cfg = parse_config(demo_config(root, servers), source="<demo>")
    except ConfigError as e:
        for p in e.problems:
            print(f"ingestd demo: {p}", file=sys.stderr)
        return EX_CONFIG
    configure(cfg.log.level, cfg.log.format)
    daemon = Daemon(cfg)
    print(f"recording for {seconds:g} s into {root} ...")
    loop = asyncio.get_running_loop()
    loop.call_later(seconds, daemon.request_stop, "demo finished")
    code = await daemon.run()
    for s in servers.values():
        await s.stop()
    _summary(root)
    return code


def _summary(root: Path) -> None:
    import polars as pl

    print()
    print(f"{'table':<8} {'exchange':<14} {'rows':>8}  files")
    for table in TABLES:
        files = sorted((root / table).glob("exchange=*/date=*/*.parquet"))
        if not files:
            continue
        df = (pl.scan_parquet(f"{root}/{table}/**/*.parquet", hive_partitioning=True)
              .group_by("exchange").agg(pl.len().alias("rows")).sort("exchange").collect())
        for ex, rows in df.iter_rows():
            n = sum(1 for f in files if f.parent.parent.name == f"exchange={ex}")
            print(f"{table:<8} {ex:<14} {rows:>8}  {n}")
    tables = [t for t in TABLES if any((root / t).glob("exchange=*/date=*/*.parquet"))]
    if not tables:
        return
    print()
    for line in read_back_commands(root, "trades" if "trades" in tables else tables[0]):
        print(line)


def read_back_commands(root: Path, table: str) -> list[str]:
    """Lines suggesting how to read `table` back: first a command that works right after
    `pip install` (this very interpreter, which has Polars), then the DuckDB command line,
    for those who have it. Every argument is quoted for a POSIX shell."""
    pattern = f"{root}/{table}/**/*.parquet"
    code = (f"import polars as pl; print(pl.scan_parquet({json.dumps(pattern)}, "
            f"hive_partitioning=True).sort(\"recv_seq\").collect())")
    literal = "'" + pattern.replace("'", "''") + "'"
    sql = (f"SELECT exchange, symbol, count(*) FROM read_parquet({literal}, "
           f"hive_partitioning=true) GROUP BY ALL")
    return [
        "Read it back with Polars (installed with ingestd):",
        f"  {_sh(sys.executable)} -c {_sh(code)}",
        "If you have the DuckDB command line (not installed with ingestd):",
        f"  duckdb -c {_sh(sql)}",
    ]


def _sh(arg: str) -> str:
    """`arg` quoted for a POSIX shell, in double quotes where that is safe (readable)."""
    if shlex.quote(arg) == arg:
        return arg
    if not any(c in arg for c in '"$`\\!'):
        return f'"{arg}"'
    return shlex.quote(arg)


def run_demo(seconds: float = 8.0, root: str | None = None,
             exchanges: list[str] | None = None) -> int:
    from ingestd.sim.venues import VENUES

    chosen = exchanges or sorted(VENUES)
    unknown = [e for e in chosen if e not in VENUES]
    if unknown:
        print(f"ingestd demo: no simulator for {', '.join(unknown)} "
              f"(have: {', '.join(sorted(VENUES))})", file=sys.stderr)
        return EX_CONFIG
    out = Path(root or "demo-data").resolve()
    code = run_loop(_demo(seconds, out, chosen))
    return code if code else EX_OK
