"""Health, readiness, liveness and metrics over HTTP (GET only), bound to `[health] listen`.

Owns: the endpoint shapes and status codes of the contract -
  /health   JSON status of every feed, the queue, the writer and (object-store root) the
            store; 200 when every feed is streaming, the writer is committing and the
            store is reachable, 503 otherwise
  /livez    200 while the event loop and the writer make progress
  /readyz   200 once started and not stopping
  /metrics  Prometheus text format
and the HTTP server, which reuses the websockets library's HTTP/1.1 parser (a real
server already in our dependencies): every request is answered from `process_request`,
a client that does not send its request within `REQUEST_TIMEOUT_S` is dropped, and no
handler awaits anything, so a slow or abusive client cannot stall the daemon.

Must not: mutate daemon state, import the daemon, or compute anything expensive per
request: every answer is built from one frozen `DaemonSnapshot` taken from the snapshot
source the daemon hands over (`Callable[[], DaemonSnapshot]`).
"""

from __future__ import annotations

from typing import Any

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from ingestd.metrics import CONTENT_TYPE, exposition, registry_for
from ingestd.stats import DaemonSnapshot, SnapshotProvider, SnapshotSource

REQUEST_TIMEOUT_S = 5.0
WRITER_STALL_S = 10.0     # /livez fails if the writer made no progress for this long

# A snapshot, a source of snapshots, or an object with `stats_snapshot()` (the daemon).
SnapshotLike = DaemonSnapshot | SnapshotSource | SnapshotProvider


def _snapshot(src: SnapshotLike) -> DaemonSnapshot:
    if isinstance(src, DaemonSnapshot):
        return src
    if isinstance(src, SnapshotProvider):
        return src.stats_snapshot()
    return src()


def _round(age: float | None) -> float | None:
    return None if age is None else round(age, 3)


def health_snapshot(src: SnapshotLike) -> tuple[int, dict[str, Any]]:
    """The /health status code and JSON body of one snapshot."""
    snap = _snapshot(src)
    feeds: dict[str, Any] = {}
    all_streaming = bool(snap.feeds)
    for st in snap.feeds:
        feeds[st.name] = {
            "exchange": st.exchange,
            "state": st.state,
            "breaker": st.breaker,
            "messages": st.messages,
            "last_message_age_s": _round(st.last_message_age_s),
            "reconnects": st.reconnects,
            "gaps": st.gaps,
            "resyncs": st.resyncs,
            "stale": st.stale,
            "parse_errors": sum(n for _, n in st.parse_errors),
            "drops": sum(n for _, n in st.drops),
            "last_error": st.last_error,
        }
        all_streaming = all_streaming and st.state == "streaming"
    w = snap.writer
    writer_ok = w.healthy and writer_progressing(snap)
    journal: dict[str, Any] | None = None
    if snap.journal is not None:
        js = snap.journal
        journal = {
            "healthy": js.healthy,
            "pending_bytes": js.pending_bytes,
            "fsync_age_s": _round(js.fsync_age_s),
            "fsync_failures": js.fsync_failures,
            "segments_deleted": js.segments_deleted,
        }
        writer_ok = writer_ok and js.healthy
    store: dict[str, Any] | None = None
    store_ok = True
    if snap.store is not None:
        ss = snap.store
        store = {
            "url": ss.url,
            "state": ss.state,
            "last_error": ss.last_error,
            "files_waiting": ss.files_waiting,
            "bytes_waiting": ss.bytes_waiting,
            "files_uploaded": ss.files_uploaded,
            "upload_failures": ss.upload_failures,
            "last_upload_age_s": _round(ss.last_upload_age_s),
        }
        # Rows still commit locally, but nothing reaches the root: degraded.
        store_ok = ss.state != "unreachable"
    if snap.state in ("starting", "stopping"):
        status = snap.state
    else:
        status = "ok" if all_streaming and writer_ok and store_ok else "degraded"
    q = snap.queue
    body = {
        "status": status,
        "feeds": feeds,
        "queue": {"depth": q.depth, "capacity": q.capacity, "peak_depth": q.peak_depth,
                  "dropped": sum(n for _, n in q.dropped)},
        "writer": {"healthy": w.healthy, "committing": writer_ok,
                   "rows_written": dict(w.rows_written), "files_written": w.files_written,
                   "buffered_rows": w.buffered_rows, "flush_errors": w.flush_errors,
                   "last_commit_age_s": _round(w.last_commit_age_s),
                   "last_error": w.last_error},
        "journal": journal,
        "store": store,
        "event_loop_lag_s": round(snap.loop_lag_s, 6),
    }
    return (200 if status == "ok" else 503), body


def writer_progressing(src: SnapshotLike) -> bool:
    age = _snapshot(src).writer.last_progress_age_s
    return age is None or age < WRITER_STALL_S


class HealthServer:
    def __init__(self, source: SnapshotSource, host: str, port: int) -> None:
        self.source = source
        self.host = host
        self.port = port
        self._registry = registry_for(source)
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
        if path == "/health":
            status, body = health_snapshot(self.source())
            return json_response(status, body)
        if path == "/livez":
            ok = writer_progressing(self.source())
            return json_response(200 if ok else 503, {"live": ok})
        if path == "/readyz":
            state = self.source().state
            ready = state not in ("starting", "stopping")
            return json_response(200 if ready else 503, {"ready": ready, "state": state})
        if path == "/metrics":
            return http_response(200, exposition(self._registry), CONTENT_TYPE)
        return json_response(404, {"error": "not found",
                           "endpoints": ["/health", "/livez", "/readyz", "/metrics"]})


def json_response(status: int, body: dict[str, Any]) -> Response:
    return http_response(status, orjson.dumps(body, option=orjson.OPT_INDENT_2) + b"\n",
                     "application/json")


def http_response(status: int, body: bytes, content_type: str) -> Response:
    headers = Headers()
    headers["Content-Type"] = content_type
    headers["Content-Length"] = str(len(body))
    headers["Cache-Control"] = "no-store"
    headers["Connection"] = "close"
    reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}.get(status, "")
    return Response(status, reason, headers, body)
