"""One-shot HTTP GET for REST snapshots, native asyncio under one total deadline.

Owns: fetching a URL (http or https, gzip, following redirects; GET, or another method
without a body, e.g. KuCoin's `POST /api/v1/bullet-public` token) and classifying what came
back as a RestAnswer (with its Retry-After header; `retry_after_s` reads one, for the
handshake and poll backoff). A complete HTTP response is an answer whatever its status, body
included. Anything else is `status 0`, an empty body and `error`, a short text whose first
word (before the colon) is a stable class:

- `timeout`: no complete answer within the deadline (connect, request and whole body);
- `bad_url`: not an absolute http(s) URL with a host;
- `connect`: the TCP connection could not be made (refused, unreachable, ...);
- `dns`: the host name did not resolve;
- `tls`: the TLS handshake or certificate check failed;
- `disconnected`: the server closed or reset the connection before a complete head;
- `not_http`: what came back does not start with an HTTP status line;
- `bad_http`: an HTTP head or body that breaks the protocol (bad header, chunk size, ...);
- `truncated`: the connection ended before the body its head announced was complete;
- `bad_encoding`: a Content-Encoding (gzip, deflate) that does not decode;
- `too_large`: a body above `max_body_bytes` (checked while streaming, not after);
- `redirects`: too many redirects;
- `error`: anything else, with the exception's type.

Must not: interpret the body (the codec does), retry (the codec decides), raise anything
but CancelledError, run the fetch in a thread, or outlive its deadline. The only step
that may use the loop's default executor is the name lookup of a host name
(loop.getaddrinfo, as asyncio.open_connection does); the deadline bounds waiting on it.
"""

from __future__ import annotations

import asyncio
import email.utils
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
from aiohttp import http_exceptions

from ingestd import __version__

USER_AGENT = f"ingestd/{__version__}"
MAX_BODY_BYTES = 64 * 1024 * 1024

_HEADERS = {"User-Agent": USER_AGENT, "Accept": "application/json"}
# The one deadline is http_get's asyncio.timeout: none of aiohttp's own.
_NO_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=None, sock_read=None,
                                    sock_connect=None)
_READ_CHUNK = 64 * 1024
_MAX_DETAIL = 160


@dataclass(frozen=True, slots=True)
class RestAnswer:
    """`status` > 0: a complete HTTP response. `status` 0: no answer, `error` says why."""

    status: int
    body: bytes
    error: str | None = None
    retry_after: str | None = None  # the answer's Retry-After header (429/418 backoff)


