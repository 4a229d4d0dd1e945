"""Command line: argv -> config -> logging -> run. The only place that picks exit codes.

    ingestd --config PATH            run the daemon in the foreground
    ingestd check --config PATH      validate a config (every problem listed)
    ingestd demo [--seconds S] [--root DIR]
                                     run against the built-in exchange simulator
    ingestd compact --config PATH [--before YYYY-MM-DD] [--wait]
                                     merge closed days' part files into large sorted files
                                     (one run per root: a second run exits 75, or with
                                     --wait waits for the first to finish)
    ingestd replay --config PATH --out DIR [--since ISO] [--until ISO]
                                     re-derive every table from the kept raw frames
                                     ([journal] keep_raw_days) into a new root
    ingestd status [--config PATH | --url URL]
                                     a running daemon's /health as a table (exit 1 unless ok)
    ingestd sim --exchange ID [--port P]
                                     serve one simulated exchange until interrupted
    ingestd --version

With `[service] workers` > 1 (or "auto" on a multi-core host) `ingestd --config PATH` is
a supervisor of worker processes (supervisor.py); the workers are this same command with
internal flags (--worker-index ...), not shown in --help.

Exit codes: 0 clean shutdown; 78 (EX_CONFIG) invalid config or unusable output root,
with one clear message and no traceback; 75 (EX_TEMPFAIL) `compact` found another
compaction running on the root (retry later, or pass --wait); 1 any other fatal error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ingestd import __version__
from ingestd.runner import EX_CONFIG, EX_FATAL, EX_OK, EX_USAGE, run_loop

if TYPE_CHECKING:
    from ingestd.config import Config

__all__ = ["EX_CONFIG", "EX_FATAL", "EX_OK", "EX_TEMPFAIL", "EX_USAGE", "main"]

EX_TEMPFAIL = 75  # `compact`: another compaction holds the root's lock

COMMANDS = ("run", "check", "demo", "sim", "compact", "status", "replay")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ingestd",
        description="Record crypto exchanges' market data (trades, quotes, L2 books) "
                    "as partitioned Parquet.")
    p.add_argument("--version", action="version", version=f"ingestd {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    p.add_argument("--config", metavar="PATH", help="TOML config file (runs the daemon)")
    run = sub.add_parser("run", help="run the daemon in the foreground (the default)")
    run.add_argument("--config", metavar="PATH", required=True)
    check = sub.add_parser("check", help="validate a config file and exit")
    check.add_argument("--config", metavar="PATH", required=True)
    demo = sub.add_parser("demo", help="run against the built-in local exchange simulator")
    demo.add_argument("--seconds", type=float, default=8.0,
                      help="how long to record (default 8)")
    demo.add_argument("--root", metavar="DIR", default=None,
                      help="output root (default: ./demo-data)")
    demo.add_argument("--exchange", action="append", default=None,
                      help="exchange id to include (repeatable; default: all simulated)")
    compact = sub.add_parser(
        "compact", help="merge closed days' part files (idempotent; one run per root)",
        description="Merge closed days' part files into large files sorted by symbol and "
                    "ts_recv. One run per root at a time: if another compaction holds "
                    "<root>/.compaction/.lock this exits with code 75 (EX_TEMPFAIL) "
                    "unless --wait is given.")
    compact.add_argument("--config", metavar="PATH", required=True)
    compact.add_argument("--before", metavar="YYYY-MM-DD", default=None,
                         help="compact dates before this one (default: today, UTC)")
    compact.add_argument("--wait", action="store_true",
                         help="if another compaction is running on the root, wait for it "
                              "to finish instead of exiting with code 75")
    replay = sub.add_parser(
        "replay", help="re-derive every table from the kept raw frames into a new root",
        description="Replay the raw frames kept under <root>/.raw ([journal] "
                    "keep_raw_days) through today's codecs into a new root (for a codec "
                    "fix). Nothing under the live root changes.")
    replay.add_argument("--config", metavar="PATH", required=True)
    replay.add_argument("--out", metavar="DIR", required=True,
                        help="the new root (empty or absent; not inside the live root)")
    replay.add_argument("--since", metavar="ISO", default=None,
                        help="only rows received at or after this time (UTC unless given)")
    replay.add_argument("--until", metavar="ISO", default=None,
                        help="only rows received before this time")
    status = sub.add_parser("status", help="show a running daemon's /health as a table")
    status.add_argument("--config", metavar="PATH", help="read [health] listen from here")
    status.add_argument("--url", default=None, help="e.g. http://127.0.0.1:8080/health")
    sim = sub.add_parser("sim", help="serve one simulated exchange (recorded frames) locally")
    sim.add_argument("--exchange", required=True, help="exchange id, e.g. binance")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=9100)
    sim.add_argument("--rate", type=float, default=200.0, help="frames per second (0: max)")
    # Internal: how the supervisor (`[service] workers` > 1) starts a worker process.
    for flag, kind in (("--worker-index", int), ("--workers", int), ("--worker-plan", str),
                       ("--worker-port-fd", int), ("--supervisor-pid", int)):
        p.add_argument(flag, type=kind, default=None, help=argparse.SUPPRESS)
    return p


def _worker(args: argparse.Namespace) -> int:
    """A worker process of a supervisor: its share of the feeds, from the plan file (the
    config file may have been edited since: the supervisor validated what the plan holds)."""
    from ingestd.config import ConfigError
    from ingestd.daemon import HealthBindError
    from ingestd.logs import configure
    from ingestd.worker import read_plan, run_worker, whole_line_stdout

    if args.worker_plan is None or args.supervisor_pid is None or args.workers is None:
        print("ingestd: --worker-index is internal (the supervisor starts workers)",
              file=sys.stderr)
        return EX_USAGE
    plan_file = Path(args.worker_plan)
    try:
        plan = read_plan(plan_file)
    except ConfigError as e:
        print(f"ingestd: worker {args.worker_index}: {e.problems[0]}", file=sys.stderr)
        return EX_CONFIG
    whole_line_stdout()
    configure(plan.config.log.level, plan.config.log.format)
    sys.setswitchinterval(0.001)
    try:
        return run_loop(run_worker(args.config or "", args.worker_index, args.workers,
                                   plan_file, args.worker_port_fd, args.supervisor_pid))
    except HealthBindError as e:
        print(f"ingestd: worker {args.worker_index}: {e}", file=sys.stderr)
        return EX_FATAL
    except ConfigError as e:
        print(f"ingestd: worker {args.worker_index}: {e.problems[0]}", file=sys.stderr)
        return EX_CONFIG


def _supervise(cfg: Config, config_path: str) -> int:
    """`[service] workers` > 1: the supervisor of the worker processes."""
    from ingestd.logs import configure
    from ingestd.supervisor import HealthBindError, Supervisor
    from ingestd.worker import whole_line_stdout

    whole_line_stdout()
    configure(cfg.log.level, cfg.log.format)

    async def _main() -> int:
        return await Supervisor(cfg, config_path=config_path).run()

    try:
        return run_loop(_main())
    except HealthBindError as e:
        print(f"ingestd: {config_path}: {e}", file=sys.stderr)
        return EX_FATAL


def _status(url: str) -> int:
    from ingestd.status import fetch, render

    try:
        code, body = fetch(url)
    except OSError as e:
        print(f"ingestd status: cannot reach {url}: {e}", file=sys.stderr)
        return EX_FATAL
    print(render(body))
    return EX_OK if code == 200 else EX_FATAL


def _replay(cfg: Config, config_path: str, out: str, since: str | None,
            until: str | None) -> int:
    from ingestd.logs import configure
    from ingestd.replay import ReplayError, parse_time, replay, terminal_progress

    try:
        since_ns = None if since is None else parse_time(since)
        until_ns = None if until is None else parse_time(until)
    except ValueError as e:
        print(f"ingestd replay: {e}", file=sys.stderr)
        return EX_USAGE
    configure(cfg.log.level, cfg.log.format)
    try:
        r = replay(Path(cfg.storage.local_path), Path(out), since_ns=since_ns, until_ns=until_ns,
                   compression=cfg.storage.compression,
                   flush_max_rows=cfg.storage.flush_max_rows, progress=terminal_progress())
    except ReplayError as e:
        print(f"ingestd replay: {config_path}: {e}", file=sys.stderr)
        return EX_CONFIG
    if not r.segments:
        print(f"ingestd replay: no kept raw frames under {cfg.storage.local_path}/.raw for that "
              "window (set [journal] keep_raw_days to keep them)", file=sys.stderr)
        return EX_FATAL
    print(f"replayed {r.segments} segment(s) of {r.journals} journal(s): {r.records} "
          f"records -> {r.rows} rows in {r.files} file(s) under {out}")
    return EX_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "run"
    if args.worker_index is not None and command == "run":
        return _worker(args)
    if command == "demo":
        from ingestd.demo import run_demo
        return run_demo(seconds=args.seconds, root=args.root, exchanges=args.exchange)
    if command == "sim":
        from ingestd.sim.cli import serve_forever
        return run_loop(serve_forever(args.exchange, args.host, args.port, args.rate or None))
    if command == "status" and args.url:
        return _status(args.url)
    if not args.config:
        print("ingestd: --config PATH is required (see ingestd --help)", file=sys.stderr)
        return EX_USAGE

    from ingestd.checks import load_config
    from ingestd.config import ConfigError

    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        for problem in e.problems:
            print(f"ingestd: invalid config: {problem}", file=sys.stderr)
        return EX_CONFIG
    if command == "check":
        feeds = ", ".join(f"{f.name} ({f.exchange}: {len(f.symbols)} symbols)"
                          for f in cfg.feeds)
        print(f"{args.config}: OK - {len(cfg.feeds)} feed(s): {feeds}")
        from ingestd.assign import assignment_of, wants_supervisor

        if wants_supervisor(cfg):
            for i, names in enumerate(assignment_of(cfg)):
                print(f"  worker {i}: {', '.join(names) or '(idle)'}")
        return EX_OK

    if command == "status":
        host, _, port = cfg.health.listen.rpartition(":")
        if host in ("0.0.0.0", "::", "[::]"):
            host = "127.0.0.1"
        return _status(f"http://{host}:{port}/health")
    if command == "replay":
        return _replay(cfg, args.config, args.out, args.since, args.until)
    if command == "compact":
        from ingestd.sink.compact import CompactionBusy, compact_storage

        try:
            r = compact_storage(cfg.storage, args.before, wait=args.wait)
        except ValueError as e:
            print(str(e), file=sys.stderr)
            return EX_CONFIG
        except CompactionBusy as e:
            print(f"ingestd compact: {e}; nothing done (exit {EX_TEMPFAIL}): retry later, "
                  "or pass --wait to wait for it", file=sys.stderr)
            return EX_TEMPFAIL
        print(f"compacted {r.partitions} partition(s): {r.files_in} files -> {r.files_out}, "
              f"{r.rows} rows; {r.resumed} interrupted compaction(s) finished")
        return EX_OK

    from ingestd.daemon import Daemon, HealthBindError, UnusableRoot, check_root
    from ingestd.logs import configure

    configure(cfg.log.level, cfg.log.format)
    try:
        check_root(Daemon.root_of(cfg))
    except UnusableRoot as e:
        print(f"ingestd: {args.config}: {e}", file=sys.stderr)
        return EX_CONFIG

    from ingestd.assign import wants_supervisor

    if wants_supervisor(cfg):
        return _supervise(cfg, args.config)

    # The writer thread converts rows while the loop receives: hand the GIL over every
    # millisecond instead of every 5 so a conversion never stalls the sockets for long.
    sys.setswitchinterval(0.001)

    async def _main() -> int:
        return await Daemon(cfg, config_path=args.config).run()

    try:
        return run_loop(_main())
    except HealthBindError as e:
        print(f"ingestd: {args.config}: {e}", file=sys.stderr)
        return EX_FATAL
    except UnusableRoot as e:  # the storage the daemon builds (e.g. the store's client)
        print(f"ingestd: {args.config}: {e}", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:  # pragma: no cover - signals are handled in the loop
        return EX_FATAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
