"""The simulator's server: one venue's WebSocket and REST API on 127.0.0.1, with faults.

Owns: the listening socket (port 0 by default), routing plain HTTP GETs to the venue's
REST handler and upgrades to its WebSocket protocol, pacing of served frames
(`rate_msgs_s`), the record of every frame sent per connection (so tests can prove
nothing is missing or doubled), when each connection opened and ended, and injected
faults: `Faults` on the WebSocket side, raw frames sent on purpose (`inject`: malformed
or oversized frames), and broken REST answers (`rest_faults`, served by
sim/faults.py's listener on its own port). In live mode an `EndlessVenue`
(sim/generate.py) is published for as long as the server runs (until
`stop_publishing`), each subscription starting with the venue's `join` frames.

Must not: know any venue's message formats (sim/venues/ does), or be imported by the
daemon's hot path (the daemon only ever sees it as a remote server).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from ingestd.sim.endless import EndlessVenue
from ingestd.sim.faults import RestFaults, RestListener
from ingestd.sim.merge import merge_streams
from ingestd.sim.venues import VENUES, Venue


@dataclass
class Faults:
    """What the simulator does wrong, on purpose."""

    # Refuse WebSocket handshakes with this HTTP status (e.g. 503, 429), optionally only the
    # first `refuse_first_n` of them (0: all), sending `Retry-After` if set.
    handshake_status: int | None = None
    refuse_first_n: int = 0
    retry_after_s: float | None = None
    # Close each connection after this many data frames ("clean": close frame 1001;
    # "reset": TCP RST; "no_close_frame": FIN without a close frame).
    close_every_n_frames: int | None = None
    close_mode: str = "clean"
    # Close every connection right after the handshake (the accept-then-close loop).
    accept_then_close: bool = False
    # Accept, then go silent: no data, stop reading (so pings are never answered).
    black_hole: bool = False
    # Stop sending data after this many data frames per connection, still answering pings.
    silent_after_n_frames: int | None = None
    # Apply accept_then_close / black_hole / silent_after_n_frames / close_every_n_frames
    # only to the first N connections (0: to all), so a test can show recovery.
    only_first_n: int = 0

    def applies_to(self, conn_id: int) -> bool:
        return not self.only_first_n or conn_id <= self.only_first_n


@dataclass(slots=True)
class Sent:
    conn_id: int
    frame: bytes


class SimConn:
    """One client connection as a venue plug-in sees it."""

    def __init__(self, server: SimServer, ws: ServerConnection, conn_id: int) -> None:
        self.server = server
        self.ws = ws
        self.conn_id = conn_id
        self.data_frames_sent = 0
        self._sent_waiters: list[tuple[int, asyncio.Future[None]]] = []

    async def wait_sent(self, n: int) -> None:
        """Return once this connection has sent `n` data frames."""
        if self.data_frames_sent >= n:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sent_waiters.append((n, fut))
        await fut

    @property
    def path(self) -> str:
        req = self.ws.request
        return req.path if req is not None else "/"

    async def send_control(self, frame: bytes | str) -> None:
        """An ack/pong/status frame: not paced, not counted as data."""
        await self.ws.send(frame, text=True)

    async def send(self, frame: bytes) -> None:
        """One data frame, recorded; applies the close-every-N and silence faults."""
        faults = self.server.faults
        hit = faults.applies_to(self.conn_id)
        if hit and faults.silent_after_n_frames is not None \
                and self.data_frames_sent >= faults.silent_after_n_frames:
            await self.ws.wait_closed()
            raise ConnectionClosed(None, None)
        await self.ws.send(frame, text=True)
        self.data_frames_sent += 1
        if self._sent_waiters:
            for item in [w for w in self._sent_waiters if w[0] <= self.data_frames_sent]:
                self._sent_waiters.remove(item)
                if not item[1].done():
                    item[1].set_result(None)
        if self.server.record:
            self.server.sent.append(Sent(self.conn_id, frame))
        n = faults.close_every_n_frames
        if hit and n and self.data_frames_sent % n == 0:
            await self.break_connection(faults.close_mode)

    async def send_stream(self, frames: Iterable[bytes]) -> None:
        """Data frames at the server's rate (as fast as possible when the rate is None)."""
        rate = self.server.rate_msgs_s
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i, frame in enumerate(frames):
            if rate:
                due = t0 + i / rate
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            await self.send(frame)

    async def stream_live(self, keys: Iterable[str]) -> None:
        """Serve, from now on, the frames of `keys` as the server's shared timeline
        publishes them (live mode: every connection sees the same frames at the same
        time, so a client that reconnects misses what was published meanwhile)."""
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        keys = set(keys)
        venue = self.server.venue
        if isinstance(venue, EndlessVenue):
            # Snapshots of the book as published so far, then every later frame: taken
            # and subscribed in one step of the loop, so nothing falls in between.
            for frame in venue.join(sorted(keys)):
                queue.put_nowait(frame)
        self.server._live_subscribe(keys, queue)
        try:
            while True:
                await self.send(await queue.get())
        finally:
            self.server._live_unsubscribe(queue)

    async def recv(self) -> str | bytes:
        return await self.ws.recv()

    async def break_connection(self, mode: str) -> None:
        transport: Any = self.ws.transport
        if mode == "reset":
            sock = transport.get_extra_info("socket")
            if sock is not None:
                import socket
                import struct
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        elif mode == "no_close_frame":
            transport.close()
        else:
            await self.ws.close(1001, "simulated restart")
        raise ConnectionClosed(None, None)

    async def idle(self) -> None:
        """Serve nothing more; answer control messages via `on_message` until closed."""
        await self.ws.wait_closed()


