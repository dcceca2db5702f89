"""Tests of telemetry.ndjson against real files, threads, subprocesses and fork()."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import errno
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections import namedtuple
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import telemetry
from telemetry.encoding import MAX_DEPTH
from telemetry.errors import ConfigError
from telemetry.journal import JournalReader
from telemetry.ndjson import JournalReadResult, NDJSONWriter

TIMESTAMP = "2026-12-04T12:00:00.000000+00:00"
DATE = "20261204"

# The subprocesses import the same telemetry package as this test process.
SUBPROCESS_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(
        [str(Path(telemetry.__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]
    ),
}
SUBPROCESS_TIMEOUT_SECONDS = 60

Point = namedtuple("Point", ["x", "y"])


@dataclasses.dataclass
class Blob:
    data: bytes


OPAQUE = object()


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[NDJSONWriter]:
    writer = NDJSONWriter(tmp_path / "journal")
    yield writer
    writer.close()


@pytest.fixture
def journal_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="telemetry.journal")
    return caplog


def event(run_id: str = "run-1", timestamp: str = TIMESTAMP, **payload: Any) -> dict[str, Any]:
    return {"run_id": run_id, "event_type": "step", "timestamp": timestamp, "payload": payload}


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "telemetry.journal" and record.levelno == level
    ]


def count_fsyncs(writer: NDJSONWriter) -> list[int]:
    """Replace the writer's fsync with one that records each descriptor's inode."""
    inodes: list[int] = []
    real_fsync = writer._fsync

    def counting_fsync(fd: int) -> None:
        inodes.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    writer._fsync = counting_fsync
    return inodes


def run_python(script: str, *args: str, **popen: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        env=SUBPROCESS_ENV,
        text=True,
        **popen,
    )


# -- appending ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record_type", "data"),
    [
        ("run_start", {"run_id": "run-1", "agent_name": "crawler", "start_time": TIMESTAMP}),
        (
            "run_end",
            {
                "run_id": "run-1",
                "status": "success",
                "start_time": TIMESTAMP,
                "end_time": TIMESTAMP,
            },
        ),
        ("event", event(count=3)),
    ],
)
def test_append_record_type(journal: NDJSONWriter, record_type: str, data: dict[str, Any]) -> None:
    """Each record type is stored as one line of its fields plus record_type."""
    journal.append(record_type, data)

    assert journal.read_file(DATE) == [{"record_type": record_type, **data}]


def test_append_line_format(journal: NDJSONWriter) -> None:
    """A line is compact JSON with record_type first and a newline at the end."""
    journal.append("event", {"run_id": "run-1", "timestamp": TIMESTAMP})

    content = journal.file_path(DATE).read_bytes()
    assert content == b'{"record_type":"event","run_id":"run-1","timestamp":"' + (
        TIMESTAMP.encode() + b'"}\n'
    )


def test_append_unknown_record_type(journal: NDJSONWriter) -> None:
    """An unknown record type raises ValueError naming it and the known ones."""
    with pytest.raises(ValueError, match=r"unknown record_type 'run_begin'.*run_start"):
        journal.append("run_begin", event())


def test_append_data_not_mapping(journal: NDJSONWriter) -> None:
    """Data that is not a mapping raises TypeError naming its type."""
    with pytest.raises(TypeError, match="not list"):
        journal.append("event", [("run_id", "run-1")])  # type: ignore[arg-type]


def test_append_conflicting_record_type(journal: NDJSONWriter) -> None:
    """Data with a different record_type raises ValueError naming both values."""
    with pytest.raises(ValueError, match=r"'run_end'.*'event'"):
        journal.append("event", {**event(), "record_type": "run_end"})


def test_append_after_close(journal: NDJSONWriter) -> None:
    """An append after close() raises ValueError."""
    journal.close()

    with pytest.raises(ValueError, match="is closed"):
        journal.append("event", event())


def test_close_twice(journal: NDJSONWriter) -> None:
    """A second close() does nothing."""
    journal.append("event", event())
    journal.close()
    journal.close()

    assert len(journal.read_file(DATE)) == 1


# -- the file of a record ------------------------------------------------------------------------


def test_file_date_utc_boundary(journal: NDJSONWriter) -> None:
    """The last microsecond of a year and the first second of the next go to two files."""
    journal.append("event", event(timestamp="2026-12-31T23:59:59.999999+00:00"))
    journal.append("event", event(timestamp="2027-01-01T00:00:00+00:00"))

    assert len(journal.read_file("20261231")) == 1
    assert len(journal.read_file("20270101")) == 1


def test_file_date_offset(journal: NDJSONWriter) -> None:
    """A timestamp with a negative offset goes to the file of its UTC date."""
    journal.append("event", event(timestamp="2026-12-31T20:00:00-05:00"))

    assert len(journal.read_file("20270101")) == 1
    assert journal.read_file("20261231") == []


@pytest.mark.parametrize(
    ("record_type", "data", "timestamp", "expected"),
    [
        ("event", {"timestamp": "2026-01-02T00:00:00+00:00"}, "2026-01-01T00:00:00Z", "20260101"),
        (
            "run_end",
            {"start_time": "2026-01-01T23:00:00+00:00", "end_time": "2026-01-02T01:00:00+00:00"},
            None,
            "20260102",
        ),
        (
            "run_start",
            {"start_time": "2026-01-01T23:00:00+00:00", "end_time": "2026-01-02T01:00:00+00:00"},
            None,
            "20260101",
        ),
        ("run_start", {"start_time": "2026-01-03T10:00:00+00:00"}, None, "20260103"),
    ],
    ids=["argument", "run_end_end_time", "run_start_ignores_end_time", "start_time"],
)
def test_file_date_source(
    journal: NDJSONWriter,
    record_type: str,
    data: dict[str, Any],
    timestamp: str | None,
    expected: str,
) -> None:
    """The file's date comes from the argument, then timestamp, end_time and start_time."""
    journal.append(record_type, {"run_id": "run-1", **data}, timestamp=timestamp)

    assert [path.name for path in journal.list_files()] == [f"events_{expected}.ndjson"]


