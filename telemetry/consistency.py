"""Comparing the runs of the SQLite index with the runs of the journal.

``telemetry check`` reports the differences, and a rebuild of the index from the journal
removes most of them (see telemetry.rebuild).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from telemetry.journal import JournalRuns

__all__ = ["Consistency", "compare_index_with_journal"]


class Consistency(NamedTuple):
    """Differences between the runs of the index and those of the journal, by run id."""

    index_only: list[str]
    """Runs in the index that no journal line describes."""
    journal_only: list[str]
    """Runs in the journal that the index does not have."""
    status_differs: list[tuple[str, str, str]]
    """(run_id, index status, journal status) of runs whose statuses differ."""


def compare_index_with_journal(
    index_statuses: Mapping[str, str], journal: JournalRuns
) -> Consistency:
    """Compare the statuses of the index's runs with the runs folded from the journal.

    Args:
        index_statuses: run_id to status, such as DatabaseWriter.run_statuses() returns.
        journal: the runs of the journal, from JournalReader.fold_runs().

    Returns:
        The differences, each list sorted by run id, which sorts runs by start time.
    """
    journal_runs = journal.runs
    index_only = sorted(run_id for run_id in index_statuses if run_id not in journal_runs)
    journal_only = sorted(run_id for run_id in journal_runs if run_id not in index_statuses)
    status_differs = sorted(
        (run_id, status, journal_runs[run_id].status)
        for run_id, status in index_statuses.items()
        if run_id in journal_runs and journal_runs[run_id].status != status
    )
    return Consistency(index_only, journal_only, status_differs)
