"""JournalReader: reading the daily journal files that NDJSONWriter appends to.

The reader lists the files of a date range, reads one file, collects the records of one
run, folds the whole journal into the runs it describes, and follows the newest file as
other processes append to it. It never writes, locks or deletes a file. Appends are single
writes of whole lines, so reading without a lock gets whole lines, except a line that a
crash cut short or that is being written at that moment.

Lines that cannot be used (invalid JSON or UTF-8, JSON that is not an object, a record
that fails the checks of fold_runs) are skipped and counted, and a WARNING names the file.
Logger: ``telemetry.journal``.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import logging
import math
import os
import time
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

import orjson

from telemetry._dates import date_of_file_name, file_name, normalise_date, utc_date, utc_today
from telemetry._logutil import RepeatLimiter
from telemetry._schema import _TIMESTAMP_COLUMNS
from telemetry.encoding import INT64_MAX, INT64_MIN
from telemetry.models import STATUSES, RunEvent, RunRecord, parse_timestamp

__all__ = [
    "FOLLOW_MAX_DAYS_AHEAD",
    "RECORD_TYPES",
    "ROLL_OVER_GRACE_POLLS",
    "ROLL_OVER_GRACE_SECONDS",
    "JournalFile",
    "JournalReadResult",
    "JournalReader",
    "JournalRuns",
]

logger = logging.getLogger("telemetry.journal")

RECORD_TYPES = ("run_start", "run_end", "event")

# Bytes read per system call while following a file.
_CHUNK_SIZE = 64 * 1024

# Warnings about corrupt lines met while following: the first five per file, then every 100th.
_FOLLOW_WARNING_BURST = 5
_FOLLOW_WARNING_EVERY = 100

# After a roll-over, the previous file is still read for this many polls, or for as many
# polls as fill this many seconds of poll_interval, whichever is more. A record is dated
# before it is written, and the wait for the journal lock or for the CPU between the two
# can let another process create the next day's file first.
ROLL_OVER_GRACE_POLLS = 8
ROLL_OVER_GRACE_SECONDS = 2.0

FOLLOW_MAX_DAYS_AHEAD = 1
"""follow() moves on to a later file only when it is dated at most this many days after
today's UTC date. A file dated further ahead was written under a wrong clock or copied in,
and moving on to it would hide every record appended to today's file."""

_DATE_ARGUMENT_FORMS = "YYYYMMDD, YYYY-MM-DD or a datetime.date, such as 20261204"


class JournalReadResult(NamedTuple):
    """The records of one journal file and the number of lines that could not be parsed."""

    path: Path
    records: list[dict[str, Any]]
    corrupt_lines: int


class JournalFile(NamedTuple):
    """A journal file and the UTC day of the records it holds."""

    date: str
    """The day as YYYYMMDD."""
    path: Path


class JournalRuns(NamedTuple):
    """The runs that the journal describes, as JournalReader.fold_runs returns them."""

    runs: dict[str, RunRecord]
    """Run id to run, in the order the runs first appear in the journal."""
    files: int
    """Number of files read."""
    corrupt_lines: dict[Path, int]
    """Number of lines skipped per file. Files without skipped lines are left out."""
    torn_lines: Mapping[Path, int] = types.MappingProxyType({})
    """Of ``corrupt_lines``, the lines that are the start of a JSON object cut short, as a
    crash during an append leaves them, per file. Files without such lines are left out."""


