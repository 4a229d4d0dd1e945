"""The simulator's REST faults: broken answers to a snapshot request, and the raw HTTP
listener that serves them.

Owns: `RestFaults` (a queue of broken answers for the next REST requests, and the record
of each one served), the behaviours themselves - `not_http` (an SSH banner instead of
HTTP), `chunked_cut` (a chunked 200 whose body stops mid-chunk), `garbage_json` (a 200
whose body is not the venue's JSON), `hang` (nothing at all until `hang_s`) - and
`RestListener`, a minimal HTTP/1.1 GET server on its own port that answers with the
venue's REST handler unless a fault is queued (the WebSocket port's HTTP handling cannot
write bytes that are not HTTP).

Must not: know a venue's formats (the `answer` callable gives the real answer) or keep
connections open after answering (every answer ends with `Connection: close`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

REST_FAULT_KINDS = ("not_http", "chunked_cut", "garbage_json", "hang")

Writer = asyncio.StreamWriter
Answer = Callable[[str, dict[str, list[str]]], "tuple[int, bytes] | None"]


async def not_http(w: Writer, hang_s: float) -> None:
    w.write(b"SSH-2.0-OpenSSH_9.6\r\n")
    await w.drain()


async def chunked_cut(w: Writer, hang_s: float) -> None:
    w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: application/json\r\n\r\n400\r\n{\"lastUpdateId\":")
    await w.drain()


async def garbage_json(w: Writer, hang_s: float) -> None:
    body = b'{"lastUpdateId": "soon", "bids": [[1]]'
    w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (len(body), body))
    await w.drain()


async def hang(w: Writer, hang_s: float) -> None:
    await asyncio.sleep(hang_s)


BEHAVIOURS: dict[str, Callable[[Writer, float], Awaitable[None]]] = {
    "not_http": not_http, "chunked_cut": chunked_cut, "garbage_json": garbage_json,
    "hang": hang}


@dataclass
class RestFaults:
    """Broken answers for the next REST requests, in order; `applied` records each one
    served as (wall time, kind, request path)."""

    pending: list[str] = field(default_factory=list)
    hang_s: float = 5.0
    applied: list[tuple[float, str, str]] = field(default_factory=list)

    def arm(self, kind: str) -> None:
        if kind not in BEHAVIOURS:
            raise ValueError(f"unknown REST fault {kind!r}")
        self.pending.append(kind)


class RestListener:
    """HTTP/1.1 GET on its own loopback port: the venue's answer, or a queued fault."""

    def __init__(self, answer: Answer, faults: RestFaults, host: str = "127.0.0.1") -> None:
        self.answer = answer
        self.faults = faults
        self.host = host
        self.port = 0
        self.requests: list[str] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, r: asyncio.StreamReader, w: Writer) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10.0)
            parts = head.split(b" ", 2)
            path = parts[1].decode("latin-1") if len(parts) > 1 else "/"
            self.requests.append(path)
            if self.faults.pending:
                kind = self.faults.pending.pop(0)
                self.faults.applied.append((time.time(), kind, path))
                await BEHAVIOURS[kind](w, self.faults.hang_s)
                return
            url = urlsplit(path)
            got = self.answer(url.path, parse_qs(url.query))
            if got is None:
                status, body, ctype = 404, b"not found\n", b"text/plain"
            else:
                status, body = got
                ctype = b"application/json"
            w.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                    b"Connection: close\r\n\r\n%s"
                    % (status, b"OK" if status == 200 else b"Error", ctype, len(body), body))
            await w.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                TimeoutError):
            pass
        finally:
            if task is not None:
                self._tasks.discard(task)
            w.close()


__all__ = ["BEHAVIOURS", "REST_FAULT_KINDS", "RestFaults", "RestListener"]
