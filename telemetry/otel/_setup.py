"""The bridge's own OpenTelemetry pipeline: resource, OTLP/HTTP exporter, batch processor.

Used when the application has not configured a TracerProvider, and by the replay command.
The exporter reads the standard OTEL_EXPORTER_OTLP_* variables (timeout, compression,
certificates) itself. The endpoint is resolved here by the same rules, so that messages
can name it, with its credentials masked. The headers are parsed here too, so that an
invalid entry is logged without its value (see otlp_headers).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import NamedTuple
from urllib.parse import unquote

import requests
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
    "HEADERS_VARIABLES",
    "OtlpHeaders",
    "OwnPipeline",
    "ReportingExporter",
    "build_exporter",
    "build_pipeline",
    "build_replay_provider",
    "default_resource",
    "import_lazy_modules",
    "otlp_headers",
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
HEADERS_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS")
"""The variables that set the exporter's headers; the first one set wins, as in the SDK."""

# Modules that the pipeline imports only when it is built or exports, in OpenTelemetry
# SDK 1.45. The HTTP transport imports requests in its constructor. Resource.create runs
# the resource detectors in a thread pool. requests imports netrc on each request to read
# ~/.netrc. A fork while another thread imports one of them would leave its import lock
# held forever in the child, so import_lazy_modules imports them up front.
_LAZY_MODULES = ("requests", "concurrent.futures.thread", "netrc")

# A header name is an HTTP token (RFC 9110, section 5.6.2).
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# A header value may hold no control character, and only characters that HTTP/1.1 can
# carry as Latin-1; the HTTP client would reject others with an error that shows the value.
_INVALID_HEADER_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\u0100-\U0010ffff]")
# The SDK's message for an invalid header entry, which ends with the entry and its value.
_SDK_HEADER_WARNING = "Header format invalid"

_warned_entries: set[tuple[str, int, str]] = set()
_warned_lock = threading.Lock()


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


class OtlpHeaders(NamedTuple):
    """The exporter's headers as parsed from HEADERS_VARIABLES."""

    variable: str
    """The variable they come from, or "" when neither is set."""
    headers: dict[str, str]
    """Header names, in lower case, and their URL-decoded values."""
    invalid: list[tuple[int, str]]
    """The 1-based position and the text of each entry that is not a valid name=value."""
    invalid_value_names: frozenset[str] = frozenset()
    """Names, in lower case, of the invalid entries whose name is valid but whose value is
    not. The SDK's own parser may accept such an entry."""


def otlp_headers(environ: Mapping[str, str] | None = None) -> OtlpHeaders:
    """Parse OTEL_EXPORTER_OTLP_TRACES_HEADERS, or else OTEL_EXPORTER_OTLP_HEADERS.

    The value is a comma-separated list of ``name=value`` entries with URL-encoded values,
    as the OTLP exporter specification defines it. Blank entries are skipped. An entry
    without ``=``, with a name that is not an HTTP token, or with a value that decodes
    to a control character is invalid, and is returned in ``invalid`` instead.
    """
    env = os.environ if environ is None else environ
    variable = ""
    text = ""
    for name in HEADERS_VARIABLES:
        text = env.get(name, "")
        if text.strip():
            variable = name
            break
    headers: dict[str, str] = {}
    invalid: list[tuple[int, str]] = []
    invalid_value_names: set[str] = set()
    for position, entry in enumerate(text.split(","), start=1):
        if not entry.strip():
            continue
        name, separator, value = entry.partition("=")
        name = unquote(name).strip()
        value = unquote(value.strip()).strip()
        if not separator or not _HEADER_NAME.fullmatch(name):
            invalid.append((position, entry))
        elif _INVALID_HEADER_VALUE.search(value):
            invalid.append((position, entry))
            invalid_value_names.add(name.lower())
        else:
            headers[name.lower()] = value
    return OtlpHeaders(variable, headers, invalid, frozenset(invalid_value_names))


def _warn_invalid_headers(parsed: OtlpHeaders) -> None:
    """Log each invalid header entry once per process, without its value."""
    for position, entry in parsed.invalid:
        key = (parsed.variable, position, entry)
        with _warned_lock:
            if key in _warned_entries:
                continue
            _warned_entries.add(key)
        logger.warning(
            "entry %d of %s (%s) is not a valid name=value header, so it is not sent: "
            "write the headers as comma-separated name=value pairs with URL-encoded values, "
            "such as Authorization=Bearer%%20TOKEN",
            position,
            parsed.variable,
            _masked_entry(entry),
        )


