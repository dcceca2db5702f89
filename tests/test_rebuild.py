"""rebuild_index, and compare_index_with_journal, on stores written by real clients."""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from http_server import ScriptedServer

from telemetry import TelemetryClient, TelemetryConfig
from telemetry.consistency import Consistency, compare_index_with_journal
from telemetry.database import DatabaseWriter
from telemetry.errors import IndexLockedError, SchemaError
from telemetry.journal import JournalReader
from telemetry.models import STATUSES, RunRecord, generate_run_id, get_iso8601_timestamp
from telemetry.ndjson import NDJSONWriter
from telemetry.rebuild import find_leftover_files, rebuild_index

UTC = datetime.timezone.utc
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")
SYNC_COLUMNS = ("api_posted", "api_posted_at", "api_retry_count", "api_last_error", "updated_at")

# Starts a run and exits without ending it, as a process killed mid-run does.
CRASHING_AGENT = """
import os, sys
from telemetry import TelemetryClient, TelemetryConfig

client = TelemetryClient(TelemetryConfig(data_dir=sys.argv[1], environ={}))
client.start_run("crashed-agent", "job", input_summary="killed before end_run")
os._exit(0)
"""

# Records runs until the stop file appears, or for 30 s at most.
WRITING_AGENT = """
import sys, time
from pathlib import Path
from telemetry import TelemetryClient, TelemetryConfig

data_dir, stop_file = sys.argv[1], Path(sys.argv[2])
client = TelemetryClient(TelemetryConfig(data_dir=data_dir, durability="none", environ={}))
deadline = time.monotonic() + 30
number = 0
while not stop_file.exists() and time.monotonic() < deadline:
    with client.track_run("writer-agent", "load") as run:
        run.set_metrics(items_succeeded=number)
    number += 1
client.close()
"""


# -- helpers ---------------------------------------------------------------------------------


def make_client(data_dir: Path, **settings: Any) -> TelemetryClient:
    """Return a client of the store in ``data_dir`` that ignores the environment."""
    return TelemetryClient(TelemetryConfig(data_dir=data_dir, environ={}, **settings))


def db_of(data_dir: Path) -> Path:
    return data_dir / "telemetry.db"


def raw_rows(path: Path) -> dict[str, dict[str, Any]]:
    """Return every row of the agent_runs table at ``path``, as SQLite stores it."""
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.row_factory = sqlite3.Row
        rows = connection.execute("SELECT * FROM agent_runs").fetchall()
    return {row["run_id"]: dict(row) for row in rows}


