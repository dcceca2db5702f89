"""``telemetry tail``: a real tail subprocess following records that other processes append."""

from __future__ import annotations

import datetime
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
from cli_support import command_environment, run_cli

from telemetry import TelemetryClient, TelemetryConfig
from telemetry.models import RunEvent, get_iso8601_timestamp
from telemetry.ndjson import NDJSONWriter

# Seconds a test waits for a line, or for the tail process to exit, before it fails.
WAIT_SECONDS = 20.0

# Appends a run with one event through the real client, in its own process, and prints
# the run id.
WRITER_SCRIPT = textwrap.dedent(
    """
    import sys
    from telemetry import TelemetryClient, TelemetryConfig

    config = TelemetryConfig(data_dir=sys.argv[1], environ={})
    with TelemetryClient(config) as client:
        run_id = client.start_run(sys.argv[2], "test")
        client.log_event(run_id, "item_done", {"path": "a.py", "lines": 12})
        client.end_run(run_id, "success", items_succeeded=1)
    print(run_id)
    """
)


class TailProcess:
    """A running ``telemetry tail`` whose stdout lines are read with a deadline."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        argv = [sys.executable, "-m", "telemetry", "tail", "--data-dir", str(data_dir), *args]
        self.process = subprocess.Popen(
            argv,
            env=command_environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._buffer = b""

    def read_line(self) -> str:
        """Return the next line of stdout, or fail the test after WAIT_SECONDS."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + WAIT_SECONDS
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no line from tail in {WAIT_SECONDS} s: {self._buffer!r}"
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 65536)
                assert chunk, f"tail closed stdout: {self.stop_and_read_stderr()}"
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode("utf-8")

    def read_until(self, condition: Callable[[str], bool]) -> list[str]:
        """Return the lines read up to and including the first that meets ``condition``."""
        lines = [self.read_line()]
        while not condition(lines[-1]):
            lines.append(self.read_line())
        return lines

    def interrupt(self) -> int:
        """Send SIGINT, as Ctrl-C does, and return the exit code."""
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(WAIT_SECONDS)

    def stop_and_read_stderr(self) -> str:
        """End the process if it still runs, and return everything it wrote to stderr."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(WAIT_SECONDS)
        assert self.process.stderr is not None
        return self.process.stderr.read().decode("utf-8", "replace")

    def close(self) -> None:
        self.stop_and_read_stderr()
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def start_tail(tmp_path: Path) -> Iterator[Callable[..., TailProcess]]:
    """Yield a function that starts ``telemetry tail ARGS`` on the test's store."""
    started: list[TailProcess] = []

    def start(*args: str) -> TailProcess:
        tail = TailProcess(tmp_path, *args)
        started.append(tail)
        return tail

    yield start
    for tail in started:
        tail.close()


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TelemetryClient]:
    with TelemetryClient(TelemetryConfig(data_dir=tmp_path, environ={})) as telemetry_client:
        yield telemetry_client


def append_in_other_process(data_dir: Path, agent_name: str) -> str:
    """Record a run with an event in a new process, and return its run id."""
    result = subprocess.run(
        [sys.executable, "-c", WRITER_SCRIPT, str(data_dir), agent_name],
        env=command_environment(),
        capture_output=True,
        text=True,
        timeout=WAIT_SECONDS,
        check=True,
    )
    return result.stdout.strip()


def test_tail_follows_other_process(
    tmp_path: Path, client: TelemetryClient, start_tail: Callable[..., TailProcess]
) -> None:
    """Records appended by another process after the backlog are printed, one line each."""
    earlier = client.start_run("backlog-agent", "test")
    tail = start_tail()
    backlog = tail.read_line()

    run_id = append_in_other_process(tmp_path, "writer-agent")
    start, event, end = tail.read_line(), tail.read_line(), tail.read_line()

    assert earlier in backlog
    assert "run_start" in backlog
    assert start.split()[2:5] == ["run_start", "writer-agent", run_id]
    assert event.split()[2:6] == ["event", "writer-agent", run_id, "item_done"]
    assert '{"path":"a.py","lines":12}' in event
    assert end.split()[2:6] == ["run_end", "writer-agent", run_id, "success"]
    assert "items 1 ok, 0 failed" in end


def test_tail_sigint_exits_zero(
    client: TelemetryClient, start_tail: Callable[..., TailProcess]
) -> None:
    """Ctrl-C (SIGINT) ends tail with exit code 0 and no traceback."""
    client.start_run("backlog-agent", "test")
    tail = start_tail()
    tail.read_line()

    code = tail.interrupt()
    stderr = tail.stop_and_read_stderr()

    assert code == 0
    assert "Traceback" not in stderr


def test_tail_rolls_over_to_next_day(
    tmp_path: Path, client: TelemetryClient, start_tail: Callable[..., TailProcess]
) -> None:
    """A record in tomorrow's file makes tail move on to that file and keep following it."""
    run_id = client.start_run("backlog-agent", "test")
    tail = start_tail()
    tail.read_line()

    tomorrow = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1)
    writer = NDJSONWriter(tmp_path / "journal")
    try:
        for event_type in ("first_tomorrow", "second_tomorrow"):
            event = RunEvent(run_id, event_type, get_iso8601_timestamp(tomorrow))
            writer.append("event", event.to_dict())
    finally:
        writer.close()
    lines = [tail.read_line(), tail.read_line()]
    next_file = tmp_path / "journal" / f"events_{tomorrow:%Y%m%d}.ndjson"

    assert next_file.is_file()
    assert "first_tomorrow" in lines[0]
    assert "second_tomorrow" in lines[1]


