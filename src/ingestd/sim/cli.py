"""`ingestd sim`: one simulated venue served until SIGINT/SIGTERM (for demo.toml and manual runs).

Owns: starting a SimServer on a chosen port and waiting for a signal.
Must not: run the daemon (that is `ingestd --config` or `ingestd demo`).
"""

from __future__ import annotations

import asyncio
import signal
import sys

from ingestd.sim.server import SimServer
from ingestd.sim.venues import VENUES


async def serve_forever(exchange: str, host: str, port: int, rate_msgs_s: float | None) -> int:
    if exchange not in VENUES:
        print(f"ingestd sim: no simulator for {exchange!r} (have: {', '.join(sorted(VENUES))})",
              file=sys.stderr)
        return 2
    server = SimServer(exchange, rate_msgs_s=rate_msgs_s, host=host, port=port, record=False)
    await server.start()
    print(f"simulating {exchange} on {server.url} (REST {server.rest_url}); Ctrl-C stops",
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()
    return 0
