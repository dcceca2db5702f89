"""Retention: deleting old journal files and index rows.

plan_prune finds what is older than a cutoff, at the start of a UTC day, and prune
deletes it. The journal's files are per UTC day, so the cutoff falls between two files:
the files dated before the cutoff's day go, and the index rows of runs that started
before the cutoff go with them.

NOTE: a run that started before the cutoff and ended after it loses its row, its
run_start line and the events dated before the cutoff. Its run_end line is in a kept
file, so a later rebuild_index writes its row again from that line, and the next prune
deletes it again. The lines of runs that started at or after the cutoff are all in kept
files, unless a process with a clock running behind wrote an event dated before the
cutoff.

Logger: ``telemetry.retention``.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from typing import NamedTuple

from telemetry.database import DatabaseWriter
from telemetry.journal import JournalFile, JournalReader
from telemetry.models import get_iso8601_timestamp
from telemetry.ndjson import _date_of_file_name

__all__ = ["MIN_OLDER_THAN", "PrunePlan", "PruneResult", "plan_prune", "prune"]

logger = logging.getLogger("telemetry.retention")

MIN_OLDER_THAN = datetime.timedelta(days=1)
"""The shortest retention: agents are still appending to today's journal file."""


class PrunePlan(NamedTuple):
    """The journal files and index rows that prune would delete, as plan_prune found them."""

    cutoff: datetime.datetime
    """Start of a UTC day: files dated before its day and runs started before it go."""
    files: list[JournalFile]
    """The journal files dated before the cutoff's day, oldest first."""
    bytes: int
    """The total size of ``files`` when planned."""
    runs: int
    """The index rows of runs that started before the cutoff, when planned."""


class PruneResult(NamedTuple):
    """Counts of the journal files, bytes and index rows that prune deleted."""

    files_deleted: int
    bytes_deleted: int
    runs_deleted: int


def plan_prune(
    index: DatabaseWriter,
    reader: JournalReader,
    older_than: datetime.timedelta,
    *,
    now: datetime.datetime | None = None,
) -> PrunePlan:
    """Find the journal files and index rows older than ``older_than``, and delete nothing.

    The cutoff is the start of the UTC day of ``now - older_than``, so whole days of the
    journal are kept: with older_than of 90 days, the 90 days before today stay, today
    included.

    Args:
        index: the index whose rows are counted.
        reader: the journal whose files are listed.
        older_than: the age of what goes, at least one day.
        now: the current time, an aware datetime; None for the clock's.

    Raises:
        TypeError: ``older_than`` is not a timedelta, or ``now`` is not a datetime.
        ValueError: ``older_than`` is under one day, ``now`` is naive, or the cutoff would
            fall before year 1.
        sqlite3.Error, OSError: the index or the journal directory cannot be read.
    """
    cutoff = _cutoff(older_than, now)
    last_date = (cutoff - datetime.timedelta(days=1)).date()
    files = reader.files(last_date=last_date)
    size = sum(_size_of(journal_file) for journal_file in files)
    runs = index.count_runs(started_before=get_iso8601_timestamp(cutoff))
    return PrunePlan(cutoff=cutoff, files=files, bytes=size, runs=runs)


