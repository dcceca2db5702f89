"""agent-telemetry: run telemetry for Python agents."""

from telemetry.config import TelemetryConfig
from telemetry.errors import ConfigError, SchemaError, TelemetryError
from telemetry.models import (
    APIPayload,
    RunEvent,
    RunRecord,
    calculate_duration_ms,
    generate_run_id,
    get_iso8601_timestamp,
)

__version__ = "0.1.0"
