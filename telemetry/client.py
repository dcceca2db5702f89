"""TelemetryClient: the API an agent calls to record its runs.

A run is written twice: to the journal (the NDJSON files, the source of truth) and to the
index (SQLite, for queries). When an API is configured, the ended run is posted to it; a
post that fails stays pending in the index for ``flush_pending``.

Faults of storage and of the API are logged on the ``telemetry`` loggers and never raised
into the agent. Misuse of the API, such as an unknown field or a wrong type, raises at once.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import datetime
import logging
import os
import socket
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from telemetry._fields import check_fields, check_final_status, check_text
from telemetry._logutil import RepeatLimiter
from telemetry.api import APIClient, PostResult
from telemetry.config import TelemetryConfig, resolve_config
from telemetry.context import TrackedRun
from telemetry.database import DatabaseWriter
from telemetry.encoding import make_jsonable
from telemetry.errors import ConfigError
from telemetry.models import (
    STATUSES,
    APIPayload,
    RunEvent,
    RunRecord,
    calculate_duration_ms,
    generate_run_id,
    get_iso8601_timestamp,
    parse_timestamp,
)
from telemetry.ndjson import NDJSONWriter
from telemetry.otel import OTEL_CONTEXT_EVENT, open_bridge

__all__ = ["FlushResult", "TelemetryClient"]

logger = logging.getLogger("telemetry.client")

_T = TypeVar("_T")

# A component that failed to open is tried again after this many seconds, so a fault that
# clears (a disk that was full) does not turn telemetry off for the rest of the process.
REOPEN_AFTER_SECONDS = 30.0

# After a failed post, a pending run is due again after this many seconds times 2 to the
# power of its retry count, at most AUTO_RETRY_MAX_SECONDS. flush_pending ignores both.
AUTO_RETRY_BASE_SECONDS = 30.0
AUTO_RETRY_MAX_SECONDS = 3600.0
AUTO_RETRY_RUNS_PER_END = 3

# How many ids of runs ended by this client are kept to recognise a second end_run at
# once. Older ones are found ended in the index instead, so the number only bounds memory.
ENDED_RUNS_REMEMBERED = 1_000

# Page cache of the client's index connections. Writing a run touches a few pages, and
# 256 KiB kept the cost per run of a 20,000-run index as with SQLite's 2,000 KiB default.
INDEX_PAGE_CACHE_KIB = 256

# flush_pending stops after this many posts in a row that could not reach the API, because
# each later post would spend its own retries and timeouts on the same fault.
FLUSH_UNREACHABLE_LIMIT = 3


class FlushResult(NamedTuple):
    """Outcome of flush_pending, in numbers of runs."""

    posted: int
    failed: int
    remaining: int = 0
    """Pending runs not tried, because the timeout passed or the flush stopped early."""
    stopped_reason: str | None = None
    """The reason the flush stopped before the last pending run, or None if it did not.

    Such as ``the API rejected the credentials (HTTP 401)``. A timeout sets no reason.
    """


@dataclass
class _ActiveRun:
    record: RunRecord
    started_monotonic: float
    indexed_values: dict[str, Any] | None = None
    """The record's values as start_run inserted them into the index, or None if it did not."""


