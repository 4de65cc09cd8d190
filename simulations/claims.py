"""A paper's claims, checked against our numbers with the comparison's tie rule.

A claim names strategies and the setting ("arm") it is about and turns a table of scores (mean and
sample sd over seeds, as :mod:`fedlora.simulations.compare_report` summarises them) into one of
three verdicts:

- *reproduced*: our numbers point the paper's way by more than the spread;
- *not reproduced*: they point the other way by more than the spread;
- *tie within the spread*: the difference is no larger than the spread, so our seeds cannot tell.

Two scores are compared as the comparison table compares strategies: the difference of their means
against the larger of their two sds (``compare_report.verdict``). With one seed the spread is 0 and
every difference counts, which is why ``fl-sim reproduce --quick`` verdicts are smoke, not evidence.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from fedlora.simulations.compare_report import TIE_TOLERANCE

REPRODUCED: Final = "reproduced"
NOT_REPRODUCED: Final = "not reproduced"
TIE_WITHIN_SPREAD: Final = "tie within the spread"
NOT_RUN: Final = "not run"


@dataclass(frozen=True)
class Score:
    """One strategy in one arm: mean and sample sd of its final headline metric over seeds."""

    mean: float
    sd: float
    n: int

    def text(self) -> str:
        return f"{self.mean:.3f} ± {self.sd:.3f}"


#: arm -> strategy -> score
Scores = Mapping[str, Mapping[str, Score]]


def order(a: Score, b: Score) -> int:
    """+1 when ``a`` beats ``b`` by more than the larger sd, -1 when it loses by more, else 0."""
    diff = a.mean - b.mean
    if abs(diff) <= max(a.sd, b.sd) + TIE_TOLERANCE:
        return 0
    return 1 if diff > 0 else -1


def _verdict(direction: int) -> str:
    return {1: REPRODUCED, -1: NOT_REPRODUCED, 0: TIE_WITHIN_SPREAD}[direction]


@dataclass(frozen=True)
class Outcome:
    """A claim's verdict and the numbers that decided it."""

    verdict: str
    evidence: str


@dataclass(frozen=True)
class Claim:
    """Base of every claim: ``text`` is the paper's statement as the table prints it."""

    text: str

    def strategies(self) -> frozenset[str]:
        raise NotImplementedError

    def arms(self) -> tuple[str, ...]:
        raise NotImplementedError

    def judge(self, scores: Scores) -> Outcome:
        raise NotImplementedError

    def check(self, scores: Scores) -> Outcome:
        """The verdict, or *not run* naming what is missing (a cell run with fewer strategies)."""
        missing = [f"{s} at {a}" for a in self.arms() for s in sorted(self.strategies()) if s not in scores.get(a, {})]
        if missing:
            return Outcome(NOT_RUN, "no result for " + ", ".join(missing))
        return self.judge(scores)


@dataclass(frozen=True)
class AtLeast(Claim):
    """``better`` >= ``other`` in ``arm``."""

    arm: str
    better: str
    other: str

    def strategies(self) -> frozenset[str]:
        return frozenset({self.better, self.other})

    def arms(self) -> tuple[str, ...]:
        return (self.arm,)

    def judge(self, scores: Scores) -> Outcome:
        a, b = scores[self.arm][self.better], scores[self.arm][self.other]
        return Outcome(_verdict(order(a, b)), f"{self.better} {a.text()} vs {self.other} {b.text()}")


@dataclass(frozen=True)
class Extreme(Claim):
    """``strategy`` is the best (``best=True``) or the worst of ``among`` in ``arm``."""

    arm: str
    strategy: str
    among: tuple[str, ...]
    best: bool = True

    def strategies(self) -> frozenset[str]:
        return frozenset({self.strategy, *self.among})

    def arms(self) -> tuple[str, ...]:
        return (self.arm,)

    def judge(self, scores: Scores) -> Outcome:
        """Reproduced when it beats (best) or loses to (worst) every other beyond the spread; not
        reproduced when any other beats it (best) or loses to it (worst) beyond the spread."""
        own = scores[self.arm][self.strategy]
        sign = 1 if self.best else -1
        others = [s for s in self.among if s != self.strategy]
        orders = [sign * order(own, scores[self.arm][s]) for s in others]
        if all(o > 0 for o in orders):
            direction = 1
        elif any(o < 0 for o in orders):
            direction = -1
        else:
            direction = 0
        ranked = sorted(self.strategies(), key=lambda s: -scores[self.arm][s].mean)
        return Outcome(_verdict(direction), ", ".join(f"{s} {scores[self.arm][s].text()}" for s in ranked))


@dataclass(frozen=True)
class GapGrows(Claim):
    """``better`` - ``other`` grows from the first to the last of ``arm_order`` (e.g. as epsilon shrinks)."""

    arm_order: tuple[str, ...]
    better: str
    other: str

    def strategies(self) -> frozenset[str]:
        return frozenset({self.better, self.other})

    def arms(self) -> tuple[str, ...]:
        return self.arm_order

    def judge(self, scores: Scores) -> Outcome:
        """The gap's growth from the first arm to the last, against the larger spread of the two end gaps
        (each gap's spread: the larger sd of its two strategies)."""
        gaps = [scores[a][self.better].mean - scores[a][self.other].mean for a in self.arm_order]
        spreads = [max(scores[a][self.better].sd, scores[a][self.other].sd) for a in self.arm_order]
        growth = gaps[-1] - gaps[0]
        spread = max(spreads[0], spreads[-1])
        direction = 0 if abs(growth) <= spread + TIE_TOLERANCE else (1 if growth > 0 else -1)
        shown = ", ".join(f"{a}: {g:+.3f}" for a, g in zip(self.arm_order, gaps, strict=True))
        return Outcome(_verdict(direction), f"{self.better} - {self.other}: {shown} (spread {spread:.3f})")


__all__ = [
    "NOT_REPRODUCED",
    "NOT_RUN",
    "REPRODUCED",
    "TIE_WITHIN_SPREAD",
    "AtLeast",
    "Claim",
    "Extreme",
    "GapGrows",
    "Outcome",
    "Score",
    "order",
]
