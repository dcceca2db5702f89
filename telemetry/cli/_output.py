"""Output of the command: aligned tables, JSON, durations, times and progress."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, TextIO

import orjson

__all__ = [
    "Progress",
    "ProgressAwareHandler",
    "format_bytes",
    "format_duration",
    "format_time",
    "plural",
    "print_json",
    "print_table",
    "printable",
    "write_line",
]


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO) -> None:
    """Print ``rows`` under ``header`` in columns padded to their widest cell.

    Cells pass through printable(), so a control character cannot break the layout.
    """
    rows = [tuple(printable(cell) for cell in row) for row in rows]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    for row in [header, *rows]:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip(), file=out)


def print_json(value: Any, out: TextIO) -> None:
    """Print ``value`` as one indented JSON document, for ``--json``."""
    out.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode("utf-8") + "\n")


def format_duration(milliseconds: float | None) -> str:
    """Return a duration for people: ``850 ms``, ``12.4 s``, ``3.5 min``, ``2.0 h``, or ``-``.

    The unit is chosen after rounding, so 119,999 ms is ``2.0 min``, not ``120.0 s``.
    """
    if milliseconds is None:
        return "-"
    if round(milliseconds) < 1000:
        return f"{round(milliseconds)} ms"
    seconds = milliseconds / 1000
    for value, unit, next_unit_size in ((seconds, "s", 120), (seconds / 60, "min", 120)):
        rounded = f"{value:.1f}"
        if float(rounded) < next_unit_size:
            return f"{rounded} {unit}"
    return f"{seconds / 3600:.1f} h"


def format_time(timestamp: str | None) -> str:
    """Return a stored ISO 8601 UTC timestamp as ``YYYY-MM-DD HH:MM:SS``, or ``-``."""
    if not timestamp:
        return "-"
    return timestamp[:19].replace("T", " ")


def format_bytes(size: int) -> str:
    """Return a size in bytes for people: ``512 B``, ``4.1 KiB``, ``12.0 MiB``, ``1.2 GiB``."""
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def printable(text: str) -> str:
    """Return ``text`` with control characters escaped, such as ``\\x1b`` and ``\\n``.

    Agent names, summaries and payloads come from the agents, so an escape sequence in
    them must not act on the terminal, and a newline must not split a table row.
    """
    if text.isprintable():
        return text
    return "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
        for char in text
    )


def plural(count: int, noun: str) -> str:
    """Return ``count`` with ``noun``, adding an ``s`` unless the count is 1: ``3 runs``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


# The progress bar drawn on a stream now, if any, so that write_line can keep log lines
# off its line. The lock orders drawing and writing across threads.
_bar_lock = threading.RLock()
_drawn_bar: Progress | None = None


def write_line(stream: TextIO, text: str) -> None:
    """Write ``text`` and a newline to ``stream``, above the progress bar drawn there.

    The bar's line is cleared first (``\\r`` and the ANSI erase-line sequence) and the bar
    is drawn again below the text, so that the text starts a line of its own.
    """
    with _bar_lock:
        bar = _drawn_bar if _drawn_bar is not None and _drawn_bar.stream is stream else None
        if bar is not None:
            stream.write("\r\x1b[K")
        stream.write(text + "\n")
        if bar is not None:
            bar.redraw()
        stream.flush()


class ProgressAwareHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A logging handler that writes each record above a progress bar, with write_line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            write_line(self.stream, self.format(record))
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


class Progress:
    """Progress display of a long operation, on a stream of its own (stderr).

    With ``bar`` true the line is redrawn in place (``\\r``). Otherwise, when ``lines`` is
    true, a plain line is written each time another tenth of the work is done, and at
    the end. With neither, nothing is shown. No state is shown twice in a row, and log
    lines written with write_line (as ProgressAwareHandler does) go above the bar.

    Used as a context manager, the display is finished when the block ends. When the
    block raises, the bar only gets its newline and no final count is written, so that
    the error message is the last line and starts on a line of its own.

    Args:
        label: what is being done, such as ``"posting"``.
        total: the number of steps; 0 when unknown.
        stream: where to write.
        bar: draw a bar in place, for a terminal.
        lines: without a bar, write plain lines of progress.
        clock: the time source that spaces redraws of the bar; tests pass their own.
    """

    WIDTH = 30
    REDRAW_SECONDS = 0.1

    def __init__(
        self,
        label: str,
        total: int,
        stream: TextIO,
        *,
        bar: bool,
        lines: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.total = max(0, total)
        self.done = 0
        self.stream = stream
        self._bar = bar
        self._lines = lines
        self._clock = clock
        self._last_draw = -1.0
        self._last_tenth = 0
        # The (done, total) last drawn as a bar or written as a line, or None.
        self._shown_state: tuple[int, int] | None = None
        self._finished = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.finish(completed=exc_type is None)

    def update(self, done: int, total: int | None = None) -> None:
        """Record that ``done`` steps of ``total`` (default: the total so far) are done."""
        if total is not None:
            self.total = max(0, total)
        self.done = done
        if self._bar:
            now = self._clock()
            if now - self._last_draw >= self.REDRAW_SECONDS or done >= self.total:
                self._last_draw = now
                self._draw()
        elif self._lines and self.total:
            tenth = min(10, done * 10 // self.total)
            if tenth > self._last_tenth:
                self._last_tenth = tenth
                self._write_line()

    def finish(self, *, completed: bool = True) -> None:
        """End the display. Calls after the first do nothing.

        Args:
            completed: false when the work failed. The bar then only ends its line, and
                no final count is written.
        """
        global _drawn_bar
        if self._finished:
            return
        self._finished = True
        with _bar_lock:
            if self._bar and completed:
                self._draw()
            if self._bar and self._shown_state is not None:
                self.stream.write("\n")
            elif self._lines and completed and self.total:
                self._write_line()
            if _drawn_bar is self:
                _drawn_bar = None
            self.stream.flush()

    def redraw(self) -> None:
        """Draw the bar again after other text cleared its line."""
        with _bar_lock:
            self._shown_state = None
            self._draw()

    def _state(self) -> tuple[int, int]:
        return self.done, self.total

    def _draw(self) -> None:
        global _drawn_bar
        with _bar_lock:
            if self._shown_state == self._state():
                return
            if self.total:
                filled = min(self.WIDTH, self.WIDTH * self.done // self.total)
                bar = "#" * filled + "-" * (self.WIDTH - filled)
                text = f"\r{self.label} [{bar}] {self.done}/{self.total}"
            else:
                text = f"\r{self.label}: {self.done}"
            self.stream.write(text)
            self.stream.flush()
            self._shown_state = self._state()
            _drawn_bar = self

    def _write_line(self) -> None:
        if self._shown_state == self._state():
            return
        self.stream.write(f"{self.label}: {self.done}/{self.total}\n")
        self.stream.flush()
        self._shown_state = self._state()
