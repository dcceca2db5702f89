"""Tests of telemetry.journal against journals written by NDJSONWriter and TelemetryClient."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

import telemetry
from telemetry import TelemetryClient, TelemetryConfig, journal
from telemetry.database import DatabaseWriter
from telemetry.journal import JournalFile, JournalReader, JournalRuns
from telemetry.models import RunRecord
from telemetry.ndjson import NDJSONWriter

DAY1, DAY2, DAY3, DAY4 = "20261204", "20261205", "20261206", "20261207"

# The subprocesses import the same telemetry package as this test process.
SUBPROCESS_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(
        [str(Path(telemetry.__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]
    ),
}
SUBPROCESS_TIMEOUT_SECONDS = 60

# follow() tests fail rather than loop forever when the reader never reaches the end.
MAX_SLEEPS = 50


@pytest.fixture
def journal_dir(tmp_path: Path) -> Path:
    return tmp_path / "journal"


@pytest.fixture
def writer(journal_dir: Path) -> Iterator[NDJSONWriter]:
    journal = NDJSONWriter(journal_dir, durability="none")
    yield journal
    journal.close()


@pytest.fixture
def reader(journal_dir: Path) -> JournalReader:
    return JournalReader(journal_dir)


@pytest.fixture
def journal_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="telemetry.journal")
    return caplog


def at(day: str, clock: str = "12:00:00") -> str:
    """Return the ISO 8601 UTC time of ``clock`` on ``day`` (YYYYMMDD)."""
    return f"{day[:4]}-{day[4:6]}-{day[6:]}T{clock}.000000+00:00"


def run_record(run_id: str, start_time: str, **fields: Any) -> RunRecord:
    values: dict[str, Any] = {
        "agent_name": "crawler",
        "job_type": "crawl",
        "hostname": "host-a",
        "pid": 4242,
        "created_at": start_time,
        "updated_at": start_time,
    }
    values.update(fields)
    return RunRecord(run_id=run_id, start_time=start_time, **values)


def ended(record: RunRecord, end_time: str, status: str = "success", **fields: Any) -> RunRecord:
    return dataclasses.replace(
        record, status=status, end_time=end_time, duration_ms=1000, updated_at=end_time, **fields
    )


def event(run_id: str, timestamp: str, seq: int = 0) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "event_type": "step",
        "timestamp": timestamp,
        "payload": {"seq": seq},
        "agent_name": "crawler",
        "schema_version": 1,
    }


def file_of(journal_dir: Path, day: str) -> Path:
    return journal_dir / f"events_{day}.ndjson"


def append_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as file:
        file.write(data)


def json_line(record: dict[str, Any]) -> bytes:
    return orjson.dumps(record) + b"\n"


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "telemetry.journal" and record.levelno == logging.WARNING
    ]


def append_events(writer: NDJSONWriter, day: str, *numbers: int) -> None:
    for seq in numbers:
        writer.append("event", event("run-1", at(day), seq))


def seqs(records: list[dict[str, Any]]) -> list[int]:
    return [record["payload"]["seq"] for record in records]


# -- files -------------------------------------------------------------------------------------


def test_files_oldest_first(writer: NDJSONWriter, reader: JournalReader, journal_dir: Path) -> None:
    """Journal files are listed oldest first, and other names are left out."""
    for day in (DAY3, DAY1, DAY2):
        writer.append("event", event("run-1", at(day)))
    (journal_dir / "notes.txt").write_text("not a journal file")
    (journal_dir / "events_2026120.ndjson").write_text("")
    (journal_dir / "events_20261332.ndjson").write_text("")
    (journal_dir / "events_20261208.ndjson").mkdir()

    assert reader.files() == [
        JournalFile(DAY1, file_of(journal_dir, DAY1)),
        JournalFile(DAY2, file_of(journal_dir, DAY2)),
        JournalFile(DAY3, file_of(journal_dir, DAY3)),
    ]


@pytest.mark.parametrize(
    ("first_date", "last_date", "expected"),
    [
        (DAY2, None, [DAY2, DAY3, DAY4]),
        (None, DAY2, [DAY1, DAY2]),
        ("2026-12-05", "2026-12-06", [DAY2, DAY3]),
        (datetime.date(2026, 12, 5), datetime.date(2026, 12, 5), [DAY2]),
        (
            datetime.datetime(
                2026, 12, 6, 1, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=3))
            ),
            None,
            [DAY2, DAY3, DAY4],
        ),
        (DAY3, DAY2, []),
    ],
)
def test_files_date_range(
    writer: NDJSONWriter,
    reader: JournalReader,
    first_date: Any,
    last_date: Any,
    expected: list[str],
) -> None:
    """Only files dated within the inclusive range are listed, whatever the date form."""
    for day in (DAY1, DAY2, DAY3, DAY4):
        writer.append("event", event("run-1", at(day)))

    dates = [journal_file.date for journal_file in reader.files(first_date, last_date)]

    assert dates == expected


def test_files_missing_directory(tmp_path: Path) -> None:
    """A journal directory that does not exist has no files."""
    assert JournalReader(tmp_path / "nowhere").files() == []


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ("2026-13-01", ValueError, "invalid first_date '2026-13-01'"),
        ("yesterday", ValueError, "expected YYYYMMDD, YYYY-MM-DD"),
        (20261204, TypeError, "not int"),
        (datetime.datetime(2026, 12, 4), ValueError, "naive datetime"),
    ],
)
def test_files_invalid_date(reader: JournalReader, value: Any, error: type, message: str) -> None:
    """An invalid date raises, naming the argument and the forms it takes."""
    with pytest.raises(error, match=message):
        reader.files(value)


# -- read --------------------------------------------------------------------------------------


def test_read_skips_corrupt_lines(
    writer: NDJSONWriter,
    reader: JournalReader,
    journal_dir: Path,
    journal_logs: pytest.LogCaptureFixture,
) -> None:
    """Invalid JSON, invalid UTF-8, non-objects and a torn last line are counted as corrupt."""
    path = file_of(journal_dir, DAY1)
    writer.append("event", event("run-1", at(DAY1), seq=1))
    append_bytes(path, b"not json\n\xff\xfe{}\n[1, 2]\n\n")
    writer.append("event", event("run-1", at(DAY1), seq=2))
    append_bytes(path, b'{"record_type": "event", "run_id": "ru')

    result = reader.read(path)

    assert result.path == path
    assert seqs(result.records) == [1, 2]
    assert result.corrupt_lines == 4
    assert warnings_of(journal_logs) == [f"skipped 4 corrupt lines in {path}"]


def test_read_missing_file(reader: JournalReader, journal_dir: Path) -> None:
    """A file that does not exist reads as empty."""
    result = reader.read(file_of(journal_dir, DAY1))

    assert result.records == []
    assert result.corrupt_lines == 0


# -- run_records -------------------------------------------------------------------------------


def write_midnight_run(writer: NDJSONWriter, journal_dir: Path) -> RunRecord:
    """Journal run-1 from 23:59 on DAY2 to 00:01 on DAY3, between other runs' lines.

    DAY1 and DAY4 contain corrupt lines and a stray event of run-1, which a reader of only
    DAY2 and DAY3 never reads.
    """
    append_bytes(file_of(journal_dir, DAY1), b"corrupt\n")
    writer.append("event", event("run-1", at(DAY1), seq=0))

    start = run_record("run-1", at(DAY2, "23:59:00"))
    other = run_record("run-2", at(DAY2, "23:59:30"))
    writer.append("run_start", start.to_dict())
    writer.append("run_start", other.to_dict())
    writer.append("event", event("run-1", at(DAY2, "23:59:40"), seq=1))
    writer.append("event", event("run-2", at(DAY2, "23:59:50"), seq=9))
    writer.append("event", event("run-1", at(DAY3, "00:00:10"), seq=2))
    end = ended(start, at(DAY3, "00:01:00"))
    writer.append("run_end", end.to_dict())
    writer.append("run_end", ended(other, at(DAY3, "00:02:00")).to_dict())

    append_bytes(file_of(journal_dir, DAY4), b"corrupt\n")
    writer.append("event", event("run-1", at(DAY4), seq=3))
    return end


def test_run_records_in_journal_order(
    writer: NDJSONWriter, reader: JournalReader, journal_dir: Path
) -> None:
    """A run's start, events and end are found across midnight, and no other run's lines."""
    end = write_midnight_run(writer, journal_dir)

    records = reader.run_records("run-1", end.start_time, end.end_time)

    assert [record["record_type"] for record in records] == [
        "run_start",
        "event",
        "event",
        "run_end",
    ]
    assert seqs(records[1:3]) == [1, 2]
    assert records[3] == {"record_type": "run_end", **end.to_dict()}


def test_run_records_skips_other_dates(
    writer: NDJSONWriter,
    reader: JournalReader,
    journal_dir: Path,
    journal_logs: pytest.LogCaptureFixture,
) -> None:
    """Files dated outside the run are not read: their lines and corrupt lines go unseen."""
    end = write_midnight_run(writer, journal_dir)

    records = reader.run_records("run-1", end.start_time, end.end_time)

    assert all(record.get("payload", {}).get("seq") in (None, 1, 2) for record in records)
    assert warnings_of(journal_logs) == []


def test_run_records_opens_only_dated_files(writer: NDJSONWriter, journal_dir: Path) -> None:
    """An audit hook in a fresh process records that only the run's dated files are opened."""
    end = write_midnight_run(writer, journal_dir)
    script = """
        import sys
        from pathlib import Path
        from telemetry.journal import JournalReader

        opened = []
        def record_open(event, args):
            if event == "open" and isinstance(args[0], (str, Path)):
                opened.append(Path(args[0]).name)

        reader = JournalReader(sys.argv[1])
        sys.addaudithook(record_open)
        reader.run_records("run-1", sys.argv[2], sys.argv[3])
        print(" ".join(name for name in opened if name.startswith("events_")))
    """
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(script),
            str(journal_dir),
            end.start_time,
            str(end.end_time),
        ],
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_SECONDS,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [f"events_{DAY2}.ndjson", f"events_{DAY3}.ndjson"]


