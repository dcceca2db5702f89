"""``telemetry rebuild`` in subprocesses: a damaged or locked index, rejected runs, its help."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from cli_support import command_environment, run_cli, run_json
from http_server import ScriptedServer
from tmpfs_support import fill_file_system, mounted_tmpfs

from telemetry import TelemetryClient, TelemetryConfig
from telemetry.cli import main
from telemetry.database import DatabaseWriter
from telemetry.models import RunRecord, get_iso8601_timestamp
from telemetry.ndjson import NDJSONWriter
from telemetry.rebuild import BACKUP_SUFFIX

TOKEN = "tok-3e9b71c04d5a8f26-secret"
COMMAND_TIMEOUT = 60

# Runs the command with a rebuild that waits 0.1 s for a lock on the index, not 30 s.
SHORT_WAIT_SCRIPT = textwrap.dedent(
    """
    import sys
    from telemetry import rebuild
    from telemetry.cli import main

    rebuild.SWAP_BUSY_TIMEOUT_MS = 100
    sys.exit(main())
    """
)


def make_client(data_dir: Path, **settings: Any) -> TelemetryClient:
    """Return a client of the store in ``data_dir`` that ignores the environment."""
    return TelemetryClient(TelemetryConfig(data_dir=data_dir, environ={}, **settings))


def index_rows(data_dir: Path) -> list[dict[str, Any]]:
    """Return every row of the store's index as a dict, in run id order."""
    with DatabaseWriter(data_dir / "telemetry.db") as index:
        runs = index.list_runs(limit=None)
    return sorted((run.to_dict() for run in runs), key=lambda row: row["run_id"])


def record_runs(data_dir: Path) -> None:
    """Record two ended runs without an API, so that both stay pending."""
    with make_client(data_dir) as client:
        for status in ("success", "failed"):
            client.end_run(client.start_run("local-agent", "audit"), status)


def damage_secondary_index(db_path: Path) -> None:
    """Point the status index at another column, so its entries no longer match the table."""
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as connection:
        connection.execute("PRAGMA writable_schema = ON")
        connection.execute(
            "UPDATE sqlite_schema SET sql = 'CREATE INDEX idx_agent_runs_status "
            "ON agent_runs (job_type)' WHERE name = 'idx_agent_runs_status'"
        )


def test_rebuild_damaged_secondary_index(tmp_path: Path, api_server: ScriptedServer) -> None:
    """Posted runs stay posted after rebuilding an index with a damaged secondary index."""
    posting = {"api_url": api_server.url, "api_token": TOKEN, "max_retries": 0}
    with make_client(tmp_path, **posting) as client:
        for status in ("success", "partial", "failed"):
            client.end_run(client.start_run("posting-agent", "sync"), status)
    rows_before = index_rows(tmp_path)
    damage_secondary_index(tmp_path / "telemetry.db")

    check_before = run_cli("check", data_dir=tmp_path)
    summary = run_json("rebuild", data_dir=tmp_path)
    check_after = run_cli("check", data_dir=tmp_path)

    assert [row["api_posted"] for row in rows_before] == [True, True, True]
    assert check_before.returncode == 1
    assert summary["runs"] == 3
    assert summary["kept_sync_state"] == 3
    assert index_rows(tmp_path) == rows_before
    assert check_after.returncode == 0, check_after.stdout


