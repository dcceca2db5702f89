"""Tests of DatabaseWriter against real SQLite files, threads and forked processes."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from record_support import make_full_record

from telemetry import database
from telemetry._checkpoint import COMMITS_PER_CHECKPOINT
from telemetry.database import RETRY_DELAYS, DatabaseWriter
from telemetry.errors import SchemaError
from telemetry.models import SCHEMA_VERSION, STATUSES, RunRecord

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

INDEX_LOGGER = "telemetry.index"


def make_record(run_id: str, **fields: object) -> RunRecord:
    """Return a run of agent "agent-a" started at 2026-01-01, with ``fields`` changed."""
    values: dict[str, object] = {
        "run_id": run_id,
        "agent_name": "agent-a",
        "job_type": "import",
        "start_time": "2026-01-01T00:00:00.000000+00:00",
    }
    values.update(fields)
    return RunRecord(**values)  # type: ignore[arg-type]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """Return the path of a database file that does not exist yet."""
    return tmp_path / "index" / "telemetry.db"


@pytest.fixture
def writer(db_path: Path) -> Iterator[DatabaseWriter]:
    """Yield an open writer on a new database, closed after the test."""
    opened = DatabaseWriter(db_path)
    yield opened
    opened.close()


def read_user_version(path: Path) -> int:
    """Return PRAGMA user_version of ``path``, read through a separate connection."""
    connection = sqlite3.connect(path)
    try:
        return int(connection.execute("PRAGMA user_version").fetchone()[0])
    finally:
        connection.close()


# -- opening and schema -------------------------------------------------------------------


def test_open_sets_pragmas(writer: DatabaseWriter) -> None:
    """Every pragma the index relies on is in effect on the writer's connection."""
    connection = writer._connection()
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert connection.execute("PRAGMA synchronous").fetchone()[0] == 1
    assert connection.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    assert connection.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
    assert connection.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_open_sets_user_version(writer: DatabaseWriter) -> None:
    """A new database gets the library's schema version as user_version."""
    assert read_user_version(writer.path) == SCHEMA_VERSION


def test_open_creates_private_files(tmp_path: Path) -> None:
    """Missing directories get mode 0o700, and the database and its WAL files 0o600."""
    path = tmp_path / "a" / "b" / "telemetry.db"
    with DatabaseWriter(path) as writer:
        writer.insert_run(make_record("run-1"))
        assert stat.S_IMODE(os.stat(path.parent.parent).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(f"{path}-wal").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(f"{path}-shm").st_mode) == 0o600


def test_open_keeps_existing_mode(tmp_path: Path) -> None:
    """An existing database file keeps the mode its owner gave it."""
    path = tmp_path / "telemetry.db"
    path.touch(mode=0o640)
    os.chmod(path, 0o640)
    DatabaseWriter(path).close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_open_path_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative path is made absolute, so a later chdir does not move the index."""
    monkeypatch.chdir(tmp_path)
    with DatabaseWriter("relative.db") as writer:
        assert writer.path == tmp_path / "relative.db"


def test_open_rejects_newer_schema(tmp_path: Path) -> None:
    """A user_version above the library's raises SchemaError naming the file and versions."""
    path = tmp_path / "newer.db"
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA user_version = 999")
    connection.close()

    with pytest.raises(SchemaError) as raised:
        DatabaseWriter(path)
    message = str(raised.value)
    assert str(path) in message
    assert "999" in message
    assert f"version {SCHEMA_VERSION}" in message
    assert "upgrade agent-telemetry" in message
    assert "db_path" in message


def test_open_rejects_non_database(tmp_path: Path) -> None:
    """A file of other bytes raises sqlite3.DatabaseError and is left unchanged."""
    path = tmp_path / "notes.db"
    content = b"this is not an SQLite database\n" * 200
    path.write_bytes(content)

    with pytest.raises(sqlite3.DatabaseError):
        DatabaseWriter(path)
    assert path.read_bytes() == content


