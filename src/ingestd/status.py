"""`ingestd status`: /health of a running daemon as a table for a person at a terminal.

Owns: fetching /health (URL given, or built from a config's `[health] listen`) and
rendering it. Must not: change anything in the daemon.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


def fetch(url: str, timeout_s: float = 5.0) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as e:  # 503 still carries the JSON body
        return int(e.code), json.loads(e.read())


def _age(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}s"


def render(body: dict[str, Any]) -> str:
    lines = [f"status: {body['status']}"]
    header = ("feed", "exchange", "state", "breaker", "messages", "last msg", "reconn",
              "gaps", "errors", "drops")
    rows = [header]
    for name, f in body.get("feeds", {}).items():
        rows.append((name, f.get("exchange", ""), f["state"], f["breaker"], str(f["messages"]),
                     _age(f["last_message_age_s"]), str(f["reconnects"]), str(f["gaps"]),
                     str(f.get("parse_errors", 0)), str(f.get("drops", 0))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    q, w = body.get("queue", {}), body.get("writer", {})
    lines.append(f"queue: {q.get('depth')}/{q.get('capacity')} (peak {q.get('peak_depth')}, "
                 f"dropped {q.get('dropped')})")
    written = ", ".join(f"{k} {v}" for k, v in sorted(w.get("rows_written", {}).items()))
    lines.append(f"writer: {'committing' if w.get('committing') else 'NOT COMMITTING'}; "
                 f"rows written: {written or 'none'}; buffered {w.get('buffered_rows')}; "
                 f"last commit {_age(w.get('last_commit_age_s'))} ago")
    if w.get("last_error"):
        lines.append(f"writer error: {w['last_error']}")
    for index, wk in sorted(body.get("workers", {}).items(), key=lambda kv: int(kv[0])):
        lines.append(f"worker {index}: {wk.get('state')} (pid {wk.get('pid')}, restarts "
                     f"{wk.get('restarts')}, last exit {wk.get('last_exit') or '-'}): "
                     f"{', '.join(wk.get('feeds', []))}")
    j = body.get("journal")
    if j:
        lines.append(f"journal: {'ok' if j['healthy'] else 'FAILING'}; last fsync "
                     f"{_age(j['fsync_age_s'])} ago; pending {j['pending_bytes']} bytes")
    return "\n".join(lines)