def test_file_date_argument_not_stored(journal: NDJSONWriter) -> None:
    """The timestamp argument selects the file and is not added to the line."""
    journal.append("event", {"run_id": "run-1"}, timestamp=TIMESTAMP)

    assert journal.read_file(DATE) == [{"record_type": "event", "run_id": "run-1"}]


def test_file_date_now(journal: NDJSONWriter) -> None:
    """A record without a time goes to the file of the current UTC date."""
    before = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    journal.append("event", {"run_id": "run-1"})
    after = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")

    assert journal.list_files()[0].name in {f"events_{before}.ndjson", f"events_{after}.ndjson"}


def test_file_date_invalid_in_data(
    journal: NDJSONWriter, journal_logs: pytest.LogCaptureFixture
) -> None:
    """An invalid time in the data is logged and the record goes to today's file."""
    journal.append("event", event(timestamp="yesterday"))

    assert len(journal.list_files()) == 1
    assert any("invalid timestamp 'yesterday'" in text for text in messages(journal_logs))


def test_file_date_invalid_argument(journal: NDJSONWriter) -> None:
    """An invalid timestamp argument raises ValueError naming it."""
    with pytest.raises(ValueError, match="'tomorrow'"):
        journal.append("event", event(), timestamp="tomorrow")


def test_day_switch(journal: NDJSONWriter) -> None:
    """Records alternating between days each land in the file of their day."""
    for day in ("2026-12-04", "2026-12-05", "2026-12-04"):
        journal.append("event", event(timestamp=f"{day}T08:00:00+00:00"))

    assert len(journal.read_file("20261204")) == 2
    assert len(journal.read_file("20261205")) == 1


def test_day_switch_fsyncs_old_file(tmp_path: Path) -> None:
    """The file of the previous day is fsynced before the writer switches, in every mode."""
    writer = NDJSONWriter(tmp_path, durability="none")
    inodes = count_fsyncs(writer)
    writer.append("event", event(timestamp="2026-12-04T08:00:00+00:00"))
    writer.append("event", event(timestamp="2026-12-05T08:00:00+00:00"))

    assert inodes == [writer.file_path("20261204").stat().st_ino]
    writer.close()


# -- torn lines and corrupt input -----------------------------------------------------------------


def test_torn_line_closed(tmp_path: Path, journal_logs: pytest.LogCaptureFixture) -> None:
    """A new writer ends a torn last line first, so the next record stays intact."""
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    writer = NDJSONWriter(tmp_path)
    writer.file_path(today).write_bytes(b'{"record_type":"event","payl')

    writer.append("event", {"run_id": "run-1", "event_type": "real"})
    report = writer.read_file_report(today)
    writer.close()

    assert report.records == [{"record_type": "event", "run_id": "run-1", "event_type": "real"}]
    assert report.corrupt_lines == 1
    assert any("torn last line" in text for text in messages(journal_logs))


