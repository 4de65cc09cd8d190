"""FedEx-LoRA: exact aggregation by folding the residual into the frozen base weights.

Per module R = T - B_bar A_bar (rank <= (K - 1) r) and W0 <- W0 + s R, so that
W0' + s B_bar A_bar = W0 + s T exactly. The base weight's layout decides the orientation:
``nn.Linear`` stores d_out x d_in and gets s R; GPT-2's ``Conv1D`` stores d_in x d_out (PEFT's
``fan_in_fan_out=True``) and gets s R^T. A wrong orientation on a square matrix raises no
error and silently corrupts the model, hence the explicit flag.

A classifier's heads (PEFT's ``modules_to_save``) are not this method's business: every method's
replies carry them in full and :class:`fedlora.strategies.flower.LoraStrategy` averages them
weighted by examples (FedAvg), outside the math above.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor

from fedlora.strategies.adapter import LoraFactors, check_clients, join_adapter
from fedlora.strategies.algorithms import (
    BASE_DELTA_SUFFIX,
    Accumulator,
    AlgorithmDefaults,
    LoraAlgorithm,
)
from fedlora.strategies.diagnostics import aggregation_error_from_sums
from fedlora.strategies.streaming import ProductSumAccumulator, ProductSums


@dataclass(frozen=True, eq=False)
class FedExResult:
    """What the server ships: the averaged factors and, per module, the base-weight delta.

    ``base_deltas[m]`` is s R laid out like the base weight (d_out x d_in for ``nn.Linear``,
    d_in x d_out for ``Conv1D``), in the replies' dtype; add it to the weight.
    """

    factors: dict[str, LoraFactors]
    base_deltas: dict[str, Tensor]


def fedex_lora_from_sums(
    sums: Mapping[str, ProductSums], fan_in_fan_out: bool | Mapping[str, bool] = False
) -> FedExResult:
    """Residuals of a :class:`ProductSumAccumulator` result, folded into base-weight deltas.

    The residual is taken against the factors as shipped (already cast to the replies'
    dtype), so W0' + s B_bar A_bar = W0 + s T holds for what clients actually hold, up to the
    rounding of the delta itself.

    Parameters
    ----------
    fan_in_fan_out
        One flag for all modules or module name -> flag; True for ``Conv1D`` layouts.
    """
    factors: dict[str, LoraFactors] = {}
    deltas: dict[str, Tensor] = {}
    for name, ps in sums.items():
        if isinstance(fan_in_fan_out, Mapping):
            if name not in fan_in_fan_out:
                raise ValueError(f"no fan_in_fan_out flag given for module {name!r}")
            transposed = bool(fan_in_fan_out[name])
        else:
            transposed = bool(fan_in_fan_out)
        a, b = ps.A_bar.to(ps.dtype), ps.B_bar.to(ps.dtype)
        resid = ps.T.addmm(b.to(ps.T.dtype), a.to(ps.T.dtype), beta=1.0, alpha=-1.0)  # d_out x d_in
        delta = resid.mul_(ps.scaling)  # s R, in place: one dense temporary per module
        if transposed:
            delta = delta.T  # d_in x d_out, Conv1D layout
        factors[name] = LoraFactors(A=a, B=b, scaling=ps.scaling)
        deltas[name] = delta.to(ps.dtype).contiguous()
    return FedExResult(factors=factors, base_deltas=deltas)


def fedex_lora_aggregate(
    modules_per_client: Sequence[Mapping[str, LoraFactors]],
    weights: Sequence[float],
    fan_in_fan_out: bool | Mapping[str, bool] = False,
) -> FedExResult:
    """One-shot FedEx-LoRA over a :class:`ProductSumAccumulator`."""
    check_clients(modules_per_client, weights)
    acc = ProductSumAccumulator()
    for modules, weight in zip(modules_per_client, weights, strict=True):
        acc.add(modules, weight)
    return fedex_lora_from_sums(acc.result(), fan_in_fan_out)


def apply_base_delta(base_weight: Tensor, base_delta: Tensor, module: str = "") -> Tensor:
    """W0 + delta, in the base weight's dtype; refuses a delta laid out for the other layer type."""
    if tuple(base_weight.shape) != tuple(base_delta.shape):
        raise ValueError(
            f"module {module!r}: base weight is {tuple(base_weight.shape)} but its delta is "
            f"{tuple(base_delta.shape)}; check fan_in_fan_out"
        )
    return base_weight + base_delta.to(base_weight.dtype)


class FedExLora(LoraAlgorithm):
    """FedEx-LoRA: exact; the residual T - B_bar A_bar is folded into the frozen base weights.

    The state carries the accumulated base-weight delta of every module, which clients add
    to their pristine base weights; ``fan_in_fan_out`` is True for GPT-2 style ``Conv1D``.
    """

    name = "fedex-lora"
    server_optimizer = False  # its base residual makes each round exact; a server step would break that
    defaults = AlgorithmDefaults(lr=3e-3, alpha=16.0)
    product_based = True

    def new_accumulator(self, server_round: int) -> Accumulator:
        return ProductSumAccumulator()

    def finish(
        self, server_round: int, acc: Accumulator, state: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        assert isinstance(acc, ProductSumAccumulator)
        sums = acc.result()
        res = fedex_lora_from_sums(sums, self.fan_in_fan_out)
        new = join_adapter(res.factors)
        residual_sq = 0.0
        for module, delta in res.base_deltas.items():
            key = module + BASE_DELTA_SUFFIX
            previous = state.get(key)
            new[key] = delta if previous is None else previous + delta
            residual_sq += float(delta.double().pow(2).sum())
        return new, {
            "aggregation-error-fedavg": aggregation_error_from_sums(sums).overall,
            "base-delta-norm": math.sqrt(residual_sq),
        }
