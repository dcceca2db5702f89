"""plan_prune and prune, on journal files and index rows written by the real writers."""

from __future__ import annotations

import datetime
import re
from pathlib import Path

import pytest

from telemetry import TelemetryClient, TelemetryConfig
from telemetry.database import DatabaseWriter
from telemetry.journal import JournalFile, JournalReader
from telemetry.models import RunRecord, calculate_duration_ms, get_iso8601_timestamp
from telemetry.ndjson import NDJSONWriter
from telemetry.rebuild import rebuild_index
from telemetry.retention import PrunePlan, PruneResult, plan_prune, prune

UTC = datetime.timezone.utc
DAY = datetime.timedelta(days=1)
OLDER_THAN = datetime.timedelta(days=90)


def start_of_day(moment: datetime.datetime) -> datetime.datetime:
    return moment.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def record_run(
    data_dir: Path, run_id: str, start: datetime.datetime, end: datetime.datetime
) -> RunRecord:
    """Journal a run's start, one event and its end at the given times, and index it."""
    started, ended = get_iso8601_timestamp(start), get_iso8601_timestamp(end)
    record = RunRecord(
        run_id=run_id,
        agent_name="aged-agent",
        job_type="test",
        start_time=started,
        created_at=started,
        updated_at=started,
    )
    journal = NDJSONWriter(data_dir / "journal")
    try:
        journal.append("run_start", record.to_dict())
        journal.append(
            "event",
            {"run_id": run_id, "event_type": "step", "timestamp": started, "payload": {}},
        )
        record.status = "success"
        record.end_time = ended
        record.duration_ms = calculate_duration_ms(started, ended)
        record.updated_at = ended
        journal.append("run_end", record.to_dict())
    finally:
        journal.close()
    with DatabaseWriter(data_dir / "telemetry.db") as index:
        index.load_runs([record])
    return record


def record_running(data_dir: Path, run_id: str, start: datetime.datetime) -> RunRecord:
    """Journal the start of a run that never ended, and index it as running."""
    started = get_iso8601_timestamp(start)
    record = RunRecord(
        run_id=run_id,
        agent_name="aged-agent",
        job_type="test",
        start_time=started,
        created_at=started,
        updated_at=started,
    )
    journal = NDJSONWriter(data_dir / "journal")
    try:
        journal.append("run_start", record.to_dict())
    finally:
        journal.close()
    with DatabaseWriter(data_dir / "telemetry.db") as index:
        index.load_runs([record])
    return record


class AgedStore:
    """A store with runs at fixed distances from the cutoff of a 90-day retention."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.now = datetime.datetime.now(UTC)
        self.cutoff = start_of_day(self.now - OLDER_THAN)
        minute = datetime.timedelta(minutes=1)
        self.old = {
            "200 days": record_run(
                data_dir, "r-old-200", self.now - 200 * DAY, self.now - 200 * DAY + minute
            ),
            "120 days": record_run(
                data_dir, "r-old-120", self.now - 120 * DAY, self.now - 120 * DAY + minute
            ),
            "just before": record_run(
                data_dir,
                "r-old-edge",
                self.cutoff - datetime.timedelta(microseconds=1),
                self.cutoff - datetime.timedelta(microseconds=1),
            ),
        }
        self.kept = {
            "at cutoff": record_run(data_dir, "r-new-edge", self.cutoff, self.cutoff + minute),
            "89 days": record_run(
                data_dir, "r-new-89", self.now - 89 * DAY, self.now - 89 * DAY + minute
            ),
        }
        with TelemetryClient(TelemetryConfig(data_dir=data_dir, environ={})) as client:
            run_id = client.start_run("today-agent", "test")
            client.end_run(run_id, "success")

    @property
    def index(self) -> DatabaseWriter:
        return DatabaseWriter(self.data_dir / "telemetry.db")

    @property
    def reader(self) -> JournalReader:
        return JournalReader(self.data_dir / "journal")

    def files(self) -> list[Path]:
        return [journal_file.path for journal_file in self.reader.files()]

    def old_files(self) -> list[Path]:
        cutoff_date = self.cutoff.strftime("%Y%m%d")
        return [path for path in self.files() if path.name[7:15] < cutoff_date]

    def plan(self) -> PrunePlan:
        with self.index as index:
            return plan_prune(index, self.reader, OLDER_THAN, now=self.now)

    def prune(self, plan: PrunePlan) -> PruneResult:
        with self.index as index:
            return prune(index, plan)

    def run_ids(self) -> set[str]:
        with self.index as index:
            return set(index.run_statuses())


@pytest.fixture
def aged(tmp_path: Path) -> AgedStore:
    """A store with runs 200 and 120 days old, on both sides of the cutoff, and today."""
    return AgedStore(tmp_path / "store")


# -- plan_prune ---------------------------------------------------------------------------------


def test_plan_old_files_and_rows(aged: AgedStore) -> None:
    """The plan lists the files dated before the cutoff's day and counts the older rows."""
    plan = aged.plan()

    assert plan.cutoff == aged.cutoff
    assert [journal_file.path for journal_file in plan.files] == aged.old_files()
    assert len(plan.files) == 3
    assert plan.bytes == sum(path.stat().st_size for path in aged.old_files())
    assert plan.runs == len(aged.old)
    assert plan.pending_runs == len(aged.old)


