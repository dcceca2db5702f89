"""``telemetry tail``: print the journal's records as agents append them."""

from __future__ import annotations

import argparse
import functools
import signal
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import FrameType
from typing import Any

import orjson

from telemetry.cli._args import parse_count, parse_text
from telemetry.cli._context import EXIT_OK, CommandContext, CommandError
from telemetry.cli._output import format_duration, format_time, printable
from telemetry.database import DatabaseWriter

__all__ = ["register"]

DEFAULT_BACKLOG = 10
MAX_BACKLOG = 1_000_000
"""The largest --lines: the backlog is kept in memory until today's file has been read."""
PAYLOAD_WIDTH = 80
"""Characters of an event's payload or a run's error summary shown on a line."""
AGENTS_REMEMBERED = 10_000
"""Run ids whose agent name is kept, for events that were journaled without one."""

# Wrapped by hand, because RawDescriptionHelpFormatter keeps the line breaks.
_DESCRIPTION = """\
Print the last records of today's journal file, then each record as any process
appends it, moving on to the next day's file at midnight UTC.
"""
_EPILOG = """\
examples:
  telemetry tail
  telemetry tail --agent stdlib-audit --type run_end --type file_failed
  telemetry tail --json --lines 0 | jq .run_id

Each line shows the record's time (UTC), its record type, the agent, the run id, and
then the status of a run or the event type and payload of an event. Press Ctrl-C to
stop; the exit code is then 0.
"""


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``tail`` subcommand's parser to ``commands``."""
    parser = commands.add_parser(
        "tail",
        parents=[common],
        help="follow today's journal as records arrive",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--agent",
        action="append",
        type=parse_text,
        metavar="NAME",
        help="only records of this agent; repeat the option for several agents",
    )
    parser.add_argument(
        "--type",
        action="append",
        dest="types",
        metavar="TYPE",
        help=(
            "only records of this record type (run_start, run_end, event) or events of "
            "this event type; repeat the option for several types. Event types are "
            "whatever agents log, so a misspelt type is not an error: it matches nothing"
        ),
    )
    parser.add_argument(
        "--lines",
        type=functools.partial(parse_count, minimum=0, maximum=MAX_BACKLOG),
        default=DEFAULT_BACKLOG,
        metavar="N",
        help=(
            f"first take the last N records of today's file, then apply --agent and "
            f"--type to them, so fewer than N may be shown (default: {DEFAULT_BACKLOG}; "
            f"0 shows only new records; at most {MAX_BACKLOG})"
        ),
    )
    parser.add_argument(
        "--json", action="store_true", help="print each record as one line of JSON (NDJSON)"
    )
    parser.set_defaults(handler=tail)


def tail(args: argparse.Namespace, context: CommandContext) -> int:
    """Follow the journal and print the records that pass the filters until Ctrl-C."""
    config = context.config
    if not config.ndjson_dir.exists() and not config.data_dir.exists():
        raise CommandError(
            f"no store at {config.data_dir}: pass --data-dir or set TELEMETRY_DATA_DIR to "
            "the directory that your agents write to"
        )
    if context.err.isatty():
        context.err.write(f"following the journal in {config.ndjson_dir}; press Ctrl-C to stop\n")
        context.err.flush()

    agents = _AgentNames(context)
    agent_filter = set(args.agent or ())
    type_filter = set(args.types or ())
    stop = threading.Event()
    with _stop_on_interrupt(stop):
        try:
            records = context.journal().follow(backlog=args.lines, stop=stop.is_set)
            for record in records:
                agent = agents.resolve(record)
                if agent_filter and agent not in agent_filter:
                    continue
                if type_filter and not _has_type(record, type_filter):
                    continue
                if args.json:
                    line = orjson.dumps(record).decode("utf-8")
                else:
                    line = format_record(record, agent)
                context.out.write(line + "\n")
                context.out.flush()
        except KeyboardInterrupt:
            # A second Ctrl-C while the first one's stop was still pending.
            pass
    return EXIT_OK


