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
import itertools
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
from telemetry.errors import SchemaError, TelemetryError
from telemetry.journal import JournalReader, JournalRuns
from telemetry.models import RunRecord

__all__ = [
    "BACKUP_SUFFIX",
    "Consistency",
    "IndexLockedError",
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
"""How long rebuild_index waits, by default, for agents' write transactions on the index."""

_FILE_MODE = 0o600

# The first 16 bytes of every SQLite 3 database file.
_SQLITE_HEADER = b"SQLite format 3\x00"

# SQLite's result code for a lock held by another connection (SQLITE_BUSY).
_SQLITE_BUSY = 5

# The range of SQLite's rowids, which the scan of a damaged table steps through.
_MIN_ROWID = -(2**63)
_MAX_ROWID = 2**63 - 1

# Rows of a damaged index that are left out get one WARNING each up to this count.
_MAX_ROW_WARNINGS = 10

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

# Reads a damaged table without any index, from a rowid on, so that a scan stopped by a
# damaged page can start again after it.
_SCAN_SQL = (
    f"SELECT rowid AS scan_rowid, {_COLUMN_LIST} FROM {TABLE} NOT INDEXED "
    "WHERE rowid >= ? ORDER BY rowid"
)


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


class RebuildResult(NamedTuple):
    """Counts of the runs, files and lines that rebuild_index read and wrote."""

    runs: int
    """Runs read from the journal and written to the index."""
    files: int
    """Journal files read."""
    corrupt_lines: int
    """Journal lines skipped because they are not valid JSON or not a valid run."""
    backup_path: Path | None
    """The copy of the old index, or None when there was no index."""
    kept_sync_state: int
    """Runs whose API sync state and updated_at were taken from the old index."""
    rejected_runs: int
    """Runs of the journal that the index rejected and that are left out (each logged)."""


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
    busy_timeout_ms: int | None = None,
) -> RebuildResult:
    """Rebuild the index at ``db_path`` from the journal files in ``journal_dir``.

    The steps:

    1. Fold the journal into runs (JournalReader.fold_runs), calling
       ``progress("read", files_done, files_total)``.
    2. Write the runs into a new file beside ``db_path``, with the API sync state of each
       run reset to pending, calling ``progress("write", runs_done, runs_total)``.
    3. Copy the old index to ``db_path + BACKUP_SUFFIX`` with SQLite's backup API,
       replacing an older backup and its -wal and -shm files.
    4. Copy the new rows into the index in one write transaction, merged as below, and
       delete the new file.

    The merge makes the rebuilt index equal to a live one for the same runs. For a run whose
    index row has the same status, the API sync columns (api_posted, api_posted_at,
    api_retry_count, api_last_error) and updated_at stay as the index has them, because the
    journal does not record them. The other columns come from the journal. A run whose
    status differs, or that the index lacks, gets the journal's row and is pending. Rows
    that agents write while the rebuild runs are not lost. A run that ends meanwhile keeps
    its index row, and a run only the index has (started meanwhile, or missing from the
    journal) keeps its row too. compare_index_with_journal lists the latter.

    An index that SQLite cannot read or that fails its integrity check is damaged. Its
    file and -wal file are copied byte for byte to the backup in step 3, and step 4 keeps
    what it can of its rows:

    - REINDEX runs on a second copy of the damaged files. When that copy then passes the
      integrity check, the damage was in the secondary indexes only, and REINDEX runs on
      the index itself, which is then merged into as above. Every row is kept, also those
      that agents write meanwhile. REINDEX is tried on a copy first because it frees and
      allocates pages, and in a file whose page lists are damaged that could overwrite
      rows of the table.
    - Otherwise the rows that SQLite can still read are copied from the second copy into
      a new file, scanning the table without any index and skipping the ranges of rowids
      that cannot be read. A row that cannot be read whole, or that is not a valid run, is
      left out. The new rows are merged into that file as into a usable index, so the
      salvaged runs keep their API sync state by the same rule, and the runs only the
      damaged index has are kept. SQLite's backup API then replaces every page of the
      damaged index with that file's pages.

    Two kinds of index are renamed to the backup path instead, with their -wal and -shm
    files: a file that is not an SQLite database, and a damaged index that the backup API
    cannot write, such as one in WAL mode with another page size. The new rows, merged
    with what was salvaged, then go into a new index.

    A failure or an exception from ``progress`` before step 3 leaves the index and its
    backup untouched. A failure in step 4 rolls the transaction back, so the index keeps
    its old rows, and the backup has been replaced by a copy of them. The new file and
    the copies of a damaged index are deleted in every case.

    NOTE: a renamed index may still be open in agents' processes. In a test with SQLite
    3.40, such a connection kept writing to the renamed files, so runs that those agents
    write until they restart go to the backup. Those runs are in the journal, and the
    next rebuild adds them. When the pages of a damaged index are replaced, the rows that
    agents wrote to it after its copy in step 3 are lost from it in the same way, and are
    in the journal too.
    NOTE: a rebuild killed in step 2 or 4 may leave its new file, ``<db name>.rebuild-*``,
    or the copies of a damaged index, ``<db name>.repair-*`` and ``<db name>.salvage-*``,
    beside the index. Delete them by hand.

    Args:
        db_path: the index file. It need not exist.
        journal_dir: the journal directory. A missing directory has no runs.
        progress: called with (phase, done, total) as described in the steps.
        busy_timeout_ms: how long to wait for another connection's lock on the index,
            each time the rebuild needs it; None means SWAP_BUSY_TIMEOUT_MS.

    Returns:
        The counts of runs, files, corrupt lines and rejected runs, the backup's path (None
        when there was no index), and the number of runs whose sync state was kept.

    Raises:
        SchemaError: the index was written by a newer version of agent-telemetry, or has
            an agent_runs table that agent-telemetry did not create. Nothing is changed.
        IndexLockedError: another connection held the index locked for longer than
            ``busy_timeout_ms``. No row of the index is changed, but the backup may have
            been replaced by a copy of it.
        TypeError, ValueError: ``busy_timeout_ms`` is not an int of 0 or more.
        sqlite3.Error, OSError: a file cannot be opened, read or written.
        Any exception raised by ``progress``.
    """
    if busy_timeout_ms is None:
        busy_timeout_ms = SWAP_BUSY_TIMEOUT_MS
    if not isinstance(busy_timeout_ms, int) or isinstance(busy_timeout_ms, bool):
        raise TypeError(f"invalid busy_timeout_ms {busy_timeout_ms!r}: expected an int")
    if busy_timeout_ms < 0:
        raise ValueError(f"invalid busy_timeout_ms {busy_timeout_ms}: expected 0 or more")
    db_path = Path(os.path.abspath(os.fspath(db_path)))
    journal_dir = Path(journal_dir)

    # Fail before the long read on an index that rebuilding must not touch.
    with _raising_lock_error(db_path, busy_timeout_ms):
        _check_schema(db_path, busy_timeout_ms)

    journal = JournalReader(journal_dir).fold_runs(
        None if progress is None else lambda done, total: progress("read", done, total)
    )
    corrupt_lines = sum(journal.corrupt_lines.values())

    rebuilt_path = _scratch_path(db_path, "rebuild")
    try:
        written, rejected = _write_runs(rebuilt_path, journal.runs.values(), progress)
        with _raising_lock_error(db_path, busy_timeout_ms):
            backup_path, kept_sync_state, changed = _swap_in(db_path, rebuilt_path, busy_timeout_ms)
    finally:
        _remove_database_files(rebuilt_path)

    logger.info(
        "rebuilt index %s from %d journal files: %d runs read, %d rows changed, %d with "
        "their API sync state kept, %d corrupt lines skipped, %d runs rejected",
        db_path,
        journal.files,
        written,
        changed,
        kept_sync_state,
        corrupt_lines,
        rejected,
    )
    return RebuildResult(
        runs=written,
        files=journal.files,
        corrupt_lines=corrupt_lines,
        backup_path=backup_path,
        kept_sync_state=kept_sync_state,
        rejected_runs=rejected,
    )


