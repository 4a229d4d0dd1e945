"""Shared test helpers: run the real daemon against simulated venues, read tables back."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

from ingestd.config import Config, parse_config
from ingestd.daemon import Daemon
from ingestd.sim import SimServer
from ingestd.sim.recorded import frames as recorded_frames

__all__ = ["feed_for", "make_config", "read_table", "recorded_frames", "run_daemon"]


def feed_for(server: SimServer, name: str | None = None, **keys: Any) -> dict[str, Any]:
    """A `[[feeds]]` entry pointing at a simulated venue."""
    return {"name": name or f"{server.exchange}-test", "exchange": server.exchange,
            "url": server.url, "rest_url": server.rest_url, **keys}


def make_config(root: Path, feeds: list[dict[str, Any]], **sections: Any) -> Config:
    data: dict[str, Any] = {
        "storage": {"root": str(root), "flush_interval_s": 0.2},
        "health": {"listen": "127.0.0.1:0"},
        "log": {"level": "warning", "format": "console"},
        "feeds": feeds,
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return parse_config(data)


async def run_daemon(cfg: Config, until: Callable[[Daemon], bool], timeout_s: float = 20.0,
                     settle_s: float = 0.0) -> Daemon:
    """Run the daemon until `until(daemon)` holds (polled), then stop it gracefully.

    Raises TimeoutError if the condition does not hold within `timeout_s`.
    """
    daemon = Daemon(cfg)
    task = asyncio.create_task(daemon.run(install_signals=False))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        while not until(daemon):
            if task.done():
                raise AssertionError(f"daemon ended early with {task.result()}")
            if loop.time() > deadline:
                raise TimeoutError("condition not reached")
            await asyncio.sleep(0.02)
        if settle_s:
            await asyncio.sleep(settle_s)
    finally:
        daemon.request_stop("test done")
        code = await asyncio.wait_for(task, timeout=30)
    assert code == 0, f"daemon exit code {code}"
    return daemon


def read_table(root: Path, table: str) -> pl.DataFrame:
    """Every committed row of a table, sorted by recv_seq (empty frame if none)."""
    files = list((root / table).glob("exchange=*/date=*/*.parquet"))
    if not files:
        return pl.DataFrame()
    return (pl.scan_parquet(f"{root}/{table}/**/*.parquet", hive_partitioning=True)
            .collect().sort("recv_seq", maintain_order=True))


Books = dict[str, dict[str, dict[float, float]]]


def apply_book_rows(rows: Any, books: Books | None = None,
                    snap_seq: dict[str, int] | None = None) -> Books:
    """Apply `book` table rows (tuples in schema order, without `exchange`) in the order
    given, as a reader of the table does: a run of snapshot rows sharing one recv_seq
    replaces the symbol's book; any other row sets a level (amount 0 deletes it)."""
    books = {} if books is None else books
    snap_seq = {} if snap_seq is None else snap_seq
    for sym, _te, _tr, seq, is_snap, side, px, amt, _uid in rows:
        if is_snap and snap_seq.get(sym) != seq:
            books[sym] = {"bid": {}, "ask": {}}
            snap_seq[sym] = seq
        if amt == 0:
            books[sym][side].pop(px, None)
        else:
            books[sym][side][px] = amt
    return books


def rebuild_books(rows: Any) -> Books:
    """The books a reader rebuilds from book rows sorted by recv_seq (stable)."""
    return apply_book_rows(sorted(rows, key=lambda r: r[3]))


def book_table_rows(df: pl.DataFrame) -> list[tuple[Any, ...]]:
    """A `book` table read back as row tuples in schema order."""
    return list(df.select("symbol", "ts_event", "ts_recv", "recv_seq", "is_snapshot", "side",
                          "price", "amount", "update_id").iter_rows())


def mutate_json(obj: Any, path: list[int], value: Any) -> Any:
    """A copy of decoded JSON `obj` with one nested field, chosen by `path` (indices taken
    modulo each level's size), replaced by `value` - or deleted when `value` is `...`.
    The property tests feed codecs real frames mutated this way."""
    if not path or not isinstance(obj, dict | list) or not obj:
        return None if value is ... else value
    keys = list(obj) if isinstance(obj, dict) else list(range(len(obj)))
    key = keys[path[0] % len(keys)]
    if len(path) == 1 and value is ...:
        if isinstance(obj, dict):
            return {k: v for k, v in obj.items() if k != key}
        return [v for i, v in enumerate(obj) if i != key]
    copy: Any = dict(obj) if isinstance(obj, dict) else list(obj)
    copy[key] = mutate_json(obj[key], path[1:], value)
    return copy
