"""Building the span of a run with the OpenTelemetry SDK, for the live bridge and replay.

Both start the span with ``start_run_span``, add events with ``add_run_event`` and end it
with ``end_run_span``, in that order, so a replayed span has the same ids, times,
attributes, events and status as the live one.

Span ids come from the tracer's id generator. The tracer of the bridge's own provider,
and the tracer the bridge takes from an application's provider, use ``RunIdGenerator``.
While ``start_run_span`` runs, it returns the run's ids, which that function sets in a
context variable. Otherwise it returns those of the generator it replaced.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from typing import Any, NamedTuple

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import SpanLimits
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    Tracer,
    TraceState,
)

from telemetry.models import RunRecord
from telemetry.otel._ids import SpanParent, run_span_id
from telemetry.otel._mapping import (
    EXCEPTION_EVENT,
    cap_attributes,
    event_attributes,
    exception_attributes,
    identity_attributes,
    run_attributes,
    span_name,
    span_status,
    text,
    timestamp_ns,
)

__all__ = [
    "DEFAULT_ATTRIBUTE_COUNT_LIMIT",
    "AttributeLimits",
    "RunIdGenerator",
    "add_run_event",
    "attribute_limits",
    "end_run_span",
    "install_id_generator",
    "parent_context",
    "start_run_span",
]

# (trace id, span id) of the span that start_run_span is starting in this context.
_pending_ids: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "agent_telemetry_pending_span_ids", default=None
)


DEFAULT_ATTRIBUTE_COUNT_LIMIT = 128
"""The SDK's default for the span and event attribute count limits."""


class AttributeLimits(NamedTuple):
    """The attribute count limits of a span and of an event; None is no limit."""

    span: int | None = DEFAULT_ATTRIBUTE_COUNT_LIMIT
    event: int | None = DEFAULT_ATTRIBUTE_COUNT_LIMIT


def attribute_limits() -> AttributeLimits:
    """Return the attribute count limits that the SDK reads from the environment.

    They are OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT and OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT, each
    falling back to OTEL_ATTRIBUTE_COUNT_LIMIT and then to 128. When a value is invalid
    the SDK rejects it, and the defaults are returned.
    """
    try:
        limits = SpanLimits()
    except ValueError:
        return AttributeLimits()
    return AttributeLimits(limits.max_span_attributes, limits.max_event_attributes)


class RunIdGenerator(IdGenerator):
    """Return the ids of the run span being started, else those of ``fallback``.

    Args:
        fallback: the generator for every other span; a RandomIdGenerator by default.
    """

    def __init__(self, fallback: IdGenerator | None = None) -> None:
        self.fallback = fallback if fallback is not None else RandomIdGenerator()

    def generate_span_id(self) -> int:
        """Return the run span's id while one is being started, else the fallback's."""
        pending = _pending_ids.get()
        return pending[1] if pending is not None else self.fallback.generate_span_id()

    def generate_trace_id(self) -> int:
        """Return the run span's trace id while one is being started, else the fallback's."""
        pending = _pending_ids.get()
        return pending[0] if pending is not None else self.fallback.generate_trace_id()

    def is_trace_id_random(self) -> bool:
        """Return False for a run's trace id, which is derived from its run id."""
        if _pending_ids.get() is not None:
            return False
        return self.fallback.is_trace_id_random()


def install_id_generator(tracer: Tracer) -> bool:
    """Make ``tracer`` take its ids from a RunIdGenerator; return whether it could.

    The SDK's Tracer keeps its provider's generator in its ``id_generator`` attribute.
    Only this tracer changes: the provider and its other tracers keep their generator. A
    tracer of another implementation has no such attribute, and False is returned.
    """
    current = getattr(tracer, "id_generator", None)
    if isinstance(current, RunIdGenerator):
        return True
    if not isinstance(current, IdGenerator):
        return False
    tracer.id_generator = RunIdGenerator(current)  # type: ignore[attr-defined]
    return True