def retry_after_s(value: str | None, now_wall_s: float) -> float | None:
    """Parse a Retry-After header (seconds or an HTTP date) into seconds from now."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now_wall_s)


def _fail(error: str) -> RestAnswer:
    return RestAnswer(0, b"", error)


async def http_get(url: str, deadline_s: float = 10.0,
                   max_body_bytes: int = MAX_BODY_BYTES, method: str = "GET") -> RestAnswer:
    """GET `url` (or `method`, without a request body): the whole exchange (connect,
    request, body) within `deadline_s`."""
    bad = _check_url(url)
    if bad is not None:
        return _fail(f"bad_url: {bad}")
    deadline = asyncio.timeout(deadline_s)
    try:
        async with deadline:
            return await _get(url, max_body_bytes, method)
    except TimeoutError as e:
        if deadline.expired():
            return _fail(f"timeout: no complete answer within {deadline_s:g} s")
        return _fail(_classify(e))
    except Exception as e:  # whatever the server does, the caller gets an answer
        if deadline.expired():  # the deadline's cancel surfaced as another exception
            return _fail(f"timeout: no complete answer within {deadline_s:g} s")
        return _fail(_classify(e))


def _check_url(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError as e:
        return f"{e}: {url[:_MAX_DETAIL]!r}"
    if parts.scheme not in ("http", "https"):
        return f"scheme must be http or https: {url[:_MAX_DETAIL]!r}"
    if not parts.hostname:
        return f"no host: {url[:_MAX_DETAIL]!r}"
    return None


async def _get(url: str, max_body_bytes: int, method: str = "GET") -> RestAnswer:
    # A fresh connection per fetch (fetches are rare): nothing to keep or close later.
    # The threaded resolver whether or not aiodns is installed: the system's lookup
    # (/etc/hosts, nsswitch) as for the WebSocket connections; none for an IP literal.
    resolver = aiohttp.ThreadedResolver()
    connector = aiohttp.TCPConnector(force_close=True, limit=1, resolver=resolver)
    async with (
        aiohttp.ClientSession(connector=connector, headers=_HEADERS, timeout=_NO_TIMEOUT,
                              trust_env=False) as session,
        session.request(method, url) as resp,
    ):
        return await _read_body(resp, max_body_bytes)


async def _read_body(resp: aiohttp.ClientResponse, max_body_bytes: int) -> RestAnswer:
    encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
    encoded = encoding not in ("", "identity")
    declared = resp.content_length
    if declared is not None and not encoded and declared > max_body_bytes:
        return _fail(f"too_large: Content-Length {declared} above the {max_body_bytes}"
                     " bytes cap")
    body = bytearray()
    try:
        while chunk := await resp.content.read(_READ_CHUNK):
            if len(body) + len(chunk) > max_body_bytes:
                return _fail(f"too_large: body above the {max_body_bytes} bytes cap")
            body += chunk
    except aiohttp.ClientPayloadError as e:
        if _find(e, http_exceptions.ContentLengthError, http_exceptions.TransferEncodingError):
            return _fail(_truncated(resp, encoding if encoded else None, declared))
        raise
    return RestAnswer(resp.status, bytes(body), None, resp.headers.get("Retry-After"))


def _truncated(resp: aiohttp.ClientResponse, encoding: str | None,
               declared: int | None) -> str:
    got = resp.content.total_bytes  # bytes the body stream received (decoded)
    if encoding is not None:
        return (f"truncated: {encoding} body cut short after {got} decoded bytes"
                + (f" (Content-Length {declared})" if declared is not None else ""))
    if declared is not None:
        return f"truncated: body cut short after {got} of {declared} bytes"
    return f"truncated: chunked body cut short after {got} bytes"


def _find(e: BaseException, *types: type[BaseException]) -> BaseException | None:
    """The first exception of `types` in `e`'s chain of causes (aiohttp wraps its own)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, types):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _detail(e: BaseException) -> str:
    if isinstance(e, http_exceptions.HttpProcessingError | aiohttp.ClientResponseError):
        text = e.message
    else:
        text = str(e)
    text = " ".join(text.split()) or type(e).__name__
    return text[:_MAX_DETAIL]


def _classify(e: Exception) -> str:
    """A short `class: detail` text for a fetch that got no complete HTTP response."""
    if (found := _find(e, http_exceptions.BadStatusLine)) is not None:
        return f"not_http: {_detail(found)}"
    if isinstance(e, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return f"bad_url: {_detail(e)}"
    if isinstance(e, aiohttp.TooManyRedirects):
        return f"redirects: more than {len(e.history)} redirects"
    if isinstance(e, aiohttp.ClientConnectorDNSError):
        return f"dns: {type(e.os_error).__name__} {_detail(e.os_error)}"
    if isinstance(e, aiohttp.ClientSSLError) or _find(e, ssl.SSLError) is not None:
        return f"tls: {_detail(e)}"
    if isinstance(e, aiohttp.ClientConnectorError):
        return f"connect: {type(e.os_error).__name__} {_detail(e.os_error)}"
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return "disconnected: the server closed the connection before a complete head"
    if isinstance(e, aiohttp.ClientOSError | ConnectionError):
        return f"disconnected: {type(e).__name__} {_detail(e)}"
    if (found := _find(e, http_exceptions.ContentEncodingError)) is not None:
        return f"bad_encoding: {_detail(found)}"
    if (found := _find(e, http_exceptions.HttpProcessingError)) is not None:
        return f"bad_http: {_detail(found)}"
    if isinstance(e, aiohttp.ClientResponseError | aiohttp.ClientPayloadError):
        return f"bad_http: {_detail(e)}"
    return f"error: {type(e).__name__}: {_detail(e)}"
