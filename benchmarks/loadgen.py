"""Load generator for the latency benchmark: a Binance-format venue at an offered rate.

Runs in its own process (so its CPU is not the daemon's). Serves the combined-stream
endpoint `/stream?streams=...` and the REST snapshot `/api/v3/depth`, and once a client
subscribes, streams synthetic but well-formed Binance frames for `--duration` seconds:

- `trades`: `btcusdt@trade` frames, trade ids consecutive;
- `book`:   a book-heavy mix - per 10 frames: 2 `@trade`, 3 `@bookTicker`, 5
            `@depth@100ms` diffs with 10 levels each and exact `U`/`u` continuity (the REST
            snapshot answers with the last `u` sent, so the daemon's sync procedure runs).

Every frame's send time (wall clock, ns) is recorded by its exchange id (trade `t`,
depth `u`), written as JSON to `--times-out` when the stream ends. The send time is
taken once the batch holding the frame is built, right before it is written to the
socket (building a batch of book frames takes ~10 us per frame: stamping before it
would add up to a batch's build time to every latency measured from it). Frames'
own event times (`E`, `T`) are the batch's start, in ms, as a venue would stamp them.

If the client closes the connection before the stream's end (the daemon disconnects or
stops), the stream ends there, quietly; a reconnecting client gets a new stream (ids
continue), and `DONE` comes from the stream that runs to its end.

Frames are written to the socket in batches as ready-made WebSocket frames (server
frames are unmasked; no extension is negotiated): the handshake is the websockets
library's, the bulk writes bypass its per-message overhead so that one Python process
can offer 100k+ msg/s. Only the benchmark harness does this; the daemon under test uses
its normal client.

Usage: python benchmarks/loadgen.py --rate 50000 --duration 10 --mix trades --times-out F
(prints `PORT <n>` when listening, `DONE <frames>` when the stream has ended)
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import sys
import time
from array import array
from typing import Any

import orjson
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.protocol import State

BATCH_TICK_S = 0.001
MAX_WRITE_BUFFER = 8 * 1024 * 1024


def ws_frame(payload: bytes) -> bytes:
    """One unmasked text frame (FIN, opcode 1)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return b"\x81\x7e" + struct.pack("!H", n) + payload
    return b"\x81\x7f" + struct.pack("!Q", n) + payload