def test_tail_agent_and_type_filters(
    tmp_path: Path, client: TelemetryClient, start_tail: Callable[..., TailProcess]
) -> None:
    """--agent and --type keep only the matching records, by record type or event type."""
    earlier = client.start_run("wanted-agent", "test")
    client.end_run(earlier, "success")
    tail = start_tail("--agent", "wanted-agent", "--type", "run_end", "--type", "item_done")
    backlog = tail.read_line()

    append_in_other_process(tmp_path, "other-agent")
    run_id = append_in_other_process(tmp_path, "wanted-agent")
    lines = tail.read_until(lambda line: "run_end" in line)

    assert backlog.split()[2:5] == ["run_end", "wanted-agent", earlier]
    assert len(lines) == 2
    assert lines[0].split()[2:6] == ["event", "wanted-agent", run_id, "item_done"]
    assert lines[1].split()[2:5] == ["run_end", "wanted-agent", run_id]


def test_tail_lines_sets_backlog(
    client: TelemetryClient, start_tail: Callable[..., TailProcess]
) -> None:
    """--lines 1 shows only the last record of today's file before the new ones."""
    run_id = client.start_run("backlog-agent", "test")
    client.log_event(run_id, "older_event")
    client.log_event(run_id, "newest_event")
    tail = start_tail("--lines", "1")

    first = tail.read_line()
    client.log_event(run_id, "live_event")
    second = tail.read_line()

    assert "newest_event" in first
    assert "live_event" in second


def test_tail_json_lines(
    tmp_path: Path, client: TelemetryClient, start_tail: Callable[..., TailProcess]
) -> None:
    """--json prints each record as one compact JSON object per line."""
    client.start_run("backlog-agent", "test")
    tail = start_tail("--json")
    tail.read_line()

    run_id = append_in_other_process(tmp_path, "writer-agent")
    lines = [tail.read_line() for _ in range(3)]
    records = [orjson.loads(line) for line in lines]

    assert [record["record_type"] for record in records] == ["run_start", "event", "run_end"]
    assert {record["run_id"] for record in records} == {run_id}
    assert records[1]["payload"] == {"path": "a.py", "lines": 12}
    assert lines == [orjson.dumps(record).decode("utf-8") for record in records]


def test_tail_resolves_agent_of_anonymous_event(
    tmp_path: Path, client: TelemetryClient, start_tail: Callable[..., TailProcess]
) -> None:
    """An event journaled without agent_name shows the agent of its run and passes --agent."""
    run_id = client.start_run("owner-agent", "test")
    with TelemetryClient(TelemetryConfig(data_dir=tmp_path, environ={})) as other_client:
        other_client.log_event(run_id, "from_elsewhere")
    # --lines 1: the run_start line is not in the backlog, so the name comes from the index.
    tail = start_tail("--agent", "owner-agent", "--lines", "1")

    line = tail.read_line()

    assert line.split()[2:6] == ["event", "owner-agent", run_id, "from_elsewhere"]


def test_tail_closed_pipe_ends_quietly(
    tmp_path: Path, client: TelemetryClient, start_tail: Callable[..., TailProcess]
) -> None:
    """When the reader of stdout goes away, the next record ends tail with exit 0."""
    run_id = client.start_run("backlog-agent", "test")
    tail = start_tail()
    tail.read_line()
    assert tail.process.stdout is not None
    tail.process.stdout.close()

    client.log_event(run_id, "nobody_reads_this")
    code = tail.process.wait(WAIT_SECONDS)
    stderr = tail.stop_and_read_stderr()

    assert code == 0
    assert stderr == ""


def test_tail_missing_store(tmp_path: Path) -> None:
    """A --data-dir that does not exist is an error that names it, not an endless wait."""
    missing = tmp_path / "no-such-store"

    result = run_cli("tail", data_dir=missing)

    assert result.returncode == 1
    assert str(missing) in result.stderr
    assert "Traceback" not in result.stderr


def test_tail_invalid_lines(tmp_path: Path) -> None:
    """A negative --lines is a usage error."""
    result = run_cli("tail", "--lines", "-1", data_dir=tmp_path)

    assert result.returncode == 2
    assert "-1" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_tail_lookup_leaves_index_unchanged(
    tmp_path: Path, start_tail: Callable[..., TailProcess]
) -> None:
    """The index lookup for an event without agent_name opens the index read-only."""
    index = tmp_path / "telemetry.db"
    index.touch()  # schema version 0, which a writer would migrate
    journal = NDJSONWriter(tmp_path / "journal", durability="none")
    try:
        event = RunEvent("run-1", "orphan", get_iso8601_timestamp())
        journal.append("event", {**event.to_dict(), "agent_name": None})
    finally:
        journal.close()
    tail = start_tail("--lines", "1")

    line = tail.read_line()
    code = tail.interrupt()

    assert line.split()[2:6] == ["event", "-", "run-1", "orphan"]
    assert code == 0
    assert index.stat().st_size == 0
