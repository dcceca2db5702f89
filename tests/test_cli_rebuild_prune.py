"""``telemetry rebuild`` and ``telemetry prune`` on stores of the library, run in subprocesses.

One test calls the prune command in process, to give it an index that does not wait for locks.
"""

from __future__ import annotations

import datetime
import io
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from cli_support import run_cli, run_json
from http_server import ScriptedServer

from telemetry import TelemetryClient, TelemetryConfig
from telemetry.cli import build_parser
from telemetry.cli._context import CommandContext
from telemetry.cli._prune import prune_command
from telemetry.config import resolve_config
from telemetry.database import DatabaseWriter
from telemetry.models import RunRecord, generate_run_id, get_iso8601_timestamp
from telemetry.ndjson import NDJSONWriter

UTC = datetime.timezone.utc
TOKEN = "tok-5a60d4e7b1c2a9f3-secret"


def make_client(data_dir: Path, **settings: Any) -> TelemetryClient:
    """Return a client of the store in ``data_dir`` that ignores the environment."""
    return TelemetryClient(TelemetryConfig(data_dir=data_dir, environ={}, **settings))


def index_rows(data_dir: Path) -> list[dict[str, Any]]:
    """Return every row of the store's index as a dict, in run id order."""
    with DatabaseWriter(data_dir / "telemetry.db") as index:
        runs = index.list_runs(limit=None)
    return sorted((run.to_dict() for run in runs), key=lambda row: row["run_id"])


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr


# -- rebuild ----------------------------------------------------------------------------------


@pytest.fixture
def live_client(tmp_path: Path) -> Iterator[TelemetryClient]:
    """Yield a client that keeps one run open, as an agent still at work would."""
    with make_client(tmp_path) as client:
        client.start_run("live-agent", "test", items_discovered=5)
        yield client


def build_varied_store(data_dir: Path, server: ScriptedServer) -> None:
    """Record runs of every kind: ended locally, posted, failed to post, with metrics."""
    with make_client(data_dir) as client:
        with client.track_run("local-agent", "audit", product="docs") as run:
            run.log_event("file_parsed", {"path": "a.py"})
            run.set_metrics(items_discovered=3, items_succeeded=2, items_failed=1)
            run.set_metrics(metrics_json={"lines": 120, "ratio": 0.5})
        run_id = client.start_run("local-agent", "audit")
        client.end_run(run_id, "failed", error_summary="ValueError: bad input")

    posting = {"api_url": server.url, "api_token": TOKEN, "max_retries": 0}
    with make_client(data_dir, **posting) as client:
        for status in ("success", "partial"):
            run_id = client.start_run("posting-agent", "sync")
            client.end_run(run_id, status)
        server.respond(500)
        run_id = client.start_run("posting-agent", "sync")
        client.end_run(run_id, "success")


def test_rebuild_reproduces_index(
    tmp_path: Path, api_server: ScriptedServer, live_client: TelemetryClient
) -> None:
    """The rebuilt index has the same rows as the live one, API sync state included."""
    build_varied_store(tmp_path, api_server)
    rows_before = index_rows(tmp_path)
    listed_before = run_json("runs", "--limit", "100", data_dir=tmp_path)

    summary = run_json("rebuild", data_dir=tmp_path)
    rows_after = index_rows(tmp_path)
    listed_after = run_json("runs", "--limit", "100", data_dir=tmp_path)

    assert len(rows_before) == 6
    assert sum(row["api_posted"] for row in rows_before) == 2
    assert sum(row["api_retry_count"] for row in rows_before) == 1
    assert rows_after == rows_before
    assert listed_after == listed_before
    assert summary["runs"] == 6
    assert summary["kept_sync_state"] == 6
    assert summary["corrupt_lines"] == 0
    assert summary["backup_path"] == str(tmp_path / "telemetry.db.bak")
    assert Path(summary["backup_path"]).is_file()


