"""Tests of the runs, show, stats, export and config subcommands, run as real subprocesses.

Each test runs ``python -m telemetry`` against a store that the library wrote: runs
recorded by a TelemetryClient, and runs loaded with DatabaseWriter.load_runs where a test
needs exact times, durations or states.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import os
import shutil
import sqlite3
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from cli_support import run_cli, run_json

import telemetry
from telemetry import TelemetryClient, TelemetryConfig
from telemetry.cli import build_parser, main
from telemetry.cli._context import CommandContext
from telemetry.config import resolve_config
from telemetry.database import DatabaseWriter
from telemetry.models import RunRecord, get_iso8601_timestamp
from telemetry.ndjson import NDJSONWriter

RUN_FIELDS = [field.name for field in dataclasses.fields(RunRecord)]
TOKEN = "tok-3c9f1e07a5b24d68"
FORMULA = '=HYPERLINK("http://127.0.0.1/")'
OLD_START = "2020-03-01T10:00:00.000000+00:00"


def ago(**delta: float) -> str:
    """Return the UTC time ``delta`` before now, as the index stores it."""
    moment = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(**delta)
    return get_iso8601_timestamp(moment)


def loaded_run(run_id: str, agent: str, start: str, **fields: Any) -> RunRecord:
    """Return a run of ``agent`` started at ``start``, with ``fields`` set."""
    return RunRecord(run_id=run_id, agent_name=agent, job_type="batch", start_time=start, **fields)


def timed_runs() -> list[RunRecord]:
    """Return the runs of agent "timed": durations 10, 20, 30 and 40 ms, and one running."""
    return [
        loaded_run(
            "timed-1", "timed", ago(hours=5), status="success", duration_ms=10,
            items_succeeded=5, items_failed=1, api_posted=True,
        ),
        loaded_run(
            "timed-2", "timed", ago(hours=4), status="success", duration_ms=20,
            items_succeeded=5,
        ),
        loaded_run(
            "timed-3", "timed", ago(hours=3), status="failed", duration_ms=30, items_failed=3,
        ),
        loaded_run(
            "timed-4", "timed", ago(hours=2), status="partial", duration_ms=40,
            items_succeeded=2, items_failed=2,
        ),
        loaded_run("timed-5", "timed", ago(hours=1), status="running"),
    ]  # fmt: skip


def old_runs() -> list[RunRecord]:
    """Return two runs of agent "archive" that started in March 2020."""
    return [
        loaded_run("old-1", "archive", OLD_START, status="success", duration_ms=1000),
        loaded_run(
            "old-2", "archive", "2020-03-02T10:00:00.000000+00:00", status="failed",
            duration_ms=2000,
        ),
    ]  # fmt: skip


def record_client_runs(data_dir: Path) -> list[str]:
    """Record three runs of "stdlib-audit" with a client; return their ids, oldest first."""
    client = TelemetryClient(TelemetryConfig(data_dir=data_dir, api_url=None, environ={}))
    run_ids = []
    try:
        for number, status in enumerate(("success", "failed", "success")):
            run_id = client.start_run("stdlib-audit", "audit", items_discovered=3)
            client.log_event(run_id, "file_checked", {"path": f"a{number}.py"})
            client.log_event(run_id, "file_checked", {"path": f"b{number}.py"})
            client.end_run(
                run_id,
                status,
                items_succeeded=2,
                items_failed=1,
                metrics_json={"files": 3, "sizes": [10, 20]},
                error_summary=FORMULA if status == "failed" else None,
            )
            run_ids.append(run_id)
    finally:
        client.close()
    return run_ids


def load(data_dir: Path, records: list[RunRecord]) -> None:
    """Write ``records`` into the store's index with DatabaseWriter.load_runs."""
    index = DatabaseWriter(data_dir / "telemetry.db")
    try:
        index.load_runs(records)
    finally:
        index.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Return a store with client runs, timed runs and old runs, and the client's run ids."""
    data_dir = tmp_path_factory.mktemp("store")
    run_ids = record_client_runs(data_dir)
    load(data_dir, timed_runs() + old_runs())
    return {"dir": data_dir, "audit_ids": run_ids}


@pytest.fixture
def corrupt_row_store(tmp_path: Path) -> Path:
    """Return a store whose run "bad-1" has metrics_json text that is not JSON."""
    load(tmp_path, [loaded_run("bad-1", "agent", OLD_START, status="success")])
    with sqlite3.connect(tmp_path / "telemetry.db") as connection:
        connection.execute("UPDATE agent_runs SET metrics_json = '{broken' WHERE run_id = 'bad-1'")
    connection.close()
    return tmp_path


def run_ids_in(output: str) -> list[str]:
    """Return the first column of a table's rows, without the header."""
    return [line.split()[0] for line in output.splitlines()[1:] if line.strip()]


