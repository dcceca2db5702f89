"""The command's parsing and display helpers: durations, times, tables and progress."""

from __future__ import annotations

import argparse
import datetime
import io
import logging
import os
from pathlib import Path

import pytest

from telemetry.cli import main
from telemetry.cli._args import (
    COUNT_MAX,
    parse_count,
    parse_duration,
    parse_since,
    parse_text,
)
from telemetry.cli._output import (
    Progress,
    ProgressAwareHandler,
    format_duration,
    format_time,
    print_table,
    write_line,
)

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
    """A duration longer than timedelta can store is rejected with a message."""
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


def test_count_other_minimum() -> None:
    """A minimum of 0 accepts 0 and names the minimum when it rejects a count."""
    assert parse_count("0", minimum=0) == 0
    with pytest.raises(argparse.ArgumentTypeError, match="expected 0 or more"):
        parse_count("-1", minimum=0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-12-01T08:30", datetime.datetime(2026, 12, 1, 8, 30, tzinfo=UTC)),
        ("2026-12-01 08:30:15", datetime.datetime(2026, 12, 1, 8, 30, 15, tzinfo=UTC)),
        ("2026-12-04T22:46:11.48", datetime.datetime(2026, 12, 4, 22, 46, 11, 480000, tzinfo=UTC)),
        (
            "2026-12-04T22:46:11.123456Z",
            datetime.datetime(2026, 12, 4, 22, 46, 11, 123456, tzinfo=UTC),
        ),
        ("2026-12-01T08:30-05:30", datetime.datetime(2026, 12, 1, 14, 0, tzinfo=UTC)),
        ("2026-12-01t08:30z", datetime.datetime(2026, 12, 1, 8, 30, tzinfo=UTC)),
    ],
)
def test_since_time_forms(text: str, expected: datetime.datetime) -> None:
    """--since takes a date with a time to the minute, second or microsecond, and an offset."""
    assert parse_since(text, NOW) == expected


@pytest.mark.parametrize(
    "text",
    [
        "20261204",
        "2026-W49",
        "2026-W49-5",
        "2026-338",
        "2026-12-01T08",
        "2026-12-01T0830",
        "2026-12-01T08:30:15.1234567",
        "2026-12-01+02:00",
        "2026-12-01T08:30+0200",
        "2026-02-30",
        "2026-12-01T24:00",
        "2026-12-01T08:30+24:00",
        "\u0662\u0660\u0662\u0666-12-01",
    ],
)
def test_since_other_forms_rejected(text: str) -> None:
    """Forms that only some Python versions' fromisoformat accepts are rejected on all."""
    with pytest.raises(argparse.ArgumentTypeError, match="invalid time"):
        parse_since(text, NOW)


def test_text_utf8() -> None:
    """Text that is valid UTF-8 is returned unchanged."""
    assert parse_text("agent-ü") == "agent-ü"


def test_text_not_utf8() -> None:
    """A lone surrogate, as Python decodes a byte that is not UTF-8, is rejected."""
    with pytest.raises(argparse.ArgumentTypeError, match=r"'a\\xff': not valid UTF-8"):
        parse_text("a\udcff")


def test_count_maximum() -> None:
    """A count above SQLite's largest integer, or above a given maximum, is rejected."""
    assert parse_count(str(COUNT_MAX)) == COUNT_MAX
    with pytest.raises(argparse.ArgumentTypeError, match=f"expected {COUNT_MAX} at most"):
        parse_count(str(COUNT_MAX + 1))
    with pytest.raises(argparse.ArgumentTypeError, match="expected 5 at most"):
        parse_count("6", maximum=5)


def test_count_too_many_digits() -> None:
    """A number with more digits than int() converts is reported as too large."""
    with pytest.raises(argparse.ArgumentTypeError, match="at most") as caught:
        parse_count("9" * 5000)
    assert len(str(caught.value)) < 100


@pytest.mark.parametrize(
    ("milliseconds", "shown"),
    [
        (None, "-"),
        (850, "850 ms"),
        (999.4, "999 ms"),
        (999.6, "1.0 s"),
        (12_400, "12.4 s"),
        (119_949, "119.9 s"),
        (119_999, "2.0 min"),
        (210_000, "3.5 min"),
        (7_199_999, "2.0 h"),
        (7_200_000, "2.0 h"),
    ],
)
def test_format_duration(milliseconds: float | None, shown: str) -> None:
    """Durations are shown in the unit that keeps them short, chosen after rounding."""
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


