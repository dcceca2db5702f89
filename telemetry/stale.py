"""Find runs left ``running`` by a process that is gone, and end them as abandoned.

A run stays ``running`` in the index when its process dies before end_run: kill -9, an
out-of-memory kill, a power loss. The client records the hostname and pid of every run,
so on the same host the run can be judged by its process. A run of another host, or one
whose process is still alive, can only be judged by how long it has been running.

Logger: ``telemetry.stale``.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sqlite3
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from telemetry.database import DatabaseWriter
from telemetry.models import RunRecord, parse_timestamp

if TYPE_CHECKING:
    from telemetry.client import TelemetryClient

__all__ = [
    "PID_REUSE_TOLERANCE",
    "AbandonResult",
    "StaleRun",
    "abandon_runs",
    "find_stale_runs",
    "format_span",
    "process_is_gone",
]

logger = logging.getLogger("telemetry.stale")

PID_REUSE_TOLERANCE = datetime.timedelta(seconds=5)
"""How much later than a run's start its pid's process may seem to have started and
still count as the run's own process.

The start of a process is computed from the time since boot and today's wall clock, so
a wall-clock step forward since the run started makes the process seem to start later
by that step.
"""

# The API sync state lives in the index only; the journal's copy of it is not kept up to date.
_SYNC_COLUMNS = ("api_posted", "api_posted_at", "api_retry_count", "api_last_error")

_PROC = Path("/proc")
# States of /proc/<pid>/stat in which the process has exited: zombie and dead.
_EXITED_STATES = frozenset({"Z", "X", "x"})


class StaleRun(NamedTuple):
    """A run that is still ``running`` in the index but should not be."""

    record: RunRecord
    reason: str
    """The cause in words, such as "process 4242 on host-a is no longer running"."""


def process_is_gone(pid: int, started_at: datetime.datetime) -> bool:
    """Return whether the process that started a run at ``started_at`` has ended.

    True when no process ``pid`` exists on this host, or when it is a zombie: it has
    exited and its parent has not reaped it. True also when the process that now has
    ``pid`` started more than PID_REUSE_TOLERANCE after ``started_at``, because then the
    pid was reused. The last two checks read /proc, on Linux only. Elsewhere, or when
    /proc/<pid>/stat is not readable, an existing process counts as the run's own. A
    process of another user (os.kill raises PermissionError) exists.

    NOTE: on Windows, os.kill(pid, 0) would send CTRL_C_EVENT, so no check is made and
    every process counts as running.

    Raises:
        ValueError: ``pid`` is not an int of 1 or more, or ``started_at`` is naive.
    """
    if not isinstance(pid, int) or isinstance(pid, bool) or pid < 1:
        raise ValueError(f"invalid pid {pid!r}: expected an int >= 1")
    if started_at.utcoffset() is None:
        raise ValueError(
            f"invalid started_at {started_at!r}: pass an aware datetime, e.g. with tzinfo=UTC"
        )
    if os.name == "nt":
        return False

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    except OverflowError:
        return True  # larger than any pid the kernel hands out

    try:
        found = _read_proc_stat(pid)
    except FileNotFoundError:
        return True  # it ended after os.kill found it
    if found is None:
        return False
    state, process_start = found
    if state in _EXITED_STATES:
        return True
    return process_start > started_at + PID_REUSE_TOLERANCE


def _read_proc_stat(pid: int) -> tuple[str, datetime.datetime] | None:
    """Return the state and the start time of process ``pid`` from /proc/<pid>/stat.

    Returns None when this host has no /proc, or the file cannot be read or parsed.

    Raises:
        FileNotFoundError: /proc exists, but no process ``pid``.
    """
    if not (_PROC / "self" / "stat").exists():
        return None
    try:
        text = (_PROC / str(pid) / "stat").read_bytes().decode("ascii", "replace")
    except FileNotFoundError:
        raise
    except OSError as exc:
        logger.debug("cannot read /proc/%d/stat: %s", pid, exc)
        return None

    # The second field is the command name in parentheses. It may itself contain spaces
    # and parentheses, so the fields after it start after the last ")".
    fields = text[text.rfind(")") + 2 :].split()
    try:
        state = fields[0]
        start_ticks = int(fields[19])  # field 22 of proc(5), "starttime"
    except (IndexError, ValueError):
        logger.debug("cannot parse /proc/%d/stat: %r", pid, text)
        return None
    return state, _boot_time() + datetime.timedelta(seconds=start_ticks / os.sysconf("SC_CLK_TCK"))


def _boot_time() -> datetime.datetime:
    """Return the wall-clock time at which this host booted, by today's clock.

    /proc/<pid>/stat gives a process's start in clock ticks since boot. Linux takes it
    from the boot-based clock (task->start_boottime in fs/proc/array.c), the clock that
    CLOCK_BOOTTIME reads, which includes time spent suspended.
    """
    if hasattr(time, "CLOCK_BOOTTIME"):
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
    else:
        since_boot = float((_PROC / "uptime").read_text().split()[0])
    now = datetime.datetime.now(datetime.timezone.utc)
    return now - datetime.timedelta(seconds=since_boot)


def find_stale_runs(
    index: DatabaseWriter,
    *,
    stale_after: datetime.timedelta | None = None,
    now: datetime.datetime | None = None,
    hostname: str | None = None,
) -> list[StaleRun]:
    """Return the runs of ``index`` still ``running`` whose process is gone or that run too long.

    The runs are in the order of list_runs, newest first.

    Args:
        index: the index to read.
        stale_after: a run that started more than this before ``now`` is stale whatever
            its host. None leaves out this check.
        now: the current time; default the clock's.
        hostname: this host's name, default socket.gethostname(), the value the client
            records. Runs with this hostname and a pid are checked with
            process_is_gone. Runs of other hosts, or without a pid, are judged by
            ``stale_after`` only.

    NOTE: a hostname and a pid name a process only within one PID namespace. An agent in
    a container that reports the host's hostname (Docker ``--network host``, Kubernetes
    ``hostNetwork: true``) records a pid of the container's namespace. Checked from the
    host, its live run can be judged gone, because no process has that pid, and its dead
    run alive, because an unrelated process has it. Where agents run like that, judge
    runs by ``stale_after`` alone by passing a ``hostname`` that no run records. The
    ``telemetry check`` command has no option for that, so its --repair applies the
    process check too.

    Raises:
        ValueError: ``stale_after`` is not positive, or ``now`` is naive.
        sqlite3.Error: the index cannot be read.
    """
    if stale_after is not None and stale_after <= datetime.timedelta(0):
        raise ValueError(f"invalid stale_after {stale_after}: expected a positive duration")
    if now is None:
        now = datetime.datetime.now(datetime.timezone.utc)
    elif now.utcoffset() is None:
        raise ValueError(f"invalid now {now!r}: pass an aware datetime, e.g. with tzinfo=UTC")
    host = socket.gethostname() if hostname is None else hostname

    stale: list[StaleRun] = []
    for record in index.iter_runs(status="running"):
        reason = _stale_reason(record, host, stale_after, now)
        if reason is not None:
            stale.append(StaleRun(record, reason))
    return stale


def _stale_reason(
    record: RunRecord,
    host: str,
    stale_after: datetime.timedelta | None,
    now: datetime.datetime,
) -> str | None:
    """Return why ``record`` is stale, or None if it is not."""
    started = parse_timestamp(record.start_time)
    pid = record.pid
    # A pid below 1 cannot be a process's: os.kill(0, 0) would signal our process group.
    on_this_host = record.hostname == host
    if on_this_host and pid is not None and pid >= 1 and process_is_gone(pid, started):
        return f"process {pid} on {host} is no longer running"
    if stale_after is not None:
        running_for = now - started
        if running_for > stale_after:
            return (
                f"running for {format_span(running_for)}, "
                f"longer than the stale-after limit of {format_span(stale_after)}"
            )
    return None


def format_span(duration: datetime.timedelta) -> str:
    """Return ``duration`` in its two largest units, such as "6 h 12 min" or "45 s".

    A unit of zero after the first is left out ("6 h", not "6 h 0 min"), and smaller
    units are dropped, not rounded.
    """
    seconds = max(0, int(duration.total_seconds()))
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    units = [(days, "d"), (hours, "h"), (minutes, "min"), (seconds, "s")]
    while len(units) > 1 and units[0][0] == 0:
        units.pop(0)
    displayed = [units[0]] + [unit for unit in units[1:2] if unit[0] != 0]
    return " ".join(f"{value} {name}" for value, name in displayed)


class AbandonResult(NamedTuple):
    """The outcome of abandon_runs for each stale run, judged by reading its index row back."""

    abandoned: list[str]
    """Ids of the runs ended as abandoned: a run_end line was journaled and the index row
    has status abandoned."""
    ended_meanwhile: list[tuple[str, str]]
    """(run id, status) of the runs that another process ended since they were found, such
    as their own agent. Nothing is left to repair for them."""
    failed: list[tuple[str, str]]
    """(run id, reason) of the runs still running, or whose row could not be checked. The
    reason names the write that failed, and the client's ERROR log line gives the cause."""
    restored: list[tuple[str, str]]
    """(run id, status) of the runs whose journal already has their end, such as a run
    whose agent was killed between its run_end line and its index update. Their index
    row now has that end."""