class SimServer:
    def __init__(self, exchange: str, *, rate_msgs_s: float | None = None,
                 faults: Faults | None = None, record: bool = True, live: bool = False,
                 host: str = "127.0.0.1", port: int = 0, venue: Venue | None = None,
                 rest_faults: RestFaults | None = None, **venue_options: Any) -> None:
        self.exchange = exchange
        self.venue: Venue = venue if venue is not None else VENUES[exchange](**venue_options)
        self.rate_msgs_s = rate_msgs_s
        self.faults = faults or Faults()
        self.record = record
        self.host = host
        self.port = port
        self.sent: list[Sent] = []
        self.handshakes = 0
        self.handshake_times: list[float] = []   # loop time of every WebSocket handshake
        self.connections = 0
        self.rest_requests: list[str] = []
        # Broken REST answers: served by a raw listener on its own port (`rest_url`).
        self.rest_faults = rest_faults
        self._rest_listener: RestListener | None = None
        # Wall-clock time (time.time()) each connection opened / ended, by conn id.
        self.conn_opened: dict[int, float] = {}
        self.conn_ended: dict[int, float] = {}
        self.open_conns: dict[int, SimConn] = {}
        # Frames sent on purpose by `inject`: (wall time, conn id, frame).
        self.injected: list[tuple[float, int, bytes]] = []
        self._publishing = True
        self._ids = itertools.count(1)
        self._server: Server | None = None
        self._conns: set[ServerConnection] = set()
        # Live mode: one timeline published at `rate_msgs_s` to every subscribed connection.
        self.live = live
        self.published = 0
        self._live_subs: dict[asyncio.Queue[bytes], set[str]] = {}
        self._publisher: asyncio.Task[None] | None = None
        self._first_subscriber = asyncio.Event()

    def _live_subscribe(self, keys: set[str], queue: asyncio.Queue[bytes]) -> None:
        self._live_subs[queue] = keys
        self._first_subscriber.set()

    def _live_unsubscribe(self, queue: asyncio.Queue[bytes]) -> None:
        self._live_subs.pop(queue, None)

    def stop_publishing(self) -> None:
        """Live mode: publish nothing more (an endless timeline ends here)."""
        self._publishing = False

    async def _publish_endless(self, venue: EndlessVenue) -> None:
        """Publish generated frames at the server's rate until `stop_publishing`. A frame
        is generated when it is due and published in the same step, so a `join` snapshot
        always matches what was published before it."""
        await self._first_subscriber.wait()
        loop = asyncio.get_running_loop()
        rate = self.rate_msgs_s or 1000.0
        t0 = loop.time()
        for i in itertools.count():
            delay = t0 + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if not self._publishing:
                return
            key, frame = venue.next_frame()
            self.published += 1
            for queue, keys in list(self._live_subs.items()):
                if key in keys:
                    queue.put_nowait(frame)

    async def _publish(self) -> None:
        """Publish the venue's timeline once, starting when the first client subscribes."""
        if isinstance(self.venue, EndlessVenue):
            await self._publish_endless(self.venue)
            return
        timeline = self.venue.timeline()
        await self._first_subscriber.wait()
        loop = asyncio.get_running_loop()
        rate = self.rate_msgs_s or 1000.0
        t0 = loop.time()
        for i, (key, frame) in enumerate(timeline):
            delay = t0 + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self.published += 1
            for queue, keys in list(self._live_subs.items()):
                if key in keys:
                    queue.put_nowait(frame)

    @property
    def timeline_done(self) -> bool:
        return self._publisher is not None and self._publisher.done()

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    @property
    def rest_url(self) -> str:
        if self._rest_listener is not None:
            return f"http://{self.host}:{self._rest_listener.port}"
        return f"http://{self.host}:{self.port}"

    async def inject(self, frame: bytes) -> list[int]:
        """Send `frame` as a text frame on every open connection now (a malformed or
        oversized frame, on purpose); recorded in `injected`. Returns the conn ids."""
        sent = []
        for conn_id, conn in list(self.open_conns.items()):
            try:
                await conn.ws.send(frame.decode("utf-8", "replace"), text=True)
            except ConnectionClosed:
                continue
            self.injected.append((time.time(), conn_id, frame))
            sent.append(conn_id)
        return sent

    async def start(self) -> SimServer:
        self._server = await serve(self._handler, self.host, self.port,
                                   process_request=self._process_request,
                                   compression=None, max_size=2**24, ping_interval=None)
        sock = next(iter(self._server.sockets))
        self.port = sock.getsockname()[1]
        if self.rest_faults is not None:
            self._rest_listener = RestListener(self._rest_answer, self.rest_faults, self.host)
            await self._rest_listener.start()
        if self.live:
            self._publisher = asyncio.create_task(self._publish())
        return self

    async def stop(self) -> None:
        if self._publisher is not None:
            self._publisher.cancel()
            await asyncio.gather(self._publisher, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._rest_listener is not None:
            await self._rest_listener.stop()

    async def __aenter__(self) -> SimServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def sent_by_conn(self) -> dict[int, list[bytes]]:
        by: dict[int, list[bytes]] = {}
        for s in self.sent:
            by.setdefault(s.conn_id, []).append(s.frame)
        return by

    # ---- HTTP ------------------------------------------------------------------------------
    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        upgrade = request.headers.get("Upgrade", "")
        if upgrade.lower() != "websocket":
            return self._rest(request)
        self.handshakes += 1
        self.handshake_times.append(asyncio.get_running_loop().time())
        f = self.faults
        if f.handshake_status and (not f.refuse_first_n or self.handshakes <= f.refuse_first_n):
            headers = Headers()
            if f.retry_after_s is not None:
                headers["Retry-After"] = str(int(f.retry_after_s) if f.retry_after_s >= 1
                                             else f.retry_after_s)
            headers["Content-Type"] = "text/plain"
            return Response(f.handshake_status, "Refused", headers, b"simulated refusal\n")
        return None

    def _rest_answer(self, path: str, query: dict[str, list[str]]) -> tuple[int, bytes] | None:
        self.rest_requests.append(path)
        return self.venue.rest(path, query)

    def _rest(self, request: Request) -> Response:
        parts = urlsplit(request.path)
        self.rest_requests.append(request.path)
        answer = self.venue.rest(parts.path, parse_qs(parts.query))
        headers = Headers()
        if answer is None:
            headers["Content-Type"] = "text/plain"
            return Response(404, "Not Found", headers, b"not found\n")
        status, body = answer
        headers["Content-Type"] = "application/json"
        headers["Content-Length"] = str(len(body))
        return Response(status, "OK" if status == 200 else "Error", headers, body)

    # ---- WebSocket -------------------------------------------------------------------------
    async def _handler(self, ws: ServerConnection) -> None:
        conn = SimConn(self, ws, next(self._ids))
        self.connections += 1
        self._conns.add(ws)
        self.conn_opened[conn.conn_id] = time.time()
        self.open_conns[conn.conn_id] = conn
        f = self.faults
        hit = f.applies_to(conn.conn_id)
        try:
            if hit and f.accept_then_close:
                await ws.close(1011, "simulated failure")
                return
            if hit and f.black_hole:
                transport: Any = ws.transport
                transport.pause_reading()
                await ws.wait_closed()
                return
            await self.venue.session(conn)
        except ConnectionClosed:
            pass
        finally:
            self._conns.discard(ws)
            self.open_conns.pop(conn.conn_id, None)
            self.conn_ended[conn.conn_id] = time.time()


__all__ = ["Faults", "SimConn", "SimServer", "merge_streams"]