def test_run_records_running_run(
    writer: NDJSONWriter, reader: JournalReader, journal_dir: Path
) -> None:
    """Without an end time, the files from the start to the newest are read."""
    end = write_midnight_run(writer, journal_dir)

    records = reader.run_records("run-1", end.start_time)

    assert seqs([record for record in records if record["record_type"] == "event"]) == [1, 2, 3]


def test_run_records_end_before_start(
    writer: NDJSONWriter, reader: JournalReader, journal_dir: Path
) -> None:
    """An end time before the start, after a clock step, still selects both dates."""
    end = write_midnight_run(writer, journal_dir)

    records = reader.run_records("run-1", str(end.end_time), end.start_time)

    assert len(records) == 4


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        (("run-1", "yesterday"), ValueError, "invalid timestamp 'yesterday'"),
        (("run-1", at(DAY1), "2026-12-04T12:00:00"), ValueError, "has no UTC offset"),
        ((None, at(DAY1)), TypeError, "run_id must be a str"),
    ],
)
def test_run_records_invalid_arguments(
    reader: JournalReader, arguments: tuple[Any, ...], error: type, message: str
) -> None:
    """An invalid run id or time raises, naming the value."""
    with pytest.raises(error, match=message):
        reader.run_records(*arguments)


# -- fold_runs ---------------------------------------------------------------------------------


