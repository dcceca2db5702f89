"""The tools a user might pick instead of agent-telemetry, set up to record the same things.

Each peer writes into a directory of its own under the benchmark's temporary directory and
has ``record()``, which records one item the way that tool's users would, and ``close()``.
Peers are benchmark-only dependencies: ``open_peer`` returns None with the reason when one
is not installed.

- MLflow tracking on a SQLite backend: one run with one metric per record. MLflow's usage
  telemetry is switched off with MLFLOW_DISABLE_TELEMETRY and DO_NOT_TRACK (documented at
  https://mlflow.org/docs/latest/community/usage-tracking), and the tracking URI is a
  sqlite:/// path, so nothing leaves the machine.
- The OpenTelemetry SDK: one span per record, ended into a SimpleSpanProcessor whose
  exporter writes the span as one JSON line and fsyncs the file before returning.
- The stdlib ``logging`` module: one JSON line per record through a FileHandler, with or
  without an fsync after each record.
- structlog with orjson as the JSON renderer, writing bytes to a file. BytesLogger flushes
  each line to the OS.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from _harness import EVENT_PAYLOAD

__all__ = ["PEER_DISTRIBUTIONS", "Peer", "open_peer"]

# The distributions each peer needs, for the versions table and for the message when one
# is missing.
PEER_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "mlflow": ("mlflow-skinny", "SQLAlchemy", "alembic"),
    "opentelemetry": ("opentelemetry-sdk",),
    "logging-fsync": (),
    "logging": (),
    "structlog": ("structlog", "orjson"),
}


class Peer(Protocol):
    """A tool that records one item per call of record()."""

    def record(self) -> None: ...

    def close(self) -> None: ...


def open_peer(name: str, directory: Path) -> tuple[Peer | None, str]:
    """Set up the peer ``name`` in ``directory`` and return it, or None and the reason.

    Raises:
        KeyError: ``name`` is not one of PEER_DISTRIBUTIONS.
    """
    factories: dict[str, Callable[[Path], Peer]] = {
        "mlflow": MLflowRuns,
        "opentelemetry": _open_otel_spans,
        "logging-fsync": lambda path: LoggingJsonLines(path, fsync=True),
        "logging": lambda path: LoggingJsonLines(path, fsync=False),
        "structlog": StructlogOrjson,
    }
    factory = factories[name]
    directory.mkdir(parents=True, exist_ok=True)
    try:
        return factory(directory), ""
    except ImportError as exc:
        needed = ", ".join(PEER_DISTRIBUTIONS[name])
        return None, f"not installed (missing module {exc.name}): pip install {needed}"


class MLflowRuns:
    """MLflow tracking on SQLite: ``with mlflow.start_run(): mlflow.log_metric(...)``."""

    def __init__(self, directory: Path) -> None:
        # Set before the import, so that MLflow's usage telemetry is off from the start.
        os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
        os.environ["DO_NOT_TRACK"] = "true"
        import mlflow

        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        mlflow.set_tracking_uri(f"sqlite:///{directory / 'mlflow.db'}")
        self._experiment_id = mlflow.create_experiment(
            "bench-write", artifact_location=(directory / "artifacts").as_uri()
        )
        self._mlflow = mlflow

    def record(self) -> None:
        """Record one run with one metric."""
        with self._mlflow.start_run(experiment_id=self._experiment_id):
            self._mlflow.log_metric("items_succeeded", 10)

    def close(self) -> None:
        """Do nothing: MLflow's fluent API has no call that closes its tracking store."""


class _OtelSpans:
    """Spans of an OpenTelemetry TracerProvider of its own, one span per record()."""

    def __init__(self, provider: Any) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer("bench-write")

    def record(self) -> None:
        """Start and end one span with EVENT_PAYLOAD as its attributes."""
        with self._tracer.start_as_current_span("item_processed", attributes=EVENT_PAYLOAD):
            pass

    def close(self) -> None:
        """Shut the provider down, which closes the exporter's file."""
        self._provider.shutdown()


def _open_otel_spans(directory: Path) -> Peer:
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class FsyncedJsonLinesExporter(SpanExporter):
        """Writes each span as one JSON line and fsyncs the file before returning."""

        def __init__(self, path: Path) -> None:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
            self._fd = os.open(path, flags, 0o600)
            self._lock = threading.Lock()

        def export(self, spans: Any) -> SpanExportResult:
            batch: list[ReadableSpan] = list(spans)
            data = b"".join(span.to_json(indent=None).encode() + b"\n" for span in batch)
            with self._lock:
                os.write(self._fd, data)
                os.fsync(self._fd)
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            os.close(self._fd)

    provider = TracerProvider()
    provider.add_span_processor(
        SimpleSpanProcessor(FsyncedJsonLinesExporter(directory / "spans.ndjson"))
    )
    return _OtelSpans(provider)


class _JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: time, level, logger, message and the payload."""

    def format(self, record: logging.LogRecord) -> str:
        created = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        fields = {
            "time": created.isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "payload", {}),
        }
        return json.dumps(fields)


class _FsyncFileHandler(logging.FileHandler):
    """A FileHandler that fsyncs the file after writing each record."""

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        if self.stream is not None:
            os.fsync(self.stream.fileno())


class LoggingJsonLines:
    """The stdlib ``logging`` module writing one JSON line per record to a file."""

    def __init__(self, directory: Path, *, fsync: bool) -> None:
        name = "logging-fsync" if fsync else "logging"
        handler_class = _FsyncFileHandler if fsync else logging.FileHandler
        self._handler = handler_class(directory / f"{name}.ndjson", encoding="utf-8")
        self._handler.setFormatter(_JsonFormatter())
        self._logger = logging.getLogger(f"bench_write.{name}")
        self._logger.propagate = False
        self._logger.setLevel(logging.INFO)
        self._logger.addHandler(self._handler)
        self._extra = {"payload": EVENT_PAYLOAD}

    def record(self) -> None:
        """Log one INFO record with EVENT_PAYLOAD."""
        self._logger.info("item_processed", extra=self._extra)

    def close(self) -> None:
        """Detach and close the handler."""
        self._logger.removeHandler(self._handler)
        self._handler.close()


class StructlogOrjson:
    """structlog configured as its performance guide's example: orjson, bytes, cached logger.

    The guide is https://www.structlog.org/en/stable/performance.html. The logger writes
    to a file of its own instead of stdout.
    """

    def __init__(self, directory: Path) -> None:
        import orjson
        import structlog

        self._file = open(directory / "structlog.ndjson", "ab")  # noqa: SIM115
        proxy = structlog.wrap_logger(
            structlog.BytesLogger(self._file),
            processors=[
                structlog.contextvars.merge_contextvars,
                structlog.processors.add_log_level,
                structlog.processors.format_exc_info,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.JSONRenderer(serializer=orjson.dumps),
            ],
            wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
            cache_logger_on_first_use=True,
        )
        self._logger = proxy.bind()

    def record(self) -> None:
        """Log one info record with EVENT_PAYLOAD as its key-value pairs."""
        self._logger.info("item_processed", **EVENT_PAYLOAD)

    def close(self) -> None:
        """Close the file."""
        self._file.close()
