"""A REST call a venue needs answered before each WebSocket connection.

Owns: `ConnectRequest` (what to fetch: method and absolute URL) and the
`ConnectsAfterRest` protocol a codec implements when its connection URL comes from a REST
answer (KuCoin: `POST /api/v1/bullet-public` gives the endpoint, a token and the ping
interval). The reader (feed/reader.py) performs the request before `ws_url()` and hands
the answer to `on_connect_answer`; a failed request or an answer the codec refuses is a
failed session (backoff, breaker), like a refused handshake.

Must not: do I/O (the reader fetches), read a clock or log; codecs without such a step
simply do not implement the protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """An HTTP request whose answer the codec needs before connecting."""

    url: str              # absolute URL
    method: str = "POST"  # tokens are handed out by POST (KuCoin's bullet-public)


@runtime_checkable
class ConnectsAfterRest(Protocol):
    """A codec whose connection needs a REST answer first."""

    def connect_request(self) -> ConnectRequest | None:
        """What to fetch before the next connection (None: nothing this time)."""
        ...

    def on_connect_answer(self, status: int, body: bytes) -> str | None:
        """The answer (status 0: no HTTP answer, `body` says why). None: ready to connect
        (`ws_url()` now works); else why not, as one line (the session fails)."""
        ...


__all__ = ["ConnectRequest", "ConnectsAfterRest"]
