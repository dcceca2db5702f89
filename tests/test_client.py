"""TelemetryClient and track_run against real journal files, SQLite and HTTP servers."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest

from telemetry import FlushResult, TelemetryClient, TelemetryConfig, current_run
from telemetry import client as client_module
from telemetry.api import PostResult
from telemetry.client import _EarlyStop
from telemetry.database import DatabaseWriter
from telemetry.ndjson import NDJSONWriter

TOKEN = "tok-3b1f9c-never-logged"


def make_client(tmp_path: Path, **settings: Any) -> TelemetryClient:
    settings.setdefault("data_dir", tmp_path / "store")
    return TelemetryClient(TelemetryConfig(environ={}, **settings))


def journal_lines(client: TelemetryClient) -> list[dict[str, Any]]:
    reader = NDJSONWriter(client.config.ndjson_dir)
    lines: list[dict[str, Any]] = []
    for path in reader.list_files():
        lines.extend(reader.read_file(path.name[len("events_") : -len(".ndjson")]))
    return lines


def index_row(client: TelemetryClient, run_id: str) -> Any:
    index = DatabaseWriter(client.config.db_path)
    try:
        return index.get_run(run_id)
    finally:
        index.close()


# -- recording ----------------------------------------------------------------------------


def test_run_recorded_in_journal_and_index(tmp_path: Path) -> None:
    """A run's start, event and end reach the journal, and its final row the index."""
    with make_client(tmp_path) as client:
        run_id = client.start_run("importer", "import", items_discovered=3)
        client.log_event(run_id, "progress", {"done": 1})
        client.end_run(run_id, items_succeeded=2, items_failed=1, metrics_json={"rows": 7})

        lines = journal_lines(client)
        row = index_row(client, run_id)

    assert [line["record_type"] for line in lines] == ["run_start", "event", "run_end"]
    assert lines[1]["payload"] == {"done": 1}
    assert lines[1]["agent_name"] == "importer"
    assert lines[2]["status"] == "success"
    assert row.status == "success"
    assert row.items_discovered == 3
    assert row.items_succeeded == 2
    assert row.items_failed == 1
    assert row.metrics_json == {"rows": 7}
    assert row.duration_ms is not None
    assert row.end_time.endswith("+00:00")
    assert row.pid == os.getpid()


def test_run_indexed_while_start_fsyncs(tmp_path: Path) -> None:
    """start_run writes the index while its journal line is fsynced, and returns after both."""
    client = make_client(tmp_path)
    journal = client._open_journal()
    assert journal is not None
    assert client._open_index() is not None
    real_fsync = journal._fsync
    entered = threading.Event()
    release = threading.Event()

    def held_fsync(fd: int) -> None:
        entered.set()
        release.wait(30)
        real_fsync(fd)

    journal._fsync = held_fsync
    run_ids: list[str] = []
    starter = threading.Thread(target=lambda: run_ids.append(client.start_run("agent", "job")))
    starter.start()
    assert entered.wait(30)
    indexed_during_fsync = False
    with DatabaseWriter(client.config.db_path, read_only=True) as reader:
        for _ in range(2000):
            if reader.count_runs() == 1:
                indexed_during_fsync = True
                break
            time.sleep(0.005)
    returned_during_fsync = not starter.is_alive()
    release.set()
    starter.join(30)
    client.close()

    assert indexed_during_fsync
    assert not returned_during_fsync
    assert len(run_ids) == 1


def test_store_created_owner_only(tmp_path: Path) -> None:
    """The data directory is created on first use with mode 0o700, its files 0o600."""
    with make_client(tmp_path) as client:
        client.end_run(client.start_run("a", "b"))
        data_dir = client.config.data_dir

    assert data_dir.stat().st_mode & 0o777 == 0o700
    assert client.config.db_path.stat().st_mode & 0o777 == 0o600
    for path in client.config.ndjson_dir.iterdir():
        assert path.stat().st_mode & 0o777 == 0o600


