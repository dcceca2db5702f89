"""The runs, show and export subcommands: list runs, show one run, write runs to a file."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sqlite3
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO, TypedDict

import orjson

from telemetry.cli._args import COUNT_MAX, parse_count, parse_since, parse_text
from telemetry.cli._context import EXIT_OK, CommandContext, CommandError, UsageError
from telemetry.cli._otlp import export_otlp
from telemetry.cli._output import (
    format_duration,
    format_time,
    plural,
    print_json,
    print_table,
    printable,
)
from telemetry.models import STATUSES, RunRecord, get_iso8601_timestamp

__all__ = ["register"]

DEFAULT_LIMIT = 20
EXPORT_FORMATS = ("csv", "ndjson")
# --output suffixes that choose the export format when --format is not given.
_FORMAT_OF_SUFFIX = {".csv": "csv", ".ndjson": "ndjson", ".jsonl": "ndjson", ".json": "ndjson"}
CSV_COLUMNS = tuple(field.name for field in dataclasses.fields(RunRecord))
# First characters that make a spreadsheet read a cell as a formula: those of OWASP ASVS
# requirement 1.2.10 (= + - @, tab and NUL), and carriage return, which other lists add.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\0")

# Wrapped by hand, because RawDescriptionHelpFormatter, which keeps the line breaks of
# the examples, keeps those of the description too.
_SHOW_DESCRIPTION = """\
Show every field of one run that has a value, then its events from the journal in the
order they were written. Only the journal files of the days the run spans are read.
RUN_ID is the whole run id, as 'telemetry runs' prints it.
"""
_EXPORT_DESCRIPTION = """\
Write the runs that match the filters, newest first, to stdout or to a file. Rows are
read in batches, so an export of any size needs little memory. With --output the runs
go to a temporary file in the same directory, which is renamed to FILE only when it is
complete. CSV text cells that start with = + - @ get a leading ' unless
--allow-formulas is given. With --otlp, the runs and their events are read from the
journal instead and sent as OpenTelemetry spans to an OTLP/HTTP collector, with the ids
the live bridge gives them (docs/opentelemetry.md).
"""
_RUNS_EXAMPLE = """\
examples:
  telemetry runs
  telemetry runs --agent stdlib-audit --status failed --since 2d
  telemetry runs --since 2026-12-01 --limit 100 --json
"""
_SHOW_EXAMPLE = """\
example:
  telemetry show 20261204T193417123456Z-stdlib-audit-3f9a2c1b7d4e5a60
"""
_EXPORT_EXAMPLE = """\
examples:
  telemetry export --since 30d --output runs.csv
  telemetry export --agent stdlib-audit --format ndjson | gzip > audit.ndjson.gz
  telemetry export --otlp http://127.0.0.1:4318 --since 7d
