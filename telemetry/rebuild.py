"""Rebuilding the SQLite index from the journal.

rebuild_index folds the journal into runs and writes them into a new database file
beside the index. It then copies that file's rows into the index in one write
transaction. A usable index file is never renamed or replaced, because agents' processes
may have it open, and their connections keep using the -wal and -shm files at the index's
path. In a test with SQLite 3.40, a connection to the old file wrote into the -wal file
of a file renamed over it, and new connections then read the old rows. The old index is
first copied to ``<db_path>.bak``, or, when it is damaged, to a name with the time that
no later rebuild replaces.

The copy uses one SQL transaction rather than SQLite's backup API, because a backup into
the index cannot start while a connection to the index has a transaction open (Python
raises "destination database is in use"). A backup would therefore overwrite the rows
that agents commit between the last read of the index and the copy. One ``BEGIN
IMMEDIATE`` transaction reads those rows and merges the new rows in under the same write
lock. Readers see the old rows or the new ones, never a mix, and writers wait for the
lock through their busy timeout.

This module decides the steps. telemetry._sqlite_files copies, moves and removes the
database files, and telemetry._salvage reads the rows that a damaged index still has.

Logger: ``telemetry.rebuild``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import enum
import itertools
import logging
import os
import re
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

from telemetry._salvage import connect_to_damaged_copy, readable_records, reindex
from telemetry._schema import _COLUMNS, TABLE
from telemetry._sqlite_files import (
    connect_existing,
    copy_database,
    copy_database_files,
    has_sqlite_header,
    immediate_transaction,
    is_lock_error,
    move_database_files,
    overwrite_database,
    raising_lock_error,
    remove_database_files,
    scratch_path,
)
from telemetry.database import DatabaseWriter
from telemetry.errors import SchemaError
from telemetry.journal import JournalReader
from telemetry.models import RunRecord
from telemetry.stale import process_is_gone

__all__ = [
    "BACKUP_SUFFIX",
    "DAMAGED_BACKUP_SUFFIX",
    "RebuildResult",
    "find_leftover_files",
    "rebuild_index",
]

logger = logging.getLogger("telemetry.rebuild")

BACKUP_SUFFIX = ".bak"
"""Added to the index's file name to name the copy of a usable old index. Each rebuild
replaces that copy."""

DAMAGED_BACKUP_SUFFIX = ".bak-%Y%m%dT%H%M%SZ"
"""Added, as a strftime format of the UTC time, to the index's file name to name the copy
of a damaged old index, such as ``telemetry.db.bak-20261204T231500Z``. No later rebuild
replaces it, because it may hold the only copy of rows that the journal lacks."""

# The new files of a rebuild beside the index: "<index name>.<purpose>-<pid>-<hex>", as
# telemetry._sqlite_files.scratch_path names them, and their -wal, -shm and -journal files.
_SCRATCH_PURPOSES = ("rebuild", "repair", "salvage")
_SCRATCH_NAME = re.compile(
    r"(?:" + "|".join(_SCRATCH_PURPOSES) + r")-(?P<pid>[0-9]+)-[0-9a-f]+(?:-wal|-shm|-journal)?"
)

WRITE_BATCH_SIZE = 1000
"""Runs written to the new file per transaction, and per call of progress("write", ...)."""

SWAP_BUSY_TIMEOUT_MS = 30_000
"""How long rebuild_index waits, by default, for agents' write transactions on the index."""

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
_INDEX_ONLY_SQL = (
    f"SELECT COUNT(*) FROM main.{TABLE} AS live WHERE NOT EXISTS "
    f"(SELECT 1 FROM rebuilt.{TABLE} AS excluded WHERE excluded.run_id = live.run_id)"
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
    """Journal lines skipped because they are not valid JSON or not a valid run."""
    backup_path: Path | None
    """The copy of the old index, or None when there was no index."""
    kept_sync_state: int
    """Runs whose API sync state and updated_at were taken from the old index."""
    rejected_runs: int
    """Runs of the journal that the index rejected and that are left out (each logged)."""
    index_only_rows: int = 0
    """Rows of the old index that no journal line describes, kept as they were."""
    damaged_backup: bool = False
    """Whether ``backup_path`` is a damaged old index, under a name that no later rebuild
    replaces (DAMAGED_BACKUP_SUFFIX)."""
    removed_files: tuple[Path, ...] = ()
    """Files left beside the index by rebuilds whose process is gone, removed first."""


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
       replacing an older backup and its -wal and -shm files. A damaged old index goes to
       a new name instead, made with DAMAGED_BACKUP_SUFFIX, which no rebuild replaces.
    4. Copy the new rows into the index in one write transaction, merged as below, and
       delete the new file.

    Before step 1, the files that killed rebuilds left beside the index are removed (see
    find_leftover_files).

    The merge makes the rebuilt index equal to a live one for the same runs. For a run whose
    index row has the same status, the API sync columns (api_posted, api_posted_at,
    api_retry_count, api_last_error) and updated_at stay as the index has them, because the
    journal does not record them. The other columns come from the journal. A run whose
    status differs, or that the index lacks, gets the journal's row and is pending. Rows
    that agents write while the rebuild runs are not lost. A run that ends meanwhile keeps
    its index row, and a run only the index has (started meanwhile, or missing from the
    journal) keeps its row too. telemetry.consistency.compare_index_with_journal lists
    the latter.

    An index that SQLite cannot read or that fails its integrity check is damaged. Its
    file and -wal file are copied byte for byte to its backup in step 3, and step 4 keeps
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

    Two kinds of index are renamed to the backup name of a damaged index instead, with
    their -wal and -shm files. One is a file that is not an SQLite database. The other is
    a damaged index that the backup API cannot write, such as one in WAL mode with another
    page size. The new rows, merged with what was salvaged, then go into a new index.

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

    A rebuild killed in step 2 or 4 may leave its new file, ``<db name>.rebuild-*``, or
    the copies of a damaged index, ``<db name>.repair-*`` and ``<db name>.salvage-*``,
    beside the index. The next rebuild removes them.

    Args:
        db_path: the index file. It need not exist.
        journal_dir: the journal directory. A missing directory has no runs.
        progress: called with (phase, done, total) as described in the steps.
        busy_timeout_ms: how long to wait for another connection's lock on the index,
            each time the rebuild needs it; None means SWAP_BUSY_TIMEOUT_MS.

    Returns:
        The counts of runs, files, corrupt lines and rejected runs, the backup's path (None
        when there was no index) and whether it is a damaged index, the number of runs
        whose sync state was kept, the number of rows only the old index had, and the
        leftover files removed.

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
    with raising_lock_error(db_path, busy_timeout_ms):
        _check_schema(db_path, busy_timeout_ms)
    removed_files = _remove_leftover_files(db_path)

    journal = JournalReader(journal_dir).fold_runs(
        None if progress is None else lambda done, total: progress("read", done, total)
    )
    corrupt_lines = sum(journal.corrupt_lines.values())

    rebuilt_path = scratch_path(db_path, "rebuild")
    try:
        written, rejected = _write_runs(rebuilt_path, journal.runs.values(), progress)
        with raising_lock_error(db_path, busy_timeout_ms):
            swap = _swap_in(db_path, rebuilt_path, busy_timeout_ms)
    finally:
        remove_database_files(rebuilt_path)

    logger.info(
        "rebuilt index %s from %d journal files: %d runs read, %d rows changed, %d with "
        "their API sync state kept, %d only in the old index, %d corrupt lines skipped, "
        "%d runs rejected",
        db_path,
        journal.files,
        written,
        swap.merge.changed,
        swap.merge.kept_sync_state,
        swap.merge.index_only,
        corrupt_lines,
        rejected,
    )
    return RebuildResult(
        runs=written,
        files=journal.files,
        corrupt_lines=corrupt_lines,
        backup_path=swap.backup_path,
        kept_sync_state=swap.merge.kept_sync_state,
        rejected_runs=rejected,
        index_only_rows=swap.merge.index_only,
        damaged_backup=swap.damaged,
        removed_files=tuple(removed_files),
    )


