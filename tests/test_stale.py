"""Tests of stale-run detection against real processes, a real index and a real client."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from telemetry import TelemetryClient, TelemetryConfig, stale
from telemetry.database import DatabaseWriter
from telemetry.journal import JournalReader
from telemetry.models import RunRecord, get_iso8601_timestamp
from telemetry.stale import (
    PID_REUSE_TOLERANCE,
    AbandonResult,
    StaleRun,
    abandon_runs,
    find_stale_runs,
    process_is_gone,
)

needs_posix = pytest.mark.skipif(os.name == "nt", reason="needs POSIX signals")
needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")

UTC = datetime.timezone.utc
HOST = socket.gethostname()
SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def utc_now() -> datetime.datetime:
    """Return the current time in UTC."""
    return datetime.datetime.now(UTC)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """Yield a running child process, killed and reaped after the test."""
    child = subprocess.Popen(SLEEPER)
    try:
        yield child
    finally:
        child.kill()
        child.wait(timeout=10)


@pytest.fixture
def dead_pid() -> int:
    """Return the pid of a child that was killed with SIGKILL and reaped."""
    child = subprocess.Popen(SLEEPER)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    return child.pid


# -- process_is_gone ---------------------------------------------------------------------


@needs_posix
def test_process_killed_is_gone(dead_pid: int) -> None:
    """A child killed with SIGKILL and reaped is gone."""
    assert process_is_gone(dead_pid, utc_now())


@needs_posix
def test_process_alive_not_gone(sleeper: subprocess.Popen[bytes]) -> None:
    """A running child that started before the run is not gone."""
    assert not process_is_gone(sleeper.pid, utc_now())


def test_process_self_not_gone() -> None:
    """This process, for a run started now, is not gone."""
    assert not process_is_gone(os.getpid(), utc_now())


@needs_posix
@needs_proc
def test_process_zombie_is_gone(sleeper: subprocess.Popen[bytes]) -> None:
    """A child killed but not yet reaped by its parent is a zombie, so it is gone."""
    sleeper.send_signal(signal.SIGKILL)
    # WNOWAIT waits until the child has exited but leaves it unreaped.
    os.waitid(os.P_PID, sleeper.pid, os.WEXITED | os.WNOWAIT)
    state = Path(f"/proc/{sleeper.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]

    assert state == "Z"
    assert process_is_gone(sleeper.pid, utc_now())


@needs_posix
@needs_proc
def test_process_reused_pid_is_gone(sleeper: subprocess.Popen[bytes]) -> None:
    """A process that started an hour after the run has a reused pid, so the run's is gone."""
    assert process_is_gone(sleeper.pid, utc_now() - datetime.timedelta(hours=1))


@needs_proc
def test_process_self_reused_pid_is_gone() -> None:
    """This process started after a run of last year, so that run's process is gone."""
    assert process_is_gone(os.getpid(), utc_now() - datetime.timedelta(days=365))


@needs_posix
@needs_proc
def test_process_within_tolerance_not_gone(sleeper: subprocess.Popen[bytes]) -> None:
    """A process that seems to start up to PID_REUSE_TOLERANCE after the run is its own."""
    started_at = utc_now() - PID_REUSE_TOLERANCE / 2
    assert not process_is_gone(sleeper.pid, started_at)


@needs_posix
@needs_proc
def test_process_parenthesised_name(tmp_path: Path) -> None:
    """A command name with spaces and parentheses does not confuse the /proc parser."""
    program = tmp_path / "a) b (c"
    program.symlink_to(sys.executable)
    child = subprocess.Popen([str(program), *SLEEPER[1:]])
    try:
        found = stale._read_proc_stat(child.pid)
        comm = Path(f"/proc/{child.pid}/comm").read_text().strip()
        assert not process_is_gone(child.pid, utc_now())
    finally:
        child.kill()
        child.wait(timeout=10)

    assert comm == "a) b (c"
    assert found is not None
    assert found[0] in {"R", "S", "D"}
    assert abs(found[1] - utc_now()) < datetime.timedelta(minutes=1)


def test_process_pid_one_not_gone() -> None:
    """Process 1 exists, even when it belongs to another user."""
    assert not process_is_gone(1, utc_now())


@needs_posix
def test_process_huge_pid_is_gone() -> None:
    """A pid past the C int range cannot be running."""
    assert process_is_gone(2**62, utc_now())


