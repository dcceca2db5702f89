"""Decoding OTLP/HTTP trace requests that a ScriptedServer received, for the OTel tests.

The exporter POSTs ExportTraceServiceRequest messages in protobuf to ``/v1/traces``. The
functions here decode them with the opentelemetry-proto classes into plain values, so
tests compare spans from the wire with spans from the in-memory exporter.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from http_server import RecordedRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.sdk.trace import ReadableSpan

__all__ = ["WireSpan", "decode_requests", "from_readable", "spans_by_name"]

TRACES_PATH = "/v1/traces"
# Bit of the OTLP Span.flags field that is set when the parent span is remote.
_PARENT_IS_REMOTE = 0x200


@dataclass(frozen=True)
class WireSpan:
    """The fields of a span that live export and replay must agree on."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    """The OTLP enum value: 1 is SPAN_KIND_INTERNAL."""
    start_ns: int
    end_ns: int
    attributes: tuple[tuple[str, Any], ...]
    events: tuple[tuple[str, int, tuple[tuple[str, Any], ...]], ...]
    status_code: int
    """The OTLP enum value: 0 unset, 1 OK, 2 ERROR."""
    status_message: str
    scope: str
    trace_state: str
    """The W3C tracestate header, "" when there is none."""
    parent_is_remote: bool
    resource: tuple[tuple[str, Any], ...] = ()

    def attribute(self, key: str) -> Any:
        """Return the value of attribute ``key``; KeyError if it is missing."""
        return dict(self.attributes)[key]


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(item) for item in value.array_value.values)
    if kind == "kvlist_value":
        return {item.key: _value(item.value) for item in value.kvlist_value.values}
    if kind is None:
        return None
    return getattr(value, kind)


def _attributes(items: Iterable[KeyValue]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((item.key, _value(item.value)) for item in items))


def decode_requests(requests: Iterable[RecordedRequest]) -> list[WireSpan]:
    """Decode the spans of every POST to /v1/traces in ``requests``, in order received."""
    spans: list[WireSpan] = []
    for request in requests:
        if request.method != "POST" or request.path != TRACES_PATH:
            continue
        body = request.body
        if request.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        for resource_spans in message.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(
                        WireSpan(
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            name=span.name,
                            kind=span.kind,
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                            attributes=_attributes(span.attributes),
                            events=tuple(
                                (event.name, event.time_unix_nano, _attributes(event.attributes))
                                for event in span.events
                            ),
                            status_code=span.status.code,
                            status_message=span.status.message,
                            scope=scope_spans.scope.name,
                            trace_state=span.trace_state,
                            parent_is_remote=bool(span.flags & _PARENT_IS_REMOTE),
                            resource=resource,
                        )
                    )
    return spans


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def from_readable(span: ReadableSpan) -> WireSpan:
    """Return the WireSpan of a span from the SDK, as the OTLP encoding would carry it."""
    context = span.context
    assert context is not None
    parent = span.parent
    return WireSpan(
        trace_id=f"{context.trace_id:032x}",
        span_id=f"{context.span_id:016x}",
        parent_span_id="" if parent is None else f"{parent.span_id:016x}",
        name=span.name,
        kind=span.kind.value + 1,
        start_ns=span.start_time or 0,
        end_ns=span.end_time or 0,
        attributes=tuple(sorted((k, _plain(v)) for k, v in (span.attributes or {}).items())),
        events=tuple(
            (
                event.name,
                event.timestamp,
                tuple(sorted((k, _plain(v)) for k, v in (event.attributes or {}).items())),
            )
            for event in span.events
        ),
        status_code=span.status.status_code.value,
        status_message=span.status.description or "",
        scope=span.instrumentation_scope.name if span.instrumentation_scope else "",
        trace_state=context.trace_state.to_header(),
        parent_is_remote=parent is not None and parent.is_remote,
        resource=tuple(sorted(span.resource.attributes.items())),
    )


def spans_by_name(spans: Iterable[WireSpan]) -> dict[str, WireSpan]:
    """Return the spans keyed by name; the names in a test are unique."""
    return {span.name: span for span in spans}
