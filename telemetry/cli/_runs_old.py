"""The ``telemetry`` command: look at the runs recorded in the local store.

    telemetry runs [--agent NAME] [--status STATUS] [--limit N] [--json]
    telemetry stats [--json]

``--data-dir`` selects the store, as ``TELEMETRY_DATA_DIR`` does. Exit codes: 0 ok, 1 an
operation failed, 2 a usage error.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import orjson

from telemetry.config import TelemetryConfig
from telemetry.database import DatabaseWriter
from telemetry.errors import ConfigError, TelemetryError
from telemetry.models import STATUSES, RunRecord

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class CommandError(Exception):
    """An expected fault, reported as one line on stderr with exit code 1."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command with ``argv`` (default: sys.argv[1:]) and return its exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        config = TelemetryConfig(data_dir=args.data_dir).validate()
        index = _open_index(config)
        try:
            return int(args.handler(index, config, args, sys.stdout))
        finally:
            index.close()
    except ConfigError as exc:
        print(f"telemetry: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (CommandError, TelemetryError, sqlite3.Error, OSError) as exc:
        print(f"telemetry: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data-dir",
        type=Path,
        help="the store to read (default: TELEMETRY_DATA_DIR, else the XDG data directory)",
    )
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")

    parser = argparse.ArgumentParser(
        prog="telemetry", description="Look at the runs agent-telemetry recorded."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    runs = commands.add_parser("runs", parents=[common], help="list recent runs, newest first")
    runs.add_argument("--agent", help="only runs of this agent")
    runs.add_argument("--status", choices=STATUSES, help="only runs with this status")
    runs.add_argument(
        "--limit", type=_positive_int, default=20, help="number of runs to show (default: 20)"
    )
    runs.set_defaults(handler=_show_runs)

    stats = commands.add_parser("stats", parents=[common], help="run counts per status and agent")
    stats.set_defaults(handler=_show_stats)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid count {text!r}: expected a whole number"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid count {value}: expected 1 or more")
    return value


def _open_index(config: TelemetryConfig) -> DatabaseWriter:
    if not config.db_path.is_file():
        raise CommandError(
            f"no index at {config.db_path}: run an agent first, or pass --data-dir "
            "or set TELEMETRY_DATA_DIR to the store to read"
        )
    return DatabaseWriter(config.db_path)


def _show_runs(
    index: DatabaseWriter, config: TelemetryConfig, args: argparse.Namespace, out: TextIO
) -> int:
    runs = index.list_runs(agent_name=args.agent, status=args.status, limit=args.limit)
    if args.json:
        _print_json([run.to_dict() for run in runs], out)
        return EXIT_OK
    if not runs:
        print("no runs match", file=out)
        return EXIT_OK
    header = ("RUN ID", "AGENT", "STATUS", "START (UTC)", "DURATION", "ITEMS OK/FAILED")
    _print_table(header, [_run_row(run) for run in runs], out)
    return EXIT_OK


def _run_row(run: RunRecord) -> tuple[str, ...]:
    return (
        run.run_id,
        run.agent_name,
        run.status,
        run.start_time[:19].replace("T", " "),
        _format_duration(run.duration_ms),
        f"{run.items_succeeded}/{run.items_failed}",
    )


def _show_stats(
    index: DatabaseWriter, config: TelemetryConfig, args: argparse.Namespace, out: TextIO
) -> int:
    stats = index.get_run_stats()
    if args.json:
        _print_json(stats, out)
        return EXIT_OK

    by_status = ", ".join(
        f"{status} {count}" for status, count in stats["by_status"].items() if count
    )
    print(f"runs: {stats['total_runs']} ({by_status or 'none'})", file=out)
    if config.api_configured:
        print(f"pending API posts: {stats['pending_api_posts']}", file=out)
    else:
        print("API posting: off (TELEMETRY_API_URL is not set)", file=out)
    if not stats["by_agent"]:
        return EXIT_OK
    print(file=out)
    header = (
        "AGENT",
        "RUNS",
        "SUCCESS",
        "PARTIAL",
        "FAILED",
        "RUNNING",
        "SUCCESS RATE",
        "AVG DURATION",
    )
    rows = []
    for agent, counts in sorted(stats["by_agent"].items()):
        finished = counts["runs"] - counts["running"]
        rate = f"{100 * counts['success'] / finished:.0f}%" if finished else "-"
        average = counts["avg_duration_ms"]
        rows.append(
            (
                agent,
                str(counts["runs"]),
                str(counts["success"]),
                str(counts["partial"]),
                str(counts["failed"]),
                str(counts["running"]),
                rate,
                _format_duration(None if average is None else round(average)),
            )
        )
    _print_table(header, rows, out)
    return EXIT_OK


def _format_duration(milliseconds: int | None) -> str:
    if milliseconds is None:
        return "-"
    if milliseconds < 1000:
        return f"{milliseconds} ms"
    seconds = milliseconds / 1000
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    for row in [header, *rows]:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip(), file=out)


def _print_json(value: Any, out: TextIO) -> None:
    out.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode("utf-8") + "\n")
