"""The fault soak's smoke run (`benchmarks/soak.py --smoke`, 120 s): the real daemon
against the three generated venues, every fault kind injected once at least, nothing lost
outside the documented windows, nothing doubled, books equal to the generator's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(240)   # a 120 s run, its start and its analysis
def test_soak_smoke(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "soak.py"), "--smoke", "--seed", "1",
         "--json", str(out)],
        capture_output=True, text=True, timeout=200, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    t = r["totals"]
    assert r["failures"] == []
    assert t["lost"] == 0 and t["duplicates"] == 0 and t["stored_not_sent"] == 0
    assert r["books_different"] == 0 and r["books_checked"] > 0
    for venue, v in r["venues"].items():
        assert v["trade_rows_stored"] > 0, venue
        assert v["books"]["checkpoints_equal"] > 0, venue
        assert set(v["books"]["final"].values()) == {"equal"}, (venue, v["books"])
        # Everything sent is stored or inside a documented window, and no window is
        # claimed for an id that was stored.
        assert (v["trade_rows_stored"] + v["lost_in_gap"] + v["lost_in_disconnect_window"]
                + v["lost_in_kill_window"]) == v["trade_ids_sent"], (venue, v)
    kinds = {f["fault"] for f in r["faults"]}
    assert {"drop_clean", "drop_reset", "drop_no_close_frame", "accept_then_close",
            "handshake_503", "handshake_429", "stall", "malformed_frame", "oversized_frame",
            "rest_not_http", "rest_chunked_cut", "rest_garbage_json", "rest_hang",
            "sighup_changed_feed", "kill_9", "disk_full"} <= kinds
    assert all({"t", "fault", "venue", "detail"} <= set(f) for f in r["faults"])
    # Every broken REST answer armed was served (each one ends as a snapshot_failed event).
    assert sorted(r["rest_faults_served"]) == sorted(
        f["fault"].removeprefix("rest_") for f in r["faults"] if f["fault"].startswith("rest_"))
    assert r["venues"]["binance"]["events"].get("snapshot_failed", 0) >= len(
        r["rest_faults_served"])
    assert t["malformed_missing"] == 0
    assert t["oversized_closes"] >= t["oversized_injected"]
    assert r["disk_full_injected"] or r["disk_full_note"]
    assert r["rss"]["samples"] and r["rss"]["max_kb"] > 0
    assert r["daemon_starts"] >= 2 and r["final_exit_code"] == 0
