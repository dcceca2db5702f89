"""Rebuilding the SQLite index from the journal, and comparing the two.

rebuild_index folds the journal into runs and writes them into a new database file
beside the index. It then copies that file's rows into the index in one write
transaction. A usable index file is never renamed or replaced, because agents' processes
may have it open, and their connections keep using the -wal and -shm files at the index's
path. In a test with SQLite 3.40, a connection to the old file wrote into the -wal file
of a file renamed over it, and new connections then read the old rows. The old index is
first copied to ``<db_path>.bak``.

The copy uses one SQL transaction rather than SQLite's backup API, because a backup into
the index cannot start while a connection to the index has a transaction open (Python
raises "destination database is in use"). A backup would therefore overwrite the rows
that agents commit between the last read of the index and the copy. One ``BEGIN
IMMEDIATE`` transaction reads those rows and merges the new rows in under the same write
lock. Readers see the old rows or the new ones, never a mix, and writers wait for the
lock through their busy timeout.

Logger: ``telemetry.rebuild``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import os
import secrets
import shutil
import sqlite3
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

from telemetry._schema import _COLUMNS, TABLE
from telemetry.database import DatabaseWriter
from telemetry.errors import SchemaError
from telemetry.journal import JournalReader, JournalRuns
from telemetry.models import RunRecord

__all__ = [
    "BACKUP_SUFFIX",
    "Consistency",
    "RebuildResult",
    "compare_index_with_journal",
    "rebuild_index",
]

logger = logging.getLogger("telemetry.rebuild")

BACKUP_SUFFIX = ".bak"
"""Added to the index's file name to name the copy of the old index."""

WRITE_BATCH_SIZE = 1000
"""Runs written to the new file per transaction, and per call of progress("write", ...)."""

SWAP_BUSY_TIMEOUT_MS = 30_000
"""How long the final copy waits for agents' write transactions on the index to end."""

_FILE_MODE = 0o600

# The first 16 bytes of every SQLite 3 database file.
_SQLITE_HEADER = b"SQLite format 3\x00"

# The columns that the journal does not record: the API sync state changes after a run
# ends, and updated_at changes with it.
_SYNC_COLUMNS = ("api_posted", "api_posted_at", "api_retry_count", "api_last_error", "updated_at")
_JOURNALED_COLUMNS = tuple(name for name in _COLUMNS if name not in _SYNC_COLUMNS)

# A run that has ended in the index but is running in the new rows ended while the rebuild
# read the journal, or its run_end line is missing. Either way the index row is the later
# state of the run, so it is kept whole.
_KEEP_LIVE_ROW = "(live.status != 'running' AND excluded.status = 'running')"

# Rows of the new file are inserted into the index. A row that exists in both is updated
# only when a journaled column has another value in the journal. The update takes the
# journaled columns from the new row, and the sync columns too when the status differs,
# because the API has not seen that state. A run that only the index has keeps its row.
_COLUMN_LIST = ", ".join(_COLUMNS)
_MERGE_SQL = (
    f"INSERT INTO main.{TABLE} AS live ({_COLUMN_LIST}) "
    f"SELECT {_COLUMN_LIST} FROM rebuilt.{TABLE} WHERE true "
    "ON CONFLICT (run_id) DO UPDATE SET "
    + ", ".join(
        f"{name} = CASE WHEN live.status = excluded.status THEN live.{name} "
        f"ELSE excluded.{name} END"
        if name in _SYNC_COLUMNS
        else f"{name} = excluded.{name}"
        for name in _COLUMNS
        if name != "run_id"
    )
    + f" WHERE NOT {_KEEP_LIVE_ROW} AND ("
    + " OR ".join(f"live.{name} IS NOT excluded.{name}" for name in _JOURNALED_COLUMNS)
    + ")"
)
_KEPT_SYNC_STATE_SQL = (
    f"SELECT COUNT(*) FROM rebuilt.{TABLE} AS excluded "
    f"JOIN main.{TABLE} AS live ON live.run_id = excluded.run_id "
    f"WHERE live.status = excluded.status OR {_KEEP_LIVE_ROW}"
)


