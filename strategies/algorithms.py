"""Each aggregation method as one small server-side object, independent of Flower.

An algorithm says, per round, which LoRA factors clients train and what they download, folds
replies into a streaming accumulator, and turns the accumulator into the next global state.
The Flower strategies in :mod:`fedlora.strategies.flower` own the round loop and call these; an
in-process harness can call them the same way.

The global state is a flat mapping of PEFT adapter keys (``<module>.lora_A.weight``,
``<module>.lora_B.weight``) plus, for FedEx-LoRA, ``<module>.base_delta`` (the accumulated
residual s R laid out like the base weight).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from fedlora.strategies.adapter import LORA_A_SUFFIX, LORA_B_SUFFIX, LoraFactors, join_adapter, split_adapter
from fedlora.strategies.diagnostics import ErrorSketch, aggregation_error_from_sums
from fedlora.strategies.fedex_lora import fedex_lora_from_sums
from fedlora.strategies.fedsvd import fedsvd_from_sums
from fedlora.strategies.ffa_lora import init_lora_A
from fedlora.strategies.flexlora import flexlora_from_sums
from fedlora.strategies.lora_fair import LoraFairConfig, lora_fair_from_sums
from fedlora.strategies.rolora import rolora_trained_factor
from fedlora.strategies.streaming import (
    DeltaSumAccumulator,
    FactorSumAccumulator,
    ProductSumAccumulator,
)

Factors = Literal["both", "A", "B"]


class SketchedFactorSum:
    """FedAvg-LoRA's constant-memory accumulator: running sums of A and B plus an
    :class:`~fedlora.strategies.diagnostics.ErrorSketch` of sum_k p_k B_k A_k for the error diagnostic."""

    def __init__(self, sketch_size: int = 128) -> None:
        self.sums = FactorSumAccumulator("both")
        self.sketch = ErrorSketch(sketch_size)

    def add(self, modules: Mapping[str, LoraFactors], weight: float) -> None:
        self.sums.add(modules, weight)  # validates first: a bad reply touches neither
        self.sketch.add(modules, weight)


Accumulator = FactorSumAccumulator | ProductSumAccumulator | DeltaSumAccumulator | SketchedFactorSum
BASE_DELTA_SUFFIX = ".base_delta"


@dataclass(frozen=True)
class AlgorithmDefaults:
    """Per-method hyperparameters, chosen by the sweep in ``bench/lr_sweep.py``
    (``bench/results/lr_sweep.md``: 4 non-IID clients, 6 rounds x 10 AdamW steps, 2 seeds).

    Frozen-factor methods (FFA-LoRA, FedSVD, RoLoRA) train one factor, so they need a larger
    learning rate than plain LoRA: best at 1e-2, while at LoRA's 3e-3 they lose 0.2-0.25
    exact match. FedEx-LoRA and FlexLoRA are best at 3e-3; FedAvg-LoRA and LoRA-FAIR tie
    between 3e-3 and 1e-2 within the seed spread and keep LoRA's 3e-3.
    """

    lr: float
    alpha: float


@dataclass(frozen=True)
class Reply:
    """One accepted client reply: its trained tensors, weight (examples) and LoRA scaling."""

    tensors: Mapping[str, Tensor]
    num_examples: float
    scaling: float


def factor_keys(state: Mapping[str, Tensor], factors: Factors) -> list[str]:
    """The keys of ``state`` holding the given LoRA factors, in state order."""
    suffixes = {"both": (LORA_A_SUFFIX, LORA_B_SUFFIX), "A": (LORA_A_SUFFIX,), "B": (LORA_B_SUFFIX,)}[factors]
    return [k for k in state if k.endswith(suffixes)]


def adapter_part(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The LoRA factors of a global state, without extra entries such as base deltas."""
    return {k: v for k, v in state.items() if k.endswith((LORA_A_SUFFIX, LORA_B_SUFFIX))}


