"""Simulated Hyperliquid public WebSocket (`wss://api.hyperliquid.xyz/ws`).

Owns: the session as Hyperliquid runs it - `{"method":"subscribe","subscription":
{"type":T,"coin":C}}` answered with a `subscriptionResponse` that echoes the subscription
(the recorded bytes where a recorded ack matches: `l2Book` BTC, `bbo` BTC; otherwise
generated in the recorded shape, `l2Book` with `"nSigFigs":null,"mantissa":null`), then
that subscription's recorded frames byte for byte, in the order of their venue `time`
(recordings of several dates are merged per stream, see sim/data/hyperliquid/README.md);
`{"method":"unsubscribe",...}` acknowledged the same way and the stream stopped;
`{"method":"ping"}` answered with the recorded `{"channel":"pong"}`; a request of an unknown
subscription type, or one that is not JSON, answered with an error frame in the recorded
shape (`{"channel":"error","data":"Error parsing JSON into valid websocket request: ..."}`).
A coin with no recording is acknowledged and serves nothing. In the server's live mode
(one shared timeline, `timeline()`), a subscription joins the timeline where it is.

Must not: change or invent a market-data frame.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, ClassVar

import orjson

from ingestd.sim import recorded
from ingestd.sim.venues.base import Venue

if TYPE_CHECKING:
    from ingestd.sim.server import SimConn

TYPES = frozenset({"trades", "l2Book", "bbo", "activeAssetCtx", "candle"})
DATA_FILES: tuple[str, ...] = ("l2Book.jsonl", "trades.jsonl", "bbo.jsonl",
                               "activeAssetCtx.jsonl", "testnet_2026.jsonl")


def stream_key(kind: str, coin: str) -> str:
    return f"{kind}:{coin}"


def _frame_key(msg: Any) -> tuple[str, int] | None:
    """(stream key, venue time in ms or 0) of a recorded data frame; None for others."""
    if not isinstance(msg, dict):
        return None
    channel, data = msg.get("channel"), msg.get("data")
    if channel == "trades" and isinstance(data, list) and data:
        return stream_key(channel, data[0]["coin"]), int(data[0]["time"])
    if channel in ("l2Book", "bbo", "activeAssetCtx") and isinstance(data, dict):
        return stream_key(channel, data["coin"]), int(data.get("time", 0))
    return None


class HyperliquidVenue(Venue):
    exchange: ClassVar[str] = "hyperliquid"
    data_dir: ClassVar[str] = "hyperliquid"
    demo_feed: ClassVar[dict[str, object]] = {
        "symbols": ["BTC"],
        "channels": ["trades", "quotes", "book", "derivatives"],
    }

    def __init__(self) -> None:
        keyed: dict[str, list[tuple[int, int, bytes]]] = {}
        n = 0
        self.acks: dict[tuple[str, str], bytes] = {}
        self.pong = b'{"channel":"pong"}'
        for name in (*DATA_FILES, "subscriptionResponse.jsonl"):
            for frame in recorded.frames(self.data_dir, name):
                msg = orjson.loads(frame)
                key = _frame_key(msg)
                if key is not None:
                    keyed.setdefault(key[0], []).append((key[1], n, frame))
                    n += 1
                elif msg.get("channel") == "subscriptionResponse":
                    sub = msg["data"]["subscription"]
                    self.acks.setdefault((sub["type"], sub["coin"]), frame)
                elif msg.get("channel") == "pong":
                    self.pong = frame
        # Each stream in venue-time order (file order among equal times).
        self.streams: dict[str, list[bytes]] = {
            k: [f for _, _, f in sorted(v)] for k, v in keyed.items()}
        self.stream_of = {f: k for k, fs in self.streams.items() for f in fs}
        self.requests: list[str] = []   # every request clients sent (for tests)

    def timeline(self) -> list[tuple[str, bytes]]:
        """Live mode: every recorded data frame, streams interleaved, with its key."""
        from ingestd.sim.merge import merge_streams

        keys = sorted(self.streams)
        return [(self.stream_of[f], f)
                for f in merge_streams([self.streams[k] for k in keys])]

    def ack(self, method: str, sub: dict[str, Any]) -> bytes:
        kind, coin = sub.get("type"), sub.get("coin")
        if method == "subscribe" and set(sub) == {"type", "coin"}:
            recorded_ack = self.acks.get((str(kind), str(coin)))
            if recorded_ack is not None:
                return recorded_ack
        echo = dict(sub)
        if kind == "l2Book":
            echo.setdefault("nSigFigs", None)
            echo.setdefault("mantissa", None)
        return orjson.dumps({"channel": "subscriptionResponse",
                             "data": {"method": method, "subscription": echo}})

    @staticmethod
    def error(text: str) -> bytes:
        return orjson.dumps({"channel": "error", "data": text})

    async def session(self, conn: SimConn) -> None:
        tasks: dict[str, asyncio.Task[None]] = {}
        try:
            while True:
                msg = await conn.recv()
                text = msg if isinstance(msg, str) else msg.decode("utf-8", "replace")
                self.requests.append(text)
                try:
                    req = orjson.loads(text)
                except orjson.JSONDecodeError:
                    await conn.send_control(self.error(
                        f"Error parsing JSON into valid websocket request: {text}"))
                    continue
                method = req.get("method") if isinstance(req, dict) else None
                if method == "ping":
                    await conn.send_control(self.pong)
                    continue
                sub = req.get("subscription") if isinstance(req, dict) else None
                if (method not in ("subscribe", "unsubscribe") or not isinstance(sub, dict)
                        or sub.get("type") not in TYPES
                        or not isinstance(sub.get("coin"), str)):
                    await conn.send_control(self.error(
                        f"Error parsing JSON into valid websocket request: {text}"))
                    continue
                key = stream_key(sub["type"], sub["coin"])
                if method == "unsubscribe":
                    task = tasks.pop(key, None)
                    if task is None:
                        await conn.send_control(self.error(f"Already unsubscribed: {text}"))
                        continue
                    task.cancel()
                    await conn.send_control(self.ack(method, sub))
                    continue
                if key in tasks:
                    await conn.send_control(self.error(f"Already subscribed: {text}"))
                    continue
                await conn.send_control(self.ack(method, sub))
                if conn.server.live:
                    tasks[key] = asyncio.create_task(conn.stream_live([key]))
                else:
                    tasks[key] = asyncio.create_task(
                        conn.send_stream(self.streams.get(key, [])))
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)


__all__ = ["HyperliquidVenue", "stream_key"]
