"""Registry of exchange codecs: contract exchange id -> codec class.

Owns: the mapping used by config validation, the reader and the simulator.
Must not: hold any state or import anything that does I/O.
"""

from __future__ import annotations

from ingestd.exchanges.base import Codec
from ingestd.exchanges.binance import BinanceSpot, BinanceUsdm
from ingestd.exchanges.bybit import BybitLinear, BybitSpot
from ingestd.exchanges.coinbase import Coinbase
from ingestd.exchanges.kraken import Kraken
from ingestd.exchanges.okx import Okx

CODECS: dict[str, type[Codec]] = {
    cls.exchange: cls
    for cls in (
        BinanceSpot,
        BinanceUsdm,
        BybitSpot,
        BybitLinear,
        Coinbase,
        Kraken,
        Okx,
    )
}

__all__ = ["CODECS", "Codec"]
