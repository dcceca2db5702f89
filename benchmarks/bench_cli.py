"""Time ``telemetry runs`` and ``telemetry stats`` on an index of 100,000 runs.

    python benchmarks/bench_cli.py [--runs N] [--rounds N] [--process-rounds N] [--seed N]

The script builds a store in a temporary directory with DatabaseWriter.load_runs. Its runs
belong to eight agents and started in the 30 days before now. Their statuses, durations
and item counts come from a seeded random generator, so every invocation builds the same
store relative to its start time. No journal is written, because these commands read only
the index.

Each command is timed two ways:

- in process: telemetry.cli.main() with stdout sent to a StringIO. This is the parser,
  the config, opening the index and the query, without interpreter start-up.
- as a process: ``python -m telemetry ...`` with stdout sent to /dev/null, from start to
  exit, interpreter start-up and imports included. That is what a user waits for.

The table shows the median of the rounds. ``config``, which reads no index, is the
baseline of the start-up cost. Nothing is asserted; timings depend on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import os
import platform
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from telemetry.cli import main as cli_main
from telemetry.database import DatabaseWriter
from telemetry.models import RunRecord, get_iso8601_timestamp

AGENTS = (
    "stdlib-audit",
    "nightly-crawler",
    "invoice-import",
    "summarizer",
    "link-checker",
    "report-builder",
    "mail-digest",
    "index-refresh",
)
# Statuses and their weights: mostly successes, some failures, a few of the rest.
STATUS_WEIGHTS = {
    "success": 80,
    "failed": 8,
    "partial": 6,
    "cancelled": 2,
    "timeout": 1,
    "abandoned": 1,
    "running": 2,
}
SPAN_DAYS = 30


def generate_runs(count: int, seed: int, now: datetime.datetime) -> Iterator[RunRecord]:
    """Yield ``count`` runs that started in the SPAN_DAYS before ``now``, oldest first."""
    generator = random.Random(seed)
    statuses = list(STATUS_WEIGHTS)
    weights = list(STATUS_WEIGHTS.values())
    span_us = SPAN_DAYS * 86_400_000_000
    offsets = sorted(generator.randrange(span_us) for _ in range(count))
    for number, offset in enumerate(offsets):
        start = now - datetime.timedelta(microseconds=span_us - offset)
        agent = AGENTS[generator.randrange(len(AGENTS))]
        status = generator.choices(statuses, weights)[0]
        discovered = generator.randrange(0, 500)
        failed = generator.randrange(0, discovered // 10 + 1)
        record = RunRecord(
            run_id=f"{start:%Y%m%dT%H%M%S%fZ}-{agent}-{number:016x}",
            agent_name=agent,
            job_type="batch",
            start_time=get_iso8601_timestamp(start),
            trigger_type=generator.choice(("cli", "cron", "api")),
            status=status,
            items_discovered=discovered,
            hostname="bench-host",
            pid=1000 + number % 30000,
            api_posted=status != "running" and generator.random() < 0.9,
        )
        if status != "running":
            # Log-normal durations: median about 1.1 s, 5% under 0.15 s, 1% over 18 s.
            duration = max(1, round(generator.lognormvariate(7.0, 1.2)))
            record.end_time = get_iso8601_timestamp(
                start + datetime.timedelta(milliseconds=duration)
            )
            record.duration_ms = duration
            record.items_succeeded = discovered - failed
            record.items_failed = failed
            record.metrics_json = {"pages": discovered, "retries": generator.randrange(3)}
        yield record


def build_store(data_dir: Path, count: int, seed: int) -> float:
    """Write ``count`` runs into the index of ``data_dir``; return the seconds it took."""
    started = time.perf_counter()
    index = DatabaseWriter(data_dir / "telemetry.db")
    try:
        index.load_runs(generate_runs(count, seed, datetime.datetime.now(datetime.timezone.utc)))
    finally:
        index.close()
    return time.perf_counter() - started


def time_in_process(arguments: list[str]) -> float:
    """Return the seconds that main(arguments) takes, with its output in StringIOs."""
    output = io.StringIO()
    errors = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(errors):
        code = cli_main(arguments)
    elapsed = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(
            f"telemetry {' '.join(arguments)} exited with {code}: {errors.getvalue()}"
        )
    return elapsed


def time_process(arguments: list[str]) -> float:
    """Return the seconds that ``python -m telemetry arguments`` takes from start to exit."""
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith("TELEMETRY_")
    }
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "telemetry", *arguments],
        env=environment,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(
            f"telemetry {' '.join(arguments)} exited with {result.returncode}: {result.stderr}"
        )
    return elapsed


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000, help="runs in the index")
    parser.add_argument("--rounds", type=int, default=7, help="in-process rounds per command")
    parser.add_argument("--process-rounds", type=int, default=5, help="process rounds per command")
    parser.add_argument("--seed", type=int, default=20261204, help="seed of the generated runs")
    arguments = parser.parse_args(argv)
    for name in ("runs", "rounds", "process_rounds"):
        if getattr(arguments, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be 1 or more")
    return arguments


def main(argv: list[str] | None = None) -> int:
    """Build the store, time each command, print the table and return the exit code."""
    arguments = parse_arguments(argv)

    with tempfile.TemporaryDirectory(prefix="bench-cli-") as directory:
        data_dir = Path(directory)
        build_seconds = build_store(data_dir, arguments.runs, arguments.seed)
        store = ["--data-dir", str(data_dir)]
        commands = [
            ["config"],
            ["runs"],
            ["runs", "--agent", AGENTS[3]],
            ["runs", "--status", "failed", "--since", "1d"],
            ["stats"],
            ["stats", "--since", "1d"],
            ["stats", "--all"],
        ]
        # One untimed call of each warms the page cache and the imports.
        for command in commands:
            time_in_process(command + store)

        rows = []
        for command in commands:
            in_process = [time_in_process(command + store) for _ in range(arguments.rounds)]
            process = [time_process(command + store) for _ in range(arguments.process_rounds)]
            rows.append(
                (" ".join(command), statistics.median(in_process), statistics.median(process))
            )
        index_bytes = (data_dir / "telemetry.db").stat().st_size

    print(
        f"Python {platform.python_version()} ({platform.python_implementation()}), "
        f"SQLite {sqlite3.sqlite_version}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{platform.system()} {platform.release()}"
    )
    print(
        f"{arguments.runs} runs of {len(AGENTS)} agents over {SPAN_DAYS} days (seed "
        f"{arguments.seed}); index {index_bytes / 1e6:.1f} MB, loaded in {build_seconds:.1f} s"
    )
    print(
        f"median of {arguments.rounds} in-process and {arguments.process_rounds} process "
        "rounds, in milliseconds\n"
    )
    header = f"{'command':<36} {'in process':>11} {'process':>9}"
    print(header)
    print("-" * len(header))
    for name, in_process_seconds, process_seconds in rows:
        print(f"{name:<36} {in_process_seconds * 1000:>11.1f} {process_seconds * 1000:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
