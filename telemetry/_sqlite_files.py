"""Low-level operations on SQLite database files and their -wal and -shm files.

Connecting to an existing database with a busy timeout, running a block in one
``BEGIN IMMEDIATE`` transaction, telling a lock from other SQLite errors, and copying,
overwriting, moving aside and removing a database together with its -wal and -shm files.
Nothing here logs. Every failure is raised to the caller, which decides what to report.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sqlite3
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from telemetry.errors import IndexLockedError

__all__ = [
    "connect_existing",
    "copy_database",
    "copy_database_files",
    "has_sqlite_header",
    "immediate_transaction",
    "is_lock_error",
    "move_database_files",
    "overwrite_database",
    "raising_lock_error",
    "remove_database_files",
    "scratch_path",
]

_FILE_MODE = 0o600

# The first 16 bytes of every SQLite 3 database file.
_SQLITE_HEADER = b"SQLite format 3\x00"

# SQLite's result code for a lock held by another connection (SQLITE_BUSY).
_SQLITE_BUSY = 5


# -- connections and locks -----------------------------------------------------------------


def connect_existing(path: Path, busy_timeout_ms: int) -> sqlite3.Connection:
    """Open a connection to the existing database ``path`` in autocommit mode."""
    # mode=rw: never create a database with the umask's permissions here.
    uri = f"file:{urllib.request.pathname2url(str(path))}?mode=rw"
    connection = sqlite3.connect(
        uri, uri=True, timeout=busy_timeout_ms / 1000, isolation_level=None
    )
    try:
        connection.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
    except BaseException:
        connection.close()
        raise
    return connection


@contextlib.contextmanager
def immediate_transaction(connection: sqlite3.Connection) -> Iterator[None]:
    """Run the block in one ``BEGIN IMMEDIATE`` transaction, rolled back on any exception."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            # A failed ROLLBACK must not hide the error that caused it.
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
        raise


@contextlib.contextmanager
def raising_lock_error(db_path: Path, busy_timeout_ms: int) -> Iterator[None]:
    """Turn the sqlite3.OperationalError of a lock that did not end into IndexLockedError."""
    try:
        yield
    except IndexLockedError:
        raise
    except sqlite3.OperationalError as exc:
        if not is_lock_error(exc):
            raise
        raise IndexLockedError(db_path, busy_timeout_ms) from exc


def is_lock_error(error: sqlite3.Error) -> bool:
    """Return whether ``error`` reports a lock held by another connection (SQLITE_BUSY)."""
    code = getattr(error, "sqlite_errorcode", None)  # Python 3.11 and later
    if code is not None:
        return bool(code & 0xFF == _SQLITE_BUSY)
    return "database is locked" in str(error)


def _backup(source: sqlite3.Connection, target: sqlite3.Connection) -> None:
    """Copy every page of ``source`` into ``target`` with SQLite's backup API.

    Raises:
        sqlite3.OperationalError: a lock on either database did not end within the busy
            timeout of the connection that waited for it.
    """

    def stop_when_locked(status: int, remaining: int, total: int) -> None:
        # sqlite3_backup_step waits for a lock through the busy handler and then returns
        # SQLITE_BUSY. Connection.backup then sleeps and calls it again without end (seen
        # with CPython 3.10 to 3.13), so the first SQLITE_BUSY ends the copy here.
        if status == _SQLITE_BUSY:
            raise sqlite3.OperationalError("database is locked")

    source.backup(target, progress=stop_when_locked)


# -- whole databases -----------------------------------------------------------------------


def has_sqlite_header(path: Path) -> bool:
    """Return whether ``path`` is empty or starts with SQLite's header string.

    The file is checked before SQLite opens it, because closing a connection to a file
    that is not a database deletes the -wal and -shm files beside it, which the backup
    should keep.
    """
    with open(path, "rb") as file:
        start = file.read(len(_SQLITE_HEADER))
    return not start or start == _SQLITE_HEADER


def copy_database(source_path: Path, backup_path: Path, busy_timeout_ms: int) -> None:
    """Copy the database at ``source_path`` to ``backup_path`` with SQLite's backup API.

    The copy is one consistent snapshot, written to a new file that then replaces the
    backup, so an interrupted copy never leaves a half-written backup.

    Raises:
        sqlite3.OperationalError: the source stayed locked for ``busy_timeout_ms``.
        sqlite3.Error, OSError: a file cannot be opened, read or written.
    """
    partial = _partial_path(backup_path)
    _create_private_file(partial)
    try:
        with (
            contextlib.closing(connect_existing(source_path, busy_timeout_ms)) as source,
            contextlib.closing(sqlite3.connect(partial, isolation_level=None)) as copy,
        ):
            _backup(source, copy)
        _remove_sidecars(backup_path)
        os.replace(partial, backup_path)
    except BaseException:
        remove_database_files(partial)
        raise


def copy_database_files(source_path: Path, target_path: Path) -> None:
    """Copy the bytes of a damaged database and of its -wal file to ``target_path``.

    SQLite cannot read such a database to copy it. Agents may write to the files
    meanwhile, so the copy is only as consistent as a damaged index can be.

    Raises:
        OSError: a file cannot be read or written.
    """
    _remove_sidecars(target_path)
    for source, target in (
        (f"{source_path}-wal", f"{target_path}-wal"),
        (source_path, target_path),
    ):
        partial = _partial_path(Path(target))
        _create_private_file(partial)
        try:
            shutil.copyfile(source, partial)
            os.replace(partial, target)
        except FileNotFoundError:
            os.unlink(partial)  # a database without a -wal file
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
            raise


def overwrite_database(source_path: Path, db_path: Path, busy_timeout_ms: int) -> None:
    """Replace every page of the database at ``db_path`` by those of ``source_path``.

    SQLite's backup API writes the pages under the target's write lock and through its
    -wal file, so other connections to ``db_path`` read the new content afterwards.

    Raises:
        sqlite3.OperationalError: either database stayed locked for ``busy_timeout_ms``,
            an error for which is_lock_error returns True.
        sqlite3.Error: SQLite cannot write the pages, such as into a WAL database of
            another page size.
    """
    with (
        contextlib.closing(connect_existing(source_path, busy_timeout_ms)) as source,
        contextlib.closing(connect_existing(db_path, busy_timeout_ms)) as target,
    ):
        _backup(source, target)


def move_database_files(db_path: Path, target_path: Path) -> None:
    """Rename the database at ``db_path`` and its -wal and -shm files to ``target_path``.

    The -wal file goes first, because SQLite applies an old -wal file to a WAL database
    put beside it (seen with SQLite 3.40).

    Raises:
        OSError: a file cannot be renamed.
    """
    _remove_sidecars(target_path)
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.replace(f"{db_path}{suffix}", f"{target_path}{suffix}")
    os.replace(db_path, target_path)


# -- file names and files ------------------------------------------------------------------


def scratch_path(db_path: Path, purpose: str) -> Path:
    """Return a new file name beside the index, such as ``telemetry.db.rebuild-4242-9f3a``."""
    return db_path.with_name(f"{db_path.name}.{purpose}-{os.getpid()}-{secrets.token_hex(4)}")


def remove_database_files(path: Path) -> None:
    """Delete the database at ``path`` and its -wal, -shm and -journal files, if they exist."""
    _remove_sidecars(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _partial_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.partial-{secrets.token_hex(4)}")


def _create_private_file(path: Path) -> None:
    descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, _FILE_MODE)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(descriptor, _FILE_MODE)  # the umask may have removed bits
    finally:
        os.close(descriptor)


def _remove_sidecars(path: Path) -> None:
    for suffix in ("-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}{suffix}")