def _masked_entry(entry: str) -> str:
    # "Authorization: Bearer TOKEN", the usual mistake, shows its name; any other entry
    # could be the secret itself, so none of its text is shown.
    name, separator, _ = entry.partition(":")
    if separator and _HEADER_NAME.fullmatch(name.strip()):
        return f"{name.strip()}: ***"
    return "***"


@contextlib.contextmanager
def _sdk_header_warnings_dropped() -> Iterator[None]:
    """Drop the SDK's warnings about invalid header entries while the block runs.

    The OTLP exporter of SDK 1.45 parses the variable in its constructor even when it is
    given ``headers=``, and logs an invalid entry with its value on the logger
    ``opentelemetry.util.re``. otlp_headers has logged the entry without its value.
    """
    sdk_logger = logging.getLogger("opentelemetry.util.re")
    drop = _DropHeaderWarnings()
    sdk_logger.addFilter(drop)
    try:
        yield
    finally:
        sdk_logger.removeFilter(drop)


class _DropHeaderWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_SDK_HEADER_WARNING)


class _HeaderFilteringSession(requests.Session):
    """A requests session that leaves the headers named in ``left_out`` out of each request.

    The OTLP exporter of SDK 1.45 merges the entries that its own parser accepts into the
    headers it sends. Among them can be a value that decodes to a control character, which
    requests rejects with an error message that shows the value.
    """

    def __init__(self, left_out: frozenset[str]) -> None:
        super().__init__()
        self.left_out = left_out

    def prepare_request(self, request: requests.Request) -> requests.PreparedRequest:
        """Drop the left-out headers from ``request``, then prepare it as requests does."""
        if request.headers:
            request.headers = {
                name: value
                for name, value in request.headers.items()
                if name.lower() not in self.left_out
            }
        return super().prepare_request(request)


def build_exporter(endpoint: str) -> OTLPSpanExporter:
    """Build the OTLP/HTTP exporter for ``endpoint``, with the headers that otlp_headers parses.

    Each invalid header entry is logged as a WARNING on ``telemetry.otel``, once per
    process, without its value.

    Raises:
        Exception: whatever the SDK raises for an invalid OTEL_* setting.
    """
    parsed = otlp_headers()
    _warn_invalid_headers(parsed)
    left_out = parsed.invalid_value_names - parsed.headers.keys()
    # NOTE: this session replaces the one that
    # OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER names, if that is set.
    session = _HeaderFilteringSession(left_out) if left_out else None
    with _sdk_header_warnings_dropped():
        return OTLPSpanExporter(endpoint=endpoint, headers=parsed.headers, session=session)


def import_lazy_modules() -> None:
    """Import the modules that the pipeline would otherwise import at its first use.

    A module that cannot be imported is skipped: the pipeline reports its absence when it
    is built.
    """
    for name in _LAZY_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            continue


class ReportingExporter(SpanExporter):
    """Pass spans on to ``exporter`` and log each failed export on ``telemetry.otel``.

    An exception of the exporter is logged and counts as a failed export. Repeated
    failures are rate-limited.
    """

    def __init__(self, exporter: SpanExporter, endpoint: str) -> None:
        self.exporter = exporter
        self.shown_endpoint = mask_url(endpoint)
        self.failed_exports = 0
        """Exports that failed so far; read by the exit flush to name the cause of a delay."""
        self._repeats = RepeatLimiter()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Export ``spans``; log and return FAILURE when the exporter fails or raises."""
        try:
            result = self.exporter.export(spans)
        except Exception as exc:
            self.failed_exports += 1
            self._log_failure(len(spans), f"{type(exc).__name__}: {exc}")
            return SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            self.failed_exports += 1
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
    exporter: ReportingExporter
    endpoint: str


def build_pipeline() -> OwnPipeline:
    """Build a TracerProvider that exports through a BatchSpanProcessor and OTLP/HTTP.

    The provider is not registered as the global one, and does not shut down at exit by
    itself: the bridge shuts it down within its bound (see shut_down_within).

    Raises:
        Exception: whatever the SDK raises for an invalid OTEL_* setting.
    """
    endpoint = traces_endpoint()
    exporter = ReportingExporter(build_exporter(endpoint), endpoint)
    provider = TracerProvider(
        resource=default_resource(), id_generator=RunIdGenerator(), shutdown_on_exit=False
    )
    processor = BatchSpanProcessor(exporter)
    provider.add_span_processor(processor)
    return OwnPipeline(provider, processor, exporter, endpoint)


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
