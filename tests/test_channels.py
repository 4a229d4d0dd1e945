"""`ingestd check` rejects a channel a venue does not offer, naming it; the derivatives
and liquidations tables have their contract schemas and latest-value rows."""

from __future__ import annotations

import pytest

from ingestd.checks import parse_config
from ingestd.config import ConfigError
from ingestd.exchanges.base import Output
from ingestd.exchanges.derivs import LatestValues
from ingestd.schema import SCHEMAS


def test_a_channel_the_venue_does_not_offer_is_a_config_error_naming_it() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"storage": {"root": "/x"}, "feeds": [
            {"name": "k", "exchange": "kraken", "symbols": ["BTC/USD"],
             "channels": ["trades", "liquidations"]}]})
    (problem,) = e.value.problems
    assert "channels" in problem and "liquidations" in problem and "kraken" in problem
    with pytest.raises(ConfigError):
        parse_config({"storage": {"root": "/x"}, "feeds": [
            {"name": "k", "exchange": "kraken", "symbols": ["BTC/USD"],
             "channels": ["funding"]}]})


def test_derivatives_rows_carry_the_latest_values_forward() -> None:
    latest = LatestValues()
    out = Output("f", "bybit-linear")
    latest.update(out, "BTCUSDT", 1, 10, 100, mark_price=50_000.0, funding_rate=0.0001,
                  next_funding_time=1_700_000_000_000_000_000)
    latest.update(out, "BTCUSDT", 2, 11, 101, mark_price=50_001.0)   # a delta: mark only
    latest.update(out, "ETHUSDT", 3, 12, 102, open_interest=7.5)
    rows = out.rows("derivatives")
    assert rows[1] == ("BTCUSDT", 2, 11, 101, 50_001.0, None, 0.0001, None, None,
                       1_700_000_000_000_000_000)
    assert rows[2] == ("ETHUSDT", 3, 12, 102, None, None, None, None, 7.5, None)
    restored = LatestValues()
    restored.restore(latest.state())
    assert restored.get("BTCUSDT") == latest.get("BTCUSDT")
    assert out.derivatives is not None
    table = out.derivatives.to_arrow("bybit-linear")
    assert table.schema == SCHEMAS["derivatives"]
    assert SCHEMAS["liquidations"].names[-4:] == ["side", "price", "amount", "order_id"]
