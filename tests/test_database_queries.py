"""Tests of DatabaseWriter's bulk writes, streaming reads and statistics on real SQLite files."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from record_support import make_full_record

from telemetry import database
from telemetry.database import DatabaseWriter
from telemetry.models import STATUSES, RunRecord


def make_record(run_id: str, **fields: object) -> RunRecord:
    """Return a run of agent "agent-a" started at 2026-01-01, with ``fields`` changed."""
    values: dict[str, object] = {
        "run_id": run_id,
        "agent_name": "agent-a",
        "job_type": "import",
        "start_time": "2026-01-01T00:00:00.000000+00:00",
    }
    values.update(fields)
    return RunRecord(**values)  # type: ignore[arg-type]


def started(day: int, hour: int = 0) -> str:
    """Return the start time of a run on day ``day`` of January 2026, as the index stores it."""
    return f"2026-01-{day:02d}T{hour:02d}:00:00.000000+00:00"


def ids(runs: Iterator[RunRecord] | list[RunRecord]) -> list[str]:
    """Return the run ids of ``runs`` in order."""
    return [run.run_id for run in runs]


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[DatabaseWriter]:
    """Yield an open writer on a new database, closed after the test."""
    opened = DatabaseWriter(tmp_path / "index" / "telemetry.db")
    yield opened
    opened.close()


# -- load_runs --------------------------------------------------------------------------


def test_load_runs_round_trip(writer: DatabaseWriter) -> None:
    """A record written by load_runs reads back with an identical to_dict()."""
    record = make_full_record("run-1")
    assert writer.load_runs([record]) == 1
    stored = writer.get_run("run-1")
    assert stored is not None
    assert stored.to_dict() == record.to_dict()


def test_load_runs_bookkeeping_none(writer: DatabaseWriter) -> None:
    """A created_at of None becomes the start time, and an updated_at of None stays None."""
    writer.load_runs([make_record("run-1", created_at=None, updated_at=None)])
    stored = writer.get_run("run-1")
    assert stored is not None
    assert stored.created_at == "2026-01-01T00:00:00.000000+00:00"
    assert stored.updated_at is None


def test_load_runs_replaces_row(writer: DatabaseWriter) -> None:
    """load_runs overwrites every column of an existing row, created_at included."""
    writer.insert_run(make_record("run-1", created_at="2026-01-01T00:00:00Z"))
    replacement = make_record(
        "run-1",
        status="success",
        duration_ms=10,
        created_at="2026-02-01T00:00:00.000000+00:00",
        updated_at="2026-02-02T00:00:00.000000+00:00",
    )
    writer.load_runs([replacement])
    stored = writer.get_run("run-1")
    assert stored is not None
    assert stored.to_dict() == replacement.to_dict()
    assert writer.count_runs() == 1


def test_load_runs_normalises_timestamps(writer: DatabaseWriter) -> None:
    """A timestamp with another offset is stored as UTC text, as every write does."""
    writer.load_runs([make_record("run-1", start_time="2026-01-01T01:00:00+01:00")])
    stored = writer.get_run("run-1")
    assert stored is not None
    assert stored.start_time == "2026-01-01T00:00:00.000000+00:00"


def test_load_runs_batches(writer: DatabaseWriter) -> None:
    """A generator of five records loads in batches of two and all five are counted."""
    records = (make_record(f"run-{number}") for number in range(5))
    assert writer.load_runs(records, batch_size=2) == 5
    assert writer.count_runs() == 5


def test_load_runs_later_duplicate_wins(writer: DatabaseWriter) -> None:
    """Of two records with one run_id, the later one is stored."""
    first = make_record("run-1", status="running")
    second = make_record("run-1", status="success")
    writer.load_runs([first, second])
    stored = writer.get_run("run-1")
    assert stored is not None
    assert stored.status == "success"


def test_load_runs_invalid_record(writer: DatabaseWriter) -> None:
    """An invalid record raises, after the earlier batches are written and none of its own."""
    records = [
        make_record("run-1"),
        make_record("run-2"),
        make_record("run-3"),
        make_record("run-4", status="done"),
    ]
    with pytest.raises(ValueError, match="invalid status 'done'"):
        writer.load_runs(records, batch_size=2)
    assert sorted(writer.run_statuses()) == ["run-1", "run-2"]


def test_load_runs_rejects_non_record(writer: DatabaseWriter) -> None:
    """A value that is not a RunRecord raises TypeError naming its type."""
    with pytest.raises(TypeError, match="expected a RunRecord, got dict"):
        writer.load_runs([{"run_id": "run-1"}])  # type: ignore[list-item]


@pytest.mark.parametrize("batch_size", [0, -1, True, 1.5])
def test_load_runs_rejects_batch_size(writer: DatabaseWriter, batch_size: object) -> None:
    """A batch_size that is not an int of 1 or more raises ValueError."""
    with pytest.raises(ValueError, match="invalid batch_size"):
        writer.load_runs([make_record("run-1")], batch_size=batch_size)  # type: ignore[arg-type]


def test_load_runs_empty(writer: DatabaseWriter) -> None:
    """No records write nothing and return 0."""
    assert writer.load_runs([]) == 0


# -- count_runs, run_statuses, delete_runs ------------------------------------------------


def load_days(writer: DatabaseWriter, days: range) -> None:
    """Load one run per day of January 2026 in ``days``, named day-NN."""
    writer.load_runs(make_record(f"day-{day:02d}", start_time=started(day)) for day in days)


def test_count_runs_all(writer: DatabaseWriter) -> None:
    """count_runs without arguments counts every row."""
    load_days(writer, range(1, 6))
    assert writer.count_runs() == 5


def test_count_runs_started_before(writer: DatabaseWriter) -> None:
    """started_before counts runs that started strictly before it, in any offset."""
    load_days(writer, range(1, 6))
    assert writer.count_runs(started_before=started(3)) == 2
    assert writer.count_runs(started_before="2026-01-03T01:00:00+01:00") == 2
    assert writer.count_runs(started_before="2026-01-03T00:00:00.000001Z") == 3


def test_count_runs_rejects_timestamp(writer: DatabaseWriter) -> None:
    """A started_before without an offset raises ValueError naming the argument."""
    with pytest.raises(ValueError, match="invalid started_before"):
        writer.count_runs(started_before="2026-01-03T00:00:00")


def test_run_statuses_values(writer: DatabaseWriter) -> None:
    """run_statuses maps every run_id to its status."""
    writer.load_runs(
        [
            make_record("run-1", status="running"),
            make_record("run-2", status="success"),
            make_record("run-3", status="abandoned"),
        ]
    )
    assert writer.run_statuses() == {
        "run-1": "running",
        "run-2": "success",
        "run-3": "abandoned",
    }


def test_run_statuses_empty(writer: DatabaseWriter) -> None:
    """An empty index has no statuses."""
    assert writer.run_statuses() == {}


# -- unreadable_rows --------------------------------------------------------------------


def damage_rows(path: Path, statements: list[tuple[str, tuple[object, ...]]]) -> None:
    """Run ``statements`` on ``path`` through a plain sqlite3 connection, as damage would."""
    connection = sqlite3.connect(path)
    try:
        for sql, parameters in statements:
            connection.execute(sql, parameters)
        connection.commit()
    finally:
        connection.close()


def test_unreadable_rows_none(writer: DatabaseWriter) -> None:
    """An index of readable rows, or an empty one, reports no unreadable row."""
    assert writer.unreadable_rows() == []
    writer.load_runs([make_full_record("run-1"), make_record("run-2")])
    assert writer.unreadable_rows() == []


def test_unreadable_rows_bad_json(writer: DatabaseWriter) -> None:
    """A metrics_json that is not JSON is reported with its run_id, and the scan goes on."""
    writer.load_runs([make_record(f"run-{number}") for number in range(5)])
    damage_rows(
        writer.path,
        [("UPDATE agent_runs SET metrics_json = '{bad' WHERE run_id IN ('run-1', 'run-3')", ())],
    )
    found = writer.unreadable_rows()
    assert [run_id for run_id, _ in found] == ["run-1", "run-3"]
    assert "metrics_json" in found[0][1]


def test_unreadable_rows_invalid_utf8(writer: DatabaseWriter) -> None:
    """Text that is not UTF-8, even in run_id, is reported instead of ending the scan."""
    writer.load_runs([make_record("run-1"), make_record("run-2")])
    damage_rows(
        writer.path,
        [
            (
                "UPDATE agent_runs SET agent_name = CAST(? AS TEXT) WHERE run_id = 'run-1'",
                (b"\xff",),
            ),
            ("UPDATE agent_runs SET run_id = CAST(? AS TEXT) WHERE run_id = 'run-2'", (b"r\xfe",)),
        ],
    )
    found = dict(writer.unreadable_rows())
    assert sorted(found) == ["r\\xfe", "run-1"]
    assert "agent_name is not valid UTF-8" in found["run-1"]
    assert "run_id is not valid UTF-8" in found["r\\xfe"]


def test_unreadable_rows_keeps_text_factory(writer: DatabaseWriter) -> None:
    """After the scan, reads in the same thread return str again."""
    writer.load_runs([make_record("run-1")])
    writer.unreadable_rows()
    run = writer.get_run("run-1")
    assert run is not None
    assert run.agent_name == "agent-a"


def test_delete_runs_cutoff(writer: DatabaseWriter) -> None:
    """delete_runs removes runs started before the cutoff and keeps one started at it."""
    load_days(writer, range(1, 8))
    deleted = writer.delete_runs(started_before=started(4))
    assert deleted == 3
    assert sorted(writer.run_statuses()) == ["day-04", "day-05", "day-06", "day-07"]


def test_delete_runs_progress(writer: DatabaseWriter) -> None:
    """progress gets (deleted, total) after each batch."""
    load_days(writer, range(1, 8))
    calls: list[tuple[int, int]] = []
    writer.delete_runs(
        started_before=started(6),
        batch_size=2,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(2, 5), (4, 5), (5, 5)]


def test_delete_runs_oldest_first(writer: DatabaseWriter) -> None:
    """A progress callback that raises stops the delete after the oldest batch."""
    load_days(writer, range(1, 8))

    def stop(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        writer.delete_runs(started_before=started(6), batch_size=2, progress=stop)
    assert sorted(writer.run_statuses()) == ["day-03", "day-04", "day-05", "day-06", "day-07"]


def test_delete_runs_nothing(writer: DatabaseWriter) -> None:
    """Nothing older than the cutoff deletes nothing and never calls progress."""
    load_days(writer, range(5, 8))
    calls: list[tuple[int, int]] = []
    deleted = writer.delete_runs(
        started_before=started(5), progress=lambda done, total: calls.append((done, total))
    )
    assert deleted == 0
    assert calls == []
    assert writer.count_runs() == 3


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"started_before": "yesterday"}, "invalid started_before"),
        ({"started_before": started(1), "batch_size": 0}, "invalid batch_size"),
    ],
)
def test_delete_runs_rejects_invalid(
    writer: DatabaseWriter, arguments: dict[str, object], message: str
) -> None:
    """An unparsable cutoff or a bad batch size raises ValueError and deletes nothing."""
    load_days(writer, range(1, 3))
    with pytest.raises(ValueError, match=message):
        writer.delete_runs(**arguments)  # type: ignore[arg-type]
    assert writer.count_runs() == 2


def load_spans(writer: DatabaseWriter) -> None:
    """Load runs that started on day 2 and ended on days 3 and 5, and one still running."""
    writer.load_runs(
        [
            make_record("ended-3", start_time=started(2), end_time=started(3), status="success"),
            make_record("ended-5", start_time=started(2), end_time=started(5), status="success"),
            make_record("running", start_time=started(2), status="running"),
            make_record("later", start_time=started(6), end_time=started(6), status="success"),
        ]
    )


def test_count_runs_ended_before(writer: DatabaseWriter) -> None:
    """ended_before counts runs that ended strictly before it, and runs without an end."""
    load_spans(writer)
    assert writer.count_runs(started_before=started(4), ended_before=started(4)) == 2
    assert writer.count_runs(started_before=started(4), ended_before=started(3)) == 1
    assert writer.count_runs(ended_before=started(7)) == 4


def test_delete_runs_ended_before(writer: DatabaseWriter) -> None:
    """A run that started before the cutoff but ended at or after it keeps its row."""
    load_spans(writer)
    deleted = writer.delete_runs(started_before=started(4), ended_before=started(4))
    assert deleted == 2
    assert sorted(writer.run_statuses()) == ["ended-5", "later"]


def test_delete_runs_ended_progress(writer: DatabaseWriter) -> None:
    """The progress total counts only the rows that ended_before lets go."""
    load_spans(writer)
    calls: list[tuple[int, int]] = []
    writer.delete_runs(
        started_before=started(4),
        ended_before=started(4),
        batch_size=1,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(1, 2), (2, 2)]


def test_delete_runs_rejects_ended_before(writer: DatabaseWriter) -> None:
    """An ended_before without an offset raises ValueError naming it and deletes nothing."""
    load_spans(writer)
    with pytest.raises(ValueError, match="invalid ended_before"):
        writer.delete_runs(started_before=started(4), ended_before="2026-01-04T00:00:00")
    assert writer.count_runs() == 4


# -- update_run if_status ----------------------------------------------------------------


def test_update_run_if_status_matches(writer: DatabaseWriter) -> None:
    """update_run with the stored status as if_status updates the row and returns True."""
    writer.load_runs([make_record("run-1", status="running")])
    updated = writer.update_run("run-1", if_status="running", status="abandoned")
    stored = writer.get_run("run-1")
    assert updated is True
    assert stored is not None
    assert stored.status == "abandoned"


def test_update_run_if_status_differs(writer: DatabaseWriter) -> None:
    """A run that ended in another writer meanwhile keeps its final record."""
    writer.load_runs([make_record("run-1", status="running")])
    with DatabaseWriter(writer.path) as other:
        other.update_run("run-1", status="success", items_succeeded=3)
    before = writer.get_run("run-1")

    updated = writer.update_run(
        "run-1", if_status="running", status="abandoned", error_summary="stale"
    )

    assert updated is False
    assert writer.get_run("run-1") == before


def test_update_run_if_status_missing(writer: DatabaseWriter) -> None:
    """update_run with if_status of a run that is not in the index returns False."""
    assert writer.update_run("no-such-run", if_status="running", status="abandoned") is False


def test_update_run_rejects_if_status(writer: DatabaseWriter) -> None:
    """An unknown if_status raises ValueError naming it and changes no row."""
    writer.load_runs([make_record("run-1", status="running")])
    with pytest.raises(ValueError, match="invalid if_status 'done'"):
        writer.update_run("run-1", if_status="done", status="abandoned")
    stored = writer.get_run("run-1")
    assert stored is not None
    assert stored.status == "running"


# -- count_pending_api_posts -------------------------------------------------------------


def load_pending_mix(writer: DatabaseWriter) -> None:
    """Load two pending runs, one posted run and one running run that is not posted."""
    writer.load_runs(
        [
            make_record("pending-1", status="success"),
            make_record("pending-2", status="abandoned", start_time=started(2)),
            make_record("posted", status="failed", api_posted=True),
            make_record("running", status="running"),
        ]
    )


def test_count_pending_values(writer: DatabaseWriter) -> None:
    """Ended runs not yet posted count, posted and running runs do not."""
    load_pending_mix(writer)
    assert writer.count_pending_api_posts() == 2


def test_count_pending_matches_stats(writer: DatabaseWriter) -> None:
    """The count equals the pending_api_posts of get_run_stats."""
    load_pending_mix(writer)
    assert writer.count_pending_api_posts() == writer.get_run_stats()["pending_api_posts"]


def test_count_pending_empty(writer: DatabaseWriter) -> None:
    """An empty index has no pending posts."""
    assert writer.count_pending_api_posts() == 0


def test_count_pending_age_filters(writer: DatabaseWriter) -> None:
    """started_before and ended_before narrow the pending count as they narrow count_runs."""
    writer.load_runs(
        [
            make_record("old", start_time=started(2), end_time=started(2), status="success"),
            make_record("across", start_time=started(3), end_time=started(5), status="failed"),
            make_record("new", start_time=started(6), end_time=started(6), status="success"),
            make_record("running", start_time=started(2), status="running"),
            make_record(
                "posted",
                start_time=started(2),
                end_time=started(2),
                status="success",
                api_posted=True,
            ),
        ]
    )
    assert writer.count_pending_api_posts(started_before=started(4)) == 2
    assert writer.count_pending_api_posts(started_before=started(4), ended_before=started(4)) == 1
    assert writer.count_pending_api_posts(ended_before=started(7)) == 3


def test_count_pending_rejects_timestamp(writer: DatabaseWriter) -> None:
    """A started_before without an offset raises ValueError naming the argument."""
    with pytest.raises(ValueError, match="invalid started_before"):
        writer.count_pending_api_posts(started_before="2026-01-03")


def test_count_pending_uses_index(writer: DatabaseWriter) -> None:
    """The count query reads the partial pending index, not the table."""
    statements: list[str] = []
    connection = writer._connection()
    connection.set_trace_callback(statements.append)
    try:
        writer.count_pending_api_posts()
    finally:
        connection.set_trace_callback(None)
    assert len(statements) == 1
    plan = connection.execute(f"EXPLAIN QUERY PLAN {statements[0]}").fetchall()
    details = " ".join(row[3] for row in plan)
    assert "idx_agent_runs_pending" in details


# -- list_runs until and iter_runs ------------------------------------------------------


def load_mixed(writer: DatabaseWriter) -> None:
    """Load six runs of two agents, three of them started at the same instant."""
    writer.load_runs(
        [
            make_record("a-1", start_time=started(1), status="success"),
            make_record("a-2", start_time=started(2), status="failed"),
            make_record("a-3", start_time=started(3), status="success"),
            make_record("b-1", agent_name="agent-b", start_time=started(3), status="success"),
            make_record("b-2", agent_name="agent-b", start_time=started(3), status="running"),
            make_record("b-3", agent_name="agent-b", start_time=started(4), status="success"),
        ]
    )


NEWEST_FIRST = ["b-3", "b-2", "b-1", "a-3", "a-2", "a-1"]


def test_list_runs_until(writer: DatabaseWriter) -> None:
    """until keeps runs that started strictly before it."""
    load_mixed(writer)
    assert ids(writer.list_runs(until=started(3))) == ["a-2", "a-1"]


def test_list_runs_since_until(writer: DatabaseWriter) -> None:
    """since and until together select the window since <= start_time < until."""
    load_mixed(writer)
    window = writer.list_runs(since=started(2), until=started(4))
    assert ids(window) == ["b-2", "b-1", "a-3", "a-2"]


def test_list_runs_rejects_until(writer: DatabaseWriter) -> None:
    """An unparsable until raises ValueError naming the argument."""
    with pytest.raises(ValueError, match="invalid until"):
        writer.list_runs(until="tomorrow")


@pytest.mark.parametrize("batch_size", [1, 2, 4, 6, 500])
def test_iter_runs_order(writer: DatabaseWriter, batch_size: int) -> None:
    """iter_runs yields every run newest first, ties by run_id, whatever the batch size."""
    load_mixed(writer)
    assert ids(writer.iter_runs(batch_size=batch_size)) == NEWEST_FIRST


def test_iter_runs_matches_list_runs(writer: DatabaseWriter) -> None:
    """iter_runs yields the records list_runs returns for the same filters."""
    load_mixed(writer)
    filters: list[dict[str, str]] = [
        {},
        {"agent_name": "agent-b"},
        {"status": "success"},
        {"since": started(2)},
        {"until": started(3)},
        {"agent_name": "agent-a", "status": "success", "since": started(2)},
    ]
    for arguments in filters:
        expected = writer.list_runs(limit=None, **arguments)
        streamed = list(writer.iter_runs(batch_size=2, **arguments))  # type: ignore[arg-type]
        assert streamed == expected, arguments


@pytest.mark.parametrize(("limit", "count"), [(0, 0), (1, 1), (3, 3), (5, 5), (6, 6), (9, 6)])
def test_iter_runs_limit(writer: DatabaseWriter, limit: int, count: int) -> None:
    """limit caps the rows yielded, across batch boundaries."""
    load_mixed(writer)
    assert ids(writer.iter_runs(limit=limit, batch_size=2)) == NEWEST_FIRST[:count]


def test_iter_runs_checks_arguments_at_call(writer: DatabaseWriter) -> None:
    """Invalid arguments raise when iter_runs is called, before iteration."""
    with pytest.raises(ValueError, match="invalid since"):
        writer.iter_runs(since="last week")
    with pytest.raises(ValueError, match="invalid limit"):
        writer.iter_runs(limit=-1)
    with pytest.raises(ValueError, match="invalid batch_size"):
        writer.iter_runs(batch_size=0)


def test_iter_runs_concurrent_inserts(writer: DatabaseWriter) -> None:
    """Rows inserted between batches neither repeat nor hide a row that existed before."""
    load_mixed(writer)
    runs = writer.iter_runs(batch_size=2)
    seen = [next(runs).run_id, next(runs).run_id]

    # A newer row sorts before the rows already yielded, so it is not yielded. An older
    # one and one tied with the last row yielded but sorting after it are still ahead.
    writer.load_runs(
        [
            make_record("c-new", start_time=started(9)),
            make_record("b-0", agent_name="agent-b", start_time=started(3)),
            make_record("c-old", start_time="2025-12-31T00:00:00.000000+00:00"),
        ]
    )
    seen.extend(run.run_id for run in runs)

    assert seen == ["b-3", "b-2", "b-1", "b-0", "a-3", "a-2", "a-1", "c-old"]


def test_iter_runs_separate_writer(writer: DatabaseWriter) -> None:
    """A second connection that inserts between batches leaves the stream consistent."""
    load_mixed(writer)
    other = DatabaseWriter(writer.path)
    try:
        seen: list[str] = []
        for run in writer.iter_runs(batch_size=1):
            seen.append(run.run_id)
            other.insert_run(make_record(f"new-{len(seen)}", start_time=started(20)))
    finally:
        other.close()
    assert seen == NEWEST_FIRST


# -- get_run_stats -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("percent", "count", "position"),
    [
        (50, 1, 1),
        (95, 1, 1),
        (50, 2, 1),
        (50, 3, 2),
        (50, 4, 2),
        (95, 4, 4),
        (95, 19, 19),
        (95, 20, 19),
        (95, 21, 20),
        (50, 100_000, 50_000),
        (95, 100_000, 95_000),
    ],
)
def test_nearest_rank_positions(percent: int, count: int, position: int) -> None:
    """The nearest rank is ceil(percent * count / 100), at least 1."""
    assert database._nearest_rank(percent, count) == position


def load_durations(writer: DatabaseWriter, agent_name: str, durations: list[int | None]) -> None:
    """Load one ended run of ``agent_name`` per duration, or a running run for None."""
    writer.load_runs(
        make_record(
            f"{agent_name}-{number}",
            agent_name=agent_name,
            status="running" if duration is None else "success",
            duration_ms=duration,
        )
        for number, duration in enumerate(durations)
    )


def test_run_stats_percentiles_ten(writer: DatabaseWriter) -> None:
    """Ten durations: p50 is the 5th smallest (80) and p95 the 10th (500)."""
    # Sorted: 15 30 45 60 80 95 120 210 300 500; ceil(5.0) = 5 and ceil(9.5) = 10.
    load_durations(writer, "agent-a", [120, 15, 300, 45, 80, 210, 60, 95, 30, 500])
    totals = writer.get_run_stats()["by_agent"]["agent-a"]
    assert totals["p50_duration_ms"] == 80
    assert totals["p95_duration_ms"] == 500


def test_run_stats_percentiles_twenty(writer: DatabaseWriter) -> None:
    """Twenty durations 10 to 200: p50 is the 10th (100) and p95 the 19th (190)."""
    load_durations(writer, "agent-a", [10 * number for number in range(20, 0, -1)])
    totals = writer.get_run_stats()["by_agent"]["agent-a"]
    assert totals["p50_duration_ms"] == 100
    assert totals["p95_duration_ms"] == 190


def test_run_stats_percentiles_ties(writer: DatabaseWriter) -> None:
    """Equal durations count once each: of 5 5 5 9, p50 is 5 and p95 is 9."""
    load_durations(writer, "agent-a", [5, 9, 5, 5])
    totals = writer.get_run_stats()["by_agent"]["agent-a"]
    assert totals["p50_duration_ms"] == 5
    assert totals["p95_duration_ms"] == 9


def test_run_stats_percentiles_skip_running(writer: DatabaseWriter) -> None:
    """Runs without a duration are left out: of 10 20 30 plus two running, p50 is 20."""
    load_durations(writer, "agent-a", [None, 30, 10, None, 20])
    totals = writer.get_run_stats()["by_agent"]["agent-a"]
    assert totals["p50_duration_ms"] == 20
    assert totals["p95_duration_ms"] == 30
    assert totals["avg_duration_ms"] == 20.0


def test_run_stats_percentiles_single(writer: DatabaseWriter) -> None:
    """One duration is both percentiles."""
    load_durations(writer, "agent-a", [42])
    totals = writer.get_run_stats()["by_agent"]["agent-a"]
    assert totals["p50_duration_ms"] == 42
    assert totals["p95_duration_ms"] == 42


def test_run_stats_percentiles_none(writer: DatabaseWriter) -> None:
    """An agent whose runs have no duration has None for every duration value."""
    load_durations(writer, "agent-a", [None, None])
    totals = writer.get_run_stats()["by_agent"]["agent-a"]
    assert totals["p50_duration_ms"] is None
    assert totals["p95_duration_ms"] is None
    assert totals["avg_duration_ms"] is None


def test_run_stats_percentiles_per_agent(writer: DatabaseWriter) -> None:
    """Each agent's percentiles come from its own durations only."""
    load_durations(writer, "agent-a", [1, 2, 3])
    load_durations(writer, "agent-b", [100, 200, 300, 400])
    by_agent = writer.get_run_stats()["by_agent"]
    assert (by_agent["agent-a"]["p50_duration_ms"], by_agent["agent-a"]["p95_duration_ms"]) == (
        2,
        3,
    )
    assert (by_agent["agent-b"]["p50_duration_ms"], by_agent["agent-b"]["p95_duration_ms"]) == (
        200,
        400,
    )


