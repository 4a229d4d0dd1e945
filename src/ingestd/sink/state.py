"""Codec state kept across clean restarts: trade-id watermarks and the last recv_seq.

Owns: `<root>/.state/<feed>.json` - the feed's config, its codec's explicit, versioned
`state()` and its last recv_seq - written atomically (temp file, fsync, rename) at a
clean shutdown and read at start, so that a venue replaying recent trades on subscribe
(Coinbase, Kraken, OKX) does not produce duplicates after a restart, trade-id gaps across
the restart are detected, and recv_seq keeps growing even if the wall clock stepped back.
After a crash the journal's checkpoints play this role instead (recovery is preferred).

Must not: pickle anything (a file format must not depend on a class's shape), hand back
a state saved for another config of the feed, or run on the event loop (the daemon calls
it in a thread). A file it cannot read is logged and ignored, never fatal.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec
import orjson
import structlog

from ingestd.config import FeedConfig
from ingestd.sink.fsutil import fsync_dir

log = structlog.get_logger("ingestd.state")

STATE_DIR = ".state"
FILE_VERSION = 2


def _path(root: Path, feed: str) -> Path:
    return root / STATE_DIR / f"{feed}.json"


def save_feed_states(root: Path, feeds: list[tuple[FeedConfig, dict[str, Any], int]]) -> None:
    """Write each feed's (config, codec state, last recv_seq)."""
    d = root / STATE_DIR
    d.mkdir(parents=True, exist_ok=True)
    for cfg, state, last_seq in feeds:
        target = _path(root, cfg.name)
        tmp = target.with_suffix(".tmp")
        try:
            body = orjson.dumps({"version": FILE_VERSION, "config": msgspec.to_builtins(cfg),
                                 "codec": state, "last_seq": last_seq})
            with open(tmp, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, target)
        except (OSError, TypeError) as e:
            log.error("state_save_failed", feed=cfg.name, error=str(e))
            tmp.unlink(missing_ok=True)
    fsync_dir(d)


def load_feed_state(root: Path, cfg: FeedConfig) -> tuple[dict[str, Any], int] | None:
    """The saved (codec state, last recv_seq) of this feed and config, or None."""
    path = _path(root, cfg.name)
    try:
        saved = orjson.loads(path.read_bytes())
        if not isinstance(saved, dict) or saved.get("version") != FILE_VERSION:
            raise ValueError(f"not a version {FILE_VERSION} state file")
        config = msgspec.convert(saved["config"], FeedConfig)
        state, last_seq = saved["codec"], int(saved["last_seq"])
        if not isinstance(state, dict):
            raise ValueError("codec state is not an object")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, msgspec.ValidationError) as e:
        log.warning("state_unreadable", feed=cfg.name, path=str(path), error=str(e)[:200])
        return None
    if config != cfg:
        log.info("state_ignored", feed=cfg.name, reason="feed config changed")
        return None
    return state, last_seq