def test_torn_line_after_own_append(tmp_path: Path) -> None:
    """A line torn by another process after this writer's own append is still closed."""
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    writer = NDJSONWriter(tmp_path)
    writer.append("event", {"run_id": "run-1", "event_type": "first"})
    # Another process appends part of a line and dies before its newline.
    fd = os.open(writer.file_path(today), os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b'{"record_type":"event","payl')
    finally:
        os.close(fd)

    writer.append("event", {"run_id": "run-1", "event_type": "second"})
    report = writer.read_file_report(today)
    writer.close()

    assert [record["event_type"] for record in report.records] == ["first", "second"]
    assert report.corrupt_lines == 1


def test_whole_foreign_line_after_own_append(tmp_path: Path) -> None:
    """A whole line appended by another process between two appends is kept as it is."""
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    writer = NDJSONWriter(tmp_path)
    writer.append("event", {"run_id": "run-1", "event_type": "first"})
    fd = os.open(writer.file_path(today), os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b'{"record_type":"event","run_id":"run-2","event_type":"foreign"}\n')
    finally:
        os.close(fd)

    writer.append("event", {"run_id": "run-1", "event_type": "second"})
    report = writer.read_file_report(today)
    writer.close()

    assert [record["event_type"] for record in report.records] == ["first", "foreign", "second"]
    assert report.corrupt_lines == 0


def test_read_garbage_lines(tmp_path: Path, journal_logs: pytest.LogCaptureFixture) -> None:
    """Non-JSON lines, arrays, scalars and invalid UTF-8 are skipped and counted."""
    writer = NDJSONWriter(tmp_path)
    writer.file_path(DATE).write_bytes(
        b'{"record_type":"event","n":1}\n'
        b"not json\n"
        b"[1, 2]\n"
        b"42\n"
        b"\xff\xfe{}\n"
        b'{"text":"\xff"}\n'
        b"\n"
        b"   \n"
        b'{"record_type":"event","n":2}\n'
    )

    report = writer.read_file_report(DATE)

    assert report == JournalReadResult(
        writer.file_path(DATE),
        [{"record_type": "event", "n": 1}, {"record_type": "event", "n": 2}],
        5,
    )
    assert messages(journal_logs) == [f"skipped 5 corrupt lines in {writer.file_path(DATE)}"]


def test_read_missing_file(journal: NDJSONWriter) -> None:
    """Reading a day without a file returns no records and no corrupt lines."""
    assert journal.read_file_report(DATE) == JournalReadResult(journal.file_path(DATE), [], 0)


def test_read_clean_file_no_warning(
    journal: NDJSONWriter, journal_logs: pytest.LogCaptureFixture
) -> None:
    """A file without corrupt lines is read without a warning."""
    journal.append("event", event())
    journal.read_file(DATE)

    assert messages(journal_logs) == []


# -- values JSON cannot hold ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "field", "stored"),
    [
        ({"value": "abc\ud835"}, "event.payload.value", {"value": "abc\\ud835"}),
        ({"abc\ud835": 1}, "event.payload.<key 0>", {"abc\\ud835": 1}),
        ({"value": 2**70}, "event.payload.value", {"value": str(2**70)}),
        ({"value": -(2**63) - 1}, "event.payload.value", {"value": "-9223372036854775809"}),
        ({"value": float("nan")}, "event.payload.value", {"value": "NaN"}),
        ({"value": float("inf")}, "event.payload.value", {"value": "Infinity"}),
        ({"value": {3, 1, 2}}, "event.payload.value", {"value": [1, 2, 3]}),
        ({"value": b"\x00\xff"}, "event.payload.value", {"value": "base64:AP8="}),
        ({"value": Point(1, 2)}, "event.payload.value", {"value": {"x": 1, "y": 2}}),
        ({"value": decimal.Decimal("3.14")}, "event.payload.value", {"value": "3.14"}),
        ({"value": Path("/srv/data")}, "event.payload.value", {"value": "/srv/data"}),
        ({"value": Blob(b"ab")}, "event.payload.value.data", {"value": {"data": "base64:YWI="}}),
        ({"value": OPAQUE}, "event.payload.value", {"value": repr(OPAQUE)}),
    ],
    ids=[
        "surrogate_value",
        "surrogate_key",
        "int_past_64_bits",
        "int_below_int64",
        "nan",
        "infinity",
        "set",
        "bytes",
        "namedtuple",
        "decimal",
        "path",
        "dataclass_with_bytes",
        "object",
    ],
)
def test_unencodable_value(
    journal: NDJSONWriter,
    journal_logs: pytest.LogCaptureFixture,
    payload: dict[Any, Any],
    field: str,
    stored: dict[str, Any],
) -> None:
    """A value JSON cannot hold is stored converted, with a warning naming the field."""
    journal.append("event", {"run_id": "run-7", "timestamp": TIMESTAMP, "payload": payload})

    report = journal.read_file_report(DATE)
    warnings = messages(journal_logs)

    assert report.corrupt_lines == 0
    assert report.records[0]["payload"] == stored
    assert any(field in text and "run-7" in text for text in warnings), warnings