def test_disabled_client_writes_nothing(tmp_path: Path) -> None:
    """With enabled=False every call returns and no file is created."""
    with make_client(tmp_path, enabled=False) as client:
        with client.track_run("a", "b") as run:
            run.log_event("x", {"y": 1})
            run.set_metrics(items_succeeded=1)
        assert client.get_stats()["total_runs"] == 0

    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.start_run("a", "b", colour="red"), "unknown field 'colour'"),
        (lambda c: c.start_run("a", "b", items_failed="3"), "items_failed must be an int"),
        (lambda c: c.start_run("a", "b", items_failed=-1), "items_failed=-1"),
        (lambda c: c.start_run("a", "b", items_failed=2**63), "outside"),
        (lambda c: c.start_run(None, "b"), "agent_name must be a str"),
        (lambda c: c.start_run("", "b"), "agent_name must not be empty"),
        (lambda c: c.log_event("r", "e", payload=[1]), "payload must be a dict"),
        (lambda c: c.end_run("r", status="done"), "invalid status 'done'"),
        (lambda c: c.end_run("r", status="running"), "invalid status 'running'"),
        (lambda c: c.end_run("r", start_time="x"), "unknown field 'start_time'"),
    ],
)
def test_misuse_raises_naming_value(tmp_path: Path, call: Any, message: str) -> None:
    """Wrong field names, types and statuses raise at once with a message naming them."""
    with make_client(tmp_path) as client, pytest.raises((TypeError, ValueError), match=message):
        call(client)


def test_set_metrics_unknown_field_raises(tmp_path: Path) -> None:
    """RunContext.set_metrics rejects an unknown field by name."""
    with (
        make_client(tmp_path) as client,
        client.track_run("a", "b") as run,
        pytest.raises(TypeError, match="unknown field 'rows'"),
    ):
        run.set_metrics(rows=3)


def test_set_metrics_merges_metrics(tmp_path: Path) -> None:
    """metrics_json is merged over the run; other fields are replaced."""
    with make_client(tmp_path) as client:
        with client.track_run("a", "b") as run:
            run.set_metrics(items_succeeded=1, metrics_json={"x": 1})
            run.set_metrics(items_succeeded=5, metrics_json={"y": 2})
        row = index_row(client, run.run_id)

    assert row.items_succeeded == 5
    assert row.metrics_json == {"x": 1, "y": 2}


def test_end_run_unknown_run_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Ending a run that no client started logs a warning and returns None."""
    with make_client(tmp_path) as client:
        assert client.end_run("20260101T000000000000Z-x-0000000000000000") is None

    assert "not in the index" in caplog.text


def test_end_run_twice_changes_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A second end_run of the same run logs a warning and keeps the first outcome."""
    with make_client(tmp_path) as client:
        run_id = client.start_run("a", "b")
        client.end_run(run_id, "failed")
        assert client.end_run(run_id, "success") is None
        row = index_row(client, run_id)

    assert row.status == "failed"
    assert "already ended" in caplog.text


