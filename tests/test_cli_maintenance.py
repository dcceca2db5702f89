"""``telemetry flush`` and ``telemetry check``, run in subprocesses on stores of the library."""

from __future__ import annotations

import dataclasses
import datetime
import os
import pty
import select
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from cli_support import command_environment, run_cli, run_json
from http_server import ScriptedServer
from tmpfs_support import fill_file_system, mounted_tmpfs

from telemetry import TelemetryClient, TelemetryConfig
from telemetry.cli import _check, main
from telemetry.cli._context import CommandContext
from telemetry.consistency import Consistency
from telemetry.database import DatabaseWriter
from telemetry.journal import JournalReader
from telemetry.models import RunRecord, generate_run_id, get_iso8601_timestamp
from telemetry.ndjson import NDJSONWriter
from telemetry.stale import AbandonResult, StaleRun

TOKEN = "tok-3f9a2c1b7d4e5a60-secret"
WAIT_SECONDS = 20.0

# Starts a run through the real client, prints its run id, then waits to be killed.
RUN_FOREVER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from telemetry import TelemetryClient, TelemetryConfig

    client = TelemetryClient(TelemetryConfig(data_dir=sys.argv[1], environ={}))
    run_id = client.start_run("doomed-agent", "test")
    print(run_id, flush=True)
    time.sleep(600)
    """
)


def make_client(data_dir: Path, **settings: Any) -> TelemetryClient:
    """Return a client of the store in ``data_dir`` that ignores the environment."""
    return TelemetryClient(TelemetryConfig(data_dir=data_dir, environ={}, **settings))


def record_runs(data_dir: Path, count: int, agent_name: str = "batch-agent") -> list[str]:
    """Record ``count`` ended runs with one event each, and return their ids."""
    run_ids = []
    with make_client(data_dir) as client:
        for number in range(count):
            run_id = client.start_run(agent_name, "test")
            client.log_event(run_id, "item_done", {"number": number})
            client.end_run(run_id, "success", items_succeeded=number)
            run_ids.append(run_id)
    return run_ids


def api_env(server: ScriptedServer, **extra: str) -> dict[str, str]:
    """Return the variables that point the command at ``server``, with the token."""
    return {"TELEMETRY_API_URL": server.url, "TELEMETRY_API_TOKEN": TOKEN, **extra}


def pending_posts(data_dir: Path) -> int:
    with DatabaseWriter(data_dir / "telemetry.db") as index:
        return index.count_pending_api_posts()


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr


# -- flush ------------------------------------------------------------------------------------


def test_flush_posts_pending(tmp_path: Path, api_server: ScriptedServer) -> None:
    """Every pending run is posted, and the summary counts them."""
    run_ids = record_runs(tmp_path, 3)

    result = run_cli("flush", data_dir=tmp_path, env=api_env(api_server))
    posted_ids = {request.json()["run_id"] for request in api_server.requests}

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "posted 3, failed 0, still pending 0"
    assert posted_ids == set(run_ids)
    assert pending_posts(tmp_path) == 0
    assert_no_traceback(result)


def test_flush_json_and_limit(tmp_path: Path, api_server: ScriptedServer) -> None:
    """--limit posts only the oldest runs, and --json prints the summary as an object."""
    run_ids = record_runs(tmp_path, 3)

    summary = run_json("flush", "--limit", "2", data_dir=tmp_path, env=api_env(api_server))
    posted_ids = [request.json()["run_id"] for request in api_server.requests]

    assert summary == {
        "posted": 2,
        "failed": 0,
        "not_tried": 0,
        "still_pending": 1,
        "stopped_reason": None,
    }
    assert posted_ids == run_ids[:2]


def test_flush_server_error(tmp_path: Path, api_server: ScriptedServer) -> None:
    """Posts that get a 500 response count as failed, exit 1, and the token is not shown."""
    record_runs(tmp_path, 2)
    api_server.respond(500, body=f'{{"error": "token {TOKEN} rejected"}}'.encode(), times=10)
    env = api_env(api_server, TELEMETRY_MAX_RETRIES="0")

    result = run_cli("flush", data_dir=tmp_path, env=env)

    assert result.returncode == 1
    assert "posted 0, failed 2, still pending 2" in result.stdout
    assert TOKEN not in result.stdout
    assert TOKEN not in result.stderr
    assert_no_traceback(result)


def test_flush_sends_token_unprinted(tmp_path: Path, api_server: ScriptedServer) -> None:
    """The token goes to the API in the Authorization header, and never to the output."""
    record_runs(tmp_path, 1)

    result = run_cli("flush", "--json", data_dir=tmp_path, env=api_env(api_server))

    assert api_server.requests[0].headers["authorization"] == f"Bearer {TOKEN}"
    assert TOKEN not in result.stdout + result.stderr


def test_flush_timeout_leaves_runs(tmp_path: Path, api_server: ScriptedServer) -> None:
    """No post starts after --timeout: the runs not tried stay pending, and exit is 1."""
    record_runs(tmp_path, 2)
    api_server.hang()
    env = api_env(api_server, TELEMETRY_MAX_RETRIES="0")

    result = run_cli("flush", "--timeout", "0.5", "--json", data_dir=tmp_path, env=env)
    summary = orjson.loads(result.stdout)

    assert result.returncode == 1
    assert summary == {
        "posted": 0,
        "failed": 1,
        "not_tried": 1,
        "still_pending": 2,
        "stopped_reason": None,
    }
    assert_no_traceback(result)


def test_flush_without_api_url(tmp_path: Path) -> None:
    """Without TELEMETRY_API_URL, flush exits 1 with one line that names the variable."""
    record_runs(tmp_path, 1)

    result = run_cli("flush", data_dir=tmp_path)

    assert result.returncode == 1
    assert "TELEMETRY_API_URL is not set" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_flush_invalid_api_url(tmp_path: Path) -> None:
    """An invalid TELEMETRY_API_URL is called invalid, not unset, with its password masked."""
    record_runs(tmp_path, 1)
    env = {"TELEMETRY_API_URL": "ftp://user:hunter2@127.0.0.1/runs"}

    result = run_cli("flush", data_dir=tmp_path, env=env)
    error_line = result.stderr.splitlines()[-1]

    assert result.returncode == 1
    assert "TELEMETRY_API_URL is invalid" in error_line
    assert "expected an http:// or https:// URL" in error_line
    assert "not set" not in result.stderr
    assert "hunter2" not in result.stderr
    assert_no_traceback(result)


def test_flush_stops_when_token_rejected(tmp_path: Path, api_server: ScriptedServer) -> None:
    """After a 401, flush posts no further run, prints why, and exits 1."""
    record_runs(tmp_path, 5)
    api_server.respond(401, body=f'{{"error": "token {TOKEN} expired"}}'.encode(), times=5)
    env = api_env(api_server, TELEMETRY_MAX_RETRIES="0")

    result = run_cli("flush", data_dir=tmp_path, env=env)

    assert result.returncode == 1
    assert len(api_server.requests) == 1
    assert result.stdout.strip() == (
        "posted 0, failed 1, still pending 5; stopped after 1 of 5 runs, because the API "
        "rejected the credentials (HTTP 401)"
    )
    assert "check api_token" in result.stderr
    assert TOKEN not in result.stdout + result.stderr
    assert_no_traceback(result)


def test_flush_json_stopped_reason(
    tmp_path: Path, free_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--json gives the reason when 3 posts in a row find nothing listening, and exits 1."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    record_runs(tmp_path, 5)
    env = {
        "TELEMETRY_API_URL": f"http://127.0.0.1:{free_port}/runs",
        "TELEMETRY_MAX_RETRIES": "0",
        "TELEMETRY_TIMEOUT": "0.5",
    }

    result = run_cli("flush", "--json", data_dir=tmp_path, env=env)
    summary = orjson.loads(result.stdout)

    assert result.returncode == 1
    assert summary["posted"] == 0
    assert summary["failed"] == 3
    assert summary["not_tried"] == 2
    assert summary["still_pending"] == 5
    assert summary["stopped_reason"].startswith("3 posts in a row could not reach the API (")
    assert "ConnectError" in summary["stopped_reason"]
    assert_no_traceback(result)


def test_flush_nothing_pending(tmp_path: Path, api_server: ScriptedServer) -> None:
    """With nothing pending, flush posts nothing and exits 0."""
    with make_client(tmp_path) as client:
        client.start_run("still-running", "test")
        result = run_cli("flush", data_dir=tmp_path, env=api_env(api_server))

    assert result.returncode == 0
    assert result.stdout.strip() == "posted 0, failed 0, still pending 0"
    assert api_server.requests == []


def test_flush_telemetry_disabled(tmp_path: Path, api_server: ScriptedServer) -> None:
    """TELEMETRY_ENABLED=false stops agents from recording, not flush from posting."""
    run_ids = record_runs(tmp_path, 2)
    env = api_env(api_server, TELEMETRY_ENABLED="false")

    result = run_cli("flush", data_dir=tmp_path, env=env)
    posted_ids = {request.json()["run_id"] for request in api_server.requests}

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "posted 2, failed 0, still pending 0"
    assert posted_ids == set(run_ids)


def test_flush_runs_posted_meanwhile(
    tmp_path: Path,
    api_server: ScriptedServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Runs that another process posts between the count and the flush are no failure."""
    record_runs(tmp_path, 2)
    for name in [name for name in os.environ if name.startswith("TELEMETRY_")]:
        monkeypatch.delenv(name)
    for name, value in api_env(api_server).items():
        monkeypatch.setenv(name, value)
    other_flush: list[subprocess.CompletedProcess[str]] = []
    original_client = CommandContext.client

    def client_after_other_flush(context: CommandContext) -> TelemetryClient:
        # flush has counted the pending runs; now another process posts them all.
        if not other_flush:
            other_flush.append(run_cli("flush", data_dir=tmp_path, env=api_env(api_server)))
        return original_client(context)

    monkeypatch.setattr(CommandContext, "client", client_after_other_flush)

    code = main(["flush", "--json", "--data-dir", str(tmp_path)])
    summary = orjson.loads(capsys.readouterr().out)

    assert other_flush[0].returncode == 0, other_flush[0].stderr
    assert code == 0
    assert summary == {
        "posted": 0,
        "failed": 0,
        "not_tried": 0,
        "still_pending": 0,
        "stopped_reason": None,
    }
    assert len(api_server.requests) == 2