def assert_one_line_error(stderr: str, *parts: str) -> None:
    """Check that stderr is one line without a traceback, containing each of ``parts``."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for part in parts:
        assert part in lines[0], lines[0]


# -- runs -----------------------------------------------------------------------------------


def test_runs_table_newest_first(store: dict[str, Any]) -> None:
    """runs prints the runs as a table, newest start first, with the expected columns."""
    result = run_cli("runs", "--limit", "100", data_dir=store["dir"])

    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0].split()
    assert header[:3] == ["RUN", "ID", "AGENT"]
    assert "ITEMS" in header
    listed_ids = run_ids_in(result.stdout)
    audit = store["audit_ids"]
    assert listed_ids[:3] == list(reversed(audit))
    assert listed_ids[-2:] == ["old-2", "old-1"]


def test_runs_row_cells(store: dict[str, Any]) -> None:
    """A row shows agent, status, start, duration and items ok/failed of its run."""
    result = run_cli("runs", "--agent", "timed", "--status", "failed", data_dir=store["dir"])

    cells = result.stdout.splitlines()[1].split()
    assert cells[:3] == ["timed-3", "timed", "failed"]
    assert cells[-3:] == ["30", "ms", "0/3"]


def test_runs_json_full_records(store: dict[str, Any]) -> None:
    """runs --json prints a list of runs with every RunRecord field."""
    runs = run_json("runs", "--agent", "stdlib-audit", data_dir=store["dir"])

    assert [run["run_id"] for run in runs] == list(reversed(store["audit_ids"]))
    assert list(runs[0]) == RUN_FIELDS
    assert runs[0]["metrics_json"] == {"files": 3, "sizes": [10, 20]}


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--agent", "archive"], ["old-2", "old-1"]),
        (["--status", "running"], ["timed-5"]),
        (["--agent", "timed", "--since", "150m"], ["timed-5", "timed-4"]),
        (["--until", "2021-01-01"], ["old-2", "old-1"]),
        (["--since", "2020-03-02", "--until", "2020-03-03T00:00+00:00"], ["old-2"]),
        (["--agent", "timed", "--limit", "2"], ["timed-5", "timed-4"]),
    ],
)
def test_runs_filters(store: dict[str, Any], options: list[str], expected: list[str]) -> None:
    """--agent, --status, --since, --until and --limit select the runs they name."""
    runs = run_json("runs", *options, data_dir=store["dir"])

    assert [run["run_id"] for run in runs] == expected


def test_runs_limit_note(store: dict[str, Any]) -> None:
    """When --limit cuts the list short, a note on stderr reports that more runs match."""
    result = run_cli("runs", "--limit", "1", data_dir=store["dir"])

    assert len(run_ids_in(result.stdout)) == 1
    assert "raise --limit" in result.stderr


def test_runs_no_match(store: dict[str, Any]) -> None:
    """A filter that matches nothing prints "no runs match" and exits 0."""
    result = run_cli("runs", "--agent", "nobody", data_dir=store["dir"])

    assert result.returncode == 0
    assert result.stdout.strip() == "no runs match"


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--since", "abc"], "'abc'"),
        (["--since", "9999-12-31T23:00-05:00"], "9999-12-31T23:00-05:00"),
        (["--limit", "0"], "invalid count 0"),
        (["--limit", "many"], "'many'"),
        (["--status", "done"], "'done'"),
    ],
)
def test_runs_usage_errors(store: dict[str, Any], options: list[str], named: str) -> None:
    """A bad --since, --limit or --status exits 2 with one line naming the value."""
    result = run_cli("runs", *options, data_dir=store["dir"])

    assert result.returncode == 2
    assert_one_line_error(result.stderr, "telemetry runs:", named)


def test_runs_missing_store(tmp_path: Path) -> None:
    """A store without an index exits 1 with one line that names --data-dir."""
    result = run_cli("runs", data_dir=tmp_path / "missing")

    assert result.returncode == 1
    assert_one_line_error(result.stderr, "no index at", "--data-dir")


def test_runs_corrupt_index(tmp_path: Path) -> None:
    """An index file of random bytes exits 1 with one line that suggests rebuild."""
    (tmp_path / "telemetry.db").write_bytes(os.urandom(4096))

    result = run_cli("runs", data_dir=tmp_path)

    assert result.returncode == 1
    assert_one_line_error(result.stderr, "cannot be read", "telemetry rebuild")


def test_runs_newer_index(tmp_path: Path) -> None:
    """An index of a newer schema exits 1 with one line naming the version and the upgrade."""
    load(tmp_path, old_runs())
    with sqlite3.connect(tmp_path / "telemetry.db") as connection:
        connection.execute("PRAGMA user_version = 99")
    connection.close()

    result = run_cli("runs", data_dir=tmp_path)

    assert result.returncode == 1
    assert_one_line_error(result.stderr, "schema version 99", "upgrade agent-telemetry")


def test_runs_corrupt_row(corrupt_row_store: Path) -> None:
    """A row whose metrics_json is not JSON exits 1 with one line that suggests rebuild."""
    result = run_cli("runs", data_dir=corrupt_row_store)

    assert result.returncode == 1
    assert_one_line_error(result.stderr, "metrics_json", "telemetry rebuild")


def test_show_corrupt_row_names_run(corrupt_row_store: Path) -> None:
    """show of an unreadable row names the run in its one error line."""
    result = run_cli("show", "bad-1", data_dir=corrupt_row_store)

    assert result.returncode == 1
    assert_one_line_error(result.stderr, "run bad-1", "metrics_json", "telemetry rebuild")


def test_export_stream_error_not_row_error(store: dict[str, Any]) -> None:
    """A ValueError from the output stream is not reported as an unreadable index row."""
    config, ignored = resolve_config(data_dir=store["dir"], environ={})
    closed = io.StringIO()
    closed.close()
    context = CommandContext(config, ignored, closed, io.StringIO())
    args = build_parser().parse_args(["export", "--data-dir", str(store["dir"])])

    try:
        with pytest.raises(ValueError, match="closed file"):
            args.handler(args, context)
    finally:
        context.close()


# -- show -----------------------------------------------------------------------------------


def test_show_fields_and_events(store: dict[str, Any]) -> None:
    """show prints the run's fields that have a value, its metrics and its events in order."""
    run_id = store["audit_ids"][1]

    result = run_cli("show", run_id, data_dir=store["dir"])

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["run_id", run_id]
    assert "status            failed" in lines
    assert not any(line.startswith("parent_run_id") for line in lines)
    assert "metrics_json:" in lines
    assert '    "files": 3,' in lines
    event_lines = lines[lines.index("events (2):") + 1 :]
    assert "file_checked" in event_lines[0]
    assert '{"path":"a1.py"}' in event_lines[0]
    assert '{"path":"b1.py"}' in event_lines[1]