def test_run_stats_agent_totals(writer: DatabaseWriter) -> None:
    """Per agent: every status count, item sums and pending posts."""
    writer.load_runs(
        [
            make_record("a-1", status="success", items_discovered=5, items_succeeded=5),
            make_record("a-2", status="failed", items_discovered=3, items_failed=2),
            make_record("a-3", status="abandoned", items_discovered=1, api_posted=True),
            make_record("a-4", status="timeout"),
            make_record("a-5", status="cancelled"),
            make_record("a-6", status="running", items_discovered=7),
            make_record("b-1", agent_name="agent-b", status="partial", items_succeeded=4),
        ]
    )
    stats = writer.get_run_stats()
    agent_a = stats["by_agent"]["agent-a"]

    assert agent_a["runs"] == 6
    assert {status: agent_a[status] for status in STATUSES} == {
        "running": 1,
        "success": 1,
        "failed": 1,
        "partial": 0,
        "cancelled": 1,
        "timeout": 1,
        "abandoned": 1,
    }
    assert agent_a["items_discovered"] == 16
    assert agent_a["items_succeeded"] == 5
    assert agent_a["items_failed"] == 2
    assert agent_a["pending_api_posts"] == 4
    assert stats["by_agent"]["agent-b"]["items_succeeded"] == 4
    assert stats["by_agent"]["agent-b"]["pending_api_posts"] == 1
    assert stats["pending_api_posts"] == 5
    assert stats["total_runs"] == 7
    assert stats["by_status"]["partial"] == 1