class RebuildResult(NamedTuple):
    """Counts of the runs, files and lines that rebuild_index read and wrote."""

    runs: int
    """Runs read from the journal and written to the index."""
    files: int
    """Journal files read."""
    corrupt_lines: int
    """Journal lines skipped, plus runs the index rejected (each logged as a WARNING)."""
    backup_path: Path | None
    """The copy of the old index, or None when there was no index."""
    kept_sync_state: int
    """Runs whose API sync state and updated_at were taken from the old index."""


class Consistency(NamedTuple):
    """Differences between the runs of the index and those of the journal, by run id."""

    index_only: list[str]
    """Runs in the index that no journal line describes."""
    journal_only: list[str]
    """Runs in the journal that the index does not have."""
    status_differs: list[tuple[str, str, str]]
    """(run_id, index status, journal status) of runs whose statuses differ."""


def compare_index_with_journal(
    index_statuses: Mapping[str, str], journal: JournalRuns
) -> Consistency:
    """Compare the statuses of the index's runs with the runs folded from the journal.

    Args:
        index_statuses: run_id to status, such as DatabaseWriter.run_statuses() returns.
        journal: the runs of the journal, from JournalReader.fold_runs().

    Returns:
        The differences, each list sorted by run id, which sorts runs by start time.
    """
    journal_runs = journal.runs
    index_only = sorted(run_id for run_id in index_statuses if run_id not in journal_runs)
    journal_only = sorted(run_id for run_id in journal_runs if run_id not in index_statuses)
    status_differs = sorted(
        (run_id, status, journal_runs[run_id].status)
        for run_id, status in index_statuses.items()
        if run_id in journal_runs and journal_runs[run_id].status != status
    )
    return Consistency(index_only, journal_only, status_differs)


