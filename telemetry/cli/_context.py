"""What every subcommand gets: the resolved config, the store, the output streams.

A subcommand is a function ``handler(args, context) -> int`` that returns its exit code.
It reports an expected fault by raising CommandError (exit 1) or UsageError (exit 2) with
a one-line message; the command's main() prints it and never shows a traceback for it.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TextIO

from telemetry.cli._output import Progress
from telemetry.client import TelemetryClient
from telemetry.config import TelemetryConfig
from telemetry.database import DEFAULT_BUSY_TIMEOUT_MS, DatabaseWriter
from telemetry.errors import ConfigError, IndexLockedError, SchemaError
from telemetry.journal import JournalReader

__all__ = [
    "EXIT_OK",
    "EXIT_PROBLEM",
    "EXIT_USAGE",
    "INDEX_BUSY_TIMEOUT_MS",
    "CommandContext",
    "CommandError",
    "IndexUnusableError",
    "UsageError",
    "index_locked_message",
    "is_lock_error",
]

EXIT_OK = 0
EXIT_PROBLEM = 1
"""A problem was found (check) or an operation failed."""
EXIT_USAGE = 2

INDEX_BUSY_TIMEOUT_MS = DEFAULT_BUSY_TIMEOUT_MS
"""Milliseconds that each statement on the index waits for another process's lock before
it fails (SQLite's busy timeout). Writes that fail so are retried by DatabaseWriter."""

IndexState = Literal["missing", "unreadable", "incompatible"]


class CommandError(Exception):
    """An expected fault, reported as one line on stderr; the command exits with 1."""

    exit_code = EXIT_PROBLEM


class UsageError(CommandError):
    """The command line asks for something impossible; the command exits with 2."""

    exit_code = EXIT_USAGE


class IndexUnusableError(CommandError):
    """The store's index cannot be used; the command exits with 1.

    Attributes:
        state: ``missing`` (no file), ``unreadable`` (not an SQLite database, or damaged)
            or ``incompatible`` (a schema that this version of agent-telemetry cannot use,
            such as one written by a newer version).
    """

    def __init__(self, message: str, *, state: IndexState) -> None:
        super().__init__(message)
        self.state = state


def is_lock_error(error: BaseException) -> bool:
    """Return whether ``error`` reports that another connection holds a lock on the index.

    That is an IndexLockedError from rebuild_index, or a sqlite3.OperationalError whose
    message contains "locked", as DatabaseWriter raises when its retries run out.
    """
    if isinstance(error, IndexLockedError):
        return True
    return isinstance(error, sqlite3.OperationalError) and "locked" in str(error).lower()


def index_locked_message(path: Path) -> str:
    """Return the one-line message for an index that another process keeps locked."""
    return (
        f"the index {path} is locked: another process holds a write transaction on it. "
        "Retry when that transaction ends. Agents hold the lock only for a moment, so a "
        "longer lock usually means that another rebuild or prune is running"
    )


@dataclass
class CommandContext:
    """The store a subcommand works on and where it writes.

    Attributes:
        config: the resolved settings, with --data-dir applied.
        ignored_settings: invalid TELEMETRY_* variables whose defaults are in use.
        out: where results go (stdout).
        err: where progress, warnings and errors go (stderr).
    """

    config: TelemetryConfig
    ignored_settings: tuple[ConfigError, ...]
    out: TextIO
    err: TextIO
    _index: DatabaseWriter | None = field(default=None, init=False, repr=False)
    _client: TelemetryClient | None = field(default=None, init=False, repr=False)

    def open_index(self) -> DatabaseWriter:
        """Return the store's index, opened once per command.

        Raises:
            IndexUnusableError: there is no index file, it is not a SQLite database, or
                its schema is one this version cannot use, such as one written by a
                newer version of agent-telemetry. The message gives the fix.
            sqlite3.OperationalError: another process keeps the index locked; main()
                reports it with index_locked_message.
        """
        if self._index is not None:
            return self._index
        path = self.config.db_path
        if not path.is_file():
            raise IndexUnusableError(
                f"no index at {path}: run an agent first, or pass --data-dir or set "
                "TELEMETRY_DATA_DIR to the store to read",
                state="missing",
            )
        try:
            self._index = DatabaseWriter(path, busy_timeout_ms=INDEX_BUSY_TIMEOUT_MS)
        except SchemaError as exc:
            # The message names the schema version found and the fix, such as upgrading.
            raise IndexUnusableError(str(exc), state="incompatible") from None
        except sqlite3.DatabaseError as exc:
            if is_lock_error(exc):
                raise
            raise IndexUnusableError(
                f"the index {path} cannot be read ({exc}): "
                "run 'telemetry rebuild' to rebuild it from the journal",
                state="unreadable",
            ) from None
        return self._index

    def journal(self) -> JournalReader:
        """Return a reader of the store's journal directory (which may not exist yet)."""
        return JournalReader(self.config.ndjson_dir)

    def client(self) -> TelemetryClient:
        """Return a client of the store, for commands that record or post runs.

        The client records and posts even when TELEMETRY_ENABLED is false: that setting
        switches off what agents record, not the repairs and posts asked for here. Its
        end_run does not post to the API (end_run_timeout 0): posting is the job of
        ``telemetry flush``.
        """
        if self._client is None:
            self._client = TelemetryClient(self.config.replace(enabled=True, end_run_timeout=0))
        return self._client

    def progress(self, label: str, total: int, *, lines: bool = True) -> Progress:
        """Return a progress display for ``total`` steps on stderr.

        A bar redrawn in place when stderr is a terminal. Otherwise a plain line at each
        tenth of the work, so logs of scheduled jobs stay readable, or nothing when
        ``lines`` is false (for work that is only slow on large stores).
        """
        return Progress(label, total, self.err, bar=_is_terminal(self.err), lines=lines)

    def close(self) -> None:
        """Close the client and the index, if they were opened."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._index is not None:
            self._index.close()
            self._index = None


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
