"""WakeableThread: a daemon thread that runs one task each time it is woken.

The journal writer uses one to start fsyncs while the caller writes the index, and the
index uses one to checkpoint SQLite's write-ahead log away from the caller's commits.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["WakeableThread"]

logger = logging.getLogger("telemetry")

_Owner = TypeVar("_Owner")

_JOIN_TIMEOUT_SECONDS = 2.0
# An idle thread wakes this often to end once its owner has been garbage collected.
_IDLE_WAKE_SECONDS = 30.0


class WakeableThread(Generic[_Owner]):
    """A daemon thread that runs ``task(owner)`` after each wake(), for as long as owner lives.

    The thread starts on the first wake(). Wakes that arrive while the task runs are
    merged into one more run of it. The thread holds ``owner`` only through a weak
    reference, so an owner dropped without stop() can still be garbage collected, and the
    thread then ends at once. An exception from the task is logged as an ERROR and the
    thread goes on; tasks are expected to handle and log their own errors.

    After fork(), the child has no thread: its first wake() starts one.
    """

    def __init__(self, name: str, owner: _Owner, task: Callable[[_Owner], None]) -> None:
        self.name = name
        self._owner = weakref.ref(owner)
        self._task = task
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._closed = False
        self._start_failed = False

    def wake(self) -> bool:
        """Ask the thread to run the task once more, starting the thread if needed.

        Returns False, with a WARNING, when the thread cannot start (no memory for one,
        or an interpreter that is shutting down), and after close(). The caller then does
        the work itself.
        """
        if self._closed:
            return False
        pid = os.getpid()
        if self._pid != pid:
            # A forked child: the parent's thread does not run here, and the lock may have
            # been held by another of the parent's threads.
            with _fork_reset_lock:
                if self._pid != pid:
                    self._lock = threading.Lock()
                    self._thread = None
                    self._pid = pid
        if self._thread is None:
            with self._lock:
                if self._closed:
                    return False
                if self._thread is None:
                    try:
                        self._start()
                    except RuntimeError as exc:
                        self._warn_start_failed(exc)
                        return False
        self._wake.set()
        return True

    def close(self) -> None:
        """Stop the thread as stop() does, for good: later wakes return False."""
        with self._lock:
            self._closed = True
        self.stop()

    def stop(self) -> threading.Thread | None:
        """Stop the thread, waiting up to 2 s for a task in progress. A later wake() restarts it.

        Returns the thread if it is still running its task after the wait, else None.
        """
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is None or self._pid != os.getpid():
                return None
            self._stop.set()
            self._wake.set()
        if thread is threading.current_thread():
            return None
        thread.join(_JOIN_TIMEOUT_SECONDS)
        if not thread.is_alive():
            return None
        logger.warning("thread %s did not stop within %.0f s", thread.name, _JOIN_TIMEOUT_SECONDS)
        return thread

    def _warn_start_failed(self, exc: RuntimeError) -> None:
        # Called with self._lock held. Once per thread object: a process out of threads
        # would otherwise log it on every call.
        if self._start_failed:
            return
        self._start_failed = True
        logger.warning(
            "cannot start thread %s (%s), so its work runs on the calling threads", self.name, exc
        )

    def _start(self) -> None:
        # Called with self._lock held. Each thread has its own events, so that a stopped
        # thread that has not yet seen its stop event cannot take a new thread's wakes.
        self._wake = threading.Event()
        self._stop = threading.Event()
        thread = threading.Thread(
            target=_run,
            args=(self._owner, self._task, self._wake, self._stop),
            name=self.name,
            daemon=True,
        )
        thread.start()
        self._thread = thread
        owner = self._owner()
        if owner is not None:
            # The thread ends as soon as its owner is collected, not at its next idle wake.
            weakref.finalize(owner, _signal_stop, self._stop, self._wake)


# Taken by the first wake() of each WakeableThread in a forked child, so that two threads
# of the child cannot both start a thread for it.
_fork_reset_lock = threading.Lock()


def _new_fork_reset_lock() -> None:
    global _fork_reset_lock
    _fork_reset_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_fork_reset_lock)


def _signal_stop(stop: threading.Event, wake: threading.Event) -> None:
    stop.set()
    wake.set()


def _run(
    owner_ref: weakref.ref[_Owner],
    task: Callable[[_Owner], None],
    wake: threading.Event,
    stop: threading.Event,
) -> None:
    while not stop.is_set():
        woken = wake.wait(_IDLE_WAKE_SECONDS)
        if stop.is_set():
            return
        owner = owner_ref()
        if owner is None:
            return
        if woken:
            wake.clear()
            try:
                task(owner)
            except Exception:
                logger.exception("task of thread %s failed", threading.current_thread().name)
        del owner
