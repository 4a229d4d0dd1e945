"""One-shot HTTP GET for REST snapshots, run in a thread so the loop never blocks.

Owns: fetching a URL with a timeout and returning (status, body) - any HTTP status is an
answer, a network failure is status 0 with the error text as the body.

Must not: interpret the body (the codec does), or retry (the codec decides).
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

from ingestd import __version__

USER_AGENT = f"ingestd/{__version__}"
MAX_BODY_BYTES = 64 * 1024 * 1024


def _get(url: str, timeout_s: float) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT,
                                               "Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return int(resp.status), resp.read(MAX_BODY_BYTES)
    except urllib.error.HTTPError as e:
        return int(e.code), e.read(64 * 1024)
    except (urllib.error.URLError, OSError, ValueError) as e:
        return 0, f"{type(e).__name__}: {e}".encode()


async def http_get(url: str, timeout_s: float = 10.0) -> tuple[int, bytes]:
    return await asyncio.to_thread(_get, url, timeout_s)
