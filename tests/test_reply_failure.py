"""A reply the venue asks for (here a checksum resubscribe) that cannot be sent because
the venue is closing never costs the rows of that frame or of the rest of the read."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import orjson
import polars as pl
from websockets.asyncio.server import ServerConnection, serve

from ingestd.sim.recorded import frames
from tests.support import make_config, read_table, run_daemon


def ws_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One unmasked server frame (FIN set)."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return bytes((0x80 | opcode, 126)) + struct.pack("!H", n) + payload
    return bytes((0x80 | opcode, 127)) + struct.pack("!Q", n) + payload


def bad_checksum(frame: bytes) -> bytes:
    """A recorded Kraken book update whose checksum no longer matches (a real frame with
    one field changed, as the property tests do)."""
    head, _, tail = frame.partition(b'"checksum":')
    digits = tail[:tail.index(b",")]
    return head + b'"checksum":' + str((int(digits) + 1) % 2**32).encode() \
        + tail[len(digits):]


async def test_rows_survive_a_reply_that_cannot_be_sent(root: Path, capfd: Any) -> None:
    book = frames("kraken", "book.jsonl")
    trade_a, trade_b = frames("kraken", "trade.jsonl")
    burst = [book[0], trade_a, bad_checksum(book[1]), trade_b]
    sessions = 0

    async def venue(ws: ServerConnection) -> None:
        nonlocal sessions
        sessions += 1
        # Two subscribe requests (trade, book), then - on the first connection only -
        # the whole burst and a close frame in ONE write: the daemon reads them together,
        # so when it wants to send the resubscribe the connection is already closing.
        await ws.recv()
        await ws.recv()
        if sessions == 1:
            ws.transport.write(b"".join(ws_frame(f) for f in burst)
                               + ws_frame(struct.pack("!H", 1001) + b"going away", 0x8))
            ws.transport.close()
            return
        await ws.wait_closed()

    async with serve(venue, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1] if server.sockets else 0
        feed = {"name": "kr", "exchange": "kraken", "url": f"ws://127.0.0.1:{port}",
                "symbols": ["BTC/USD"], "channels": ["trades", "book"],
                "reconnect_min_delay_s": 0.05}
        cfg = make_config(root, [feed])

        def landed(d: object) -> bool:
            return d.writer_stats.rows_written["trades"] >= 2  # type: ignore[attr-defined]

        daemon = await run_daemon(cfg, landed, timeout_s=20)
    st = daemon.feed_stats["kr"]
    assert st.parse_errors == {}
    # The resubscribe really could not be sent...
    assert "reply_not_sent" in capfd.readouterr().out
    # ...and both trades of the read are stored, the one after the bad book frame too.
    trades = read_table(root, "trades")
    sent_ids = sorted(str(orjson.loads(f)["data"][0]["trade_id"]) for f in (trade_a, trade_b))
    assert sorted(trades["trade_id"].to_list()) == sent_ids
    events = read_table(root, "events")
    gap = events.filter(pl.col("event") == "gap")
    assert gap.height == 1 and "checksum" in gap["detail"][0]
    # The snapshot block of the first frame is stored too (the read was kept whole).
    snap = read_table(root, "book").filter(pl.col("is_snapshot"))
    assert snap.height > 0
