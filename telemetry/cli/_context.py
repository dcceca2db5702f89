"""The context of a subcommand: the resolved config, the store and the output streams.

A subcommand is a function ``handler(args, context) -> int`` that returns its exit code.
It reports an expected fault by raising CommandError (exit 1) or UsageError (exit 2) with
a one-line message. The command's main() prints that message without a traceback.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TextIO

from telemetry._sqlite_read_only import sidecar_paths
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
    "IndexAccessError",
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
    """An invalid command line, such as options that exclude each other; exit code 2."""

    exit_code = EXIT_USAGE


class IndexAccessError(CommandError):
    """This user may not read or write the index, which is not damaged; the command exits with 1."""


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
    _reader: DatabaseWriter | None = field(default=None, init=False, repr=False)
    _client: TelemetryClient | None = field(default=None, init=False, repr=False)

    def open_index(self, *, write: bool = True) -> DatabaseWriter:
        """Return the store's index, opened once per command.

        Args:
            write: open it for writing, as the commands that change the store need.
                Without it, the index is opened read-only: nothing is created, migrated
                or changed, and a store that this user may only read can be read. An
                index already opened for writing is returned for reads too.

        Raises:
            IndexUnusableError: there is no index file, it is not a SQLite database, or
                its schema is one this version cannot use, such as one written by a
                newer version of agent-telemetry. The message gives the fix.
            IndexAccessError: this user may not read the index (or write it, with
                ``write``), or its file system is read-only and ``write`` is true.
            sqlite3.OperationalError: another process keeps the index locked; main()
                reports it with index_locked_message.
        """
        if self._index is not None:
            return self._index
        if not write and self._reader is not None:
            return self._reader
        path = self.config.db_path
        _check_index_file(self.config)
        if write:
            _check_writable(path)
        try:
            index = DatabaseWriter(path, busy_timeout_ms=INDEX_BUSY_TIMEOUT_MS, read_only=not write)
        except SchemaError as exc:
            # The message names the schema version found and the fix, such as upgrading.
            raise IndexUnusableError(str(exc), state="incompatible") from None
        except PermissionError as exc:
            raise IndexAccessError(_access_message(path, exc, write=write)) from None
        except sqlite3.DatabaseError as exc:
            if is_lock_error(exc):
                raise
            if isinstance(exc, sqlite3.OperationalError) and _is_access_fault(exc):
                raise IndexAccessError(_access_message(path, exc, write=write)) from None
            raise IndexUnusableError(
                f"the index {path} cannot be read ({exc}): "
                "run 'telemetry rebuild' to rebuild it from the journal",
                state="unreadable",
            ) from None
        if write:
            self._index = index
        else:
            self._reader = index
        return index

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
        for index in (self._index, self._reader):
            if index is not None:
                index.close()
        self._index = None
        self._reader = None


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _check_index_file(config: TelemetryConfig) -> None:
    """Raise IndexUnusableError when the index is missing or is a directory."""
    path = config.db_path
    if path.is_dir():
        if config.sources.get("db_path") == "default":
            fix = "move that directory away, or set TELEMETRY_DB_PATH to an index file"
        else:
            fix = f"set TELEMETRY_DB_PATH to the index file, such as {path / 'telemetry.db'}"
        raise IndexUnusableError(
            f"the index path {path} is a directory, not an index file: {fix}", state="missing"
        )
    if not path.is_file():
        raise IndexUnusableError(
            f"no index at {path}: run an agent first, or pass --data-dir or set "
            "TELEMETRY_DATA_DIR to the store to read",
            state="missing",
        )


def _check_writable(path: Path) -> None:
    """Raise IndexAccessError unless this user may write the index and create files beside it.

    SQLite would report these faults as "attempt to write a readonly database" or
    "unable to open database file", which read like damage.
    """
    wal, shm = sidecar_paths(path)
    needed = [(path, os.R_OK | os.W_OK), (path.parent, os.W_OK | os.X_OK)]
    needed += [(file, os.R_OK | os.W_OK) for file in (wal, shm) if file.exists()]
    for file, mode in needed:
        if not os.access(file, mode):
            error = PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
            raise IndexAccessError(_access_message(path, error, write=True))


def _is_access_fault(error: sqlite3.OperationalError) -> bool:
    """Return whether SQLite's ``error`` reports missing permissions rather than damage."""
    message = str(error).lower()
    return "readonly" in message or "unable to open" in message


def _access_message(path: Path, error: OSError | sqlite3.Error, *, write: bool) -> str:
    """Return the one-line message for an index that this user may not open."""
    access = "for writing" if write else "read-only"
    if write and _on_read_only_file_system(path.parent):
        return (
            f"cannot open the index {path} for writing: {path.parent} is on a read-only "
            "file system. The commands that only read (runs, show, stats, export, tail) "
            "work there"
        )
    if isinstance(error, OSError):
        reason = f"permission denied on {error.filename or path}"
    else:
        reason = f"{error}, so this user lacks permissions on {path.parent} or its files"
    owner = _owner_of(path)
    return f"cannot open the index {path} {access}: {reason}. Run the command as {owner}"


def _owner_of(path: Path) -> str:
    """Return "the store's owner (user NAME)", with the uid when the name is unknown."""
    try:
        uid = path.stat().st_uid
    except OSError:
        return "the store's owner"
    try:
        import pwd

        return f"the store's owner (user {pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        return f"the store's owner (uid {uid})"


def _on_read_only_file_system(directory: Path) -> bool:
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except (AttributeError, OSError):
        return False
