"""Typed, frozen configuration loaded from TOML; every problem reported at once.

Owns: the config shape of the contract (sections, keys, types, defaults, bounds), the
checks across keys (unique feed names, channels, URLs), `ConfigError`, and the
`VenueRules` interface through which venue checks (known exchanges, each codec's
`check_feed`) are run when the caller passes them in.

Must not: import the exchange codecs (they import this module: `ingestd.checks` joins the
two and is what loads a config for running or `ingestd check`), open sockets, create
directories or pick exit codes (cli.py does that).

Validation goes key by key with msgspec so that `ingestd check` lists every problem in
the file, each as `<file>: <key>: <what is wrong>`, instead of stopping at the first.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

import msgspec

CHANNELS = ("trades", "quotes", "book", "derivatives", "liquidations")
Channel = Literal["trades", "quotes", "book", "derivatives", "liquidations"]

PosFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]
PosInt = Annotated[int, msgspec.Meta(gt=0)]


class ConfigError(Exception):
    """An invalid config: `problems` holds one line per problem (file, key, what)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class StorageConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    root: str
    flush_interval_s: PosFloat = 1.0
    # Rows buffered per table and partition before a flush regardless of age.
    flush_max_rows: PosInt = 200_000
    compression: Literal["zstd", "snappy", "lz4", "gzip", "none"] = "zstd"
    # "parquet": Hive-partitioned files; "delta": one Delta Lake table per table.
    format: Literal["parquet", "delta"] = "parquet"
    # Unit of every timestamp column; "delta" implies "us" (Spark and Delta read only us).
    timestamp_unit: Literal["ns", "us"] = "ns"
    # Journal, staging, state and kept raw frames (default: root, when root is local);
    # required for an object-store root.
    local_dir: str | None = None
    # Object-store client settings (endpoint_url, region, allow_http, ...); never
    # credentials: those come from the store's standard environment.
    options: dict[str, str | bool | int] = {}

    @property
    def is_remote(self) -> bool:
        """True when root is an object-store URI (s3://, gs://, abfs://...)."""
        return "://" in self.root and not self.root.startswith("file://")

    @property
    def effective_unit(self) -> Literal["ns", "us"]:
        return "us" if self.format == "delta" else self.timestamp_unit

    @property
    def local_path(self) -> str:
        """Where the journal, staging, state and kept raw frames live."""
        if self.local_dir is not None:
            return self.local_dir
        return self.root.removeprefix("file://")


class JournalConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    enabled: bool = True
    fsync_interval_s: PosFloat = 0.2
    # A new segment (starting with a checkpoint of every codec) after this long or size.
    segment_max_s: PosFloat = 300.0
    segment_max_bytes: PosInt = 256 * 1024 * 1024
    # Bytes appended but not yet durable before intake follows `queue.when_full`.
    max_pending_bytes: PosInt = 256 * 1024 * 1024
    # Keep committed segments (the raw frames) this many days under <root>/.raw/ for
    # `ingestd replay` (0: delete them once committed), within a size cap (oldest first).
    keep_raw_days: NonNegFloat = 0.0
    keep_raw_max_bytes: PosInt = 16 * 1024**3


class QueueConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    capacity: PosInt = 100_000
    when_full: Literal["block", "drop_newest"] = "block"


class ServiceConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    shutdown_timeout_s: PosFloat = 10.0
    # Worker processes that share out the feeds; "auto" = one per core.
    workers: PosInt | Literal["auto"] = 1


class HealthConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    listen: str = "127.0.0.1:8080"


class LogConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


class FeedConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    exchange: str
    symbols: tuple[str, ...]
    channels: tuple[Channel, ...]
    url: str | None = None
    rest_url: str | None = None
    stale_after_s: PosFloat | None = None
    reconnect_min_delay_s: PosFloat = 0.5
    reconnect_max_delay_s: PosFloat = 30.0
    breaker_failures: PosInt = 5
    breaker_cooldown_s: PosFloat = 30.0
    rotate_after_s: PosFloat | None = None
    max_frame_bytes: PosInt = 16 * 1024 * 1024
    # Total deadline of one REST snapshot fetch (connect, request, whole body).
    rest_timeout_s: PosFloat = 10.0
    # A session shorter than this is a failure (no backoff reset; counts for the breaker).
    healthy_session_s: PosFloat = 10.0
    # Venue-specific choices; each codec documents and validates the values it accepts.
    trade_stream: str | None = None
    book_depth: PosInt | None = None
    # Seconds between two REST polls of one symbol, for values a venue has no stream for
    # (binance-usdm open interest, default 10); venues that poll nothing reject it.
    poll_interval_s: Annotated[float, msgspec.Meta(ge=0.5, le=3600.0)] | None = None


class Config(msgspec.Struct, frozen=True):
    storage: StorageConfig
    journal: JournalConfig
    queue: QueueConfig
    service: ServiceConfig
    health: HealthConfig
    log: LogConfig
    feeds: tuple[FeedConfig, ...]
    source: str = "<memory>"

    def feed(self, name: str) -> FeedConfig:
        for f in self.feeds:
            if f.name == name:
                return f
        raise KeyError(name)