def prune(
    index: DatabaseWriter,
    plan: PrunePlan,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> PruneResult:
    """Delete the index rows and journal files of ``plan``, rows first.

    Every file of the plan is checked before anything is deleted: its name must be a
    journal file's name dated before the cutoff's day. The rows deleted are those that
    started before the cutoff at the time of deletion, which may include rows written
    since the plan, but never a newer one. A file already gone is skipped. Deleting the
    rows first means that an interrupted prune leaves journal lines that rebuild_index
    could restore the rows from, never rows without their journal. Running prune again
    with a new plan finishes the work.

    Args:
        index: the index to delete rows from.
        plan: what plan_prune returned.
        progress: called as ``progress(done, total)``, counting rows and then files.

    Raises:
        ValueError: the cutoff is not the start of a UTC day, or is later than the start
            of yesterday (the latest cutoff plan_prune returns), or a file of the plan is
            not dated before the cutoff's day. Nothing is deleted.
        sqlite3.Error, OSError: a deletion failed. What was deleted before it stays deleted.
        Any exception raised by ``progress``.
    """
    cutoff = _check_plan(plan)
    files = len(plan.files)

    def rows_progress(done: int, total: int) -> None:
        if progress is not None:
            progress(done, total + files)

    runs_deleted = index.delete_runs(
        started_before=get_iso8601_timestamp(cutoff), progress=rows_progress
    )

    files_deleted = bytes_deleted = 0
    for done, journal_file in enumerate(plan.files, start=1):
        size = _size_of(journal_file)
        try:
            journal_file.path.unlink()
        except FileNotFoundError:
            logger.info("journal file %s was already deleted", journal_file.path)
        else:
            files_deleted += 1
            bytes_deleted += size
        if progress is not None:
            progress(runs_deleted + done, runs_deleted + files)

    logger.info(
        "pruned what is older than %s: %d journal files (%d bytes) and %d index rows",
        get_iso8601_timestamp(cutoff),
        files_deleted,
        bytes_deleted,
        runs_deleted,
    )
    return PruneResult(files_deleted, bytes_deleted, runs_deleted)


def _cutoff(older_than: datetime.timedelta, now: datetime.datetime | None) -> datetime.datetime:
    """Return the start of the UTC day of ``now - older_than``."""
    if not isinstance(older_than, datetime.timedelta):
        raise TypeError(
            f"older_than must be a datetime.timedelta, not {type(older_than).__name__}: "
            f"{older_than!r}"
        )
    if older_than < MIN_OLDER_THAN:
        raise ValueError(
            f"invalid older_than {older_than}: expected at least one day, because agents "
            "are still appending to today's journal file"
        )
    if now is None:
        now = datetime.datetime.now(datetime.timezone.utc)
    elif not isinstance(now, datetime.datetime):
        raise TypeError(f"now must be a datetime.datetime, not {type(now).__name__}: {now!r}")
    elif now.utcoffset() is None:
        raise ValueError(f"invalid now {now!r}: pass an aware datetime, e.g. with tzinfo=UTC")

    try:
        moment = now.astimezone(datetime.timezone.utc) - older_than
    except OverflowError:
        raise ValueError(
            f"invalid older_than {older_than}: the cutoff would fall before year 1"
        ) from None
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def _check_plan(plan: PrunePlan) -> datetime.datetime:
    """Check that ``plan`` deletes nothing newer than plan_prune allows; return its cutoff."""
    cutoff = plan.cutoff
    if not isinstance(cutoff, datetime.datetime) or cutoff.utcoffset() is None:
        raise ValueError(f"invalid plan cutoff {cutoff!r}: expected an aware datetime")
    cutoff = cutoff.astimezone(datetime.timezone.utc)
    if cutoff != cutoff.replace(hour=0, minute=0, second=0, microsecond=0):
        raise ValueError(
            f"invalid plan cutoff {cutoff.isoformat()}: expected the start of a UTC day, "
            "as plan_prune returns"
        )
    today = datetime.datetime.now(datetime.timezone.utc).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    latest = today - MIN_OLDER_THAN
    if cutoff > latest:
        raise ValueError(
            f"invalid plan cutoff {cutoff.isoformat()}: expected {latest.isoformat()} or "
            "earlier, because plan_prune keeps at least one day before today's journal "
            "file, which agents are appending to; make a new plan with plan_prune"
        )

    cutoff_date = cutoff.strftime("%Y%m%d")
    for journal_file in plan.files:
        date = _date_of_file_name(journal_file.path.name)
        if date is None or date != journal_file.date or date >= cutoff_date:
            raise ValueError(
                f"the plan lists {journal_file.path}, which is not a journal file dated "
                f"before the cutoff {cutoff_date}; make a new plan with plan_prune"
            )
    return cutoff


def _size_of(journal_file: JournalFile) -> int:
    try:
        return journal_file.path.stat().st_size
    except FileNotFoundError:
        return 0
