"""FedSVD: B-only training (FFA-style, DP friendly) plus an SVD re-factorisation every round.

The server averages B with A frozen, then resets A <- V^T[:r] and B <- U[:, :r] S[:r] from the
SVD of B_bar @ A = U S V^T. Exact (rank(B_bar A) <= r), A gets orthonormal rows, and under DP
it is post-processing of a private B_bar. The scaling s is untouched: s B' A' = s B_bar A.

A classifier's heads (PEFT's ``modules_to_save``) are not this method's business: every method's
replies carry them in full and :class:`fedlora.strategies.flower.LoraStrategy` averages them
weighted by examples (FedAvg), outside the math above.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedlora.strategies.adapter import LoraFactors, check_clients, join_adapter
from fedlora.strategies.algorithms import Accumulator, AlgorithmDefaults, Factors, LoraAlgorithm
from fedlora.strategies.linalg import refactor_orthonormal
from fedlora.strategies.streaming import FactorSumAccumulator


def fedsvd_refactor(factors: LoraFactors) -> LoraFactors:
    """The same update s B A with A re-based on orthonormal rows; computed in float64."""
    b, a = refactor_orthonormal(factors.B.to(torch.float64), factors.A.to(torch.float64))
    return LoraFactors(A=a.to(factors.A.dtype), B=b.to(factors.B.dtype), scaling=factors.scaling)


def fedsvd_from_sums(averaged: Mapping[str, LoraFactors]) -> dict[str, LoraFactors]:
    """Re-factor the result of a ``FactorSumAccumulator("B")`` module by module."""
    out: dict[str, LoraFactors] = {}
    for name, factors in averaged.items():
        try:
            out[name] = fedsvd_refactor(factors)
        except ValueError as err:
            raise ValueError(f"module {name!r}: {err}") from err
    return out


def fedsvd_aggregate(
    modules_per_client: Sequence[Mapping[str, LoraFactors]], weights: Sequence[float]
) -> dict[str, LoraFactors]:
    """Average B (A must be identical on all clients), then re-factor each module by SVD."""
    check_clients(modules_per_client, weights)
    acc = FactorSumAccumulator("B")
    for modules, weight in zip(modules_per_client, weights, strict=True):
        acc.add(modules, weight)
    return fedsvd_from_sums(acc.result())


class FedSvd(LoraAlgorithm):
    """FedSVD: B-only training; each round the server re-factors B_bar A by SVD (A orthonormal)."""

    name = "fedsvd"
    server_optimizer = False  # re-factorises the global product by SVD each round
    defaults = AlgorithmDefaults(lr=1e-2, alpha=16.0)

    def trained_factors(self, server_round: int) -> Factors:
        return "B"

    def finish(
        self, server_round: int, acc: Accumulator, state: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        assert isinstance(acc, FactorSumAccumulator)
        return join_adapter(fedsvd_from_sums(acc.result())), {}
