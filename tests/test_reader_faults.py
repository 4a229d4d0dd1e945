"""Faults of one feed's connection that the reader must survive and account for: a URL no
connection can use (rejected by `ingestd check`; if one gets through anyway, every
unexpected connect failure is an `error` event and a retry with backoff), and frames
larger than `max_frame_bytes` (never delivered, closed with 1009, counted), the same with
either transport."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
import polars as pl
import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from ingestd.checks import parse_config
from ingestd.config import Config, ConfigError
from ingestd.daemon import Daemon
from ingestd.feed.transport import Connection, TransportClosed, connect
from tests.support import make_config, read_table, recorded_frames, run_daemon
from tests.test_reload_shutdown import SlowCloseVenue

FEED = {"name": "x", "exchange": "binance", "symbols": ["BTCUSDT"], "channels": ["trades"]}


def url_problems(url: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config({"storage": {"root": "/tmp/x"}, "feeds": [{**FEED, "url": url}]})
    return e.value.problems


@pytest.mark.parametrize(("url", "needle"), [
    ("ws://127.0.0.1:99999", "port '99999' is not a number in 1..65535"),
    ("ws://127.0.0.1:0", "port '0' is not a number in 1..65535"),
    ("ws://127.0.0.1:abc", "port 'abc' is not a number in 1..65535"),
    ("ws://127.0.0.1:-1", "port '-1' is not a number in 1..65535"),
    ("ws:///stream", "has no host"),
    ("ws://:9000/stream", "has no host"),
    ("wss://" + "a" * 64 + ".example.com/ws", "is not a valid host name"),
    ("ws://a..b/ws", "is not a valid host name"),
    ("ws://[::1/ws", "is not a valid URL"),
    ("http://127.0.0.1:9000", "must start with ws:// or wss://"),
    ("127.0.0.1:9000", "must start with ws:// or wss://"),
])
def test_a_url_no_connection_can_use_is_a_config_error(url: str, needle: str) -> None:
    problems = url_problems(url)
    assert any(p.startswith("<memory>: feeds[0] (x).url: ") and needle in p
               for p in problems), problems


@pytest.mark.parametrize("url", ["ws://127.0.0.1:9000", "wss://stream.binance.com:9443/ws",
                                 "ws://[::1]:9000/ws", "wss://example.com", "ws://localhost/"])
def test_usable_urls_pass(url: str) -> None:
    cfg = parse_config({"storage": {"root": "/tmp/x"}, "feeds": [{**FEED, "url": url}]})
    assert cfg.feeds[0].url == url


def test_rest_url_gets_the_same_checks() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"storage": {"root": "/tmp/x"},
                      "feeds": [{**FEED, "rest_url": "http://127.0.0.1:70000"}]})
    assert any("feeds[0] (x).rest_url: " in p and "1..65535" in p for p in e.value.problems)


def test_cli_check_lists_every_bad_url_and_exits_78(tmp_path: Path) -> None:
    cfg = tmp_path / "feeds.toml"
    cfg.write_text(f"""
[storage]
root = "{tmp_path}"

[[feeds]]
name = "a"
exchange = "binance"
symbols = ["BTCUSDT"]
channels = ["trades"]
url = "ws://127.0.0.1:99999"

[[feeds]]
name = "b"
exchange = "binance"
symbols = ["BTCUSDT"]
channels = ["trades"]
url = "ws:///stream"