def test_run_stats_agent_order(writer: DatabaseWriter) -> None:
    """by_agent lists agents in name order."""
    load_durations(writer, "zeta", [1])
    load_durations(writer, "alpha", [1])
    assert list(writer.get_run_stats()["by_agent"]) == ["alpha", "zeta"]


def test_run_stats_since(writer: DatabaseWriter) -> None:
    """since restricts every count to runs started at or after it."""
    load_mixed(writer)
    stats = writer.get_run_stats(since=started(3))

    assert stats["total_runs"] == 4
    assert stats["by_status"]["success"] == 3
    assert stats["by_status"]["failed"] == 0
    assert stats["pending_api_posts"] == 3
    assert stats["by_agent"]["agent-a"]["runs"] == 1
    assert stats["by_agent"]["agent-b"]["runs"] == 3


def test_run_stats_since_percentiles(writer: DatabaseWriter) -> None:
    """since also restricts the durations behind the percentiles."""
    writer.load_runs(
        [
            make_record("old", start_time=started(1), status="success", duration_ms=1000),
            make_record("new-1", start_time=started(5), status="success", duration_ms=10),
            make_record("new-2", start_time=started(6), status="success", duration_ms=20),
        ]
    )
    totals = writer.get_run_stats(since=started(2))["by_agent"]["agent-a"]
    assert totals["p95_duration_ms"] == 20
    assert totals["avg_duration_ms"] == 15.0


