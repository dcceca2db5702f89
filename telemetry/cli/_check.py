"""``telemetry check``: find what is wrong in the store, and end stale runs with --repair."""

from __future__ import annotations

import argparse
import datetime
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from telemetry.cli._args import parse_duration
from telemetry.cli._context import (
    EXIT_OK,
    EXIT_PROBLEM,
    CommandContext,
    CommandError,
    IndexUnusableError,
)
from telemetry.cli._output import format_time, plural, print_json, printable
from telemetry.consistency import Consistency, compare_index_with_journal
from telemetry.database import DatabaseWriter
from telemetry.journal import FOLLOW_MAX_DAYS_AHEAD, JournalFile, JournalReader, JournalRuns
from telemetry.rebuild import find_leftover_files
from telemetry.stale import AbandonResult, StaleRun, abandon_runs, find_stale_runs, format_span

__all__ = ["register"]

DEFAULT_STALE_AFTER = datetime.timedelta(hours=24)
SHOWN_PER_SECTION = 20
"""Findings listed under each heading of the text report; --json lists them all."""

FUTURE_TOLERANCE = datetime.timedelta(minutes=10)
"""A journal file counts as dated in the future when its date is after the UTC date of
now plus this. An agent whose clock is a few minutes ahead starts the next day's file
shortly before midnight, which is not worth a finding."""

