"""Checkpoints of the SQLite index on a thread of their own, ahead of the commits' own.

In WAL mode, a commit that takes the write-ahead log past ``wal_autocheckpoint`` pages
(1,000 here) checkpoints it on the caller's thread: it fsyncs the log, copies the latest
version of each page into the database file, and fsyncs that. A run writes about 40 KB
of log, so that commit does the work of about a hundred runs.

A DatabaseWriter built with ``checkpoint_in_background=True`` counts its commits here, and
every COMMITS_PER_CHECKPOINT commits a WakeableThread runs ``PRAGMA
wal_checkpoint(PASSIVE)`` on a connection of its own. A passive checkpoint takes no lock
that writers wait for, and Python's sqlite3 releases the GIL while it runs. It rarely
copies the last frames, which writers keep appending meanwhile, so SQLite does not
restart the log after it. The automatic checkpoint still does that, at the same 1,000
pages, but finds most of the log already synced and copied. A commit's checkpoint is
skipped while the thread's runs, so the log can pass 1,000 pages by the commits made
meanwhile (2,800 pages were seen on a loaded 2-CPU machine). Measured on a 2-vCPU VM
(ext4, CPython 3.11, SQLite 3.40): with durability none, a run cost about 400 us instead
of about 470 us. With durability fsync the disk sets the pace, and the difference was
within the noise.

Logger: ``telemetry.index``.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable

from telemetry._wakeable import WakeableThread

__all__ = ["COMMITS_PER_CHECKPOINT", "BackgroundCheckpointer"]

logger = logging.getLogger("telemetry.index")

COMMITS_PER_CHECKPOINT = 50
"""Commits between two checkpoints of the background thread (a run makes two)."""


class BackgroundCheckpointer:
    """A commit counter for one index that checkpoints it on a thread every so many commits.

    ``checkpoint`` runs on the thread, which must use a connection of its own. It may
    raise ``sqlite3.Error`` or ``OSError``. Those are logged as WARNINGs: the first
    failure, then every 100th. The thread starts with the first checkpoint, and again in a child
    made by fork().
    """

    def __init__(self, name: str, checkpoint: Callable[[], object]) -> None:
        self._name = name
        self._checkpoint = checkpoint
        self._commits = 0
        self._failures = 0
        self.completed = 0
        """Checkpoints that ran to the end, busy or not."""
        self._thread = WakeableThread(f"telemetry-index-checkpoint-{name}", self, _run_once)

    def note_commit(self) -> None:
        """Count one commit, and wake the thread every COMMITS_PER_CHECKPOINT commits."""
        # Commits of several threads may race on the count, which can then be off by one.
        self._commits += 1
        if self._commits % COMMITS_PER_CHECKPOINT == 0:
            self._thread.wake()

    def stop(self) -> threading.Thread | None:
        """Stop the thread, waiting up to 2 s for a checkpoint in progress.

        Returns the thread if its checkpoint still runs after the wait, else None. A later
        commit starts it again.
        """
        return self._thread.stop()


def _run_once(owner: BackgroundCheckpointer) -> None:
    try:
        owner._checkpoint()
        owner.completed += 1
    except (sqlite3.Error, OSError) as exc:
        owner._failures += 1
        # A failing checkpoint loses nothing: the commits' own checkpoints go on. So every
        # 100th failure is enough after the first.
        if owner._failures % 100 == 1:
            logger.warning(
                "background checkpoint of %s failed (%d failures so far): %s; commits "
                "still checkpoint by themselves",
                owner._name,
                owner._failures,
                exc,
            )