def test_show_json(store: dict[str, Any]) -> None:
    """show --json prints the run as runs --json does, and its events in journal order."""
    run_id = store["audit_ids"][0]
    listed = run_json("runs", "--agent", "stdlib-audit", data_dir=store["dir"])

    report = run_json("show", run_id, data_dir=store["dir"])

    assert report["run"] == next(run for run in listed if run["run_id"] == run_id)
    assert [event["payload"]["path"] for event in report["events"]] == ["a0.py", "b0.py"]
    assert {event["record_type"] for event in report["events"]} == {"event"}


def test_show_unknown_run(store: dict[str, Any]) -> None:
    """An unknown run id exits 1 with one line naming the id and suggesting runs."""
    result = run_cli("show", "20260101T000000000000Z-nobody-0", data_dir=store["dir"])

    assert result.returncode == 1
    assert_one_line_error(result.stderr, "20260101T000000000000Z-nobody-0", "telemetry runs")


def test_show_run_across_midnight(tmp_path: Path) -> None:
    """A run over midnight shows the events of both days, and no other file is read."""
    start = "2026-01-01T23:59:58.000000+00:00"
    end = "2026-01-02T00:00:02.000000+00:00"
    run = loaded_run("night-1", "night", start, status="success", end_time=end, duration_ms=4000)
    load(tmp_path, [run])
    journal = NDJSONWriter(tmp_path / "journal", durability="none")
    try:
        journal.append("run_start", loaded_run("night-1", "night", start).to_dict())
        for stamp, step in ((start, "before"), (end, "after")):
            event = {"run_id": "night-1", "event_type": step, "timestamp": stamp, "payload": {}}
            journal.append("event", event)
        journal.append("run_end", run.to_dict())
    finally:
        journal.close()
    # Files outside the run's days with unreadable lines: reading them would log a warning.
    for date in ("20251231", "20260103"):
        (tmp_path / "journal" / f"events_{date}.ndjson").write_text("not json\n")

    result = run_cli("show", "night-1", "--json", data_dir=tmp_path)

    assert result.returncode == 0, result.stderr
    events = orjson.loads(result.stdout)["events"]
    assert [event["event_type"] for event in events] == ["before", "after"]
    assert "corrupt" not in result.stderr


