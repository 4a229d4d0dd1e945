"""Fault soak: the real daemon against three generated venues, faults drawn from a seed.

    .venv/bin/python benchmarks/soak.py --duration 1800 --seed 1 [--json out.json]
    .venv/bin/python benchmarks/soak.py --smoke            # 120 s (tests/test_soak_smoke.py)

Runs `python -m ingestd --config` (journal on) against three live-mode simulators serving
ENDLESS generated data (sim/generate.py: new trades with increasing ids and book diffs
with exact continuity, from recorded templates): Binance spot (aggTrade trades, bookTicker
quotes, depth diffs + REST snapshots), Bybit linear (publicTrade, orderbook.200) and OKX
(trades, books with seqId and checksum). One fault at a time, drawn from `--seed`, each
listed with its time: connection drops (clean close, TCP RST, FIN without a close frame),
accept-then-close, HTTP 503 / 429 on the handshake, stalls (silent connection), malformed
frames, oversized frames (over the feeds' `max_frame_bytes`), broken REST snapshot answers
(not HTTP, chunked body cut short, garbage JSON, no answer), SIGHUP with a changed feed,
`kill -9` and restart, and a full disk (the data root is a tmpfs in a user namespace,
shrunk to its current use for a few seconds; skipped, with the reason, where `unshare
-Urm` is not allowed).

Checks (exit 1 if one fails):
- Every trade id sent on a socket is stored exactly once, or lost inside a documented
  window, defined as:
  * gap window (venues with consecutive trade ids: Binance `a`, OKX `tradeId`): the id lies
    in `expected .. got-1` of a `gap` event "trade id expected X, got Y" of its symbol;
  * disconnect window (Bybit: its trade ids are UUIDs, a gap cannot be seen in them): the
    frame was sent on a connection at most DISCONNECT_WINDOW_S before that connection
    ended, and the feed stored a `disconnected` event between the send and 10 s after;
  * kill -9 window: the frame was sent between `fsync_interval_s` + KILL_SLACK_S before a
    SIGKILL and KILL_AFTER_S after it (received but not yet fsync'd, or in flight).
  Any other missing id is "lost" and must be 0; duplicates must be 0; a stored id never
  sent must not exist. A full disk allows no loss at all.
- Books: the `book` table, replayed in `recv_seq` order, equals the generator's own book
  at every checkpoint (a digest every 20 updates, by update id) it reaches, and at the end.
- Malformed frames (cut in half, or not JSON): each injected one is found raw under
  `<root>/.rejects/`. Valid JSON of an unknown shape is injected too and reported (the
  codecs count it as `unknown`; whether it is kept raw is shown, not checked).
- Oversized frames: each injected one ends its connection (a `disconnected` event saying
  "oversized frame").
- RSS, sampled (every duration/300 s, at least 1 s): first/median/last/max over the run
  (the 30 s after each daemon start left out), judged in stretches between the two faults
  that move it on purpose: a kill -9 (a new process) and a full disk (rows held in memory
  until space returns: RSS steps up to that backlog's high-water mark, each step
  reported). "Flat" = in every stretch of 3 minutes or more (from 30 s after a start,
  60 s after a full disk ends), the highest RSS is at most 5 % above the lowest; a
  failure for runs of 10 minutes or more. Each stretch's least-squares slope is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import itertools
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from ingestd.sim import Faults, SimServer  # noqa: E402
from ingestd.sim.faults import REST_FAULT_KINDS, RestFaults  # noqa: E402
from ingestd.sim.generate import GENERATED, Book, book_digest  # noqa: E402
from ingestd.sim.server import Sent  # noqa: E402

FSYNC_S = 0.2
KILL_SLACK_S = 0.3
KILL_AFTER_S = 1.0
DISCONNECT_WINDOW_S = 2.0
STALE_S = 3.0
MAX_FRAME_BYTES = 262144
CHECKPOINT_EVERY = 20
RSS_WARMUP_S = 30.0
RSS_PLATEAU = 0.05
RSS_MIN_SPAN_S = 180.0
RSS_SETTLE_S = 60.0

# venue -> feed name, symbols, channels, extra feed keys, publish rate (frames/s)
FEEDS: dict[str, dict[str, Any]] = {
    "binance": {"name": "spot",
                "symbols": ["ZILUSDT", "DENTUSDT", "MANAUSDT", "NKNUSDT", "BLZETH", "LRCBTC",
                            "RUNEEUR"],
                "channels": ["trades", "quotes", "book"], "keys": {"trade_stream": "aggTrade"},
                "rate": 120.0},
    "bybit-linear": {"name": "linear", "symbols": ["BTCUSDT", "ETHUSDT", "SOLUSDT", "DOGEUSDT"],
                     "channels": ["trades", "book"], "keys": {"book_depth": 200}, "rate": 80.0},
    "okx": {"name": "okx", "symbols": ["BTC-USDT", "BTC-USD-220527", "UNI-USD-SWAP"],
            "channels": ["trades", "book"], "keys": {}, "rate": 60.0},
}
EXTRA_TRADE_SYMBOLS = ["ETHBRL", "BTCSTUSDT", "QTUMETH"]   # Binance; added/removed by SIGHUP
OPAQUE_IDS = {"bybit-linear"}      # trade ids without order: disconnect windows apply
CONN_FAULTS = ["drop_clean", "drop_reset", "drop_no_close_frame", "accept_then_close",
               "handshake_503", "handshake_429", "stall"]
FAULT_KINDS = [*CONN_FAULTS, "malformed_frame", "oversized_frame",
               *(f"rest_{k}" for k in REST_FAULT_KINDS), "sighup_changed_feed", "kill_9",
               "disk_full"]

CONFIG_HEAD = """
[storage]
root = "{root}"
flush_interval_s = 1.0