def test_plan_pending_runs(aged: AgedStore) -> None:
    """pending_runs counts the old ended runs not yet posted, and no posted or running run."""
    hour = datetime.timedelta(hours=1)
    record_run(aged.data_dir, "r-across", aged.cutoff - hour, aged.cutoff + hour)
    record_running(aged.data_dir, "r-running", aged.cutoff - 3 * DAY)
    with aged.index as index:
        index.mark_api_posted("r-old-200")

    plan = aged.plan()

    assert plan.runs == 4
    assert plan.pending_runs == 2


def test_plan_deletes_nothing(aged: AgedStore) -> None:
    """Planning leaves every file and row in place."""
    files, runs = aged.files(), aged.run_ids()

    aged.plan()

    assert aged.files() == files
    assert aged.run_ids() == runs


@pytest.mark.parametrize(
    ("now", "older_than", "cutoff"),
    [
        ("2026-12-04T15:30:00+00:00", OLDER_THAN, "2026-09-05T00:00:00+00:00"),
        ("2026-12-05T01:00:00+05:00", OLDER_THAN, "2026-09-05T00:00:00+00:00"),
        ("2026-12-04T23:59:59.999999+00:00", DAY, "2026-12-03T00:00:00+00:00"),
        (
            "2026-12-04T00:00:00+00:00",
            datetime.timedelta(days=1, hours=1),
            "2026-12-02T00:00:00+00:00",
        ),
    ],
)
def test_plan_cutoff_utc_day(
    tmp_path: Path, now: str, older_than: datetime.timedelta, cutoff: str
) -> None:
    """The cutoff is the start of the UTC day of now - older_than."""
    with DatabaseWriter(tmp_path / "telemetry.db") as index:
        plan = plan_prune(
            index,
            JournalReader(tmp_path / "journal"),
            older_than,
            now=datetime.datetime.fromisoformat(now),
        )

    assert plan.cutoff == datetime.datetime.fromisoformat(cutoff)
    assert plan.cutoff.utcoffset() == datetime.timedelta(0)
    assert plan.files == []
    assert plan.runs == 0


@pytest.mark.parametrize(
    ("older_than", "now", "error", "message"),
    [
        (datetime.timedelta(hours=23), None, ValueError, "at least one day"),
        (datetime.timedelta(0), None, ValueError, "at least one day"),
        (90, None, TypeError, "must be a datetime.timedelta"),
        (OLDER_THAN, datetime.datetime(2026, 12, 4), ValueError, "aware datetime"),
        (OLDER_THAN, "2026-12-04", TypeError, "must be a datetime.datetime"),
        (datetime.timedelta.max, None, ValueError, "before year 1"),
    ],
)
def test_plan_invalid_arguments(
    tmp_path: Path, older_than: object, now: object, error: type[Exception], message: str
) -> None:
    """Invalid retention arguments raise with a message naming the value."""
    with DatabaseWriter(tmp_path / "telemetry.db") as index, pytest.raises(error, match=message):
        plan_prune(index, JournalReader(tmp_path / "journal"), older_than, now=now)  # type: ignore[arg-type]


