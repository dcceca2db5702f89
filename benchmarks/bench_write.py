"""Measure agent-telemetry's write path against the disk's floor and against peer tools.

    python benchmarks/bench_write.py [--markdown docs/benchmarks.md] [--quick] [options]

The floor is what the disk charges: one ``os.write`` + ``os.fsync`` of a 1 KB line to a
file kept open with O_APPEND, in the same directory as the store. A durable run (start_run
and end_run) writes two journal lines, so its floor is two of those.

Every comparison runs its subject and its reference alternately in this invocation, for
several rounds, and reports the median and quartiles of the rounds and of the per-round
ratios. The targets are on those ratios, because absolute times move from machine to
machine. Nothing is asserted: the script prints a table with each target met or missed,
and ``--markdown PATH`` also writes it, with the machine and the versions, to PATH.

Peers (MLflow, OpenTelemetry SDK, structlog) are optional. A missing one is skipped, and
its row names the packages to install. The store and every peer's files live in a temporary
directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import functools
import importlib.metadata
import multiprocessing
import os
import platform
import pstats
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from _bridge import OTLPSink, bridge_environment, make_bridge_client
from _contention import LockedFsyncWriter, ProcessPool, run_threads
from _harness import (
    FloorFile,
    FsyncCounter,
    alternate,
    install_fsync_counter,
    spread,
    time_per_op,
)
from _peers import open_peer
from _report import Row, Target, format_quantity, markdown_results, text_table, write_markdown

REPOSITORY = Path(__file__).resolve().parent.parent
SECTIONS = ("floor", "contention", "caller", "peers", "bridge", "memory", "syscalls", "profile")
# File systems that live in memory, where fsync costs nothing and the floor means nothing.
MEMORY_FILE_SYSTEMS = {"tmpfs", "ramfs"}
VERSIONED_DISTRIBUTIONS = (
    "agent-telemetry",
    "orjson",
    "portalocker",
    "mlflow-skinny",
    "SQLAlchemy",
    "alembic",
    "opentelemetry-sdk",
    "opentelemetry-exporter-otlp-proto-http",
    "structlog",
    "psutil",
)
SYSCALLS = ("fsync", "fdatasync", "write", "pwrite64", "flock")
# The memory target: resident memory after all the runs may exceed that after the first
# 1,000 by this factor, 5% for the noise of the allocator and of the reading.
MEMORY_GROWTH_LIMIT = 1.05


@dataclass
class Settings:
    """Sizes of the measurements, from the command line."""

    rounds: int
    ops: int
    fast_ops: int
    mlflow_runs: int
    duration: float
    contention_rounds: int
    memory_runs: int
    profile_repetitions: int
    syscall_runs: int


@dataclass(frozen=True)
class Mount:
    """The file system that a path is on, from /proc/mounts."""

    device: str
    mount_point: str
    fs_type: str
    options: str


# -- the machine ---------------------------------------------------------------------------


def find_mount(path: Path) -> Mount | None:
    """Return the mount that contains ``path``, or None where /proc/mounts is missing."""
    try:
        with open("/proc/mounts", encoding="utf-8") as mounts:
            lines = mounts.read().splitlines()
    except OSError:
        return None
    resolved = str(path.resolve())
    best: Mount | None = None
    for line in lines:
        fields = line.split()
        if len(fields) < 4:
            continue
        # /proc/mounts writes a space in a path as \040, and tabs, newlines and
        # backslashes in octal too.
        mount_point = re.sub(r"\\([0-7]{3})", lambda match: chr(int(match[1], 8)), fields[1])
        inside = resolved == mount_point or resolved.startswith(mount_point.rstrip("/") + "/")
        if inside and (best is None or len(mount_point) >= len(best.mount_point)):
            best = Mount(fields[0], mount_point, fields[2], fields[3])
    return best


def choose_parent_directory(requested: str | None) -> Path:
    """Return the directory to create the benchmark's temporary directory in.

    An explicit ``--dir`` is used as it is. Otherwise the system's temporary directory is
    used, unless it is in memory (tmpfs), where fsync costs nothing. Then the current
    directory is used, with a notice on stderr.
    """
    if requested is not None:
        return Path(requested)
    temporary = Path(tempfile.gettempdir())
    mount = find_mount(temporary)
    if mount is not None and mount.fs_type in MEMORY_FILE_SYSTEMS:
        print(
            f"{temporary} is on {mount.fs_type}, where fsync costs nothing, so the "
            "benchmark measures in the current directory instead (pass --dir to choose)",
            file=sys.stderr,
        )
        return Path.cwd()
    return temporary


def cpu_model() -> str:
    """Return the CPU's model name from /proc/cpuinfo, else platform.processor()."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(directory: Path) -> list[tuple[str, str]]:
    """Return (label, value) pairs: CPU, cores, memory, OS and the benchmark's file system."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cores = f"{os.cpu_count()} logical CPUs" + (f", {usable} usable" if usable else "")
    try:
        memory = format_quantity(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "B")
    except (ValueError, OSError, AttributeError):
        memory = "unknown"
    mount = find_mount(directory)
    if mount is None:
        file_system = f"{directory} (file system unknown)"
    else:
        file_system = (
            f"{mount.fs_type} on {mount.device}, mounted at {mount.mount_point} ({mount.options})"
        )
    return [
        ("CPU", f"{cpu_model()} ({platform.machine()})"),
        ("Cores", cores),
        ("Memory", memory),
        ("OS", f"{platform.system()} {platform.release()}"),
        ("File system of the store", file_system),
    ]


def describe_versions() -> list[tuple[str, str]]:
    """Return (name, version) pairs for Python, SQLite and every distribution involved.

    The commit of the repository comes first when git can read it. Uncommitted changes in
    the working tree are not shown.
    """
    versions = []
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPOSITORY), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    else:
        versions.append(("agent-telemetry commit", commit))
    versions += [
        ("Python", f"{platform.python_version()} ({platform.python_implementation()})"),
        ("SQLite (Python's sqlite3)", sqlite3.sqlite_version),
    ]
    for distribution in VERSIONED_DISTRIBUTIONS:
        try:
            versions.append((distribution, importlib.metadata.version(distribution)))
        except importlib.metadata.PackageNotFoundError:
            versions.append((distribution, "not installed"))
    return versions


# -- measurements ----------------------------------------------------------------------------


class FsyncTally:
    """Adds up the fsyncs and the operations of the timed calls of one subject."""

    def __init__(self, counter: FsyncCounter) -> None:
        self._counter = counter
        self.fsyncs = 0
        self.ops = 0

    def timed(self, op: Callable[[], object], count: int) -> Callable[[], float]:
        """Return a measurement of ``op`` that adds its fsyncs and calls to the tally."""

        def measure() -> float:
            before = self._counter.calls
            seconds = time_per_op(op, count)
            self.fsyncs += self._counter.calls - before
            self.ops += count
            return seconds

        return measure

    def per_op(self) -> float:
        """Return the fsyncs per operation so far."""
        return self.fsyncs / self.ops if self.ops else float("nan")


def latency_row(
    group: str,
    name: str,
    subject: tuple[str, Callable[[], float]],
    reference: tuple[str, Callable[[], float]],
    rounds: int,
    *,
    ratio_label: str,
    reference_over_subject: bool = False,
    target: Target | None = None,
    target_on_subject: bool = False,
) -> Row:
    """Alternate two measurements of seconds per operation and return their row."""
    comparison = alternate(subject[1], reference[1], rounds)
    return Row(
        group=group,
        name=name,
        subject_label=subject[0],
        subject=comparison.subject,
        unit="s",
        reference_label=reference[0],
        reference=comparison.reference,
        ratio_label=ratio_label,
        ratios=comparison.ratios(reference_over_subject=reference_over_subject),
        target=target,
        target_on_subject=target_on_subject,
    )


class Subjects:
    """The agent-telemetry clients of the benchmark, one store per durability mode."""

    def __init__(self, subjects_module: ModuleType, root: Path) -> None:
        self._module = subjects_module
        self._root = root
        self._clients: dict[str, Any] = {}
        self._events: dict[str, Any] = {}

    def run_op(self, durability: str) -> Callable[[], None]:
        """Return a function that records one whole run in the store of ``durability``."""
        client = self._client(durability)
        return lambda: self._module.record_run(client)

    def event_op(self, durability: str) -> Callable[[], None]:
        """Return a function that logs one event in the store of ``durability``."""
        self._client(durability)
        return self._events[durability].log_event  # type: ignore[no-any-return]

    def release(self, durability: str) -> None:
        """End the event run and close the client of ``durability``, if it is open.

        The batch client's fsync thread would otherwise run, and fsync, during later
        measurements.
        """
        self._clients.pop(durability, None)
        events = self._events.pop(durability, None)
        if events is not None:
            events.close()

    def close(self) -> None:
        """End the event runs and close every client."""
        for durability in list(self._clients):
            self.release(durability)

    def _client(self, durability: str) -> Any:
        if durability not in self._clients:
            client = self._module.make_client(self._root / f"store-{durability}", durability)
            self._clients[durability] = client
            self._events[durability] = self._module.EventLogger(client)
        return self._clients[durability]


def measure_floor(
    root: Path, subjects: Subjects, counter: FsyncCounter, settings: Settings
) -> list[Row]:
    """Compare fdatasync with fsync, and a durable run and a log_event with their floors."""
    floor = FloorFile(root / "floor.ndjson")
    ops, rounds = settings.ops, settings.rounds
    progress("floor: fdatasync against fsync")
    try:
        fsync_label = "write + fsync, 1 KB"
        rows = [
            latency_row(
                "floor",
                "fdatasync against fsync",
                ("write + fdatasync, 1 KB", lambda: time_per_op(floor.write_fdatasync, ops)),
                (fsync_label, lambda: time_per_op(floor.write_fsync, ops)),
                rounds,
                ratio_label="fdatasync / fsync",
            )
        ]
        rows[0].note = "shows whether fdatasync is cheaper than fsync on this file system"

        progress("one durable run against two fsyncs")
        runs = FsyncTally(counter)
        row = latency_row(
            "durable writes",
            "one durable run (fsync)",
            ("start_run + end_run", runs.timed(subjects.run_op("fsync"), ops)),
            ("2 x (write + fsync, 1 KB)", lambda: time_per_op(floor.two_write_fsyncs, ops)),
            rounds,
            ratio_label="run / two fsyncs",
            target=Target("<=", 1.2),
        )
        row.note = f"{runs.per_op():.2f} journal fsyncs per run"
        rows.append(row)

        progress("log_event against one fsync")
        events = FsyncTally(counter)
        row = latency_row(
            "durable writes",
            "log_event (fsync)",
            ("log_event", events.timed(subjects.event_op("fsync"), ops)),
            (fsync_label, lambda: time_per_op(floor.write_fsync, ops)),
            rounds,
            ratio_label="log_event / fsync",
            target=Target("<=", 1.1),
        )
        row.note = f"{events.per_op():.2f} journal fsyncs per event"
        rows.append(row)
    finally:
        floor.close()
    return rows


def measure_caller_cost(root: Path, subjects: Subjects, settings: Settings) -> list[Row]:
    """Time log_event in the batch and none modes against handing a line to the OS."""
    floor = FloorFile(root / "floor-write.ndjson")
    ops = settings.fast_ops
    rows = []
    try:
        for durability in ("batch", "none"):
            progress(f"log_event with durability {durability}")
            log_event = subjects.event_op(durability)
            rows.append(
                latency_row(
                    "caller's thread",
                    f"log_event ({durability})",
                    ("log_event", functools.partial(time_per_op, log_event, ops)),
                    ("os.write, 1 KB", lambda: time_per_op(floor.write, ops)),
                    settings.rounds,
                    ratio_label="log_event / write",
                    target=Target("<=", 10e-6, "s"),
                    target_on_subject=True,
                )
            )
        subjects.release("batch")
    finally:
        floor.close()
    return rows


def measure_processes(root: Path, settings: Settings) -> list[Row]:
    """Compare the run throughput of 4 processes sharing a store with that of 1 process."""
    progress("4 processes against 1 process, one store")
    pool = ProcessPool(root / "store-processes", 4)
    fsyncs: list[float] = []

    def four_processes() -> float:
        result = pool.run(4, settings.duration)
        fsyncs.append(result.fsyncs_per_op)
        return result.ops_per_second

    try:
        comparison = alternate(
            four_processes,
            lambda: pool.run(1, settings.duration).ops_per_second,
            settings.contention_rounds,
            warmup=False,
        )
    finally:
        pool.close()
    return [
        Row(
            group="contention",
            name="4 processes, one store",
            subject_label="4 processes",
            subject=comparison.subject,
            unit="/s",
            reference_label="1 process",
            reference=comparison.reference,
            ratio_label="4 / 1",
            ratios=comparison.ratios(),
            target=Target(">=", 1.3),
            note=f"durable runs, {spread(fsyncs).median:.2f} journal fsyncs per run with 4",
        )
    ]


def measure_threads(
    root: Path, subjects: Subjects, counter: FsyncCounter, settings: Settings
) -> list[Row]:
    """Compare 8 threads logging through group commit with fsync per line under a lock."""
    progress("8 threads: group commit against fsync per line under a lock")
    log_event = subjects.event_op("fsync")
    locked = LockedFsyncWriter(root / "locked-fsync.ndjson")
    group_fsyncs: list[float] = []
    locked_fsyncs: list[float] = []

    def group_commit() -> float:
        result = run_threads(log_event, 8, settings.duration, counter)
        group_fsyncs.append(result.fsyncs_per_op)
        return result.ops_per_second

    def fsync_per_line() -> float:
        result = run_threads(locked.append, 8, settings.duration, counter)
        locked_fsyncs.append(result.fsyncs_per_op)
        return result.ops_per_second

    try:
        comparison = alternate(
            group_commit, fsync_per_line, settings.contention_rounds, warmup=False
        )
    finally:
        locked.close()
    return [
        Row(
            group="contention",
            name="8 threads, one client",
            subject_label="log_event, group commit",
            subject=comparison.subject,
            unit="/s",
            reference_label="fsync per line under a lock",
            reference=comparison.reference,
            ratio_label="group / per line",
            ratios=comparison.ratios(),
            target=Target(">=", 2.0),
        ),
        Row(
            group="contention",
            name="fsyncs per event, 8 threads",
            subject_label="group commit",
            subject=group_fsyncs,
            unit="",
            reference_label="fsync per line",
            reference=locked_fsyncs,
            target=Target("<=", 0.5, ""),
        ),
    ]


def measure_peers(root: Path, subjects: Subjects, settings: Settings) -> list[Row]:
    """Compare agent-telemetry with MLflow, OpenTelemetry, logging and structlog."""
    ops, rounds = settings.ops, settings.rounds
    plans = [
        # (peer, row name, peer label, telemetry label, telemetry op, calls per round, target)
        (
            "mlflow",
            "MLflow tracking, SQLite",
            "start_run + log_metric",
            "durable run",
            subjects.run_op("fsync"),
            settings.mlflow_runs,
            Target(">=", 20.0),
        ),
        (
            "opentelemetry",
            "OpenTelemetry span, fsynced JSON line",
            "one span",
            "log_event (fsync)",
            subjects.event_op("fsync"),
            ops,
            Target(">", 1.0),
        ),
        (
            "logging-fsync",
            "logging, JSON line + fsync",
            "logger.info",
            "log_event (fsync)",
            subjects.event_op("fsync"),
            ops,
            None,
        ),
        (
            "logging",
            "logging, JSON line",
            "logger.info",
            "log_event (none)",
            subjects.event_op("none"),
            settings.fast_ops,
            None,
        ),
        (
            "structlog",
            "structlog + orjson",
            "log.info",
            "log_event (none)",
            subjects.event_op("none"),
            settings.fast_ops,
            None,
        ),
    ]
    rows = []
    for peer_name, name, peer_label, label, op, calls, target in plans:
        progress(f"peer: {name}")
        peer, reason = open_peer(peer_name, root / f"peer-{peer_name}")
        if peer is None:
            rows.append(Row("peers", name, label, [], "s", note=f"skipped: {reason}"))
            continue
        try:
            rows.append(
                latency_row(
                    "peers",
                    name,
                    (label, functools.partial(time_per_op, op, calls)),
                    (peer_label, functools.partial(time_per_op, peer.record, calls)),
                    rounds,
                    ratio_label="peer / telemetry",
                    reference_over_subject=True,
                    target=target,
                )
            )
        finally:
            peer.close()
    return rows


def measure_bridge(
    root: Path, subjects: Subjects, subjects_module: ModuleType, settings: Settings
) -> list[Row]:
    """Compare a client with the OpenTelemetry bridge on with one without it."""
    progress("OpenTelemetry bridge: runs and events with the bridge on and off")
    name = "OpenTelemetry bridge"
    try:
        import opentelemetry.exporter.otlp.proto.http  # noqa: F401
    except ImportError:
        reason = "skipped: install agent-telemetry[otel]"
        return [Row("bridge", name, "durable run, bridge on", [], "s", note=reason)]

    with OTLPSink() as sink, bridge_environment(sink.endpoint):
        client = make_bridge_client(root / "store-bridge")
        events = subjects_module.EventLogger(client)
        try:
            rows = [
                latency_row(
                    "bridge",
                    "one durable run, bridge on against off (batch span processor, "
                    "OTLP/HTTP to 127.0.0.1)",
                    (
                        "start_run + end_run, bridge on",
                        functools.partial(
                            time_per_op, lambda: subjects_module.record_run(client), settings.ops
                        ),
                    ),
                    (
                        "start_run + end_run, bridge off",
                        functools.partial(time_per_op, subjects.run_op("fsync"), settings.ops),
                    ),
                    settings.rounds,
                    ratio_label="on / off",
                ),
                latency_row(
                    "bridge",
                    "log_event (fsync), bridge on against off",
                    (
                        "log_event, bridge on",
                        functools.partial(time_per_op, events.log_event, settings.ops),
                    ),
                    (
                        "log_event, bridge off",
                        functools.partial(time_per_op, subjects.event_op("fsync"), settings.ops),
                    ),
                    settings.rounds,
                    ratio_label="on / off",
                ),
            ]
        finally:
            events.close()
        requests = sink.close()
    rows[0].note = f"{requests} export requests reached the collector"
    return rows


def measure_memory(subjects_module: ModuleType, root: Path, settings: Settings) -> list[Row]:
    """Read the resident memory of a fresh process after 1,000 runs and after many more.

    The second row compares the end with the halfway point, which shows whether memory
    still grows late in the run or only grew early, while bounded caches filled.
    """
    total = settings.memory_runs
    first = min(1000, total)
    half = max(first, total // 2)
    checkpoints = sorted({first, *(n for n in (10_000,) if first < n < half), half, total})
    progress(f"memory: {total:,} runs in a fresh process (durability none)")
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as executor:
        future = executor.submit(
            subjects_module.measure_memory, str(root / "store-memory"), checkpoints
        )
        results: list[tuple[int, int | None, float]] = future.result()

    rss = {runs: resident for runs, resident, _ in results}
    if any(resident is None for resident in rss.values()):
        return [Row("memory", "resident memory", "", [], "B", note="skipped: no RSS reading")]
    steps = ", ".join(f"{runs:,}: {format_quantity(rss[runs] or 0, 'B')}" for runs in rss)
    per_run = results[-1][2] / total

    def row(name: str, later: int, earlier: int, target: Target | None, note: str) -> Row:
        later_rss, earlier_rss = float(rss[later] or 0), float(rss[earlier] or 0)
        return Row(
            group="memory",
            name=name,
            subject_label=f"after {later:,}",
            subject=[later_rss],
            unit="B",
            reference_label=f"after {earlier:,}",
            reference=[earlier_rss],
            ratio_label=f"{later:,} / {earlier:,}",
            ratios=[later_rss / earlier_rss],
            target=target,
            note=note,
        )

    return [
        row(
            f"resident memory, {total:,} runs against {first:,}",
            total,
            first,
            Target("<=", MEMORY_GROWTH_LIMIT),
            f"one process, {steps}, {format_quantity(per_run, 's')} per run",
        ),
        row(f"resident memory, second half of the {total:,} runs", total, half, None, ""),
    ]


# -- system calls and profile ------------------------------------------------------------------


def count_syscalls(
    root: Path, settings: Settings
) -> tuple[list[tuple[str, dict[str, float]]], str]:
    """Count with strace the system calls of one durable run and of one log_event (fsync).

    Three traced processes record nothing, ``syscall_runs`` runs, and as many events. The
    counts of the first are subtracted from the others, so start-up and schema creation do
    not count.
    SQLite's own fsyncs are included, unlike in FsyncCounter.

    Returns the rows (operation, calls per operation by system call) and a note, with no
    rows when strace is missing or fails.
    """
    strace = shutil.which("strace")
    if strace is None:
        return [], "strace is not installed, so system calls were not counted."
    count = settings.syscall_runs
    progress(f"system calls of {count} runs and {count} events, under strace")
    try:
        baseline = _traced_counts(strace, root, 0, 0)
        runs = _traced_counts(strace, root, count, 0)
        events = _traced_counts(strace, root, 0, count)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return [], f"strace failed, so system calls were not counted: {exc}"

    def per_op(traced: dict[str, int]) -> dict[str, float]:
        return {name: (traced.get(name, 0) - baseline.get(name, 0)) / count for name in SYSCALLS}

    rows = [("one durable run", per_op(runs)), ("one log_event", per_op(events))]
    note = f"strace -f -c of {count} operations, minus a process that records none."
    return rows, note


def _traced_counts(strace: str, root: Path, runs: int, events: int) -> dict[str, int]:
    label = f"{runs}-{events}"
    output = root / f"strace-{label}.txt"
    command = [
        strace,
        "-f",
        "-c",
        "-o",
        str(output),
        "-e",
        "trace=" + ",".join(SYSCALLS),
        sys.executable,
        str(Path(__file__).with_name("_subjects.py")),
        str(root / f"store-strace-{label}"),
        str(runs),
        str(events),
    ]
    result = subprocess.run(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"exit status {result.returncode}: {result.stderr.strip()[-300:]}")

    # Lines of the summary: "% time  seconds  usecs/call  calls  [errors]  syscall".
    counts: dict[str, int] = {}
    for line in output.read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if len(fields) in (5, 6) and fields[-1] in SYSCALLS and fields[3].isdigit():
            counts[fields[-1]] = int(fields[3])
    return counts


def _is_lock_wait(name: str) -> bool:
    return "'acquire' of '_thread." in name


# Categories of the profile's own time, matched on cProfile's names of built-in functions.
PROFILE_CATEGORIES: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("fsync and fdatasync", lambda name: name.endswith((".fsync>", ".fdatasync>"))),
    ("SQLite (sqlite3 methods)", lambda name: "sqlite3." in name),
    ("file lock (flock)", lambda name: name.endswith((".flock>", ".lockf>"))),
    # The sync thread fsyncs a run's journal line, so the profiled thread waits for it here.
    ("waiting for the sync thread's fsync, locks", _is_lock_wait),
    ("other os calls (write, pread, fstat, ...)", lambda name: "method posix." in name),
    ("orjson", lambda name: "orjson" in name),
)
PROFILE_TOP_ENTRIES = 20


@dataclass
class ProfileResult:
    """The profile of the write path, reduced to the tables of the report."""

    repetitions: int
    seconds_per_repetition: float
    profiled_seconds: float
    categories: list[tuple[str, float]]
    top: list[tuple[str, str, float, float]]


def profile_write_path(
    subjects_module: ModuleType, root: Path, settings: Settings
) -> ProfileResult:
    """Profile one durable run and 10 log_events with cProfile and tabulate where time goes."""
    repetitions = settings.profile_repetitions
    progress(f"profile: {repetitions} x (one durable run + 10 log_events)")
    profile, seconds = subjects_module.profile_write_path(root / "store-profile", repetitions)
    # Stats.stats maps (file, line, function) to (primitive calls, calls, own time,
    # cumulative time, callers), in seconds over all repetitions.
    entries = {
        key: value
        for key, value in pstats.Stats(profile).stats.items()  # type: ignore[attr-defined]
        if "_lsprof.Profiler" not in key[2]
    }
    total = sum(value[2] for value in entries.values())

    own_by_category = dict.fromkeys([label for label, _ in PROFILE_CATEGORIES], 0.0)
    rest = 0.0
    for (file_name, _, function), (_, _, own, _, _) in entries.items():
        name = function if file_name == "~" else ""
        label = next((label for label, matches in PROFILE_CATEGORIES if matches(name)), None)
        if label is None:
            rest += own
        else:
            own_by_category[label] += own
    categories = [*own_by_category.items(), ("Python code and other built-ins", rest)]

    ranked = sorted(entries.items(), key=lambda item: item[1][3], reverse=True)
    top = [
        (_function_label(key), _calls_label(value[1], value[0], repetitions), value[2], value[3])
        for key, value in ranked[:PROFILE_TOP_ENTRIES]
    ]
    return ProfileResult(repetitions, seconds, total / repetitions, categories, top)


def _function_label(key: tuple[str, int, str]) -> str:
    file_name, line, function = key
    if file_name == "~":
        return function
    path = Path(file_name)
    paths = sysconfig.get_paths()
    prefixes = [REPOSITORY, *(Path(paths[key]) for key in ("purelib", "platlib", "stdlib"))]
    for prefix in prefixes:
        if path.is_relative_to(prefix):
            path = path.relative_to(prefix)
            break
    return f"{path}:{line}({function})"


def _calls_label(calls: int, primitive_calls: int, repetitions: int) -> str:
    per_repetition = f"{calls / repetitions:.3g}"
    if calls != primitive_calls:
        per_repetition += f" ({primitive_calls / repetitions:.3g} not recursive)"
    return per_repetition


def journal_line_sizes(journal_root: Path) -> dict[str, float]:
    """Return the mean bytes per journal line, newline included, for each record_type."""
    import orjson

    sizes: dict[str, list[int]] = {}
    for path in sorted(journal_root.rglob("*.ndjson")):
        with open(path, "rb") as journal:
            for line in journal:
                try:
                    record_type = orjson.loads(line).get("record_type", "?")
                except orjson.JSONDecodeError:
                    continue
                sizes.setdefault(record_type, []).append(len(line))
    return {record_type: sum(lengths) / len(lengths) for record_type, lengths in sizes.items()}


# -- output -------------------------------------------------------------------------------------


def progress(message: str) -> None:
    """Print what is being measured now on stderr."""
    print(f"measuring: {message}", file=sys.stderr, flush=True)


METHOD_NOTES = """\
How each row is measured:

- Every comparison alternates its subject and its reference in this one process, for the
  number of rounds given, the subject first in even rounds. Each round of a latency row
  times a loop of calls and divides by their number, loop included. The tables give the
  median over the rounds and, in brackets, the first and third quartiles. A ratio is taken
  within each round and its median reported, so that a slow phase of the disk affects
  both sides of a round.
- floor: a file kept open with O_APPEND in the benchmark directory, on the same file
  system as the stores. Each call writes one 1 KB JSON line and fsyncs it.
- durable writes: one client with durability fsync (the default) and no API. A run is
  start_run and end_run with one count, and log_event logs 5 fields to a run kept open.
  Journal fsyncs are counted by wrapping os.fsync and os.fdatasync in this process.
  SQLite's fsyncs are not counted there, but the system call table counts both.
- contention: 4 spawned processes, each with its own client of one shared store,
  record durable runs for a fixed duration, against one of them alone. 8 threads of one
  client log events for a fixed duration, against 8 threads that write and fsync a 1 KB
  line each under one lock. Throughput is all calls divided by the time from the first
  start to the last end.
- caller's thread: log_event of a client with durability batch (1 s interval) or none,
  against an os.write of a 1 KB line without fsync.
- peers: a ratio above 1 means agent-telemetry is faster. MLflow records one run with one
  metric in a SQLite tracking store, against a durable run. MLflow 3.18 sets neither
  journal_mode nor synchronous, so SQLite's defaults apply: a rollback journal with
  synchronous=FULL, which is durable. The OpenTelemetry SDK ends one span
  into a SimpleSpanProcessor whose exporter writes it as one JSON line and fsyncs the
  file, against a durable log_event. logging writes one JSON line per record through a
  FileHandler, with an fsync after each record against a durable log_event, and without
  one against log_event with durability none. structlog is configured as its performance
  guide's example (orjson, BytesLogger, cached filtering logger), against log_event with
  durability none.