@pytest.mark.parametrize("pid", [0, -1, True, "42"])
def test_process_rejects_pid(pid: object) -> None:
    """A pid below 1 or not an int raises ValueError instead of signalling a group."""
    with pytest.raises(ValueError, match="invalid pid"):
        process_is_gone(pid, utc_now())  # type: ignore[arg-type]


def test_process_rejects_naive_time() -> None:
    """A naive started_at raises ValueError naming the argument."""
    with pytest.raises(ValueError, match="invalid started_at"):
        process_is_gone(os.getpid(), datetime.datetime(2026, 1, 1))


# -- find_stale_runs ---------------------------------------------------------------------


def running(run_id: str, start: datetime.datetime, **fields: object) -> RunRecord:
    """Return a running run of agent "agent-a" started at ``start``."""
    return RunRecord(
        run_id=run_id,
        agent_name="agent-a",
        job_type="batch",
        start_time=get_iso8601_timestamp(start),
        **fields,  # type: ignore[arg-type]
    )


@pytest.fixture
def index(tmp_path: Path) -> Iterator[DatabaseWriter]:
    """Yield an open index on a new database, closed after the test."""
    opened = DatabaseWriter(tmp_path / "telemetry.db")
    yield opened
    opened.close()


def stale_ids(found: list[StaleRun]) -> list[str]:
    """Return the run ids of ``found`` in order."""
    return [run.record.run_id for run in found]


@needs_posix
def test_find_process_checks(index: DatabaseWriter, dead_pid: int) -> None:
    """On this host, a run whose process is gone is stale, and a live or ended one is not."""
    now = utc_now()
    index.load_runs(
        [
            running("dead-here", now, hostname=HOST, pid=dead_pid),
            running("alive-here", now, hostname=HOST, pid=os.getpid()),
            running("dead-elsewhere", now, hostname="other-host", pid=dead_pid),
            running("unknown-host", now, hostname=None, pid=dead_pid),
            running("no-pid-here", now, hostname=HOST, pid=None),
            running("zero-pid-here", now, hostname=HOST, pid=0),
            running("ended-here", now, hostname=HOST, pid=dead_pid, status="success"),
        ]
    )
    found = find_stale_runs(index)

    assert stale_ids(found) == ["dead-here"]
    assert found[0].reason == f"process {dead_pid} on {HOST} is no longer running"


@needs_posix
def test_find_hostname_argument(index: DatabaseWriter, dead_pid: int) -> None:
    """hostname names the host whose runs are judged by their process."""
    now = utc_now()
    index.load_runs(
        [
            running("dead-here", now, hostname=HOST, pid=dead_pid),
            running("dead-elsewhere", now, hostname="other-host", pid=dead_pid),
        ]
    )
    found = find_stale_runs(index, hostname="other-host")

    assert stale_ids(found) == ["dead-elsewhere"]
    assert found[0].reason == f"process {dead_pid} on other-host is no longer running"


def test_find_stale_after(index: DatabaseWriter) -> None:
    """A run of another host is stale once it has run longer than stale_after."""
    start = datetime.datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
    index.load_runs(
        [
            running("long", start, hostname="other-host", pid=4242),
            running("short", start + datetime.timedelta(hours=1), hostname="other-host"),
        ]
    )
    now = start + datetime.timedelta(hours=6, minutes=12)
    found = find_stale_runs(index, stale_after=datetime.timedelta(hours=6), now=now)

    assert stale_ids(found) == ["long"]
    assert found[0].reason == "running for 6 h 12 min, longer than the stale-after limit of 6 h"


def test_find_stale_after_boundary(index: DatabaseWriter) -> None:
    """A run exactly stale_after old is not stale yet."""
    start = datetime.datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
    index.load_runs([running("run-1", start, hostname="other-host")])
    limit = datetime.timedelta(hours=2)

    assert find_stale_runs(index, stale_after=limit, now=start + limit) == []
    later = start + limit + datetime.timedelta(microseconds=1)
    assert stale_ids(find_stale_runs(index, stale_after=limit, now=later)) == ["run-1"]