# -- prune --------------------------------------------------------------------------------------


def test_prune_deletes_plan(aged: AgedStore) -> None:
    """prune deletes the planned files and the older rows, and keeps the rest."""
    plan = aged.plan()
    old_files = aged.old_files()
    kept_files = [path for path in aged.files() if path not in old_files]

    result = aged.prune(plan)

    assert result == PruneResult(files_deleted=3, bytes_deleted=plan.bytes, runs_deleted=3)
    assert aged.files() == kept_files
    assert not any(path.exists() for path in old_files)
    assert aged.run_ids() == {"r-new-edge", "r-new-89"} | today_runs(aged)


def today_runs(aged: AgedStore) -> set[str]:
    """Return the ids of the runs that the client recorded today."""
    return {run_id for run_id in aged.run_ids() if not run_id.startswith("r-")}


def test_prune_twice(aged: AgedStore) -> None:
    """A second plan after a prune finds nothing, and pruning it deletes nothing."""
    aged.prune(aged.plan())

    plan = aged.plan()
    result = aged.prune(plan)

    assert plan.files == []
    assert plan.runs == 0
    assert result == PruneResult(0, 0, 0)


def test_prune_kept_runs_rebuild(aged: AgedStore) -> None:
    """Kept runs need no line of a deleted file: a rebuild after prune gives their rows."""
    with aged.index as index:
        before = {run.run_id: run for run in index.list_runs(limit=None)}
    aged.prune(aged.plan())

    rebuild_index(aged.data_dir / "telemetry.db", aged.data_dir / "journal")
    with aged.index as index:
        after = {run.run_id: run for run in index.list_runs(limit=None)}

    assert after == {run_id: before[run_id] for run_id in aged.run_ids()}
    assert set(after) == {"r-new-edge", "r-new-89"} | today_runs(aged)


def journal_run_ids(aged: AgedStore) -> set[str]:
    """Return the ids of the runs that the journal's run_start and run_end lines describe."""
    return set(aged.reader.fold_runs().runs)


def test_prune_run_across_cutoff(aged: AgedStore) -> None:
    """A run that started before the cutoff and ended after it keeps its row and run_end line."""
    hour = datetime.timedelta(hours=1)
    across = record_run(aged.data_dir, "r-across", aged.cutoff - hour, aged.cutoff + hour)
    start_file = aged.old_files()[-1]

    plan = aged.plan()
    result = aged.prune(plan)
    records = aged.reader.run_records("r-across", across.start_time, across.end_time)
    with aged.index as index:
        kept = index.get_run("r-across")

    assert plan.runs == 3
    assert result.runs_deleted == 3
    assert not start_file.exists()
    assert [record["record_type"] for record in records] == ["run_end"]
    assert kept == across


def test_prune_index_matches_journal(aged: AgedStore) -> None:
    """After a prune, the index and the journal describe the same runs."""
    hour = datetime.timedelta(hours=1)
    record_run(aged.data_dir, "r-across", aged.cutoff - hour, aged.cutoff + hour)
    record_running(aged.data_dir, "r-running", aged.cutoff - 3 * DAY)
    record_running(aged.data_dir, "r-running-new", aged.cutoff + DAY)

    aged.prune(aged.plan())

    assert aged.run_ids() == journal_run_ids(aged)
    assert "r-across" in aged.run_ids()
    assert "r-running-new" in aged.run_ids()