class TelemetryClient:
    """Records runs of agents in the journal and the index, and posts them to the API.

    Thread-safe, and usable from several processes on the same store. Storage is opened on
    first use; the data directory is created with owner-only permissions.

    Args:
        config: the settings. None resolves them from the environment, where an invalid
            variable is logged as an error and replaced by its default, because a broken
            setting must not stop the agent. An explicit config is validated and raises
            ConfigError when invalid.

    Raises:
        ConfigError: an explicit ``config`` is invalid.
        TypeError: ``config`` is not a TelemetryConfig.
    """

    def __init__(self, config: TelemetryConfig | None = None) -> None:
        if config is None:
            config = _config_from_environment()
        elif not isinstance(config, TelemetryConfig):
            raise TypeError(
                f"config must be a TelemetryConfig or None, not {type(config).__name__}: "
                "pass TelemetryConfig(**settings)"
            )
        else:
            config.validate()
        self._config = config
        self._lock = threading.RLock()
        self._active: dict[str, _ActiveRun] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._journal: NDJSONWriter | None = None
        self._index: DatabaseWriter | None = None
        self._failed_at: dict[str, float] = {}
        self._api = APIClient(config)
        self._repeats = RepeatLimiter()
        self._closed = False
        self._background_posts: set[asyncio.Task[None]] = set()
        # The OpenTelemetry bridge, or None when it is off (docs/opentelemetry.md).
        self._otel = open_bridge(config)
        _register_exit_hook(self)

    # -- public API ---------------------------------------------------------------------

    @property
    def config(self) -> TelemetryConfig:
        """The resolved settings."""
        return self._config

    @property
    def enabled(self) -> bool:
        """Whether the client records anything; False makes every call a cheap no-op."""
        return self._config.enabled

    def start_run(
        self,
        agent_name: str,
        job_type: str,
        trigger_type: str = "cli",
        **fields: Any,
    ) -> str:
        """Start a run: journal its start, index it, and return its run id.

        Args:
            agent_name: the agent, such as ``"stdlib-audit"``; part of the run id.
            job_type: the kind of work, such as ``"audit"``.
            trigger_type: what started the run, such as ``"cli"``, ``"cron"`` or ``"api"``.
            **fields: any of RunRecord.CALLER_FIELDS, such as parent_run_id,
                items_discovered, input_summary, metrics_json, product or git_commit.

        Raises:
            TypeError: an unknown field or a value of the wrong type, named in the message.
            ValueError: an empty name, or a count outside 0 to 2**63 - 1.
        """
        check_text(agent_name, "agent_name")
        check_text(job_type, "job_type")
        check_text(trigger_type, "trigger_type")
        fields = check_fields(fields, "start_run")
        run_id = generate_run_id(agent_name)
        if not self._config.enabled:
            return run_id

        now = get_iso8601_timestamp()
        record = RunRecord(
            run_id=run_id,
            agent_name=agent_name,
            job_type=job_type,
            trigger_type=trigger_type,
            start_time=now,
            hostname=_hostname(),
            pid=os.getpid(),
            created_at=now,
            updated_at=now,
        )
        self._apply_fields(record, fields)
        active = _ActiveRun(record, time.monotonic())
        with self._lock:
            self._active[run_id] = active

        start_values = record.to_dict()
        with self._journaling("run_start", start_values, run_id):
            index = self._open_index()
            if index is not None and self._guard(
                "index the start of", run_id, index.insert_run, record
            ):
                # No other thread has the run id before start_run returns it, so nothing
                # has changed the record since start_values was taken.
                active.indexed_values = start_values
        if self._otel is not None:
            span_parent = self._otel.start_run(record)
            if span_parent is not None:
                self.log_event(run_id, OTEL_CONTEXT_EVENT, span_parent)
        return run_id

    def log_event(
        self, run_id: str, event_type: str, payload: Mapping[str, Any] | None = None
    ) -> None:
        """Journal an event of a run. Events go to the journal only, not to the index.

        Values that JSON cannot hold are stored in the form docs/config.md lists, with a
        warning that names the field.

        Raises:
            TypeError: run_id or event_type is not a string, or payload is not a mapping.
            ValueError: event_type is empty.
        """
        check_text(run_id, "run_id")
        check_text(event_type, "event_type")
        if payload is not None and not isinstance(payload, Mapping):
            raise TypeError(
                f"log_event(): payload must be a dict or None, not {type(payload).__name__}"
            )
        if not self._config.enabled:
            return

        converted = self._convert(payload or {}, "payload", run_id)
        with self._lock:
            active = self._active.get(run_id)
        event = RunEvent(
            run_id=run_id,
            event_type=event_type,
            timestamp=get_iso8601_timestamp(),
            payload=converted,
            agent_name=active.record.agent_name if active else None,
        )
        self._write_journal("event", event.to_dict(), run_id, converted_key="payload")
        if self._otel is not None:
            self._otel.log_event(run_id, event_type, event.timestamp, converted)

    def end_run(self, run_id: str, status: str = "success", **fields: Any) -> RunRecord | None:
        """End a run: journal its end, update the index, and post it to the API.

        Posting takes at most ``config.end_run_timeout`` seconds; a run not posted by then
        stays pending for flush_pending. A run that was started by another client or
        process is looked up in the index. Ending an unknown run logs a warning, and ending
        one that has already ended logs a warning and changes nothing.

        For a run started by another client, the index row is updated only while its
        status is still running. If that process ends the run first, its end is kept, and
        its record is journaled again after this client's run_end line, with a warning.
        Conversely, when another process ends a run of this client first, this client's
        end replaces it in the index and is journaled again, with a warning.

        Args:
            run_id: the id start_run returned.
            status: one of success, failed, partial, cancelled, timeout, abandoned.
            **fields: any of RunRecord.CALLER_FIELDS, as for start_run.

        Returns:
            The final record, or None when the run is unknown or has already ended, or the
            client is disabled. For a run started by another client, also None when the
            run_end line could not be journaled or another process ended the run first.

        Raises:
            TypeError, ValueError: an invalid status, field name or value.
        """
        record = self._finish_run(run_id, status, fields)
        if record is not None:
            if self._otel is not None:
                self._otel.end_run(record)
            self._post_ended_run(record)
        return record

    def track_run(
        self,
        agent_name: str,
        job_type: str,
        trigger_type: str = "cli",
        **fields: Any,
    ) -> TrackedRun:
        """Return a context manager that runs its block as one run, for with and async with.

        The block gets a RunContext. Inside another track_run block, the run records the
        outer run as its parent unless parent_run_id is given. On leaving, the run ends
        with a status that context.classify_exit documents: success, failed, cancelled or
        timeout. The exception that left the block, if any, is re-raised unchanged.

        Raises:
            TypeError, ValueError: as start_run, when the block is entered.
        """
        return TrackedRun(
            self,
            {
                "agent_name": agent_name,
                "job_type": job_type,
                "trigger_type": trigger_type,
                **fields,
            },
        )

    def get_stats(self) -> dict[str, Any]:
        """Return counts of the runs in the index: by status, by agent, and pending posts.

        Keys are those of DatabaseWriter.get_run_stats, plus ``active_runs`` (runs this
        client started and has not ended) and ``index_available``. When the index cannot
        be read, the counts are empty and the fault is logged.
        """
        stats: dict[str, Any] | None = None
        index = self._open_index()
        if index is not None:
            stats = self._guard("read statistics for", None, index.get_run_stats)
        if stats is None:
            stats = {
                "since": None,
                "total_runs": 0,
                "by_status": dict.fromkeys(STATUSES, 0),
                "pending_api_posts": 0,
                "by_agent": {},
            }
        with self._lock:
            stats["active_runs"] = len(self._active)
        stats["index_available"] = index is not None
        return stats

    def flush_pending(
        self,
        limit: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        timeout: float | None = None,
    ) -> FlushResult:
        """Post every pending run now, ignoring the backoff of the automatic retries.

        Each post gets the full retries of the API client. Returns when each pending run
        was posted or failed, or when ``timeout`` has passed. Stops early, with the reason
        in ``FlushResult.stopped_reason`` and a WARNING logged, when the API responds to a post
        with HTTP 401 or 403, or when FLUSH_UNREACHABLE_LIMIT posts in a row could not
        reach it (a refused connection, a DNS failure, a timeout). Any HTTP response resets
        that count. The runs not tried stay pending and are counted in
        ``FlushResult.remaining``. Nothing is posted when the API is off or not configured.

        Args:
            limit: post at most this many runs, oldest first; None for all.
            progress: called with (runs done, runs in total) after each run.
            timeout: seconds after which no further post or retry starts; None waits for all.

        Raises:
            TypeError, ValueError: ``limit`` is not a positive int, or ``timeout`` is not a
                positive number.
        """
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)):
            raise TypeError(f"flush_pending(): limit must be an int or None, not {limit!r}")
        if limit is not None and limit < 1:
            raise ValueError(f"flush_pending(): limit={limit} must be 1 or more, or None")
        if timeout is not None and (isinstance(timeout, bool) or not timeout > 0):
            raise ValueError(f"flush_pending(): timeout={timeout!r} must be a positive number")

        index = self._open_index()
        if not self._api.enabled:
            logger.info("flush_pending: the API is not configured or enabled; nothing posted")
            return FlushResult(0, 0, 0)
        if index is None:
            return FlushResult(0, 0, 0)
        pending = self._guard("list pending posts", None, index.get_pending_api_posts, limit)
        if not pending:
            return FlushResult(0, 0, 0)

        deadline = None if timeout is None else time.monotonic() + timeout
        posted = failed = 0
        stopped_reason = None
        early_stop = _EarlyStop()
        for done, record in enumerate(pending, start=1):
            if deadline is not None and time.monotonic() >= deadline:
                break
            result = self._post_and_mark(index, record, deadline=deadline)
            if result.success:
                posted += 1
            else:
                failed += 1
            if progress is not None:
                progress(done, len(pending))
            stopped_reason = early_stop.reason_after(result)
            if stopped_reason is not None:
                break

        remaining = len(pending) - posted - failed
        if remaining == 0:
            stopped_reason = None  # the stop came after the last run, so it skipped nothing
        if stopped_reason is not None:
            logger.warning(
                "flush_pending stopped after %d of %d runs, because %s. The rest stay "
                "pending: %s, then flush again",
                posted + failed,
                len(pending),
                stopped_reason,
                early_stop.fix,
            )
        logger.info("flush_pending: %d posted, %d failed, %d not tried", posted, failed, remaining)
        return FlushResult(posted, failed, remaining, stopped_reason)

    def close(self) -> None:
        """End the runs still open as abandoned, flush the journal, and close everything.

        With the OpenTelemetry bridge's own pipeline, the spans not yet exported are given
        up to ``config.end_run_timeout`` seconds, and at least 1 s, to reach the
        collector. The interpreter's exit calls it for every client. After close, calls
        are accepted but record nothing, with a warning. Idempotent; faults are logged.
        """
        with self._lock:
            if self._closed:
                return
        self._abandon_open_runs()
        unfinished_posts = [task for task in self._background_posts if not task.done()]
        if unfinished_posts:
            logger.warning(
                "closing with %d API posts still in flight; those runs stay pending for "
                "flush_pending()",
                len(unfinished_posts),
            )
        with self._lock:
            if self._closed:
                return
            self._closed = True
            journal, self._journal = self._journal, None
            index, self._index = self._index, None
        if journal is not None:
            self._guard("close the journal", None, journal.close)
        if index is not None:
            self._guard("close the index", None, index.close)
        self._guard("close the API client", None, self._api.close)
        if self._otel is not None:
            self._otel.shutdown()

    def __enter__(self) -> TelemetryClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"TelemetryClient(enabled={self._config.enabled}, "
            f"data_dir={str(self._config.data_dir)!r}, api={self._api.enabled})"
        )

    # -- ending runs ------------------------------------------------------------------

    def _finish_run(self, run_id: str, status: str, fields: dict[str, Any]) -> RunRecord | None:
        check_text(run_id, "run_id")
        check_final_status(status, "end_run")
        fields = check_fields(fields, "end_run")
        if not self._config.enabled:
            return None

        with self._lock:
            active = self._active.pop(run_id, None)
            ended_here = run_id in self._ended
            if active is not None:
                self._remember_ended(run_id)
        if ended_here:
            logger.warning("end_run: run %s has already ended; nothing changed", run_id)
            return None
        now = get_iso8601_timestamp()
        if active is not None:
            record = active.record
            duration_ms = round((time.monotonic() - active.started_monotonic) * 1000)
        else:
            found = self._find_run(run_id)
            if found is None:
                return None
            record = found
            duration_ms = calculate_duration_ms(record.start_time, now)

        self._apply_fields(record, fields)
        record.status = status
        record.end_time = now
        record.duration_ms = duration_ms
        record.updated_at = now
        if active is None:
            return self._end_found_run(record)

        end_values = record.to_dict()
        with self._journaling("run_end", end_values, run_id):
            index = self._open_index()
            if index is None:
                return record
            overwritten = self._guard(
                "index the end of",
                run_id,
                self._store_own_end,
                index,
                record,
                end_values,
                active.indexed_values,
            )
        if overwritten is not None:
            # This client's run_end line may precede the other one in the journal. It is
            # written again because the last run_end line of a run is the one that counts.
            logger.warning(
                "end_run: run %s was ended with status %s by another process while this "
                "client ended it with status %s; this client's end replaces it",
                run_id,
                overwritten.status,
                status,
            )
            self._write_journal(
                "run_end", record.to_dict(), run_id, timestamp=_later_end(record, overwritten)
            )
        return record

    def _end_found_run(self, record: RunRecord) -> RunRecord | None:
        """Journal and index the end of a run that another client started.

        Returns the record, or None when nothing was ended: the journal could not be
        written, or another process ended the run first, whose end is then kept.
        """
        run_id = record.run_id
        # The run_end line goes first, as for every run, so that a crash between the two
        # writes leaves the journal ahead of the index, which check reports and rebuild
        # repairs. Updating the index first would save the extra lines of a lost race
        # (below), but a crash between the writes would then leave the index with an end
        # that the journal, the source of truth, lacks. For the same reason the index is
        # left alone when the journal cannot be written.
        if not self._write_journal("run_end", record.to_dict(), run_id):
            return None
        index = self._open_index()
        if index is None:
            return record

        # The index is updated only if the run is still running, because the owner of the
        # run may have ended it since _find_run read it.
        values = record.to_dict()
        del values["run_id"]
        applied = self._guard(
            "index the end of", run_id, index.update_run, run_id, if_status="running", **values
        )
        if applied is None or applied:
            # None: the index write failed, and the journal line stays. check reports the
            # difference, and rebuild takes the journal's record.
            return record

        # Another process ended the run first. This client's line may follow that
        # process's line in the journal, so the stored record is journaled again after it.
        stored = self._guard("look up", run_id, index.get_run, run_id)
        if stored is None or not stored.is_final:
            # Deleted or replaced in the index meanwhile, by prune or rebuild.
            logger.warning(
                "end_run: run %s was deleted or replaced in the index while this client "
                "ended it; its run_end line with status %s stays in the journal",
                run_id,
                record.status,
            )
            return None
        self._write_journal(
            "run_end", stored.to_dict(), run_id, timestamp=_later_end(record, stored)
        )
        logger.warning(
            "end_run: run %s was ended with status %s by another process while this client "
            "ended it; that end is kept",
            run_id,
            stored.status,
        )
        return None

    def _remember_ended(self, run_id: str) -> None:
        # Called with self._lock held. A second end_run of a run whose first end_run is
        # still writing would otherwise find the index row still running and end it again.
        self._ended[run_id] = None
        if len(self._ended) > ENDED_RUNS_REMEMBERED:
            self._ended.popitem(last=False)

    def _find_run(self, run_id: str) -> RunRecord | None:
        index = self._open_index()
        found = None
        if index is not None:
            found = self._guard("look up", run_id, index.get_run, run_id)
        if found is None:
            logger.warning(
                "end_run: run %s was not started by this client and is not in the index; "
                "nothing recorded",
                run_id,
            )
            return None
        if found.is_final:
            logger.warning(
                "end_run: run %s already ended with status %s; nothing changed",
                run_id,
                found.status,
            )
            return None
        return found

    @staticmethod
    def _store_own_end(
        index: DatabaseWriter,
        record: RunRecord,
        end_values: dict[str, Any],
        indexed_values: dict[str, Any] | None,
    ) -> RunRecord | None:
        """Write the end of a run this client started into the index.

        ``end_values`` is ``record.to_dict()``. ``indexed_values`` is the record as
        start_run inserted it, or None. While the row still has status running, only the
        columns that differ from it are set, because SQLite then leaves the indexes of the
        other columns alone. Other writers change a running row only to end it, which the
        status condition catches, or to write it again from its run_start line, with the
        values start_run inserted.

        Returns the stored record that this end replaced when another process had ended
        the run meanwhile, such as ``telemetry check --repair``, else None.
        """
        values = dict(end_values)
        del values["run_id"]
        changed = values
        if indexed_values is not None:
            # metrics_json is always written: the agent may have changed its nested values
            # in place since start_run, and the saved start values share those objects.
            changed = {
                name: value
                for name, value in values.items()
                if name in _MUTABLE_COLUMNS
                or name not in indexed_values
                or indexed_values[name] != value
            }
        if index.update_run(record.run_id, if_status="running", **changed):
            return None

        stored = index.get_run(record.run_id)
        if stored is None:
            # The start is missing from the index (it was locked or broken then), so the
            # whole record is written instead.
            index.upsert_run(record)
            return None
        # The process that started the run saw how it ended, so its end wins.
        index.update_run(record.run_id, **values)
        return stored if stored.is_final else None

    def _post_ended_run(self, record: RunRecord) -> None:
        if not self._api.enabled or self._config.end_run_timeout <= 0:
            return
        index = self._open_index()
        deadline = time.monotonic() + self._config.end_run_timeout
        if not self._post_and_mark(index, record, deadline).success:
            return
        if index is not None:
            self._retry_due_posts(index, deadline)

    def _retry_due_posts(self, index: DatabaseWriter, deadline: float) -> None:
        """Post a few older pending runs whose backoff has passed, within the deadline."""
        pending = self._guard("list pending posts", None, index.get_pending_api_posts, 50)
        now = datetime.datetime.now(datetime.timezone.utc)
        due = [record for record in pending or () if _retry_is_due(record, now)]
        for record in due[:AUTO_RETRY_RUNS_PER_END]:
            if time.monotonic() >= deadline:
                return
            if not self._post_and_mark(index, record, deadline).success:
                return

    def _post_and_mark(
        self, index: DatabaseWriter | None, record: RunRecord, deadline: float | None
    ) -> PostResult:
        """Post ``record``, store the outcome on it and in the index, and return the outcome.

        A post that raised is logged and returns a failed PostResult.
        """
        payload = APIPayload.from_run_record(record)
        result = self._guard(
            "post", record.run_id, self._api.post_run_sync, payload, deadline=deadline
        )
        self._store_post_result(index, record, result)
        if result is None:
            return PostResult(False, "the post raised; see the log")
        return result

    async def _end_run_async(
        self, run_id: str, status: str, fields: dict[str, Any]
    ) -> RunRecord | None:
        """End a run as end_run does, and post it in a task of the running event loop.

        The caller does not wait for the post, so a slow API cannot delay the agent's
        coroutine, nor can a cancellation of the caller land inside the post. A post still
        in flight when the loop stops is cancelled, and the run stays pending.
        """
        record = self._finish_run(run_id, status, fields)
        if record is not None and self._otel is not None:
            self._otel.end_run(record)
        if record is None or not self._api.enabled or self._config.end_run_timeout <= 0:
            return record
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            # Driven by another event loop library, or by hand: post within the bound.
            self._post_ended_run(record)
            return record
        task = loop.create_task(self._post_in_background(record))
        # The event loop keeps only weak references to tasks.
        self._background_posts.add(task)
        task.add_done_callback(self._background_posts.discard)
        return record

    async def _post_in_background(self, record: RunRecord) -> None:
        deadline = time.monotonic() + self._config.end_run_timeout
        payload = APIPayload.from_run_record(record)
        try:
            result: PostResult | None = await self._api.post_run_async(payload, deadline=deadline)
        except asyncio.CancelledError:
            logger.warning(
                "the post of run %s was cancelled with its event loop; it stays pending",
                record.run_id,
            )
            raise
        except Exception as exc:
            logger.error("failed to post run %s: %s", record.run_id, _describe(exc))
            result = None
        self._store_post_result(self._open_index(), record, result)

    def _store_post_result(
        self, index: DatabaseWriter | None, record: RunRecord, result: PostResult | None
    ) -> bool:
        """Record the outcome of a post on ``record`` and in the index; return its success."""
        now = get_iso8601_timestamp()
        if result is not None and result.success:
            record.api_posted = True
            record.api_posted_at = now
            record.api_last_error = None
            if index is not None:
                self._guard(
                    "mark as posted", record.run_id, index.mark_api_posted, record.run_id, now
                )
            return True

        error = result.message if result is not None else "the post raised; see the log"
        record.api_retry_count += 1
        record.api_last_error = error
        if index is not None:
            self._guard(
                "count a failed post of",
                record.run_id,
                index.increment_api_retry_count,
                record.run_id,
                error,
            )
        return False

    # -- helpers used by RunContext -------------------------------------------------------

    def _update_active(self, run_id: str, fields: dict[str, Any]) -> None:
        with self._lock:
            active = self._active.get(run_id)
            if active is not None:
                self._apply_fields(active.record, fields)
                return
        if self._config.enabled:
            logger.warning("set_metrics: run %s has already ended; the fields are ignored", run_id)

    def _apply_fields(self, record: RunRecord, fields: dict[str, Any]) -> None:
        for name, value in fields.items():
            if name == "metrics_json":
                if value is None:
                    record.metrics_json = None
                    continue
                merged = dict(record.metrics_json or {})
                merged.update(self._convert(value, "metrics_json", record.run_id))
                record.metrics_json = merged
            else:
                setattr(record, name, value)

    # -- storage --------------------------------------------------------------------------

    def _convert(self, value: Mapping[str, Any], path: str, run_id: str) -> dict[str, Any]:
        converted, issues = make_jsonable(value, path)
        self._repeats.log_conversions(logger, run_id, issues)
        if not isinstance(converted, dict):
            # The mapping itself could not be read (its iteration raised): keep its repr().
            return {"unreadable_mapping": converted}
        return converted

    def _write_journal(
        self,
        record_type: str,
        data: dict[str, Any],
        run_id: str,
        *,
        timestamp: str | None = None,
        converted_key: str | None = None,
    ) -> bool:
        """Append a record to the journal and return whether it was written.

        ``timestamp`` selects the file in place of the record's own time.
        ``converted_key`` names a value of ``data`` that _convert has already converted.
        """
        journal = self._open_journal()
        if journal is None:
            return False
        try:
            journal._append(record_type, data, timestamp, converted_key)
        except Exception as exc:
            self._log_failure(f"journal the {record_type} of", run_id, exc)
            return False
        return True

    @contextlib.contextmanager
    def _journaling(self, record_type: str, data: dict[str, Any], run_id: str) -> Iterator[None]:
        """Write a run line to the journal, and let the body run while the disk flushes it.

        The line is written to the file before the body runs, and the block ends only when
        the line is on disk, as _write_journal's would. The body, which writes the index,
        runs while the journal's sync thread fsyncs the line, so a run costs about the
        longer of the two instead of their sum. A journal that fails is logged, and the
        body still runs.
        """
        journal = self._open_journal()
        seq = None
        if journal is not None:
            try:
                seq = journal._write_record(record_type, data, None, None, sync_ahead=True)
            except Exception as exc:
                self._log_failure(f"journal the {record_type} of", run_id, exc)
        try:
            yield
        finally:
            if journal is not None and seq is not None:
                try:
                    journal._wait_durable(seq)
                except Exception as exc:
                    self._log_failure(f"journal the {record_type} of", run_id, exc)

    def _open_journal(self) -> NDJSONWriter | None:
        with self._lock:
            if self._journal is None and self._may_open("journal"):
                self._journal = self._open(
                    "journal",
                    self._config.ndjson_dir,
                    lambda: NDJSONWriter(
                        self._config.ndjson_dir,
                        durability=self._config.durability,
                        batch_interval=self._config.batch_interval,
                    ),
                )
            return self._journal

    def _open_index(self) -> DatabaseWriter | None:
        with self._lock:
            if self._index is None and self._may_open("index"):
                self._index = self._open(
                    "index",
                    self._config.db_path,
                    lambda: DatabaseWriter(
                        self._config.db_path,
                        checkpoint_in_background=True,
                        page_cache_kib=INDEX_PAGE_CACHE_KIB,
                    ),
                )
            return self._index

    def _may_open(self, component: str) -> bool:
        if self._closed:
            self._repeats.log(
                logger,
                logging.WARNING,
                "closed",
                "the telemetry client is closed, so this record is dropped; create a new "
                "TelemetryClient to record more runs",
            )
            return False
        if not self._config.enabled:
            return False
        failed_at = self._failed_at.get(component)
        return failed_at is None or time.monotonic() - failed_at >= REOPEN_AFTER_SECONDS

    def _open(self, component: str, path: Path, factory: Callable[[], _T]) -> _T | None:
        # The writers create their directories, with owner-only permissions.
        try:
            opened = factory()
        except Exception as exc:
            self._failed_at[component] = time.monotonic()
            logger.error(
                "cannot open the %s at %s: %s; runs are not recorded there until it opens "
                "(next attempt in %.0f s)",
                component,
                path,
                _describe(exc),
                REOPEN_AFTER_SECONDS,
            )
            return None
        self._failed_at.pop(component, None)
        return opened

    def _guard(
        self,
        action: str,
        run_id: str | None,
        function: Callable[..., _T],
        *args: Any,
        **kwargs: Any,
    ) -> _T | None:
        """Call ``function``; log an exception it raises instead of raising it."""
        try:
            return function(*args, **kwargs)
        except Exception as exc:
            self._log_failure(action, run_id, exc)
            return None

    def _log_failure(self, action: str, run_id: str | None, exc: Exception) -> None:
        target = f" run {run_id}" if run_id else ""
        self._repeats.log(
            logger,
            logging.ERROR,
            (action, type(exc)),
            "failed to %s%s: %s",
            action,
            target,
            _describe(exc),
        )

    # -- interpreter exit ----------------------------------------------------------------

    def _abandon_open_runs(self) -> None:
        with self._lock:
            open_runs = list(self._active)
        index = self._open_index() if open_runs else None
        for run_id in open_runs:
            stored = self._guard("look up", run_id, index.get_run, run_id) if index else None
            if stored is not None and stored.is_final:
                # Ended by another client or process: nothing is left to record here.
                with self._lock:
                    self._active.pop(run_id, None)
                continue
            logger.warning(
                "run %s was still open when its client closed; ending it as abandoned", run_id
            )
            record = self._finish_run(
                run_id,
                "abandoned",
                {"error_summary": "the client closed, or the process exited, before end_run"},
            )
            if record is not None and self._otel is not None:
                self._otel.end_run(record)