def test_run_stats_since_key(writer: DatabaseWriter) -> None:
    """The since key is the normalised UTC value, or None without since."""
    assert writer.get_run_stats()["since"] is None
    stats = writer.get_run_stats(since="2026-01-02T01:00:00+01:00")
    assert stats["since"] == "2026-01-02T00:00:00.000000+00:00"


def test_run_stats_since_empty(writer: DatabaseWriter) -> None:
    """A window with no runs has every status at 0 and no agents."""
    load_mixed(writer)
    stats = writer.get_run_stats(since=started(20))
    assert stats["total_runs"] == 0
    assert stats["by_status"] == dict.fromkeys(STATUSES, 0)
    assert stats["pending_api_posts"] == 0
    assert stats["by_agent"] == {}


def test_run_stats_rejects_since(writer: DatabaseWriter) -> None:
    """An unparsable since raises ValueError naming the argument."""
    with pytest.raises(ValueError, match="invalid since"):
        writer.get_run_stats(since="2h")


def test_run_stats_ends_transaction(writer: DatabaseWriter) -> None:
    """get_run_stats leaves no read transaction open, which would pin its WAL snapshot."""
    load_mixed(writer)
    writer.get_run_stats(since=started(2))
    assert not writer._connection().in_transaction


def test_run_stats_narrow_window(writer: DatabaseWriter) -> None:
    """A window of few runs, read through the start_time index, counts the same runs."""
    writer.load_runs(
        make_record(f"day-{day:02d}", start_time=started(day), status="success", duration_ms=day)
        for day in range(1, 11)
    )
    stats = writer.get_run_stats(since=started(9))
    totals = stats["by_agent"]["agent-a"]
    assert stats["total_runs"] == 2
    assert totals["p50_duration_ms"] == 9
    assert totals["p95_duration_ms"] == 10


@pytest.mark.parametrize(
    ("since", "source"),
    [
        (None, "agent_runs NOT INDEXED"),
        (started(1), "agent_runs NOT INDEXED"),
        (started(7), "agent_runs NOT INDEXED"),
        (started(8), "agent_runs INDEXED BY idx_agent_runs_start_time"),
        (started(20), "agent_runs INDEXED BY idx_agent_runs_start_time"),
    ],
)
def test_stats_source_by_window(writer: DatabaseWriter, since: str | None, source: str) -> None:
    """Statistics read a window of under a third of ten runs through the start_time index."""
    load_days(writer, range(1, 11))
    assert database._stats_source(writer._connection(), since) == source