def test_open_migrates_empty_database(tmp_path: Path) -> None:
    """A version 0 database gets agent_runs with one column per RunRecord field."""
    path = tmp_path / "old.db"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE unrelated (x INTEGER)")
    connection.commit()
    connection.close()

    DatabaseWriter(path).close()

    connection = sqlite3.connect(path)
    columns = [row[1] for row in connection.execute("PRAGMA table_info(agent_runs)")]
    primary_key = [row[1] for row in connection.execute("PRAGMA table_info(agent_runs)") if row[5]]
    indexes = {row[1] for row in connection.execute("PRAGMA index_list(agent_runs)")}
    tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    connection.close()
    assert columns == [field.name for field in dataclasses.fields(RunRecord)]
    assert primary_key == ["run_id"]
    assert {
        "idx_agent_runs_start_time",
        "idx_agent_runs_agent_name",
        "idx_agent_runs_status",
        "idx_agent_runs_pending",
    } <= indexes
    assert "unrelated" in tables
    assert read_user_version(path) == SCHEMA_VERSION


def test_open_rejects_foreign_agent_runs(tmp_path: Path) -> None:
    """A version 0 file whose agent_runs this library did not create raises SchemaError."""
    path = tmp_path / "foreign.db"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE agent_runs (id INTEGER)")
    connection.commit()
    connection.close()

    with pytest.raises(SchemaError, match="did not create it"):
        DatabaseWriter(path)
    assert read_user_version(path) == 0


def test_migrations_cover_schema_version() -> None:
    """There is one migration step per schema version."""
    assert len(database._MIGRATIONS) == SCHEMA_VERSION


def test_reopen_keeps_rows(db_path: Path) -> None:
    """Opening an up-to-date database again keeps its rows."""
    with DatabaseWriter(db_path) as writer:
        writer.insert_run(make_record("run-1"))
    with DatabaseWriter(db_path) as writer:
        assert writer.get_run("run-1") is not None


def test_open_rejects_bad_busy_timeout(db_path: Path) -> None:
    """A negative busy_timeout_ms raises ValueError before any file is created."""
    with pytest.raises(ValueError, match="busy_timeout_ms"):
        DatabaseWriter(db_path, busy_timeout_ms=-1)
    assert not db_path.exists()


# -- inserts, reads and updates -----------------------------------------------------------


def test_insert_run_twice(writer: DatabaseWriter) -> None:
    """The first insert of a run_id returns True, the second False and changes nothing."""
    assert writer.insert_run(make_record("run-1", job_type="first")) is True
    assert writer.insert_run(make_record("run-1", job_type="second")) is False
    stored = writer.get_run("run-1")
    assert stored is not None
    assert stored.job_type == "first"


def test_get_run_round_trip(writer: DatabaseWriter) -> None:
    """A run with every field set reads back equal, updated_at aside."""
    record = make_full_record("run-full")
    writer.insert_run(record)

    stored = writer.get_run("run-full")

    assert stored is not None
    assert stored.updated_at is not None
    assert stored == dataclasses.replace(record, updated_at=stored.updated_at)


def test_get_run_missing(writer: DatabaseWriter) -> None:
    """A run that is not in the index reads as None."""
    assert writer.get_run("no-such-run") is None


def test_insert_run_sets_bookkeeping(writer: DatabaseWriter) -> None:
    """insert_run fills a missing created_at and always sets updated_at."""
    writer.insert_run(make_record("run-1"))
    stored = writer.get_run("run-1")
    assert stored is not None
    assert stored.created_at is not None
    assert stored.updated_at is not None


def test_insert_run_normalises_timestamps(writer: DatabaseWriter) -> None:
    """Timestamps with Z or another offset are stored as UTC +00:00 text."""
    writer.insert_run(
        make_record(
            "run-1", start_time="2026-01-01T02:00:00+02:00", end_time="2026-01-01T00:00:01Z"
        )
    )
    stored = writer.get_run("run-1")
    assert stored is not None
    assert stored.start_time == "2026-01-01T00:00:00.000000+00:00"
    assert stored.end_time == "2026-01-01T00:00:01.000000+00:00"


def test_insert_run_escapes_lone_surrogate(
    writer: DatabaseWriter, caplog: pytest.LogCaptureFixture
) -> None:
    """A lone surrogate, which SQLite cannot store, is escaped with a warning."""
    with caplog.at_level(logging.WARNING, logger=INDEX_LOGGER):
        writer.insert_run(make_record("run-1", error_summary="bad \udcff name"))
    stored = writer.get_run("run-1")
    assert stored is not None
    assert stored.error_summary == "bad \\udcff name"
    assert "error_summary" in caplog.text


