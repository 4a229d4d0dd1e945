"""Hyperliquid codec (exchanges/hyperliquid.py) and simulated venue (sim/venues/hyperliquid.py).

Golden values come from the recorded frames in ingestd/sim/data/hyperliquid (copied byte
for byte from the project's fixtures, plus a 2026-07-28 testnet capture; see the README
there). Frames built here (another coin, an older time, garbage) are derived from those
recordings and say so.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingestd.checks import parse_config
from ingestd.config import ConfigError, FeedConfig
from ingestd.exchanges import CODECS
from ingestd.exchanges.base import (
    DROP_DUPLICATE_TRADE,
    DROP_STALE_BOOK,
    DROP_UNSUBSCRIBED,
    Output,
    StateError,
)
from ingestd.exchanges.hyperliquid import KEEPALIVE_S, PING, TRADE_ID_WINDOW, Hyperliquid
from ingestd.schema import EV_ERROR, EV_REFUSED, EV_SUBSCRIBED, ROW_WIDTH
from ingestd.sim import Faults, SimServer
from ingestd.sim.venues import VENUES
from tests.support import (
    feed_for,
    make_config,
    mutate_json,
    read_table,
    rebuild_books,
    recorded_frames,
    run_daemon,
)

TS = 1_700_000_000_000_000_000
ALL = ("trades", "quotes", "book", "derivatives")


def frames(name: str) -> tuple[bytes, ...]:
    return recorded_frames("hyperliquid", name)


BOOK = frames("l2Book.jsonl")
TRADES = frames("trades.jsonl")
BBO = frames("bbo.jsonl")
CTX = frames("activeAssetCtx.jsonl")
ACKS = frames("subscriptionResponse.jsonl")
CANDLE = frames("candle.jsonl")
TESTNET = frames("testnet_2026.jsonl")
T_BOOK_1, T_BBO, T_BOOK_3, T_TRADES, T_ACK, T_PONG, T_ERROR = TESTNET


def codec(symbols: tuple[str, ...] = ("BTC",), channels: tuple[str, ...] = ALL,
          **keys: Any) -> Hyperliquid:
    c = CODECS["hyperliquid"](FeedConfig("hl", "hyperliquid", symbols, channels,  # type: ignore[arg-type]
                                         **keys))
    assert isinstance(c, Hyperliquid)
    return c


def events(out: Output) -> list[tuple[Any, ...]]:
    return out.rows("events")


def derived(frame: bytes, change: Any) -> bytes:
    """A recorded frame with its `data` changed by `change` (derived, not recorded)."""
    m = json.loads(frame)
    change(m["data"])
    return json.dumps(m, separators=(",", ":")).encode()


def frame_book(frame: bytes) -> dict[str, dict[float, float]]:
    """The book an l2Book frame states, independently of the codec."""
    bids, asks = json.loads(frame)["data"]["levels"]
    return {"bid": {float(lv["px"]): float(lv["sz"]) for lv in bids},
            "ask": {float(lv["px"]): float(lv["sz"]) for lv in asks}}


# ---- registration, connection, config ------------------------------------------------------
def test_registered_with_a_simulator_and_demo_feed() -> None:
    assert CODECS["hyperliquid"] is Hyperliquid
    assert VENUES["hyperliquid"].exchange == "hyperliquid"
    assert set(VENUES["hyperliquid"].demo_feed["channels"]) == set(ALL)  # type: ignore[arg-type]


def test_url_subscribe_messages_and_keepalive() -> None:
    c = codec(("BTC", "@107"), ("trades", "quotes", "book"))
    assert c.ws_url() == "wss://api.hyperliquid.xyz/ws"
    assert codec(url="ws://127.0.0.1:9").ws_url() == "ws://127.0.0.1:9/ws"
    subs = [orjson.loads(m) for m in c.subscribe_messages()]
    assert subs == [{"method": "subscribe", "subscription": {"type": t, "coin": coin}}
                    for coin in ("BTC", "@107") for t in ("l2Book", "trades", "bbo")]
    assert [orjson.loads(m)["subscription"]["type"] for m in codec().subscribe_messages()] \
        == ["l2Book", "trades", "bbo", "activeAssetCtx"]
    # The venue closes a connection that sent nothing for 60 s; its pong keeps us fresh.
    assert c.keepalive_message() == PING == '{"method":"ping"}'
    assert c.keepalive_interval_s == KEEPALIVE_S <= 30
    assert c.default_stale_after_s > 2 * KEEPALIVE_S
    assert c.ws_ping_interval_s is None
    n, window_s = c.connect_limit
    assert n * 60 / window_s <= 30   # at most 30 new connections a minute


def _cfg(**feed: Any) -> dict[str, Any]:
    base = {"name": "h", "exchange": "hyperliquid", "symbols": ["BTC"], "channels": list(ALL)}
    return {"storage": {"root": "/tmp/x"}, "feeds": [{**base, **feed}]}


def test_check_accepts_coins_and_offered_channels_only() -> None:
    parse_config(_cfg(symbols=["BTC", "ETH", "kPEPE", "xyz:TSLA"]))
    parse_config(_cfg(symbols=["@107", "PURR/USDC", "BTC"], channels=["trades", "quotes",
                                                                       "book"]))
    with pytest.raises(ConfigError) as e:
        parse_config(_cfg(channels=["trades", "liquidations"]))
    assert any("liquidations" in p for p in e.value.problems)
    with pytest.raises(ConfigError) as e:
        parse_config(_cfg(symbols=["@107", "BTC"]))   # derivatives for a spot coin
    assert any("'@107'" in p and "derivatives" in p for p in e.value.problems)
    with pytest.raises(ConfigError) as e:
        parse_config(_cfg(symbols=["BTC-USD", "../x", "btc usd"], trade_stream="x",
                          book_depth=20))
    problems = e.value.problems
    for sym in ("'BTC-USD'", "'../x'", "'btc usd'"):
        assert any(sym in p and "Hyperliquid coin" in p for p in problems), problems
    assert any("trade_stream: not used by hyperliquid" in p for p in problems)
    assert any("book_depth: not used by hyperliquid" in p for p in problems)
    with pytest.raises(ConfigError) as e:
        parse_config(_cfg(symbols=[f"C{i}" for i in range(251)]))   # 1004 subscriptions
    assert any("1004 subscriptions" in p for p in e.value.problems)
    parse_config(_cfg(symbols=[f"C{i}" for i in range(250)]))


# ---- goldens ---------------------------------------------------------------------------------
def test_trades_golden() -> None:
    c = codec()
    out = c.parse_batch(list(TRADES), TS, 1)
    assert out.rows("trades") == [
        ("BTC", 1739988506620_000_000, TS, 1, "951635025884506", "buy", 96221.0, 0.00016),
        ("BTC", 1751430933565_000_000, TS, 2, "293353986402527", "sell", 106296.0, 0.00017),
        ("BTC", 1790358604045_000_000, TS, 3, "437413095582311", "buy", 83770.0, 0.00819),
        ("BTC", 1790358606027_000_000, TS, 3, "784469253141982", "sell", 83769.0, 0.0048)]
    assert not out.rejects and not out.drops and not events(out)


def test_book_golden_each_push_is_a_snapshot_block() -> None:
    out = codec().parse(BOOK[0], TS, 7)
    rows = out.rows("book")
    assert len(rows) == 40
    assert {(r[3], r[4], r[8]) for r in rows} == {(7, True, None)}   # one block, no ids
    assert rows[0] == ("BTC", 1739988505821_000_000, TS, 7, True, "bid", 96220.0, 4.19382,
                       None)
    assert rows[20] == ("BTC", 1739988505821_000_000, TS, 7, True, "ask", 96221.0, 0.43765,
                        None)


def test_quote_golden() -> None:
    (row,) = codec().parse(BBO[0], TS, 1).rows("quotes")
    assert row == ("BTC", 1790358617881_000_000, TS, 1, 83757.0, 22.61305, 83758.0, 0.00016)


def test_derivatives_golden() -> None:
    (row,) = codec().parse(CTX[0], TS, 1).rows("derivatives")
    # mark = markPx, index = oraclePx, funding = funding (hourly), no predicted rate,
    # open interest in coins, no next funding time (the venue sends none) and no ts_event
    assert row == ("BTC", None, TS, 1, 83757.0, 83778.1, 0.0000125, None, 39338.76246, None)


def test_timestamps_are_exact_ns() -> None:
    big = derived(BBO[0], lambda d: d.update(time=9_223_372_036_854))   # the last ms in int64
    (row,) = codec().parse(big, TS, 1).rows("quotes")
    assert row[1] == 9_223_372_036_854_000_000
    assert codec().parse(derived(BBO[0], lambda d: d.update(time=9_223_372_036_855)),
                         TS, 1).error is not None


# ---- side and consistency checks on the recordings -----------------------------------------------
def test_trade_side_is_the_takers_checked_against_the_book() -> None:
    """The 2025-02-19 capture: a `B` trade 0.8 s after an l2Book printed at its best ask -
    a buyer lifting the offer. "B" is the buy taker."""
    book, trade = json.loads(BOOK[0])["data"], json.loads(TRADES[0])["data"][0]
    assert 0 < trade["time"] - book["time"] < 1000
    best_bid, best_ask = book["levels"][0][0]["px"], book["levels"][1][0]["px"]
    assert trade["side"] == "B" and trade["px"] == best_ask != best_bid
    (row,) = codec().parse(TRADES[0], TS, 1).rows("trades")
    assert row[5] == "buy" and row[6] == float(best_ask)
    # Unknown side letters are kept as unknown, never guessed.
    odd = derived(TRADES[0], lambda d: d[0].update(side="X"))
    assert codec().parse(odd, TS, 1).rows("trades")[0][5] == "unknown"


def test_testnet_bbo_equals_the_book_top_that_follows_it() -> None:
    """The testnet capture: the bbo between two l2Book pushes shows the touch move the
    next push confirms (63460 gone); quotes and book rows agree."""
    c = codec()
    c.parse(T_BOOK_1, TS, 1)
    (q,) = c.parse(T_BBO, TS, 2).rows("quotes")
    rows = c.parse(T_BOOK_3, TS, 3).rows("book")
    bids = [(r[6], r[7]) for r in rows if r[5] == "bid"]
    asks = [(r[6], r[7]) for r in rows if r[5] == "ask"]
    assert q[4:] == (*bids[0], *asks[0]) == (63457.0, 0.00028, 63488.0, 0.01246)


def test_every_recorded_book_rebuilds_to_its_frame() -> None:
    c = codec()
    rows: list[tuple[Any, ...]] = []
    for seq, frame in enumerate((*BOOK, T_BOOK_1, T_BOOK_3), 1):
        out = c.parse(frame, TS, seq)
        assert out.error is None
        block = out.rows("book")
        assert block and all(r[4] and r[3] == seq for r in block)
        rows += block
        # After each push, the book a reader rebuilds from the table is that push.
        assert rebuild_books(rows) == {"BTC": frame_book(frame)}


def test_an_empty_side_and_zero_sizes() -> None:
    c = codec()
    one_sided = derived(BOOK[0], lambda d: d["levels"][1].clear())
    rows = c.parse(one_sided, TS, 1).rows("book")
    assert len(rows) == 20 and {r[5] for r in rows} == {"bid"}
    zero = derived(BOOK[1], lambda d: d["levels"][0][0].update(sz="0.0"))
    rows = c.parse(zero, TS, 2).rows("book")
    assert len(rows) == 39 and 106217.0 not in [r[6] for r in rows]
    empty = derived(BOOK[2], lambda d: d.update(levels=[[], []]))
    out = c.parse(empty, TS, 3)
    assert not out.rows("book") and [e[5] for e in events(out)] == ["empty_snapshot"]
    no_bid = derived(BBO[0], lambda d: d["bbo"].__setitem__(0, None))
    assert c.parse(no_bid, TS, 4).rows("quotes")[0][4:] == (None, None, 83758.0, 0.00016)


def test_older_pushes_are_dropped_as_stale() -> None:
    c = codec()
    assert c.parse(BOOK[1], TS, 1).rows("book")
    old = c.parse(BOOK[0], TS, 2)          # recorded earlier: the overlap of a rotation
    assert not old.rows("book") and old.drops == {DROP_STALE_BOOK: 1}
    assert c.parse(BOOK[1], TS, 3).rows("book")   # the same time again is kept
    c.parse(BBO[0], TS, 4)
    assert codec().parse(T_BBO, TS, 5).rows("quotes")
    assert c.parse(T_BBO, TS, 5).drops == {"stale_quote": 1}


# ---- de-duplication --------------------------------------------------------------------------
def test_replayed_trades_on_resubscribe_are_dropped() -> None:
    """Hyperliquid replays recent fills on every (re)subscribe; `tid`s are not ordered,
    so each is kept exactly once whatever the order."""
    c = codec()
    first = c.parse_batch([*TRADES, T_TRADES], TS, 1)
    assert len(first.rows("trades")) == 6
    c.on_connect()
    again = c.parse_batch([T_TRADES, *reversed(TRADES)], TS, 10)
    assert not again.rows("trades") and again.drops == {DROP_DUPLICATE_TRADE: 6}
    assert not events(again)   # unordered ids are neither gaps nor out of order
    # A frame holding one new fill among replayed ones keeps only the new one.
    mixed = derived(TRADES[2], lambda d: d[1].update(tid=5))
    (row,) = c.parse(mixed, TS, 20).rows("trades")
    assert row[4] == "5"


def test_the_id_window_is_bounded_and_holds_a_replay() -> None:
    """Memory stays bounded (the last TRADE_ID_WINDOW ids per coin), and a replay of the
    most recent fills - what a resubscribe sends - is still caught after a long run."""
    c = codec()
    fills = [{"coin": "BTC", "side": "B", "px": "1.5", "sz": "2", "time": 1, "tid": tid}
             for tid in range(10 * TRADE_ID_WINDOW, 0, -7)]   # unordered-looking ids
    for i in range(0, len(fills), 50):
        c.parse(orjson.dumps({"channel": "trades", "data": fills[i:i + 50]}), TS, i)
    state = c.state()["parts"]["trades"]["opaque"]["BTC"]
    assert len(state) <= TRADE_ID_WINDOW
    replay = c.parse(orjson.dumps({"channel": "trades", "data": fills[-30:]}), TS, 10**6)
    assert not replay.rows("trades") and replay.drops == {DROP_DUPLICATE_TRADE: 30}


def test_rows_of_coins_not_subscribed_are_dropped() -> None:
    c = codec(("ETH",))
    for seq, f in enumerate((*BOOK[:1], *TRADES[:1], *BBO, *CTX), 1):
        out = c.parse(f, TS, seq)
        assert not out.has_rows and out.drops == {DROP_UNSUBSCRIBED: 1}
    only_trades = codec(channels=("trades",))
    assert only_trades.parse(BOOK[0], TS, 1).drops == {DROP_UNSUBSCRIBED: 1}


# ---- control frames --------------------------------------------------------------------------
def test_control_frames() -> None:
    c = codec()
    for seq, ack in enumerate((*ACKS, T_ACK), 1):
        (ev,) = events(c.parse(ack, TS, seq))
        assert ev[0] == "BTC" and ev[5] == EV_SUBSCRIBED
    assert events(c.parse(T_ACK, TS, 1))[0][6] == "bbo BTC"
    pong = c.parse(T_PONG, TS, 5)
    assert not pong.has_rows and pong.unknown == 0 and pong.error is None
    (ev,) = events(c.parse(T_ERROR, TS, 6))
    assert ev[0] == "BTC" and ev[5] == EV_REFUSED and "noSuchType" in ev[6]
    # Derived from the recorded shape: an error about something else is a venue error.
    (ev,) = events(c.parse(b'{"channel":"error","data":"Websocket error"}', TS, 7))
    assert ev[0] is None and ev[5] == EV_ERROR
    unsub = derived(ACKS[0], lambda d: d.update(method="unsubscribe"))
    out = c.parse(unsub, TS, 8)
    assert not out.has_rows and out.unknown == 0
    for f in CANDLE:   # a valid channel this codec does not handle: counted, no rows
        out = c.parse(f, TS, 9)
        assert out.unknown == 1 and not out.has_rows and out.error is None


def test_a_bad_frame_in_a_batch_keeps_its_neighbours_and_touches_no_state() -> None:
    c = codec()
    bad_trade = derived(T_TRADES, lambda d: d[1].update(px="-1"))   # 1st fill is fine
    out = c.parse_batch([TRADES[0], bad_trade, TRADES[1], b"\x00garbage", BBO[0]], TS, 1)
    assert [r[3] for r in out.rows("trades")] == [1, 3]
    assert [i for i, _ in out.rejects or []] == [1, 3]
    assert len(out.rows("quotes")) == 1
    # The rejected frame recorded no id: its good fill is stored when it comes whole.
    assert len(c.parse(T_TRADES, TS, 9).rows("trades")) == 2
    bad_book = derived(BOOK[3], lambda d: d["levels"][1][5].update(px="nan"))
    assert c.parse(bad_book, TS, 10).error is not None
    assert c.parse(BOOK[2], TS, 11).rows("book")   # older than the rejected one: kept


# ---- state -----------------------------------------------------------------------------------
def _busy() -> Hyperliquid:
    c = codec()
    c.parse_batch([*BOOK, *TRADES, *BBO, *CTX, T_TRADES], TS, 1)
    return c


def test_state_round_trips_as_json_and_everything_continues() -> None:
    c = _busy()
    c2 = codec()
    c2.restore(orjson.loads(orjson.dumps(c.state())))
    assert c2.state() == c.state()
    again = c2.parse_batch([*TRADES, T_TRADES, BOOK[0], BBO[0]], TS, 100)
    assert not again.rows("trades") and not again.rows("book")
    assert again.drops == {DROP_DUPLICATE_TRADE: 6, DROP_STALE_BOOK: 1}
    assert again.rows("quotes")   # the same time again is kept
    # Derivatives carry on from the restored values.
    no_oi = derived(CTX[0], lambda d: d["ctx"].pop("openInterest"))
    (row,) = c2.parse(no_oi, TS, 200).rows("derivatives")
    assert row[8] == 39338.76246


@pytest.mark.parametrize("spoil", [
    lambda s: None,
    lambda s: {**s, "v": 99},
    lambda s: {**s, "exchange": "gate"},
    lambda s: {**s, "parts": "x"},
    lambda s: {**s, "parts": {**s["parts"], "trades": [1]}},
    lambda s: {**s, "parts": {**s["parts"], "trades": {"opaque": {"BTC": [1]}}}},
    lambda s: {**s, "parts": {**s["parts"], "times": {"book": {}}}},
    lambda s: {**s, "parts": {**s["parts"], "times": {"book": {"BTC": -1}, "quotes": {}}}},
    lambda s: {**s, "parts": {**s["parts"], "times": {"book": {"BTC": 1.5}, "quotes": {}}}},
    lambda s: {**s, "parts": {**s["parts"], "derivs": {"BTC": [1, 2]}}},
    lambda s: {**s, "parts": {**s["parts"], "derivs": {"BTC": ["x"] * 6}}},
])
def test_restore_refuses_garbage_and_other_versions(spoil: Any) -> None:
    state = orjson.loads(orjson.dumps(_busy().state()))
    codec().restore(state)   # unspoiled: fine
    with pytest.raises(StateError):
        codec().restore(spoil(state))


# ---- properties ------------------------------------------------------------------------------
def _valid(table: str, r: tuple[Any, ...]) -> bool:
    def num(v: Any, lo: float, strict: bool = False) -> bool:
        return isinstance(v, float) and math.isfinite(v) and (v > lo if strict else v >= lo)

    if len(r) != ROW_WIDTH[table] or type(r[2]) is not int or type(r[3]) is not int:
        return False
    if r[1] is not None and not (type(r[1]) is int and 0 <= r[1] < 2**63):
        return False
    if table == "trades":
        return (r[0] == "BTC" and type(r[4]) is str and r[5] in ("buy", "sell", "unknown")
                and num(r[6], 0, True) and num(r[7], 0))
    if table == "quotes":
        return all((px is None) == (sz is None) and (px is None or (num(px, 0, True)
                                                                    and num(sz, 0)))
                   for px, sz in ((r[4], r[5]), (r[6], r[7])))
    if table == "book":
        return (r[4] is True and r[5] in ("bid", "ask") and num(r[6], 0, True)
                and num(r[7], 0, True) and r[8] is None)
    if table == "derivatives":
        return (all(v is None or (isinstance(v, float) and math.isfinite(v)) for v in r[4:9])
                and r[7] is None and r[9] is None)
    return type(r[4]) is str and type(r[5]) is str and (r[6] is None or type(r[6]) is str)


def _check(out: Output) -> None:
    assert not (out.error or "").startswith("codec_error"), out.error
    for table in ("trades", "quotes", "book", "events", "derivatives", "liquidations"):
        for r in out.rows(table):
            assert _valid(table, r), (table, r)
    if out.error is not None:
        assert not out.has_rows


ALL_FRAMES = [*BOOK, *TRADES, *BBO, *CTX, *ACKS, *CANDLE, *TESTNET]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blob=st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(blob: bytes) -> None:
    _check(codec().parse(blob, TS, 1))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(idx=st.integers(0, len(ALL_FRAMES) - 1),
       path=st.lists(st.integers(0, 60), min_size=1, max_size=5),
       value=st.one_of(st.just(...), st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                       st.floats(allow_nan=True), st.text(max_size=8),
                       st.sampled_from(["B", "A", "BTC", "ETH", "0", "-1", "1e400", "nan",
                                        "l2Book", "bbo", "trades", "error", "pong",
                                        "subscribe"]),
                       st.lists(st.floats(), max_size=3),
                       st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)))
def test_mutated_real_frames_never_raise_or_emit_bad_rows(idx: int, path: list[int],
                                                          value: Any) -> None:
    c = codec()
    # json, not orjson: the mutation may hold integers beyond 64 bits, as a venue could send
    mutated = json.dumps(mutate_json(orjson.loads(ALL_FRAMES[idx]), path, value)).encode()
    for seq in (1, 2):   # twice: the state the first left must not break the second
        _check(c.parse(mutated, TS, seq))


# ---- the simulator and the daemon ------------------------------------------------------------
async def test_simulated_venue_acks_serves_and_answers_pings() -> None:
    from websockets.asyncio.client import connect

    async with SimServer("hyperliquid") as sim, connect(sim.url + "/ws") as ws:
        await ws.send('{"method":"ping"}')
        assert await ws.recv(decode=False) == T_PONG
        await ws.send('{"method":"subscribe","subscription":{"type":"l2Book","coin":"BTC"}}')
        assert await ws.recv(decode=False) == ACKS[0]              # the recorded ack
        served = [await ws.recv(decode=False) for _ in range(6)]
        # byte for byte, in venue-time order (mainnet 2025, then the 2026 testnet pushes)
        assert served == [*BOOK, T_BOOK_1, T_BOOK_3]
        await ws.send('{"method":"subscribe","subscription":{"type":"noSuchType",'
                      '"coin":"BTC"}}')
        err = orjson.loads(await ws.recv())
        assert err["channel"] == "error" and "noSuchType" in err["data"]
        await ws.send('{"method":"subscribe","subscription":{"type":"l2Book","coin":"BTC"}}')
        assert "Already subscribed" in orjson.loads(await ws.recv())["data"]
        await ws.send('{"method":"subscribe","subscription":{"type":"trades","coin":"ETH"}}')
        ack = orjson.loads(await ws.recv())
        assert ack == {"channel": "subscriptionResponse", "data": {
            "method": "subscribe", "subscription": {"type": "trades", "coin": "ETH"}}}


N_DATA = len(BOOK) + 2 + len(TRADES) + 1 + len(BBO) + 1 + len(CTX)


async def test_daemon_lands_every_table_of_what_the_venue_served(root: Path) -> None:
    async with SimServer("hyperliquid", rate_msgs_s=3000) as sim:
        feed = feed_for(sim, **VENUES["hyperliquid"].demo_feed)
        cfg = make_config(root, [feed])

        def done(d: Any) -> bool:
            st_ = d.feed_stats.get(feed["name"])
            return st_ is not None and len(sim.sent) == N_DATA and st_.messages >= N_DATA + 4

        daemon = await run_daemon(cfg, done, timeout_s=20, settle_s=0.3)
    st_ = daemon.feed_stats[feed["name"]]
    assert st_.parse_errors == {} and st_.unknown_messages == 0 and not st_.drops
    assert st_.reconnects == 0
    trades = read_table(root, "trades")
    assert sorted(trades.select("trade_id", "side", "price").iter_rows()) == sorted([
        ("951635025884506", "buy", 96221.0), ("293353986402527", "sell", 106296.0),
        ("437413095582311", "buy", 83770.0), ("784469253141982", "sell", 83769.0),
        ("447757798903687", "buy", 63719.0), ("355416041315622", "buy", 63530.0)])
    assert read_table(root, "quotes").height == 2
    book = read_table(root, "book")
    assert book["is_snapshot"].all() and book["recv_seq"].n_unique() == 6
    rows = list(book.select("symbol", pl.col("ts_event").dt.epoch("ns"), "ts_recv",
                            "recv_seq", "is_snapshot", "side", "price", "amount",
                            "update_id").iter_rows())
    assert rebuild_books(rows) == {"BTC": frame_book(T_BOOK_3)}   # the latest push
    deriv = read_table(root, "derivatives")
    assert deriv.select("mark_price", "index_price", "funding_rate",
                        "open_interest").row(0) == (83757.0, 83778.1, 0.0000125, 39338.76246)
    ev = read_table(root, "events")
    assert ev.filter(pl.col("event") == EV_SUBSCRIBED).height == 4


async def test_daemon_keeps_each_trade_once_across_a_reconnect_replay(root: Path) -> None:
    """The first connection is cut after 8 frames; the second subscription replays every
    recorded frame again (as Hyperliquid replays recent fills): each trade lands once,
    older book and quote pushes are dropped, and the book still ends at the latest push."""
    async with SimServer("hyperliquid", rate_msgs_s=2000,
                         faults=Faults(close_every_n_frames=8, only_first_n=1)) as sim:
        feed = feed_for(sim, reconnect_min_delay_s=0.05, reconnect_max_delay_s=0.1,
                        **VENUES["hyperliquid"].demo_feed)
        cfg = make_config(root, [feed])

        def done(d: Any) -> bool:
            st_ = d.feed_stats.get(feed["name"])
            by_conn = sim.sent_by_conn()
            return (st_ is not None and len(by_conn.get(2, [])) == N_DATA
                    and st_.messages >= len(sim.sent) + 8)

        daemon = await run_daemon(cfg, done, timeout_s=30, settle_s=0.3)
    st_ = daemon.feed_stats[feed["name"]]
    assert st_.reconnects == 1 and st_.parse_errors == {}
    first = sim.sent_by_conn()[1]
    replayed_trades = sum(len(orjson.loads(f)["data"]) for f in first
                          if f.startswith(b'{"channel":"trades"'))
    assert st_.drops.get(DROP_DUPLICATE_TRADE, 0) == replayed_trades
    trades = read_table(root, "trades")
    assert trades.height == 6 and trades["trade_id"].n_unique() == 6
    book = read_table(root, "book")
    rows = list(book.select("symbol", pl.col("ts_event").dt.epoch("ns"), "ts_recv",
                            "recv_seq", "is_snapshot", "side", "price", "amount",
                            "update_id").iter_rows())
    assert rebuild_books(rows) == {"BTC": frame_book(T_BOOK_3)}
