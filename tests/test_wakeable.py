"""Tests of the background threads: WakeableThread and the index's BackgroundCheckpointer."""

from __future__ import annotations

import gc
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable

import pytest

from telemetry import _checkpoint
from telemetry._checkpoint import BackgroundCheckpointer
from telemetry._wakeable import WakeableThread

WAIT_SECONDS = 10.0

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


class Owner:
    """An owner whose task counts its runs and signals each one."""

    def __init__(self) -> None:
        self.runs = 0
        self.ran = threading.Event()


def count_run(owner: Owner) -> None:
    owner.runs += 1
    owner.ran.set()


def wait_until(condition: Callable[[], bool]) -> bool:
    """Poll ``condition`` until it is true or WAIT_SECONDS pass, and return its last value."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def live_threads(name: str) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == name]


def test_wake_runs_task() -> None:
    """wake() starts the thread, which runs the task with its owner."""
    owner = Owner()
    thread = WakeableThread("test-wake-runs", owner, count_run)
    thread.wake()
    assert owner.ran.wait(WAIT_SECONDS)
    thread.stop()
    assert owner.runs == 1


def test_no_thread_before_wake() -> None:
    """No thread exists until the first wake()."""
    WakeableThread("test-no-thread", Owner(), count_run)
    assert live_threads("test-no-thread") == []


def test_stop_ends_thread() -> None:
    """stop() ends the thread; a second stop() does nothing."""
    owner = Owner()
    thread = WakeableThread("test-stop-ends", owner, count_run)
    thread.wake()
    assert owner.ran.wait(WAIT_SECONDS)
    thread.stop()
    thread.stop()
    assert live_threads("test-stop-ends") == []


def test_wake_after_stop_restarts() -> None:
    """A wake() after stop() starts a new thread that runs the task."""
    owner = Owner()
    thread = WakeableThread("test-restart", owner, count_run)
    thread.wake()
    assert owner.ran.wait(WAIT_SECONDS)
    thread.stop()
    owner.ran.clear()
    thread.wake()
    assert owner.ran.wait(WAIT_SECONDS)
    thread.stop()
    assert owner.runs == 2


def test_wakes_during_task_merge() -> None:
    """Wakes that arrive while the task runs lead to one more run, not one per wake."""
    owner = Owner()
    entered = threading.Event()
    release = threading.Event()

    def held_task(target: Owner) -> None:
        entered.set()
        release.wait(WAIT_SECONDS)
        count_run(target)

    thread = WakeableThread("test-merge", owner, held_task)
    thread.wake()
    assert entered.wait(WAIT_SECONDS)
    for _ in range(5):
        thread.wake()
    release.set()
    assert wait_until(lambda: owner.runs == 2)
    thread.stop()
    assert owner.runs == 2


def test_task_error_logged(caplog: pytest.LogCaptureFixture) -> None:
    """An exception from the task is logged as an ERROR, and the next wake runs it again."""
    owner = Owner()
    calls: list[int] = []

    def failing_task(target: Owner) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("task broke")
        count_run(target)

    thread = WakeableThread("test-task-error", owner, failing_task)
    with caplog.at_level(logging.ERROR, logger="telemetry"):
        thread.wake()
        assert wait_until(lambda: len(calls) == 1)
        assert wait_until(lambda: any("test-task-error" in r.getMessage() for r in caplog.records))
        thread.wake()
        assert owner.ran.wait(WAIT_SECONDS)
    thread.stop()
    assert "task broke" in caplog.text


def test_thread_ends_with_owner() -> None:
    """The thread ends once its owner is garbage collected, without stop()."""
    owner = Owner()
    thread = WakeableThread("test-owner-gone", owner, count_run)
    thread.wake()
    assert owner.ran.wait(WAIT_SECONDS)
    del owner
    gc.collect()
    assert wait_until(lambda: live_threads("test-owner-gone") == [])


@needs_fork
def test_fork_child_starts_own_thread() -> None:
    """In a forked child, wake() starts a thread of the child's that runs the task."""
    owner = Owner()
    thread = WakeableThread("test-fork", owner, count_run)
    thread.wake()
    assert owner.ran.wait(WAIT_SECONDS)
    owner.ran.clear()

    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            thread.wake()
            code = 0 if owner.ran.wait(WAIT_SECONDS) else 2
        finally:
            os._exit(code)

    _, status = os.waitpid(pid, 0)
    thread.stop()
    assert os.WEXITSTATUS(status) == 0


# -- BackgroundCheckpointer -----------------------------------------------------------------


def test_checkpoint_every_so_many_commits() -> None:
    """The checkpoint runs after COMMITS_PER_CHECKPOINT commits, not before."""
    calls: list[int] = []
    checkpointer = BackgroundCheckpointer("test", lambda: calls.append(1))
    for _ in range(_checkpoint.COMMITS_PER_CHECKPOINT - 1):
        checkpointer.note_commit()
    assert live_threads("telemetry-index-checkpoint-test") == []
    checkpointer.note_commit()
    assert wait_until(lambda: checkpointer.completed == 1)
    checkpointer.stop()
    assert calls == [1]


def test_checkpoint_failures_logged_sparsely(caplog: pytest.LogCaptureFixture) -> None:
    """A failing checkpoint is logged the first time and then every 100th time."""

    def locked() -> None:
        raise sqlite3.OperationalError("database is locked")

    checkpointer = BackgroundCheckpointer("test-failing", locked)
    with caplog.at_level(logging.WARNING, logger="telemetry.index"):
        for _ in range(150):
            _checkpoint._run_once(checkpointer)
    warnings = [r.getMessage() for r in caplog.records if r.name == "telemetry.index"]
    assert len(warnings) == 2
    assert "database is locked" in warnings[0]
    assert "101 failures" in warnings[1]


def test_start_failure_warns_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread that cannot start makes wake() return False, with one WARNING."""

    def reject_start(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", reject_start)
    thread = WakeableThread("test-no-start", Owner(), count_run)
    with caplog.at_level(logging.WARNING, logger="telemetry"):
        results = [thread.wake(), thread.wake()]
    warnings = [r.getMessage() for r in caplog.records if "test-no-start" in r.getMessage()]

    assert results == [False, False]
    assert len(warnings) == 1
    assert "can't start new thread" in warnings[0]


def test_close_is_final() -> None:
    """After close(), wake() starts no thread and returns False."""
    owner = Owner()
    thread = WakeableThread("test-close-final", owner, count_run)
    thread.wake()
    assert owner.ran.wait(WAIT_SECONDS)
    thread.close()

    assert thread.wake() is False
    assert live_threads("test-close-final") == []
