"""RoLoRA: alternate rounds train and average one factor while the other stays frozen.

Each round is exact (one factor is common to all clients), sends half the parameters, and is
a plain weighted sum, so it works behind secure aggregation.

A classifier's heads (PEFT's ``modules_to_save``) are not this method's business: every method's
replies carry them in full and :class:`fedlora.strategies.flower.LoraStrategy` averages them
weighted by examples (FedAvg), outside the math above.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from fedlora.strategies.adapter import LoraFactors, check_clients
from fedlora.strategies.algorithms import AlgorithmDefaults, Factors, LoraAlgorithm
from fedlora.strategies.streaming import FactorSumAccumulator


def rolora_trained_factor(server_round: int) -> Literal["A", "B"]:
    """Which factor clients train in ``server_round`` (Flower counts rounds from 1).

    Odd rounds train B, even rounds A. B goes first because LoRA starts with B = 0, where the
    gradient of A (proportional to B) is zero: an A-first round would do nothing.
    """
    if server_round < 1:
        raise ValueError(f"server_round counts from 1, got {server_round}")
    return "B" if server_round % 2 == 1 else "A"


def rolora_accumulator(server_round: int) -> FactorSumAccumulator:
    """The streaming accumulator of ``server_round``: averages the trained factor only."""
    return FactorSumAccumulator(rolora_trained_factor(server_round))


def rolora_aggregate(
    modules_per_client: Sequence[Mapping[str, LoraFactors]],
    weights: Sequence[float],
    server_round: int,
) -> dict[str, LoraFactors]:
    """Average the factor trained this round; pass the frozen one through (it must match)."""
    check_clients(modules_per_client, weights)
    acc = rolora_accumulator(server_round)
    for modules, weight in zip(modules_per_client, weights, strict=True):
        acc.add(modules, weight)
    return acc.result()


class RoLora(LoraAlgorithm):
    """RoLoRA: odd rounds train and average B (A frozen), even rounds A (B frozen)."""

    name = "rolora"
    server_optimizer = False  # alternates the trained factor; momentum would move the frozen one
    defaults = AlgorithmDefaults(lr=1e-2, alpha=16.0)

    def trained_factors(self, server_round: int) -> Factors:
        return rolora_trained_factor(server_round)
