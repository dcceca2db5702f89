"""Tests for telemetry.models: record round trips, run ids and the timestamp helpers."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import subprocess
import sys
import threading
import types
import zoneinfo
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from telemetry import models
from telemetry.models import (
    APIPayload,
    RunEvent,
    RunRecord,
    calculate_duration_ms,
    generate_run_id,
    get_iso8601_timestamp,
    parse_timestamp,
)

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
RUN_ID_PATTERN = re.compile(r"^[0-9]{8}T[0-9]{12}Z-[a-z0-9-]+-[0-9a-f]{16}$")
TIMESTAMP_PATTERN = re.compile(
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}\+00:00$"
)
UTC = datetime.timezone.utc
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=UTC)

# A run id is "<22-character UTC time>-<name>-<16 hex digits>".
RUN_ID_NAME = slice(len("20261204T193417123456Z-"), -len("-3f9a2c1b7d4e5a60"))

# RunRecord fields that APIPayload leaves out.
SYNC_AND_BOOKKEEPING_FIELDS = frozenset(
    {"api_posted", "api_posted_at", "api_retry_count", "api_last_error", "created_at", "updated_at"}
)
TIMESTAMP_FIELDS = frozenset(
    {"start_time", "end_time", "timestamp", "api_posted_at", "created_at", "updated_at"}
)


# --- strategies -------------------------------------------------------------------------

# Valid records are UTF-8 encodable, so the text has no lone surrogates.
texts = st.text(alphabet=st.characters(exclude_categories=("Cs",)))
int64s = st.integers(INT64_MIN, INT64_MAX) | st.sampled_from([INT64_MIN, INT64_MAX, -1, 0])
extreme_floats = st.sampled_from(
    [1.7976931348623157e308, -1.7976931348623157e308, 5e-324, -5e-324, -0.0]
)
json_scalars = (
    st.none()
    | st.booleans()
    | int64s
    | st.floats(allow_nan=False, allow_infinity=False)
    | extreme_floats
    | texts
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=20,
)
json_objects = st.dictionaries(texts, json_values, max_size=5)

# Zones with half-hour, 45-minute, +14:00 and negative-DST offsets. A fixed list draws
# much faster than st.timezones().
named_zones = st.sampled_from(
    [
        zoneinfo.ZoneInfo(name)
        for name in (
            "America/New_York",
            "America/St_Johns",
            "Asia/Kolkata",
            "Pacific/Chatham",
            "Pacific/Kiritimati",
            "Europe/Dublin",
            "Australia/Lord_Howe",
        )
    ]
)
fixed_offsets = st.timedeltas(
    min_value=datetime.timedelta(hours=-23, minutes=-59),
    max_value=datetime.timedelta(hours=23, minutes=59),
).map(datetime.timezone)
# Years run from 2 to 9998 because converting 0001-01-01 or 9999-12-31 to UTC can leave
# the range that datetime can represent.
aware_datetimes = st.datetimes(
    min_value=datetime.datetime(2, 1, 1),
    max_value=datetime.datetime(9998, 12, 31),
    timezones=named_zones | fixed_offsets,
)
timestamps = aware_datetimes.map(get_iso8601_timestamp)

_BASE_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "str": texts,
    "int": int64s,
    "bool": st.booleans(),
    "dict[str, Any]": json_objects,
}


def records(cls: type[Any]) -> st.SearchStrategy[Any]:
    """Build valid records of ``cls``, with None drawn for every optional field."""
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in dataclasses.fields(cls):
        # Annotations are strings such as "str | None" (postponed evaluation).
        base, _, optional = str(field.type).partition(" | ")
        value = timestamps if field.name in TIMESTAMP_FIELDS else _BASE_STRATEGIES[base]
        fields[field.name] = (st.none() | value) if optional else value
    return st.builds(cls, **fields)


RECORD_CLASSES = [RunRecord, RunEvent, APIPayload]

# A RunRecord example draws about 40 fields, so these tests run 50 examples instead of
# 100 to keep the file fast.
record_settings = settings(max_examples=50)


# --- records ------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", RECORD_CLASSES)
@record_settings
@given(data=st.data())
def test_record_round_trips(cls: type[Any], data: st.DataObject) -> None:
    """A record rebuilt from to_dict(), or from its JSON line, equals the original."""
    record = data.draw(records(cls))

    assert cls.from_dict(record.to_dict()) == record
    assert cls.from_dict(orjson.loads(record.to_json())) == record


@pytest.mark.parametrize("cls", RECORD_CLASSES)
def test_to_json_is_one_line(cls: type[Any]) -> None:
    """to_json returns a single line with no trailing newline, even for text with newlines."""
    record = cls.from_dict(
        {
            "run_id": "r\n1",
            "agent_name": "a\r\nb",
            "job_type": "j",
            "start_time": "2026-12-04T19:34:17.123456+00:00",
            "event_type": "e",
            "timestamp": "2026-12-04T19:34:17.123456+00:00",
        }
    )

    assert "\n" not in record.to_json()


@record_settings
@given(record=records(RunRecord))
def test_api_payload_from_run_record(record: RunRecord) -> None:
    """The payload keeps the values of the fields it shares with the run, and drops the rest."""
    body = APIPayload.from_run_record(record).to_dict()
    run = record.to_dict()

    assert body == {name: run[name] for name in body}
    assert set(body) == set(run) - SYNC_AND_BOOKKEEPING_FIELDS


@record_settings
@given(record=records(RunRecord), metrics_as_bytes=st.booleans())
def test_run_record_stored_forms(record: RunRecord, metrics_as_bytes: bool) -> None:
    """RunRecord.from_dict reads an index row and a journal line back into the same record.

    The index stores metrics_json as JSON text and api_posted as 0 or 1. A journal line
    carries an extra record_type key.
    """
    row = record.to_dict()
    if record.metrics_json is not None:
        metrics_text = orjson.dumps(record.metrics_json)
        row["metrics_json"] = metrics_text if metrics_as_bytes else metrics_text.decode()
    row["api_posted"] = int(record.api_posted)
    line = {"record_type": "run_end", **record.to_dict()}

    from_row = RunRecord.from_dict(row)

    assert from_row == record
    assert type(from_row.api_posted) is bool
    assert RunRecord.from_dict(line) == record


def test_run_record_empty_metrics_text() -> None:
    """An empty metrics_json text from the index becomes None."""
    row = {"run_id": "r", "agent_name": "a", "job_type": "j", "start_time": "t"}

    assert RunRecord.from_dict({**row, "metrics_json": ""}).metrics_json is None


def _required_fields(cls: type[Any]) -> list[str]:
    return [
        field.name
        for field in dataclasses.fields(cls)
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    ]


@pytest.mark.parametrize(
    ("cls", "name"),
    [(cls, name) for cls in RECORD_CLASSES for name in _required_fields(cls)],
)
def test_from_dict_missing_field(cls: type[Any], name: str) -> None:
    """from_dict without a required field raises ValueError naming that field."""
    complete = {
        "run_id": "r",
        "agent_name": "a",
        "job_type": "j",
        "start_time": "2026-12-04T19:34:17.123456+00:00",
        "event_type": "e",
        "timestamp": "2026-12-04T19:34:17.123456+00:00",
    }
    del complete[name]

    with pytest.raises(ValueError, match=f"'{name}'"):
        cls.from_dict(complete)


def test_from_dict_not_mapping() -> None:
    """from_dict of a list raises TypeError naming the type it received."""
    with pytest.raises(TypeError, match="not list"):
        RunRecord.from_dict([("run_id", "r")])  # type: ignore[arg-type]


# --- generate_run_id ----------------------------------------------------------------------


def test_run_id_unique_across_threads() -> None:
    """8 threads generating 2000 ids each never produce the same id twice."""
    barrier = threading.Barrier(8)
    per_thread: list[list[str]] = [[] for _ in range(8)]

    def generate(ids: list[str]) -> None:
        barrier.wait()
        ids.extend(generate_run_id("agent") for _ in range(2000))

    threads = [threading.Thread(target=generate, args=(ids,)) for ids in per_thread]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    all_ids = [run_id for ids in per_thread for run_id in ids]
    assert len(all_ids) == 8 * 2000
    assert len(set(all_ids)) == len(all_ids)
    for ids in per_thread:
        assert sorted(ids) == ids


_GENERATE_IN_CHILD = """
import json
from telemetry.models import generate_run_id
print(json.dumps([generate_run_id("agent") for _ in range(2000)]))
"""


def test_run_id_unique_across_processes() -> None:
    """4 processes generating 2000 ids each at the same time never produce the same id twice."""
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _GENERATE_IN_CHILD], stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    all_ids: list[str] = []
    for child in children:
        output, _ = child.communicate(timeout=60)
        assert child.returncode == 0
        all_ids.extend(json.loads(output))

    assert len(all_ids) == 4 * 2000
    assert len(set(all_ids)) == len(all_ids)


def test_run_id_sorts_by_time() -> None:
    """Ids generated one after another sort in generation order, whatever their agent names."""
    names = ["zeta", "alpha", "Mid Agent", "", "a" * 100] * 200

    ids = [generate_run_id(name) for name in names]

    assert sorted(ids) == ids


def test_run_id_clock_steps_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ids keep increasing when the wall clock steps back, because each moves past the last."""
    before = generate_run_id("agent")

    class SteppedBackClock(datetime.datetime):
        @classmethod
        def now(cls, tz: datetime.tzinfo | None = None) -> SteppedBackClock:
            return cls(2000, 1, 1, tzinfo=tz)

    clock = types.SimpleNamespace(
        datetime=SteppedBackClock, timezone=datetime.timezone, timedelta=datetime.timedelta
    )
    monkeypatch.setattr(models, "datetime", clock)
    ids = [generate_run_id("agent") for _ in range(3)]

    assert [before, *ids] == sorted({before, *ids})


