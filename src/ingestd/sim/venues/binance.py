"""Simulated Binance spot and USD-M: combined streams, SUBSCRIBE, REST depth snapshots.

Owns: serving the recorded `@trade`, `@aggTrade`, `@bookTicker` and `@depth@100ms`
frames of the streams a client asks for (in the URL, `/stream?streams=a/b`, or with a
`SUBSCRIBE` message, acknowledged as Binance does), `/api/v3/depth` (`/fapi/v1/depth`)
answered with the recorded snapshot of that symbol, and the `!serverShutdown` event.
USD-M also serves the recorded `@markPrice@1s` and `@forceOrder` frames, and
`/fapi/v1/openInterest?symbol=` with the recorded answer for that symbol (BTCUSDT,
BTCUSDT_220624; every other symbol gets Binance's "Invalid symbol." 400: there is no
recording to answer with).

Must not: change a recorded frame.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, ClassVar
from urllib.parse import parse_qs, urlsplit

import orjson

from ingestd.sim import recorded
from ingestd.sim.venues.base import Venue

if TYPE_CHECKING:
    from ingestd.sim.server import SimConn


class BinanceSpotVenue(Venue):
    exchange: ClassVar[str] = "binance"
    data_dir: ClassVar[str] = "binance_spot"
    depth_path: ClassVar[str] = "/api/v3/depth"
    stream_files: ClassVar[tuple[str, ...]] = (
        "trade.jsonl", "aggTrade.jsonl", "bookTicker.jsonl", "depthUpdate.jsonl")
    # depth_snapshot_rest.jsonl holds bodies only; their symbols, in order, per the fixture
    # README's provenance (the REST URLs they were fetched from).
    snapshot_symbols: ClassVar[tuple[str, ...]] = ("NKNUSDT", "BLZETH", "LRCBTC", "RUNEEUR")
    demo_feed: ClassVar[dict[str, object]] = {
        # Books and quotes of the 2021-10-12 capture; trades of the 2021-04-05 capture,
        # which recorded @aggTrade (the default @trade stream has only single frames).
        "symbols": ["NKNUSDT", "BLZETH", "LRCBTC", "RUNEEUR", "ZILUSDT", "DENTUSDT",
                    "MANAUSDT"],
        "channels": ["trades", "quotes", "book"],
        "trade_stream": "aggTrade",
    }
    shutdown_frame: ClassVar[bytes] = (
        b'{"stream":"!serverShutdown","data":{"e":"serverShutdown","E":1770123456789}}')

    def __init__(self, shutdown_after_frames: int | None = None,
                 shutdown_grace_s: float = 3.0) -> None:
        self.by_stream: dict[str, list[bytes]] = {}
        for name in self.stream_files:
            for frame in recorded.frames(self.data_dir, name):
                stream = orjson.loads(frame).get("stream")
                if isinstance(stream, str):
                    self.by_stream.setdefault(stream, []).append(frame)
        bodies = recorded.frames(self.data_dir, "depth_snapshot_rest.jsonl")
        self.snapshots = dict(zip(self.snapshot_symbols, bodies, strict=True))
        self.shutdown_after_frames = shutdown_after_frames
        self.shutdown_grace_s = shutdown_grace_s

    def streams_available(self) -> list[str]:
        return sorted(self.by_stream)

    def timeline(self) -> list[tuple[str, bytes]]:
        from ingestd.sim.merge import merge_streams

        streams = sorted(self.by_stream)
        keyed = merge_streams([[b"%d" % i + b" " + f for f in self.by_stream[s]]
                               for i, s in enumerate(streams)])
        out = []
        for item in keyed:
            idx, frame = item.split(b" ", 1)
            out.append((streams[int(idx)], frame))
        return out

    def rest(self, path: str, query: dict[str, list[str]]) -> tuple[int, bytes] | None:
        if path != self.depth_path:
            return None
        symbol = (query.get("symbol") or [""])[0]
        body = self.snapshots.get(symbol)
        if body is None:
            return 400, b'{"code":-1121,"msg":"Invalid symbol."}'
        return 200, body

    async def session(self, conn: SimConn) -> None:
        from ingestd.sim.merge import merge_streams

        query = parse_qs(urlsplit(conn.path).query)
        requested = [s for s in (query.get("streams") or [""])[0].split("/") if s]
        serving: list[asyncio.Task[None]] = []

        async def serve(streams: list[str]) -> None:
            if conn.server.live:
                await serve_live(streams)
                return
            frames = merge_streams([self.by_stream.get(s, []) for s in streams])
            if self.shutdown_after_frames is not None:
                frames = frames[:self.shutdown_after_frames]
            await conn.send_stream(frames)
            if self.shutdown_after_frames is not None:
                await conn.send_control(self.shutdown_frame)

        async def serve_live(streams: list[str]) -> None:
            n = self.shutdown_after_frames
            if n is None:
                await conn.stream_live(streams)
                return
            # Like Binance: announce the shutdown, keep streaming a while, then close.
            live = asyncio.create_task(conn.stream_live(streams))
            try:
                await asyncio.wait([live, asyncio.ensure_future(conn.wait_sent(n))],
                                   return_when=asyncio.FIRST_COMPLETED)
                await conn.send_control(self.shutdown_frame)
                await asyncio.sleep(self.shutdown_grace_s)
            finally:
                live.cancel()
                await asyncio.gather(live, return_exceptions=True)
            await conn.ws.close(1001, "server shutdown")

        if requested:
            serving.append(asyncio.create_task(serve(requested)))
        try:
            while True:
                msg = await conn.recv()
                try:
                    req = orjson.loads(msg)
                except orjson.JSONDecodeError:
                    await conn.send_control(b'{"code":3,"msg":"Invalid JSON"}')
                    continue
                if not isinstance(req, dict):
                    await conn.send_control(b'{"code":2,"msg":"Invalid request"}')
                    continue
                method, rid = req.get("method"), req.get("id")
                if method == "SUBSCRIBE" and isinstance(req.get("params"), list):
                    await conn.send_control(orjson.dumps({"result": None, "id": rid}))
                    serving.append(asyncio.create_task(serve(list(req["params"]))))
                elif method == "LIST_SUBSCRIPTIONS":
                    await conn.send_control(orjson.dumps({"result": requested, "id": rid}))
                else:
                    await conn.send_control(
                        orjson.dumps({"code": 2, "msg": f"Invalid request: {method}",
                                      "id": rid}))
        finally:
            for t in serving:
                t.cancel()
            await asyncio.gather(*serving, return_exceptions=True)


class BinanceUsdmVenue(BinanceSpotVenue):
    exchange: ClassVar[str] = "binance-usdm"
    data_dir: ClassVar[str] = "binance_usdm"
    depth_path: ClassVar[str] = "/fapi/v1/depth"
    snapshot_symbols: ClassVar[tuple[str, ...]] = ("SUSHIUSDT", "AKROUSDT", "KEEPUSDT",
                                                   "CTKUSDT")
    # markPrice.jsonl / forceOrder.jsonl: single recorded frames (see data/binance_usdm/
    # README.md), served on the stream each names (`btcusdt@markPrice@1s`,
    # `xrpusdt@forceOrder`, `!markPrice@arr`, ...); the raw `/ws` frame has no stream.
    stream_files: ClassVar[tuple[str, ...]] = (
        "trade.jsonl", "aggTrade.jsonl", "bookTicker.jsonl", "depthUpdate.jsonl",
        "markPrice.jsonl", "forceOrder.jsonl")
    demo_feed: ClassVar[dict[str, object]] = {
        "symbols": ["SUSHIUSDT", "AKROUSDT", "KEEPUSDT", "CTKUSDT", "BTCUSDT", "XRPUSDT"],
        "channels": ["trades", "quotes", "book", "derivatives", "liquidations"],
        "trade_stream": "aggTrade",
        # Open interest of BTCUSDT (the only recorded answer) within the demo's seconds.
        "poll_interval_s": 3.0,
    }
    open_interest_path: ClassVar[str] = "/fapi/v1/openInterest"

    def __init__(self, shutdown_after_frames: int | None = None,
                 shutdown_grace_s: float = 3.0) -> None:
        super().__init__(shutdown_after_frames, shutdown_grace_s)
        # openInterest_rest.jsonl: real `GET /fapi/v1/openInterest` bodies, by their symbol.
        self.open_interest = {orjson.loads(body)["symbol"]: body for body in
                              recorded.frames(self.data_dir, "openInterest_rest.jsonl")}

    def rest(self, path: str, query: dict[str, list[str]]) -> tuple[int, bytes] | None:
        if path != self.open_interest_path:
            return super().rest(path, query)
        body = self.open_interest.get((query.get("symbol") or [""])[0])
        if body is None:
            return 400, b'{"code":-1121,"msg":"Invalid symbol."}'
        return 200, body
