"""cryptofeed side of the latency benchmark: one cryptofeed FeedHandler, callback only.

Owns: running cryptofeed (the PyPI package, unmodified) in its own process against the
benchmark's load generator, with callbacks that only record what the benchmark needs
(trade id / book-diff update id, `time.time_ns()` at callback entry and the
`receipt_timestamp` cryptofeed passes to the callback, counts), and
writing those measurements to `--out` when it stops. Started by peer_cryptofeed.py with
the interpreter it chooses; it needs only the standard library and cryptofeed.

Pointing cryptofeed's Binance feed at the simulator is done here, at run time, by a
subclass (`feed_class`): its websocket and REST endpoints, its symbol table (static:
no exchangeInfo download), its `trades` stream name (`trade`, which the simulator and
ingestd use, instead of cryptofeed's `aggTrade`), and its `wss://`-only address check
(the simulator speaks plain `ws://`). See `feed_class` for each override and why.

Must not: modify or copy cryptofeed's code (only subclass/override at run time), store
anything per message beyond the measurement arrays, or reach any host but 127.0.0.1.

Protocol with the parent (stdout lines): `FIRST` when the first frame reaches the
feed's message handler, `IDLE <frames>` once no frame has arrived for `--idle-s`
seconds after the first one. It exits cleanly on SIGTERM/SIGINT (cryptofeed's own
signal handlers), or by itself `--exit-after-idle` seconds after `IDLE`; in both cases
the measurements are written before exit:

    <out>/trade_ids.i64, trade_ns.i64, depth_ids.i64, depth_ns.i64   (native int64)
    <out>/trade_rts.i64, depth_rts.i64   (receipt_timestamp, ns, native int64)
    <out>/meta.json   (frame/ticker/snapshot counts, first/last frame ns, stopped_by)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from array import array
from decimal import Decimal
from pathlib import Path
from typing import Any

from cryptofeed import FeedHandler
from cryptofeed.connection import RestEndpoint, Routes, WebsocketEndpoint
from cryptofeed.defines import L2_BOOK, TICKER, TRADES
from cryptofeed.exchanges import Binance
from cryptofeed.symbols import Symbols
from yapic import json as yjson

# What Binance's /api/v3/exchangeInfo says about BTCUSDT, reduced to the fields that
# Binance._parse_symbol_data reads. Parsed by cryptofeed's own parser (not hand-set).
STATIC_EXCHANGE_INFO: dict[str, Any] = {
    "symbols": [{
        "symbol": "BTCUSDT", "status": "TRADING", "baseAsset": "BTC", "quoteAsset": "USDT",
        "filters": [{"filterType": "PRICE_FILTER", "tickSize": "0.01000000"}],
    }],
}


ARRAYS = ("trade_ids", "trade_ns", "trade_rts", "depth_ids", "depth_ns", "depth_rts")


class Recorder:
    """The callbacks' only state: growable int64 arrays and counters.

    Per trade / book diff: its id, `time.time_ns()` at callback entry (`*_ns`) and
    cryptofeed's `receipt_timestamp` (`*_rts`: `time.time()` when its websocket
    connection yielded the frame, seconds; stored in ns).
    """

    def __init__(self) -> None:
        self.trade_ids = array("q")
        self.trade_ns = array("q")
        self.trade_rts = array("q")
        self.depth_ids = array("q")
        self.depth_ns = array("q")
        self.depth_rts = array("q")
        self.tickers = 0
        self.snapshots = 0
        self.frames = 0
        self.first_frame_ns = 0
        self.last_frame_ns = 0
        self.stopped_by = ""                        # "idle" or "signal"
        self.watchdog: asyncio.Task[None] | None = None

    async def on_trade(self, trade: Any, receipt_timestamp: float) -> None:
        now = time.time_ns()
        self.trade_ids.append(int(trade.id))
        self.trade_ns.append(now)
        self.trade_rts.append(round(receipt_timestamp * 1e9))

    async def on_book(self, book: Any, receipt_timestamp: float) -> None:
        now = time.time_ns()
        if book.delta is None:          # the REST snapshot (or a resync)
            self.snapshots += 1
            return
        self.depth_ids.append(book.sequence_number)   # = the diff's `u`
        self.depth_ns.append(now)
        self.depth_rts.append(round(receipt_timestamp * 1e9))

    async def on_ticker(self, ticker: Any, receipt_timestamp: float) -> None:
        self.tickers += 1

    def write(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        for name in ARRAYS:
            with open(out / f"{name}.i64", "wb") as f:
                getattr(self, name).tofile(f)
        (out / "meta.json").write_text(json.dumps({
            "frames": self.frames, "tickers": self.tickers, "snapshots": self.snapshots,
            "first_frame_ns": self.first_frame_ns, "last_frame_ns": self.last_frame_ns,
            "trades": len(self.trade_ids), "depth": len(self.depth_ids),
            "stopped_by": self.stopped_by}))


def feed_class(port: int, rec: Recorder) -> type[Binance]:
    """cryptofeed's Binance (spot) feed, pointed at the simulator on 127.0.0.1:<port>."""
    base_ws = f"wss://127.0.0.1:{port}"   # wss:// only to pass WSAsyncConn's check
    rest = f"http://127.0.0.1:{port}"

    class SimBinance(Binance):  # type: ignore[misc]
        # Endpoints: the simulator serves both the combined stream and the REST depth
        # snapshot on one port. exchangeInfo is never requested (see symbol_mapping).
        websocket_endpoints = [WebsocketEndpoint(base_ws)]
        rest_endpoints = [RestEndpoint(rest, routes=Routes(
            "/api/v3/exchangeInfo", l2book="/api/v3/depth?symbol={}&limit={}",
            authentication="/api/v3/userDataStream"))]
        api = f"{rest}/api/v3/"     # BinanceRestMixin's base (unused, but never Binance)
        # Raw `@trade` stream (as ingestd and the simulator use) instead of `@aggTrade`.
        websocket_channels = {**Binance.websocket_channels, TRADES: "trade"}

        @classmethod
        def symbol_mapping(cls, refresh: bool = False, headers: dict[str, str] | None = None
                           ) -> dict[str, str]:
            # Exchange.symbol_mapping downloads exchangeInfo; parse a static one instead.
            if not Symbols.populated(cls.id) or refresh:
                syms, info = cls._parse_symbol_data(STATIC_EXCHANGE_INFO)
                Symbols.set(cls.id, syms, info)
            return Symbols.get(cls.id)[0]  # type: ignore[no-any-return]

        def connect(self) -> list[Any]:
            # WSAsyncConn.__init__ rejects anything but wss://; the endpoint above passes
            # it, then each built connection's address is switched to the plain ws:// the
            # simulator speaks (WSAsyncConn._open connects to self.address).
            conns = super().connect()
            for conn, *_ in conns:
                if getattr(conn, "address", "").startswith("wss://127.0.0.1:"):
                    conn.address = "ws://" + conn.address.removeprefix("wss://")
            return conns

        async def message_handler(self, msg: str, conn: Any, timestamp: float) -> None:
            rec.frames += 1
            rec.last_frame_ns = time.time_ns()
            if rec.frames == 1:
                rec.first_frame_ns = rec.last_frame_ns
                print("FIRST", flush=True)
            # Binance.message_handler dispatches on data["e"] and knows `aggTrade`, not
            # `trade`; a raw trade has the same fields with its id in `t` (not `a`), so it
            # goes through cryptofeed's own Binance._trade with `a` set. Everything else
            # (bookTicker, depthUpdate) takes the unmodified path.
            if msg.find('@trade"', 0, 64) > 0:
                data = yjson.loads(msg, parse_float=Decimal)["data"]
                data["a"] = data["t"]
                await self._trade(data, timestamp)
            else:
                await super().message_handler(msg, conn, timestamp)

    return SimBinance


