"""Replay of the journal to an OpenTelemetry exporter: runs and events as spans again.

Each run gets the span the live bridge gave it: the same trace and span ids, times,
attributes, events and status, so a backend that receives both keeps one span. The trace
and parent come from the run's ``otel.context`` event when the live bridge journaled one,
and otherwise from the parent run ids (telemetry.otel._ids.resolve_parents).

Runs are replayed oldest first in batches, and each batch is exported in one call. For a
batch, the journal files are read once, from the earliest start among its runs and their
parent runs to its latest end. So memory stays bounded by the batch size and the span
event limit.
"""

from __future__ import annotations

import collections
import datetime
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from telemetry import __version__
from telemetry._dates import utc_date
from telemetry._logutil import RepeatLimiter
from telemetry.errors import TelemetryError
from telemetry.journal import JournalReader
from telemetry.models import RunRecord, parse_timestamp
from telemetry.otel._bridge import INSTRUMENTATION_NAME
from telemetry.otel._ids import (
    OTEL_CONTEXT_EVENT,
    SpanParent,
    parse_context_payload,
    resolve_parents,
)
from telemetry.otel._mapping import DROPPED_ATTRIBUTES, exception_attributes
from telemetry.otel._setup import build_replay_provider
from telemetry.otel._spans import (
    add_run_event,
    attribute_limits,
    end_run_span,
    parent_context,
    start_run_span,
)

__all__ = ["REPLAY_BATCH_SIZE", "ReplayError", "ReplayResult", "replay_journal"]

logger = logging.getLogger("telemetry.otel")

REPLAY_BATCH_SIZE = 512
"""Runs per export request; the SDK's batch span processor sends 512 spans at most too."""

# Events kept per run when OTEL_SPAN_EVENT_COUNT_LIMIT does not bound them. The SDK keeps
# the latest events of a span up to its limit, and so does the replay.
_UNBOUNDED_EVENTS_CAP = 100_000


class ReplayResult(NamedTuple):
    """Counts of a replay."""

    runs: int
    """Runs exported as spans."""
    events: int
    """Events exported as span events, the exception events not counted. Events beyond
    the span's event limit, which are left out, are not counted either."""
    skipped_running: int
    """Selected runs that have not ended, which get no span."""
    skipped_events: int
    """Event lines of exported runs that were left out because they are invalid."""
    skipped_invalid: int = 0
    """Ended runs left out because their times cannot be mapped, such as a run_end line
    without an end_time."""


class ReplayError(TelemetryError):
    """The exporter failed a batch; ``done`` counts what was exported before it.

    Attributes:
        done: the counts of the batches exported before the failed one.
        total: the number of runs selected to be sent.
        reason: the exception the exporter raised, as text, or "" when it returned
            FAILURE and logged the reason itself.
    """

    def __init__(self, message: str, done: ReplayResult, total: int, reason: str = "") -> None:
        super().__init__(message)
        self.done = done
        self.total = total
        self.reason = reason


class _CollectingProcessor(SpanProcessor):
    """Keep the ended spans in a list, for the replay to export them itself."""

    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def on_end(self, span: ReadableSpan) -> None:
        self.spans.append(span)


