"""Figures measured in rounds, printed beside their references: median of the rounds and the range.

A figure is measured once per round for us and once per round for each reference, in the same run;
its ratio is taken round by round (ours / reference), and the table shows the median of those
ratios with the lowest and highest. Targets are checked on the median and every round is looked at,
so a median that meets a target while one round misses it says so.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TextIO

MIN_ROUNDS = 3
#: Between the lowest and highest of a range: an en dash, so a negative bound still reads clearly.
DASH = "\u2013"


@dataclass(frozen=True)
class Spread:
    """The median of some values, with their lowest and highest, and how many there were."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("no values to summarise")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def text(self, fmt: Callable[[float], str] = "{:.2f}".format) -> str:
        """``median [low-high]`` in ``fmt`` (an en dash between low and high)."""
        return f"{fmt(self.median)} [{fmt(self.low)}{DASH}{fmt(self.high)}]"


@dataclass(frozen=True)
class Target:
    """A goal from the issue: ``on`` ours or on the ratio, at most or at least ``bound``."""

    bound: float
    kind: Literal["at most", "at least"] = "at most"
    on: Literal["ours", "ratio"] = "ours"
    #: How the bound reads in the table (``<= 5 % of L``, ``>= 0.5x``).
    label: str = ""

    def met(self, value: float) -> bool:
        return value <= self.bound if self.kind == "at most" else value >= self.bound

    def verdict(self, values: Sequence[float]) -> str:
        """``met``, ``MISSED``, or ``met (median; k of n rounds miss)``."""
        median_met = self.met(statistics.median(values))
        misses = sum(not self.met(v) for v in values)
        label = self.label or f"{'<=' if self.kind == 'at most' else '>='} {self.bound:g}"
        if not median_met:
            return f"target {label}: MISSED"
        if misses:
            return f"target {label}: met (median; {misses} of {len(values)} rounds miss)"
        return f"target {label}: met"


def p95(values: Sequence[float]) -> float:
    """The 95th percentile (nearest rank), NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, -(-95 * len(ordered) // 100) - 1)]


def median(values: Sequence[float]) -> float:
    """The median, NaN for no values."""
    return statistics.median(values) if values else float("nan")


def ratios(ours: Sequence[float], reference: Sequence[float]) -> list[float]:
    """Ours / reference, round by round (a zero reference gives infinity, not an error)."""
    if len(ours) != len(reference):
        raise ValueError(f"{len(ours)} rounds of ours against {len(reference)} of the reference")
    return [o / r if r else float("inf") for o, r in zip(ours, reference, strict=True)]


@dataclass
class Figure:
    """One figure: our value per round and, per reference (by name), its value per round."""

    name: str
    ours: list[float]
    fmt: Callable[[float], str]
    references: Mapping[str, list[float]] = field(default_factory=dict)
    target: Target | None = None

    def verdict(self) -> str:
        if self.target is None or not self.ours:
            return ""
        if self.target.on == "ours":
            return self.target.verdict(self.ours)
        first = next(iter(self.references.values()), None)
        return self.target.verdict(ratios(self.ours, first)) if first else ""

    def missed(self) -> bool:
        return "MISSED" in self.verdict()

    def lines(self, width: int) -> list[str]:
        """The figure's rows: one per reference (the first carries the name and the target)."""
        if not self.ours:
            return [f"{self.name:<{width}}  (not measured)"]
        ours = Spread.of(self.ours)
        rounds = f"over {ours.n} rounds"
        if not self.references:
            median = self.fmt(ours.median)
            row = f"{self.name:<{width}}  {median:>11}  {'(none)':>22}  ours {ours.text(self.fmt)} {rounds}"
            return [_with(row, self.verdict())]
        rows = []
        for i, (ref_name, ref_values) in enumerate(self.references.items()):
            name = self.name if i == 0 else ""
            reference = f"{ref_name} {self.fmt(Spread.of(ref_values).median)}"
            ratio = Spread.of(ratios(self.ours, ref_values))
            ours_text = self.fmt(ours.median) if i == 0 else ""
            row = f"{name:<{width}}  {ours_text:>11}  {reference:>22}  ratio {ratio.text(_ratio)} {rounds}"
            rows.append(_with(row, self.verdict() if i == 0 else ""))
        return rows


def _with(row: str, verdict: str) -> str:
    return f"{row}   {verdict}" if verdict else row


def _ratio(value: float) -> str:
    return f"{value:.2f}x" if value != float("inf") else "inf"


def print_table(
    title: str, figures: Sequence[Figure], notes: Sequence[str] = (), out: TextIO | None = None
) -> None:
    """A titled table: ``figure  ours  reference  ratio median [min-max] over N rounds  target``."""
    stream = out if out is not None else sys.stdout
    width = max([len(f.name) for f in figures] + [6])
    print(f"\n== {title}", file=stream)
    print(
        f"{'figure':<{width}}  {'ours':>11}  {'reference':>22}  ratio (ours/reference) median [min{DASH}max]",
        file=stream,
    )
    for figure in figures:
        for line in figure.lines(width):
            print(line, file=stream)
    for note in notes:
        print(f"  {note}", file=stream)
    stream.flush()


def percent(value: float) -> str:
    return f"{100 * value:.1f} %"


def seconds(value: float) -> str:
    return f"{value:.2f} s"


def millis(value: float) -> str:
    return f"{1000 * value:.2f} ms"


def plain(value: float) -> str:
    return f"{value:.2f}"


def per_second(value: float) -> str:
    return f"{value:.1f}/s"


def mebibytes(value: float) -> str:
    return f"{value / 2**20:.1f} MiB"


def kibibytes(value: float) -> str:
    return f"{value / 1024:.1f} KiB"