@dataclass(frozen=True, slots=True)
class VenueRules:
    """The venue checks of a feed: which exchanges exist, and each one's own checks of a
    feed (problems as `<key>: <what is wrong>`; called only for a known exchange)."""

    exchanges: Collection[str]
    check_feed: Callable[[FeedConfig], Iterable[str]]


S = TypeVar("S", bound=msgspec.Struct)

_SECTIONS: dict[str, type[msgspec.Struct]] = {
    "storage": StorageConfig,
    "journal": JournalConfig,
    "queue": QueueConfig,
    "service": ServiceConfig,
    "health": HealthConfig,
    "log": LogConfig,
}


def _describe(err: msgspec.ValidationError) -> str:
    # msgspec says e.g. "Expected `float` >= 0.0, got `-1` - at `$[0]`"; drop the locator.
    text = str(err)
    return text.split(" - at `", 1)[0]


def _convert_struct(kind: type[S], raw: Any, where: str, problems: list[str]) -> S | None:
    """Check `raw` against `kind` field by field, appending one line per problem."""
    if not isinstance(raw, Mapping):
        problems.append(f"{where}: expected a table, got {type(raw).__name__}")
        return None
    fields = {f.name: f for f in msgspec.structs.fields(kind)}
    for key in raw:
        if key not in fields:
            known = ", ".join(sorted(fields))
            problems.append(f"{where}.{key}: unknown key (known keys: {known})")
    values: dict[str, Any] = {}
    ok = True
    for name, field in fields.items():
        if name not in raw:
            if field.required:
                problems.append(f"{where}.{name}: required key is missing")
                ok = False
            continue
        try:
            values[name] = msgspec.convert(raw[name], field.type, strict=True)
        except msgspec.ValidationError as e:
            problems.append(f"{where}.{name}: {_describe(e)}")
            ok = False
    if not ok:
        return None
    return kind(**values)


def _check_listen(listen: str) -> str | None:
    host, sep, port = listen.rpartition(":")
    if not sep or not host:
        return "expected HOST:PORT, e.g. 127.0.0.1:8080"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        return f"port {port!r} is not a number in 0..65535"
    return None


