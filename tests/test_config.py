"""Config loading: defaults, every problem reported with its key, the CLI's exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ingestd.checks import load_config, parse_config
from ingestd.config import ConfigError

MINIMAL = """
[storage]
root = "{root}"

[[feeds]]
name = "binance-main"
exchange = "binance"
symbols = ["BTCUSDT", "ETHUSDT"]
channels = ["trades", "quotes", "book"]
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "feeds.toml"
    p.write_text(text)
    return p


def problems_of(text: str, tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    return e.value.problems


def test_minimal_config_gets_the_contract_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL.format(root=tmp_path)))
    assert cfg.storage.flush_interval_s == 1.0
    assert cfg.journal.enabled is True and cfg.journal.fsync_interval_s == 0.2
    assert cfg.queue.capacity == 100_000 and cfg.queue.when_full == "block"
    assert cfg.service.shutdown_timeout_s == 10.0
    assert cfg.health.listen == "127.0.0.1:8080"
    assert cfg.log.level == "info" and cfg.log.format == "json"
    (feed,) = cfg.feeds
    assert feed.symbols == ("BTCUSDT", "ETHUSDT")
    assert feed.reconnect_min_delay_s == 0.5 and feed.reconnect_max_delay_s == 30.0
    assert feed.breaker_failures == 5 and feed.breaker_cooldown_s == 30.0
    assert feed.max_frame_bytes == 16777216


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL.format(root=tmp_path)))
    with pytest.raises(AttributeError):
        cfg.storage.root = "/elsewhere"  # type: ignore[misc]


def test_shipped_configs_are_valid() -> None:
    repo = Path(__file__).resolve().parents[1]
    for name in ("feeds.toml", "demo.toml"):
        cfg = load_config(repo / "config" / name)
        assert cfg.feeds


def test_every_problem_is_reported_with_its_key(tmp_path: Path) -> None:
    text = """
[storage]
root = "/tmp/x"
flush_interval_s = -1
colour = "blue"

[queue]
when_full = "explode"

[health]
listen = "localhost"

[[feeds]]
name = "a"
exchange = "nasdaq"
symbols = ["BTCUSDT"]
channels = ["trades", "candles"]

[[feeds]]
name = "a"
exchange = "binance"
symbols = "BTCUSDT"
channels = ["trades"]
"""
    problems = problems_of(text, tmp_path)
    joined = "\n".join(problems)
    assert all(p.startswith(str(tmp_path / "feeds.toml") + ": ") for p in problems)
    assert "storage.flush_interval_s: Expected `float` > 0.0" in joined
    assert "storage.colour: unknown key" in joined
    assert "queue.when_full: Invalid enum value 'explode'" in joined
    assert "health.listen: expected HOST:PORT" in joined
    assert "feeds[0] (a).channels: Invalid enum value 'candles'" in joined
    assert "feeds[1] (a).symbols: Expected `array`, got `str`" in joined
    assert len(problems) >= 6


@pytest.mark.parametrize(("snippet", "needle"), [
    ("", "feeds: at least one [[feeds]] entry is required"),
    ('[[feeds]]\nname="x"\nexchange="nasdaq"\nsymbols=["A"]\nchannels=["trades"]',
     "feeds[0] (x).exchange: unknown exchange 'nasdaq'"),
    ('[[feeds]]\nname="x"\nexchange="binance"\nsymbols=["btcusdt"]\nchannels=["trades"]',
     "is not Binance-native"),
    ('[[feeds]]\nname="x"\nexchange="binance"\nsymbols=["BTCUSDT"]\nchannels=[]',
     "channels: at least one channel is required"),
    ('[[feeds]]\nname="x"\nexchange="binance"\nsymbols=["BTCUSDT"]\nchannels=["trades"]\n'
     'url="http://127.0.0.1:1"', "url: 'http://127.0.0.1:1' must start with ws:// or wss://"),
    ('[[feeds]]\nname="x"\nexchange="binance"\nsymbols=["BTCUSDT"]\nchannels=["trades"]\n'
     'trade_stream="kline"', "trade_stream: 'kline' is not one of"),
    ('[[feeds]]\nname="x"\nexchange="binance"\nsymbols=["BTCUSDT"]\nchannels=["trades"]\n'
     'reconnect_min_delay_s=60', "reconnect_min_delay_s: must not exceed"),
    ('[[feeds]]\nname="x"\nexchange="binance"\nsymbols=["BTCUSDT"]\nchannels=["trades"]\n'
     'breaker_failures=1.5', "breaker_failures: Expected `int`, got `float`"),
    ('[[feeds]]\nexchange="binance"\nsymbols=["BTCUSDT"]\nchannels=["trades"]',
     "feeds[0].name: required key is missing"),
])
def test_single_problems(tmp_path: Path, snippet: str, needle: str) -> None:
    text = f'[storage]\nroot = "/tmp/x"\n{snippet}\n'
    assert any(needle in p for p in problems_of(text, tmp_path)), problems_of(text, tmp_path)


