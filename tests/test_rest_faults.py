"""A book never waits forever for a snapshot: every way a REST answer can fail is an
event and a retry, and the book syncs once a good answer comes.

The simulator's REST side (sim/faults.py, `SimServer(rest_faults=...)`) misbehaves in
turn - an answer that is not HTTP, a chunked body cut short, a 200 with garbage JSON,
silence (the fetch deadline) - and then serves the venue's real snapshot.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from ingestd.sim import SimServer
from ingestd.sim.faults import REST_FAULT_KINDS, RestFaults
from tests.exchanges.test_binance import SPOT_BOOK, reference_books
from tests.support import apply_book_rows, book_table_rows, feed_for, make_config, read_table
from tests.support import run_daemon as run

FAULTS = REST_FAULT_KINDS   # not_http, chunked_cut, garbage_json, hang


async def test_broken_snapshot_answers_are_retried_until_the_book_syncs(root: Path) -> None:
    symbol = SPOT_BOOK[0]
    rest = RestFaults(pending=list(FAULTS), hang_s=30.0)
    async with SimServer("binance", rate_msgs_s=50, rest_faults=rest) as sim:
        feed = {**feed_for(sim, symbols=[symbol], channels=["book"]), "rest_timeout_s": 0.5}
        cfg = make_config(root, [feed])

        def synced(d: object) -> bool:
            return (len(rest.applied) == len(FAULTS) and len(sim.rest_requests) > 0
                    and d.writer_stats.rows_written["book"] > 0)  # type: ignore[attr-defined]

        daemon = await run(cfg, synced, timeout_s=40, settle_s=1.0)
    events = read_table(root, "events")
    failed = events.filter(pl.col("event") == "snapshot_failed")["detail"].to_list()
    # One event per broken answer, each saying what was wrong, in order.
    assert len(failed) == len(FAULTS), failed
    for detail, word in zip(failed, ("not_http", "truncated", "bad snapshot", "timeout"),
                            strict=True):
        assert word in detail, (word, detail)
    assert daemon.feed_stats[feed["name"]].parse_errors == {}
    book = read_table(root, "book")
    assert book.filter(pl.col("is_snapshot")).height > 0
    # The book rebuilt from the table is the venue's book: the diffs buffered during
    # the ~4 s of failed fetches were bridged to the snapshot and released, none lost.
    rebuilt = apply_book_rows(book_table_rows(book))
    assert rebuilt[symbol] == reference_books("binance_spot", SPOT_BOOK, futures=False)[symbol]
