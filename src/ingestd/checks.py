"""Config loading for a config that is to run: the generic checks of `ingestd.config`
plus the venue checks of the exchange codec registry, every problem reported at once.

Owns: `VENUES` (the codec registry as `config.VenueRules`: known exchanges, each codec's
`check_feed`) and `load_config` / `parse_config`, which every place that loads a config
for running (`ingestd --config`, `ingestd check`, the demo, SIGHUP reload) calls.

Why a module of its own: the codecs import `ingestd.config` (for `FeedConfig`), so the
config module cannot import the codecs without an import cycle; this module imports both.

Must not: hold checks of its own (generic ones live in config.py, venue ones in each
codec's `check_feed`), open sockets, create directories or pick exit codes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ingestd import config
from ingestd.config import Config, FeedConfig, VenueRules
from ingestd.exchanges import CODECS


def _check_feed(feed: FeedConfig) -> Iterable[str]:
    codec = CODECS[feed.exchange]
    offered = codec.CHANNELS
    for channel in feed.channels:
        if channel not in offered:
            yield (f"channels: {feed.exchange} does not offer {channel!r} "
                   f"(it offers {', '.join(offered)})")
    yield from codec.check_feed(feed)


VENUES = VenueRules(exchanges=CODECS.keys(), check_feed=_check_feed)


def parse_config(data: Mapping[str, Any], source: str = "<memory>") -> Config:
    """Validate a decoded TOML document, venue checks included; raise ConfigError
    listing every problem."""
    return config.parse_config(data, source=source, venues=VENUES)


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file, venue checks included; raise ConfigError
    listing every problem."""
    return config.load_config(path, venues=VENUES)
