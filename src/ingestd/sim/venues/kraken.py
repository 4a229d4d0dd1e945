"""Simulated Kraken spot WebSocket v2 (`/v2`).

Owns: the session the way Kraken runs it: the recorded `status` banner on connect; per
symbol `subscribe` acks (`{"method":"subscribe","result":{...},"success":true,...}`) for the
`trade`, `ticker` and `book` channels; refusals shaped like the recorded ones
(`"Currency pair not supported <symbol>"`, `success: false`) for symbols without
recorded data; `unsubscribe` acks; `pong` answers to `{"method":"ping"}`; the recorded
`heartbeat` frame about once per second while anything is subscribed; and, for each
subscribed (channel, symbol), its recorded frames byte for byte via `conn.send_stream`
(book: snapshot then updates in recorded order; trades: in trade-time order, since the two
recorded trade frames are separate captures). An unsubscribe stops that stream at once;
subscribing again serves its recording from the start (for `book`: a fresh snapshot, as the
real venue sends).

Only the recorded book depth (25) is served; other depths are refused (the simulator
cannot invent a depth-10 stream from a depth-25 recording).

Fault: `skip_book_update = N` withholds the N-th `update` frame of every book stream the
first time it is served (later subscriptions serve it whole): a lost message, which the
client's checksum must catch and repair by resubscribing.

Must not: change or invent a market-data frame (acks, refusals and pongs are generated,
with the recorded shapes).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar

import orjson

from ingestd.sim import recorded
from ingestd.sim.venues.base import Venue, without_nth

if TYPE_CHECKING:
    from ingestd.sim.server import SimConn

Key = tuple[str, str]  # (channel, symbol)

RECORDED_BOOK_DEPTH = 25
KRAKEN_BOOK_DEPTHS = (10, 25, 100, 500, 1000)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class KrakenVenue(Venue):
    exchange: ClassVar[str] = "kraken"
    data_dir: ClassVar[str] = "kraken"
    stream_files: ClassVar[tuple[str, ...]] = ("book.jsonl", "trade.jsonl", "ticker.jsonl")
    demo_feed: ClassVar[dict[str, object]] = {
        # BTC/USD: the 2026-08-16 depth-25 book capture, the 2024/2026 trade captures and
        # the 2026-09-25 ticker capture.
        "symbols": ["BTC/USD"],
        "channels": ["trades", "quotes", "book"],
    }

    def __init__(self, skip_book_update: int | None = None,
                 heartbeat_interval_s: float | None = 1.0) -> None:
        self.by_key: dict[Key, list[bytes]] = {}
        trade_time: dict[bytes, str] = {}
        for name in self.stream_files:
            for frame in recorded.frames(self.data_dir, name):
                msg = orjson.loads(frame)
                data = msg.get("data")
                if not isinstance(data, list) or not data or not isinstance(data[0], dict):
                    continue
                key = (str(msg.get("channel")), str(data[0].get("symbol")))
                self.by_key.setdefault(key, []).append(frame)
                if key[0] == "trade":
                    trade_time[frame] = str(data[0].get("timestamp", ""))
        for key, frames in self.by_key.items():
            if key[0] == "trade":
                frames.sort(key=lambda f: trade_time[f])
        self.symbols = frozenset(sym for _, sym in self.by_key)
        control = recorded.frames(self.data_dir, "subscribe.jsonl")
        self.status_frame = [f for f in control if f.startswith(b'{"channel":"status"')][-1]
        self.heartbeat_frame = recorded.frames(self.data_dir, "heartbeat.jsonl")[0]
        self.skip_book_update = skip_book_update
        self.heartbeat_interval_s = heartbeat_interval_s
        self._served_once: set[Key] = set()
        self.requests: list[str] = []   # every text frame clients sent (for tests)

    def streams_available(self) -> list[Key]:
        return sorted(self.by_key)

    def _frames_for(self, key: Key) -> list[bytes]:
        frames = self.by_key.get(key, [])
        first = key not in self._served_once
        self._served_once.add(key)
        n = self.skip_book_update
        if not (first and n and key[0] == "book"):
            return frames
        return without_nth(frames, n, b'"type":"update"')

    async def session(self, conn: SimConn) -> None:
        # One task per subscribed (channel, symbol): an unsubscribe cancels it, so nothing
        # of the old stream can follow the ack (as on the real venue).
        active: dict[Key, asyncio.Task[None]] = {}
        background: list[asyncio.Task[None]] = []

        def reply(body: dict[str, Any], req_id: object) -> bytes:
            if req_id is not None:
                body["req_id"] = req_id
            body["time_in"] = body["time_out"] = _now()
            return orjson.dumps(body)

        def refusal(method: str, error: str, req_id: object, symbol: str | None = None
                    ) -> bytes:
            body: dict[str, Any] = {"error": error, "method": method, "success": False}
            if symbol is not None:
                body["symbol"] = symbol
            return reply(body, req_id)

        async def serve(key: Key) -> None:
            await conn.send_stream(self._frames_for(key))

        async def heartbeats(interval_s: float) -> None:
            while True:
                await asyncio.sleep(interval_s)
                if active:
                    await conn.send_control(self.heartbeat_frame)

        await conn.send_control(self.status_frame)
        if self.heartbeat_interval_s:
            background.append(asyncio.create_task(heartbeats(self.heartbeat_interval_s)))
        try:
            while True:
                msg = await conn.recv()
                text = msg if isinstance(msg, str) else msg.decode("utf-8", "replace")
                self.requests.append(text)
                try:
                    req = orjson.loads(text)
                except orjson.JSONDecodeError:
                    req = None
                if not isinstance(req, dict) or not isinstance(req.get("method"), str):
                    await conn.send_control(refusal("unknown", "Malformed request", None))
                    continue
                method, req_id = req["method"], req.get("req_id")
                if method == "ping":
                    await conn.send_control(reply({"method": "pong"}, req_id))
                    continue
                if method not in ("subscribe", "unsubscribe"):
                    await conn.send_control(refusal(method, "Method not found", req_id))
                    continue
                params = req.get("params")
                if not isinstance(params, dict):
                    await conn.send_control(refusal(method, "Missing params", req_id))
                    continue
                channel, symbols = params.get("channel"), params.get("symbol")
                if channel not in ("trade", "ticker", "book") or not isinstance(symbols, list):
                    await conn.send_control(refusal(
                        method, f"Channel not found or not supported: {channel}", req_id))
                    continue
                result: dict[str, Any] = {"channel": channel}
                if channel == "book":
                    depth = params.get("depth", 10)
                    if depth not in KRAKEN_BOOK_DEPTHS:
                        await conn.send_control(refusal(method, "Invalid depth", req_id))
                        continue
                    if depth != RECORDED_BOOK_DEPTH:
                        await conn.send_control(refusal(
                            method, f"simulator: only depth {RECORDED_BOOK_DEPTH} is recorded",
                            req_id))
                        continue
                    result["depth"] = depth
                if channel == "ticker" and method == "subscribe":
                    result["event_trigger"] = params.get("event_trigger", "trades")
                if method == "subscribe":
                    result["snapshot"] = params.get("snapshot", True)
                for sym in symbols:
                    if not isinstance(sym, str):
                        await conn.send_control(refusal(method, "Invalid symbol", req_id))
                        continue
                    key = (channel, sym)
                    if method == "unsubscribe":
                        task = active.pop(key, None)
                        if task is None:
                            await conn.send_control(
                                refusal(method, "Subscription Not Found", req_id, sym))
                            continue
                        task.cancel()
                        await asyncio.gather(task, return_exceptions=True)
                    elif sym not in self.symbols:
                        await conn.send_control(refusal(
                            method, f"Currency pair not supported {sym}", req_id, sym))
                        continue
                    elif key in active:
                        await conn.send_control(
                            refusal(method, "Already subscribed", req_id, sym))
                        continue
                    await conn.send_control(reply(
                        {"method": method, "result": {**result, "symbol": sym},
                         "success": True}, req_id))
                    if method == "subscribe":
                        active[key] = asyncio.create_task(serve(key))
        finally:
            tasks = [*background, *active.values()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


__all__ = ["KrakenVenue"]
