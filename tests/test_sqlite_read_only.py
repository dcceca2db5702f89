"""Tests of DatabaseWriter(read_only=True) on real SQLite files, as the owner and as other users.

The tests of other users fork a child that switches to that user with os.setuid, so they
run only as root. Files belong to OWNER and the reader is OTHER, two uids that need no
account.
"""

from __future__ import annotations

import os
import pickle
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from telemetry import _sqlite_read_only
from telemetry.database import DatabaseWriter
from telemetry.errors import SchemaError
from telemetry.models import SCHEMA_VERSION, RunRecord

OWNER = 40001
OTHER = 40002

needs_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="switching users needs root"
)
needs_ofd_locks = pytest.mark.skipif(
    not _sqlite_read_only._OFD_LOCKS, reason="open file description locks are Linux-only"
)


def make_record(run_id: str) -> RunRecord:
    """Return a run of agent "agent-a" started at 2026-01-01."""
    return RunRecord(
        run_id=run_id,
        agent_name="agent-a",
        job_type="import",
        start_time="2026-01-01T00:00:00.000000+00:00",
    )


def listing(directory: Path) -> dict[str, int]:
    """Return the owner uid of each file in ``directory``, by name."""
    return {path.name: path.stat().st_uid for path in sorted(directory.iterdir())}


def run_as(uid: int, action: Callable[[], Any]) -> Any:
    """Call ``action`` in a forked child running as ``uid``, and return its result.

    An exception in the child is returned as (type name, message, filename).
    """
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(reader)
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            outcome: Any = ("ok", action())
        except BaseException as exc:
            outcome = ("error", (type(exc).__name__, str(exc), getattr(exc, "filename", None)))
        with os.fdopen(writer, "wb") as stream:
            stream.write(pickle.dumps(outcome))
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as stream:
        data = stream.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    return value if kind == "ok" else ("raised", *value)


def read_ids(path: Path) -> list[str]:
    """Open ``path`` read-only and return the run ids in it."""
    with DatabaseWriter(path, read_only=True) as index:
        return sorted(run.run_id for run in index.list_runs(limit=None))


def insert(path: Path, run_id: str) -> bool:
    """Open ``path`` for writing, insert a run, close it, and return insert_run's result."""
    with DatabaseWriter(path) as index:
        return index.insert_run(make_record(run_id))


