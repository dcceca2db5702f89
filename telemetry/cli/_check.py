"""``telemetry check``: find what is wrong in the store, and end stale runs with --repair."""

from __future__ import annotations

import argparse
import datetime
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO

from telemetry.cli._args import parse_duration
from telemetry.cli._context import EXIT_OK, EXIT_PROBLEM, CommandContext, CommandError
from telemetry.cli._output import format_time, plural, print_json
from telemetry.database import DatabaseWriter
from telemetry.journal import JournalRuns
from telemetry.rebuild import Consistency, compare_index_with_journal
from telemetry.stale import StaleRun, abandon_runs, find_stale_runs

__all__ = ["register"]

DEFAULT_STALE_AFTER = datetime.timedelta(hours=24)
SHOWN_PER_SECTION = 20
"""Findings listed under each heading of the text report; --json lists them all."""

_EPILOG = """\
examples:
  telemetry check
  telemetry check --stale-after 6h --repair

A run is stale when its status is still running and either its process is gone (the
run was recorded on this host and its pid no longer runs) or it started longer ago than
--stale-after. --repair ends each stale run as abandoned, with the reason as its
error_summary, in the journal and in the index. Exit code 0 when nothing is found (or
--repair fixed everything found), 1 otherwise.
"""


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``check`` subcommand's parser to ``commands``."""
    parser = commands.add_parser(
        "check",
        parents=[common],
        help="check the index, the journal and stale runs",
        description=(
            "Run the index's integrity check, count unreadable journal lines per file, "
            "compare the runs of the index with those of the journal, and look for stale "
            "runs."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--stale-after",
        type=parse_duration,
        default=DEFAULT_STALE_AFTER,
        metavar="DURATION",
        help="a running run that started longer ago than this is stale, such as 6h or 2d "
        "(default: 24h)",
    )
    parser.add_argument(
        "--repair", action="store_true", help="end the stale runs found with status abandoned"
    )
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    parser.set_defaults(handler=check)


@dataclass
class _Findings:
    """The findings of one check, in the order of the report."""

    index_ok: bool = True
    index_messages: list[str] = field(default_factory=list)
    journal_files: int = 0
    corrupt_lines: dict[str, int] = field(default_factory=dict)
    consistency: Consistency | None = None
    stale: list[StaleRun] = field(default_factory=list)
    repaired: int | None = None

    def problems(self) -> int:
        """Count the findings: each failed integrity check, file, run and stale run."""
        count = 0 if self.index_ok else 1
        count += len(self.corrupt_lines)
        if self.consistency is not None:
            count += len(self.consistency.index_only)
            count += len(self.consistency.journal_only)
            count += len(self.consistency.status_differs)
        return count + len(self.stale)

    def unrepaired(self) -> int:
        """Count the findings that --repair did not fix."""
        return self.problems() - (self.repaired or 0)


def check(args: argparse.Namespace, context: CommandContext) -> int:
    """Run every check, repair stale runs when asked, and print the findings."""
    findings = _Findings()
    index = _open_index(context, findings)
    if index is not None:
        findings.index_ok, findings.index_messages = index.check_integrity()
        if not findings.index_ok:
            index = None  # its rows cannot be trusted, so the checks below skip it

    statuses_before = _statuses(index)
    journal = _fold_journal(context)
    findings.journal_files = journal.files
    findings.corrupt_lines = {str(path): count for path, count in journal.corrupt_lines.items()}

    if index is not None:
        findings.consistency = _compare(statuses_before, journal, index)
        findings.stale = find_stale_runs(index, stale_after=args.stale_after)
        if args.repair and findings.stale:
            findings.repaired = abandon_runs(context.client(), findings.stale)
        elif args.repair:
            findings.repaired = 0

    if args.json:
        print_json(_as_json(findings, args, context), context.out)
    else:
        _print_report(findings, args, context)
    return EXIT_PROBLEM if findings.unrepaired() else EXIT_OK


def _open_index(context: CommandContext, findings: _Findings) -> DatabaseWriter | None:
    # An index that cannot be opened is a finding of the check, not a reason to stop:
    # the journal can still be checked.
    try:
        return context.open_index()
    except CommandError as exc:
        findings.index_ok = False
        findings.index_messages = [str(exc)]
        return None


def _statuses(index: DatabaseWriter | None) -> dict[str, str]:
    return {} if index is None else index.run_statuses()


def _fold_journal(context: CommandContext) -> JournalRuns:
    reader = context.journal()
    progress = context.progress("reading the journal", len(reader.files()), lines=False)
    # The report lists the unreadable lines itself, so the reader's warning per file
    # would repeat them.
    with _quiet_logger("telemetry.journal"):
        journal = reader.fold_runs(progress=progress.update)
    progress.finish()
    return journal


def _compare(
    statuses_before: dict[str, str], journal: JournalRuns, index: DatabaseWriter
) -> Consistency:
    """Compare the index with the journal, ignoring what agents changed during the check.

    The index is read before and after the journal. A run started meanwhile is in the
    journal and maybe in the second reading only, and a run ended meanwhile has a
    different status in one of the two readings only. A finding counts only when both
    readings show it.
    """
    before = compare_index_with_journal(statuses_before, journal)
    after = compare_index_with_journal(index.run_statuses(), journal)
    index_only = set(after.index_only)
    journal_only = set(after.journal_only)
    differs_after = {
        run_id: (run_id, status, other) for run_id, status, other in after.status_differs
    }
    return Consistency(
        index_only=[run_id for run_id in before.index_only if run_id in index_only],
        journal_only=[run_id for run_id in before.journal_only if run_id in journal_only],
        status_differs=[
            differs_after[run_id]
            for run_id, _, _ in before.status_differs
            if run_id in differs_after
        ],
    )


@contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# -- the report --------------------------------------------------------------------------


def _print_report(findings: _Findings, args: argparse.Namespace, context: CommandContext) -> None:
    out = context.out
    config = context.config

    if findings.index_ok:
        print(f"Index integrity: ok ({config.db_path})", file=out)
    else:
        _print_section(out, f"Index integrity: failed ({config.db_path})", findings.index_messages)

    corrupt_total = sum(findings.corrupt_lines.values())
    _print_section(
        out,
        f"Unreadable journal lines: {corrupt_total} in {plural(findings.journal_files, 'file')} "
        f"({config.ndjson_dir})",
        [f"{path}: {count}" for path, count in sorted(findings.corrupt_lines.items())],
    )

    consistency = findings.consistency
    if consistency is not None:
        _print_section(
            out,
            f"Runs in the index without a journal record: {len(consistency.index_only)}",
            consistency.index_only,
        )
        _print_section(
            out,
            f"Runs in the journal without an index row: {len(consistency.journal_only)}",
            consistency.journal_only,
        )
        _print_section(
            out,
            f"Runs whose status differs: {len(consistency.status_differs)}",
            [
                f"{run_id}  index {index_status}, journal {journal_status}"
                for run_id, index_status, journal_status in consistency.status_differs
            ],
        )
        _print_section(
            out,
            f"Stale runs (running, with the process gone or for longer than "
            f"{_format_span(args.stale_after)}): {len(findings.stale)}",
            [_describe_stale(stale) for stale in findings.stale],
        )

    if findings.repaired is not None:
        print(f"Marked {plural(findings.repaired, 'stale run')} abandoned.", file=out)
    print(_verdict(findings), file=out)


def _print_section(out: TextIO, heading: str, lines: Sequence[str]) -> None:
    print(heading, file=out)
    for line in lines[:SHOWN_PER_SECTION]:
        print(f"  {line}", file=out)
    if len(lines) > SHOWN_PER_SECTION:
        print(f"  ... and {len(lines) - SHOWN_PER_SECTION} more (--json lists all)", file=out)


def _describe_stale(stale: StaleRun) -> str:
    record = stale.record
    return (
        f"{record.run_id}  {record.agent_name}  started {format_time(record.start_time)}  "
        f"{stale.reason}"
    )


def _verdict(findings: _Findings) -> str:
    problems = findings.problems()
    if problems == 0:
        return "No problems found."
    remaining = findings.unrepaired()
    if remaining == 0:
        if problems == 1:
            return "Found 1 problem and repaired it."
        return f"Found {problems} problems and repaired them all."

    advice = []
    consistency = findings.consistency
    # A rebuild fixes a damaged index, runs missing from it and status disagreements.
    # It keeps the rows of runs that only the index has, because the journal lacks them.
    rebuild_fixes = not findings.index_ok or (
        consistency is not None and bool(consistency.journal_only or consistency.status_differs)
    )
    if rebuild_fixes and findings.journal_files:
        advice.append("run 'telemetry rebuild' to rebuild the index from the journal")
    if consistency is not None and consistency.index_only:
        advice.append(
            "no readable journal line describes the runs that only the index has, so look "
            "for journal files that were deleted or moved"
        )
    if findings.stale and findings.repaired is None:
        advice.append("run 'telemetry check --repair' to end the stale runs as abandoned")
    if findings.corrupt_lines:
        advice.append("readers skip the unreadable journal lines and read the rest of each file")
    verdict = f"Found {plural(problems, 'problem')}"
    if findings.repaired:
        verdict += f", {remaining} left after the repair"
    return f"{verdict}: {'; '.join(advice)}." if advice else f"{verdict}."


def _format_span(duration: datetime.timedelta) -> str:
    """Return a duration as --stale-after takes it: 24h stays 24h, and 48h becomes 2d."""
    seconds = int(duration.total_seconds())
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0 and (seconds >= 2 * size or unit == "m"):
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _as_json(findings: _Findings, args: argparse.Namespace, context: CommandContext) -> Any:
    consistency = findings.consistency
    return {
        "ok": findings.unrepaired() == 0,
        "problems": findings.problems(),
        "index": {
            "path": str(context.config.db_path),
            "ok": findings.index_ok,
            "messages": findings.index_messages,
        },
        "journal": {
            "directory": str(context.config.ndjson_dir),
            "files": findings.journal_files,
            "corrupt_lines": findings.corrupt_lines,
        },
        "index_only": None if consistency is None else consistency.index_only,
        "journal_only": None if consistency is None else consistency.journal_only,
        "status_differs": None
        if consistency is None
        else [
            {"run_id": run_id, "index_status": index_status, "journal_status": journal_status}
            for run_id, index_status, journal_status in consistency.status_differs
        ],
        "stale_after_seconds": int(args.stale_after.total_seconds()),
        "stale_runs": [
            {
                "run_id": stale.record.run_id,
                "agent_name": stale.record.agent_name,
                "start_time": stale.record.start_time,
                "hostname": stale.record.hostname,
                "pid": stale.record.pid,
                "reason": stale.reason,
            }
            for stale in findings.stale
        ],
        "repaired": findings.repaired,
    }