# -- writing the new file ----------------------------------------------------------------


def _write_runs(
    path: Path,
    runs: Iterable[RunRecord],
    progress: Callable[[str, int, int], None] | None,
) -> tuple[int, int]:
    """Write ``runs`` into a new database at ``path`` as pending; return (written, rejected)."""
    records = [_as_pending(record) for record in runs]
    total = len(records)
    written = rejected = 0
    with DatabaseWriter(path) as rebuilt:
        if progress is not None:
            progress("write", 0, total)
        for start in range(0, total, WRITE_BATCH_SIZE):
            batch = records[start : start + WRITE_BATCH_SIZE]
            batch_written, batch_rejected = _load_batch(rebuilt, batch, "the journal")
            written += batch_written
            rejected += batch_rejected
            if progress is not None:
                progress("write", start + len(batch), total)
    return written, rejected


def _as_pending(record: RunRecord) -> RunRecord:
    return dataclasses.replace(
        record, api_posted=False, api_posted_at=None, api_retry_count=0, api_last_error=None
    )


def _load_batch(target: DatabaseWriter, batch: list[RunRecord], source: str) -> tuple[int, int]:
    """Write ``batch`` with load_runs; return (written, rejected).

    A batch that the index rejects, because a value passed the checks of ``source`` but
    not the index's, is written again one run at a time, and each rejected run is logged.
    """
    try:
        return target.load_runs(batch, batch_size=len(batch) or 1), 0
    except (TypeError, ValueError):
        pass
    written = rejected = 0
    for record in batch:
        try:
            target.load_runs([record])
        except (TypeError, ValueError) as exc:
            rejected += 1
            logger.warning(
                "run %s from %s is left out of the index: %s", record.run_id, source, exc
            )
        else:
            written += 1
    return written, rejected


