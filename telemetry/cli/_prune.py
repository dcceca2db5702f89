"""``telemetry prune``: delete old journal files and index rows."""

from __future__ import annotations

import argparse
import datetime
from typing import Any

from telemetry.cli._args import parse_duration
from telemetry.cli._context import EXIT_OK, CommandContext, CommandError, UsageError
from telemetry.cli._output import format_bytes, plural, print_json
from telemetry.models import get_iso8601_timestamp
from telemetry.retention import MIN_OLDER_THAN, PrunePlan, PruneResult, plan_prune, prune

__all__ = ["register"]

_EPILOG = """\
examples:
  telemetry prune --older-than 90d --dry-run
  telemetry prune --older-than 26w

The cutoff is the start (00:00 UTC) of the day --older-than before now. Journal files
dated before that day are deleted, and so are the index rows of runs that started and
ended before it. A run that ended after the cutoff keeps its row, and a run still
running that started before it loses its row. --dry-run counts those runs and lists the
files, and deletes nothing.

When the API is configured, prune deletes nothing and exits 1 if some of those runs are
not yet posted to the API: run 'telemetry flush' first, or pass --include-pending.
"""


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``prune`` subcommand's parser to ``commands``."""
    parser = commands.add_parser(
        "prune",
        parents=[common],
        help="delete old journal files and index rows",
        # Wrapped by hand, because RawDescriptionHelpFormatter keeps the line breaks.
        description=(
            "Delete the journal files and the index rows older than --older-than, with\n"
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
    parser.add_argument(
        "--include-pending",
        action="store_true",
        help="also delete runs not yet posted to the API (without it, prune stops when the "
        "API is configured and there are any)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(handler=prune_command)


def prune_command(args: argparse.Namespace, context: CommandContext) -> int:
    """Plan the deletion, then print the plan (--dry-run) or carry it out."""
    # A dry run only reads, so it also works on a store it may only read.
    index = context.open_index(write=not args.dry_run)
    now = datetime.datetime.now(datetime.timezone.utc)
    try:
        plan = plan_prune(index, context.journal(), args.older_than, now=now)
    except ValueError:  # the cutoff would fall before year 1
        raise UsageError(
            f"invalid --older-than of {args.older_than.days} days: too long, because the "
            "cutoff would fall before year 1"
        ) from None

    pending = _pending_runs(plan, context)
    running = _running_runs(plan, context)
    if pending and not args.dry_run and not args.include_pending:
        raise CommandError(
            f"{plural(pending, 'run')} older than {_format_cutoff(plan.cutoff)} "
            f"{'is' if pending == 1 else 'are'} not yet posted to the API: run 'telemetry "
            "flush' first, or pass --include-pending to delete them"
        )

    result: PruneResult | None = None
    if not args.dry_run and (plan.files or plan.runs):
        # After a failure, the display writes no final count, so the error is the last line.
        with context.progress("deleting", len(plan.files) + plan.runs) as progress:
            result = prune(index, plan, progress=progress.update, now=now)

    if args.json:
        print_json(_as_json(plan, result, args, running), context.out)
    else:
        _print_report(plan, result, args, pending, running, context)
    return EXIT_OK


def _pending_runs(plan: PrunePlan, context: CommandContext) -> int:
    """Return the planned runs not yet posted, or 0 when no API is configured to post them."""
    return plan.pending_runs if context.config.api_configured else 0


def _running_runs(plan: PrunePlan, context: CommandContext) -> int:
    """Count the planned rows of runs still running: those that started before the cutoff."""
    if not plan.runs:
        return 0
    cutoff = get_iso8601_timestamp(plan.cutoff)
    # Few runs are running at any time, so streaming them is cheap.
    index = context.open_index(write=False)
    return sum(1 for _ in index.iter_runs(status="running", until=cutoff))


def _print_report(
    plan: PrunePlan,
    result: PruneResult | None,
    args: argparse.Namespace,
    pending: int,
    running: int,
    context: CommandContext,
) -> None:
    out = context.out
    cutoff = _format_cutoff(plan.cutoff)
    if not plan.files and not plan.runs:
        print(f"Nothing to delete: no journal file or run is older than {cutoff}.", file=out)
        return

    if args.dry_run:
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

    if running:
        verb = "is" if running == 1 else "are"
        print(
            f"{running} of these runs {verb} still running, with no end recorded: 'telemetry "
            "check' tells whether their processes are gone.",
            file=out,
        )
    if pending:
        print(_pending_note(pending, args), file=out)
    if args.dry_run:
        print("Nothing was deleted (--dry-run).", file=out)


def _pending_note(pending: int, args: argparse.Namespace) -> str:
    """Return the report's line about the runs that the API does not have yet."""
    if not args.dry_run:
        return f"{pending} of these runs had not been posted to the API (--include-pending)."
    verb = "is" if pending == 1 else "are"
    if args.include_pending:
        return (
            f"{pending} of these runs {verb} not yet posted to the API, and "
            "--include-pending deletes them too."
        )
    return (
        f"{pending} of these runs {verb} not yet posted to the API, so prune would stop: "
        "run 'telemetry flush' first, or pass --include-pending to delete them."
    )


def _as_json(
    plan: PrunePlan, result: PruneResult | None, args: argparse.Namespace, running: int
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "dry_run": args.dry_run,
        "include_pending": args.include_pending,
        "cutoff": plan.cutoff.isoformat(),
        "files": [
            {"date": journal_file.date, "path": str(journal_file.path)}
            for journal_file in plan.files
        ],
        "bytes": plan.bytes,
        "runs": plan.runs,
        "pending_runs": plan.pending_runs,
        "running_runs": running,
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