def test_insert_run_converts_metrics(writer: DatabaseWriter) -> None:
    """Metrics that JSON cannot hold are stored in the converted form of the journal."""
    writer.insert_run(make_record("run-1", metrics_json={"ratio": float("nan"), 1: b"\x00"}))
    stored = writer.get_run("run-1")
    assert stored is not None
    assert stored.metrics_json == {"ratio": "NaN", "1": "base64:AA=="}


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"status": "done"}, ValueError),
        ({"start_time": "yesterday"}, ValueError),
        ({"items_failed": 2**70}, ValueError),
        ({"items_failed": "3"}, TypeError),
        ({"items_failed": True}, TypeError),
        ({"metrics_json": "[1, 2]"}, TypeError),
        ({"agent_name": None}, TypeError),
    ],
)
def test_insert_run_rejects_invalid(
    writer: DatabaseWriter, fields: dict[str, object], error: type[Exception]
) -> None:
    """A field of the wrong type or out of range raises and nothing is stored."""
    with pytest.raises(error):
        writer.insert_run(make_record("run-1", **fields))
    assert writer.get_run("run-1") is None


def test_insert_run_rejects_non_record(writer: DatabaseWriter) -> None:
    """insert_run of a dict raises TypeError naming RunRecord."""
    with pytest.raises(TypeError, match="RunRecord"):
        writer.insert_run({"run_id": "run-1"})  # type: ignore[arg-type]


def test_update_run_sets_fields(writer: DatabaseWriter) -> None:
    """update_run stores the given values and refreshes updated_at."""
    writer.insert_run(make_record("run-1", updated_at=None))
    before = writer.get_run("run-1")

    changed = writer.update_run(
        "run-1", status="success", duration_ms=12, metrics_json={"n": [1]}, api_posted=False
    )

    after = writer.get_run("run-1")
    assert changed is True
    assert before is not None
    assert after is not None
    assert after.status == "success"
    assert after.duration_ms == 12
    assert after.metrics_json == {"n": [1]}
    assert after.api_posted is False
    assert after.created_at == before.created_at
    assert after.updated_at is not None
    assert before.updated_at is not None
    assert after.updated_at >= before.updated_at


def test_update_run_missing(writer: DatabaseWriter) -> None:
    """update_run of a run that is not in the index returns False."""
    assert writer.update_run("no-such-run", status="success") is False


def test_update_run_keeps_created_at(writer: DatabaseWriter) -> None:
    """A created_at of None, as in a record's to_dict(), keeps the stored value."""
    writer.insert_run(make_record("run-1", created_at="2026-01-01T00:00:00.000000+00:00"))
    writer.update_run("run-1", created_at=None, status="failed")
    stored = writer.get_run("run-1")
    assert stored is not None
    assert stored.created_at == "2026-01-01T00:00:00.000000+00:00"


def test_update_run_all_record_fields(writer: DatabaseWriter) -> None:
    """Every field of a record's to_dict(), run_id aside, is accepted by update_run."""
    writer.insert_run(make_record("run-full"))
    values = make_full_record("run-full").to_dict()
    del values["run_id"]

    assert writer.update_run("run-full", **values) is True
    stored = writer.get_run("run-full")
    assert stored == make_full_record("run-full")


def test_update_run_rejects_injection(writer: DatabaseWriter) -> None:
    """A column name that carries SQL raises ValueError naming it and changes no row."""
    writer.insert_run(make_record("run-1"))
    before = writer.get_run("run-1")
    name = "status = 'x' --"

    with pytest.raises(ValueError, match=re.escape(repr(name))):
        writer.update_run("run-1", **{name: 1})

    assert writer.get_run("run-1") == before


def test_update_run_rejects_unknown(writer: DatabaseWriter) -> None:
    """An unknown column raises ValueError that lists the allowed columns."""
    writer.insert_run(make_record("run-1"))
    with pytest.raises(ValueError, match="colour") as raised:
        writer.update_run("run-1", colour="blue")
    assert "status" in str(raised.value)
    assert re.search(r"\brun_id\b", str(raised.value)) is None


def test_update_run_rejects_wrong_type(writer: DatabaseWriter) -> None:
    """A value of the wrong type raises TypeError naming the column and the type."""
    writer.insert_run(make_record("run-1"))
    with pytest.raises(TypeError, match=r"items_failed.*str"):
        writer.update_run("run-1", items_failed="many")


def test_upsert_run_inserts(writer: DatabaseWriter) -> None:
    """upsert_run of a new run_id inserts it."""
    writer.upsert_run(make_record("run-1"))
    assert writer.get_run("run-1") is not None