# -- files left by killed rebuilds ---------------------------------------------------------


def find_leftover_files(db_path: str | os.PathLike[str]) -> list[Path]:
    """Return the files beside the index that rebuilds left when their process was killed.

    These are the new files and the copies of a damaged index that rebuild_index deletes
    when it ends, ``<index name>.rebuild-<pid>-<hex>``, ``.repair-...`` and ``.salvage-...``,
    with their -wal, -shm and -journal files. A file counts only when process ``pid`` is
    gone (telemetry.stale.process_is_gone, with the file's modification time as the
    latest start of its process). A file of a rebuild still running is left out.

    The pid is judged on this host. SQLite's WAL mode, which the index uses, works only
    when every process that opens the database runs on the same host
    (https://www.sqlite.org/wal.html), so rebuilds of this index run on this host too.

    Returns:
        The paths, sorted. [] when the directory does not exist.

    Raises:
        OSError: the directory exists but cannot be listed.
    """
    db_path = Path(db_path)
    prefix = db_path.name + "."
    found: list[Path] = []
    try:
        entries = list(os.scandir(db_path.parent))
    except FileNotFoundError:
        return []
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        match = _SCRATCH_NAME.fullmatch(entry.name, len(prefix))
        if match is None:
            continue
        pid = int(match["pid"])
        try:
            modified = entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue  # removed by its rebuild meanwhile
        written_at = datetime.datetime.fromtimestamp(modified, datetime.timezone.utc)
        if pid != os.getpid() and _process_is_gone(pid, written_at):
            found.append(Path(entry.path))
    return sorted(found)


