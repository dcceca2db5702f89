"""The bridge's own OpenTelemetry pipeline: resource, OTLP/HTTP exporter, batch processor.

Used when the application has not configured a TracerProvider, and by the replay command.
The exporter reads the standard OTEL_EXPORTER_OTLP_* variables (headers, timeout,
compression, certificates) itself. The endpoint is resolved here by the same rules, so
that messages can name it, with its credentials masked.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON

from telemetry._logutil import RepeatLimiter
from telemetry.config import mask_url
from telemetry.otel._spans import RunIdGenerator

__all__ = [
    "DEFAULT_ENDPOINT",
    "DEFAULT_SERVICE_NAME",
    "OwnPipeline",
    "ReportingExporter",
    "build_pipeline",
    "build_replay_provider",
    "default_resource",
    "shut_down_within",
    "traces_endpoint",
]

logger = logging.getLogger("telemetry.otel")

DEFAULT_ENDPOINT = "http://localhost:4318"
"""The OTLP/HTTP base URL when no variable sets one, as in the OTLP exporter specification."""
DEFAULT_SERVICE_NAME = "agent-telemetry"
"""service.name of the bridge's own resource when OTEL_SERVICE_NAME and
OTEL_RESOURCE_ATTRIBUTES do not set one."""
TRACES_PATH = "v1/traces"


def traces_endpoint(base_url: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """Return the URL that spans are POSTed to.

    ``base_url`` wins, then OTEL_EXPORTER_OTLP_TRACES_ENDPOINT (used as it is), then
    OTEL_EXPORTER_OTLP_ENDPOINT, then DEFAULT_ENDPOINT. A base URL gets ``/v1/traces``
    appended unless its path already ends with it.
    """
    env = os.environ if environ is None else environ
    if base_url is None:
        signal_url = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        if signal_url:
            return signal_url
        base_url = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or DEFAULT_ENDPOINT
    base_url = base_url.strip()
    if base_url.rstrip("/").endswith("/" + TRACES_PATH):
        return base_url
    return base_url.rstrip("/") + "/" + TRACES_PATH


def default_resource() -> Resource:
    """Return the resource from OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES.

    The SDK names a service that neither variable names ``unknown_service``; here it is
    DEFAULT_SERVICE_NAME instead.
    """
    resource = Resource.create()
    service = resource.attributes.get(SERVICE_NAME)
    if not isinstance(service, str) or service.startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return resource


class ReportingExporter(SpanExporter):
    """Pass spans on to ``exporter`` and log each failed export on ``telemetry.otel``.

    An exception of the exporter is logged and counts as a failed export. Repeated
    failures are rate-limited.
    """

    def __init__(self, exporter: SpanExporter, endpoint: str) -> None:
        self.exporter = exporter
        self.shown_endpoint = mask_url(endpoint)
        self._repeats = RepeatLimiter()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Export ``spans``; log and return FAILURE when the exporter fails or raises."""
        try:
            result = self.exporter.export(spans)
        except Exception as exc:
            self._log_failure(len(spans), f"{type(exc).__name__}: {exc}")
            return SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            self._log_failure(len(spans), "the exporter reported a failure; see its log")
        return result

    def _log_failure(self, count: int, reason: str) -> None:
        self._repeats.log(
            logger,
            logging.ERROR,
            "export",
            "failed to export %d run spans to %s (%s); the runs stay in the journal: send "
            "them again with 'telemetry export --otlp'",
            count,
            self.shown_endpoint,
            reason,
        )

    def shutdown(self) -> None:
        """Shut down the exporter."""
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Flush the exporter."""
        return self.exporter.force_flush(timeout_millis)


class OwnPipeline(NamedTuple):
    """A TracerProvider of the bridge and the batch processor it exports through."""

    provider: TracerProvider
    processor: BatchSpanProcessor
    endpoint: str


def build_pipeline() -> OwnPipeline:
    """Build a TracerProvider that exports through a BatchSpanProcessor and OTLP/HTTP.

    The provider is not registered as the global one, and does not shut down at exit by
    itself: the bridge shuts it down within its bound (see shut_down_within).

    Raises:
        Exception: whatever the SDK raises for an invalid OTEL_* setting.
    """
    endpoint = traces_endpoint()
    exporter = ReportingExporter(OTLPSpanExporter(endpoint=endpoint), endpoint)
    provider = TracerProvider(
        resource=default_resource(), id_generator=RunIdGenerator(), shutdown_on_exit=False
    )
    processor = BatchSpanProcessor(exporter)
    provider.add_span_processor(processor)
    return OwnPipeline(provider, processor, endpoint)


def build_replay_provider() -> TracerProvider:
    """Build a TracerProvider for replay: every span sampled, no processor, no exit hook."""
    return TracerProvider(
        sampler=ALWAYS_ON,
        resource=default_resource(),
        id_generator=RunIdGenerator(),
        shutdown_on_exit=False,
    )


def shut_down_within(processor: BatchSpanProcessor, timeout: float) -> bool:
    """Shut down ``processor``, exporting what it holds, and wait at most ``timeout`` s.

    The SDK's BatchSpanProcessor.shutdown waits up to 30 s for an export and takes no
    timeout, so it runs in a daemon thread that is left behind after ``timeout``. A
    daemon thread does not hold up the interpreter's exit. Returns whether the shutdown
    finished in time.
    """
    finished = threading.Event()
    # Typed here, because the SDK declares shutdown() without a return type.
    shutdown: Callable[[], object] = processor.shutdown

    def shut_down() -> None:
        try:
            shutdown()
        except Exception as exc:
            logger.error("failed to shut down the OpenTelemetry span processor: %s", exc)
        finally:
            finished.set()

    try:
        threading.Thread(target=shut_down, name="telemetry-otel-shutdown", daemon=True).start()
    except RuntimeError as exc:
        # Raised when the interpreter no longer starts threads.
        logger.error("cannot shut down the OpenTelemetry span processor: %s", exc)
        return False
    return finished.wait(max(timeout, 0.0))