def test_fold_runs_matches_live_index(tmp_path: Path) -> None:
    """Runs recorded by a real client fold into the same records as its index rows."""
    config = TelemetryConfig(data_dir=tmp_path / "store", api_url=None, environ={})
    with TelemetryClient(config) as client:
        good = client.start_run("importer", "import", items_discovered=3)
        client.log_event(good, "progress", {"done": 1})
        client.end_run(good, items_succeeded=3, metrics_json={"rows": 7})
        bad = client.start_run("exporter", "export", product="shop")
        client.end_run(bad, "failed", error_summary="ValueError: no rows")

    folded = JournalReader(config.ndjson_dir).fold_runs()
    index = DatabaseWriter(config.db_path)
    try:
        rows = {run_id: index.get_run(run_id) for run_id in (good, bad)}
    finally:
        index.close()

    assert list(folded.runs) == [good, bad]
    assert folded.runs == rows
    assert folded.corrupt_lines == {}


def test_fold_runs_end_wins_over_later_start(
    writer: NDJSONWriter, reader: JournalReader, journal_dir: Path
) -> None:
    """A run_end in an earlier file than its run_start still decides the run."""
    start = run_record("run-1", at(DAY2))
    end = ended(start, at(DAY2, "12:05:00"))
    writer.append("run_end", end.to_dict(), timestamp=at(DAY1))
    writer.append("run_start", start.to_dict())

    folded = reader.fold_runs()

    assert folded.runs == {"run-1": end}
    assert folded.files == 2


def test_fold_runs_later_end_wins(writer: NDJSONWriter, reader: JournalReader) -> None:
    """Of two run_end lines, the later one in journal order wins."""
    start = run_record("run-1", at(DAY1))
    writer.append("run_start", start.to_dict())
    writer.append("run_end", ended(start, at(DAY2), "failed").to_dict())
    writer.append("run_end", ended(start, at(DAY1, "13:00:00"), "timeout").to_dict())
    last = ended(start, at(DAY2, "13:00:00"), "abandoned")
    writer.append("run_end", last.to_dict())

    assert reader.fold_runs().runs == {"run-1": last}


def test_fold_runs_end_without_start(writer: NDJSONWriter, reader: JournalReader) -> None:
    """A run_end line alone makes a run, and a run_start alone a running one."""
    lone_end = ended(run_record("run-1", at(DAY1)), at(DAY1, "12:01:00"))
    lone_start = run_record("run-2", at(DAY1, "12:02:00"))
    writer.append("run_end", lone_end.to_dict())
    writer.append("run_start", lone_start.to_dict())

    runs = reader.fold_runs().runs

    assert runs == {"run-1": lone_end, "run-2": lone_start}
    assert runs["run-2"].status == "running"


VALID_START = run_record("run-bad", at(DAY1)).to_dict()

INVALID_LINES = {
    "invalid JSON": b"not json\n",
    "invalid UTF-8": b'{"record_type": "event", "run_id": "\xff"}\n',
    "JSON array": b"[1, 2]\n",
    "torn line": b'{"record_type": "run_start", "run_id": "ru\n',
    "no record_type": json_line({"run_id": "run-bad"}),
    "unknown record_type": json_line({**VALID_START, "record_type": "note"}),
    "missing field": json_line(
        {"record_type": "run_start", **{k: v for k, v in VALID_START.items() if k != "job_type"}}
    ),
    "null required field": json_line(
        {"record_type": "run_start", **VALID_START, "agent_name": None}
    ),
    "empty run_id": json_line({"record_type": "run_start", **VALID_START, "run_id": ""}),
    "wrong type": json_line({"record_type": "run_start", **VALID_START, "pid": "4242"}),
    "bool for int": json_line({"record_type": "run_start", **VALID_START, "items_failed": True}),
    "float for int": json_line({"record_type": "run_end", **VALID_START, "duration_ms": 1.5}),
    "int past 64 bits": json_line(
        {"record_type": "run_start", **VALID_START, "items_discovered": 2**63}
    ),
    "metrics not an object": json_line(
        {"record_type": "run_start", **VALID_START, "metrics_json": "{}"}
    ),
    "unknown status": json_line({"record_type": "run_end", **VALID_START, "status": "done"}),
    "time without offset": json_line(
        {"record_type": "run_start", **VALID_START, "start_time": "2026-12-04T12:00:00"}
    ),
    "invalid end_time": json_line({"record_type": "run_end", **VALID_START, "end_time": "later"}),
    "event without event_type": json_line(
        {"record_type": "event", "run_id": "run-bad", "timestamp": at(DAY1)}
    ),
    "event with invalid time": json_line({"record_type": "event", **event("run-bad", "noon")}),
}


