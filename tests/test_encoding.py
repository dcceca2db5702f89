"""Tests for telemetry.encoding: the stored form of values that JSON cannot hold."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import enum
import pathlib
import re
import subprocess
import sys
import uuid
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from telemetry.encoding import ConversionIssue, dumps, make_jsonable

Point = collections.namedtuple("Point", ["x", "y"])


@dataclasses.dataclass
class Blob:
    name: str
    data: bytes


class Colour(enum.Enum):
    RED = "red"


def encode(value: Any) -> tuple[Any, list[str]]:
    """Encode ``{"x": value}`` at path "payload" and return the decoded JSON and issue paths."""
    converted, issues = make_jsonable({"x": value}, "payload")
    return orjson.loads(orjson.dumps(converted)), [issue.path for issue in issues]


# --- awkward values -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        pytest.param("a\ud800b", "a\\ud800b", id="lone-surrogate"),
        pytest.param("\udfff", "\\udfff", id="lone-low-surrogate"),
        pytest.param(2**70, "1180591620717411303424", id="int-2**70"),
        pytest.param(2**63, "9223372036854775808", id="int64-max+1"),
        pytest.param(-(2**63) - 1, "-9223372036854775809", id="int64-min-1"),
        pytest.param(float("nan"), "NaN", id="nan"),
        pytest.param(float("inf"), "Infinity", id="inf"),
        pytest.param(float("-inf"), "-Infinity", id="-inf"),
        pytest.param({3, 1, 2}, [1, 2, 3], id="set"),
        pytest.param(frozenset({"b", "a"}), ["a", "b"], id="frozenset"),
        pytest.param(b"\x00\xff", "base64:AP8=", id="bytes"),
        pytest.param(bytearray(b"hi"), "base64:aGk=", id="bytearray"),
        pytest.param(memoryview(b"hi"), "base64:aGk=", id="memoryview"),
        pytest.param(Point(1, "two"), {"x": 1, "y": "two"}, id="namedtuple"),
        pytest.param(decimal.Decimal("3.14"), "3.14", id="decimal"),
        pytest.param(decimal.Decimal("NaN"), "NaN", id="decimal-nan"),
        pytest.param(pathlib.Path("/tmp/a b/ü.txt"), "/tmp/a b/ü.txt", id="path"),
    ],
)
def test_awkward_value(value: Any, stored: Any) -> None:
    """A value JSON cannot hold is stored in its documented form with one issue at its path."""
    decoded, paths = encode(value)

    assert decoded == {"x": stored}
    assert paths == ["payload.x"]


def test_awkward_dataclass_with_bytes() -> None:
    """A dataclass becomes an object of its fields, and only its bytes field is an issue."""
    decoded, paths = encode(Blob("b", b"ab"))

    assert decoded == {"x": {"name": "b", "data": "base64:YWI="}}
    assert paths == ["payload.x.data"]


def test_awkward_object() -> None:
    """An arbitrary object is stored as its repr()."""
    decoded, paths = encode(object())

    assert re.fullmatch(r"<object object at 0x[0-9a-f]+>", decoded["x"])
    assert paths == ["payload.x"]


def test_awkward_broken_repr() -> None:
    """An object whose repr() raises is stored as a marker naming its type and the error."""

    class Broken:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    decoded, paths = encode(Broken())

    assert decoded == {"x": "<Broken object; repr() raised RuntimeError>"}
    assert paths == ["payload.x"]


def test_awkward_surrogate_key() -> None:
    """A key with a lone surrogate is escaped like a value, and the issue names the key."""
    decoded, paths = encode({"k\ud800": 1})

    assert decoded == {"x": {"k\\ud800": 1}}
    assert paths == ["payload.x.<key 0>"]


@pytest.mark.parametrize(
    ("key", "stored"),
    [
        pytest.param(1, "1", id="int"),
        pytest.param(2**70, "1180591620717411303424", id="big-int"),
        pytest.param(1.5, "1.5", id="float"),
        pytest.param(True, "true", id="bool"),
        pytest.param(None, "null", id="none"),
        pytest.param((1, 2), "(1, 2)", id="tuple"),
    ],
)
def test_awkward_key(key: Any, stored: str) -> None:
    """A key that is not a string is stored as a string, and the issue names the key."""
    decoded, paths = encode({"a": 0, key: "v"})

    assert decoded == {"x": {"a": 0, stored: "v"}}
    assert paths == ["payload.x.<key 1>"]


def test_awkward_cycle() -> None:
    """A dict that contains itself is cut where it repeats, with one issue there."""
    cyclic: dict[str, Any] = {"n": 1}
    cyclic["self"] = cyclic

    decoded, paths = encode(cyclic)

    assert decoded == {"x": {"n": 1, "self": "<cycle>"}}
    assert paths == ["payload.x.self"]


def test_awkward_list_cycle() -> None:
    """A list that contains itself is cut where it repeats."""
    cyclic: list[Any] = [1]
    cyclic.append(cyclic)

    decoded, paths = encode(cyclic)

    assert decoded == {"x": [1, "<cycle>"]}
    assert paths == ["payload.x[1]"]


def test_shared_reference_not_cycle() -> None:
    """The same list twice in one dict is not a cycle, so both copies are stored whole."""
    shared = [1, 2]

    decoded, paths = encode({"a": shared, "b": shared})

    assert decoded == {"x": {"a": [1, 2], "b": [1, 2]}}
    assert paths == []


def _nested_lists(depth: int) -> list[Any]:
    outer: list[Any] = []
    inner = outer
    for _ in range(depth - 1):
        inner.append([])
        inner = inner[0]
    return outer


@pytest.mark.parametrize("depth", [300, 5000])
def test_deep_nesting_cut(depth: int) -> None:
    """Lists nested hundreds or thousands of levels deep are cut once, and orjson encodes them."""
    converted, issues = make_jsonable(_nested_lists(depth), "payload")

    assert orjson.dumps(converted)
    assert len(issues) == 1
    assert issues[0].path.startswith("payload[0][0]")


def test_moderate_nesting_kept() -> None:
    """Lists nested 50 levels deep are kept whole."""
    value = _nested_lists(50)

    converted, issues = make_jsonable(value, "payload")

    assert converted is value
    assert issues == []


def test_issue_reason() -> None:
    """A ConversionIssue's reason names the original type and its stored form."""
    _, issues = make_jsonable(float("nan"), "metrics_json")

    assert issues == [ConversionIssue("metrics_json", "float nan stored as 'NaN'")]


