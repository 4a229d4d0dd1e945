"""Codec state kept across clean restarts: trade-id watermarks and the last recv_seq.

Owns: `<root>/.state/<feed>.pickle`, written atomically (staging, fsync, rename) at a
clean shutdown and read at start, so that a venue replaying recent trades on subscribe
(Coinbase, Kraken, OKX) does not produce duplicates after a restart, trade-id gaps across
the restart are detected, and recv_seq keeps growing even if the wall clock stepped back.
After a crash the journal's checkpoints play this role instead (recovery is preferred).

Must not: be used for a feed whose config changed (the saved codec belongs to the old
config; it is ignored), or run on the event loop (the daemon calls it in a thread).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import structlog

from ingestd.config import FeedConfig
from ingestd.sink.fsutil import fsync_dir

log = structlog.get_logger("ingestd.state")

STATE_DIR = ".state"


def _path(root: Path, feed: str) -> Path:
    return root / STATE_DIR / f"{feed}.pickle"


def save_feed_states(root: Path, feeds: list[tuple[FeedConfig, Any, int]]) -> None:
    d = root / STATE_DIR
    d.mkdir(parents=True, exist_ok=True)
    for cfg, codec, last_seq in feeds:
        target = _path(root, cfg.name)
        tmp = target.with_suffix(".tmp")
        try:
            # The codec is rebuilt from scratch on connect for books; keep its ids.
            codec.on_connect()
            with open(tmp, "wb") as f:
                pickle.dump({"config": cfg, "codec": codec, "last_seq": last_seq}, f,
                            protocol=pickle.HIGHEST_PROTOCOL)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, target)
        except (OSError, pickle.PicklingError) as e:
            log.error("state_save_failed", feed=cfg.name, error=str(e))
            tmp.unlink(missing_ok=True)
    fsync_dir(d)


def load_feed_state(root: Path, cfg: FeedConfig) -> tuple[Any, int] | None:
    path = _path(root, cfg.name)
    try:
        with open(path, "rb") as f:
            state = pickle.load(f)  # our own file under <root>/.state
    except FileNotFoundError:
        return None
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
        log.warning("state_unreadable", feed=cfg.name, error=str(e))
        return None
    if state.get("config") != cfg:
        log.info("state_ignored", feed=cfg.name, reason="feed config changed")
        return None
    return state["codec"], int(state["last_seq"])