def abandon_runs(
    client: TelemetryClient,
    stale: Iterable[StaleRun],
    *,
    index: DatabaseWriter | None = None,
    journal_runs: Mapping[str, RunRecord] | None = None,
) -> AbandonResult:
    """End each stale run with status ``abandoned`` and the reason as error_summary.

    A run whose record in ``journal_runs`` has already ended is not abandoned: its agent
    journaled the end and died before it updated the index. Its index row gets the
    journal's record instead, as a rebuild would give it, except for the API sync columns,
    which only the index holds.

    Each run is ended through client.end_run, which journals a run_end line and then
    updates the index row while its status is still running. For a run that another
    process started, end_run sets the duration from its start_time to now. The index row
    of each run is then read back, because end_run logs a failed write instead of raising
    it: only a row with status abandoned counts as abandoned. A run that has ended since
    it was found keeps its end, with the client's WARNING.

    Args:
        client: the client that writes the ends. It must be enabled.
        stale: the runs to end, as find_stale_runs returns them.
        index: the index to read the rows back from; None opens client.config.db_path
            for the call.
        journal_runs: the runs the journal describes, by run id, as
            JournalReader.fold_runs returns them; None abandons every stale run.

    Returns:
        The runs abandoned, those ended meanwhile by another process, and those that
        failed with the reason. A row that cannot be read back counts as failed. When
        ``index`` is None and the index cannot be opened, no run is tried and each one
        fails, with an ERROR.
    """
    runs = list(stale)
    if not runs:
        return AbandonResult([], [], [], [])
    ended = {} if journal_runs is None else journal_runs
    if index is not None:
        return _abandon(client, runs, index, ended)
    try:
        opened = DatabaseWriter(client.config.db_path)
    except (sqlite3.Error, OSError) as exc:
        reason = f"not tried, because the index {client.config.db_path} cannot be opened: {exc}"
        logger.error("cannot end the stale runs as abandoned: %s", reason)
        return AbandonResult([], [], [(run.record.run_id, reason) for run in runs], [])
    with opened:
        return _abandon(client, runs, opened, ended)


