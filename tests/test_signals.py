"""The real `ingestd` process: SIGTERM drains everything received, exit 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from ingestd.sim import SimServer
from tests.support import read_table

CONFIG = """
[storage]
root = "{root}"
flush_interval_s = 5.0

[service]
shutdown_timeout_s = 10.0

[health]
listen = "127.0.0.1:0"

[log]
level = "info"
format = "json"

[[feeds]]
name = "spot"
exchange = "binance"
url = "{url}"
rest_url = "{rest}"
symbols = ["NKNUSDT", "LRCBTC", "BLZETH", "ZILUSDT", "DENTUSDT", "MANAUSDT"]
channels = ["trades", "quotes"]
trade_stream = "aggTrade"
"""


async def test_sigterm_commits_every_received_row(tmp_path: Path) -> None:
    root = tmp_path / "data"
    async with SimServer("binance", rate_msgs_s=150) as sim:
        cfg = tmp_path / "feeds.toml"
        cfg.write_text(CONFIG.format(root=root, url=sim.url, rest=sim.rest_url))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ingestd", "--config", str(cfg),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        # Mid-stream, with rows buffered (flush interval 5 s), ask it to stop.
        for _ in range(500):
            if len(sim.sent) >= 80:
                break
            await asyncio.sleep(0.02)
        assert len(sim.sent) >= 80
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=20)
    assert proc.returncode == 0, stderr.decode()
    logs = [json.loads(line) for line in stdout.decode().splitlines() if line.startswith("{")]
    stopped = [entry for entry in logs if entry["event"] == "feed_stopped"]
    assert len(stopped) == 1
    received = stopped[0]["messages"]
    assert received >= 80

    trades, quotes = read_table(root, "trades"), read_table(root, "quotes")
    # Every frame the daemon received is a row: nothing buffered was lost at shutdown.
    assert trades.height + quotes.height == received
    # And they are exactly the first frames the simulator sent, in order, no holes.
    sent = [json.loads(s.frame)["data"] for s in sim.sent][:received]
    assert [str(d["a"]) for d in sent if d.get("e") == "aggTrade"] == trades["trade_id"].to_list()
    assert [float(d["b"]) for d in sent if "e" not in d] == quotes["bid_price"].to_list()
    assert {entry["event"] for entry in logs} >= {"starting", "shutdown_requested", "stopped"}


async def test_sigterm_stops_the_daemon_when_its_stdout_is_gone(tmp_path: Path) -> None:
    """The log line of a shutdown request fails (the reader of stdout went away): the
    daemon still stops. It used to log before setting its stop flag and ran on."""
    root = tmp_path / "data"
    async with SimServer("binance", rate_msgs_s=50) as sim:
        cfg = tmp_path / "feeds.toml"
        cfg.write_text(CONFIG.format(root=root, url=sim.url, rest=sim.rest_url))
        read_fd, write_fd = os.pipe()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ingestd", "--config", str(cfg),
            stdout=write_fd, stderr=asyncio.subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        os.close(write_fd)
        def until_connected() -> None:
            with os.fdopen(read_fd, "rb") as out:
                for line in out:
                    if b'"feed_connected"' in line:
                        return

        await asyncio.wait_for(asyncio.to_thread(until_connected), timeout=30)
        # The pipe's only reader is closed: every later write to stdout fails (EPIPE).
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), timeout=30)
    assert proc.returncode is not None
