"""``telemetry rebuild``: rebuild the index from the journal."""

from __future__ import annotations

import argparse
import errno
import sqlite3
from typing import Any

from telemetry.cli._context import EXIT_OK, CommandContext, CommandError
from telemetry.cli._output import Progress, plural, print_json
from telemetry.errors import IndexLockedError
from telemetry.rebuild import BACKUP_SUFFIX, RebuildResult, rebuild_index

__all__ = ["register"]

_PHASE_LABELS = {"read": "reading the journal", "write": "writing the index"}

_EPILOG = f"""\
example:
  telemetry rebuild

The journal is read whole, and the runs it describes are merged into the index in one
transaction. Runs whose status is the same in the index keep their API sync state (posted
or pending); the other runs are pending. Rows that only the index has are kept. A damaged
index keeps the rows that can still be read from it. Agents may keep running meanwhile.
A copy of the old index is kept beside it, named like the index with {BACKUP_SUFFIX} added
and replaced by the next rebuild. A damaged old index is kept under a name with the
time, such as telemetry.db{BACKUP_SUFFIX}-20261204T231500Z, which no rebuild replaces.
Files that killed rebuilds left beside the index are removed first.
"""


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``rebuild`` subcommand's parser to ``commands``."""
    parser = commands.add_parser(
        "rebuild",
        parents=[common],
        help="rebuild the index from the journal",
        # Wrapped by hand, because RawDescriptionHelpFormatter keeps the line breaks.
        description=(
            "Rebuild the SQLite index from the journal, for an index that is damaged, lost\n"
            "or out of step with the journal. The old index is kept as a backup."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(handler=rebuild)


def rebuild(args: argparse.Namespace, context: CommandContext) -> int:
    """Rebuild the index with a progress display and print what was done."""
    config = context.config
    if not context.journal().files():
        # No journal files usually means a wrong store, and a rebuild would add no run.
        raise CommandError(
            f"no journal files in {config.ndjson_dir}, so there is nothing to rebuild the "
            "index from: pass --data-dir or set TELEMETRY_DATA_DIR to the store whose "
            "journal to read"
        )

    progress = _PhaseProgress(context)
    completed = False
    try:
        result = rebuild_index(config.db_path, config.ndjson_dir, progress=progress)
        completed = True
    except IndexLockedError as exc:
        raise CommandError(str(exc)) from None
    except (sqlite3.Error, OSError) as exc:
        raise CommandError(_failure_message(exc, context)) from None
    finally:
        progress.finish(completed=completed)

    if args.json:
        print_json(_as_json(result, context), context.out)
    else:
        _print_summary(result, context)
    return EXIT_OK


class _PhaseProgress:
    """A progress display per phase of the rebuild: reading the journal, writing the index."""

    def __init__(self, context: CommandContext) -> None:
        self._context = context
        self._phase: str | None = None
        self._progress: Progress | None = None

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase != self._phase or self._progress is None:
            self.finish()
            self._phase = phase
            self._progress = self._context.progress(_PHASE_LABELS.get(phase, phase), total)
        self._progress.update(done, total)

    def finish(self, *, completed: bool = True) -> None:
        if self._progress is not None:
            self._progress.finish(completed=completed)
            self._progress = None


def _failure_message(exc: sqlite3.Error | OSError, context: CommandContext) -> str:
    """Return the one-line error of a rebuild that failed, naming the index and the fix."""
    db_path = context.config.db_path
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        cause = f"{exc.strerror}: {exc.filename}"
    else:
        cause = str(exc) or type(exc).__name__
    message = f"cannot rebuild the index {db_path}: {cause}"
    full = (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or (
        isinstance(exc, sqlite3.Error) and "disk is full" in str(exc)
    )
    if full:
        message += (
            f". Free space on the file system of {db_path.parent}, where the rebuild writes "
            "a new index and a backup of the old one, each about as large as the index, "
            "and run it again"
        )
    return message


def _print_summary(result: RebuildResult, context: CommandContext) -> None:
    out = context.out
    print(
        f"Rebuilt the index {context.config.db_path} from {plural(result.files, 'journal file')}: "
        f"{plural(result.runs, 'run')}, {plural(result.corrupt_lines, 'unreadable line')} "
        "skipped.",
        file=out,
    )
    if result.rejected_runs:
        print(
            f"Left out {plural(result.rejected_runs, 'run')} that the index rejected; "
            "the warnings above name them.",
            file=out,
        )
    print(
        f"Kept the API sync state of {plural(result.kept_sync_state, 'run')} from the old index.",
        file=out,
    )
    if result.index_only_rows:
        print(
            f"Kept {plural(result.index_only_rows, 'row')} that only the old index had: runs "
            "that no journal line describes, or that started during the rebuild.",
            file=out,
        )
    if result.backup_path is None:
        print("There was no old index to keep.", file=out)
    elif result.damaged_backup:
        print(
            f"The damaged old index is kept at {result.backup_path}; no later rebuild replaces it.",
            file=out,
        )
    else:
        print(f"The old index is kept at {result.backup_path}.", file=out)
    for path in result.removed_files:
        print(f"Removed {path}, left by a killed rebuild.", file=out)


def _as_json(result: RebuildResult, context: CommandContext) -> dict[str, Any]:
    return {
        "db_path": str(context.config.db_path),
        "journal_dir": str(context.config.ndjson_dir),
        "runs": result.runs,
        "files": result.files,
        "corrupt_lines": result.corrupt_lines,
        "rejected_runs": result.rejected_runs,
        "kept_sync_state": result.kept_sync_state,
        "index_only_rows": result.index_only_rows,
        "backup_path": None if result.backup_path is None else str(result.backup_path),
        "damaged_backup": result.damaged_backup,
        "removed_files": [str(path) for path in result.removed_files],
    }