@pytest.mark.parametrize("timeout", ["0", "-5", "soon", "nan"])
def test_flush_invalid_timeout(tmp_path: Path, timeout: str) -> None:
    """A --timeout that is not a positive duration is a usage error."""
    result = run_cli("flush", "--timeout", timeout, data_dir=tmp_path)

    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1


def run_in_terminal(
    args: list[str], env: dict[str, str], timeout: float = WAIT_SECONDS
) -> tuple[int, str]:
    """Run ``python -m telemetry ARGS`` on a pseudo-terminal; return its exit code and output."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "telemetry", *args],
        env=command_environment(env),
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
    )
    os.close(terminal)
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], deadline - time.monotonic())
            if not ready:
                continue
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO on Linux: the process closed its end of the terminal
                break
            if not chunk:
                break
            output += chunk
        code = process.wait(WAIT_SECONDS)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(WAIT_SECONDS)
        os.close(controller)
    return code, output.decode("utf-8", "replace")


def test_flush_progress_bar_on_terminal(tmp_path: Path, api_server: ScriptedServer) -> None:
    """On a terminal, flush redraws a progress bar in place with carriage returns."""
    record_runs(tmp_path, 3)

    code, output = run_in_terminal(["flush", "--data-dir", str(tmp_path)], env=api_env(api_server))

    assert code == 0, output
    assert "\rposting [" in output
    assert "] 3/3" in output
    assert "posted 3, failed 0, still pending 0" in output
    assert TOKEN not in output


def test_flush_plain_progress_off_terminal(tmp_path: Path, api_server: ScriptedServer) -> None:
    """Off a terminal, progress is plain lines without carriage returns."""
    record_runs(tmp_path, 2)

    result = run_cli("flush", data_dir=tmp_path, env=api_env(api_server))

    assert "posting: 2/2" in result.stderr.splitlines()
    assert "\r" not in result.stderr


def test_flush_log_line_above_bar(tmp_path: Path, api_server: ScriptedServer) -> None:
    """On a terminal, an error logged while the bar is drawn starts a line of its own."""
    record_runs(tmp_path, 2)
    api_server.respond(201)  # the first post succeeds, so the bar shows 1/2
    api_server.respond(500)
    env = api_env(api_server, TELEMETRY_MAX_RETRIES="0")

    code, output = run_in_terminal(["flush", "--data-dir", str(tmp_path)], env=env)

    assert code == 1, output
    assert "] 1/2\r\x1b[Ktelemetry: ERROR:" in output
    assert output.count("] 2/2") == 1
    assert "posted 1, failed 1, still pending 1" in output


def test_flush_huge_limit(tmp_path: Path) -> None:
    """A --limit beyond SQLite's largest integer is a one-line usage error."""
    result = run_cli("flush", "--limit", "99999999999999999999999", data_dir=tmp_path,
                     env={"TELEMETRY_API_URL": "http://127.0.0.1:9/runs"})  # fmt: skip

    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert "9223372036854775807 at most" in result.stderr


