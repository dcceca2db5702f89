"""Tests of the OpenTelemetry bridge with the SDK's in-memory span exporter.

The module sets the process's global TracerProvider once, as an application would, with
a SimpleSpanProcessor and an InMemorySpanExporter, so the bridge uses the application's
provider. Each test records runs with a real TelemetryClient on a temporary store and
checks the spans field by field, and that a replay of the journal gives the same spans.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("opentelemetry.sdk", reason="needs the otel extra")
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    StatusCode,
    TraceFlags,
    TraceState,
)
from otlp_support import WireSpan, from_readable

from telemetry import RunRecord, TelemetryClient, TelemetryConfig
from telemetry.errors import ConfigError
from telemetry.journal import JournalReader
from telemetry.otel import (
    OTEL_CONTEXT_EVENT,
    SpanParent,
    format_span_id,
    format_trace_id,
    open_bridge,
    run_span_id,
    run_trace_id,
)
from telemetry.otel._ids import parse_context_payload, resolve_parents
from telemetry.otel._mapping import (
    event_attributes,
    exception_attributes,
    run_attributes,
    span_status,
    timestamp_ns,
)
from telemetry.otel._replay import ReplayError, replay_journal
from telemetry.otel._setup import otlp_headers

ClientFactory = Callable[..., TelemetryClient]
OTHER_PROCESS_RUN = "20260101T000000000000Z-elsewhere-0123456789abcdef"
REMOTE_PARENT = SpanContext(
    0x4BF92F3577B34DA6A3CE929D0E0E4736,
    0x00F067AA0BA902B7,
    is_remote=True,
    trace_flags=TraceFlags(TraceFlags.SAMPLED),
    trace_state=TraceState.from_header(["congo=t61rcWkgMzE"]),
)

# The provider can be set once per process, so every test of the module shares it.
_EXPORTER = InMemorySpanExporter()
_PROVIDER = TracerProvider()
_PROVIDER.add_span_processor(SimpleSpanProcessor(_EXPORTER))


@pytest.fixture(scope="module", autouse=True)
def app_provider() -> TracerProvider:
    """Set the global TracerProvider to the module's SDK provider, once."""
    trace.set_tracer_provider(_PROVIDER)
    return _PROVIDER


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    """Yield the in-memory exporter, emptied before the test."""
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


