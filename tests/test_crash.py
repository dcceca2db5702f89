"""Writer processes killed with SIGKILL during heavy logging, in each durability mode.

For each mode, ROUNDS rounds start PROCESSES writer processes (tests/crash_writer.py) of
THREADS threads each on one store. Each writer is killed with SIGKILL once it has reported
a random number of returned log_event calls, or at the round's deadline. The numbers come
from an RNG seeded per mode, and no assert depends on how long anything took. After the
last round a fresh process records one more run, and the tests check the store:

- Every call that a writer reported as returned has its line in the journal, whole and
  exactly once, in every mode. A SIGKILL is a crash of the process, not of the machine,
  and the OS keeps what was written to it. So these tests cannot tell ``fsync`` from the
  other modes: only a power loss would drop the lines that are not yet on disk.
- Each line starts one record and contains the start of no other, so no two writes are
  spliced. Lines that do not parse come from writes that a kill cut short: at most one
  per killed writer, none of them a reported call. The next append, by a writer still
  alive or by the next process, ends such a line with a newline, so the cut line may sit
  in the middle of a file. The journal reader counts exactly these lines as corrupt, and
  the newest file ends with a newline.
- The SQLite index passes its integrity check, and ``telemetry check`` exits with 0 or 1
  and no traceback. Every run whose start_run returned is in the index, or check reports
  it as missing from the index.

The random kills rarely land inside a write. So the ``test_torn_*`` tests kill a writer
of 16 MiB events while the journal file ends inside a line, let a new process append, and
check that the cut line became exactly one corrupt line and the new lines parse.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from cli_support import run_cli
from crash_writer import event_fill

import telemetry
from telemetry.database import DatabaseWriter
from telemetry.journal import JournalReader

MODES = ("fsync", "batch", "none")
ROUNDS = 2
PROCESSES = 3
THREADS = 2
# A writer is killed once it has reported this many returned log_event calls, drawn
# between these bounds, or when the round's deadline passes.
KILL_AFTER_EVENTS = (5, 300)
ROUND_DEADLINE_SECONDS = 4.0
# A writer that is not killed stops after this long, so a failed test leaves no process.
WRITER_MAX_SECONDS = 30.0
WAIT_SECONDS = 30.0
# Events this large take milliseconds to write, so the test can see a write in progress
# and kill the writer inside it.
HUGE_FILL_SIZE = 16 * 1024 * 1024
KILL_INSIDE_WRITE_ATTEMPTS = 3
KILL_INSIDE_WRITE_DEADLINE_SECONDS = 10.0

WRITER_SCRIPT = Path(__file__).with_name("crash_writer.py")
# The writers import the same telemetry package as this test process.
WRITER_ENV = {
    **{key: value for key, value in os.environ.items() if not key.startswith("TELEMETRY_")},
    "PYTHONPATH": os.pathsep.join(
        [str(Path(telemetry.__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]
    ),
}

LINE_START = b'{"record_type":"'
RECORD_MARK = b'{"record_type":'
# The payload's first keys, as crash_writer.py writes them. The comma after seq proves
# that the number was not cut.
EVENT_ID = re.compile(rb'"payload":\{"worker":(\d+),"thread":(\d+),"seq":(\d+),')

EventId = tuple[int, int, int]


# -- the writer processes ------------------------------------------------------------------


@dataclass
class Acks:
    """The calls that writers reported as returned."""

    runs_started: set[str] = field(default_factory=set)
    runs_ended: set[str] = field(default_factory=set)
    events: set[EventId] = field(default_factory=set)

    def add_report(self, report: bytes) -> None:
        """Add the calls of a writer's complete stdout."""
        for line in report.decode("ascii").splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "S":
                self.runs_started.add(rest)
            elif kind == "F":
                self.runs_ended.add(rest)
            elif kind == "E":
                worker, thread, seq = (int(part) for part in rest.split())
                self.events.add((worker, thread, seq))
            else:
                raise AssertionError(f"unexpected report line from a writer: {line!r}")


