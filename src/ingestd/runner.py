"""Exit codes and the event-loop runner shared by the commands (cli.py, demo.py).

Owns: the process exit codes of the contract - 0 clean shutdown, 1 any other fatal error,
2 usage error, 78 (EX_CONFIG) invalid config or unusable output root - and `run_loop`,
which runs a command's coroutine on uvloop (asyncio's loop where uvloop is missing).

Must not: import the commands (they import this module), parse argv or print.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

EX_OK = 0
EX_FATAL = 1
EX_USAGE = 2
EX_CONFIG = 78


def run_loop(coro: Coroutine[Any, Any, int]) -> int:
    """Run `coro` to completion on a fresh event loop; return its exit code."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.run(coro)
    return uvloop.run(coro)
