"""Command-line parsing: the parser class, counts, durations and points in time."""

from __future__ import annotations

import argparse
import datetime
import re
import sys
from typing import NoReturn

__all__ = [
    "COUNT_MAX",
    "CommandParser",
    "parse_count",
    "parse_duration",
    "parse_since",
    "parse_text",
]

COUNT_MAX = 2**63 - 1
"""The largest count that parse_count accepts by default: SQLite's largest integer."""

_DURATION_PART = re.compile(r"(\d+)([smhdw])")
# The forms of a point in time that --since takes, on every Python version: a date, and
# an optional time to the minute, second or microsecond, with an optional offset.
_MOMENT = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})"
    r"(?:[T ](?P<hour>\d{2}):(?P<minute>\d{2})"
    r"(?::(?P<second>\d{2})(?:\.(?P<fraction>\d{1,6}))?)?"
    r"(?P<offset>Z|[+-]\d{2}:\d{2})?)?",
    re.ASCII | re.IGNORECASE,
)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_EXAMPLES = "a duration such as 30m, 2h, 7d or 1h30m"


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr, with exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: {message} (see '{self.prog} --help')\n")
        sys.exit(2)


def parse_count(text: str, minimum: int = 1, maximum: int = COUNT_MAX) -> int:
    """Parse a whole number from ``minimum`` to ``maximum``, for options such as ``--limit``.

    For other bounds, pass ``functools.partial(parse_count, minimum=0)`` as the type.

    Raises:
        argparse.ArgumentTypeError: the text is not a whole number, or it is out of bounds.
    """
    try:
        value = int(text)
    except ValueError:
        if text.strip().isdigit():  # more digits than int() converts (4300 by default)
            raise argparse.ArgumentTypeError(
                f"invalid count {text[:20]}...: expected {maximum} at most"
            ) from None
        raise argparse.ArgumentTypeError(
            f"invalid count {text!r}: expected a whole number of {minimum} or more"
        ) from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"invalid count {value}: expected {minimum} or more")
    if value > maximum:
        raise argparse.ArgumentTypeError(f"invalid count {value}: expected {maximum} at most")
    return value


def parse_duration(text: str) -> datetime.timedelta:
    """Parse ``30s``, ``15m``, ``2h``, ``7d``, ``2w`` or a sum such as ``1h30m``.

    Raises:
        argparse.ArgumentTypeError: the text is not such a duration, or it is zero.
    """
    compact = text.strip().lower()
    parts = _DURATION_PART.findall(compact)
    if not parts or "".join(number + unit for number, unit in parts) != compact:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: expected {_DURATION_EXAMPLES}"
        )
    seconds = sum(int(number) * _UNIT_SECONDS[unit] for number, unit in parts)
    if seconds == 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: expected more than 0")
    try:
        return datetime.timedelta(seconds=seconds)
    except OverflowError:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: too long, expected at most 999999999 days"
        ) from None


def parse_since(text: str, now: datetime.datetime | None = None) -> datetime.datetime:
    """Parse a point in the past: a duration back from ``now``, or an ISO 8601 date or time.

    ``7d`` means seven days before now. ``2026-12-01`` is the start of that UTC day, and
    a date and time without an offset is taken as UTC.

    Raises:
        argparse.ArgumentTypeError: the text is neither, with examples of both.
    """
    if now is None:
        now = datetime.datetime.now(datetime.timezone.utc)
    try:
        return now - parse_duration(text)
    except argparse.ArgumentTypeError:
        pass
    except OverflowError:
        return datetime.datetime.min.replace(tzinfo=datetime.timezone.utc)
    moment = _parse_moment(text.strip())
    if moment is None:
        raise argparse.ArgumentTypeError(
            f"invalid time {text!r}: expected {_DURATION_EXAMPLES}, "
            "or a date such as 2026-12-01 or 2026-12-01T08:30"
        )
    if moment.utcoffset() is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    try:
        return moment.astimezone(datetime.timezone.utc)
    except OverflowError:
        # Such as 9999-12-31T23:00-05:00, whose UTC time is in the year 10000.
        raise argparse.ArgumentTypeError(
            f"invalid time {text!r}: its UTC time is outside the years 1 to 9999"
        ) from None


def _parse_moment(text: str) -> datetime.datetime | None:
    """Return the time that ``text`` gives in one of the forms of _MOMENT, or None.

    datetime.fromisoformat is not used, because Python 3.11 accepts many more forms than
    3.10 (such as 20261204 and 2026-W49), and the command takes the same forms on both.
    """
    match = _MOMENT.fullmatch(text)
    if match is None:
        return None
    try:
        day = datetime.date.fromisoformat(match["date"])
        clock = datetime.time(
            int(match["hour"] or 0),
            int(match["minute"] or 0),
            int(match["second"] or 0),
            int((match["fraction"] or "0").ljust(6, "0")),
        )
    except ValueError:
        return None  # such as 2026-02-30 or 25:00
    moment = datetime.datetime.combine(day, clock)
    offset = match["offset"]
    if offset is None:
        return moment
    if offset.upper() == "Z":
        return moment.replace(tzinfo=datetime.timezone.utc)
    hours, minutes = int(offset[1:3]), int(offset[4:6])
    if hours > 23 or minutes > 59:
        return None
    delta = datetime.timedelta(hours=hours, minutes=minutes)
    sign = 1 if offset[0] == "+" else -1
    return moment.replace(tzinfo=datetime.timezone(sign * delta))


def parse_text(text: str) -> str:
    """Check that ``text``, such as an agent name or a run id, is valid UTF-8.

    Python passes command-line bytes that are not UTF-8 as lone surrogates, which the
    index and the journal cannot hold, so no run can match them.

    Raises:
        argparse.ArgumentTypeError: the text is not valid UTF-8.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        escaped = text.encode("utf-8", "surrogateescape").decode("ascii", "backslashreplace")
        raise argparse.ArgumentTypeError(
            f"invalid value '{escaped}': not valid UTF-8, which agent names and run ids are"
        ) from None
    return text