@pytest.fixture
def store() -> Iterator[Path]:
    """Yield a directory that other users may enter, removed after the test.

    pytest's tmp_path is inside a directory of mode 0700, which only root can enter.
    """
    directory = Path(tempfile.mkdtemp(prefix="telemetry-ro-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def make_index(directory: Path, *, run_ids: tuple[str, ...] = ("run-1",)) -> Path:
    """Write an index with ``run_ids`` in ``directory``, close it, and return its path."""
    path = directory / "telemetry.db"
    with DatabaseWriter(path) as index:
        for run_id in run_ids:
            index.insert_run(make_record(run_id))
    return path


def give_to_owner(directory: Path, *, directory_mode: int, file_mode: int) -> None:
    """Make OWNER own ``directory`` and its files, with the given modes."""
    for path in directory.iterdir():
        os.chown(path, OWNER, OWNER)
        path.chmod(file_mode)
    os.chown(directory, OWNER, OWNER)
    directory.chmod(directory_mode)


# -- as the owner --------------------------------------------------------------------------


def test_read_only_reads_rows(store: Path) -> None:
    """A read-only writer returns the rows that a writer stored."""
    path = make_index(store, run_ids=("run-1", "run-2"))
    assert read_ids(path) == ["run-1", "run-2"]


def test_read_only_missing_file(tmp_path: Path) -> None:
    """A missing file raises FileNotFoundError, and neither it nor its directory is created."""
    path = tmp_path / "absent" / "telemetry.db"
    with pytest.raises(FileNotFoundError):
        DatabaseWriter(path, read_only=True)
    assert not path.parent.exists()


def test_read_only_directory(tmp_path: Path) -> None:
    """A directory in place of the file raises IsADirectoryError."""
    with pytest.raises(IsADirectoryError):
        DatabaseWriter(tmp_path, read_only=True)


def test_read_only_rejects_writes(store: Path) -> None:
    """A write through a read-only writer fails and stores nothing."""
    path = make_index(store)
    with (
        DatabaseWriter(path, read_only=True) as index,
        pytest.raises(sqlite3.OperationalError, match="readonly"),
    ):
        index.insert_run(make_record("run-2"))
    assert read_ids(path) == ["run-1"]


def test_read_only_older_schema(store: Path) -> None:
    """An empty file (schema version 0) is not migrated; the error explains how to migrate it."""
    path = store / "telemetry.db"
    path.touch()
    with pytest.raises(SchemaError, match="open it once for writing"):
        DatabaseWriter(path, read_only=True)
    assert path.stat().st_size == 0


def test_read_only_newer_schema(store: Path) -> None:
    """A schema newer than the library's is rejected, as by a writer."""
    path = make_index(store)
    connection = sqlite3.connect(path)
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    connection.close()
    with pytest.raises(SchemaError, match="upgrade agent-telemetry"):
        DatabaseWriter(path, read_only=True)


def test_read_only_keeps_journal_mode(store: Path) -> None:
    """A database in rollback-journal mode stays in that mode."""
    path = make_index(store)
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA journal_mode = DELETE")
    connection.close()
    assert read_ids(path) == ["run-1"]
    # Bytes 18 and 19 of the header are 1 in rollback-journal mode and 2 in WAL mode.
    assert path.read_bytes()[18:20] == b"\x01\x01"


def test_read_only_sees_live_writer(store: Path) -> None:
    """Rows in the -wal file of a writer that is still open are read."""
    path = make_index(store)
    with DatabaseWriter(path) as writer:
        writer.insert_run(make_record("run-2"))
        assert read_ids(path) == ["run-1", "run-2"]


# -- as another user -----------------------------------------------------------------------


@needs_root
def test_other_user_creates_no_files(store: Path) -> None:
    """A reader who is not the owner reads a closed index without creating -wal or -shm."""
    path = make_index(store)
    give_to_owner(store, directory_mode=0o777, file_mode=0o644)
    assert run_as(OTHER, lambda: read_ids(path)) == ["run-1"]
    assert listing(store) == {"telemetry.db": OWNER}


@needs_root
def test_other_user_keeps_owner_writing(store: Path) -> None:
    """After another user read the index, its owner still writes to it."""
    path = make_index(store)
    give_to_owner(store, directory_mode=0o777, file_mode=0o644)
    run_as(OTHER, lambda: read_ids(path))
    assert run_as(OWNER, lambda: insert(path, "run-2")) is True


@needs_root
def test_other_user_reads_live_wal(store: Path) -> None:
    """Another user reads the rows that the owner's open writer has in its -wal file."""
    path = make_index(store)
    give_to_owner(store, directory_mode=0o755, file_mode=0o644)
    with DatabaseWriter(path) as writer:
        writer.insert_run(make_record("run-2"))
        for name in ("telemetry.db-wal", "telemetry.db-shm"):
            (store / name).chmod(0o644)
        assert run_as(OTHER, lambda: read_ids(path)) == ["run-1", "run-2"]
        assert writer.insert_run(make_record("run-3")) is True
    assert set(listing(store).values()) <= {OWNER, 0}


@needs_root
def test_other_user_unreadable_file(store: Path) -> None:
    """An index of mode 0600 raises PermissionError that names the file."""
    path = make_index(store)
    give_to_owner(store, directory_mode=0o755, file_mode=0o600)
    outcome = run_as(OTHER, lambda: read_ids(path))
    assert outcome[:2] == ("raised", "PermissionError")
    assert outcome[3] == str(path)


@needs_root
def test_other_user_unreadable_shm(store: Path) -> None:
    """A -shm file of mode 0600 raises PermissionError that names it, not a damaged index."""
    path = make_index(store)
    give_to_owner(store, directory_mode=0o755, file_mode=0o644)
    with DatabaseWriter(path) as writer:
        writer.insert_run(make_record("run-2"))
        (store / "telemetry.db-shm").chmod(0o600)
        outcome = run_as(OTHER, lambda: read_ids(path))
    assert outcome[:2] == ("raised", "PermissionError")
    assert outcome[3] == str(store / "telemetry.db-shm")


@needs_root
def test_other_user_wal_without_shm(store: Path) -> None:
    """Changes in a -wal file whose -shm file is missing raise PermissionError, not stale rows."""
    path = make_index(store)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        writer = DatabaseWriter(path)
        writer.insert_run(make_record("run-2"))
        os._exit(0)  # like kill -9: the -wal file keeps run-2
    os.waitpid(pid, 0)
    (store / "telemetry.db-shm").unlink()
    give_to_owner(store, directory_mode=0o777, file_mode=0o644)
    outcome = run_as(OTHER, lambda: read_ids(path))
    assert outcome[:2] == ("raised", "PermissionError")
    assert "lock out the owner" in outcome[2]
    assert "telemetry.db-shm" not in listing(store)


@needs_root
def test_read_only_directory_owner(store: Path) -> None:
    """The owner reads an index without a -wal file in a directory of mode 0555."""
    path = make_index(store)
    give_to_owner(store, directory_mode=0o555, file_mode=0o444)
    assert run_as(OWNER, lambda: read_ids(path)) == ["run-1"]
    assert listing(store) == {"telemetry.db": OWNER}


@needs_root
def test_immutable_reopens_after_change(store: Path) -> None:
    """An immutable reader sees a row that a writer copied into the file after it opened it."""
    path = make_index(store)
    give_to_owner(store, directory_mode=0o777, file_mode=0o644)
    to_reader, from_parent = os.pipe()

    def read_twice() -> tuple[str, list[str], list[str]]:
        with DatabaseWriter(path, read_only=True) as index:
            kind = type(index._connection()).__name__
            before = sorted(run.run_id for run in index.list_runs())
            os.write(reader_ready, b"x")
            os.read(to_reader, 1)  # the owner's writer has written and closed
            after = sorted(run.run_id for run in index.list_runs())
        return kind, before, after

    ready, reader_ready = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(ready)
        result = run_as(OTHER, read_twice)
        os._exit(0 if result == ("_ImmutableConnection", ["run-1"], ["run-1", "run-2"]) else 1)
    os.close(reader_ready)
    os.read(ready, 1)
    # Closing the last connection copies the -wal file into the database file.
    assert run_as(OWNER, lambda: insert(path, "run-2")) is True
    os.write(from_parent, b"x")
    _, status = os.waitpid(pid, 0)
    for descriptor in (ready, to_reader, from_parent):
        os.close(descriptor)
    assert os.waitstatus_to_exitcode(status) == 0


# -- wal_files_kept ------------------------------------------------------------------------


@needs_ofd_locks
def test_wal_files_kept_blocks_delete(store: Path) -> None:
    """A writer that closes while the lock is held leaves its -wal and -shm files."""
    path = make_index(store)
    writer = DatabaseWriter(path)
    writer.insert_run(make_record("run-2"))
    with _sqlite_read_only.wal_files_kept(path, timeout=1.0):
        writer.close()
        assert (store / "telemetry.db-wal").exists()
        assert (store / "telemetry.db-shm").exists()


def test_wal_files_deleted_by_last_writer(store: Path) -> None:
    """The last writer to close deletes its -wal and -shm files when no lock stops it."""
    make_index(store)
    assert listing(store) == {"telemetry.db": os.geteuid()}


def test_read_only_uri_owner(store: Path) -> None:
    """The owner of an index in a writable directory gets plain mode=ro."""
    path = make_index(store)
    assert _sqlite_read_only.read_only_uri(path).endswith("?mode=ro")


@needs_root
def test_read_only_uri_other_user(store: Path) -> None:
    """Another user gets immutable=1 for an index without a -wal file."""
    path = make_index(store)
    give_to_owner(store, directory_mode=0o777, file_mode=0o644)
    uri = run_as(OTHER, lambda: _sqlite_read_only.read_only_uri(path))
    assert uri.endswith("?mode=ro&immutable=1")
