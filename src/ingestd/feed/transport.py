"""WebSocket client transports behind one small interface: picows (fast) and websockets.

Owns: `connect(url, ...) -> Connection` and the `Connection` the reader uses -
`recv_batch()` (the messages of one socket read with the wall-clock time they were read
at: `ts_recv` is stamped here, in the transport's receive callback, not when the reader
gets to them; cancelling it never loses a message), `recv()`, `send(text)`,
`close(code, reason)`, `abort()` - plus the two failure types the reader classifies:
`HandshakeRejected` (an HTTP answer other than 101, with its status and headers) and
`TransportClosed` (close code and reason, who closed, or no close frame at all).

Two implementations:
- `picows` (default when installed): a Cython WebSocket client whose receive path costs
  a fraction of the pure-Python one. Frames arrive in a callback and are queued; the
  reader awaits them. Above `HIGH_WATER` queued messages the socket stops being read (TCP
  backpressure) until the reader catches up.
- `websockets` (fallback; `INGESTD_TRANSPORT=websockets` forces it).

Both answer pings, send keepalive pings after `ping_interval_s` of silence and drop the
connection if the pong does not come within `ping_timeout_s`, enforce `max_size` the
same way (a message over it, whole or fragmented, is never delivered - nor is anything
after it - and this side closes with 1009: `TransportClosed(1009, ..., by_peer=False)`),
report who closed first (a close this side's library sent on its own, e.g. on a protocol
error, is `by_peer=False`), never leave a TCP connection open behind a cancelled open or
close, and never decompress (no extension is offered).

Must not: interpret messages, or retry (the reader decides).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Mapping
from typing import Any, Protocol

OPEN_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 2.0
HIGH_WATER = 4096
LOW_WATER = 1024
# Frames stamped within this long of the first of a group were delivered by one socket
# read (the receive callback runs them back to back); they share one ts_recv.
GROUP_WINDOW_NS = 50_000
GROUP_MAX_FRAMES = 256


class HandshakeRejected(Exception):
    """The server answered the upgrade with an HTTP status other than 101."""

    def __init__(self, status: int, headers: Mapping[str, str]) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.headers = headers


class TransportClosed(Exception):
    """The connection ended: `code`/`reason` of the close frame, `by_peer` who sent it;
    `code is None` when it ended without a close frame."""

    def __init__(self, code: int | None, reason: str, by_peer: bool) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason
        self.by_peer = by_peer

    def describe(self) -> str:
        if self.code is None:
            return "connection lost without a close frame"
        who = "venue" if self.by_peer else "client"
        return f"closed by {who}: {self.code} {self.reason}".rstrip()


class Connection(Protocol):
    async def recv(self) -> bytes: ...
    async def recv_batch(self) -> tuple[int, list[bytes]]: ...
    async def send(self, text: str) -> None: ...
    async def close(self, code: int = 1000, reason: str = "") -> None: ...
    def abort(self) -> None: ...


def default_transport() -> str:
    forced = os.environ.get("INGESTD_TRANSPORT")
    if forced in ("websockets", "picows"):
        return forced
    try:
        import picows  # noqa: F401
    except ImportError:
        return "websockets"
    return "picows"


async def connect(url: str, *, ping_interval_s: float | None, max_size: int,
                  user_agent: str, transport: str | None = None) -> Connection:
    """Open a connection (raises HandshakeRejected, OSError or TimeoutError)."""
    kind = transport or default_transport()
    if kind == "picows":
        return await _PicowsConnection.open(url, ping_interval_s, max_size, user_agent)
    return await _WebsocketsConnection.open(url, ping_interval_s, max_size, user_agent)


# ---- picows ---------------------------------------------------------------------------------
def _text(reason: object) -> str:
    if isinstance(reason, bytes | bytearray | memoryview):
        return bytes(reason).decode("utf-8", "replace")
    return "" if reason is None else str(reason)


def _close_abandoned(opening: asyncio.Future[Any]) -> None:
    """A cancelled picows open finished: close the connection it made, if any."""
    if opening.cancelled() or opening.exception() is not None:
        return
    transport = opening.result()[0]
    if not transport.is_disconnected:
        transport.send_close(1001, b"connection abandoned")
        transport.disconnect()


class _PicowsConnection:
    def __init__(self) -> None:
        # Groups of frames: [ts_recv_ns, frames] - the frames of one socket read.
        self._q: deque[tuple[int, list[bytes]]] = deque()
        self._queued = 0
        self._waiter: asyncio.Future[None] | None = None
        self._closed: TransportClosed | None = None
        self._paused = False
        self._fragments: list[bytes] | None = None
        self._fragments_size = 0
        self._transport: Any = None
        self._max_size = 0
        self._disconnected: asyncio.Future[None] | None = None
        self._oversized = False      # a message over max_size: closing with 1009

    @classmethod
    async def open(cls, url: str, ping_interval_s: float | None, max_size: int,
                   user_agent: str) -> _PicowsConnection:
        import picows

        conn = cls()
        conn._max_size = max_size

        class Listener(picows.WSListener):
            def on_ws_connected(self, transport: Any) -> None:
                conn._on_connected(transport)

            def on_ws_frame(self, transport: Any, frame: Any) -> None:
                conn._on_frame(frame)

            def on_ws_disconnected(self, transport: Any) -> None:
                conn._on_disconnected()

        kwargs: dict[str, Any] = {}
        if ping_interval_s:
            kwargs = {"enable_auto_ping": True, "auto_ping_idle_timeout": ping_interval_s,
                      "auto_ping_reply_timeout": ping_interval_s}
        # picows enforces `max_frame_size` on each frame's header (closing with 1009
        # before the payload is buffered); `_on_frame` enforces it on a fragmented
        # message, and drops whatever picows still parses after a close it sent.
        opening = asyncio.ensure_future(picows.ws_connect(
            Listener, url, websocket_handshake_timeout=OPEN_TIMEOUT_S,
            enable_auto_pong=True, max_frame_size=max_size,
            extra_headers={"User-Agent": user_agent}, **kwargs))
        try:
            transport, _ = await asyncio.shield(opening)
        except asyncio.CancelledError:
            # Cancelled while the handshake was under way, picows would leave that TCP
            # connection open (and, answered later, a WebSocket nobody reads): let the
            # attempt finish - its handshake timeout bounds it - and close what it opened.
            opening.add_done_callback(_close_abandoned)
            raise
        except picows.WSInvalidStatusError as e:
            headers = {k: v for k, v in e.response.headers.items()} if e.response else {}
            raise HandshakeRejected(int(e.response.status) if e.response else 0,
                                    headers) from None
        except picows.WSError as e:
            raise OSError(f"{type(e).__name__}: {e}") from None
        if transport.response is None:
            # The server closed before answering the upgrade: no connection was made.
            raise OSError("connection closed before the handshake answer")
        conn._on_connected(transport)
        return conn

    def _on_connected(self, transport: Any) -> None:
        if self._transport is not None:
            return
        self._transport = transport
        # picows re-raises a failure it detected (a protocol error, an oversized frame)
        # from wait_disconnected(); always consume it (close() and the close reason use
        # the close handshake instead).
        self._disconnected = asyncio.ensure_future(transport.wait_disconnected())
        self._disconnected.add_done_callback(
            lambda f: None if f.cancelled() else f.exception())

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _closed_by_client(self) -> TransportClosed | None:
        """The close this side sent first (ours, or picows' own on a protocol error or an
        oversized frame), if any."""
        hs = self._transport.close_handshake if self._transport is not None else None
        if hs is None or hs.sent is None or (hs.recv is not None and hs.recv_then_sent):
            return None
        return TransportClosed(int(hs.sent.code), _text(hs.sent.reason), by_peer=False)

    def _too_big(self) -> None:
        import picows

        self._oversized = True
        self._fragments = None
        self._transport.send_close(picows.WSCloseCode.MESSAGE_TOO_BIG,
                                   f"message over {self._max_size} bytes".encode())
        self._closed = self._closed_by_client()
        # Finish the closing handshake (RFC 6455 7.1.1): keep reading, discarding data,
        # until the venue's close frame or CLOSE_TIMEOUT_S. Dropping the connection now,
        # with the rest of the big message unread, makes the kernel send an RST that can
        # destroy our close frame before the venue reads it (it then sees 1006, not 1009).
        transport = self._transport
        if self._paused:
            self._paused = False
            transport.underlying_transport.resume_reading()
        asyncio.get_running_loop().call_later(
            CLOSE_TIMEOUT_S, lambda: None if transport.is_disconnected
            else transport.disconnect(graceful=False))
        self._wake()

    def _on_frame(self, frame: Any) -> None:
        import picows

        mt = frame.msg_type
        if mt == picows.WSMsgType.TEXT or mt == picows.WSMsgType.BINARY \
                or mt == picows.WSMsgType.CONTINUATION:
            if self._oversized:
                return  # nothing after an oversized message is delivered
            if frame.payload_size > self._max_size:
                # picows rejected this frame by its header (close 1009 sent), yet parses
                # its payload if it arrives before the disconnect: never deliver it.
                self._oversized = True
                self._fragments = None
                if not self._transport.is_close_frame_sent:
                    self._too_big()
                return
            if mt != picows.WSMsgType.CONTINUATION:
                if frame.fin:
                    self._append(frame.get_payload_as_bytes())
                else:
                    self._fragments = [frame.get_payload_as_bytes()]
                    self._fragments_size = len(self._fragments[0])
                    return
            else:
                if self._fragments is None:
                    return
                piece = frame.get_payload_as_bytes()
                self._fragments.append(piece)
                self._fragments_size += len(piece)
                if self._fragments_size > self._max_size:
                    self._too_big()
                    return
                if not frame.fin:
                    return
                self._append(b"".join(self._fragments))
                self._fragments = None
        elif mt == picows.WSMsgType.CLOSE:
            mine = self._closed_by_client()
            if mine is not None:  # the echo of a close this side sent first
                self._closed = mine
            else:
                code = frame.get_close_code()
                message = frame.get_close_message()
                self._closed = TransportClosed(int(code) if code is not None else 1005,
                                               _text(message), by_peer=True)
                self._transport.send_close(code)
            self._transport.disconnect()
            self._wake()
            return
        else:
            return  # ping/pong are handled by picows
        if self._queued >= HIGH_WATER and not self._paused:
            self._paused = True
            self._transport.underlying_transport.pause_reading()
        self._wake()

    def _append(self, payload: bytes) -> None:
        now = time.time_ns()
        q = self._q
        self._queued += 1
        if q:
            ts, group = q[-1]
            if now - ts <= GROUP_WINDOW_NS and len(group) < GROUP_MAX_FRAMES:
                group.append(payload)
                return
        q.append((now, [payload]))

    def _on_disconnected(self) -> None:
        if self._closed is None:
            self._closed = self._closed_by_client() or TransportClosed(None, "", by_peer=True)
        self._wake()

    async def _wait_for_data(self) -> None:
        """Until a message is queued (cancelling this never loses one) or the end."""
        while not self._q:
            if self._closed is not None:
                raise self._closed
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _maybe_resume(self) -> None:
        if self._paused and self._queued <= LOW_WATER:
            self._paused = False
            self._transport.underlying_transport.resume_reading()

    async def recv(self) -> bytes:
        if not self._q:
            await self._wait_for_data()
        _ts, group = self._q[0]
        frame = group.pop(0)
        if not group:
            self._q.popleft()
        self._queued -= 1
        self._maybe_resume()
        return frame

    async def recv_batch(self) -> tuple[int, list[bytes]]:
        """The oldest group of frames (one socket read) and the time it was read."""
        if not self._q:
            await self._wait_for_data()
        ts, group = self._q.popleft()
        self._queued -= len(group)
        self._maybe_resume()
        return ts, group

    async def send(self, text: str) -> None:
        import picows

        if self._closed is not None:
            raise self._closed
        self._transport.send(picows.WSMsgType.TEXT, text.encode())

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self._transport is None or self._disconnected is None:
            return
        if not self._transport.is_disconnected:
            self._transport.send_close(code, reason.encode())
            try:
                done, _ = await asyncio.wait({self._disconnected}, timeout=CLOSE_TIMEOUT_S)
            except asyncio.CancelledError:
                self._transport.disconnect(graceful=False)  # no answer awaited: end it now
                raise
            if not done:
                self._transport.disconnect(graceful=False)
        if self._closed is None:
            self._closed = self._closed_by_client() or TransportClosed(code, reason,
                                                                       by_peer=False)
        self._wake()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.disconnect(graceful=False)


# ---- websockets -----------------------------------------------------------------------------
class _WebsocketsConnection:
    def __init__(self, ws: Any) -> None:
        self._ws = ws

    @classmethod
    async def open(cls, url: str, ping_interval_s: float | None, max_size: int,
                   user_agent: str) -> _WebsocketsConnection:
        from websockets.asyncio.client import connect as ws_connect
        from websockets.exceptions import InvalidHandshake, InvalidStatus

        try:
            ws = await ws_connect(url, open_timeout=OPEN_TIMEOUT_S, close_timeout=CLOSE_TIMEOUT_S,
                                  ping_interval=ping_interval_s, ping_timeout=ping_interval_s,
                                  max_size=max_size, max_queue=1024, compression=None,
                                  user_agent_header=user_agent, proxy=None)
        except InvalidStatus as e:
            raise HandshakeRejected(e.response.status_code,
                                    dict(e.response.headers.raw_items())) from None
        except InvalidHandshake as e:
            raise OSError(f"{type(e).__name__}: {e}") from None
        return cls(ws)

    @staticmethod
    def _closed(e: Any) -> TransportClosed:
        """Who closed first: the venue (its close frame), or this side (ours, or the
        library's own on a protocol error or an oversized message)."""
        if e.sent is not None and (e.rcvd is None or not e.rcvd_then_sent):
            return TransportClosed(e.sent.code, e.sent.reason, by_peer=False)
        if e.rcvd is not None:
            return TransportClosed(e.rcvd.code, e.rcvd.reason, by_peer=True)
        return TransportClosed(None, "", by_peer=True)

    async def recv(self) -> bytes:
        from websockets.exceptions import ConnectionClosed

        try:
            data: bytes = await self._ws.recv(decode=False)
        except ConnectionClosed as e:
            raise self._closed(e) from None
        return data

    async def recv_batch(self) -> tuple[int, list[bytes]]:
        frame = await self.recv()
        return time.time_ns(), [frame]

    async def send(self, text: str) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            await self._ws.send(text)
        except ConnectionClosed as e:
            raise self._closed(e) from None

    async def close(self, code: int = 1000, reason: str = "") -> None:
        try:
            await self._ws.close(code, reason)
        except asyncio.CancelledError:
            self.abort()  # no answer awaited: end the TCP connection now
            raise

    def abort(self) -> None:
        self._ws.transport.abort()