def test_deep_nesting_stored(journal: NDJSONWriter, journal_logs: pytest.LogCaptureFixture) -> None:
    """A payload nested deeper than orjson allows is cut at MAX_DEPTH levels and logged."""
    nested: list[Any] = []
    for _ in range(280):
        nested = [nested]

    journal.append("event", event(tree=nested))

    stored = journal.read_file(DATE)[0]["payload"]["tree"]
    for _ in range(MAX_DEPTH - 3):
        stored = stored[0]
    assert "<nested too deep>" in str(stored)
    assert any("levels cut" in text for text in messages(journal_logs))


def test_conversion_warning_rate_limited(
    tmp_path: Path, journal_logs: pytest.LogCaptureFixture
) -> None:
    """A repeated conversion is logged the first time and then every 100th time."""
    writer = NDJSONWriter(tmp_path, durability="none")
    for _ in range(250):
        writer.append("event", event(ratio=float("nan")))
    writer.close()

    warnings = [text for text in messages(journal_logs) if "event.payload.ratio" in text]
    assert len(warnings) == 3
    assert "held back" in warnings[-1]


# -- concurrency -------------------------------------------------------------------------------


def test_threads_fsync_mode(journal: NDJSONWriter) -> None:
    """8 threads appending 200 records each in fsync mode lose and tear no line."""

    def append_many(thread_id: int) -> None:
        for seq in range(200):
            journal.append("event", event(run_id=f"thread-{thread_id}", seq=seq))

    threads = [threading.Thread(target=append_many, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    report = journal.read_file_report(DATE)
    assert report.corrupt_lines == 0
    for thread_id in range(8):
        seqs = [r["payload"]["seq"] for r in report.records if r["run_id"] == f"thread-{thread_id}"]
        assert seqs == list(range(200)), thread_id


def test_fsync_group_commit(tmp_path: Path) -> None:
    """Appends that wait for the disk at the same time share fsyncs."""
    writer = NDJSONWriter(tmp_path, durability="fsync")
    thread_count = 8
    all_written = threading.Event()
    written: list[int] = []
    fsync_calls: list[int] = []
    real_write_line = writer._write_line
    real_fsync = writer._fsync

    def write_line(date: str, line: bytes) -> tuple[int, bool]:
        result = real_write_line(date, line)
        written.append(result[0])
        if len(written) == thread_count:
            all_written.set()
        return result

    def held_fsync(fd: int) -> None:
        # The first fsync waits until every thread has written, so the others must queue.
        if not fsync_calls:
            all_written.wait(SUBPROCESS_TIMEOUT_SECONDS)
        fsync_calls.append(fd)
        real_fsync(fd)

    writer._write_line = write_line  # type: ignore[method-assign]
    writer._fsync = held_fsync
    threads = [
        threading.Thread(target=writer.append, args=("event", event(seq=n)))
        for n in range(thread_count)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.close()

    assert all_written.is_set()
    assert len(writer.read_file(DATE)) == thread_count
    assert len(fsync_calls) < thread_count


def test_fsync_failure_raises(tmp_path: Path) -> None:
    """A failed fsync raises OSError from append, and the next append still works."""
    writer = NDJSONWriter(tmp_path, durability="fsync")
    real_fsync = writer._fsync

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "simulated I/O error")

    writer._fsync = failing_fsync
    with pytest.raises(OSError, match="simulated"):
        writer.append("event", event(seq=1))
    writer._fsync = real_fsync
    writer.append("event", event(seq=2))
    writer.close()

    assert [r["payload"]["seq"] for r in writer.read_file(DATE)] == [1, 2]


def test_sync_ahead_fsyncs_on_sync_thread(tmp_path: Path) -> None:
    """With sync_ahead, the sync thread fsyncs the line while the caller goes on."""
    writer = NDJSONWriter(tmp_path, durability="fsync")
    real_fsync = writer._fsync
    entered = threading.Event()
    release = threading.Event()
    fsync_threads: list[str] = []

    def held_fsync(fd: int) -> None:
        fsync_threads.append(threading.current_thread().name)
        entered.set()
        release.wait(SUBPROCESS_TIMEOUT_SECONDS)
        real_fsync(fd)

    writer._fsync = held_fsync
    seq = writer._write_record("event", event(seq=1), None, None, sync_ahead=True)
    # The caller is free while the fsync is held: this line runs during it.
    assert entered.wait(SUBPROCESS_TIMEOUT_SECONDS)
    release.set()
    writer._wait_durable(seq)
    writer.close()

    assert fsync_threads[0].startswith("telemetry-journal-sync-")


def test_wait_durable_blocks_until_fsynced(tmp_path: Path) -> None:
    """_wait_durable returns only after the fsync that covers the line has finished."""
    writer = NDJSONWriter(tmp_path, durability="fsync")
    real_fsync = writer._fsync
    entered = threading.Event()
    release = threading.Event()

    def held_fsync(fd: int) -> None:
        entered.set()
        release.wait(SUBPROCESS_TIMEOUT_SECONDS)
        real_fsync(fd)

    writer._fsync = held_fsync
    seq = writer._write_record("event", event(seq=1), None, None, sync_ahead=True)
    waiter = threading.Thread(target=writer._wait_durable, args=(seq,))
    waiter.start()
    assert entered.wait(SUBPROCESS_TIMEOUT_SECONDS)
    still_waiting = waiter.is_alive()
    release.set()
    waiter.join(SUBPROCESS_TIMEOUT_SECONDS)
    writer.close()

    assert still_waiting


def test_sync_ahead_failure_reaches_caller(tmp_path: Path) -> None:
    """When the fsync fails, the caller's _wait_durable raises the OSError."""
    writer = NDJSONWriter(tmp_path, durability="fsync")

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "simulated I/O error")

    writer._fsync = failing_fsync
    seq = writer._write_record("event", event(seq=1), None, None, sync_ahead=True)
    with pytest.raises(OSError, match="simulated"):
        writer._wait_durable(seq)


@pytest.mark.parametrize("durability", ["batch", "none"])
def test_sync_ahead_other_modes(tmp_path: Path, durability: str) -> None:
    """Outside fsync mode, sync_ahead starts no thread and _wait_durable returns at once."""
    writer = NDJSONWriter(tmp_path, durability=durability)
    seq = writer._write_record("event", event(seq=1), None, None, sync_ahead=True)
    writer._wait_durable(seq)
    names = [thread.name for thread in threading.enumerate()]
    writer.close()

    assert f"telemetry-journal-sync-{tmp_path.name}" not in names


def test_sync_failure_raised_after_retry(tmp_path: Path) -> None:
    """A failed fsync on the sync thread is raised to the caller, though a retry succeeds."""
    writer = NDJSONWriter(tmp_path, durability="fsync")
    real_fsync = writer._fsync
    calls: list[str] = []

    def fail_on_sync_thread(fd: int) -> None:
        calls.append(threading.current_thread().name)
        if threading.current_thread().name.startswith("telemetry-journal-sync-"):
            raise OSError(errno.EIO, "simulated write-back error")
        real_fsync(fd)

    writer._fsync = fail_on_sync_thread
    seq = writer._write_record("event", event(seq=1), None, None, sync_ahead=True)
    # Let the sync thread's fsync fail before the caller's own fsync could cover the line.
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_SECONDS
    while not writer._sync_failures and time.monotonic() < deadline:
        time.sleep(0.001)
    with pytest.raises(OSError, match="simulated write-back error"):
        writer._wait_durable(seq)
    writer._fsync = real_fsync
    writer.append("event", event(seq=2))
    writer.close()


def test_sync_thread_not_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the sync thread cannot start, the caller fsyncs its line itself."""
    writer = NDJSONWriter(tmp_path, durability="fsync")
    inodes = count_fsyncs(writer)

    def reject_start(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", reject_start)
    seq = writer._write_record("event", event(seq=1), None, None, sync_ahead=True)
    writer._wait_durable(seq)
    monkeypatch.undo()
    writer.close()

    assert len(inodes) >= 1
    assert writer.read_file(DATE)[0]["payload"]["seq"] == 1


def test_wake_after_close_starts_nothing(tmp_path: Path) -> None:
    """A line written while close() runs does not start the sync thread again."""
    writer = NDJSONWriter(tmp_path, durability="fsync")
    writer.append("event", event(seq=1))
    writer.close()

    assert writer._sync_thread.wake() is False
    names = [thread.name for thread in threading.enumerate()]
    assert f"telemetry-journal-sync-{tmp_path.name}" not in names


def test_close_stops_sync_thread(tmp_path: Path) -> None:
    """close() ends the sync thread."""
    writer = NDJSONWriter(tmp_path, durability="fsync")
    seq = writer._write_record("event", event(seq=1), None, None, sync_ahead=True)
    writer._wait_durable(seq)
    writer.close()
    names = [thread.name for thread in threading.enumerate()]
    assert f"telemetry-journal-sync-{tmp_path.name}" not in names


APPEND_SCRIPT = """
    import sys
    from telemetry.ndjson import NDJSONWriter

    directory, writer_id, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    writer = NDJSONWriter(directory, durability="none")
    print("ready", flush=True)
    sys.stdin.readline()
    padding = "x" * 2000
    for seq in range(count):
        writer.append(
            "event",
            {
                "run_id": writer_id,
                "timestamp": "2026-12-04T12:00:00+00:00",
                "payload": {"seq": seq, "padding": padding},
            },
        )
    writer.close()
"""


def test_processes_append(tmp_path: Path) -> None:
    """4 processes appending 500 records each to one file lose and tear no line."""
    processes = [
        run_python(
            APPEND_SCRIPT,
            str(tmp_path),
            f"process-{n}",
            "500",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        for n in range(4)
    ]
    # Every process has imported and opened before any appends, so the appends overlap.
    for process in processes:
        assert process.stdout is not None
        assert process.stdout.readline() == "ready\n"
    for process in processes:
        process.communicate("go\n", timeout=SUBPROCESS_TIMEOUT_SECONDS)

    assert [process.returncode for process in processes] == [0, 0, 0, 0]
    report = NDJSONWriter(tmp_path).read_file_report(DATE)
    assert report.corrupt_lines == 0
    for n in range(4):
        seqs = [r["payload"]["seq"] for r in report.records if r["run_id"] == f"process-{n}"]
        assert seqs == list(range(500)), n


# -- batch mode ----------------------------------------------------------------------------------


def test_batch_written_before_fsync(tmp_path: Path) -> None:
    """In batch mode a line is readable right after append, before any fsync."""
    writer = NDJSONWriter(tmp_path, durability="batch", batch_interval=3600)
    inodes = count_fsyncs(writer)
    for seq in range(3):
        writer.append("event", event(seq=seq))

    assert len(writer.read_file(DATE)) == 3
    assert inodes == []
    writer.close()


def test_batch_close_flushes(tmp_path: Path) -> None:
    """close() fsyncs the file and stops the batch thread."""
    writer = NDJSONWriter(tmp_path, durability="batch", batch_interval=3600)
    inodes = count_fsyncs(writer)
    writer.append("event", event())
    thread = writer._batch_thread

    writer.close()

    assert inodes == [writer.file_path(DATE).stat().st_ino]
    assert thread is not None
    assert not thread.is_alive()


def test_batch_thread_fsyncs(tmp_path: Path) -> None:
    """The batch thread fsyncs lines written since its last fsync."""
    writer = NDJSONWriter(tmp_path, durability="batch", batch_interval=0.01)
    synced = threading.Event()
    real_fsync = writer._fsync

    def signalling_fsync(fd: int) -> None:
        real_fsync(fd)
        synced.set()

    writer._fsync = signalling_fsync
    writer.append("event", event())

    assert synced.wait(SUBPROCESS_TIMEOUT_SECONDS)
    writer.close()


def test_flush_none_mode(tmp_path: Path) -> None:
    """flush() fsyncs new lines once, and does nothing when no line is new."""
    writer = NDJSONWriter(tmp_path, durability="none")
    inodes = count_fsyncs(writer)
    writer.append("event", event())

    writer.flush()
    writer.flush()

    assert len(inodes) == 1
    writer.close()


KILLED_SCRIPT = """
    import sys
    from telemetry.ndjson import NDJSONWriter

    directory, count = sys.argv[1], int(sys.argv[2])
    writer = NDJSONWriter(directory, durability="batch", batch_interval=3600)
    for seq in range(count):
        writer.append("event", {"timestamp": "2026-12-04T12:00:00+00:00", "seq": seq})
    print("done", flush=True)
    sys.stdin.read()
"""


def test_batch_survives_sigkill(tmp_path: Path) -> None:
    """Lines appended in batch mode survive a SIGKILL of the process before any fsync."""
    process = run_python(
        KILLED_SCRIPT, str(tmp_path), "300", stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=SUBPROCESS_TIMEOUT_SECONDS)

    report = NDJSONWriter(tmp_path).read_file_report(DATE)
    assert line == "done\n"
    assert process.returncode == -signal.SIGKILL
    assert report.corrupt_lines == 0
    assert [record["seq"] for record in report.records] == list(range(300))


# -- fork ------------------------------------------------------------------------------------------


def run_in_child(action: Callable[[], bool]) -> int:
    """Fork, run ``action`` in the child and return its exit code: 0 when it returned True."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(10)  # a deadlocked child dies instead of hanging the test
            code = 0 if action() else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


ignore_fork_warning = pytest.mark.filterwarnings("ignore:.*use of fork\\(\\):DeprecationWarning")


@ignore_fork_warning
def test_fork_both_append(journal: NDJSONWriter) -> None:
    """A forked child and its parent both append through the inherited writer."""
    journal.append("event", event(run_id="before-fork"))

    def child() -> bool:
        journal.append("event", event(run_id="child"))
        journal.close()
        return True

    exit_code = run_in_child(child)
    journal.append("event", event(run_id="parent"))
    report = journal.read_file_report(DATE)

    assert exit_code == 0
    assert report.corrupt_lines == 0
    assert sorted(r["run_id"] for r in report.records) == ["before-fork", "child", "parent"]


@ignore_fork_warning
def test_fork_while_locked(journal: NDJSONWriter) -> None:
    """A child forked while the writer's lock is held can still append."""
    journal.append("event", event(run_id="before-fork"))

    def child() -> bool:
        journal.append("event", event(run_id="child"))
        return True

    with journal._lock:
        exit_code = run_in_child(child)

    assert exit_code == 0
    assert len(journal.read_file(DATE)) == 2


@ignore_fork_warning
def test_fork_restarts_batch_thread(tmp_path: Path) -> None:
    """A forked child starts its own batch thread on its first append."""
    writer = NDJSONWriter(tmp_path, durability="batch", batch_interval=3600)
    writer.append("event", event(run_id="parent"))

    def child() -> bool:
        writer.append("event", event(run_id="child"))
        thread = writer._batch_thread
        return thread is not None and thread.is_alive()

    exit_code = run_in_child(child)
    writer.close()

    assert exit_code == 0


# -- files, dates and settings ------------------------------------------------------------------


def test_permissions(tmp_path: Path) -> None:
    """Directories, parents included, are created 0o700 and files 0o600."""
    writer = NDJSONWriter(tmp_path / "a" / "b" / "journal")
    writer.append("event", event())
    writer.close()

    for directory in ("a", "a/b", "a/b/journal"):
        assert stat.S_IMODE((tmp_path / directory).stat().st_mode) == 0o700, directory
    assert stat.S_IMODE(writer.file_path(DATE).stat().st_mode) == 0o600


def test_directory_created_on_append(tmp_path: Path) -> None:
    """Creating a writer creates no directory."""
    NDJSONWriter(tmp_path / "journal").close()

    assert not (tmp_path / "journal").exists()


def test_list_files_order(journal: NDJSONWriter) -> None:
    """list_files returns journal files oldest first and skips other names."""
    for day in ("2027-01-01", "2026-02-03", "2026-12-31"):
        journal.append("event", event(timestamp=f"{day}T00:00:00+00:00"))
    for name in ("notes.txt", "events_2026-12-04.ndjson", "events_20261332.ndjson"):
        (journal.directory / name).write_text("{}\n")

    assert [path.name for path in journal.list_files()] == [
        "events_20260203.ndjson",
        "events_20261231.ndjson",
        "events_20270101.ndjson",
    ]


def test_list_files_skips_directories(journal: NDJSONWriter) -> None:
    """A directory with the name of a journal file is not listed."""
    journal.append("event", event(timestamp="2026-12-04T00:00:00+00:00"))
    (journal.directory / "events_20261205.ndjson").mkdir()

    assert [path.name for path in journal.list_files()] == ["events_20261204.ndjson"]


def test_reading_matches_journal_reader(journal: NDJSONWriter) -> None:
    """read_file_report and list_files return what JournalReader returns for the directory."""
    journal.append("event", event(timestamp="2026-12-04T00:00:00+00:00"))
    journal.append("event", event(timestamp="2026-12-05T00:00:00+00:00"))
    with journal.file_path(DATE).open("ab") as file:
        file.write(b"garbage\n")
    reader = JournalReader(journal.directory)

    assert journal.read_file_report(DATE) == reader.read(journal.file_path(DATE))
    assert journal.list_files() == [journal_file.path for journal_file in reader.files()]


def test_list_files_missing_directory(journal: NDJSONWriter) -> None:
    """list_files of a directory that does not exist yet is empty."""
    assert journal.list_files() == []


def test_file_info(journal: NDJSONWriter) -> None:
    """get_file_info reports the size, lines, corrupt lines and first and last times."""
    journal.append("run_start", {"run_id": "run-1", "start_time": "2026-12-04T01:00:00+00:00"})
    journal.append("event", event(timestamp="2026-12-04T02:00:00+00:00"))
    with journal.file_path(DATE).open("ab") as file:
        file.write(b"garbage\n")
    journal.append(
        "run_end",
        {
            "run_id": "run-1",
            "start_time": "2026-12-04T01:00:00+00:00",
            "end_time": "2026-12-04T03:00:00+00:00",
        },
    )

    info = journal.get_file_info("2026-12-04")

    assert info["path"] == journal.file_path(DATE)
    assert info["date"] == DATE
    assert info["size_bytes"] == journal.file_path(DATE).stat().st_size
    assert info["line_count"] == 4
    assert info["corrupt_lines"] == 1
    assert info["first_timestamp"] == "2026-12-04T01:00:00+00:00"
    assert info["last_timestamp"] == "2026-12-04T03:00:00+00:00"


def test_file_info_missing(journal: NDJSONWriter) -> None:
    """get_file_info of a day without a file raises FileNotFoundError naming the path."""
    with pytest.raises(FileNotFoundError, match=re.escape(str(journal.file_path(DATE)))):
        journal.get_file_info(DATE)


def test_file_path_forms(journal: NDJSONWriter) -> None:
    """YYYYMMDD and YYYY-MM-DD name the same file."""
    assert journal.file_path("2026-12-04") == journal.directory / "events_20261204.ndjson"
    assert journal.file_path("20261204") == journal.directory / "events_20261204.ndjson"


@pytest.mark.parametrize(
    "date_str", ["2026124", "2026-1204", "20261332", "2026/12/04", "abcdefgh", "", "2026-12-04 "]
)
def test_date_invalid(journal: NDJSONWriter, date_str: str) -> None:
    """A date that is not YYYYMMDD or YYYY-MM-DD raises ValueError naming it."""
    with pytest.raises(
        ValueError, match=re.escape(f"invalid date {date_str!r}: expected YYYYMMDD")
    ):
        journal.read_file(date_str)


@pytest.mark.parametrize(
    ("durability", "batch_interval", "key"),
    [
        ("sometimes", 1.0, "durability"),
        ("batch", 0, "batch_interval"),
        ("batch", -1.0, "batch_interval"),
        ("batch", float("nan"), "batch_interval"),
        ("batch", True, "batch_interval"),
    ],
)
def test_settings_invalid(tmp_path: Path, durability: str, batch_interval: float, key: str) -> None:
    """An invalid durability or batch_interval raises ConfigError naming the setting."""
    with pytest.raises(ConfigError, match=f"invalid {key}="):
        NDJSONWriter(tmp_path, durability=durability, batch_interval=batch_interval)


def test_deleted_file_reopened(tmp_path: Path, journal_logs: pytest.LogCaptureFixture) -> None:
    """A journal file deleted while a writer has it open is recreated on the next append."""
    writer = NDJSONWriter(tmp_path, durability="none")
    writer.append("event", event(n=1))
    writer.file_path(DATE).unlink()

    writer.append("event", event(n=2))
    writer.close()

    assert [line["payload"]["n"] for line in NDJSONWriter(tmp_path).read_file(DATE)] == [2]
    assert any("deleted or replaced" in text for text in messages(journal_logs))


def test_replaced_file_reopened(tmp_path: Path) -> None:
    """A journal file replaced by another file gets the next lines, not the old inode."""
    writer = NDJSONWriter(tmp_path, durability="none")
    writer.append("event", event(n=1))
    replacement = tmp_path / "replacement"
    replacement.write_bytes(writer.file_path(DATE).read_bytes())
    os.replace(replacement, writer.file_path(DATE))

    writer.append("event", event(n=2))
    writer.close()

    assert [line["payload"]["n"] for line in NDJSONWriter(tmp_path).read_file(DATE)] == [1, 2]


def test_failed_append_releases_lock(tmp_path: Path) -> None:
    """An append that fails after taking the file lock releases it for other writers."""
    directory = tmp_path / "journal"
    first = NDJSONWriter(directory, durability="none")
    second = NDJSONWriter(directory, durability="none")
    first.append("event", event(n=1))
    second.append("event", event(n=2))
    moved = tmp_path / "moved"
    directory.rename(moved)
    directory.write_text("a file where the journal directory was")

    with pytest.raises(NotADirectoryError):
        first.append("event", event(n=3))
    outcome: list[BaseException] = []
    appender = threading.Thread(target=lambda: _append_capturing(second, outcome))
    appender.start()
    appender.join(timeout=30)

    assert not appender.is_alive()
    assert isinstance(outcome[0], OSError)
    first.close()
    second.close()


def _append_capturing(writer: NDJSONWriter, outcome: list[BaseException]) -> None:
    try:
        writer.append("event", event(n=4))
    except BaseException as exc:
        outcome.append(exc)