def test_show_escapes_control_characters(tmp_path: Path) -> None:
    """Terminal escape sequences in a run's fields and events are shown escaped."""
    start = "2026-01-01T10:00:00.000000+00:00"
    summary = "bad\x1b]0;title\x07\x1b[2J\rfake line"
    run = loaded_run("esc-1", "esc", start, status="failed", error_summary=summary)
    load(tmp_path, [run])
    journal = NDJSONWriter(tmp_path / "journal", durability="none")
    try:
        journal.append("run_start", run.to_dict())
        event = {"run_id": "esc-1", "event_type": "step\x1b[2J", "timestamp": start}
        journal.append("event", {**event, "payload": {}})
    finally:
        journal.close()

    result = run_cli("show", "esc-1", data_dir=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout
    assert "\r" not in result.stdout
    assert "\\x1b[2J\\rfake line" in result.stdout
    assert "step\\x1b[2J" in result.stdout


# -- stats ----------------------------------------------------------------------------------


def test_stats_numbers(store: dict[str, Any]) -> None:
    """stats --json counts runs, success rate, percentiles, items, pending and running."""
    stats = run_json("stats", data_dir=store["dir"])

    timed = stats["by_agent"]["timed"]
    assert timed["runs"] == 5
    assert timed["running"] == 1
    assert timed["success_rate"] == 0.5
    assert timed["p50_duration_ms"] == 20
    assert timed["p95_duration_ms"] == 40
    assert timed["items_processed"] == 18
    assert timed["pending_api_posts"] == 3


def test_stats_default_window(store: dict[str, Any]) -> None:
    """Without --since, stats counts the last 7 days and leaves older runs out."""
    stats = run_json("stats", data_dir=store["dir"])

    assert set(stats["by_agent"]) == {"stdlib-audit", "timed"}
    assert stats["total_runs"] == 8
    since = datetime.datetime.fromisoformat(stats["since"])
    age = datetime.datetime.now(datetime.timezone.utc) - since
    assert datetime.timedelta(days=6, hours=23) < age < datetime.timedelta(days=7, hours=1)


def test_stats_all_and_agent(store: dict[str, Any]) -> None:
    """--all counts every run, and --agent keeps one agent and its totals."""
    stats = run_json("stats", "--all", "--agent", "archive", data_dir=store["dir"])

    assert list(stats["by_agent"]) == ["archive"]
    assert stats["since"] is None
    assert stats["total_runs"] == 2
    assert stats["success_rate"] == 0.5


def test_stats_table(store: dict[str, Any]) -> None:
    """The table names the window, has a row per agent and a total row."""
    result = run_cli("stats", data_dir=store["dir"])

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "the last 7d" in lines[0]
    rows = {line.split()[0]: line.split() for line in lines[3:] if line.strip()}
    assert rows["timed"][1:4] == ["5", "50%", "(2/4)"]
    assert rows["total"][1] == "8"
    assert "API posting is off" in result.stdout


def test_stats_since_excludes(store: dict[str, Any]) -> None:
    """--since 150m counts only the runs that started in the last 150 minutes."""
    result = run_cli("stats", "--since", "150m", "--agent", "timed", data_dir=store["dir"])

    row = result.stdout.splitlines()[3].split()
    assert row[:2] == ["timed", "2"]


def test_stats_empty_window(store: dict[str, Any]) -> None:
    """A window without runs prints "no runs that started since ..." and exits 0."""
    result = run_cli("stats", "--since", "2999-01-01", data_dir=store["dir"])

    assert result.returncode == 0
    assert result.stdout.startswith("no runs that started since 2999-01-01")


def test_stats_since_and_all(store: dict[str, Any]) -> None:
    """--since and --all together are a usage error."""
    result = run_cli("stats", "--since", "1d", "--all", data_dir=store["dir"])

    assert result.returncode == 2
    assert_one_line_error(result.stderr, "--all")


# -- export ---------------------------------------------------------------------------------


def test_export_ndjson_stdout(store: dict[str, Any]) -> None:
    """export writes one JSON object per run, the same records as runs --json."""
    listed = run_json("runs", "--limit", "1000", data_dir=store["dir"])

    result = run_cli("export", data_dir=store["dir"])

    assert result.returncode == 0, result.stderr
    exported = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert exported == listed


def test_export_csv_file(store: dict[str, Any], tmp_path: Path) -> None:
    """--output runs.csv writes CSV with a header of the fields, privately, with no temp file."""
    target = tmp_path / "runs.csv"

    result = run_cli("export", "--agent", "stdlib-audit", "--output", target, data_dir=store["dir"])

    assert result.returncode == 0, result.stderr
    assert "exported 3 runs" in result.stderr
    assert os.listdir(tmp_path) == ["runs.csv"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    rows = list(csv.DictReader(io.StringIO(target.read_text(encoding="utf-8"), newline="")))
    assert list(rows[0]) == RUN_FIELDS
    assert [row["run_id"] for row in rows] == list(reversed(store["audit_ids"]))
    failed = rows[1]
    assert orjson.loads(failed["metrics_json"]) == {"files": 3, "sizes": [10, 20]}
    assert failed["api_posted"] == "false"
    assert failed["parent_run_id"] == ""
    assert failed["error_summary"] == "'" + FORMULA


def test_export_allow_formulas(store: dict[str, Any]) -> None:
    """--allow-formulas writes a text cell that starts with = unchanged."""
    result = run_cli(
        "export", "--format", "csv", "--status", "failed", "--agent", "stdlib-audit",
        "--allow-formulas", data_dir=store["dir"],
    )  # fmt: skip

    rows = list(csv.DictReader(io.StringIO(result.stdout, newline="")))
    assert rows[0]["error_summary"] == FORMULA


def test_export_json_is_ndjson(store: dict[str, Any], tmp_path: Path) -> None:
    """--json writes NDJSON even to a file named .csv, and --limit caps the runs."""
    target = tmp_path / "runs.csv"

    result = run_cli(
        "export", "--agent", "timed", "--json", "--limit", "2", "-o", target,
        data_dir=store["dir"],
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    lines = target.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    assert [orjson.loads(line)["run_id"] for line in lines] == ["timed-5", "timed-4"]


def test_export_output_dash_is_stdout(store: dict[str, Any]) -> None:
    """--output - writes the export to stdout, with no summary line."""
    result = run_cli("export", "--agent", "archive", "--format", "csv", "-o", "-",
                     data_dir=store["dir"])  # fmt: skip

    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout, newline="")))
    assert [row["run_id"] for row in rows] == ["old-2", "old-1"]
    assert "exported" not in result.stderr


