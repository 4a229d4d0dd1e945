"""One worker process of a supervisor (`[service] workers > 1`): the daemon over a share of
the feeds.

Owns: the plan file `<local_dir>/.workers/plan-<supervisor pid>.json` that the
supervisor writes (the validated config and the feed names of each worker index;
`write_plan`/`read_plan`), and the worker's run: `run_worker` builds a `WorkerDaemon` -
the ordinary `Daemon` over this index's feeds, its health server on a private loopback
port (reported to the supervisor through the inherited pipe `--worker-port-fd`), no
sd_notify of its own, the per-venue connection limiters shared by every worker of the
host (ratelimit_shared.py) - and runs it until it ends. A SIGHUP reloads from the plan,
never from the config file: the supervisor validates the file, writes the plan, then
signals the workers whose share changed.

Dying with the supervisor: the supervisor sets `prctl(PR_SET_PDEATHSIG, SIGKILL)` in the
child right after fork (`set_pdeathsig`); the worker sets it again at start (harmless) and
then checks that its parent is still the supervisor (it may have died before); a watch of
the parent pid every `PARENT_CHECK_S` is the fallback where prctl is unavailable: an
orphaned worker makes its journal durable and exits at once (the next start recovers it).

State handed between workers: a worker that adopted (recovered) a dead process's journal
holding feeds that now belong to another worker saves those feeds' codec states (trade-id
de-duplication, last recv_seq) to `<local_dir>/.state/` before it reports its port - the
supervisor starts workers one at a time, so the owner reads them when it starts - and a
feed a reload takes away from a worker is saved the same way when it stops.

Must not: pick feeds itself (the plan does), talk to systemd, or outlive the supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import io
import os
import signal
import sys
from pathlib import Path
from typing import Any

import msgspec
import structlog

from ingestd.clock import SYSTEM_CLOCK, Clock
from ingestd.config import Config, ConfigError, HealthConfig
from ingestd.daemon import Daemon
from ingestd.exchanges import CODECS
from ingestd.feed.reader import FeedReader
from ingestd.notify import Notifier
from ingestd.ratelimit_shared import shared_limiters
from ingestd.sink.state import load_feed_state, save_feed_states

log = structlog.get_logger("ingestd.worker")

WORKERS_DIR = ".workers"
PLAN_VERSION = 1
PARENT_CHECK_S = 0.5
PR_SET_PDEATHSIG = 1


class Plan(msgspec.Struct, frozen=True):
    """What the supervisor decided: the config and each worker index's feed names."""

    version: int
    generation: int
    config: Config
    assignment: list[list[str]]


def plan_path(local_dir: Path, supervisor_pid: int) -> Path:
    """The plan of one supervisor (its pid in the name: two supervisors given one
    local_dir by mistake never read each other's plans)."""
    return local_dir / WORKERS_DIR / f"plan-{supervisor_pid}.json"


def remove_stale_plans(local_dir: Path) -> int:
    """Delete the plans of supervisors that are gone (blocking); how many."""
    d = local_dir / WORKERS_DIR
    if not d.is_dir():
        return 0
    removed = 0
    for p in d.glob("plan-*.json"):
        pid = p.stem.removeprefix("plan-")
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            p.unlink(missing_ok=True)
            removed += 1
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_plan(path: Path, plan: Plan) -> None:
    """Atomically replace the plan (temp file, fsync, rename). Blocking."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(msgspec.json.encode(plan))
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def read_plan(path: Path) -> Plan:
    """The plan, or ConfigError naming what is wrong with the file. Blocking."""
    try:
        plan = msgspec.json.decode(path.read_bytes(), type=Plan)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ConfigError([f"{path}: worker plan unreadable: {e}"]) from None
    if plan.version != PLAN_VERSION:
        raise ConfigError([f"{path}: worker plan version {plan.version}, "
                           f"expected {PLAN_VERSION}"])
    return plan


def share_of(plan: Plan, index: int) -> Config:
    """The config one worker runs: its feeds, a private loopback health port, one process."""
    if not 0 <= index < len(plan.assignment):
        raise ConfigError([f"worker index {index} is not in the plan "
                           f"({len(plan.assignment)} workers)"])
    mine = set(plan.assignment[index])
    cfg = plan.config
    return msgspec.structs.replace(
        cfg, feeds=tuple(f for f in cfg.feeds if f.name in mine),
        health=HealthConfig(listen="127.0.0.1:0"),
        service=msgspec.structs.replace(cfg.service, workers=1))


def whole_line_stdout() -> None:
    """Make every log line one write(2) to stdout. The supervisor and its workers share
    one stdout (a pipe to journald): with PYTHONUNBUFFERED (the systemd unit sets it),
    print() writes a line and its newline separately, and lines of two processes
    interleave. A buffered stdout flushed per line (structlog flushes each) writes both
    at once; lines up to PIPE_BUF (4 KiB) are then atomic on a pipe."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # pragma: no cover - no real stdout
        return
    sys.stdout.flush()
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(fd, "w", closefd=False),
                                                    buffer_size=1 << 16),
                                  encoding="utf-8", errors="backslashreplace")