class Generator:
    def __init__(self, mix: str) -> None:
        self.mix = mix
        self.trade_id = 1_000_000_000
        self.ticker_id = 5_000_000_000
        self.depth_id = 9_000_000_000
        self.i = 0
        # send time by id offset, per kind
        self.trade_ns = array("q")
        self.depth_ns = array("q")
        self.frames = 0
        # frames of each kind in the last batch built, stamped by `sent()`
        self._unstamped_trades = 0
        self._unstamped_depth = 0

    def _trade(self, now_ms: int) -> bytes:
        self.trade_id += 1
        t = self.trade_id
        px = 60_000 + (t % 2000) / 100
        return (b'{"stream":"btcusdt@trade","data":{"e":"trade","E":%d,"s":"BTCUSDT","t":%d,'
                b'"p":"%.8f","q":"0.00%d000","T":%d,"m":%s,"M":true}}'
                % (now_ms, t, px, 100 + t % 900, now_ms, b"true" if t & 1 else b"false"))

    def _ticker(self) -> bytes:
        self.ticker_id += 1
        u = self.ticker_id
        bid = 60_000 + (u % 1000) / 100
        return (b'{"stream":"btcusdt@bookTicker","data":{"u":%d,"s":"BTCUSDT","b":"%.8f",'
                b'"B":"1.25000000","a":"%.8f","A":"0.75000000"}}' % (u, bid, bid + 0.01))

    def _depth(self, now_ms: int) -> bytes:
        self.depth_id += 1
        u = self.depth_id
        base = 60_000 + (u % 500) / 100
        bids = b",".join(b'["%.2f","%.5f"]' % (base - k * 0.01, (u + k) % 7 / 3)
                         for k in range(1, 6))
        asks = b",".join(b'["%.2f","%.5f"]' % (base + k * 0.01, (u + k) % 5 / 2)
                         for k in range(1, 6))
        return (b'{"stream":"btcusdt@depth@100ms","data":{"e":"depthUpdate","E":%d,'
                b'"s":"BTCUSDT","U":%d,"u":%d,"b":[%s],"a":[%s]}}'
                % (now_ms, u, u, bids, asks))

    def batch(self, n: int, now_ns: int) -> bytes:
        """The next n frames, event time `now_ns`; call `sent()` when writing them."""
        now_ms = now_ns // 1_000_000
        out = []
        trades = depth = 0
        for _ in range(n):
            if self.mix == "trades":
                out.append(ws_frame(self._trade(now_ms)))
                trades += 1
            else:
                k = self.i % 10
                if k in (0, 5):
                    out.append(ws_frame(self._trade(now_ms)))
                    trades += 1
                elif k in (1, 4, 7):
                    out.append(ws_frame(self._ticker()))
                else:
                    out.append(ws_frame(self._depth(now_ms)))
                    depth += 1
            self.i += 1
        self.frames += n
        self._unstamped_trades, self._unstamped_depth = trades, depth
        return b"".join(out)

    def sent(self, sent_ns: int) -> None:
        """Record `sent_ns` as the send time of every frame of the last batch."""
        self.trade_ns.extend(array("q", [sent_ns]) * self._unstamped_trades)
        self.depth_ns.extend(array("q", [sent_ns]) * self._unstamped_depth)
        self._unstamped_trades = self._unstamped_depth = 0

    def snapshot(self) -> bytes:
        u = self.depth_id
        base = 60_000 + (u % 500) / 100
        bids = [[f"{base - k * 0.01:.2f}", "1.00000"] for k in range(1, 101)]
        asks = [[f"{base + k * 0.01:.2f}", "1.00000"] for k in range(1, 101)]
        return orjson.dumps({"lastUpdateId": u, "bids": bids, "asks": asks})


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=10_000, help="msg/s; 0 = unthrottled")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--mix", choices=["trades", "book"], default="trades")
    ap.add_argument("--times-out", required=True)
    args = ap.parse_args()
    gen = Generator(args.mix)
    done = asyncio.Event()

    def process_request(conn: ServerConnection, request: Request) -> Response | None:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return None
        body = gen.snapshot()
        h = Headers()
        h["Content-Type"] = "application/json"
        h["Content-Length"] = str(len(body))
        return Response(200, "OK", h, body)

    async def handler(ws: ServerConnection) -> None:
        transport: Any = ws.transport
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        end = t0 + args.duration
        sent = 0
        while loop.time() < end:
            # The client closed (or is closing) the connection: websockets has answered its
            # close frame and half-closed the socket (write_eof), so writing would raise.
            if ws.state is not State.OPEN or transport.is_closing():
                return
            if transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
                await asyncio.sleep(BATCH_TICK_S)  # the client is not keeping up
                continue
            if args.rate:
                due = int((loop.time() - t0) * args.rate) - sent
                n = min(due, max(1, int(args.rate * 0.01)))
            else:
                n = 2000
            if n > 0:
                data = gen.batch(n, time.time_ns())
                gen.sent(time.time_ns())
                transport.write(data)
                sent += n
            await asyncio.sleep(BATCH_TICK_S if args.rate else 0)
        with open(args.times_out, "wb") as f:
            f.write(orjson.dumps({"trade_first_id": 1_000_000_001,
                                  "trade_ns": list(gen.trade_ns),
                                  "depth_first_id": 9_000_000_001,
                                  "depth_ns": list(gen.depth_ns),
                                  "frames": gen.frames,
                                  "seconds": loop.time() - t0}))
        print(f"DONE {gen.frames}", flush=True)
        done.set()
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, process_request=process_request,
                     compression=None, ping_interval=None, max_size=2**20) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        print(f"PORT {port}", flush=True)
        await done.wait()
        await asyncio.sleep(3600)  # until the orchestrator stops us
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except KeyboardInterrupt:
        sys.exit(0)
