"""APIClient: post runs to the HTTP API with retries, within an optional deadline.

A post sends ``payload.to_dict()`` as JSON, encoded as in the journal, to ``api_url``
with the headers ``Authorization: Bearer <token>`` (when a token is set),
``Content-Type: application/json``, ``Idempotency-Key: <run_id>`` and
``User-Agent: agent-telemetry/<version>``.

Network and HTTP faults never raise: every post returns a PostResult, and retries and
failures are logged on the ``telemetry.api`` logger. httpx is imported when a client with a
configured API is created, not with this module, so without httpx posts are skipped,
with one log line per process. The API token, and the credentials written in api_url
(its password, secret query values and the token itself, see config.mask_url), are
replaced by ``***`` in every message, log line and repr that this module writes, and in
httpx's log line of each request. The helpers that do not depend on APIClient, such as
the Retry-After parser, are in telemetry._http.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
import urllib.parse
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, NamedTuple

from telemetry._http import (
    BODY_READ_LIMIT,
    MASK,
    _httpx_available,
    _mask_in_httpx_logs,
    _parse_retry_after,
    _read_limited,
    _read_limited_async,
    _ssl_context,
    _user_agent,
)
from telemetry.config import TelemetryConfig, mask_url, url_secrets
from telemetry.encoding import dumps
from telemetry.errors import ConfigError
from telemetry.models import APIPayload

if TYPE_CHECKING:
    import httpx

__all__ = ["APIClient", "PostResult"]

logger = logging.getLogger("telemetry.api")

EXCERPT_MAX_CHARS = 200
"""Maximum length of the response body excerpt in a failure message."""

SKIPPED_NO_HTTPX = "skipped: httpx is not installed"
SKIPPED_DISABLED = "skipped: api_enabled is false"
SKIPPED_NO_URL = "skipped: api_url is not set"
SKIPPED_CLOSED = "skipped: the API client is closed"

# The token and the run id must be visible ASCII to be sent in headers: httpx encodes
# str header values as ASCII, h11 rejects control characters, and a space would split
# the Bearer credential.
_HEADER_VALUE = re.compile(r"[!-~]+")

# Raised while an httpx client is created, by the environment's proxy and SSL settings:
# ValueError for an unknown proxy scheme, OSError for a missing SSL_CERT_FILE, and
# ImportError for a SOCKS proxy without socksio.
_CLIENT_SETUP_ERRORS = (ValueError, OSError, ImportError)


class PostResult(NamedTuple):
    """Outcome of one post or connection test. The message never contains the token."""

    success: bool
    message: str
    """``HTTP <status>`` on success, else the cause, such as ``HTTP 422: <body excerpt>``."""
    status: int | None = None
    """For a failed post, the HTTP status of the last response; None when none came."""
    unreachable: bool = False
    """For a failed post, whether the last attempt got no response (a connection error or
    a timeout)."""


class _Outcome(NamedTuple):
    """Outcome of one HTTP request, before the retry policy is applied."""

    success: bool
    cause: str
    retryable: bool = False
    retry_after: float | None = None
    """Delay in seconds that the server requested, already capped at retry_after_max."""
    status: int | None = None
    unreachable: bool = False


class _Request(NamedTuple):
    run_id: str
    body: bytes
    headers: dict[str, str]


class APIClient:
    """HTTP client that posts runs to ``config.api_url``, retrying transient failures.

    A post is retried after a 5xx or 429 response, a timeout or a transport error, up to
    ``config.max_retries`` times after the first attempt. The delay before retry n (from 0)
    is 2**n seconds, so 1, 2 and 4 s by default. A 429 or 503 response with a valid
    Retry-After header sets the delay instead, capped at ``config.retry_after_max``.
    Other responses are never retried.

    When posts will be skipped (API disabled, api_url not set, httpx missing), the
    constructor logs why, once. Posts from all threads share one httpx.Client, created on
    first use and re-created in a forked child. Each post_run_async call uses its own
    httpx.AsyncClient, because an AsyncClient's connections belong to the event loop that
    opened them, and callers may run several loops, such as one asyncio.run() per job.
    Both share one SSL context, so a new AsyncClient does not load the CA certificates
    again.

    Args:
        config: the settings. api_url, api_token, api_enabled, max_retries, timeout and
            retry_after_max are used.
        sleep: called with the delay in seconds before a retry of post_run_sync.
        async_sleep: awaited with the delay in seconds before a retry of post_run_async.
        clock: monotonic time in seconds, the same clock as the ``deadline`` arguments.

    Raises:
        ConfigError: api_token contains characters other than visible ASCII, so it cannot
            be sent in a header. The message masks the token.
    """

    def __init__(
        self,
        config: TelemetryConfig,
        *,
        sleep: Callable[[float], None] = time.sleep,
        async_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        token = config.api_token
        if token is not None and not _HEADER_VALUE.fullmatch(token):
            raise ConfigError("api_token", MASK, "a token of visible ASCII characters only")

        self._config = config
        self._sleep = sleep
        self._async_sleep = async_sleep
        self._clock = clock
        self._url = config.api_url or ""
        self._display_url = mask_url(self._url, [token])
        self._secrets = _secret_forms(token, *url_secrets(self._url))
        if self._display_url != self._url:
            # httpx logs the whole URL of each request, so the credentials in it are
            # masked in its log lines as well.
            _mask_in_httpx_logs(self._secrets)
        self._base_headers = {"User-Agent": _user_agent()}
        if token is not None:
            self._base_headers["Authorization"] = f"Bearer {token}"

        self._lock = threading.Lock()
        self._client: httpx.Client | None = None
        self._closed = False
        self._logged_skips: set[str] = set()
        _live_clients.add(self)

        # Log now why posts will be skipped, because callers may check `enabled` and
        # never post. httpx is imported here when the API is configured.
        skip_reason = self._skip_reason()
        if skip_reason is not None:
            self._skip(skip_reason)

    def __repr__(self) -> str:
        token = MASK if self._config.api_token is not None else None
        return f"APIClient(url={self._display_url!r}, token={token})"

    @property
    def enabled(self) -> bool:
        """Whether posts are sent: api_enabled is true, api_url is set and httpx imports."""
        return self._config.api_configured and _httpx_available()

    def post_run_sync(self, payload: APIPayload, *, deadline: float | None = None) -> PostResult:
        """POST ``payload`` to api_url, retrying transient failures, and return the outcome.

        Each request may take min(config.timeout, time left before ``deadline``). When the
        next retry's delay would reach the deadline, no retry starts and the result is
        ``deadline reached after N attempts; left pending``. Skipped posts (API disabled,
        api_url not set, httpx missing, client closed) return ``skipped: <reason>``.

        The Idempotency-Key is the run id, so a server that honours it stores a run once
        even when a retry repeats a post that had reached it.

        Logs a WARNING per retry and at the deadline, and an ERROR when the post fails
        for good.

        NOTE: httpx applies the timeout to connecting, writing and each read separately.
        The body read here stops at the timeout, but a server that sends its status line
        and headers a few bytes at a time can hold one request past the timeout.

        Raises:
            TypeError: ``payload`` is not an APIPayload. No network fault raises.
        """
        prepared = self._prepare(payload)
        if isinstance(prepared, PostResult):
            return prepared

        attempts = 0
        last_outcome: _Outcome | None = None
        while True:
            timeout = self._request_timeout(deadline)
            if timeout is None:
                return self._deadline_reached(prepared, attempts, last_outcome)
            try:
                client = self._sync_client()
            except _CLIENT_SETUP_ERRORS as exc:
                return self._setup_failed(prepared.run_id, exc)
            if client is None:
                return self._skip(SKIPPED_CLOSED)

            attempts += 1
            outcome = self._send_sync(client, prepared, timeout)
            step = self._after_attempt(prepared, outcome, attempts, deadline)
            if isinstance(step, PostResult):
                return step
            last_outcome = outcome
            self._sleep(step)

    async def post_run_async(
        self, payload: APIPayload, *, deadline: float | None = None
    ) -> PostResult:
        """POST ``payload`` like post_run_sync, without blocking the event loop.

        Retries, deadline, results and logging are those of post_run_sync. Cancelling
        the task cancels the request and raises asyncio.CancelledError as usual.

        Raises:
            TypeError: ``payload`` is not an APIPayload. No network fault raises.
        """
        prepared = self._prepare(payload)
        if isinstance(prepared, PostResult):
            return prepared

        import httpx

        try:
            client = httpx.AsyncClient(verify=_ssl_context(), follow_redirects=False)
        except _CLIENT_SETUP_ERRORS as exc:
            return self._setup_failed(prepared.run_id, exc)

        async with client:
            attempts = 0
            last_outcome: _Outcome | None = None
            while True:
                timeout = self._request_timeout(deadline)
                if timeout is None:
                    return self._deadline_reached(prepared, attempts, last_outcome)
                if self._closed:
                    return self._skip(SKIPPED_CLOSED)

                attempts += 1
                outcome = await self._send_async(client, prepared, timeout)
                step = self._after_attempt(prepared, outcome, attempts, deadline)
                if isinstance(step, PostResult):
                    return step
                last_outcome = outcome
                await self._async_sleep(step)

    def test_connection(self) -> PostResult:
        """Send one GET to api_url with the Authorization header and report the outcome.

        Not retried. A response below 500 other than 401 and 403 returns
        ``(True, "reachable (HTTP n)")``. A 401 or 403 returns
        ``(False, "token rejected (HTTP n)")``, and a 5xx response, a timeout or a
        transport error returns False with the cause. Nothing raises.
        """
        skip_reason = self._skip_reason()
        if skip_reason is not None:
            return self._skip(skip_reason)
        try:
            client = self._sync_client()
        except _CLIENT_SETUP_ERRORS as exc:
            return self._setup_failed(None, exc)
        if client is None:
            return self._skip(SKIPPED_CLOSED)

        import httpx

        timeout = self._config.timeout
        stop_at = self._clock() + timeout
        try:
            with client.stream(
                "GET", self._url, headers=self._base_headers, timeout=timeout
            ) as response:
                raw = _read_limited(response, self._clock, stop_at)
                excerpt = self._read_excerpt(response.status_code, raw)
                status = response.status_code
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return PostResult(False, self._classify_error(exc).cause)

        if status in (401, 403):
            return PostResult(False, f"token rejected (HTTP {status})")
        if status >= 500:
            return PostResult(False, _status_cause(status, excerpt))
        return PostResult(True, f"reachable (HTTP {status})")

    def close(self) -> None:
        """Close the shared httpx.Client. Later posts return ``skipped: ...closed``.

        Safe to call more than once and from any thread. A post in progress in another
        thread fails and is not retried.
        """
        with self._lock:
            self._closed = True
            client, self._client = self._client, None
        if client is not None:
            client.close()

    async def aclose(self) -> None:
        """Close the client like close().

        A post_run_async in progress stops before its next attempt.
        """
        self.close()

    # Requests

    def _prepare(self, payload: APIPayload) -> _Request | PostResult:
        """Check the payload and build the request, or return why it is not sent."""
        if not isinstance(payload, APIPayload):
            raise TypeError(
                f"payload must be an APIPayload, not {type(payload).__name__}; "
                "build one with APIPayload.from_run_record(record)"
            )
        skip_reason = self._skip_reason()
        if skip_reason is not None:
            return self._skip(skip_reason)

        run_id = payload.run_id
        if not isinstance(run_id, str) or not _HEADER_VALUE.fullmatch(run_id):
            cause = (
                f"invalid run_id {run_id!r}: an Idempotency-Key must be visible ASCII "
                "characters only"
            )
            logger.error("not posting run %r: %s", run_id, cause)
            return PostResult(False, cause)

        try:
            body, issues = dumps(payload.to_dict(), "APIPayload")
        except (TypeError, ValueError) as exc:  # orjson.JSONEncodeError is a TypeError
            cause = f"the payload cannot be encoded as JSON: {exc}"
            logger.error("not posting run %s: %s", run_id, cause)
            return PostResult(False, cause)
        # The journal writer already warns about these values, so this does not repeat it.
        for issue in issues:
            logger.debug("run %s: %s at %s", run_id, issue.reason, issue.path)

        headers = {
            **self._base_headers,
            "Content-Type": "application/json",
            "Idempotency-Key": run_id,
        }
        return _Request(run_id, body, headers)

    def _send_sync(self, client: httpx.Client, request: _Request, timeout: float) -> _Outcome:
        import httpx

        stop_at = self._clock() + timeout
        try:
            with client.stream(
                "POST", self._url, content=request.body, headers=request.headers, timeout=timeout
            ) as response:
                raw = _read_limited(response, self._clock, stop_at)
                excerpt = self._read_excerpt(response.status_code, raw)
                return self._classify_response(response.status_code, response.headers, excerpt)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return self._classify_error(exc)
        except RuntimeError:
            # httpx raises RuntimeError when close() in another thread closed the client.
            if self._closed:
                return _Outcome(False, "the API client was closed")
            raise

    async def _send_async(
        self, client: httpx.AsyncClient, request: _Request, timeout: float
    ) -> _Outcome:
        import httpx

        stop_at = self._clock() + timeout
        try:
            async with client.stream(
                "POST", self._url, content=request.body, headers=request.headers, timeout=timeout
            ) as response:
                raw = await _read_limited_async(response, self._clock, stop_at)
                excerpt = self._read_excerpt(response.status_code, raw)
                return self._classify_response(response.status_code, response.headers, excerpt)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return self._classify_error(exc)

    def _sync_client(self) -> httpx.Client | None:
        """Return the shared httpx.Client, creating it on first use, or None once closed.

        Raises:
            ValueError, OSError, ImportError: the proxy or SSL settings in the environment
                are invalid, so no client can be created.
        """
        import httpx

        with self._lock:
            if self._closed:
                return None
            if self._client is None:
                self._client = httpx.Client(verify=_ssl_context(), follow_redirects=False)
            return self._client

    # Outcomes and the retry policy

    def _read_excerpt(self, status: int, raw: bytes) -> str:
        """Return the start of a failed response's body, one line, the secrets masked.

        The body of a 2xx response is read too, so that its connection can be reused,
        but only failures need the text.
        """
        if 200 <= status < 300 or not raw:
            return ""
        text = raw.decode("utf-8", "replace")
        if len(raw) >= BODY_READ_LIMIT and self._secrets:
            # The read limit may have cut a secret in two, and _redact finds only whole
            # secrets, so drop a tail as long as the longest secret.
            text = text[: max(0, len(text) - max(map(len, self._secrets)))]
        text = self._redact(text)
        text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
        if len(text) > EXCERPT_MAX_CHARS:
            text = text[: EXCERPT_MAX_CHARS - 3] + "..."
        return text

    def _classify_response(self, status: int, headers: Mapping[str, str], excerpt: str) -> _Outcome:
        if 200 <= status < 300:
            return _Outcome(True, f"HTTP {status}", status=status)
        cause = _status_cause(status, excerpt)
        if 300 <= status < 400:
            cause += "; redirects are not followed, so set api_url to the final URL"
        if status != 429 and status < 500:
            return _Outcome(False, cause, status=status)

        retry_after = None
        if status in (429, 503):
            retry_after = _parse_retry_after(headers.get("retry-after"), headers.get("date"))
            if retry_after is not None:
                retry_after = min(retry_after, self._config.retry_after_max)
        return _Outcome(False, cause, retryable=True, retry_after=retry_after, status=status)

    def _classify_error(self, exc: Exception) -> _Outcome:
        import httpx

        name = type(exc).__name__
        if isinstance(exc, httpx.TimeoutException):
            return _Outcome(False, f"timed out ({name})", retryable=True, unreachable=True)
        detail = self._redact(str(exc)).strip()
        cause = f"{name}: {detail}" if detail else name
        if isinstance(exc, (httpx.UnsupportedProtocol, httpx.LocalProtocolError)):
            return _Outcome(False, cause)
        if isinstance(exc, httpx.TransportError):
            # Raised before any response: a refused connection, a DNS failure, a reset.
            return _Outcome(False, cause, retryable=True, unreachable=True)
        return _Outcome(False, cause)

    def _request_timeout(self, deadline: float | None) -> float | None:
        """Return the timeout of the next request, or None when the deadline has passed."""
        if deadline is None:
            return self._config.timeout
        left = deadline - self._clock()
        if left <= 0:
            return None
        return min(self._config.timeout, left)

    def _after_attempt(
        self, request: _Request, outcome: _Outcome, attempts: int, deadline: float | None
    ) -> PostResult | float:
        """Return the final result of the post, or the delay in seconds before the next try."""
        if outcome.success:
            logger.debug("posted run %s (%s)", request.run_id, outcome.cause)
            return PostResult(True, outcome.cause)
        if not outcome.retryable:
            logger.error(
                "POST of run %s to %s failed and is not retried: %s",
                request.run_id,
                self._display_url,
                outcome.cause,
            )
            return PostResult(False, outcome.cause, outcome.status, outcome.unreachable)
        if attempts > self._config.max_retries:
            logger.error(
                "gave up posting run %s to %s after %s: %s",
                request.run_id,
                self._display_url,
                _plural(attempts, "attempt"),
                outcome.cause,
            )
            message = f"failed after {_plural(attempts, 'attempt')}: {outcome.cause}"
            return PostResult(False, message, outcome.status, outcome.unreachable)

        delay = outcome.retry_after
        if delay is None:
            delay = float(2 ** (attempts - 1))
        if deadline is not None and self._clock() + delay >= deadline:
            return self._deadline_reached(request, attempts, outcome)

        logger.warning(
            "POST of run %s failed (attempt %d of %d): %s; retrying in %g s",
            request.run_id,
            attempts,
            self._config.max_retries + 1,
            outcome.cause,
            delay,
        )
        return delay

    def _setup_failed(self, run_id: str | None, exc: Exception) -> PostResult:
        detail = self._redact(str(exc)).strip()
        cause = (
            f"cannot create the HTTP client ({type(exc).__name__}: {detail}); check the "
            "proxy variables and SSL_CERT_FILE in the environment"
        )
        logger.error("not posting run %s: %s", run_id, cause)
        return PostResult(False, cause)

    def _deadline_reached(
        self, request: _Request, attempts: int, last: _Outcome | None
    ) -> PostResult:
        message = f"deadline reached after {_plural(attempts, 'attempt')}; left pending"
        if last is None:
            logger.warning("stopped posting run %s: %s", request.run_id, message)
            return PostResult(False, message)
        message += f" (last error: {last.cause})"
        logger.warning("stopped posting run %s: %s", request.run_id, message)
        return PostResult(False, message, last.status, last.unreachable)

    # Skipped posts

    def _skip_reason(self) -> str | None:
        if not self._config.api_enabled:
            return SKIPPED_DISABLED
        if self._config.api_url is None:
            return SKIPPED_NO_URL
        if not _httpx_available():
            return SKIPPED_NO_HTTPX
        if self._closed:
            return SKIPPED_CLOSED
        return None

    def _skip(self, reason: str) -> PostResult:
        """Log why posts are skipped, once per client (per process for httpx), and return it.

        The result is ``PostResult(False, reason)``.
        """
        if reason == SKIPPED_NO_HTTPX:
            if _log_once_per_process(reason):
                logger.warning(
                    "httpx is not installed, so runs are not posted to the API; "
                    "install httpx to post them"
                )
            return PostResult(False, reason)

        with self._lock:
            first = reason not in self._logged_skips
            self._logged_skips.add(reason)
        if first:
            logger.info("API posts are %s", reason)
        return PostResult(False, reason)

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return text

    def _reset_after_fork(self) -> None:
        # The parent's connections and lock must not be used by the child. Closing the
        # inherited client could wait forever on a pool lock that a parent thread held
        # at fork time, so it is kept unused instead.
        self._lock = threading.Lock()
        if self._client is not None:
            _inherited_clients.append(self._client)
        self._client = None


def _secret_forms(*secrets: str | None) -> tuple[str, ...]:
    """Return each secret with the escaped forms a server may echo it in, longest first.

    A JSON encoder may escape "/" as "\\/" and any non-ASCII character as \\uXXXX, and a
    URL or form encoder percent-encodes. Every form is masked, not just the plain text.
    """
    forms: set[str] = set()
    for secret in secrets:
        if not secret:
            continue
        json_text = json.dumps(secret)[1:-1]
        forms.update(
            {
                secret,
                json_text,
                json_text.replace("/", "\\/"),
                urllib.parse.quote(secret, safe=""),
                urllib.parse.quote(secret),
                urllib.parse.quote_plus(secret, safe=""),
            }
        )
    return tuple(sorted(forms, key=len, reverse=True))


def _status_cause(status: int, excerpt: str) -> str:
    return f"HTTP {status}: {excerpt}" if excerpt else f"HTTP {status}"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


# Process-wide state: the skip reasons already logged, and the clients to reset in a
# forked child.
_module_lock = threading.Lock()
_logged_process_skips: set[str] = set()
_live_clients: weakref.WeakSet[APIClient] = weakref.WeakSet()
_inherited_clients: list[httpx.Client] = []


def _log_once_per_process(reason: str) -> bool:
    """Record ``reason`` as logged and return whether this is the first time."""
    with _module_lock:
        first = reason not in _logged_process_skips
        _logged_process_skips.add(reason)
    return first


def _reset_clients_after_fork() -> None:
    global _module_lock
    _module_lock = threading.Lock()
    for client in list(_live_clients):
        client._reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_clients_after_fork)
