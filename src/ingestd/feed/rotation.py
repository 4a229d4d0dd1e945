"""Make-before-break rotation of one feed's connection.

Owns: opening and subscribing a second connection while the current one still streams,
keeping what the new one receives (each socket read with its own ts_recv) until it has
streamed for the overlap, then closing the old one - and never leaking the new
connection: a rotation that is cancelled (session end, shutdown) or fails closes what it
opened, and reports its end so the next planned rotation or `serverShutdown` is honoured.

Must not: decode frames or hand anything on (the reader replays the kept reads through
its one ingest path after the switch), or decide when to rotate.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import suppress

import structlog

from ingestd.clock import Clock
from ingestd.feed.transport import Connection

log = structlog.get_logger("ingestd.rotation")


class Rotation:
    """One rotation attempt; `task` resolves to the new connection, or None if it failed."""

    def __init__(self, reason: str, connect: Callable[[], Awaitable[Connection]],
                 subscribe: Callable[[Connection], Awaitable[None]], clock: Clock,
                 overlap_s: float) -> None:
        self.reason = reason
        self.clock = clock
        self.overlap_s = overlap_s
        self.kept: list[tuple[int, list[bytes]]] = []  # (ts_recv_ns, frames) per read
        self.error: str | None = None
        self._new: Connection | None = None
        self._connect = connect
        self._subscribe = subscribe
        self.task: asyncio.Task[Connection | None] = asyncio.create_task(
            self._run(), name="rotation")

    async def _run(self) -> Connection | None:
        try:
            new = self._new = await self._connect()
            await self._subscribe(new)
            first_data: float | None = None
            while first_data is None or \
                    self.clock.monotonic() - first_data < self.overlap_s:
                try:
                    ts, frames = await asyncio.wait_for(new.recv_batch(), self.overlap_s)
                except TimeoutError:
                    if first_data is None:
                        first_data = self.clock.monotonic()
                    continue
                self.kept.append((ts, frames))
                if first_data is None:
                    first_data = self.clock.monotonic()
            return new
        except asyncio.CancelledError:
            await self._close_new()
            raise
        except Exception as e:  # any failure: the rotation is over, the connection closed
            self.error = f"{type(e).__name__}: {e}"[:200]
            await self._close_new()
            return None

    async def _close_new(self) -> None:
        new, self._new = self._new, None
        if new is not None:
            with suppress(Exception):
                await asyncio.shield(new.close(1000, "rotation abandoned"))

    async def cancel(self) -> None:
        """Abandon the rotation; the new connection (if any) is closed."""
        if not self.task.done():
            self.task.cancel()
        results = await asyncio.gather(self.task, return_exceptions=True)
        new = results[0]
        if isinstance(new, BaseException) or new is None:
            return
        with suppress(Exception):
            await new.close(1000, "rotation abandoned")

    def ready(self) -> Connection | None:
        """The new connection, if the rotation finished successfully."""
        if not self.task.done() or self.task.cancelled():
            return None
        return self.task.result()
