"""Records of agent-telemetry: runs, events, API payloads, and the id and time helpers.

A ``RunRecord`` carries the same fields as a row of the ``agent_runs`` index and as a run
line of the journal. Timestamps are ISO 8601 strings in UTC with microseconds and an
explicit offset, such as ``2026-12-04T19:34:17.123456+00:00``.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import orjson

from telemetry.encoding import make_jsonable

__all__ = [
    "FINAL_STATUSES",
    "SCHEMA_VERSION",
    "STATUSES",
    "APIPayload",
    "RunEvent",
    "RunRecord",
    "calculate_duration_ms",
    "generate_run_id",
    "get_iso8601_timestamp",
    "parse_timestamp",
]

SCHEMA_VERSION = 1
"""Version of the record layout, stored in every journal line and as the index's user_version."""

STATUSES = ("running", "success", "failed", "partial", "cancelled", "timeout", "abandoned")
FINAL_STATUSES = frozenset(STATUSES) - {"running"}

_T = TypeVar("_T", bound="_Record")


def get_iso8601_timestamp(moment: datetime.datetime | None = None) -> str:
    """Return ``moment`` (default: now) as ISO 8601 in UTC with microseconds and ``+00:00``.

    Raises:
        ValueError: ``moment`` is naive, so its offset from UTC is unknown, or it lies so
            close to year 1 or 9999 that it has no UTC equivalent.
    """
    if moment is None:
        return _now_text()
    if moment.utcoffset() is None:
        raise ValueError(f"naive datetime {moment!r}: pass an aware one, e.g. with tzinfo=UTC")
    try:
        utc = moment.astimezone(datetime.timezone.utc)
    except OverflowError:
        raise ValueError(f"datetime {moment!r} is outside the range of UTC datetimes") from None
    return utc.isoformat(timespec="microseconds")


# The current second and its text up to the seconds, such as "2026-12-04T19:34:17".
# Formatting it once a second cut a timestamp from about 3 us to under 1 us (timeit,
# CPython 3.11, 2-vCPU VM). The tuple is replaced as a whole, so it needs no lock.
_current_second: tuple[int, str] = (-1, "")


def _now_text() -> str:
    # The same form as datetime.now(timezone.utc).isoformat(timespec="microseconds").
    global _current_second
    second, microsecond = divmod(time.time_ns() // 1000, 1_000_000)
    cached_second, prefix = _current_second
    if second != cached_second:
        moment = datetime.datetime.fromtimestamp(second, datetime.timezone.utc)
        prefix = moment.isoformat()[:19]
        _current_second = (second, prefix)
    return f"{prefix}.{microsecond:06d}+00:00"


def parse_timestamp(value: str | datetime.datetime) -> datetime.datetime:
    """Parse an ISO 8601 timestamp with an offset (``Z`` accepted) into an aware datetime.

    Raises:
        ValueError: the text is not ISO 8601, or it has no UTC offset.
    """
    if isinstance(value, datetime.datetime):
        moment = value
    elif isinstance(value, str):
        text = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
        try:
            moment = datetime.datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(
                f"invalid timestamp {value!r}: expected ISO 8601 such as "
                "2026-12-04T19:34:17.123456+00:00"
            ) from None
    else:
        raise TypeError(f"timestamp must be a str or datetime, not {type(value).__name__}")
    if moment.utcoffset() is None:
        raise ValueError(f"timestamp {value!r} has no UTC offset: add one, e.g. +00:00")
    return moment


def calculate_duration_ms(start: str | datetime.datetime, end: str | datetime.datetime) -> int:
    """Return the milliseconds from ``start`` to ``end``, rounded, and 0 if end is earlier.

    Wall-clock times can step backwards, so a negative difference is reported as 0. The
    client measures live runs with a monotonic clock and uses this only for runs it did
    not start.

    Raises:
        ValueError: a timestamp cannot be parsed or has no UTC offset.
    """
    delta = parse_timestamp(end) - parse_timestamp(start)
    return max(0, round(delta.total_seconds() * 1000))


_UNSAFE_NAME_CHARACTERS = re.compile(r"[^a-z0-9]+")
_MAX_NAME_IN_ID = 40
_id_lock = threading.Lock()
_last_id_time = datetime.datetime.min.replace(tzinfo=datetime.timezone.utc)


def _reset_id_lock_in_child() -> None:
    # A fork while another thread holds the lock would leave it held forever in the child.
    global _id_lock
    _id_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_id_lock_in_child)


