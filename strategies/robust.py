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


def trimmed_mean(stack: Tensor, trim: float) -> Tensor:
    """Mean over dim 0 of each coordinate after dropping its floor(trim * k) smallest and largest values."""
    ordered = torch.sort(stack.to(torch.float64), dim=0).values
    k = ordered.shape[0]
    cut = math.floor(trim * k)
    return ordered[cut : k - cut].mean(dim=0)


class RobustFactorAccumulator(FactorSumAccumulator):
    """Keeps every reply's trained factors and combines them by ``rule`` at the end (same checks
    as :class:`FactorSumAccumulator`: frozen factors must repeat, shapes and dtypes agree)."""

    def __init__(self, trained: TrainedFactors, rule: RobustRule, trim: float = 0.1) -> None:
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

    def _combine(self, tensors: list[Tensor]) -> Tensor:
        stack = torch.stack(tensors)
        return coordinate_median(stack) if self.rule == "median" else trimmed_mean(stack, self.trim)

    def result(self) -> dict[str, LoraFactors]:
        averaged = super().result()
        if self.rule == "mean":
            return averaged
        out = {}
        for name, f in averaged.items():
            a = self._combine(self._a[name]).to(f.A.dtype) if name in self._a else f.A
            b = self._combine(self._b[name]).to(f.B.dtype) if name in self._b else f.B
            out[name] = LoraFactors(A=a, B=b, scaling=f.scaling)
        self._a.clear()
        self._b.clear()
        self._result = out
        return out