@pytest.mark.parametrize("line", INVALID_LINES.values(), ids=INVALID_LINES.keys())
def test_fold_runs_counts_corrupt_line(
    writer: NDJSONWriter, reader: JournalReader, journal_dir: Path, line: bytes
) -> None:
    """A line that would not make a valid record is counted as corrupt and skipped."""
    good = run_record("run-1", at(DAY1))
    writer.append("run_start", good.to_dict())
    append_bytes(file_of(journal_dir, DAY1), line)
    writer.append("event", event("run-1", at(DAY1)))
    writer.append("run_start", run_record("run-2", at(DAY2)).to_dict())

    folded = reader.fold_runs()

    assert list(folded.runs) == ["run-1", "run-2"]
    assert folded.corrupt_lines == {file_of(journal_dir, DAY1): 1}


def test_fold_runs_one_warning_per_file(
    writer: NDJSONWriter,
    reader: JournalReader,
    journal_dir: Path,
    journal_logs: pytest.LogCaptureFixture,
) -> None:
    """Corrupt lines are logged once per file, with the count and the first problem."""
    for day in (DAY1, DAY2):
        writer.append("run_start", run_record(f"run-{day}", at(day)).to_dict())
    for line in INVALID_LINES.values():
        append_bytes(file_of(journal_dir, DAY1), line)
    append_bytes(file_of(journal_dir, DAY3), INVALID_LINES["wrong type"])

    folded = reader.fold_runs()

    assert folded.corrupt_lines == {
        file_of(journal_dir, DAY1): len(INVALID_LINES),
        file_of(journal_dir, DAY3): 1,
    }
    messages = warnings_of(journal_logs)
    assert len(messages) == 2
    assert messages[0].startswith(
        f"skipped {len(INVALID_LINES)} corrupt lines in {file_of(journal_dir, DAY1)}, the first "
        "at line 2: invalid JSON: "
    )
    assert messages[1] == (
        f"skipped 1 corrupt line in {file_of(journal_dir, DAY3)}, the first at line 1: "
        "run_start: pid is str, expected int or null"
    )


def test_read_one_corrupt_line(
    writer: NDJSONWriter,
    reader: JournalReader,
    journal_dir: Path,
    journal_logs: pytest.LogCaptureFixture,
) -> None:
    """The warning about a single corrupt line uses the singular."""
    path = file_of(journal_dir, DAY1)
    writer.append("event", event("run-1", at(DAY1), seq=1))
    append_bytes(path, b"not json\n")

    reader.read(path)

    assert warnings_of(journal_logs) == [f"skipped 1 corrupt line in {path}"]


TORN_LINES = {
    "cut in a key": b'{"record_type": "event", "run_id": "ru\n',
    "cut after a comma": b'{"record_type": "event",\n',
    "cut in a number": b'{"record_type": "run_start", "pid": 12\n',
    "cut in a character": '{"record_type": "event", "payload": "日本'.encode()[:-1] + b"\n",
    "cut after an escape": b'{"record_type": "event", "payload": "a\\\n',
}
NOT_TORN_LINES = {
    "garbage": b"not json\n",
    "array start": b"[1, 2\n",
    "bad separator": b'{"record_type" "event"}\n',
    "extra brace": b'{"record_type": "event"}}\n',
    "invalid UTF-8 inside": b'{"record_type": "\xff\xfe"}\n',
}


@pytest.mark.parametrize("line", TORN_LINES.values(), ids=TORN_LINES.keys())
def test_fold_runs_counts_torn_line(
    writer: NDJSONWriter, reader: JournalReader, journal_dir: Path, line: bytes
) -> None:
    """A JSON object cut short and closed by a newline counts as corrupt and as torn."""
    writer.append("run_start", run_record("run-1", at(DAY1)).to_dict())
    append_bytes(file_of(journal_dir, DAY1), line)
    writer.append("event", event("run-1", at(DAY1)))

    folded = reader.fold_runs()

    assert folded.corrupt_lines == {file_of(journal_dir, DAY1): 1}
    assert folded.torn_lines == {file_of(journal_dir, DAY1): 1}


NOT_TORN_LINES.update((name, line) for name, line in INVALID_LINES.items() if name != "torn line")


@pytest.mark.parametrize("line", NOT_TORN_LINES.values(), ids=NOT_TORN_LINES.keys())
def test_fold_runs_not_torn_line(
    writer: NDJSONWriter, reader: JournalReader, journal_dir: Path, line: bytes
) -> None:
    """Other corrupt lines are not counted as torn."""
    writer.append("run_start", run_record("run-1", at(DAY1)).to_dict())
    append_bytes(file_of(journal_dir, DAY1), line)
    writer.append("event", event("run-1", at(DAY1)))

    folded = reader.fold_runs()

    assert folded.corrupt_lines == {file_of(journal_dir, DAY1): 1}
    assert folded.torn_lines == {}


def test_fold_runs_torn_last_line(
    writer: NDJSONWriter, reader: JournalReader, journal_dir: Path
) -> None:
    """A torn last line that no writer has closed yet counts as torn too."""
    writer.append("run_start", run_record("run-1", at(DAY1)).to_dict())
    append_bytes(file_of(journal_dir, DAY1), b'{"record_type": "run_end", "run_id": "run-1"')

    folded = reader.fold_runs()

    assert folded.torn_lines == {file_of(journal_dir, DAY1): 1}