[[feeds]]
name = "c"
exchange = "binance"
symbols = ["BTCUSDT"]
channels = ["trades"]
url = "ftp://127.0.0.1:21"
""")
    r = subprocess.run([sys.executable, "-m", "ingestd", "check", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 78, r.stderr
    assert f"{cfg}: feeds[0] (a).url: " in r.stderr and "'99999'" in r.stderr
    assert f"{cfg}: feeds[1] (b).url: " in r.stderr and "has no host" in r.stderr
    assert f"{cfg}: feeds[2] (c).url: " in r.stderr and "ws:// or wss://" in r.stderr
    assert "Traceback" not in r.stderr


# ---- supervision: an unexpected connect failure is an event and a retry ----------------
def unchecked(cfg: Config, **keys: object) -> Config:
    """`cfg` with its one feed changed *without* the config checks - as if a check were
    missing - so that the reader meets what the checker would have rejected."""
    feed = msgspec.structs.replace(cfg.feeds[0], **keys)
    return msgspec.structs.replace(cfg, feeds=(feed,))


@pytest.mark.parametrize(("url", "error"), [
    # The transport raises ValueError: neither a network error nor a handshake answer.
    ("ws://127.0.0.1:99999", "ValueError: Port out of range"),
    # Building the URL to connect to raises.
    ("ws://[::1/ws", "ValueError: Invalid IPv6 URL"),
])
async def test_an_unexpected_connect_failure_is_an_error_event_and_retried(
        root: Path, url: str, error: str) -> None:
    cfg = make_config(root, [{**FEED, "reconnect_min_delay_s": 0.01,
                              "reconnect_max_delay_s": 0.02, "breaker_failures": 3,
                              "breaker_cooldown_s": 0.2}])
    cfg = unchecked(cfg, url=url)

    def retried(d: object) -> bool:
        reader = getattr(d, "readers", {}).get("x")
        return reader is not None and reader.breaker.opens >= 2

    daemon = await run_daemon(cfg, retried, timeout_s=10)
    st = daemon.feed_stats["x"]
    assert st.connects == 0 and st.state == "stopped"
    events = read_table(root, "events")
    errors = events.filter(pl.col("event") == "error")["detail"].to_list()
    # Every attempt is recorded, classified as an unexpected connect failure: three
    # before the breaker opened, then at least the trial after the cooldown.
    assert len(errors) >= 4
    assert all(e.startswith(f"connect failed (unexpected): {error}") for e in errors), errors
    # ... and counted as a failed session: the breaker opened, half-opened, opened again.
    kinds = [k for k in events["event"].to_list() if k.startswith("breaker_")]
    assert kinds[:3] == ["breaker_open", "breaker_half_open", "breaker_open"]


# ---- frames larger than max_frame_bytes ------------------------------------------------
MIB = 1024 * 1024
TRANSPORTS = ["picows", "websockets"]


class BigFrameServer:
    """A real local WebSocket server that sends `before`, one message of `size` bytes
    (in `pieces` fragments), then `after`, and records the close code each connection
    got from the client."""

    def __init__(self, size: int, pieces: int = 1, before: list[bytes] | None = None,
                 after: list[bytes] | None = None) -> None:
        self.size = size
        self.pieces = pieces
        self.before = before or [b'{"n":1}']
        self.after = after or [b'{"n":2}']
        self.close_codes: list[int | None] = []
        self.open_connections = 0
        self._server: Server | None = None
        self.port = 0

    async def _handler(self, ws: ServerConnection) -> None:
        self.open_connections += 1
        try:
            for frame in self.before:
                await ws.send(frame, text=True)
            big = b"[" + b" " * (self.size - 2) + b"]"
            step = -(-self.size // self.pieces)
            if self.pieces == 1:
                await ws.send(big, text=True)
            else:
                await ws.send((big[i:i + step] for i in range(0, self.size, step)),
                              text=True)
            for frame in self.after:
                await ws.send(frame, text=True)
            await ws.wait_closed()
        except ConnectionClosed:
            pass
        finally:
            self.close_codes.append(ws.close_code)
            self.open_connections -= 1

    async def __aenter__(self) -> BigFrameServer:
        self._server = await serve(self._handler, "127.0.0.1", 0, compression=None,
                                   ping_interval=None, max_size=None)
        self.port = next(iter(self._server.sockets)).getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(("size", "pieces", "limit"), [
    (5 * MIB, 1, 1 * MIB),        # well over a small limit
    (20 * MIB, 1, 16 * MIB),      # over the default limit
    (5 * MIB, 10, 1 * MIB),       # fragments each under the limit, the message over it
])
async def test_an_oversized_frame_is_not_delivered_and_closes_with_1009(
        transport: str, size: int, pieces: int, limit: int) -> None:
    async with BigFrameServer(size, pieces) as server:
        conn = await connect(server.url, ping_interval_s=None, max_size=limit,
                             user_agent="test", transport=transport)
        got, closed = await receive_all(conn)
        await conn.close()
        await wait_until(lambda: server.close_codes)
    assert got == [b'{"n":1}']                      # the big one never delivered
    assert closed.code == 1009 and not closed.by_peer
    assert "closed by client: 1009" in closed.describe()
    assert server.close_codes == [1009]             # what the venue saw


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_frame_at_the_limit_is_delivered(transport: str) -> None:
    async with BigFrameServer(1 * MIB) as server:
        conn = await connect(server.url, ping_interval_s=None, max_size=1 * MIB,
                             user_agent="test", transport=transport)
        got: list[bytes] = []
        while len(got) < 3:
            got.extend((await asyncio.wait_for(conn.recv_batch(), 10))[1])
        await conn.close()
    assert [len(f) for f in got] == [7, MIB, 7]


async def receive_all(conn: Connection) -> tuple[list[bytes], TransportClosed]:
    """Every message until the connection ends, and how it ended."""
    got: list[bytes] = []
    while True:
        try:
            got.extend((await asyncio.wait_for(conn.recv_batch(), 10))[1])
        except TransportClosed as e:
            return got, e


async def wait_until(cond: Any, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_the_reader_counts_an_oversized_frame_and_says_so(
        root: Path, transport: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the daemon (INGESTD_TRANSPORT picks the transport): the trade before the
    oversized frame is stored, the oversized frame and what follows are not delivered,
    the session ends as oversized, and `oversized_frame` is counted (stats and metric)."""
    monkeypatch.setenv("INGESTD_TRANSPORT", transport)
    trades = recorded_frames("binance_spot", "aggTrade.jsonl")
    zil = [f for f in trades if b'"ZILUSDT"' in f]
    async with BigFrameServer(5 * MIB, before=zil[:1], after=zil[1:2]) as server:
        cfg = make_config(root, [{**FEED, "symbols": ["ZILUSDT"], "url": server.url,
                                  "trade_stream": "aggTrade", "max_frame_bytes": MIB,
                                  "reconnect_min_delay_s": 0.2,
                                  "reconnect_max_delay_s": 0.2}])
        daemon = Daemon(cfg)
        task = asyncio.create_task(daemon.run(install_signals=False))
        try:
            await wait_until(lambda: "x" in daemon.feed_stats
                             and daemon.feed_stats["x"].parse_errors["oversized_frame"] >= 1
                             and daemon.feed_stats["x"].state != "streaming")
            assert daemon.health_port is not None
            metrics = await get_metrics(daemon.health_port)
        finally:
            daemon.request_stop("test done")
            assert await asyncio.wait_for(task, 30) == 0
        await wait_until(lambda: server.open_connections == 0)
    st = daemon.feed_stats["x"]
    n = st.parse_errors["oversized_frame"]
    assert server.close_codes[:n] == [1009] * n     # the client closed each with 1009
    assert st.messages == len(server.close_codes)   # one trade per connection, no more
    assert metrics[("x", "oversized_frame")] >= 1
    stored = read_table(root, "trades")
    assert stored["trade_id"].unique().to_list() == ["18938405"]
    events = read_table(root, "events")
    ends = events.filter(pl.col("event") == "disconnected")["detail"].to_list()
    oversized = [d for d in ends if d.startswith("oversized frame")]
    assert len(oversized) == n and all(f"over {MIB} bytes" in d for d in oversized), ends


