"""Logging helpers: rate limiting of repeated messages."""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable, Iterable

from telemetry.encoding import ConversionIssue

__all__ = ["RepeatLimiter"]


class RepeatLimiter:
    """Let through the first ``burst`` messages per key, then every ``every``-th one.

    A fault that repeats on every call, such as a full disk, would otherwise write one log
    line per run or event. Each line let through after the burst states how many were
    held back since the previous one.
    """

    # Keys are often field paths, which vary without bound; past this many the counts
    # start over rather than grow.
    MAX_KEYS = 1000

    def __init__(self, burst: int = 5, every: int = 100) -> None:
        self._burst = burst
        self._every = every
        self._counts: dict[Hashable, int] = {}
        self._lock = threading.Lock()

    def log(
        self,
        logger: logging.Logger,
        level: int,
        key: Hashable,
        message: str,
        *args: object,
        exc_info: bool = False,
    ) -> None:
        """Log ``message % args`` unless it is a repeat of ``key`` that is held back."""
        with self._lock:
            if key not in self._counts and len(self._counts) >= self.MAX_KEYS:
                self._counts.clear()
            count = self._counts.get(key, 0) + 1
            self._counts[key] = count
        if count <= self._burst:
            logger.log(level, message, *args, exc_info=exc_info)
        elif (count - self._burst) % self._every == 0:
            logger.log(
                level,
                message + " (%d similar messages held back)",
                *args,
                self._every - 1,
                exc_info=exc_info,
            )

    def log_conversions(
        self, logger: logging.Logger, run_id: object, issues: Iterable[ConversionIssue]
    ) -> None:
        """Log a WARNING per value stored in a converted form, naming the run and the field."""
        for issue in issues:
            self.log(
                logger,
                logging.WARNING,
                ("convert", issue.path, issue.reason),
                "run %s: %s: %s",
                run_id,
                issue.path,
                issue.reason,
            )
