"""Registry of simulated venues: contract exchange id -> Venue class."""

from __future__ import annotations

from ingestd.sim.venues.base import Venue
from ingestd.sim.venues.binance import BinanceSpotVenue, BinanceUsdmVenue
from ingestd.sim.venues.bitstamp import BitstampVenue
from ingestd.sim.venues.bybit import BybitLinearVenue, BybitSpotVenue
from ingestd.sim.venues.coinbase import CoinbaseVenue
from ingestd.sim.venues.deribit import DeribitVenue
from ingestd.sim.venues.gate import GateVenue
from ingestd.sim.venues.hyperliquid import HyperliquidVenue
from ingestd.sim.venues.kraken import KrakenVenue
from ingestd.sim.venues.kucoin import KucoinVenue
from ingestd.sim.venues.okx import OkxVenue

VENUES: dict[str, type[Venue]] = {
    cls.exchange: cls
    for cls in (
        BinanceSpotVenue,
        BinanceUsdmVenue,
        BitstampVenue,
        BybitSpotVenue,
        BybitLinearVenue,
        CoinbaseVenue,
        DeribitVenue,
        GateVenue,
        HyperliquidVenue,
        KrakenVenue,
        KucoinVenue,
        OkxVenue,
    )
}

__all__ = ["VENUES", "Venue"]
