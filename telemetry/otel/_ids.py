"""Stable OpenTelemetry trace and span ids derived from run ids.

A run's span id is the first 8 bytes of SHA-256 over a fixed prefix and the run id. The
trace id of a run that starts a trace is the first 16 bytes of SHA-256 over another prefix
and the run id. The two prefixes keep a span id from being the first half of a trace id.
An id of all zero bytes is invalid in OpenTelemetry, so a digest that starts with zeros
gives the id 1 instead, which no other run id maps to except by the same one-in-2**64
chance.

Which run starts the trace is decided by ``SpanParent``: a run inside an application span
joins that span's trace, and a nested run joins its parent run's trace. This module
imports nothing from OpenTelemetry.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

__all__ = [
    "OTEL_CONTEXT_EVENT",
    "SpanParent",
    "format_span_id",
    "format_trace_id",
    "parse_context_payload",
    "resolve_parents",
    "run_span_id",
    "run_trace_id",
]

OTEL_CONTEXT_EVENT = "otel.context"
"""The event_type of the journal event that stores a run span's trace and parent, when the
run ids alone do not determine them."""

_SPAN_PREFIX = b"agent-telemetry span id\x00"
_TRACE_PREFIX = b"agent-telemetry trace id\x00"
_TRACE_ID_TEXT = re.compile(r"[0-9a-f]{32}")
_SPAN_ID_TEXT = re.compile(r"[0-9a-f]{16}")


def run_span_id(run_id: str) -> int:
    """Return the 64-bit span id of the run ``run_id``, never 0."""
    digest = hashlib.sha256(_SPAN_PREFIX + _utf8(run_id)).digest()
    return int.from_bytes(digest[:8], "big") or 1


def run_trace_id(run_id: str) -> int:
    """Return the 128-bit trace id of a trace that the run ``run_id`` starts, never 0."""
    digest = hashlib.sha256(_TRACE_PREFIX + _utf8(run_id)).digest()
    return int.from_bytes(digest[:16], "big") or 1


def format_trace_id(trace_id: int) -> str:
    """Return a trace id as 32 lower-case hex digits, the W3C traceparent form."""
    return f"{trace_id:032x}"


def format_span_id(span_id: int) -> str:
    """Return a span id as 16 lower-case hex digits, the W3C traceparent form."""
    return f"{span_id:016x}"


def _utf8(text: str) -> bytes:
    # Run ids from generate_run_id are ASCII. A journal edited by hand may hold others,
    # and "surrogatepass" keeps even a lone surrogate from raising.
    return text.encode("utf-8", "surrogatepass")


class SpanParent(NamedTuple):
    """The trace a run's span belongs to and the span it is a child of."""

    trace_id: int
    parent_span_id: int | None
    """The parent span's id, or None for the root span of a trace."""
    parent_is_remote: bool = False
    """Whether the parent span came from another process, through context propagation."""
    trace_state: str = ""
    """The W3C tracestate header of the parent's context, such as ``vendor=value``."""

    @classmethod
    def of_root_run(cls, run_id: str) -> SpanParent:
        """Return the parent of a run that starts its own trace: none."""
        return cls(run_trace_id(run_id), None)

    @classmethod
    def of_child_run(
        cls, parent_run_id: str, parent_trace_id: int, trace_state: str = ""
    ) -> SpanParent:
        """Return the parent of a run nested in the run ``parent_run_id``.

        ``trace_state`` is that of the parent run's span, which its children inherit.
        """
        return cls(parent_trace_id, run_span_id(parent_run_id), False, trace_state)

    def to_payload(self) -> dict[str, Any]:
        """Return the payload of an ``otel.context`` event that stores this parent.

        ``parent_is_remote`` and ``trace_state`` are left out when they are False and "".
        """
        payload: dict[str, Any] = {"trace_id": format_trace_id(self.trace_id)}
        if self.parent_span_id is not None:
            payload["parent_span_id"] = format_span_id(self.parent_span_id)
        if self.parent_is_remote:
            payload["parent_is_remote"] = True
        if self.trace_state:
            payload["trace_state"] = self.trace_state
        return payload


