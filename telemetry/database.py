"""DatabaseWriter: the SQLite index of runs, one row per run in the table ``agent_runs``.

The journal is the source of truth, and the index can be rebuilt from it. The index makes
runs searchable and stores the API sync state of each run (posted, retry count, last error).

Every connection uses WAL with ``synchronous=NORMAL``. SQLite documents (PRAGMA
synchronous) that a commit in this mode survives a crash of the application, kill -9
included, but may roll back after a power loss or an OS crash. The index can then be
rebuilt from the journal. Each write is one ``BEGIN IMMEDIATE`` transaction, retried while
another process holds the write lock.
Each thread of each process has its own long-lived connection. A forked child opens its
own on first use and never touches the connections it inherited.

The writer raises storage errors (``sqlite3.Error``, ``OSError``) to its caller, and the
client catches and logs them. Logger: ``telemetry.index``.

The table's columns, DDL and migrations, and the checks and conversion of each value to
SQL, are in telemetry._schema.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import sqlite3
import threading
import time
import urllib.request
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from telemetry._checkpoint import BackgroundCheckpointer
from telemetry._schema import (
    _COLUMNS,
    _PENDING_CONDITION,
    _UPDATABLE_COLUMNS,
    TABLE,
    _apply_migrations,
    _check_version,
    _normalise_timestamp,
    _read_user_version,
    _to_sql,
)

# Re-exported because the tests read database._MIGRATIONS.
from telemetry._schema import _MIGRATIONS as _MIGRATIONS
from telemetry._sqlite_read_only import file_identity, read_only_uri, wal_files_kept
from telemetry.errors import SchemaError
from telemetry.models import SCHEMA_VERSION, STATUSES, RunRecord, get_iso8601_timestamp

__all__ = ["DEFAULT_BUSY_TIMEOUT_MS", "RETRY_DELAYS", "TABLE", "DatabaseWriter"]

logger = logging.getLogger("telemetry.index")

_T = TypeVar("_T")

DEFAULT_BUSY_TIMEOUT_MS = 5000
WAL_AUTOCHECKPOINT_PAGES = 1000

RETRY_DELAYS = (0.1, 0.2, 0.4)
"""Seconds slept before each retry of a write that found the database locked."""

_DIRECTORY_MODE = 0o700
_FILE_MODE = 0o600

_SELECT_COLUMNS = ", ".join(_COLUMNS)
_INSERT_SQL = (
    f"INSERT INTO {TABLE} ({_SELECT_COLUMNS}) VALUES ({', '.join(':' + name for name in _COLUMNS)})"
)
_INSERT_NEW_SQL = _INSERT_SQL + " ON CONFLICT (run_id) DO NOTHING"
# An upsert keeps the stored created_at, the time the row was first written.
_UPSERT_SQL = (
    _INSERT_SQL
    + " ON CONFLICT (run_id) DO UPDATE SET "
    + ", ".join(
        f"{name} = excluded.{name}" for name in _COLUMNS if name not in ("run_id", "created_at")
    )
    + f", created_at = COALESCE({TABLE}.created_at, excluded.created_at)"
)
# load_runs writes every column as given, created_at and updated_at included.
_LOAD_SQL = (
    _INSERT_SQL
    + " ON CONFLICT (run_id) DO UPDATE SET "
    + ", ".join(f"{name} = excluded.{name}" for name in _COLUMNS if name != "run_id")
)

ITER_BATCH_SIZE = 500
"""Rows that iter_runs reads per query by default."""

# Nearest-rank percentiles reported by get_run_stats, keyed by percent.
_PERCENTILES = {50: "p50_duration_ms", 95: "p95_duration_ms"}


# -- argument checks and lock errors ----------------------------------------------------


def _check_limit(limit: int | None) -> int:
    """Return ``limit`` for SQL, where -1 means no limit."""
    if limit is None:
        return -1
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise ValueError(f"invalid limit {limit!r}: expected an int >= 0, or None for all rows")
    return limit


def _check_batch_size(batch_size: int) -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"invalid batch_size {batch_size!r}: expected an int >= 1")
    return batch_size


def _nearest_rank(percent: int, count: int) -> int:
    """Return the 1-based position of the ``percent`` percentile among ``count`` sorted values.

    Nearest-rank method: the smallest position whose share of the values is at least
    percent / 100, that is ceil(percent * count / 100), computed on integers.
    """
    return max(1, (percent * count + 99) // 100)


def _run_filters(
    agent_name: str | None, status: str | None, since: str | None, until: str | None
) -> tuple[list[str], list[Any]]:
    """Return the WHERE clauses and their parameters for the filters of list_runs.

    Raises:
        ValueError: an unknown status, or a since or until that is not ISO 8601 with an
            offset.
    """
    clauses: list[str] = []
    parameters: list[Any] = []
    if agent_name is not None:
        clauses.append("agent_name = ?")
        parameters.append(agent_name)
    if status is not None:
        clauses.append("status = ?")
        parameters.append(_to_sql("status", status, None))
    # Stored start times pass through _to_sql, which writes every timestamp as UTC text of
    # one fixed width ("+00:00", microseconds), so comparing the text compares the times.
    # since and until are converted to the same form first.
    if since is not None:
        clauses.append("start_time >= ?")
        parameters.append(_normalise_timestamp("since", since))
    if until is not None:
        clauses.append("start_time < ?")
        parameters.append(_normalise_timestamp("until", until))
    return clauses, parameters


def _age_filters(
    started_before: str | None, ended_before: str | None
) -> tuple[list[str], list[Any]]:
    """Return the WHERE clauses and parameters for count_runs and delete_runs.

    A run without an end_time matches ``ended_before``: it is still running, or its end
    never reached the index.

    Raises:
        ValueError: ``started_before`` or ``ended_before`` is not ISO 8601 with an offset.
    """
    clauses: list[str] = []
    parameters: list[Any] = []
    if started_before is not None:
        clauses.append("start_time < ?")
        parameters.append(_normalise_timestamp("started_before", started_before))
    if ended_before is not None:
        clauses.append("(end_time IS NULL OR end_time < ?)")
        parameters.append(_normalise_timestamp("ended_before", ended_before))
    return clauses, parameters


def _stats_source(connection: sqlite3.Connection, since: str | None) -> str:
    """Return the FROM clause of get_run_stats's queries over the runs started since ``since``.

    Left to itself, SQLite's planner (3.40, without ANALYZE statistics) reads every row
    through an index: through agent_name, to skip sorting for GROUP BY, or through
    start_time for any since. Each row read through an index costs a lookup in the
    table. On 100,000 runs (41 MB, on an AMD EPYC with the file in the OS cache) that
    took about 2.5 times as long as reading the table in order. So the start_time index
    is used only for a window of less than a third of the rows, and the table is read
    in order otherwise.
    """
    scan = f"{TABLE} NOT INDEXED"
    if since is None:
        return scan
    # Both counts read an index only, a few milliseconds on 100,000 runs.
    total = connection.execute(f"SELECT COUNT(*) FROM {TABLE}").fetchone()[0]
    in_window = connection.execute(
        f"SELECT COUNT(*) FROM {TABLE} WHERE start_time >= ?", (since,)
    ).fetchone()[0]
    if 3 * in_window < total:
        return f"{TABLE} INDEXED BY idx_agent_runs_start_time"
    return scan


def _agent_totals_sql(source: str, where: str) -> str:
    """Return the query of get_run_stats's per-agent counts and sums.

    Its parameters are the statuses of models.STATUSES, then those of ``where``.
    """
    # The aliases are the status names, which are identifiers defined by this library.
    status_counts = ", ".join(f"SUM(status = ?) AS {status}" for status in STATUSES)
    return (
        f"SELECT agent_name, COUNT(*) AS runs, {status_counts}, "
        "SUM(items_discovered) AS items_discovered, "
        "SUM(items_succeeded) AS items_succeeded, "
        "SUM(items_failed) AS items_failed, "
        f"SUM({_PENDING_CONDITION}) AS pending_api_posts, "
        "AVG(duration_ms) AS avg_duration_ms "
        f"FROM {source}{where} GROUP BY agent_name ORDER BY agent_name"
    )


def _durations_sql(source: str, where: str) -> str:
    """Return the query of the (agent_name, duration_ms) of every run that has a duration."""
    condition = "duration_ms IS NOT NULL" + where.replace(" WHERE ", " AND ")
    return f"SELECT agent_name, duration_ms FROM {source} WHERE {condition}"


def _agent_totals(row: sqlite3.Row) -> dict[str, Any]:
    """Return the by_agent entry of get_run_stats from a row of _agent_totals_sql."""
    totals: dict[str, Any] = {"runs": row["runs"]}
    totals.update({status: row[status] for status in STATUSES})
    for name in ("items_discovered", "items_succeeded", "items_failed", "pending_api_posts"):
        totals[name] = row[name]
    average = row["avg_duration_ms"]
    totals["avg_duration_ms"] = None if average is None else float(average)
    totals.update(dict.fromkeys(_PERCENTILES.values()))
    return totals


def _check_run_id(run_id: object) -> str:
    if not isinstance(run_id, str):
        raise TypeError(f"invalid run_id: expected str, got {type(run_id).__name__}")
    return run_id


def _row_problem(values: Sequence[Any]) -> tuple[str, str] | None:
    """Return (run_id, error) if RunRecord cannot read a row, given with bytes for text.

    ``values`` are the row's columns in the order of _COLUMNS, run_id first.
    """
    raw_id = values[0]
    if isinstance(raw_id, bytes):
        run_id = raw_id.decode("utf-8", errors="backslashreplace")
    else:
        run_id = str(raw_id)
    decoded: dict[str, Any] = {}
    for name, value in zip(_COLUMNS, values, strict=True):
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                return run_id, f"{name} is not valid UTF-8 text: {exc}"
        decoded[name] = value
    try:
        RunRecord.from_dict(decoded)
    except (ValueError, TypeError) as exc:
        return run_id, str(exc)
    return None


def _is_busy(error: sqlite3.OperationalError) -> bool:
    # Python 3.10 has no sqlite_errorcode attribute, so the message is the only sign.
    message = str(error).lower()
    return "database is locked" in message or "busy" in message


def _checkpoint(writer_ref: weakref.ref[DatabaseWriter]) -> tuple[int, int, int] | None:
    # Runs on the checkpoint thread, with that thread's own connection.
    writer = writer_ref()
    if writer is None:
        return None
    # Opened outside the gate, so that the retries of a locked open keep no fork waiting.
    connection = writer._connection()
    with _fork_gate.entered():
        row = connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return None if row is None else (int(row[0]), int(row[1]), int(row[2]))


# -- files and connections ---------------------------------------------------------------


def _create_private_parents(directory: Path) -> None:
    """Create ``directory`` and any missing parents with mode 0o700."""
    missing: list[Path] = []
    while not directory.exists():
        missing.append(directory)
        if directory.parent == directory:
            break
        directory = directory.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process created it meanwhile
            os.mkdir(path, _DIRECTORY_MODE)


def _create_private_file(path: Path) -> None:
    """Create an empty ``path`` with mode 0o600 unless it exists.

    SQLite treats an empty file as an empty database, and it gives the -wal and -shm files
    the mode of the database file.
    """
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, _FILE_MODE)
    except FileExistsError:
        return
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(descriptor, _FILE_MODE)  # the umask may have removed bits
    finally:
        os.close(descriptor)


@dataclasses.dataclass(frozen=True)
class _OpenConnection:
    connection: sqlite3.Connection
    pid: int
    thread: threading.Thread


class _ImmutableConnection(sqlite3.Connection):
    """A connection opened with ``immutable=1``, and file_identity() of the file then."""

    opened_identity: tuple[int, int, int, int] = (0, 0, 0, 0)


class _ThreadState(threading.local):
    connection: sqlite3.Connection | None = None
    pid = 0
    generation = -1


_live_writers: weakref.WeakSet[DatabaseWriter] = weakref.WeakSet()


def _reset_locks_in_child() -> None:
    # A lock held by another thread at fork time stays locked forever in the child.
    for writer in list(_live_writers):
        writer._lock = threading.Lock()


class _ForkGate:
    """Keeps fork() from happening while a thread of this process is inside SQLite.

    SQLite records the file locks of a process in memory. A child forked during a
    transaction inherits a record of locks it does not hold, and its own connections then
    find the database locked for good. Every database access enters the gate, and fork
    waits at most FORK_WAIT_SECONDS for the accesses in progress to leave it.
    """

    FORK_WAIT_SECONDS = 10.0

    def __init__(self) -> None:
        self._condition = threading.Condition(threading.Lock())
        self._active = 0
        self._forking = False
        # How deep each thread is inside the gate. A thread inside enters again at once,
        # so that a fork waiting for it to leave cannot also keep it from leaving.
        self._depth = threading.local()

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        depth = getattr(self._depth, "value", 0)
        if depth:
            self._depth.value = depth + 1
            try:
                yield
            finally:
                self._depth.value = depth
            return
        with self._condition:
            while self._forking:
                self._condition.wait()
            self._active += 1
        self._depth.value = 1
        try:
            yield
        finally:
            self._depth.value = 0
            with self._condition:
                self._active -= 1
                if self._active == 0:
                    self._condition.notify_all()

    def before_fork(self) -> None:
        # The condition's lock stays held from here until after the fork.
        self._condition.acquire()
        self._forking = True
        deadline = time.monotonic() + self.FORK_WAIT_SECONDS
        while self._active:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._condition.wait(remaining)

    def after_fork_in_parent(self) -> None:
        self._forking = False
        self._condition.notify_all()
        self._condition.release()

    def after_fork_in_child(self) -> None:
        self.__init__()  # type: ignore[misc]


_fork_gate = _ForkGate()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_fork_gate.before_fork,
        after_in_parent=_fork_gate.after_fork_in_parent,
        after_in_child=_fork_gate.after_fork_in_child,
    )
    os.register_at_fork(after_in_child=_reset_locks_in_child)


class DatabaseWriter:
    """Writes runs to the SQLite index and reads them back.

    Opening creates the file's directory (mode 0o700) and the file (mode 0o600) when they
    are missing, then creates or migrates the schema in one transaction.

    With ``read_only``, opening creates no file, changes nothing and never migrates.
    Every connection is opened with SQLite's ``mode=ro``, and writes fail with
    sqlite3.OperationalError ("attempt to write a readonly database"). A reader that is
    not the file's owner never lets SQLite create the -wal and -shm files, which would
    lock the owner's agents out. telemetry._sqlite_read_only explains how, and when it
    reads the file with ``immutable=1``.

    Args:
        path: the database file.
        sleep: called with the delay before each retry of a locked write; tests pass a
            recorder in place of time.sleep.
        busy_timeout_ms: how long SQLite itself waits for a lock before each attempt fails.
        read_only: open the existing file for reading only.
        checkpoint_in_background: checkpoint the write-ahead log on a daemon thread of
            this writer too, so that the checkpoints that commits run find little work
            (see telemetry._checkpoint). The client turns it on. Short-lived writers, such
            as the command's, leave checkpoints to SQLite.
        page_cache_kib: the size of each connection's page cache in KiB, or None for
            SQLite's default (2,000 KiB in SQLite 3.40). The client's writes touch few
            pages, and a cache that fills up to the default makes its memory grow over
            the first tens of thousands of runs.

    Raises:
        sqlite3.DatabaseError: the file is not an SQLite database.
        SchemaError: the schema is newer than this library, or the file has an agent_runs
            table that this library did not create. With ``read_only``, also a schema
            older than SCHEMA_VERSION, which only a writer may migrate.
        OSError: the directory or the file cannot be created. With ``read_only``:
            FileNotFoundError, IsADirectoryError, or PermissionError when the file, its
            -wal or its -shm file cannot be read.

    Every method may raise ``sqlite3.Error`` for a storage fault. Writes that find the
    database locked are retried after each delay in RETRY_DELAYS, with a WARNING per
    retry. The last failure is logged as an ERROR and raised as sqlite3.OperationalError.
    """

    path: Path

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        sleep: Callable[[float], None] = time.sleep,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        read_only: bool = False,
        checkpoint_in_background: bool = False,
        page_cache_kib: int | None = None,
    ) -> None:
        if not isinstance(busy_timeout_ms, int) or isinstance(busy_timeout_ms, bool):
            raise TypeError(f"invalid busy_timeout_ms {busy_timeout_ms!r}: expected an int")
        if busy_timeout_ms < 0:
            raise ValueError(f"invalid busy_timeout_ms {busy_timeout_ms}: expected 0 or more")
        if page_cache_kib is not None and (
            not isinstance(page_cache_kib, int)
            or isinstance(page_cache_kib, bool)
            or page_cache_kib < 1
        ):
            raise ValueError(
                f"invalid page_cache_kib {page_cache_kib!r}: expected None or an int >= 1"
            )
        self._page_cache_kib = page_cache_kib
        # Absolute, so that connections opened later by other threads ignore a chdir.
        self.path = Path(os.path.abspath(os.fspath(path)))
        self._sleep = sleep
        self._busy_timeout_ms = busy_timeout_ms
        self.read_only = bool(read_only)
        self._lock = threading.Lock()
        self._open_connections: list[_OpenConnection] = []
        self._generation = 0
        self._thread_state = _ThreadState()
        self._checkpointer: BackgroundCheckpointer | None = None
        if checkpoint_in_background and not self.read_only:
            self._checkpointer = BackgroundCheckpointer(
                str(self.path), functools.partial(_checkpoint, weakref.ref(self))
            )
        _live_writers.add(self)

        if not self.read_only:
            _create_private_parents(self.path.parent)
            _create_private_file(self.path)
        try:
            self._migrate()
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"DatabaseWriter(path={str(self.path)!r})"

    def __enter__(self) -> DatabaseWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- writes ---------------------------------------------------------------------------

    def insert_run(self, record: RunRecord) -> bool:
        """Insert ``record`` as a new row and return True, or return False if its run_id exists.

        created_at is taken from the record, or set to now when it is None. updated_at is
        always set to now.

        Raises:
            TypeError: ``record`` is not a RunRecord, or a field has a type its annotation
                does not allow.
            ValueError: a status, timestamp or integer is invalid.
        """
        values = self._record_values(record)

        def insert(connection: sqlite3.Connection) -> bool:
            return connection.execute(_INSERT_NEW_SQL, values).rowcount == 1

        return self._write("insert_run", record.run_id, insert)

    def upsert_run(self, record: RunRecord) -> None:
        """Insert ``record``, or overwrite every column of its existing row.

        The one exception is created_at: a stored value is kept. updated_at is set to now.

        Raises:
            TypeError, ValueError: as insert_run.
        """
        values = self._record_values(record)

        def upsert(connection: sqlite3.Connection) -> None:
            connection.execute(_UPSERT_SQL, values)

        self._write("upsert_run", record.run_id, upsert)

    def update_run(self, run_id: str, *, if_status: str | None = None, **fields: Any) -> bool:
        """Set the given columns of run ``run_id`` and return whether a row was updated.

        Field names are those of RunRecord other than run_id. updated_at is set to now
        unless a value for it is given. A created_at of None keeps the stored one.

        Args:
            run_id: the run to update.
            if_status: update the row only if its stored status equals this one, checked
                in the same write transaction. Callers pass "running" so that a run that
                ended meanwhile keeps its final record. None updates whatever the status.
            fields: the column values to set.

        Returns:
            True if the row was updated. False if no row has ``run_id``, or its status
            differs from ``if_status``.

        Raises:
            ValueError: a name is not an updatable column (the message lists them), or a
                status (``if_status`` included), timestamp or integer is invalid.
            TypeError: a value has a type the RunRecord annotation does not allow.
        """
        _check_run_id(run_id)
        if if_status is not None and if_status not in STATUSES:
            raise ValueError(
                f"update_run(): invalid if_status {if_status!r}: expected one of "
                f"{', '.join(STATUSES)}, or None"
            )
        unknown = [name for name in fields if name not in _UPDATABLE_COLUMNS]
        if unknown:
            allowed = ", ".join(sorted(_UPDATABLE_COLUMNS))
            raise ValueError(
                f"update_run(): unknown column {unknown[0]!r} in {TABLE}. "
                f"Allowed columns: {allowed}"
            )

        values = {name: _to_sql(name, value, run_id) for name, value in fields.items()}
        if values.get("updated_at") is None:
            values["updated_at"] = get_iso8601_timestamp()
        if "created_at" in values and values["created_at"] is None:
            del values["created_at"]

        # The SET clause names only columns from _COLUMNS: each name passed the check
        # above, and the loop takes the identifier from the tuple, not from the caller.
        assignments = ", ".join(f"{name} = :{name}" for name in _COLUMNS if name in values)
        sql = f"UPDATE {TABLE} SET {assignments} WHERE run_id = :run_id"
        parameters = {**values, "run_id": run_id}
        if if_status is not None:
            # The parameter name cannot clash with a column's: if_status is not a column.
            sql += " AND status = :if_status"
            parameters["if_status"] = if_status

        def update(connection: sqlite3.Connection) -> bool:
            return connection.execute(sql, parameters).rowcount == 1

        return self._write("update_run", run_id, update)

    def mark_api_posted(self, run_id: str, posted_at: str | None = None) -> None:
        """Mark run ``run_id`` as posted at ``posted_at`` (default: now) and clear its last error.

        A run that is not in the index is logged as a WARNING, not raised.

        Raises:
            ValueError: ``posted_at`` is not an ISO 8601 timestamp with an offset.
        """
        _check_run_id(run_id)
        now = get_iso8601_timestamp()
        posted = now if posted_at is None else _to_sql("api_posted_at", posted_at, run_id)
        sql = (
            f"UPDATE {TABLE} SET api_posted = 1, api_posted_at = ?, api_last_error = NULL, "
            "updated_at = ? WHERE run_id = ?"
        )

        def mark(connection: sqlite3.Connection) -> bool:
            return connection.execute(sql, (posted, now, run_id)).rowcount == 1

        if not self._write("mark_api_posted", run_id, mark):
            logger.warning(
                "mark_api_posted: run %s not found in the index %s, so nothing was marked",
                run_id,
                self.path,
            )

    def increment_api_retry_count(self, run_id: str, error: str | None = None) -> int:
        """Add one to the failed posts of run ``run_id``, store ``error``, return the new count.

        An ``error`` of None keeps the stored api_last_error. A run that is not in the
        index is logged as a WARNING and 0 is returned.

        Raises:
            TypeError: ``error`` is not a string or None.
        """
        _check_run_id(run_id)
        stored_error = _to_sql("api_last_error", error, run_id)
        sql = (
            f"UPDATE {TABLE} SET api_retry_count = api_retry_count + 1, "
            "api_last_error = COALESCE(?, api_last_error), updated_at = ? WHERE run_id = ?"
        )

        def increment(connection: sqlite3.Connection) -> int | None:
            parameters = (stored_error, get_iso8601_timestamp(), run_id)
            if connection.execute(sql, parameters).rowcount != 1:
                return None
            row = connection.execute(
                f"SELECT api_retry_count FROM {TABLE} WHERE run_id = ?", (run_id,)
            ).fetchone()
            return int(row[0])

        count = self._write("increment_api_retry_count", run_id, increment)
        if count is None:
            logger.warning(
                "increment_api_retry_count: run %s not found in the index %s, "
                "so nothing was counted",
                run_id,
                self.path,
            )
            return 0
        return count

    # -- bulk writes ----------------------------------------------------------------------

    def load_runs(self, records: Iterable[RunRecord], *, batch_size: int = 1000) -> int:
        """Write each record's row exactly as given, replacing a row with the same run_id.

        Unlike upsert_run, every column comes from the record, created_at and updated_at
        included. An updated_at of None stays None, and a created_at of None becomes the
        record's start_time. Timestamps are stored as UTC text, as by every other write.
        ``records`` is read lazily, ``batch_size`` at a time, and each batch is written in
        one transaction. Of two records with the same run_id, the later one wins.

        Returns:
            The number of records written.

        Raises:
            TypeError, ValueError: as insert_run, or a batch_size below 1. The batches
                before the invalid record stay written, and nothing of its batch is.
        """
        _check_batch_size(batch_size)
        written = 0
        iterator = iter(records)
        while batch := list(itertools.islice(iterator, batch_size)):
            values = [self._loaded_values(record) for record in batch]

            def load(connection: sqlite3.Connection, values: list[dict[str, Any]] = values) -> None:
                connection.executemany(_LOAD_SQL, values)

            self._write("load_runs", None, load)
            written += len(values)
        return written

    def delete_runs(
        self,
        *,
        started_before: str,
        ended_before: str | None = None,
        batch_size: int = 1000,
        progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Delete the runs with start_time before ``started_before`` and return how many.

        With ``ended_before``, a run also needs an end_time before it, or no end_time, to
        be deleted. Rows go oldest first, ``batch_size`` per write transaction, so that
        writers in other processes wait for one short transaction at most. ``progress(
        deleted, total)`` is called after each batch. total is the count at the start,
        raised to ``deleted`` if rows added meanwhile make it larger. Logs the count at
        INFO.

        Raises:
            ValueError: ``started_before`` or ``ended_before`` is not ISO 8601 with an
                offset, or a batch_size below 1.
            Any exception raised by ``progress`` propagates. The batches before it stay
                deleted.
        """
        clauses, parameters = _age_filters(started_before, ended_before)
        _check_batch_size(batch_size)
        total = self.count_runs(started_before=started_before, ended_before=ended_before)
        sql = (
            f"DELETE FROM {TABLE} WHERE rowid IN (SELECT rowid FROM {TABLE} "
            f"WHERE {' AND '.join(clauses)} ORDER BY start_time LIMIT ?)"
        )
        arguments = [*parameters, batch_size]

        def delete_batch(connection: sqlite3.Connection) -> int:
            return int(connection.execute(sql, arguments).rowcount)

        deleted = 0
        while count := self._write("delete_runs", None, delete_batch):
            deleted += count
            total = max(total, deleted)
            if progress is not None:
                progress(deleted, total)
        condition = f"started before {parameters[0]}"
        if ended_before is not None:
            condition += f" and not ended at or after {parameters[1]}"
        logger.info("deleted %d runs %s from the index %s", deleted, condition, self.path)
        return deleted

    # -- reads ----------------------------------------------------------------------------

    def get_run(self, run_id: str) -> RunRecord | None:
        """Return run ``run_id``, or None if the index does not have it."""
        _check_run_id(run_id)
        sql = f"SELECT {_SELECT_COLUMNS} FROM {TABLE} WHERE run_id = ?"
        with _fork_gate.entered():
            row = self._connection().execute(sql, (run_id,)).fetchone()
        return None if row is None else RunRecord.from_dict(dict(row))

    def list_runs(
        self,
        *,
        agent_name: str | None = None,
        status: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int | None = 50,
    ) -> list[RunRecord]:
        """Return the runs that match every filter given, newest start_time first.

        Args:
            agent_name: only runs of this agent.
            status: only runs with this status.
            since: only runs that started at or after this ISO 8601 timestamp.
            until: only runs that started before this ISO 8601 timestamp.
            limit: the maximum number of runs, or None for all.

        Raises:
            ValueError: an unknown status, a ``since`` or ``until`` that is not ISO 8601
                with an offset, or a negative limit.
        """
        clauses, parameters = _run_filters(agent_name, status, since, until)
        parameters.append(_check_limit(limit))

        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = (
            f"SELECT {_SELECT_COLUMNS} FROM {TABLE}{where} "
            "ORDER BY start_time DESC, run_id DESC LIMIT ?"
        )
        with _fork_gate.entered():
            rows = self._connection().execute(sql, parameters).fetchall()
        return [RunRecord.from_dict(dict(row)) for row in rows]

    def iter_runs(
        self,
        *,
        agent_name: str | None = None,
        status: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int | None = None,
        batch_size: int = ITER_BATCH_SIZE,
    ) -> Iterator[RunRecord]:
        """Yield the runs that match every filter, newest start_time first, in batches.

        The filters are those of list_runs, but ``limit`` defaults to None (all runs).
        Each batch of ``batch_size`` rows is one query that resumes after the last
        (start_time, run_id) yielded, so memory does not grow with the number of rows and
        no read transaction stays open between batches. Rows inserted or updated meanwhile
        never make the iterator repeat or skip a row that existed when it started, unless
        an update changes a start_time, which the client never does. A new row appears
        only if it sorts after the last row yielded. A row deleted meanwhile is skipped
        unless its batch was already read.

        Raises:
            ValueError: as list_runs, or a batch_size below 1. The arguments are checked
                when iter_runs is called, before the first row is read.
        """
        clauses, parameters = _run_filters(agent_name, status, since, until)
        remaining = _check_limit(limit)
        _check_batch_size(batch_size)
        return self._iter_batches(clauses, parameters, remaining, batch_size)

    def _iter_batches(
        self, clauses: list[str], parameters: list[Any], remaining: int, batch_size: int
    ) -> Iterator[RunRecord]:
        # INDEXED BY keeps each batch a walk of the start_time index from the last row
        # yielded. If SQLite chose the agent_name or status index instead, it would sort
        # every matching row again for each batch.
        where = " AND ".join([*clauses, "start_time <= ? AND (start_time < ? OR run_id < ?)"])
        first_where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        select = f"SELECT {_SELECT_COLUMNS} FROM {TABLE} INDEXED BY idx_agent_runs_start_time"
        order = " ORDER BY start_time DESC, run_id DESC LIMIT ?"
        last: tuple[str, str] | None = None
        while remaining != 0:
            size = batch_size if remaining < 0 else min(batch_size, remaining)
            if last is None:
                sql = select + first_where + order
                arguments = [*parameters, size]
            else:
                sql = select + " WHERE " + where + order
                arguments = [*parameters, last[0], last[0], last[1], size]
            with _fork_gate.entered():
                rows = self._connection().execute(sql, arguments).fetchall()
            for row in rows:
                yield RunRecord.from_dict(dict(row))
            if len(rows) < size:
                return
            last = (rows[-1]["start_time"], rows[-1]["run_id"])
            if remaining > 0:
                remaining -= len(rows)

    def count_runs(
        self, *, started_before: str | None = None, ended_before: str | None = None
    ) -> int:
        """Return the number of runs that match every filter given, or of all runs.

        Args:
            started_before: only runs with start_time before this ISO 8601 timestamp.
            ended_before: only runs with end_time before this ISO 8601 timestamp, or
                with no end_time (still running, or their end never reached the index).

        Raises:
            ValueError: a timestamp is not ISO 8601 with an offset.
        """
        clauses, parameters = _age_filters(started_before, ended_before)
        sql = f"SELECT COUNT(*) FROM {TABLE}"
        if clauses:
            sql += f" WHERE {' AND '.join(clauses)}"
        with _fork_gate.entered():
            row = self._connection().execute(sql, parameters).fetchone()
        return int(row[0])

    def run_statuses(self) -> dict[str, str]:
        """Return the status of every run in the index, keyed by run_id."""
        with _fork_gate.entered():
            rows = self._connection().execute(f"SELECT run_id, status FROM {TABLE}").fetchall()
        return {run_id: status for run_id, status in rows}

    def unreadable_rows(self) -> list[tuple[str, str]]:
        """Read every row and return (run_id, error) for each one that RunRecord cannot read.

        A row is unreadable when a text value is not valid UTF-8, or when
        RunRecord.from_dict rejects it, for instance a metrics_json that is not valid
        JSON. Reads such a row would fail with ValueError or sqlite3.OperationalError. A
        run_id that is not valid UTF-8 is returned with its bad bytes as ``\\x..`` escapes.
        The rows are read in rowid order, one at a time, so memory does not grow with the
        table.
        """
        sql = f"SELECT {_SELECT_COLUMNS} FROM {TABLE} ORDER BY rowid"
        connection = self._connection()
        unreadable: list[tuple[str, str]] = []
        with _fork_gate.entered():
            # The connection belongs to this thread, so the text_factory set here for the
            # scan changes no read in another thread. Bytes let one row with invalid
            # UTF-8 be reported instead of ending the scan.
            connection.text_factory = bytes
            try:
                # Plain tuples: building a sqlite3.Row and reading it by name costs more
                # than the check itself.
                cursor = connection.cursor()
                cursor.row_factory = None
                for row in cursor.execute(sql):
                    problem = _row_problem(row)
                    if problem is not None:
                        unreadable.append(problem)
            finally:
                connection.text_factory = str
        return unreadable

    def get_pending_api_posts(self, limit: int | None = 100) -> list[RunRecord]:
        """Return ended runs not yet posted to the API, oldest start_time first.

        Raises:
            ValueError: ``limit`` is negative.
        """
        sql = (
            f"SELECT {_SELECT_COLUMNS} FROM {TABLE} WHERE {_PENDING_CONDITION} "
            "ORDER BY start_time, run_id LIMIT ?"
        )
        with _fork_gate.entered():
            rows = self._connection().execute(sql, (_check_limit(limit),)).fetchall()
        return [RunRecord.from_dict(dict(row)) for row in rows]

    def count_pending_api_posts(
        self, *, started_before: str | None = None, ended_before: str | None = None
    ) -> int:
        """Return the number of ended runs not yet posted to the API.

        The filters are those of count_runs. The query repeats the condition of the
        partial index idx_agent_runs_pending, so SQLite reads the entries of that index
        (keyed by start_time) and only the table rows that ``ended_before`` needs.

        Raises:
            ValueError: a timestamp is not ISO 8601 with an offset.
        """
        clauses, parameters = _age_filters(started_before, ended_before)
        where = " AND ".join([_PENDING_CONDITION, *clauses])
        sql = f"SELECT COUNT(*) FROM {TABLE} WHERE {where}"
        with _fork_gate.entered():
            row = self._connection().execute(sql, parameters).fetchone()
        return int(row[0])

    def get_run_stats(self, since: str | None = None) -> dict[str, Any]:
        """Return counts of runs in total, per status and per agent, from one snapshot.

        Args:
            since: count only runs that started at or after this ISO 8601 timestamp.
                None counts every run.

        The keys of the returned dict:

        - ``since``: ``since`` as UTC text in the index's form, or None.
        - ``total_runs``: the number of runs counted.
        - ``by_status``: the count per status, with every status of models.STATUSES,
          including those with 0 runs.
        - ``pending_api_posts``: how many of the runs counted get_pending_api_posts would
          return.
        - ``by_agent``: per agent name, in name order, a dict of:

          - ``runs``, and the count of each status of models.STATUSES (0 included);
          - ``items_discovered``, ``items_succeeded``, ``items_failed``: sums;
          - ``pending_api_posts``: as above, for the agent;
          - ``avg_duration_ms``: the mean duration as a float;
          - ``p50_duration_ms``, ``p95_duration_ms``: nearest-rank percentiles of the
            duration. Of the agent's n runs with a duration, sorted by duration, the
            p-th percentile is the one at 1-based position ceil(p * n / 100). For the
            durations 10, 20, 30, 40 that gives p50 = 20 and p95 = 40. Each is a
            duration that a run had, never an interpolation.

          The three duration values are None when none of the agent's runs has a
          duration. Runs still running usually have none.

        Raises:
            ValueError: ``since`` is not ISO 8601 with an offset.
            sqlite3.OperationalError: an items sum exceeds 2**63 - 1 ("integer overflow").
        """
        where = ""
        parameters: list[Any] = []
        if since is not None:
            since = _normalise_timestamp("since", since)
            where = " WHERE start_time >= ?"
            parameters.append(since)

        connection = self._connection()
        durations: dict[str, list[int]] = {}
        # One read transaction, so that every number comes from the same WAL snapshot.
        with _fork_gate.entered():
            connection.execute("BEGIN")
            try:
                source = _stats_source(connection, since)
                agent_rows = connection.execute(
                    _agent_totals_sql(source, where), [*STATUSES, *parameters]
                ).fetchall()
                rows = connection.execute(_durations_sql(source, where), parameters)
                for agent_name, duration_ms in rows:
                    durations.setdefault(agent_name, []).append(duration_ms)
            finally:
                connection.execute("COMMIT")

        by_agent = {row["agent_name"]: _agent_totals(row) for row in agent_rows}
        for agent_name, values in durations.items():
            values.sort()
            for percent, key in _PERCENTILES.items():
                by_agent[agent_name][key] = values[_nearest_rank(percent, len(values)) - 1]

        by_status = {
            status: sum(totals[status] for totals in by_agent.values()) for status in STATUSES
        }
        return {
            "since": since,
            "total_runs": sum(by_status.values()),
            "by_status": by_status,
            "pending_api_posts": sum(totals["pending_api_posts"] for totals in by_agent.values()),
            "by_agent": by_agent,
        }

    def check_integrity(self) -> tuple[bool, list[str]]:
        """Run SQLite's ``PRAGMA integrity_check`` and return (ok, its messages).

        A file too damaged to check returns False and the error's message.

        Raises:
            sqlite3.OperationalError: the check could not run, e.g. the database is locked.
        """
        try:
            with _fork_gate.entered():
                rows = self._connection().execute("PRAGMA integrity_check").fetchall()
        except sqlite3.OperationalError:
            raise
        except sqlite3.DatabaseError as exc:
            return False, [f"integrity_check failed: {exc}"]
        messages = [str(row[0]) for row in rows]
        return messages == ["ok"], messages

    def close(self) -> None:
        """Close every connection that this process opened, in all threads.

        Calling it again does nothing. A later call of another method opens a new
        connection. A connection that another thread is using fails in that thread.
        Connections inherited through fork stay open in the child. SQLite's page "How To
        Corrupt An SQLite Database File" warns against using a connection across fork(),
        and closing one is such a use.
        """
        still_checkpointing = None
        if self._checkpointer is not None:
            still_checkpointing = self._checkpointer.stop()
        pid = os.getpid()
        with self._lock:
            self._generation += 1
            # A checkpoint that outlasted the wait keeps its connection, which the
            # cleanup of finished threads closes once it ends.
            closing = [
                entry
                for entry in self._open_connections
                if entry.pid == pid and entry.thread is not still_checkpointing
            ]
            self._open_connections = [
                entry for entry in self._open_connections if entry not in closing
            ]
        for entry in closing:
            try:
                with _fork_gate.entered():
                    entry.connection.close()
            except sqlite3.Error as exc:
                logger.warning("cannot close a connection to %s: %s", self.path, exc)

    # -- internals ------------------------------------------------------------------------

    def _record_values(self, record: RunRecord) -> dict[str, Any]:
        if not isinstance(record, RunRecord):
            raise TypeError(f"expected a RunRecord, got {type(record).__name__}")
        values = {name: _to_sql(name, getattr(record, name), record.run_id) for name in _COLUMNS}
        now = get_iso8601_timestamp()
        if values["created_at"] is None:
            values["created_at"] = now
        values["updated_at"] = now
        return values

    def _loaded_values(self, record: RunRecord) -> dict[str, Any]:
        if not isinstance(record, RunRecord):
            raise TypeError(f"expected a RunRecord, got {type(record).__name__}")
        values = {name: _to_sql(name, getattr(record, name), record.run_id) for name in _COLUMNS}
        if values["created_at"] is None:
            values["created_at"] = values["start_time"]
        return values

    def _migrate(self) -> None:
        """Bring the schema to SCHEMA_VERSION, or raise SchemaError if it is newer."""
        connection = self._connection()
        found = _read_user_version(connection)
        _check_version(self.path, found)
        if found == SCHEMA_VERSION:
            return
        if self.read_only:
            raise SchemaError(
                f"{self.path} has schema version {found}, older than schema version "
                f"{SCHEMA_VERSION} that read-only access needs: open it once for writing "
                "to migrate it, as every agent and 'telemetry check' do"
            )

        def migrate(connection: sqlite3.Connection) -> None:
            _apply_migrations(connection, self.path)

        self._write("migrate schema", None, migrate)

    def _write(
        self,
        operation: str,
        run_id: str | None,
        work: Callable[[sqlite3.Connection], _T],
    ) -> _T:
        """Run ``work`` in one BEGIN IMMEDIATE transaction, retrying while locked."""
        connection = self._connection()

        def transaction() -> _T:
            with _fork_gate.entered():
                connection.execute("BEGIN IMMEDIATE")
                try:
                    result = work(connection)
                    connection.execute("COMMIT")
                    if self._checkpointer is not None:
                        self._checkpointer.note_commit()
                except BaseException:
                    if connection.in_transaction:
                        # A failed ROLLBACK must not hide the error that caused it.
                        with contextlib.suppress(sqlite3.Error):
                            connection.execute("ROLLBACK")
                    raise
                return result

        return self._retry_while_locked(operation, run_id, transaction)

    def _retry_while_locked(
        self, operation: str, run_id: str | None, action: Callable[[], _T]
    ) -> _T:
        """Call ``action``, and call it again after each of RETRY_DELAYS while it is locked.

        Before an attempt fails, SQLite's busy handler has usually waited busy_timeout, so
        the WARNING per retry is not rate-limited further.
        """
        subject = operation if run_id is None else f"{operation} of run {run_id}"
        attempts = len(RETRY_DELAYS) + 1
        for attempt, delay in enumerate(RETRY_DELAYS, start=1):
            try:
                return action()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                logger.warning(
                    "%s in %s failed: %s. Retry %d of %d in %.1f s",
                    subject,
                    self.path,
                    exc,
                    attempt,
                    len(RETRY_DELAYS),
                    delay,
                )
            self._sleep(delay)

        try:
            return action()
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):
                logger.error(
                    "%s in %s failed after %d attempts, giving up: %s",
                    subject,
                    self.path,
                    attempts,
                    exc,
                )
            raise

    def _connection(self) -> sqlite3.Connection:
        """Return this thread's connection, opening one in a new thread or process."""
        state = self._thread_state
        pid = os.getpid()
        if (
            state.connection is not None
            and state.pid == pid
            and state.generation == self._generation
        ):
            current = state.connection
            if not isinstance(current, _ImmutableConnection):
                return current
            if current.opened_identity == file_identity(self.path):
                return current
            # A writer changed the file since this connection opened it, and an immutable
            # connection never notices that by itself, so its page cache may be stale.
            with self._lock:
                self._open_connections = [
                    entry for entry in self._open_connections if entry.connection is not current
                ]
            with _fork_gate.entered():
                current.close()
            state.connection = None

        # In a forked child the inherited connection is replaced but stays referenced in
        # _open_connections, so its finalizer cannot close the parent's files here.
        # NOTE: a child that ends through normal interpreter shutdown still deallocates
        # it; a child that ends with os._exit, as multiprocessing's fork workers do, does not.
        generation = self._generation
        connection = self._retry_while_locked("open connection", None, self._open_in_gate)
        with self._lock:
            # While atexit hooks run, the main thread counts as not alive although it
            # still uses its connection, so its connection is never closed here.
            main = threading.main_thread()
            finished = [
                entry
                for entry in self._open_connections
                if entry.pid == pid and entry.thread is not main and not entry.thread.is_alive()
            ]
            self._open_connections = [
                entry for entry in self._open_connections if entry not in finished
            ]
            self._open_connections.append(
                _OpenConnection(connection, pid, threading.current_thread())
            )
        with _fork_gate.entered():
            for entry in finished:
                entry.connection.close()
        state.connection = connection
        state.pid = pid
        state.generation = generation
        return connection

    def _open_in_gate(self) -> sqlite3.Connection:
        # SQLite holds process-wide mutexes while it opens a file, so a fork in the middle
        # of an open in another thread would leave them held in the child.
        with _fork_gate.entered():
            return self._open()

    def _open(self) -> sqlite3.Connection:
        """Open a connection to ``path`` and set the pragmas every connection needs.

        check_same_thread is off only so that close() and the cleanup of finished threads
        can close connections of other threads. Otherwise each thread uses its own.
        """
        if self.read_only:
            return self._open_read_only()
        # mode=rw: a file deleted since __init__ raises here. Otherwise SQLite would create
        # a new file without the schema and with the umask's mode instead of 0o600.
        uri = f"file:{urllib.request.pathname2url(str(self.path))}?mode=rw"
        connection = sqlite3.connect(
            uri,
            uri=True,
            timeout=self._busy_timeout_ms / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            connection.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
            mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                logger.warning(
                    "index %s uses journal mode %s, not WAL: readers may block writers",
                    self.path,
                    mode,
                )
            connection.execute("PRAGMA synchronous = NORMAL")
            connection.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
            if self._page_cache_kib is not None:
                # A negative cache_size is a size in KiB, a positive one a number of pages.
                connection.execute(f"PRAGMA cache_size = {-self._page_cache_kib}")
            connection.execute("PRAGMA foreign_keys = ON")
        except BaseException:
            connection.close()
            raise
        connection.row_factory = sqlite3.Row
        return connection

    def _open_read_only(self) -> sqlite3.Connection:
        """Open a connection that reads ``path`` with SQLite's mode=ro.

        SQLite may create the -wal and -shm files only when they would belong to the
        file's owner, as read_only_uri decides.
        """
        with wal_files_kept(self.path, self._busy_timeout_ms / 1000):
            uri = read_only_uri(self.path)
            identity = file_identity(self.path)
            immutable = uri.endswith("&immutable=1")
            connection = sqlite3.connect(
                uri,
                uri=True,
                timeout=self._busy_timeout_ms / 1000,
                isolation_level=None,
                check_same_thread=False,
                factory=_ImmutableConnection if immutable else sqlite3.Connection,
            )
            try:
                connection.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
                connection.execute("PRAGMA query_only = ON")
                # The first read opens the -wal and -shm files and takes SQLite's shared
                # lock, which from then on keeps a closing writer from deleting them.
                connection.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            except BaseException:
                connection.close()
                raise
        if isinstance(connection, _ImmutableConnection):
            connection.opened_identity = identity
        connection.row_factory = sqlite3.Row
        return connection
