"""Simulated KuCoin spot: the bullet-public token, the WebSocket session, REST snapshots.

Owns:
- `POST /api/v1/bullet-public` (the simulator's HTTP server does not tell methods apart:
  any method is answered): a fresh token and one instance server, in KuCoin's documented
  shape (`{"code":"200000","data":{"token","instanceServers":[{"endpoint","encrypt",
  "protocol":"websocket","pingInterval":18000,"pingTimeout":10000}]}}`). Its endpoint is
  `ws://127.0.0.1/endpoint` (or the `endpoint` option): the venue cannot know the port
  the server was given, so a client points its `url` (scheme, host, port) at the server
  and keeps the answer's path, as a feed with `url` does;
- the WebSocket at that path: a connection without a token this venue issued gets
  `{"id":<connectId>,"type":"error","code":401,"data":"token is invalid"}` and a close;
  otherwise `{"id":<connectId>,"type":"welcome"}`, then `{"id","type":"ping"}` is answered
  with `pong` (same id), `subscribe` / `unsubscribe` of `/market/match:`, `/market/ticker:`
  and `/market/level2:` topics (comma-joined symbols) are acknowledged with `{"id",
  "type":"ack"}` (when `response` is true) and the recorded frames of each subscribed
  (topic, symbol) are served in recorded order, byte for byte (live mode: joining the
  shared timeline). Another topic gets an `error` (code 404);
- `GET /api/v1/market/orderbook/level2_100` and `level2_20` (and the recorded path
  `/api/v3/market/orderbook/level2`) answered with the recorded snapshot body of the
  symbol (the recording is the full book; the real level2_100 holds 100 levels a side).

Fault: `skip_level2_update = N` withholds the N-th level2 frame of every symbol the first
time it is served, so a client sees a real break in `sequenceStart` continuity. The first
snapshot of a symbol is the recorded one (older than the withheld frame: the client syncs,
then sees the break); a later one is the venue's book at the last level2 frame served,
SYNTHESIZED from the recording by KuCoin's documented procedure (recorded snapshot +
every recorded change up to that sequence, withheld ones included, price 0 ignored, size 0
removing the level; level text as recorded; `time` that of the recorded snapshot): a real
venue answers with its current book, and the recorded one would be older than the diffs
the client holds. See data/kucoin/README.md.

Must not: change a recorded frame.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from decimal import Decimal
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import orjson

from ingestd.sim import recorded
from ingestd.sim.venues.base import Venue

if TYPE_CHECKING:
    from ingestd.sim.server import SimConn

Key = tuple[str, str]  # (topic prefix, symbol)

BULLET_PATH = "/api/v1/bullet-public"
SNAPSHOT_PATHS = frozenset({"/api/v1/market/orderbook/level2_100",
                            "/api/v1/market/orderbook/level2_20",
                            "/api/v3/market/orderbook/level2"})
ENDPOINT_PATH = "/endpoint"
LEVEL2 = "/market/level2"


class KucoinVenue(Venue):
    exchange: ClassVar[str] = "kucoin"
    data_dir: ClassVar[str] = "kucoin"
    stream_files: ClassVar[tuple[str, ...]] = ("match.jsonl", "ticker.jsonl", "level2.jsonl")
    topics: ClassVar[frozenset[str]] = frozenset({"/market/match", "/market/ticker", LEVEL2})
    # level2_snapshot_rest.jsonl holds bodies only; their symbols in order, found from the
    # recording (data/kucoin/README.md): the diff bridging each `sequence`, or for NRG-BTC,
    # COV-BTC the last recorded diff, for EQZ-BTC its ticker, carrying that very sequence.
    snapshot_symbols: ClassVar[tuple[str, ...]] = (
        "BCHSV-USDT", "SNX-BTC", "CAPP-BTC", "ANKR-BTC", "FET-BTC", "DAPPT-BTC", "NRG-BTC",
        "COV-BTC", "EQZ-BTC")
    demo_feed: ClassVar[dict[str, object]] = {
        # The 2021-04-25 capture: trades, tickers and level2 of these pairs.
        "symbols": ["BCHSV-USDT", "SNX-BTC", "DAPPT-BTC", "ANKR-BTC", "FET-BTC",
                    "CAPP-BTC", "NRG-BTC", "COV-BTC", "EQZ-BTC"],
        "channels": ["trades", "quotes", "book"],
    }
    ping_interval_ms: ClassVar[int] = 18_000   # KuCoin's documented values
    ping_timeout_ms: ClassVar[int] = 10_000

    def __init__(self, skip_level2_update: int | None = None,
                 endpoint: str = f"ws://127.0.0.1{ENDPOINT_PATH}") -> None:
        self.by_key: dict[Key, list[bytes]] = {}
        self.key_of: dict[bytes, Key] = {}
        self.level2_end: dict[bytes, int] = {}   # a level2 frame's sequenceEnd
        for name in self.stream_files:
            for frame in recorded.frames(self.data_dir, name):
                msg = orjson.loads(frame)
                prefix, _, sym = str(msg.get("topic")).partition(":")
                key = (prefix, sym)
                self.by_key.setdefault(key, []).append(frame)
                self.key_of[frame] = key
                if prefix == LEVEL2:
                    self.level2_end[frame] = int(msg["data"]["sequenceEnd"])
        bodies = recorded.frames(self.data_dir, "level2_snapshot_rest.jsonl")
        self.snapshots = dict(zip(self.snapshot_symbols, bodies, strict=True))
        self.symbols = frozenset(sym for _, sym in self.by_key) | set(self.snapshots)
        self.skip_level2_update = skip_level2_update
        self.endpoint = endpoint
        self.tokens: set[str] = set()
        self._token_ids = itertools.count(1)
        self._served_once: set[Key] = set()
        self.withheld: dict[str, list[bytes]] = {}   # symbol -> level2 frames withheld
        self.served_end: dict[str, int] = {}        # symbol -> last level2 sequenceEnd served
        self.snapshot_requests: dict[str, int] = {}  # symbol -> REST snapshots asked for
        self.requests: list[str] = []               # every text frame clients sent

    def streams_available(self) -> list[Key]:
        return sorted(self.by_key)

    @staticmethod
    def topic(key: Key) -> str:
        return f"{key[0]}:{key[1]}"

    def timeline(self) -> list[tuple[str, bytes]]:
        """Live mode: every recorded frame, streams interleaved, with its topic."""
        from ingestd.sim.merge import merge_streams

        keys = sorted(self.by_key)
        return [(self.topic(self.key_of[f]), f)
                for f in merge_streams([self.by_key[k] for k in keys])]

    # ---- REST ------------------------------------------------------------------------------
    def rest(self, path: str, query: dict[str, list[str]]) -> tuple[int, bytes] | None:
        if path == BULLET_PATH:
            token = f"sim-token-{next(self._token_ids)}"
            self.tokens.add(token)
            return 200, orjson.dumps({"code": "200000", "data": {
                "token": token, "instanceServers": [{
                    "endpoint": self.endpoint, "encrypt": self.endpoint.startswith("wss:"),
                    "protocol": "websocket", "pingInterval": self.ping_interval_ms,
                    "pingTimeout": self.ping_timeout_ms}]}})
        if path in SNAPSHOT_PATHS:
            symbol = (query.get("symbol") or [""])[0]
            body = self.snapshots.get(symbol)
            if body is None:
                return None
            self.snapshot_requests[symbol] = asked = self.snapshot_requests.get(symbol, 0) + 1
            if symbol in self.withheld and asked > 1:
                return 200, self.synthesized_snapshot(symbol)
            return 200, body
        return None

    def synthesized_snapshot(self, symbol: str) -> bytes:
        """The venue's book of `symbol` at the last level2 frame served (see the module
        docstring): the recorded snapshot and every recorded change after it up to there."""
        snap = orjson.loads(self.snapshots[symbol])["data"]
        seq = int(snap["sequence"])
        upto = max(seq, self.served_end.get(symbol, seq))
        sides: dict[str, dict[Decimal, tuple[str, str]]] = {
            side: {Decimal(p): (p, s) for p, s in snap[side]} for side in ("bids", "asks")}
        for frame in self.by_key.get((LEVEL2, symbol), []):
            end = self.level2_end[frame]
            if not seq < end <= upto:
                continue
            changes = orjson.loads(frame)["data"]["changes"]
            for side in ("bids", "asks"):
                for p, s, *_ in changes[side]:
                    if Decimal(p) == 0:
                        continue  # a sequence-only change
                    if Decimal(s) == 0:
                        sides[side].pop(Decimal(p), None)
                    else:
                        sides[side][Decimal(p)] = (p, s)
        data: dict[str, Any] = {
            "time": snap.get("time"), "sequence": str(upto),
            "bids": [list(sides["bids"][p]) for p in sorted(sides["bids"], reverse=True)],
            "asks": [list(sides["asks"][p]) for p in sorted(sides["asks"])]}
        return orjson.dumps({"code": "200000", "data": data})

    # ---- WebSocket -------------------------------------------------------------------------
    def _frames_for(self, key: Key) -> list[bytes]:
        frames = self.by_key.get(key, [])
        first = key not in self._served_once
        self._served_once.add(key)
        n = self.skip_level2_update
        if not (first and n and key[0] == LEVEL2 and len(frames) >= n):
            return frames
        self.withheld.setdefault(key[1], []).append(frames[n - 1])
        return [*frames[:n - 1], *frames[n:]]

    def _note_served(self, frame: bytes) -> None:
        end = self.level2_end.get(frame)
        if end is not None:
            sym = self.key_of[frame][1]
            self.served_end[sym] = max(end, self.served_end.get(sym, 0))

    async def session(self, conn: SimConn) -> None:
        from ingestd.sim.merge import merge_streams

        parts = urlsplit(conn.path)
        query = parse_qs(parts.query)
        connect_id = (query.get("connectId") or [""])[0]
        token = (query.get("token") or [""])[0]
        if parts.path.rstrip("/") != ENDPOINT_PATH or token not in self.tokens:
            await conn.send_control(orjson.dumps({"id": connect_id, "type": "error",
                                                  "code": 401, "data": "token is invalid"}))
            await conn.ws.close(1008, "token is invalid")
            return
        await conn.send_control(orjson.dumps({"id": connect_id, "type": "welcome"}))
        active: dict[Key, object] = {}
        serving: list[asyncio.Task[None]] = []
        live_tasks: dict[Key, asyncio.Task[None]] = {}

        def live(frames: list[bytes], tokens: dict[Key, object]) -> Iterator[bytes]:
            for frame in frames:
                key = self.key_of[frame]
                if active.get(key) is tokens[key]:
                    self._note_served(frame)
                    yield frame

        async def serve(keys: list[Key], tokens: dict[Key, object]) -> None:
            frames = merge_streams([self._frames_for(k) for k in keys])
            await conn.send_stream(live(frames, tokens))

        try:
            while True:
                msg = await conn.recv()
                text = msg if isinstance(msg, str) else msg.decode("utf-8", "replace")
                self.requests.append(text)
                try:
                    req = orjson.loads(text)
                except orjson.JSONDecodeError:
                    req = None
                if not isinstance(req, dict):
                    await conn.send_control(orjson.dumps({
                        "id": connect_id, "type": "error", "code": 400,
                        "data": "request is not a JSON object"}))
                    continue
                rid, kind, topic = req.get("id"), req.get("type"), req.get("topic")
                if kind == "ping":
                    await conn.send_control(orjson.dumps({"id": str(rid), "type": "pong"}))
                    continue
                prefix, _, syms = (topic if isinstance(topic, str) else "").partition(":")
                if kind not in ("subscribe", "unsubscribe") or prefix not in self.topics \
                        or not syms:
                    await conn.send_control(orjson.dumps({
                        "id": rid, "type": "error", "code": 404,
                        "data": f"topic {topic} is not found"}))
                    continue
                keys = [(prefix, s) for s in syms.split(",") if s]
                started: list[Key] = []
                tokens: dict[Key, object] = {}
                for key in keys:
                    if kind == "unsubscribe":
                        active.pop(key, None)
                        task = live_tasks.pop(key, None)
                        if task is not None:
                            task.cancel()
                    elif key not in active:
                        tokens[key] = active[key] = object()
                        started.append(key)
                if req.get("response"):
                    await conn.send_control(orjson.dumps({"id": str(rid), "type": "ack"}))
                if started and conn.server.live:
                    for key in started:
                        live_tasks[key] = asyncio.create_task(
                            conn.stream_live([self.topic(key)]))
                elif started:
                    serving.append(asyncio.create_task(serve(started, tokens)))
        finally:
            serving.extend(live_tasks.values())
            for t in serving:
                t.cancel()
            await asyncio.gather(*serving, return_exceptions=True)


__all__ = ["KucoinVenue"]
