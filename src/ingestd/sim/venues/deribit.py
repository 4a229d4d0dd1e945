"""Simulated Deribit API v2 WebSocket (`/ws/api/v2`, JSON-RPC 2.0).

Owns: answering requests the way Deribit does - `public/subscribe` with the list of the
channels it subscribed (a channel of an instrument it does not know is left out of the
list, as the real venue does: `"result": []` for a bad one), `public/unsubscribe` with the
channels it stopped, `public/set_heartbeat` with `"ok"` (an interval below 10 s is an
"Invalid params" error), `public/test` with `{"version": ...}`, and a JSON-RPC error for
any other method or an unreadable request; the heartbeat protocol once enabled: every
interval the recorded `heartbeat` and `test_request` notifications (heartbeat.jsonl), and
the connection closed at the next interval if that `test_request` was not answered with
`public/test` (Deribit closes such connections at once); and serving the recorded
notifications of each subscribed channel in recorded order, byte for byte. An unsubscribe
stops that channel at once; subscribing again serves its recording from the start (for a
book: a fresh snapshot, as the real venue sends). In the server's live mode (one shared
timeline, `timeline()`), a subscription joins the timeline where it is.

Options: `heartbeat_interval_s` replaces the interval clients ask for (tests use a short
one). Fault: `skip_book_change = N` withholds the N-th `change` of every book channel the
first time it is served (later subscriptions serve it whole), so a client sees a real
break in the `prev_change_id` chain and must resubscribe.

Must not: change or invent a market-data frame (answers and errors are built in the
recorded / documented shapes; heartbeats are the recorded lines).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, ClassVar

import orjson

from ingestd.sim import recorded
from ingestd.sim.venues.base import Venue, without_nth

if TYPE_CHECKING:
    from ingestd.sim.server import SimConn

WS_PATH = "/ws/api/v2"
INTERVALS = frozenset({"raw", "100ms", "agg2"})
FAMILIES = frozenset({"trades", "book", "ticker"})
MIN_HEARTBEAT_S = 10
VERSION = "1.2.26"  # as in the documented public/test answer


class DeribitVenue(Venue):
    exchange: ClassVar[str] = "deribit"
    data_dir: ClassVar[str] = "deribit"
    # Notifications served per channel, in recorded order.
    stream_files: ClassVar[tuple[str, ...]] = (
        "book_raw.jsonl", "book_raw_2021_07.jsonl", "ticker.jsonl", "trades.jsonl",
        "quote.jsonl", "perpetual_100ms.jsonl")
    demo_feed: ClassVar[dict[str, object]] = {
        # The 2021-04-05 capture (10 options: books and tickers, .raw as recorded then;
        # live Deribit serves .raw only to authorized connections) and the 2021-03-21
        # trades of BTC-PERPETUAL and BTC-26MAR21 (no recorded trade carries a
        # liquidation, so the liquidations table stays empty).
        "symbols": ["ETH-9APR21-1950-C", "ETH-6APR21-2400-P", "ETH-30APR21-2240-P",
                    "ETH-16APR21-1600-C", "ETH-23APR21-2000-C", "ETH-16APR21-1400-P",
                    "ETH-24SEP21-320-P", "BTC-30APR21-20000-C", "BTC-25MAR22-400000-C",
                    "BTC-31DEC21-300000-P", "BTC-PERPETUAL", "BTC-26MAR21"],
        "channels": ["trades", "quotes", "book", "derivatives", "liquidations"],
        "trade_stream": "raw",
    }

    def __init__(self, skip_book_change: int | None = None,
                 heartbeat_interval_s: float | None = None) -> None:
        self.by_channel: dict[str, list[bytes]] = {}
        self.channel_of: dict[bytes, str] = {}
        instruments: set[str] = set()
        for name in self.stream_files:
            for frame in recorded.frames(self.data_dir, name):
                params = orjson.loads(frame).get("params")
                if not isinstance(params, dict) or not isinstance(params.get("channel"), str):
                    continue
                channel = params["channel"]
                self.by_channel.setdefault(channel, []).append(frame)
                self.channel_of[frame] = channel
                data = params.get("data")
                for item in data if isinstance(data, list) else [data]:
                    if isinstance(item, dict) and isinstance(item.get("instrument_name"), str):
                        instruments.add(item["instrument_name"])
        self.instruments = frozenset(instruments)
        beats = recorded.frames(self.data_dir, "heartbeat.jsonl")
        self.heartbeat_frame = next(f for f in beats if b'"type":"heartbeat"' in f)
        self.test_request_frame = next(f for f in beats if b'"type":"test_request"' in f)
        self.skip_book_change = skip_book_change
        self.heartbeat_interval_s = heartbeat_interval_s
        self._served_once: set[str] = set()
        self.requests: list[dict[str, Any]] = []   # every request clients sent (for tests)

    def channels_available(self) -> list[str]:
        return sorted(self.by_channel)

    def known(self, channel: str) -> bool:
        """A channel Deribit would subscribe: recorded, or a data channel of a known
        instrument with a valid interval."""
        if channel in self.by_channel:
            return True
        parts = channel.split(".")
        if len(parts) == 2 and parts[0] == "quote":
            return parts[1] in self.instruments
        return (len(parts) == 3 and parts[0] in FAMILIES and parts[1] in self.instruments
                and parts[2] in INTERVALS)

    def timeline(self) -> list[tuple[str, bytes]]:
        """Live mode: every recorded notification, channels interleaved, with its channel."""
        from ingestd.sim.merge import merge_streams

        channels = sorted(self.by_channel)
        return [(self.channel_of[f], f)
                for f in merge_streams([self.by_channel[c] for c in channels])]

    def _frames_for(self, channel: str) -> list[bytes]:
        frames = self.by_channel.get(channel, [])
        first = channel not in self._served_once
        self._served_once.add(channel)
        n = self.skip_book_change
        if not (first and n and channel.startswith("book.")):
            return frames
        return without_nth(frames, n, b'"type":"change"')

    async def session(self, conn: SimConn) -> None:
        from ingestd.sim.merge import merge_streams

        active: dict[str, object] = {}
        serving: list[asyncio.Task[None]] = []
        live_tasks: dict[str, asyncio.Task[None]] = {}
        heartbeat: asyncio.Task[None] | None = None
        awaiting_test = False

        def answer(rid: object, **body: Any) -> bytes:
            us_in = time.time_ns() // 1000
            return orjson.dumps({"jsonrpc": "2.0", "id": rid, **body, "usIn": us_in,
                                 "usOut": us_in + 1, "usDiff": 1, "testnet": False})

        def error(rid: object, code: int, message: str, data: Any = None) -> bytes:
            return answer(rid, error={"code": code, "message": message, "data": data})

        async def serve(channels: list[str], tokens: dict[str, object]) -> None:
            # Paced like `conn.send_stream`, but the subscription is checked right before
            # each frame goes out (after the pacing sleep): nothing of a channel follows
            # its unsubscribe, so nothing of an old subscription follows the new snapshot.
            frames = merge_streams([self._frames_for(c) for c in channels])
            rate = conn.server.rate_msgs_s
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            for i, frame in enumerate(frames):
                if rate:
                    delay = t0 + i / rate - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                channel = self.channel_of[frame]
                if active.get(channel) is tokens[channel]:
                    await conn.send(frame)

        async def beat(interval_s: float) -> None:
            nonlocal awaiting_test
            while True:
                await asyncio.sleep(interval_s)
                if awaiting_test:  # the last test_request was not answered
                    await conn.ws.close(1000, "test_request not answered")
                    return
                await conn.send_control(self.heartbeat_frame)
                await conn.send_control(self.test_request_frame)
                awaiting_test = True

        try:
            if conn.path.split("?", 1)[0].rstrip("/") != WS_PATH:
                await conn.ws.close(1008, "unknown path")
                return
            while True:
                msg = await conn.recv()
                try:
                    req = orjson.loads(msg)
                except orjson.JSONDecodeError:
                    await conn.send_control(error(None, -32700, "Parse error"))
                    continue
                if not isinstance(req, dict):
                    await conn.send_control(error(None, -32600, "Invalid Request"))
                    continue
                self.requests.append(req)
                rid, method = req.get("id"), req.get("method")
                raw_params = req.get("params")
                params: dict[str, Any] = raw_params if isinstance(raw_params, dict) else {}
                if method == "public/test":
                    awaiting_test = False
                    await conn.send_control(answer(rid, result={"version": VERSION}))
                elif method == "public/set_heartbeat":
                    interval = params.get("interval")
                    if not isinstance(interval, int | float) or interval < MIN_HEARTBEAT_S:
                        await conn.send_control(error(rid, -32602, "Invalid params", {
                            "reason": "must be a number not less than 10",
                            "param": "interval"}))
                        continue
                    if heartbeat is not None:
                        heartbeat.cancel()
                    heartbeat = asyncio.create_task(
                        beat(self.heartbeat_interval_s or float(interval)))
                    await conn.send_control(answer(rid, result="ok"))
                elif method in ("public/subscribe", "public/unsubscribe"):
                    channels = params.get("channels")
                    if not isinstance(channels, list) or not all(
                            isinstance(c, str) for c in channels):
                        await conn.send_control(error(rid, -32602, "Invalid params", {
                            "reason": "value must be a list", "param": "channels"}))
                        continue
                    if method == "public/unsubscribe":
                        stopped = [c for c in channels if c in active]
                        for c in stopped:
                            del active[c]
                            task = live_tasks.pop(c, None)
                            if task is not None:
                                task.cancel()
                        await conn.send_control(answer(rid, result=stopped))
                        continue
                    taken = [c for c in dict.fromkeys(channels) if self.known(c)]
                    started = [c for c in taken if c not in active]
                    tokens: dict[str, object] = {}
                    for c in started:
                        tokens[c] = active[c] = object()
                    await conn.send_control(answer(rid, result=taken))
                    if started and conn.server.live:
                        for c in started:
                            live_tasks[c] = asyncio.create_task(conn.stream_live([c]))
                    elif started:
                        serving.append(asyncio.create_task(serve(started, tokens)))
                else:
                    await conn.send_control(error(rid, -32601, "Method not found"))
        finally:
            serving.extend(live_tasks.values())
            if heartbeat is not None:
                serving.append(heartbeat)
            for t in serving:
                t.cancel()
            await asyncio.gather(*serving, return_exceptions=True)


__all__ = ["DeribitVenue"]
