"""Operable as a service: HTTP endpoints, metrics, sd_notify, signals and hot reload."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from ingestd.cli import main as cli_main
from ingestd.daemon import Daemon
from ingestd.health import health_snapshot
from ingestd.sim import Faults, SimServer
from tests.support import feed_for, make_config, read_table, run_daemon

SYMS = ["ZILUSDT", "DENTUSDT", "MANAUSDT"]


async def get(port: int, path: str) -> tuple[int, bytes, str]:
    def _get() -> tuple[int, bytes, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                return r.status, r.read(), r.headers["Content-Type"]
        except urllib.error.HTTPError as e:
            return e.code, e.read(), e.headers["Content-Type"]
    return await asyncio.to_thread(_get)


async def test_endpoints_when_healthy_and_degraded(root: Path) -> None:
    async with SimServer("binance", rate_msgs_s=50, live=True) as good, \
            SimServer("binance", faults=Faults(handshake_status=503)) as refusing:
        feeds = [feed_for(good, name="good", symbols=SYMS, channels=["trades"],
                          trade_stream="aggTrade")]
        cfg = make_config(root, feeds)
        seen: dict[str, Any] = {}

        async def probe(d: Daemon) -> None:
            assert d.health_port
            seen["health"] = await get(d.health_port, "/health")
            seen["livez"] = await get(d.health_port, "/livez")
            seen["readyz"] = await get(d.health_port, "/readyz")
            seen["metrics"] = await get(d.health_port, "/metrics")
            seen["404"] = await get(d.health_port, "/nope")

        await _run_and_probe(cfg, lambda d: d.feed_stats.get("good") is not None
                             and d.feed_stats["good"].messages >= 5
                             and d.writer_stats.files_written > 0, probe)
        status, body, ctype = seen["health"]
        health = json.loads(body)
        assert status == 200 and ctype == "application/json"
        assert health["status"] == "ok"
        good_feed = health["feeds"]["good"]
        assert set(good_feed) >= {"state", "breaker", "messages", "last_message_age_s",
                                  "reconnects", "gaps"}
        assert good_feed["state"] == "streaming" and good_feed["breaker"] == "closed"
        assert set(health) >= {"status", "feeds", "queue", "writer"}
        assert seen["livez"][0] == 200 and seen["readyz"][0] == 200 and seen["404"][0] == 404
        families = {f.name: f for f in text_string_to_metric_families(
            seen["metrics"][1].decode())}
        for name in ("ingestd_feed_up", "ingestd_breaker_state", "ingestd_frames",
                     "ingestd_rows", "ingestd_queue_depth", "ingestd_rows_written",
                     "ingestd_writer_healthy", "ingestd_event_loop_lag_seconds",
                     "ingestd_flush_duration_seconds", "ingestd_journal_fsync_age_seconds",
                     "ingestd_last_message_age_seconds"):
            assert name in families, name
        up = {s.labels["feed"]: s.value for s in families["ingestd_feed_up"].samples}
        assert up == {"good": 1.0}
        rows = [s for s in families["ingestd_rows"].samples
                if s.labels == {"feed": "good", "exchange": "binance", "table": "trades"}]
        assert rows and rows[0].value >= 5

        # Degraded: add a feed whose server refuses every handshake.
        root2 = root.parent / "data2"
        cfg2 = make_config(root2, [*feeds, feed_for(refusing, name="refused", symbols=SYMS,
                                                   channels=["trades"], **{
                                                       "reconnect_min_delay_s": 0.05})])

        async def probe2(d: Daemon) -> None:
            assert d.health_port
            seen["degraded"] = await get(d.health_port, "/health")
            seen["degraded_metrics"] = await get(d.health_port, "/metrics")

        await _run_and_probe(cfg2, lambda d: refusing.handshakes >= 2
                             and d.feed_stats.get("good") is not None
                             and d.feed_stats["good"].messages >= 1, probe2)
    status, body, _ = seen["degraded"]
    health = json.loads(body)
    assert status == 503 and health["status"] == "degraded"
    assert health["feeds"]["good"]["state"] == "streaming"
    assert health["feeds"]["refused"]["state"] in ("connecting", "reconnecting")
    assert "HTTP 503" in health["feeds"]["refused"]["last_error"]
    fams = {f.name: f for f in text_string_to_metric_families(
        seen["degraded_metrics"][1].decode())}
    up = {s.labels["feed"]: s.value for s in fams["ingestd_feed_up"].samples}
    assert up == {"good": 1.0, "refused": 0.0}


async def _run_and_probe(cfg: Any, cond: Any, probe: Any) -> Daemon:
    done = asyncio.Event()

    def until(d: Daemon) -> bool:
        if cond(d) and not done.is_set() and not getattr(d, "_probing", False):
            d._probing = True  # type: ignore[attr-defined]
            task = asyncio.ensure_future(probe(d))
            task.add_done_callback(lambda t: (t.result(), done.set()))
        return done.is_set()

    return await run_daemon(cfg, until, timeout_s=20)


async def test_health_while_stopping_is_503(root: Path) -> None:
    async with SimServer("binance", rate_msgs_s=50, live=True) as sim:
        cfg = make_config(root, [feed_for(sim, symbols=SYMS, channels=["trades"],
                                          trade_stream="aggTrade")])
        daemon = Daemon(cfg)
        task = asyncio.create_task(daemon.run(install_signals=False))
        while daemon.state != "ok":
            await asyncio.sleep(0.01)
        assert health_snapshot(daemon)[1]["status"] in ("ok", "degraded")
        daemon.request_stop("test")
        code, body = health_snapshot(daemon)
        assert code == 503 and body["status"] == "stopping"
        assert await task == 0


# ---- the real process: sd_notify, double signal, SIGHUP ---------------------------------
def config_text(root: Path, feeds: list[dict[str, Any]]) -> str:
    out = [f'[storage]\nroot = "{root}"\nflush_interval_s = 0.2\n',
           '[journal]\nfsync_interval_s = 0.05\n',
           '[health]\nlisten = "127.0.0.1:0"\n', '[log]\nlevel = "info"\nformat = "json"\n']
    for f in feeds:
        out.append("[[feeds]]")
        for k, v in f.items():
            out.append(f"{k} = {json.dumps(v)}")
        out.append("")
    return "\n".join(out)


class Proc:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.logs: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            if line.startswith(b"{"):
                self.logs.append(json.loads(line))

    async def wait_log(self, event: str, timeout_s: float = 15.0, n: int = 1) -> dict[str, Any]:
        for _ in range(int(timeout_s / 0.02)):
            found = [e for e in self.logs if e["event"] == event]
            if len(found) >= n:
                return found[n - 1]
            await asyncio.sleep(0.02)
        raise TimeoutError(f"no {event!r} log line; saw {[e['event'] for e in self.logs]}")

    async def health(self) -> dict[str, Any]:
        port = int((await self.wait_log("starting"))["health"].rsplit(":", 1)[1])
        return json.loads((await get(port, "/health"))[1])

    async def finish(self, timeout_s: float = 20.0) -> int:
        code = await asyncio.wait_for(self.proc.wait(), timeout_s)
        await self._reader
        return code


async def spawn(cfg: Path, env: dict[str, str] | None = None) -> Proc:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ingestd", "--config", str(cfg),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    return Proc(proc)


async def test_sd_notify_ready_watchdog_status_stopping(tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    async with SimServer("binance", rate_msgs_s=20, live=True) as sim:
        cfg = tmp_path / "feeds.toml"
        cfg.write_text(config_text(tmp_path / "data", [feed_for(sim, name="a", symbols=SYMS,
                                                                channels=["trades"])]))
        p = await spawn(cfg, {"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"})
        messages: list[str] = []
        for _ in range(300):
            try:
                messages.append((await asyncio.wait_for(loop.sock_recv(sock, 4096), 0.05))
                                .decode())
            except TimeoutError:
                pass
            if sum("WATCHDOG=1" in m for m in messages) >= 3:
                break
        p.proc.send_signal(signal.SIGTERM)
        assert await p.finish() == 0
        while True:
            try:
                messages.append(sock.recv(4096).decode())
            except BlockingIOError:
                break
    sock.close()
    ready = [m for m in messages if "READY=1" in m]
    assert ready and "STATUS=ok: " in ready[0] and f"MAINPID={p.proc.pid}" in ready[0]
    assert messages.index(ready[0]) < next(i for i, m in enumerate(messages)
                                       if "WATCHDOG=1" in m)
    assert sum("WATCHDOG=1" in m for m in messages) >= 3
    assert any("STOPPING=1" in m for m in messages)


async def test_second_signal_forces_exit_and_the_journal_keeps_everything(
        tmp_path: Path) -> None:
    root = tmp_path / "data"
    async with SimServer("binance", rate_msgs_s=200, live=True) as sim:
        feed = feed_for(sim, name="a", symbols=SYMS, channels=["trades"],
                        trade_stream="aggTrade")
        cfg = tmp_path / "feeds.toml"
        cfg.write_text(config_text(root, [feed]).replace("flush_interval_s = 0.2",
                                                         "flush_interval_s = 30"))
        p = await spawn(cfg)
        for _ in range(500):
            if len(sim.sent) >= 60:
                break
            await asyncio.sleep(0.01)
        # Commits of trades cannot succeed (a file sits where the table directory must
        # go), so the drain keeps retrying: only a second signal ends it.
        (root / "trades").write_text("in the way")
        p.proc.send_signal(signal.SIGTERM)
        await p.wait_log("shutdown_requested")  # pending signals of one kind coalesce
        p.proc.send_signal(signal.SIGTERM)
        t0 = loop_time()
        code = await p.finish()
        assert code == 130 and loop_time() - t0 < 2.0
        received = len(sim.sent)
        assert not list(root.glob("trades/**/*.parquet"))
        # Restart (the disk is fixed): recovery commits what the journal holds.
        (root / "trades").unlink()
        p2 = await spawn(cfg)
        rec = await p2.wait_log("recovered_from_journal")
        p2.proc.send_signal(signal.SIGTERM)
        assert await p2.finish() == 0
    assert rec["rows_committed"] > 0
    trades = read_table(root, "trades")
    ids = trades["trade_id"].to_list()
    assert len(ids) == len(set(ids)) and len(ids) >= 60
    assert received >= len(ids)


def loop_time() -> float:
    return asyncio.get_running_loop().time()


async def test_sighup_adds_removes_changes_and_rejects(tmp_path: Path) -> None:
    root = tmp_path / "data"
    sims = {n: SimServer("binance", rate_msgs_s=20, live=True) for n in "abcd"}
    for s in sims.values():
        await s.start()
    try:
        def feed(n: str, symbols: list[str]) -> dict[str, Any]:
            return feed_for(sims[n], name=n, symbols=symbols, channels=["trades"],
                            trade_stream="aggTrade")

        cfg = tmp_path / "feeds.toml"
        cfg.write_text(config_text(root, [feed("a", SYMS), feed("b", SYMS), feed("c", SYMS)]))
        p = await spawn(cfg)
        for _ in range(500):
            h = await p.health() if p.logs else {}
            if h and all(f["state"] == "streaming" for f in h["feeds"].values()) \
                    and len(h["feeds"]) == 3:
                break
            await asyncio.sleep(0.02)
        # a untouched, b removed, c changed (a symbol fewer), d added.
        cfg.write_text(config_text(root, [feed("a", SYMS), feed("c", SYMS[:2]),
                                          feed("d", SYMS)]))
        p.proc.send_signal(signal.SIGHUP)
        reloaded = await p.wait_log("reloaded")
        assert reloaded["added"] == ["d"] and reloaded["removed"] == ["b"]
        assert reloaded["changed"] == ["c"] and reloaded["unchanged"] == ["a"]
        for _ in range(500):
            h = await p.health()
            if set(h["feeds"]) == {"a", "c", "d"} and all(
                    f["state"] == "streaming" for f in h["feeds"].values()):
                break
            await asyncio.sleep(0.02)
        assert set(h["feeds"]) == {"a", "c", "d"}
        assert sims["a"].connections == 1          # kept its connection
        assert sims["c"].connections == 2          # restarted with the new config
        assert sims["d"].connections == 1 and sims["b"].connections == 1
        # An invalid config is rejected; the running one stays.
        cfg.write_text("[storage]\nroot = 5\n")
        p.proc.send_signal(signal.SIGHUP)
        rejected = await p.wait_log("reload_rejected")
        assert any("storage.root" in x for x in rejected["problems"])
        h = await p.health()
        assert set(h["feeds"]) == {"a", "c", "d"}
        p.proc.send_signal(signal.SIGTERM)
        assert await p.finish() == 0
    finally:
        for s in sims.values():
            await s.stop()
    events = read_table(root, "events")
    b_events = events.filter(events["feed"] == "b")["event"].to_list()
    assert b_events[0] == "connected" and b_events[-1] == "disconnected"


def test_status_command_renders_health(tmp_path: Path, capsys: Any) -> None:
    async def scenario() -> int:
        async with SimServer("binance", rate_msgs_s=50, live=True) as sim:
            cfg = make_config(tmp_path / "d", [feed_for(sim, name="spot", symbols=SYMS,
                                                        channels=["trades"],
                                                        trade_stream="aggTrade")])
            daemon = Daemon(cfg)
            task = asyncio.create_task(daemon.run(install_signals=False))
            for _ in range(500):
                st = daemon.feed_stats.get("spot")
                if st and st.messages and daemon.writer_stats.files_written:
                    break
                await asyncio.sleep(0.02)
            code = await asyncio.to_thread(
                cli_main, ["status", "--url", f"http://127.0.0.1:{daemon.health_port}/health"])
            daemon.request_stop()
            await task
            return code

    assert asyncio.run(scenario()) == 0
    out = capsys.readouterr().out
    assert "status: ok" in out.splitlines()
    assert "spot" in out and "streaming" in out and "writer: committing" in out


async def test_slow_and_abusive_clients_do_not_stall_the_daemon(root: Path) -> None:
    async with SimServer("binance", rate_msgs_s=200, live=True) as sim:
        cfg = make_config(root, [feed_for(sim, name="f", symbols=SYMS, channels=["trades"],
                                          trade_stream="aggTrade")])
        results: dict[str, Any] = {}

        async def probe(d: Daemon) -> None:
            assert d.health_port
            port = d.health_port
            # 50 clients that connect and never send a request, 20 that send half a request.
            idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(50)]
            partial = []
            for _ in range(20):
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finished
                partial.append((r, w))
            before = d.feed_stats["f"].messages
            t0 = asyncio.get_running_loop().time()
            results["health"] = await get(port, "/health")
            results["elapsed"] = asyncio.get_running_loop().time() - t0
            await asyncio.sleep(0.5)
            results["streamed"] = d.feed_stats["f"].messages - before
            results["lag"] = d.loop_lag_max_s
            for _, w in idle + partial:
                w.close()

        await _run_and_probe(cfg, lambda d: d.feed_stats.get("f") is not None
                             and d.feed_stats["f"].messages > 5, probe)
    assert results["health"][0] == 200
    assert results["streamed"] > 20          # the feed kept streaming meanwhile
    assert results["lag"] < 0.5              # the loop was never blocked