def without(row: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {name: value for name, value in row.items() if name not in names}


def remove_index(data_dir: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{db_of(data_dir)}{suffix}")


def leftovers(data_dir: Path) -> list[str]:
    """Return the names of files that a rebuild leaves only when it fails to clean up."""
    return sorted(
        path.name
        for path in data_dir.iterdir()
        if ".rebuild-" in path.name or ".partial-" in path.name
    )


def start_run_in_other_process(data_dir: Path, days_ago: int) -> RunRecord:
    """Journal and index the start of a run as start_run does, dated ``days_ago`` days ago."""
    started = get_iso8601_timestamp(datetime.datetime.now(UTC) - datetime.timedelta(days=days_ago))
    record = RunRecord(
        run_id=generate_run_id("night-agent"),
        agent_name="night-agent",
        job_type="nightly",
        start_time=started,
        hostname="other-host",
        pid=4242,
        created_at=started,
        updated_at=started,
    )
    journal = NDJSONWriter(data_dir / "journal")
    try:
        journal.append("run_start", record.to_dict())
    finally:
        journal.close()
    with DatabaseWriter(db_of(data_dir)) as index:
        index.insert_run(record)
    return record


def fail_in_nested_run(client: TelemetryClient, ids: dict[str, str]) -> None:
    """Raise ValueError inside a run, which records the run as failed."""
    with client.track_run("audit-agent", "parse") as inner:
        ids["nested"] = inner.run_id
        raise ValueError("bad input")


def build_store(data_dir: Path, server: ScriptedServer) -> dict[str, str]:
    """Record runs of every status and kind with real clients; return run ids by label."""
    ids: dict[str, str] = {}
    overnight = start_run_in_other_process(data_dir, days_ago=1)
    ids["overnight"] = overnight.run_id

    with make_client(data_dir) as client:
        with client.track_run("audit-agent", "audit", product="docs") as outer:
            outer.log_event("file_parsed", {"path": "a.py"})
            with pytest.raises(ValueError, match="bad input"):
                fail_in_nested_run(client, ids)
            outer.set_metrics(items_discovered=3, items_succeeded=2, items_failed=1)
            ids["parent"] = outer.run_id

        for status in ("partial", "cancelled", "timeout"):
            ids[status] = client.start_run("status-agent", "job")
            client.end_run(ids[status], status)

        ids["unicode"] = client.start_run(
            "агент-数据-🚀",
            "проверка",
            input_summary="résumé ✓ 🚀 \u0000 nul",
            metrics_json={
                "nan": math.nan,
                "inf": -math.inf,
                "big": 2**70,
                "max": 1.7976931348623157e308,
                "neg_zero": -0.0,
                "ключ": "значение",
                "": "empty key",
                "nested": {"deep": [1, 2.5, None, True, "x", {"k": []}]},
            },
        )
        client.log_event(ids["unicode"], "note", {"text": "日本語"})
        client.end_run(
            ids["unicode"],
            "failed",
            error_summary="lone \udc80 surrogate",
            error_details="Traceback (most recent call last):\n  line 1\nValueError: ✗",
            metrics_json={"added_at_end": 1},
        )

        client.end_run(overnight.run_id, "success", items_succeeded=3)

    abandoning = make_client(data_dir)
    ids["abandoned"] = abandoning.start_run("abandoning-agent", "job")
    abandoning.close()

    crash = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CRASHING_AGENT), str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert crash.returncode == 0, crash.stderr

    posting = {"api_url": server.url, "api_token": "tok-rebuild-test", "max_retries": 0}
    with make_client(data_dir, **posting) as client:
        for status in ("success", "partial"):
            ids[f"posted_{status}"] = client.start_run("posting-agent", "sync")
            client.end_run(ids[f"posted_{status}"], status)
        server.respond(500)
        ids["post_failed"] = client.start_run("posting-agent", "sync")
        client.end_run(ids["post_failed"], "success")
    return ids


@pytest.fixture(scope="module")
def store_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build, once per module, a data directory with runs of every status."""
    data_dir = tmp_path_factory.mktemp("template") / "store"
    with pytest.MonkeyPatch.context() as monkeypatch:
        # httpx would send the requests for the loopback server through a proxy.
        for name in PROXY_VARIABLES:
            monkeypatch.delenv(name, raising=False)
            monkeypatch.delenv(name.lower(), raising=False)
        with ScriptedServer() as server:
            build_store(data_dir, server)
    return data_dir


@pytest.fixture
def store(tmp_path: Path, store_template: Path) -> Path:
    """A copy of the data directory with runs of every status, written by real clients."""
    data_dir = tmp_path / "store"
    shutil.copytree(store_template, data_dir)
    return data_dir


# -- the rebuilt rows ---------------------------------------------------------------------------


def test_rebuild_reproduces_live_index(tmp_path: Path, api_server: ScriptedServer) -> None:
    """Every column of every row of the rebuilt index equals the live index's."""
    data_dir = tmp_path / "store"
    ids = build_store(data_dir, api_server)
    before = raw_rows(db_of(data_dir))
    journal_files = JournalReader(data_dir / "journal").files()

    result = rebuild_index(db_of(data_dir), data_dir / "journal")
    after = raw_rows(db_of(data_dir))

    statuses = {row["status"] for row in before.values()}
    overnight = before[ids["overnight"]]
    assert statuses == set(STATUSES)
    assert before[ids["nested"]]["parent_run_id"] == ids["parent"]
    assert overnight["start_time"][:10] != overnight["end_time"][:10]
    assert before[ids["posted_success"]]["api_posted"] == 1
    assert before[ids["post_failed"]]["api_retry_count"] == 1
    assert before[ids["post_failed"]]["api_last_error"] is not None
    assert len(journal_files) >= 2
    assert after == before
    assert result.runs == len(before)
    assert result.files == len(journal_files)
    assert result.corrupt_lines == 0
    assert result.kept_sync_state == len(before)
    assert result.backup_path == Path(f"{db_of(data_dir)}.bak")
    assert raw_rows(result.backup_path) == before
    assert leftovers(data_dir) == []


def test_rebuild_records_equal(store: Path) -> None:
    """The runs read back through DatabaseWriter are equal, field by field, to the live ones."""
    with DatabaseWriter(db_of(store)) as index:
        before = [run.to_dict() for run in index.list_runs(limit=None)]
    rebuild_index(db_of(store), store / "journal")
    with DatabaseWriter(db_of(store)) as index:
        after = [run.to_dict() for run in index.list_runs(limit=None)]

    assert after == before


def test_rebuild_deleted_index(store: Path) -> None:
    """Without an index, the rows come back with the journal's values and pending sync state."""
    before = raw_rows(db_of(store))
    remove_index(store)

    result = rebuild_index(db_of(store), store / "journal")
    after = raw_rows(db_of(store))

    assert after.keys() == before.keys()
    for run_id, row in after.items():
        assert without(row, SYNC_COLUMNS) == without(before[run_id], SYNC_COLUMNS)
        assert row["api_posted"] == 0
        assert row["api_posted_at"] is None
        assert row["api_retry_count"] == 0
        assert row["api_last_error"] is None
        expected_update = row["start_time"] if row["status"] == "running" else row["end_time"]
        assert row["updated_at"] == expected_update
    assert result.backup_path is None
    assert result.kept_sync_state == 0
    assert oct(db_of(store).stat().st_mode & 0o777) == oct(0o600)


def test_rebuild_deleted_index_posts_again(store: Path) -> None:
    """After a rebuild without an index, every ended run is pending for the API again."""
    ended = [row for row in raw_rows(db_of(store)).values() if row["status"] != "running"]
    remove_index(store)

    rebuild_index(db_of(store), store / "journal")
    with DatabaseWriter(db_of(store)) as index:
        pending = index.get_pending_api_posts(limit=None)

    assert len(pending) == len(ended)


def test_rebuild_corrupt_index(store: Path) -> None:
    """An index of garbage bytes is moved aside, with its -wal file, and replaced."""
    before = raw_rows(db_of(store))
    garbage = b"\x00not an SQLite database\xff" * 512
    db_of(store).write_bytes(garbage)
    Path(f"{db_of(store)}-wal").write_bytes(b"stale wal")

    result = rebuild_index(db_of(store), store / "journal")
    with DatabaseWriter(db_of(store)) as index:
        integrity = index.check_integrity()
        runs = index.list_runs(limit=None)

    assert result.backup_path is not None
    assert re.fullmatch(r"telemetry\.db\.bak-[0-9]{8}T[0-9]{6}Z", result.backup_path.name)
    assert result.damaged_backup is True
    assert result.backup_path.read_bytes() == garbage
    assert Path(f"{result.backup_path}-wal").read_bytes() == b"stale wal"
    assert integrity == (True, ["ok"])
    assert {run.run_id for run in runs} == before.keys()
    assert result.kept_sync_state == 0


def test_rebuild_keeps_damaged_backup(store: Path) -> None:
    """A second rebuild backs up the good index to .bak and keeps the damaged index's copy."""
    garbage = b"\x00not an SQLite database\xff" * 512
    db_of(store).write_bytes(garbage)

    first = rebuild_index(db_of(store), store / "journal")
    second = rebuild_index(db_of(store), store / "journal")

    assert first.backup_path is not None
    assert first.backup_path.read_bytes() == garbage
    assert second.backup_path == Path(f"{db_of(store)}.bak")
    assert second.damaged_backup is False
    assert raw_rows(second.backup_path) == raw_rows(db_of(store))


def test_rebuild_damaged_backup_names_unique(store: Path) -> None:
    """Two damaged indexes moved aside within one second get two different names."""
    backups = []
    for content in (b"first garbage" * 100, b"second garbage" * 100):
        db_of(store).write_bytes(content)
        result = rebuild_index(db_of(store), store / "journal")
        assert result.backup_path is not None
        backups.append(result.backup_path)
    # Both rebuilds may fall within one second; a third name then repeats the second.
    stamp = backups[0].name
    db_of(store).write_bytes(b"third garbage" * 100)
    third = rebuild_index(db_of(store), store / "journal").backup_path

    assert len({backups[0], backups[1], third}) == 3
    assert backups[0].read_bytes() == b"first garbage" * 100
    assert backups[1].read_bytes() == b"second garbage" * 100
    assert third is not None
    assert third.name.startswith(stamp[: len("telemetry.db.bak-")])


def test_rebuild_counts_index_only_rows(store: Path) -> None:
    """Rows that only the old index has are kept and counted."""
    extra = RunRecord(
        run_id=generate_run_id("index-only"),
        agent_name="index-only",
        job_type="test",
        start_time=get_iso8601_timestamp(),
    )
    with DatabaseWriter(db_of(store)) as index:
        index.load_runs([extra])

    result = rebuild_index(db_of(store), store / "journal")
    with DatabaseWriter(db_of(store)) as index:
        kept = index.get_run(extra.run_id)

    assert result.index_only_rows == 1
    assert kept is not None


# -- files left by killed rebuilds --------------------------------------------------------------


def dead_pid() -> int:
    """Return the pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=30)
    return child.pid


def make_leftovers(db_path: Path, pid: int, purpose: str = "rebuild") -> list[Path]:
    """Create a scratch database of process ``pid`` beside the index, with -wal and -shm."""
    base = db_path.with_name(f"{db_path.name}.{purpose}-{pid}-0badc0de")
    paths = [base, Path(f"{base}-wal"), Path(f"{base}-shm")]
    for path in paths:
        path.write_bytes(b"left over")
    return paths


@pytest.mark.parametrize("purpose", ["rebuild", "repair", "salvage"])
def test_find_leftover_files_of_gone_process(store: Path, purpose: str) -> None:
    """The scratch files of a process that is gone are found, with their -wal and -shm."""
    paths = make_leftovers(db_of(store), dead_pid(), purpose)

    assert find_leftover_files(db_of(store)) == sorted(paths)


def test_find_leftover_files_skips_live_process(store: Path) -> None:
    """The scratch files of a running process, such as a rebuild in progress, are kept."""
    make_leftovers(db_of(store), os.getppid())
    make_leftovers(db_of(store), os.getpid())
    Path(f"{db_of(store)}.bak").write_bytes(b"a backup")
    Path(f"{db_of(store)}.rebuild-notapid").write_bytes(b"another name")

    assert find_leftover_files(db_of(store)) == []


def test_find_leftover_files_missing_directory(tmp_path: Path) -> None:
    """An index in a missing directory has no leftovers."""
    assert find_leftover_files(tmp_path / "nowhere" / "telemetry.db") == []


def test_rebuild_removes_leftover_files(store: Path) -> None:
    """A rebuild first removes the files of killed rebuilds and reports them."""
    paths = make_leftovers(db_of(store), dead_pid())
    live = make_leftovers(db_of(store), os.getppid())

    result = rebuild_index(db_of(store), store / "journal")

    assert result.removed_files == tuple(sorted(paths))
    assert not any(path.exists() for path in paths)
    assert all(path.exists() for path in live)


def add_filler_runs(db_path: Path) -> None:
    """Index 500 runs with long summaries, so that the file has many pages to damage."""
    with DatabaseWriter(db_path) as index:
        index.load_runs(
            RunRecord(
                run_id=f"filler-{number:05d}",
                agent_name="filler",
                job_type="padding",
                start_time="2026-01-01T00:00:00.000000+00:00",
                input_summary="x" * 200,
            )
            for number in range(500)
        )


def damage_pages(db_path: Path) -> bytes:
    """Checkpoint the WAL into ``db_path``, overwrite its pages 4 to 6, and return them."""
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with open(db_path, "r+b") as file:
        page_size = int.from_bytes(file.read(18)[16:18], "big")
        damaged = b"\xa5" * (3 * page_size)
        file.seek(3 * page_size)
        file.write(damaged)
    return damaged


def table_leaf_pages(db_path: Path) -> list[int]:
    """Return the leaf pages of the agent_runs table in rowid order (needs SQLite's dbstat)."""
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        try:
            rows = connection.execute(
                "SELECT pageno FROM dbstat WHERE name = 'agent_runs' AND pagetype = 'leaf' "
                "ORDER BY path"
            ).fetchall()
        except sqlite3.OperationalError:
            pytest.skip("this SQLite has no dbstat table")
    return [row[0] for row in rows]


def damage_table_leaves(db_path: Path) -> bytes:
    """Overwrite two leaf pages of agent_runs, a third and two thirds in, and return one."""
    leaves = table_leaf_pages(db_path)
    assert len(leaves) > 10
    with open(db_path, "r+b") as file:
        page_size = int.from_bytes(file.read(18)[16:18], "big")
        damaged = b"\xa5" * page_size
        for page in (leaves[len(leaves) // 3], leaves[2 * len(leaves) // 3]):
            file.seek((page - 1) * page_size)
            file.write(damaged)
    return damaged


def test_rebuild_damaged_index(store: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Damaged index pages: every row is salvaged with its sync state, also for open connections."""
    add_filler_runs(db_of(store))
    before = raw_rows(db_of(store))
    agent = DatabaseWriter(db_of(store))
    agent.count_runs()
    damaged = damage_pages(db_of(store))
    extra = RunRecord(
        run_id=generate_run_id("after-rebuild"),
        agent_name="after-rebuild",
        job_type="job",
        start_time=get_iso8601_timestamp(),
    )

    try:
        result = rebuild_index(db_of(store), store / "journal")
        count_seen_by_agent = agent.count_runs()
        inserted = agent.insert_run(extra)
    finally:
        agent.close()
    with DatabaseWriter(db_of(store)) as index:
        integrity = index.check_integrity()
    after = raw_rows(db_of(store))

    assert "salvaged 512 rows of the damaged index" in caplog.text
    assert "replaced the content of the damaged index" in caplog.text
    assert result.backup_path is not None
    assert damaged in result.backup_path.read_bytes()
    assert result.kept_sync_state == result.runs
    assert count_seen_by_agent == len(before)
    assert inserted
    assert integrity == (True, ["ok"])
    assert without(after, (extra.run_id,)) == before
    assert leftovers(store) == []


def damage_secondary_index(db_path: Path) -> None:
    """Point the status index at another column, so its entries no longer match the table."""
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as connection:
        connection.execute("PRAGMA writable_schema = ON")
        connection.execute(
            "UPDATE sqlite_schema SET sql = 'CREATE INDEX idx_agent_runs_status "
            "ON agent_runs (job_type)' WHERE name = 'idx_agent_runs_status'"
        )


def test_rebuild_damaged_secondary_index(store: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A secondary index that fails the integrity check is fixed by REINDEX, with no row changed."""
    add_filler_runs(db_of(store))
    before = raw_rows(db_of(store))
    damage_secondary_index(db_of(store))
    agent = DatabaseWriter(db_of(store))
    damaged_integrity = agent.check_integrity()

    try:
        result = rebuild_index(db_of(store), store / "journal")
        count_seen_by_agent = agent.count_runs()
    finally:
        agent.close()
    with DatabaseWriter(db_of(store)) as index:
        integrity = index.check_integrity()
        pending = index.get_pending_api_posts(limit=None)

    assert not damaged_integrity[0]
    assert "missing from index idx_agent_runs_status" in damaged_integrity[1][0]
    assert "with REINDEX" in caplog.text
    assert integrity == (True, ["ok"])
    assert raw_rows(db_of(store)) == before
    assert result.kept_sync_state == result.runs
    assert any(row["api_posted"] for row in before.values())
    assert len(pending) == sum(
        1 for row in before.values() if not row["api_posted"] and row["status"] != "running"
    )
    assert count_seen_by_agent == len(before)
    assert leftovers(store) == []


def test_rebuild_damaged_table(store: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Damaged table pages: the other rows are kept, and with them their sync state."""
    add_filler_runs(db_of(store))
    before = raw_rows(db_of(store))
    damaged = damage_table_leaves(db_of(store))

    result = rebuild_index(db_of(store), store / "journal")
    with DatabaseWriter(db_of(store)) as index:
        integrity = index.check_integrity()
    after = raw_rows(db_of(store))
    fillers_kept = [run_id for run_id in after if run_id.startswith("filler-")]
    store_runs = [run_id for run_id in before if not run_id.startswith("filler-")]

    assert caplog.text.count("cannot read the rows of the damaged index") == 2
    assert result.backup_path is not None
    assert damaged in result.backup_path.read_bytes()
    assert integrity == (True, ["ok"])
    assert result.kept_sync_state == result.runs
    assert {run_id: after[run_id] for run_id in store_runs} == {
        run_id: before[run_id] for run_id in store_runs
    }
    assert 0 < len(fillers_kept) < 500
    assert "filler-00000" in after
    assert "filler-00499" in after
    assert all(after[run_id] == before[run_id] for run_id in fillers_kept)
    assert leftovers(store) == []


def test_rebuild_damaged_other_page_size(store: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A damaged index that the backup API cannot overwrite is moved aside; its rows are kept."""
    remove_index(store)
    with contextlib.closing(sqlite3.connect(db_of(store))) as connection:
        connection.execute("PRAGMA page_size = 1024")
        connection.execute("VACUUM")
    add_filler_runs(db_of(store))
    damaged = damage_table_leaves(db_of(store))

    result = rebuild_index(db_of(store), store / "journal")
    with DatabaseWriter(db_of(store)) as index:
        integrity = index.check_integrity()
        run_ids = set(index.run_statuses())
    fillers_kept = [run_id for run_id in run_ids if run_id.startswith("filler-")]

    assert "cannot overwrite the damaged index" in caplog.text
    assert "moved the index" in caplog.text
    assert result.backup_path is not None
    assert damaged in result.backup_path.read_bytes()
    assert integrity == (True, ["ok"])
    assert 0 < len(fillers_kept) < 500
    assert len(run_ids) == result.runs + len(fillers_kept)
    assert leftovers(store) == []


def test_rebuild_torn_line(store: Path) -> None:
    """A torn last line is counted as corrupt, and the other runs are rebuilt."""
    before = raw_rows(db_of(store))
    newest = JournalReader(store / "journal").files()[-1].path
    with open(newest, "ab") as file:
        file.write(b'{"record_type": "run_end", "run_id": "torn-run", "sta')

    result = rebuild_index(db_of(store), store / "journal")

    assert result.corrupt_lines == 1
    assert result.rejected_runs == 0
    assert raw_rows(db_of(store)) == before


def test_rebuild_rejected_record(store: Path) -> None:
    """A run line the index rejects is left out and counted; the others are rebuilt."""
    before = raw_rows(db_of(store))
    record = RunRecord(
        run_id="out-of-range-run",
        agent_name="clock-agent",
        job_type="job",
        start_time="0001-01-01T00:30:00+01:00",
    )
    journal = NDJSONWriter(store / "journal")
    try:
        journal.append("run_start", record.to_dict(), timestamp=get_iso8601_timestamp())
    finally:
        journal.close()

    result = rebuild_index(db_of(store), store / "journal")

    assert result.rejected_runs == 1
    assert result.corrupt_lines == 0
    assert result.runs == len(before)
    assert raw_rows(db_of(store)) == before


# -- merging with the live index ----------------------------------------------------------------


def test_rebuild_repairs_rows(store: Path) -> None:
    """Rows that differ from the journal are corrected, and missing rows are added."""
    before = raw_rows(db_of(store))
    posted = next(run_id for run_id, row in before.items() if row["api_posted"])
    ended = sorted(
        run_id for run_id, row in before.items() if row["status"] == "success" and run_id != posted
    )
    with DatabaseWriter(db_of(store)) as index:
        index.update_run(ended[0], status="failed", items_failed=99)
        with contextlib.closing(sqlite3.connect(db_of(store))) as connection, connection:
            connection.execute("DELETE FROM agent_runs WHERE run_id = ?", (ended[1],))
            connection.execute(
                "UPDATE agent_runs SET items_failed = 99, output_summary = 'edited' "
                "WHERE run_id = ?",
                (posted,),
            )

    result = rebuild_index(db_of(store), store / "journal")
    after = raw_rows(db_of(store))

    assert without(after[ended[0]], SYNC_COLUMNS) == without(before[ended[0]], SYNC_COLUMNS)
    assert after[ended[0]]["api_posted"] == 0
    assert without(after[ended[1]], SYNC_COLUMNS) == without(before[ended[1]], SYNC_COLUMNS)
    assert after[posted] == before[posted]
    assert result.kept_sync_state == len(before) - 2


def test_rebuild_keeps_index_only_row(store: Path) -> None:
    """A row that no journal line describes stays in the index."""
    extra = RunRecord(
        run_id=generate_run_id("index-only"),
        agent_name="index-only",
        job_type="job",
        start_time=get_iso8601_timestamp(),
    )
    with DatabaseWriter(db_of(store)) as index:
        index.insert_run(extra)
    before = raw_rows(db_of(store))

    rebuild_index(db_of(store), store / "journal")

    assert raw_rows(db_of(store)) == before


def test_rebuild_run_ended_meanwhile(store: Path) -> None:
    """A run that ends after the journal was read keeps its ended row."""
    client = make_client(store)
    run_id = client.start_run("slow-agent", "job")
    ended: list[RunRecord | None] = []

    def end_during_write(phase: str, done: int, total: int) -> None:
        if phase == "write" and not ended:
            ended.append(client.end_run(run_id, "success", items_succeeded=7))

    try:
        rebuild_index(db_of(store), store / "journal", progress=end_during_write)
    finally:
        client.close()
    with DatabaseWriter(db_of(store)) as index:
        run = index.get_run(run_id)

    assert ended[0] is not None
    assert run is not None
    assert run.status == "success"
    assert run.items_succeeded == 7


def test_rebuild_replaces_backup(store: Path) -> None:
    """An existing backup and its -wal and -shm files are replaced."""
    backup = Path(f"{db_of(store)}.bak")
    backup.write_bytes(b"old backup")
    Path(f"{backup}-wal").write_bytes(b"old wal")
    Path(f"{backup}-shm").write_bytes(b"old shm")
    before = raw_rows(db_of(store))

    rebuild_index(db_of(store), store / "journal")

    assert raw_rows(backup) == before
    assert oct(backup.stat().st_mode & 0o777) == oct(0o600)


def test_rebuild_backup_has_no_stale_wal(store: Path) -> None:
    """The -wal of a replaced backup is removed, so it is never applied to the new backup."""
    backup = Path(f"{db_of(store)}.bak")
    backup.write_bytes(b"old backup")
    Path(f"{backup}-wal").write_bytes(b"old wal")

    rebuild_index(db_of(store), store / "journal")

    assert not Path(f"{backup}-wal").exists() or Path(f"{backup}-wal").read_bytes() != b"old wal"


# -- failures -----------------------------------------------------------------------------------


@pytest.mark.parametrize("failing_phase", ["read", "write"])
def test_rebuild_failure_keeps_index(store: Path, failing_phase: str) -> None:
    """An exception while reading or writing leaves the index, its backup and no new files."""
    backup = Path(f"{db_of(store)}.bak")
    backup.write_bytes(b"previous backup")
    index_bytes = db_of(store).read_bytes()
    before = raw_rows(db_of(store))

    def fail(phase: str, done: int, total: int) -> None:
        if phase == failing_phase and done > 0:
            raise RuntimeError(f"stop in {phase}")

    with pytest.raises(RuntimeError, match=f"stop in {failing_phase}"):
        rebuild_index(db_of(store), store / "journal", progress=fail)

    assert raw_rows(db_of(store)) == before
    assert db_of(store).read_bytes() == index_bytes
    assert backup.read_bytes() == b"previous backup"
    assert leftovers(store) == []


def test_rebuild_locked_index(store: Path) -> None:
    """An index that another connection keeps locked raises IndexLockedError naming it."""
    before = raw_rows(db_of(store))
    holder = sqlite3.connect(db_of(store), isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(IndexLockedError) as caught:
            rebuild_index(db_of(store), store / "journal", busy_timeout_ms=50)
    finally:
        holder.close()
    message = str(caught.value)

    assert caught.value.path == db_of(store)
    assert isinstance(caught.value, sqlite3.OperationalError)
    assert f"the index {db_of(store)} is locked" in message
    assert "write transaction of another process" in message
    assert "retry when it ends" in message
    assert "\n" not in message
    assert raw_rows(db_of(store)) == before
    assert leftovers(store) == []


def test_rebuild_locked_damaged_index(store: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A damaged index that stays locked raises IndexLockedError and is left in place."""
    add_filler_runs(db_of(store))
    damaged = damage_pages(db_of(store))
    holder = sqlite3.connect(db_of(store), isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(IndexLockedError):
            rebuild_index(db_of(store), store / "journal", busy_timeout_ms=50)
    finally:
        holder.close()

    assert damaged in db_of(store).read_bytes()
    assert "moved the index" not in caplog.text
    assert "replaced the content" not in caplog.text
    assert leftovers(store) == []


@pytest.mark.parametrize(
    ("timeout", "error"), [(-1, ValueError), (0.5, TypeError), (True, TypeError)]
)
def test_rebuild_invalid_busy_timeout(store: Path, timeout: Any, error: type[Exception]) -> None:
    """A busy_timeout_ms that is not an int of 0 or more is rejected before anything is read."""
    with pytest.raises(error, match="invalid busy_timeout_ms"):
        rebuild_index(db_of(store), store / "journal", busy_timeout_ms=timeout)


def test_rebuild_foreign_database(tmp_path: Path) -> None:
    """A database with an agent_runs table of another program is left untouched."""
    db_path = tmp_path / "telemetry.db"
    with contextlib.closing(sqlite3.connect(db_path)) as connection, connection:
        connection.execute("CREATE TABLE agent_runs (name TEXT)")
        connection.execute("INSERT INTO agent_runs VALUES ('kept')")

    with pytest.raises(SchemaError, match="did not create it"):
        rebuild_index(db_path, tmp_path / "journal")

    with contextlib.closing(sqlite3.connect(db_path)) as connection:
        tables = connection.execute("SELECT name FROM sqlite_master").fetchall()
        rows = connection.execute("SELECT * FROM agent_runs").fetchall()
    assert tables == [("agent_runs",)]
    assert rows == [("kept",)]
    assert not Path(f"{db_path}.bak").exists()
    assert leftovers(tmp_path) == []


def test_rebuild_progress_phases(store: Path) -> None:
    """progress reports each file read, then the runs written, ending at the totals."""
    calls: list[tuple[str, int, int]] = []
    files = len(JournalReader(store / "journal").files())

    result = rebuild_index(
        db_of(store), store / "journal", progress=lambda *call: calls.append(call)
    )

    reads = [call for call in calls if call[0] == "read"]
    writes = [call for call in calls if call[0] == "write"]
    assert reads[-1] == ("read", files, files)
    assert len(reads) == files
    assert writes[0] == ("write", 0, result.runs)
    assert writes[-1] == ("write", result.runs, result.runs)
    assert calls == reads + writes


def test_rebuild_empty_journal(tmp_path: Path) -> None:
    """Without journal files, a missing index is created empty."""
    result = rebuild_index(tmp_path / "telemetry.db", tmp_path / "journal")

    assert result.runs == 0
    assert result.files == 0
    assert result.backup_path is None
    assert raw_rows(tmp_path / "telemetry.db") == {}


# -- concurrency --------------------------------------------------------------------------------


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def test_rebuild_with_writer_process(tmp_path: Path) -> None:
    """Runs that a process writes before and during the rebuild are all in the index."""
    data_dir = tmp_path / "store"
    stop_file = tmp_path / "stop"
    with make_client(data_dir) as client:
        client.end_run(client.start_run("setup-agent", "job"), "success")
    watcher = DatabaseWriter(db_of(data_dir))
    writer = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(WRITING_AGENT), str(data_dir), str(stop_file)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: watcher.count_runs() >= 20, 30, "the writer's first runs")
        counts: list[int] = []

        def wait_for_more_runs(phase: str, done: int, total: int) -> None:
            # Hold the rebuild between reading the journal and the swap until the writer
            # has recorded more runs, so that those runs exist only after the read.
            if phase == "write" and not counts:
                counts.append(watcher.count_runs())
                wait_for(lambda: watcher.count_runs() >= counts[0] + 20, 30, "more runs")

        result = rebuild_index(db_of(data_dir), data_dir / "journal", progress=wait_for_more_runs)
    finally:
        stop_file.touch()
        _, errors = writer.communicate(timeout=60)
        watcher.close()

    journal = JournalReader(data_dir / "journal").fold_runs()
    with DatabaseWriter(db_of(data_dir)) as index:
        statuses = index.run_statuses()
    consistency = compare_index_with_journal(statuses, journal)

    assert writer.returncode == 0, errors
    assert "failed to" not in errors
    assert len(journal.runs) > result.runs
    assert consistency == Consistency([], [], [])


# -- compare_index_with_journal -----------------------------------------------------------------


def test_compare_live_store(store: Path) -> None:
    """A store written by clients is consistent, and a deleted row shows as journal-only."""
    journal = JournalReader(store / "journal").fold_runs()
    with DatabaseWriter(db_of(store)) as index:
        consistent = compare_index_with_journal(index.run_statuses(), journal)
        removed = next(iter(index.run_statuses()))
        with contextlib.closing(sqlite3.connect(db_of(store))) as connection, connection:
            connection.execute("DELETE FROM agent_runs WHERE run_id = ?", (removed,))
        after = compare_index_with_journal(index.run_statuses(), journal)

    assert consistent == Consistency([], [], [])
    assert after.journal_only == [removed]