def replay_journal(
    reader: JournalReader,
    exporter: SpanExporter,
    *,
    select: Callable[[RunRecord], bool] | None = None,
    limit: int | None = None,
    batch_size: int = REPLAY_BATCH_SIZE,
    progress: Callable[[int, int], None] | None = None,
) -> ReplayResult:
    """Export the spans of the runs in the journal that ``select`` accepts.

    Args:
        reader: the journal.
        exporter: receives each batch of spans; it is not shut down here.
        select: keeps a run when it returns True; None keeps every run.
        limit: replay only the ``limit`` runs that started last.
        batch_size: runs per call of ``exporter.export``.
        progress: called with (runs done, runs in total) after each batch.

    Raises:
        ReplayError: the exporter did not return SUCCESS for a batch, or raised. The
            later batches are not tried, because they would fail alike.
        OSError: a journal file exists but cannot be read.
    """
    folded = reader.fold_runs()
    runs = folded.runs
    selected = [run for run in runs.values() if select is None or select(run)]
    ended = sorted((run for run in selected if run.is_final), key=_start_key)
    skipped_running = len(selected) - len(ended)
    if limit is not None:
        ended = ended[-limit:] if limit > 0 else []

    parent_run_ids = {run_id: run.parent_run_id for run_id, run in runs.items()}
    contexts: dict[str, SpanParent] = {}
    events_limit = SpanLimits().max_events
    if events_limit is None:
        events_limit = _UNBOUNDED_EVENTS_CAP
    limits = attribute_limits()
    repeats = RepeatLimiter()
    provider = build_replay_provider()
    collector = _CollectingProcessor()
    provider.add_span_processor(collector)
    tracer = provider.get_tracer(INSTRUMENTATION_NAME, __version__)

    exported = events = skipped_events = skipped_invalid = 0
    for first in range(0, len(ended), batch_size):
        batch = ended[first : first + batch_size]
        batch_events = _read_batch(reader, batch, runs, contexts, events_limit)
        parents = resolve_parents(parent_run_ids, contexts, [run.run_id for run in batch])
        batch_added = batch_skipped = 0
        for run in batch:
            if run.end_time is None:
                skipped_invalid += 1
                continue
            parent = parents[run.run_id]
            span = start_run_span(tracer, run, parent, parent_context(parent), limits)
            run_events = list(batch_events.get(run.run_id, ()))
            if exception_attributes(run) is not None and len(run_events) >= events_limit:
                # The exception event takes one place of the limit, as on the live span.
                keep = max(events_limit - 1, 0)
                run_events = run_events[len(run_events) - keep :]
            dropped = 0
            for event in run_events:
                try:
                    dropped += add_run_event(
                        span, event["event_type"], event["timestamp"], event["payload"], limits
                    )
                except (KeyError, TypeError, ValueError):
                    batch_skipped += 1
                    continue
                batch_added += 1
            dropped += end_run_span(span, run, limits)
            if dropped:
                repeats.log(
                    logger,
                    logging.WARNING,
                    "truncated",
                    "run %s: %d attributes were left out of its span and events, which keep "
                    "at most %s and %s (OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT and "
                    "OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT); the attribute %s counts them",
                    run.run_id,
                    dropped,
                    limits.span,
                    limits.event,
                    DROPPED_ATTRIBUTES,
                )

        spans, collector.spans = collector.spans, []
        reason = ""
        try:
            result = exporter.export(spans) if spans else SpanExportResult.SUCCESS
        except Exception as exc:
            result, reason = SpanExportResult.FAILURE, f"{type(exc).__name__}: {exc}"
        if result is not SpanExportResult.SUCCESS:
            done = ReplayResult(exported, events, skipped_running, skipped_events, skipped_invalid)
            raise ReplayError("the exporter failed a batch of spans", done, len(ended), reason)
        exported += len(spans)
        events += batch_added
        skipped_events += batch_skipped
        if progress is not None:
            progress(first + len(batch), len(ended))
    return ReplayResult(exported, events, skipped_running, skipped_events, skipped_invalid)


def _start_key(run: RunRecord) -> tuple[datetime.datetime, str]:
    try:
        return parse_timestamp(run.start_time), run.run_id
    except ValueError:
        return datetime.datetime.min.replace(tzinfo=datetime.timezone.utc), run.run_id


def _read_batch(
    reader: JournalReader,
    batch: Sequence[RunRecord],
    runs: dict[str, RunRecord],
    contexts: dict[str, SpanParent],
    events_limit: int,
) -> dict[str, collections.deque[dict[str, Any]]]:
    """Read the event lines of the runs in ``batch``, and the otel.context events of them
    and their parent runs into ``contexts``. Returns the events per run id, at most the
    latest ``events_limit`` of each, in journal order."""
    batch_ids = {run.run_id for run in batch}
    context_ids = set(batch_ids)
    dated = list(batch)
    for run in batch:
        for ancestor in _ancestors(run, runs):
            context_ids.add(ancestor.run_id)
            dated.append(ancestor)
    first = min(_dates_of(dated), default=None)
    last = max(_dates_of(batch, end=True), default=None)

    events: dict[str, collections.deque[dict[str, Any]]] = {}
    for journal_file in reader.files(first, last):
        for record in reader.read(journal_file.path).records:
            if record.get("record_type") != "event":
                continue
            run_id = record.get("run_id")
            if record.get("event_type") == OTEL_CONTEXT_EVENT:
                payload = record.get("payload")
                if run_id in context_ids and isinstance(payload, dict):
                    parent = parse_context_payload(payload)
                    if parent is not None:
                        contexts[run_id] = parent
            elif run_id in batch_ids:
                queue = events.get(run_id)
                if queue is None:
                    queue = events[run_id] = collections.deque(maxlen=events_limit)
                queue.append(record)
    return events


def _ancestors(run: RunRecord, runs: dict[str, RunRecord]) -> Iterable[RunRecord]:
    seen = {run.run_id}
    parent_id = run.parent_run_id
    while parent_id is not None and parent_id not in seen and parent_id in runs:
        seen.add(parent_id)
        parent = runs[parent_id]
        yield parent
        parent_id = parent.parent_run_id


def _dates_of(runs: Iterable[RunRecord], end: bool = False) -> Iterable[str]:
    # The UTC days a run's lines are dated with: its start, and its end when asked.
    for run in runs:
        times = [run.start_time, run.end_time] if end else [run.start_time]
        for timestamp in times:
            if timestamp is None:
                continue
            try:
                yield utc_date(timestamp)
            except ValueError:
                continue
