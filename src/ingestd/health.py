"""Health, readiness, liveness and metrics over HTTP (GET only), bound to `[health] listen`.

Owns: the endpoint shapes and status codes of the contract -
  /health   JSON status of every feed, the queue and the writer; 200 when every feed is
            streaming and the writer is committing, 503 otherwise
  /livez    200 while the event loop and the writer make progress
  /readyz   200 once started and not stopping
  /metrics  Prometheus text format
and the HTTP server, which reuses the websockets library's HTTP/1.1 parser (a real
server already in our dependencies): every request is answered from `process_request`,
a client that does not send its request within `REQUEST_TIMEOUT_S` is dropped, and no
handler awaits anything, so a slow or abusive client cannot stall the daemon.

Must not: mutate daemon state, or compute anything expensive per request beyond reading
the counters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from ingestd.metrics import CONTENT_TYPE, exposition, registry_for

if TYPE_CHECKING:
    from ingestd.daemon import Daemon

REQUEST_TIMEOUT_S = 5.0
WRITER_STALL_S = 10.0     # /livez fails if the writer made no progress for this long


def health_snapshot(d: Daemon) -> tuple[int, dict[str, Any]]:
    now = d.clock.monotonic()
    feeds: dict[str, Any] = {}
    all_streaming = bool(d.feed_stats)
    for name, st in sorted(d.feed_stats.items()):
        age = None if st.last_message_mono is None else round(now - st.last_message_mono, 3)
        feeds[name] = {
            "exchange": st.exchange,
            "state": st.state,
            "breaker": st.breaker,
            "messages": st.messages,
            "last_message_age_s": age,
            "reconnects": st.reconnects,
            "gaps": st.gaps,
            "resyncs": st.resyncs,
            "stale": st.stale,
            "parse_errors": sum(st.parse_errors.values()),
            "drops": sum(st.drops.values()),
            "last_error": st.last_error,
        }
        all_streaming = all_streaming and st.state == "streaming"
    w = d.writer_stats
    writer_ok = w.healthy and writer_progressing(d)
    journal: dict[str, Any] | None = None
    if d.journal is not None:
        js = d.journal.stats
        journal = {
            "healthy": js.healthy,
            "pending_bytes": js.pending_bytes,
            "fsync_age_s": None if js.last_fsync_mono is None
            else round(now - js.last_fsync_mono, 3),
            "fsync_failures": js.fsync_failures,
            "segments_deleted": js.segments_deleted,
        }
        writer_ok = writer_ok and js.healthy
    if d.state in ("starting", "stopping"):
        status = d.state
    else:
        status = "ok" if all_streaming and writer_ok else "degraded"
    body = {
        "status": status,
        "feeds": feeds,
        "queue": {"depth": d.queue.qsize(), "capacity": d.queue_stats.capacity,
                  "peak_depth": d.queue_stats.peak_depth,
                  "dropped": sum(d.queue_stats.dropped.values())},
        "writer": {"healthy": w.healthy, "committing": writer_ok,
                   "rows_written": dict(w.rows_written), "files_written": w.files_written,
                   "buffered_rows": w.buffered_rows, "flush_errors": w.flush_errors,
                   "last_commit_age_s": None if w.last_commit_mono is None
                   else round(now - w.last_commit_mono, 3),
                   "last_error": w.last_error},
        "journal": journal,
        "event_loop_lag_s": round(d.loop_lag_s, 6),
    }
    return (200 if status == "ok" else 503), body


def writer_progressing(d: Daemon) -> bool:
    last = d.writer_stats.last_progress_mono
    return last is None or d.clock.monotonic() - last < WRITER_STALL_S


class HealthServer:
    def __init__(self, daemon: Daemon, host: str, port: int) -> None:
        self.daemon = daemon
        self.host = host
        self.port = port
        self._registry = registry_for(daemon)
        self._server: Server | None = None

    async def start(self) -> int:
        self._server = await serve(self._never, self.host, self.port,
                                   process_request=self._process_request,
                                   open_timeout=REQUEST_TIMEOUT_S, compression=None,
                                   server_header="ingestd")
        sock = next(iter(self._server.sockets))
        self.port = sock.getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    @staticmethod
    async def _never(ws: ServerConnection) -> None:
        await ws.close(1008, "not a WebSocket endpoint")

    def _process_request(self, conn: ServerConnection, request: Request) -> Response:
        path = request.path.split("?", 1)[0]
        d = self.daemon
        if path == "/health":
            status, body = health_snapshot(d)
            return _json(status, body)
        if path == "/livez":
            ok = writer_progressing(d)
            return _json(200 if ok else 503, {"live": ok})
        if path == "/readyz":
            ready = d.state not in ("starting", "stopping")
            return _json(200 if ready else 503, {"ready": ready, "state": d.state})
        if path == "/metrics":
            return _response(200, exposition(self._registry), CONTENT_TYPE)
        return _json(404, {"error": "not found",
                           "endpoints": ["/health", "/livez", "/readyz", "/metrics"]})


def _json(status: int, body: dict[str, Any]) -> Response:
    return _response(status, orjson.dumps(body, option=orjson.OPT_INDENT_2) + b"\n",
                     "application/json")


def _response(status: int, body: bytes, content_type: str) -> Response:
    headers = Headers()
    headers["Content-Type"] = content_type
    headers["Content-Length"] = str(len(body))
    headers["Cache-Control"] = "no-store"
    headers["Connection"] = "close"
    reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}.get(status, "")
    return Response(status, reason, headers, body)