def base_deltas(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """FedEx-LoRA's base-weight residuals of a global state, by module name."""
    return {k[: -len(BASE_DELTA_SUFFIX)]: v for k, v in state.items() if k.endswith(BASE_DELTA_SUFFIX)}


def update_norm(old: Mapping[str, Tensor], new: Mapping[str, Tensor]) -> float:
    """Frobenius norm of the change of the global state (all tensors together)."""
    total = 0.0
    for k, v in new.items():
        prev = old.get(k)
        diff = v.double() - prev.double() if prev is not None and prev.shape == v.shape else v.double()
        total += float(diff.pow(2).sum())
    return math.sqrt(total)


class LoraAlgorithm:
    """FedAvg-LoRA (FedIT): clients train A and B; the server averages each separately.

    The base class is FedAvg-LoRA; other methods override what differs. ``scaling`` is the
    LoRA scaling s shared by all clients; ``seed`` the run seed (FFA-LoRA's shared A).
    ``exact_error`` keeps the dense sum_k p_k B_k A_k per module for the exact aggregation
    error; by default a constant-size sketch estimates it (exact when a layer is at most
    128 wide), so the server's memory stays that of two factor sums.
    """

    name: ClassVar[str] = "fedavg-lora"
    defaults: ClassVar[AlgorithmDefaults] = AlgorithmDefaults(lr=3e-3, alpha=16.0)
    #: whether it needs each client's own product B_k A_k (no secure aggregation then)
    product_based: ClassVar[bool] = True

    def __init__(self, scaling: float, seed: int = 0, exact_error: bool = False) -> None:
        if not math.isfinite(scaling) or scaling <= 0:
            raise ValueError(f"scaling must be finite and > 0, got {scaling}")
        self.scaling = scaling
        self.seed = seed
        self.exact_error = exact_error

    # -- what clients get -------------------------------------------------------------
    def initial_state(self, adapter: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The round-0 global state from a freshly initialised adapter (B = 0)."""
        return {k: v.clone() for k, v in adapter.items()}

    def trained_factors(self, server_round: int) -> Factors:
        return "both"

    def download(self, server_round: int, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """What every sampled client receives this round."""
        return dict(state)

    def expected_reply_keys(self, server_round: int, state: Mapping[str, Tensor]) -> list[str]:
        return factor_keys(state, self.trained_factors(server_round))

    # -- aggregation --------------------------------------------------------------------
    def new_accumulator(self, server_round: int) -> Accumulator:
        if self.exact_error:
            return ProductSumAccumulator()
        return SketchedFactorSum()

    def reply_modules(self, state: Mapping[str, Tensor], reply: Reply) -> dict[str, LoraFactors]:
        """Per-module factors of a reply; factors the client did not train come from ``state``."""
        flat = dict(adapter_part(state))
        flat.update(reply.tensors)
        return split_adapter(flat, reply.scaling)

    def finish(
        self, server_round: int, acc: Accumulator, state: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        """The next global state and this round's diagnostics."""
        if isinstance(acc, ProductSumAccumulator):
            sums = acc.result()
            factors = {
                n: LoraFactors(ps.A_bar.to(ps.dtype), ps.B_bar.to(ps.dtype), ps.scaling) for n, ps in sums.items()
            }
            err = aggregation_error_from_sums(sums)
            return join_adapter(factors), {"aggregation-error": err.overall}
        if isinstance(acc, SketchedFactorSum):
            averaged = acc.sums.result()
            return join_adapter(averaged), {"aggregation-error": acc.sketch.estimate(averaged).overall}
        assert isinstance(acc, FactorSumAccumulator)  # exact methods: nothing to diagnose
        return join_adapter(acc.result()), {}


class FfaLora(LoraAlgorithm):
    """FFA-LoRA: A drawn once from the shared seed and never trained; only B travels up."""

    name = "ffa-lora"
    defaults = AlgorithmDefaults(lr=1e-2, alpha=16.0)
    product_based = False

    def initial_state(self, adapter: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return shared_a_state(adapter, self.seed)

    def trained_factors(self, server_round: int) -> Factors:
        return "B"

    def download(self, server_round: int, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """B only: clients rebuild A from the run seed (:func:`shared_a_state`)."""
        return {k: state[k] for k in factor_keys(state, "B")}

    def new_accumulator(self, server_round: int) -> Accumulator:
        return FactorSumAccumulator("B")


def shared_a_state(adapter: Mapping[str, Tensor], seed: int) -> dict[str, Tensor]:
    """``adapter`` with every lora_A replaced by FFA-LoRA's seeded A; B left as it is."""
    out: dict[str, Tensor] = {}
    for k, v in adapter.items():
        if k.endswith(LORA_A_SUFFIX):
            module = k[: -len(LORA_A_SUFFIX)]
            out[k] = init_lora_A((int(v.shape[0]), int(v.shape[1])), seed, module, dtype=v.dtype)
        else:
            out[k] = v.clone()
    return out


class _ProductMethod(LoraAlgorithm):
    """Methods that need sum_k p_k B_k A_k itself, not just the factor sums."""

    def new_accumulator(self, server_round: int) -> Accumulator:
        return ProductSumAccumulator()


class LoraFair(_ProductMethod):
    """LoRA-FAIR: FedAvg-LoRA plus the server's correction of B; clients restart from it."""

    name = "lora-fair"
    defaults = AlgorithmDefaults(lr=3e-3, alpha=16.0)

    def __init__(
        self, scaling: float, seed: int = 0, exact_error: bool = False, fair: LoraFairConfig | None = None
    ) -> None:
        super().__init__(scaling, seed, exact_error)
        self.fair = fair if fair is not None else LoraFairConfig()

    def finish(
        self, server_round: int, acc: Accumulator, state: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        assert isinstance(acc, ProductSumAccumulator)
        sums = acc.result()
        corrected = lora_fair_from_sums(sums, self.fair)
        return join_adapter(corrected), {
            "aggregation-error": aggregation_error_from_sums(sums, corrected).overall,
            "aggregation-error-fedavg": aggregation_error_from_sums(sums).overall,
        }


class FedExLora(_ProductMethod):
    """FedEx-LoRA: exact; the residual T - B_bar A_bar is folded into the frozen base weights.

    The state carries the accumulated base-weight delta of every module, which clients add
    to their pristine base weights; ``fan_in_fan_out`` is True for GPT-2 style ``Conv1D``.
    """

    name = "fedex-lora"
    defaults = AlgorithmDefaults(lr=3e-3, alpha=16.0)

    def __init__(self, scaling: float, seed: int = 0, exact_error: bool = False, fan_in_fan_out: bool = False) -> None:
        super().__init__(scaling, seed, exact_error)
        self.fan_in_fan_out = fan_in_fan_out

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


class RoLora(LoraAlgorithm):
    """RoLoRA: odd rounds train and average B (A frozen), even rounds A (B frozen)."""

    name = "rolora"
    defaults = AlgorithmDefaults(lr=1e-2, alpha=16.0)
    product_based = False

    def trained_factors(self, server_round: int) -> Factors:
        return rolora_trained_factor(server_round)

    def new_accumulator(self, server_round: int) -> Accumulator:
        return FactorSumAccumulator(self.trained_factors(server_round))


class FedSvd(LoraAlgorithm):
    """FedSVD: B-only training; each round the server re-factors B_bar A by SVD (A orthonormal)."""

    name = "fedsvd"
    defaults = AlgorithmDefaults(lr=1e-2, alpha=16.0)
    product_based = False

    def trained_factors(self, server_round: int) -> Factors:
        return "B"

    def new_accumulator(self, server_round: int) -> Accumulator:
        return FactorSumAccumulator("B")

    def finish(
        self, server_round: int, acc: Accumulator, state: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        assert isinstance(acc, FactorSumAccumulator)
        return join_adapter(fedsvd_from_sums(acc.result())), {}


class FlexLora(LoraAlgorithm):
    """FlexLoRA: clients of different ranks; the server averages s_k B_k A_k and ships its SVD.

    The state holds the SVD at ``max_rank`` as factors with scaling 1 (B = U S, A = Vh, in
    decreasing singular-value order); a client of rank r takes the first r components and
    divides B by its own scaling (:func:`truncate_for_client`).
    """

    name = "flexlora"
    defaults = AlgorithmDefaults(lr=3e-3, alpha=16.0)

    def __init__(self, scaling: float, seed: int = 0, exact_error: bool = False, max_rank: int = 8) -> None:
        super().__init__(scaling, seed, exact_error)
        if max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {max_rank}")
        self.max_rank = max_rank

    def initial_state(self, adapter: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The initial adapter (any rank <= max_rank), stored at scaling 1: B absorbs s."""
        out: dict[str, Tensor] = {}
        for k, v in adapter.items():
            out[k] = v * self.scaling if k.endswith(LORA_B_SUFFIX) else v.clone()
        return out

    def expected_reply_keys(self, server_round: int, state: Mapping[str, Tensor]) -> list[str]:
        return factor_keys(state, "both")

    def reply_modules(self, state: Mapping[str, Tensor], reply: Reply) -> dict[str, LoraFactors]:
        return split_adapter(reply.tensors, reply.scaling)

    def new_accumulator(self, server_round: int) -> Accumulator:
        return DeltaSumAccumulator()

    def finish(
        self, server_round: int, acc: Accumulator, state: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        assert isinstance(acc, DeltaSumAccumulator)
        sums = acc.result()
        deltas = flexlora_from_sums(sums, self.max_rank)
        factors = {name: lrd.factors(min(self.max_rank, int(lrd.S.shape[0])), 1.0) for name, lrd in deltas.items()}
        err_sq = sum(lrd.truncation_error(self.max_rank) ** 2 for lrd in deltas.values())
        total_sq = sum(float(lrd.S.double().pow(2).sum()) for lrd in deltas.values())
        return join_adapter(factors), {"truncation-error": math.sqrt(err_sq / total_sq) if total_sq > 0 else 0.0}


def truncate_for_client(state: Mapping[str, Tensor], rank: int, scaling: float) -> dict[str, Tensor]:
    """A FlexLoRA client's adapter: the first ``rank`` SVD components, B divided by its scaling.

    Padded with zeros when the global state has fewer components than ``rank`` (round 0 at a
    smaller initial rank), which leaves s B A unchanged.
    """
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        if k.endswith(LORA_A_SUFFIX):
            a = v[:rank]
            if a.shape[0] < rank:
                a = torch.cat([a, torch.zeros(rank - a.shape[0], a.shape[1], dtype=a.dtype)])
            out[k] = a.contiguous()
        elif k.endswith(LORA_B_SUFFIX):
            b = v[:, :rank] / scaling
            if b.shape[1] < rank:
                b = torch.cat([b, torch.zeros(b.shape[0], rank - b.shape[1], dtype=b.dtype)], dim=1)
            out[k] = b.contiguous()
    return out


ALGORITHMS: dict[str, type[LoraAlgorithm]] = {
    cls.name: cls for cls in (LoraAlgorithm, FfaLora, LoraFair, FedExLora, RoLora, FedSvd, FlexLora)
}