def test_fold_runs_progress(writer: NDJSONWriter, reader: JournalReader) -> None:
    """progress is called after each file with the files done and the total."""
    for day in (DAY1, DAY2, DAY3):
        writer.append("run_start", run_record(f"run-{day}", at(day)).to_dict())
    calls: list[tuple[int, int]] = []

    reader.fold_runs(progress=lambda done, total: calls.append((done, total)))

    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_fold_runs_empty_journal(tmp_path: Path) -> None:
    """A missing journal directory folds into no runs."""
    assert JournalReader(tmp_path / "nowhere").fold_runs() == JournalRuns({}, 0, {})


# -- follow ------------------------------------------------------------------------------------


class Script:
    """A sleep() that runs the next scripted step per call, and a stop() for the end.

    stop() turns true at the first sleep after the last step, so by then the reader has
    read to the end of what the steps wrote.
    """

    def __init__(self, *steps: Callable[[], None]) -> None:
        self.steps = list(steps)
        self.sleeps: list[float] = []
        self.finished = False

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if len(self.sleeps) > MAX_SLEEPS:
            raise AssertionError(f"follow() slept {MAX_SLEEPS} times without reaching the end")
        if self.steps:
            self.steps.pop(0)()
        else:
            self.finished = True

    def stop(self) -> bool:
        return self.finished


def follow_all(reader: JournalReader, script: Script, **options: Any) -> list[dict[str, Any]]:
    options.setdefault("today", lambda: DAY1)
    return list(reader.follow(sleep=script.sleep, stop=script.stop, **options))


def test_follow_backlog(writer: NDJSONWriter, reader: JournalReader) -> None:
    """The last `backlog` records of today's file come first."""
    for seq in range(15):
        writer.append("event", event("run-1", at(DAY1), seq))

    assert seqs(follow_all(reader, Script(), backlog=10)) == list(range(5, 15))


def test_follow_backlog_zero(writer: NDJSONWriter, reader: JournalReader) -> None:
    """With no backlog only records appended after the start are yielded."""
    writer.append("event", event("run-1", at(DAY1), 0))
    script = Script(lambda: writer.append("event", event("run-1", at(DAY1), 1)))

    assert seqs(follow_all(reader, script, backlog=0)) == [1]


def test_follow_appended_records(writer: NDJSONWriter, reader: JournalReader) -> None:
    """Records appended while following are yielded in order."""
    writer.append("event", event("run-1", at(DAY1), 0))
    script = Script(
        lambda: writer.append("event", event("run-1", at(DAY1), 1)),
        lambda: None,
        lambda: append_events(writer, DAY1, 2, 3),
    )

    assert seqs(follow_all(reader, script)) == [0, 1, 2, 3]


def test_follow_sleeps_poll_interval(writer: NDJSONWriter, reader: JournalReader) -> None:
    """The reader sleeps poll_interval seconds whenever nothing is new."""
    writer.append("event", event("run-1", at(DAY1), 0))
    script = Script(lambda: None, lambda: None)

    follow_all(reader, script, poll_interval=0.5)

    assert script.sleeps == [0.5, 0.5, 0.5]


def test_follow_partial_line(
    reader: JournalReader, journal_dir: Path, journal_logs: pytest.LogCaptureFixture
) -> None:
    """A line is yielded once, when its newline arrives, and not taken for corrupt."""
    path = file_of(journal_dir, DAY1)
    append_bytes(path, b"")
    line = json_line({"record_type": "event", **event("run-1", at(DAY1), 7)})
    script = Script(
        lambda: append_bytes(path, line[:20]),
        lambda: append_bytes(path, line[20:-1]),
        lambda: append_bytes(path, b"\n"),
    )

    assert seqs(follow_all(reader, script)) == [7]
    assert warnings_of(journal_logs) == []


