"""The supervisor of worker processes (`[service] workers = N > 1` or "auto").

Owns: the process systemd starts when there is more than one worker - N worker processes
of the same executable (`python -m ingestd --config X --worker-index i --workers N ...`,
internal flags), each running its share of the feeds (assign.py; the share is written to
the plan file, worker.py); start-ups one at a time (each worker's recovery adopts dead
journals by flock, and a start-up scans the journal and staging directories: two at once
could race on a directory just created and not yet locked); restarts of a worker that died,
with capped exponential backoff (one log event per state change); the one health/metrics
endpoint (health_proxy.py); signals - SIGTERM/SIGINT forwarded to every worker, then
`shutdown_timeout_s` (and a margin) before SIGKILL, a second signal forwarded too (the
workers force their exit, their journal kept); SIGHUP re-reads and validates the config
(an invalid one is logged and nothing changes), re-assigns, and signals only the workers
whose share changed, in two phases so that a feed never runs in two workers at once
(first every worker drops what it loses, then workers take what they gain); sd_notify -
READY=1 once every worker is ready, WATCHDOG=1 only while every worker is alive and its
/livez answers 200, STATUS= lines, RELOADING=1, STOPPING=1.

Workers die with the supervisor: `prctl(PR_SET_PDEATHSIG, SIGKILL)` in the child right
after fork (inherited through exec), re-armed by the worker, which also watches its parent
pid (worker.py). Workers run in their own session, so a terminal's Ctrl-C reaches only the
supervisor, which forwards it once. Under systemd keep `KillMode=mixed` (deploy/): a stop
signals the supervisor only, which drains the workers.

Must not: record anything itself, decode frames, or touch the workers' files (journals,
staging): the workers own them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import structlog

from ingestd import __version__
from ingestd.assign import assign, worker_count
from ingestd.checks import load_config
from ingestd.clock import SYSTEM_CLOCK, Clock
from ingestd.config import Config, ConfigError
from ingestd.health_proxy import Fetched, ProxyServer, WorkerClient, WorkerView
from ingestd.notify import Notifier
from ingestd.ratelimit_shared import reset_limits
from ingestd.worker import PLAN_VERSION, Plan, plan_path, remove_stale_plans, write_plan

log = structlog.get_logger("ingestd.supervisor")

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_FORCED = 130

RESTART_MIN_S = 0.5          # first restart delay after a worker died
RESTART_MAX_S = 10.0         # backoff cap (below systemd's WatchdogSec=30)
HEALTHY_RUN_S = 30.0         # a worker that ran this long restarts at the first delay again
START_TIMEOUT_S = 300.0      # longest wait for a worker's port before the next one starts
POLL_S = 1.0                 # how often the supervisor checks the workers (readiness, watchdog)
STOP_MARGIN_S = 2.0          # after shutdown_timeout_s, before SIGKILL
FORCED_WAIT_S = 1.5          # after a second signal, before SIGKILL
# Environment a worker must not inherit: only the supervisor talks to systemd.
PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
               "LISTEN_FDNAMES")


class HealthBindError(Exception):
    """The health endpoint's address cannot be bound."""


def _load_prctl() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn: Callable[..., int] = libc.prctl
        return fn
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return None


# Resolved before any fork: the child only calls it (no dlopen between fork and exec).
_PRCTL = _load_prctl()


def _child_after_fork() -> None:
    """In the child, between fork and exec: die with the parent."""
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG


