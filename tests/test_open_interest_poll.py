"""Periodic REST polls (feed/polls.py) end to end: Binance USD-M open interest lands in the
derivatives table; failed answers (HTTP errors, 429 with Retry-After, garbage, timeouts)
become events while polling goes on; a kill -9 and the recovery replay polled answers
exactly once.

The venue is the simulator (WebSocket and its recorded `/fapi/v1/openInterest` answers);
faults come from a loopback REST server in front of it that answers a scripted list of
failures first, then whatever the simulated venue answers.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from ingestd.clock import SYSTEM_CLOCK
from ingestd.exchanges.base import RestRequest
from ingestd.feed.polls import RATE_LIMIT_PAUSE_S, Poller, PollSchedule
from ingestd.feed.rest import RestAnswer
from ingestd.metrics import exposition, registry_for
from ingestd.sim import SimServer
from ingestd.sim.recorded import frames
from ingestd.sim.venues.binance import BinanceUsdmVenue
from ingestd.sink.journal import REST, iter_segments, read_segment
from tests.support import feed_for, make_config, read_table, run_daemon

OI_PATH = "/fapi/v1/openInterest"
OI = {json.loads(b)["symbol"]: json.loads(b) for b in
      frames("binance_usdm", "openInterest_rest.jsonl")}
# Binance's documented -1003 answer (https://developers.binance.com/docs/derivatives/
# usds-margined-futures/error-code): what a 429 carries.
TOO_MANY = (b'{"code":-1003,"msg":"Too much request weight used; current limit is 2400 '
            b'request weight per 1 MINUTE. Please use WebSocket Streams for live updates to '
            b'avoid polling the API."}')
# Not a venue frame: what a failing proxy in front of the venue sends.
GARBAGE = b"<html><body>502 Bad Gateway</body></html>"


# ---- the schedule (sans-I/O, injected times) -------------------------------------------------
def test_schedule_spreads_requests_over_the_interval_without_catch_up_bursts() -> None:
    s = PollSchedule(10.0, 4)  # one request every 2.5 s
    assert s.wait_s(100.0) == 0.0
    s.started(100.0)
    assert s.wait_s(100.1) == pytest.approx(2.4)
    s.started(102.5)
    # A request that started late (a slow answer) does not let the next one go early.
    s.started(109.0)
    assert s.wait_s(109.0) == pytest.approx(2.5)
    with pytest.raises(ValueError):
        PollSchedule(10.0, 0)


def test_schedule_pauses_on_429_and_418_honouring_retry_after() -> None:
    s = PollSchedule(1.0, 1)
    s.started(0.0)
    assert s.answered(429, 7.0, 0.1) == 7.0
    assert s.wait_s(0.2) == pytest.approx(6.9)
    assert s.answered(503, None, 0.3) is None  # other failures keep the interval
    # Without Retry-After: RATE_LIMIT_PAUSE_S, doubling while they go on.
    s2 = PollSchedule(1.0, 1)
    assert s2.answered(418, None, 0.0) == RATE_LIMIT_PAUSE_S
    assert s2.answered(429, None, 0.0) == 2 * RATE_LIMIT_PAUSE_S
    assert s2.answered(200, None, 0.0) is None
    assert s2.answered(429, None, 0.0) == RATE_LIMIT_PAUSE_S  # reset by an answer
    assert s2.answered(0, None, 0.0) is None and s2.rate_limited == 1  # no answer: no reset


# ---- a REST server with scripted faults --------------------------------------------------------
@dataclass
class Fault:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False  # never answer (the client's deadline ends it)


class FaultyRest:
    """Loopback REST: openInterest requests get `script` first (in order), then the
    simulated venue's answer; everything else goes to the venue."""

    def __init__(self, script: list[Fault]) -> None:
        self.venue = BinanceUsdmVenue()
        self.script = list(script)
        self.oi_times: list[float] = []        # loop time of each openInterest request
        self.oi_answers: list[int] = []        # status answered (0: hung)
        self.release = asyncio.Event()
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == OI_PATH:
            self.oi_times.append(asyncio.get_running_loop().time())
            if self.script:
                fault = self.script.pop(0)
                if fault.hang:
                    self.oi_answers.append(0)
                    await self.release.wait()
                    raise web.HTTPServiceUnavailable
                self.oi_answers.append(fault.status)
                return web.Response(status=fault.status, body=fault.body,
                                    headers=fault.headers, content_type="application/json")
        query = {k: request.query.getall(k) for k in request.query}
        answer = self.venue.rest(request.path, query)
        if answer is None:
            raise web.HTTPNotFound
        if request.path == OI_PATH:
            self.oi_answers.append(answer[0])
        return web.Response(status=answer[0], body=answer[1], content_type="application/json")


