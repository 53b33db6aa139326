"""
Figures measured by the bench and the table that shows each one next to its budget.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

#: Verdict words printed in the table.
MET = "met"
MISSED = "MISSED"
REPORTED = "-"


@dataclass(frozen=True)
class Figure:
    """
    One measured value.

    Attributes:
        phase: The bench phase, e.g. "throughput".
        measure: What was measured, with its conditions.
        value: The measured value with its unit, as printed.
        budget: The budget with its unit, or "report" when there is none.
        verdict: ``MET``, ``MISSED`` or ``REPORTED``.
    """

    phase: str
    measure: str
    value: str
    budget: str = "report"
    verdict: str = REPORTED

    def as_dict(self) -> dict[str, Any]:
        """Return the figure as a JSON-ready dict."""
        return asdict(self)


def judged(phase: str, measure: str, value: str, budget: str, met: bool) -> Figure:
    """Return a figure that has a budget, with its verdict."""
    return Figure(phase, measure, value, budget, MET if met else MISSED)


def reported(phase: str, measure: str, value: str) -> Figure:
    """Return a figure that has no budget."""
    return Figure(phase, measure, value)


def failed_phase(phase: str, error: BaseException) -> Figure:
    """Return the row shown for a phase that could not finish."""
    return Figure(phase, "phase did not finish", f"{type(error).__name__}: {error}",
                  "finish", MISSED)


def render_table(figures: list[Figure]) -> str:
    """Render the figures as a Markdown table, readable in a terminal too."""
    header = ("phase", "measure", "figure", "budget", "verdict")
    rows = [header] + [(f.phase, f.measure, f.value, f.budget, f.verdict) for f in figures]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = [_table_line(row, widths) for row in rows]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)


def _table_line(cells: tuple[str, ...], widths: list[int]) -> str:
    return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"


def percentile(values: list[float], share: float) -> float:
    """Return the nearest-rank percentile, e.g. ``share=0.95`` for p95."""
    ordered = sorted(values)
    rank = max(1, math.ceil(len(ordered) * share))
    return ordered[rank - 1]