# Wrapped by hand, because RawDescriptionHelpFormatter keeps the line breaks.
_DESCRIPTION = """\
Run the index's integrity check, read every index row and every journal line, and
compare the runs of the index with those of the journal. Then look for stale runs,
journal files dated in the future and files left by killed rebuilds.
"""
_EPILOG = """\
examples:
  telemetry check
  telemetry check --stale-after 6h --repair

A run is stale when its status is still running and either its process is gone (the
run was recorded on this host and its pid no longer runs) or it started longer ago than
--stale-after. --repair ends each stale run as abandoned, with the reason as its
error_summary, in the journal and in the index, even when TELEMETRY_ENABLED is false
(that setting only stops agents from recording). A stale run whose end is already in the
journal (its agent died between the two writes) gets that end in the index instead.

A journal line cut short by a crash (torn) is normal after a kill -9 or a power loss:
readers skip it, and check reports it as a warning. Other unreadable lines are problems.

Exit code 0 when no problem is found (or --repair fixed everything found), 1 otherwise,
also when the store does not exist. Warnings do not change it, unless --strict is given.
"""


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``check`` subcommand's parser to ``commands``."""
    parser = commands.add_parser(
        "check",
        parents=[common],
        help="check the index, the journal and stale runs",
        description=_DESCRIPTION,
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
    parser.add_argument(
        "--strict",
        action="store_true",
        help="count the warnings as problems too: journal lines torn by a crash",
    )
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    parser.set_defaults(handler=check)


@dataclass
class _Findings:
    """The findings of one check, in the order of the report.

    ``index_state`` is ``ok``, ``damaged`` (the integrity check failed), or the state of
    an index that could not be opened: ``missing``, ``unreadable`` or ``incompatible``.
    """

    strict: bool = False
    index_state: str = "ok"
    index_messages: list[str] = field(default_factory=list)
    unreadable_rows: list[tuple[str, str]] = field(default_factory=list)
    leftover_files: list[Path] = field(default_factory=list)
    journal_files: int = 0
    corrupt_lines: dict[str, int] = field(default_factory=dict)
    torn_lines: dict[str, int] = field(default_factory=dict)
    future_files: list[JournalFile] = field(default_factory=list)
    consistency: Consistency | None = None
    stale: list[StaleRun] = field(default_factory=list)
    repair: AbandonResult | None = None

    @property
    def index_ok(self) -> bool:
        """Whether the index opened and passed its integrity check."""
        return self.index_state == "ok"

    def files_with_bad_lines(self) -> list[str]:
        """Return the journal files whose unreadable lines count as problems.

        Those are the files with unreadable lines other than torn ones, and with --strict
        every file with unreadable lines.
        """
        return [
            path
            for path, count in sorted(self.corrupt_lines.items())
            if self.strict or count > self.torn_lines.get(path, 0)
        ]

    def warnings(self) -> int:
        """Count the torn journal lines, which are problems only with --strict."""
        return 0 if self.strict else sum(self.torn_lines.values())

    def problems(self) -> int:
        """Count the findings: an index that is not ok, each file, row, run and stale run."""
        count = 0 if self.index_ok else 1
        count += len(self.unreadable_rows) + len(self.leftover_files)
        count += len(self.files_with_bad_lines()) + len(self.future_files)
        if self.consistency is not None:
            count += len(self.consistency.index_only)
            count += len(self.consistency.journal_only)
            count += len(self.consistency.status_differs)
        return count + len(self.stale)

    def repaired(self) -> int:
        """Count the findings that --repair fixed.

        Those are the stale runs that are no longer running, and the differences in
        status of the runs that ended since the check found them. Such a run ended by the
        journaled end that the repair wrote into the index, or by its own agent.
        """
        if self.repair is None:
            return 0
        restored = {run_id for run_id, _ in self.repair.restored}
        ended = restored | {run_id for run_id, _ in self.repair.ended_meanwhile}
        differences = 0
        if self.consistency is not None:
            differences = sum(
                1 for run_id, _, _ in self.consistency.status_differs if run_id in ended
            )
        no_longer_running = len(self.repair.abandoned) + len(self.repair.ended_meanwhile)
        return no_longer_running + len(restored) + differences

    def unrepaired(self) -> int:
        """Count the findings that --repair did not fix."""
        return self.problems() - self.repaired()


def check(args: argparse.Namespace, context: CommandContext) -> int:
    """Run every check, repair stale runs when asked, and print the findings.

    Raises:
        CommandError: the store has neither an index nor journal files.
    """
    _require_store(context)
    findings = _Findings(strict=args.strict)
    # Only --repair writes, so a plain check also works on a store it may only read.
    index = _open_index(context, findings, write=args.repair)
    if index is not None:
        index_ok, findings.index_messages = index.check_integrity()
        if not index_ok:
            findings.index_state = "damaged"
            index = None  # its rows cannot be trusted, so the checks below skip it
    if index is not None:
        findings.unreadable_rows = index.unreadable_rows()
    findings.leftover_files = find_leftover_files(context.config.db_path)

    statuses_before = _statuses(index)
    reader = context.journal()
    journal = _fold_journal(reader, context)
    findings.journal_files = journal.files
    findings.corrupt_lines = {str(path): count for path, count in journal.corrupt_lines.items()}
    findings.torn_lines = {str(path): count for path, count in journal.torn_lines.items()}
    findings.future_files = _future_files(reader)

    if index is not None:
        findings.consistency = _compare(statuses_before, journal, index)
        findings.stale = find_stale_runs(index, stale_after=args.stale_after)
        if args.repair:
            findings.repair = abandon_runs(
                context.client(), findings.stale, index=index, journal_runs=journal.runs
            )

    if args.json:
        print_json(_as_json(findings, args, context), context.out)
    else:
        _print_report(findings, args, context)
    return EXIT_PROBLEM if findings.unrepaired() else EXIT_OK


def _require_store(context: CommandContext) -> None:
    """Raise CommandError when neither the index nor a journal file exists."""
    config = context.config
    if config.db_path.exists() or context.journal().files():
        return
    raise CommandError(
        f"no store at {config.data_dir}: neither the index {config.db_path} nor journal "
        f"files in {config.ndjson_dir} exist. Pass --data-dir or set TELEMETRY_DATA_DIR "
        "to the directory that your agents write to"
    )


def _open_index(
    context: CommandContext, findings: _Findings, *, write: bool
) -> DatabaseWriter | None:
    # An index that cannot be opened is a finding of the check, not a reason to stop:
    # the journal can still be checked. A locked index is not a finding, because it is
    # in use, so its error goes to main().
    try:
        return context.open_index(write=write)
    except IndexUnusableError as exc:
        findings.index_state = exc.state
        findings.index_messages = [str(exc)]
        return None


def _statuses(index: DatabaseWriter | None) -> dict[str, str]:
    return {} if index is None else index.run_statuses()


def _fold_journal(reader: JournalReader, context: CommandContext) -> JournalRuns:
    progress = context.progress("reading the journal", len(reader.files()), lines=False)
    # The report lists the unreadable lines itself, so the reader's warning per file
    # would repeat them.
    with _quiet_logger("telemetry.journal"):
        journal = reader.fold_runs(progress=progress.update)
    progress.finish()
    return journal


def _future_files(reader: JournalReader, now: datetime.datetime | None = None) -> list[JournalFile]:
    """Return the journal files dated after the UTC date of ``now`` plus FUTURE_TOLERANCE."""
    if now is None:
        now = datetime.datetime.now(datetime.timezone.utc)
    latest = (now + FUTURE_TOLERANCE).astimezone(datetime.timezone.utc).date()
    try:
        first_future = latest + datetime.timedelta(days=1)
    except OverflowError:  # no date after 9999-12-31
        return []
    return reader.files(first_date=first_future)


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

    _print_section(out, _index_heading(findings, config.db_path), _index_lines(findings))
    if findings.index_ok:
        _print_section(
            out,
            f"Index rows that cannot be read: {len(findings.unreadable_rows)}",
            [f"{printable(run_id)}: {error}" for run_id, error in findings.unreadable_rows],
        )
    if findings.leftover_files:
        _print_section(
            out,
            f"Files left by killed rebuilds: {len(findings.leftover_files)}",
            [str(path) for path in findings.leftover_files],
        )

    corrupt_total = sum(findings.corrupt_lines.values())
    _print_section(
        out,
        f"Unreadable journal lines: {corrupt_total} in {plural(findings.journal_files, 'file')} "
        f"({config.ndjson_dir})",
        [_corrupt_line_entry(findings, path) for path in sorted(findings.corrupt_lines)],
    )
    if findings.future_files:
        _print_section(
            out,
            f"Journal files dated in the future: {len(findings.future_files)}",
            [str(journal_file.path) for journal_file in findings.future_files],
        )

    consistency = findings.consistency
    if consistency is not None:
        _print_section(
            out,
            f"Runs in the index without a journal record: {len(consistency.index_only)}",
            [printable(run_id) for run_id in consistency.index_only],
        )
        _print_section(
            out,
            f"Runs in the journal without an index row: {len(consistency.journal_only)}",
            [printable(run_id) for run_id in consistency.journal_only],
        )
        _print_section(
            out,
            f"Runs whose status differs: {len(consistency.status_differs)}",
            [
                f"{printable(run_id)}  index {printable(index_status)}, "
                f"journal {printable(journal_status)}"
                for run_id, index_status, journal_status in consistency.status_differs
            ],
        )
        _print_section(
            out,
            f"Stale runs (running, with the process gone or for longer than "
            f"{format_span(args.stale_after)}): {len(findings.stale)}",
            [_describe_stale(stale) for stale in findings.stale],
        )

    if findings.repair is not None:
        _print_repair(out, findings.repair)
    warnings = findings.warnings()
    if warnings:
        print(
            f"Warning: {plural(warnings, 'journal line')} cut short by a crash "
            f"{'is' if warnings == 1 else 'are'} skipped by readers; --strict counts "
            f"{'it' if warnings == 1 else 'them'} as a problem.",
            file=out,
        )
    print(_verdict(findings), file=out)


def _print_repair(out: TextIO, repair: AbandonResult) -> None:
    print(f"Marked {plural(len(repair.abandoned), 'stale run')} abandoned.", file=out)
    if repair.restored:
        print(
            f"Wrote the journaled end of {plural(len(repair.restored), 'stale run')} into "
            "the index, since the journal shows that they ended:",
            file=out,
        )
        for run_id, status in repair.restored:
            print(f"  {printable(run_id)}: {printable(status)}", file=out)
    for run_id, status in repair.ended_meanwhile:
        print(
            f"Run {printable(run_id)} was ended by another process meanwhile, with status "
            f"{printable(status)}; nothing to repair.",
            file=out,
        )
    for run_id, reason in repair.failed:
        print(
            f"Not repaired: run {printable(run_id)}: {reason}. The ERROR line above gives "
            "the cause.",
            file=out,
        )


def _corrupt_line_entry(findings: _Findings, path: str) -> str:
    count = findings.corrupt_lines[path]
    torn = findings.torn_lines.get(path, 0)
    if not torn:
        return f"{path}: {count}"
    if torn == count:
        return f"{path}: {count}, cut short by a crash"
    return f"{path}: {count}, of which {torn} cut short by a crash"


_INDEX_HEADINGS = {
    "ok": "Index integrity: ok",
    "damaged": "Index integrity: failed",
    "missing": "Index: missing",
    "unreadable": "Index: cannot be read",
    "incompatible": "Index: incompatible schema",
}


def _index_heading(findings: _Findings, path: Path) -> str:
    return f"{_INDEX_HEADINGS[findings.index_state]} ({path})"


def _index_lines(findings: _Findings) -> list[str]:
    # The open error of a missing index only repeats the heading and the path.
    if findings.index_ok or findings.index_state == "missing":
        return []
    return findings.index_messages


def _print_section(out: TextIO, heading: str, lines: Sequence[str]) -> None:
    print(heading, file=out)
    for line in lines[:SHOWN_PER_SECTION]:
        print(f"  {line}", file=out)
    if len(lines) > SHOWN_PER_SECTION:
        print(f"  ... and {len(lines) - SHOWN_PER_SECTION} more (--json lists all)", file=out)


def _describe_stale(stale: StaleRun) -> str:
    record = stale.record
    return (
        f"{printable(record.run_id)}  {printable(record.agent_name)}  "
        f"started {format_time(record.start_time)}  {printable(stale.reason)}"
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

    advice = _advice(findings)
    verdict = f"Found {plural(problems, 'problem')}"
    if findings.repaired():
        verdict += f", {remaining} left after the repair"
    return f"{verdict}: {'; '.join(advice)}." if advice else f"{verdict}."


def _advice(findings: _Findings) -> list[str]:
    """Return what to do about the problems found, one phrase per kind of problem."""
    advice = []
    consistency = findings.consistency
    # A rebuild fixes a damaged, unreadable or missing index, rows that cannot be read,
    # runs missing from the index and status disagreements. It keeps the rows of runs
    # that only the index has, because the journal lacks them. It cannot help an index
    # whose schema this version cannot use, such as one written by a newer version: the
    # message under the index heading gives that fix.
    rebuild_fixes = (
        findings.index_state in ("damaged", "unreadable", "missing")
        or bool(findings.unreadable_rows)
        or (
            consistency is not None and bool(consistency.journal_only or consistency.status_differs)
        )
    )
    if rebuild_fixes and findings.journal_files:
        advice.append("run 'telemetry rebuild' to rebuild the index from the journal")
    if findings.index_state == "incompatible":
        advice.append("fix the index as the message under its heading says")
    if consistency is not None and consistency.index_only:
        advice.append(
            "no readable journal line describes the runs that only the index has, so look "
            "for journal files that were deleted or moved"
        )
    if findings.stale and findings.repair is None:
        advice.append("run 'telemetry check --repair' to end the stale runs as abandoned")
    if findings.repair is not None and findings.repair.failed:
        advice.append(
            "fix the cause of the ERROR lines for the runs not repaired, such as a full disk, "
            "and run 'telemetry check --repair' again"
        )
    if findings.files_with_bad_lines():
        advice.append(_unreadable_lines_advice(findings))
    if findings.future_files:
        advice.append(
            "fix the clock of the host that wrote the journal files dated in the future; "
            f"'telemetry tail' skips files dated more than {FOLLOW_MAX_DAYS_AHEAD} day ahead"
        )
    if findings.leftover_files:
        advice.append(
            "delete the files left by killed rebuilds, or run 'telemetry rebuild', which "
            "removes them first"
        )
    return advice


def _unreadable_lines_advice(findings: _Findings) -> str:
    only_torn = all(
        count == findings.torn_lines.get(path, 0) for path, count in findings.corrupt_lines.items()
    )
    if only_torn:
        return (
            "readers skip the lines cut short by a crash and read the rest of each file; "
            "with --strict they stay findings until their file is pruned"
        )
    return (
        "readers skip the unreadable journal lines and read the rest of each file; lines "
        "that a crash did not cut short come from damage, a hand edit or a newer version "
        "of agent-telemetry, and stay findings until their file is pruned"
    )


def _as_json(findings: _Findings, args: argparse.Namespace, context: CommandContext) -> Any:
    consistency = findings.consistency
    repair = findings.repair
    return {
        "ok": findings.unrepaired() == 0,
        "problems": findings.problems(),
        "warnings": findings.warnings(),
        "strict": findings.strict,
        "index": {
            "path": str(context.config.db_path),
            "ok": findings.index_ok,
            "state": findings.index_state,
            "messages": findings.index_messages,
            "unreadable_rows": None
            if not findings.index_ok
            else [{"run_id": run_id, "error": error} for run_id, error in findings.unreadable_rows],
            "leftover_files": [str(path) for path in findings.leftover_files],
        },
        "journal": {
            "directory": str(context.config.ndjson_dir),
            "files": findings.journal_files,
            "corrupt_lines": findings.corrupt_lines,
            "torn_lines": findings.torn_lines,
            "future_files": [str(journal_file.path) for journal_file in findings.future_files],
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
        "repaired": None if repair is None else len(repair.abandoned),
        "restored_from_journal": None
        if repair is None
        else [{"run_id": run_id, "status": status} for run_id, status in repair.restored],
        "ended_meanwhile": None
        if repair is None
        else [{"run_id": run_id, "status": status} for run_id, status in repair.ended_meanwhile],
        "not_repaired": None
        if repair is None
        else [{"run_id": run_id, "reason": reason} for run_id, reason in repair.failed],
    }