@given(name=st.text())
def test_run_id_format(name: str) -> None:
    """Every id is safe in file names and URLs, whatever the agent name."""
    assert RUN_ID_PATTERN.match(generate_run_id(name))


@pytest.mark.parametrize(
    ("agent_name", "expected"),
    [
        ("Stdlib Audit!", "stdlib-audit"),
        ("stdlib_audit.v2", "stdlib-audit-v2"),
        ("../../etc/passwd", "etc-passwd"),
        ("name?q=1#frag", "name-q-1-frag"),
        ("Ünïcode", "n-code"),
        ("", "agent"),
        ("!!! ???", "agent"),
        ("日本語", "agent"),
        ("a" * 100, "a" * 40),
        ("b" * 39 + "-c", "b" * 39),
    ],
)
def test_run_id_agent_name(agent_name: str, expected: str) -> None:
    """The id carries the agent name in lower case, symbols as hyphens, cut to 40 characters."""
    run_id = generate_run_id(agent_name)

    assert run_id[RUN_ID_NAME] == expected


def test_run_id_time_prefix() -> None:
    """The id starts with the UTC time at which it was generated."""
    before = datetime.datetime.now(UTC)
    run_id = generate_run_id("agent")
    after = datetime.datetime.now(UTC)

    stamp = datetime.datetime.strptime(run_id[:22], "%Y%m%dT%H%M%S%fZ").replace(tzinfo=UTC)
    # When the clock has not advanced since the last id, the id is moved one microsecond
    # past it, so the stamp can be slightly later than `after`.
    assert before <= stamp <= after + datetime.timedelta(seconds=1)