def test_prune_old_running_row(aged: AgedStore) -> None:
    """A running row that started before the cutoff goes with its run_start line."""
    record_running(aged.data_dir, "r-running", aged.cutoff - 3 * DAY)

    plan = aged.plan()
    result = aged.prune(plan)

    assert plan.runs == 4
    assert plan.pending_runs == 3
    assert result.runs_deleted == 4
    assert "r-running" not in aged.run_ids()
    assert "r-running" not in journal_run_ids(aged)


def test_prune_rebuild_keeps_sync_state(aged: AgedStore) -> None:
    """A rebuild after a prune restores no pruned run and keeps every run posted."""
    hour = datetime.timedelta(hours=1)
    record_run(aged.data_dir, "r-across", aged.cutoff - hour, aged.cutoff + hour)
    with aged.index as index:
        for run_id in index.run_statuses():
            index.mark_api_posted(run_id)
    aged.prune(aged.plan())
    kept = aged.run_ids()

    rebuild_index(aged.data_dir / "telemetry.db", aged.data_dir / "journal")
    with aged.index as index:
        after = index.list_runs(limit=None)
        pending = index.count_pending_api_posts()

    assert {run.run_id for run in after} == kept
    assert "r-across" in kept
    assert pending == 0
    assert all(run.api_posted for run in after)


def test_prune_rows_added_after_plan(aged: AgedStore) -> None:
    """Rows written after the plan are deleted only when they started before the cutoff."""
    plan = aged.plan()
    late_old = record_run(aged.data_dir, "r-late-old", aged.cutoff - 2 * DAY, aged.cutoff - 2 * DAY)
    late_new = record_run(aged.data_dir, "r-late-new", aged.cutoff + DAY, aged.cutoff + DAY)

    result = aged.prune(plan)

    assert result.runs_deleted == plan.runs + 1
    assert late_old.run_id not in aged.run_ids()
    assert late_new.run_id in aged.run_ids()


def test_prune_file_already_gone(aged: AgedStore) -> None:
    """A planned file deleted meanwhile is skipped and not counted."""
    plan = aged.plan()
    gone = plan.files[0].path
    size = gone.stat().st_size
    gone.unlink()

    result = aged.prune(plan)

    assert result.files_deleted == 2
    assert result.bytes_deleted == plan.bytes - size


def test_prune_progress(aged: AgedStore) -> None:
    """progress counts the rows, then the files, and ends at its total."""
    calls: list[tuple[int, int]] = []
    plan = aged.plan()

    with aged.index as index:
        prune(index, plan, progress=lambda done, total: calls.append((done, total)))

    assert calls == [(3, 6), (4, 6), (5, 6), (6, 6)]


# -- the checks before deleting -----------------------------------------------------------------


def assert_nothing_deleted(aged: AgedStore, files: list[Path], runs: set[str]) -> None:
    assert aged.files() == files
    assert aged.run_ids() == runs


def test_prune_rejects_newer_file(aged: AgedStore) -> None:
    """A plan that lists a file dated on or after the cutoff's day deletes nothing."""
    plan = aged.plan()
    newer = JournalReader(aged.data_dir / "journal").files()[-1]
    files, runs = aged.files(), aged.run_ids()

    with pytest.raises(ValueError, match="not a journal file dated before the cutoff"):
        aged.prune(plan._replace(files=[*plan.files, newer]))

    assert_nothing_deleted(aged, files, runs)


def test_prune_rejects_mislabelled_file(aged: AgedStore) -> None:
    """A file whose name does not match its planned date deletes nothing."""
    plan = aged.plan()
    today_file = aged.files()[-1]
    files, runs = aged.files(), aged.run_ids()
    mislabelled = JournalFile(plan.files[0].date, today_file)

    with pytest.raises(ValueError, match=re.escape(str(today_file))):
        aged.prune(plan._replace(files=[mislabelled]))

    assert_nothing_deleted(aged, files, runs)


def test_prune_rejects_other_file(aged: AgedStore, tmp_path: Path) -> None:
    """A planned path that is not named as a journal file deletes nothing."""
    plan = aged.plan()
    other = tmp_path / "notes.txt"
    other.write_text("keep me")

    with pytest.raises(ValueError, match=re.escape(str(other))):
        aged.prune(plan._replace(files=[JournalFile(plan.files[0].date, other)]))

    assert other.read_text() == "keep me"


