"""Checkpoints of the SQLite index on a thread of their own, so that commits do not run them.

In WAL mode, SQLite's automatic checkpoint runs inside the COMMIT that takes the write-ahead
log past ``wal_autocheckpoint`` pages: that one commit copies the log into the database file
and fsyncs both, on the thread of the caller. Measured on a 2-vCPU VM (ext4, CPython 3.11,
SQLite 3.40), one run's insert and update took about 270 us with the automatic checkpoint
and about 140 us without it, since a checkpoint every few hundred commits takes milliseconds.

A DatabaseWriter built with ``checkpoint_in_background=True`` raises its connections'
``wal_autocheckpoint`` to FALLBACK_AUTOCHECKPOINT_PAGES and counts its commits here. Every
COMMITS_PER_CHECKPOINT commits, a WakeableThread runs ``PRAGMA wal_checkpoint(PASSIVE)`` on
a connection of its own. A passive checkpoint takes no lock that writers wait for, and
Python's sqlite3 releases the GIL while it runs. Should the thread fall behind or fail, the
fallback limit still makes a commit checkpoint, so the log cannot grow without bound.

Logger: ``telemetry.index``.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable

from telemetry._wakeable import WakeableThread

__all__ = ["COMMITS_PER_CHECKPOINT", "FALLBACK_AUTOCHECKPOINT_PAGES", "BackgroundCheckpointer"]

logger = logging.getLogger("telemetry.index")

COMMITS_PER_CHECKPOINT = 100
"""Commits between two checkpoints of the background thread (a run takes two)."""

FALLBACK_AUTOCHECKPOINT_PAGES = 10_000
"""wal_autocheckpoint of connections whose checkpoints run in the background (about 40 MB)."""


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

    def stop(self) -> None:
        """Stop the thread, waiting up to 2 s for a checkpoint in progress.

        A later commit starts it again.
        """
        self._thread.stop()


def _run_once(owner: BackgroundCheckpointer) -> None:
    try:
        owner._checkpoint()
        owner.completed += 1
    except (sqlite3.Error, OSError) as exc:
        owner._failures += 1
        # A failing checkpoint loses nothing. Commits slow down once the log passes the
        # fallback limit, so every 100th failure is enough after the first.
        if owner._failures % 100 == 1:
            logger.warning(
                "background checkpoint of %s failed (%d failures so far): %s; commits "
                "checkpoint by themselves once the log passes %d pages",
                owner._name,
                owner._failures,
                exc,
                FALLBACK_AUTOCHECKPOINT_PAGES,
            )