def test_export_until(store: dict[str, Any]) -> None:
    """--until leaves out the runs that started at or after it."""
    result = run_cli("export", "--agent", "archive", "--until", "2020-03-02", data_dir=store["dir"])

    assert result.returncode == 0, result.stderr
    assert [orjson.loads(line)["run_id"] for line in result.stdout.splitlines()] == ["old-1"]


def test_export_json_with_csv(store: dict[str, Any]) -> None:
    """--json together with --format csv is a usage error."""
    result = run_cli("export", "--json", "--format", "csv", data_dir=store["dir"])

    assert result.returncode == 2
    assert_one_line_error(result.stderr, "--json", "--format")


def test_export_missing_directory(store: dict[str, Any], tmp_path: Path) -> None:
    """An --output in a missing directory exits 1 with one line naming the file."""
    target = tmp_path / "missing" / "runs.csv"

    result = run_cli("export", "-o", target, data_dir=store["dir"])

    assert result.returncode == 1
    assert_one_line_error(result.stderr, str(target))


def test_export_failure_keeps_file(corrupt_row_store: Path, tmp_path: Path) -> None:
    """A failed export leaves the existing --output file as it was, and no temporary file."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "runs.ndjson"
    target.write_text("previous export\n")

    result = run_cli("export", "-o", target, data_dir=corrupt_row_store)

    assert result.returncode == 1
    assert_one_line_error(result.stderr, "telemetry rebuild")
    assert target.read_text() == "previous export\n"
    assert os.listdir(out_dir) == ["runs.ndjson"]


def test_export_through_symlink(store: dict[str, Any], tmp_path: Path) -> None:
    """An --output that is a symbolic link stays a link, to a file with the export."""
    target = tmp_path / "exports" / "runs.ndjson"
    target.parent.mkdir()
    link = tmp_path / "latest.ndjson"
    link.symlink_to(target)

    result = run_cli("export", "--agent", "archive", "-o", link, data_dir=store["dir"])

    assert result.returncode == 0, result.stderr
    assert link.is_symlink()
    assert len(target.read_text(encoding="utf-8").splitlines()) == 2


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_export_to_named_pipe(store: dict[str, Any], tmp_path: Path) -> None:
    """An --output that is a named pipe is written directly, not replaced by a file."""
    pipe = tmp_path / "runs.pipe"
    os.mkfifo(pipe)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(pipe.read_bytes()), daemon=True)
    reader.start()

    result = run_cli("export", "--agent", "archive", "-o", pipe, data_dir=store["dir"])
    reader.join(timeout=30)

    assert result.returncode == 0, result.stderr
    assert stat.S_ISFIFO(pipe.stat().st_mode)
    assert len(received[0].splitlines()) == 2


# -- config ---------------------------------------------------------------------------------


def test_config_sources(tmp_path: Path) -> None:
    """config shows each setting's value, source and variable, with the token masked."""
    environment = {"TELEMETRY_API_TOKEN": TOKEN, "TELEMETRY_TIMEOUT": "4.5"}

    result = run_cli("config", data_dir=tmp_path, env=environment)

    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert rows["data_dir"] == ["data_dir", str(tmp_path), "argument", "TELEMETRY_DATA_DIR"]
    assert rows["timeout"] == ["timeout", "4.5", "environment", "TELEMETRY_TIMEOUT"]
    assert rows["max_retries"] == ["max_retries", "3", "default", "TELEMETRY_MAX_RETRIES"]
    assert rows["api_token"][1] == "***"
    assert TOKEN not in result.stdout + result.stderr


def test_config_json(tmp_path: Path) -> None:
    """config --json lists the settings, masks the token and any URL password."""
    environment = {
        "TELEMETRY_API_TOKEN": TOKEN,
        "TELEMETRY_API_URL": f"http://user:{TOKEN}@127.0.0.1:9/runs",
    }

    result = run_cli("config", "--json", data_dir=tmp_path, env=environment)

    assert result.returncode == 0, result.stderr
    assert TOKEN not in result.stdout + result.stderr
    settings = {item["name"]: item for item in orjson.loads(result.stdout)["settings"]}
    assert settings["api_token"]["value"] == "***"
    assert settings["api_url"]["value"] == "http://user:***@127.0.0.1:9/runs"
    assert settings["data_dir"]["value"] == str(tmp_path)
    assert settings["api_url"]["source"] == "environment"


