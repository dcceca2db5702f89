"""Conversion of arbitrary Python values into values that orjson can encode losslessly.

The journal, the index and the API body all take their JSON from ``make_jsonable``, so a
value has one stored form everywhere. Values that JSON cannot hold are stored as follows;
each conversion is reported as a ``ConversionIssue`` naming the field:

============================  ==========================================================
value                         stored as
============================  ==========================================================
float NaN, +inf, -inf         the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``
int outside signed 64 bits    its decimal digits as a string, e.g. ``"1180591620717411303424"``
str with a lone surrogate     the string with each surrogate escaped as ``\\udXXX`` text
bytes, bytearray, memoryview  ``"base64:"`` followed by the standard base64 of the bytes
set, frozenset                a list, sorted when the items can be compared
namedtuple                    an object of its fields
dataclass instance            an object of its fields, each converted by these rules
decimal.Decimal               its string form, e.g. ``"3.14"``
os.PathLike (pathlib.Path)    its file system path as a string
non-string dict key           the key's JSON text (``1`` -> ``"1"``) or its str()
any other object              its repr(), e.g. ``"<object object at 0x7f...>"``
============================  ==========================================================

This module imports nothing else from the project, so models can use it.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import decimal
import enum
import math
import os
import uuid
from collections.abc import Mapping
from typing import Any, NamedTuple

import orjson

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "ConversionIssue",
    "dumps",
    "make_jsonable",
]

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
NAN_TEXT = "NaN"
POSITIVE_INFINITY_TEXT = "Infinity"
NEGATIVE_INFINITY_TEXT = "-Infinity"
BYTES_PREFIX = "base64:"

# Types that orjson serializes natively and that need no walk of their own.
_NATIVE_SCALARS = (
    type(None),
    bool,
    datetime.datetime,
    datetime.date,
    datetime.time,
    uuid.UUID,
)


class ConversionIssue(NamedTuple):
    """One value that was stored in a converted form."""

    path: str
    """Where the value sits, such as ``payload.items[3]`` or ``payload.<key 2>``."""
    reason: str
    """What was converted and into what, such as ``float nan stored as "NaN"``."""


def make_jsonable(value: Any, path: str) -> tuple[Any, list[ConversionIssue]]:
    """Return ``value`` converted for orjson by the rules of this module, and the issues.

    Containers that need no change are returned as they are, not copied. ``path`` names
    the field in the issues (``payload``, ``metrics_json``). Never raises for any value,
    including self-referencing containers, which are cut with a marker string.
    """
    issues: list[ConversionIssue] = []
    converted = _convert(value, path, issues, set())
    return converted, issues


def dumps(value: Any, path: str) -> tuple[bytes, list[ConversionIssue]]:
    """Encode ``value`` as JSON bytes after make_jsonable, and return them with the issues."""
    converted, issues = make_jsonable(value, path)
    return orjson.dumps(converted), issues


def _convert(value: Any, path: str, issues: list[ConversionIssue], active: set[int]) -> Any:
    kind = type(value)
    if kind is str:
        return _convert_str(value, path, issues)
    if kind is int:
        return _convert_int(value, path, issues)
    if kind is float:
        return _convert_float(value, path, issues)
    if isinstance(value, _NATIVE_SCALARS):
        return value
    if isinstance(value, enum.Enum):
        return _convert(value.value, path, issues, active)

    if id(value) in active:
        issues.append(ConversionIssue(path, "reference cycle cut"))
        return "<cycle>"
    active.add(id(value))
    try:
        return _convert_container(value, path, issues, active)
    finally:
        active.discard(id(value))


def _convert_container(
    value: Any, path: str, issues: list[ConversionIssue], active: set[int]
) -> Any:
    if isinstance(value, Mapping):
        return _convert_mapping(value, path, issues, active)
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        issues.append(ConversionIssue(path, f"namedtuple {type(value).__name__} stored as object"))
        return _convert_mapping(value._asdict(), path, issues, active)
    if isinstance(value, (list, tuple)):
        return _convert_sequence(value, path, issues, active)
    if isinstance(value, (set, frozenset)):
        issues.append(ConversionIssue(path, f"{type(value).__name__} stored as list"))
        items = _convert_sequence(list(value), path, issues, active)
        try:
            return sorted(items)
        except TypeError:
            return items
    if isinstance(value, (bytes, bytearray, memoryview)):
        issues.append(ConversionIssue(path, f"{type(value).__name__} stored as base64 text"))
        return BYTES_PREFIX + base64.b64encode(bytes(value)).decode("ascii")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return _convert_mapping(fields, path, issues, active)
    if isinstance(value, decimal.Decimal):
        issues.append(ConversionIssue(path, "Decimal stored as string"))
        return str(value)
    if isinstance(value, os.PathLike):
        issues.append(ConversionIssue(path, f"{type(value).__name__} stored as string"))
        return _convert_str(str(os.fspath(value)), path, issues)
    if isinstance(value, str):
        return _convert_str(str(value), path, issues)
    if isinstance(value, int):
        return _convert_int(int(value), path, issues)
    if isinstance(value, float):
        return _convert_float(float(value), path, issues)

    issues.append(ConversionIssue(path, f"{type(value).__name__} stored as its repr()"))
    return _safe_repr(value, path, issues)


def _convert_mapping(
    value: Mapping[Any, Any], path: str, issues: list[ConversionIssue], active: set[int]
) -> dict[str, Any]:
    changed = type(value) is not dict
    result: dict[str, Any] = {}
    for index, (key, item) in enumerate(value.items()):
        new_key = _convert_key(key, path, index, issues)
        new_item = _convert(item, f"{path}.{new_key}", issues, active)
        changed = changed or new_key is not key or new_item is not item
        result[new_key] = new_item
    return result if changed else value  # type: ignore[return-value]


def _convert_sequence(
    value: list[Any] | tuple[Any, ...], path: str, issues: list[ConversionIssue], active: set[int]
) -> list[Any] | tuple[Any, ...]:
    changed = type(value) not in (list, tuple)
    result = []
    for index, item in enumerate(value):
        new_item = _convert(item, f"{path}[{index}]", issues, active)
        changed = changed or new_item is not item
        result.append(new_item)
    return result if changed else value


def _convert_key(key: Any, path: str, index: int, issues: list[ConversionIssue]) -> str:
    if type(key) is str:
        return _convert_str(key, f"{path}.<key {index}>", issues)
    if isinstance(key, bool) or key is None:
        text = orjson.dumps(key).decode()
    elif isinstance(key, (int, float)) and not isinstance(key, bool):
        text = repr(key) if isinstance(key, float) else str(int(key))
    else:
        text = _safe_repr(key, path, issues) if not isinstance(key, str) else str(key)
    issues.append(ConversionIssue(f"{path}.<key {index}>", f"{type(key).__name__} key stored as string"))
    return _convert_str(text, f"{path}.<key {index}>", issues)


def _convert_str(value: str, path: str, issues: list[ConversionIssue]) -> str:
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        issues.append(ConversionIssue(path, "lone surrogate stored as \\uXXXX text"))
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def _convert_int(value: int, path: str, issues: list[ConversionIssue]) -> int | str:
    if INT64_MIN <= value <= INT64_MAX:
        return value
    issues.append(ConversionIssue(path, "integer outside 64 bits stored as string"))
    return str(value)


def _convert_float(value: float, path: str, issues: list[ConversionIssue]) -> float | str:
    if math.isfinite(value):
        return value
    if math.isnan(value):
        text = NAN_TEXT
    else:
        text = POSITIVE_INFINITY_TEXT if value > 0 else NEGATIVE_INFINITY_TEXT
    issues.append(ConversionIssue(path, f"float {value!r} stored as {text!r}"))
    return text


def _safe_repr(value: Any, path: str, issues: list[ConversionIssue]) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ must not break the agent
        text = f"<{type(value).__name__} object; repr() raised {type(exc).__name__}>"
    return _convert_str(text, path, issues)