@pytest.mark.parametrize(
    ("cutoff_of_now", "message"),
    [
        (lambda now: start_of_day(now), "or earlier"),
        (lambda now: start_of_day(now) + 30 * DAY, "or earlier"),
        (
            lambda now: start_of_day(now) - 100 * DAY + datetime.timedelta(hours=3),
            "start of a UTC day",
        ),
        (lambda now: (start_of_day(now) - 100 * DAY).replace(tzinfo=None), "aware datetime"),
    ],
)
def test_prune_rejects_cutoff(aged: AgedStore, cutoff_of_now: object, message: str) -> None:
    """A cutoff later than plan_prune allows, not at a day's start, or naive deletes nothing."""
    plan = aged.plan()
    files, runs = aged.files(), aged.run_ids()
    cutoff = cutoff_of_now(aged.now)  # type: ignore[operator]

    with pytest.raises(ValueError, match=message):
        aged.prune(plan._replace(cutoff=cutoff, files=[]))

    assert_nothing_deleted(aged, files, runs)


def test_prune_yesterday_cutoff(tmp_path: Path) -> None:
    """The shortest retention, one day, keeps yesterday's and today's files."""
    now = datetime.datetime.now(UTC)
    for days_ago in (0, 1, 2):
        moment = now - days_ago * DAY
        record_run(tmp_path, f"r-{days_ago}", moment, moment)

    with DatabaseWriter(tmp_path / "telemetry.db") as index:
        plan = plan_prune(index, JournalReader(tmp_path / "journal"), DAY)
        result = prune(index, plan)
        kept = set(index.run_statuses())

    assert result.files_deleted == 1
    assert kept == {"r-0", "r-1"}


def test_prune_injected_now(tmp_path: Path) -> None:
    """A plan made with an injected now is carried out when prune gets the same now."""
    now = datetime.datetime.now(UTC) + 30 * DAY
    for days_ago in (0, 1, 2):
        moment = now - days_ago * DAY
        record_run(tmp_path, f"r-{days_ago}", moment, moment)

    with DatabaseWriter(tmp_path / "telemetry.db") as index:
        plan = plan_prune(index, JournalReader(tmp_path / "journal"), DAY, now=now)
        result = prune(index, plan, now=now)
        kept = set(index.run_statuses())

    assert result.files_deleted == 1
    assert kept == {"r-0", "r-1"}


def test_prune_rejects_clock_now(tmp_path: Path) -> None:
    """Without now, a plan whose cutoff is later than the clock allows deletes nothing."""
    now = datetime.datetime.now(UTC) + 30 * DAY
    record_run(tmp_path, "r-2", now - 2 * DAY, now - 2 * DAY)

    with DatabaseWriter(tmp_path / "telemetry.db") as index:
        plan = plan_prune(index, JournalReader(tmp_path / "journal"), DAY, now=now)
        with pytest.raises(ValueError, match="or earlier"):
            prune(index, plan)
        kept = set(index.run_statuses())

    assert kept == {"r-2"}


@pytest.mark.parametrize(
    ("now", "error", "message"),
    [
        (datetime.datetime(2026, 12, 4), ValueError, "aware datetime"),
        ("2026-12-04", TypeError, "must be a datetime.datetime"),
        (
            datetime.datetime(1, 1, 1, tzinfo=datetime.timezone(datetime.timedelta(hours=5))),
            ValueError,
            "outside the years 1 to 9999",
        ),
    ],
)
def test_prune_rejects_now(
    aged: AgedStore, now: object, error: type[Exception], message: str
) -> None:
    """A naive or non-datetime now raises and deletes nothing."""
    plan = aged.plan()
    files, runs = aged.files(), aged.run_ids()

    with aged.index as index, pytest.raises(error, match=message):
        prune(index, plan, now=now)  # type: ignore[arg-type]

    assert_nothing_deleted(aged, files, runs)
