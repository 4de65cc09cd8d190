"""FedAvg-LoRA (FedIT): average A and B separately, and measure how wrong that is.

Averaging factors is not averaging updates: B_bar A_bar - T = -sum_k p_k (B_k - B_bar)(A_k - A_bar)
with T = sum_k p_k B_k A_k, so the error vanishes only when one factor agrees on all clients.

A classifier's heads (PEFT's ``modules_to_save``) are not this method's business: every method's
replies carry them in full and :class:`fedlora.strategies.flower.LoraStrategy` averages them
weighted by examples (FedAvg), outside the math above.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedlora.strategies.adapter import LoraFactors, check_clients, client_proportions, join_adapter
from fedlora.strategies.algorithms import Accumulator, AlgorithmDefaults, LoraAlgorithm
from fedlora.strategies.diagnostics import AggregationError, ErrorSketch, aggregation_error_from_sums
from fedlora.strategies.streaming import FactorSumAccumulator, ProductSumAccumulator


def fedavg_lora_aggregate(
    modules_per_client: Sequence[Mapping[str, LoraFactors]], weights: Sequence[float]
) -> dict[str, LoraFactors]:
    """A_bar = sum p_k A_k and B_bar = sum p_k B_k per module, in the replies' dtype.

    One-shot form of :class:`FactorSumAccumulator` (``trained="both"``), which the server uses
    to aggregate replies as they arrive.
    """
    check_clients(modules_per_client, weights)
    acc = FactorSumAccumulator("both")
    for modules, weight in zip(modules_per_client, weights, strict=True):
        acc.add(modules, weight)
    return acc.result()


def aggregation_error(
    modules_per_client: Sequence[Mapping[str, LoraFactors]], weights: Sequence[float]
) -> AggregationError:
    """Exact ||B_bar A_bar - T||_F / ||T||_F per module and overall.

    Holds a dense d_out x d_in float64 matrix per module; a server streaming large adapters
    should use :class:`~fedlora.strategies.diagnostics.ErrorSketch` instead.
    """
    check_clients(modules_per_client, weights)
    acc = ProductSumAccumulator()
    for modules, weight in zip(modules_per_client, weights, strict=True):
        acc.add(modules, weight)
    return aggregation_error_from_sums(acc.result())


def aggregation_residual(
    modules_per_client: Sequence[Mapping[str, LoraFactors]], weights: Sequence[float]
) -> dict[str, Tensor]:
    """B_bar A_bar - T computed by the identity -sum_k p_k (B_k - B_bar)(A_k - A_bar), float64.

    The covariance form has no cancellation between two large matrices, so it stays accurate
    when the error is small relative to T; tests use it as an independent oracle.
    """
    check_clients(modules_per_client, weights)
    p = client_proportions(weights)
    out: dict[str, Tensor] = {}
    for name in modules_per_client[0]:
        a_k: list[Tensor] = []  # r x d_in each, float64
        b_k: list[Tensor] = []  # d_out x r each
        for k, modules in enumerate(modules_per_client):
            if name not in modules:
                raise ValueError(f"client {k} has no module {name!r}")
            a_k.append(modules[name].A.to(torch.float64))
            b_k.append(modules[name].B.to(torch.float64))
        a_bar = torch.zeros_like(a_k[0])
        b_bar = torch.zeros_like(b_k[0])
        for pk, a, b in zip(p, a_k, b_k, strict=True):
            a_bar.add_(a, alpha=pk)
            b_bar.add_(b, alpha=pk)
        resid = torch.zeros(b_bar.shape[0], a_bar.shape[1], dtype=torch.float64)  # d_out x d_in
        for pk, a, b in zip(p, a_k, b_k, strict=True):
            resid.addmm_(b - b_bar, a - a_bar, alpha=-pk)
        out[name] = resid
    return out


class SketchedFactorSum:
    """FedAvg-LoRA's constant-memory accumulator: running sums of A and B plus an
    :class:`~fedlora.strategies.diagnostics.ErrorSketch` of sum_k p_k B_k A_k for the error diagnostic."""

    def __init__(self, sketch_size: int = 128) -> None:
        self.sums = FactorSumAccumulator("both")
        self.sketch = ErrorSketch(sketch_size)

    def add(self, modules: Mapping[str, LoraFactors], weight: float) -> None:
        self.sums.add(modules, weight)  # validates first: a bad reply touches neither
        self.sketch.add(modules, weight)


class FedAvgLora(LoraAlgorithm):
    """FedAvg-LoRA (FedIT): clients train A and B; the server averages each separately.

    Every round logs the aggregation error ||B_bar A_bar - T|| / ||T||. By default a
    constant-size sketch estimates it (exact when a layer is at most 128 wide), so the server's
    memory stays that of two factor sums; ``exact_error`` keeps the dense sum_k p_k B_k A_k per
    module instead. Aggregation itself needs only the factor sums, so the server does not need
    each client's own product (the exact diagnostic does, which is why it is opt-in).
    """

    name = "fedavg-lora"
    defaults = AlgorithmDefaults(lr=3e-3, alpha=16.0)
    client_level_dp = True  # clients send A and B, the server only averages

    def new_accumulator(self, server_round: int) -> Accumulator:
        if self.exact_error:
            return ProductSumAccumulator()
        return SketchedFactorSum()

    def finish(
        self, server_round: int, acc: Accumulator, state: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        if isinstance(acc, ProductSumAccumulator):
            sums = acc.result()
            factors = {
                n: LoraFactors(ps.A_bar.to(ps.dtype), ps.B_bar.to(ps.dtype), ps.scaling) for n, ps in sums.items()
            }
            err = aggregation_error_from_sums(sums)
            return join_adapter(factors), {"aggregation-error": err.overall}
        if isinstance(acc, FactorSumAccumulator):  # robust aggregation: no diagnostic of a plain average
            return join_adapter(acc.result()), {}
        assert isinstance(acc, SketchedFactorSum)
        averaged = acc.sums.result()
        return join_adapter(averaged), {"aggregation-error": acc.sketch.estimate(averaged).overall}