async def get_metrics(port: int) -> dict[tuple[str, str], float]:
    """ingestd_parse_errors from /metrics, by (feed, reason)."""
    from prometheus_client.parser import text_string_to_metric_families

    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return bytes(r.read()).decode()

    text = await asyncio.to_thread(fetch)
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "ingestd_parse_errors_total":
                out[(sample.labels["feed"], sample.labels["reason"])] = sample.value
    return out


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_server_that_closes_before_answering_the_upgrade_is_no_connection(
        transport: str) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(OSError):
            await connect(f"ws://127.0.0.1:{port}/", ping_interval_s=None, max_size=MIB,
                          user_agent="test", transport=transport)
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_cancelled_close_still_closes_the_connection(transport: str) -> None:
    """A close cancelled while it waits for the venue's answer (a session ending, a
    shutdown) still ends the TCP connection instead of leaving it open."""
    async with SlowCloseVenue([]) as venue:
        conn = await connect(f"ws://127.0.0.1:{venue.port}", ping_interval_s=None,
                             max_size=MIB, user_agent="test", transport=transport)
        closing = asyncio.create_task(conn.close(1000, "bye"))
        await asyncio.wait_for(venue.close_seen.wait(), 5)   # never answered
        closing.cancel()
        await asyncio.gather(closing, return_exceptions=True)
        await asyncio.wait_for(venue.client_gone.wait(), 1.0)