async def watchdog(rec: Recorder, idle_s: float, exit_after_idle_s: float) -> None:
    """Report IDLE once frames stop; stop the loop (-> FeedHandler shutdown) later."""
    last, since = -1, time.monotonic()
    while True:
        await asyncio.sleep(0.1)
        if rec.frames != last:
            last, since = rec.frames, time.monotonic()
        elif rec.frames and time.monotonic() - since >= idle_s:
            break
    print(f"IDLE {rec.frames}", flush=True)
    await asyncio.sleep(exit_after_idle_s)
    rec.stopped_by = "idle"
    asyncio.get_running_loop().stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mix", choices=["trades", "book"], default="trades")
    ap.add_argument("--out", required=True, help="directory for the measurements")
    ap.add_argument("--idle-s", type=float, default=3.0)
    ap.add_argument("--exit-after-idle", type=float, default=30.0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rec = Recorder()
    # cryptofeed's defaults (uvloop on), its log file out of the working tree.
    fh = FeedHandler(config={"uvloop": True, "log": {
        "filename": str(out / "feedhandler.log"), "level": "WARNING"}})
    callbacks: dict[str, Any] = {TRADES: rec.on_trade}
    channels = [TRADES]
    if args.mix == "book":
        callbacks |= {L2_BOOK: rec.on_book, TICKER: rec.on_ticker}
        channels += [TICKER, L2_BOOK]
    feed = feed_class(args.port, rec)(symbols=["BTC-USDT"], channels=channels,
                                      callbacks=callbacks, config=fh.config)
    fh.add_feed(feed)
    # FeedHandler.run() takes asyncio.get_event_loop(); uvloop >= 0.22's policy no longer
    # creates one on demand there, so install a (uvloop, via the policy) loop first.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    rec.watchdog = loop.create_task(watchdog(rec, args.idle_s, args.exit_after_idle))
    try:
        fh.run()                      # returns after SIGTERM/SIGINT or loop.stop()
    finally:
        rec.stopped_by = rec.stopped_by or "signal"
        rec.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