def test_end_run_again_after_forgotten(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run ended long ago, whose id the client forgot, is found ended in the index."""
    monkeypatch.setattr(client_module, "ENDED_RUNS_REMEMBERED", 1)
    with make_client(tmp_path) as client:
        first = client.start_run("a", "b")
        client.end_run(first, "failed")
        client.end_run(client.start_run("a", "b"))
        client.end_run(client.start_run("a", "b"))
        assert client.end_run(first, "success") is None
        row = index_row(client, first)

    assert row.status == "failed"
    assert "already ended with status failed" in caplog.text


def test_end_run_from_another_client(tmp_path: Path) -> None:
    """A run started by one client can be ended by another on the same store."""
    first = make_client(tmp_path)
    run_id = first.start_run("a", "b")
    with make_client(tmp_path) as second:
        record = second.end_run(run_id, "partial", items_failed=2)
    first.close()
    row = index_row(first, run_id)

    assert record is not None
    assert row.status == "partial"
    assert row.items_failed == 2


def test_end_run_metrics_changed_in_place(tmp_path: Path) -> None:
    """Metrics that the agent changed in place after start_run reach the index at the end."""
    stats: dict[str, Any] = {"progress": {"done": 0}}
    with make_client(tmp_path) as client:
        run_id = client.start_run("agent", "job", metrics_json=stats)
        stats["progress"]["done"] = 42
        client.end_run(run_id)
        end_line = [line for line in journal_lines(client) if line["record_type"] == "run_end"]
    row = index_row(client, run_id)

    assert end_line[0]["metrics_json"] == {"progress": {"done": 42}}
    assert row.metrics_json == {"progress": {"done": 42}}


# -- track_run statuses -------------------------------------------------------------------


class AgentError(Exception):
    pass


@pytest.mark.parametrize(
    ("error", "status", "summary"),
    [
        (AgentError("bad input"), "failed", "AgentError: bad input"),
        (SystemExit(0), "success", None),
        (SystemExit(None), "success", None),
        (SystemExit(2), "failed", "SystemExit: 2"),
        (SystemExit("fatal"), "failed", "SystemExit: fatal"),
        (KeyboardInterrupt(), "cancelled", "KeyboardInterrupt"),
        (asyncio.CancelledError(), "cancelled", "CancelledError"),
        (TimeoutError("slow"), "timeout", "TimeoutError: slow"),
    ],
)
def test_track_run_status_from_exit(
    tmp_path: Path, error: BaseException, status: str, summary: str | None
) -> None:
    """Each way of leaving the block gives its status, and the exception is re-raised as is."""
    with make_client(tmp_path) as client:
        with pytest.raises(type(error)) as raised, client.track_run("a", "b") as run:
            raise error
        row = index_row(client, run.run_id)

    assert raised.value is error
    assert row.status == status
    assert row.error_summary == summary


def test_failed_run_keeps_traceback(tmp_path: Path) -> None:
    """A failed run stores the traceback of its exception in error_details."""
    with make_client(tmp_path) as client:
        with pytest.raises(AgentError), client.track_run("a", "b") as run:
            raise AgentError("boom")
        row = index_row(client, run.run_id)

    assert "Traceback" in row.error_details
    assert "AgentError: boom" in row.error_details


def test_set_status_partial(tmp_path: Path) -> None:
    """set_status decides the status of a block that exits normally."""
    with make_client(tmp_path) as client:
        with client.track_run("a", "b") as run:
            run.set_status("partial")
        row = index_row(client, run.run_id)

    assert row.status == "partial"


def test_nested_runs_record_parent(tmp_path: Path) -> None:
    """A run tracked inside another records the outer run as its parent."""
    with make_client(tmp_path) as client:
        with client.track_run("outer", "b") as outer:
            assert current_run() is outer
            with client.track_run("inner", "b") as inner:
                assert current_run() is inner
            assert current_run() is outer
        assert current_run() is None
        row = index_row(client, inner.run_id)

    assert row.parent_run_id == outer.run_id


def test_async_track_run_task_cancelled(tmp_path: Path) -> None:
    """A task cancelled inside async with track_run ends its run as cancelled."""
    client = make_client(tmp_path)
    started = asyncio.Event()
    contexts: list[Any] = []

    async def agent() -> None:
        async with client.track_run("async-agent", "b") as run:
            contexts.append(run)
            started.set()
            await asyncio.Event().wait()

    async def main() -> None:
        task = asyncio.create_task(agent())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    row = index_row(client, contexts[0].run_id)
    client.close()

    assert row.status == "cancelled"
    assert row.error_summary == "CancelledError"


def test_async_track_run_success(tmp_path: Path) -> None:
    """async with track_run ends a normal block as success."""
    client = make_client(tmp_path)

    async def agent() -> str:
        async with client.track_run("async-agent", "b") as run:
            await asyncio.sleep(0)
            return run.run_id

    run_id = asyncio.run(agent())
    row = index_row(client, run_id)
    client.close()

    assert row.status == "success"


# -- API ----------------------------------------------------------------------------------


def test_run_posted_to_api(tmp_path: Path, api_server: Any) -> None:
    """An ended run is posted with its token and idempotency key and marked posted."""
    with make_client(tmp_path, api_url=api_server.url, api_token=TOKEN) as client:
        with client.track_run("poster", "b") as run:
            run.set_metrics(items_succeeded=4)
        row = index_row(client, run.run_id)
        stats = client.get_stats()

    request = api_server.requests[-1]
    body = orjson.loads(request.body)
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.headers["Idempotency-Key"] == run.run_id
    assert body["run_id"] == run.run_id
    assert body["status"] == "success"
    assert body["items_succeeded"] == 4
    assert "api_posted" not in body
    assert row.api_posted is True
    assert row.api_posted_at is not None
    assert stats["pending_api_posts"] == 0


def test_end_run_bounded_by_hanging_api(tmp_path: Path, api_server: Any) -> None:
    """A server that never responds leaves the run pending once end_run_timeout passes."""
    api_server.hang()
    settings = {"api_url": api_server.url, "end_run_timeout": 0.3, "timeout": 5.0}
    with make_client(tmp_path, **settings) as client:
        run_id = client.start_run("a", "b")
        record = client.end_run(run_id)
        row = index_row(client, run_id)

    assert record is not None
    assert row.status == "success"
    assert row.api_posted is False
    assert row.api_retry_count == 1
    assert "deadline" in row.api_last_error or "timed out" in row.api_last_error.lower()


def test_flush_pending_posts_after_outage(tmp_path: Path, api_server: Any) -> None:
    """Runs left pending by a failing API are all posted by flush_pending."""
    settings = {"api_url": api_server.url, "max_retries": 0}
    with make_client(tmp_path, **settings) as client:
        for _ in range(3):
            api_server.respond(503)
            client.end_run(client.start_run("a", "b"))
        assert client.get_stats()["pending_api_posts"] == 3

        progress: list[tuple[int, int]] = []
        result = client.flush_pending(progress=lambda done, total: progress.append((done, total)))
        stats = client.get_stats()

    assert result.posted == 3
    assert result.failed == 0
    assert progress[-1] == (3, 3)
    assert stats["pending_api_posts"] == 0


def test_flush_pending_without_api(tmp_path: Path) -> None:
    """flush_pending posts nothing when no API is configured."""
    with make_client(tmp_path) as client:
        client.end_run(client.start_run("a", "b"))
        result = client.flush_pending()

    assert result == (0, 0, 0, None)


def test_token_never_stored_or_logged(
    tmp_path: Path, api_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The token reaches the Authorization header only: not the journal, index or logs."""
    caplog.set_level(logging.DEBUG)
    api_server.respond(500)
    api_server.respond(401)
    settings = {"api_url": api_server.url, "api_token": TOKEN, "max_retries": 1}
    with make_client(tmp_path, **settings) as client:
        with pytest.raises(AgentError), client.track_run("a", "b"):
            raise AgentError("failed")
        text = repr(client) + repr(client.config) + str(client.config)

    stored = b"".join(
        path.read_bytes() for path in (tmp_path / "store").rglob("*") if path.is_file()
    )
    assert TOKEN not in text
    assert TOKEN not in caplog.text
    assert TOKEN.encode() not in stored


# -- faults are logged, never raised ------------------------------------------------------


def run_agent(client: TelemetryClient) -> str:
    """A small agent: returns its result whatever telemetry does."""
    with client.track_run("faulty-store", "b") as run:
        run.log_event("step", {"n": 1})
        run.set_metrics(items_succeeded=1)
    return "agent result"


def test_data_dir_is_a_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A regular file where the data directory should be: the agent still runs."""
    blocker = tmp_path / "store"
    blocker.write_text("not a directory")
    with make_client(tmp_path, data_dir=blocker) as client:
        assert run_agent(client) == "agent result"
        assert client.get_stats()["index_available"] is False

    assert "failed to journal the run_start" in caplog.text
    assert "cannot open the index" in caplog.text


def test_stats_fallback_keys(tmp_path: Path) -> None:
    """Without an index, get_stats has every key that a readable index gives."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    with DatabaseWriter(tmp_path / "real.db") as index:
        expected = set(index.get_run_stats()) | {"active_runs", "index_available"}

    with make_client(tmp_path, data_dir=blocker) as client:
        stats = client.get_stats()

    assert set(stats) == expected
    assert stats["since"] is None
    assert stats["by_agent"] == {}


def test_data_dir_under_a_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A data directory whose parent is a regular file: the agent still runs."""
    (tmp_path / "file").write_text("x")
    with make_client(tmp_path, data_dir=tmp_path / "file" / "store") as client:
        assert run_agent(client) == "agent result"

    assert "NotADirectoryError" in caplog.text or "FileExistsError" in caplog.text


def test_db_path_not_a_database(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A non-database file at db_path is logged; the journal still records the run."""
    db_path = tmp_path / "garbage.db"
    db_path.write_bytes(b"this is not a database" * 100)
    with make_client(tmp_path, db_path=db_path) as client:
        assert run_agent(client) == "agent result"
        lines = journal_lines(client)

    assert [line["record_type"] for line in lines] == ["run_start", "event", "run_end"]
    assert "cannot open the index" in caplog.text


def test_dead_api_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture, free_port: int) -> None:
    """An API with nothing listening leaves the run pending; the agent still returns."""
    url = f"http://127.0.0.1:{free_port}/runs"
    with make_client(tmp_path, api_url=url, max_retries=0) as client:
        assert run_agent(client) == "agent result"
        assert client.get_stats()["pending_api_posts"] == 1


