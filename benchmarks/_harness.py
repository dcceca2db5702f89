"""Shared parts of the write-path benchmarks: alternating rounds, statistics, fsync counts.

A comparison times a subject and its reference once per round, in alternating order, in
one process, so that both see the same disk, cache and CPU state. The ratio of each round
is taken between neighbours in time, and the median of those ratios is what the tables
report, with the first and third quartiles as the spread.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

__all__ = [
    "EVENT_PAYLOAD",
    "LINE_1KB",
    "Comparison",
    "FloorFile",
    "FsyncCounter",
    "Spread",
    "alternate",
    "install_fsync_counter",
    "resident_memory_bytes",
    "spread",
    "time_per_op",
]

# The payload of every event and log record that the benchmarks write, for every tool.
# Only strings and numbers, so that OpenTelemetry accepts it as span attributes.
EVENT_PAYLOAD: dict[str, str | int | float] = {
    "path": "src/agent/items/0001.json",
    "status": "ok",
    "bytes": 1834,
    "elapsed_ms": 12.5,
    "retries": 0,
}


def _json_line(size: int) -> bytes:
    prefix, suffix = b'{"pad":"', b'"}\n'
    return prefix + b"x" * (size - len(prefix) - len(suffix)) + suffix


# The floor's line: 1024 bytes of JSON with its newline.
LINE_1KB = _json_line(1024)


@dataclass(frozen=True)
class Spread:
    """The median of some values and their first and third quartiles."""

    median: float
    q1: float
    q3: float


def spread(values: list[float]) -> Spread:
    """Return the median and quartiles of ``values``. One value is its own spread.

    Raises:
        ValueError: ``values`` is empty.
    """
    if not values:
        raise ValueError("spread() needs at least one value")
    if len(values) == 1:
        return Spread(values[0], values[0], values[0])
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return Spread(median, q1, q3)


@dataclass
class Comparison:
    """The values of a subject and of its reference, one of each per round."""

    subject: list[float]
    reference: list[float]

    def ratios(self, *, reference_over_subject: bool = False) -> list[float]:
        """Return the ratio of each round: subject / reference, or the inverse."""
        pairs = zip(self.subject, self.reference, strict=True)
        if reference_over_subject:
            return [reference / subject for subject, reference in pairs]
        return [subject / reference for subject, reference in pairs]


def alternate(
    subject: Callable[[], float],
    reference: Callable[[], float],
    rounds: int,
    *,
    warmup: bool = True,
) -> Comparison:
    """Call both measurements once per round and collect what they return.

    The subject goes first in even rounds and second in odd ones, so that neither always
    runs right after the other's side effects (a dirty page cache, a checkpoint). With
    ``warmup``, one untimed call of each comes first, to open files and fill caches.
    """
    if warmup:
        subject()
        reference()
    comparison = Comparison([], [])
    for round_number in range(rounds):
        if round_number % 2 == 0:
            comparison.subject.append(subject())
            comparison.reference.append(reference())
        else:
            comparison.reference.append(reference())
            comparison.subject.append(subject())
    return comparison


def time_per_op(op: Callable[[], object], count: int) -> float:
    """Call ``op`` ``count`` times and return the mean seconds per call, loop included."""
    started = time.perf_counter()
    for _ in range(count):
        op()
    return (time.perf_counter() - started) / count


_SyncFunction = TypeVar("_SyncFunction", bound=Callable[[Any], None])


class FsyncCounter:
    """Counts the calls of os.fsync and os.fdatasync made in this process, in all threads.

    SQLite's own fsyncs are made in C, so they are not counted here, but the strace pass of
    bench_write.py counts them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls = 0

    @property
    def calls(self) -> int:
        """The number of calls so far."""
        with self._lock:
            return self._calls

    def wrap(self, function: _SyncFunction) -> _SyncFunction:
        """Return ``function`` with a count of its calls added before each call."""

        def counted(fd: Any) -> None:
            with self._lock:
                self._calls += 1
            function(fd)

        counted.__name__ = function.__name__
        counted.__qualname__ = f"counted_{function.__name__}"
        return cast(_SyncFunction, counted)


_installed: FsyncCounter | None = None


def install_fsync_counter() -> FsyncCounter:
    """Replace os.fsync and os.fdatasync by counting wrappers and return the counter.

    The journal takes its fsync function from ``os`` when ``telemetry`` is imported, so
    the counter must be installed before that import. A second call returns the counter
    installed by the first.

    Raises:
        RuntimeError: ``telemetry`` was imported before the first call.
    """
    global _installed
    if _installed is not None:
        return _installed
    if any(name == "telemetry" or name.startswith("telemetry.") for name in sys.modules):
        raise RuntimeError(
            "telemetry was imported before install_fsync_counter(), so its fsyncs would "
            "not be counted: install the counter first, then import telemetry"
        )
    counter = FsyncCounter()
    os.fsync = counter.wrap(os.fsync)
    if hasattr(os, "fdatasync"):
        os.fdatasync = counter.wrap(os.fdatasync)
    _installed = counter
    return counter


class FloorFile:
    """A file opened like a journal file (O_APPEND, kept open) that the floor writes to.

    Each method writes one LINE_1KB, or two, and returns when the OS, or the disk, has it.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        self._fd = os.open(path, flags, 0o600)

    def write(self) -> None:
        """Write one line without flushing it: the cost of handing it to the OS."""
        os.write(self._fd, LINE_1KB)

    def write_fsync(self) -> None:
        """Write one line and fsync the file."""
        os.write(self._fd, LINE_1KB)
        os.fsync(self._fd)

    def write_fdatasync(self) -> None:
        """Write one line and fdatasync the file (fsync where there is no fdatasync)."""
        os.write(self._fd, LINE_1KB)
        getattr(os, "fdatasync", os.fsync)(self._fd)

    def two_write_fsyncs(self) -> None:
        """Write and fsync one line, twice: the floor of a run with a start and an end."""
        self.write_fsync()
        self.write_fsync()

    def close(self) -> None:
        """Close the file."""
        os.close(self._fd)


def resident_memory_bytes() -> int | None:
    """Return the resident memory of this process in bytes, or None where it is unknown.

    Uses psutil when it is installed, else /proc/self/statm (Linux).
    """
    try:
        import psutil
    except ImportError:
        pass
    else:
        return int(psutil.Process().memory_info().rss)
    try:
        with open("/proc/self/statm") as statm:
            resident_pages = int(statm.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")