def generate_run_id(agent_name: str) -> str:
    """Return a new run id such as ``20261204T193417123456Z-stdlib-audit-3f9a2c1b7d4e5a60``.

    The id is the UTC start time to the microsecond, the agent name reduced to lower case
    letters, digits and hyphens (at most 40 characters), and 64 random bits. Ids sort by
    start time. Within one process they are strictly increasing, because a clock reading
    equal to or earlier than the previous one is moved one microsecond past it. The
    random part keeps ids from different processes and hosts apart. Every character is
    safe in file names and URLs.
    """
    global _last_id_time
    now = datetime.datetime.now(datetime.timezone.utc)
    with _id_lock:
        if now <= _last_id_time:
            now = _last_id_time + datetime.timedelta(microseconds=1)
        _last_id_time = now
    name = _UNSAFE_NAME_CHARACTERS.sub("-", str(agent_name).lower()).strip("-")
    name = name[:_MAX_NAME_IN_ID].rstrip("-") or "agent"
    return f"{now:%Y%m%dT%H%M%S%fZ}-{name}-{secrets.token_hex(8)}"


class _Record:
    """to_dict, to_json and from_dict shared by the record dataclasses."""

    _TYPES: ClassVar[dict[str, type]]

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a new dict of JSON-compatible values."""
        return {name: getattr(self, name) for name in _field_names(type(self))}

    def to_json(self) -> str:
        """Return the record as one line of JSON text, with no trailing newline.

        Values JSON cannot hold are converted as ``telemetry.encoding`` documents.
        """
        data, _ = make_jsonable(self.to_dict(), type(self).__name__)
        return orjson.dumps(data).decode("utf-8")

    @classmethod
    def from_dict(cls: type[_T], data: Mapping[str, Any]) -> _T:
        """Build a record from a mapping such as to_dict() or a journal line returns.

        Keys that are not fields, like a journal line's ``record_type``, are ignored.

        Raises:
            TypeError: ``data`` is not a mapping.
            ValueError: a required field is missing; the message names it.
        """
        if not isinstance(data, Mapping):
            raise TypeError(
                f"{cls.__name__}.from_dict expects a mapping, not {type(data).__name__}"
            )
        names = _field_name_set(cls)
        values = {key: value for key, value in data.items() if key in names}
        missing = [name for name in _required_field_names(cls) if name not in values]
        if missing:
            raise ValueError(f"{cls.__name__} data is missing the field {missing[0]!r}")
        return cls._normalise(values)

    @classmethod
    def _normalise(cls: type[_T], values: dict[str, Any]) -> _T:
        return cls(**values)


# Per class, because dataclasses.fields() builds a new tuple on every call. Filled on
# first use. Two threads that race store equal values, so no lock is needed.
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}
_FIELD_NAME_SETS: dict[type, frozenset[str]] = {}
_REQUIRED_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type[_Record]) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
        _FIELD_NAMES[cls] = names
    return names


def _field_name_set(cls: type[_Record]) -> frozenset[str]:
    names = _FIELD_NAME_SETS.get(cls)
    if names is None:
        names = frozenset(_field_names(cls))
        _FIELD_NAME_SETS[cls] = names
    return names


def _required_field_names(cls: type[_Record]) -> tuple[str, ...]:
    names = _REQUIRED_FIELD_NAMES.get(cls)
    if names is None:
        names = tuple(
            f.name
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )
        _REQUIRED_FIELD_NAMES[cls] = names
    return names


@dataclass(eq=True)
class RunRecord(_Record):
    """One run of an agent: a row of ``agent_runs`` and a run line of the journal.

    ``metrics_json`` is a dict here and in the journal, and JSON text in the index.
    """

    # identity
    run_id: str
    agent_name: str
    job_type: str
    start_time: str
    trigger_type: str = "cli"
    parent_run_id: str | None = None
    # outcome
    status: str = "running"
    end_time: str | None = None
    duration_ms: int | None = None
    error_summary: str | None = None
    error_details: str | None = None
    # work
    items_discovered: int = 0
    items_succeeded: int = 0
    items_failed: int = 0
    input_summary: str | None = None
    output_summary: str | None = None
    metrics_json: dict[str, Any] | None = None
    # business
    insight_id: str | None = None
    product: str | None = None
    platform: str | None = None
    product_family: str | None = None
    subdomain: str | None = None
    # source
    git_repo: str | None = None
    git_branch: str | None = None
    git_commit: str | None = None
    git_run_tag: str | None = None
    agent_version: str | None = None
    # host
    hostname: str | None = None
    pid: int | None = None
    # sync
    api_posted: bool = False
    api_posted_at: str | None = None
    api_retry_count: int = 0
    api_last_error: str | None = None
    # bookkeeping
    created_at: str | None = None
    updated_at: str | None = None
    schema_version: int = SCHEMA_VERSION

    # Fields a caller may set through start_run, set_metrics and end_run. The rest are
    # managed by the client: identity, timing, host, sync state and bookkeeping.
    CALLER_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {
            "parent_run_id",
            "error_summary",
            "error_details",
            "items_discovered",
            "items_succeeded",
            "items_failed",
            "input_summary",
            "output_summary",
            "metrics_json",
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
        }
    )
    INT_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"items_discovered", "items_succeeded", "items_failed"}
    )

    @property
    def is_final(self) -> bool:
        """Whether the run has ended, with any status other than running."""
        return self.status in FINAL_STATUSES

    @classmethod
    def _normalise(cls, values: dict[str, Any]) -> RunRecord:
        # The index stores metrics as JSON text and booleans as integers.
        metrics = values.get("metrics_json")
        if isinstance(metrics, (str, bytes)):
            try:
                values["metrics_json"] = orjson.loads(metrics) if metrics else None
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"RunRecord field metrics_json is not valid JSON: {exc}") from None
        if "api_posted" in values:
            values["api_posted"] = bool(values["api_posted"])
        return cls(**values)


@dataclass(eq=True)
class RunEvent(_Record):
    """Something that happened during a run, stored in the journal only."""

    run_id: str
    event_type: str
    timestamp: str
    payload: dict[str, Any] = field(default_factory=dict)
    agent_name: str | None = None
    schema_version: int = SCHEMA_VERSION


@dataclass(eq=True)
class APIPayload(_Record):
    """The body of a run posted to the API.

    It has the run's fields except the sync state (api_*) and the index's bookkeeping
    (created_at, updated_at). It keeps schema_version, so that a server can tell layouts
    apart.
    """

    run_id: str
    agent_name: str
    job_type: str
    start_time: str
    trigger_type: str = "cli"
    parent_run_id: str | None = None
    status: str = "running"
    end_time: str | None = None
    duration_ms: int | None = None
    error_summary: str | None = None
    error_details: str | None = None
    items_discovered: int = 0
    items_succeeded: int = 0
    items_failed: int = 0
    input_summary: str | None = None
    output_summary: str | None = None
    metrics_json: dict[str, Any] | None = None
    insight_id: str | None = None
    product: str | None = None
    platform: str | None = None
    product_family: str | None = None
    subdomain: str | None = None
    git_repo: str | None = None
    git_branch: str | None = None
    git_commit: str | None = None
    git_run_tag: str | None = None
    agent_version: str | None = None
    hostname: str | None = None
    pid: int | None = None
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def from_run_record(cls, record: RunRecord) -> APIPayload:
        """Return the payload for ``record``, with the same values for the fields it has."""
        names = _field_names(cls)
        values = {name: getattr(record, name) for name in names}
        if values["metrics_json"] is not None:
            values["metrics_json"] = dict(values["metrics_json"])
        return cls(**values)