[journal]
fsync_interval_s = {fsync}
segment_max_s = 10

[health]
listen = "127.0.0.1:0"

[log]
level = "info"
format = "json"
"""

FEED = """
[[feeds]]
name = "{name}"
exchange = "{exchange}"
url = "{url}"
rest_url = "{rest}"
symbols = {symbols}
channels = {channels}
reconnect_min_delay_s = 0.05
reconnect_max_delay_s = 1.0
healthy_session_s = 0.5
breaker_failures = 1000
stale_after_s = {stale}
max_frame_bytes = {max_frame}
rest_timeout_s = 1.0
{keys}
"""


class SentLog(list[Sent]):
    """`SimServer.sent`, kept small: every trade id sent, with its wall time and
    connection; other frames are only counted."""

    def __init__(self, exchange: str) -> None:
        super().__init__()
        self.exchange = exchange
        self.frames = 0
        self.trades: list[tuple[str, str, float, int]] = []   # symbol, id, wall time, conn

    def append(self, item: Sent) -> None:
        self.frames += 1
        t = time.time()
        f = item.frame
        if self.exchange == "binance":
            if b'"aggTrade"' in f:
                d = json.loads(f)["data"]
                self.trades.append((d["s"], str(d["a"]), t, item.conn_id))
        elif self.exchange == "bybit-linear":
            if f.startswith(b'{"topic":"publicTrade.'):
                for d in json.loads(f)["data"]:
                    self.trades.append((d["s"], d["i"], t, item.conn_id))
        elif b'"channel":"trades"' in f:
            for d in json.loads(f)["data"]:
                self.trades.append((d["instId"], str(d["tradeId"]), t, item.conn_id))


def die_with_parent() -> None:
    """In the daemon's child process: SIGKILL it if the soak dies (no orphan daemons)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def fill(path: Path) -> int:
    """Write until the filesystem says ENOSPC; bytes written."""
    n = 0
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
                n += 65536
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
    return n


