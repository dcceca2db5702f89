"""The agent-telemetry side of the write-path benchmarks: clients and what they record.

Import this module after ``_harness.install_fsync_counter()``, so that the journal's fsyncs
are counted. Run as a script, it is the workload that bench_write.py traces with strace:

    python benchmarks/_subjects.py DATA_DIR RUNS EVENTS
"""

from __future__ import annotations

import cProfile
import gc
import sys
import time
from pathlib import Path

from _harness import EVENT_PAYLOAD, resident_memory_bytes

from telemetry import TelemetryClient, TelemetryConfig

__all__ = [
    "EventLogger",
    "make_client",
    "measure_memory",
    "profile_write_path",
    "record_run",
    "syscall_workload",
]


def make_client(data_dir: Path, durability: str) -> TelemetryClient:
    """Return a client of the store in ``data_dir`` with no API and no environment settings."""
    config = TelemetryConfig(
        data_dir=data_dir, durability=durability, api_enabled=False, environ={}
    )
    return TelemetryClient(config)


def record_run(client: TelemetryClient) -> None:
    """Record one whole run: start_run, then end_run with one count."""
    run_id = client.start_run("bench-write", "benchmark")
    client.end_run(run_id, "success", items_succeeded=10)


class EventLogger:
    """Logs EVENT_PAYLOAD as events of one run that stays open until close()."""

    def __init__(self, client: TelemetryClient) -> None:
        self.client = client
        self.run_id = client.start_run("bench-events", "benchmark")

    def log_event(self) -> None:
        """Log one event."""
        self.client.log_event(self.run_id, "item_processed", EVENT_PAYLOAD)

    def close(self) -> None:
        """End the run and close the client."""
        self.client.end_run(self.run_id)
        self.client.close()


def measure_memory(data_dir: str, checkpoints: list[int]) -> list[tuple[int, int | None, float]]:
    """Record runs with durability none and read the resident memory at each checkpoint.

    Meant for a fresh process, so that the memory is that of the runs alone. Returns
    (runs so far, resident bytes or None, seconds so far) per checkpoint, in order.
    """
    client = make_client(Path(data_dir), "none")
    results: list[tuple[int, int | None, float]] = []
    remaining = sorted(set(checkpoints))
    started = time.perf_counter()
    runs = 0
    try:
        while remaining:
            record_run(client)
            runs += 1
            if runs == remaining[0]:
                remaining.pop(0)
                gc.collect()
                results.append((runs, resident_memory_bytes(), time.perf_counter() - started))
    finally:
        client.close()
    return results


def profile_write_path(data_dir: Path, repetitions: int) -> tuple[cProfile.Profile, float]:
    """Profile ``repetitions`` times one durable run and 10 log_events of another open run.

    Returns the profile and the seconds of one repetition, timed without the profiler in a
    pass before the profiled one.
    """
    client = make_client(data_dir, "fsync")
    events = EventLogger(client)

    def repetition() -> None:
        record_run(client)
        for _ in range(10):
            events.log_event()

    try:
        repetition()
        started = time.perf_counter()
        for _ in range(repetitions):
            repetition()
        seconds = (time.perf_counter() - started) / repetitions

        profile = cProfile.Profile()
        profile.enable()
        for _ in range(repetitions):
            repetition()
        profile.disable()
    finally:
        events.close()
    return profile, seconds


def syscall_workload(data_dir: Path, runs: int, events: int) -> None:
    """Open a store and record ``runs`` durable runs and ``events`` events of one run.

    One durable run and one started run come first in every case, so that a workload of
    0 runs and 0 events counts what is common to all (start-up, schema, first file).
    """
    client = make_client(data_dir, "fsync")
    record_run(client)
    logger = EventLogger(client)
    for _ in range(runs):
        record_run(client)
    for _ in range(events):
        logger.log_event()
    logger.close()


if __name__ == "__main__":
    syscall_workload(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
