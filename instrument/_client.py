"""The process-wide default TelemetryClient that decorators use when given no client."""

from __future__ import annotations

import logging
import os
import threading

from telemetry.client import TelemetryClient
from telemetry.config import ENV_PREFIX, TelemetryConfig, parse_bool
from telemetry.errors import ConfigError

__all__ = [
    "default_client_enabled",
    "get_default_client",
    "peek_default_client_disabled",
    "set_default_client",
]

logger = logging.getLogger("telemetry.instrument")

ENABLED_VARIABLE = ENV_PREFIX + "ENABLED"

_default_client: TelemetryClient | None = None
_default_client_lock = threading.Lock()


def get_default_client() -> TelemetryClient:
    """Return the default client, creating it from the environment on the first call.

    Thread-safe: concurrent first calls create one client. An invalid setting in the
    environment is logged and replaced by its default, as ``TelemetryClient()`` does. If creating
    the client raises, the error is logged and a disabled client takes its place, so that
    the call of a decorated function that needs the client goes on.
    """
    client = _default_client
    if client is not None:
        return client
    return _create_default_client()


def _create_default_client() -> TelemetryClient:
    global _default_client
    with _default_client_lock:
        if _default_client is None:
            try:
                _default_client = TelemetryClient()
            except Exception:
                logger.exception(
                    "failed to create the default telemetry client, so runs are not recorded"
                )
                _default_client = TelemetryClient(TelemetryConfig(enabled=False, environ={}))
        return _default_client


def set_default_client(client: TelemetryClient | None) -> TelemetryClient | None:
    """Make ``client`` the default client and return the previous one, which stays open.

    None discards the default, so that the next call creates one from the environment
    again. Decorators that were given no client use the new default from their next call
    on. A decorator applied while the default is disabled has returned the function
    undecorated, and stays so.

    Raises:
        TypeError: ``client`` is neither a TelemetryClient nor None.
    """
    global _default_client
    if client is not None and not isinstance(client, TelemetryClient):
        raise TypeError(
            f"set_default_client() expects a TelemetryClient or None, "
            f"not {type(client).__name__}: {client!r}"
        )
    with _default_client_lock:
        previous, _default_client = _default_client, client
    return previous


def default_client_enabled() -> bool:
    """Return whether the default client records runs, creating it on the first call."""
    client = _default_client
    if client is None:
        client = _create_default_client()
    return client.enabled


def peek_default_client_disabled() -> bool:
    """Return whether the default client is disabled, or would be created disabled.

    Before the default client exists, only ``TELEMETRY_ENABLED`` is read, and the client
    is not created. An invalid value counts as enabled here, as it does for the client
    created on the first call, which logs the error and uses the default.
    """
    client = _default_client
    if client is not None:
        return not client.enabled
    text = os.environ.get(ENABLED_VARIABLE)
    if text is None or not text.strip():
        return False
    try:
        return not parse_bool(text, ENABLED_VARIABLE)
    except ConfigError:
        return False


def _reset_lock_in_child() -> None:
    # A fork while another thread creates the default client would leave the lock held
    # forever in the child.
    global _default_client_lock
    _default_client_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_lock_in_child)