@pytest.fixture
def make_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exported: InMemorySpanExporter
) -> Iterator[ClientFactory]:
    """Yield a factory of clients with the bridge on, on one store; close them after."""
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    clients: list[TelemetryClient] = []

    def make(**settings: Any) -> TelemetryClient:
        settings.setdefault("otel", True)
        config = TelemetryConfig(data_dir=tmp_path / "store", environ={}, **settings)
        client = TelemetryClient(config)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def run_spans(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    """Return the exported run spans, keyed by run id; other spans are left out."""
    spans = {}
    for span in exporter.get_finished_spans():
        run_id = (span.attributes or {}).get("agent_telemetry.run_id")
        if isinstance(run_id, str):
            spans[run_id] = span
    return spans


def journal_events(client: TelemetryClient, event_type: str) -> list[dict[str, Any]]:
    """Return the event lines of type ``event_type`` in the client's journal."""
    reader = JournalReader(client.config.ndjson_dir)
    return [
        record
        for journal_file in reader.files()
        for record in reader.read(journal_file.path).records
        if record.get("record_type") == "event" and record.get("event_type") == event_type
    ]


def replayed(client: TelemetryClient) -> dict[str, WireSpan]:
    """Replay the client's journal into a new in-memory exporter; return spans by run id."""
    exporter = InMemorySpanExporter()
    replay_journal(JournalReader(client.config.ndjson_dir), exporter)
    return {
        str((span.attributes or {})["agent_telemetry.run_id"]): comparable(span)
        for span in exporter.get_finished_spans()
    }


def comparable(span: ReadableSpan) -> WireSpan:
    """Return the span's fields without its resource, which is the provider's."""
    wire = from_readable(span)
    return WireSpan(**{**wire.__dict__, "resource": ()})


# --- success ------------------------------------------------------------------------------


def test_success_span_fields(make_client: ClientFactory, exported: InMemorySpanExporter) -> None:
    """A successful run becomes one INTERNAL span with its fields as attributes."""
    client = make_client()
    run_id = client.start_run(
        "invoice-sync", "sync", trigger_type="cron", product="billing", git_commit="abc123"
    )
    client.end_run(run_id, items_discovered=4, items_succeeded=4, output_summary="4 sent")
    span = run_spans(exported)[run_id]
    context = span.context
    assert context is not None
    attributes = dict(span.attributes or {})

    assert span.name == "invoice-sync sync"
    assert span.kind is SpanKind.INTERNAL
    assert span.status.status_code is StatusCode.OK
    assert span.status.description is None
    assert context.span_id == run_span_id(run_id)
    assert context.trace_id == run_trace_id(run_id)
    assert span.parent is None
    assert span.instrumentation_scope is not None
    assert span.instrumentation_scope.name == "agent-telemetry"
    assert attributes["agent_telemetry.run_id"] == run_id
    assert attributes["agent_telemetry.agent_name"] == "invoice-sync"
    assert attributes["agent_telemetry.job_type"] == "sync"
    assert attributes["agent_telemetry.trigger_type"] == "cron"
    assert attributes["agent_telemetry.status"] == "success"
    assert attributes["agent_telemetry.items_discovered"] == 4
    assert attributes["agent_telemetry.items_succeeded"] == 4
    assert attributes["agent_telemetry.items_failed"] == 0
    assert attributes["agent_telemetry.output_summary"] == "4 sent"
    assert attributes["agent_telemetry.product"] == "billing"
    assert attributes["agent_telemetry.git_commit"] == "abc123"
    assert isinstance(attributes["agent_telemetry.duration_ms"], int)
    assert isinstance(attributes["agent_telemetry.hostname"], str)
    assert isinstance(attributes["agent_telemetry.pid"], int)
    assert "agent_telemetry.error_summary" not in attributes
    assert "agent_telemetry.api_posted" not in attributes


def test_success_span_times(make_client: ClientFactory, exported: InMemorySpanExporter) -> None:
    """The span starts and ends at the run's start_time and end_time."""
    client = make_client()
    run_id = client.start_run("timed", "job")
    record = client.end_run(run_id)
    assert record is not None
    assert record.end_time is not None
    span = run_spans(exported)[run_id]

    assert span.start_time == timestamp_ns(record.start_time)
    assert span.end_time == timestamp_ns(record.end_time)


def test_no_otel_context_for_root(make_client: ClientFactory) -> None:
    """A root run outside any span journals no otel.context event."""
    client = make_client()
    client.end_run(client.start_run("plain", "job"))

    assert journal_events(client, OTEL_CONTEXT_EVENT) == []


# --- failure ------------------------------------------------------------------------------


def test_failure_span(make_client: ClientFactory, exported: InMemorySpanExporter) -> None:
    """A failed run's span has status ERROR with the summary, and an exception event."""
    client = make_client()
    with pytest.raises(json.JSONDecodeError), client.track_run("parser", "parse") as run:
        json.loads("{not json")
    span = run_spans(exported)[run.run_id]
    event = span.events[-1]
    attributes = dict(event.attributes or {})

    assert span.status.status_code is StatusCode.ERROR
    assert str(span.status.description).startswith("JSONDecodeError: Expecting property name")
    assert event.name == "exception"
    assert event.timestamp == span.end_time
    assert attributes["exception.type"] == "json.decoder.JSONDecodeError"
    assert str(attributes["exception.message"]).startswith("Expecting property name")
    assert "Traceback (most recent call last)" in str(attributes["exception.stacktrace"])
    assert dict(span.attributes or {})["agent_telemetry.status"] == "failed"


@pytest.mark.parametrize(
    ("status", "code", "has_exception"),
    [
        ("partial", StatusCode.OK, False),
        ("cancelled", StatusCode.ERROR, True),
        ("timeout", StatusCode.ERROR, True),
        ("abandoned", StatusCode.ERROR, False),
        ("failed", StatusCode.ERROR, True),
    ],
)
def test_status_mapping(
    make_client: ClientFactory,
    exported: InMemorySpanExporter,
    status: str,
    code: StatusCode,
    has_exception: bool,
) -> None:
    """Each final status maps to its span status, and only some get an exception event."""
    client = make_client()
    run_id = client.start_run("statuses", "job")
    client.end_run(run_id, status, error_summary=f"ended as {status}")
    span = run_spans(exported)[run_id]

    assert span.status.status_code is code
    assert [event.name == "exception" for event in span.events] == ([True] if has_exception else [])
    if code is StatusCode.ERROR:
        assert span.status.description == f"ended as {status}"


def test_error_without_summary(make_client: ClientFactory, exported: InMemorySpanExporter) -> None:
    """An error status without an error_summary has the status as its description."""
    client = make_client()
    run_id = client.start_run("statuses", "job")
    client.end_run(run_id, "timeout")
    span = run_spans(exported)[run_id]

    assert span.status.description == "timeout"
    assert span.events == ()


def test_exception_type_multiline_message() -> None:
    """The exception type comes from its own line even when the message spans lines."""
    record = RunRecord(
        run_id="r",
        agent_name="a",
        job_type="j",
        start_time="2026-12-04T10:00:00.000000+00:00",
        status="failed",
        error_summary="ValueError: first\nsecond: line",
        error_details='Traceback (most recent call last):\n  File "x", line 1\n'
        "ValueError: first\nsecond: line\n",
    )
    attributes = exception_attributes(record)

    assert attributes is not None
    assert attributes["exception.type"] == "ValueError"
    assert attributes["exception.message"] == "first\nsecond: line"


def test_exception_without_traceback() -> None:
    """A cancelled run with only a summary gets a message and no type."""
    record = RunRecord(
        run_id="r",
        agent_name="a",
        job_type="j",
        start_time="2026-12-04T10:00:00.000000+00:00",
        status="cancelled",
        error_summary="KeyboardInterrupt",
    )

    assert exception_attributes(record) == {"exception.message": "KeyboardInterrupt"}
    assert span_status(record) == (True, "KeyboardInterrupt")


# --- nesting ------------------------------------------------------------------------------


def test_nested_run_is_child(make_client: ClientFactory, exported: InMemorySpanExporter) -> None:
    """A nested run's span is a child of its parent run's span, in the parent's trace."""
    client = make_client()
    with client.track_run("outer", "job") as outer, client.track_run("inner", "step") as inner:
        pass
    spans = run_spans(exported)
    child = spans[inner.run_id]
    assert child.parent is not None
    assert child.context is not None

    assert child.parent.span_id == run_span_id(outer.run_id)
    assert child.context.trace_id == run_trace_id(outer.run_id)
    assert dict(child.attributes or {})["agent_telemetry.parent_run_id"] == outer.run_id
    assert journal_events(client, OTEL_CONTEXT_EVENT) == []


def test_parent_in_other_process(
    make_client: ClientFactory, exported: InMemorySpanExporter
) -> None:
    """A run whose parent ran elsewhere joins the parent run id's trace and journals it."""
    client = make_client()
    run_id = client.start_run("worker", "job", parent_run_id=OTHER_PROCESS_RUN)
    client.end_run(run_id)
    span = run_spans(exported)[run_id]
    assert span.parent is not None
    assert span.context is not None
    contexts = journal_events(client, OTEL_CONTEXT_EVENT)

    assert span.parent.span_id == run_span_id(OTHER_PROCESS_RUN)
    assert span.context.trace_id == run_trace_id(OTHER_PROCESS_RUN)
    assert [record["run_id"] for record in contexts] == [run_id]
    assert contexts[0]["payload"] == {
        "trace_id": format_trace_id(run_trace_id(OTHER_PROCESS_RUN)),
        "parent_span_id": format_span_id(run_span_id(OTHER_PROCESS_RUN)),
    }


def test_run_inside_app_span(
    make_client: ClientFactory, exported: InMemorySpanExporter, app_provider: TracerProvider
) -> None:
    """A run started inside an application span is that span's child, and the journal
    records that span. A run nested in it stays the child of its parent run."""
    client = make_client()
    app_tracer = app_provider.get_tracer("app")
    with (
        app_tracer.start_as_current_span("handle request") as request,
        client.track_run("served", "job") as run,
        client.track_run("nested", "step") as nested,
    ):
        pass
    request_context = request.get_span_context()
    spans = run_spans(exported)
    run_span = spans[run.run_id]
    nested_span = spans[nested.run_id]
    assert run_span.parent is not None
    assert run_span.context is not None
    assert nested_span.parent is not None
    assert nested_span.context is not None
    contexts = journal_events(client, OTEL_CONTEXT_EVENT)

    assert run_span.parent.span_id == request_context.span_id
    assert run_span.context.trace_id == request_context.trace_id
    assert nested_span.parent.span_id == run_span_id(run.run_id)
    assert nested_span.context.trace_id == request_context.trace_id
    assert [record["run_id"] for record in contexts] == [run.run_id]
    assert contexts[0]["payload"] == {
        "trace_id": format_trace_id(request_context.trace_id),
        "parent_span_id": format_span_id(request_context.span_id),
    }


def test_app_spans_keep_random_ids(
    make_client: ClientFactory, app_provider: TracerProvider
) -> None:
    """The bridge changes the id generator of its own tracer only, not the provider's."""
    client = make_client()
    client.end_run(client.start_run("ids", "job"))

    assert type(app_provider.id_generator) is RandomIdGenerator


# --- events and metrics -------------------------------------------------------------------

AWKWARD_PAYLOAD: dict[Any, Any] = {
    "nested": {"a": {"b": [1, 2]}},
    "mixed": [1, "a", None],
    "bytes": b"\xff",
    "huge": 2**80,
    "none": None,
    3: "int key",
    "lone": "\ud800x",
    "nan": float("nan"),
    "": "empty key",
    "a.b": 1,
    "a": {"b": 2},
    "empty": {},
    "floats": [1.5, 2.5],
    "bools": [True, False],
    "tuple": (1, 2),
    "deep": [{"x": 1}],
}
AWKWARD_ATTRIBUTES = {
    "nested.a.b": (1, 2),
    "mixed": '[1,"a",null]',
    "bytes": "base64:/w==",
    "huge": "1208925819614629174706176",
    "3": "int key",
    "lone": "\\ud800x",
    "nan": "NaN",
    "(empty)": "empty key",
    "a.b": 1,
    "a.b#2": 2,
    "empty": "{}",
    "floats": (1.5, 2.5),
    "bools": (True, False),
    "tuple": (1, 2),
    "deep": '[{"x":1}]',
}


def test_event_awkward_payload(
    make_client: ClientFactory, exported: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    """An event's payload is flattened; values OpenTelemetry cannot hold take the
    journal's form, and None is left out."""
    client = make_client()
    with caplog.at_level(logging.WARNING), client.track_run("events", "job") as run:
        run.log_event("awkward", AWKWARD_PAYLOAD)
    event = run_spans(exported)[run.run_id].events[0]

    assert event.name == "awkward"
    assert dict(event.attributes or {}) == AWKWARD_ATTRIBUTES


def test_event_timestamp_and_order(
    make_client: ClientFactory, exported: InMemorySpanExporter
) -> None:
    """Span events keep the journal's order and timestamps; otel.context is not one."""
    client = make_client()
    with client.track_run("events", "job") as run:
        for number in range(3):
            run.log_event(f"step-{number}", {"number": number})
    span = run_spans(exported)[run.run_id]
    journaled = [record["timestamp"] for record in journal_events(client, "step-0")]

    assert [event.name for event in span.events] == ["step-0", "step-1", "step-2"]
    assert span.events[0].timestamp == timestamp_ns(journaled[0])


def test_metrics_attributes(make_client: ClientFactory, exported: InMemorySpanExporter) -> None:
    """Scalar metrics keep their type; lists and objects become JSON text; None is left out."""
    client = make_client()
    with client.track_run("metrics", "job") as run:
        run.set_metrics(
            metrics_json={
                "count": 3,
                "ratio": 0.25,
                "name": "x",
                "flag": True,
                "none": None,
                "list": [1, 2],
                "obj": {"a": 1},
                "big": 2**70,
            }
        )
    attributes = dict(run_spans(exported)[run.run_id].attributes or {})
    metrics = {
        key.removeprefix("agent_telemetry.metrics."): value
        for key, value in attributes.items()
        if key.startswith("agent_telemetry.metrics.")
    }

    assert metrics == {
        "count": 3,
        "ratio": 0.25,
        "name": "x",
        "flag": True,
        "list": "[1,2]",
        "obj": '{"a":1}',
        "big": "1180591620717411303424",
    }


def test_run_attributes_surrogates() -> None:
    """A lone surrogate in a run field is escaped as the journal escapes it."""
    record = RunRecord(
        run_id="r", agent_name="a", job_type="j", start_time="2026-12-04T10:00:00+00:00"
    )
    record.input_summary = "bad \udc80 text"

    assert run_attributes(record)["agent_telemetry.input_summary"] == "bad \\udc80 text"


def test_async_run_span(make_client: ClientFactory, exported: InMemorySpanExporter) -> None:
    """A run of ``async with track_run`` gets its span when the block ends."""
    client = make_client()

    async def work() -> str:
        async with client.track_run("async-agent", "job") as run:
            await asyncio.sleep(0)
        return run.run_id

    run_id = asyncio.run(work())

    assert run_spans(exported)[run_id].name == "async-agent job"


_JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats()
    | st.text()
    | st.binary(max_size=8)
)
_PAYLOADS = st.dictionaries(
    st.text() | st.integers(),
    st.recursive(
        _JSON_SCALARS,
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=4), children, max_size=4)
        ),
        max_leaves=12,
    ),
    max_size=6,
)
_ATTRIBUTE_SCALARS = (str, bool, int, float)


