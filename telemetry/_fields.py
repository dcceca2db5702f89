"""Checks of the run fields that callers pass to start_run, set_metrics and end_run."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from telemetry.encoding import INT64_MAX
from telemetry.models import FINAL_STATUSES, STATUSES, RunRecord

__all__ = ["check_fields", "check_final_status", "check_text"]


def check_text(value: object, name: str, *, optional: bool = False) -> None:
    """Raise TypeError unless ``value`` is a string (or None when ``optional``).

    Raises:
        TypeError: names the argument and the type that was given.
        ValueError: the string is empty or only spaces.
    """
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}: {value!r}")
    if not optional and not value.strip():
        raise ValueError(f"{name} must not be empty")


def check_fields(fields: Mapping[str, Any], caller: str) -> dict[str, Any]:
    """Return ``fields`` as a dict after checking names and types against RunRecord.

    Only RunRecord.CALLER_FIELDS may be set by a caller; the client manages the rest.
    Counts are integers from 0 to 2**63 - 1, ``metrics_json`` is a mapping or None, every
    other field is a string or None.

    Raises:
        TypeError: an unknown field name (the message lists the allowed names), or a value
            of the wrong type. Both name the field and the caller.
        ValueError: a count that is negative or past the 64-bit range of the index.
    """
    checked: dict[str, Any] = {}
    for name, value in fields.items():
        if name not in RunRecord.CALLER_FIELDS:
            allowed = ", ".join(sorted(RunRecord.CALLER_FIELDS))
            raise TypeError(f"{caller}() got an unknown field {name!r}; known fields: {allowed}")
        if name in RunRecord.INT_FIELDS:
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(
                    f"{caller}(): {name} must be an int, not {type(value).__name__}: {value!r}"
                )
            if not 0 <= value <= INT64_MAX:
                shown = value if value.bit_length() <= 64 else f"<{value.bit_length()}-bit int>"
                raise ValueError(
                    f"{caller}(): {name}={shown} is outside 0..{INT64_MAX}, "
                    "the range the index can store"
                )
        elif name == "metrics_json":
            if value is not None and not isinstance(value, Mapping):
                raise TypeError(
                    f"{caller}(): metrics_json must be a dict or None, "
                    f"not {type(value).__name__}: {value!r}"
                )
        elif value is not None and not isinstance(value, str):
            raise TypeError(
                f"{caller}(): {name} must be a str or None, not {type(value).__name__}: {value!r}"
            )
        checked[name] = value
    return checked


def check_final_status(status: object, caller: str) -> str:
    """Return ``status`` if it is a final run status.

    Raises:
        TypeError: ``status`` is not a string.
        ValueError: it is not one of the final statuses; the message lists them.
    """
    if not isinstance(status, str):
        raise TypeError(f"{caller}(): status must be a str, not {type(status).__name__}")
    if status not in FINAL_STATUSES:
        allowed = ", ".join(s for s in STATUSES if s in FINAL_STATUSES)
        raise ValueError(f"{caller}(): invalid status {status!r}; expected one of {allowed}")
    return status