def test_flush_largest_limit(tmp_path: Path, api_server: ScriptedServer) -> None:
    """--limit 9223372036854775807 posts every pending run."""
    record_runs(tmp_path, 2)

    summary = run_json("flush", "--limit", "9223372036854775807", data_dir=tmp_path,
                       env=api_env(api_server))  # fmt: skip

    assert summary == {
        "posted": 2,
        "failed": 0,
        "not_tried": 0,
        "still_pending": 0,
        "stopped_reason": None,
    }


# -- check ------------------------------------------------------------------------------------


def read_line_from(process: subprocess.Popen[bytes]) -> str:
    """Return the first line ``process`` prints, or fail after WAIT_SECONDS."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], WAIT_SECONDS)
    assert ready, f"no output from the process in {WAIT_SECONDS} s"
    line = process.stdout.readline().decode("utf-8").strip()
    assert line, "the process ended without printing a line"
    return line


def test_check_clean_store(tmp_path: Path) -> None:
    """A store written by the client alone passes every check with exit 0."""
    record_runs(tmp_path, 2)

    result = run_cli("check", data_dir=tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == "No problems found."
    assert "Index integrity: ok" in result.stdout
    assert_no_traceback(result)


def start_killed_run(data_dir: Path) -> tuple[str, int]:
    """Start a run in an agent process, kill the process with SIGKILL; return (run id, pid)."""
    process = subprocess.Popen(
        [sys.executable, "-c", RUN_FOREVER_SCRIPT, str(data_dir)],
        env=command_environment(),
        stdout=subprocess.PIPE,
    )
    try:
        run_id = read_line_from(process)
    finally:
        process.kill()
        process.wait(WAIT_SECONDS)
        if process.stdout is not None:
            process.stdout.close()
    return run_id, process.pid


def test_check_stale_run_of_killed_process(tmp_path: Path) -> None:
    """A run whose process died of SIGKILL is stale, and --repair ends it as abandoned."""
    run_id, pid = start_killed_run(tmp_path)

    found = run_cli("check", data_dir=tmp_path)
    repaired = run_cli("check", "--repair", data_dir=tmp_path)
    again = run_cli("check", data_dir=tmp_path)
    with DatabaseWriter(tmp_path / "telemetry.db") as index:
        row = index.get_run(run_id)
    assert row is not None
    journal = JournalReader(tmp_path / "journal").run_records(run_id, row.start_time)

    assert found.returncode == 1
    assert "Stale runs (running, with the process gone or for longer than 1 d): 1" in found.stdout
    assert run_id in found.stdout
    assert "telemetry check --repair" in found.stdout
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "Marked 1 stale run abandoned." in repaired.stdout
    assert row.status == "abandoned"
    assert f"process {pid}" in (row.error_summary or "")
    assert journal[-1]["record_type"] == "run_end"
    assert journal[-1]["status"] == "abandoned"
    assert again.returncode == 0, again.stdout
    assert again.stdout.splitlines()[-1] == "No problems found."
    for result in (found, repaired, again):
        assert_no_traceback(result)


def make_record(agent_name: str, start: datetime.datetime, **fields: Any) -> RunRecord:
    """Return a record of a run that started at ``start``, as the client would write it."""
    started = get_iso8601_timestamp(start)
    return RunRecord(
        run_id=generate_run_id(agent_name),
        agent_name=agent_name,
        job_type="test",
        start_time=started,
        created_at=started,
        updated_at=started,
        **fields,
    )


def write_journal(data_dir: Path, record_type: str, record: RunRecord) -> None:
    writer = NDJSONWriter(data_dir / "journal")
    try:
        writer.append(record_type, record.to_dict())
    finally:
        writer.close()


def write_index(data_dir: Path, record: RunRecord) -> None:
    with DatabaseWriter(data_dir / "telemetry.db") as index:
        index.load_runs([record])


def record_old_running_run(data_dir: Path, hours_ago: int, hostname: str) -> RunRecord:
    """Journal and index a run of another host that started ``hours_ago`` and still runs."""
    start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=hours_ago)
    record = make_record("remote-agent", start, hostname=hostname, pid=4242)
    write_journal(data_dir, "run_start", record)
    write_index(data_dir, record)
    return record


def test_check_stale_after(tmp_path: Path) -> None:
    """A run of another host is stale when it runs longer than --stale-after, not before."""
    old = record_old_running_run(tmp_path, hours_ago=30, hostname="elsewhere-host")
    record_old_running_run(tmp_path, hours_ago=2, hostname="elsewhere-host")

    default = run_json_allowing_problems("check", data_dir=tmp_path)
    text = run_cli("check", data_dir=tmp_path)
    longer = run_cli("check", "--stale-after", "2d", data_dir=tmp_path)

    assert [stale["run_id"] for stale in default["stale_runs"]] == [old.run_id]
    assert default["stale_runs"][0]["hostname"] == "elsewhere-host"
    assert default["stale_after_seconds"] == 86400
    assert default["ok"] is False
    # The heading and the reason show the limit in the same form.
    assert "for longer than 1 d): 1" in text.stdout
    assert "the stale-after limit of 1 d" in default["stale_runs"][0]["reason"]
    assert longer.returncode == 0, longer.stdout


def test_check_repair_telemetry_disabled(tmp_path: Path) -> None:
    """TELEMETRY_ENABLED=false stops agents from recording, not --repair from ending runs."""
    stale = record_old_running_run(tmp_path, hours_ago=30, hostname="elsewhere-host")

    result = run_cli("check", "--repair", data_dir=tmp_path, env={"TELEMETRY_ENABLED": "false"})
    with DatabaseWriter(tmp_path / "telemetry.db") as index:
        row = index.get_run(stale.run_id)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "Marked 1 stale run abandoned." in result.stdout
    assert row is not None
    assert row.status == "abandoned"


def test_check_repair_takes_journaled_end(tmp_path: Path) -> None:
    """A stale run whose end is in the journal gets that end in the index, not abandoned."""
    stale = record_old_running_run(tmp_path, hours_ago=30, hostname="elsewhere-host")
    ended = dataclasses.replace(
        stale,
        status="failed",
        end_time=get_iso8601_timestamp(),
        duration_ms=1000,
        error_summary="ValueError: the real failure",
    )
    # The agent journaled its end and was killed before it updated the index.
    write_journal(tmp_path, "run_end", ended)

    result = run_cli("check", "--repair", data_dir=tmp_path)
    again = run_cli("check", data_dir=tmp_path)
    with DatabaseWriter(tmp_path / "telemetry.db") as index:
        row = index.get_run(stale.run_id)
    reader = JournalReader(tmp_path / "journal")
    lines = [line for file in reader.files() for line in reader.read(file.path).records]
    statuses = [line.get("status") for line in lines if line["run_id"] == stale.run_id]

    assert result.returncode == 0, result.stdout + result.stderr
    assert "Wrote the journaled end of 1 stale run into the index" in result.stdout
    assert f"  {stale.run_id}: failed" in result.stdout.splitlines()
    assert "Found 2 problems and repaired them all." in result.stdout
    assert row is not None
    assert row.status == "failed"
    assert row.error_summary == "ValueError: the real failure"
    assert "abandoned" not in statuses
    assert again.returncode == 0, again.stdout


def test_check_repair_json_restored(tmp_path: Path) -> None:
    """--json lists the runs whose journaled end the repair wrote into the index."""
    stale = record_old_running_run(tmp_path, hours_ago=30, hostname="elsewhere-host")
    ended = dataclasses.replace(stale, status="success", end_time=get_iso8601_timestamp())
    write_journal(tmp_path, "run_end", ended)

    result = run_cli("check", "--repair", "--json", data_dir=tmp_path)
    report = orjson.loads(result.stdout)

    assert result.returncode == 0, result.stdout + result.stderr
    assert report["restored_from_journal"] == [{"run_id": stale.run_id, "status": "success"}]
    assert report["repaired"] == 0
    assert report["ok"] is True


def run_json_allowing_problems(*args: str, data_dir: Path) -> Any:
    """Run the command with --json, expecting exit 1, and return the parsed output."""
    result = run_cli(*args, "--json", data_dir=data_dir)
    assert result.returncode == 1, result.stdout + result.stderr
    return orjson.loads(result.stdout)


def test_check_unreadable_lines(tmp_path: Path) -> None:
    """Unreadable journal lines are counted per file, reported once, with exit 1."""
    record_runs(tmp_path, 1)
    journal_file = next((tmp_path / "journal").iterdir())
    with open(journal_file, "ab") as file:
        file.write(b"{not json\n\x00\x01garbage\n")

    result = run_cli("check", data_dir=tmp_path)

    assert result.returncode == 1
    assert "Unreadable journal lines: 2 in 1 file" in result.stdout
    assert f"  {journal_file}: 2" in result.stdout.splitlines()
    assert "WARNING" not in result.stderr
    assert_no_traceback(result)


def test_check_index_and_journal_differ(tmp_path: Path) -> None:
    """Runs missing on either side, and status disagreements, are listed by run id."""
    _, changed = record_runs(tmp_path, 2)
    now = datetime.datetime.now(datetime.timezone.utc)
    index_only = make_record("index-agent", now, hostname="elsewhere-host")
    journal_only = make_record("journal-agent", now, hostname="elsewhere-host")
    write_index(tmp_path, index_only)
    write_journal(tmp_path, "run_start", journal_only)
    with DatabaseWriter(tmp_path / "telemetry.db") as index:
        index.update_run(changed, status="failed")

    report = run_json_allowing_problems("check", data_dir=tmp_path)
    text = run_cli("check", data_dir=tmp_path)

    assert report["index_only"] == [index_only.run_id]
    assert report["journal_only"] == [journal_only.run_id]
    assert report["status_differs"] == [
        {"run_id": changed, "index_status": "failed", "journal_status": "success"}
    ]
    assert report["problems"] == 3
    assert text.returncode == 1
    assert "telemetry rebuild" in text.stdout.splitlines()[-1]


def test_check_ignores_changes_during_check(tmp_path: Path) -> None:
    """A run started or ended between the two index readings is not a finding."""
    started_meanwhile, ended_meanwhile = record_runs(tmp_path, 2)
    journal = JournalReader(tmp_path / "journal").fold_runs()
    with DatabaseWriter(tmp_path / "telemetry.db") as index:
        # The first reading, as it was before one run started and another ended.
        statuses_before = index.run_statuses()
        del statuses_before[started_meanwhile]
        statuses_before[ended_meanwhile] = "running"

        consistency = _check._compare(statuses_before, journal, index)

    assert consistency.index_only == []
    assert consistency.journal_only == []
    assert consistency.status_differs == []


def test_check_unreadable_index(tmp_path: Path) -> None:
    """An index that is not a database is reported, with the advice to rebuild it."""
    record_runs(tmp_path, 1)
    (tmp_path / "telemetry.db").write_bytes(b"this is not a database" * 100)

    result = run_cli("check", data_dir=tmp_path)

    assert result.returncode == 1
    assert f"Index: cannot be read ({tmp_path / 'telemetry.db'})" in result.stdout
    assert "telemetry rebuild" in result.stdout.splitlines()[-1]
    assert_no_traceback(result)


def test_check_newer_index(tmp_path: Path) -> None:
    """An index of a newer schema is a finding that advises no rebuild; the journal is checked."""
    record_runs(tmp_path, 1)
    journal_file = next((tmp_path / "journal").iterdir())
    with open(journal_file, "ab") as file:
        file.write(b"{torn\n")
    with sqlite3.connect(tmp_path / "telemetry.db") as connection:
        connection.execute("PRAGMA user_version = 99")
    connection.close()

    result = run_cli("check", data_dir=tmp_path)
    report = run_json_allowing_problems("check", data_dir=tmp_path)

    assert result.returncode == 1
    assert "Index: incompatible schema" in result.stdout
    assert "schema version 99" in result.stdout
    assert "upgrade agent-telemetry" in result.stdout
    assert "Unreadable journal lines: 1 in 1 file" in result.stdout
    assert "telemetry rebuild" not in result.stdout
    assert report["index"]["state"] == "incompatible"
    assert report["problems"] == 2
    assert_no_traceback(result)


def test_check_missing_index(tmp_path: Path) -> None:
    """A store with a journal but no index reports the index missing and advises a rebuild."""
    record_runs(tmp_path, 1)
    (tmp_path / "telemetry.db").unlink()

    result = run_cli("check", data_dir=tmp_path)

    assert result.returncode == 1
    assert result.stdout.splitlines()[0] == f"Index: missing ({tmp_path / 'telemetry.db'})"
    assert "telemetry rebuild" in result.stdout.splitlines()[-1]


def test_check_missing_store(tmp_path: Path) -> None:
    """A --data-dir without an index or journal is one error line with the --data-dir advice."""
    missing = tmp_path / "no-such-store"

    result = run_cli("check", data_dir=missing)

    assert result.returncode == 1
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert str(missing) in result.stderr
    assert "--data-dir" in result.stderr
    assert_no_traceback(result)


def test_check_repair_index_full(tmp_path: Path) -> None:
    """A repair whose index write fails on a full disk is reported as not done, with exit 1."""
    with mounted_tmpfs(tmp_path / "mnt") as mount_point:
        store = mount_point / "store"
        run_id, _ = start_killed_run(store)
        fill_file_system(mount_point)

        result = run_cli("check", "--repair", data_dir=store)
        with DatabaseWriter(store / "telemetry.db") as index:
            row = index.get_run(run_id)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "Marked 0 stale runs abandoned." in result.stdout
    assert (
        f"Not repaired: run {run_id}: its run_end line was journaled, but its index row could "
        "not be updated. The ERROR line above gives the cause."
    ) in result.stdout.splitlines()
    assert "and run 'telemetry check --repair' again" in result.stdout.splitlines()[-1]
    assert "database or disk is full" in result.stderr
    assert row is not None
    assert row.status == "running"
    assert_no_traceback(result)


def test_check_repair_json_lists_failures(tmp_path: Path) -> None:
    """--json gives the runs not repaired with the reason, and ok false."""
    with mounted_tmpfs(tmp_path / "mnt") as mount_point:
        store = mount_point / "store"
        run_id, _ = start_killed_run(store)
        fill_file_system(mount_point)

        result = run_cli("check", "--repair", "--json", data_dir=store)

    report = orjson.loads(result.stdout)
    assert result.returncode == 1
    assert report["ok"] is False
    assert report["repaired"] == 0
    assert [failure["run_id"] for failure in report["not_repaired"]] == [run_id]
    assert "index row could not be updated" in report["not_repaired"][0]["reason"]


def append_torn_line(data_dir: Path) -> Path:
    """Append a line cut short, as a crash leaves it, to the store's newest journal file."""
    journal_file = sorted((data_dir / "journal").iterdir())[-1]
    with open(journal_file, "ab") as file:
        file.write(b'{"record_type":"event","run_id":"x","event_ty')
    return journal_file


