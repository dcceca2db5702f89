"""Throughput of several writers at once: processes sharing a store, threads sharing a client.

Both measure for a fixed duration rather than a fixed count, so that every writer is busy
for the whole window and none finishes early and leaves the others alone. Throughput is
the operations completed by all writers divided by the time from the first writer's start
to the last writer's end.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from _harness import LINE_1KB, FsyncCounter, install_fsync_counter

__all__ = ["LockedFsyncWriter", "ProcessPool", "Throughput", "run_threads"]

# How far in the future the parent sets the common start, so that every worker has
# received its message and is waiting when the window opens.
_START_DELAY_SECONDS = 0.05
# Maximum wait for a worker to start, and for a phase to end beyond its duration.
_WORKER_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True)
class Throughput:
    """Operations per second of a group of writers, and the fsyncs they made per operation."""

    ops_per_second: float
    fsyncs_per_op: float


def run_threads(
    op: Callable[[], object], threads: int, duration: float, counter: FsyncCounter
) -> Throughput:
    """Call ``op`` in a loop in ``threads`` threads for ``duration`` seconds.

    Counts the fsyncs made by this whole process in that window, so nothing else in the
    process should fsync meanwhile.
    """
    start = threading.Barrier(threads + 1)
    counts = [0] * threads
    bounds: list[tuple[float, float]] = [(0.0, 0.0)] * threads
    deadline = 0.0

    def loop(index: int) -> None:
        start.wait()
        started = time.perf_counter()
        calls = 0
        while time.perf_counter() < deadline:
            op()
            calls += 1
        counts[index] = calls
        bounds[index] = (started, time.perf_counter())

    workers = [threading.Thread(target=loop, args=(index,)) for index in range(threads)]
    for worker in workers:
        worker.start()
    fsyncs_before = counter.calls
    deadline = time.perf_counter() + duration
    start.wait()
    for worker in workers:
        worker.join()
    fsyncs = counter.calls - fsyncs_before

    total = sum(counts)
    elapsed = max(end for _, end in bounds) - min(begin for begin, _ in bounds)
    return Throughput(total / elapsed, fsyncs / total if total else float("nan"))


class LockedFsyncWriter:
    """Appends LINE_1KB and fsyncs it while holding a lock: fsync per line, no sharing.

    This is the reference for group commit. Every caller waits for the fsyncs of all the
    callers queued before it, one by one.
    """

    def __init__(self, path: Path) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        self._fd = os.open(path, flags, 0o600)
        self._lock = threading.Lock()

    def append(self) -> None:
        """Write one line and return after its fsync."""
        with self._lock:
            os.write(self._fd, LINE_1KB)
            os.fsync(self._fd)

    def close(self) -> None:
        """Close the file."""
        os.close(self._fd)


class ProcessPool:
    """Worker processes that each record durable runs into one shared store on request.

    The workers are started once, with the ``spawn`` method, and each opens its own client
    of ``data_dir`` and records one untimed run before it reports that it is ready.

    Raises:
        TimeoutError: a worker did not start within _WORKER_TIMEOUT_SECONDS.
        RuntimeError: a worker failed. The message contains its error.
    """

    def __init__(self, data_dir: Path, processes: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._connections: list[Connection] = []
        self._processes: list[Any] = []
        for _ in range(processes):
            parent_end, child_end = context.Pipe()
            process = context.Process(target=_worker_main, args=(child_end, str(data_dir)))
            process.start()
            child_end.close()
            self._connections.append(parent_end)
            self._processes.append(process)
        for connection in self._connections:
            self._receive(connection, _WORKER_TIMEOUT_SECONDS)

    def run(self, processes: int, duration: float) -> Throughput:
        """Let the first ``processes`` workers record runs for ``duration`` seconds at once."""
        start_at = time.monotonic() + _START_DELAY_SECONDS
        active = self._connections[:processes]
        for connection in active:
            connection.send(("run", start_at, duration))
        results = [
            self._receive(connection, duration + _WORKER_TIMEOUT_SECONDS) for connection in active
        ]
        runs = sum(result[0] for result in results)
        elapsed = max(result[2] for result in results) - min(result[1] for result in results)
        fsyncs = sum(result[3] for result in results)
        return Throughput(runs / elapsed, fsyncs / runs if runs else float("nan"))

    def close(self) -> None:
        """Ask every worker to close its client and exit, and wait for them."""
        for connection in self._connections:
            with contextlib.suppress(OSError):
                connection.send(("stop",))
        for process in self._processes:
            process.join(_WORKER_TIMEOUT_SECONDS)
            if process.is_alive():
                process.terminate()
                process.join()

    @staticmethod
    def _receive(connection: Connection, timeout: float) -> Any:
        if not connection.poll(timeout):
            raise TimeoutError(f"a benchmark worker sent nothing within {timeout:.0f} s")
        message = connection.recv()
        if message[0] == "error":
            raise RuntimeError(f"a benchmark worker failed: {message[1]}")
        return message[1:]


def _worker_main(connection: Connection, data_dir: str) -> None:
    # Runs in a spawned process: the counter goes in before telemetry is imported.
    counter = install_fsync_counter()
    try:
        import _subjects

        client = _subjects.make_client(Path(data_dir), "fsync")
        _subjects.record_run(client)
    except Exception as exc:
        connection.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    connection.send(("ready",))

    try:
        while True:
            message = connection.recv()
            if message[0] == "stop":
                break
            _, start_at, duration = message
            time.sleep(max(0.0, start_at - time.monotonic()))
            fsyncs_before = counter.calls
            started = time.monotonic()
            runs = 0
            while time.monotonic() < start_at + duration:
                _subjects.record_run(client)
                runs += 1
            finished = time.monotonic()
            connection.send(("done", runs, started, finished, counter.calls - fsyncs_before))
    except Exception as exc:
        connection.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        client.close()