def test_enum_stored_as_value() -> None:
    """An enum member is stored as its value, with no issue."""
    assert encode(Colour.RED) == ({"x": "red"}, [])


def test_set_of_mixed_types() -> None:
    """A set whose items cannot be compared is stored as a list in iteration order."""
    value = {1, "a", None}

    decoded, paths = encode(value)

    assert sorted(decoded["x"], key=repr) == sorted(value, key=repr)
    assert paths == ["payload.x"]


def test_dumps_bytes_and_issues() -> None:
    """dumps returns the JSON bytes of the converted value and the issues."""
    encoded, issues = dumps({"n": 2**64}, "payload")

    assert encoded == b'{"n":"18446744073709551616"}'
    assert [issue.path for issue in issues] == ["payload.n"]


# --- values that need no change -----------------------------------------------------------


def test_clean_value_same_object() -> None:
    """A value with nothing to convert comes back as the same object, with no issues."""
    value = {
        "text": "héllo ✓",
        "n": -(2**63),
        "f": -0.0,
        "items": [1, 2.5, None, True, ("t", 1)],
        "nested": {"deep": {"deeper": ["x"]}},
    }

    converted, issues = make_jsonable(value, "payload")

    assert converted is value
    assert issues == []


def test_clean_branch_not_copied() -> None:
    """Converting one branch copies only that branch, and leaves the input unchanged."""
    clean = {"a": [1, 2], "b": {"c": "d"}}
    value = {"clean": clean, "big": 2**70}

    converted, _ = make_jsonable(value, "payload")

    assert converted is not value
    assert converted["clean"] is clean
    assert value["big"] == 2**70


# --- dates, times and UUIDs ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        pytest.param(
            datetime.datetime(2026, 12, 4, 19, 34, 17, 123456, tzinfo=datetime.timezone.utc),
            "2026-12-04T19:34:17.123456+00:00",
            id="aware-datetime",
        ),
        pytest.param(datetime.datetime(2026, 12, 4, 19, 34), "2026-12-04T19:34:00", id="naive"),
        pytest.param(datetime.date(2026, 12, 4), "2026-12-04", id="date"),
        pytest.param(datetime.time(19, 34, 17), "19:34:17", id="time"),
        pytest.param(uuid.UUID(int=1), "00000000-0000-0000-0000-000000000001", id="uuid"),
    ],
)
def test_time_and_uuid_text(value: Any, stored: str) -> None:
    """Dates, times and UUIDs are stored as ISO 8601 and hyphenated hex text, with no issue."""
    assert encode(value) == ({"x": stored}, [])


def test_aware_time() -> None:
    """A datetime.time with a time zone is encoded as ISO 8601 text with its offset."""
    decoded, _ = encode(datetime.time(12, 30, tzinfo=datetime.timezone.utc))

    assert decoded == {"x": "12:30:00+00:00"}


class TimestampSubclass(datetime.datetime):
    """A datetime subclass, like pandas.Timestamp or pendulum.DateTime."""