- bridge: a client with the OpenTelemetry bridge on (TELEMETRY_OTEL), whose own pipeline
  queues each run's span in a BatchSpanProcessor and exports it over OTLP/HTTP to a
  server on 127.0.0.1 in another process, against the durable client without the bridge.
  A ratio above 1 is the bridge's cost on the caller's thread; the export itself runs on
  the processor's thread.
- memory: a fresh process records runs with durability none and reads its resident
  memory (psutil, else /proc/self/statm) after a garbage collection at each checkpoint.
  One reading per checkpoint, so there is no spread. The target allows {growth:.0%} of
  growth over the reading after 1,000 runs, for the noise of the allocator and reading.
"""


def render_document(
    *,
    command: str,
    started_at: datetime.datetime,
    elapsed: float,
    settings: Settings,
    machine: list[tuple[str, str]],
    versions: list[tuple[str, str]],
    rows: list[Row],
    line_sizes: dict[str, float],
    syscalls: tuple[list[tuple[str, dict[str, float]]], str] | None,
    profile: ProfileResult | None,
) -> str:
    """Return the generated part of docs/benchmarks.md."""
    parts = [
        "# Benchmarks of the write path",
        "",
        "agent-telemetry's write path measured against the floor of the disk (one `os.write` "
        "and `os.fsync` of a 1 KB line) and against the tools a user might pick instead. "
        "Targets are ratios taken within one invocation, because absolute times depend on "
        "the machine. This page is written by `benchmarks/bench_write.py --markdown`, "
        "except the section at the end, which is written by hand.",
        "",
        f"Command: `{command}`, started {started_at:%Y-%m-%d %H:%M} UTC, "
        f"took {elapsed / 60:.1f} minutes.",
        "",
        f"Sizes: {settings.rounds} rounds of {settings.ops} calls for fsync-bound rows, "
        f"{settings.fast_ops} calls for the others and {settings.mlflow_runs} MLflow runs. "
        f"{settings.contention_rounds} rounds of {settings.duration:g} s for contention. "
        f"{settings.memory_runs:,} runs for memory.",
        "",
        "## Machine",
        "",
        *(f"- {label}: {value}" for label, value in machine),
        "",
        "## Versions",
        "",
        "| software | version |",
        "| --- | --- |",
        *(f"| {name} | {version} |" for name, version in versions),
        "",
        "## Results",
        "",
        "Each cell: median [first quartile, third quartile] over the rounds.",
        "",
        markdown_results(rows),
        "",
        METHOD_NOTES.format(growth=MEMORY_GROWTH_LIMIT - 1),
    ]
    if line_sizes:
        sizes = ", ".join(f"{name} {size:.0f} B" for name, size in sorted(line_sizes.items()))
        parts += [f"Mean journal line in the fsync store: {sizes}.", ""]
    if syscalls is not None:
        parts += ["## System calls per operation", "", *_syscall_markdown(*syscalls), ""]
    if profile is not None:
        parts += _profile_markdown(profile)
    return "\n".join(parts)


def _syscall_markdown(rows: list[tuple[str, dict[str, float]]], note: str) -> list[str]:
    if not rows:
        return [note]
    lines = [
        "| operation | " + " | ".join(SYSCALLS) + " |",
        "| --- |" + " --- |" * len(SYSCALLS),
    ]
    for operation, calls in rows:
        lines.append(f"| {operation} | " + " | ".join(f"{calls[n]:.2f}" for n in SYSCALLS) + " |")
    return [*lines, "", note]


def _profile_markdown(profile: ProfileResult) -> list[str]:
    total = sum(own for _, own in profile.categories) or 1.0
    lines = [
        "## Profile: one durable run and 10 log_events",
        "",
        f"cProfile of {profile.repetitions} repetitions, durability fsync. One repetition "
        f"takes {format_quantity(profile.seconds_per_repetition, 's')} without the profiler "
        f"and {format_quantity(profile.profiled_seconds, 's')} with it. The profiler's "
        "overhead falls on Python code, not on system calls.",
        "",
        "Own time by kind, per repetition:",
        "",
        "| where | time | share |",
        "| --- | --- | --- |",
    ]
    for label, own in profile.categories:
        per_repetition = own / profile.repetitions
        lines.append(f"| {label} | {format_quantity(per_repetition, 's')} | {own / total:.0%} |")
    lines += [
        "",
        f"Top {len(profile.top)} functions by cumulative time, per repetition:",
        "",
        "| function | calls | own time | cumulative |",
        "| --- | --- | --- | --- |",
    ]
    for label, calls, own, cumulative in profile.top:
        own_text = format_quantity(own / profile.repetitions, "s")
        cumulative_text = format_quantity(cumulative / profile.repetitions, "s")
        lines.append(f"| `{label}` | {calls} | {own_text} | {cumulative_text} |")
    return [*lines, ""]


def print_report(
    machine: list[tuple[str, str]],
    versions: list[tuple[str, str]],
    rows: list[Row],
    syscalls: tuple[list[tuple[str, dict[str, float]]], str] | None,
    profile: ProfileResult | None,
) -> None:
    """Print the machine, the versions and the results on stdout."""
    for label, value in machine:
        print(f"{label}: {value}")
    print(", ".join(f"{name} {version}" for name, version in versions))
    print("median [first quartile, third quartile] over the rounds\n")
    print(text_table(rows))
    if syscalls is not None:
        print("\n== system calls per operation")
        for operation, calls in syscalls[0]:
            print(f"{operation}: " + ", ".join(f"{n} {calls[n]:.2f}" for n in SYSCALLS))
        print(syscalls[1])
    if profile is not None:
        print(
            f"\n== profile of one durable run + 10 log_events: "
            f"{format_quantity(profile.seconds_per_repetition, 's')} per repetition"
        )
        total = sum(own for _, own in profile.categories) or 1.0
        for label, own in profile.categories:
            print(f"{label:<44} {own / total:>5.0%}")


# -- command line -------------------------------------------------------------------------------


QUICK = Settings(
    rounds=3,
    ops=10,
    fast_ops=200,
    mlflow_runs=3,
    duration=0.3,
    contention_rounds=2,
    memory_runs=2_000,
    profile_repetitions=10,
    syscall_runs=50,
)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dir",
        help="directory to create the temporary stores in, on the file system to measure "
        "(default: the system's temporary directory unless it is tmpfs)",
    )
    parser.add_argument("--markdown", metavar="PATH", help="also write the results to PATH")
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=SECTIONS,
        help="leave out a part (repeat the option for several)",
    )

    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes, in place of the size options below, to check that everything "
        "runs in about a minute (the numbers are noisy)",
    )
    parser.add_argument("--rounds", type=int, default=15, help="rounds of each latency row")
    parser.add_argument("--ops", type=int, default=50, help="calls per round, fsync-bound rows")
    parser.add_argument(
        "--fast-ops", type=int, default=2000, help="calls per round of rows without fsync"
    )
    parser.add_argument("--mlflow-runs", type=int, default=10, help="MLflow runs per round")
    parser.add_argument(
        "--duration", type=float, default=1.0, help="seconds per round of contention rows"
    )
    parser.add_argument("--contention-rounds", type=int, default=7, help="rounds of contention")
    parser.add_argument(
        "--memory-runs", type=int, default=100_000, help="runs of the memory measurement"
    )
    parser.add_argument("--profile-repetitions", type=int, default=100, help="repetitions profiled")
    parser.add_argument(
        "--syscall-runs", type=int, default=300, help="runs and events traced with strace"
    )

    arguments = parser.parse_args(argv)
    for name in (
        "rounds",
        "ops",
        "fast_ops",
        "mlflow_runs",
        "contention_rounds",
        "memory_runs",
        "profile_repetitions",
        "syscall_runs",
    ):
        if getattr(arguments, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be 1 or more")
    if not arguments.duration > 0:
        parser.error("--duration must be a positive number of seconds")
    return arguments


def settings_from(arguments: argparse.Namespace) -> Settings:
    """Return the sizes: QUICK with --quick, else the options' values."""
    if arguments.quick:
        return QUICK
    return Settings(
        rounds=arguments.rounds,
        ops=arguments.ops,
        fast_ops=arguments.fast_ops,
        mlflow_runs=arguments.mlflow_runs,
        duration=arguments.duration,
        contention_rounds=arguments.contention_rounds,
        memory_runs=arguments.memory_runs,
        profile_repetitions=arguments.profile_repetitions,
        syscall_runs=arguments.syscall_runs,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks, print the table, write the Markdown page if asked, and return 0."""
    arguments = parse_arguments(argv)
    settings = settings_from(arguments)
    skip = set(arguments.skip)
    started_at = datetime.datetime.now(datetime.timezone.utc)
    started = time.perf_counter()

    counter = install_fsync_counter()
    # Imported after the counter is installed, so that the journal's fsyncs are counted.
    import _subjects

    parent = choose_parent_directory(arguments.dir)
    rows: list[Row] = []
    syscalls = None
    profile = None
    with tempfile.TemporaryDirectory(prefix="bench-write-", dir=parent) as directory:
        root = Path(directory)
        machine = describe_machine(root)
        subjects = Subjects(_subjects, root)
        try:
            if "floor" not in skip:
                rows += measure_floor(root, subjects, counter, settings)
            if "caller" not in skip:
                rows += measure_caller_cost(root, subjects, settings)
            if "contention" not in skip:
                rows += measure_processes(root, settings)
                rows += measure_threads(root, subjects, counter, settings)
            if "peers" not in skip:
                rows += measure_peers(root, subjects, settings)
            if "bridge" not in skip:
                rows += measure_bridge(root, subjects, _subjects, settings)
        finally:
            subjects.close()
        line_sizes = journal_line_sizes(root / "store-fsync")
        if "memory" not in skip:
            rows += measure_memory(_subjects, root, settings)
        if "syscalls" not in skip:
            syscalls = count_syscalls(root, settings)
        if "profile" not in skip:
            profile = profile_write_path(_subjects, root, settings)
    elapsed = time.perf_counter() - started

    versions = describe_versions()
    print_report(machine, versions, rows, syscalls, profile)
    print(f"\n{elapsed:.0f} s in all")
    if arguments.markdown:
        command = shlex.join(["python", *sys.argv])
        document = render_document(
            command=command,
            started_at=started_at,
            elapsed=elapsed,
            settings=settings,
            machine=machine,
            versions=versions,
            rows=rows,
            line_sizes=line_sizes,
            syscalls=syscalls,
            profile=profile,
        )
        write_markdown(Path(arguments.markdown), document)
        print(f"wrote {arguments.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
