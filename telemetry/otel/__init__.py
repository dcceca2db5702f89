"""The OpenTelemetry bridge: every run as a span, sent to any OTLP collector.

Switched on by ``TELEMETRY_OTEL=1`` or ``TelemetryConfig(otel=True)``, and installed with
``pip install 'agent-telemetry[otel]'``. docs/opentelemetry.md describes the mapping, the
ids and the failure behaviour.

Importing this package imports nothing from OpenTelemetry: ``open_bridge`` does, and
only when the bridge is on. The id rules (``run_span_id``, ``run_trace_id``) need no
OpenTelemetry package either.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING

from telemetry.config import TelemetryConfig
from telemetry.otel._ids import (
    OTEL_CONTEXT_EVENT,
    SpanParent,
    format_span_id,
    format_trace_id,
    run_span_id,
    run_trace_id,
)

if TYPE_CHECKING:
    from telemetry.otel._bridge import OTelBridge

__all__ = [
    "INSTALL_HINT",
    "OTEL_CONTEXT_EVENT",
    "SpanParent",
    "format_span_id",
    "format_trace_id",
    "open_bridge",
    "otel_sdk_disabled",
    "run_span_id",
    "run_trace_id",
]

logger = logging.getLogger("telemetry.otel")

INSTALL_HINT = "pip install 'agent-telemetry[otel]'"

_missing_warned = False
_missing_lock = threading.Lock()


def otel_sdk_disabled(environ: Mapping[str, str] | None = None) -> bool:
    """Return whether OTEL_SDK_DISABLED is ``true``, compared as the SDK does."""
    env = os.environ if environ is None else environ
    return env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def open_bridge(config: TelemetryConfig) -> OTelBridge | None:
    """Return a bridge for a client with ``config``, or None when runs get no spans.

    Returns None when the client or the bridge is off, when OTEL_SDK_DISABLED is true
    (logged at INFO), or when OpenTelemetry cannot be imported. The last is logged as a
    WARNING once per process, with the command that installs it. Never raises.
    """
    if not (config.enabled and config.otel):
        return None
    if otel_sdk_disabled():
        logger.info("OTEL_SDK_DISABLED is true, so runs are not sent as OpenTelemetry spans")
        return None
    try:
        from telemetry.otel._bridge import OTelBridge
    except ImportError as exc:
        _warn_missing(exc)
        return None
    except Exception as exc:
        # A broken installation can fail at import in other ways.
        logger.error(
            "cannot import the OpenTelemetry bridge, so runs are not sent as spans: %s: %s. "
            "Reinstall it with %s",
            type(exc).__name__,
            exc,
            INSTALL_HINT,
        )
        return None
    try:
        return OTelBridge(flush_timeout=config.end_run_timeout)
    except Exception as exc:
        logger.error(
            "cannot start the OpenTelemetry bridge, so runs are not sent as spans: %s", exc
        )
        return None


def _warn_missing(exc: ImportError) -> None:
    global _missing_warned
    with _missing_lock:
        if _missing_warned:
            return
        _missing_warned = True
    logger.warning(
        "TELEMETRY_OTEL is on, but OpenTelemetry cannot be imported (%s), so runs are "
        "recorded without spans: install it with %s",
        exc,
        INSTALL_HINT,
    )
