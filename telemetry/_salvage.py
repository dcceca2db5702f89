"""Reading what can still be read from a damaged SQLite index.

A damaged index is one that SQLite cannot read or that fails its integrity check. The
rebuild first tries REINDEX, which is enough when only the secondary indexes are damaged.
Otherwise it salvages the rows of the agent_runs table that SQLite can read: a scan without any
index (``NOT INDEXED``) in rowid order, which skips a damaged range of rowids by seeking
past it. These functions read and reindex, and telemetry.rebuild writes the rows they
return into a new index.

Logger: ``telemetry.rebuild``, the logger of the rebuild that calls them.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from telemetry._schema import _COLUMNS, TABLE
from telemetry._sqlite_files import connect_existing, is_lock_error
from telemetry.models import RunRecord

__all__ = ["connect_to_damaged_copy", "readable_records", "reindex"]

logger = logging.getLogger("telemetry.rebuild")

# The range of SQLite's rowids, which the scan of a damaged table steps through.
_MIN_ROWID = -(2**63)
_MAX_ROWID = 2**63 - 1

# Rows of a damaged index that are left out get one WARNING each up to this count.
_MAX_ROW_WARNINGS = 10

# Reads a damaged table without any index, from a rowid on, so that a scan stopped by a
# damaged page can start again after it.
_SCAN_SQL = (
    f"SELECT rowid AS scan_rowid, {', '.join(_COLUMNS)} FROM {TABLE} NOT INDEXED "
    "WHERE rowid >= ? ORDER BY rowid"
)


def reindex(path: Path, busy_timeout_ms: int, name: str) -> bool:
    """Run REINDEX on the database at ``path``; return whether it then passes integrity_check.

    ``name`` describes the database in the WARNING logged when it fails.

    Raises:
        sqlite3.OperationalError: the database stayed locked for ``busy_timeout_ms``.
    """
    try:
        with contextlib.closing(connect_existing(path, busy_timeout_ms)) as connection:
            connection.execute("REINDEX")
            messages = [str(row[0]) for row in connection.execute("PRAGMA integrity_check")]
    except sqlite3.DatabaseError as exc:
        if is_lock_error(exc):
            raise
        logger.warning("REINDEX of %s failed: %s", name, exc)
        return False
    if messages != ["ok"]:
        logger.warning(
            "%s still fails the integrity check after REINDEX: %s", name, "; ".join(messages[:3])
        )
        return False
    return True


def connect_to_damaged_copy(damaged_path: Path, index_path: Path) -> sqlite3.Connection | None:
    """Open ``damaged_path``, a copy of the damaged index ``index_path``, to read its rows.

    The connection returns sqlite3.Row rows. Returns None, with a WARNING naming
    ``index_path``, when SQLite cannot open the copy.

    Raises:
        sqlite3.Error: the connection opened but cannot be set up to read.
    """
    try:
        connection = connect_existing(damaged_path, 0)
    except sqlite3.DatabaseError as exc:
        logger.warning("no row of the damaged index %s can be read: %s", index_path, exc)
        return None
    try:
        # Lets SQLite read the table even when the definition of an index is damaged.
        connection.execute("PRAGMA writable_schema = ON")
    except BaseException:
        connection.close()
        raise
    connection.row_factory = sqlite3.Row
    return connection


def readable_records(connection: sqlite3.Connection, path: Path) -> Iterator[RunRecord]:
    """Yield the rows of the table that SQLite can read and that are valid runs.

    ``connection`` comes from connect_to_damaged_copy. ``path`` names the damaged index in
    the WARNING logged for each left-out row, up to a count, and for each unreadable range.
    """
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
