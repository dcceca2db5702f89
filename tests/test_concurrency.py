"""Several processes and threads recording into one store at once."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from pathlib import Path

from telemetry import TelemetryClient, TelemetryConfig
from telemetry.database import DatabaseWriter
from telemetry.ndjson import NDJSONWriter

PROCESSES = 4
RUNS_PER_PROCESS = 200
EVENTS_PER_RUN = 5

WORKER = """
import logging, sys
from telemetry import TelemetryClient

logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
worker = sys.argv[1]
runs, events = int(sys.argv[2]), int(sys.argv[3])
client = TelemetryClient()
for number in range(runs):
    with client.track_run(f"worker-{worker}", "load") as run:
        for event in range(events):
            run.log_event("step", {"worker": worker, "run": number, "event": event})
        run.set_metrics(items_succeeded=events)
client.close()
"""


def read_journal(directory: Path) -> tuple[list[dict[str, object]], int]:
    reader = NDJSONWriter(directory)
    records: list[dict[str, object]] = []
    corrupt = 0
    for path in reader.list_files():
        report = reader.read_file_report(path.name[len("events_") : -len(".ndjson")])
        records.extend(report.records)
        corrupt += report.corrupt_lines
    return records, corrupt


def test_four_processes_one_store(tmp_path: Path) -> None:
    """4 processes x 200 runs x 5 events: every line parses, every run is indexed."""
    store = tmp_path / "store"
    env = {**os.environ, "TELEMETRY_DATA_DIR": str(store)}
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(WORKER),
                str(number),
                str(RUNS_PER_PROCESS),
                str(EVENTS_PER_RUN),
            ],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for number in range(PROCESSES)
    ]
    errors = [worker.communicate(timeout=240)[1] for worker in workers]

    assert [worker.returncode for worker in workers] == [0] * PROCESSES, errors
    assert not any("database is locked" in text for text in errors)
    assert not any("failed to" in text for text in errors), errors

    records, corrupt = read_journal(store / "journal")
    counts = Counter(str(record["record_type"]) for record in records)
    total_runs = PROCESSES * RUNS_PER_PROCESS
    assert corrupt == 0
    assert counts["run_start"] == total_runs
    assert counts["run_end"] == total_runs
    assert counts["event"] == total_runs * EVENTS_PER_RUN

    per_worker = Counter(
        str(record["agent_name"]) for record in records if record["record_type"] == "event"
    )
    assert set(per_worker.values()) == {RUNS_PER_PROCESS * EVENTS_PER_RUN}

    index = DatabaseWriter(store / "telemetry.db")
    stats = index.get_run_stats()
    index.close()
    assert stats["total_runs"] == total_runs
    assert stats["by_status"]["success"] == total_runs


def test_threads_share_one_client(tmp_path: Path) -> None:
    """8 threads on one client: every run and event recorded once, all runs ended."""
    client = TelemetryClient(TelemetryConfig(data_dir=tmp_path / "store", environ={}))

    def agent(number: int) -> None:
        for _ in range(25):
            with client.track_run(f"thread-{number}", "load") as run:
                run.log_event("step", {"thread": number})

    threads = [threading.Thread(target=agent, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = client.get_stats()
    records, corrupt = read_journal(client.config.ndjson_dir)
    client.close()

    counts = Counter(str(record["record_type"]) for record in records)
    assert corrupt == 0
    assert counts == {"run_start": 200, "run_end": 200, "event": 200}
    assert stats["by_status"]["success"] == 200
    assert stats["active_runs"] == 0