class Writer:
    """A crash_writer.py process, and a thread that collects what it reports on stdout."""

    def __init__(
        self,
        store: Path,
        durability: str,
        worker: int,
        options: list[str],
        log_dir: Path,
        arrived: threading.Condition,
    ) -> None:
        self.worker = worker
        self.stderr_path = log_dir / f"writer-{worker}.err"
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    str(WRITER_SCRIPT),
                    str(store),
                    durability,
                    str(worker),
                    f"--max-seconds={WRITER_MAX_SECONDS}",
                    *options,
                ],
                env=WRITER_ENV,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
        self._arrived = arrived
        self._chunks: list[bytes] = []
        self._events = 0
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()

    def _collect(self) -> None:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        pending = b""
        while chunk := os.read(fd, 65536):
            with self._arrived:
                self._chunks.append(chunk)
                # Count only whole lines: a report line can arrive in two reads.
                pending += chunk
                head, _, pending = pending.rpartition(b"\n")
                if head:
                    self._events += (b"\n" + head).count(b"\nE ")
                self._arrived.notify_all()

    def events_reported(self) -> int:
        """Return how many returned log_event calls the writer has reported so far."""
        with self._arrived:
            return self._events

    def kill(self) -> None:
        """Kill the writer with SIGKILL, reap it, and wait for the end of its stdout."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(WAIT_SECONDS)
        self._reader.join(WAIT_SECONDS)
        assert self.process.stdout is not None
        self.process.stdout.close()

    def report(self) -> bytes:
        """Return everything the writer wrote to stdout; call after kill()."""
        with self._arrived:
            return b"".join(self._chunks)

    def stderr(self) -> str:
        """Return what the writer logged to stderr."""
        return self.stderr_path.read_text(errors="replace")


def kill_at_random_points(
    writers: list[Writer], rng: random.Random, arrived: threading.Condition
) -> None:
    """Kill each writer after a random number of reported events, or at the deadline.

    A writer that has reported no event by the deadline, such as on a loaded machine, gets
    until WAIT_SECONDS, so that every round kills writers in the middle of their logging.
    """
    kill_after = {writer.worker: rng.randint(*KILL_AFTER_EVENTS) for writer in writers}
    alive = list(writers)
    started = time.monotonic()
    deadline = started + ROUND_DEADLINE_SECONDS
    while alive and time.monotonic() < started + WAIT_SECONDS:
        past_deadline = time.monotonic() >= deadline
        for writer in list(alive):
            reported = writer.events_reported()
            if reported >= kill_after[writer.worker] or (reported > 0 and past_deadline):
                writer.kill()
                alive.remove(writer)
        with arrived:
            arrived.wait(0.05)
    for writer in alive:
        writer.kill()


def record_once(store: Path, durability: str, worker: int) -> subprocess.CompletedProcess[bytes]:
    """Record one run with one event from a new writer process, which exits on its own."""
    return subprocess.run(
        [sys.executable, str(WRITER_SCRIPT), str(store), durability, str(worker), "--once"],
        env=WRITER_ENV,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=WAIT_SECONDS,
        check=False,
    )


@dataclass
class CrashResult:
    """The store after the crash rounds, and what the writers reported and logged."""

    store: Path
    acks: Acks
    kills: int
    return_codes: list[int]
    stderr: list[str]
    final_run: subprocess.CompletedProcess[bytes]


def crash_rounds(store: Path, durability: str, log_dir: Path) -> CrashResult:
    """Run the kill rounds, then record one more run from a fresh process."""
    rng = random.Random(f"test_crash-{durability}")
    acks = Acks()
    return_codes: list[int] = []
    stderr: list[str] = []
    arrived = threading.Condition()
    for round_number in range(ROUNDS):
        writers = [
            Writer(
                store,
                durability,
                round_number * PROCESSES + index,
                [f"--threads={THREADS}", f"--seed={rng.randrange(2**31)}"],
                log_dir,
                arrived,
            )
            for index in range(PROCESSES)
        ]
        try:
            kill_at_random_points(writers, rng, arrived)
        finally:
            for writer in writers:
                if writer.process.returncode is None:
                    writer.kill()
        for writer in writers:
            acks.add_report(writer.report())
            return_codes.append(writer.process.returncode)
            stderr.append(writer.stderr())

    final_run = record_once(store, durability, ROUNDS * PROCESSES)
    acks.add_report(final_run.stdout)
    return CrashResult(store, acks, len(return_codes), return_codes, stderr, final_run)


# -- a kill inside one write -------------------------------------------------------------


def ends_inside_line(directory: Path) -> bool:
    """Return whether the newest journal file ends with bytes after its last newline."""
    files = JournalReader(directory).files()
    if not files:
        return False
    fd = os.open(files[-1].path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        return size > 0 and os.pread(fd, 1, size - 1) != b"\n"
    finally:
        os.close(fd)


@dataclass
class TornResult:
    """A store whose journal a SIGKILL cut inside a write, then appended to by a new process."""

    store: Path
    acks: Acks
    cut_inside_line: bool
    final_run: subprocess.CompletedProcess[bytes]


def kill_inside_write(store: Path, durability: str, log_dir: Path) -> TornResult:
    """Kill writers of huge events while the journal ends inside a line, then append.

    Each attempt starts one writer and polls the newest journal file until its last byte
    is not a newline, which means that a write is in progress, and kills the writer at
    once. The write may still finish before the signal arrives, so the attempts stop at
    the first kill that leaves the file ending inside a line.
    """
    acks = Acks()
    arrived = threading.Condition()
    journal = store / "journal"
    cut = False
    for worker in range(KILL_INSIDE_WRITE_ATTEMPTS):
        writer = Writer(
            store,
            durability,
            worker,
            ["--threads=1", f"--fill-size={HUGE_FILL_SIZE}"],
            log_dir,
            arrived,
        )
        deadline = time.monotonic() + KILL_INSIDE_WRITE_DEADLINE_SECONDS
        try:
            while time.monotonic() < deadline and writer.process.poll() is None:
                if ends_inside_line(journal):
                    break
        finally:
            writer.kill()
        acks.add_report(writer.report())
        cut = ends_inside_line(journal)
        if cut:
            break

    final_run = record_once(store, durability, KILL_INSIDE_WRITE_ATTEMPTS)
    acks.add_report(final_run.stdout)
    return TornResult(store, acks, cut, final_run)


# -- reading the journal byte by byte ------------------------------------------------------


@dataclass
class JournalScan:
    """The lines of every journal file, split into records and unparseable fragments."""

    records: list[dict[str, Any]] = field(default_factory=list)
    raw_lines: list[bytes] = field(default_factory=list)
    fragments: list[bytes] = field(default_factory=list)
    newest_file_ends_line: bool = True
    reader_corrupt_lines: int = 0


def scan_journal(directory: Path) -> JournalScan:
    """Split each journal file at newlines and parse each line on its own.

    Bytes after a file's last newline count as one more line. For the newest file,
    ``newest_file_ends_line`` also records whether there are such bytes.
    """
    scan = JournalScan()
    reader = JournalReader(directory)
    files = reader.files()
    for journal_file in files:
        content = journal_file.path.read_bytes()
        lines = content.split(b"\n")
        tail = lines.pop()
        if tail:
            lines.append(tail)
            if journal_file is files[-1]:
                scan.newest_file_ends_line = False
        for line in lines:
            if not line:
                continue
            scan.raw_lines.append(line)
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError:
                scan.fragments.append(line)
                continue
            if isinstance(value, dict):
                scan.records.append(value)
            else:
                scan.fragments.append(line)
        scan.reader_corrupt_lines += reader.read(journal_file.path).corrupt_lines
    return scan


def event_id(record: dict[str, Any]) -> EventId:
    """Return (worker, thread, seq) of an event record, with -1 for each missing key.

    A line spliced from two writes can still parse, so a key may be missing.
    """
    payload = record.get("payload")
    if not isinstance(payload, dict):
        payload = {}
    return (payload.get("worker", -1), payload.get("thread", -1), payload.get("seq", -1))


def payload_is_intact(record: dict[str, Any]) -> bool:
    """Return whether an event's fill text is exactly the one of its id and size."""
    payload = record.get("payload")
    if not isinstance(payload, dict):
        return False
    size = payload.get("size")
    if not isinstance(size, int) or size < 0:
        return False
    return bool(payload.get("fill") == event_fill(*event_id(record), size))


