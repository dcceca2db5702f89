"""The names that the packages export."""

from __future__ import annotations

import subprocess
import sys

import instrument
import telemetry

TELEMETRY_EXPORTS = {
    "STATUSES",
    "APIClient",
    "APIPayload",
    "ConfigError",
    "DatabaseWriter",
    "FlushResult",
    "JournalReadResult",
    "NDJSONWriter",
    "PostResult",
    "RunContext",
    "RunEvent",
    "RunRecord",
    "SchemaError",
    "TelemetryClient",
    "TelemetryConfig",
    "TelemetryError",
    "TrackedRun",
    "__version__",
    "calculate_duration_ms",
    "current_run",
    "generate_run_id",
    "get_iso8601_timestamp",
}


def test_telemetry_exports() -> None:
    """telemetry.__all__ lists the public API, and each name resolves."""
    assert set(telemetry.__all__) == TELEMETRY_EXPORTS
    for name in telemetry.__all__:
        assert getattr(telemetry, name) is not None


INSTRUMENT_EXPORTS = {
    "current_run",
    "get_default_client",
    "install",
    "set_default_client",
    "tracked_run",
    "uninstall",
    "wrap_entry_point",
}


def test_instrument_exports() -> None:
    """instrument.__all__ lists the public API, and each name resolves."""
    assert set(instrument.__all__) == INSTRUMENT_EXPORTS
    for name in instrument.__all__:
        assert getattr(instrument, name) is not None


def test_import_does_not_load_httpx() -> None:
    """Importing telemetry leaves httpx unloaded until an API client needs it."""
    code = "import sys, telemetry; print('httpx' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )

    assert result.stdout.strip() == "False"
