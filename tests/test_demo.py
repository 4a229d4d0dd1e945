"""`ingestd demo` ends with a query to try: it must work right after the README's install
(`pip install` gives Polars, not a DuckDB command line)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests.support import read_table


def suggested_commands(out: str) -> list[tuple[str, str]]:
    """(header, command) for every indented command after "Read it back"."""
    lines = out[out.index("Read it back"):].splitlines()
    found: list[tuple[str, str]] = []
    header = ""
    for line in lines:
        if not line.strip():
            continue
        if line.startswith("  "):
            found.append((header, line.strip()))
        else:
            header = line
    return found


def test_demo_suggests_a_query_that_runs_after_a_plain_install(tmp_path: Path) -> None:
    root = tmp_path / "demo data"   # a space in the path: the command must quote it
    # The CLI entry, in a process of its own: it configures logging to its stdout.
    argv = ["demo", "--seconds", "2", "--root", str(root), "--exchange", "binance"]
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from ingestd.cli import main; "
         f"sys.exit(main({argv!r}))"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    commands = suggested_commands(out)
    # Every command not explicitly marked as needing something extra must run as printed.
    required = [cmd for header, cmd in commands if "if you have" not in header.lower()]
    assert required, out
    trades = read_table(root, "trades").height
    assert trades > 0
    for cmd in required:
        done = subprocess.run(shlex.split(cmd), capture_output=True, text=True, timeout=60,
                              cwd=tmp_path, check=False)
        assert done.returncode == 0, f"{cmd}\n{done.stderr[-2000:]}"
        shape = re.search(r"shape: \((\d+), \d+\)", done.stdout)
        assert shape is not None and int(shape.group(1)) == trades, done.stdout
    # The DuckDB line is still offered, for those who have that command line.
    assert any(cmd.startswith("duckdb ") and "if you have" in header.lower()
               for header, cmd in commands)
