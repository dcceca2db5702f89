"""Exceptions raised by agent-telemetry.

Only misuse of the API raises into the caller. Storage and network faults are logged by
the client instead, so these classes mostly reach code that uses the writers directly.

    TelemetryError
    ├── ConfigError        (also a ValueError) an invalid setting
    ├── SchemaError        the index was written by a newer version of the library
    └── IndexLockedError   (also a sqlite3.OperationalError) the index stayed locked
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

__all__ = ["ConfigError", "IndexLockedError", "SchemaError", "TelemetryError"]


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


class IndexLockedError(TelemetryError, sqlite3.OperationalError):
    """The index stayed locked by another connection's write transaction.

    It is also a sqlite3.OperationalError, the exception that the sqlite3 module raises for
    such a lock, so handlers written for that exception still catch it.
    """

    path: Path
    """The index file."""
    waited_ms: int
    """How long the rebuild waited for the lock, in milliseconds."""

    def __init__(self, path: Path, waited_ms: int) -> None:
        self.path = path
        self.waited_ms = waited_ms
        super().__init__(
            f"the index {path} is locked by a write transaction of another process, which "
            f"did not end within {waited_ms / 1000:g} s: retry when it ends. Agents hold "
            "the lock only briefly, so a longer lock usually means that another rebuild or "
            "prune is running"
        )

    def __reduce__(self) -> tuple[type[IndexLockedError], tuple[Path, int]]:
        return type(self), (self.path, self.waited_ms)