def _config_from_environment() -> TelemetryConfig:
    """Resolve the config from os.environ, replacing each invalid variable by its default.

    A broken setting must not stop the agent, nor should a typo in an API setting stop
    local recording, so each invalid variable is logged and ignored.
    """
    try:
        config, ignored = resolve_config()
    except ConfigError as exc:
        logger.error(
            "the telemetry settings are invalid (%s); telemetry is disabled for this process", exc
        )
        return TelemetryConfig(enabled=False, environ={})
    for error in ignored:
        logger.error("%s; %s is ignored and its default is used", error, error.key)
    return config


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# A failed post's PostResult.message is its cause, as APIClient words it, or a retried
# post's last cause inside one of these two sentences.
class _EarlyStop:
    """Decide after each post of flush_pending whether the later posts would fail alike."""

    def __init__(self) -> None:
        self.unreachable_in_a_row = 0
        self.fix = ""
        """What the user can check, once reason_after has returned a reason."""

    def reason_after(self, result: PostResult) -> str | None:
        """Return why flush_pending should stop after ``result``, or None to go on.

        Failures that are neither an HTTP response nor unreachable, such as a payload that
        cannot be encoded, leave the count of unreachable posts as it is.
        """
        if result.success:
            self.unreachable_in_a_row = 0
            return None
        if result.status in (401, 403):
            self.fix = "check api_token (TELEMETRY_API_TOKEN)"
            return f"the API rejected the credentials (HTTP {result.status})"
        if result.status is not None:
            self.unreachable_in_a_row = 0
        elif result.unreachable:
            self.unreachable_in_a_row += 1
            if self.unreachable_in_a_row >= FLUSH_UNREACHABLE_LIMIT:
                count = self.unreachable_in_a_row
                self.fix = "check api_url (TELEMETRY_API_URL) and that the API is up"
                return f"{count} posts in a row could not reach the API ({result.message})"
        return None


