"""Command-line parsing: the parser class, counts, durations and points in time."""

from __future__ import annotations

import argparse
import datetime
import re
import sys
from typing import NoReturn

__all__ = [
    "CommandParser",
    "parse_count",
    "parse_duration",
    "parse_since",
]

_DURATION_PART = re.compile(r"(\d+)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_EXAMPLES = "a duration such as 30m, 2h, 7d or 1h30m"


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr, with exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: {message} (see '{self.prog} --help')\n")
        sys.exit(2)


def parse_count(text: str, minimum: int = 1) -> int:
    """Parse a whole number of ``minimum`` or more, for options such as ``--limit``.

    For another minimum, pass ``functools.partial(parse_count, minimum=0)`` as the type.

    Raises:
        argparse.ArgumentTypeError: the text is not a whole number, or it is below ``minimum``.
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid count {text!r}: expected a whole number of {minimum} or more"
        ) from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"invalid count {value}: expected {minimum} or more")
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
    try:
        moment = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid time {text!r}: expected {_DURATION_EXAMPLES}, "
            "or a date such as 2026-12-01 or 2026-12-01T08:30"
        ) from None
    if moment.utcoffset() is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    try:
        return moment.astimezone(datetime.timezone.utc)
    except OverflowError:
        # Such as 9999-12-31T23:00-05:00, whose UTC time is in the year 10000.
        raise argparse.ArgumentTypeError(
            f"invalid time {text!r}: its UTC time is outside the years 1 to 9999"
        ) from None