def test_check_torn_line_is_warning(tmp_path: Path) -> None:
    """A line torn by a crash and closed by the next writer is a warning, with exit 0."""
    record_runs(tmp_path, 1)
    journal_file = append_torn_line(tmp_path)
    record_runs(tmp_path, 1)  # its writer closes the torn line with a newline

    result = run_cli("check", data_dir=tmp_path)
    lines = result.stdout.splitlines()

    assert result.returncode == 0, result.stdout
    assert f"  {journal_file}: 1, cut short by a crash" in lines
    assert (
        "Warning: 1 journal line cut short by a crash is skipped by readers; --strict "
        "counts it as a problem."
    ) in lines
    assert lines[-1] == "No problems found."
    assert_no_traceback(result)


def test_check_torn_line_strict(tmp_path: Path) -> None:
    """With --strict, a torn line is a problem, with exit 1."""
    record_runs(tmp_path, 1)
    append_torn_line(tmp_path)

    result = run_cli("check", "--strict", data_dir=tmp_path)
    report = run_json_allowing_problems("check", "--strict", data_dir=tmp_path)

    assert result.returncode == 1
    assert "Warning:" not in result.stdout
    assert report["problems"] == 1
    assert report["warnings"] == 0
    assert report["strict"] is True


def test_check_torn_line_json(tmp_path: Path) -> None:
    """--json counts the torn lines per file and as warnings, and ok stays true."""
    record_runs(tmp_path, 1)
    journal_file = append_torn_line(tmp_path)
    record_runs(tmp_path, 1)

    report = run_json("check", data_dir=tmp_path)

    assert report["ok"] is True
    assert report["problems"] == 0
    assert report["warnings"] == 1
    assert report["journal"]["corrupt_lines"] == {str(journal_file): 1}
    assert report["journal"]["torn_lines"] == {str(journal_file): 1}