def test_rebuild_text_summary(tmp_path: Path) -> None:
    """Without --json, rebuild prints what it read, wrote and kept."""
    with make_client(tmp_path) as client:
        run_id = client.start_run("local-agent", "audit")
        client.end_run(run_id, "success")

    result = run_cli("rebuild", data_dir=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "1 run, 0 unreadable lines skipped" in result.stdout
    assert f"The old index is kept at {tmp_path / 'telemetry.db.bak'}." in result.stdout
    assert_no_traceback(result)


def test_rebuild_corrupt_index(tmp_path: Path) -> None:
    """An index of garbage bytes is moved aside and rebuilt, and `runs` works again."""
    with make_client(tmp_path) as client:
        for status in ("success", "failed"):
            run_id = client.start_run("local-agent", "audit")
            client.end_run(run_id, status)
    (tmp_path / "telemetry.db").write_bytes(b"\x00garbage, not SQLite\xff" * 512)
    broken = run_cli("runs", data_dir=tmp_path)

    rebuilt = run_cli("rebuild", "--json", data_dir=tmp_path)
    listed = run_json("runs", data_dir=tmp_path)
    summary = orjson.loads(rebuilt.stdout)

    assert broken.returncode == 1
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert summary["runs"] == 2
    assert summary["kept_sync_state"] == 0
    assert summary["backup_path"] is not None
    assert Path(summary["backup_path"]).is_file()
    assert sorted(run["status"] for run in listed) == ["failed", "success"]
    assert_no_traceback(rebuilt)


def test_rebuild_without_journal(tmp_path: Path) -> None:
    """A store with no journal files is not rebuilt: exit 1, and the index stays as it was."""
    DatabaseWriter(tmp_path / "telemetry.db").close()
    index_before = (tmp_path / "telemetry.db").read_bytes()

    result = run_cli("rebuild", data_dir=tmp_path)

    assert result.returncode == 1
    assert "no journal files in" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert (tmp_path / "telemetry.db").read_bytes() == index_before
    assert_no_traceback(result)


# -- prune ------------------------------------------------------------------------------------


def record_old_run(data_dir: Path, days_ago: int) -> RunRecord:
    """Journal and index an ended run that started ``days_ago`` days ago."""
    start = datetime.datetime.now(UTC) - datetime.timedelta(days=days_ago)
    return record_span(data_dir, start, start + datetime.timedelta(minutes=1))


def record_span(data_dir: Path, start: datetime.datetime, end: datetime.datetime) -> RunRecord:
    """Journal and index a successful run from ``start`` to ``end``."""
    started = get_iso8601_timestamp(start)
    record = RunRecord(
        run_id=generate_run_id("old-agent"),
        agent_name="old-agent",
        job_type="test",
        start_time=started,
        created_at=started,
        updated_at=started,
    )
    writer = NDJSONWriter(data_dir / "journal")
    try:
        writer.append("run_start", record.to_dict())
        ended = get_iso8601_timestamp(end)
        duration_ms = round((end - start) / datetime.timedelta(milliseconds=1))
        record.status, record.end_time, record.duration_ms = "success", ended, duration_ms
        record.updated_at = ended
        writer.append("run_end", record.to_dict())
    finally:
        writer.close()
    with DatabaseWriter(data_dir / "telemetry.db") as index:
        index.load_runs([record])
    return record


def journal_file_of(data_dir: Path, days_ago: int) -> Path:
    """Return the path of the journal file dated ``days_ago`` days before today."""
    day = datetime.datetime.now(UTC) - datetime.timedelta(days=days_ago)
    return data_dir / "journal" / f"events_{day:%Y%m%d}.ndjson"


@pytest.fixture
def aged_store(tmp_path: Path) -> Path:
    """A store with runs of 200 and 120 days ago and one of today."""
    record_old_run(tmp_path, 200)
    record_old_run(tmp_path, 120)
    with make_client(tmp_path) as client:
        run_id = client.start_run("recent-agent", "test")
        client.end_run(run_id, "success")
    return tmp_path


def test_prune_dry_run(aged_store: Path) -> None:
    """--dry-run lists the old files and rows and deletes nothing."""
    old_files = [journal_file_of(aged_store, 200), journal_file_of(aged_store, 120)]

    result = run_cli("prune", "--older-than", "90d", "--dry-run", data_dir=aged_store)
    lines = result.stdout.splitlines()

    assert result.returncode == 0, result.stderr
    assert lines[0].startswith("Would delete 2 journal files (")
    assert "and 2 index rows older than" in lines[0]
    assert lines[1:3] == [f"  {path}" for path in old_files]
    assert lines[-1] == "Nothing was deleted (--dry-run)."
    assert all(path.is_file() for path in old_files)
    assert len(index_rows(aged_store)) == 3


def record_old_running_run(data_dir: Path, days_ago: int) -> RunRecord:
    """Journal and index a run of another host that started ``days_ago`` days ago and runs."""
    start = datetime.datetime.now(UTC) - datetime.timedelta(days=days_ago)
    started = get_iso8601_timestamp(start)
    record = RunRecord(
        run_id=generate_run_id("daemon-agent"),
        agent_name="daemon-agent",
        job_type="serve",
        start_time=started,
        created_at=started,
        updated_at=started,
        hostname="elsewhere-host",
        pid=4242,
    )
    writer = NDJSONWriter(data_dir / "journal")
    try:
        writer.append("run_start", record.to_dict())
    finally:
        writer.close()
    with DatabaseWriter(data_dir / "telemetry.db") as index:
        index.load_runs([record])
    return record


def test_prune_dry_run_counts_running(aged_store: Path) -> None:
    """--dry-run counts the rows that would go of runs still running."""
    record_old_running_run(aged_store, 100)

    result = run_cli("prune", "--older-than", "90d", "--dry-run", data_dir=aged_store)
    plan = run_json("prune", "--older-than", "90d", "--dry-run", data_dir=aged_store)

    assert result.returncode == 0, result.stderr
    assert "and 3 index rows older than" in result.stdout.splitlines()[0]
    assert (
        "1 of these runs is still running, with no end recorded: 'telemetry check' tells "
        "whether their processes are gone."
    ) in result.stdout.splitlines()
    assert plan["running_runs"] == 1


def test_prune_dry_run_json(aged_store: Path) -> None:
    """--dry-run --json gives the cutoff, the files and the number of rows."""
    plan = run_json("prune", "--older-than", "90d", "--dry-run", data_dir=aged_store)
    cutoff = datetime.datetime.fromisoformat(plan["cutoff"])
    expected_cutoff = datetime.datetime.now(UTC) - datetime.timedelta(days=90)

    assert plan["dry_run"] is True
    assert [entry["path"] for entry in plan["files"]] == [
        str(journal_file_of(aged_store, 200)),
        str(journal_file_of(aged_store, 120)),
    ]
    assert plan["runs"] == 2
    assert plan["running_runs"] == 0
    assert plan["bytes"] > 0
    assert plan["runs_deleted"] == 0
    assert cutoff.date() == expected_cutoff.date()


def test_prune_deletes_old(aged_store: Path) -> None:
    """Without --dry-run, the old files and rows go and the recent ones stay."""
    result = run_json("prune", "--older-than", "90d", data_dir=aged_store)
    remaining = index_rows(aged_store)

    assert result["files_deleted"] == 2
    assert result["runs_deleted"] == 2
    assert result["bytes_deleted"] == result["bytes"]
    assert not journal_file_of(aged_store, 200).exists()
    assert not journal_file_of(aged_store, 120).exists()
    assert journal_file_of(aged_store, 0).is_file()
    assert [row["agent_name"] for row in remaining] == ["recent-agent"]


def test_prune_text_report(aged_store: Path) -> None:
    """The report lists what was deleted, and a second prune finds nothing."""
    first = run_cli("prune", "--older-than", "150d", data_dir=aged_store)
    second = run_cli("prune", "--older-than", "150d", data_dir=aged_store)

    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("Deleted 1 journal file (")
    assert "and 1 index row older than" in first.stdout
    assert f"  {journal_file_of(aged_store, 200)}" in first.stdout.splitlines()
    assert second.returncode == 0
    assert second.stdout.startswith("Nothing to delete")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--older-than", "12h"], "expected 1d or more"),
        (["--older-than", "ninety days"], "invalid duration"),
        (["--older-than", "106000w"], "before year 1"),
        ([], "--older-than"),
    ],
)
def test_prune_usage_errors(tmp_path: Path, arguments: list[str], message: str) -> None:
    """A missing, malformed or too short --older-than is a usage error (exit 2)."""
    result = run_cli("prune", *arguments, data_dir=tmp_path)

    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.splitlines()) == 1


