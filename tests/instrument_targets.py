"""Decorated callables at module level, so that child processes can import them by name.

They use the default client, which a child process creates from TELEMETRY_DATA_DIR.
"""

from __future__ import annotations

from instrument import current_run, tracked_run


@tracked_run(agent_name="pool-square", job_type="pool")
def square(number: int) -> int:
    """Return ``number`` squared."""
    return number * number


@tracked_run
def bare_target() -> str | None:
    """Return the id of the run that is current inside the call."""
    run = current_run()
    return None if run is None else run.run_id


class Doubler:
    """A class whose method is tracked, for pickling of bound methods."""

    def __init__(self, factor: int) -> None:
        self.factor = factor

    @tracked_run(agent_name="doubler", job_type="pool")
    def apply(self, number: int) -> int:
        """Return ``number`` times the factor."""
        return number * self.factor

    @tracked_run(agent_name="doubler-class", job_type="pool")
    @classmethod
    def name(cls) -> str:
        """Return the name of the class."""
        return cls.__name__