def test_rebuild_locked_index(tmp_path: Path) -> None:
    """A locked index ends the rebuild with one line naming the index and what to do."""
    record_runs(tmp_path)
    db_path = tmp_path / "telemetry.db"
    rows_before = index_rows(tmp_path)
    holder = sqlite3.connect(db_path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        result = subprocess.run(
            [sys.executable, "-c", SHORT_WAIT_SCRIPT, "rebuild", "--data-dir", str(tmp_path)],
            env=command_environment(),
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    finally:
        holder.close()
    lines = result.stderr.splitlines()

    assert result.returncode == 1
    assert lines[-1].startswith(f"telemetry rebuild: the index {db_path} is locked")
    assert "write transaction of another process" in lines[-1]
    assert "retry when it ends" in lines[-1]
    assert [line for line in lines if "locked" in line] == lines[-1:]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert index_rows(tmp_path) == rows_before


def test_rebuild_rejected_runs(tmp_path: Path) -> None:
    """A run that the index rejects is counted as rejected, not as an unreadable line."""
    record_runs(tmp_path)
    rejected = RunRecord(
        run_id="year-zero-run",
        agent_name="clock-agent",
        job_type="job",
        start_time="0001-01-01T00:30:00+01:00",
    )
    journal = NDJSONWriter(tmp_path / "journal")
    try:
        journal.append("run_start", rejected.to_dict(), timestamp=get_iso8601_timestamp())
    finally:
        journal.close()

    summary = run_json("rebuild", data_dir=tmp_path)
    text = run_cli("rebuild", data_dir=tmp_path)

    assert summary["rejected_runs"] == 1
    assert summary["corrupt_lines"] == 0
    assert summary["runs"] == 2
    assert text.returncode == 0, text.stderr
    assert "2 runs, 0 unreadable lines skipped" in text.stdout
    assert "Left out 1 run that the index rejected" in text.stdout
    assert "year-zero-run" in text.stderr


def test_rebuild_summary_without_rejections(tmp_path: Path) -> None:
    """The summary mentions rejected runs only when there are some."""
    record_runs(tmp_path)

    text = run_cli("rebuild", data_dir=tmp_path)

    assert text.returncode == 0, text.stderr
    assert "Left out" not in text.stdout


def test_rebuild_keeps_damaged_backup(tmp_path: Path) -> None:
    """A damaged index moved aside survives a second rebuild, and the summary names its copy."""
    record_runs(tmp_path)
    garbage = b"\x00garbage, not SQLite\xff" * 512
    (tmp_path / "telemetry.db").write_bytes(garbage)

    first = run_cli("rebuild", data_dir=tmp_path)
    second = run_json("rebuild", data_dir=tmp_path)
    damaged = [path for path in tmp_path.iterdir() if path.name.startswith("telemetry.db.bak-")]

    assert first.returncode == 0, first.stderr
    assert len(damaged) == 1
    assert damaged[0].read_bytes() == garbage
    assert (
        f"The damaged old index is kept at {damaged[0]}; no later rebuild replaces it."
    ) in first.stdout.splitlines()
    assert second["backup_path"] == str(tmp_path / f"telemetry.db{BACKUP_SUFFIX}")
    assert second["damaged_backup"] is False


def test_rebuild_reports_index_only_rows(tmp_path: Path) -> None:
    """The summary counts the rows that only the old index had and that were kept."""
    record_runs(tmp_path)
    started = get_iso8601_timestamp()
    extra = RunRecord(
        run_id="index-only-run", agent_name="lost-agent", job_type="job", start_time=started
    )
    with DatabaseWriter(tmp_path / "telemetry.db") as index:
        index.load_runs([extra])

    text = run_cli("rebuild", data_dir=tmp_path)
    summary = run_json("rebuild", data_dir=tmp_path)

    assert text.returncode == 0, text.stderr
    assert (
        "Kept 1 row that only the old index had: runs that no journal line describes, or "
        "that started during the rebuild."
    ) in text.stdout.splitlines()
    assert summary["index_only_rows"] == 1
    assert "index-only-run" in {row["run_id"] for row in index_rows(tmp_path)}


def test_rebuild_disk_full(tmp_path: Path) -> None:
    """A rebuild on a full file system fails with one line naming the index and the fix."""
    with mounted_tmpfs(tmp_path / "mnt") as mount_point:
        store = mount_point / "store"
        with make_client(store) as client:
            for number in range(20):
                run_id = client.start_run("local-agent", "audit")
                client.end_run(run_id, "success", error_summary="x" * 2000 + str(number))
        (store / "telemetry.db").unlink()
        for suffix in ("-wal", "-shm"):
            Path(f"{store / 'telemetry.db'}{suffix}").unlink(missing_ok=True)
        fill_file_system(mount_point)

        result = run_cli("rebuild", data_dir=store)
        leftovers = [path.name for path in store.iterdir() if ".rebuild-" in path.name]

    lines = result.stderr.splitlines()
    db_path = store / "telemetry.db"
    assert result.returncode == 1
    assert lines[-1].startswith(
        f"telemetry rebuild: cannot rebuild the index {db_path}: database or disk is full. "
        f"Free space on the file system of {store}"
    )
    assert leftovers == []
    assert "Traceback" not in result.stderr


def test_rebuild_help_describes_merge(capsys: pytest.CaptureFixture[str]) -> None:
    """The help describes the merge and the backup's name."""
    code = main(["rebuild", "--help"])
    output = capsys.readouterr().out

    assert code == 0
    assert "are merged into the index in one" in output
    assert "Rows that only the index has are kept" in output
    assert f"named like the index with {BACKUP_SUFFIX} added" in output
    assert "replaces the old one" not in output
    assert "damaged old index is kept under a name with the\ntime" in output