@pytest.fixture
def full_filesystem(tmp_path: Path) -> Any:
    """A 64 KiB tmpfs, filled up; skipped where mounting is not allowed."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        descriptor = os.open(mount_point / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(descriptor, b"\0" * 4096)
        except OSError:
            pass
        finally:
            os.close(descriptor)
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_logged(
    tmp_path: Path, full_filesystem: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A store on a full file system: every write fails, the agent still returns."""
    with make_client(tmp_path, data_dir=full_filesystem / "store") as client:
        for _ in range(3):
            assert run_agent(client) == "agent result"

    assert "No space left on device" in caplog.text or "cannot open" in caplog.text


def test_invalid_environment_uses_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An invalid setting in the environment is logged and replaced by its default."""
    monkeypatch.setenv("TELEMETRY_DATA_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("TELEMETRY_DURABILITY", "sometimes")
    monkeypatch.setenv("TELEMETRY_MAX_RETRIES", "-4")
    client = TelemetryClient()
    assert run_agent(client) == "agent result"
    stats = client.get_stats()
    client.close()

    assert client.enabled is True
    assert client.config.durability == "fsync"
    assert client.config.max_retries == 3
    assert stats["total_runs"] == 1
    assert "TELEMETRY_DURABILITY" in caplog.text
    assert "TELEMETRY_MAX_RETRIES" in caplog.text


def test_flush_pending_timeout(tmp_path: Path, api_server: Any) -> None:
    """flush_pending stops at its timeout and counts the runs it did not try."""
    settings = {"api_url": api_server.url, "max_retries": 0, "end_run_timeout": 0}
    with make_client(tmp_path, **settings) as client:
        for _ in range(3):
            client.end_run(client.start_run("a", "b"))
        api_server.hang()

        result = client.flush_pending(timeout=0.3)

    assert result.posted + result.failed + result.remaining == 3
    assert result.remaining >= 1


def pend_runs(client: TelemetryClient, count: int) -> None:
    """End ``count`` runs that stay pending, because the client's end_run does not post."""
    assert client.config.end_run_timeout == 0
    for _ in range(count):
        client.end_run(client.start_run("a", "b"))