# Columns whose values are containers that the agent can change in place.
_MUTABLE_COLUMNS = frozenset({"metrics_json"})


def _later_end(record: RunRecord, other: RunRecord) -> str | None:
    """Return the later end_time of two records, to date a run_end line written again.

    A line dated by the later time goes to a file no older than either line's file, so it
    comes after both in journal order.
    """
    ends = [end for end in (record.end_time, other.end_time) if end is not None]
    try:
        return max(ends, key=parse_timestamp, default=None)
    except ValueError:
        return None


def _retry_is_due(record: RunRecord, now: datetime.datetime) -> bool:
    if record.updated_at is None:
        return True
    try:
        last_attempt = parse_timestamp(record.updated_at)
    except ValueError:
        return True
    doublings = min(record.api_retry_count, 20)
    wait = min(AUTO_RETRY_BASE_SECONDS * 2.0**doublings, AUTO_RETRY_MAX_SECONDS)
    return (now - last_attempt).total_seconds() >= wait


_hostname_cache: str | None = None


def _hostname() -> str:
    global _hostname_cache
    if _hostname_cache is None:
        _hostname_cache = socket.gethostname()
    return _hostname_cache


# Clients alive in this process, closed at interpreter exit. Weak references, so a client
# that the program drops is not kept alive by the exit hook.
_live_clients: weakref.WeakSet[TelemetryClient] = weakref.WeakSet()
_exit_hook_lock = threading.Lock()
_exit_hook_registered = False


def _register_exit_hook(client: TelemetryClient) -> None:
    global _exit_hook_registered
    with _exit_hook_lock:
        _live_clients.add(client)
        if not _exit_hook_registered:
            atexit.register(_close_live_clients)
            if hasattr(os, "register_at_fork"):
                os.register_at_fork(after_in_child=_reset_locks_in_child)
            _exit_hook_registered = True


def _reset_locks_in_child() -> None:
    # A fork while another thread holds a client's lock would leave it held forever in
    # the child. The writers reset their own state in the child the same way.
    global _exit_hook_lock
    _exit_hook_lock = threading.Lock()
    for client in list(_live_clients):
        client._lock = threading.RLock()
        client._repeats = RepeatLimiter()
        # The parent's open runs are the parent's to end: the child's exit hook must not
        # end them as abandoned.
        client._active = {}
        client._ended.clear()


def _close_live_clients() -> None:
    for client in list(_live_clients):
        try:
            client.close()
        except Exception:
            logger.exception("failed to close a telemetry client at exit")