def test_find_stale_after_live_process(index: DatabaseWriter) -> None:
    """A run whose process is alive is still stale after stale_after."""
    start = utc_now()
    index.load_runs([running("alive-here", start, hostname=HOST, pid=os.getpid())])
    now = start + datetime.timedelta(days=2, hours=3)
    found = find_stale_runs(index, stale_after=datetime.timedelta(days=1), now=now)

    assert stale_ids(found) == ["alive-here"]
    assert found[0].reason == "running for 2 d 3 h, longer than the stale-after limit of 1 d"


def test_find_without_stale_after(index: DatabaseWriter) -> None:
    """Without stale_after, an old run of another host is never stale."""
    start = datetime.datetime(2020, 1, 1, tzinfo=UTC)
    index.load_runs([running("ancient", start, hostname="other-host", pid=4242)])
    assert find_stale_runs(index) == []


def test_find_empty_index(index: DatabaseWriter) -> None:
    """An index without runs has no stale runs."""
    assert find_stale_runs(index, stale_after=datetime.timedelta(seconds=1)) == []


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"stale_after": datetime.timedelta(0)}, "invalid stale_after"),
        ({"stale_after": datetime.timedelta(hours=-1)}, "invalid stale_after"),
        ({"now": datetime.datetime(2026, 1, 1)}, "invalid now"),
    ],
)
def test_find_rejects_arguments(
    index: DatabaseWriter, arguments: dict[str, object], message: str
) -> None:
    """A stale_after that is not positive, or a naive now, raises ValueError."""
    with pytest.raises(ValueError, match=message):
        find_stale_runs(index, **arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("duration", "text"),
    [
        (datetime.timedelta(hours=6, minutes=12), "6 h 12 min"),
        (datetime.timedelta(hours=6), "6 h"),
        (datetime.timedelta(days=2, hours=3, minutes=4), "2 d 3 h"),
        (datetime.timedelta(days=1, minutes=5), "1 d"),
        (datetime.timedelta(minutes=5, seconds=10.9), "5 min 10 s"),
        (datetime.timedelta(seconds=45), "45 s"),
        (datetime.timedelta(0), "0 s"),
        (datetime.timedelta(seconds=-3), "0 s"),
    ],
)
def test_format_duration_units(duration: datetime.timedelta, text: str) -> None:
    """Durations show their two largest units, leaving out a second unit of zero."""
    assert stale.format_span(duration) == text


# -- abandon_runs through a real client, with an agent killed by SIGKILL ------------------

AGENT = """
import sys, time
from telemetry import TelemetryClient, TelemetryConfig

client = TelemetryClient(TelemetryConfig(environ={}, data_dir=sys.argv[1]))
print(client.start_run("crashing-agent", "batch"), flush=True)
time.sleep(60)
"""