def test_check_torn_line_after_rebuild(tmp_path: Path) -> None:
    """A rebuild does not turn a torn line into a problem: check still exits 0."""
    record_runs(tmp_path, 1)
    append_torn_line(tmp_path)
    record_runs(tmp_path, 1)

    rebuilt = run_cli("rebuild", data_dir=tmp_path)
    result = run_cli("check", data_dir=tmp_path)

    assert rebuilt.returncode == 0, rebuilt.stderr
    assert result.returncode == 0, result.stdout


def test_check_torn_and_other_lines(tmp_path: Path) -> None:
    """A file with a torn line and another unreadable line is one problem."""
    record_runs(tmp_path, 1)
    journal_file = append_torn_line(tmp_path)
    with open(journal_file, "ab") as file:
        file.write(b"\n[1, 2]\n")

    result = run_cli("check", data_dir=tmp_path)

    assert result.returncode == 1
    assert f"  {journal_file}: 2, of which 1 cut short by a crash" in result.stdout.splitlines()
    assert "Found 1 problem: readers skip the unreadable journal lines" in result.stdout


def test_check_future_journal_file(tmp_path: Path) -> None:
    """A journal file dated days ahead is a finding, even when it is empty."""
    record_runs(tmp_path, 1)
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=3)
    future_file = tmp_path / "journal" / f"events_{later:%Y%m%d}.ndjson"
    future_file.touch()

    result = run_cli("check", data_dir=tmp_path)
    report = run_json_allowing_problems("check", data_dir=tmp_path)

    assert result.returncode == 1
    assert "Journal files dated in the future: 1" in result.stdout
    assert f"  {future_file}" in result.stdout.splitlines()
    assert "fix the clock of the host" in result.stdout.splitlines()[-1]
    assert report["journal"]["future_files"] == [str(future_file)]
    assert report["problems"] == 1