def parent_context(parent: SpanParent) -> Context | None:
    """Return a context whose span has the ids of ``parent``, or None for a root span.

    The span in it is a NonRecordingSpan with the sampled flag and the parent's
    tracestate, local or remote as the parent the live bridge saw.
    """
    if parent.parent_span_id is None:
        return None
    trace_state = TraceState.from_header([parent.trace_state]) if parent.trace_state else None
    span_context = SpanContext(
        parent.trace_id,
        parent.parent_span_id,
        is_remote=parent.parent_is_remote,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=trace_state,
    )
    return trace.set_span_in_context(NonRecordingSpan(span_context), Context())


def start_run_span(
    tracer: Tracer,
    record: RunRecord,
    parent: SpanParent,
    context: Context | None,
    limits: AttributeLimits,
) -> Span:
    """Start the span of ``record``, with the run's start time and identity attributes.

    Args:
        tracer: a tracer whose id generator is a RunIdGenerator.
        record: the run; its start_time is the span's start.
        parent: the span's trace and parent, as SpanParent decides them.
        context: the context to start the span in. For a root span (no parent span id)
            it is replaced by an empty context, so that no active span becomes its parent.
        limits: the attribute limits. Under a span limit of 5 or less, the identity
            attributes are cut, so that DROPPED_ATTRIBUTES fits in at the end.

    Raises:
        ValueError: the run's start_time is not ISO 8601 with an offset.
    """
    if parent.parent_span_id is None:
        context = Context()
    attributes = identity_attributes(record)
    if limits.span is not None:
        # end_run_span keeps a prefix of the same attributes, so nothing set here is
        # pushed out at the end.
        attributes = dict(list(attributes.items())[: max(limits.span - 1, 0)])
    token = _pending_ids.set((parent.trace_id, run_span_id(record.run_id)))
    try:
        return tracer.start_span(
            span_name(record),
            context=context,
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            start_time=timestamp_ns(record.start_time),
        )
    finally:
        _pending_ids.reset(token)


def add_run_event(
    span: Span,
    event_type: str,
    timestamp: str,
    payload: Mapping[str, Any],
    limits: AttributeLimits,
) -> int:
    """Add an event of the run to its span, with the payload flattened to attributes.

    Returns how many attributes were left out to stay within ``limits.event``; the event
    then counts them in DROPPED_ATTRIBUTES (see cap_attributes).

    Raises:
        ValueError: ``timestamp`` is not ISO 8601 with an offset.
    """
    when = timestamp_ns(timestamp)
    attributes, dropped = cap_attributes(event_attributes(payload), limits.event)
    span.add_event(text(event_type), attributes, timestamp=when)
    return dropped


def end_run_span(span: Span, record: RunRecord, limits: AttributeLimits) -> int:
    """Set the final attributes and status of a run's span, and end it at the run's end.

    An error status adds the exception event first, dated at the run's end. A span
    that would end before it starts, after a step back of the clock, ends at its start.
    Returns how many attributes were left out to stay within ``limits.span``: the run
    fields come first, then the metrics (see cap_attributes).

    Raises:
        ValueError: a time of the run is missing or not ISO 8601 with an offset.
    """
    if record.end_time is None:
        raise ValueError(f"run {record.run_id} has no end_time, so its span cannot end")
    start = timestamp_ns(record.start_time)
    end = max(timestamp_ns(record.end_time), start)
    exception = exception_attributes(record)
    if exception is not None:
        exception, _ = cap_attributes(exception, limits.event)
        span.add_event(EXCEPTION_EVENT, exception, timestamp=end)
    attributes, dropped = cap_attributes(run_attributes(record), limits.span)
    span.set_attributes(attributes)
    is_error, description = span_status(record)
    if is_error:
        span.set_status(Status(StatusCode.ERROR, description))
    else:
        span.set_status(Status(StatusCode.OK))
    span.end(end_time=end)
    return dropped