class DateSubclass(datetime.date):
    """A date subclass."""


class UUIDSubclass(uuid.UUID):
    """A UUID subclass."""


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        pytest.param(TimestampSubclass(2026, 12, 4, 19, 34), "2026-12-04T19:34:00", id="datetime"),
        pytest.param(DateSubclass(2026, 12, 4), "2026-12-04", id="date"),
        pytest.param(UUIDSubclass(int=1), "00000000-0000-0000-0000-000000000001", id="uuid"),
    ],
)
def test_native_type_subclass(value: Any, stored: str) -> None:
    """A subclass of datetime, date or UUID is stored like the base type."""
    decoded, _ = encode(value)

    assert decoded == {"x": stored}


_DUMP_BROKEN_TZINFO = """
import datetime, orjson
from telemetry.encoding import make_jsonable

class BrokenZone(datetime.tzinfo):
    def utcoffset(self, moment):
        raise RuntimeError("no offset")

converted, issues = make_jsonable(datetime.datetime(2026, 12, 4, tzinfo=BrokenZone()), "x")
orjson.dumps(converted)
"""


def test_broken_tzinfo() -> None:
    """A datetime whose tzinfo raises converts and encodes without crashing the process."""
    child = subprocess.run(
        [sys.executable, "-c", _DUMP_BROKEN_TZINFO], capture_output=True, text=True, timeout=60
    )

    assert child.returncode == 0, child.stderr


# --- key collisions ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "mapping",
    [
        pytest.param({1: "int", "1": "str"}, id="int-and-str"),
        pytest.param({"1": "str", 1: "int"}, id="str-and-int"),
        pytest.param({True: "bool", "true": "str"}, id="bool-and-str"),
        pytest.param({"\ud800": "surrogate", "\\ud800": "escaped"}, id="surrogate"),
    ],
)
def test_key_collision(mapping: dict[Any, str]) -> None:
    """Two keys that convert to the same string both keep their values."""
    decoded, paths = encode(mapping)

    assert sorted(decoded["x"].values()) == sorted(mapping.values())
    assert paths


def test_key_collision_suffix() -> None:
    """The later of two colliding keys gets the suffix #2, and the issue names it."""
    decoded, paths = encode({1: "int", "1": "str", "1#2": "taken"})

    assert decoded == {"x": {"1": "int", "1#2": "str", "1#2#2": "taken"}}
    assert paths == ["payload.x.<key 0>", "payload.x.1#2", "payload.x.1#2#2"]


# --- any value ----------------------------------------------------------------------------

lone_surrogates = st.integers(0xD800, 0xDFFF).map(chr)
awkward_texts = st.text() | st.builds(
    lambda before, surrogate, after: before + surrogate + after,
    st.text(),
    lone_surrogates,
    st.text(),
)
hashable_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | awkward_texts
    | st.binary()
    # A signalling NaN Decimal cannot be hashed, so NaNs are left to the unhashable values.
    | st.decimals(allow_nan=False)
    | st.uuids()
    | st.builds(Point, st.integers(), awkward_texts)
    | st.builds(pathlib.PurePosixPath, st.text())
    | st.just(Colour.RED)
)
scalars = (
    hashable_scalars
    | st.binary().map(bytearray)
    | st.binary().map(memoryview)
    | st.decimals()
    | st.datetimes()
    | st.datetimes(timezones=st.just(datetime.timezone.utc))
    | st.dates()
    | st.times()
    | st.times(timezones=st.just(datetime.timezone.utc))
    | st.builds(TimestampSubclass, st.integers(1, 9999), st.integers(1, 12), st.integers(1, 28))
    | st.builds(UUIDSubclass, int=st.integers(0, 2**128 - 1))
    | st.builds(object)
    | st.builds(Blob, awkward_texts, st.binary())
)


def _append_self(items: list[Any]) -> list[Any]:
    items.append(items)
    return items


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=3).map(_append_self)
        | st.tuples(children, children)
        | st.dictionaries(hashable_scalars, children, max_size=4)
        | st.sets(hashable_scalars, max_size=4)
        | st.frozensets(hashable_scalars, max_size=4)
        | st.builds(Point, children, children)
    )


any_values = st.recursive(scalars, _containers, max_leaves=25)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=25,
)


@given(value=any_values)
def test_any_value_encodes(value: Any) -> None:
    """make_jsonable never raises, and orjson encodes whatever it returns."""
    converted, _ = make_jsonable(value, "payload")

    assert isinstance(orjson.dumps(converted), bytes)


@given(value=json_values)
def test_json_value_unchanged(value: Any) -> None:
    """A value JSON can hold comes back as the same object with no issues."""
    converted, issues = make_jsonable(value, "payload")

    assert converted is value
    assert issues == []