def format_record(record: Mapping[str, Any], agent: str | None) -> str:
    """Return one journal record as a line for people.

    The journal may hold any JSON object, so every value is checked before it is shown,
    and control characters are escaped so that they cannot act on the terminal.
    """
    record_type = _text(record.get("record_type"))
    if record_type == "event":
        moment = record.get("timestamp")
        detail = f"{_text(record.get('event_type'))}  {_short_json(record.get('payload'))}"
    elif record_type == "run_end":
        moment = record.get("end_time")
        detail = _describe_end(record)
    else:
        moment = record.get("start_time")
        detail = f"{_text(record.get('status'))}  job {_text(record.get('job_type'))}"

    shown_time = format_time(moment) if isinstance(moment, str) else "-"
    return "  ".join(
        [
            printable(shown_time),
            f"{record_type:<9}",
            _text(agent),
            _text(record.get("run_id")),
            detail,
        ]
    ).rstrip()


class _AgentNames:
    """Finds the agent of each record, for events journaled with agent_name null.

    A client writes agent_name null on an event of a run that another client started.
    The name then comes from the run_start or run_end lines seen so far, else from the
    run's row in the index.
    """

    def __init__(self, context: CommandContext) -> None:
        self._context = context
        self._names: OrderedDict[str, str | None] = OrderedDict()
        self._index: DatabaseWriter | None = None
        self._index_unavailable = False

    def resolve(self, record: Mapping[str, Any]) -> str | None:
        run_id = record.get("run_id")
        agent = record.get("agent_name")
        if not isinstance(run_id, str):
            return agent if isinstance(agent, str) else None
        if isinstance(agent, str):
            self._remember(run_id, agent)
            return agent
        if run_id not in self._names:
            self._remember(run_id, self._look_up(run_id))
        return self._names[run_id]

    def _remember(self, run_id: str, agent: str | None) -> None:
        self._names[run_id] = agent
        self._names.move_to_end(run_id)
        if len(self._names) > AGENTS_REMEMBERED:
            self._names.popitem(last=False)

    def _look_up(self, run_id: str) -> str | None:
        index = self._open_index()
        if index is None:
            return None
        try:
            found = index.get_run(run_id)
        except ValueError:
            return None  # not a valid run id, so no row has it
        except sqlite3.Error:
            # Locked or damaged: events of runs whose start was not seen show "-" as
            # their agent from now on.
            self._index_unavailable = True
            return None
        return None if found is None else found.agent_name

    def _open_index(self) -> DatabaseWriter | None:
        if self._index is None and not self._index_unavailable:
            try:
                self._index = self._context.open_index(write=False)
            except (CommandError, sqlite3.Error):
                self._index_unavailable = True
        return self._index


@contextmanager
def _stop_on_interrupt(stop: threading.Event) -> Iterator[None]:
    """Turn the first Ctrl-C into ``stop.set()``, and let a second one raise KeyboardInterrupt.

    The reader checks ``stop`` between polls, so it ends between two reads and never in
    the middle of one. Outside the main thread, signals cannot be handled and Ctrl-C
    raises KeyboardInterrupt as usual.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _has_type(record: Mapping[str, Any], types: set[str]) -> bool:
    record_type = record.get("record_type")
    if record_type in types:
        return True
    return record_type == "event" and record.get("event_type") in types


def _describe_end(record: Mapping[str, Any]) -> str:
    duration = record.get("duration_ms")
    if isinstance(duration, bool) or not isinstance(duration, (int, float)):
        duration = None
    parts = [
        _text(record.get("status")),
        format_duration(duration),
        f"items {_text(record.get('items_succeeded'))} ok, "
        f"{_text(record.get('items_failed'))} failed",
    ]
    error = record.get("error_summary")
    if isinstance(error, str) and error:
        parts.append(_shorten(printable(" ".join(error.split()))))
    return "  ".join(parts)


def _short_json(value: Any) -> str:
    if value is None or value == {}:
        return ""
    try:
        text = orjson.dumps(value).decode("utf-8")
    except TypeError:
        text = repr(value)
    return _shorten(printable(text))


def _shorten(text: str) -> str:
    if len(text) <= PAYLOAD_WIDTH:
        return text
    return text[: PAYLOAD_WIDTH - 3] + "..."


def _text(value: object) -> str:
    if value is None or value == "":
        return "-"
    return printable(str(value))