def test_upsert_run_overwrites(writer: DatabaseWriter) -> None:
    """upsert_run overwrites every column of an existing row except created_at."""
    writer.insert_run(make_full_record("run-1"))
    replacement = make_record("run-1", created_at="2030-01-01T00:00:00.000000+00:00")

    writer.upsert_run(replacement)

    stored = writer.get_run("run-1")
    assert stored is not None
    assert stored.created_at == make_full_record("run-1").created_at
    expected = dataclasses.replace(
        replacement, created_at=stored.created_at, updated_at=stored.updated_at
    )
    assert stored == expected


# -- API sync state -----------------------------------------------------------------------


def test_mark_api_posted(writer: DatabaseWriter) -> None:
    """mark_api_posted sets the flag and the time and clears the last error."""
    writer.insert_run(make_record("run-1", status="success", api_last_error="HTTP 500"))
    writer.mark_api_posted("run-1", "2026-01-02T00:00:00.000000+00:00")
    stored = writer.get_run("run-1")
    assert stored is not None
    assert stored.api_posted is True
    assert stored.api_posted_at == "2026-01-02T00:00:00.000000+00:00"
    assert stored.api_last_error is None


def test_mark_api_posted_default_time(writer: DatabaseWriter) -> None:
    """mark_api_posted without a time stores the current time."""
    writer.insert_run(make_record("run-1", status="success"))
    writer.mark_api_posted("run-1")
    stored = writer.get_run("run-1")
    assert stored is not None
    assert stored.api_posted_at is not None
    assert stored.api_posted_at.endswith("+00:00")


def test_mark_api_posted_missing(writer: DatabaseWriter, caplog: pytest.LogCaptureFixture) -> None:
    """mark_api_posted of an unknown run logs a warning and raises nothing."""
    with caplog.at_level(logging.WARNING, logger=INDEX_LOGGER):
        writer.mark_api_posted("no-such-run")
    assert "no-such-run" in caplog.text


def test_increment_api_retry_count(writer: DatabaseWriter) -> None:
    """Each call returns the new count, and an error of None keeps the last error."""
    writer.insert_run(make_record("run-1", status="failed"))
    assert writer.increment_api_retry_count("run-1", "HTTP 503") == 1
    assert writer.increment_api_retry_count("run-1") == 2
    stored = writer.get_run("run-1")
    assert stored is not None
    assert stored.api_retry_count == 2
    assert stored.api_last_error == "HTTP 503"


def test_increment_api_retry_count_missing(
    writer: DatabaseWriter, caplog: pytest.LogCaptureFixture
) -> None:
    """Counting a failed post of an unknown run returns 0 and logs a warning."""
    with caplog.at_level(logging.WARNING, logger=INDEX_LOGGER):
        assert writer.increment_api_retry_count("no-such-run", "HTTP 503") == 0
    assert "no-such-run" in caplog.text


def test_pending_posts_order_and_filter(writer: DatabaseWriter) -> None:
    """Pending posts are ended, unposted runs, oldest first, cut at the limit."""
    writer.insert_run(make_record("new", status="success", start_time="2026-01-03T00:00:00Z"))
    writer.insert_run(make_record("old", status="failed", start_time="2026-01-01T00:00:00Z"))
    writer.insert_run(make_record("mid", status="timeout", start_time="2026-01-02T00:00:00Z"))
    writer.insert_run(make_record("live", status="running", start_time="2026-01-01T00:00:00Z"))
    writer.insert_run(make_record("sent", status="success", start_time="2026-01-01T00:00:00Z"))
    writer.mark_api_posted("sent")

    assert [r.run_id for r in writer.get_pending_api_posts()] == ["old", "mid", "new"]
    assert [r.run_id for r in writer.get_pending_api_posts(limit=2)] == ["old", "mid"]
    assert writer.get_pending_api_posts(limit=0) == []


def test_pending_posts_use_partial_index(writer: DatabaseWriter) -> None:
    """SQLite's planner uses the partial index for the pending-posts query."""
    sql = (
        f"EXPLAIN QUERY PLAN SELECT run_id FROM agent_runs WHERE {database._PENDING_CONDITION} "
        "ORDER BY start_time, run_id LIMIT 10"
    )
    plan = " ".join(str(row[3]) for row in writer._connection().execute(sql))
    assert "idx_agent_runs_pending" in plan


# -- listing and statistics -----------------------------------------------------------------