@dataclass
class Worker:
    index: int
    feeds: list[str]
    state: str = "starting"    # starting | running | restarting | stopping | stopped
    proc: asyncio.subprocess.Process | None = None
    port: int | None = None
    restarts: int = 0
    started_mono: float | None = None
    last_exit: str | None = None
    generation: int = 0        # plan generation when it (re)started
    retired: bool = False
    live: bool = False
    ready: bool = False
    delay_s: float = RESTART_MIN_S
    keeper: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Supervisor:
    def __init__(self, cfg: Config, config_path: str, notifier: Notifier | None = None,
                 clock: Clock = SYSTEM_CLOCK, python: str | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.notifier = notifier or Notifier()
        self.clock = clock
        self.python = python or sys.executable
        self.local_dir = Path(cfg.storage.local_path)
        self.plan_file = plan_path(self.local_dir, os.getpid())
        self.generation = 0
        self.workers: dict[int, Worker] = {}
        self.state = "starting"
        self.health_port: int | None = None
        self.reloads = 0
        self.exit_code = EXIT_OK
        self._stop = asyncio.Event()
        self._signals = 0
        self._start_lock = asyncio.Lock()
        self._reload_lock = asyncio.Lock()
        self._background: list[asyncio.Task[Any]] = []
        self._client = WorkerClient()
        self._proxy: ProxyServer | None = None

    # ---- views for the health proxy --------------------------------------------------------
    def views(self) -> list[WorkerView]:
        now = self.clock.monotonic()
        out = []
        for w in sorted(self.workers.values(), key=lambda w: w.index):
            out.append(WorkerView(
                index=w.index, state=w.state, pid=None if w.proc is None else w.proc.pid,
                port=w.port, feeds=list(w.feeds), restarts=w.restarts,
                last_exit=w.last_exit,
                uptime_s=None if w.started_mono is None or not w.alive
                else now - w.started_mono))
        return out

    def status_line(self) -> str:
        running = sum(1 for w in self.workers.values() if w.state == "running")
        feeds = sum(len(w.feeds) for w in self.workers.values())
        restarts = sum(w.restarts for w in self.workers.values())
        return (f"{self.state}: {running}/{len(self.workers)} workers running, {feeds} feeds, "
                f"{restarts} worker restarts")

    # ---- plan ------------------------------------------------------------------------------
    async def _write_plan(self, cfg: Config, assignment: list[list[str]]) -> None:
        self.generation += 1
        plan = Plan(version=PLAN_VERSION, generation=self.generation, config=cfg,
                    assignment=assignment)
        await asyncio.to_thread(write_plan, self.plan_file, plan)

    # ---- signals ---------------------------------------------------------------------------
    def request_stop(self, reason: str = "requested") -> None:
        if not self._stop.is_set():
            # State first, log second: a log write that fails (stdout gone) must not
            # keep the supervisor from stopping.
            self.state = "stopping"
            self._stop.set()
            log.info("shutdown_requested", reason=reason)

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals == 1:
            self.request_stop(name)
            return
        log.error("forced_exit", signal=name, detail="forwarded to every worker")
        self.notifier.send("STATUS=forced exit")
        self.exit_code = EXIT_FORCED
        self._signal_workers(signal.SIGTERM)
        task = asyncio.ensure_future(self._force_after(FORCED_WAIT_S))
        self._background.append(task)

    async def _force_after(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        self._signal_workers(signal.SIGKILL)

    def _on_sighup(self) -> None:
        task = asyncio.ensure_future(self.reload())
        self._background.append(task)
        task.add_done_callback(self._background.remove)

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)

    def _remove_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)

    def _signal_workers(self, sig: int, only: set[int] | None = None) -> None:
        for w in self.workers.values():
            if w.alive and (only is None or w.index in only):
                assert w.proc is not None
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)

    # ---- one worker ------------------------------------------------------------------------
    def _argv(self, w: Worker, port_fd: int) -> list[str]:
        return [self.python, "-m", "ingestd", "--config", self.config_path,
                "--worker-index", str(w.index), "--workers", str(len(self.workers)),
                "--worker-plan", str(self.plan_file), "--worker-port-fd", str(port_fd),
                "--supervisor-pid", str(os.getpid())]

    async def _spawn(self, w: Worker) -> None:
        """Start the worker's process; return once it serves (reported its port), died,
        or START_TIMEOUT_S passed."""
        rfd, wfd = os.pipe()
        env = {k: v for k, v in os.environ.items() if k not in PRIVATE_ENV}
        try:
            w.proc = await asyncio.create_subprocess_exec(
                *self._argv(w, wfd), pass_fds=(wfd,), preexec_fn=_child_after_fork,
                start_new_session=True, env=env, stdin=asyncio.subprocess.DEVNULL)
        except OSError:
            os.close(rfd)
            raise
        finally:
            os.close(wfd)
        w.generation = self.generation
        w.started_mono = self.clock.monotonic()
        w.port = None
        w.live = w.ready = False
        w.state = "starting"
        log.info("worker_started", worker=w.index, pid=w.proc.pid, feeds=w.feeds,
                 restarts=w.restarts)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(rfd, "rb", 0))
        proc = w.proc
        read = asyncio.ensure_future(reader.readline())

        def served(task: asyncio.Future[bytes]) -> None:
            transport.close()
            line = b"" if task.cancelled() or task.exception() else task.result()
            if line.strip().isdigit() and w.proc is proc and proc.returncode is None:
                w.port = int(line)
                w.state = "running" if w.state == "starting" else w.state
                log.info("worker_serving", worker=w.index, pid=proc.pid, port=w.port)
                if w.generation != self.generation and w.state == "running":
                    # A reload wrote a newer plan while it started: make it read that one.
                    proc.send_signal(signal.SIGHUP)
                    w.generation = self.generation

        read.add_done_callback(served)
        done, _ = await asyncio.wait({read}, timeout=START_TIMEOUT_S)
        if not done:
            # Its port is taken whenever it comes (the read goes on); the next worker
            # starts meanwhile.
            log.error("worker_start_slow", worker=w.index, pid=proc.pid,
                      timeout_s=START_TIMEOUT_S, detail="starting the next worker anyway")

    async def _keep(self, w: Worker) -> None:
        """Run worker `w` until shutdown or retirement, restarting it when it dies."""
        while not self._stop.is_set() and not w.retired:
            async with self._start_lock:
                if self._stop.is_set() or w.retired:
                    break
                try:
                    await self._spawn(w)
                except OSError as e:
                    log.error("worker_spawn_failed", worker=w.index, error=str(e))
            if w.proc is not None:
                code = await w.proc.wait()
                w.last_exit = _describe_exit(code)
                ran_s = self.clock.monotonic() - (w.started_mono or 0.0)
            else:
                code, ran_s = -1, 0.0
            w.port = None
            w.live = w.ready = False
            if self._stop.is_set() or w.retired:
                w.state = "stopped"
                log.info("worker_exited", worker=w.index, exit=w.last_exit)
                break
            if ran_s >= HEALTHY_RUN_S:
                w.delay_s = RESTART_MIN_S
            delay_s = w.delay_s
            w.delay_s = min(RESTART_MAX_S, w.delay_s * 2)
            w.state = "restarting"
            log.error("worker_died", worker=w.index, exit=w.last_exit, ran_s=round(ran_s, 3),
                      restart_in_s=delay_s, feeds=w.feeds)
            self.notifier.status(f"worker {w.index} died ({w.last_exit}); restarting")
            w.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_or(w.wake), delay_s)
            w.restarts += 1
        if w.state != "stopped":
            w.state = "stopped"

    async def _stop_or(self, ev: asyncio.Event) -> None:
        stop = asyncio.ensure_future(self._stop.wait())
        other = asyncio.ensure_future(ev.wait())
        try:
            await asyncio.wait({stop, other}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            other.cancel()

    def _add_worker(self, index: int, feeds: list[str]) -> Worker:
        w = Worker(index=index, feeds=feeds)
        self.workers[index] = w
        w.keeper = asyncio.create_task(self._keep(w), name=f"keep-worker-{index}")
        return w

    # ---- monitoring ------------------------------------------------------------------------
    async def _poll(self) -> list[Fetched]:
        fetched = await self._client.fetch_all(self.views(), ["/health", "/livez"])
        for f in fetched:
            w = self.workers.get(f.view.index)
            if w is None:
                continue
            w.live = f.live is True
            status = None if f.health is None else f.health.get("status")
            w.ready = status in ("ok", "degraded")
        return fetched

    async def _monitor(self) -> None:
        """Readiness (READY=1 once every worker is ready), WATCHDOG=1 while every worker
        is alive and live, STATUS= every 10 s."""
        n = self.notifier
        period = min(POLL_S, n.watchdog_s / 2) if n.watchdog_s else POLL_S
        since_status = 0.0
        while True:
            await self._poll()
            if self.state == "starting" and not self._stop.is_set() and self.workers \
                    and all(w.ready for w in self.workers.values()):
                self.state = "ok"
                log.info("ready", workers=len(self.workers), health=self.health_port)
                n.ready(self.status_line())
            if n.watchdog_s and self.progressing():
                n.watchdog()
            since_status += period
            if since_status >= 10.0:
                since_status = 0.0
                n.status(self.status_line())
            await asyncio.sleep(period)

    def progressing(self) -> bool:
        """Every worker process is alive and either answers /livez with 200 or is still
        starting (a restarted worker's journal recovery runs before it serves): what
        WATCHDOG=1 stands for. A dead worker waiting for its restart stops the watchdog
        (RESTART_MAX_S stays below systemd's WatchdogSec)."""
        return bool(self.workers) and all(
            w.alive and (w.live if w.state == "running" else w.state == "starting")
            for w in self.workers.values())

    # ---- SIGHUP ----------------------------------------------------------------------------
    async def reload(self) -> bool:
        """Re-read and validate the config; re-assign; signal only the affected workers.
        Feeds a worker loses are stopped (committed) before any worker starts them."""
        if self._stop.is_set():
            return False
        async with self._reload_lock:
            if self._stop.is_set():
                return False
            self.notifier.reloading()
            try:
                new = await asyncio.to_thread(load_config, self.config_path)
            except ConfigError as e:
                log.error("reload_rejected", problems=e.problems)
                self.notifier.status(f"reload rejected: {e.problems[0]}; running config kept")
                self.notifier.send("READY=1")
                return False
            fixed = [name for name in ("storage", "journal", "queue", "health", "log")
                     if getattr(new, name) != getattr(self.cfg, name)]
            if new.service.shutdown_timeout_s != self.cfg.service.shutdown_timeout_s:
                fixed.append("service.shutdown_timeout_s")
            if fixed:
                log.warning("reload_needs_restart", sections=fixed,
                            detail="only [[feeds]] and [service] workers apply without a "
                                   "restart")
            # Only the feeds and the worker count change; every other section stays.
            new = msgspec.structs.replace(
                self.cfg, feeds=new.feeds,
                service=msgspec.structs.replace(self.cfg.service, workers=new.service.workers))
            await self._apply(new)
            self.reloads += 1
            self.notifier.send("READY=1", f"STATUS={self.status_line()}")
            return True

    async def _apply(self, new: Config) -> None:
        old_cfg = self.cfg
        old_n = len(self.workers)
        new_n = worker_count(new)
        target = assign(new.feeds, new_n)
        old_feeds = {f.name: f for f in old_cfg.feeds}
        new_feeds = {f.name: f for f in new.feeds}
        # Phase 1: every worker keeps only what it keeps in the new assignment.
        keep = [[n for n in self.workers[i].feeds if i < new_n and n in target[i]]
                for i in range(old_n)]
        touched = {i for i in range(min(old_n, new_n))
                   if keep[i] != self.workers[i].feeds
                   or any(old_feeds[n] != new_feeds.get(n) for n in keep[i])}
        retiring = set(range(new_n, old_n))
        moved = sorted(n for i in range(old_n) for n in self.workers[i].feeds
                       if n in new_feeds and (i >= new_n or n not in target[i]))
        self.cfg = new
        if touched or retiring:
            await self._write_plan(new, keep)
            for i in touched:
                self.workers[i].feeds = keep[i]
            for i in retiring:
                self.workers[i].retired = True
                self.workers[i].state = "stopping"
            self._signal_workers(signal.SIGHUP, only={i for i in touched
                                                      if self.workers[i].state == "running"})
            self._signal_workers(signal.SIGTERM, only=retiring)
            await self._wait_phase(touched, retiring, keep)
            for i in retiring:
                w = self.workers.pop(i)
                if w.keeper is not None:
                    await asyncio.gather(w.keeper, return_exceptions=True)
        if self._stop.is_set():
            log.warning("reload_abandoned", detail="shutdown began during the reload")
            return
        # Phase 2: workers take what they gain; new workers start.
        await self._write_plan(new, target)
        gaining = {i for i in range(min(old_n, new_n)) if target[i] != self.workers[i].feeds}
        for i in range(min(old_n, new_n)):
            self.workers[i].feeds = target[i]
        self._signal_workers(signal.SIGHUP, only={i for i in gaining
                                                  if self.workers[i].state == "running"})
        for i in range(old_n, new_n):
            self._add_worker(i, target[i])
        log.info("reloaded", added=sorted(set(new_feeds) - set(old_feeds)),
                 removed=sorted(set(old_feeds) - set(new_feeds)),
                 changed=sorted(n for n in set(old_feeds) & set(new_feeds)
                                if old_feeds[n] != new_feeds[n]),
                 moved=moved, workers=new_n, previous_workers=old_n,
                 signalled=sorted(touched | gaining), generation=self.generation)

    async def _wait_phase(self, touched: set[int], retiring: set[int],
                          keep: list[list[str]]) -> None:
        """Until every touched worker runs exactly its kept feeds and every retiring one
        has exited (bounded by the shutdown budget: a worker that does not answer is
        restarted by then, reading the current plan)."""
        deadline = self.clock.monotonic() + self.cfg.service.shutdown_timeout_s + STOP_MARGIN_S
        pending = set(touched)
        while self.clock.monotonic() < deadline and not self._stop.is_set():
            fetched = await self._client.fetch_all(
                [v for v in self.views() if v.index in pending], ["/health"])
            for f in fetched:
                w = self.workers[f.view.index]
                if w.state not in ("running", "starting") or (
                        f.health is not None
                        and set(f.health.get("feeds", {})) == set(keep[f.view.index])):
                    pending.discard(f.view.index)
            if not pending and not any(self.workers[i].alive for i in retiring):
                return
            await asyncio.sleep(0.05)
        log.warning("reload_phase_timeout", workers=sorted(pending),
                    detail="continuing; a worker that did not drop its feeds in time "
                           "may briefly record them twice")

    # ---- run -------------------------------------------------------------------------------
    async def run(self, install_signals: bool = True) -> int:
        if install_signals:
            self._install_signals()
        await asyncio.to_thread(reset_limits, self.local_dir)
        await asyncio.to_thread(remove_stale_plans, self.local_dir)
        n = worker_count(self.cfg)
        target = assign(self.cfg.feeds, n)
        await self._write_plan(self.cfg, target)
        host, _, port = self.cfg.health.listen.rpartition(":")
        self._proxy = ProxyServer(self.views, lambda: self.state, host.strip("[]"), int(port),
                                  self._client)
        try:
            self.health_port = await self._proxy.start()
        except OSError as e:
            if install_signals:
                self._remove_signals()
            raise HealthBindError(f"health.listen: cannot listen on {self.cfg.health.listen}: "
                                  f"{e.strerror or e}") from None
        log.info("starting", version=__version__, mode="supervisor", workers=n,
                 root=self.cfg.storage.root, local_dir=str(self.local_dir),
                 health=f"{host}:{self.health_port}",
                 assignment={str(i): names for i, names in enumerate(target)})
        for i, names in enumerate(target):
            self._add_worker(i, names)
        self._background.append(asyncio.create_task(self._monitor(), name="monitor"))
        await self._stop.wait()
        self.notifier.stopping()
        await self._shutdown()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._proxy is not None:
            await self._proxy.stop()
        if install_signals:
            self._remove_signals()
        with contextlib.suppress(OSError):
            await asyncio.to_thread(self.plan_file.unlink, missing_ok=True)
        log.info("stopped", exit_code=self.exit_code,
                 workers={str(w.index): w.last_exit for w in self.workers.values()})
        return self.exit_code

    async def _shutdown(self) -> None:
        for w in self.workers.values():
            if w.state in ("running", "starting"):
                w.state = "stopping"
            w.wake.set()
        self._signal_workers(signal.SIGTERM)
        keepers = [w.keeper for w in self.workers.values() if w.keeper is not None]
        budget_s = self.cfg.service.shutdown_timeout_s + STOP_MARGIN_S
        _, pending = await asyncio.wait(keepers, timeout=budget_s) if keepers else (set(), set())
        if pending:
            stuck = sorted(w.index for w in self.workers.values() if w.alive)
            log.error("shutdown_timeout", workers=stuck, timeout_s=budget_s,
                      detail="killing them; their journals are replayed at the next start")
            self._signal_workers(signal.SIGKILL)
            await asyncio.wait(keepers, timeout=5.0)
            self.exit_code = self.exit_code or EXIT_FATAL
        for w in self.workers.values():
            if w.proc is not None and w.proc.returncode not in (0, None) \
                    and self.exit_code == EXIT_OK:
                self.exit_code = EXIT_FATAL


__all__ = ["HealthBindError", "Supervisor"]
