"""Simulated Bybit v5 public WebSocket: linear (`/v5/public/linear`) and spot (`/v5/public/spot`).

Owns: the session protocol - `{"op":"subscribe"|"unsubscribe","args":[...],"req_id":...}`
acknowledged with one `{"success":...,"ret_msg":...,"conn_id":...,"op":...}` per request (in
the recorded linear and spot ack shapes), `{"op":"ping"}` answered with the category's pong
shape (ping.jsonl), refusals (`success:false`) for malformed topics, topics already
subscribed, and, on spot, more than 10 args in one request - and serving, for each
subscribed topic, the recorded frames of that topic byte for byte (merged across the
topics of one request by relative position, like the Binance venue). A (re)subscription
serves the topic's recording from its start (its snapshot first); an unsubscription stops
it. Topics the recordings do not have are accepted and stay silent.

The recordings (sim/data/bybit/) are linear captures: publicTrade and orderbook.200 of
BTCUSDT, ETHUSDT, SOLUSDT, DOGEUSDT (2026-08), orderbook.1 of BANDUSDT, RADUSDT, SNTUSDT,
AIOZUSDT (2025-06), tickers of the first four (BTCUSDT and ETHUSDT whole, 2026-08-09), and
two `allLiquidation` single frames (STRKUSDT, BTCUSDT; 2026-10) - see data/bybit/README.md.
No spot recording exists, so the spot venue serves the same linear frames for the demo
and tests (only its path, ack/pong shapes and the 10-args limit are spot's).

Live mode (`SimServer(live=True)`): every topic is served from the server's shared
timeline (`timeline()`: all recorded topics merged), from the moment it is subscribed.
The recordings hold one snapshot per orderbook.200 topic, at its start, so a book topic
subscribed mid-timeline gets deltas only (the codec drops them, counted); orderbook.1
frames are all snapshots and trades need none.

Faults (constructor options): `skip_frames` - (topic, index in that topic's recording)
pairs that are not sent the first time the topic is served, to make a real sequence gap.

Must not: change, reorder within a topic, or invent a data frame (acks and pongs are
control frames built in the documented shapes).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

import orjson

from ingestd.sim import recorded
from ingestd.sim.venues.base import Venue

if TYPE_CHECKING:
    from ingestd.sim.server import SimConn

DATA_DIR = "bybit"
# A topic recorded whole in its own file (tickers_linear_<SYM>.jsonl: every tickers frame of
# that symbol in the capture) is taken from that file only: tickers_linear.jsonl holds the
# first 150 mixed-symbol frames of the same capture, so it would repeat them.
STREAM_FILES = ("tickers_linear_BTCUSDT.jsonl", "tickers_linear_ETHUSDT.jsonl",
                "allLiquidation.jsonl", "publicTrade_linear.jsonl",
                "orderbook200_linear.jsonl", "orderbook1_bbo_linear.jsonl",
                "tickers_linear.jsonl")
_TOPIC = re.compile(r"(?:publicTrade|tickers|liquidation|allLiquidation)\.[A-Z0-9-]+"
                    r"|orderbook\.(?:1|50|200|1000)\.[A-Z0-9-]+"
                    r"|kline\.(?:1|3|5|15|30|60|120|240|360|720|D|W|M)\.[A-Z0-9-]+")
_DEMO_SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT", "DOGEUSDT",
                 "BANDUSDT", "RADUSDT", "SNTUSDT", "AIOZUSDT"]


def recorded_topics() -> dict[str, list[bytes]]:
    """Every recorded data frame (those with a `topic`), by topic, in recorded order."""
    by_topic: dict[str, list[bytes]] = {}
    for name in STREAM_FILES:
        earlier = set(by_topic)
        for frame in recorded.frames(DATA_DIR, name):
            topic = orjson.loads(frame).get("topic")
            if isinstance(topic, str) and topic not in earlier:
                by_topic.setdefault(topic, []).append(frame)
    return by_topic


class BybitLinearVenue(Venue):
    exchange: ClassVar[str] = "bybit-linear"
    path: ClassVar[str] = "/v5/public/linear"
    max_args_per_request: ClassVar[int | None] = None
    demo_feed: ClassVar[dict[str, object]] = {
        "symbols": _DEMO_SYMBOLS,
        "channels": ["trades", "quotes", "book", "derivatives", "liquidations"],
        "book_depth": 200,
    }

    def __init__(self, skip_frames: Iterable[tuple[str, int]] = ()) -> None:
        self.by_topic = recorded_topics()
        self.skip_frames = frozenset(skip_frames)
        self.served_topics: set[str] = set()   # topics served at least once (skip applies once)
        self.requests: list[dict[str, Any]] = []  # every request received, decoded

    # ---- control frames in the recorded shapes ----------------------------------------------
    def ack(self, conn_id: str, op: str, req: dict[str, Any], ok: bool = True,
            ret_msg: str = "") -> bytes:
        return orjson.dumps({"success": ok, "ret_msg": ret_msg, "conn_id": conn_id,
                             "req_id": req.get("req_id", ""), "op": op})

    def pong(self, conn_id: str, req: dict[str, Any]) -> bytes:
        return orjson.dumps({"success": True, "ret_msg": "pong", "conn_id": conn_id,
                             "req_id": req.get("req_id", ""), "op": "ping"})

    def timeline(self) -> list[tuple[str, bytes]]:
        per_topic = [[(topic, 0, f) for f in frames] for topic, frames in
                     sorted(self.by_topic.items())]
        return [(topic, frame) for topic, _, frame in _merge(per_topic)]

    # ---- session -----------------------------------------------------------------------------
    async def session(self, conn: SimConn) -> None:
        if urlsplit(conn.path).path != self.path:
            await conn.ws.close(1008, f"unknown path; this venue serves {self.path}")
            return
        conn_id = f"sim{conn.conn_id:04d}-{self.exchange}"
        generation: dict[str, int] = {}   # topic -> current subscription (absent: none)
        serving: list[asyncio.Task[None]] = []
        live_topics: dict[str, asyncio.Task[None]] = {}
        counter = 0

        def live(frames: list[tuple[str, int, bytes]]) -> Iterator[bytes]:
            # Checked as each frame is due: an unsubscribed topic stops at once.
            for topic, gen, frame in frames:
                if generation.get(topic) == gen:
                    yield frame

        async def serve(topics: list[str]) -> None:
            per_topic = []
            for topic in topics:
                first = topic not in self.served_topics
                self.served_topics.add(topic)
                gen = generation[topic]
                per_topic.append([
                    (topic, gen, frame)
                    for i, frame in enumerate(self.by_topic.get(topic, ()))
                    if not (first and (topic, i) in self.skip_frames)])
            merged = _merge(per_topic)
            await conn.send_stream(live(merged))

        try:
            while True:
                raw = await conn.recv()
                try:
                    req = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    req = None
                if not isinstance(req, dict):
                    await conn.send_control(self.ack(conn_id, "", {}, False, "Invalid request"))
                    continue
                self.requests.append(req)
                op = req.get("op")
                if op == "ping":
                    await conn.send_control(self.pong(conn_id, req))
                    continue
                args = req.get("args")
                if op not in ("subscribe", "unsubscribe") or not isinstance(args, list) \
                        or not args or not all(isinstance(a, str) for a in args):
                    await conn.send_control(self.ack(conn_id, str(op or ""), req, False,
                                                     "Invalid request"))
                    continue
                problem = self._check_args(op, args, generation)
                if problem is not None:
                    await conn.send_control(self.ack(conn_id, op, req, False, problem))
                    continue
                if op == "unsubscribe":
                    for topic in args:
                        generation.pop(topic, None)
                        task = live_topics.pop(topic, None)
                        if task is not None:
                            task.cancel()
                    await conn.send_control(self.ack(conn_id, op, req))
                    continue
                for topic in args:
                    counter += 1
                    generation[topic] = counter
                await conn.send_control(self.ack(conn_id, op, req))
                if conn.server.live:
                    for topic in args:
                        live_topics[topic] = asyncio.create_task(conn.stream_live([topic]))
                else:
                    serving.append(asyncio.create_task(serve(list(args))))
        finally:
            tasks = serving + list(live_topics.values())
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _check_args(self, op: str, args: list[str], generation: dict[str, int]) -> str | None:
        limit = self.max_args_per_request
        if limit is not None and len(args) > limit:
            return f"args size >{limit}"
        for topic in args:
            if _TOPIC.fullmatch(topic) is None:
                return f"error:handler not found,topic:{topic}"
            if op == "subscribe" and topic in generation:
                return f"error:already subscribed,topic:{topic}"
        return None


class BybitSpotVenue(BybitLinearVenue):
    """Spot: `/v5/public/spot`, ≤ 10 args per request, spot's ack and pong shapes.

    Serves the recorded *linear* frames (no spot recording exists): the demo shows the
    spot codec and protocol working on real Bybit frames, not spot market data.
    """

    exchange: ClassVar[str] = "bybit-spot"
    path: ClassVar[str] = "/v5/public/spot"
    max_args_per_request: ClassVar[int | None] = 10
    demo_feed: ClassVar[dict[str, object]] = {
        "symbols": _DEMO_SYMBOLS,
        "channels": ["trades", "quotes", "book"],
        "book_depth": 200,
    }

    def ack(self, conn_id: str, op: str, req: dict[str, Any], ok: bool = True,
            ret_msg: str = "") -> bytes:
        # Recorded spot ack: {"success":true,"ret_msg":"subscribe","conn_id":"...","op":...};
        # `req_id` is echoed only when the request had one.
        body: dict[str, Any] = {"success": ok, "ret_msg": ret_msg if not ok else op,
                                "conn_id": conn_id}
        if "req_id" in req:
            body["req_id"] = req["req_id"]
        body["op"] = op
        return orjson.dumps(body)

    def pong(self, conn_id: str, req: dict[str, Any]) -> bytes:
        body: dict[str, Any] = {"success": True, "ret_msg": "pong", "conn_id": conn_id}
        if "req_id" in req:
            body["req_id"] = req["req_id"]
        body["op"] = "ping"
        return orjson.dumps(body)


def _merge(per_topic: list[list[tuple[str, int, bytes]]]) -> list[tuple[str, int, bytes]]:
    """`merge_streams` over (topic, generation, frame) items, keeping each topic's order."""
    from ingestd.sim.merge import merge_streams

    # merge_streams works on bytes: merge keys and map them back.
    index: dict[bytes, tuple[str, int, bytes]] = {}
    keyed: list[list[bytes]] = []
    for j, items in enumerate(per_topic):
        seq = []
        for i, item in enumerate(items):
            key = f"{j}:{i}".encode()
            index[key] = item
            seq.append(key)
        keyed.append(seq)
    return [index[k] for k in merge_streams(keyed)]
