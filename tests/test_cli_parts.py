"""The command's parsing and display helpers: durations, times, tables and progress."""

from __future__ import annotations

import argparse
import datetime
import io

import pytest

from telemetry.cli._args import parse_count, parse_duration, parse_since
from telemetry.cli._output import Progress, format_duration, format_time, print_table

UTC = datetime.timezone.utc
NOW = datetime.datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("15m", 900),
        ("2h", 7200),
        ("7d", 604800),
        ("2w", 1209600),
        ("1h30m", 5400),
        (" 90D ", 7776000),
    ],
)
def test_duration_units(text: str, seconds: int) -> None:
    """Durations take s, m, h, d and w, alone or summed, in any case."""
    assert parse_duration(text) == datetime.timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "7", "d", "7x", "7d garbage", "-2h", "1.5h", "0d"])
def test_duration_invalid(text: str) -> None:
    """Anything else is refused with the text and examples in the message."""
    with pytest.raises(argparse.ArgumentTypeError, match="expected") as caught:
        parse_duration(text)
    assert repr(text) in str(caught.value)


def test_duration_too_long() -> None:
    """A duration past what timedelta holds is refused, not crashed on."""
    with pytest.raises(argparse.ArgumentTypeError, match="too long"):
        parse_duration("99999999999w")


def test_since_duration() -> None:
    """--since 2h is two hours before now."""
    assert parse_since("2h", NOW) == NOW - datetime.timedelta(hours=2)


def test_since_date_is_utc_midnight() -> None:
    """A bare date is the start of that day in UTC."""
    assert parse_since("2026-12-01", NOW) == datetime.datetime(2026, 12, 1, tzinfo=UTC)


def test_since_time_with_offset() -> None:
    """A time with an offset is converted to UTC."""
    moment = parse_since("2026-12-01T08:30:00+02:00", NOW)
    assert moment == datetime.datetime(2026, 12, 1, 6, 30, tzinfo=UTC)


def test_since_invalid() -> None:
    """Text that is neither a duration nor a date gets both kinds of example."""
    with pytest.raises(argparse.ArgumentTypeError, match=r"2h.*2026-12-01"):
        parse_since("yesterday", NOW)


@pytest.mark.parametrize("text", ["0", "-3", "ten"])
def test_count_invalid(text: str) -> None:
    """Counts are whole numbers of 1 or more."""
    with pytest.raises(argparse.ArgumentTypeError, match="invalid count"):
        parse_count(text)


@pytest.mark.parametrize(
    ("milliseconds", "shown"),
    [(None, "-"), (850, "850 ms"), (12_400, "12.4 s"), (210_000, "3.5 min"), (7_200_000, "2.0 h")],
)
def test_format_duration(milliseconds: int | None, shown: str) -> None:
    """Durations are shown in the unit that keeps them short."""
    assert format_duration(milliseconds) == shown


def test_format_time() -> None:
    """Stored timestamps are shown to the second, without the offset."""
    assert format_time("2026-12-04T19:34:17.123456+00:00") == "2026-12-04 19:34:17"
    assert format_time(None) == "-"


def test_table_aligns_columns() -> None:
    """Each column is as wide as its widest cell."""
    out = io.StringIO()
    print_table(("A", "LONG HEADER"), [("wide value", "x")], out)
    assert out.getvalue().splitlines() == ["A           LONG HEADER", "wide value  x"]


def test_progress_plain_lines_at_tenths() -> None:
    """Off a terminal, progress is one line per tenth of the work and one at the end."""
    out = io.StringIO()
    progress = Progress("posting", 20, out, bar=False)
    for done in range(1, 21):
        progress.update(done)
    progress.finish()
    lines = out.getvalue().splitlines()
    assert lines[0] == "posting: 2/20"
    assert lines[-1] == "posting: 20/20"
    assert len(lines) == 10


def test_progress_bar_redraws_in_place() -> None:
    """On a terminal, the bar is redrawn with carriage returns and ends with a newline."""
    ticks = iter(float(n) for n in range(100))
    out = io.StringIO()
    progress = Progress("rebuilding", 4, out, bar=True, clock=lambda: next(ticks))
    for done in range(1, 5):
        progress.update(done)
    progress.finish()
    text = out.getvalue()
    assert text.count("\r") >= 4
    assert "[##############################] 4/4" in text
    assert text.endswith("\n")


def test_progress_bar_spaces_redraws() -> None:
    """Updates closer together than the redraw interval draw once, except the last."""
    out = io.StringIO()
    progress = Progress("reading", 1000, out, bar=True, clock=lambda: 5.0)
    for done in range(1, 1001):
        progress.update(done)
    assert out.getvalue().count("\r") == 2


def test_progress_silent_without_lines() -> None:
    """Off a terminal with lines turned off, progress writes nothing."""
    out = io.StringIO()
    progress = Progress("reading", 10, out, bar=False, lines=False)
    for done in range(1, 11):
        progress.update(done)
    progress.finish()
    assert out.getvalue() == ""