def test_follow_long_line_copied_once(
    reader: JournalReader, journal_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 20 MB line read in many chunks is joined once, so reading it takes linear work."""
    payload = "x" * (20 * 1024 * 1024)
    lines = b"".join(
        json_line({"record_type": "event", **event("run-1", at(DAY1), seq)}) for seq in (0, 2)
    )
    long_line = json_line({"record_type": "event", **event("run-1", at(DAY1), 1), "big": payload})
    path = file_of(journal_dir, DAY1)
    append_bytes(path, lines[: len(lines) // 2] + long_line + lines[len(lines) // 2 :])
    joined: list[int] = []
    join = journal._join_chunks

    def counting_join(chunks: list[bytes]) -> bytes:
        joined.append(sum(map(len, chunks)))
        return join(chunks)

    monkeypatch.setattr(journal, "_join_chunks", counting_join)

    records = follow_all(reader, Script(), backlog=5)

    assert seqs(records) == [0, 1, 2]
    assert records[1]["big"] == payload
    assert len(joined) == 1
    assert joined[0] < path.stat().st_size


def test_follow_skips_corrupt_lines(
    writer: NDJSONWriter,
    reader: JournalReader,
    journal_dir: Path,
    journal_logs: pytest.LogCaptureFixture,
) -> None:
    """Corrupt lines are skipped with a WARNING each, and the lines after them yielded."""
    path = file_of(journal_dir, DAY1)
    writer.append("event", event("run-1", at(DAY1), 0))
    script = Script(
        lambda: append_bytes(path, b"not json\n\xff\xfe\n[1, 2]\n"),
        lambda: writer.append("event", event("run-1", at(DAY1), 1)),
    )

    records = follow_all(reader, script)

    assert seqs(records) == [0, 1]
    assert len(warnings_of(journal_logs)) == 3
    assert all(str(path) in message for message in warnings_of(journal_logs))


def test_follow_torn_line_closed_by_writer(
    writer: NDJSONWriter,
    reader: JournalReader,
    journal_dir: Path,
    journal_logs: pytest.LogCaptureFixture,
) -> None:
    """A line torn by a crash becomes corrupt when the next append ends it, and is skipped."""
    path = file_of(journal_dir, DAY1)
    writer.append("event", event("run-1", at(DAY1), 0))
    script = Script(
        lambda: append_bytes(path, b'{"record_type": "event", "run_id": "ru'),
        lambda: writer.append("event", event("run-1", at(DAY1), 1)),
    )

    assert seqs(follow_all(reader, script)) == [0, 1]
    skipped = [m for m in warnings_of(journal_logs) if m.startswith("skipped a corrupt line")]
    assert len(skipped) == 1
    assert skipped[0] == (
        f"skipped a corrupt line at offset 170 of {path}: a JSON object cut short, as a crash "
        "during an append leaves it"
    )


def test_follow_rolls_over(writer: NDJSONWriter, reader: JournalReader) -> None:
    """After today's file, the next day's file is read from its start."""
    writer.append("event", event("run-1", at(DAY1), 0))

    def midnight() -> None:
        writer.append("event", event("run-1", at(DAY1, "23:59:59"), 1))
        writer.append("event", event("run-1", at(DAY2, "00:00:00"), 2))
        writer.append("event", event("run-1", at(DAY2, "00:00:01"), 3))

    script = Script(midnight, lambda: writer.append("event", event("run-1", at(DAY2), 4)))

    assert seqs(follow_all(reader, script)) == [0, 1, 2, 3, 4]


def test_follow_earliest_later_file(writer: NDJSONWriter, reader: JournalReader) -> None:
    """Of several later files, the earliest is read first, and then the next."""
    writer.append("event", event("run-1", at(DAY1), 0))
    today = [DAY1]

    def later_files() -> None:
        writer.append("event", event("run-1", at(DAY3), 3))
        writer.append("event", event("run-1", at(DAY2), 2))
        today[0] = DAY2

    records = follow_all(reader, Script(later_files), today=lambda: today[0])

    assert seqs(records) == [0, 2, 3]


def test_follow_ignores_far_future_file(
    writer: NDJSONWriter,
    reader: JournalReader,
    journal_dir: Path,
    journal_logs: pytest.LogCaptureFixture,
) -> None:
    """A file dated two days ahead is not followed, so today's appends are still seen."""
    writer.append("event", event("run-1", at(DAY1), 0))
    writer.append("event", event("run-1", at(DAY3), 9))
    script = Script(
        lambda: writer.append("event", event("run-1", at(DAY1), 1)),
        noop,
        lambda: writer.append("event", event("run-1", at(DAY1), 2)),
    )

    records = follow_all(reader, script)

    assert seqs(records) == [0, 1, 2]
    assert warnings_of(journal_logs) == [
        f"ignoring journal file {file_of(journal_dir, DAY3)} while following, because it is "
        f"dated more than 1 day after today ({DAY1} UTC): it was written under a wrong clock "
        "or copied in; 'telemetry check' lists such files"
    ]


def test_follow_future_file_when_today_missing(
    writer: NDJSONWriter, reader: JournalReader, journal_dir: Path
) -> None:
    """While today's file is missing, a file dated far ahead is not taken for the next day."""
    writer.append("event", event("run-1", at(DAY4), 9))
    script = Script(noop, lambda: writer.append("event", event("run-1", at(DAY1), 1)))

    assert seqs(follow_all(reader, script)) == [1]


def test_follow_future_file_becomes_near(writer: NDJSONWriter, reader: JournalReader) -> None:
    """A file ignored as too far ahead is followed once today() comes within a day of it."""
    writer.append("event", event("run-1", at(DAY1), 0))
    writer.append("event", event("run-1", at(DAY3), 3))
    today = [DAY1]

    def next_day() -> None:
        today[0] = DAY2

    records = follow_all(reader, Script(noop, next_day), today=lambda: today[0])

    assert seqs(records) == [0, 3]


def test_follow_older_files_ignored(writer: NDJSONWriter, reader: JournalReader) -> None:
    """Files dated before today are not read."""
    writer.append("event", event("run-1", at(DAY1), 1))
    writer.append("event", event("run-1", at(DAY2), 2))

    records = follow_all(reader, Script(), today=lambda: "2026-12-05")

    assert seqs(records) == [2]


def noop() -> None:
    """Do nothing: a scripted sleep in which no file changes."""


def test_follow_late_line_in_previous_file(writer: NDJSONWriter, reader: JournalReader) -> None:
    """A line appended to the previous day's file just after the roll-over is yielded."""
    writer.append("event", event("run-1", at(DAY1, "23:59:59"), 1))
    script = Script(
        lambda: writer.append("event", event("run-1", at(DAY2, "00:00:00"), 3)),
        noop,
        lambda: writer.append("event", event("run-1", at(DAY1, "23:59:59"), 2)),
    )

    assert seqs(follow_all(reader, script)) == [1, 3, 2]


@pytest.mark.parametrize(
    ("poll_interval", "grace_sleeps"),
    [(0.25, 8), (1.0, 8), (0.0, 8), (0.1, 20)],
)
def test_follow_grace_period_ends(
    writer: NDJSONWriter, reader: JournalReader, poll_interval: float, grace_sleeps: int
) -> None:
    """The previous file is read up to the last sleep of its grace period, and not after."""
    today = [DAY1]

    def midnight() -> None:
        today[0] = DAY2
        writer.append("event", event("run-1", at(DAY2), 1))

    writer.append("event", event("run-1", at(DAY1), 0))
    script = Script(
        midnight,
        # The roll-over happens after the first sleep, so the grace period starts here.
        *[noop] * (grace_sleeps - 1),
        lambda: writer.append("event", event("run-1", at(DAY1), 2)),
        lambda: writer.append("event", event("run-1", at(DAY1), 3)),
        lambda: writer.append("event", event("run-1", at(DAY2), 4)),
    )

    records = follow_all(reader, script, poll_interval=poll_interval, today=lambda: today[0])

    assert seqs(records) == [0, 1, 2, 4]


def test_follow_keeps_today_until_midnight(writer: NDJSONWriter, reader: JournalReader) -> None:
    """A file dated tomorrow that appears early does not hide today's later records."""
    writer.append("event", event("run-1", at(DAY1), 0))
    script = Script(
        lambda: writer.append("event", event("run-1", at(DAY2), 1)),
        *[lambda seq=seq: writer.append("event", event("run-1", at(DAY1), seq)) for seq in (2, 3)],
        *[noop] * 20,
        lambda: writer.append("event", event("run-1", at(DAY1), 4)),
    )

    assert seqs(follow_all(reader, script)) == [0, 1, 2, 3, 4]


def test_follow_line_finished_after_roll_over(
    writer: NDJSONWriter,
    reader: JournalReader,
    journal_dir: Path,
    journal_logs: pytest.LogCaptureFixture,
) -> None:
    """A last line whose newline arrives after the roll-over is yielded whole."""
    path = file_of(journal_dir, DAY1)
    line = json_line({"record_type": "event", **event("run-1", at(DAY1), 1)})
    append_bytes(path, line[:20])
    script = Script(
        lambda: writer.append("event", event("run-1", at(DAY2), 2)),
        lambda: append_bytes(path, line[20:]),
    )

    assert seqs(follow_all(reader, script)) == [2, 1]
    assert warnings_of(journal_logs) == []


def test_follow_unfinished_line_after_grace(
    writer: NDJSONWriter,
    reader: JournalReader,
    journal_dir: Path,
    journal_logs: pytest.LogCaptureFixture,
) -> None:
    """A last line still unfinished when the grace period ends is dropped with a WARNING."""
    path = file_of(journal_dir, DAY1)
    today = [DAY1]

    def midnight() -> None:
        today[0] = DAY2
        writer.append("event", event("run-1", at(DAY2), 2))

    writer.append("event", event("run-1", at(DAY1), 0))
    script = Script(
        lambda: append_bytes(path, b'{"record_type": "ev'),
        midnight,
        *[noop] * 8,
    )

    assert seqs(follow_all(reader, script, today=lambda: today[0])) == [0, 2]
    assert len(warnings_of(journal_logs)) == 1
    assert "dropped the unfinished last line" in warnings_of(journal_logs)[0]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_follow_close_in_grace_period(writer: NDJSONWriter, reader: JournalReader) -> None:
    """Closing the iterator during a grace period closes both files it keeps open."""
    writer.append("event", event("run-1", at(DAY1), 0))
    writer.append("event", event("run-1", at(DAY2), 1))
    writer.close()
    before = len(os.listdir("/proc/self/fd"))
    records = reader.follow(today=lambda: DAY1, sleep=lambda _: None)

    assert seqs([next(records), next(records)]) == [0, 1]
    opened = len(os.listdir("/proc/self/fd"))
    records.close()

    assert opened == before + 2
    assert len(os.listdir("/proc/self/fd")) == before


def test_follow_waits_for_file(writer: NDJSONWriter, reader: JournalReader) -> None:
    """A missing file is waited for, and every record of it is yielded once it appears."""

    def create() -> None:
        for seq in range(12):
            writer.append("event", event("run-1", at(DAY1), seq))

    script = Script(lambda: None, create)

    assert seqs(follow_all(reader, script, backlog=10)) == list(range(12))


def test_follow_missing_today_later_file(writer: NDJSONWriter, reader: JournalReader) -> None:
    """While today's file is missing, a later-dated file is followed instead."""
    script = Script(lambda: writer.append("event", event("run-1", at(DAY2), 2)))

    assert seqs(follow_all(reader, script)) == [2]


def test_follow_replaced_file(
    writer: NDJSONWriter,
    reader: JournalReader,
    journal_dir: Path,
    journal_logs: pytest.LogCaptureFixture,
) -> None:
    """A file replaced under the reader is opened again and read from its start."""
    path = file_of(journal_dir, DAY1)
    writer.append("event", event("run-1", at(DAY1), 0))

    def replace() -> None:
        new = journal_dir / "new.ndjson"
        new.write_bytes(json_line({"record_type": "event", **event("run-1", at(DAY1), 1)}))
        os.replace(new, path)

    script = Script(replace, lambda: writer.append("event", event("run-1", at(DAY1), 2)))

    assert seqs(follow_all(reader, script)) == [0, 1, 2]
    assert any("was replaced" in message for message in warnings_of(journal_logs))


def test_follow_deleted_file(
    writer: NDJSONWriter,
    reader: JournalReader,
    journal_dir: Path,
    journal_logs: pytest.LogCaptureFixture,
) -> None:
    """A file deleted under the reader is followed again once the writer creates it anew."""
    path = file_of(journal_dir, DAY1)
    writer.append("event", event("run-1", at(DAY1), 0))
    script = Script(
        path.unlink,
        lambda: None,
        lambda: writer.append("event", event("run-1", at(DAY1), 1)),
    )

    assert seqs(follow_all(reader, script)) == [0, 1]
    assert any("was deleted" in message for message in warnings_of(journal_logs))


def test_follow_truncated_file(
    writer: NDJSONWriter,
    reader: JournalReader,
    journal_dir: Path,
    journal_logs: pytest.LogCaptureFixture,
) -> None:
    """A file cut shorter than the position read is read again from its start."""
    path = file_of(journal_dir, DAY1)
    for seq in range(3):
        writer.append("event", event("run-1", at(DAY1), seq))

    def truncate() -> None:
        os.truncate(path, 0)
        append_bytes(path, json_line({"record_type": "event", **event("run-1", at(DAY1), 9)}))

    assert seqs(follow_all(reader, Script(truncate))) == [0, 1, 2, 9]
    assert any("shrank" in message for message in warnings_of(journal_logs))


def test_follow_stop_at_once(writer: NDJSONWriter, reader: JournalReader) -> None:
    """When stop() is true from the start, nothing is read or yielded."""
    writer.append("event", event("run-1", at(DAY1), 0))

    assert list(reader.follow(today=lambda: DAY1, stop=lambda: True)) == []


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_follow_close_releases_file(writer: NDJSONWriter, reader: JournalReader) -> None:
    """Closing the iterator closes the file it keeps open."""
    writer.append("event", event("run-1", at(DAY1), 0))
    before = len(os.listdir("/proc/self/fd"))
    records = reader.follow(today=lambda: DAY1)

    next(records)
    assert isinstance(records, types.GeneratorType)
    opened = len(os.listdir("/proc/self/fd"))
    records.close()

    assert opened == before + 1
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"backlog": -1}, ValueError, "invalid backlog -1"),
        ({"backlog": 2.0}, TypeError, "backlog must be an int"),
        ({"poll_interval": "1"}, TypeError, "poll_interval must be a number"),
        ({"poll_interval": float("nan")}, ValueError, "invalid poll_interval nan"),
        ({"poll_interval": -0.5}, ValueError, "invalid poll_interval -0.5"),
    ],
)
def test_follow_invalid_arguments(
    reader: JournalReader, options: dict[str, Any], error: type, message: str
) -> None:
    """Invalid options raise when follow() is called, before any iteration."""
    with pytest.raises(error, match=message):
        reader.follow(**options)