# Short timeouts and no retries, so that each failed post ends at once.
FAST_FAILURE = {"max_retries": 0, "timeout": 0.5, "end_run_timeout": 0}


@pytest.mark.parametrize("status", [401, 403])
def test_flush_pending_stops_when_rejected(
    tmp_path: Path, api_server: Any, caplog: pytest.LogCaptureFixture, status: int
) -> None:
    """A 401 or 403 ends the flush after one post, with the reason logged as a warning."""
    api_server.respond(status, body=f'{{"error": "token {TOKEN} expired"}}'.encode(), times=5)
    settings = {"api_url": api_server.url, "api_token": TOKEN, **FAST_FAILURE}
    with make_client(tmp_path, **settings) as client:
        pend_runs(client, 5)
        progress: list[tuple[int, int]] = []
        result = client.flush_pending(progress=lambda done, total: progress.append((done, total)))
        stats = client.get_stats()

    reason = f"the API rejected the credentials (HTTP {status})"
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(api_server.requests) == 1
    assert result == FlushResult(posted=0, failed=1, remaining=4, stopped_reason=reason)
    assert progress == [(1, 5)]
    assert stats["pending_api_posts"] == 5
    assert any(reason in record.getMessage() for record in warnings)
    assert TOKEN not in caplog.text


