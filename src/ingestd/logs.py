"""Structured logging set-up (structlog) and a rate limiter for per-message warnings.

Owns: the production recipe - JSON lines to stdout, or a readable console renderer on a
terminal - with cached, level-filtering loggers; and `RateLimit`, which lets a repeated
warning (bad frames, drops) through at most once per interval with a suppressed count.

Must not: log per message; callers log state changes and rate-limited summaries only.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def configure(level: str = "info", fmt: str = "json") -> None:
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )


class RateLimit:
    """`allow(key, now)` is true at most once per `interval_s` per key.

    `suppressed(key)` tells how many calls were refused since the last allowed one.
    """

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def allow(self, key: str, now_mono: float) -> bool:
        if now_mono >= self._next.get(key, float("-inf")):
            self._next[key] = now_mono + self.interval_s
            return True
        self._suppressed[key] = self._suppressed.get(key, 0) + 1
        return False

    def take_suppressed(self, key: str) -> int:
        return self._suppressed.pop(key, 0)
