"""Exceptions raised by agent-telemetry.

Only misuse of the API raises into the caller. Storage and network faults are logged by
the client instead, so these classes mostly reach code that uses the writers directly.

    TelemetryError
    ├── ConfigError        (also a ValueError) an invalid setting
    └── SchemaError        the index was written by a newer version of the library
"""

from __future__ import annotations

__all__ = ["ConfigError", "SchemaError", "TelemetryError"]


class TelemetryError(Exception):
    """Base class of every exception that agent-telemetry defines."""


class ConfigError(TelemetryError, ValueError):
    """A configuration value is invalid.

    The message names the setting, the value that was given and what is expected.
    """

    def __init__(self, key: str, value: object, expected: str) -> None:
        self.key = key
        self.value = value
        self.expected = expected
        super().__init__(f"invalid {key}={value!r}: expected {expected}")


class SchemaError(TelemetryError):
    """The SQLite index has a schema this version of the library cannot use."""
