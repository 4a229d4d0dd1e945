"""Feeds that never silently die: faults injected by the simulator, recovery checked in
Parquet, `events`, breaker state and counters. The simulator runs in live mode (one
timeline published to every connection), so frames published while a feed is
disconnected are really missed and must show up as `gap` events."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from ingestd.daemon import Daemon
from ingestd.sim import Faults, SimServer
from tests.exchanges.test_binance import SPOT_BOOK, reference_books
from tests.support import feed_for, make_config, read_table, run_daemon
from tests.test_pipeline_binance import book_from_table

TRADE_SYMBOLS = ["ZILUSDT", "DENTUSDT", "MANAUSDT"]
FAST = {"reconnect_min_delay_s": 0.01, "reconnect_max_delay_s": 0.05,
        "healthy_session_s": 0.05}


def sent_trades(sim: SimServer) -> list[tuple[str, str]]:
    out = []
    for s in sim.sent:
        d = json.loads(s.frame)["data"]
        if d.get("e") == "aggTrade":
            out.append((d["s"], str(d["a"])))
    return out


def stored_trades(root: Path) -> list[tuple[str, str]]:
    t = read_table(root, "trades")
    return list(zip(t["symbol"], t["trade_id"], strict=True)) if t.height else []


def gap_ranges(root: Path) -> dict[str, list[tuple[int, int]]]:
    """Trade-id ranges reported missing by `gap` events, per symbol."""
    ev = read_table(root, "events").filter(pl.col("event") == "gap")
    ranges: dict[str, list[tuple[int, int]]] = {}
    for sym, detail in ev.select("symbol", "detail").iter_rows():
        m = re.match(r"trade id expected (\d+), got (\d+)", detail or "")
        if m:
            ranges.setdefault(sym, []).append((int(m.group(1)), int(m.group(2)) - 1))
    return ranges


def assert_no_silent_loss(root: Path, sim: SimServer, exact: bool) -> None:
    """Stored trades are unique and were all sent; every id missing between the first and
    last stored id of a symbol is covered by a `gap` event. With `exact`, everything the
    server sent is stored."""
    stored = stored_trades(root)
    sent = set(sent_trades(sim))
    assert len(stored) == len(set(stored)), "a trade was stored twice"
    assert set(stored) <= sent
    if exact:
        assert set(stored) == sent
    gaps = gap_ranges(root)
    for sym in {s for s, _ in stored}:
        ids = sorted(int(i) for s, i in stored if s == sym)
        missing = set(range(ids[0], ids[-1] + 1)) - set(ids)
        covered = {i for lo, hi in gaps.get(sym, []) for i in range(lo, hi + 1)}
        assert missing <= covered, f"{sym}: ids {sorted(missing - covered)} lost silently"


def feed_state(name: str) -> Any:
    def get(d: Daemon) -> Any:
        return d.feed_stats.get(name)
    return get


@pytest.mark.parametrize("mode", ["clean", "reset", "no_close_frame"])
async def test_drops_every_n_frames_recover_without_silent_loss(root: Path, mode: str) -> None:
    faults = Faults(close_every_n_frames=25, close_mode=mode)
    async with SimServer("binance", rate_msgs_s=300, faults=faults, live=True) as sim:
        feed = feed_for(sim, symbols=TRADE_SYMBOLS, channels=["trades"],
                        trade_stream="aggTrade", breaker_failures=1000, **FAST)
        cfg = make_config(root, [feed])
        daemon = await run_daemon(cfg, lambda d: sim.timeline_done, settle_s=0.3)
    st = daemon.feed_stats[feed["name"]]
    assert st.reconnects >= 2 and st.breaker == "closed"
    # Frames lost to a TCP reset may never reach the client; gap events must cover them.
    assert_no_silent_loss(root, sim, exact=mode != "reset")
    events = read_table(root, "events")
    assert events.filter(pl.col("event") == "connected").height == st.connects
    assert events.filter(pl.col("event") == "disconnected").height == st.connects
    if mode == "clean":
        assert "closed by venue: 1001 simulated restart" in events["detail"].to_list()
    if st.gaps:
        assert events.filter(pl.col("event") == "gap").height == st.gaps


async def test_accept_then_close_opens_the_breaker_and_spares_other_feeds(root: Path) -> None:
    bad_faults = Faults(accept_then_close=True)
    async with SimServer("binance", faults=bad_faults) as bad, \
            SimServer("binance", rate_msgs_s=400, live=True) as good:
        bad_feed = feed_for(bad, name="bad", symbols=["ZILUSDT"], channels=["trades"],
                            breaker_failures=3, breaker_cooldown_s=0.4,
                            reconnect_min_delay_s=0.01, reconnect_max_delay_s=0.02)
        good_feed = feed_for(good, name="good", symbols=TRADE_SYMBOLS, channels=["trades"],
                             trade_stream="aggTrade")
        cfg = make_config(root, [bad_feed, good_feed])
        def done(d: Daemon) -> bool:
            reader = d.readers.get("bad")
            return good.timeline_done and reader is not None and reader.breaker.opens >= 2

        loop_t0 = asyncio.get_running_loop().time()
        daemon = await run_daemon(cfg, done, timeout_s=20)
        elapsed = asyncio.get_running_loop().time() - loop_t0
    bad_reader = daemon.readers["bad"]
    assert bad_reader.breaker.opens >= 2
    # No tight loop: at most `breaker_failures` attempts per cooldown period (+ slack).
    assert bad.handshakes <= 3 * (elapsed / 0.4 + 2)
    assert daemon.feed_stats["bad"].messages == 0
    # The healthy feed never noticed.
    good_stats = daemon.feed_stats["good"]
    assert good_stats.reconnects == 0 and good_stats.gaps == 0
    stored = stored_trades(root)
    assert set(stored) == set(sent_trades(good)) and len(stored) == 145
    bad_events = read_table(root, "events").filter(pl.col("feed") == "bad")
    assert bad_events.filter(pl.col("event") == "disconnected").height >= 3
    # Every breaker transition is recorded: closed -> open -> half_open -> open ...
    transitions = [e for e in bad_events["event"].to_list() if e.startswith("breaker_")]
    assert transitions[:3] == ["breaker_open", "breaker_half_open", "breaker_open"]
    assert transitions.count("breaker_open") == bad_reader.breaker.opens


async def test_429_waits_at_least_retry_after(root: Path) -> None:
    faults = Faults(handshake_status=429, refuse_first_n=1, retry_after_s=1.0)
    async with SimServer("binance", faults=faults) as sim:
        feed = feed_for(sim, symbols=["ZILUSDT"], channels=["trades"], trade_stream="aggTrade",
                        **FAST)
        cfg = make_config(root, [feed])
        daemon = await run_daemon(cfg, lambda d: sim.connections >= 1
                                  and d.feed_stats[feed["name"]].messages >= 60)
    assert sim.handshake_times[1] - sim.handshake_times[0] >= 1.0
    assert daemon.feed_stats[feed["name"]].connects == 1


async def test_503_is_retried_and_404_trips_the_breaker(root: Path) -> None:
    async with SimServer("binance", faults=Faults(handshake_status=404)) as missing, \
            SimServer("binance", faults=Faults(handshake_status=503, refuse_first_n=3)) as busy:
        f404 = feed_for(missing, name="wrong-path", symbols=["ZILUSDT"], channels=["trades"],
                        breaker_cooldown_s=60, **FAST)
        f503 = feed_for(busy, name="busy", symbols=["ZILUSDT"], channels=["trades"],
                        trade_stream="aggTrade", **FAST)
        cfg = make_config(root, [f404, f503])
        daemon = await run_daemon(cfg, lambda d: "busy" in d.feed_stats
                                  and d.feed_stats["busy"].messages >= 60)
    assert busy.handshakes == 4
    wrong = daemon.readers["wrong-path"]
    assert missing.handshakes == 1 and wrong.breaker.state == "open"
    detail = read_table(root, "events").filter(pl.col("feed") == "wrong-path")["detail"]
    assert any("HTTP 404 (not retryable" in (d or "") for d in detail.to_list())


@pytest.mark.parametrize("fault", [
    Faults(black_hole=True, only_first_n=1),             # TCP open, no data, pings unanswered
    Faults(silent_after_n_frames=20, only_first_n=1),    # data stops, pings still answered
])
async def test_stale_stream_is_detected_and_recovered(root: Path, fault: Faults) -> None:
    async with SimServer("binance", rate_msgs_s=150, faults=fault, live=True) as sim, \
            SimServer("binance", rate_msgs_s=300, live=True) as other:
        feed = feed_for(sim, name="flaky", symbols=TRADE_SYMBOLS, channels=["trades"],
                        trade_stream="aggTrade", stale_after_s=0.4, **FAST)
        steady = feed_for(other, name="steady", symbols=TRADE_SYMBOLS, channels=["trades"],
                          trade_stream="aggTrade")
        cfg = make_config(root, [feed, steady])
        daemon = await run_daemon(cfg, lambda d: sim.timeline_done and other.timeline_done,
                                  settle_s=0.3)
    st = daemon.feed_stats["flaky"]
    assert st.stale >= 1 and st.reconnects >= 1 and st.messages > 0
    events = read_table(root, "events")
    flaky = events.filter(pl.col("feed") == "flaky")
    assert flaky.filter(pl.col("event") == "stale").height == st.stale
    assert any(d.startswith("stale: no data for 0.4 s")
               for d in flaky.filter(pl.col("event") == "disconnected")["detail"].to_list())
    assert daemon.feed_stats["steady"].stale == 0
    assert daemon.feed_stats["steady"].reconnects == 0


async def _rotation_run(root: Path, sim: SimServer, **keys: Any) -> Daemon:
    feed = feed_for(sim, symbols=SPOT_BOOK + TRADE_SYMBOLS, channels=["trades", "quotes", "book"],
                    trade_stream="aggTrade", **keys)
    cfg = make_config(root, [feed])
    return await run_daemon(cfg, lambda d: sim.timeline_done, timeout_s=30, settle_s=0.5)


def assert_seamless(root: Path, sim: SimServer, daemon: Daemon) -> None:
    st = next(iter(daemon.feed_stats.values()))
    assert st.reconnects >= 1
    assert st.gaps == 0 and st.resyncs == 0
    # Nothing missing, nothing doubled: trades, quotes and the rebuilt books.
    stored = stored_trades(root)
    assert len(stored) == len(set(stored)) == 145
    assert set(stored) == set(sent_trades(sim))
    quotes = read_table(root, "quotes")
    assert quotes.height == 84
    assert book_from_table(read_table(root, "book")) == reference_books(
        "binance_spot", SPOT_BOOK, futures=False)
    events = read_table(root, "events")
    rotated = events.filter(pl.col("detail").str.starts_with("rotated"))
    assert rotated.height == st.reconnects
    assert "gap" not in events["event"].to_list()


async def test_planned_rotation_is_make_before_break(root: Path) -> None:
    async with SimServer("binance", rate_msgs_s=120, live=True) as sim:
        daemon = await _rotation_run(root, sim, rotate_after_s=1.2)
    assert_seamless(root, sim, daemon)
    # During each switch both connections were open at once.
    assert sim.connections == daemon.feed_stats[next(iter(daemon.feed_stats))].connects


async def test_server_shutdown_triggers_rotation(root: Path) -> None:
    async with SimServer("binance", rate_msgs_s=120, live=True, shutdown_after_frames=150,
                         shutdown_grace_s=1.5) as sim:
        daemon = await _rotation_run(root, sim)
    assert_seamless(root, sim, daemon)
    events = read_table(root, "events")
    assert "server_shutdown" in events["event"].to_list()


async def test_a_healthy_trial_session_closes_the_breaker_while_it_streams(root: Path) -> None:
    """The venue fails (accept-then-close) until the breaker opens, then recovers: the
    trial connection streams, and once it has streamed `healthy_session_s` the breaker
    closes - while that session goes on (/health no longer says half_open). A later
    disconnect is then an ordinary reconnect, not a failed trial."""
    faults = Faults(accept_then_close=True)
    async with SimServer("binance", rate_msgs_s=40, faults=faults) as sim:
        feed = feed_for(sim, name="trial", symbols=TRADE_SYMBOLS, channels=["trades"],
                        trade_stream="aggTrade", breaker_failures=3, breaker_cooldown_s=0.3,
                        healthy_session_s=0.4, stale_after_s=2.0,
                        reconnect_min_delay_s=0.01, reconnect_max_delay_s=0.05)
        daemon = Daemon(make_config(root, [feed]))
        task = asyncio.create_task(daemon.run(install_signals=False))
        try:
            st = await wait_for_value(lambda: daemon.feed_stats.get("trial"))
            await wait_until(lambda: st.breaker == "open")
            faults.accept_then_close = False                        # the venue recovers
            await wait_until(lambda: st.breaker == "half_open" and st.state == "streaming"
                             and st.messages > 0)
            trial_connects = st.connects
            await wait_until(lambda: st.breaker == "closed")
            # Closed by the trial session itself, still streaming on that connection.
            assert st.connects == trial_connects and st.state == "streaming"
            # Later the venue drops that connection once: an ordinary reconnect.
            faults.only_first_n = sim.connections
            faults.close_every_n_frames = 1
            await wait_until(lambda: st.connects == trial_connects + 1
                             and st.state == "streaming")
            assert st.breaker == "closed"
        finally:
            daemon.request_stop("test done")
            assert await asyncio.wait_for(task, 30) == 0
    events = read_table(root, "events").filter(pl.col("feed") == "trial")
    kinds = [k for k in events["event"].to_list()
             if k.startswith("breaker_") or k in ("connected", "disconnected")]
    closed_at = kinds.index("breaker_closed")
    # breaker_closed came between the trial's `connected` and its `disconnected` ...
    assert kinds[closed_at - 1] == "connected" and kinds[closed_at - 2] == "breaker_half_open"
    # ... and nothing opened the breaker again.
    assert kinds[closed_at + 1:] == ["disconnected", "connected", "disconnected"]
    assert kinds.count("breaker_open") == 1


async def wait_until(cond: Any, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def wait_for_value(get: Any, timeout_s: float = 10.0) -> Any:
    await wait_until(lambda: get() is not None, timeout_s)
    return get()