def test_config_invalid_variables(tmp_path: Path) -> None:
    """Invalid variables are listed with "default used" and exit 1; unknown ones are named."""
    environment = {
        "TELEMETRY_MAX_RETRIES": "lots",
        "TELEMETRY_API_TOKEN": TOKEN + " with spaces",
        "TELEMETRY_DATADIR": "/typo",
    }

    result = run_cli("config", data_dir=tmp_path, env=environment)

    assert result.returncode == 1
    assert "invalid TELEMETRY_MAX_RETRIES='lots': expected an integer; default used" in (
        result.stdout
    )
    assert "invalid TELEMETRY_API_TOKEN='***'" in result.stdout
    assert "TELEMETRY_DATADIR" in result.stdout
    assert TOKEN not in result.stdout + result.stderr
    assert result.stderr == ""


def test_config_invalid_json(tmp_path: Path) -> None:
    """config --json reports invalid and unknown variables, and exits 1."""
    environment = {"TELEMETRY_DURABILITY": "sometimes", "TELEMETRY_DATADIR": "/typo"}

    result = run_cli("config", "--json", data_dir=tmp_path, env=environment)

    assert result.returncode == 1
    report = orjson.loads(result.stdout)
    assert [item["variable"] for item in report["invalid_variables"]] == ["TELEMETRY_DURABILITY"]
    assert report["unknown_variables"] == ["TELEMETRY_DATADIR"]


# -- command line ---------------------------------------------------------------------------


def test_data_dir_before_command(store: dict[str, Any]) -> None:
    """--data-dir is accepted before the subcommand too."""
    result = run_cli("--data-dir", store["dir"], "runs", "--agent", "archive")

    assert result.returncode == 0, result.stderr
    assert run_ids_in(result.stdout) == ["old-2", "old-1"]


def test_data_dir_after_wins(store: dict[str, Any], tmp_path: Path) -> None:
    """Given before and after the subcommand, the later --data-dir is used."""
    result = run_cli("--data-dir", tmp_path, "runs", "--agent", "archive", data_dir=store["dir"])

    assert result.returncode == 0, result.stderr
    assert run_ids_in(result.stdout) == ["old-2", "old-1"]


def test_version_option() -> None:
    """--version prints the package version and exits 0."""
    result = run_cli("--version")

    assert result.returncode == 0
    assert result.stdout.strip() == f"telemetry {telemetry.__version__}"


def test_extra_argument_names_command(store: dict[str, Any]) -> None:
    """An unexpected argument after show RUN_ID is reported by "telemetry show"."""
    result = run_cli("show", store["audit_ids"][0], "extra", data_dir=store["dir"])

    assert result.returncode == 2
    assert_one_line_error(result.stderr, "telemetry show: unrecognized arguments: extra")


@pytest.mark.parametrize(
    "arguments",
    [["show", "\udcff"], ["runs", "--agent", "\udcff"], ["stats", "--agent", "x\udcff"]],
)
def test_non_utf8_argument(store: dict[str, Any], arguments: list[str]) -> None:
    """An agent name or run id that is not UTF-8 is a usage error that shows its bytes."""
    result = run_cli(*arguments, data_dir=store["dir"])

    assert result.returncode == 2
    assert_one_line_error(result.stderr, f"telemetry {arguments[0]}:", "\\xff", "not valid UTF-8")


@pytest.mark.parametrize(
    ("command", "options", "named"),
    [
        ("runs", ["--limit", "9223372036854775808"], "9223372036854775807 at most"),
        ("runs", ["--limit", "99999999999999999999999"], "9223372036854775807 at most"),
        ("runs", ["--limit", "9" * 5000], "9223372036854775807 at most"),
        ("export", ["--limit", "9223372036854775808"], "9223372036854775807 at most"),
        ("tail", ["--lines", "9223372036854775808"], "1000000 at most"),
    ],
)
def test_huge_counts_rejected(
    store: dict[str, Any], command: str, options: list[str], named: str
) -> None:
    """A count larger than SQLite or the backlog can take is a one-line usage error."""
    result = run_cli(command, *options, data_dir=store["dir"])

    assert result.returncode == 2
    assert_one_line_error(result.stderr, f"telemetry {command}:", named)


def test_runs_largest_limit(store: dict[str, Any]) -> None:
    """--limit 9223372036854775807, SQLite's largest integer, lists every run."""
    runs = run_json("runs", "--agent", "archive", "--limit", "9223372036854775807",
                    data_dir=store["dir"])  # fmt: skip

    assert [run["run_id"] for run in runs] == ["old-2", "old-1"]


@pytest.mark.parametrize("command", ["runs", "export"])
def test_until_before_since(store: dict[str, Any], command: str) -> None:
    """An --until that is not later than --since is a usage error naming both."""
    result = run_cli(command, "--since", "1h", "--until", "2d", data_dir=store["dir"])

    assert result.returncode == 2
    assert_one_line_error(result.stderr, f"telemetry {command}:", "--until", "--since")


def test_runs_limit_note_singular(store: dict[str, Any]) -> None:
    """The note for --limit 1 is in the singular."""
    result = run_cli("runs", "--limit", "1", data_dir=store["dir"])

    assert result.stderr.startswith("the newest run is shown; more match")