# -- prune: runs across the cutoff, pending posts, failures -----------------------------------


def cutoff_of(older_than_days: int) -> datetime.datetime:
    """Return the cutoff that ``prune --older-than <older_than_days>d`` uses now."""
    moment = datetime.datetime.now(UTC) - datetime.timedelta(days=older_than_days)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def mark_all_posted(data_dir: Path) -> None:
    """Mark every run of the store's index as posted to the API."""
    with DatabaseWriter(data_dir / "telemetry.db") as index:
        for run_id in index.run_statuses():
            index.mark_api_posted(run_id)


def api_environment(port: int) -> dict[str, str]:
    """Return settings that configure an API on 127.0.0.1 that nothing listens on."""
    return {"TELEMETRY_API_URL": f"http://127.0.0.1:{port}/runs"}


def test_prune_then_check(aged_store: Path) -> None:
    """After a prune that keeps a run across the cutoff, check finds nothing wrong."""
    hour = datetime.timedelta(hours=1)
    cutoff = cutoff_of(90)
    across = record_span(aged_store, cutoff - hour, cutoff + hour)
    assert run_cli("check", data_dir=aged_store).returncode == 0

    pruned = run_json("prune", "--older-than", "90d", data_dir=aged_store)
    result = run_cli("check", data_dir=aged_store)

    assert pruned["runs_deleted"] == 2
    assert result.returncode == 0, result.stdout
    assert across.run_id in {row["run_id"] for row in index_rows(aged_store)}