def _process_is_gone(pid: int, written_at: datetime.datetime) -> bool:
    # A pid of 0, or one too large for the kernel, cannot be a running rebuild's.
    if pid < 1:
        return True
    return process_is_gone(pid, written_at)


def _remove_leftover_files(db_path: Path) -> list[Path]:
    """Remove the files that find_leftover_files returns, and return those removed.

    A file that cannot be removed is logged as a WARNING and kept.
    """
    try:
        leftovers = find_leftover_files(db_path)
    except OSError as exc:
        logger.warning("cannot look for files left by killed rebuilds beside %s: %s", db_path, exc)
        return []
    removed: list[Path] = []
    for path in leftovers:
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.warning("cannot remove %s, left by a killed rebuild: %s", path, exc)
            continue
        logger.info("removed %s, left by a rebuild whose process is gone", path)
        removed.append(path)
    return removed


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


def _salvage_rows(damaged_path: Path, salvage_path: Path, index_path: Path) -> None:
    """Copy the valid rows that SQLite can read from ``damaged_path`` into a new index.

    ``damaged_path`` is a copy of the damaged index ``index_path``, which log messages name.
    """
    salvaged = rejected = 0
    with DatabaseWriter(salvage_path) as salvage:
        connection = connect_to_damaged_copy(damaged_path, index_path)
        if connection is None:
            return
        with contextlib.closing(connection):
            records = readable_records(connection, index_path)
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
    if not db_path.exists() or not has_sqlite_header(db_path):
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
    if not has_sqlite_header(db_path):
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


# -- the copy into the index ---------------------------------------------------------------


class _MergeCounts(NamedTuple):
    kept_sync_state: int
    """Runs whose API sync state was kept."""
    changed: int
    """Rows inserted or changed."""
    index_only: int
    """Rows of the index that the new rows lack, kept as they were."""


class _SwapResult(NamedTuple):
    backup_path: Path | None
    damaged: bool
    merge: _MergeCounts


def _swap_in(db_path: Path, rebuilt_path: Path, busy_timeout_ms: int) -> _SwapResult:
    """Back up the index and bring the rows of ``rebuilt_path`` into it."""
    state = _inspect_index(db_path, busy_timeout_ms)

    if state is _IndexState.MISSING:
        return _SwapResult(None, False, _merge_into_index(db_path, rebuilt_path, busy_timeout_ms))
    if state is _IndexState.NOT_A_DATABASE:
        backup_path = _damaged_backup_path(db_path)
        _move_aside(db_path, backup_path)
        merged = _merge_into_index(db_path, rebuilt_path, busy_timeout_ms)
        return _SwapResult(backup_path, True, merged)
    if state is _IndexState.DAMAGED:
        backup_path = _damaged_backup_path(db_path)
        copy_database_files(db_path, backup_path)
        merged = _repair_damaged(db_path, backup_path, rebuilt_path, busy_timeout_ms)
        return _SwapResult(backup_path, True, merged)
    backup_path = db_path.with_name(db_path.name + BACKUP_SUFFIX)
    copy_database(db_path, backup_path, busy_timeout_ms)
    return _SwapResult(
        backup_path, False, _merge_into_index(db_path, rebuilt_path, busy_timeout_ms)
    )


