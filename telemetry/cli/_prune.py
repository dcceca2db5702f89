"""``telemetry prune``: delete old journal files and index rows."""

from __future__ import annotations

import argparse
import datetime
from typing import Any

from telemetry.cli._args import parse_duration
from telemetry.cli._context import EXIT_OK, CommandContext, UsageError
from telemetry.cli._output import format_bytes, plural, print_json
from telemetry.retention import MIN_OLDER_THAN, PrunePlan, PruneResult, plan_prune, prune

__all__ = ["register"]

_EPILOG = """\
examples:
  telemetry prune --older-than 90d --dry-run
  telemetry prune --older-than 26w

The cutoff is the start (00:00 UTC) of the day --older-than before now. Journal files
dated before that day are deleted, and so are the index rows of runs that started
before it. --dry-run lists them and deletes nothing.
"""


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``prune`` subcommand's parser to ``commands``."""
    parser = commands.add_parser(
        "prune",
        parents=[common],
        help="delete old journal files and index rows",
        description=(
            "Delete the journal files and the index rows older than --older-than, with "
            "--dry-run to see first what would go."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--older-than",
        type=_parse_age,
        required=True,
        metavar="DURATION",
        help="delete what is older than this, such as 90d or 12w; at least 1d",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="list what would be deleted, and delete nothing"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(handler=prune_command)


def prune_command(args: argparse.Namespace, context: CommandContext) -> int:
    """Plan the deletion, then print the plan (--dry-run) or carry it out."""
    index = context.open_index()
    try:
        plan = plan_prune(index, context.journal(), args.older_than)
    except ValueError:  # the cutoff would fall before year 1
        raise UsageError(
            f"invalid --older-than of {args.older_than.days} days: too long, because the "
            "cutoff would fall before year 1"
        ) from None

    result: PruneResult | None = None
    if not args.dry_run and (plan.files or plan.runs):
        progress = context.progress("deleting", len(plan.files) + plan.runs)
        try:
            result = prune(index, plan, progress=progress.update)
        finally:
            progress.finish()

    if args.json:
        print_json(_as_json(plan, result, args.dry_run), context.out)
    else:
        _print_report(plan, result, args.dry_run, context)
    return EXIT_OK


def _print_report(
    plan: PrunePlan, result: PruneResult | None, dry_run: bool, context: CommandContext
) -> None:
    out = context.out
    cutoff = _format_cutoff(plan.cutoff)
    if not plan.files and not plan.runs:
        print(f"Nothing to delete: no journal file or run is older than {cutoff}.", file=out)
        return

    if dry_run:
        print(
            f"Would delete {plural(len(plan.files), 'journal file')} "
            f"({format_bytes(plan.bytes)}) and {plural(plan.runs, 'index row')} older than "
            f"{cutoff}:",
            file=out,
        )
    else:
        assert result is not None
        print(
            f"Deleted {plural(result.files_deleted, 'journal file')} "
            f"({format_bytes(result.bytes_deleted)}) and "
            f"{plural(result.runs_deleted, 'index row')} older than {cutoff}:",
            file=out,
        )
    for journal_file in plan.files:
        print(f"  {journal_file.path}", file=out)
    if dry_run:
        print("Nothing was deleted (--dry-run).", file=out)


def _as_json(plan: PrunePlan, result: PruneResult | None, dry_run: bool) -> dict[str, Any]:
    report: dict[str, Any] = {
        "dry_run": dry_run,
        "cutoff": plan.cutoff.isoformat(),
        "files": [
            {"date": journal_file.date, "path": str(journal_file.path)}
            for journal_file in plan.files
        ],
        "bytes": plan.bytes,
        "runs": plan.runs,
        "files_deleted": 0,
        "bytes_deleted": 0,
        "runs_deleted": 0,
    }
    if result is not None:
        report["files_deleted"] = result.files_deleted
        report["bytes_deleted"] = result.bytes_deleted
        report["runs_deleted"] = result.runs_deleted
    return report


def _format_cutoff(cutoff: datetime.datetime) -> str:
    utc = cutoff.astimezone(datetime.timezone.utc)
    return f"{utc.date().isoformat()} {utc:%H:%M} UTC"


def _parse_age(text: str) -> datetime.timedelta:
    age = parse_duration(text)
    if age < MIN_OLDER_THAN:
        raise argparse.ArgumentTypeError(
            f"invalid age {text!r}: expected 1d or more, because today's journal file is "
            "still being written"
        )
    try:
        datetime.datetime.now(datetime.timezone.utc) - age
    except OverflowError:
        raise argparse.ArgumentTypeError(
            f"invalid age {text!r}: too long, because the cutoff would fall before year 1"
        ) from None
    return age