def line_count(scan: JournalScan, record_type: str) -> Counter[str]:
    """Count the lines of ``record_type`` per run id."""
    return Counter(
        str(record["run_id"]) for record in scan.records if record["record_type"] == record_type
    )


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=MODES)
def crashed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> CrashResult:
    """Run the kill rounds once per durability mode and return the result."""
    durability = request.param
    base = tmp_path_factory.mktemp(f"crash-{durability}")
    return crash_rounds(base / "store", durability, base)


@pytest.fixture(scope="module")
def scan(crashed: CrashResult) -> JournalScan:
    """Return the scanned journal of the crashed store."""
    return scan_journal(crashed.store / "journal")


@pytest.fixture(scope="module")
def check_output(crashed: CrashResult) -> subprocess.CompletedProcess[str]:
    """Run ``telemetry check --json`` on the crashed store."""
    return run_cli("check", "--json", data_dir=crashed.store)


@pytest.fixture(scope="module", params=MODES)
def torn(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TornResult:
    """Cut a journal line with a SIGKILL and append after it, once per durability mode."""
    durability = request.param
    base = tmp_path_factory.mktemp(f"torn-{durability}")
    result = kill_inside_write(base / "store", durability, base)
    if not result.cut_inside_line:
        pytest.skip(
            f"no SIGKILL landed inside a journal write in {KILL_INSIDE_WRITE_ATTEMPTS} attempts"
        )
    return result


@pytest.fixture(scope="module")
def torn_scan(torn: TornResult) -> JournalScan:
    """Return the scanned journal of the store with the cut line."""
    return scan_journal(torn.store / "journal")


@pytest.fixture
def index(crashed: CrashResult) -> Iterator[DatabaseWriter]:
    """Open the crashed store's index in this process."""
    writer = DatabaseWriter(crashed.store / "telemetry.db")
    yield writer
    writer.close()


# -- the writers ---------------------------------------------------------------------------


def test_crash_writers_killed(crashed: CrashResult) -> None:
    """Every writer died of the SIGKILL, not of an error of its own, and logged no traceback."""
    assert crashed.return_codes == [-signal.SIGKILL] * crashed.kills
    tracebacks = [text for text in crashed.stderr if "Traceback" in text]
    assert tracebacks == []


def test_crash_writers_logged_events(crashed: CrashResult) -> None:
    """The writers reported returned calls before the kills, so the checks have data."""
    assert len(crashed.acks.events) >= PROCESSES
    assert crashed.acks.runs_started


def test_crash_writers_stored_all(crashed: CrashResult) -> None:
    """No writer logged a failure to store a record in the journal or the index."""
    failures = [
        line for text in crashed.stderr for line in text.splitlines() if "failed to" in line
    ]
    assert failures == []


def test_crash_final_run(crashed: CrashResult) -> None:
    """The process that starts after the kills records its run and exits cleanly."""
    final = crashed.final_run
    assert final.returncode == 0, final.stderr.decode(errors="replace")
    assert b"Traceback" not in final.stderr


# -- the journal ---------------------------------------------------------------------------


def test_crash_acked_events_present(crashed: CrashResult, scan: JournalScan) -> None:
    """Every log_event call reported as returned has its event line in the journal."""
    logged = {event_id(record) for record in scan.records if record["record_type"] == "event"}
    missing = sorted(crashed.acks.events - logged)
    assert missing == []


def test_crash_events_not_duplicated(scan: JournalScan) -> None:
    """No event line appears twice, whether its call returned or not."""
    counts = Counter(
        event_id(record) for record in scan.records if record["record_type"] == "event"
    )
    duplicated = {event: count for event, count in counts.items() if count > 1}
    assert duplicated == {}


def test_crash_event_payloads_intact(scan: JournalScan) -> None:
    """Every parsed event carries the exact fill text of its own id and size."""
    damaged = [
        event_id(record)
        for record in scan.records
        if record["record_type"] == "event" and not payload_is_intact(record)
    ]
    assert damaged == []


def test_crash_acked_runs_present(crashed: CrashResult, scan: JournalScan) -> None:
    """Every start_run and end_run call reported as returned has exactly one line."""
    starts = line_count(scan, "run_start")
    ends = line_count(scan, "run_end")
    assert {run_id: starts[run_id] for run_id in crashed.acks.runs_started} == dict.fromkeys(
        crashed.acks.runs_started, 1
    )
    assert {run_id: ends[run_id] for run_id in crashed.acks.runs_ended} == dict.fromkeys(
        crashed.acks.runs_ended, 1
    )


def test_crash_lines_not_interleaved(scan: JournalScan) -> None:
    """Each line, parsed or not, starts one record and contains no start of another."""
    mixed = [
        line[:80]
        for line in scan.raw_lines
        if not line.startswith(LINE_START) or line.count(RECORD_MARK) != 1
    ]
    assert mixed == []


def test_crash_fragments_bounded(crashed: CrashResult, scan: JournalScan) -> None:
    """At most one unparseable line per killed writer: the write that its kill cut short."""
    assert len(scan.fragments) <= crashed.kills


def test_crash_fragments_not_acked(crashed: CrashResult, scan: JournalScan) -> None:
    """No unparseable line belongs to a log_event call that was reported as returned."""
    cut_events = {
        (int(found[1]), int(found[2]), int(found[3]))
        for fragment in scan.fragments
        if (found := EVENT_ID.search(fragment))
    }
    assert cut_events & crashed.acks.events == set()


def test_crash_reader_counts_fragments(scan: JournalScan) -> None:
    """The journal reader skips and counts exactly the unparseable lines found here."""
    assert scan.reader_corrupt_lines == len(scan.fragments)


def test_crash_newest_file_ends_line(scan: JournalScan) -> None:
    """The append after the kills ended any torn last line, so the file ends with a newline."""
    assert scan.newest_file_ends_line


# -- the index -------------------------------------------------------------------------------


def test_crash_index_integrity(index: DatabaseWriter) -> None:
    """SQLite's integrity check passes on the index after the kills."""
    ok, messages = index.check_integrity()
    assert ok, messages


def test_crash_check_command(check_output: subprocess.CompletedProcess[str]) -> None:
    """``telemetry check`` finishes with exit code 0 or 1 and no traceback."""
    assert check_output.returncode in (0, 1), check_output.stderr
    assert "Traceback" not in check_output.stderr


def test_crash_acked_runs_indexed(
    crashed: CrashResult, index: DatabaseWriter, check_output: subprocess.CompletedProcess[str]
) -> None:
    """Every run whose start_run returned is in the index, or check reports it missing there."""
    findings = orjson.loads(check_output.stdout)
    indexed = set(index.run_statuses())
    unindexed = crashed.acks.runs_started - indexed - set(findings["journal_only"])
    assert findings["index"]["ok"]
    assert unindexed == set()


# -- a line cut by a kill, closed by the next append ---------------------------------------


def test_torn_line_closed(torn_scan: JournalScan) -> None:
    """The cut line becomes exactly one unparseable line, and the file ends with a newline."""
    assert len(torn_scan.fragments) == 1
    assert torn_scan.newest_file_ends_line


def test_torn_line_is_prefix(torn_scan: JournalScan) -> None:
    """The unparseable line is the start of one huge event line, cut inside its fill text."""
    fragment = torn_scan.fragments[0]
    found = EVENT_ID.search(fragment)
    assert fragment.startswith(LINE_START)
    assert found is not None
    cut_id = (int(found[1]), int(found[2]), int(found[3]))
    _, marker, rest = fragment.partition(b'"fill":"')
    fill = rest.partition(b'"')[0]
    assert marker
    assert event_fill(*cut_id, HUGE_FILL_SIZE).encode().startswith(fill)


def test_torn_line_not_acked(torn: TornResult, torn_scan: JournalScan) -> None:
    """The event whose line was cut was not reported as returned."""
    found = EVENT_ID.search(torn_scan.fragments[0])
    assert found is not None
    assert (int(found[1]), int(found[2]), int(found[3])) not in torn.acks.events


def test_torn_next_append_intact(torn: TornResult, torn_scan: JournalScan) -> None:
    """The new process's run and event, and every reported call before the cut, parse whole."""
    logged = {event_id(record) for record in torn_scan.records if record["record_type"] == "event"}
    started = set(line_count(torn_scan, "run_start"))
    assert torn.final_run.returncode == 0, torn.final_run.stderr.decode(errors="replace")
    assert torn.acks.events - logged == set()
    assert torn.acks.runs_started - started == set()


def test_torn_next_append_warns(torn: TornResult) -> None:
    """The process that closes the cut line logs a warning about it."""
    assert b"torn last line" in torn.final_run.stderr


def test_torn_reader_counts(torn_scan: JournalScan) -> None:
    """The journal reader skips the cut line and counts it as corrupt."""
    assert torn_scan.reader_corrupt_lines == 1