class JournalReader:
    """Read the journal files in ``directory``, and never write, lock or delete them.

    Thread-safe: the reader keeps no state between calls, and each follow() iterator keeps
    its own.

    Attributes:
        directory: the directory of the ``events_YYYYMMDD.ndjson`` files.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def __repr__(self) -> str:
        return f"JournalReader({str(self.directory)!r})"

    # -- listing and reading ------------------------------------------------------------------

    def files(
        self,
        first_date: str | datetime.date | None = None,
        last_date: str | datetime.date | None = None,
    ) -> list[JournalFile]:
        """List the journal files dated from ``first_date`` to ``last_date``, oldest first.

        Both bounds are inclusive and optional. A date is YYYYMMDD, YYYY-MM-DD, a
        datetime.date, or an aware datetime.datetime, which is taken as its UTC date. Names
        other than ``events_YYYYMMDD.ndjson`` with a real date, and entries that are not
        files, are left out. A missing directory gives [].

        Raises:
            ValueError: a date is not one of those forms, or a datetime is naive.
            TypeError: a date is of another type.
            OSError: the directory exists but cannot be listed.
        """
        first = _date_argument(first_date, "first_date")
        last = _date_argument(last_date, "last_date")

        found: list[JournalFile] = []
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return []
        for entry in entries:
            date = date_of_file_name(entry.name)
            if date is None:
                continue
            if (first is not None and date < first) or (last is not None and date > last):
                continue
            if entry.is_file():
                found.append(JournalFile(date, Path(entry.path)))
        found.sort()
        return found

    def read(self, path: str | os.PathLike[str]) -> JournalReadResult:
        """Read the records of one file and count its corrupt lines.

        A line is corrupt when it is not valid UTF-8 and JSON, or is JSON but not an object,
        such as a last line cut short by a crash or still being written. Corrupt lines are
        skipped and counted, and one WARNING gives the count and the path. Blank lines are
        ignored. A missing file gives no records, because prune may delete a file between
        files() and read().

        Raises:
            OSError: the file exists but cannot be read.
        """
        path = Path(path)
        records: list[dict[str, Any]] = []
        corrupt = 0
        try:
            for _, record, _ in _read_lines(path):
                if record is None:
                    corrupt += 1
                else:
                    records.append(record)
        except FileNotFoundError:
            return JournalReadResult(path, [], 0)

        if corrupt:
            logger.warning("skipped %s in %s", _corrupt_lines(corrupt), path)
        return JournalReadResult(path, records, corrupt)

    def run_records(
        self, run_id: str, start_time: str, end_time: str | None = None
    ) -> list[dict[str, Any]]:
        """Collect the run_start, event and run_end records of ``run_id``, in journal order.

        Only the files dated from the UTC date of ``start_time`` to that of ``end_time``
        are opened, or to the newest file when ``end_time`` is None (a run still running).
        Should the end be dated before the start, because a clock stepped back, the files
        between the two dates are read. Corrupt lines are skipped with one WARNING per file.

        Raises:
            TypeError: ``run_id`` is not a str.
            ValueError: a time is not ISO 8601 with an offset.
            OSError: a file in the range exists but cannot be read.
        """
        if not isinstance(run_id, str):
            raise TypeError(f"run_id must be a str, not {type(run_id).__name__}: {run_id!r}")
        first = utc_date(start_time)
        last = first if end_time is None else utc_date(end_time)
        first, last = min(first, last), max(first, last)

        selected: list[dict[str, Any]] = []
        for journal_file in self.files(first, None if end_time is None else last):
            corrupt = 0
            try:
                for _, record, _ in _read_lines(journal_file.path):
                    if record is None:
                        corrupt += 1
                    elif (
                        record.get("run_id") == run_id and record.get("record_type") in RECORD_TYPES
                    ):
                        selected.append(record)
            except FileNotFoundError:
                continue
            if corrupt:
                logger.warning("skipped %s in %s", _corrupt_lines(corrupt), journal_file.path)
        return selected

    # -- folding ------------------------------------------------------------------------------

    def fold_runs(self, progress: Callable[[int, int], None] | None = None) -> JournalRuns:
        """Read every file once, oldest first, and return the runs the journal describes.

        Each run_start and run_end line becomes a RunRecord. A run_end line wins over a
        run_start line whatever the file order, and of two run_end lines the later in
        journal order wins. A run_end without a run_start still makes a run.

        A line is counted as corrupt, and skipped, when it cannot be parsed or the index
        would reject its record. The checks are: a known record_type, every required
        field, each value of its field's type, integers within 64 bits, a known status,
        and times in ISO 8601 with an offset. Event lines are checked against the RunEvent
        fields in the same way. One WARNING per file gives the count and the first problem.
        A file deleted while the journal is read is skipped with a WARNING. Corrupt lines
        that are the start of a JSON object cut short, as a crash during an append leaves
        them, are counted in ``torn_lines`` as well.

        Args:
            progress: called as ``progress(files_done, files_total)`` after each file.

        Raises:
            OSError: a file or the directory exists but cannot be read.
        """
        journal_files = self.files()
        # The checked run line that wins so far, per run id. RunRecords are built at the
        # end, once per run, because building one takes longer than checking a line.
        run_lines: dict[str, dict[str, Any]] = {}
        ended: set[str] = set()
        corrupt_lines: dict[Path, int] = {}
        torn_lines: dict[Path, int] = {}
        files_read = 0

        for done, journal_file in enumerate(journal_files, start=1):
            try:
                corrupt, torn = _fold_file(journal_file.path, run_lines, ended)
            except FileNotFoundError:
                logger.warning(
                    "journal file %s was deleted while the journal was read, so its runs are "
                    "left out",
                    journal_file.path,
                )
            else:
                files_read += 1
                if corrupt:
                    corrupt_lines[journal_file.path] = corrupt
                if torn:
                    torn_lines[journal_file.path] = torn
            if progress is not None:
                progress(done, len(journal_files))

        runs = {run_id: _run_from_line(line) for run_id, line in run_lines.items()}
        return JournalRuns(runs, files_read, corrupt_lines, torn_lines)

    # -- following ----------------------------------------------------------------------------

    def follow(
        self,
        *,
        backlog: int = 10,
        poll_interval: float = 0.25,
        sleep: Callable[[float], None] = time.sleep,
        today: Callable[[], str] = utc_today,
        stop: Callable[[], bool] = lambda: False,
    ) -> Iterator[dict[str, Any]]:
        """Yield the last ``backlog`` records of today's file, then each record appended.

        Appends by any process are seen. The iterator starts at the file of ``today()``
        (YYYYMMDD or YYYY-MM-DD), waiting for it when it is missing. When it has read to the
        end of its file and a later-dated file exists, it reads the old file to its end once
        more and moves on to the earliest later-dated file, from its start. That is the
        midnight roll-over. A later file dated more than FOLLOW_MAX_DAYS_AHEAD days after
        ``today()`` is ignored, with one WARNING per file, because following it would hide
        the records appended to today's file. ``today()`` is called at each look for a
        later file. A line is yielded once its newline has arrived. A file that is deleted
        or replaced under the reader is opened again and read from its start, and a file
        cut shorter than the position read is read again from its start, each with a
        WARNING. Corrupt lines are skipped with a WARNING (the first five per file, then
        every 100th).

        After a roll-over the previous file is still read as long as ``today()`` is its
        date, because a writer whose clock is ahead can start the next day's file early.
        It is then read during a grace period, because a record dated before midnight can
        be appended after the next day's file appeared. The grace period is
        ROLL_OVER_GRACE_POLLS sleeps, or as many sleeps of ``poll_interval`` as make
        ROLL_OVER_GRACE_SECONDS, whichever is more. It is counted in calls to ``sleep``, so
        an injected sleep controls it. An unfinished last line still in that file when the
        grace period ends is dropped with a WARNING.

        ``stop()`` is called before each read, and the iterator returns once it is true.
        When nothing new has arrived in either file, the iterator calls
        ``sleep(poll_interval)``. Closing the iterator closes the files it keeps open.

        NOTE: lines appended to a file after the grace period are never yielded, such as
        a run_end dated yesterday by a process whose clock is late by more than that. A file
        dated tomorrow by a process whose clock is ahead makes the reader move on to it
        before midnight.

        Raises:
            TypeError: ``backlog`` is not an int, or ``poll_interval`` is not a number.
            ValueError: ``backlog`` is negative, ``poll_interval`` is negative or not
                finite; when iterating, ``today()`` returned an invalid date.
            OSError: when iterating, the directory or a file exists but cannot be read.
        """
        if not isinstance(backlog, int) or isinstance(backlog, bool):
            raise TypeError(f"backlog must be an int, not {type(backlog).__name__}: {backlog!r}")
        if backlog < 0:
            raise ValueError(f"invalid backlog {backlog}: expected a number of records >= 0")
        if isinstance(poll_interval, bool) or not isinstance(poll_interval, (int, float)):
            raise TypeError(
                f"poll_interval must be a number of seconds, not "
                f"{type(poll_interval).__name__}: {poll_interval!r}"
            )
        if not math.isfinite(poll_interval) or poll_interval < 0:
            raise ValueError(
                f"invalid poll_interval {poll_interval!r}: expected a finite number of seconds >= 0"
            )
        return self._follow(backlog, float(poll_interval), sleep, today, stop)

    def _follow(
        self,
        backlog: int,
        poll_interval: float,
        sleep: Callable[[float], None],
        today: Callable[[], str],
        stop: Callable[[], bool],
    ) -> Iterator[dict[str, Any]]:
        date = normalise_date(today())
        warnings = RepeatLimiter(burst=_FOLLOW_WARNING_BURST, every=_FOLLOW_WARNING_EVERY)
        # Files dated too far ahead that were logged as ignored, each once.
        ignored_files: set[Path] = set()

        def next_file_after(date: str) -> JournalFile | None:
            return self._next_file_after(date, normalise_date(today()), ignored_files)

        followed: _FollowedFile | None = None
        # The file before the last roll-over while its grace period lasts, and the number
        # of sleeps left in that period.
        previous: _FollowedFile | None = None
        grace_sleeps_left = 0
        # The backlog applies to today's file only if it exists at the start. Every line of
        # a file opened later was appended after the start.
        first_open = True

        try:
            while not stop():
                if followed is None:
                    followed = _FollowedFile.open(self._path_of(date), date, warnings)
                    if followed is None:
                        first_open = False
                        later = next_file_after(date)
                        if later is not None:
                            date = later.date
                            continue
                    elif first_open:
                        first_open = False
                        yield from followed.read_backlog(backlog)
                        continue

                if followed is not None:
                    records = followed.read_available()
                    if records is not None:
                        yield from records
                        continue

                    # At the end of the file: check for a replaced file, then for a later one.
                    state = followed.check_path()
                    if state == "gone":
                        followed.close()
                        followed = None
                        continue
                    if state == "rewound":
                        continue

                    later = next_file_after(followed.date)
                    if later is not None:
                        # Lines appended before the later file appeared are in the file by now.
                        while (records := followed.read_available()) is not None:
                            yield from records
                        if previous is not None:
                            previous.close_after_grace()
                        previous, followed = followed, None
                        grace_sleeps_left = _grace_sleeps(poll_interval)
                        date = later.date
                        continue

                # Nothing new in the followed file: read the previous one, then sleep.
                if previous is not None:
                    late = previous.read_available()
                    if late is not None:
                        yield from late
                        continue
                sleep(poll_interval)
                # A later file can appear before midnight, when a writer's clock is ahead
                # of ours: the previous file stays followed until its day is over, and
                # only then does its grace period count down.
                if previous is not None and previous.date < normalise_date(today()):
                    grace_sleeps_left -= 1
                    if grace_sleeps_left <= 0:
                        # The lines appended during the last sleep still count.
                        while (late := previous.read_available()) is not None:
                            yield from late
                        previous.close_after_grace()
                        previous = None
        finally:
            for opened in (followed, previous):
                if opened is not None:
                    opened.close()

    def _path_of(self, date: str) -> Path:
        return self.directory / file_name(date)

    def _next_file_after(
        self, date: str, today: str, ignored_files: set[Path]
    ) -> JournalFile | None:
        """Return the earliest file dated after ``date`` and at most FOLLOW_MAX_DAYS_AHEAD
        days after ``today``, and log a WARNING once per file dated further ahead."""
        last_date = _add_days(today, FOLLOW_MAX_DAYS_AHEAD)
        for journal_file in self.files(date):
            if journal_file.date <= date:
                continue
            if journal_file.date <= last_date:
                return journal_file
            if journal_file.path not in ignored_files:
                ignored_files.add(journal_file.path)
                logger.warning(
                    "ignoring journal file %s while following, because it is dated more than "
                    "%d day after today (%s UTC): it was written under a wrong clock or "
                    "copied in; 'telemetry check' lists such files",
                    journal_file.path,
                    FOLLOW_MAX_DAYS_AHEAD,
                    today,
                )
        return None


def _add_days(date: str, days: int) -> str:
    """Return the YYYYMMDD date ``days`` after ``date``, or "99991231" past the last date."""
    try:
        later = datetime.datetime.strptime(date, "%Y%m%d") + datetime.timedelta(days=days)
    except OverflowError:
        return "99991231"
    return later.strftime("%Y%m%d")


def _grace_sleeps(poll_interval: float) -> int:
    """Return the number of sleeps that the previous file is read for after a roll-over."""
    if poll_interval <= 0:
        return ROLL_OVER_GRACE_POLLS
    return max(ROLL_OVER_GRACE_POLLS, math.ceil(ROLL_OVER_GRACE_SECONDS / poll_interval))


# -- following one file -------------------------------------------------------------------------


class _FollowedFile:
    """One journal file open for following: the read position and the unfinished line."""

    def __init__(self, path: Path, date: str, fd: int, warnings: RepeatLimiter) -> None:
        self.path = path
        self.date = date
        self._fd = fd
        self._warnings = warnings
        # The chunks read after the last newline, their total size, and the file offset
        # where they start. They stay unjoined until the newline arrives, so that a long
        # line is copied once.
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._pending_offset = 0

    @classmethod
    def open(cls, path: Path, date: str, warnings: RepeatLimiter) -> _FollowedFile | None:
        """Open ``path`` for reading, or return None when it does not exist.

        Raises:
            OSError: the file exists but cannot be opened.
        """
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return None
        return cls(path, date, fd, warnings)

    def close(self) -> None:
        os.close(self._fd)

    def close_after_grace(self) -> None:
        """Close the file at the end of its grace period, with a WARNING for an unfinished line."""
        if any(chunk.strip() for chunk in self._pending):
            logger.warning(
                "dropped the unfinished last line of %s (%d bytes at offset %d), because the "
                "reader moved on to a later file and no newline followed within the grace period",
                self.path,
                self._pending_size,
                self._pending_offset,
            )
        self.close()

    def read_available(self) -> list[dict[str, Any]] | None:
        """Read up to one chunk and return the records of its whole lines, or None at the end.

        Raises:
            OSError: the read failed.
        """
        chunk = os.read(self._fd, _CHUNK_SIZE)
        if not chunk:
            return None
        return self._records_of(chunk)

    def read_backlog(self, backlog: int) -> list[dict[str, Any]]:
        """Read the file to its end and return its last ``backlog`` records.

        Raises:
            OSError: a read failed.
        """
        last: collections.deque[dict[str, Any]] = collections.deque(maxlen=backlog)
        while chunk := os.read(self._fd, _CHUNK_SIZE):
            last.extend(self._records_of(chunk))
        return list(last)

    def check_path(self) -> Literal["same", "rewound", "gone"]:
        """Check that the path still names this file, and rewind the file if it shrank.

        Returns "gone" when the file was deleted or replaced under the reader, so the
        caller opens the path again, and "rewound" when the file was cut shorter than the
        position read and will be read again from its start. Both are logged as a WARNING.
        """
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            logger.warning(
                "journal file %s was deleted while followed, so the reader waits for it to "
                "be created again or for a later file",
                self.path,
            )
            return "gone"
        opened = os.fstat(self._fd)
        if (named.st_ino, named.st_dev) != (opened.st_ino, opened.st_dev):
            logger.warning(
                "journal file %s was replaced while followed, so the new file is read from "
                "its start",
                self.path,
            )
            return "gone"
        if opened.st_size < self._pending_offset + self._pending_size:
            logger.warning(
                "journal file %s shrank to %d bytes while followed, so it is read again from "
                "its start",
                self.path,
                opened.st_size,
            )
            os.lseek(self._fd, 0, os.SEEK_SET)
            self._pending = []
            self._pending_size = 0
            self._pending_offset = 0
            return "rewound"
        return "same"

    def _records_of(self, chunk: bytes) -> list[dict[str, Any]]:
        # Only the new chunk is searched for a newline. Without one, the chunk is kept
        # as it is, so a line of n chunks costs O(n) and not O(n**2) copying.
        last_newline = chunk.rfind(b"\n")
        if last_newline < 0:
            self._pending.append(chunk)
            self._pending_size += len(chunk)
            return []

        whole = chunk[: last_newline + 1]
        if self._pending:
            self._pending.append(whole)
            whole = _join_chunks(self._pending)
        rest = chunk[last_newline + 1 :]
        offset = self._pending_offset
        self._pending = [rest] if rest else []
        self._pending_size = len(rest)
        self._pending_offset = offset + len(whole)

        lines = whole.split(b"\n")
        lines.pop()  # the empty text after the last newline
        records: list[dict[str, Any]] = []
        for line in lines:
            line_offset = offset
            offset += len(line) + 1
            if not line.strip():
                continue
            record, problem = _parse_line(line)
            if record is None:
                self._warnings.log(
                    logger,
                    logging.WARNING,
                    self.path,
                    "skipped a corrupt line at offset %d of %s: %s",
                    line_offset,
                    self.path,
                    problem,
                )
            else:
                records.append(record)
        return records


def _join_chunks(chunks: list[bytes]) -> bytes:
    """Join the chunks of a line that spans several reads; one copy of every byte."""
    return b"".join(chunks)


# -- parsing and checking lines -----------------------------------------------------------------


_TORN_LINE = "a JSON object cut short, as a crash during an append leaves it"


def _parse_line(line: bytes) -> tuple[dict[str, Any] | None, str]:
    """Parse one line into a JSON object, or return None and the reason it is corrupt.

    The reason of a torn line, the start of a JSON object cut short, is _TORN_LINE.
    """
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        if _is_torn(line):
            return None, _TORN_LINE
        return None, f"invalid JSON: {exc}"
    if not isinstance(value, dict):
        return None, f"a JSON {type(value).__name__}, not an object"
    return value, ""


def _is_torn(line: bytes) -> bool:
    """Return whether ``line`` is the start of a JSON object that ends too early.

    A crash during an append leaves such a line, and the next writer ends it with a
    newline. The test: the line starts with "{" and the JSON parser reaches the end of the
    line inside the object, which orjson reports as "unexpected end of data" (orjson 3.13,
    pinned by the tests of fold_runs). A cut inside a multi-byte character leaves an
    incomplete UTF-8 sequence at the very end, which is dropped first.
    """
    text = line.strip()
    if not text.startswith(b"{"):
        return False
    try:
        text.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.reason != "unexpected end of data" or exc.end != len(text):
            return False
        text = text[: exc.start]
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return exc.msg == "unexpected end of data"
    return False


def _read_lines(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    """Yield the line number and the record of each non-blank line, or None and the reason.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        OSError: it cannot be read.
    """
    with open(path, "rb") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            record, problem = _parse_line(line)
            yield number, record, problem


def _fold_file(
    path: Path, run_lines: dict[str, dict[str, Any]], ended: set[str]
) -> tuple[int, int]:
    """Fold the run lines of one file into ``run_lines``; return the corrupt and torn counts.

    ``ended`` contains the ids of the runs in ``run_lines`` that come from a run_end line.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        OSError: it cannot be read.
    """
    corrupt = torn = 0
    first_problem = ""
    for number, record, problem in _read_lines(path):
        if record is not None:
            problem = _check_record(record)
        if record is None or problem:
            corrupt += 1
            if problem == _TORN_LINE:
                torn += 1
            first_problem = first_problem or f"line {number}: {problem}"
            continue

        run_id = record["run_id"]
        if record["record_type"] == "run_end":
            run_lines[run_id] = record
            ended.add(run_id)
        elif record["record_type"] == "run_start" and run_id not in ended:
            run_lines[run_id] = record

    if corrupt:
        logger.warning(
            "skipped %s in %s, the first at %s", _corrupt_lines(corrupt), path, first_problem
        )
    return corrupt, torn


def _corrupt_lines(count: int) -> str:
    return "1 corrupt line" if count == 1 else f"{count} corrupt lines"


def _check_record(record: dict[str, Any]) -> str:
    """Return what is wrong with a journal record, or "" when it is a valid record."""
    record_type = record.get("record_type")
    if record_type == "event":
        problem = _EVENT_FIELDS.problem(record)
        if not problem:
            problem = _timestamp_problem("timestamp", record["timestamp"])
        return problem
    if record_type not in ("run_start", "run_end"):
        return f"unknown record_type {record_type!r}"

    problem = _RUN_FIELDS.problem(record)
    if problem:
        return f"{record_type}: {problem}"
    if record["status"] not in STATUSES:
        return f"{record_type}: unknown status {record['status']!r}"
    for name in _TIMESTAMP_COLUMNS:
        value = record.get(name)
        if value is not None and (problem := _timestamp_problem(name, value)):
            return f"{record_type}: {problem}"
    return ""


def _run_from_line(line: dict[str, Any]) -> RunRecord:
    """Build the RunRecord of a run line that _check_record accepted.

    Those checks cover what RunRecord.from_dict checks and converts (required fields,
    metrics_json an object, api_posted a bool), so the record is built directly. Keys that
    are not fields, such as record_type, are left out, and a missing field gets its default.
    """
    # The dataclass __init__ takes the fields as positional parameters in definition order.
    # Passing them by position saves matching each keyword name to a parameter: in a timeit
    # measurement on CPython 3.11 (AMD EPYC, 2 cores) it took a third of the time.
    return RunRecord(
        *[line[name] if name in line else default() for name, default in _RUN_FIELD_DEFAULTS]
    )


class _FieldTypes:
    """The JSON types that each field of a record dataclass accepts, and its required fields."""

    def __init__(self, record_class: type[Any]) -> None:
        hints = typing.get_type_hints(record_class)
        self.types: dict[str, tuple[type, ...]] = {}
        self.required: list[str] = []
        for field in dataclasses.fields(record_class):
            hint = hints[field.name]
            is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
            members = typing.get_args(hint) if is_union else (hint,)
            self.types[field.name] = tuple(
                typing.get_origin(member) or member for member in members
            )
            if (
                field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING
            ):
                self.required.append(field.name)

    def problem(self, record: dict[str, Any]) -> str:
        """Return what is wrong with the fields of ``record``, or "" when they fit.

        Keys that are not fields, such as record_type, are ignored. Types are compared
        exactly, as orjson returns them, so a bool is not taken for an int.
        """
        for name in self.required:
            if name not in record:
                return f"missing field {name!r}"
            value = record[name]
            if isinstance(value, str) and not value.strip():
                return f"{name} is empty"

        for name, value in record.items():
            allowed = self.types.get(name)
            if allowed is None:
                continue
            if type(value) not in allowed:
                expected = " or ".join(_type_name(kind) for kind in allowed)
                return f"{name} is {_type_name(type(value))}, expected {expected}"
            if type(value) is int and not INT64_MIN <= value <= INT64_MAX:
                return f"{name} is outside the 64-bit range of the index"
        return ""


def _type_name(kind: type) -> str:
    return "null" if kind is type(None) else kind.__name__


def _default_of(field: dataclasses.Field[Any]) -> Callable[[], Any]:
    """Return a function that makes the default value of ``field``.

    A required field gets a function that raises, because _check_record rejects a line
    without it.
    """
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory
    if field.default is dataclasses.MISSING:

        def missing() -> Any:
            raise KeyError(field.name)

        return missing
    default = field.default
    return lambda: default


_RUN_FIELDS = _FieldTypes(RunRecord)
_RUN_FIELD_DEFAULTS = [
    (field.name, _default_of(field)) for field in dataclasses.fields(RunRecord) if field.init
]
_EVENT_FIELDS = _FieldTypes(RunEvent)


def _timestamp_problem(name: str, value: str) -> str:
    try:
        parse_timestamp(value)
    except ValueError as exc:
        return f"{name}: {exc}"
    return ""


# -- dates --------------------------------------------------------------------------------------


def _date_argument(value: str | datetime.date | None, name: str) -> str | None:
    """Return a date argument as YYYYMMDD, or None for None.

    Raises:
        ValueError: an invalid date text, or a naive datetime.
        TypeError: a value of another type.
    """
    if value is None:
        return None
    if isinstance(value, datetime.datetime):
        if value.utcoffset() is None:
            raise ValueError(
                f"invalid {name} {value!r}: expected an aware datetime or a datetime.date, "
                "because a naive datetime has no UTC date"
            )
        return value.astimezone(datetime.timezone.utc).strftime("%Y%m%d")
    if isinstance(value, datetime.date):
        return value.strftime("%Y%m%d")
    if not isinstance(value, str):
        raise TypeError(
            f"{name} must be {_DATE_ARGUMENT_FORMS}, not {type(value).__name__}: {value!r}"
        )
    try:
        return normalise_date(value)
    except ValueError:
        raise ValueError(f"invalid {name} {value!r}: expected {_DATE_ARGUMENT_FORMS}") from None
