"""Audit the Python standard library's source tree as one tracked run.

The agent finds every ``.py`` file under the standard library of the Python running it,
parses each with ``ast``, and counts functions, classes and lines. A file that does not
parse (the test suite ships some on purpose) is a failed item. Progress events go to the
journal every few hundred files, and the run ends with its item counts and metrics, as
``partial`` when some files failed.

    python examples/stdlib_audit.py [--root DIR] [--progress-every N]

The run is recorded in the default store (see docs/config.md); ``telemetry runs`` and
``telemetry stats`` show it afterwards.
"""

from __future__ import annotations

import argparse
import ast
import heapq
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

from telemetry import RunContext, TelemetryClient

AGENT_NAME = "stdlib-audit"
SKIPPED_DIRECTORIES = frozenset({"site-packages", "dist-packages", "__pycache__"})
SLOWEST_FILES_KEPT = 5
FAILURES_LOGGED = 20


@dataclass
class AuditTotals:
    """Counts gathered over the files of one audit."""

    succeeded: int = 0
    failed: int = 0
    functions: int = 0
    classes: int = 0
    lines: int = 0
    slowest: list[tuple[float, str]] = field(default_factory=list)


def find_python_files(root: Path) -> list[Path]:
    """Return the ``.py`` files under ``root``, sorted, skipping installed packages."""
    files = []
    for path in root.rglob("*.py"):
        if SKIPPED_DIRECTORIES.isdisjoint(path.relative_to(root).parts):
            files.append(path)
    return sorted(files)


def audit_file(path: Path, totals: AuditTotals) -> None:
    """Parse one file and add its counts to ``totals``.

    Raises:
        SyntaxError, ValueError, UnicodeDecodeError, OSError: the file cannot be read or
            parsed.
    """
    started = time.perf_counter()
    source = path.read_bytes()
    tree = ast.parse(source, filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            totals.functions += 1
        elif isinstance(node, ast.ClassDef):
            totals.classes += 1
    totals.lines += source.count(b"\n")
    elapsed = time.perf_counter() - started
    heapq.heappush(totals.slowest, (elapsed, str(path)))
    if len(totals.slowest) > SLOWEST_FILES_KEPT:
        heapq.heappop(totals.slowest)


def audit(root: Path, run: RunContext, progress_every: int) -> AuditTotals:
    """Audit every file under ``root``, logging progress and failures on ``run``."""
    files = find_python_files(root)
    run.set_metrics(items_discovered=len(files))
    run.log_event("discovered", {"root": str(root), "files": len(files)})

    totals = AuditTotals()
    for done, path in enumerate(files, start=1):
        try:
            audit_file(path, totals)
        except (SyntaxError, ValueError, UnicodeDecodeError, OSError) as exc:
            totals.failed += 1
            if totals.failed <= FAILURES_LOGGED:
                run.log_event(
                    "file_failed",
                    {"path": str(path), "error": f"{type(exc).__name__}: {exc}"},
                )
        else:
            totals.succeeded += 1
        if done % progress_every == 0:
            run.log_event(
                "progress",
                {"done": done, "total": len(files), "failed": totals.failed},
            )
    return totals


def record_totals(run: RunContext, totals: AuditTotals) -> None:
    """Set the run's counts, summary and metrics from ``totals``."""
    slowest = [
        {"path": path, "ms": round(seconds * 1000, 2)}
        for seconds, path in sorted(totals.slowest, reverse=True)
    ]
    run.set_metrics(
        items_succeeded=totals.succeeded,
        items_failed=totals.failed,
        output_summary=(
            f"{totals.succeeded} files parsed, {totals.failed} failed: "
            f"{totals.functions} functions, {totals.classes} classes, {totals.lines} lines"
        ),
        metrics_json={
            "functions": totals.functions,
            "classes": totals.classes,
            "lines": totals.lines,
            "slowest_files": slowest,
        },
    )
    if totals.failed:
        run.set_status("partial")


def main(argv: list[str] | None = None) -> int:
    """Run the audit and print a one-line summary; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root",
        type=Path,
        default=Path(sysconfig.get_paths()["stdlib"]),
        help="directory to audit (default: this Python's standard library)",
    )
    parser.add_argument(
        "--progress-every",
        type=int,
        default=250,
        metavar="N",
        help="log a progress event every N files (default: 250)",
    )
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"--root {args.root} is not a directory")

    with TelemetryClient() as client:
        with client.track_run(
            AGENT_NAME,
            "source-audit",
            input_summary=str(args.root),
            agent_version=sys.version.split()[0],
        ) as run:
            totals = audit(args.root, run, args.progress_every)
            record_totals(run, totals)
        print(
            f"run {run.run_id}: {totals.succeeded} files parsed, {totals.failed} failed, "
            f"{totals.functions} functions, {totals.classes} classes, {totals.lines} lines"
        )
        print(f"recorded in {client.config.data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
