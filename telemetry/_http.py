"""HTTP helpers of the API client: Retry-After, redaction, limited reads, the shared SSL context.

None of these depend on APIClient. httpx is imported inside the functions that use it,
never when this module is imported, so that telemetry imports and records runs without
httpx installed.
"""

from __future__ import annotations

import datetime
import email.utils
import functools
import importlib.metadata
import math
import os
import re
import ssl
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import httpx

__all__ = [
    "BODY_READ_LIMIT",
    "MASK",
    "_httpx_available",
    "_mask_url_password",
    "_parse_http_date",
    "_parse_retry_after",
    "_read_limited",
    "_read_limited_async",
    "_ssl_context",
    "_user_agent",
]

MASK = "***"
BODY_READ_LIMIT = 4096
"""Maximum number of response body bytes read per request. The rest is discarded."""

_DELAY_SECONDS = re.compile(r"[0-9]+")


def _read_limited(response: httpx.Response, clock: Callable[[], float], stop_at: float) -> bytes:
    """Return the first BODY_READ_LIMIT bytes of the body, or what arrived before ``stop_at``.

    A read error also ends the body early: the status is known, and the body only
    goes into messages.
    """
    import httpx

    chunks: list[bytes] = []
    size = 0
    try:
        for chunk in response.iter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if size >= BODY_READ_LIMIT or clock() >= stop_at:
                break
    except httpx.HTTPError:
        pass
    return b"".join(chunks)[:BODY_READ_LIMIT]


async def _read_limited_async(
    response: httpx.Response, clock: Callable[[], float], stop_at: float
) -> bytes:
    """Return the start of the body like _read_limited, without blocking the event loop."""
    import httpx

    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in response.aiter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if size >= BODY_READ_LIMIT or clock() >= stop_at:
                break
    except httpx.HTTPError:
        pass
    return b"".join(chunks)[:BODY_READ_LIMIT]


def _parse_retry_after(value: str | None, date_header: str | None) -> float | None:
    """Return the delay in seconds that a Retry-After value requests, or None if invalid.

    The value is a whole number of seconds or an HTTP-date (RFC 9110, section 10.2.3).
    A date is measured from the response's Date header when that is valid, so that a
    skewed local clock does not matter, else from the local clock. A past date gives 0.
    """
    if value is None:
        return None
    text = value.strip()
    if _DELAY_SECONDS.fullmatch(text):
        try:
            return float(int(text))
        except OverflowError:
            return math.inf

    retry_at = _parse_http_date(text)
    if retry_at is None:
        return None
    now = _parse_http_date(date_header) if date_header else None
    if now is None:
        now = datetime.datetime.now(datetime.timezone.utc)
    return max(0.0, (retry_at - now).total_seconds())


def _parse_http_date(text: str) -> datetime.datetime | None:
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:  # "-0000" means UTC with no claim about the local zone
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment


def _mask_url_password(url: str) -> tuple[str, str | None]:
    """Return the URL with a password in its user info replaced by ***, and the password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url, None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    masked = parts._replace(netloc=f"{user}:{MASK}@{hostport}").geturl()
    return masked, parts.password


@functools.lru_cache(maxsize=1)
def _user_agent() -> str:
    try:
        version = importlib.metadata.version("agent-telemetry")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"agent-telemetry/{version}"


# Process-wide state: whether httpx imports, and the shared SSL context with its lock.
_httpx_import_ok: bool | None = None
_ssl_context_cache: ssl.SSLContext | None = None
_ssl_context_lock = threading.Lock()


def _httpx_available() -> bool:
    """Return whether httpx imports, trying once per process."""
    global _httpx_import_ok
    if _httpx_import_ok is None:
        try:
            import httpx  # noqa: F401
        except ImportError:
            _httpx_import_ok = False
        else:
            _httpx_import_ok = True
    return _httpx_import_ok


def _ssl_context() -> ssl.SSLContext | bool:
    """Return one SSL context for all clients, built as httpx builds its default one.

    Building a context loads the CA certificates, which made each new httpx 0.29 client
    take about 50 ms in a quick timing. Older httpx releases without a public
    create_ssl_context get True, so each client builds httpx's default context itself.
    """
    global _ssl_context_cache
    import httpx

    create = getattr(httpx, "create_ssl_context", None)
    if create is None:
        return True
    with _ssl_context_lock:
        if _ssl_context_cache is None:
            _ssl_context_cache = create()
        return _ssl_context_cache


def _reset_lock_after_fork() -> None:
    # A lock held by another thread at fork time stays locked forever in the child.
    global _ssl_context_lock
    _ssl_context_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_lock_after_fork)