@pytest.fixture
async def faulty() -> AsyncIterator[FaultyRest]:
    rest = FaultyRest([])
    app = web.Application()
    app.router.add_get("/{tail:.*}", rest.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    rest.url = f"http://127.0.0.1:{port}"
    try:
        yield rest
    finally:
        rest.release.set()
        await runner.cleanup()


async def wait_for(cond: Any, timeout_s: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


# ---- the poller against a real server ------------------------------------------------------------
async def test_poller_counts_failures_pauses_on_429_and_keeps_polling(
        faulty: FaultyRest) -> None:
    faulty.script = [Fault(429, TOO_MANY, {"Retry-After": "1"}), Fault(hang=True),
                     Fault(200, GARBAGE), Fault(500, b"{}")]
    reqs = [RestRequest(f"openInterest:{s}", f"{faulty.url}{OI_PATH}?symbol={s}")
            for s in ("BTCUSDT", "BTCUSDT_220624")]
    seen: list[tuple[str, RestAnswer]] = []

    async def ingest(req: RestRequest, answer: RestAnswer, elapsed_s: float) -> None:
        seen.append((req.key, answer))

    class Log:
        def __init__(self) -> None:
            self.lines: list[tuple[str, dict[str, Any]]] = []

        def warning(self, event: str, **kw: Any) -> None:
            self.lines.append((event, kw))

    log = Log()
    poller = Poller(reqs, 0.4, deadline_s=0.3, clock=SYSTEM_CLOCK, ingest=ingest, log=log)
    task = asyncio.create_task(poller.run())
    try:
        await wait_for(lambda: poller.counts["ok"] >= 4)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    # Every answer went to ingest, in the cycle's order, the failures included.
    assert [k for k, _ in seen[:6]] == [r.key for r in reqs] * 3
    assert [a.status for _, a in seen[:4]] == [429, 0, 200, 500]
    assert seen[1][1].error is not None and seen[1][1].error.startswith("timeout:")
    assert seen[2][1].body == GARBAGE  # the codec, not the poller, judges a body
    assert poller.counts["http_429"] == 1 and poller.counts["timeout"] == 1
    assert poller.counts["http_500"] == 1
    # Retry-After: 1 held every poll back a second; the others keep their spacing.
    times = faulty.oi_times
    assert times[1] - times[0] >= 0.95
    # Spread, not a burst: starts are >= 0.2 s apart (arrivals, measured at the server,
    # may differ by connection set-up time).
    assert all(b - a >= 0.1 for a, b in itertools.pairwise(times))
    # One log line per failure class (bounded rate), none for the successes.
    assert sorted(kw["outcome"] for _, kw in log.lines) == ["http_429", "http_500",
                                                             "timeout"]
    assert [kw["paused_s"] for _, kw in log.lines if kw["outcome"] == "http_429"] == [1.0]


# ---- the daemon: rows, events, the feed goes on ------------------------------------------------
async def test_open_interest_lands_in_derivatives_and_failures_are_events(
        tmp_path: Path, faulty: FaultyRest) -> None:
    faulty.script = [Fault(429, TOO_MANY, {"Retry-After": "1"}), Fault(500, b"{}"),
                     Fault(200, GARBAGE), Fault(hang=True)]
    root = tmp_path / "data"
    async with SimServer("binance-usdm") as sim:
        feed = feed_for(sim, symbols=["BTCUSDT", "BTCUSDT_220624"],
                        channels=["derivatives", "liquidations"], rest_url=faulty.url,
                        poll_interval_s=0.5, rest_timeout_s=0.3)
        cfg = make_config(root, [feed])
        daemon = await run_daemon(cfg, lambda d: faulty.oi_answers.count(200) >= 5,
                                  timeout_s=30)
    # Counted per outcome (ingestd_polls_total); the garbage 200 is a parse error.
    st = daemon.feed_stats[feed["name"]]
    assert (st.polls["http_429"], st.polls["http_500"], st.polls["timeout"]) == (1, 1, 1)
    assert st.polls["ok"] >= 5 and st.parse_errors["DecodeError"] == 1
    families = {f.name: f for f in text_string_to_metric_families(
        exposition(registry_for(daemon.stats_snapshot)).decode())}
    exported = {m.labels["outcome"]: m.value for m in families["ingestd_polls"].samples
                if m.name == "ingestd_polls_total"}
    assert exported == {k: float(v) for k, v in st.polls.items()}
    derivs = read_table(root, "derivatives")
    rows = list(derivs.iter_rows(named=True))
    # One row per recorded answer (ts_event = its `time`): the same answer polled again
    # is no new value.
    oi_seq = {}
    for sym, answer in OI.items():
        mine = [r for r in rows if r["symbol"] == sym and r["ts_event"] is not None
                and round(r["ts_event"].timestamp() * 1000) == answer["time"]]
        assert len(mine) == 1, sym
        assert mine[0]["open_interest"] == float(answer["openInterest"])
        oi_seq[sym] = mine[0]["recv_seq"]
    # Every derivatives row after the poll carries the value (the stream's markPrice rows
    # merge with it); none before it has one.
    for r in rows:
        known = r["recv_seq"] >= oi_seq[r["symbol"]]
        expected = float(OI[r["symbol"]]["openInterest"]) if known else None
        assert r["open_interest"] == expected
    events = read_table(root, "events")
    failed = events.filter(events["event"] == "poll_failed")
    details = failed["detail"].to_list()
    assert len(details) == 4, details
    assert details[0].startswith("openInterest HTTP 429: {\"code\":-1003")
    assert details[1] == "openInterest HTTP 500: {}"
    assert details[2].startswith("openInterest bad answer: DecodeError")
    assert details[3].startswith("openInterest no answer: timeout:")
    assert set(failed["symbol"].to_list()) <= {"BTCUSDT", "BTCUSDT_220624"}
    # The garbage body is kept raw with the other rejects; the feed never reconnected.
    assert list((root / ".rejects").rglob("*")), "the garbage answer is kept raw"
    connected = events.filter(events["event"] == "connected")
    assert connected.height == 1
    # Retry-After: 1 paused the polls.
    t = faulty.oi_times
    assert t[1] - t[0] >= 0.95


# ---- kill -9: the journal replays polled answers exactly ---------------------------------------
CONFIG = """
[storage]
root = "{root}"
flush_interval_s = {flush}

[journal]
fsync_interval_s = 0.05

[health]
listen = "127.0.0.1:0"

[log]
level = "info"
format = "json"

[[feeds]]
name = "usdm"
exchange = "binance-usdm"
url = "{url}"
rest_url = "{rest}"
symbols = ["BTCUSDT", "BTCUSDT_220624"]
channels = ["derivatives"]
poll_interval_s = 0.5
rest_timeout_s = 0.3
reconnect_min_delay_s = 0.05
"""


def journaled_polls(root: Path) -> list[Any]:
    """Every openInterest REST record the journals hold (durable so far)."""
    out = []
    for d in (root / ".journal").iterdir():
        for seg in iter_segments(d):
            out.extend(r for r in read_segment(seg)[0]
                       if r.kind == REST and r.key.startswith("openInterest:"))
    return out


async def _start(cfg: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ingestd", "--config", str(cfg),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})


async def _read_until(proc: asyncio.subprocess.Process, event: str) -> None:
    assert proc.stdout is not None
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line, f"the daemon ended before logging {event}"
        if line.startswith(b"{") and json.loads(line).get("event") == event:
            return


# flush 60 s: nothing is committed before the kill, every row comes from the replay;
# 0.1 s: some are, and the replay must skip exactly those.
@pytest.mark.parametrize("flush_s", [60.0, 0.1])
async def test_kill_9_then_recovery_replays_polled_answers_exactly(
        tmp_path: Path, faulty: FaultyRest, flush_s: float) -> None:
    faulty.script = [Fault(500, b"{}"), Fault(200, GARBAGE)]
    root = tmp_path / "data"
    cfg = tmp_path / "feeds.toml"
    async with SimServer("binance-usdm") as sim:
        cfg.write_text(CONFIG.format(root=root, url=sim.url, rest=faulty.url, flush=flush_s))
        proc = await _start(cfg)
        try:
            await wait_for(lambda: (root / ".journal").is_dir() and Counter(
                r.status for r in journaled_polls(root))[200] >= 4, timeout_s=30)
        finally:
            proc.kill()
            await proc.wait()
        durable = journaled_polls(root)
        proc2 = await _start(cfg)
        await _read_until(proc2, "starting")
        # The restarted feed polls on from the replayed state, then stops cleanly.
        n = len(faulty.oi_answers)
        await wait_for(lambda: len(faulty.oi_answers) >= n + 4)
        proc2.send_signal(signal.SIGTERM)
        _out, err = await asyncio.wait_for(proc2.communicate(), 30)
    assert proc2.returncode == 0, err.decode()
    statuses = [r.status for r in durable]
    assert statuses[:2] == [500, 200] and statuses.count(200) >= 4
    derivs = read_table(root, "derivatives")
    events = read_table(root, "events")
    d_seqs = Counter(derivs["recv_seq"].to_list())
    e_seqs = Counter(events["recv_seq"].to_list())
    assert max(d_seqs.values()) == 1 and max(e_seqs.values()) == 1
    first_answer: dict[str, int] = {}
    for rec in durable:
        sym = rec.key.split(":", 1)[1]
        good = rec.status == 200 and rec.data != GARBAGE
        if good and sym not in first_answer:
            first_answer[sym] = rec.seq
            # The first answer of each symbol is its one open interest row.
            row = derivs.filter(derivs["recv_seq"] == rec.seq).row(0, named=True)
            assert row["symbol"] == sym
            assert row["open_interest"] == float(OI[sym]["openInterest"])
        elif good:
            assert d_seqs[rec.seq] == 0 and e_seqs[rec.seq] == 0  # the same value again
        else:
            ev = events.filter(events["recv_seq"] == rec.seq).row(0, named=True)
            assert ev["event"] == "poll_failed" and ev["symbol"] == sym
    assert set(first_answer) == set(OI)
    # Across the crash and the restart: still one row per recorded answer (the replayed
    # codec state tells the new process that these values are known).
    for sym, answer in OI.items():
        assert len([r for r in derivs.iter_rows(named=True) if r["symbol"] == sym
                    and r["ts_event"] is not None
                    and round(r["ts_event"].timestamp() * 1000) == answer["time"]]) == 1
    # The garbage answer was rejected once, by the dead process or by the replay.
    assert len(list((root / ".rejects").rglob("*.*"))) >= 1