class Soak:
    def __init__(self, args: argparse.Namespace, work: Path, disk: str | None) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.work = work
        self.root = work / "data"
        self.cfg = work / "feeds.toml"
        self.disk = disk          # None: full disk injectable; else why not
        self.t0 = time.monotonic()
        self.faults: list[dict[str, Any]] = []
        self.kills: list[float] = []            # wall times of SIGKILLs
        self.starts: list[float] = []           # wall times of daemon starts
        self.disk_full: list[tuple[float, float]] = []
        self.rss: list[tuple[float, int]] = []
        self.sims: dict[str, SimServer] = {}
        self.rest_faults = RestFaults(hang_s=3.0)
        self.symbols = {v: list(f["symbols"]) for v, f in FEEDS.items()}
        self.proc: asyncio.subprocess.Process | None = None
        self.malformed: list[tuple[str, float, bytes]] = []   # must be kept raw
        self.unknown: list[tuple[str, float, bytes]] = []     # valid JSON, unknown shape
        self.oversized: list[tuple[str, float]] = []

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 3)

    def write_config(self) -> None:
        text = CONFIG_HEAD.format(root=self.root, fsync=FSYNC_S)
        for venue, f in FEEDS.items():
            sim = self.sims[venue]
            keys = "\n".join(f"{k} = {json.dumps(v)}" for k, v in f["keys"].items())
            text += FEED.format(name=f["name"], exchange=venue, url=sim.url, rest=sim.rest_url,
                                symbols=json.dumps(self.symbols[venue]),
                                channels=json.dumps(f["channels"]), stale=STALE_S,
                                max_frame=MAX_FRAME_BYTES, keys=keys)
        self.cfg.write_text(text)

    async def start_daemon(self) -> None:
        self.starts.append(time.time())
        log = open(self.work / f"daemon-{len(self.starts)}.log", "wb")  # noqa: SIM115
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ingestd", "--config", str(self.cfg),
            stdout=log, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=die_with_parent)
        log.close()

    async def sample_rss(self, stop: asyncio.Event, every: float) -> None:
        while not stop.is_set():
            if self.proc is not None and self.proc.returncode is None:
                kb = rss_kb(self.proc.pid)
                if kb:
                    self.rss.append((self.now(), kb))
            try:
                await asyncio.wait_for(stop.wait(), every)
            except TimeoutError:
                pass

    # ---- faults -----------------------------------------------------------------------------
    def template(self, venue: str) -> bytes:
        """A recorded frame of the venue (the base of a malformed one)."""
        sim = self.sims[venue]
        v: Any = sim.venue
        if venue == "binance":
            return bytes(next(iter(v.by_stream.values()))[0])
        if venue == "bybit-linear":
            return bytes(v.by_topic["publicTrade.BTCUSDT"][0])
        return bytes(v.by_key[("trades", "BTC-USDT")][0])

    async def inject(self, kind: str) -> tuple[str, str]:
        """Apply one fault; (venue or "daemon", detail). Connection faults are armed for the
        current / next connections only, so the feed recovers afterwards."""
        venue = self.rng.choice(sorted(FEEDS))
        sim = self.sims[venue]
        cur = sim.connections
        if kind.startswith("drop_"):
            mode = {"drop_clean": "clean", "drop_reset": "reset",
                    "drop_no_close_frame": "no_close_frame"}[kind]
            n = self.rng.randint(1, 5)
            sim.faults = Faults(close_every_n_frames=n, close_mode=mode, only_first_n=cur)
            return venue, f"conn<= {cur} closes ({mode}) at a multiple of {n} frames"
        if kind == "accept_then_close":
            k = self.rng.randint(1, 3)
            sim.faults = Faults(accept_then_close=True, only_first_n=cur + k,
                                close_every_n_frames=1)
            return venue, f"current connection closed, next {k} accepted then closed"
        if kind in ("handshake_503", "handshake_429"):
            k = self.rng.randint(1, 3)
            status = 503 if kind == "handshake_503" else 429
            sim.faults = Faults(handshake_status=status, refuse_first_n=sim.handshakes + k,
                                retry_after_s=1.0 if status == 429 else None,
                                close_every_n_frames=1, only_first_n=cur)
            return venue, f"current connection closed, next {k} handshakes refused ({status})"
        if kind == "stall":
            sim.faults = Faults(silent_after_n_frames=0, only_first_n=cur)
            return venue, f"conn<= {cur} goes silent (stale_after_s={STALE_S})"
        if kind == "malformed_frame":
            tpl = self.template(venue)
            variant = self.rng.choice(["truncated", "garbage", "wrong_shape"])
            if variant == "truncated":
                frame = tpl[: len(tpl) // 2]
            elif variant == "garbage":
                frame = b"\x01garbage %d not json {" % self.rng.getrandbits(32)
            else:
                frame = b'{"unexpected":[%d,{"x":null}]}' % self.rng.getrandbits(32)
            conns = await sim.inject(frame)
            for _ in conns:
                kept = self.unknown if variant == "wrong_shape" else self.malformed
                kept.append((venue, time.time(), frame))
            return venue, f"{variant} frame of {len(frame)} B on conn {conns}"
        if kind == "oversized_frame":
            size = MAX_FRAME_BYTES + self.rng.randint(1024, 65536)
            frame = b'{"pad":"' + b"x" * (size - 10) + b'"}'
            conns = await sim.inject(frame)
            for _ in conns:
                self.oversized.append((venue, time.time()))
            return venue, f"{len(frame)} B frame (max_frame_bytes={MAX_FRAME_BYTES}) on {conns}"
        if kind.startswith("rest_"):
            # Only Binance's books sync over REST: arm the broken answer, then end the
            # connection so the reconnect fetches snapshots again.
            sim = self.sims["binance"]
            self.rest_faults.arm(kind.removeprefix("rest_"))
            sim.faults = Faults(close_every_n_frames=1, close_mode="clean",
                                only_first_n=sim.connections)
            return "binance", "next snapshot request answered broken; connection closed"
        if kind == "sighup_changed_feed":
            syms = self.symbols["binance"]
            extra = [s for s in EXTRA_TRADE_SYMBOLS if s not in syms]
            if extra and (len(extra) == len(EXTRA_TRADE_SYMBOLS) or self.rng.random() < 0.6):
                syms.append(extra[0])
                what = f"+{extra[0]}"
            else:
                gone = next(s for s in reversed(syms) if s in EXTRA_TRADE_SYMBOLS)
                syms.remove(gone)
                what = f"-{gone}"
            self.write_config()
            assert self.proc is not None
            self.proc.send_signal(signal.SIGHUP)
            return "daemon", f"spot feed symbols {what} ({len(syms)} now)"
        if kind == "kill_9":
            assert self.proc is not None
            self.kills.append(time.time())
            self.proc.kill()
            await self.proc.wait()
            await asyncio.sleep(self.rng.uniform(0.1, 1.0))
            await self.start_daemon()
            return "daemon", "SIGKILL, restarted"
        if kind == "disk_full":
            if self.disk is not None:
                return "daemon", f"NOT injected: {self.disk}"
            hold = self.rng.uniform(2.0, 5.0)
            detail = await self.fill_disk(hold)
            return "daemon", detail
        raise ValueError(kind)

    async def fill_disk(self, hold_s: float) -> str:
        """Shrink the data tmpfs to what it holds, fill the rest, hold, give space back."""
        st = os.statvfs(self.root)
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        size = used + 256 * 1024
        subprocess.run(["mount", "-o", f"remount,size={size}", "tmpfs", str(self.root)],
                       check=True, capture_output=True)
        filler = self.root / "soak-filler"
        filled = await asyncio.to_thread(fill, filler)
        start = time.time()
        await asyncio.sleep(hold_s)
        filler.unlink()
        subprocess.run(["mount", "-o", "remount,size=4g", "tmpfs", str(self.root)],
                       check=True, capture_output=True)
        self.disk_full.append((start, time.time()))
        return f"tmpfs full ({used} B used + {filled} B filler) for {hold_s:.1f} s"

    # ---- the run ----------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        duration = self.args.duration
        for venue, f in FEEDS.items():
            gen = GENERATED[venue](seed=self.args.seed)  # type: ignore[call-arg]
            for book in gen.books.values():
                book.checkpoint_every = CHECKPOINT_EVERY
            sim = SimServer(venue, rate_msgs_s=f["rate"], live=True, venue=gen,  # type: ignore[arg-type]
                            rest_faults=self.rest_faults if venue == "binance" else None)
            sim.sent = SentLog(venue)
            await sim.start()
            self.sims[venue] = sim
        self.write_config()
        await self.start_daemon()
        stop = asyncio.Event()
        sampler = asyncio.create_task(self.sample_rss(stop, max(1.0, duration / 300)))
        end = self.t0 + duration
        fault_from, fault_until = duration * 0.1, duration * 0.8
        await asyncio.sleep(fault_from)
        order = FAULT_KINDS[:]
        self.rng.shuffle(order)
        n_faults = max(len(order), int((fault_until - fault_from) / 20))
        gap = (fault_until - fault_from) / n_faults
        i = 0
        while i < len(order) or self.now() < fault_until:   # each kind at least once
            kind = order[i] if i < len(order) else self.rng.choice(FAULT_KINDS)
            i += 1
            at, wall = self.now(), time.time()
            venue, detail = await self.inject(kind)
            self.faults.append({"t": at, "wall": wall, "fault": kind, "venue": venue,
                                "detail": detail})
            print(f"  {at:>8.2f}s  {kind:<20} {venue:<13} {detail}", flush=True)
            await asyncio.sleep(gap * self.rng.uniform(0.7, 1.3))
            for sim in self.sims.values():
                sim.faults = Faults()
        while time.monotonic() < end:
            await asyncio.sleep(0.2)
        # Stop publishing, let every queued frame reach the daemon, then stop it.
        for sim in self.sims.values():
            sim.stop_publishing()
        for _ in range(100):
            if all(q.empty() for sim in self.sims.values() for q in sim._live_subs):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(2.5)
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = await asyncio.wait_for(self.proc.wait(), 60)
        except TimeoutError:
            self.proc.kill()
            rc = await self.proc.wait()
        stop.set()
        await sampler
        for sim in self.sims.values():
            await sim.stop()
        report = self.analyse()
        report.update(duration_s=duration, seed=self.args.seed,
                      daemon_starts=len(self.starts), final_exit_code=rc, faults=self.faults,
                      faults_by_kind=dict(Counter(f["fault"] for f in self.faults)),
                      disk_full_injected=self.disk is None, disk_full_note=self.disk,
                      rest_faults_served=[k for _, k, _ in self.rest_faults.applied],
                      workdir=str(self.work))
        return report

    # ---- analysis ---------------------------------------------------------------------------
    def analyse(self) -> dict[str, Any]:
        import polars as pl

        def table(name: str) -> pl.DataFrame:
            files = list((self.root / name).glob("exchange=*/date=*/*.parquet"))
            if not files:
                return pl.DataFrame()
            return (pl.scan_parquet(f"{self.root}/{name}/**/*.parquet", hive_partitioning=True)
                    .collect().sort("recv_seq", maintain_order=True))

        trades, events, book = table("trades"), table("events"), table("book")
        feed_of = {f["name"]: v for v, f in FEEDS.items()}
        gaps: dict[tuple[str, str], list[tuple[int, int]]] = {}
        disconnects: dict[str, list[float]] = {}
        oversized_closes: Counter[str] = Counter()
        ev_counts: dict[str, dict[str, int]] = {}
        if events.height:
            for feed, sym, ev, detail, ts in events.select(
                    "feed", "symbol", "event", "detail", "ts_recv").iter_rows():
                venue = feed_of.get(feed, feed)
                ev_counts.setdefault(venue, {}).setdefault(ev, 0)
                ev_counts[venue][ev] += 1
                if ev == "gap":
                    m = re.match(r"trade id expected (\d+), got (\d+)", detail or "")
                    if m:
                        gaps.setdefault((venue, sym), []).append(
                            (int(m.group(1)), int(m.group(2)) - 1))
                elif ev == "disconnected":
                    disconnects.setdefault(venue, []).append(ts.timestamp())
                    if "oversized frame" in (detail or ""):
                        oversized_closes[venue] += 1
        stored: Counter[tuple[str, str, str]] = Counter()
        if trades.height:
            stored = Counter(zip(trades["exchange"].to_list(), trades["symbol"].to_list(),
                                 [str(x) for x in trades["trade_id"].to_list()], strict=True))
        per_venue: dict[str, dict[str, Any]] = {}
        for venue, sim in self.sims.items():
            log = sim.sent
            assert isinstance(log, SentLog)
            sends: dict[tuple[str, str], list[tuple[float, int]]] = {}
            for sym, tid, t, conn in log.trades:
                sends.setdefault((sym, tid), []).append((t, conn))
            r = {"frames_sent": log.frames, "frames_published": sim.published,
                 "connections": sim.connections, "handshakes": sim.handshakes,
                 "trade_ids_sent": len(sends), "trade_rows_stored": 0, "duplicates": 0,
                 "stored_not_sent": 0, "lost": 0, "lost_in_gap": 0,
                 "lost_in_disconnect_window": 0, "lost_in_kill_window": 0,
                 "lost_examples": []}
            mine = {k: c for k, c in stored.items() if k[0] == venue}
            r["trade_rows_stored"] = sum(mine.values())
            r["duplicates"] = sum(c - 1 for c in mine.values() if c > 1)
            r["stored_not_sent"] = sum(1 for k in mine if (k[1], k[2]) not in sends)
            for (sym, tid), when in sends.items():
                if stored[(venue, sym, tid)]:
                    continue
                if venue not in OPAQUE_IDS and tid.isdigit() and any(
                        lo <= int(tid) <= hi for lo, hi in gaps.get((venue, sym), [])):
                    r["lost_in_gap"] += 1
                elif any(k - FSYNC_S - KILL_SLACK_S <= t <= k + KILL_AFTER_S
                         for t, _ in when for k in self.kills):
                    r["lost_in_kill_window"] += 1
                elif venue in OPAQUE_IDS and any(
                        conn in sim.conn_ended and sim.conn_ended[conn] - t <= DISCONNECT_WINDOW_S
                        and any(t <= d <= sim.conn_ended[conn] + 10
                                for d in disconnects.get(venue, []))
                        for t, conn in when):
                    r["lost_in_disconnect_window"] += 1
                else:
                    r["lost"] += 1
                    if len(r["lost_examples"]) < 10:
                        r["lost_examples"].append([sym, tid, round(when[0][0], 3),
                                                   when[0][1]])
            r["books"] = self.check_books(venue, book)
            r["events"] = ev_counts.get(venue, {})
            inj = [f for v, _, f in self.malformed if v == venue]
            r["malformed_injected"] = len(inj)
            r["oversized_injected"] = sum(1 for v, _ in self.oversized if v == venue)
            r["oversized_closes"] = oversized_closes[venue]
            per_venue[venue] = r
        rejects = self.rejects()
        for venue, r in per_venue.items():
            want = Counter(f for v, _, f in self.malformed if v == venue)
            excused = Counter(f for v, t, f in self.malformed if v == venue and any(
                k - FSYNC_S - KILL_SLACK_S <= t <= k + KILL_AFTER_S for k in self.kills))
            have = rejects.get(venue, Counter())
            r["malformed_kept_raw"] = sum(min(c, have[f]) for f, c in want.items())
            r["malformed_missing"] = sum(max(0, c - have[f] - excused[f])
                                         for f, c in want.items())
            r["rejects_total"] = sum(have.values())
            unknown = [f for v, _, f in self.unknown if v == venue]
            r["unknown_injected"] = len(unknown)
            r["unknown_kept_raw"] = sum(1 for f in unknown if have[f])
        return {"venues": per_venue, "rss": self.rss_summary(),
                "totals": {k: sum(r[k] for r in per_venue.values()) for k in (
                    "trade_ids_sent", "trade_rows_stored", "lost", "lost_in_gap",
                    "lost_in_disconnect_window", "lost_in_kill_window", "duplicates",
                    "stored_not_sent", "malformed_injected", "malformed_kept_raw",
                    "malformed_missing", "unknown_injected", "unknown_kept_raw",
                    "oversized_injected", "oversized_closes")},
                "books_checked": sum(r["books"]["checkpoints_equal"]
                                     + r["books"]["checkpoints_different"]
                                     for r in per_venue.values()),
                "books_different": sum(r["books"]["checkpoints_different"]
                                       + r["books"]["final_different"]
                                       for r in per_venue.values())}

    def check_books(self, venue: str, book: Any) -> dict[str, Any]:
        """Replay the venue's `book` rows in recv_seq order; compare the book with the
        generator's digest at every checkpoint update id reached, and at the end."""
        import polars as pl

        gen: Any = self.sims[venue].venue
        books: dict[str, dict[str, dict[float, float]]] = {}
        snap_seq: dict[str, int] = {}
        equal = different = 0
        examples: list[str] = []
        rows = (book.filter(pl.col("exchange") == venue)
                .select("symbol", "recv_seq", "is_snapshot", "side", "price", "amount",
                        "update_id").iter_rows()) if book.height else iter(())
        prev: tuple[str, int, int | None] | None = None

        def check(key: tuple[str, int, int | None]) -> None:
            nonlocal equal, different
            sym, _, uid = key
            g: Book | None = gen.books.get(sym)
            if g is None or uid is None or uid not in g.checkpoints:
                return
            if book_digest(books[sym]) == g.checkpoints[uid]:
                equal += 1
            else:
                different += 1
                if len(examples) < 5:
                    examples.append(f"{sym}@{uid}")

        for sym, seq, is_snap, side, px, amt, uid in rows:
            key = (sym, seq, uid)
            if prev is not None and key != prev:
                check(prev)
            prev = key
            if is_snap and snap_seq.get(sym) != seq:
                books[sym] = {"bid": {}, "ask": {}}
                snap_seq[sym] = seq
            levels = books.setdefault(sym, {"bid": {}, "ask": {}})[side]
            if amt == 0:
                levels.pop(px, None)
            else:
                levels[px] = amt
        if prev is not None:
            check(prev)
        final = {}
        for sym, g in gen.books.items():
            if sym not in self.symbols[venue]:
                continue
            final[sym] = ("equal" if sym in books and book_digest(books[sym]) == g.digest()
                          else "DIFFERENT" if sym in books else "no_book")
        return {"checkpoints_equal": equal, "checkpoints_different": different,
                "checkpoints_generated": sum(len(g.checkpoints) for s, g in gen.books.items()
                                             if s in self.symbols[venue]),
                "different_examples": examples, "final": final,
                "final_different": sum(v != "equal" for v in final.values())}

    def rejects(self) -> dict[str, Counter[bytes]]:
        out: dict[str, Counter[bytes]] = {}
        for path in (self.root / ".rejects").glob("exchange=*/date=*/*.jsonl"):
            venue = path.parent.parent.name.removeprefix("exchange=")
            for line in path.read_bytes().splitlines():
                try:
                    d = json.loads(line)
                except ValueError:
                    continue
                frame = d.get("frame")
                if isinstance(frame, str):
                    out.setdefault(venue, Counter())[frame.encode()] += 1
        return out

    def rss_summary(self) -> dict[str, Any]:
        # Daemon starts and full-disk episodes on the samples' clock (s since the start).
        offset = time.time() - (time.monotonic() - self.t0)
        return rss_summary(self.rss, [w - offset for w in self.starts],
                           [(a - offset, b - offset) for a, b in self.disk_full], self.now())


def slope_per_min(samples: list[tuple[float, int]]) -> float | None:
    """Least-squares slope of (seconds, KiB) samples, in KiB per minute."""
    if len(samples) < 3:
        return None
    ts = [t / 60 for t, _ in samples]
    ks = [float(kb) for _, kb in samples]
    mt, mk = statistics.fmean(ts), statistics.fmean(ks)
    var = sum((t - mt) ** 2 for t in ts)
    if not var:
        return None
    return round(sum((t - mt) * (k - mk) for t, k in zip(ts, ks, strict=True)) / var, 1)


def rss_summary(samples: list[tuple[float, int]], starts: list[float],
                disk_full: list[tuple[float, float]], end: float) -> dict[str, Any]:
    """RSS of the daemon over the run, judged in stretches.

    Two faults move RSS on purpose: a kill -9 restarts the process (RSS starts again),
    and a full disk makes the daemon hold rows in memory until space returns (RSS steps
    up to that backlog's high-water mark; reported as `disk_full_steps`). A stretch is the
    time between such events, without the RSS_WARMUP_S after a start and the
    RSS_SETTLE_S after a full disk ends. "Flat" = in every stretch of at least
    RSS_MIN_SPAN_S (3 minutes) of samples, the highest RSS is at most RSS_PLATEAU (5 %)
    above the lowest: memory does not grow with time or messages. None when no stretch is
    long enough."""
    if not samples:
        return {"samples": []}
    cuts = sorted([(t, RSS_WARMUP_S) for t in starts]
                  + [(b, RSS_SETTLE_S) for _, b in disk_full]
                  + [(a, 0.0) for a, _ in disk_full])
    stretches = []
    bounds = [*cuts, (end + 1, 0.0)]
    for (a, skip), (b, _) in itertools.pairwise(bounds):
        seg = [(t, kb) for t, kb in samples if a + skip <= t < b]
        if len(seg) >= 2:
            kbs = [kb for _, kb in seg]
            span = seg[-1][0] - seg[0][0]
            stretches.append({"from_s": round(seg[0][0], 1), "to_s": round(seg[-1][0], 1),
                              "min_kb": min(kbs), "max_kb": max(kbs),
                              "growth_pct": round(100 * (max(kbs) / min(kbs) - 1), 2),
                              "slope_kb_per_min": slope_per_min(seg),
                              "judged": span >= RSS_MIN_SPAN_S})
    steps = []
    for a, b in disk_full:
        before = [kb for t, kb in samples if a - 30 <= t < a]
        after = [kb for t, kb in samples if b <= t < b + RSS_SETTLE_S]
        if before and after:
            steps.append({"at_s": round(a, 1), "before_kb": before[-1],
                          "after_max_kb": max(after)})
    kbs = [kb for t, kb in samples if not any(0 <= t - s < RSS_WARMUP_S for s in starts)]
    kbs = kbs or [kb for _, kb in samples]
    judged = [x for x in stretches if x["judged"]]
    return {"samples": samples, "first_kb": kbs[0], "median_kb": int(statistics.median(kbs)),
            "last_kb": kbs[-1], "max_kb": max(kbs), "stretches": stretches,
            "disk_full_steps": steps, "stretches_judged": len(judged),
            "worst_growth_pct": max((x["growth_pct"] for x in judged), default=None),
            "worst_slope_kb_per_min": max((x["slope_kb_per_min"] or 0.0 for x in judged),
                                          default=None),
            "flat": all(x["growth_pct"] <= 100 * RSS_PLATEAU for x in judged)
            if judged else None}


def summary(r: dict[str, Any]) -> str:
    t, rss = r["totals"], r["rss"]
    rows: list[tuple[str, Any]] = [
        ("duration_s / seed", f"{r['duration_s']:g} / {r['seed']}"),
        ("trade ids sent / rows stored", f"{t['trade_ids_sent']} / {t['trade_rows_stored']}"),
        ("lost (undocumented)", t["lost"]),
        ("lost in gap windows", t["lost_in_gap"]),
        ("lost in disconnect windows", t["lost_in_disconnect_window"]),
        ("lost in kill -9 windows", t["lost_in_kill_window"]),
        ("duplicates / stored never sent", f"{t['duplicates']} / {t['stored_not_sent']}"),
        ("book checkpoints equal / checked", f"{r['books_checked'] - r['books_different']}"
                                             f" / {r['books_checked']}"),
        ("books different (incl. final)", r["books_different"]),
        ("malformed injected / kept raw / missing",
         f"{t['malformed_injected']} / {t['malformed_kept_raw']} / {t['malformed_missing']}"),
        ("unknown-shape JSON injected / kept raw",
         f"{t['unknown_injected']} / {t['unknown_kept_raw']} (counted as unknown, not a check)"),
        ("oversized injected / closes", f"{t['oversized_injected']} / {t['oversized_closes']}"),
        ("RSS KiB first/median/last/max", f"{rss.get('first_kb')} / {rss.get('median_kb')} / "
                                          f"{rss.get('last_kb')} / {rss.get('max_kb')}"),
        ("RSS stretches judged; worst growth %", f"{rss.get('stretches_judged')}; "
                                                  f"{rss.get('worst_growth_pct')}"),
        ("RSS worst slope KiB/min; flat", f"{rss.get('worst_slope_kb_per_min')}; "
                                          f"{rss.get('flat')}"),
        ("RSS steps at full disk (KiB)", ", ".join(
            f"{x['before_kb']}->{x['after_max_kb']}" for x in rss.get("disk_full_steps", []))),
        ("daemon starts / final exit code", f"{r['daemon_starts']} / {r['final_exit_code']}"),
        ("faults injected", f"{len(r['faults'])} {json.dumps(r['faults_by_kind'])}"),
        ("full disk", "injected" if r["disk_full_injected"] else r["disk_full_note"]),
    ]
    for venue, v in r["venues"].items():
        rows.append((f"  {venue}", f"frames {v['frames_sent']}, trades {v['trade_ids_sent']}"
                     f"/{v['trade_rows_stored']}, lost {v['lost']} (gap {v['lost_in_gap']}, "
                     f"disc {v['lost_in_disconnect_window']}, kill {v['lost_in_kill_window']})"
                     f", dup {v['duplicates']}, conns {v['connections']}, books "
                     f"{v['books']['checkpoints_equal']}={v['books']['checkpoints_different']}"
                     f"x final {v['books']['final']}"))
        rows.append((f"  {venue} events", json.dumps(v["events"])))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def failures(r: dict[str, Any]) -> list[str]:
    t = r["totals"]
    bad = [f"{k}={t[k]}" for k in ("lost", "duplicates", "stored_not_sent",
                                   "malformed_missing") if t[k]]
    if r["books_different"]:
        bad.append(f"books_different={r['books_different']}")
    if t["oversized_closes"] < t["oversized_injected"]:
        bad.append(f"oversized closes {t['oversized_closes']} < {t['oversized_injected']}")
    if not t["trade_rows_stored"]:
        bad.append("nothing stored")
    if r["final_exit_code"] != 0:
        bad.append(f"exit code {r['final_exit_code']}")
    if r["duration_s"] >= 600 and r["rss"].get("flat") is False:
        bad.append("RSS not flat")
    return bad


def disk_fault_unavailable() -> str | None:
    """Why a full disk cannot be injected here (None: it can)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return "util-linux `unshare` is not installed"
    r = subprocess.run([unshare, "-Urm", "true"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`unshare -Urm` refused (user namespaces not allowed): {r.stderr.strip()[:200]}"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=None,
                    help="seconds (default 1800; 120 with --smoke)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="short run (120 s unless --duration)")
    ap.add_argument("--json", type=Path, default=None, help="write the report as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--no-disk-fault", action="store_true",
                    help="do not run in a user namespace (no full-disk fault)")
    ap.add_argument("--in-namespace", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.duration is None:
        args.duration = 120.0 if args.smoke else 1800.0
    disk = "disabled by --no-disk-fault" if args.no_disk_fault else None
    if disk is None and not args.in_namespace:
        disk = disk_fault_unavailable()
        if disk is None:
            # Re-run inside a user + mount namespace: the data root becomes a tmpfs that
            # the soak may fill.
            cmd = [shutil.which("unshare") or "unshare", "-Urm", sys.executable,
                   str(Path(__file__).resolve()), *(argv if argv is not None else sys.argv[1:]),
                   "--in-namespace"]
            return subprocess.run(cmd).returncode
    work = Path(tempfile.mkdtemp(prefix="ingestd-soak-"))
    (work / "data").mkdir()
    if args.in_namespace:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4g", "tmpfs", str(work / "data")],
                       check=True)
    print(f"soak: {args.duration:g} s, seed {args.seed}, work dir {work}", flush=True)
    report = asyncio.run(Soak(args, work, disk).run())
    print(summary(report), flush=True)
    bad = failures(report)
    report["failures"] = bad
    print("RESULT:", "FAIL " + "; ".join(bad) if bad else "PASS", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.in_namespace:
        if args.keep:   # the tmpfs goes with the namespace: keep a copy
            shutil.copytree(work / "data", work / "data-kept", symlinks=True)
        subprocess.run(["umount", str(work / "data")], capture_output=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