def _damaged_backup_path(db_path: Path) -> Path:
    """Return a name for the backup of a damaged index that no file or backup has yet."""
    now = datetime.datetime.now(datetime.timezone.utc)
    base = db_path.name + now.strftime(DAMAGED_BACKUP_SUFFIX)
    candidate = db_path.with_name(base)
    number = 1
    while any(Path(f"{candidate}{suffix}").exists() for suffix in ("", "-wal", "-shm")):
        number += 1
        candidate = db_path.with_name(f"{base}-{number}")
    return candidate


def _merge_into_index(db_path: Path, rebuilt_path: Path, busy_timeout_ms: int) -> _MergeCounts:
    """Merge the rows of ``rebuilt_path`` into the index in one transaction."""
    # Creates the index and its schema if the index is missing or was moved aside.
    DatabaseWriter(db_path, busy_timeout_ms=busy_timeout_ms).close()

    with contextlib.closing(connect_existing(db_path, busy_timeout_ms)) as connection:
        connection.execute("ATTACH DATABASE ? AS rebuilt", (str(rebuilt_path),))
        with immediate_transaction(connection):
            kept = int(connection.execute(_KEPT_SYNC_STATE_SQL).fetchone()[0])
            index_only = int(connection.execute(_INDEX_ONLY_SQL).fetchone()[0])
            before = connection.total_changes
            connection.execute(_MERGE_SQL)
            changed = connection.total_changes - before
        connection.execute("DETACH DATABASE rebuilt")
    return _MergeCounts(kept, changed, index_only)


def _repair_damaged(
    db_path: Path, backup_path: Path, rebuilt_path: Path, busy_timeout_ms: int
) -> _MergeCounts:
    """Bring the rows of ``rebuilt_path`` into the damaged index, keeping what it can of it.

    ``backup_path`` contains the byte copy of the damaged index. The steps are those of
    rebuild_index.
    """
    repair_path = scratch_path(db_path, "repair")
    salvage_path = scratch_path(db_path, "salvage")
    try:
        copy_database_files(backup_path, repair_path)
        if reindex(repair_path, busy_timeout_ms, f"a copy of the damaged index {db_path}"):
            if reindex(db_path, busy_timeout_ms, f"the damaged index {db_path}"):
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

        merged = _merge_into_index(old_rows_path, rebuilt_path, busy_timeout_ms)
        if _overwrite_damaged(old_rows_path, db_path, busy_timeout_ms):
            logger.warning(
                "replaced the content of the damaged index %s with the runs of the journal "
                "and the rows that could be read from it; its old files are copied to %s",
                db_path,
                backup_path,
            )
            return merged
        _move_aside(db_path, backup_path)
        changed = _merge_into_index(db_path, old_rows_path, busy_timeout_ms).changed
        return merged._replace(changed=changed)
    finally:
        remove_database_files(repair_path)
        remove_database_files(salvage_path)


def _overwrite_damaged(source_path: Path, db_path: Path, busy_timeout_ms: int) -> bool:
    """Replace every page of the damaged index at ``db_path`` by those of ``source_path``.

    SQLite's backup API writes the pages under the index's write lock and through its
    -wal file, so connections that agents hold to the index read the new content
    afterwards. Returns False, with a WARNING, when SQLite cannot write the pages, such
    as into a WAL database of another page size.

    Raises:
        sqlite3.OperationalError: the index stayed locked for ``busy_timeout_ms``.
    """
    try:
        overwrite_database(source_path, db_path, busy_timeout_ms)
    except sqlite3.Error as exc:
        if is_lock_error(exc):
            raise
        logger.warning("cannot overwrite the damaged index %s: %s", db_path, exc)
        return False
    return True


def _move_aside(db_path: Path, backup_path: Path) -> None:
    """Rename the index and its -wal and -shm files to ``backup_path``, with a WARNING."""
    move_database_files(db_path, backup_path)
    logger.warning(
        "moved the index %s, which is not a usable database, to %s; a new index is built "
        "from the journal",
        db_path,
        backup_path,
    )
