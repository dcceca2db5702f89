"""OTelBridge: the live bridge that turns a client's runs into OpenTelemetry spans.

The client calls it after it has written the journal and the index, so nothing the
bridge does can cost a record. Each public method catches its faults and logs them on
``telemetry.otel``. end_run only hands the span to the span processors: with the bridge's own
pipeline that is a batch processor's queue, and the export to the collector happens on
the processor's thread.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import queue
import threading
import time
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
from telemetry.otel._mapping import DROPPED_ATTRIBUTES
from telemetry.otel._setup import (
    OwnPipeline,
    build_pipeline,
    import_lazy_modules,
    shut_down_within,
)
from telemetry.otel._spans import (
    AttributeLimits,
    add_run_event,
    attribute_limits,
    end_run_span,
    install_id_generator,
    parent_context,
    start_run_span,
)

__all__ = ["INSTRUMENTATION_NAME", "MIN_FLUSH_TIMEOUT", "OTelBridge", "flush_bound"]

logger = logging.getLogger("telemetry.otel")

INSTRUMENTATION_NAME = "agent-telemetry"
"""The instrumentation scope of the run spans."""
MIN_FLUSH_TIMEOUT = 1.0
"""Seconds that close() and the exit give the own pipeline at least, whatever
end_run_timeout is: with 0, a program that ends within the batch processor's delay
would otherwise export no span at all."""


def flush_bound(end_run_timeout: float) -> float:
    """Return the seconds that close() and the exit wait for the own pipeline to export."""
    return max(end_run_timeout, MIN_FLUSH_TIMEOUT)


class OTelBridge:
    """Turn runs into spans: start one at start_run, add events, end it at end_run.

    The tracer is chosen at the first start_run, so an application may configure
    OpenTelemetry after it has created the client. If the global TracerProvider is a real
    one (not the API's proxy or no-op provider), the spans go through it. Otherwise the
    bridge builds its own, which exports over OTLP/HTTP (see telemetry.otel._setup) and
    is not made the global provider.

    The constructor imports every module that the pipeline needs, so that the first
    start_run imports nothing: a fork in another thread during an import would leave the
    child waiting for that module's import lock forever.

    Args:
        flush_timeout: the client's end_run_timeout. Shutdown waits flush_bound(flush_timeout)
            seconds for the own pipeline to export.
        tracer_provider: a provider to use in place of the global one.
    """

    def __init__(
        self, flush_timeout: float, tracer_provider: trace.TracerProvider | None = None
    ) -> None:
        import_lazy_modules()
        self._flush_timeout = flush_timeout
        self._provider = tracer_provider
        self._limits = AttributeLimits()
        # Runs whose dropped attributes were logged, so that each run is logged once.
        self._truncated_runs: set[str] = set()
        self._lock = threading.Lock()
        self._spans: dict[str, Span] = {}
        self._tracer: Tracer | None = None
        self._pipeline: OwnPipeline | None = None
        self._finalizer: weakref.finalize[[OwnPipeline, float], OTelBridge] | None = None
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
            span = start_run_span(tracer, record, parent, context, self._limits)
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
            dropped = add_run_event(span, event_type, timestamp, payload, self._limits)
        except Exception as exc:
            self._log_fault("add an event to the span of", run_id, exc)
            return
        if dropped:
            self._log_truncated(run_id, dropped, f"the event {event_type!r}", "EVENT")

    def end_run(self, record: RunRecord) -> None:
        """End the span of a run with its final record; a run without a span is ignored.

        A run that another process ended, or whose span failed to start, has no span here.
        """
        with self._lock:
            span = self._spans.pop(record.run_id, None)
            truncated = record.run_id in self._truncated_runs
            self._truncated_runs.discard(record.run_id)
        if span is None:
            return
        try:
            dropped = end_run_span(span, record, self._limits)
        except Exception as exc:
            self._log_fault("end the span of", record.run_id, exc)
            return
        if dropped and not truncated:
            self._log_truncated(record.run_id, dropped, "its span", "SPAN")

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
            self._truncated_runs.clear()
            pipeline = self._pipeline
            finalizer = self._finalizer
        if finalizer is not None:
            finalizer.detach()
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
                # NOTE: an application's provider built with span_limits= in code has
                # limits that the SDK does not make public, so the bridge caps the
                # attributes at the limits from the environment.
                self._limits = attribute_limits()
                provider = self._provider or trace.get_tracer_provider()
                if isinstance(provider, (ProxyTracerProvider, NoOpTracerProvider)):
                    self._pipeline = build_pipeline()
                    self._finalizer = _flush_at_exit(self._pipeline, self._flush_timeout, self)
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

    def _log_truncated(self, run_id: str, dropped: int, where: str, kind: str) -> None:
        """Log once per run that ``dropped`` attributes were left out of ``where``.

        ``kind`` is SPAN or EVENT, as in the name of the limit's variable.
        """
        with self._lock:
            if run_id in self._truncated_runs:
                return
            if run_id in self._spans:
                self._truncated_runs.add(run_id)
        limit = self._limits.span if kind == "SPAN" else self._limits.event
        self._repeats.log(
            logger,
            logging.WARNING,
            ("truncated", kind),
            "run %s: %d attributes were left out of %s, which keeps at most %s "
            "(OTEL_%s_ATTRIBUTE_COUNT_LIMIT). The attribute %s counts them, and the journal "
            "keeps every value%s",
            run_id,
            dropped,
            where,
            limit,
            kind,
            DROPPED_ATTRIBUTES,
            "" if kind == "SPAN" else "; further truncations in this run are not logged",
        )

    def _reset_in_child(self) -> None:
        # The parent's open runs are the parent's: the child must not end their spans.
        self._lock = threading.Lock()
        self._spans = {}
        self._truncated_runs = set()


# The own pipelines not shut down yet, with their clients' end_run_timeout and bridges.
# The client closes its bridge at exit, which first ends the client's open runs as
# abandoned and then flushes. A bridge that the program dropped without close() is
# garbage collected, and its finalizer hands its pipeline to the reaper thread, which
# shuts it down. The exit hook shuts down what is left of the pipelines of dropped
# bridges, and leaves those of live bridges to their clients, whichever of the two exit
# hooks runs first.
_open_pipelines: dict[OwnPipeline, tuple[float, weakref.ref[OTelBridge]]] = {}
_pipelines_lock = threading.Lock()
_exit_hook_registered = False
# Pipelines of collected bridges, for the reaper. A finalizer may run inside any code
# that allocates, even while this thread holds a lock, so it only puts the pipeline
# here: SimpleQueue.put takes no lock that such code could hold. None wakes the reaper
# to check whether any pipeline is left.
_dropped_pipelines: queue.SimpleQueue[tuple[OwnPipeline, float] | None] = queue.SimpleQueue()
_reaper: threading.Thread | None = None
# The shutdowns in progress: an event set when each ends, and its deadline on the
# monotonic clock.
_running_shutdowns: dict[threading.Event, float] = {}


def _flush_at_exit(
    pipeline: OwnPipeline, timeout: float, bridge: OTelBridge
) -> weakref.finalize[[OwnPipeline, float], OTelBridge]:
    """Register ``pipeline`` to be shut down when ``bridge`` is collected, or at exit.

    Returns the finalizer, which the bridge detaches when it shuts the pipeline down itself.
    """
    global _exit_hook_registered
    finalizer = weakref.finalize(bridge, _hand_over, pipeline, timeout)
    # The exit hook, not the finalizer, handles the bridges still alive at exit.
    finalizer.atexit = False
    with _pipelines_lock:
        _open_pipelines[pipeline] = (timeout, weakref.ref(bridge))
        if not _exit_hook_registered:
            atexit.register(_shut_down_dropped_pipelines)
            _exit_hook_registered = True
        _start_reaper()
    return finalizer


def _hand_over(pipeline: OwnPipeline, timeout: float) -> None:
    # Looks the queue up at each call, because a forked child gets a new one.
    _dropped_pipelines.put((pipeline, timeout))


def _start_reaper() -> None:
    """Start the reaper thread unless it is running. The caller holds _pipelines_lock."""
    global _reaper
    if _reaper is not None and _reaper.is_alive():
        return
    _reaper = threading.Thread(target=_reap, name="telemetry-otel-reaper", daemon=True)
    _reaper.start()


def _reap() -> None:
    """Shut down the pipelines of collected bridges, each in a thread of its own.

    Returns when no own pipeline is open, so a process whose clients are closed keeps
    no thread. _flush_at_exit starts it again for the next pipeline.
    """
    global _reaper
    while True:
        item = _dropped_pipelines.get()
        if item is not None:
            pipeline, timeout = item
            # start() raises RuntimeError once the interpreter is shutting down, and by
            # then the exit hook has shut down the pipelines of collected bridges.
            with contextlib.suppress(RuntimeError):
                threading.Thread(
                    target=_shut_down,
                    args=(pipeline, timeout),
                    name="telemetry-otel-dropped",
                    daemon=True,
                ).start()
        with _pipelines_lock:
            if not _open_pipelines and _dropped_pipelines.empty():
                _reaper = None
                return


def _shut_down(pipeline: OwnPipeline, end_run_timeout: float) -> None:
    """Shut a pipeline down within flush_bound(end_run_timeout), once.

    Logs a WARNING that names the likely cause when spans may be lost.
    """
    bound = flush_bound(end_run_timeout)
    done = threading.Event()
    with _pipelines_lock:
        if _open_pipelines.pop(pipeline, None) is None:
            return
        if not _open_pipelines:
            _dropped_pipelines.put(None)
        _running_shutdowns[done] = time.monotonic() + bound
    try:
        finished = shut_down_within(pipeline.processor, bound)
    finally:
        done.set()
        with _pipelines_lock:
            _running_shutdowns.pop(done, None)
    if finished:
        return
    if pipeline.exporter.failed_exports:
        cause = "the collector failed exports, as logged before, so check it"
    elif bound > end_run_timeout:
        # The bound was the floor, so the user's 0 (or tiny) setting is the likely cause.
        cause = (
            f"close() and the exit wait the larger of TELEMETRY_END_RUN_TIMEOUT "
            f"({end_run_timeout:g} s) and {MIN_FLUSH_TIMEOUT:g} s, so raise "
            "TELEMETRY_END_RUN_TIMEOUT if the collector needs more time"
        )
    else:
        cause = (
            "the collector did not respond in time, so check it, or raise "
            f"TELEMETRY_END_RUN_TIMEOUT (now {end_run_timeout:g} s)"
        )
    logger.warning(
        "the OpenTelemetry spans of runs were not all exported to %s within %.1f s, so "
        "some may be lost: %s. Then send the runs again with 'telemetry export --otlp'",
        pipeline.exporter.shown_endpoint,
        bound,
        cause,
    )


def _shut_down_dropped_pipelines() -> None:
    """Shut down the pipelines of collected bridges, and wait for the reaper's shutdowns.

    A shutdown that the reaper started runs in a daemon thread, which the exit would
    otherwise cut short. The wait for it ends at that shutdown's own bound.
    """
    with _pipelines_lock:
        dropped = [
            (pipeline, timeout)
            for pipeline, (timeout, bridge) in _open_pipelines.items()
            if bridge() is None
        ]
    for pipeline, timeout in dropped:
        _shut_down(pipeline, timeout)
    with _pipelines_lock:
        running = list(_running_shutdowns.items())
    for done, deadline in running:
        done.wait(max(deadline - time.monotonic(), 0.0))


def _reset_lock_in_child() -> None:
    # A fork while another thread holds the lock would leave it held forever in the child,
    # and so could a fork during a put into the queue. The reaper thread does not exist
    # in the child: the next _flush_at_exit starts one, and the exit hook shuts down the
    # pipelines of bridges collected before that.
    global _pipelines_lock, _reaper, _dropped_pipelines, _running_shutdowns
    _pipelines_lock = threading.Lock()
    _dropped_pipelines = queue.SimpleQueue()
    _reaper = None
    _running_shutdowns = {}


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_lock_in_child)