def test_flush_pending_stops_when_unreachable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, free_port: int
) -> None:
    """With nothing listening on the port, the flush stops after 3 refused posts."""
    settings = {"api_url": f"http://127.0.0.1:{free_port}/runs", **FAST_FAILURE}
    with make_client(tmp_path, **settings) as client:
        pend_runs(client, 5)
        result = client.flush_pending()
        stats = client.get_stats()

    assert result.posted == 0
    assert result.failed == 3
    assert result.remaining == 2
    assert result.stopped_reason is not None
    assert result.stopped_reason.startswith("3 posts in a row could not reach the API (")
    assert "ConnectError" in result.stopped_reason
    assert stats["pending_api_posts"] == 5
    assert "flush_pending stopped after 3 of 5 runs" in caplog.text


def test_flush_pending_server_error_continues(tmp_path: Path, api_server: Any) -> None:
    """A 500 is a response from the server, so every pending run is still tried."""
    api_server.respond(500, times=5)
    with make_client(tmp_path, api_url=api_server.url, **FAST_FAILURE) as client:
        pend_runs(client, 5)
        result = client.flush_pending()

    assert len(api_server.requests) == 5
    assert result == (0, 5, 0, None)


def test_flush_pending_response_resets_count(tmp_path: Path, api_server: Any) -> None:
    """Timeouts count as unreachable only in a row: a response between them resets the count."""
    api_server.hang(times=2)
    api_server.respond(500)
    api_server.hang(times=2)
    settings = {"api_url": api_server.url, **FAST_FAILURE, "timeout": 0.2}
    with make_client(tmp_path, **settings) as client:
        pend_runs(client, 5)
        result = client.flush_pending()

    assert len(api_server.requests) == 5
    assert result == (0, 5, 0, None)


def test_flush_pending_stop_at_last_run(tmp_path: Path, api_server: Any) -> None:
    """A 401 for the last pending run leaves nothing untried, so there is no stop reason."""
    api_server.respond(401)
    with make_client(tmp_path, api_url=api_server.url, **FAST_FAILURE) as client:
        pend_runs(client, 1)
        result = client.flush_pending()

    assert result == (0, 1, 0, None)


@pytest.mark.parametrize(
    ("result", "reason"),
    [
        (PostResult(False, "HTTP 401", 401), "the API rejected the credentials (HTTP 401)"),
        (PostResult(False, "HTTP 403: no", 403), "the API rejected the credentials (HTTP 403)"),
        (
            PostResult(False, "failed after 1 attempt: ConnectError: refused", None, True),
            "could not reach the API (failed after 1 attempt: ConnectError: refused)",
        ),
        (PostResult(False, "failed after 4 attempts: HTTP 503", 503), None),
        (PostResult(False, "the payload cannot be encoded as JSON: bad"), None),
    ],
)
def test_flush_stop_rule(result: PostResult, reason: str | None) -> None:
    """The stop rule reads the status and reachability of each failed post."""
    early_stop = _EarlyStop()
    early_stop.unreachable_in_a_row = 2
    stopped_reason = early_stop.reason_after(result)

    if reason is None:
        assert stopped_reason is None
    else:
        assert stopped_reason is not None
        assert stopped_reason.endswith(reason)


def test_flush_result_positional() -> None:
    """FlushResult built with three fields, as before stopped_reason, has no stop reason."""
    result = FlushResult(1, 2, 3)

    assert result.stopped_reason is None
    assert result == (1, 2, 3, None)


@pytest.mark.parametrize(
    ("arguments", "error"),
    [({"limit": "3"}, TypeError), ({"limit": 0}, ValueError), ({"timeout": -1}, ValueError)],
)
def test_flush_pending_misuse(tmp_path: Path, arguments: dict[str, Any], error: type) -> None:
    """Invalid flush_pending arguments raise at once."""
    with make_client(tmp_path) as client, pytest.raises(error):
        client.flush_pending(**arguments)


def test_config_of_wrong_type(tmp_path: Path) -> None:
    """A dict passed as config raises TypeError saying what to pass."""
    with pytest.raises(TypeError, match="TelemetryConfig"):
        TelemetryClient({"data_dir": str(tmp_path)})  # type: ignore[arg-type]


