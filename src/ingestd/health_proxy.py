"""The supervisor's one `/health`, `/livez`, `/readyz` and `/metrics` over every worker.

Owns: fetching the workers' own endpoints (each worker serves them on a private loopback
port), merging them into the contract's shapes, and the HTTP server on `[health] listen`:
  /health   the contract's JSON over every feed of every worker (each feed names its
            `worker`), `queue`/`writer`/`journal` summed over the workers, and `workers`:
            per worker its state (starting | running | restarting | stopping | stopped),
            pid, restarts, feeds and own status. A feed whose worker is down is listed as
            `stopped` with `worker_state`. 200 only when every worker runs, every feed
            streams and every writer commits; 503 otherwise.
  /livez    200 while every worker process is alive and answers its own /livez with 200
  /readyz   200 once every worker was ready, until shutdown
  /metrics  every worker's exposition with a `worker` label added to each sample (families
            merged by name; the text is checked with prometheus_client's parser in the
            tests), plus the supervisor's `ingestd_worker_*` families
Each request queries the workers concurrently with a short timeout; a worker that does
not answer counts as down for that request.

Must not: start or stop workers (supervisor.py does), block the loop, or let a slow worker
hold a request longer than `FETCH_TIMEOUT_S`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from ingestd import __version__
from ingestd.health import http_response, json_response
from ingestd.metrics import CONTENT_TYPE

FETCH_TIMEOUT_S = 2.0
REQUEST_TIMEOUT_S = 5.0


@dataclass
class WorkerView:
    """What the supervisor knows of one worker (a copy, taken per request)."""

    index: int
    state: str                      # starting | running | restarting | stopping | stopped
    pid: int | None
    port: int | None
    feeds: list[str]
    restarts: int = 0
    last_exit: str | None = None
    uptime_s: float | None = None


@dataclass
class Fetched:
    """One worker's answers to one request."""

    view: WorkerView
    health_code: int | None = None
    health: dict[str, Any] | None = None
    live: bool | None = None
    metrics: str | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class WorkerClient:
    """GETs against the workers' loopback ports (one aiohttp session)."""

    def __init__(self, timeout_s: float = FETCH_TIMEOUT_S) -> None:
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self.timeout, connector=aiohttp.TCPConnector(force_close=True))
        return self._session

    async def get(self, port: int, path: str) -> tuple[int, bytes]:
        async with self._get_session().get(f"http://127.0.0.1:{port}{path}") as r:
            return r.status, await r.read()

    async def fetch(self, view: WorkerView, paths: Sequence[str]) -> Fetched:
        out = Fetched(view)
        if view.port is None or view.state not in ("running", "stopping"):
            return out
        try:
            for path in paths:
                code, body = await self.get(view.port, path)
                if path == "/health":
                    out.health_code, out.health = code, orjson.loads(body)
                elif path == "/livez":
                    out.live = code == 200
                elif path == "/metrics":
                    out.metrics = body.decode()
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
            out.error = f"{type(e).__name__}: {e}"[:200]
        return out

    async def fetch_all(self, views: Sequence[WorkerView], paths: Sequence[str]
                        ) -> list[Fetched]:
        return list(await asyncio.gather(*(self.fetch(v, paths) for v in views)))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# ---- /health -------------------------------------------------------------------------------
def _down_feed(view: WorkerView) -> dict[str, Any]:
    return {"state": "stopped", "breaker": "closed", "messages": 0,
            "last_message_age_s": None, "reconnects": 0, "gaps": 0,
            "worker": view.index, "worker_state": view.state}