def test_follow_invalid_today(reader: JournalReader) -> None:
    """An invalid date from today() raises on the first iteration."""
    records = reader.follow(today=lambda: "today")

    with pytest.raises(ValueError, match="invalid date 'today'"):
        next(records)


APPENDER = """
    import sys
    from telemetry.ndjson import NDJSONWriter

    directory, count = sys.argv[1], int(sys.argv[2])
    writer = NDJSONWriter(directory)
    for day, clock in (("2026-12-04", "23:59:59"), ("2026-12-05", "00:00:00")):
        for seq in range(count):
            timestamp = f"{day}T{clock}.{seq:06d}+00:00"
            payload = {"seq": seq, "day": day}
            record = {"run_id": "run-1", "event_type": "step", "timestamp": timestamp,
                      "payload": payload}
            writer.append("event", record)
    writer.close()
"""


def test_follow_records_of_another_process(writer: NDJSONWriter, reader: JournalReader) -> None:
    """Records appended by another process, across midnight, are yielded as they arrive."""
    count = 50
    writer.append("event", event("ready", at(DAY1)))
    received: list[dict[str, Any]] = []
    first_received = threading.Event()
    all_received = threading.Event()
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_SECONDS

    def stop() -> bool:
        return all_received.is_set() or time.monotonic() > deadline

    def follow() -> None:
        for record in reader.follow(today=lambda: DAY1, poll_interval=0.01, stop=stop):
            received.append(record)
            first_received.set()
            if len(received) == 1 + 2 * count:
                all_received.set()

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        assert first_received.wait(SUBPROCESS_TIMEOUT_SECONDS)
        subprocess.run(
            [sys.executable, "-c", textwrap.dedent(APPENDER), str(reader.directory), str(count)],
            env=SUBPROCESS_ENV,
            timeout=SUBPROCESS_TIMEOUT_SECONDS,
            check=True,
        )
        all_received.wait(max(0.0, deadline - time.monotonic()))
    finally:
        all_received.set()
        thread.join(SUBPROCESS_TIMEOUT_SECONDS)

    assert not thread.is_alive()
    assert received[0]["run_id"] == "ready"
    assert [(record["payload"]["day"], record["payload"]["seq"]) for record in received[1:]] == [
        (day, seq) for day in ("2026-12-04", "2026-12-05") for seq in range(count)
    ]
