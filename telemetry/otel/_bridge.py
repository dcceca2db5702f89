"""OTelBridge: the live bridge that turns a client's runs into OpenTelemetry spans.

The client calls it after it has written the journal and the index, so nothing the
bridge does can cost a record. Each public method catches its faults and logs them on
``telemetry.otel``. end_run only hands the span to the span processors: with the bridge's own
pipeline that is a batch processor's queue, and the export to the collector happens on
the processor's thread.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import NoOpTracerProvider, ProxyTracerProvider, Span, Tracer

from telemetry import __version__
from telemetry._logutil import RepeatLimiter
from telemetry.config import mask_url
from telemetry.models import RunRecord
from telemetry.otel._ids import OTEL_CONTEXT_EVENT, SpanParent, run_trace_id
from telemetry.otel._setup import OwnPipeline, build_pipeline, shut_down_within
from telemetry.otel._spans import (
    add_run_event,
    end_run_span,
    install_id_generator,
    parent_context,
    start_run_span,
)

__all__ = ["INSTRUMENTATION_NAME", "OTelBridge"]

logger = logging.getLogger("telemetry.otel")

INSTRUMENTATION_NAME = "agent-telemetry"
"""The instrumentation scope of the run spans."""


class OTelBridge:
    """Turn runs into spans: start one at start_run, add events, end it at end_run.

    The tracer is chosen at the first start_run, so an application may configure
    OpenTelemetry after it has created the client. If the global TracerProvider is a real
    one (not the API's proxy or no-op provider), the spans go through it. Otherwise the
    bridge builds its own, which exports over OTLP/HTTP (see telemetry.otel._setup) and
    is not made the global provider.

    Args:
        flush_timeout: seconds that shutdown waits for the own pipeline to export.
        tracer_provider: a provider to use in place of the global one.
    """

    def __init__(
        self, flush_timeout: float, tracer_provider: trace.TracerProvider | None = None
    ) -> None:
        self._flush_timeout = flush_timeout
        self._provider = tracer_provider
        self._lock = threading.Lock()
        self._spans: dict[str, Span] = {}
        self._tracer: Tracer | None = None
        self._pipeline: OwnPipeline | None = None
        self._failed = False
        self._closed = False
        self._repeats = RepeatLimiter()
        if hasattr(os, "register_at_fork"):
            reset = weakref.WeakMethod(self._reset_in_child)

            def reset_in_child() -> None:
                method = reset()
                if method is not None:
                    method()

            os.register_at_fork(after_in_child=reset_in_child)

    def __repr__(self) -> str:
        if self._closed:
            state = "closed"
        elif self._tracer is None:
            state = "not started"
        elif self._pipeline is not None:
            state = "own pipeline"
        else:
            state = "application's provider"
        return f"OTelBridge({state}, open spans={len(self._spans)})"

    def start_run(self, record: RunRecord) -> dict[str, Any] | None:
        """Start the span of a run that the client has just started.

        Returns the payload of an ``otel.context`` event for the client to journal, or
        None. A payload is returned when the span's trace or parent does not follow from
        the run ids, because the run started inside an application span, or because its
        parent run was not started by this client.
        """
        try:
            tracer = self._get_tracer()
            if tracer is None:
                return None
            parent, context, journaled = self._parent_of(record)
            span = start_run_span(tracer, record, parent, context)
            with self._lock:
                self._spans[record.run_id] = span
        except Exception as exc:
            self._log_fault("start the span of", record.run_id, exc)
            return None
        return parent.to_payload() if journaled else None

    def log_event(
        self, run_id: str, event_type: str, timestamp: str, payload: Mapping[str, Any]
    ) -> None:
        """Add an event to the span of an open run; other runs' events are ignored."""
        if event_type == OTEL_CONTEXT_EVENT:
            return
        with self._lock:
            span = self._spans.get(run_id)
        if span is None:
            return
        try:
            add_run_event(span, event_type, timestamp, payload)
        except Exception as exc:
            self._log_fault("add an event to the span of", run_id, exc)

    def end_run(self, record: RunRecord) -> None:
        """End the span of a run with its final record; a run without a span is ignored.

        A run that another process ended, or whose span failed to start, has no span here.
        """
        with self._lock:
            span = self._spans.pop(record.run_id, None)
        if span is None:
            return
        try:
            end_run_span(span, record)
        except Exception as exc:
            self._log_fault("end the span of", record.run_id, exc)

    def shutdown(self) -> None:
        """Drop the spans of runs still open, and flush the own pipeline within the bound.

        Runs still open here were ended by another process, which the client does not end
        again. With an application's provider nothing is flushed: the application shuts
        its provider down, and the spans of ended runs are already in its processors.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            dropped = len(self._spans)
            self._spans.clear()
            pipeline = self._pipeline
        if dropped:
            logger.info("%d run spans were not ended, because their runs ended elsewhere", dropped)
        if pipeline is not None:
            _shut_down(pipeline, self._flush_timeout)

    # -- helpers ----------------------------------------------------------------------------

    def _get_tracer(self) -> Tracer | None:
        with self._lock:
            if self._closed or self._failed:
                return None
            if self._tracer is not None:
                return self._tracer
            try:
                provider = self._provider or trace.get_tracer_provider()
                if isinstance(provider, (ProxyTracerProvider, NoOpTracerProvider)):
                    self._pipeline = build_pipeline()
                    _flush_at_exit(self._pipeline, self._flush_timeout, self)
                    provider = self._pipeline.provider
                    logger.info(
                        "sending the spans of runs to %s over OTLP/HTTP",
                        mask_url(self._pipeline.endpoint),
                    )
                tracer = provider.get_tracer(INSTRUMENTATION_NAME, __version__)
            except Exception as exc:
                self._failed = True
                logger.error(
                    "cannot set up OpenTelemetry, so runs are not sent as spans in this "
                    "process: %s: %s. Check the OTEL_* environment variables",
                    type(exc).__name__,
                    exc,
                )
                return None
            if not install_id_generator(tracer):
                logger.warning(
                    "the application's tracer provider %s does not take span ids from an id "
                    "generator, so run spans get random ids, and 'telemetry export --otlp' "
                    "sends them again as other spans",
                    type(provider).__name__,
                )
            self._tracer = tracer
            return tracer

    def _parent_of(self, record: RunRecord) -> tuple[SpanParent, Context | None, bool]:
        """Return the run span's parent, the context to start it in, and whether to journal.

        A parent run wins over an application span. The parent is journaled when a
        replay could not find it from the run ids in the journal.
        """
        parent_run_id = record.parent_run_id
        if parent_run_id is not None:
            with self._lock:
                parent_span = self._spans.get(parent_run_id)
            if parent_span is not None:
                span_context = parent_span.get_span_context()
                parent = SpanParent.of_child_run(
                    parent_run_id, span_context.trace_id, span_context.trace_state.to_header()
                )
                return parent, trace.set_span_in_context(parent_span), False
            parent = SpanParent.of_child_run(parent_run_id, run_trace_id(parent_run_id))
            return parent, parent_context(parent), True

        current = trace.get_current_span().get_span_context()
        if current.is_valid:
            parent = SpanParent(
                current.trace_id,
                current.span_id,
                current.is_remote,
                current.trace_state.to_header(),
            )
            return parent, None, True
        return SpanParent.of_root_run(record.run_id), None, False

    def _log_fault(self, action: str, run_id: str, exc: Exception) -> None:
        self._repeats.log(
            logger,
            logging.ERROR,
            (action, type(exc)),
            "failed to %s run %s: %s: %s; the run is recorded, but its span may be missing "
            "or incomplete",
            action,
            run_id,
            type(exc).__name__,
            exc,
        )

    def _reset_in_child(self) -> None:
        # The parent's open runs are the parent's: the child must not end their spans.
        self._lock = threading.Lock()
        self._spans = {}


# The own pipelines not shut down yet, with their flush timeouts and bridges. The client
# closes its bridge at exit, which first ends the client's open runs as abandoned and then
# flushes. A client that the program dropped without close() is gone by then, and so is
# its bridge, but its spans are still queued in its pipeline, which this exit hook
# flushes. It leaves the pipelines of live bridges to their clients, whichever of the two
# exit hooks runs first.
_open_pipelines: dict[OwnPipeline, tuple[float, weakref.ref[OTelBridge]]] = {}
_pipelines_lock = threading.Lock()
_exit_hook_registered = False


def _flush_at_exit(pipeline: OwnPipeline, timeout: float, bridge: OTelBridge) -> None:
    global _exit_hook_registered
    with _pipelines_lock:
        _open_pipelines[pipeline] = (timeout, weakref.ref(bridge))
        if not _exit_hook_registered:
            atexit.register(_shut_down_dropped_pipelines)
            _exit_hook_registered = True


def _shut_down(pipeline: OwnPipeline, timeout: float) -> None:
    """Shut a pipeline down within ``timeout`` s, once; log when spans may be lost."""
    with _pipelines_lock:
        if _open_pipelines.pop(pipeline, None) is None:
            return
    if not shut_down_within(pipeline.processor, timeout):
        logger.warning(
            "the OpenTelemetry spans of runs were not all exported to the collector "
            "within %.1f s, so some may be lost: check the collector, then send the runs "
            "again with 'telemetry export --otlp'",
            timeout,
        )


def _shut_down_dropped_pipelines() -> None:
    with _pipelines_lock:
        dropped = [
            (pipeline, timeout)
            for pipeline, (timeout, bridge) in _open_pipelines.items()
            if bridge() is None
        ]
    for pipeline, timeout in dropped:
        _shut_down(pipeline, timeout)


def _reset_lock_in_child() -> None:
    # A fork while another thread holds the lock would leave it held forever in the child.
    global _pipelines_lock
    _pipelines_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_lock_in_child)
