"""The mapping of runs and events onto OpenTelemetry span names, attributes and statuses.

docs/opentelemetry.md has the mapping table. Every value first goes through
``make_jsonable``, so a value that OpenTelemetry cannot hold (bytes, an integer past 64
bits, a lone surrogate, NaN) takes the form the journal stores. A run read back from the
journal therefore maps to the same attributes as the live run. This module imports nothing
from OpenTelemetry: attribute values are str, bool, int, float or tuples of one of them.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from typing import Any, TypeAlias

import orjson

from telemetry.encoding import make_jsonable
from telemetry.models import RunRecord, parse_timestamp

__all__ = [
    "ATTRIBUTE_PREFIX",
    "DROPPED_ATTRIBUTES",
    "ERROR_STATUSES",
    "EXCEPTION_EVENT",
    "IDENTITY_FIELDS",
    "METRICS_PREFIX",
    "RUN_FIELDS",
    "AttributeValue",
    "cap_attributes",
    "event_attributes",
    "exception_attributes",
    "identity_attributes",
    "run_attributes",
    "span_name",
    "span_status",
    "text",
    "timestamp_ns",
]

AttributeValue: TypeAlias = (
    str
    | bool
    | int
    | float
    | tuple[str, ...]
    | tuple[bool, ...]
    | tuple[int, ...]
    | tuple[float, ...]
)
"""An attribute value that every OpenTelemetry SDK version and OTLP backend accepts."""

ATTRIBUTE_PREFIX = "agent_telemetry."
METRICS_PREFIX = ATTRIBUTE_PREFIX + "metrics."
EXCEPTION_EVENT = "exception"
EMPTY_KEY = "(empty)"
DROPPED_ATTRIBUTES = ATTRIBUTE_PREFIX + "dropped_attributes_count"
"""The attribute that counts the attributes of a span or event left out by cap_attributes."""

# Statuses whose span has the status ERROR. A partial run did its work with some items
# failed: its span is OK, and its status attribute and item counts show the failures.
ERROR_STATUSES = frozenset({"failed", "cancelled", "timeout", "abandoned"})
# Statuses whose span gets an exception event. An abandoned run has no exception: its
# process exited or its client closed before end_run.
_EXCEPTION_STATUSES = frozenset({"failed", "cancelled", "timeout"})

IDENTITY_FIELDS = ("run_id", "parent_run_id", "agent_name", "job_type", "trigger_type")
"""Fields set when the span starts, so that a sampler can see them."""

RUN_FIELDS = (
    *IDENTITY_FIELDS,
    "status",
    "duration_ms",
    "error_summary",
    "items_discovered",
    "items_succeeded",
    "items_failed",
    "input_summary",
    "output_summary",
    "insight_id",
    "product",
    "platform",
    "product_family",
    "subdomain",
    "git_repo",
    "git_branch",
    "git_commit",
    "git_run_tag",
    "agent_version",
    "hostname",
    "pid",
)
"""Fields that become span attributes, each as ATTRIBUTE_PREFIX + its name. The others
are the span's times (start_time, end_time), its exception event (error_details), its
metrics attributes (metrics_json), or state that changes after the run ends (api_*,
created_at, updated_at, schema_version), which would make a replay differ."""

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_ONE_MICROSECOND = datetime.timedelta(microseconds=1)
# The last line of a Python traceback: the exception's type, then ": message" if any.
_EXCEPTION_LINE = re.compile(r"([A-Za-z_][\w.]*)(?::\s.*)?")


def text(value: str) -> str:
    """Return ``value`` with lone surrogates escaped, as the journal stores it."""
    converted, _ = make_jsonable(value, "text")
    return str(converted)


def span_name(record: RunRecord) -> str:
    """Return the span name of a run: its agent name and job type, such as ``nightly sync``."""
    return text(f"{record.agent_name} {record.job_type}")


def identity_attributes(record: RunRecord) -> dict[str, AttributeValue]:
    """Return the attributes of the fields that a run has from its start: IDENTITY_FIELDS."""
    values, _ = make_jsonable({name: getattr(record, name) for name in IDENTITY_FIELDS}, "run")
    return {ATTRIBUTE_PREFIX + name: value for name, value in values.items() if value is not None}


def run_attributes(record: RunRecord) -> dict[str, AttributeValue]:
    """Return the attributes of a run: RUN_FIELDS, then one per key of metrics_json.

    Fields that are None are left out. A metrics value that is a scalar keeps its type;
    a list or an object becomes its JSON text; None is left out.
    """
    values, _ = make_jsonable({name: getattr(record, name) for name in RUN_FIELDS}, "run")
    attributes: dict[str, AttributeValue] = {
        ATTRIBUTE_PREFIX + name: value for name, value in values.items() if value is not None
    }
    metrics, _ = make_jsonable(record.metrics_json or {}, "metrics_json")
    if isinstance(metrics, Mapping):
        for key, value in metrics.items():
            if value is None:
                continue
            key_text = str(key) or EMPTY_KEY
            if isinstance(value, (str, bool, int, float)):
                attributes[METRICS_PREFIX + key_text] = value
            else:
                attributes[METRICS_PREFIX + key_text] = _json_text(value)
    return attributes


def cap_attributes(
    attributes: dict[str, AttributeValue], limit: int | None
) -> tuple[dict[str, AttributeValue], int]:
    """Keep the first attributes that fit in ``limit``; return them and how many were left out.

    When there are more than ``limit`` attributes, the first ``limit - 1`` are kept and
    DROPPED_ATTRIBUTES, the count of those left out, takes the last place. The SDK would
    otherwise drop the oldest attributes, logging a WARNING for each. None is no limit.
    """
    if limit is None or len(attributes) <= limit:
        return attributes, 0
    fitting = max(limit - 1, 0)
    capped = dict(list(attributes.items())[:fitting])
    dropped = len(attributes) - fitting
    if limit > 0:
        capped[DROPPED_ATTRIBUTES] = dropped
    return capped, dropped


def event_attributes(payload: Mapping[str, Any]) -> dict[str, AttributeValue]:
    """Flatten an event payload into attributes.

    A nested object gives one attribute per value, named by the keys on the path joined
    with dots: ``{"a": {"b": 1}}`` gives ``a.b``. An empty object is the text ``{}``. A
    list whose items are all str, all bool, all int or all float stays a list; any other
    list becomes its JSON text. None is left out, and an empty key is named ``(empty)``.
    When two paths give the same name, as ``{"a.b": 1, "a": {"b": 2}}`` does, the later
    one gets the suffix ``#2`` (``#3``, and so on), as the journal does for keys.
    """
    converted, _ = make_jsonable(payload, "payload")
    attributes: dict[str, AttributeValue] = {}
    if isinstance(converted, Mapping):
        _flatten(converted, "", attributes)
    return attributes


def _flatten(values: Mapping[str, Any], prefix: str, out: dict[str, AttributeValue]) -> None:
    for key, value in values.items():
        name = prefix + (str(key) or EMPTY_KEY)
        if isinstance(value, Mapping):
            if value:
                _flatten(value, name + ".", out)
                continue
            attribute: AttributeValue | None = "{}"
        elif isinstance(value, (list, tuple)):
            attribute = _list_attribute(value)
        else:
            attribute = value
        if attribute is None:
            continue
        if name in out:
            name = _unique_name(name, out)
        out[name] = attribute


def _list_attribute(items: list[Any] | tuple[Any, ...]) -> AttributeValue:
    kinds = {type(item) for item in items}
    if len(kinds) <= 1 and kinds <= {str, bool, int, float}:
        return tuple(items)
    return _json_text(items)


def _unique_name(name: str, used_names: Mapping[str, Any]) -> str:
    number = 2
    while f"{name}#{number}" in used_names:
        number += 1
    return f"{name}#{number}"


def _json_text(value: Any) -> str:
    # make_jsonable has converted the value, so orjson can encode it.
    return orjson.dumps(value).decode("utf-8")


def span_status(record: RunRecord) -> tuple[bool, str | None]:
    """Return whether a run's span has the status ERROR, and the status description.

    The description is the run's error_summary, or its status when it has none. OK spans
    have no description.
    """
    if record.status not in ERROR_STATUSES:
        return False, None
    return True, text(record.error_summary or record.status)


def exception_attributes(record: RunRecord) -> dict[str, AttributeValue] | None:
    """Return the attributes of a run's exception event, or None when it gets none.

    A failed, cancelled or timed-out run with an error_summary or error_details gets the
    event, with the semantic convention's attributes. ``exception.message`` is the
    error_summary without the ``Type: `` that classify_exit puts in front of the message.
    ``exception.stacktrace`` is the error_details, and ``exception.type`` the
    type that the traceback in error_details names on its exception line, such as
    ``json.decoder.JSONDecodeError``. Each is left out when its source is missing.
    """
    if record.status not in _EXCEPTION_STATUSES:
        return None
    if not record.error_summary and not record.error_details:
        return None
    attributes: dict[str, AttributeValue] = {}
    exception_type = _exception_type(record.error_details, record.error_summary)
    if exception_type:
        attributes["exception.type"] = text(exception_type)
    if record.error_summary:
        attributes["exception.message"] = text(_message(record.error_summary, exception_type))
    if record.error_details:
        attributes["exception.stacktrace"] = text(record.error_details)
    return attributes


def _message(summary: str, exception_type: str | None) -> str:
    # classify_exit writes "QualName: message"; the type has its own attribute.
    name, separator, message = summary.partition(": ")
    if (
        exception_type
        and separator
        and (exception_type == name or exception_type.endswith("." + name))
    ):
        return message
    return summary


def _exception_type(details: str | None, summary: str | None) -> str | None:
    # The traceback's last line that names a type: "module.Name: message" or "Name". A
    # message of several lines puts more lines after it, so when the summary gives the
    # type's name (classify_exit writes "QualName: message"), the line must name it.
    if not details:
        return None
    expected = summary.split(":", 1)[0].strip() if summary else ""
    for line in reversed(details.splitlines()):
        match = _EXCEPTION_LINE.fullmatch(line)
        if match is None:
            continue
        name = match.group(1)
        if not expected or name == expected or name.endswith("." + expected):
            return name
    return None


def timestamp_ns(timestamp: str) -> int:
    """Return an ISO 8601 timestamp with an offset as nanoseconds since the Unix epoch.

    Raises:
        ValueError: the text is not ISO 8601 with an offset.
    """
    moment = parse_timestamp(timestamp)
    return (moment - _EPOCH) // _ONE_MICROSECOND * 1000
