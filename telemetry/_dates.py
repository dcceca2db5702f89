"""Dates of the journal: the UTC day of a time, the text forms of a day, and file names.

A journal file is named ``events_YYYYMMDD.ndjson`` after the UTC day of the records it
contains. NDJSONWriter, JournalReader and the retention code share these helpers.
"""

from __future__ import annotations

import datetime
import re

from telemetry.models import parse_timestamp

__all__ = [
    "FILE_PREFIX",
    "FILE_SUFFIX",
    "date_of_file_name",
    "file_name",
    "normalise_date",
    "utc_date",
    "utc_today",
]

FILE_PREFIX = "events_"
FILE_SUFFIX = ".ndjson"

_DATE_PATTERN = re.compile(r"([0-9]{4})-?([0-9]{2})-?([0-9]{2})")
_DATE_FORMS = "YYYYMMDD or YYYY-MM-DD, such as 20261204 or 2026-12-04"


def normalise_date(date_str: str) -> str:
    """Return ``date_str`` as YYYYMMDD.

    Raises:
        TypeError: ``date_str`` is not a str.
        ValueError: it is not YYYYMMDD or YYYY-MM-DD, or not a real date.
    """
    if not isinstance(date_str, str):
        raise TypeError(
            f"date_str must be a str in the form {_DATE_FORMS}, not {type(date_str).__name__}"
        )
    match = _DATE_PATTERN.fullmatch(date_str)
    if match is not None and len(date_str) in (8, 10):
        year, month, day = (int(part) for part in match.groups())
        try:
            datetime.date(year, month, day)
        except ValueError:
            pass
        else:
            return "".join(match.groups())
    raise ValueError(f"invalid date {date_str!r}: expected {_DATE_FORMS}")


def file_name(date: str) -> str:
    """Return the journal file name of ``date``, which must already be YYYYMMDD."""
    return f"{FILE_PREFIX}{date}{FILE_SUFFIX}"


def date_of_file_name(name: str) -> str | None:
    """Return the YYYYMMDD date of a journal file name, or None for any other name."""
    if not (name.startswith(FILE_PREFIX) and name.endswith(FILE_SUFFIX)):
        return None
    date = name[len(FILE_PREFIX) : -len(FILE_SUFFIX)]
    if len(date) != 8:
        return None
    try:
        return normalise_date(date)
    except ValueError:
        return None


def utc_date(value: str | datetime.datetime) -> str:
    """Return the UTC date of a timestamp as YYYYMMDD.

    Raises:
        ValueError: the text is not ISO 8601 with an offset, or the datetime is naive.
        TypeError: ``value`` is neither a str nor a datetime.
    """
    moment = parse_timestamp(value)
    return moment.astimezone(datetime.timezone.utc).strftime("%Y%m%d")


def utc_today() -> str:
    """Return today's UTC date as YYYYMMDD."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