def test_check_todays_file_not_future(tmp_path: Path) -> None:
    """Today's journal file is not dated in the future."""
    record_runs(tmp_path, 1)

    report = run_json("check", data_dir=tmp_path)

    assert report["journal"]["future_files"] == []


def test_check_future_files_tolerance(tmp_path: Path) -> None:
    """Tomorrow's file counts only when midnight is further away than the tolerance."""
    reader = JournalReader(tmp_path)
    tmp_path.joinpath("events_20261205.ndjson").touch()
    utc = datetime.timezone.utc

    near_midnight = _check._future_files(reader, datetime.datetime(2026, 12, 4, 23, 55, tzinfo=utc))
    at_noon = _check._future_files(reader, datetime.datetime(2026, 12, 4, 12, 0, tzinfo=utc))

    assert near_midnight == []
    assert [journal_file.date for journal_file in at_noon] == ["20261205"]


def test_check_unreadable_index_row(tmp_path: Path) -> None:
    """A row that RunRecord cannot read is listed with its run id, and a rebuild repairs it."""
    _, damaged = record_runs(tmp_path, 2)
    with sqlite3.connect(tmp_path / "telemetry.db") as connection:
        connection.execute(
            "UPDATE agent_runs SET metrics_json = '{bad' WHERE run_id = ?", (damaged,)
        )
    connection.close()

    found = run_cli("check", data_dir=tmp_path)
    report = run_json_allowing_problems("check", data_dir=tmp_path)
    rebuilt = run_cli("rebuild", data_dir=tmp_path)
    again = run_cli("check", data_dir=tmp_path)

    assert found.returncode == 1
    assert "Index rows that cannot be read: 1" in found.stdout
    assert any(line.startswith(f"  {damaged}: ") for line in found.stdout.splitlines())
    assert "telemetry rebuild" in found.stdout.splitlines()[-1]
    assert [row["run_id"] for row in report["index"]["unreadable_rows"]] == [damaged]
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert again.returncode == 0, again.stdout
    assert_no_traceback(found)


