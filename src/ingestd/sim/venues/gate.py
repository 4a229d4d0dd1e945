"""Simulated Gate.io spot WebSocket v4 (`wss://api.gateio.ws/ws/v4/`) and REST order book.

Owns: the session as Gate runs it - `{"time":..,"channel":..,"event":"subscribe",
"payload":[...]}` acknowledged with `{"time":..,"channel":..,"event":"subscribe",
"result":{"status":"success"}}` (the recorded ack shape), `spot.ping` answered with
`{"time":..,"channel":"spot.pong","event":"","result":null}` (documented shape,
generated), and each subscribed (channel, pair) serving its recorded frames byte for
byte in recorded order. REST: `GET /api/v4/spot/order_book?currency_pair=X` answers the
recorded snapshot body of that pair (see sim/data/gate/README.md for the pair order).

Must not: change or invent a market-data frame.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, ClassVar

import orjson

from ingestd.sim import recorded
from ingestd.sim.venues.base import Venue

if TYPE_CHECKING:
    from ingestd.sim.server import SimConn

SNAPSHOT_PAIRS: tuple[str, ...] = (
    "HAI_ETH", "QTUM3S_USDT", "FAST_USDT", "OMG_USDT", "ZKS_ETH", "NEO_BTC", "INK_USDT",
    "DIS_USDT", "BTC_USDC", "NANO_USDT")
_PAIR_KEY = {"spot.trades": "currency_pair", "spot.book_ticker": "s",
             "spot.order_book_update": "s"}


class GateVenue(Venue):
    exchange: ClassVar[str] = "gate"
    data_dir: ClassVar[str] = "gate"
    demo_feed: ClassVar[dict[str, object]] = {
        "symbols": [*SNAPSHOT_PAIRS, "BTC_USDT"],
        "channels": ["trades", "quotes", "book"],
    }

    def __init__(self) -> None:
        self.frames: list[tuple[str, str, bytes]] = []
        for name in ("order_book_update.jsonl", "trades.jsonl", "book_ticker.jsonl"):
            for frame in recorded.frames(self.data_dir, name):
                msg = orjson.loads(frame)
                ch = msg["channel"]
                self.frames.append((ch, msg["result"][_PAIR_KEY[ch]], frame))
        bodies = recorded.frames(self.data_dir, "order_book_snapshot_rest.jsonl")
        self.snapshots = dict(zip(SNAPSHOT_PAIRS, bodies, strict=True))
        self.requests: list[str] = []

    def rest(self, path: str, query: dict[str, list[str]]) -> tuple[int, bytes] | None:
        if path != "/api/v4/spot/order_book":
            return None
        body = self.snapshots.get((query.get("currency_pair") or [""])[0])
        return None if body is None else (200, body)

    async def session(self, conn: SimConn) -> None:
        tasks: list[asyncio.Task[None]] = []
        try:
            while True:
                msg = await conn.recv()
                text = msg if isinstance(msg, str) else msg.decode("utf-8", "replace")
                self.requests.append(text)
                try:
                    req = orjson.loads(text)
                except orjson.JSONDecodeError:
                    continue
                if not isinstance(req, dict):
                    continue
                ch, t = req.get("channel"), req.get("time", 0)
                if ch == "spot.ping":
                    await conn.send_control(orjson.dumps(
                        {"time": t, "channel": "spot.pong", "event": "", "result": None}))
                    continue
                payload = req.get("payload")
                if req.get("event") != "subscribe" or not isinstance(payload, list):
                    continue
                await conn.send_control(orjson.dumps(
                    {"time": t, "channel": ch, "event": "subscribe",
                     "result": {"status": "success"}}))
                pairs = set(payload)
                frames = [f for c, p, f in self.frames if c == ch and p in pairs]
                tasks.append(asyncio.create_task(conn.send_stream(frames)))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


__all__ = ["GateVenue"]
