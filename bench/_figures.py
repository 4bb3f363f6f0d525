"""The README's figures as records: a value, its target and the verdict, printed as one table and as JSON.

Pure code (no processes, no sockets), so the verdicts and the table are unit-tested on their own.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

Direction = Literal["at most", "at least"]


@dataclass(frozen=True)
class Figure:
    """One figure: `value` compared with `target` (inclusive, as the README words its targets).

    `value` is None when the figure was not measured: `skipped` says a flag left it out, else `error`
    says what went wrong (a failed conversion, a worker that did not start).
    """

    number: int  # the figure's number in the README's table
    label: str
    value: float | None
    unit: str
    target: float
    direction: Direction
    detail: str = ""
    error: str = ""
    skipped: bool = False

    @property
    def met(self) -> bool | None:
        if self.value is None or math.isnan(self.value):
            return None
        return self.value <= self.target if self.direction == "at most" else self.value >= self.target

    @property
    def verdict(self) -> str:
        if self.skipped:
            return "skipped"
        met = self.met
        if met is None:
            return "n/a"
        return "met" if met else "not met"

    @property
    def measured(self) -> bool:
        """False when the figure should have been measured and could not be (a bench failure, not a miss)."""
        return self.skipped or self.met is not None


def _number(value: float | None, unit: str) -> str:
    if value is None or math.isnan(value):
        return "-"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "MiB":
        return f"{value:.0f} MiB"
    return f"{value:.2f}{unit}"


def table(figures: Sequence[Figure]) -> str:
    """A compact table: number, figure, value, target, verdict; then each figure's detail or error indented."""
    rows = [("#", "figure", "value", "target", "verdict")]
    for f in figures:
        sign = "≤" if f.direction == "at most" else "≥"
        rows.append((str(f.number), f.label, _number(f.value, f.unit), f"{sign} {_number(f.target, f.unit)}",
                     f.verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for f in figures:
        for text in filter(None, (f.detail, f.error and f"error: {f.error}")):
            lines.append(f"  {f.number}: {text}")
    return "\n".join(lines)


def as_json(figures: Sequence[Figure]) -> list[dict[str, object]]:
    return [{**asdict(f), "met": f.met, "verdict": f.verdict} for f in figures]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when either is missing or the denominator is not positive."""
    if math.isnan(numerator) or math.isnan(denominator) or denominator <= 0:
        return float("nan")
    return numerator / denominator
