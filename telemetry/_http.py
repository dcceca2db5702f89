"""HTTP helpers of the API client: Retry-After, limited reads, the shared SSL context, and
the masking of URL credentials in httpx's own log lines.

None of these depend on APIClient. httpx is imported inside the functions that use it,
never when this module is imported, so that telemetry imports and records runs without
httpx installed.
"""

from __future__ import annotations

import datetime
import email.utils
import functools
import importlib.metadata
import logging
import math
import os
import re
import ssl
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx

__all__ = [
    "BODY_READ_LIMIT",
    "MASK",
    "_httpx_available",
    "_mask_in_httpx_logs",
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


class _SecretMaskingFilter(logging.Filter):
    """Replace the registered secrets by *** in each record of the logger it is added to.

    httpx logs every request at INFO as ``HTTP Request: POST <url> ...``, with the whole
    URL, password and query included (httpx 0.29). A URL that carries a credential would
    otherwise reach any host application that logs at INFO.
    """

    def __init__(self) -> None:
        super().__init__()
        self.secrets: tuple[str, ...] = ()

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = self.secrets
        if not secrets:
            return True
        message = record.getMessage()
        masked = message
        for secret in secrets:
            masked = masked.replace(secret, MASK)
        if masked != message:
            record.msg = masked
            record.args = None
        return True


_httpx_log_filter = _SecretMaskingFilter()
_httpx_log_filter_lock = threading.Lock()


def _mask_in_httpx_logs(secrets: tuple[str, ...]) -> None:
    """Mask ``secrets`` in the records of the ``httpx`` logger from now on, in this process.

    The filter is added to that logger once, and the secrets stay registered for the life
    of the process. A filter on a logger applies to the records logged by that logger
    only, not by its children, and httpx logs its requests on ``httpx`` itself.
    """
    if not secrets:
        return
    with _httpx_log_filter_lock:
        known = set(_httpx_log_filter.secrets)
        if known.issuperset(secrets):
            return
        # Longest first, so that a secret that contains another is masked whole.
        _httpx_log_filter.secrets = tuple(sorted(known.union(secrets), key=len, reverse=True))
        logger = logging.getLogger("httpx")
        if _httpx_log_filter not in logger.filters:
            logger.addFilter(_httpx_log_filter)


def _reset_lock_after_fork() -> None:
    # A lock held by another thread at fork time stays locked forever in the child.
    global _ssl_context_lock, _httpx_log_filter_lock
    _ssl_context_lock = threading.Lock()
    _httpx_log_filter_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_lock_after_fork)
