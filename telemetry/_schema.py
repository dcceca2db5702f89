"""The agent_runs table: its columns, DDL, migrations and the SQL form of each value.

The columns are the fields of models.RunRecord, in their order. ``PRAGMA user_version``
stores the schema version of a database file, and the steps in _MIGRATIONS bring it to
models.SCHEMA_VERSION. _to_sql checks a value against the RunRecord annotation of its
column and converts it to the form that SQLite stores.

DatabaseWriter in telemetry.database calls these functions, and runs the migrations in
its own write transaction. Logger: ``telemetry.index``, the logger of telemetry.database.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import reprlib
import sqlite3
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from telemetry.encoding import INT64_MAX, INT64_MIN, ConversionIssue, dumps, make_jsonable
from telemetry.errors import SchemaError
from telemetry.models import (
    SCHEMA_VERSION,
    STATUSES,
    RunRecord,
    get_iso8601_timestamp,
    parse_timestamp,
)

__all__ = [
    "TABLE",
    "_COLUMNS",
    "_MIGRATIONS",
    "_PENDING_CONDITION",
    "_UPDATABLE_COLUMNS",
    "_apply_migrations",
    "_check_version",
    "_normalise_timestamp",
    "_read_user_version",
    "_to_sql",
]

logger = logging.getLogger("telemetry.index")

TABLE = "agent_runs"

# Column names used in SQL come from this tuple only, never from a caller's string.
_COLUMNS: tuple[str, ...] = tuple(field.name for field in dataclasses.fields(RunRecord))
_UPDATABLE_COLUMNS = frozenset(_COLUMNS) - {"run_id"}
_TIMESTAMP_COLUMNS = frozenset(
    {"start_time", "end_time", "api_posted_at", "created_at", "updated_at"}
)

# The WHERE clause of the pending-posts query must repeat the partial index's condition
# word for word, or SQLite's planner does not use that index.
_PENDING_CONDITION = "api_posted = 0 AND status != 'running'"

# -- schema and migrations ---------------------------------------------------------------


def _migrate_0_to_1(connection: sqlite3.Connection) -> None:
    connection.execute(
        """
        CREATE TABLE agent_runs (
            run_id TEXT PRIMARY KEY NOT NULL,
            agent_name TEXT NOT NULL,
            job_type TEXT NOT NULL,
            start_time TEXT NOT NULL,
            trigger_type TEXT NOT NULL DEFAULT 'cli',
            parent_run_id TEXT,
            status TEXT NOT NULL DEFAULT 'running',
            end_time TEXT,
            duration_ms INTEGER,
            error_summary TEXT,
            error_details TEXT,
            items_discovered INTEGER NOT NULL DEFAULT 0,
            items_succeeded INTEGER NOT NULL DEFAULT 0,
            items_failed INTEGER NOT NULL DEFAULT 0,
            input_summary TEXT,
            output_summary TEXT,
            metrics_json TEXT,
            insight_id TEXT,
            product TEXT,
            platform TEXT,
            product_family TEXT,
            subdomain TEXT,
            git_repo TEXT,
            git_branch TEXT,
            git_commit TEXT,
            git_run_tag TEXT,
            agent_version TEXT,
            hostname TEXT,
            pid INTEGER,
            api_posted INTEGER NOT NULL DEFAULT 0 CHECK (api_posted IN (0, 1)),
            api_posted_at TEXT,
            api_retry_count INTEGER NOT NULL DEFAULT 0,
            api_last_error TEXT,
            created_at TEXT,
            updated_at TEXT,
            schema_version INTEGER NOT NULL DEFAULT 1
        )
        """
    )
    connection.execute("CREATE INDEX idx_agent_runs_start_time ON agent_runs (start_time)")
    connection.execute("CREATE INDEX idx_agent_runs_agent_name ON agent_runs (agent_name)")
    connection.execute("CREATE INDEX idx_agent_runs_status ON agent_runs (status)")
    connection.execute(
        f"CREATE INDEX idx_agent_runs_pending ON agent_runs (start_time) WHERE {_PENDING_CONDITION}"
    )


# _MIGRATIONS[n] turns a database of user_version n into one of version n + 1. A new
# schema version appends a step here. Old steps never change, because databases written
# by old versions of the library still pass through them.
_MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_migrate_0_to_1,)


def _read_user_version(connection: sqlite3.Connection) -> int:
    row = connection.execute("PRAGMA user_version").fetchone()
    return int(row[0])


def _apply_migrations(connection: sqlite3.Connection, path: Path) -> None:
    """Migrate the schema in ``connection`` to SCHEMA_VERSION and set its user_version.

    ``path`` names the database file in messages. Call it inside a BEGIN IMMEDIATE
    transaction, so that the steps and the new user_version commit or roll back together.

    Raises:
        SchemaError: the schema is newer than SCHEMA_VERSION, or the file has an
            agent_runs table but user_version 0, so this library did not create it.
    """
    # Read the version again under the write lock: another process may have migrated
    # the file since the caller read it.
    found = _read_user_version(connection)
    _check_version(path, found)
    if found == 0 and _has_table(connection):
        raise SchemaError(
            f"{path} has a table {TABLE} but schema version 0, so agent-telemetry "
            "did not create it: move the file away or set db_path to another file"
        )
    for version in range(found, SCHEMA_VERSION):
        _MIGRATIONS[version](connection)
    # PRAGMA takes no bound parameters; the value is the library's own integer.
    connection.execute(f"PRAGMA user_version = {int(SCHEMA_VERSION)}")
    logger.info("migrated index %s from schema %d to %d", path, found, SCHEMA_VERSION)


def _check_version(path: Path, found: int) -> None:
    """Raise SchemaError if the schema version ``found`` in ``path`` is not supported."""
    if 0 <= found <= SCHEMA_VERSION:
        return
    raise SchemaError(
        f"{path} has schema version {found}, but this version of agent-telemetry "
        f"supports schema version {SCHEMA_VERSION} at most: upgrade agent-telemetry, "
        "or point the db_path setting (TELEMETRY_DB_PATH) at another file"
    )


def _has_table(connection: sqlite3.Connection) -> bool:
    row = connection.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (TABLE,)
    ).fetchone()
    return row is not None


# -- values: checks and conversion to SQLite ---------------------------------------------


def _allowed_types() -> dict[str, tuple[type, ...]]:
    """Return, per column, the Python types its RunRecord annotation allows."""
    hints = typing.get_type_hints(RunRecord)
    allowed: dict[str, tuple[type, ...]] = {}
    for name in _COLUMNS:
        hint = hints[name]
        is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        members = typing.get_args(hint) if is_union else (hint,)
        allowed[name] = tuple(typing.get_origin(member) or member for member in members)
    return allowed


_ALLOWED_TYPES = _allowed_types()

# Text columns whose ASCII strings are stored as they are: not a timestamp, not the status.
_PLAIN_TEXT_COLUMNS = frozenset(
    name
    for name, kinds in _ALLOWED_TYPES.items()
    if str in kinds and name not in _TIMESTAMP_COLUMNS and name != "status"
)


def _describe_types(name: str) -> str:
    names = [kind.__name__ for kind in _ALLOWED_TYPES[name]]
    return " or ".join("None" if kind == "NoneType" else kind for kind in names)


def _type_error(name: str, value: object) -> TypeError:
    return TypeError(
        f"invalid {name}: expected {_describe_types(name)}, "
        f"got {type(value).__name__} {reprlib.repr(value)}"
    )


def _log_conversions(run_id: object, issues: list[ConversionIssue]) -> None:
    for issue in issues:
        logger.warning("run %s: %s at %s in the index", run_id, issue.reason, issue.path)


def _normalise_timestamp(name: str, value: str) -> str:
    """Return ``value`` as the UTC ``+00:00`` text that get_iso8601_timestamp writes.

    Raises:
        ValueError: the text is not ISO 8601 with an offset. The message names the column.
    """
    if _is_utc_text_form(value):
        # Already the form get_iso8601_timestamp writes, which the client's own times have.
        return value
    try:
        return get_iso8601_timestamp(parse_timestamp(value))
    except ValueError as exc:
        raise ValueError(f"invalid {name}: {exc}") from None


def _is_utc_text_form(value: str) -> bool:
    # Whether value is a valid time of the form 2026-12-04T19:34:17.123456+00:00. Once the
    # separators are in place, fromisoformat checks every digit and range.
    if not (
        len(value) == 32
        and value.endswith("+00:00")
        and value[4] == "-"
        and value[7] == "-"
        and value[10] == "T"
        and value[13] == ":"
        and value[16] == ":"
        and value[19] == "."
    ):
        return False
    try:
        datetime.datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def _to_sql(name: str, value: Any, run_id: object) -> Any:
    """Check ``value`` against the RunRecord type of column ``name`` and convert it for SQLite.

    metrics_json is encoded to JSON text, api_posted to 0 or 1, and timestamps to UTC text.
    A lone surrogate in a string, which SQLite cannot store, is escaped as the journal does,
    with a WARNING.

    Raises:
        TypeError: the value's type is not allowed for the column.
        ValueError: an integer outside 64 bits, a status not in models.STATUSES, or a
            timestamp that cannot be parsed.
    """
    kind = type(value)
    if kind is str and name in _PLAIN_TEXT_COLUMNS and value.isascii():
        # The most common case, which the checks below would return unchanged.
        return value
    allowed = _ALLOWED_TYPES[name]
    if value is None:
        if type(None) in allowed:
            return None
        raise _type_error(name, value)

    if dict in allowed:
        if not isinstance(value, Mapping):
            raise _type_error(name, value)
        encoded, issues = dumps(value, name)
        _log_conversions(run_id, issues)
        return encoded.decode("utf-8")

    if bool in allowed:
        if isinstance(value, bool) or (type(value) is int and value in (0, 1)):
            return int(value)
        raise _type_error(name, value)

    if int in allowed:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _type_error(name, value)
        if not INT64_MIN <= value <= INT64_MAX:
            raise ValueError(f"invalid {name}={value}: SQLite stores integers of 64 bits at most")
        return int(value)

    if str in allowed and isinstance(value, str):
        if name == "status" and value not in STATUSES:
            raise ValueError(f"invalid status {value!r}: expected one of {', '.join(STATUSES)}")
        if name in _TIMESTAMP_COLUMNS:
            return _normalise_timestamp(name, value)
        text, issues = make_jsonable(str(value), name)
        _log_conversions(run_id, issues)
        return text
    raise _type_error(name, value)