@settings(max_examples=200, deadline=None)
@given(payload=_PAYLOADS)
def test_event_attributes_valid(payload: dict[Any, Any]) -> None:
    """Any payload flattens to non-empty UTF-8 keys and values OpenTelemetry accepts."""
    attributes = event_attributes(payload)

    for key, value in attributes.items():
        assert key
        key.encode("utf-8")
        if isinstance(value, tuple):
            assert len({type(item) for item in value}) <= 1
            assert all(type(item) in _ATTRIBUTE_SCALARS for item in value)
        else:
            assert type(value) in _ATTRIBUTE_SCALARS
        if isinstance(value, str):
            value.encode("utf-8")
        if type(value) is int:
            assert -(2**63) <= value < 2**63


# --- replay -------------------------------------------------------------------------------


def test_replay_equals_live(
    make_client: ClientFactory, exported: InMemorySpanExporter, app_provider: TracerProvider
) -> None:
    """A replay of the journal rebuilds every live span: ids, times, attributes, events."""
    client = make_client()
    with client.track_run("outer", "job", product="p") as outer:
        outer.log_event("awkward", AWKWARD_PAYLOAD)
        outer.set_metrics(items_discovered=2, metrics_json={"ratio": 0.5, "list": [1]})
        with client.track_run("inner", "step") as inner:
            inner.log_event("inner-event", {"n": 1})
    with pytest.raises(KeyError), client.track_run("failing", "job"):
        raise KeyError("missing")
    with app_provider.get_tracer("app").start_as_current_span("request"):
        client.end_run(client.start_run("in-app", "job"))
    with (
        trace.use_span(NonRecordingSpan(REMOTE_PARENT)),
        client.track_run("remote-parent", "job"),
        client.track_run("under-remote", "step"),
    ):
        pass
    client.end_run(client.start_run("orphan", "job", parent_run_id=OTHER_PROCESS_RUN))
    live = {run_id: comparable(span) for run_id, span in run_spans(exported).items()}

    assert len(live) == 7
    assert replayed(client) == live


