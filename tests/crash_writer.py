"""A writer process for tests/test_crash.py: record runs and events until it is killed.

Run as ``python crash_writer.py DATA_DIR DURABILITY WORKER [--threads N] [--seed N]
[--max-seconds S] [--fill-size N] [--once]``. Each thread repeats: start a run, log a
random number of events with payloads of varied sizes, end the run. Right after a call
returns, the thread reports it on stdout as one line, written with one ``os.write``:

    S <run_id>                   start_run returned
    E <worker> <thread> <seq>    log_event returned for that event
    F <run_id>                   end_run returned

A report line is shorter than PIPE_BUF (at least 512 bytes by POSIX, 4096 on Linux), so
a write to a pipe puts it there whole, and lines of different threads never interleave.
A reported call has returned, so whatever the durability mode promises for it must hold
after a SIGKILL. Python's buffered ``sys.stdout`` is not used, because a kill would lose
what it buffers.

With ``--once`` one thread records one run with one event, and the process closes the
client and exits. ``--fill-size`` gives every event a fill text of that many characters in
place of the random sizes. ``--max-seconds`` bounds the life of a writer that is not
killed.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import threading
import time

from telemetry import TelemetryClient, TelemetryConfig

__all__ = ["PAYLOAD_SIZES", "event_fill", "main"]

# Lengths of the "fill" string in event payloads, and their weights. The large ones give
# a SIGKILL a chance to land inside a write and cut it short.
PAYLOAD_SIZES = (0, 100, 1_000, 4_096, 16_384, 65_536)
PAYLOAD_WEIGHTS = (3, 8, 6, 4, 3, 2)
MAX_EVENTS_PER_RUN = 12
ACK_FD = 1


def event_fill(worker: int, thread: int, seq: int, size: int) -> str:
    """Return the fill text of an event: its id repeated, cut to ``size`` characters.

    The text differs from event to event, so a line spliced from two writes cannot match
    the text expected for the event that it names.
    """
    unit = f"{worker}.{thread}.{seq}|"
    return (unit * (size // len(unit) + 1))[:size]


def _acknowledge(line: str) -> None:
    os.write(ACK_FD, line.encode("ascii") + b"\n")


def _record(
    client: TelemetryClient,
    worker: int,
    thread: int,
    rng: random.Random,
    deadline: float,
    runs: int | None,
    fill_size: int | None,
) -> None:
    seq = 0
    done = 0
    while time.monotonic() < deadline and (runs is None or done < runs):
        run_id = client.start_run(f"crash-w{worker}-t{thread}", "crash", "test")
        _acknowledge(f"S {run_id}")
        for _ in range(1 if runs else rng.randint(1, MAX_EVENTS_PER_RUN)):
            size = (
                fill_size
                if fill_size is not None
                else rng.choices(PAYLOAD_SIZES, PAYLOAD_WEIGHTS)[0]
            )
            payload = {
                "worker": worker,
                "thread": thread,
                "seq": seq,
                "size": size,
                "fill": event_fill(worker, thread, seq, size),
            }
            client.log_event(run_id, "chunk", payload)
            _acknowledge(f"E {worker} {thread} {seq}")
            seq += 1
        client.end_run(run_id, "success", items_succeeded=seq)
        _acknowledge(f"F {run_id}")
        done += 1


def main(argv: list[str] | None = None) -> int:
    """Record runs in threads until killed, ``--max-seconds`` pass, or one run with --once."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir")
    parser.add_argument("durability", choices=("fsync", "batch", "none"))
    parser.add_argument("worker", type=int, help="a number unique among the writers of a store")
    parser.add_argument("--threads", type=int, default=2, help="threads that record runs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the payload sizes")
    parser.add_argument(
        "--max-seconds", type=float, default=30.0, help="seconds after which the threads stop"
    )
    parser.add_argument("--fill-size", type=int, help="characters of fill text in every event")
    parser.add_argument("--once", action="store_true")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    client = TelemetryClient(
        TelemetryConfig(
            data_dir=args.data_dir, api_url=None, durability=args.durability, environ={}
        )
    )
    deadline = time.monotonic() + args.max_seconds
    threads = 1 if args.once else args.threads
    workers = [
        threading.Thread(
            target=_record,
            args=(
                client,
                args.worker,
                number,
                random.Random(args.seed * 1000 + number),
                deadline,
                1 if args.once else None,
                args.fill_size,
            ),
        )
        for number in range(threads)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