def test_payload_conversion_never_raises(tmp_path: Path) -> None:
    """Payloads whose conversion fails are stored in a fallback form, not raised."""

    class BrokenPath(os.PathLike):  # type: ignore[type-arg]
        def __fspath__(self) -> str:
            raise RuntimeError("broken")

    with make_client(tmp_path) as client, client.track_run("a", "b") as run:
        run.log_event("huge", {"n": 10**5000, 10**5000: "key"})
        run.log_event("broken", {"path": BrokenPath()})
        run.set_metrics(metrics_json={"n": 10**5000})
        lines = journal_lines(client)

    assert lines[1]["payload"]["n"].startswith("0x")
    assert "BrokenPath" in lines[2]["payload"]["path"]


def test_exception_with_broken_str(tmp_path: Path) -> None:
    """An exception whose __str__ raises still reaches the caller unchanged."""

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no str")

    error = Unprintable()
    with make_client(tmp_path) as client:
        with pytest.raises(Unprintable) as raised, client.track_run("a", "b") as run:
            raise error
        row = index_row(client, run.run_id)

    assert raised.value is error
    assert row.status == "failed"
    assert "Unprintable: <str() of the exception raised" in row.error_summary


# -- awkward payloads ---------------------------------------------------------------------


def test_nan_stored_alike_everywhere(
    tmp_path: Path, api_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A NaN metric is "NaN" in the journal, the index and the API body, with a warning."""
    with make_client(tmp_path, api_url=api_server.url) as client:
        with client.track_run("a", "b") as run:
            run.set_metrics(metrics_json={"score": float("nan"), "big": 2**70})
        lines = journal_lines(client)
        row = index_row(client, run.run_id)

    body = orjson.loads(api_server.requests[-1].body)
    assert lines[-1]["metrics_json"] == {"score": "NaN", "big": str(2**70)}
    assert row.metrics_json == {"score": "NaN", "big": str(2**70)}
    assert body["metrics_json"] == {"score": "NaN", "big": str(2**70)}
    assert "metrics_json.score" in caplog.text
    assert "metrics_json.big" in caplog.text


# -- processes ----------------------------------------------------------------------------


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_open_run_abandoned_at_exit(tmp_path: Path) -> None:
    """A run still open when the interpreter exits is ended as abandoned."""
    code = """
        from telemetry import TelemetryClient
        client = TelemetryClient()
        print(client.start_run("forgetful", "b"))
    """
    result = run_python(code, {"TELEMETRY_DATA_DIR": str(tmp_path / "store")})
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.strip()

    index = DatabaseWriter(tmp_path / "store" / "telemetry.db")
    row = index.get_run(run_id)
    index.close()
    assert row.status == "abandoned"
    assert "before end_run" in row.error_summary


def test_works_without_httpx(tmp_path: Path) -> None:
    """Without httpx the client records runs and logs once that posting is off."""
    code = """
        import logging, sys
        sys.modules["httpx"] = None
        logging.basicConfig(level=logging.INFO)
        from telemetry import TelemetryClient
        client = TelemetryClient()
        for _ in range(2):
            with client.track_run("no-httpx", "b"):
                pass
        print(client.get_stats()["total_runs"])
    """
    env = {
        "TELEMETRY_DATA_DIR": str(tmp_path / "store"),
        "TELEMETRY_API_URL": "http://127.0.0.1:9/runs",
    }
    result = run_python(code, env)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2"
    assert result.stderr.count("httpx is not installed") == 1


def test_index_unlocked_between_runs(tmp_path: Path) -> None:
    """After end_run, another connection can write to the index at once."""
    with make_client(tmp_path) as client:
        client.end_run(client.start_run("a", "b"))
        other = sqlite3.connect(client.config.db_path, timeout=0)
        other.execute("BEGIN IMMEDIATE")
        other.rollback()
        other.close()


def test_fork_while_lock_held(tmp_path: Path) -> None:
    """A child forked while another thread holds the client's lock can still record runs."""
    client = make_client(tmp_path)
    client.start_run("warm-up", "b")
    held, release = threading.Event(), threading.Event()

    def hold_lock() -> None:
        with client._lock:
            held.set()
            release.wait(timeout=30)

    holder = threading.Thread(target=hold_lock)
    holder.start()
    held.wait(timeout=30)
    child = os.fork()
    if child == 0:
        signal.alarm(20)  # a deadlocked child dies instead of hanging the suite
        try:
            client.end_run(client.start_run("child", "b"))
            os._exit(0 if client.get_stats()["by_status"]["success"] == 1 else 1)
        finally:
            os._exit(2)
    release.set()
    holder.join()
    _, status = os.waitpid(child, 0)
    client.close()

    assert os.waitstatus_to_exitcode(status) == 0


FORK_STORM = """
    import json, os, sys, threading, time
    from telemetry import TelemetryClient

    client = TelemetryClient()
    client.get_stats()
    go = threading.Event()

    def work(number):
        go.wait()
        with client.track_run("fork-parent", f"t{number}"):
            pass

    threads = [threading.Thread(target=work, args=(number,)) for number in range(4)]
    for thread in threads:
        thread.start()
    go.set()
    children = []
    for number in range(30):
        time.sleep(0.002)
        pid = os.fork()
        if pid == 0:
            import faulthandler
            faulthandler.dump_traceback_later(10, exit=True)
            with client.track_run("fork-child", f"c{number}"):
                pass
            client.close()
            os._exit(0)
        children.append(pid)
    statuses = [os.waitpid(pid, 0)[1] for pid in children]
    for thread in threads:
        thread.join()
    print(json.dumps([status for status in statuses if status != 0]))
"""


@pytest.mark.parametrize("attempt", range(3))
def test_fork_while_threads_open_index(tmp_path: Path, attempt: int) -> None:
    """Children forked while other threads open their index connections never hang."""
    result = run_python(FORK_STORM, {"XDG_DATA_HOME": str(tmp_path / f"data-{attempt}")})

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [], result.stderr


def test_unreadable_mapping_payload(tmp_path: Path) -> None:
    """A Mapping whose iteration raises is stored as its repr() under a marked key."""

    class Unreadable(Mapping[str, int]):
        def __getitem__(self, key: str) -> int:
            raise KeyError(key)

        def __iter__(self) -> Iterator[str]:
            raise RuntimeError("cannot iterate")

        def __len__(self) -> int:
            return 1

    with make_client(tmp_path) as client, client.track_run("a", "b") as run:
        run.log_event("odd", Unreadable())
        lines = journal_lines(client)

    assert "Unreadable" in lines[1]["payload"]["unreadable_mapping"]


def test_async_end_does_not_wait_for_api(tmp_path: Path, api_server: Any) -> None:
    """A slow API does not delay a tracked coroutine: wait_for gets the block's result."""
    api_server.slow(5.0, status=200)
    client = make_client(tmp_path, api_url=api_server.url, end_run_timeout=10.0)

    async def agent() -> str:
        async with client.track_run("async-agent", "b"):
            await asyncio.sleep(0)
        return "result"

    async def main() -> str:
        return await asyncio.wait_for(agent(), timeout=2.0)

    assert asyncio.run(main()) == "result"
    assert client.get_stats()["by_status"]["success"] == 1
    client.close()


def test_close_abandons_open_runs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """close() ends open runs as abandoned, and later calls are dropped with a warning."""
    client = make_client(tmp_path)
    run_id = client.start_run("a", "b")
    client.close()
    client.start_run("after-close", "b")

    row = index_row(client, run_id)
    assert row.status == "abandoned"
    assert "client is closed" in caplog.text


def test_forked_child_leaves_parent_runs(tmp_path: Path) -> None:
    """A forked child that exits normally does not end its parent's open runs."""
    code = """
        import os, sys
        from telemetry import TelemetryClient
        client = TelemetryClient()
        run_id = client.start_run("parent", "b")
        child = os.fork()
        if child == 0:
            sys.exit(0)
        os.waitpid(child, 0)
        client.end_run(run_id, "success")
        print(run_id)
    """
    result = run_python(code, {"TELEMETRY_DATA_DIR": str(tmp_path / "store")})
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.strip()

    index = DatabaseWriter(tmp_path / "store" / "telemetry.db")
    row = index.get_run(run_id)
    index.close()
    ends = [
        line
        for line in journal_lines(make_client(tmp_path))
        if line["record_type"] == "run_end" and line["run_id"] == run_id
    ]
    assert row.status == "success"
    assert len(ends) == 1