def test_run_stats_values(writer: DatabaseWriter) -> None:
    """Statistics count runs per status, per agent, and pending posts."""
    writer.insert_run(make_record("a1", status="success", duration_ms=100))
    writer.insert_run(make_record("a2", status="failed", duration_ms=300))
    writer.insert_run(make_record("a3", status="running"))
    writer.insert_run(make_record("b1", agent_name="agent-b", status="success"))
    writer.mark_api_posted("b1")

    stats = writer.get_run_stats()

    assert stats["total_runs"] == 4
    assert stats["by_status"] == {
        "running": 1,
        "success": 2,
        "failed": 1,
        "partial": 0,
        "cancelled": 0,
        "timeout": 0,
        "abandoned": 0,
    }
    assert stats["pending_api_posts"] == 2
    assert stats["by_agent"]["agent-a"] == {
        "runs": 3,
        "success": 1,
        "failed": 1,
        "partial": 0,
        "running": 1,
        "cancelled": 0,
        "timeout": 0,
        "abandoned": 0,
        "items_discovered": 0,
        "items_succeeded": 0,
        "items_failed": 0,
        "pending_api_posts": 2,
        "avg_duration_ms": 200.0,
        "p50_duration_ms": 100,
        "p95_duration_ms": 300,
    }
    assert stats["by_agent"]["agent-b"]["avg_duration_ms"] is None


def test_run_stats_empty(writer: DatabaseWriter) -> None:
    """An empty index has every status at 0 and no agents."""
    stats = writer.get_run_stats()
    assert stats["total_runs"] == 0
    assert stats["by_status"] == dict.fromkeys(STATUSES, 0)
    assert stats["pending_api_posts"] == 0
    assert stats["by_agent"] == {}


def test_list_runs_filters(writer: DatabaseWriter) -> None:
    """list_runs applies agent, status and since filters, newest first."""
    writer.insert_run(make_record("a-old", status="success", start_time="2026-01-01T00:00:00Z"))
    writer.insert_run(make_record("a-mid", status="failed", start_time="2026-01-02T00:00:00Z"))
    writer.insert_run(make_record("a-new", status="success", start_time="2026-01-03T00:00:00Z"))
    writer.insert_run(make_record("b-new", agent_name="agent-b", start_time="2026-01-04T00:00:00Z"))

    def ids(runs: list[RunRecord]) -> list[str]:
        return [run.run_id for run in runs]

    assert ids(writer.list_runs()) == ["b-new", "a-new", "a-mid", "a-old"]
    assert ids(writer.list_runs(agent_name="agent-a")) == ["a-new", "a-mid", "a-old"]
    assert ids(writer.list_runs(status="success")) == ["a-new", "a-old"]
    assert ids(writer.list_runs(since="2026-01-02T00:00:00Z")) == ["b-new", "a-new", "a-mid"]
    assert ids(writer.list_runs(agent_name="agent-a", status="success", limit=1)) == ["a-new"]
    assert ids(writer.list_runs(limit=None)) == ["b-new", "a-new", "a-mid", "a-old"]


def test_list_runs_since_offset(writer: DatabaseWriter) -> None:
    """A since with another UTC offset compares as the same instant in UTC."""
    writer.insert_run(make_record("run-1", start_time="2026-01-02T00:00:00Z"))
    assert writer.list_runs(since="2026-01-02T01:00:00+01:00") != []
    assert writer.list_runs(since="2026-01-02T01:00:00.000001+01:00") == []


@pytest.mark.parametrize(
    "arguments",
    [{"status": "done"}, {"since": "last week"}, {"limit": -1}, {"limit": True}],
)
def test_list_runs_rejects_invalid(writer: DatabaseWriter, arguments: dict[str, object]) -> None:
    """An unknown status, an unparsable since or a bad limit raises ValueError."""
    with pytest.raises(ValueError, match="invalid"):
        writer.list_runs(**arguments)  # type: ignore[arg-type]


# -- locking and retries ----------------------------------------------------------------------


class RecordingSleep:
    """A sleep that records its delays and runs an optional action on each call."""

    def __init__(self, action: object = None) -> None:
        self.delays: list[float] = []
        self.action = action

    def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if callable(self.action):
            self.action()