_FORK_WHILE_LOCKED = """
import os, threading
from telemetry import models

# The parent takes the id lock as another thread inside generate_run_id would hold it.
models._id_lock.acquire()
pid = os.fork()
if pid == 0:
    generated = threading.Event()
    worker = threading.Thread(
        target=lambda: (models.generate_run_id("child"), generated.set()), daemon=True
    )
    worker.start()
    os._exit(0 if generated.wait(2) else 3)
models._id_lock.release()
_, status = os.waitpid(pid, 0)
raise SystemExit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_run_id_after_fork() -> None:
    """A forked child generates ids even if the fork happened while the id lock was held."""
    child = subprocess.run(
        [sys.executable, "-c", _FORK_WHILE_LOCKED], capture_output=True, text=True, timeout=60
    )

    assert child.returncode == 0, child.stderr


# --- timestamps ---------------------------------------------------------------------------


def test_timestamp_now_format() -> None:
    """get_iso8601_timestamp() is UTC with microseconds and an explicit +00:00 offset."""
    assert TIMESTAMP_PATTERN.match(get_iso8601_timestamp())


def test_timestamp_zero_microseconds() -> None:
    """Microseconds are written even when they are zero."""
    moment = datetime.datetime(2026, 1, 1, tzinfo=UTC)

    assert get_iso8601_timestamp(moment) == "2026-01-01T00:00:00.000000+00:00"


@pytest.mark.parametrize(
    "moment",
    [
        datetime.datetime(
            2026, 12, 4, 14, 34, 17, 123456, tzinfo=datetime.timezone(datetime.timedelta(hours=-5))
        ),
        datetime.datetime(
            2026, 12, 5, 1, 4, 17, 123456, tzinfo=datetime.timezone(datetime.timedelta(hours=5.5))
        ),
        datetime.datetime(
            2026, 12, 4, 14, 34, 17, 123456, tzinfo=zoneinfo.ZoneInfo("America/New_York")
        ),
    ],
)
def test_timestamp_converts_to_utc(moment: datetime.datetime) -> None:
    """An aware datetime in another zone is converted to UTC."""
    assert get_iso8601_timestamp(moment) == "2026-12-04T19:34:17.123456+00:00"


@given(moment=aware_datetimes)
def test_timestamp_any_aware_datetime(moment: datetime.datetime) -> None:
    """Any aware datetime comes back as the same instant, written in UTC."""
    text = get_iso8601_timestamp(moment)

    assert TIMESTAMP_PATTERN.match(text)
    # Subtraction compares instants even in a DST gap or fold, where == between zones
    # returns False (PEP 495).
    assert parse_timestamp(text) - EPOCH == moment - EPOCH


def test_timestamp_naive_rejected() -> None:
    """A naive datetime raises ValueError, because its offset from UTC is unknown."""
    with pytest.raises(ValueError, match="naive datetime"):
        get_iso8601_timestamp(datetime.datetime(2026, 12, 4, 19, 34, 17))


_TIMESTAMP_IN_CHILD = """
import datetime, json, time
from telemetry.models import get_iso8601_timestamp