def rebuild_index(
    db_path: str | os.PathLike[str],
    journal_dir: str | os.PathLike[str],
    *,
    progress: Callable[[str, int, int], None] | None = None,
) -> RebuildResult:
    """Rebuild the index at ``db_path`` from the journal files in ``journal_dir``.

    The steps:

    1. Fold the journal into runs (JournalReader.fold_runs), calling
       ``progress("read", files_done, files_total)``.
    2. Write the runs into a new file beside ``db_path``, with the API sync state of each
       run reset to pending, calling ``progress("write", runs_done, runs_total)``.
    3. Copy the old index to ``db_path + ".bak"`` with SQLite's backup API, replacing an
       older backup and its -wal and -shm files.
    4. Copy the new rows into the index in one write transaction, merged as below, and
       delete the new file.

    An index that SQLite cannot read or that fails its integrity check is damaged. Its
    file and -wal file are copied byte for byte to the backup, and the backup API then
    replaces every page of the index with the new file's, so no row of the old index is
    kept. Two kinds of index are renamed to the backup path instead, with their -wal and
    -shm files: a file that is not an SQLite database, and a damaged index that the backup
    API cannot write, such as one in WAL mode with another page size. The new rows then go
    into a new index.

    The merge makes the rebuilt index equal to a live one for the same runs. For a run whose
    index row has the same status, the API sync columns (api_posted, api_posted_at,
    api_retry_count, api_last_error) and updated_at stay as the index has them, because the
    journal does not record them. The other columns come from the journal. A run whose
    status differs, or that the index lacks, gets the journal's row and is pending. Rows
    that agents write while the rebuild runs are not lost. A run that ends meanwhile keeps
    its index row, and a run only the index has (started meanwhile, or missing from the
    journal) keeps its row too. compare_index_with_journal lists the latter.

    A failure or an exception from ``progress`` before step 3 leaves the index and its
    backup untouched. A failure in step 4 rolls the transaction back, so the index keeps
    its old rows, and the backup has been replaced by a copy of them. The new file is
    deleted in every case.

    NOTE: a renamed index may still be open in agents' processes. In a test with SQLite
    3.40, such a connection kept writing to the renamed files, so runs that those agents
    write until they restart go to the backup. Those runs are in the journal, and the
    next rebuild adds them. When a damaged index is overwritten, the runs that agents
    wrote to it after step 1 are lost from it in the same way, and are in the journal too.
    NOTE: a rebuild killed in step 2 leaves its new file, ``<db name>.rebuild-*``, beside
    the index. Delete it by hand.

    Returns:
        The counts of runs, files and corrupt lines, the backup's path (None when there was
        no index), and the number of runs whose sync state was kept.

    Raises:
        SchemaError: the index was written by a newer version of agent-telemetry, or has
            an agent_runs table that agent-telemetry did not create. Nothing is changed.
        sqlite3.OperationalError: the index stayed locked for SWAP_BUSY_TIMEOUT_MS in step
            4, or cannot be opened.
        sqlite3.Error, OSError: a file cannot be read or written.
        Any exception raised by ``progress``.
    """
    db_path = Path(os.path.abspath(os.fspath(db_path)))
    journal_dir = Path(journal_dir)

    # Fail before the long read on an index that rebuilding must not touch.
    _check_schema(db_path)

    journal = JournalReader(journal_dir).fold_runs(
        None if progress is None else lambda done, total: progress("read", done, total)
    )
    corrupt_lines = sum(journal.corrupt_lines.values())

    rebuilt_path = db_path.with_name(f"{db_path.name}.rebuild-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        written, rejected = _write_runs(rebuilt_path, journal.runs.values(), progress)
        backup_path, kept_sync_state, changed = _swap_in(db_path, rebuilt_path, written)
    finally:
        _remove_database_files(rebuilt_path)

    logger.info(
        "rebuilt index %s from %d journal files: %d runs read, %d rows changed, %d with "
        "their API sync state kept, %d corrupt lines skipped",
        db_path,
        journal.files,
        written,
        changed,
        kept_sync_state,
        corrupt_lines + rejected,
    )
    return RebuildResult(
        runs=written,
        files=journal.files,
        corrupt_lines=corrupt_lines + rejected,
        backup_path=backup_path,
        kept_sync_state=kept_sync_state,
    )


# -- writing the new file ----------------------------------------------------------------


def _write_runs(
    path: Path,
    runs: Iterable[RunRecord],
    progress: Callable[[str, int, int], None] | None,
) -> tuple[int, int]:
    """Write ``runs`` into a new database at ``path`` as pending; return (written, rejected).

    A batch that the index rejects, because a value passed the journal's checks but not
    the index's, is written again one run at a time, and each rejected run is logged.
    """
    records = [_as_pending(record) for record in runs]
    total = len(records)
    written = rejected = 0
    with DatabaseWriter(path) as rebuilt:
        if progress is not None:
            progress("write", 0, total)
        for start in range(0, total, WRITE_BATCH_SIZE):
            batch = records[start : start + WRITE_BATCH_SIZE]
            try:
                written += rebuilt.load_runs(batch, batch_size=WRITE_BATCH_SIZE)
            except (TypeError, ValueError):
                for record in batch:
                    if _load_one(rebuilt, record):
                        written += 1
                    else:
                        rejected += 1
            if progress is not None:
                progress("write", start + len(batch), total)
    return written, rejected


def _as_pending(record: RunRecord) -> RunRecord:
    return dataclasses.replace(
        record, api_posted=False, api_posted_at=None, api_retry_count=0, api_last_error=None
    )


def _load_one(rebuilt: DatabaseWriter, record: RunRecord) -> bool:
    try:
        rebuilt.load_runs([record])
    except (TypeError, ValueError) as exc:
        logger.warning("run %s from the journal is left out of the index: %s", record.run_id, exc)
        return False
    return True


# -- the old index -------------------------------------------------------------------------


class _IndexState(enum.Enum):
    MISSING = "missing"
    USABLE = "usable"
    DAMAGED = "damaged"
    """An SQLite file that cannot be read or fails SQLite's integrity check."""
    NOT_A_DATABASE = "not a database"


def _check_schema(db_path: Path) -> None:
    """Raise SchemaError if ``db_path`` is an index that this library must not rewrite.

    Opening migrates an older schema, as any client opening the index would.
    """
    if not db_path.exists() or not _has_sqlite_header(db_path):
        return
    try:
        DatabaseWriter(db_path).close()
    except SchemaError:
        raise
    except sqlite3.OperationalError:
        raise
    except sqlite3.DatabaseError:
        pass  # a damaged index, replaced in step 3


def _inspect_index(db_path: Path) -> _IndexState:
    """Return the state of the index at ``db_path``, running SQLite's integrity check.

    Raises:
        SchemaError: as rebuild_index.
        sqlite3.OperationalError: the index is locked or cannot be opened.
    """
    if not db_path.exists():
        return _IndexState.MISSING
    if not _has_sqlite_header(db_path):
        logger.warning("index %s is not an SQLite database", db_path)
        return _IndexState.NOT_A_DATABASE
    try:
        with DatabaseWriter(db_path) as index:
            ok, messages = index.check_integrity()
    except sqlite3.OperationalError:
        raise
    except sqlite3.DatabaseError as exc:
        logger.warning("index %s cannot be read: %s", db_path, exc)
        return _IndexState.DAMAGED
    if not ok:
        logger.warning("index %s failed the integrity check: %s", db_path, "; ".join(messages[:3]))
        return _IndexState.DAMAGED
    return _IndexState.USABLE


def _has_sqlite_header(path: Path) -> bool:
    """Return whether ``path`` is empty or starts with SQLite's header string.

    The file is checked before SQLite opens it, because closing a connection to a file
    that is not a database deletes the -wal and -shm files beside it, which the backup
    should keep.
    """
    with open(path, "rb") as file:
        start = file.read(len(_SQLITE_HEADER))
    return not start or start == _SQLITE_HEADER


def _copy_database(source_path: Path, backup_path: Path) -> None:
    """Copy the database at ``source_path`` to ``backup_path`` with SQLite's backup API.

    The copy is one consistent snapshot, written to a new file that then replaces the
    backup, so an interrupted copy never leaves a half-written backup.
    """
    partial = _partial_path(backup_path)
    _create_private_file(partial)
    try:
        with (
            contextlib.closing(_connect(source_path)) as source,
            contextlib.closing(sqlite3.connect(partial, isolation_level=None)) as copy,
        ):
            source.backup(copy)
        _remove_sidecars(backup_path)
        os.replace(partial, backup_path)
    except BaseException:
        _remove_database_files(partial)
        raise


def _copy_files(db_path: Path, backup_path: Path) -> None:
    """Copy the bytes of a damaged database and of its -wal file to ``backup_path``.

    SQLite cannot read such a database to copy it. Agents may write to the files
    meanwhile, so the copy is only as consistent as a damaged index can be.
    """
    _remove_sidecars(backup_path)
    for source, target in ((f"{db_path}-wal", f"{backup_path}-wal"), (db_path, backup_path)):
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


def _overwrite_database(source_path: Path, db_path: Path) -> bool:
    """Replace every page of the database at ``db_path`` by those of ``source_path``.

    SQLite's backup API writes the pages under the index's write lock and through its
    -wal file, so connections that agents hold to the index read the new content
    afterwards. Returns False, with a WARNING, when SQLite cannot write the pages, such
    as into a WAL database of another page size.
    """
    try:
        with (
            contextlib.closing(_connect(source_path)) as source,
            contextlib.closing(_connect(db_path)) as target,
        ):
            source.backup(target)
    except sqlite3.Error as exc:
        logger.warning("cannot overwrite the damaged index %s: %s", db_path, exc)
        return False
    return True


def _move_aside(db_path: Path, backup_path: Path) -> None:
    """Rename the database at ``db_path`` and its -wal and -shm files to ``backup_path``.

    The -wal file goes first, because SQLite applies an old -wal file to a WAL database
    put beside it (seen with SQLite 3.40).
    """
    _remove_sidecars(backup_path)
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.replace(f"{db_path}{suffix}", f"{backup_path}{suffix}")
    os.replace(db_path, backup_path)
    logger.warning(
        "moved the index %s, which is not a usable database, to %s; a new index is built "
        "from the journal",
        db_path,
        backup_path,
    )


# -- the copy into the index ---------------------------------------------------------------


def _swap_in(db_path: Path, rebuilt_path: Path, rows: int) -> tuple[Path | None, int, int]:
    """Back up the index and bring the ``rows`` rows of ``rebuilt_path`` into it.

    Returns the backup's path (None without an index), the number of runs whose sync
    state was kept, and the number of rows inserted or changed.
    """
    backup_path = db_path.with_name(db_path.name + BACKUP_SUFFIX)
    state = _inspect_index(db_path)

    if state is _IndexState.MISSING:
        return (None, *_merge_into_index(db_path, rebuilt_path))
    if state is _IndexState.USABLE:
        _copy_database(db_path, backup_path)
        return (backup_path, *_merge_into_index(db_path, rebuilt_path))
    if state is _IndexState.DAMAGED:
        _copy_files(db_path, backup_path)
        if _overwrite_database(rebuilt_path, db_path):
            logger.warning(
                "replaced the content of the damaged index %s; its old files are copied to %s",
                db_path,
                backup_path,
            )
            return backup_path, 0, rows

    # A file that is not a database, or a damaged index that SQLite could not overwrite.
    _move_aside(db_path, backup_path)
    return (backup_path, *_merge_into_index(db_path, rebuilt_path))


def _merge_into_index(db_path: Path, rebuilt_path: Path) -> tuple[int, int]:
    """Merge the rows of ``rebuilt_path`` into the index in one transaction.

    Returns (runs whose sync state was kept, rows inserted or changed).
    """
    # Creates the index and its schema if the index is missing or was moved aside.
    DatabaseWriter(db_path).close()

    with contextlib.closing(_connect(db_path)) as connection:
        connection.execute("ATTACH DATABASE ? AS rebuilt", (str(rebuilt_path),))
        with _immediate_transaction(connection):
            kept = int(connection.execute(_KEPT_SYNC_STATE_SQL).fetchone()[0])
            before = connection.total_changes
            connection.execute(_MERGE_SQL)
            changed = connection.total_changes - before
        connection.execute("DETACH DATABASE rebuilt")
    return kept, changed


@contextlib.contextmanager
def _immediate_transaction(connection: sqlite3.Connection) -> Iterator[None]:
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


def _connect(path: Path) -> sqlite3.Connection:
    """Open a connection to the existing database ``path`` in autocommit mode."""
    # mode=rw: never create a database with the umask's permissions here.
    uri = f"file:{urllib.request.pathname2url(str(path))}?mode=rw"
    connection = sqlite3.connect(
        uri, uri=True, timeout=SWAP_BUSY_TIMEOUT_MS / 1000, isolation_level=None
    )
    try:
        connection.execute(f"PRAGMA busy_timeout = {SWAP_BUSY_TIMEOUT_MS}")
    except BaseException:
        connection.close()
        raise
    return connection


# -- files ---------------------------------------------------------------------------------


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


def _partial_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.partial-{secrets.token_hex(4)}")


def _remove_database_files(path: Path) -> None:
    _remove_sidecars(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