def set_pdeathsig(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send `sig` to this process when its parent (thread) dies. Safe to call
    between fork and exec (no allocation beyond ctypes' own). False where unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return int(libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


class WorkerDaemon(Daemon):
    """The daemon of one worker: reloads read the plan; feeds it hands over keep state."""

    def __init__(self, cfg: Config, *, index: int, plan_file: Path,
                 clock: Clock = SYSTEM_CLOCK, config_path: str | None = None) -> None:
        super().__init__(cfg, clock=clock, config_path=config_path or str(plan_file),
                         notifier=Notifier(env={}))
        self.index = index
        self.plan_file = plan_file
        limits = {venue: codec.connect_limit for venue, codec in CODECS.items()}
        self.limiters.update(shared_limiters(self.local_dir, limits))

    def read_config(self) -> Config:
        return share_of(read_plan(self.plan_file), self.index)

    async def _stop_feed(self, name: str) -> FeedReader | None:
        reader = await super()._stop_feed(name)
        if reader is not None:
            # The feed may move to another worker (a reload): its successor starts from
            # this state instead of an older one (no replayed trade stored twice).
            saved = [(reader.feed, reader.codec.state(), reader.seq.last)]
            await asyncio.to_thread(save_feed_states, self.local_dir, saved)
        return reader

    def foreign_states(self) -> list[tuple[Any, dict[str, Any], int]]:
        """Recovered feeds this worker does not run, whose journal state is newer than
        their saved state (to be saved for the worker that runs them)."""
        if self.recovery is None:
            return []
        mine = {f.name for f in self.cfg.feeds}
        out = []
        for name, st in self.recovery.feeds.items():
            if name in mine:
                continue
            saved = load_feed_state(self.local_dir, st.codec.feed)
            if saved is None or saved[1] < st.last_seq:
                out.append((st.codec.feed, st.codec.state(), st.last_seq))
        return out


async def _report_port(daemon: WorkerDaemon, run: asyncio.Task[int], port_fd: int | None
                       ) -> None:
    """Once the daemon serves (recovery done), hand over foreign states, then tell the
    supervisor the health port."""
    while daemon.health_port is None:
        if run.done():
            return
        await asyncio.sleep(0.02)
    foreign = daemon.foreign_states()
    if foreign:
        await asyncio.to_thread(save_feed_states, daemon.local_dir, foreign)
        log.info("foreign_states_saved", feeds=sorted(f.name for f, _, _ in foreign))
    log.info("worker_port_reported", worker=daemon.index, port=daemon.health_port,
             feeds=[f.name for f in daemon.cfg.feeds])
    if port_fd is not None:
        try:
            os.write(port_fd, f"{daemon.health_port}\n".encode())
        except OSError as e:
            log.error("worker_port_report_failed", error=str(e))
        finally:
            os.close(port_fd)


async def _watch_parent(daemon: WorkerDaemon, supervisor_pid: int) -> None:
    """Fallback of PR_SET_PDEATHSIG: an orphan makes its journal durable and exits."""
    while True:
        await asyncio.sleep(PARENT_CHECK_S)
        if os.getppid() != supervisor_pid:
            log.error("supervisor_gone", worker=daemon.index, supervisor_pid=supervisor_pid,
                      detail="exiting; the journal is replayed at the next start")
            if daemon.journal is not None:
                daemon.journal.flush_blocking()
            os._exit(1)


async def run_worker(config_path: str, index: int, workers: int, plan_file: Path,
                     port_fd: int | None, supervisor_pid: int) -> int:
    """Run worker `index` of `workers` until it is stopped; its exit code."""
    structlog.contextvars.bind_contextvars(worker=index)
    set_pdeathsig()
    if os.getppid() != supervisor_pid:
        log.error("supervisor_gone", worker=index, supervisor_pid=supervisor_pid)
        return 1
    plan = await asyncio.to_thread(read_plan, plan_file)
    if len(plan.assignment) != workers:
        log.warning("worker_count_differs", worker=index, argv_workers=workers,
                    plan_workers=len(plan.assignment))
    cfg = share_of(plan, index)
    daemon = WorkerDaemon(cfg, index=index, plan_file=plan_file, config_path=config_path)
    run = asyncio.create_task(daemon.run(), name=f"worker-{index}")
    helpers = [asyncio.create_task(_report_port(daemon, run, port_fd), name="report-port"),
               asyncio.create_task(_watch_parent(daemon, supervisor_pid), name="parent")]
    try:
        return await run
    finally:
        for task in helpers:
            task.cancel()
        for task in helpers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for limiter in daemon.limiters.values():
            close = getattr(limiter, "close", None)
            if close is not None:
                close()


__all__ = ["PLAN_VERSION", "Plan", "WorkerDaemon", "plan_path", "read_plan",
           "remove_stale_plans", "run_worker", "set_pdeathsig", "share_of", "whole_line_stdout",
           "write_plan"]