before = time.time()
now = get_iso8601_timestamp()
after = time.time()
local_midnight = datetime.datetime(2026, 1, 15).astimezone()
print(json.dumps({
    "utc_offset": time.localtime().tm_gmtoff,
    "before": before,
    "now": now,
    "after": after,
    "local_midnight": get_iso8601_timestamp(local_midnight),
}))
"""


@pytest.mark.parametrize("tz", ["America/New_York", "EST5EDT,M3.2.0,M11.1.0"])
def test_timestamp_under_tz(tz: str) -> None:
    """With TZ set to New York the timestamps are still UTC."""
    child = subprocess.run(
        [sys.executable, "-c", _TIMESTAMP_IN_CHILD],
        env={**os.environ, "TZ": tz},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result = json.loads(child.stdout)
    if result["utc_offset"] == 0:
        pytest.skip(f"TZ={tz} had no effect on this host (no time zone data?)")

    now = datetime.datetime.fromisoformat(result["now"]).timestamp()
    # A 1 ms margin covers float rounding of time.time(). A New York offset would be hours.
    assert result["before"] - 0.001 <= now <= result["after"] + 0.001
    assert result["now"].endswith("+00:00")
    assert result["local_midnight"] == "2026-01-15T05:00:00.000000+00:00"


# --- calculate_duration_ms ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        ("2026-12-04T19:34:17.000000+00:00", "2026-12-04T19:34:18.500000+00:00", 1500),
        ("2026-12-04T19:34:17.000000Z", "2026-12-04T19:34:18.000000Z", 1000),
        ("2026-12-04T19:34:17.000000z", "2026-12-04T19:34:17.250000+00:00", 250),
        ("2026-12-04T19:34:17+00:00", "2026-12-04T14:34:18-05:00", 1000),
        ("2026-12-04T19:34:17+00:00", "2026-12-05T01:04:17+05:30", 0),
        ("2026-12-04T19:34:17.000000+00:00", "2026-12-04T19:34:17.001600+00:00", 2),
        ("2026-12-04T19:34:17.000000+00:00", "2026-12-04T19:34:17.001400+00:00", 1),
        ("2026-12-04T19:34:17+00:00", "2026-12-05T19:34:17+00:00", 86_400_000),
    ],
)
def test_duration_from_strings(start: str, end: str, expected: int) -> None:
    """The duration between ISO 8601 strings, with Z or offsets, is in rounded milliseconds."""
    assert calculate_duration_ms(start, end) == expected


def test_duration_from_datetimes() -> None:
    """Aware datetimes work as well as strings, mixed or not."""
    start = datetime.datetime(2026, 12, 4, 19, 34, 17, tzinfo=UTC)
    end = start + datetime.timedelta(seconds=2)

    assert calculate_duration_ms(start, end) == 2000
    assert calculate_duration_ms(get_iso8601_timestamp(start), end) == 2000


def test_duration_negative_is_zero() -> None:
    """An end before the start, as after a wall-clock step back, gives 0."""
    assert calculate_duration_ms("2026-12-04T19:34:18+00:00", "2026-12-04T19:34:17+00:00") == 0


@pytest.mark.parametrize(
    "invalid",
    ["yesterday", "", "Z", "2026-13-01T00:00:00+00:00", "2026-12-04 19:34:17 UTC"],
)
def test_duration_invalid_text(invalid: str) -> None:
    """Text that is not ISO 8601 raises ValueError naming the value."""
    with pytest.raises(ValueError, match=re.escape(repr(invalid))):
        calculate_duration_ms(invalid, "2026-12-04T19:34:17+00:00")


def test_duration_no_offset() -> None:
    """A timestamp without a UTC offset raises ValueError naming the value."""
    with pytest.raises(ValueError, match=re.escape("'2026-12-04T19:34:17' has no UTC offset")):
        calculate_duration_ms("2026-12-04T19:34:17", "2026-12-04T19:34:17+00:00")


def test_duration_naive_datetime() -> None:
    """A naive datetime raises ValueError, because its offset from UTC is unknown."""
    with pytest.raises(ValueError, match="no UTC offset"):
        calculate_duration_ms(datetime.datetime(2026, 12, 4), "2026-12-04T19:34:17+00:00")
