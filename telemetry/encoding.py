"""Conversion of arbitrary Python values into values that orjson can encode losslessly.

The journal, the index and the API body all take their JSON from ``make_jsonable``, so a
value has one stored form everywhere. Values that JSON cannot hold are stored as follows;
each conversion is reported as a ``ConversionIssue`` naming the field:

============================  ==========================================================
value                         stored as
============================  ==========================================================
float NaN, +inf, -inf         the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``
int outside signed 64 bits    its decimal digits as a string, e.g. ``"1180591620717411303424"``,
                              or ``hex()`` text (``"0x..."``) past 4300 digits
str with a lone surrogate     the string with each surrogate escaped as ``\\udXXX`` text
bytes, bytearray, memoryview  ``"base64:"`` followed by the standard base64 of the bytes
set, frozenset                a list, sorted when the items can be compared
namedtuple                    an object of its fields
dataclass instance            an object of its fields, each converted by these rules
decimal.Decimal               its string form, e.g. ``"3.14"``
datetime, date, time          ISO 8601 text from isoformat(), with no issue reported
uuid.UUID                     its hex form with hyphens, with no issue reported
os.PathLike (pathlib.Path)    its file system path as a string
non-string dict key           the key's JSON text (``1`` -> ``"1"``) or its repr()
any other object              its repr(), e.g. ``"<object object at 0x7f...>"``
a container nested too deep   the string ``"<nested too deep>"`` past MAX_DEPTH levels
a container inside itself     the string ``"<cycle>"``
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
    "int_to_text",
    "make_jsonable",
]

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
NAN_TEXT = "NaN"
POSITIVE_INFINITY_TEXT = "Infinity"
NEGATIVE_INFINITY_TEXT = "-Infinity"
BYTES_PREFIX = "base64:"

# Containers nested deeper than this are cut. orjson rejects more than 254 levels, and
# recursion this deep would come close to Python's own recursion limit.
MAX_DEPTH = 100

_TIME_TYPES = (datetime.datetime, datetime.date, datetime.time)


class ConversionIssue(NamedTuple):
    """One value that was stored in a converted form."""

    path: str
    """The location of the value, such as ``payload.items[3]`` or ``payload.<key 2>``."""
    reason: str
    """The conversion applied, such as ``float nan stored as "NaN"``."""


def make_jsonable(value: Any, path: str) -> tuple[Any, list[ConversionIssue]]:
    """Return ``value`` converted for orjson by the rules of this module, and the issues.

    Containers that need no change are returned as they are, not copied. ``path`` names
    the field in the issues (``payload``, ``metrics_json``). Never raises for any value,
    including self-referencing containers, which are cut with a marker string.
    """
    try:
        if _is_plain(value, 0):
            return value, []
    except RuntimeError:
        # Another thread changed a container during the check: the full conversion below
        # works on a snapshot of it.
        pass
    issues: list[ConversionIssue] = []
    converted = _convert(value, path, issues, [])
    return converted, issues


def _is_plain(value: Any, depth: int) -> bool:
    """Return whether ``_convert`` would return ``value`` itself and report no issue.

    A fast path for the usual payload of JSON types only, which it accepts without
    building a path string per item. It accepts exact built-in types only, so it never runs
    code of the caller's classes. ``depth`` counts the containers around ``value``, and a
    cycle is rejected once it passes MAX_DEPTH, which leaves it to ``_convert`` to cut.

    Raises:
        RuntimeError: another thread changed a dict while it was read.
    """
    if _is_plain_scalar(value):
        return True
    if depth >= MAX_DEPTH:
        return False
    kind = type(value)
    depth += 1
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or not (key.isascii() or _is_utf8(key)):
                return False
            # ASCII text and None are the usual items: checked here, they save a call.
            if type(item) is str and item.isascii():
                continue
            if item is not None and not _is_plain_scalar(item) and not _is_plain(item, depth):
                return False
        return True
    if kind is list or kind is tuple:
        for item in value:
            if not _is_plain_scalar(item) and not _is_plain(item, depth):
                return False
        return True
    return False


def _is_plain_scalar(value: Any) -> bool:
    # Whether value is a JSON scalar that _convert keeps as it is. False for a container.
    kind = type(value)
    if kind is str:
        return value.isascii() or _is_utf8(value)
    if kind is int:
        number: int = value
        return INT64_MIN <= number <= INT64_MAX
    return value is None or kind is bool or (kind is float and math.isfinite(value))


def _is_utf8(value: str) -> bool:
    # False when the string has a lone surrogate, which UTF-8 cannot encode.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def dumps(value: Any, path: str) -> tuple[bytes, list[ConversionIssue]]:
    """Encode ``value`` as JSON bytes after make_jsonable, and return them with the issues."""
    converted, issues = make_jsonable(value, path)
    return orjson.dumps(converted), issues


def _convert(value: Any, path: str, issues: list[ConversionIssue], active: list[Any]) -> Any:
    kind = type(value)
    if kind is str:
        return _convert_str(value, path, issues)
    if kind is int:
        return _convert_int(value, path, issues)
    if kind is float:
        return _convert_float(value, path, issues)
    if value is None or kind is bool:
        return value
    try:
        return _convert_other(value, path, issues, active)
    except Exception as exc:
        # User code runs here (__fspath__, __iter__, __class__, properties), and a shared
        # container may change under another thread: the value is stored as its repr().
        issues.append(
            ConversionIssue(path, f"conversion raised {type(exc).__name__}; stored as repr()")
        )
        return _safe_repr(value, path, issues)


def _convert_other(value: Any, path: str, issues: list[ConversionIssue], active: list[Any]) -> Any:
    if isinstance(value, _TIME_TYPES):
        return _convert_time(value, path, issues)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, enum.Enum):
        return _convert(value.value, path, issues, active)

    if len(active) >= MAX_DEPTH:
        issues.append(ConversionIssue(path, f"nesting past {MAX_DEPTH} levels cut"))
        return "<nested too deep>"
    if any(outer is value for outer in active):
        issues.append(ConversionIssue(path, "reference cycle cut"))
        return "<cycle>"
    active.append(value)
    try:
        return _convert_container(value, path, issues, active)
    finally:
        active.pop()


def _convert_container(
    value: Any, path: str, issues: list[ConversionIssue], active: list[Any]
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
    value: Mapping[Any, Any], path: str, issues: list[ConversionIssue], active: list[Any]
) -> dict[str, Any]:
    changed = type(value) is not dict
    result: dict[str, Any] = {}
    # A snapshot of the items, because another thread may change a shared dict meanwhile.
    for index, (key, item) in enumerate(list(value.items())):
        new_key = _convert_key(key, path, index, issues)
        if new_key in result:
            new_key = _unique_key(new_key, result, path, issues)
        new_item = _convert(item, f"{path}.{new_key}", issues, active)
        changed = changed or new_key is not key or new_item is not item
        result[new_key] = new_item
    return result if changed else value  # type: ignore[return-value]


def _convert_sequence(
    value: list[Any] | tuple[Any, ...], path: str, issues: list[ConversionIssue], active: list[Any]
) -> list[Any] | tuple[Any, ...]:
    changed = type(value) not in (list, tuple)
    result = []
    for index, item in enumerate(list(value)):
        new_item = _convert(item, f"{path}[{index}]", issues, active)
        changed = changed or new_item is not item
        result.append(new_item)
    return result if changed else value


def _convert_key(key: Any, path: str, index: int, issues: list[ConversionIssue]) -> str:
    key_path = f"{path}.<key {index}>"
    if type(key) is str:
        return _convert_str(key, key_path, issues)
    if isinstance(key, bool) or key is None:
        text = orjson.dumps(key).decode()
    elif isinstance(key, int):
        text = int_to_text(int(key))
    elif isinstance(key, float):
        text = repr(float(key))
    elif isinstance(key, str):
        text = str(key)
    else:
        text = _safe_repr(key, key_path, issues)
    issues.append(ConversionIssue(key_path, f"{type(key).__name__} key stored as string"))
    return _convert_str(text, key_path, issues)


def _unique_key(key: str, taken: dict[str, Any], path: str, issues: list[ConversionIssue]) -> str:
    # Two keys can convert to the same string ({1: .., "1": ..}); the later one gets a
    # numbered suffix so that neither value is lost.
    number = 2
    while f"{key}#{number}" in taken:
        number += 1
    unique = f"{key}#{number}"
    issues.append(ConversionIssue(f"{path}.{unique}", f"key {key!r} repeated after conversion"))
    return unique


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
    return int_to_text(value)


def int_to_text(value: int) -> str:
    """Return the decimal digits of ``value``, or its hex form past Python's digit limit.

    Python refuses decimal conversion of integers over 4300 digits by default
    (sys.set_int_max_str_digits), but hex() has no such limit and is exact too.
    """
    try:
        return str(value)
    except ValueError:
        return hex(value)


def _convert_float(value: float, path: str, issues: list[ConversionIssue]) -> float | str:
    if math.isfinite(value):
        return value
    if math.isnan(value):
        text = NAN_TEXT
    else:
        text = POSITIVE_INFINITY_TEXT if value > 0 else NEGATIVE_INFINITY_TEXT
    issues.append(ConversionIssue(path, f"float {value!r} stored as {text!r}"))
    return text


def _convert_time(
    value: datetime.datetime | datetime.date | datetime.time,
    path: str,
    issues: list[ConversionIssue],
) -> str:
    # Converted here rather than by orjson, which rejects subclasses and times with a
    # tzinfo, and crashed (orjson 3.13.0) on a tzinfo whose utcoffset() raises.
    try:
        return value.isoformat()
    except Exception as exc:
        issues.append(
            ConversionIssue(path, f"{type(value).__name__}.isoformat() raised {type(exc).__name__}")
        )
        return _safe_repr(value, path, issues)


def _safe_repr(value: Any, path: str, issues: list[ConversionIssue]) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ must not break the agent
        text = f"<{type(value).__name__} object; repr() raised {type(exc).__name__}>"
    return _convert_str(text, path, issues)