"""


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add the runs, show and export subcommands to ``commands``."""
    runs = commands.add_parser(
        "runs",
        parents=[common],
        help="list recent runs, newest first",
        description="List the runs in the index as a table, newest start first.",
        epilog=_RUNS_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_filters(runs)
    runs.add_argument(
        "--limit",
        type=parse_count,
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"the number of runs to show (default: {DEFAULT_LIMIT})",
    )
    runs.add_argument(
        "--json", action="store_true", help="print a JSON list of the runs with every field"
    )
    runs.set_defaults(handler=list_runs)

    show = commands.add_parser(
        "show",
        parents=[common],
        help="show one run and its events",
        description=_SHOW_DESCRIPTION,
        epilog=_SHOW_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("run_id", type=parse_text, metavar="RUN_ID", help="the id of the run")
    show.add_argument(
        "--json", action="store_true", help='print {"run": {...}, "events": [...]} as JSON'
    )
    show.set_defaults(handler=show_run)

    export = commands.add_parser(
        "export",
        parents=[common],
        help="write runs as CSV or NDJSON",
        description=_EXPORT_DESCRIPTION,
        epilog=_EXPORT_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_filters(export)
    export.add_argument(
        "--limit", type=parse_count, metavar="N", help="write at most N runs (default: all)"
    )
    export.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        help="csv or ndjson (default: from the suffix of --output, .csv or .ndjson/.jsonl, "
        "else ndjson)",
    )
    export.add_argument("--json", action="store_true", help="the same as --format ndjson")
    export.add_argument(
        "--output",
        "-o",
        type=Path,
        metavar="FILE",
        help="write to FILE; - is stdout (default: stdout)",
    )
    export.add_argument(
        "--allow-formulas",
        action="store_true",
        help="write CSV text cells unchanged, even those that start with = + - @ (by "
        "default such a cell gets a leading ' so that spreadsheets show it as text)",
    )
    export.add_argument(
        "--otlp",
        nargs="?",
        const="",
        metavar="ENDPOINT",
        help="send the runs from the journal as spans to the OTLP/HTTP collector at ENDPOINT "
        "(default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else OTEL_EXPORTER_OTLP_ENDPOINT, "
        "else http://localhost:4318); /v1/traces is appended to a base URL",
    )
    export.set_defaults(handler=export_runs)


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--agent", type=parse_text, metavar="NAME", help="only runs of this agent")
    parser.add_argument(
        "--status",
        choices=STATUSES,
        metavar="STATUS",
        help=f"only runs with this status: {', '.join(STATUSES)}",
    )
    parser.add_argument(
        "--since",
        type=parse_since,
        metavar="WHEN",
        help="only runs that started at or after WHEN: a duration back from now (2h, 7d) "
        "or a date or time (2026-12-01, 2026-12-01T08:30; UTC unless an offset is given)",
    )
    parser.add_argument(
        "--until",
        type=parse_since,
        metavar="WHEN",
        help="only runs that started before WHEN, in the same forms as --since",
    )


class _RunFilters(TypedDict):
    """The keyword arguments of DatabaseWriter.list_runs and iter_runs that filter runs."""

    agent_name: str | None
    status: str | None
    since: str | None
    until: str | None


def _filters(args: argparse.Namespace) -> _RunFilters:
    """Return the filters that --agent, --status, --since and --until ask for.

    Raises:
        UsageError: --until is not later than --since, so no run could match.
    """
    if args.since is not None and args.until is not None and args.until <= args.since:
        raise UsageError(
            f"--until {get_iso8601_timestamp(args.until)} is not later than --since "
            f"{get_iso8601_timestamp(args.since)}, so no run could match: swap them, or "
            "give an --until after --since"
        )
    return {
        "agent_name": args.agent,
        "status": args.status,
        "since": None if args.since is None else get_iso8601_timestamp(args.since),
        "until": None if args.until is None else get_iso8601_timestamp(args.until),
    }


@contextmanager
def _reading_rows(context: CommandContext, run_id: str | None = None) -> Iterator[None]:
    """Report a row of the index that cannot be turned into a RunRecord as a CommandError.

    Wrap only the calls that read rows: their arguments come from the parser and are
    valid, so a ValueError there means that RunRecord.from_dict rejected a stored row,
    for instance one whose metrics_json is not valid JSON. The journal normally still has
    the run, so rebuilding the index from it repairs the row. ``run_id`` is the row's id
    when the caller knows it.
    """
    try:
        yield
    except UnicodeError:
        raise  # an argument that SQLite cannot encode, such as a lone surrogate
    except ValueError as exc:
        if run_id is None:
            problem = _describe_unreadable_rows(context, exc)
        else:
            problem = f"the row of run {run_id}, which cannot be read ({exc})"
        raise CommandError(
            f"the index {context.config.db_path} has {problem}: "
            "run 'telemetry rebuild' to rebuild the index from the journal"
        ) from None


def _describe_unreadable_rows(context: CommandContext, error: ValueError) -> str:
    """Name the unreadable rows of the index, found by reading every row again.

    A listing's ValueError does not say which row failed, so this scan, which runs only
    after such a failure, names the first run and counts the others.
    """
    try:
        rows = context.open_index(write=False).unreadable_rows()
    except sqlite3.Error:
        rows = []
    if not rows:
        return f"a row that cannot be read ({error})"
    run_id, reason = rows[0]
    if len(rows) == 1:
        return f"a row that cannot be read: run {run_id} ({reason})"
    return f"{len(rows)} rows that cannot be read, the first of run {run_id} ({reason})"


def _read_each(runs: Iterator[RunRecord], context: CommandContext) -> Iterator[RunRecord]:
    """Yield the runs of ``runs``, reporting an unreadable row as _reading_rows does."""
    while True:
        with _reading_rows(context):
            run = next(runs, None)
        if run is None:
            return
        yield run


# -- runs -----------------------------------------------------------------------------------


def list_runs(args: argparse.Namespace, context: CommandContext) -> int:
    """Print the newest runs that match the filters, as a table or as JSON."""
    filters = _filters(args)
    index = context.open_index(write=False)
    # Reading one run more than the limit shows whether more runs match. At COUNT_MAX,
    # SQLite's largest integer, every run fits anyway.
    with _reading_rows(context):
        runs = index.list_runs(**filters, limit=min(args.limit + 1, COUNT_MAX))
    more = len(runs) > args.limit
    runs = runs[: args.limit]

    if args.json:
        print_json([run.to_dict() for run in runs], context.out)
        return EXIT_OK
    if not runs:
        print("no runs match", file=context.out)
        return EXIT_OK

    header = ("RUN ID", "AGENT", "STATUS", "START (UTC)", "DURATION", "ITEMS OK/FAILED")
    print_table(header, [_run_row(run) for run in runs], context.out)
    if more:
        subject = "the newest run is" if args.limit == 1 else f"the {args.limit} newest runs are"
        print(
            f"{subject} shown; more match (raise --limit to see them)",
            file=context.err,
        )
    return EXIT_OK


def _run_row(run: RunRecord) -> tuple[str, ...]:
    return (
        run.run_id,
        run.agent_name,
        run.status,
        format_time(run.start_time),
        format_duration(run.duration_ms),
        f"{run.items_succeeded}/{run.items_failed}",
    )


# -- show -----------------------------------------------------------------------------------

# Fields printed as an indented block under their name, because they span lines.
_BLOCK_FIELDS = ("error_details", "metrics_json")
_TIME_FIELDS = ("start_time", "end_time", "api_posted_at", "created_at", "updated_at")


def show_run(args: argparse.Namespace, context: CommandContext) -> int:
    """Print one run's fields and its journal events.

    Raises:
        CommandError: no run has the id RUN_ID.
    """
    index = context.open_index(write=False)
    with _reading_rows(context, args.run_id):
        run = index.get_run(args.run_id)
    if run is None:
        raise CommandError(
            f"no run {args.run_id!r} in the index {context.config.db_path}: "
            "run 'telemetry runs' to list the run ids"
        )
    records = context.journal().run_records(run.run_id, run.start_time, run.end_time)
    events = [record for record in records if record.get("record_type") == "event"]

    if args.json:
        print_json({"run": run.to_dict(), "events": events}, context.out)
        return EXIT_OK

    _print_fields(run, context.out)
    print(file=context.out)
    if not records:
        print(
            "events: the journal has no records of this run (its files may have been pruned)",
            file=context.out,
        )
    elif not events:
        print("events: none", file=context.out)
    else:
        print(f"events ({len(events)}):", file=context.out)
        for event in events:
            print(f"  {_format_event(event)}", file=context.out)
    return EXIT_OK


def _print_fields(run: RunRecord, out: TextIO) -> None:
    """Print the fields that have a value, one per line, and the multi-line ones as blocks."""
    values = run.to_dict()
    with_value = {name: value for name, value in values.items() if value not in (None, "")}
    width = max(len(name) for name in with_value)
    for name, value in with_value.items():
        if name in _BLOCK_FIELDS:
            continue
        print(f"{name.ljust(width)}  {printable(_format_field(name, value))}", file=out)
    for name in _BLOCK_FIELDS:
        if name not in with_value:
            continue
        value = with_value[name]
        text = value if isinstance(value, str) else _pretty_json(value)
        print(f"{name}:", file=out)
        for line in text.splitlines():
            print(f"  {printable(line)}", file=out)


def _format_field(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if name == "duration_ms" and value >= 1000:
        return f"{format_duration(value)} ({value} ms)"
    if name == "duration_ms":
        return format_duration(value)
    if name in _TIME_FIELDS:
        return _format_precise_time(value)
    return str(value)


def _format_precise_time(timestamp: str) -> str:
    """Return a stored UTC timestamp as ``YYYY-MM-DD HH:MM:SS.mmm UTC``."""
    milliseconds = timestamp[19:23] if timestamp[19:20] == "." else ""
    return f"{format_time(timestamp)}{milliseconds} UTC"


def _format_event(event: dict[str, Any]) -> str:
    timestamp = event.get("timestamp")
    when = _format_precise_time(timestamp) if isinstance(timestamp, str) else "-"
    line = f"{when}  {printable(str(event.get('event_type', '?')))}"
    payload = event.get("payload")
    if payload:
        line += "  " + orjson.dumps(payload).decode("utf-8")
    return line


def _pretty_json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode("utf-8")


# -- export ---------------------------------------------------------------------------------


def export_runs(args: argparse.Namespace, context: CommandContext) -> int:
    """Write the runs that match the filters as CSV or NDJSON, to stdout or to --output.

    An --output of ``-`` is stdout. With --otlp, send them as spans instead (_otlp.py).

    Raises:
        UsageError: --json together with --format csv, or --output is a directory.
        CommandError: the output file cannot be written.
    """
    if args.otlp is not None:
        return export_otlp(args, context, _filters(args))
    export_format = _export_format(args)
    output: Path | None = None if args.output == Path("-") else args.output
    if output is not None and output.is_dir():
        raise UsageError(f"--output {output} is a directory: pass a file name such as runs.csv")
    if output is not None:
        _reject_store_file(output, context)
    filters = _filters(args)

    index = context.open_index(write=False)
    runs = _read_each(index.iter_runs(**filters, limit=args.limit), context)

    def write(stream: TextIO) -> int:
        if export_format == "csv":
            return write_csv(runs, stream, allow_formulas=args.allow_formulas)
        return write_ndjson(runs, stream)

    if output is None:
        write(context.out)
        return EXIT_OK
    count = _write_output(output, write)
    print(f"exported {plural(count, 'run')} to {output} ({export_format})", file=context.err)
    return EXIT_OK


def _reject_store_file(output: Path, context: CommandContext) -> None:
    """Raise UsageError when ``output`` is one of the store's own files.

    Those are the files in the journal directory, the index, and the files whose names
    start with the index's name and a dot or hyphen: SQLite's -wal, -shm and -journal,
    the backups and the temporary files of rebuild. Writing the export there would
    replace the journal, which is the only full record of the runs, or the index.
    Symbolic links are followed, as the export itself follows them.
    """
    config = context.config
    target = Path(os.path.realpath(output))
    journal = Path(os.path.realpath(config.ndjson_dir))
    if target == journal or journal in target.parents:
        raise UsageError(
            f"--output {output} is in the journal directory {config.ndjson_dir}, which "
            "is for journal files only: pass a file outside it"
        )
    index = Path(os.path.realpath(config.db_path))
    prefixes = (index.name + ".", index.name + "-")
    is_index_file = target.parent == index.parent and (
        target.name == index.name or target.name.startswith(prefixes)
    )
    if is_index_file or _same_file(target, index):
        raise UsageError(
            f"--output {output} is the index {config.db_path} or one of its own files "
            "(-wal, -shm, backups): pass another file name"
        )


def _same_file(first: Path, second: Path) -> bool:
    """Return whether both paths exist and are the same file, such as two hard links."""
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def _export_format(args: argparse.Namespace) -> str:
    """Return the format that --format, --json and the --output suffix ask for."""
    if args.json:
        if args.format == "csv":
            raise UsageError("--json asks for NDJSON but --format is csv: pass only one of them")
        return "ndjson"
    if args.format is not None:
        return str(args.format)
    if args.output is not None:
        return _FORMAT_OF_SUFFIX.get(args.output.suffix.lower(), "ndjson")
    return "ndjson"


def write_ndjson(runs: Iterable[RunRecord], stream: TextIO) -> int:
    """Write each run as one JSON object per line; return the number of runs written."""
    count = 0
    for run in runs:
        stream.write(orjson.dumps(run.to_dict()).decode("utf-8") + "\n")
        count += 1
    return count


def write_csv(runs: Iterable[RunRecord], stream: TextIO, *, allow_formulas: bool = False) -> int:
    """Write a header of the RunRecord fields, then one row per run; return the rows written.

    None is an empty cell, api_posted is ``true`` or ``false``, and metrics_json is JSON
    text. Unless ``allow_formulas``, a text cell that starts with = + - @, a tab, a
    carriage return or NUL gets a leading ``'``, so that a spreadsheet shows it as text
    instead of running it as a formula. Lines end with ``\\n``.
    """
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    count = 0
    for run in runs:
        writer.writerow(
            [_csv_cell(getattr(run, name), allow_formulas=allow_formulas) for name in CSV_COLUMNS]
        )
        count += 1
    return count


def _csv_cell(value: Any, *, allow_formulas: bool) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        value = orjson.dumps(value).decode("utf-8")
    if isinstance(value, str) and not allow_formulas and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def _write_output(path: Path, write: Callable[[TextIO], int]) -> int:
    """Call ``write`` with ``path`` opened for writing, atomically when it is a regular file.

    A path that exists and is not a regular file, such as /dev/null, /dev/stdout or a
    named pipe, is written directly: renaming a file over it would replace the device or
    pipe. A symbolic link is followed, so that the link keeps pointing at the new file.

    Raises:
        CommandError: the file cannot be opened, written or renamed.
    """
    try:
        mode: int | None = path.stat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise CommandError(f"cannot write {path}: {exc.strerror or exc}") from None

    if mode is not None and not stat.S_ISREG(mode):
        try:
            with open(path, "w", encoding="utf-8", newline="") as stream:
                return write(stream)
        except OSError as exc:
            raise CommandError(f"cannot write {path}: {exc.strerror or exc}") from None
    return _write_file_atomically(Path(os.path.realpath(path)), write)


def _write_file_atomically(path: Path, write: Callable[[TextIO], int]) -> int:
    """Call ``write`` with a temporary file beside ``path``, then rename it to ``path``.

    The file is synced before the rename, so ``path`` is either the old file or the whole
    new one. On any error, or Ctrl-C, the temporary file is removed. The new file is
    readable by its owner only (mode 0600), as the store is.

    Raises:
        CommandError: the temporary file cannot be created, written or renamed.
    """
    directory = path.parent
    try:
        descriptor, temporary_name = tempfile.mkstemp(
            dir=directory, prefix=f".{path.name}.", suffix=".tmp"
        )
    except OSError as exc:
        raise CommandError(
            f"cannot write {path}: {exc.strerror or exc}: check that {directory} exists "
            "and is writable"
        ) from None

    temporary = Path(temporary_name)
    try:
        with open(descriptor, "w", encoding="utf-8", newline="") as stream:
            count = write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise CommandError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return count
