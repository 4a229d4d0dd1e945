"""Simulated Bitstamp WebSocket API v2 (`wss://ws.bitstamp.net`) and REST order book.

Owns: the session the way Bitstamp runs it - one `{"event":"bts:subscribe","data":
{"channel":...}}` per channel, acknowledged by `bts:subscription_succeeded` (the recorded
ack frame where the recording has one for that channel, else the same shape; like the
real venue, a channel without data - an unknown pair - is acknowledged too and stays
silent), `bts:unsubscribe` (acknowledged, its stream stops at once), the client heartbeat
`{"event":"bts:heartbeat"}` answered with `{"event":"bts:heartbeat","channel":"",
"data":{"status":"success"}}`, and a `bts:error` for a request it cannot read. Each
subscribed channel serves its recorded frames (`live_trades_<pair>`,
`diff_order_book_<pair>`, `order_book_<pair>`) byte for byte in recorded order; in the
server's live mode (one shared timeline, `timeline()`) a subscription joins the timeline
where it is. REST: `GET /api/v2/order_book/<pair>/` (with or without the trailing slash)
answers the recorded snapshot body of that pair.

Fault: `reconnect_after_frames = N` makes the FIRST connection send Bitstamp's
maintenance warning `{"event":"bts:request_reconnect","channel":"","data":""}` after N
data frames, keep streaming for `reconnect_grace_s`, then close (1001) - the venue's
"reconnect within a few seconds". That frame is the documented example (no recording
exists); acks, heartbeat answers and errors are generated in the recorded shapes.

Must not: change or invent a market-data frame.
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING, ClassVar

import orjson

from ingestd.sim import recorded
from ingestd.sim.venues.base import Venue

if TYPE_CHECKING:
    from ingestd.sim.server import SimConn

HEARTBEAT_ANSWER = b'{"event":"bts:heartbeat","channel":"","data":{"status":"success"}}'
REQUEST_RECONNECT = b'{"event":"bts:request_reconnect","channel":"","data":""}'
BAD_REQUEST = (b'{"event":"bts:error","channel":"","data":{"code":null,'
               b'"message":"Incorrect JSON format."}}')
_ORDER_BOOK_PATH = re.compile(r"/api/v2/order_book/([a-z0-9-]+)/?")


class BitstampVenue(Venue):
    exchange: ClassVar[str] = "bitstamp"
    data_dir: ClassVar[str] = "bitstamp"
    stream_files: ClassVar[tuple[str, ...]] = (
        "diff_order_book.jsonl", "live_trades.jsonl", "order_book_top100.jsonl")
    # order_book_snapshot_rest.jsonl holds bodies only; their pairs, in order, per the
    # fixture README's provenance (the REST URLs they were fetched from).
    snapshot_pairs: ClassVar[tuple[str, ...]] = (
        "sgbeur", "ethusd", "xrpeur", "bateur", "usdteur", "usdtusd", "xlmgbp", "adaeur",
        "batbtc", "galaeur")
    demo_feed: ClassVar[dict[str, object]] = {
        # Books of the 2022-01-05 capture (9 pairs with diffs), trades of the 2022-01-05
        # (ethusd) and 2021-04-05 captures, quotes from the one order_book_btcusd frame.
        "symbols": ["ethusd", "xrpeur", "bateur", "usdteur", "usdtusd", "xlmgbp", "adaeur",
                    "batbtc", "galaeur", "linketh", "xrpbtc", "xlmeur", "ethgbp", "bcheur",
                    "btcusdc", "btcusd"],
        "channels": ["trades", "quotes", "book"],
    }

    def __init__(self, reconnect_after_frames: int | None = None,
                 reconnect_grace_s: float = 2.0) -> None:
        self.by_channel: dict[str, list[bytes]] = {}
        self.channel_of: dict[bytes, str] = {}
        for name in self.stream_files:
            for frame in recorded.frames(self.data_dir, name):
                channel = orjson.loads(frame).get("channel")
                if isinstance(channel, str):
                    self.by_channel.setdefault(channel, []).append(frame)
                    self.channel_of[frame] = channel
        self.acks: dict[str, bytes] = {}
        for frame in recorded.frames(self.data_dir, "subscribe.jsonl"):
            msg = orjson.loads(frame)
            if msg.get("event") == "bts:subscription_succeeded":
                self.acks[str(msg.get("channel"))] = frame
        bodies = recorded.frames(self.data_dir, "order_book_snapshot_rest.jsonl")
        self.snapshots = dict(zip(self.snapshot_pairs, bodies, strict=True))
        self.reconnect_after_frames = reconnect_after_frames
        self.reconnect_grace_s = reconnect_grace_s
        self.requests: list[str] = []   # every text frame clients sent (for tests)

    def channels_available(self) -> list[str]:
        return sorted(self.by_channel)

    def timeline(self) -> list[tuple[str, bytes]]:
        """Live mode: every recorded frame, channels interleaved, keyed by channel."""
        from ingestd.sim.merge import merge_streams

        channels = sorted(self.by_channel)
        return [(self.channel_of[f], f)
                for f in merge_streams([self.by_channel[c] for c in channels])]

    def rest(self, path: str, query: dict[str, list[str]]) -> tuple[int, bytes] | None:
        m = _ORDER_BOOK_PATH.fullmatch(path)
        if m is None:
            return None
        body = self.snapshots.get(m.group(1))
        if body is None:
            return None
        return 200, body

    def ack(self, event: str, channel: str) -> bytes:
        recorded_ack = self.acks.get(channel)
        if event == "bts:subscription_succeeded" and recorded_ack is not None:
            return recorded_ack
        return orjson.dumps({"event": event, "channel": channel, "data": {}})

    async def session(self, conn: SimConn) -> None:
        active: dict[str, asyncio.Task[None]] = {}
        background: list[asyncio.Task[None]] = []

        async def serve(channel: str) -> None:
            if conn.server.live:
                await conn.stream_live([channel])
            else:
                await conn.send_stream(self.by_channel.get(channel, []))

        async def request_reconnect(n: int) -> None:
            await conn.wait_sent(n)
            await conn.send_control(REQUEST_RECONNECT)
            await asyncio.sleep(self.reconnect_grace_s)
            await conn.ws.close(1001, "maintenance")

        n = self.reconnect_after_frames
        if n is not None and conn.conn_id == 1:
            background.append(asyncio.create_task(request_reconnect(n)))
        try:
            while True:
                msg = await conn.recv()
                text = msg if isinstance(msg, str) else msg.decode("utf-8", "replace")
                self.requests.append(text)
                try:
                    req = orjson.loads(text)
                except orjson.JSONDecodeError:
                    req = None
                event = req.get("event") if isinstance(req, dict) else None
                if event == "bts:heartbeat":
                    await conn.send_control(HEARTBEAT_ANSWER)
                    continue
                data = req.get("data") if isinstance(req, dict) else None
                channel = data.get("channel") if isinstance(data, dict) else None
                if event not in ("bts:subscribe", "bts:unsubscribe") \
                        or not isinstance(channel, str) or not channel:
                    await conn.send_control(BAD_REQUEST)
                    continue
                if event == "bts:unsubscribe":
                    task = active.pop(channel, None)
                    if task is not None:
                        task.cancel()
                        await asyncio.gather(task, return_exceptions=True)
                    await conn.send_control(self.ack("bts:unsubscription_succeeded", channel))
                    continue
                await conn.send_control(self.ack("bts:subscription_succeeded", channel))
                if channel not in active:
                    active[channel] = asyncio.create_task(serve(channel))
        finally:
            tasks = [*background, *active.values()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


__all__ = ["BitstampVenue"]
