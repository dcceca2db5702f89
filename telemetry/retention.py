"""Retention: deleting old journal files and index rows.

plan_prune finds what is older than a cutoff, at the start of a UTC day, and prune
deletes it. The journal's files are per UTC day, so the cutoff falls between two files:
the files dated before the cutoff's day go. A run's index row goes when its last run line
is older than the cutoff: it started before the cutoff and ended before it too. A run
that ended at or after the cutoff keeps its row, because its run_end line is in a kept
file and check and rebuild_index would otherwise find a run that the index lacks.

A run without an end_time that started before the cutoff loses its row, because its only
run line, run_start, goes with its file. Such a run has been running for longer than the
retention, so it is stale unless its agent is still at work. If that agent ends it, the
client writes a run_end line and the whole record to the index again. The rule reads the
index, so a run whose end never reached the index is judged by its start alone.

Runs not yet posted to the API are deleted like any other. plan_prune counts them
(``PrunePlan.pending_runs``) so that a caller can stop first.

Logger: ``telemetry.retention``.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from typing import NamedTuple

from telemetry._dates import date_of_file_name
from telemetry.database import DatabaseWriter
from telemetry.journal import JournalFile, JournalReader
from telemetry.models import get_iso8601_timestamp

__all__ = ["MIN_OLDER_THAN", "PrunePlan", "PruneResult", "plan_prune", "prune"]

logger = logging.getLogger("telemetry.retention")

MIN_OLDER_THAN = datetime.timedelta(days=1)
"""The shortest retention: agents are still appending to today's journal file."""


class PrunePlan(NamedTuple):
    """The journal files and index rows that prune would delete, as plan_prune found them."""

    cutoff: datetime.datetime
    """Start of a UTC day: files dated before its day go, and so do the index rows of runs
    with no run line at or after it."""
    files: list[JournalFile]
    """The journal files dated before the cutoff's day, oldest first."""
    bytes: int
    """The total size of ``files`` when planned."""
    runs: int
    """The index rows of runs that started before the cutoff and ended before it or have
    no end_time, when planned."""
    pending_runs: int
    """Of ``runs``, those that ended and are not yet posted to the API, when planned."""


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
    timestamp = get_iso8601_timestamp(cutoff)
    runs = index.count_runs(started_before=timestamp, ended_before=timestamp)
    pending_runs = index.count_pending_api_posts(started_before=timestamp, ended_before=timestamp)
    return PrunePlan(cutoff=cutoff, files=files, bytes=size, runs=runs, pending_runs=pending_runs)


def prune(
    index: DatabaseWriter,
    plan: PrunePlan,
    *,
    progress: Callable[[int, int], None] | None = None,
    now: datetime.datetime | None = None,
) -> PruneResult:
    """Delete the index rows and journal files of ``plan``, rows first.

    Every file of the plan is checked before anything is deleted: its name must be a
    journal file's name dated before the cutoff's day. The rows deleted are those that
    started and ended before the cutoff, or have no end, at the time of deletion. That
    may include rows written since the plan, but never a newer one. Runs not yet posted
    to the API are deleted too: check ``plan.pending_runs`` first. A file already gone is
    skipped. Deleting the rows first means that an interrupted prune leaves journal lines
    that rebuild_index could restore the rows from, never rows without their journal.
    Running prune again with a new plan finishes the work.

    Args:
        index: the index to delete rows from.
        plan: what plan_prune returned.
        progress: called as ``progress(done, total)``, counting rows and then files.
        now: the current time, an aware datetime; None for the clock's. Pass the ``now``
            that the plan was made with.

    Raises:
        TypeError: ``now`` is not a datetime.
        ValueError: ``now`` is naive, or a file of the plan is not dated before the
            cutoff's day, or the cutoff is not the start of a UTC day. The cutoff must
            also be no later than the start of the day before ``now``'s, the latest that
            plan_prune returns. Nothing is deleted.
        sqlite3.Error, OSError: a deletion failed. What was deleted before it stays deleted.
        Any exception raised by ``progress``.
    """
    cutoff = _check_plan(plan, _check_now(now))
    timestamp = get_iso8601_timestamp(cutoff)
    files = len(plan.files)

    def rows_progress(done: int, total: int) -> None:
        if progress is not None:
            progress(done, total + files)

    runs_deleted = index.delete_runs(
        started_before=timestamp, ended_before=timestamp, progress=rows_progress
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
        timestamp,
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
    now = _check_now(now)
    try:
        moment = now - older_than
    except OverflowError:
        raise ValueError(
            f"invalid older_than {older_than}: the cutoff would fall before year 1"
        ) from None
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def _check_now(now: datetime.datetime | None) -> datetime.datetime:
    """Return ``now`` in UTC, or the clock's time for None."""
    if now is None:
        return datetime.datetime.now(datetime.timezone.utc)
    if not isinstance(now, datetime.datetime):
        raise TypeError(f"now must be a datetime.datetime, not {type(now).__name__}: {now!r}")
    if now.utcoffset() is None:
        raise ValueError(f"invalid now {now!r}: pass an aware datetime, e.g. with tzinfo=UTC")
    try:
        return now.astimezone(datetime.timezone.utc)
    except OverflowError:
        raise ValueError(
            f"invalid now {now!r}: it falls outside the years 1 to 9999 in UTC"
        ) from None


def _check_plan(plan: PrunePlan, now: datetime.datetime) -> datetime.datetime:
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
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    latest = today - MIN_OLDER_THAN
    if cutoff > latest:
        raise ValueError(
            f"invalid plan cutoff {cutoff.isoformat()}: expected {latest.isoformat()} or "
            "earlier, because plan_prune keeps at least one day before today's journal "
            "file, which agents are appending to; make a new plan with plan_prune"
        )

    cutoff_date = cutoff.strftime("%Y%m%d")
    for journal_file in plan.files:
        date = date_of_file_name(journal_file.path.name)
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