def _abandon(
    client: TelemetryClient,
    runs: list[StaleRun],
    index: DatabaseWriter,
    journal_runs: Mapping[str, RunRecord],
) -> AbandonResult:
    result = AbandonResult([], [], [], [])
    for run in runs:
        run_id = run.record.run_id
        journaled = journal_runs.get(run_id)
        if journaled is not None and journaled.is_final:
            _restore_journaled_end(index, journaled, result)
            continue
        ended = client.end_run(run_id, "abandoned", error_summary=run.reason)
        try:
            row = index.get_run(run_id)
        except (sqlite3.Error, ValueError) as exc:
            result.failed.append((run_id, f"its index row cannot be read back: {exc}"))
            continue

        if row is None:
            result.failed.append((run_id, "its index row was deleted meanwhile"))
        elif row.status == "running":
            if ended is None:
                reason = "its run_end line could not be journaled, so its index row was left as is"
            else:
                reason = "its run_end line was journaled, but its index row could not be updated"
            result.failed.append((run_id, reason))
        elif ended is not None and row.status == "abandoned":
            logger.info("ended run %s as abandoned: %s", run_id, run.reason)
            result.abandoned.append(run_id)
        else:
            result.ended_meanwhile.append((run_id, row.status))
    return result


def _restore_journaled_end(index: DatabaseWriter, record: RunRecord, result: AbandonResult) -> None:
    """Write the journal's final ``record`` into its index row while that is still running."""
    run_id = record.run_id
    values = record.to_dict()
    for name in ("run_id", *_SYNC_COLUMNS):
        del values[name]
    try:
        updated = index.update_run(run_id, if_status="running", **values)
        row = index.get_run(run_id)
    except (sqlite3.Error, ValueError, TypeError) as exc:
        logger.error("cannot write the journaled end of run %s into the index: %s", run_id, exc)
        result.failed.append(
            (run_id, f"its journaled end could not be written to the index: {exc}")
        )
        return
    if row is None:
        result.failed.append((run_id, "its index row was deleted meanwhile"))
    elif updated:
        logger.info(
            "run %s: wrote its journaled end, status %s, into the index", run_id, row.status
        )
        result.restored.append((run_id, row.status))
    else:
        result.ended_meanwhile.append((run_id, row.status))