def lock_database(path: Path) -> sqlite3.Connection:
    """Open a second connection to ``path`` that holds the write lock."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    return holder


def test_locked_insert_gives_up(db_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A write that stays locked retries after 0.1, 0.2 and 0.4 s, then raises."""
    sleep = RecordingSleep()
    writer = DatabaseWriter(db_path, sleep=sleep, busy_timeout_ms=0)
    holder = lock_database(db_path)
    try:
        with (
            caplog.at_level(logging.WARNING, logger=INDEX_LOGGER),
            pytest.raises(sqlite3.OperationalError, match="locked"),
        ):
            writer.insert_run(make_record("run-1"))
    finally:
        holder.execute("ROLLBACK")
        holder.close()

    assert sleep.delays == [0.1, 0.2, 0.4]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(warnings) == len(RETRY_DELAYS)
    assert all("insert_run" in r.getMessage() for r in warnings)
    assert all("run-1" in r.getMessage() for r in warnings)
    assert "0.4 s" in warnings[-1].getMessage()
    assert len(errors) == 1
    assert writer.get_run("run-1") is None
    writer.close()


def test_locked_insert_recovers(db_path: Path) -> None:
    """A write succeeds when the lock is released during the first retry's sleep."""
    holder: sqlite3.Connection | None = None

    def release() -> None:
        assert holder is not None
        holder.execute("ROLLBACK")

    sleep = RecordingSleep(release)
    writer = DatabaseWriter(db_path, sleep=sleep, busy_timeout_ms=0)
    holder = lock_database(db_path)

    assert writer.insert_run(make_record("run-1")) is True
    assert sleep.delays == [0.1]
    assert writer.get_run("run-1") is not None
    holder.close()
    writer.close()


def test_other_errors_not_retried(writer: DatabaseWriter) -> None:
    """An OperationalError other than a lock raises at once, with no sleep."""
    sleep = RecordingSleep()
    writer._sleep = sleep
    other = sqlite3.connect(writer.path)
    other.execute("DROP TABLE agent_runs")
    other.commit()
    other.close()

    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        writer.insert_run(make_record("run-1"))
    assert sleep.delays == []


# -- connections: threads, close, fork ----------------------------------------------------------