# -- the old index -------------------------------------------------------------------------


class _IndexState(enum.Enum):
    MISSING = "missing"
    USABLE = "usable"
    DAMAGED = "damaged"
    """An SQLite file that cannot be read or fails SQLite's integrity check."""
    NOT_A_DATABASE = "not a database"


def _check_schema(db_path: Path, busy_timeout_ms: int) -> None:
    """Raise SchemaError if ``db_path`` is an index that this library must not rewrite.

    Opening migrates an older schema, as any client opening the index would.
    """
    if not db_path.exists() or not _has_sqlite_header(db_path):
        return
    try:
        DatabaseWriter(db_path, busy_timeout_ms=busy_timeout_ms).close()
    except SchemaError:
        raise
    except sqlite3.OperationalError:
        raise
    except sqlite3.DatabaseError:
        pass  # a damaged index, repaired or replaced in step 4


def _inspect_index(db_path: Path, busy_timeout_ms: int) -> _IndexState:
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
        with DatabaseWriter(db_path, busy_timeout_ms=busy_timeout_ms) as index:
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


def _copy_database(source_path: Path, backup_path: Path, busy_timeout_ms: int) -> None:
    """Copy the database at ``source_path`` to ``backup_path`` with SQLite's backup API.

    The copy is one consistent snapshot, written to a new file that then replaces the
    backup, so an interrupted copy never leaves a half-written backup.
    """
    partial = _partial_path(backup_path)
    _create_private_file(partial)
    try:
        with (
            contextlib.closing(_connect(source_path, busy_timeout_ms)) as source,
            contextlib.closing(sqlite3.connect(partial, isolation_level=None)) as copy,
        ):
            _backup(source, copy)
        _remove_sidecars(backup_path)
        os.replace(partial, backup_path)
    except BaseException:
        _remove_database_files(partial)
        raise