def _sum_counts(dicts: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            total[k] = total.get(k, 0) + int(v)
    return dict(sorted(total.items()))


def _max_age(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def merge_health(state: str, fetched: Sequence[Fetched]) -> tuple[int, dict[str, Any]]:
    """The supervisor's /health: status code and body over every worker."""
    feeds: dict[str, Any] = {}
    workers: dict[str, Any] = {}
    bodies: list[dict[str, Any]] = []
    all_ok = bool(fetched)
    for f in fetched:
        v = f.view
        h = f.health if v.state == "running" else None
        worker_status = None if h is None else h.get("status")
        answered = set()
        if h is not None:
            bodies.append(h)
            for name, feed in h.get("feeds", {}).items():
                feeds[name] = {**feed, "worker": v.index}
                answered.add(name)
        for name in v.feeds:
            if name not in answered:
                feeds[name] = _down_feed(v)
        all_ok = all_ok and worker_status == "ok" and answered >= set(v.feeds)
        workers[str(v.index)] = {
            "state": v.state, "pid": v.pid, "restarts": v.restarts, "feeds": v.feeds,
            "status": worker_status if f.error is None else "unreachable",
            "last_exit": v.last_exit,
            "uptime_s": None if v.uptime_s is None else round(v.uptime_s, 3),
            **({"error": f.error} if f.error else {}),
            **{k: val for k, val in (h or {}).items()
               if k not in ("status", "feeds", "queue", "writer", "journal",
                            "event_loop_lag_s")},
        }
    status = state if state in ("starting", "stopping") else "ok" if all_ok else "degraded"
    queues = [b.get("queue") or {} for b in bodies]
    writers = [b.get("writer") or {} for b in bodies]
    journals = [b["journal"] for b in bodies if b.get("journal")]
    errors = [f"worker {f.view.index}: {(f.health or {}).get('writer', {}).get('last_error')}"
              for f in fetched if (f.health or {}).get("writer", {}).get("last_error")]
    body: dict[str, Any] = {
        "status": status,
        "feeds": dict(sorted(feeds.items())),
        "queue": {"depth": sum(q.get("depth", 0) for q in queues),
                  "capacity": sum(q.get("capacity", 0) for q in queues),
                  "peak_depth": max((q.get("peak_depth", 0) for q in queues), default=0),
                  "dropped": sum(q.get("dropped", 0) for q in queues)},
        "writer": {"healthy": all(w.get("healthy", False) for w in writers) and bool(writers),
                   "committing": all(w.get("committing", False) for w in writers)
                   and bool(writers),
                   "rows_written": _sum_counts([w.get("rows_written", {}) for w in writers]),
                   "files_written": sum(w.get("files_written", 0) for w in writers),
                   "buffered_rows": sum(w.get("buffered_rows", 0) for w in writers),
                   "flush_errors": sum(w.get("flush_errors", 0) for w in writers),
                   "last_commit_age_s": _max_age([w.get("last_commit_age_s")
                                                  for w in writers]),
                   "last_error": errors[0] if errors else None},
        "journal": None if not journals else {
            "healthy": all(j.get("healthy", False) for j in journals),
            "pending_bytes": sum(j.get("pending_bytes", 0) for j in journals),
            "fsync_age_s": _max_age([j.get("fsync_age_s") for j in journals]),
            "fsync_failures": sum(j.get("fsync_failures", 0) for j in journals),
            "segments_deleted": sum(j.get("segments_deleted", 0) for j in journals)},
        "event_loop_lag_s": max((b.get("event_loop_lag_s", 0.0) for b in bodies),
                                default=0.0),
        "store": _merge_store(fetched),
        "workers": workers,
    }
    return (200 if status == "ok" else 503), body


def _merge_store(fetched: Sequence[Fetched]) -> dict[str, Any] | None:
    """One object-store section over the workers (None: the root is not a store):
    unreachable if any worker's uploads fail; what waits and what was done, summed."""
    stores = [(f.view.index, (f.health or {}).get("store")) for f in fetched]
    found = [(i, s) for i, s in stores if s]
    if not found:
        return None
    errors = [f"worker {i}: {s['last_error']}" for i, s in found if s.get("last_error")]
    states = {s.get("state") for _, s in found}
    return {
        "url": found[0][1].get("url"),
        "state": "unreachable" if "unreachable" in states
        else "ok" if states == {"ok"} else sorted(str(x) for x in states)[0],
        "last_error": errors[0] if errors else None,
        "files_waiting": sum(s.get("files_waiting", 0) for _, s in found),
        "bytes_waiting": sum(s.get("bytes_waiting", 0) for _, s in found),
        "files_uploaded": sum(s.get("files_uploaded", 0) for _, s in found),
        "upload_failures": sum(s.get("upload_failures", 0) for _, s in found),
        "last_upload_age_s": _max_age([s.get("last_upload_age_s") for _, s in found]),
    }


def all_live(fetched: Sequence[Fetched]) -> bool:
    """Every worker process runs and answers its /livez with 200."""
    return bool(fetched) and all(f.view.state == "running" and f.live is True
                                 for f in fetched)


# ---- /metrics ------------------------------------------------------------------------------
def merge_metrics(fetched: Sequence[Fetched]) -> list[Metric]:
    """Every worker's families with a `worker` label on each sample, merged by name,
    then the supervisor's own families."""
    families: dict[str, Metric] = {}
    for f in fetched:
        if f.metrics is None:
            continue
        worker = str(f.view.index)
        for fam in text_string_to_metric_families(f.metrics):
            merged = families.get(fam.name)
            if merged is None:
                merged = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                families[fam.name] = merged
            for s in fam.samples:
                merged.samples.append(s._replace(labels={**s.labels, "worker": worker}))
    up = GaugeMetricFamily("ingestd_worker_up",
                           "1 while the worker process runs and answers", labels=["worker"])
    restarts = CounterMetricFamily("ingestd_worker_restarts",
                                   "times the worker was restarted after it died",
                                   labels=["worker"])
    nfeeds = GaugeMetricFamily("ingestd_worker_feeds", "feeds assigned to the worker",
                               labels=["worker"])
    for f in fetched:
        lv = [str(f.view.index)]
        up.add_metric(lv, 1.0 if f.view.state == "running" and f.metrics is not None
                      else 0.0)
        restarts.add_metric(lv, f.view.restarts)
        nfeeds.add_metric(lv, len(f.view.feeds))
    count = GaugeMetricFamily("ingestd_workers", "worker processes of the supervisor",
                              value=len(fetched))
    info = GaugeMetricFamily("ingestd_supervisor_info", "ingestd supervisor version",
                             labels=["version"])
    info.add_metric([__version__], 1.0)
    return [*families.values(), count, up, restarts, nfeeds, info]


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def exposition_of(families: list[Metric]) -> bytes:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Families(families))
    return generate_latest(reg)


# ---- the server ----------------------------------------------------------------------------
class ProxyServer:
    """HTTP on `[health] listen`, answering from the workers (see the module docstring)."""

    def __init__(self, views: Callable[[], list[WorkerView]], state: Callable[[], str],
                 host: str, port: int, client: WorkerClient | None = None) -> None:
        self.views = views
        self.state = state
        self.host = host
        self.port = port
        self.client = client or WorkerClient()
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
        await self.client.close()

    @staticmethod
    async def _never(ws: ServerConnection) -> None:
        await ws.close(1008, "not a WebSocket endpoint")

    async def _process_request(self, conn: ServerConnection, request: Request) -> Response:
        path = request.path.split("?", 1)[0]
        if path == "/health":
            fetched = await self.client.fetch_all(self.views(), ["/health"])
            status, body = merge_health(self.state(), fetched)
            return json_response(status, body)
        if path == "/livez":
            fetched = await self.client.fetch_all(self.views(), ["/livez"])
            ok = all_live(fetched)
            return json_response(200 if ok else 503, {
                "live": ok, "workers": {str(f.view.index): f.live for f in fetched}})
        if path == "/readyz":
            state = self.state()
            ready = state not in ("starting", "stopping")
            return json_response(200 if ready else 503, {"ready": ready, "state": state})
        if path == "/metrics":
            fetched = await self.client.fetch_all(self.views(), ["/metrics"])
            return http_response(200, exposition_of(merge_metrics(fetched)), CONTENT_TYPE)
        return json_response(404, {"error": "not found",
                           "endpoints": ["/health", "/livez", "/readyz", "/metrics"]})


__all__ = ["FETCH_TIMEOUT_S", "Fetched", "ProxyServer", "WorkerClient", "WorkerView",
           "all_live", "exposition_of", "merge_health", "merge_metrics"]
