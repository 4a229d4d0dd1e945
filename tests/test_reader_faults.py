"""Faults of one feed's connection that the reader must survive and account for: a URL no
connection can use (rejected by `ingestd check`; if one gets through anyway, every
unexpected connect failure is an `error` event and a retry with backoff), and frames
larger than `max_frame_bytes` (never delivered, closed with 1009, counted), the same with
either transport."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import msgspec
import polars as pl
import pytest

from ingestd.checks import parse_config
from ingestd.config import Config, ConfigError
from tests.support import make_config, read_table, run_daemon

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