def test_replay_skips_running(make_client: ClientFactory) -> None:
    """A run that has not ended gets no span in a replay and is counted as skipped."""
    client = make_client()
    client.start_run("open", "job")
    client.end_run(client.start_run("closed", "job"))

    result = replay_journal(JournalReader(client.config.ndjson_dir), InMemorySpanExporter())

    assert result.runs == 1
    assert result.skipped_running == 1


def test_replay_batches_and_limit(make_client: ClientFactory) -> None:
    """Replay exports in batches of batch_size, and limit keeps the runs that started last."""
    client = make_client()
    run_ids = [client.start_run("batched", "job") for _ in range(5)]
    for run_id in run_ids:
        client.end_run(run_id)
    exporter = InMemorySpanExporter()
    progress: list[tuple[int, int]] = []

    result = replay_journal(
        JournalReader(client.config.ndjson_dir),
        exporter,
        limit=4,
        batch_size=3,
        progress=lambda done, total: progress.append((done, total)),
    )
    sent = [
        (span.attributes or {})["agent_telemetry.run_id"] for span in exporter.get_finished_spans()
    ]

    assert result.runs == 4
    assert progress == [(3, 4), (4, 4)]
    assert sent == run_ids[1:]


def test_replay_event_limit(make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replay keeps the latest events up to OTEL_SPAN_EVENT_COUNT_LIMIT, as the SDK does."""
    client = make_client()
    with client.track_run("many-events", "job") as run:
        for number in range(5):
            run.log_event(f"step-{number}")
    monkeypatch.setenv("OTEL_SPAN_EVENT_COUNT_LIMIT", "2")
    exporter = InMemorySpanExporter()

    result = replay_journal(JournalReader(client.config.ndjson_dir), exporter)
    (span,) = exporter.get_finished_spans()

    assert [event.name for event in span.events] == ["step-3", "step-4"]
    assert result.events == 2


def test_replay_run_without_end_time(tmp_path: Path) -> None:
    """An ended run whose line has no end_time is skipped and counted, not raised."""
    journal = tmp_path / "journal"
    journal.mkdir()
    line = {
        "record_type": "run_end",
        "run_id": "20261204T100000000000Z-handmade-0123456789abcdef",
        "agent_name": "handmade",
        "job_type": "job",
        "start_time": "2026-12-04T10:00:00.000000+00:00",
        "status": "success",
        "schema_version": 1,
    }
    (journal / "events_20261204.ndjson").write_text(json.dumps(line) + "\n")
    exporter = InMemorySpanExporter()

    result = replay_journal(JournalReader(journal), exporter)

    assert result.runs == 0
    assert result.skipped_invalid == 1
    assert exporter.get_finished_spans() == ()


class _RaisingExporter(InMemorySpanExporter):
    """An exporter that accepts the first batch, then raises."""

    def export(self, spans: Any) -> Any:
        if self.get_finished_spans():
            raise ConnectionError("collector went away")
        return super().export(spans)


def test_replay_exporter_raises(make_client: ClientFactory) -> None:
    """An exporter that raises stops the replay with a ReplayError that counts the sent."""
    client = make_client()
    for _ in range(3):
        client.end_run(client.start_run("raising", "job"))

    with pytest.raises(ReplayError) as caught:
        replay_journal(JournalReader(client.config.ndjson_dir), _RaisingExporter(), batch_size=2)

    assert caught.value.done.runs == 2
    assert caught.value.total == 3
    assert caught.value.reason == "ConnectionError: collector went away"


# --- ids ----------------------------------------------------------------------------------


def test_ids_stable_and_distinct() -> None:
    """Ids depend on the run id alone, differ between runs, and are never zero."""
    first = "20261204T193417123456Z-stdlib-audit-3f9a2c1b7d4e5a60"
    second = "20261204T193417123457Z-stdlib-audit-3f9a2c1b7d4e5a60"

    assert run_span_id(first) == run_span_id(first)
    assert run_span_id(first) != run_span_id(second)
    assert run_trace_id(first) != run_trace_id(second)
    assert 0 < run_span_id(first) < 2**64
    assert 0 < run_trace_id(first) < 2**128
    assert format_span_id(run_trace_id(first) >> 64) != format_span_id(run_span_id(first))


def test_resolve_parents_chain() -> None:
    """A chain of runs shares the trace of its root, or of the root's stored parent."""
    parents = {"root": None, "mid": "root", "leaf": "mid", "app": None, "under": "app"}
    stored = {"app": SpanParent(7, 9)}

    resolved = resolve_parents(parents, stored, ["leaf", "under", "root"])

    assert resolved["root"] == SpanParent(run_trace_id("root"), None)
    assert resolved["leaf"] == SpanParent(run_trace_id("root"), run_span_id("mid"))
    assert resolved["under"] == SpanParent(7, run_span_id("app"))


def test_resolve_parents_cycle() -> None:
    """A cycle of parent run ids, as a damaged journal may hold, still resolves."""
    resolved = resolve_parents({"a": "b", "b": "a"}, {}, ["a"])

    assert resolved["a"].parent_span_id == run_span_id("b")


def test_context_payload_round_trip() -> None:
    """A SpanParent survives its otel.context payload, remote flag and tracestate too."""
    parents = [
        SpanParent(5, 6),
        SpanParent(5, 6, parent_is_remote=True, trace_state="vendor=abc"),
    ]

    for parent in parents:
        assert parse_context_payload(parent.to_payload()) == parent


def test_context_payload_loose_fields() -> None:
    """Optional fields of the wrong type are ignored, and the ids are kept."""
    payload = {
        "trace_id": "a" * 32,
        "parent_span_id": "b" * 16,
        "parent_is_remote": "yes",
        "trace_state": 7,
    }

    assert parse_context_payload(payload) == SpanParent(int("a" * 32, 16), int("b" * 16, 16))


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"trace_id": "0" * 32},
        {"trace_id": "ABC"},
        {"trace_id": "a" * 32, "parent_span_id": "0" * 16},
        {"trace_id": "a" * 32, "parent_span_id": 5},
    ],
)
def test_context_payload_invalid(payload: dict[str, Any]) -> None:
    """An otel.context payload with a missing, malformed or zero id is ignored."""
    assert parse_context_payload(payload) is None


