"""What every subcommand gets: the resolved config, the store, the output streams.

A subcommand is a function ``handler(args, context) -> int`` that returns its exit code.
It reports an expected fault by raising CommandError (exit 1) or UsageError (exit 2) with
a one-line message; the command's main() prints it and never shows a traceback for it.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from typing import TextIO

from telemetry.cli._output import Progress
from telemetry.client import TelemetryClient
from telemetry.config import TelemetryConfig
from telemetry.database import DatabaseWriter
from telemetry.errors import ConfigError
from telemetry.journal import JournalReader

__all__ = [
    "EXIT_OK",
    "EXIT_PROBLEM",
    "EXIT_USAGE",
    "CommandContext",
    "CommandError",
    "UsageError",
]

EXIT_OK = 0
EXIT_PROBLEM = 1
"""A problem was found (check) or an operation failed."""
EXIT_USAGE = 2


class CommandError(Exception):
    """An expected fault, reported as one line on stderr; the command exits with 1."""

    exit_code = EXIT_PROBLEM


class UsageError(CommandError):
    """The command line asks for something impossible; the command exits with 2."""

    exit_code = EXIT_USAGE


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
            CommandError: there is no index file, it is not a SQLite database, or it was
                written by a newer version of agent-telemetry. The message says what to do.
        """
        if self._index is not None:
            return self._index
        path = self.config.db_path
        if not path.is_file():
            raise CommandError(
                f"no index at {path}: run an agent first, or pass --data-dir or set "
                "TELEMETRY_DATA_DIR to the store to read"
            )
        try:
            self._index = DatabaseWriter(path)
        except sqlite3.DatabaseError as exc:
            raise CommandError(
                f"the index {path} cannot be read ({exc}): "
                "run 'telemetry rebuild' to rebuild it from the journal"
            ) from None
        return self._index

    def journal(self) -> JournalReader:
        """Return a reader of the store's journal directory (which may not exist yet)."""
        return JournalReader(self.config.ndjson_dir)

    def client(self) -> TelemetryClient:
        """Return a client of the store, for commands that record or post runs.

        Its end_run does not post to the API (end_run_timeout 0): posting is the job of
        ``telemetry flush``.
        """
        if self._client is None:
            self._client = TelemetryClient(self.config.replace(end_run_timeout=0))
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