def parse_context_payload(payload: Mapping[str, Any]) -> SpanParent | None:
    """Return the SpanParent stored in an ``otel.context`` event, or None if it is invalid.

    An id that is not lower-case hex of the right length, or that is all zeros, makes the
    payload invalid. A ``parent_is_remote`` that is not a bool, or a ``trace_state`` that
    is not a str, is ignored.
    """
    trace_text = payload.get("trace_id")
    if not isinstance(trace_text, str) or not _TRACE_ID_TEXT.fullmatch(trace_text):
        return None
    trace_id = int(trace_text, 16)
    parent_text = payload.get("parent_span_id")
    parent_span_id = None
    if parent_text is not None:
        if not isinstance(parent_text, str) or not _SPAN_ID_TEXT.fullmatch(parent_text):
            return None
        parent_span_id = int(parent_text, 16)
    if trace_id == 0 or parent_span_id == 0:
        return None
    is_remote = payload.get("parent_is_remote")
    trace_state = payload.get("trace_state")
    return SpanParent(
        trace_id,
        parent_span_id,
        is_remote if isinstance(is_remote, bool) else False,
        trace_state if isinstance(trace_state, str) else "",
    )


def resolve_parents(
    parent_run_ids: Mapping[str, str | None],
    stored: Mapping[str, SpanParent],
    run_ids: list[str],
) -> dict[str, SpanParent]:
    """Return the SpanParent of each of ``run_ids``, by the rule the live bridge follows.

    Args:
        parent_run_ids: run id to parent_run_id, for every run known.
        stored: run id to the SpanParent of its ``otel.context`` event, where it has one.
        run_ids: the runs to resolve.

    A run's stored parent wins. Otherwise a run with a parent run is a child of that run's
    span, in that run's trace, and a run without one starts its own trace. A parent run
    that is not in ``parent_run_ids`` is taken to start its own trace. A cycle of parent
    run ids, which only a damaged journal can hold, is cut where the walk up from a run
    meets a run it has passed, and that run is taken to start its own trace.
    """
    resolved: dict[str, SpanParent] = {}
    for run_id in run_ids:
        _resolve(run_id, parent_run_ids, stored, resolved)
    return {run_id: resolved[run_id] for run_id in run_ids}


def _resolve(
    run_id: str,
    parent_run_ids: Mapping[str, str | None],
    stored: Mapping[str, SpanParent],
    resolved: dict[str, SpanParent],
) -> SpanParent:
    # Walks up to the first run whose parent is known, then resolves the chain downwards,
    # without recursion, because a chain may be longer than Python's recursion limit.
    chain: list[str] = []
    seen: set[str] = set()
    current: str | None = run_id
    known: SpanParent | None = None
    while current is not None and current not in resolved:
        if current in stored:
            known = stored[current]
            resolved[current] = known
            break
        if current in seen or current not in parent_run_ids:
            break
        seen.add(current)
        chain.append(current)
        current = parent_run_ids[current]

    for child in reversed(chain):
        parent_run_id = parent_run_ids[child]
        if parent_run_id is None or parent_run_id == child:
            resolved[child] = SpanParent.of_root_run(child)
            continue
        # A parent that is not resolved is unknown, or closes a cycle here.
        parent = resolved.get(parent_run_id)
        if parent is None:
            resolved[child] = SpanParent.of_child_run(parent_run_id, run_trace_id(parent_run_id))
        else:
            resolved[child] = SpanParent.of_child_run(
                parent_run_id, parent.trace_id, parent.trace_state
            )
    if run_id not in resolved:
        # run_id itself is not a known run: it starts its own trace.
        resolved[run_id] = SpanParent.of_root_run(run_id)
    return resolved[run_id]