# --- switch and faults --------------------------------------------------------------------


def test_config_otel_setting() -> None:
    """otel is off by default, set by TELEMETRY_OTEL, and an argument beats the variable."""
    assert TelemetryConfig(environ={}).otel is False
    assert TelemetryConfig(environ={"TELEMETRY_OTEL": "1"}).otel is True
    assert TelemetryConfig(otel=False, environ={"TELEMETRY_OTEL": "yes"}).otel is False
    assert TelemetryConfig(environ={"TELEMETRY_OTEL": "on"}).sources["otel"] == "environment"


def test_config_otel_invalid() -> None:
    """An invalid TELEMETRY_OTEL raises ConfigError naming the variable."""
    with pytest.raises(ConfigError, match="TELEMETRY_OTEL='maybe'"):
        TelemetryConfig(environ={"TELEMETRY_OTEL": "maybe"})


def test_bridge_off_by_default(tmp_path: Path) -> None:
    """Without otel, open_bridge returns None."""
    assert open_bridge(TelemetryConfig(data_dir=tmp_path, environ={})) is None


def test_sdk_disabled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """OTEL_SDK_DISABLED=true turns the bridge off, with an INFO line."""
    monkeypatch.setenv("OTEL_SDK_DISABLED", " TRUE ")
    with caplog.at_level(logging.INFO, logger="telemetry.otel"):
        bridge = open_bridge(TelemetryConfig(data_dir=tmp_path, otel=True, environ={}))

    assert bridge is None
    assert "OTEL_SDK_DISABLED is true" in caplog.text


