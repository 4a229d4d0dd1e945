#!/usr/bin/env python3
"""Structural checks of deploy/prometheus-alerts.yml, its promtool tests and
deploy/grafana-dashboard.json. Stdlib + PyYAML. Run by deploy/check-unit.sh.

    python3 deploy/check-monitoring.py [--emit-promql-rules FILE] [--exposition METRICS.txt]

It checks what promtool does not: every alert has a severity and useful annotations, every
metric the rules and the dashboard use is one the daemon exports (METRICS below), every alert
the brief asks for exists and is shown firing by a promtool test, the dashboard is importable
(its ${DS_PROMETHEUS} input, feed/exchange variables, unique ids, a 24-column grid) and has the
panels operators rely on. --emit-promql-rules writes every dashboard query as a recording
rule (Grafana variables substituted), so `promtool check rules FILE` parses the dashboard's
PromQL too. Exits 1 with one line per problem.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

try:
    import yaml
except ImportError:  # pragma: no cover - reported, never skipped
    print("check-monitoring: PyYAML is required (apt-get install python3-yaml, or "
          "pip install pyyaml)", file=sys.stderr)
    sys.exit(2)

HERE = Path(__file__).resolve().parent
ALERTS = HERE / "prometheus-alerts.yml"
TESTS = HERE / "prometheus-alerts.test.yml"
DASHBOARD = HERE / "grafana-dashboard.json"

# The families ingestd exports at /metrics (the contract with src/ingestd/metrics.py; the
# daemon exports more, these are the ones alerts and dashboard may rely on). A summary
# counts with its _sum/_count series (ingestd's has no quantiles).
METRICS = {
    "ingestd_feed_up", "ingestd_breaker_state", "ingestd_last_message_age_seconds",
    "ingestd_frames_total", "ingestd_gaps_total", "ingestd_reconnects_total",
    "ingestd_parse_errors_total", "ingestd_drops_total", "ingestd_queue_depth",
    "ingestd_queue_capacity", "ingestd_rows_written_total", "ingestd_writer_healthy",
    "ingestd_flush_errors_total", "ingestd_event_loop_lag_seconds",
    "ingestd_journal_fsync_age_seconds",
}
SUMMARIES = {"ingestd_flush_duration_seconds"}   # flush latency (dashboard)
SEVERITIES = {"critical", "warning", "info"}

# What the alerting brief asks for -> the alert(s) that cover it.
REQUIRED_ALERTS = {
    "daemon down": {"IngestdDown"},
    "daemon absent": {"IngestdAbsent"},
    "feed down > 2m": {"IngestdFeedDown"},
    "breaker open": {"IngestdBreakerOpen"},
    "stale stream": {"IngestdStreamStale"},
    "gaps increasing": {"IngestdGapsDetected"},
    "reconnect storm": {"IngestdReconnectStorm"},
    "parse errors": {"IngestdParseErrors"},
    "drops > 0": {"IngestdDataDropped"},
    "queue > 80% full": {"IngestdQueueNearlyFull"},
    "writer unhealthy": {"IngestdWriterUnhealthy"},
    "no rows written for 5m while feeds are up": {"IngestdNoRowsWritten"},
    "event loop lag > 100ms": {"IngestdEventLoopLag"},
}
REQUIRED_PANELS = [  # (what, regex on panel titles)
    ("feed up / breaker state table", r"feeds?.*state.*breaker|breaker"),
    ("messages/s per feed", r"messages/s per feed"),
    ("last message age", r"last message age"),
    ("gaps and reconnects", r"gaps and reconnects"),
    ("parse errors and drops by reason", r"parse errors and drops"),
    ("rows written/s per table", r"rows written/s per table"),
    ("queue depth vs capacity", r"queue depth vs capacity"),
    ("flush latency", r"flush latency"),
    ("event-loop lag", r"event.loop lag"),
    ("journal fsync age", r"journal fsync age"),
]

problems: list[str] = []


def problem(msg: str) -> None:
    problems.append(msg)


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bingestd_[a-zA-Z0-9_]+", expr))


def known(name: str) -> bool:
    if name in METRICS:
        return True
    return any(name in (h, f"{h}_sum", f"{h}_count") for h in SUMMARIES)


DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


def check_alerts() -> set[str]:
    doc = yaml.safe_load(ALERTS.read_text())
    if not isinstance(doc, dict) or not isinstance(doc.get("groups"), list) or not doc["groups"]:
        problem(f"{ALERTS.name}: top level must be a mapping with a non-empty 'groups' list")
        return set()
    names: set[str] = set()
    for g in doc["groups"]:
        gname = g.get("name") if isinstance(g, dict) else None
        if not gname or not isinstance(g.get("rules"), list) or not g["rules"]:
            problem(f"{ALERTS.name}: group {gname!r} needs a name and a non-empty rules list")
            continue
        for r in g["rules"]:
            a = r.get("alert")
            where = f"{ALERTS.name}: {gname}/{a or r.get('record')}"
            if not a:
                problem(f"{where}: only alerting rules are expected here")
                continue
            if a in names:
                problem(f"{where}: duplicate alert name")
            names.add(a)
            expr = r.get("expr")
            if not isinstance(expr, str) or not expr.strip():
                problem(f"{where}: missing expr")
                continue
            for m in metric_names(expr):
                if not known(m):
                    problem(f"{where}: unknown metric {m} (not exported by ingestd)")
            if "for" in r and not DURATION.match(str(r["for"])):
                problem(f"{where}: bad 'for' duration {r['for']!r}")
            sev = (r.get("labels") or {}).get("severity")
            if sev not in SEVERITIES:
                problem(f"{where}: labels.severity must be one of {sorted(SEVERITIES)}, "
                        f"got {sev!r}")
            ann = r.get("annotations") or {}
            for key in ("summary", "description"):
                if not isinstance(ann.get(key), str) or len(ann[key].strip()) < 20:
                    problem(f"{where}: annotations.{key} missing or too short to be useful")
            allowed = {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}
            for key in set(r) - allowed:
                problem(f"{where}: unexpected key {key!r}")
    for what, alerts in REQUIRED_ALERTS.items():
        if not alerts & names:
            problem(f"{ALERTS.name}: no alert for '{what}' (expected one of {sorted(alerts)})")
    if "up" not in ALERTS.read_text():
        problem(f"{ALERTS.name}: no rule on the scrape's `up`")
    return names


def check_tests(alert_names: set[str]) -> None:
    doc = yaml.safe_load(TESTS.read_text())
    if ALERTS.name not in (doc.get("rule_files") or []):
        problem(f"{TESTS.name}: rule_files must include {ALERTS.name}")
    firing: set[str] = set()
    quiet: set[str] = set()
    for t in doc.get("tests") or []:
        for art in t.get("alert_rule_test") or []:
            (firing if art.get("exp_alerts") else quiet).add(art.get("alertname"))
    for a in sorted(alert_names - firing):
        problem(f"{TESTS.name}: no test shows {a} firing")
    for a in sorted((firing | quiet) - alert_names):
        problem(f"{TESTS.name}: tests an alert that does not exist: {a}")


def substitute(expr: str) -> str:
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    return re.sub(r"\$\{?(instance|exchange|feed)\}?", ".*", expr)


def check_dashboard() -> list[str]:
    try:
        d = json.loads(DASHBOARD.read_text())
    except json.JSONDecodeError as e:
        problem(f"{DASHBOARD.name}: not valid JSON: {e}")
        return []
    exprs: list[str] = []
    if not isinstance(d.get("schemaVersion"), int) or d["schemaVersion"] < 36:
        problem(f"{DASHBOARD.name}: schemaVersion should be >= 36, got {d.get('schemaVersion')!r}")
    inputs = {i.get("name"): i for i in d.get("__inputs", [])}
    if inputs.get("DS_PROMETHEUS", {}).get("pluginId") != "prometheus":
        problem(f"{DASHBOARD.name}: __inputs needs DS_PROMETHEUS (pluginId prometheus)")
    variables = {v.get("name"): v for v in d.get("templating", {}).get("list", [])}
    for v in ("feed", "exchange"):
        if v not in variables:
            problem(f"{DASHBOARD.name}: templating variable ${v} missing")
    for name, v in variables.items():
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if v.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
            problem(f"{DASHBOARD.name}: variable {name} must use the ${{DS_PROMETHEUS}} datasource")
        for m in metric_names(q or ""):
            if not known(m):
                problem(f"{DASHBOARD.name}: variable {name} uses unknown metric {m}")
    for a in d.get("annotations", {}).get("list", []):
        if a.get("expr"):
            exprs.append(a["expr"])
    ids: set[int] = set()
    titles: list[str] = []
    panels = list(d.get("panels", []))
    for p in list(panels):
        panels.extend(p.get("panels", []) if p.get("type") == "row" else [])
    feed_vars_used = False
    for p in panels:
        pid, title = p.get("id"), p.get("title", "")
        where = f"{DASHBOARD.name}: panel {pid} {title!r}"
        if not isinstance(pid, int) or pid in ids:
            problem(f"{where}: id must be a unique integer")
        ids.add(pid)
        gp = p.get("gridPos") or {}
        if not all(isinstance(gp.get(k), int) for k in "xywh") or gp["x"] + gp["w"] > 24:
            problem(f"{where}: gridPos must have integer x/y/w/h within 24 columns")
        if p.get("type") == "row":
            continue
        titles.append(title)
        if p.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
            problem(f"{where}: datasource must be ${{DS_PROMETHEUS}}")
        targets = p.get("targets") or []
        if not targets:
            problem(f"{where}: no queries")
        for t in targets:
            expr = t.get("expr", "")
            if not expr:
                problem(f"{where}: target {t.get('refId')} has no expr")
                continue
            if t.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
                problem(f"{where}: target {t.get('refId')} datasource must be ${{DS_PROMETHEUS}}")
            feed_vars_used |= "$feed" in expr and "$exchange" in expr
            names = metric_names(expr)
            if not names and "up{" not in expr:
                problem(f"{where}: query uses no ingestd metric: {expr}")
            for m in names:
                if not known(m):
                    problem(f"{where}: unknown metric {m}")
            exprs.append(expr)
    if not feed_vars_used:
        problem(f"{DASHBOARD.name}: no query filters on $feed and $exchange")
    for what, pattern in REQUIRED_PANELS:
        if not any(re.search(pattern, t, re.I) for t in titles):
            problem(f"{DASHBOARD.name}: no panel for {what}")
    used = set().union(*(metric_names(e) for e in exprs)) if exprs else set()
    for m in sorted(METRICS | {f"{h}_{x}" for h in SUMMARIES for x in ("sum", "count")}):
        if m not in used:
            problem(f"{DASHBOARD.name}: metric {m} is shown on no panel")
    return [substitute(e) for e in exprs]


def check_exposition(path: str) -> None:
    """Every family the rules and the dashboard use appears in a real /metrics scrape."""
    text = Path(path).read_text()
    names = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    names |= set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{| )", text, re.M))
    wanted = METRICS | {f"{h}_{x}" for h in SUMMARIES for x in ("sum", "count")}
    for m in sorted(wanted - names):
        problem(f"{path}: the daemon's /metrics has no {m}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--emit-promql-rules", metavar="FILE",
                    help="write the dashboard's queries as recording rules for promtool")
    ap.add_argument("--exposition", metavar="FILE",
                    help="a /metrics scrape of the running daemon: check it exports every "
                         "family the alerts and the dashboard use")
    args = ap.parse_args()
    if args.exposition:
        check_exposition(args.exposition)
    names = check_alerts()
    check_tests(names)
    exprs = check_dashboard()
    if args.emit_promql_rules:
        rules = [{"record": f"dashboard:query:{i}", "expr": e} for i, e in enumerate(exprs)]
        Path(args.emit_promql_rules).write_text(
            yaml.safe_dump({"groups": [{"name": "grafana-dashboard-queries", "rules": rules}]}))
    for p in problems:
        print(f"  problem: {p}")
    if problems:
        print(f"check-monitoring: {len(problems)} problem(s)")
        return 1
    print(f"check-monitoring: OK ({len(names)} alerts, all shown firing by a promtool test; "
          f"dashboard: {len(exprs)} queries, required panels and variables present)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