def exited_pid() -> int:
    """Return the pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=WAIT_SECONDS)
    return child.pid


def test_check_leftover_rebuild_files(tmp_path: Path) -> None:
    """Files of a killed rebuild are listed as a finding, and rebuild removes them."""
    record_runs(tmp_path, 1)
    leftover = tmp_path / f"telemetry.db.rebuild-{exited_pid()}-c53b4ca9"
    leftover.write_bytes(b"a new index that was never swapped in")

    found = run_cli("check", data_dir=tmp_path)
    rebuilt = run_cli("rebuild", data_dir=tmp_path)
    again = run_cli("check", data_dir=tmp_path)

    assert found.returncode == 1
    assert "Files left by killed rebuilds: 1" in found.stdout
    assert f"  {leftover}" in found.stdout.splitlines()
    assert "delete the files left by killed rebuilds" in found.stdout.splitlines()[-1]
    assert f"Removed {leftover}, left by a killed rebuild." in rebuilt.stdout
    assert not leftover.exists()
    assert again.returncode == 0, again.stdout


# -- errors of every subcommand ----------------------------------------------------------------

# Runs the command with the index's busy timeout at 0, so that a locked index fails at
# once instead of after SQLite's default wait.
NO_WAIT_SCRIPT = textwrap.dedent(
    """
    import sys
    from telemetry.cli import _context, main

    _context.INDEX_BUSY_TIMEOUT_MS = 0
    sys.exit(main())
    """
)


PRUNE_ARGS = ("prune", "--older-than", "1d")


def test_locked_index_message(tmp_path: Path) -> None:
    """A write that finds the index locked ends with one line naming the index and the fix."""
    old_start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=10)
    ended = get_iso8601_timestamp(old_start)
    old_run = make_record("old-agent", old_start, status="success", end_time=ended, api_posted=True)
    write_index(tmp_path, old_run)
    db_path = tmp_path / "telemetry.db"
    holder = sqlite3.connect(db_path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        result = subprocess.run(
            [sys.executable, "-c", NO_WAIT_SCRIPT, *PRUNE_ARGS, "--data-dir", str(tmp_path)],
            env=command_environment(),
            capture_output=True,
            text=True,
            timeout=WAIT_SECONDS,
            check=False,
        )
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    last_line = result.stderr.splitlines()[-1]

    assert result.returncode == 1
    assert last_line.startswith(f"telemetry prune: the index {db_path} is locked")
    assert "another process holds a write transaction" in last_line
    assert "Retry when that transaction ends" in last_line
    assert_no_traceback(result)


@pytest.mark.parametrize("command", ["tail", "flush", "check", "rebuild", "prune"])
def test_help_has_example(capsys: pytest.CaptureFixture[str], command: str) -> None:
    """Each subcommand's --help describes it and shows an example."""
    code = main([command, "--help"])
    output = capsys.readouterr().out

    assert code == 0
    assert f"telemetry {command}" in output
    assert "example" in output


def test_repair_counts_restored_run_ended_meanwhile() -> None:
    """A stale run with a journaled end that its agent ended meanwhile leaves nothing."""
    record = RunRecord(
        run_id="run-1", agent_name="a", job_type="j", start_time=get_iso8601_timestamp()
    )
    findings = _check._Findings(
        consistency=Consistency([], [], [("run-1", "running", "failed")]),
        stale=[StaleRun(record, "gone")],
        repair=AbandonResult([], [("run-1", "failed")], [], []),
    )

    assert findings.problems() == 2
    assert findings.unrepaired() == 0
