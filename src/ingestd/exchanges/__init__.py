"""Registry of exchange codecs: contract exchange id -> codec class.

Owns: the mapping used by config validation, the reader and the simulator.
Must not: hold any state or import anything that does I/O.
"""

from __future__ import annotations

from typing import Any

from ingestd.config import FeedConfig
from ingestd.exchanges.base import Codec, StateError
from ingestd.exchanges.binance import BinanceSpot, BinanceUsdm
from ingestd.exchanges.bitstamp import Bitstamp
from ingestd.exchanges.bybit import BybitLinear, BybitSpot
from ingestd.exchanges.coinbase import Coinbase
from ingestd.exchanges.deribit import Deribit
from ingestd.exchanges.gate import Gate
from ingestd.exchanges.hyperliquid import Hyperliquid
from ingestd.exchanges.kraken import Kraken
from ingestd.exchanges.kucoin import Kucoin
from ingestd.exchanges.okx import Okx

CODECS: dict[str, type[Codec]] = {
    cls.exchange: cls
    for cls in (
        BinanceSpot,
        BinanceUsdm,
        Bitstamp,
        BybitSpot,
        BybitLinear,
        Coinbase,
        Deribit,
        Gate,
        Hyperliquid,
        Kraken,
        Kucoin,
        Okx,
    )
}



def make_codec(feed: FeedConfig, state: Any = None) -> tuple[Codec, str | None]:
    """A codec for `feed`, seeded with a saved `state()` if one is given. A state it
    cannot take (older version, another venue, corrupt) is not fatal: the codec starts
    fresh and the reason is returned for the caller to log."""
    codec = CODECS[feed.exchange](feed)
    if state is None:
        return codec, None
    try:
        codec.restore(state)
    except StateError as e:
        return CODECS[feed.exchange](feed), str(e)
    return codec, None


__all__ = ["CODECS", "Codec", "make_codec"]