def _check_url(url: str, schemes: tuple[str, ...]) -> str | None:
    """Why no connection can use `url` (None: it can): the scheme, a host that can be
    looked up, a port in 1..65535 - what the transports would otherwise fail on at run
    time (or, for port 0, silently replace with the scheme's default port)."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in schemes:
        return "must start with " + " or ".join(f"{s}://" for s in schemes)
    try:
        parts = urlsplit(url)
    except ValueError as e:
        return f"is not a valid URL: {e}"
    host = parts.hostname
    if not host:
        return "has no host"
    if not host.startswith("[") and ":" not in host:  # a name or IPv4 address
        try:
            host.encode("idna")
        except UnicodeError:
            return f"host {host!r} is not a valid host name"
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        text = parts.netloc.rpartition(":")[2]
        return f"port {text!r} is not a number in 1..65535"
    return None


_REMOTE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "az")
# Option keys that would put a secret into the config file (and from there into logs).
_CREDENTIAL_OPTIONS = ("access_key", "secret", "session_token", "password", "token",
                       "account_key", "sas", "client_secret")


# What the object-store layer reads from `[storage.options]` (sink/objstore.py, delta.py).
_STORE_OPTIONS = frozenset({"endpoint_url", "region", "allow_http", "connect_timeout_s",
                            "request_timeout_s", "upload_concurrency"})
# delta-rs' own object-store keys, passed through as they are with format = "delta"
# (its per-store prefixes and the HTTP client's options).
_DELTA_PASS_THROUGH = ("aws_", "azure_", "google_", "conditional_put", "timeout",
                       "connect_timeout", "pool_idle_timeout", "pool_max_idle_per_host",
                       "allow_invalid_certificates", "proxy_url", "user_agent", "http2_only")


def _check_storage(storage: StorageConfig) -> list[str]:
    problems: list[str] = []
    if storage.is_remote:
        scheme = storage.root.split("://", 1)[0]
        if scheme not in _REMOTE_SCHEMES:
            known = ", ".join(f"{s}://" for s in _REMOTE_SCHEMES)
            problems.append(f"storage.root: {storage.root!r}: unknown scheme {scheme!r} "
                            f"(a local directory, or {known})")
        elif not storage.root.split("://", 1)[1].strip("/"):
            problems.append(f"storage.root: {storage.root!r} names no bucket")
        if storage.local_dir is None:
            problems.append("storage.local_dir: required when storage.root is an object "
                            "store (the journal, staging and state stay on local disk)")
    if storage.local_dir is not None and "://" in storage.local_dir:
        problems.append(f"storage.local_dir: {storage.local_dir!r} must be a local directory")
    for key in storage.options:
        is_known = key in _STORE_OPTIONS or (
            storage.format == "delta" and key.lower().startswith(_DELTA_PASS_THROUGH))
        if not is_known and not any(word in key.lower() for word in _CREDENTIAL_OPTIONS):
            names = ", ".join(sorted(_STORE_OPTIONS))
            extra = ""
            if storage.format == "delta":
                extra = ("; with format = \"delta\" also delta-rs keys (aws_*, azure_*, "
                         "google_*, conditional_put, timeout, connect_timeout, ...)")
            problems.append(f"storage.options.{key}: unknown option (known: {names}{extra})")
        if any(word in key.lower() for word in _CREDENTIAL_OPTIONS):
            problems.append(f"storage.options.{key}: credentials are never read from the "
                            "config; set them in the store's standard environment "
                            "(e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")
    return problems


def _check_feed(feed: FeedConfig, where: str, problems: list[str],
                venues: VenueRules | None) -> None:
    known_exchange = venues is not None and feed.exchange in venues.exchanges
    if venues is not None and not known_exchange:
        known = ", ".join(sorted(venues.exchanges))
        problems.append(f"{where}.exchange: unknown exchange {feed.exchange!r} (known: {known})")
    if not feed.name or not feed.name.replace("-", "").replace("_", "").isalnum():
        problems.append(f"{where}.name: {feed.name!r} must be non-empty letters, digits, - or _")
    if not feed.symbols:
        problems.append(f"{where}.symbols: at least one symbol is required")
    if len(set(feed.symbols)) != len(feed.symbols):
        problems.append(f"{where}.symbols: duplicate symbols")
    for sym in feed.symbols:
        if not sym or len(sym) > 64 or not sym.isprintable() or any(c.isspace() for c in sym):
            problems.append(f"{where}.symbols: {sym!r} is not a valid symbol")
    if not feed.channels:
        problems.append(f"{where}.channels: at least one channel is required")
    if len(set(feed.channels)) != len(feed.channels):
        problems.append(f"{where}.channels: duplicate channels")
    for key in ("url", "rest_url"):
        value = getattr(feed, key)
        if value is None:
            continue
        bad = _check_url(value, ("ws", "wss") if key == "url" else ("http", "https"))
        if bad:
            problems.append(f"{where}.{key}: {value!r} {bad}")
    if feed.reconnect_min_delay_s > feed.reconnect_max_delay_s:
        problems.append(f"{where}.reconnect_min_delay_s: must not exceed reconnect_max_delay_s")
    if venues is not None and known_exchange:
        for problem in venues.check_feed(feed):
            problems.append(f"{where}.{problem}")


def parse_config(data: Mapping[str, Any], source: str = "<memory>",
                 venues: VenueRules | None = None) -> Config:
    """Validate a decoded TOML document; raise ConfigError listing every problem.

    Without `venues` the exchange of a feed is not checked at all (neither that it
    exists nor its venue-specific keys): use `ingestd.checks.parse_config`, which passes
    the codec registry's rules, for a config that is to run."""
    problems: list[str] = []
    prefix = f"{source}: "
    for key in data:
        if key not in _SECTIONS and key != "feeds":
            known = ", ".join([*sorted(_SECTIONS), "feeds"])
            problems.append(f"{key}: unknown section (known: {known})")
    sections: dict[str, Any] = {}
    for name, kind in _SECTIONS.items():
        if name not in data:
            if name == "storage":
                problems.append("storage.root: required key is missing")
                continue
            sections[name] = kind()
            continue
        sections[name] = _convert_struct(kind, data[name], name, problems)
    storage = sections.get("storage")
    if storage is not None:
        problems.extend(_check_storage(storage))
    if sections.get("health") is not None:
        bad = _check_listen(sections["health"].listen)
        if bad:
            problems.append(f"health.listen: {bad}")

    raw_feeds = data.get("feeds")
    feeds: list[FeedConfig] = []
    if raw_feeds is None:
        problems.append("feeds: at least one [[feeds]] entry is required")
    elif not isinstance(raw_feeds, list):
        problems.append("feeds: expected an array of tables ([[feeds]])")
    else:
        if not raw_feeds:
            problems.append("feeds: at least one [[feeds]] entry is required")
        seen: set[str] = set()
        for i, raw in enumerate(raw_feeds):
            label = raw.get("name") if isinstance(raw, Mapping) else None
            where = f"feeds[{i}]" + (f" ({label})" if isinstance(label, str) else "")
            feed = _convert_struct(FeedConfig, raw, where, problems)
            if feed is None:
                continue
            if feed.name in seen:
                problems.append(f"{where}.name: duplicate feed name {feed.name!r}")
            seen.add(feed.name)
            _check_feed(feed, where, problems, venues)
            feeds.append(feed)

    if problems:
        raise ConfigError([prefix + p for p in problems])
    return Config(feeds=tuple(feeds), source=source, **sections)


def load_config(path: str | Path, venues: VenueRules | None = None) -> Config:
    """Read and validate a TOML config file; raise ConfigError on any problem.
    `venues` as for `parse_config` (`ingestd.checks.load_config` passes them)."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{p}: file not found"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{p}: cannot read: {e}"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{p}: invalid TOML: {e}"]) from None
    return parse_config(data, source=str(p), venues=venues)