def test_export_count_singular(store: dict[str, Any], tmp_path: Path) -> None:
    """The summary of an export of one run is in the singular."""
    target = tmp_path / "one.ndjson"

    result = run_cli("export", "--limit", "1", "-o", target, data_dir=store["dir"])

    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(f"exported 1 run to {target}")


def test_db_path_is_directory(tmp_path: Path) -> None:
    """A TELEMETRY_DB_PATH that names a directory gets a message saying so."""
    result = run_cli("runs", data_dir=tmp_path, env={"TELEMETRY_DB_PATH": str(tmp_path)})

    assert result.returncode == 1
    assert_one_line_error(result.stderr, f"{tmp_path} is a directory", "TELEMETRY_DB_PATH")


def test_newer_index_names_setting(tmp_path: Path) -> None:
    """The error for a newer schema names the TELEMETRY_DB_PATH variable."""
    load(tmp_path, old_runs())
    with sqlite3.connect(tmp_path / "telemetry.db") as connection:
        connection.execute("PRAGMA user_version = 99")
    connection.close()

    result = run_cli("stats", data_dir=tmp_path)

    assert result.returncode == 1
    assert_one_line_error(result.stderr, "TELEMETRY_DB_PATH")


# -- export into the store --------------------------------------------------------------------


@pytest.fixture
def live_store(tmp_path: Path) -> Path:
    """Return a store with three client runs and their journal, for writes that must fail."""
    record_client_runs(tmp_path)
    return tmp_path