def test_threads_get_own_connections(writer: DatabaseWriter) -> None:
    """Two threads get different connections, and one thread reuses its own."""
    seen: dict[str, sqlite3.Connection] = {}

    def remember(name: str) -> None:
        seen[name] = writer._connection()
        seen[name + "-again"] = writer._connection()
        writer.insert_run(make_record(f"run-{name}"))

    threads = [threading.Thread(target=remember, args=(name,)) for name in ("t1", "t2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert seen["t1"] is not seen["t2"]
    assert seen["t1"] is seen["t1-again"]
    assert writer._connection() is writer._connection()
    assert writer.get_run("run-t1") is not None
    assert writer.get_run("run-t2") is not None


def test_finished_thread_connection_closed(writer: DatabaseWriter) -> None:
    """The connection of a finished thread is closed when another thread opens one."""
    opened: list[sqlite3.Connection] = []
    for _ in range(2):
        thread = threading.Thread(target=lambda: opened.append(writer._connection()))
        thread.start()
        thread.join()

    with pytest.raises(sqlite3.ProgrammingError):
        opened[0].execute("SELECT 1")
    assert len(writer._open_connections) == 2


def test_close_is_idempotent(writer: DatabaseWriter) -> None:
    """close() closes the connection, a second close() does nothing, and use reopens."""
    first = writer._connection()
    writer.close()
    writer.close()

    with pytest.raises(sqlite3.ProgrammingError):
        first.execute("SELECT 1")
    assert writer.insert_run(make_record("run-1")) is True
    assert writer._connection() is not first


def test_close_closes_other_threads(writer: DatabaseWriter) -> None:
    """close() also closes the connection of another thread that is still alive."""
    opened: list[sqlite3.Connection] = []
    ready = threading.Event()
    done = threading.Event()

    def hold() -> None:
        opened.append(writer._connection())
        ready.set()
        done.wait(timeout=10)

    thread = threading.Thread(target=hold)
    thread.start()
    ready.wait(timeout=10)
    writer.close()
    done.set()
    thread.join()

    with pytest.raises(sqlite3.ProgrammingError):
        opened[0].execute("SELECT 1")


def wait_for_child(pid: int) -> int:
    """Wait for the child ``pid`` and return its exit code, or -signal if it was killed."""
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


@needs_fork
def test_fork_child_opens_own_connection(writer: DatabaseWriter) -> None:
    """A forked child writes through its own connection, and the parent's keeps working."""
    parent_connection = writer._connection()
    writer.insert_run(make_record("parent-before"))

    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            code = 2 if writer._connection() is parent_connection else 0
            if code == 0:
                code = 0 if writer.insert_run(make_record("child")) else 3
        finally:
            os._exit(code)

    assert wait_for_child(pid) == 0
    assert writer._connection() is parent_connection
    assert writer.get_run("child") is not None
    assert writer.insert_run(make_record("parent-after")) is True


@needs_fork
def test_fork_children_create_database(tmp_path: Path) -> None:
    """Processes that open a new database at the same time all succeed and write."""
    path = tmp_path / "shared" / "telemetry.db"
    children = []
    for index in range(4):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                with DatabaseWriter(path) as child_writer:
                    child_writer.insert_run(make_record(f"child-{index}"))
                code = 0
            finally:
                os._exit(code)
        children.append(pid)

    assert [wait_for_child(pid) for pid in children] == [0, 0, 0, 0]
    with DatabaseWriter(path) as writer:
        assert writer.get_run_stats()["total_runs"] == 4


_pool_writer: DatabaseWriter | None = None


def insert_from_pool(index: int) -> int:
    """Insert run ``pool-<index>`` through the writer inherited from the parent."""
    assert _pool_writer is not None
    _pool_writer.insert_run(make_record(f"pool-{index}"))
    return os.getpid()


@needs_fork
@pytest.mark.skipif(sys.platform == "win32", reason="needs the fork start method")
def test_fork_pool_workers_insert(writer: DatabaseWriter) -> None:
    """Workers of a fork Pool insert through a module-level writer, and all rows arrive."""
    global _pool_writer
    writer.insert_run(make_record("parent"))
    _pool_writer = writer
    try:
        context = multiprocessing.get_context("fork")
        pool = context.Pool(processes=3)
        try:
            worker_pids = pool.map(insert_from_pool, range(30))
        finally:
            pool.close()
            pool.join()
    finally:
        _pool_writer = None

    stored = writer.list_runs(agent_name="agent-a", limit=None)
    assert len(stored) == 31
    assert os.getpid() not in worker_pids
    assert writer.insert_run(make_record("parent-after")) is True


# -- integrity --------------------------------------------------------------------------------


def test_check_integrity_ok(writer: DatabaseWriter) -> None:
    """A healthy database passes SQLite's integrity check."""
    writer.insert_run(make_full_record("run-1"))
    assert writer.check_integrity() == (True, ["ok"])


def test_check_integrity_corrupt(db_path: Path) -> None:
    """A database with overwritten pages fails the integrity check without raising."""
    with DatabaseWriter(db_path) as writer:
        for index in range(200):
            writer.insert_run(make_record(f"run-{index:03d}", error_details="x" * 500))
    # Closing the last connection checkpoints the WAL into the file, so the rows are in
    # the pages overwritten here. Page 1, the schema, stays intact.
    with open(db_path, "r+b") as file:
        file.seek(8192)
        file.write(b"\xff" * 16384)

    with DatabaseWriter(db_path) as writer:
        ok, messages = writer.check_integrity()
    assert ok is False
    assert messages != ["ok"]


def test_deleted_file_not_recreated(writer: DatabaseWriter) -> None:
    """A thread opening a connection after the file was deleted gets an error, no new file."""
    writer.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{writer.path}{suffix}").unlink(missing_ok=True)

    with pytest.raises(sqlite3.OperationalError):
        writer.get_run("run-1")
    assert not writer.path.exists()


def test_path_with_uri_characters(tmp_path: Path) -> None:
    """A path with characters that URIs reserve opens the file of that exact name."""
    path = tmp_path / "dir ?#%" / "tele metry?.db"
    with DatabaseWriter(path) as writer:
        writer.insert_run(make_record("run-1"))
    assert path.exists()
    assert sorted(p.name for p in path.parent.iterdir()) == ["tele metry?.db"]


def test_fork_during_transaction(tmp_path: Path) -> None:
    """A child forked while another thread is inside a transaction can still write."""
    writer = DatabaseWriter(tmp_path / "fork.db", busy_timeout_ms=200, sleep=lambda _: None)
    inside, release = threading.Event(), threading.Event()

    def hold_transaction(connection: sqlite3.Connection) -> None:
        inside.set()
        release.wait(timeout=10)

    holder = threading.Thread(target=writer._write, args=("hold", None, hold_transaction))
    holder.start()
    inside.wait(timeout=10)
    release.set()
    child = os.fork()
    if child == 0:
        signal.alarm(20)  # a deadlocked child dies instead of hanging the suite
        try:
            os._exit(0 if writer.insert_run(make_record("child-run")) else 1)
        except BaseException:
            os._exit(2)
    holder.join()
    _, status = os.waitpid(child, 0)

    assert os.waitstatus_to_exitcode(status) == 0
    assert writer.get_run("child-run") is not None
    writer.close()


# -- checkpoints in the background ----------------------------------------------------------


def autocheckpoint_pages(writer: DatabaseWriter) -> int:
    return int(writer._connection().execute("PRAGMA wal_autocheckpoint").fetchone()[0])


def test_autocheckpoint_default(writer: DatabaseWriter) -> None:
    """Without background checkpoints, commits checkpoint every 1,000 pages, SQLite's way."""
    assert autocheckpoint_pages(writer) == 1000


def test_background_checkpoint_keeps_limit(db_path: Path) -> None:
    """With background checkpoints, commits still checkpoint every 1,000 pages."""
    with DatabaseWriter(db_path, checkpoint_in_background=True) as background:
        assert autocheckpoint_pages(background) == 1000


def test_background_checkpoint_bounds_log(db_path: Path) -> None:
    """Many runs with background checkpoints leave a log that SQLite restarts now and then."""
    background = DatabaseWriter(db_path, checkpoint_in_background=True)
    for index in range(1500):
        run_id = f"run-{index}"
        background.insert_run(make_record(run_id))
        background.update_run(run_id, status="success")
    wal_size = Path(f"{db_path}-wal").stat().st_size
    background.close()
    # The runs write about 24,000 frames, so a log that SQLite never restarts would pass
    # 20,000 pages. While the thread checkpoints, the commits' own checkpoints are skipped,
    # so the log passes 1,000 pages by the commits of one checkpoint: about 1,500 pages
    # were seen, and 2,800 with two test runs in parallel on two CPUs.
    assert wal_size < 10_000 * 4096


def test_background_checkpoint_runs(db_path: Path) -> None:
    """After COMMITS_PER_CHECKPOINT commits, the thread checkpoints the log."""
    background = DatabaseWriter(db_path, checkpoint_in_background=True)
    for index in range(COMMITS_PER_CHECKPOINT):
        background.insert_run(make_record(f"run-{index}"))
    checkpointer = background._checkpointer
    assert checkpointer is not None
    deadline = time.monotonic() + 10
    while checkpointer.completed == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    background.close()
    assert checkpointer.completed == 1
    assert background.count_runs() == COMMITS_PER_CHECKPOINT


def test_close_stops_checkpoint_thread(db_path: Path) -> None:
    """close() ends the checkpoint thread along with the connections."""
    background = DatabaseWriter(db_path, checkpoint_in_background=True)
    for index in range(COMMITS_PER_CHECKPOINT):
        background.insert_run(make_record(f"run-{index}"))
    background.close()
    names = [thread.name for thread in threading.enumerate()]
    assert f"telemetry-index-checkpoint-{db_path}" not in names


def test_page_cache_size_set(db_path: Path) -> None:
    """page_cache_kib sets each connection's page cache, in KiB."""
    with DatabaseWriter(db_path, page_cache_kib=256) as small:
        assert small._connection().execute("PRAGMA cache_size").fetchone()[0] == -256


@pytest.mark.parametrize("size", [0, -1, 1.5, True, "256"])
def test_page_cache_size_invalid(db_path: Path, size: object) -> None:
    """A page cache size that is not a positive int raises, naming the value."""
    with pytest.raises(ValueError, match="invalid page_cache_kib"):
        DatabaseWriter(db_path, page_cache_kib=size)  # type: ignore[arg-type]


EXIT_HOOK_SCRIPT = """
import atexit, sys, threading
from telemetry.database import DatabaseWriter

index = DatabaseWriter(sys.argv[1])
index.count_runs()

def at_exit():
    # The main thread counts as not alive here, while it still uses its connection.
    thread = threading.Thread(target=index.count_runs)
    thread.start()
    thread.join()
    print(index.count_runs())

atexit.register(at_exit)
"""


def test_exit_hook_keeps_main_connection(db_path: Path) -> None:
    """A thread that opens its connection during atexit leaves the main thread's open."""
    result = subprocess.run(
        [sys.executable, "-c", EXIT_HOOK_SCRIPT, str(db_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0", result.stderr
    assert "closed database" not in result.stderr
