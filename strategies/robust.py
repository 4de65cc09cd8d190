"""Robust aggregation in factor space: coordinate-wise median or trimmed mean of the clients'
LoRA factors, as Flower's ``FedMedian`` and ``FedTrimmedAvg`` do for whole models.

A weighted mean lets one client move every coordinate as far as it likes; the median (or a
mean with the ``trim`` largest and smallest values of each coordinate dropped) follows the
majority. Like Flower's, both are unweighted: a client's claimed example count cannot buy it
more say. They hold while fewer than half (median) or fewer than ``trim`` of the clients
(trimmed mean) are hostile, and they average factors, so they apply only to methods whose
server averages factors (FedAvg-LoRA, FFA-LoRA, RoLoRA, FedSVD); methods that combine each
client's product B_k A_k (LoRA-FAIR, FedEx-LoRA, FlexLoRA) refuse them. The cost: the server
keeps every reply's trained factors for the round (memory grows with the number of clients,
where the mean keeps one running sum).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal, get_args

import torch
from torch import Tensor

from fedlora.strategies.adapter import LoraFactors
from fedlora.strategies.streaming import FactorSumAccumulator, TrainedFactors

RobustRule = Literal["mean", "median", "trimmed-mean"]
RULES: tuple[str, ...] = get_args(RobustRule)


def check_rule(rule: str, trim: float) -> None:
    """ValueError naming the problem for an unknown rule or a trim outside [0, 0.5)."""
    if rule not in RULES:
        raise ValueError(f"robust.aggregate must be one of {list(RULES)}, got {rule!r}")
    if not isinstance(trim, (int, float)) or isinstance(trim, bool) or not 0 <= trim < 0.5:
        raise ValueError(f"robust.trim must be a fraction in [0, 0.5), got {trim!r}")


def coordinate_median(stack: Tensor) -> Tensor:
    """Median over dim 0 of each coordinate (the mean of the two middle values for an even count)."""
    ordered = torch.sort(stack.to(torch.float64), dim=0).values
    k = ordered.shape[0]
    return ordered[k // 2] if k % 2 else (ordered[k // 2 - 1] + ordered[k // 2]) / 2


def trimmed_count(trim: float, k: int) -> int:
    """How many values of each coordinate are dropped at each end: floor(trim * k), as Flower's
    ``FedTrimmedAvg`` and SciPy's ``trim_mean`` do, but at least one once there are 3 or more
    values and ``trim`` > 0 (else a trimmed mean of fewer than 1 / trim clients drops nothing)."""
    cut = math.floor(trim * k)
    return max(cut, 1) if trim > 0 and k >= 3 else cut


def trimmed_mean(stack: Tensor, trim: float) -> Tensor:
    """Mean over dim 0 of each coordinate after dropping its :func:`trimmed_count` smallest and largest values."""
    ordered = torch.sort(stack.to(torch.float64), dim=0).values
    k = ordered.shape[0]
    cut = trimmed_count(trim, k)
    return ordered[cut : k - cut].mean(dim=0)


def combine(tensors: list[Tensor], rule: str, trim: float) -> Tensor:
    """The coordinate-wise ``rule`` ("median" or "trimmed-mean") of equally shaped tensors."""
    stack = torch.stack(tensors)
    return coordinate_median(stack) if rule == "median" else trimmed_mean(stack, trim)


class RobustFactorAccumulator(FactorSumAccumulator):
    """Keeps every reply's trained factors and combines them by ``rule`` at the end (same checks
    as :class:`FactorSumAccumulator`: frozen factors must repeat, shapes and dtypes agree)."""

    def __init__(self, trained: TrainedFactors, rule: str, trim: float = 0.1) -> None:
        check_rule(rule, trim)
        super().__init__(trained)
        self.rule = rule
        self.trim = trim
        self._a: dict[str, list[Tensor]] = {}
        self._b: dict[str, list[Tensor]] = {}

    def add(self, modules: Mapping[str, LoraFactors], weight: float) -> None:
        super().add(modules, weight)  # validates; the weighted sums serve rule "mean"
        for name, f in modules.items():
            if self.trained in ("both", "A"):
                self._a.setdefault(name, []).append(f.A.detach().clone())
            if self.trained in ("both", "B"):
                self._b.setdefault(name, []).append(f.B.detach().clone())

    def result(self) -> dict[str, LoraFactors]:
        averaged = super().result()
        if self.rule == "mean":
            return averaged
        out = {}
        for name, f in averaged.items():
            a = combine(self._a[name], self.rule, self.trim).to(f.A.dtype) if name in self._a else f.A
            b = combine(self._b[name], self.rule, self.trim).to(f.B.dtype) if name in self._b else f.B
            out[name] = LoraFactors(A=a, B=b, scaling=f.scaling)
        self._a.clear()
        self._b.clear()
        self._result = out
        return out


class RobustHeadAccumulator:
    """The heads a classifier trains in full, combined by the same rule as the factors (the
    example-weighted mean would let one client's claimed weight set them)."""

    def __init__(self, rule: str, trim: float = 0.1) -> None:
        check_rule(rule, trim)
        self.rule, self.trim = rule, trim
        self._heads: dict[str, list[Tensor]] = {}

    def add(self, heads: Mapping[str, Tensor], weight: float) -> None:
        """Keep one reply's heads (its weight does not count: the rule is unweighted)."""
        if self._heads and set(heads) != set(self._heads):
            raise ValueError(f"reply heads {sorted(heads)} differ from earlier replies' {sorted(self._heads)}")
        for name, t in heads.items():
            self._heads.setdefault(name, []).append(t.detach().clone())

    def result(self) -> dict[str, Tensor]:
        return {k: combine(v, self.rule, self.trim).to(v[0].dtype) for k, v in self._heads.items()}