def start_killed_agent(data_dir: Path) -> tuple[str, int]:
    """Run an agent that starts a run, kill it with SIGKILL, reap it, return (run id, pid)."""
    child = subprocess.Popen(
        [sys.executable, "-c", AGENT, str(data_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        run_id = child.stdout.readline().strip()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        if child.stdout is not None:
            child.stdout.close()
    return run_id, child.pid


def journal_records(data_dir: Path, run_id: str) -> list[dict[str, object]]:
    """Return the journal lines of run ``run_id``, in file and line order."""
    records: list[dict[str, object]] = []
    for path in sorted((data_dir / "journal").glob("events_*.ndjson")):
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if record["run_id"] == run_id:
                records.append(record)
    return records


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TelemetryClient]:
    """Yield a client on the store tmp_path / "store", without an API, closed after the test."""
    opened = TelemetryClient(TelemetryConfig(environ={}, data_dir=tmp_path / "store"))
    yield opened
    opened.close()


@needs_posix
def test_abandon_killed_agent(client: TelemetryClient) -> None:
    """A run of an agent killed with SIGKILL is found and ended as abandoned everywhere."""
    data_dir = client.config.data_dir
    run_id, pid = start_killed_agent(data_dir)
    with DatabaseWriter(client.config.db_path) as index:
        found = find_stale_runs(index)
        result = abandon_runs(client, found)
        row = index.get_run(run_id)

    reason = f"process {pid} on {HOST} is no longer running"
    assert stale_ids(found) == [run_id]
    assert found[0].reason == reason
    assert result == AbandonResult([run_id], [], [], [])

    assert row is not None
    assert row.status == "abandoned"
    assert row.error_summary == reason
    assert row.end_time is not None
    assert row.duration_ms is not None

    lines = journal_records(data_dir, run_id)
    assert [line["record_type"] for line in lines] == ["run_start", "run_end"]
    assert lines[-1]["status"] == "abandoned"
    assert lines[-1]["error_summary"] == reason
    assert lines[-1]["pid"] == pid


@needs_posix
def test_abandon_skips_ended_run(client: TelemetryClient, caplog: pytest.LogCaptureFixture) -> None:
    """A run that ended after it was found stale is left as it is and counted as ended meanwhile."""
    run_id, _ = start_killed_agent(client.config.data_dir)
    with DatabaseWriter(client.config.db_path) as index:
        found = find_stale_runs(index)
        abandon_runs(client, found)
        # A second client knows the run only from the index, as another process would.
        with (
            TelemetryClient(client.config) as second,
            caplog.at_level(logging.WARNING, logger="telemetry"),
        ):
            again = abandon_runs(second, found)
        row = index.get_run(run_id)

    assert again == AbandonResult([], [(run_id, "abandoned")], [], [])
    assert row is not None
    assert row.status == "abandoned"
    assert any("already ended with status abandoned" in r.getMessage() for r in caplog.records)
    assert len(journal_records(client.config.data_dir, run_id)) == 2


def test_abandon_nothing(client: TelemetryClient) -> None:
    """No stale runs end nothing."""
    assert abandon_runs(client, []) == AbandonResult([], [], [], [])


# -- abandon_runs racing the run's own end ---------------------------------------------------
#
# Each test holds the index's write lock with a raw connection, so that one client's index
# write fails at once (busy_timeout_ms=0) and calls its sleep before retrying. That sleep
# runs the other client's step, which makes the interleaving exact without real waiting.


def give_index(client: TelemetryClient, sleep: Callable[[float], None]) -> None:
    """Make ``client`` use an index whose locked writes fail at once and call ``sleep``."""
    client._index = DatabaseWriter(client.config.db_path, sleep=sleep, busy_timeout_ms=0)


def find_all_running(db_path: Path) -> list[StaleRun]:
    """Return every running run of the index as stale, judged from a day in the future."""
    with DatabaseWriter(db_path) as index:
        return find_stale_runs(
            index,
            stale_after=datetime.timedelta(hours=1),
            now=utc_now() + datetime.timedelta(days=1),
        )


def end_statuses(data_dir: Path, run_id: str) -> list[object]:
    """Return the statuses of the run_end lines of ``run_id``, in journal order."""
    lines = journal_records(data_dir, run_id)
    return [line["status"] for line in lines if line["record_type"] == "run_end"]


def journal_status(data_dir: Path, run_id: str) -> str:
    """Return the status that the journal gives ``run_id`` when it is folded."""
    return JournalReader(data_dir / "journal").fold_runs().runs[run_id].status


def index_status(db_path: Path, run_id: str) -> str | None:
    """Return the status of ``run_id`` in the index, or None without a row."""
    with DatabaseWriter(db_path) as index:
        row = index.get_run(run_id)
    return None if row is None else row.status


@pytest.fixture
def locker(client: TelemetryClient) -> Iterator[sqlite3.Connection]:
    """Yield a raw connection to the client's index, created first, closed after the test."""
    DatabaseWriter(client.config.db_path).close()
    connection = sqlite3.connect(client.config.db_path, isolation_level=None)
    yield connection
    connection.close()


def test_abandon_race_owner_ends_first(
    client: TelemetryClient, locker: sqlite3.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """A run whose owner ends it while abandon_runs waits for the index keeps its success."""
    data_dir = client.config.data_dir
    run_id = client.start_run("racing-agent", "batch")
    found = find_all_running(client.config.db_path)

    def owner_ends(_: float) -> None:
        if locker.in_transaction:
            locker.execute("ROLLBACK")
            client.end_run(run_id, "success")

    with TelemetryClient(client.config) as admin, caplog.at_level(logging.WARNING, "telemetry"):
        give_index(admin, owner_ends)
        locker.execute("BEGIN IMMEDIATE")
        result = abandon_runs(admin, found)

    assert result == AbandonResult([], [(run_id, "success")], [], [])
    assert index_status(client.config.db_path, run_id) == "success"
    assert journal_status(data_dir, run_id) == "success"
    # The abandoned line was written before the conditional update found the run ended.
    # The owner's line follows, and the admin client journals the kept success once more.
    assert end_statuses(data_dir, run_id) == ["abandoned", "success", "success"]
    assert any("that end is kept" in record.getMessage() for record in caplog.records)


def test_abandon_race_owner_indexes_last(
    client: TelemetryClient, locker: sqlite3.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """An owner that journals its end before an abandon and indexes it after still wins."""
    data_dir = client.config.data_dir
    run_id = client.start_run("racing-agent", "batch")
    found = find_all_running(client.config.db_path)
    admin = TelemetryClient(client.config)
    results: list[AbandonResult] = []

    def admin_abandons(_: float) -> None:
        if locker.in_transaction:
            locker.execute("ROLLBACK")
            results.append(abandon_runs(admin, found))

    give_index(client, admin_abandons)
    locker.execute("BEGIN IMMEDIATE")
    with caplog.at_level(logging.WARNING, "telemetry"):
        client.end_run(run_id, "success")
    admin.close()

    assert results == [AbandonResult([run_id], [], [], [])]
    assert index_status(client.config.db_path, run_id) == "success"
    assert journal_status(data_dir, run_id) == "success"
    assert end_statuses(data_dir, run_id) == ["success", "abandoned", "success"]
    assert any("this client's end replaces it" in r.getMessage() for r in caplog.records)


def test_abandon_index_locked(client: TelemetryClient, locker: sqlite3.Connection) -> None:
    """When the index stays locked, the run_end line is journaled but the run counts as failed."""
    data_dir = client.config.data_dir
    run_id = client.start_run("racing-agent", "batch")
    found = find_all_running(client.config.db_path)

    with TelemetryClient(client.config) as admin:
        give_index(admin, lambda _: None)
        locker.execute("BEGIN IMMEDIATE")
        result = abandon_runs(admin, found)
        locker.execute("ROLLBACK")

    assert result.abandoned == []
    assert result.failed == [
        (run_id, "its run_end line was journaled, but its index row could not be updated")
    ]
    assert end_statuses(data_dir, run_id) == ["abandoned"]
    assert index_status(client.config.db_path, run_id) == "running"


def test_abandon_journal_unwritable(
    client: TelemetryClient, caplog: pytest.LogCaptureFixture
) -> None:
    """When the run_end line cannot be journaled, the index row is left running."""
    data_dir = client.config.data_dir
    start = utc_now() - datetime.timedelta(hours=2)
    with DatabaseWriter(client.config.db_path) as index:
        index.load_runs([running("no-journal", start, hostname="other-host")])
    # Directories where the journal files of today and tomorrow should be make every append
    # fail, even if the test runs at midnight.
    for day in (utc_now(), utc_now() + datetime.timedelta(days=1)):
        (data_dir / "journal" / f"events_{day:%Y%m%d}.ndjson").mkdir(parents=True, exist_ok=True)
    found = find_all_running(client.config.db_path)

    with caplog.at_level(logging.ERROR, "telemetry"):
        result = abandon_runs(client, found)

    assert result.abandoned == []
    assert result.failed == [
        ("no-journal", "its run_end line could not be journaled, so its index row was left as is")
    ]
    assert index_status(client.config.db_path, "no-journal") == "running"
    assert any("failed to journal the run_end" in r.getMessage() for r in caplog.records)


def test_abandon_takes_journaled_end(client: TelemetryClient) -> None:
    """A stale run that the journal shows ended gets that end in the index, not abandoned."""
    started = get_iso8601_timestamp()
    running = RunRecord(
        run_id="run-journaled-end", agent_name="agent", job_type="job", start_time=started
    )
    ended = dataclasses.replace(
        running, status="failed", end_time=get_iso8601_timestamp(), error_summary="real"
    )
    with DatabaseWriter(client.config.db_path) as index:
        index.insert_run(running)
        index.update_run(running.run_id, api_retry_count=2)
        result = abandon_runs(
            client,
            [StaleRun(running, "gone")],
            index=index,
            journal_runs={running.run_id: ended},
        )
        row = index.get_run(running.run_id)

    assert result == AbandonResult([], [], [], [(running.run_id, "failed")])
    assert row is not None
    assert row.status == "failed"
    assert row.error_summary == "real"
    assert row.api_retry_count == 2
