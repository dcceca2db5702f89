"""compare_index_with_journal: what the index and the journal disagree on."""

from __future__ import annotations

from telemetry.consistency import Consistency, compare_index_with_journal
from telemetry.journal import JournalRuns
from telemetry.models import RunRecord


def journal_of(**statuses: str) -> JournalRuns:
    runs = {
        run_id: RunRecord(
            run_id=run_id,
            agent_name="agent",
            job_type="job",
            start_time="2026-12-04T19:34:17.123456+00:00",
            status=status,
        )
        for run_id, status in statuses.items()
    }
    return JournalRuns(runs, 1, {})


def test_compare_consistent() -> None:
    """The same runs with the same statuses give no differences."""
    journal = journal_of(a="success", b="running")

    assert compare_index_with_journal({"a": "success", "b": "running"}, journal) == Consistency(
        [], [], []
    )


def test_compare_differences() -> None:
    """Runs on one side only and differing statuses are listed, sorted by run id."""
    journal = journal_of(b="success", c="failed", e="running", d="success")
    index = {"z": "success", "a": "running", "c": "failed", "e": "abandoned", "b": "running"}

    consistency = compare_index_with_journal(index, journal)

    assert consistency.index_only == ["a", "z"]
    assert consistency.journal_only == ["d"]
    assert consistency.status_differs == [
        ("b", "running", "success"),
        ("e", "abandoned", "running"),
    ]
