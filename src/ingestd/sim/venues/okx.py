"""Simulated OKX v5 public WebSocket (`/ws/v5/public`).

Owns: answering `{"op":"subscribe"|"unsubscribe","args":[{"channel","instId"}]}` the way
OKX does (one `{"event":"subscribe","arg":{...},"connId":"..."}` ack per arg; a 60018
`error` for an instId or channel it does not know; a 60012 `error` for a request it cannot
read), answering the plain-text `ping` with the plain-text `pong`, and serving the
recorded frames of each subscribed (channel, instId) pair in recorded order, byte for
byte. An unsubscribe stops that pair at once; subscribing again serves its recording from
the start (for `books`: a fresh snapshot, as the real venue sends). In the server's live
mode (one shared timeline, `timeline()`), a subscription joins the timeline where it is.

Fault: `skip_book_update = N` withholds the N-th `update` frame of every `books` stream
the first time that stream is served (later subscriptions serve it whole), so a client
sees a real break in the venue's continuity and must resubscribe.

Must not: change or invent a market-data frame.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

import orjson

from ingestd.sim import recorded
from ingestd.sim.venues.base import Venue, without_nth

if TYPE_CHECKING:
    from ingestd.sim.server import SimConn

Key = tuple[str, str]  # (channel, instId)

PUBLIC_PATH = "/ws/v5/public"
# Public channels served on /ws/v5/public (others get a 60018 error, as on the real venue).
PUBLIC_CHANNELS = frozenset({"trades", "bbo-tbt", "books", "books5", "books50-l2-tbt",
                             "books-l2-tbt", "tickers", "opt-summary", "funding-rate",
                             "mark-price", "index-tickers", "open-interest", "price-limit",
                             "estimated-price", "liquidation-orders", "instruments",
                             "status"})

INST_TYPES = frozenset({"SPOT", "MARGIN", "SWAP", "FUTURES", "OPTION"})


def ack_arg(channel: str, inst: str, by_type: bool) -> dict[str, str]:
    return {"channel": channel, "instType" if by_type else "instId": inst}


class OkxVenue(Venue):
    exchange: ClassVar[str] = "okx"
    data_dir: ClassVar[str] = "okx"
    # Served in this order per (channel, instId); trade ids increase across the two files.
    stream_files: ClassVar[tuple[str, ...]] = (
        "trades.jsonl", "trades_2026.jsonl", "bbo_tbt.jsonl", "books.jsonl",
        "books5_2026.jsonl", "books_seqid_2023.jsonl", "tickers.jsonl", "tickers_2026.jsonl",
        "funding_rate.jsonl", "mark_price.jsonl", "liquidation_orders.jsonl")
    demo_feed: ClassVar[dict[str, object]] = {
        # The 2022-05-13 capture (trades, books); quotes from the bbo-tbt frames;
        # BTC-USDT-SWAP: the recorded funding-rate, mark-price and liquidation-orders frames.
        "symbols": ["BTC-USDT", "BTC-USD-220527", "UNI-USD-SWAP", "BTC-USDT-SWAP"],
        "channels": ["trades", "quotes", "book", "derivatives", "liquidations"],
    }

    def __init__(self, skip_book_update: int | None = None) -> None:
        self.by_key: dict[Key, list[bytes]] = {}
        self.key_of: dict[bytes, Key] = {}
        for name in self.stream_files:
            for frame in recorded.frames(self.data_dir, name):
                arg = orjson.loads(frame).get("arg")
                if not isinstance(arg, dict):
                    continue
                # liquidation-orders is one stream per instType (its arg has no instId).
                key = (str(arg.get("channel")), str(arg.get("instId") or arg.get("instType")))
                self.by_key.setdefault(key, []).append(frame)
                self.key_of[frame] = key
        self.instruments = frozenset(inst for ch, inst in self.by_key
                                     if ch != "liquidation-orders")
        self.skip_book_update = skip_book_update
        self._served_once: set[Key] = set()
        self.requests: list[str] = []   # every text frame clients sent (for tests)

    def streams_available(self) -> list[Key]:
        return sorted(self.by_key)

    @staticmethod
    def live_key(key: Key) -> str:
        return f"{key[0]}:{key[1]}"

    def timeline(self) -> list[tuple[str, bytes]]:
        """Live mode: every recorded frame, streams interleaved, with its `channel:instId`."""
        from ingestd.sim.merge import merge_streams

        keys = sorted(self.by_key)
        return [(self.live_key(self.key_of[f]), f)
                for f in merge_streams([self.by_key[k] for k in keys])]

    def _frames_for(self, key: Key) -> list[bytes]:
        frames = self.by_key.get(key, [])
        first = key not in self._served_once
        self._served_once.add(key)
        n = self.skip_book_update
        if not (first and n and key[0] == "books"):
            return frames
        return without_nth(frames, n, b'"action":"update"')

    async def session(self, conn: SimConn) -> None:
        from ingestd.sim.merge import merge_streams

        conn_id = f"{conn.conn_id:08x}"
        public = conn.path.split("?", 1)[0].rstrip("/") == PUBLIC_PATH
        active: dict[Key, object] = {}
        serving: list[asyncio.Task[None]] = []
        live_tasks: dict[Key, asyncio.Task[None]] = {}

        def error(code: str, text: str) -> bytes:
            return orjson.dumps({"event": "error", "msg": text, "code": code,
                                 "connId": conn_id})

        def live(frames: list[bytes], tokens: dict[Key, object]) -> Iterator[bytes]:
            for frame in frames:
                key = self.key_of[frame]
                if active.get(key) is tokens[key]:
                    yield frame

        async def serve(keys: list[Key], tokens: dict[Key, object]) -> None:
            frames = merge_streams([self._frames_for(k) for k in keys])
            await conn.send_stream(live(frames, tokens))

        async def serve_live(key: Key) -> None:
            # Live mode (shared timeline): one task per pair so an unsubscribe stops it.
            await conn.stream_live([self.live_key(key)])

        try:
            while True:
                msg = await conn.recv()
                text = msg if isinstance(msg, str) else msg.decode("utf-8", "replace")
                self.requests.append(text)
                if text == "ping":
                    await conn.send_control("pong")
                    continue
                try:
                    req = orjson.loads(text)
                except orjson.JSONDecodeError:
                    await conn.send_control(error("60012", f"Invalid request: {text[:200]}"))
                    continue
                op = req.get("op") if isinstance(req, dict) else None
                args = req.get("args") if isinstance(req, dict) else None
                if op not in ("subscribe", "unsubscribe") or not isinstance(args, list):
                    await conn.send_control(error("60012", f"Invalid request: {text[:200]}"))
                    continue
                started: list[Key] = []
                tokens: dict[Key, object] = {}
                for arg in args:
                    channel = arg.get("channel") if isinstance(arg, dict) else None
                    inst = arg.get("instId") if isinstance(arg, dict) else None
                    by_type = channel == "liquidation-orders"
                    if by_type and isinstance(arg, dict):
                        inst = arg.get("instType")
                    if not isinstance(channel, str) or not isinstance(inst, str):
                        await conn.send_control(
                            error("60012", f"Invalid request: {text[:200]}"))
                        continue
                    key = (channel, inst)
                    if op == "unsubscribe":
                        active.pop(key, None)
                        task = live_tasks.pop(key, None)
                        if task is not None:
                            task.cancel()
                    elif (not public or channel not in PUBLIC_CHANNELS
                          or inst not in (INST_TYPES if by_type else self.instruments)):
                        await conn.send_control(error(
                            "60018", f"Subscribe failed, wrong URL or channel:{channel},"
                            f"instId:{inst} doesn't exist. Please use the correct URL, "
                            "channel and parameters referring to API document."))
                        continue
                    else:
                        if key in active:
                            # Already subscribed: OKX acks again and keeps the stream.
                            await conn.send_control(orjson.dumps(
                                {"event": op, "arg": ack_arg(channel, inst, by_type),
                                 "connId": conn_id}))
                            continue
                        tokens[key] = active[key] = object()
                        started.append(key)
                    await conn.send_control(orjson.dumps(
                        {"event": op, "arg": ack_arg(channel, inst, by_type),
                         "connId": conn_id}))
                if started and conn.server.live:
                    for key in started:
                        live_tasks[key] = asyncio.create_task(serve_live(key))
                elif started:
                    serving.append(asyncio.create_task(serve(started, tokens)))
        finally:
            serving.extend(live_tasks.values())
            for t in serving:
                t.cancel()
            await asyncio.gather(*serving, return_exceptions=True)


__all__ = ["OkxVenue"]