class _FailingProcessor(SpanProcessor):
    """A span processor that raises when a span ends."""

    def on_end(self, span: ReadableSpan) -> None:
        raise RuntimeError("processor broke")


def test_processor_fault_logged(
    make_client: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A processor that raises is logged on telemetry.otel; the run is still stored."""
    broken = TracerProvider()
    broken.add_span_processor(_FailingProcessor())
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: broken)
    client = make_client()

    with caplog.at_level(logging.ERROR, logger="telemetry.otel"):
        run_id = client.start_run("faulty", "job")
        record = client.end_run(run_id)
    stored = client.get_stats()

    assert record is not None
    assert record.status == "success"
    assert stored["total_runs"] == 1
    assert f"failed to end the span of run {run_id}: RuntimeError: processor broke" in caplog.text


class _BrokenProvider(TracerProvider):
    """A provider whose get_tracer raises."""

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        raise RuntimeError("no tracer today")


def test_setup_fault_logged(
    make_client: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A provider that cannot give a tracer is logged once; runs are stored without spans."""
    broken = _BrokenProvider()
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: broken)
    client = make_client()

    with caplog.at_level(logging.ERROR, logger="telemetry.otel"):
        for _ in range(3):
            client.end_run(client.start_run("faulty", "job"))

    assert caplog.text.count("cannot set up OpenTelemetry") == 1
    assert client.get_stats()["total_runs"] == 3