def _copy_files(source_path: Path, target_path: Path) -> None:
    """Copy the bytes of a damaged database and of its -wal file to ``target_path``.

    SQLite cannot read such a database to copy it. Agents may write to the files
    meanwhile, so the copy is only as consistent as a damaged index can be.
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


def _overwrite_database(source_path: Path, db_path: Path, busy_timeout_ms: int) -> bool:
    """Replace every page of the database at ``db_path`` by those of ``source_path``.

    SQLite's backup API writes the pages under the index's write lock and through its
    -wal file, so connections that agents hold to the index read the new content
    afterwards. Returns False, with a WARNING, when SQLite cannot write the pages, such
    as into a WAL database of another page size.

    Raises:
        sqlite3.OperationalError: the index stayed locked for ``busy_timeout_ms``.
    """
    try:
        with (
            contextlib.closing(_connect(source_path, busy_timeout_ms)) as source,
            contextlib.closing(_connect(db_path, busy_timeout_ms)) as target,
        ):
            _backup(source, target)
    except sqlite3.Error as exc:
        if _is_lock_error(exc):
            raise
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


# -- repairing a damaged index -------------------------------------------------------------


def _reindex(path: Path, busy_timeout_ms: int, name: str) -> bool:
    """Run REINDEX on the database at ``path``; return whether it then passes integrity_check.

    ``name`` describes the database in the WARNING logged when it fails.

    Raises:
        sqlite3.OperationalError: the database stayed locked for ``busy_timeout_ms``.
    """
    try:
        with contextlib.closing(_connect(path, busy_timeout_ms)) as connection:
            connection.execute("REINDEX")
            messages = [str(row[0]) for row in connection.execute("PRAGMA integrity_check")]
    except sqlite3.DatabaseError as exc:
        if _is_lock_error(exc):
            raise
        logger.warning("REINDEX of %s failed: %s", name, exc)
        return False
    if messages != ["ok"]:
        logger.warning(
            "%s still fails the integrity check after REINDEX: %s", name, "; ".join(messages[:3])
        )
        return False
    return True


def _repair_damaged(
    db_path: Path, backup_path: Path, rebuilt_path: Path, busy_timeout_ms: int
) -> tuple[int, int]:
    """Bring the rows of ``rebuilt_path`` into the damaged index, keeping what it can of it.

    ``backup_path`` contains the byte copy of the damaged index. The steps are those of
    rebuild_index. Returns (runs whose sync state was kept, rows inserted or changed).
    """
    repair_path = _scratch_path(db_path, "repair")
    salvage_path = _scratch_path(db_path, "salvage")
    try:
        _copy_files(backup_path, repair_path)
        if _reindex(repair_path, busy_timeout_ms, f"a copy of the damaged index {db_path}"):
            if _reindex(db_path, busy_timeout_ms, f"the damaged index {db_path}"):
                logger.warning(
                    "rebuilt the secondary indexes of the damaged index %s with REINDEX; "
                    "its rows are kept, and its old files are copied to %s",
                    db_path,
                    backup_path,
                )
                return _merge_into_index(db_path, rebuilt_path, busy_timeout_ms)
            old_rows_path = repair_path
        else:
            _salvage_rows(repair_path, salvage_path, db_path)
            old_rows_path = salvage_path

        kept, changed = _merge_into_index(old_rows_path, rebuilt_path, busy_timeout_ms)
        if _overwrite_database(old_rows_path, db_path, busy_timeout_ms):
            logger.warning(
                "replaced the content of the damaged index %s with the runs of the journal "
                "and the rows that could be read from it; its old files are copied to %s",
                db_path,
                backup_path,
            )
            return kept, changed
        _move_aside(db_path, backup_path)
        return kept, _merge_into_index(db_path, old_rows_path, busy_timeout_ms)[1]
    finally:
        _remove_database_files(repair_path)
        _remove_database_files(salvage_path)


def _salvage_rows(damaged_path: Path, salvage_path: Path, index_path: Path) -> None:
    """Copy the valid rows that SQLite can read from ``damaged_path`` into a new index.

    ``damaged_path`` is a copy of the damaged index ``index_path``, which log messages name.
    """
    salvaged = rejected = 0
    with DatabaseWriter(salvage_path) as salvage:
        try:
            connection = _connect(damaged_path, 0)
        except sqlite3.DatabaseError as exc:
            logger.warning("no row of the damaged index %s can be read: %s", index_path, exc)
            return
        with contextlib.closing(connection):
            # Lets SQLite read the table even when the definition of an index is damaged.
            connection.execute("PRAGMA writable_schema = ON")
            connection.row_factory = sqlite3.Row
            records = _readable_records(connection, index_path)
            while batch := list(itertools.islice(records, WRITE_BATCH_SIZE)):
                batch_written, batch_rejected = _load_batch(salvage, batch, "the damaged index")
                salvaged += batch_written
                rejected += batch_rejected
    logger.warning(
        "salvaged %d rows of the damaged index %s, and left out %d that the new index rejected",
        salvaged,
        index_path,
        rejected,
    )


def _readable_records(connection: sqlite3.Connection, path: Path) -> Iterator[RunRecord]:
    """Yield the rows of the table that SQLite can read and that are valid runs."""
    invalid = 0
    for row in _readable_rows(connection, path):
        try:
            yield RunRecord.from_dict({name: row[name] for name in _COLUMNS})
        except (TypeError, ValueError) as exc:
            invalid += 1
            if invalid <= _MAX_ROW_WARNINGS:
                logger.warning(
                    "row %s of the damaged index %s is left out: %s", row["run_id"], path, exc
                )
    if invalid > _MAX_ROW_WARNINGS:
        logger.warning(
            "%d more rows of the damaged index %s are left out as invalid",
            invalid - _MAX_ROW_WARNINGS,
            path,
        )


def _readable_rows(connection: sqlite3.Connection, path: Path) -> Iterator[sqlite3.Row]:
    """Yield the rows of the table that SQLite can read, in rowid order, using no index.

    A read error ends a scan, so the scan starts again at the first rowid after the
    damaged range that a seek can read.
    """
    start = _MIN_ROWID
    while True:
        try:
            for row in connection.execute(_SCAN_SQL, (start,)):
                yield row
                if row["scan_rowid"] == _MAX_ROWID:
                    return
                start = row["scan_rowid"] + 1
            return
        except sqlite3.DatabaseError as exc:
            resume = _next_readable_rowid(connection, start)
            logger.warning(
                "cannot read the rows of the damaged index %s from %s on: %s. %s",
                path,
                "the first row" if start == _MIN_ROWID else f"rowid {start}",
                exc,
                "No later row can be read"
                if resume is None
                else f"Reading again from rowid {resume}",
            )
            if resume is None:
                return
            start = resume


def _next_readable_rowid(connection: sqlite3.Connection, failed: int) -> int | None:
    """Return the smallest rowid after ``failed`` from which a seek reads a row again.

    The step after ``failed`` doubles until a seek succeeds, then bisection finds the
    start of the readable range, so a damaged range costs about 2 * log2(its size) seeks.
    Returns None when no seek after ``failed`` succeeds.
    """
    readable_from = None
    unreadable = failed
    step = 1
    while readable_from is None:
        candidate = min(unreadable + step, _MAX_ROWID)
        if _seek_reads(connection, candidate):
            readable_from = candidate
        elif candidate == _MAX_ROWID:
            return None
        else:
            unreadable = candidate
            step *= 2
    while readable_from - unreadable > 1:
        middle = (unreadable + readable_from) // 2
        if _seek_reads(connection, middle):
            readable_from = middle
        else:
            unreadable = middle
    return readable_from


def _seek_reads(connection: sqlite3.Connection, rowid: int) -> bool:
    """Return whether the first row at or after ``rowid`` can be read, or there is none."""
    try:
        connection.execute(f"{_SCAN_SQL} LIMIT 1", (rowid,)).fetchall()
    except sqlite3.DatabaseError:
        return False
    return True


# -- the copy into the index ---------------------------------------------------------------


def _swap_in(
    db_path: Path, rebuilt_path: Path, busy_timeout_ms: int
) -> tuple[Path | None, int, int]:
    """Back up the index and bring the rows of ``rebuilt_path`` into it.

    Returns the backup's path (None without an index), the number of runs whose sync
    state was kept, and the number of rows inserted or changed.
    """
    backup_path = db_path.with_name(db_path.name + BACKUP_SUFFIX)
    state = _inspect_index(db_path, busy_timeout_ms)

    if state is _IndexState.MISSING:
        return (None, *_merge_into_index(db_path, rebuilt_path, busy_timeout_ms))
    if state is _IndexState.NOT_A_DATABASE:
        _move_aside(db_path, backup_path)
        return (backup_path, *_merge_into_index(db_path, rebuilt_path, busy_timeout_ms))
    if state is _IndexState.DAMAGED:
        _copy_files(db_path, backup_path)
        return (backup_path, *_repair_damaged(db_path, backup_path, rebuilt_path, busy_timeout_ms))
    _copy_database(db_path, backup_path, busy_timeout_ms)
    return (backup_path, *_merge_into_index(db_path, rebuilt_path, busy_timeout_ms))


def _merge_into_index(db_path: Path, rebuilt_path: Path, busy_timeout_ms: int) -> tuple[int, int]:
    """Merge the rows of ``rebuilt_path`` into the index in one transaction.

    Returns (runs whose sync state was kept, rows inserted or changed).
    """
    # Creates the index and its schema if the index is missing or was moved aside.
    DatabaseWriter(db_path, busy_timeout_ms=busy_timeout_ms).close()

    with contextlib.closing(_connect(db_path, busy_timeout_ms)) as connection:
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


def _connect(path: Path, busy_timeout_ms: int) -> sqlite3.Connection:
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


@contextlib.contextmanager
def _raising_lock_error(db_path: Path, busy_timeout_ms: int) -> Iterator[None]:
    """Turn the sqlite3.OperationalError of a lock that did not end into IndexLockedError."""
    try:
        yield
    except IndexLockedError:
        raise
    except sqlite3.OperationalError as exc:
        if not _is_lock_error(exc):
            raise
        raise IndexLockedError(db_path, busy_timeout_ms) from exc


def _is_lock_error(error: sqlite3.Error) -> bool:
    code = getattr(error, "sqlite_errorcode", None)  # Python 3.11 and later
    if code is not None:
        return bool(code & 0xFF == _SQLITE_BUSY)
    return "database is locked" in str(error)


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


def _scratch_path(db_path: Path, purpose: str) -> Path:
    """Return a new file name beside the index, such as ``telemetry.db.rebuild-4242-9f3a``."""
    return db_path.with_name(f"{db_path.name}.{purpose}-{os.getpid()}-{secrets.token_hex(4)}")


def _partial_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.partial-{secrets.token_hex(4)}")


def _remove_database_files(path: Path) -> None:
    _remove_sidecars(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
