"""The soak benchmark's smoke run: real daemon, simulator, every available fault, ~30 s."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_soak_smoke(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "soak.py"), "--smoke", "--duration", "25",
         "--seed", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert r["lost"] == 0 and r["duplicates"] == 0 and r["books_different"] == 0
    assert r["trades_sent"] > 0 and r["trades_stored"] > 0
    assert r["trades_stored"] + r["lost_in_kill_window"] + r["lost_in_gap"] >= r["trades_sent"]
    kinds = {f["fault"] for f in r["faults"]}
    assert {"drop_clean", "drop_reset", "drop_no_close_frame", "accept_then_close",
            "handshake_503", "handshake_429", "stall", "sighup_changed_feed",
            "kill_9"} <= kinds
    assert all("t" in f and "detail" in f for f in r["faults"])
    assert r["rss_kb"]["samples"] and r["rss_kb"]["first_quarter_mean"]
    assert r["daemon_starts"] >= 2 and r["final_exit_code"] == 0
    assert set(r["faults_missing"]) == {"malformed_frame", "oversized_frame",
                                        "broken_rest_answer"}