def test_missing_root_and_bad_toml(tmp_path: Path) -> None:
    assert any("storage.root: required key is missing" in p
               for p in problems_of('[[feeds]]\nname="x"\nexchange="binance"\n'
                                    'symbols=["A"]\nchannels=["trades"]', tmp_path))
    assert any("invalid TOML" in p for p in problems_of("[storage\nroot=", tmp_path))
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")


def test_parse_config_accepts_a_mapping() -> None:
    cfg = parse_config({"storage": {"root": "/r"}, "feeds": [
        {"name": "b", "exchange": "binance", "symbols": ["BTCUSDT"], "channels": ["book"]}]})
    assert cfg.feed("b").channels == ("book",)


# ---- the CLI ----------------------------------------------------------------------------
def ingestd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "ingestd", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_cli_version() -> None:
    from ingestd import __version__
    r = ingestd("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"ingestd {__version__}"


def test_cli_check_ok_and_bad(tmp_path: Path) -> None:
    good = write(tmp_path, MINIMAL.format(root=tmp_path))
    r = ingestd("check", "--config", str(good))
    assert r.returncode == 0 and "OK" in r.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(MINIMAL.format(root=tmp_path).replace('"quotes"', '"qoutes"'))
    r = ingestd("check", "--config", str(bad))
    assert r.returncode == 78
    assert f"{bad}: feeds[0] (binance-main).channels: Invalid enum value 'qoutes'" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_run_with_bad_config_exits_78_naming_the_key(tmp_path: Path) -> None:
    bad = write(tmp_path, MINIMAL.format(root=tmp_path) + "\n[queue]\ncapacity = \"lots\"\n")
    r = ingestd("--config", str(bad))
    assert r.returncode == 78
    assert "queue.capacity: Expected `int`, got `str`" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_unusable_root_exits_78(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cfg = write(tmp_path, MINIMAL.format(root=blocker / "sub"))
    r = ingestd("--config", str(cfg))
    assert r.returncode == 78
    assert "storage.root" in r.stderr and "not a usable output directory" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_missing_config_file_exits_78(tmp_path: Path) -> None:
    r = ingestd("--config", str(tmp_path / "missing.toml"))
    assert r.returncode == 78 and "file not found" in r.stderr


def test_an_unknown_object_store_option_is_named() -> None:
    """A misspelt `[storage.options]` key was accepted and silently ignored (the store
    then used its defaults, e.g. AWS instead of the intended endpoint)."""
    feed = {"name": "a", "exchange": "binance", "symbols": ["BTCUSDT"], "channels": ["trades"]}
    storage = {"root": "s3://bucket/p", "local_dir": "/tmp/x",
               "options": {"endpont_url": "http://127.0.0.1:1"}}
    with pytest.raises(ConfigError) as e:
        parse_config({"storage": storage, "feeds": [feed]})
    assert "storage.options.endpont_url: unknown option" in str(e.value)
    assert "endpoint_url" in str(e.value)
    ok = {**storage, "options": {"endpoint_url": "http://127.0.0.1:1", "allow_http": True,
                                 "region": "us-east-1", "upload_concurrency": 2}}
    parse_config({"storage": ok, "feeds": [feed]})
    # Delta passes delta-rs' own object-store keys through.
    delta = {**ok, "format": "delta", "options": {**ok["options"], "conditional_put": "etag",
                                                  "aws_s3_allow_unsafe_rename": "true"}}
    parse_config({"storage": delta, "feeds": [feed]})
    with pytest.raises(ConfigError):
        parse_config({"storage": {**delta, "options": {"regoin": "x"}}, "feeds": [feed]})