def test_progress_bar_final_state_once() -> None:
    """The final state that update drew is not drawn again by finish."""
    out = io.StringIO()
    progress = Progress("posting", 8, out, bar=True, clock=lambda: 0.0)
    for done in range(1, 9):
        progress.update(done)
    progress.finish()
    assert out.getvalue().count("8/8") == 1
    assert out.getvalue().endswith("] 8/8\n")


def test_progress_plain_no_repeat() -> None:
    """A plain line already written for the final count is not written again by finish."""
    out = io.StringIO()
    progress = Progress("posting", 5, out, bar=False)
    progress.update(1)
    progress.finish()
    assert out.getvalue().splitlines() == ["posting: 1/5"]


def test_write_line_above_bar() -> None:
    """A line written while a bar is drawn clears the bar's line, then redraws the bar."""
    out = io.StringIO()
    progress = Progress("posting", 4, out, bar=True, clock=lambda: 0.0)
    progress.update(1)
    write_line(out, "telemetry: ERROR: gave up")
    progress.update(4)
    progress.finish()
    lines = out.getvalue().split("\n")
    assert (
        lines[0]
        == "\rposting [#######-----------------------] 1/4\r\x1b[Ktelemetry: ERROR: gave up"
    )
    assert (
        lines[1] == "\rposting [#######-----------------------] 1/4\rposting [" + "#" * 30 + "] 4/4"
    )
    assert lines[2] == ""


def test_write_line_without_bar() -> None:
    """Without a bar on the stream, write_line writes only the line."""
    out = io.StringIO()
    other = io.StringIO()
    progress = Progress("posting", 4, other, bar=True, clock=lambda: 0.0)
    progress.update(1)
    write_line(out, "message")
    progress.finish()
    write_line(other, "after")
    assert out.getvalue() == "message\n"
    assert other.getvalue().endswith("\nafter\n")


def test_progress_aware_handler() -> None:
    """Log records go through write_line, so they start a line of their own."""
    out = io.StringIO()
    handler = ProgressAwareHandler(out)
    handler.setFormatter(logging.Formatter("telemetry: %(levelname)s: %(message)s"))
    logger = logging.getLogger("telemetry.test_cli_parts")
    logger.addHandler(handler)
    logger.propagate = False
    progress = Progress("posting", 2, out, bar=True, clock=lambda: 0.0)
    try:
        progress.update(1)
        logger.error("post failed")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
        progress.finish()
    assert "\r\x1b[Ktelemetry: ERROR: post failed\n" in out.getvalue()


def fail_during_progress(progress: Progress, done: int) -> None:
    """Update ``progress`` to ``done`` inside its block, then raise RuntimeError."""
    with progress:
        progress.update(done)
        raise RuntimeError("locked")


def test_progress_context_finishes() -> None:
    """A block that ends normally finishes the display with the final count."""
    out = io.StringIO()
    with Progress("deleting", 4, out, bar=False) as progress:
        progress.update(3)
    assert out.getvalue().splitlines()[-1] == "deleting: 3/4"


def test_progress_context_failure_plain() -> None:
    """A block that raises writes no final count, so the error message comes last."""
    out = io.StringIO()
    with pytest.raises(RuntimeError):
        fail_during_progress(Progress("deleting", 4, out, bar=False), done=0)
    assert out.getvalue() == ""


def test_progress_context_failure_bar() -> None:
    """A bar interrupted by an error ends its line without drawing a final state."""
    out = io.StringIO()
    with pytest.raises(RuntimeError):
        fail_during_progress(Progress("deleting", 4, out, bar=True), done=1)
    text = out.getvalue()
    assert text.count("\r") == 1
    assert text.endswith("] 1/4\n")


def test_main_restores_process_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """main() undoes its changes to the telemetry logger and to the output streams."""
    for name in [name for name in os.environ if name.startswith("TELEMETRY_")]:
        monkeypatch.delenv(name)
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="strict")
    stderr = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="strict")
    monkeypatch.setattr("sys.stdout", stdout)
    monkeypatch.setattr("sys.stderr", stderr)
    logger = logging.getLogger("telemetry")
    monkeypatch.setattr(logger, "level", logging.ERROR)
    handlers = list(logger.handlers)

    code = main(["config", "--data-dir", str(tmp_path / "caf\u00e9")])

    assert code == 0
    assert "caf\\xe9" in stdout.buffer.getvalue().decode("ascii")  # escaped, not an error
    assert logger.level == logging.ERROR
    assert logger.handlers == handlers
    assert stdout.errors == "strict"
    assert stderr.errors == "strict"