def test_prune_then_rebuild(aged_store: Path) -> None:
    """A rebuild after a prune restores no pruned run and leaves no posted run pending."""
    hour = datetime.timedelta(hours=1)
    cutoff = cutoff_of(90)
    across = record_span(aged_store, cutoff - hour, cutoff + hour)
    mark_all_posted(aged_store)
    run_json("prune", "--older-than", "90d", data_dir=aged_store)
    rows_after_prune = index_rows(aged_store)

    result = run_cli("rebuild", data_dir=aged_store)
    rows = index_rows(aged_store)

    assert result.returncode == 0, result.stderr
    assert [row["run_id"] for row in rows] == [row["run_id"] for row in rows_after_prune]
    assert across.run_id in {row["run_id"] for row in rows}
    assert all(row["api_posted"] for row in rows)


def test_prune_stops_for_pending(aged_store: Path, free_port: int) -> None:
    """With an API configured, old runs not yet posted stop the prune before it deletes."""
    old_files = [journal_file_of(aged_store, 200), journal_file_of(aged_store, 120)]

    result = run_cli(
        "prune", "--older-than", "90d", data_dir=aged_store, env=api_environment(free_port)
    )

    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1
    assert "2 runs older than" in result.stderr
    assert "run 'telemetry flush' first, or pass --include-pending to delete them" in result.stderr
    assert all(path.is_file() for path in old_files)
    assert len(index_rows(aged_store)) == 3
    assert_no_traceback(result)


def test_prune_include_pending(aged_store: Path, free_port: int) -> None:
    """--include-pending deletes the runs not yet posted and reports how many there were."""
    result = run_cli(
        "prune",
        "--older-than",
        "90d",
        "--include-pending",
        data_dir=aged_store,
        env=api_environment(free_port),
    )

    assert result.returncode == 0, result.stderr
    assert "2 of these runs had not been posted to the API" in result.stdout
    assert [row["agent_name"] for row in index_rows(aged_store)] == ["recent-agent"]


def test_prune_posted_with_api(aged_store: Path, free_port: int) -> None:
    """With an API configured, runs already posted are deleted without --include-pending."""
    mark_all_posted(aged_store)

    result = run_json(
        "prune", "--older-than", "90d", data_dir=aged_store, env=api_environment(free_port)
    )

    assert result["pending_runs"] == 0
    assert result["runs_deleted"] == 2


def test_prune_dry_run_pending(aged_store: Path, free_port: int) -> None:
    """--dry-run with an API configured prints how many runs are not yet posted."""
    result = run_cli(
        "prune",
        "--older-than",
        "90d",
        "--dry-run",
        data_dir=aged_store,
        env=api_environment(free_port),
    )
    lines = result.stdout.splitlines()

    assert result.returncode == 0, result.stderr
    assert lines[-2].startswith("2 of these runs are not yet posted to the API, so prune")
    assert lines[-1] == "Nothing was deleted (--dry-run)."
    assert len(index_rows(aged_store)) == 3


def test_prune_dry_run_json_pending(aged_store: Path, free_port: int) -> None:
    """--dry-run --json gives the number of planned runs not yet posted."""
    plan = run_json(
        "prune",
        "--older-than",
        "90d",
        "--dry-run",
        data_dir=aged_store,
        env=api_environment(free_port),
    )

    assert plan["pending_runs"] == 2
    assert plan["include_pending"] is False


def test_prune_pending_without_api(aged_store: Path) -> None:
    """Without an API configured, runs never posted are deleted and not mentioned."""
    result = run_cli("prune", "--older-than", "90d", data_dir=aged_store)

    assert result.returncode == 0, result.stderr
    assert "posted" not in result.stdout
    assert [row["agent_name"] for row in index_rows(aged_store)] == ["recent-agent"]


def test_prune_locked_no_progress(aged_store: Path) -> None:
    """A prune that fails on a locked index writes no final progress line."""
    args = build_parser().parse_args(
        ["prune", "--older-than", "90d", "--data-dir", str(aged_store)]
    )
    config, ignored = resolve_config(data_dir=args.data_dir, environ={})
    err = io.StringIO()
    context = CommandContext(config, ignored, io.StringIO(), err)
    # No wait for the lock, so that the test fails fast instead of after the retries.
    context._index = DatabaseWriter(config.db_path, busy_timeout_ms=0, sleep=lambda seconds: None)
    blocker = sqlite3.connect(config.db_path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            prune_command(args, context)
    finally:
        blocker.close()
        context.close()

    assert "deleting" not in err.getvalue()
    assert len(index_rows(aged_store)) == 3
