"""Measure the per-call overhead of @tracked_run against a bare call and a bare wrapt wrapper.

    python benchmarks/bench_decorator.py [--rounds N] [--calls N] [--recorded-calls N]

Variants, all calling the same one-line function:

- bare call: the function itself;
- bare wrapt wrapper: a wrapt.FunctionWrapper whose wrapper only calls through;
- tracked, disabled at decoration: @tracked_run with a disabled client, which returns the
  function itself, so this row checks that nothing is left of the decorator;
- tracked, disabled at call: @tracked_run decorated while the default client was enabled,
  then called with the default client disabled: the wrapper's one flag check;
- tracked, durability none: every call records a run (two journal lines and two index
  writes) in a temporary store, with the journal's durability ``none`` and no API.

Each round times every variant once, in turn, in this process. The table shows the median
over the rounds of the time per call, which includes the loop, and the ratio to the bare
call and to the bare wrapt wrapper. Nothing is asserted; timings depend on the machine.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import wrapt

from instrument import set_default_client, tracked_run
from telemetry import TelemetryClient, TelemetryConfig

Variant = tuple[str, Callable[[int], int], int]


def work(value: int) -> int:
    """Return the value: the function that every variant calls."""
    return value


def call_through(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    return wrapped(*args, **kwargs)


def time_per_call(function: Callable[[int], int], calls: int) -> float:
    """Return the mean time of one call of ``function`` over ``calls`` calls, in nanoseconds."""
    start = time.perf_counter_ns()
    for number in range(calls):
        function(number)
    return (time.perf_counter_ns() - start) / calls


def make_client(data_dir: Path, *, enabled: bool) -> TelemetryClient:
    config = TelemetryConfig(
        data_dir=data_dir, enabled=enabled, durability="none", api_enabled=False, environ={}
    )
    return TelemetryClient(config)


def measure(variants: list[Variant], rounds: int) -> dict[str, list[float]]:
    """Time each variant once per round, in turn, and return the times per variant.

    Each round starts one variant later than the previous one, so that no variant always
    runs first, right after the slow recording variant.
    """
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    for round_number in range(rounds):
        shift = round_number % len(variants)
        for name, function, calls in variants[shift:] + variants[:shift]:
            times[name].append(time_per_call(function, calls))
    return times


def print_table(times: dict[str, list[float]], calls: dict[str, int]) -> None:
    medians = {name: statistics.median(values) for name, values in times.items()}
    bare = medians["bare call"]
    wrapt_bare = medians["bare wrapt wrapper"]

    header = f"{'variant':<34} {'calls/round':>11} {'ns/call':>12} {'x bare':>9} {'x wrapt':>9}"
    print(header)
    print("-" * len(header))
    for name, median in medians.items():
        print(
            f"{name:<34} {calls[name]:>11} {median:>12.1f} "
            f"{median / bare:>9.2f} {median / wrapt_bare:>9.2f}"
        )


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds of every variant")
    parser.add_argument(
        "--calls", type=int, default=200_000, help="calls per round of the cheap variants"
    )
    parser.add_argument(
        "--recorded-calls",
        type=int,
        default=500,
        help="calls per round of the variant that records every call",
    )
    arguments = parser.parse_args(argv)
    for name in ("rounds", "calls", "recorded_calls"):
        if getattr(arguments, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be 1 or more")
    return arguments


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table and return the exit code."""
    arguments = parse_arguments(argv)

    with tempfile.TemporaryDirectory(prefix="bench-decorator-") as directory:
        root = Path(directory)
        recording = make_client(root / "recorded", enabled=True)
        disabled = make_client(root / "disabled", enabled=False)
        previous_default = set_default_client(make_client(root / "default", enabled=True))
        try:
            disabled_at_call = tracked_run(agent_name="bench-disabled")(work)
            set_default_client(disabled)
            variants: list[Variant] = [
                ("bare call", work, arguments.calls),
                ("bare wrapt wrapper", wrapt.FunctionWrapper(work, call_through), arguments.calls),
                (
                    "tracked, disabled at decoration",
                    tracked_run(client=disabled)(work),
                    arguments.calls,
                ),
                ("tracked, disabled at call", disabled_at_call, arguments.calls),
                (
                    "tracked, durability none",
                    tracked_run(agent_name="bench-recorded", client=recording)(work),
                    arguments.recorded_calls,
                ),
            ]
            times = measure(variants, arguments.rounds)
        finally:
            replaced = set_default_client(previous_default)
            if replaced is not None:
                replaced.close()
            recording.close()

    print(
        f"Python {platform.python_version()} ({platform.python_implementation()}), "
        f"wrapt {importlib.metadata.version('wrapt')}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, "
        f"{platform.system()} {platform.release()}"
    )
    print(f"median of {arguments.rounds} rounds; ns/call includes the loop\n")
    print_table(times, {name: calls for name, _, calls in variants})
    return 0


if __name__ == "__main__":
    sys.exit(main())
