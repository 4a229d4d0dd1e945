"""ENOSPC on the data volume: degrade, back off, hold intake, resume by itself, lose nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from tests.support import read_table


def test_disk_full_then_space_returns(tmp_path: Path) -> None:
    unshare = shutil.which("unshare")
    assert unshare, "util-linux unshare is required for the small-filesystem test"
    script = Path(__file__).with_name("enospc_scenario.py")
    r = subprocess.run([unshare, "-Urm", sys.executable, str(script), str(tmp_path)],
                       capture_output=True, text=True, timeout=180,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["committed_before"] and s["filled_bytes"] > 0
    assert s["writer_degraded"] and s["journal_degraded"] and s["journal_blocked_intake"]
    assert s["visible_tmp_during_fault"] == []
    assert s["writer_recovered"] and s["journal_recovered"]
    assert s["exit_code"] == 0 and s["flush_errors"] > 0 and s["journal_failures"] > 0
    out = tmp_path / "out"
    for f in out.glob("*/exchange=*/date=*/*"):
        assert f.suffix == ".parquet"
        pq.read_table(f)  # no partial file ever became visible
    sent = [json.loads(x)["data"] for x in s["sent"]]
    trades = read_table(out, "trades")
    ids = list(zip(trades["symbol"], trades["trade_id"], strict=True))
    assert len(ids) == len(set(ids))
    assert set(ids) == {(d["s"], str(d["a"])) for d in sent if d.get("e") == "aggTrade"}
    assert read_table(out, "quotes").height == sum(1 for d in sent if "e" not in d)
