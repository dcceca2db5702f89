"""Rows of the write-path benchmark, printed as a text table or written as Markdown."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from _harness import Spread, spread

__all__ = [
    "KEEP_MARKER",
    "Row",
    "Target",
    "format_quantity",
    "markdown_results",
    "text_table",
    "write_markdown",
]

# Everything after this line in docs/benchmarks.md is written by hand and kept when the
# script writes the file again.
KEEP_MARKER = "<!-- Written by hand: bench_write.py keeps everything below this line. -->"

_COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    ">": operator.gt,
}
_COMPARISON_WORDS = {"<=": "at most", ">=": "at least", ">": "more than"}


@dataclass(frozen=True)
class Target:
    """A bound on the median of a row's ratio, or of its subject when the row has no ratio."""

    comparison: str
    bound: float
    unit: str = "x"

    def describe(self) -> str:
        """Return the target in words, such as ``at most 1.2x``."""
        return f"{_COMPARISON_WORDS[self.comparison]} {format_quantity(self.bound, self.unit)}"

    def is_met(self, value: float) -> bool:
        """Return whether ``value`` meets the target. NaN never does."""
        return not math.isnan(value) and _COMPARISONS[self.comparison](value, self.bound)


@dataclass
class Row:
    """One line of the results: a subject, usually a reference, their ratio and a target.

    ``unit`` is the unit of the subject's and reference's values: ``s`` for seconds per
    operation, ``/s`` for operations per second, ``B`` for bytes, or ``""`` for a count.
    """

    group: str
    name: str
    subject_label: str
    subject: list[float]
    unit: str
    reference_label: str = ""
    reference: list[float] = field(default_factory=list)
    ratio_label: str = ""
    ratios: list[float] = field(default_factory=list)
    target: Target | None = None
    target_on_subject: bool = False
    note: str = ""

    @property
    def judged_value(self) -> float:
        """The median that the target applies to: the ratio's, else the subject's."""
        values = self.subject if self.target_on_subject or not self.ratios else self.ratios
        return spread(values).median if values else float("nan")

    def verdict(self) -> str:
        """Return ``met``, ``missed``, ``skipped`` (nothing measured) or ``-`` (no target)."""
        if not self.subject:
            return "skipped"
        if self.target is None:
            return "-"
        return "met" if self.target.is_met(self.judged_value) else "missed"


def format_quantity(value: float, unit: str) -> str:
    """Format a value with its unit: seconds scaled to ns/us/ms/s, bytes to KiB/MiB."""
    if math.isnan(value):
        return "n/a"
    if unit == "s":
        for scale, name in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
            if abs(value) >= scale:
                return f"{value / scale:.3g} {name}"
        return f"{value / 1e-9:.3g} ns"
    if unit == "B":
        for scale, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if abs(value) >= scale:
                return f"{value / scale:.3g} {name}"
        return f"{value:.0f} B"
    if unit == "/s":
        return f"{value:,.0f}/s"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:.3g}{unit}"


def _format_spread(values: list[float], unit: str) -> str:
    if not values:
        return ""
    summary: Spread = spread(values)
    median = format_quantity(summary.median, unit)
    if len(values) == 1:
        return median
    low = format_quantity(summary.q1, unit)
    high = format_quantity(summary.q3, unit)
    return f"{median} [{low}, {high}]"


def _result_cell(row: Row) -> str:
    verdict = row.verdict()
    if verdict != "missed" or row.target is None:
        return verdict
    unit = row.unit if row.target_on_subject or not row.ratios else "x"
    return f"missed ({format_quantity(row.judged_value, unit)})"


def _cells(row: Row) -> list[str]:
    subject = f"{row.subject_label}: {_format_spread(row.subject, row.unit)}"
    reference = (
        f"{row.reference_label}: {_format_spread(row.reference, row.unit)}"
        if row.reference_label
        else ""
    )
    ratio = f"{row.ratio_label}: {_format_spread(row.ratios, 'x')}" if row.ratio_label else ""
    target = row.target.describe() if row.target else ""
    return [row.name, subject, reference, ratio, target, _result_cell(row)]


def text_table(rows: list[Row]) -> str:
    """Return the rows as a plain-text table grouped like the Markdown one.

    Each row takes three lines (subject, reference, ratio) to stay readable in a terminal.
    """
    lines: list[str] = []
    group = None
    for row in rows:
        if row.group != group:
            group = row.group
            lines.append(f"\n== {group}")
        name, subject, reference, ratio, target, result = _cells(row)
        verdict = f"  [{result}, target {target}]" if target else ""
        lines.append(f"{name}{verdict}")
        for cell in (subject, reference, ratio):
            if cell:
                lines.append(f"    {cell}")
        if row.note:
            lines.append(f"    ({row.note})")
    return "\n".join(lines).lstrip("\n")


def _escape(cell: str) -> str:
    return cell.replace("|", "\\|")


def markdown_results(rows: list[Row]) -> str:
    """Return the rows as a Markdown table: one table with the group as its first column."""
    header = "| group | measurement | subject | reference | ratio | target | result |"
    lines = [header, "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        cells = [row.group, *_cells(row)]
        if row.note:
            cells[1] = f"{cells[1]} ({row.note})"
        lines.append("| " + " | ".join(_escape(cell) for cell in cells) + " |")
    return "\n".join(lines)


def write_markdown(path: Path, generated: str) -> None:
    """Write ``generated`` to ``path``, keeping the hand-written part of the existing file.

    The hand-written part is everything from KEEP_MARKER to the end. A file without the
    marker is replaced whole, and the marker is added with an empty hand-written part.
    """
    hand_written = KEEP_MARKER + "\n"
    try:
        existing = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        existing = ""
    position = existing.find(KEEP_MARKER)
    if position >= 0:
        hand_written = existing[position:]
    text = generated.rstrip("\n") + "\n\n" + hand_written
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
