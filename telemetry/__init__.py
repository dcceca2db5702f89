"""agent-telemetry: run telemetry for Python agents.

Record every run of an agent in a crash-safe NDJSON journal and a SQLite index, and post
it to an HTTP API when one is configured::

    from telemetry import TelemetryClient

    client = TelemetryClient()
    with client.track_run("nightly-import", "import") as run:
        run.set_metrics(items_discovered=10, items_succeeded=10)
"""

from telemetry.api import APIClient, PostResult
from telemetry.client import FlushResult, TelemetryClient
from telemetry.config import TelemetryConfig
from telemetry.context import RunContext, TrackedRun, current_run
from telemetry.database import DatabaseWriter
from telemetry.errors import ConfigError, SchemaError, TelemetryError
from telemetry.models import (
    STATUSES,
    APIPayload,
    RunEvent,
    RunRecord,
    calculate_duration_ms,
    generate_run_id,
    get_iso8601_timestamp,
)
from telemetry.ndjson import JournalReadResult, NDJSONWriter

__version__ = "0.1.0"

__all__ = [
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
]