def test_disabled_client_no_spans(
    make_client: ClientFactory, exported: InMemorySpanExporter
) -> None:
    """A disabled client makes no spans even with otel on."""
    client = make_client(enabled=False)
    client.end_run(client.start_run("off", "job"))

    assert exported.get_finished_spans() == ()


# --- attribute limits ---------------------------------------------------------------------


def sdk_full_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Return the SDK's warnings about attributes it dropped from a full attribute dict."""
    return [record for record in caplog.records if "Attributes dict is full" in record.message]


def truncation_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Return the bridge's warnings about attributes left out of a span or event."""
    return [
        record
        for record in caplog.records
        if record.name == "telemetry.otel" and "attributes were left out" in record.message
    ]


def test_many_metrics_keep_run_fields(
    make_client: ClientFactory, exported: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    """Metrics past the span limit are left out and counted; the run fields stay."""
    caplog.set_level(logging.WARNING)
    client = make_client()
    with client.track_run("many-metrics", "job") as run:
        run.set_metrics(metrics_json={f"m{number}": number for number in range(1000)})
    attributes = dict(run_spans(exported)[run.run_id].attributes or {})
    metrics = [key for key in attributes if key.startswith("agent_telemetry.metrics.")]
    run_fields = len(attributes) - len(metrics) - 1

    assert len(attributes) == 128
    assert attributes["agent_telemetry.run_id"] == run.run_id
    assert attributes["agent_telemetry.agent_name"] == "many-metrics"
    assert attributes["agent_telemetry.status"] == "success"
    assert metrics[0] == "agent_telemetry.metrics.m0"
    assert attributes["agent_telemetry.dropped_attributes_count"] == 1000 - len(metrics)
    assert len(metrics) == 127 - run_fields
    assert sdk_full_warnings(caplog) == []
    assert len(truncation_warnings(caplog)) == 1
    assert run.run_id in truncation_warnings(caplog)[0].message


def test_many_payload_keys_capped(
    make_client: ClientFactory, exported: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    """A payload past the event limit keeps its first keys and counts the rest, logged once
    per run."""
    caplog.set_level(logging.WARNING)
    client = make_client()
    with client.track_run("many-keys", "job") as run:
        run.log_event("rows", {f"col{number}": number for number in range(10_000)})
        run.log_event("rows", {f"col{number}": number for number in range(500)})
    events = run_spans(exported)[run.run_id].events
    first = dict(events[0].attributes or {})

    assert len(first) == 128
    assert list(first)[:2] == ["col0", "col1"]
    assert first["col126"] == 126
    assert first["agent_telemetry.dropped_attributes_count"] == 10_000 - 127
    assert dict(events[1].attributes or {})["agent_telemetry.dropped_attributes_count"] == 373
    assert sdk_full_warnings(caplog) == []
    assert len(truncation_warnings(caplog)) == 1
    assert "9873 attributes were left out" in truncation_warnings(caplog)[0].message


def test_attribute_limit_from_env(
    make_client: ClientFactory,
    exported: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """OTEL_ATTRIBUTE_COUNT_LIMIT caps the bridge's attributes; a replay caps them alike."""
    caplog.set_level(logging.WARNING)
    monkeypatch.setenv("OTEL_ATTRIBUTE_COUNT_LIMIT", "4")
    client = make_client()
    with client.track_run("small-limit", "job", trigger_type="cron") as run:
        run.log_event("rows", {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5})
        run.set_metrics(metrics_json={"m": 1})
    live = run_spans(exported)[run.run_id]
    attributes = dict(live.attributes or {})

    # The module's provider keeps 128 attributes: only the bridge's cap applies here.
    assert list(attributes) == [
        "agent_telemetry.run_id",
        "agent_telemetry.agent_name",
        "agent_telemetry.job_type",
        "agent_telemetry.dropped_attributes_count",
    ]
    assert dict(live.events[0].attributes or {}) == {
        "a": 1,
        "b": 2,
        "c": 3,
        "agent_telemetry.dropped_attributes_count": 2,
    }
    assert replayed(client) == {run.run_id: comparable(live)}


def test_replay_many_metrics_equals_live(
    make_client: ClientFactory, exported: InMemorySpanExporter
) -> None:
    """A replay keeps the same metrics and payload keys as the live span."""
    client = make_client()
    with client.track_run("many-metrics", "job") as run:
        run.log_event("rows", {f"col{number}": number for number in range(300)})
        run.set_metrics(metrics_json={f"m{number}": number for number in range(300)})
    live = {run_id: comparable(span) for run_id, span in run_spans(exported).items()}

    assert replayed(client) == live


def test_replay_event_limit_with_exception(
    make_client: ClientFactory, exported: InMemorySpanExporter
) -> None:
    """With a full event list, the exception event takes one place, live and in replay, and
    the replay counts only the events it sent."""
    client = make_client()
    run_id = client.start_run("full-events", "job")
    for number in range(300):
        client.log_event(run_id, f"step-{number}")
    client.end_run(run_id, "failed", error_summary="ValueError: late failure")
    live = run_spans(exported)[run_id]
    exporter = InMemorySpanExporter()

    result = replay_journal(JournalReader(client.config.ndjson_dir), exporter)
    (span,) = exporter.get_finished_spans()

    assert len(live.events) == 128
    assert live.events[-1].name == "exception"
    assert comparable(span) == comparable(live)
    assert result.events == 127


# --- OTLP headers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "headers", "invalid_positions"),
    [
        ("a=1,B=x%20y", {"a": "1", "b": "x y"}, []),
        (" a = 1 , , b=2 ", {"a": "1", "b": "2"}, []),
        ("Authorization: Bearer t", {}, [1]),
        ("a=b,=t", {"a": "b"}, [2]),
        ("t", {}, [1]),
        ("a=x%0Ay,b=2", {"b": "2"}, [1]),
        ("a b=1", {}, [1]),
        ("a=b=c", {"a": "b=c"}, []),
    ],
)
def test_otlp_headers_parse(
    text: str, headers: dict[str, str], invalid_positions: list[int]
) -> None:
    """otlp_headers decodes name=value entries and returns the position of each invalid one."""
    parsed = otlp_headers({"OTEL_EXPORTER_OTLP_HEADERS": text})

    assert parsed.variable == "OTEL_EXPORTER_OTLP_HEADERS"
    assert parsed.headers == headers
    assert [position for position, _ in parsed.invalid] == invalid_positions


def test_otlp_headers_traces_variable_wins() -> None:
    """OTEL_EXPORTER_OTLP_TRACES_HEADERS replaces OTEL_EXPORTER_OTLP_HEADERS when set."""
    parsed = otlp_headers(
        {"OTEL_EXPORTER_OTLP_HEADERS": "a=1", "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "b=2"}
    )

    assert parsed.variable == "OTEL_EXPORTER_OTLP_TRACES_HEADERS"
    assert parsed.headers == {"b": "2"}