def store_files(data_dir: Path) -> dict[str, bytes]:
    """Return the content of every file in the store, by path relative to it."""
    return {
        str(path.relative_to(data_dir)): path.read_bytes()
        for path in sorted(data_dir.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize(
    "target",
    [
        "journal/events_20260101.ndjson",
        "journal/new.csv",
        "telemetry.db",
        "telemetry.db-wal",
        "telemetry.db-shm",
        "telemetry.db.bak",
        "telemetry.db.bak.1",
    ],
)
def test_export_into_store_rejected(live_store: Path, target: str) -> None:
    """--output at the journal, the index or its own files exits 2 and changes nothing."""
    journal_file = next((live_store / "journal").iterdir())
    target = target.replace("events_20260101.ndjson", journal_file.name)
    before = store_files(live_store)

    result = run_cli("export", "-o", live_store / target, data_dir=live_store)

    assert result.returncode == 2
    assert_one_line_error(result.stderr, "telemetry export:", "--output")
    assert store_files(live_store) == before


def test_export_symlink_to_index_rejected(
    live_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A symbolic link elsewhere that points at the index is rejected too."""
    link = tmp_path_factory.mktemp("links") / "runs.ndjson"
    link.symlink_to(live_store / "telemetry.db")
    before = store_files(live_store)

    result = run_cli("export", "-o", link, data_dir=live_store)

    assert result.returncode == 2
    assert store_files(live_store) == before


def test_export_beside_index_allowed(live_store: Path) -> None:
    """A file of another name in the store's directory is a valid --output."""
    result = run_cli("export", "-o", live_store / "runs.csv", data_dir=live_store)

    assert result.returncode == 0, result.stderr
    assert (live_store / "runs.csv").exists()


# -- read-only stores --------------------------------------------------------------------------


OWNER = 40001
OTHER = 40002

needs_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="switching users needs root"
)


def in_child_as(uid: int, action: Callable[[], int]) -> int:
    """Call ``action`` in a forked child running as ``uid`` and return its exit code."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 70
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            code = action()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def run_cli_as(
    uid: int, *args: str | os.PathLike[str], env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Run the command in a forked child as ``uid``; return its exit code, stdout and stderr.

    The tests run as root, so the child cannot exec the test's interpreter as another user
    when it is installed in root's home. It calls main() instead, with TELEMETRY_*
    variables removed, as run_cli does, and ``env`` added.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:

        def command() -> int:
            for name in [name for name in os.environ if name.startswith("TELEMETRY_")]:
                del os.environ[name]
            os.environ.update(env or {})
            sys.stdout = io.TextIOWrapper(os.fdopen(os.dup(out.fileno()), "wb"), "utf-8")
            sys.stderr = io.TextIOWrapper(os.fdopen(os.dup(err.fileno()), "wb"), "utf-8")
            try:
                return main([os.fspath(arg) for arg in args])
            finally:
                sys.stdout.flush()
                sys.stderr.flush()

        code = in_child_as(uid, command)
        out.seek(0)
        err.seek(0)
        return code, out.read().decode("utf-8"), err.read().decode("utf-8")


@pytest.fixture
def shared_store() -> Iterator[Path]:
    """Yield a store of OWNER's with three client runs, in a directory others may enter."""
    base = Path(tempfile.mkdtemp(prefix="telemetry-cli-ro-"))
    base.chmod(0o755)
    data_dir = base / "store"
    record_client_runs(data_dir)
    yield data_dir
    shutil.rmtree(base, ignore_errors=True)


def give_to_owner(data_dir: Path, *, directory_mode: int, file_mode: int) -> None:
    """Make OWNER own the store and everything in it, with the given modes."""
    for path in [data_dir, *data_dir.rglob("*")]:
        os.chown(path, OWNER, OWNER)
        path.chmod(directory_mode if path.is_dir() else file_mode)


def owners(data_dir: Path) -> dict[str, int]:
    """Return the owner uid of each entry of the store, by path relative to it."""
    return {str(path.relative_to(data_dir)): path.stat().st_uid for path in data_dir.rglob("*")}


@needs_root
@pytest.mark.parametrize(
    "command", [["runs"], ["stats", "--all"], ["export"], ["show", "FIRST_RUN"]]
)
def test_read_commands_other_user(shared_store: Path, command: list[str]) -> None:
    """Another user reads a store of modes 0755 and 0644, and leaves no file behind."""
    run_id = run_json("runs", "--limit", "1", data_dir=shared_store)[0]["run_id"]
    arguments = [run_id if part == "FIRST_RUN" else part for part in command]
    give_to_owner(shared_store, directory_mode=0o755, file_mode=0o644)
    before = owners(shared_store)

    code, out, err = run_cli_as(OTHER, *arguments, "--data-dir", shared_store)

    assert code == 0, err
    assert run_id in out or command[0] == "stats"
    assert owners(shared_store) == before


@needs_root
@pytest.mark.parametrize("command", [["check"], ["prune", "--older-than", "30d", "--dry-run"]])
def test_check_and_dry_run_other_user(shared_store: Path, command: list[str]) -> None:
    """check and a dry-run prune only read, so another user can run them on the store."""
    give_to_owner(shared_store, directory_mode=0o755, file_mode=0o644)
    before = owners(shared_store)

    code, _, err = run_cli_as(OTHER, *command, "--data-dir", shared_store)

    assert code == 0, err
    assert "permission" not in err
    assert owners(shared_store) == before


@needs_root
def test_read_keeps_owner_writing(shared_store: Path) -> None:
    """After another user read a store in a world-writable directory, its owner still writes."""
    give_to_owner(shared_store, directory_mode=0o777, file_mode=0o644)
    code, _, err = run_cli_as(OTHER, "runs", "--data-dir", shared_store)
    assert code == 0, err

    def record() -> int:
        with DatabaseWriter(shared_store / "telemetry.db") as index:
            return 0 if index.insert_run(loaded_run("owner-1", "owner", OLD_START)) else 1

    assert in_child_as(OWNER, record) == 0
    assert set(owners(shared_store).values()) == {OWNER}


@needs_root
def test_read_permission_denied(shared_store: Path) -> None:
    """An index that the user may not read is a permission fault, not damage to rebuild."""
    give_to_owner(shared_store, directory_mode=0o755, file_mode=0o600)

    code, _, err = run_cli_as(OTHER, "runs", "--data-dir", shared_store)

    assert code == 1
    assert_one_line_error(err, "cannot open the index", "read-only: permission denied",
                          "store's owner (uid 40001)")  # fmt: skip
    assert "rebuild" not in err


@needs_root
def test_write_permission_denied(shared_store: Path) -> None:
    """A command that writes, on an index the user may only read, names the permission."""
    give_to_owner(shared_store, directory_mode=0o755, file_mode=0o644)
    before = owners(shared_store)
    env = {"TELEMETRY_API_URL": "http://127.0.0.1:9/runs"}

    code, _, err = run_cli_as(OTHER, "flush", "--data-dir", shared_store, env=env)

    assert code == 1
    assert_one_line_error(err, "cannot open the index", "for writing: permission denied",
                          "store's owner")  # fmt: skip
    assert "rebuild" not in err
    assert owners(shared_store) == before


@needs_root
def test_read_only_directory(shared_store: Path) -> None:
    """The owner reads a store whose directory is not writable, without creating files."""
    give_to_owner(shared_store, directory_mode=0o555, file_mode=0o444)
    before = owners(shared_store)

    code, out, err = run_cli_as(OWNER, "runs", "--data-dir", shared_store)

    assert code == 0, err
    assert "stdlib-audit" in out
    assert owners(shared_store) == before


def test_runs_empty_index_not_migrated(tmp_path: Path) -> None:
    """runs does not migrate an empty index file, and prints how to migrate it."""
    index = tmp_path / "telemetry.db"
    index.touch()

    result = run_cli("runs", data_dir=tmp_path)

    assert result.returncode == 1
    assert_one_line_error(result.stderr, "schema version 0", "open it once for writing")
    assert index.stat().st_size == 0


# -- help -----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["runs", "show", "stats", "export", "config"])
def test_help_has_example(capsys: pytest.CaptureFixture[str], command: str) -> None:
    """Each subcommand's --help has a description and an example."""
    code = main([command, "--help"])
    output = capsys.readouterr().out

    assert code == 0
    assert "example" in output
    assert f"telemetry {command}" in output.split("example")[-1]
