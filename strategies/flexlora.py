"""FlexLoRA: clients of different ranks; average the updates, hand back truncated SVDs.

Factors of different ranks cannot be averaged, so the server averages the updates
Delta = sum_k p_k s_k B_k A_k and gives client k the best rank-r_k approximation of Delta
(Eckart-Young), as factors with that client's own scaling s_k: s_k B A = U_r S_r V_r^T, with
A = V_r^T (orthonormal rows, as FedSVD) and B = U_r S_r / s_k. The truncation error squared
equals the sum of the dropped squared singular values.

A classifier's heads (PEFT's ``modules_to_save``) are not this method's business: every method's
replies carry them in full and :class:`fedlora.strategies.flower.LoraStrategy` averages them
weighted by examples (FedAvg), outside the math above.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from fedlora.strategies.adapter import (
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    LoraFactors,
    check_clients,
    join_adapter,
    split_adapter,
)
from fedlora.strategies.algorithms import (
    Accumulator,
    AlgorithmDefaults,
    LoraAlgorithm,
    MethodSettings,
    Reply,
    factor_keys,
    factor_part,
)
from fedlora.strategies.linalg import thin_svd
from fedlora.strategies.streaming import DeltaSum, DeltaSumAccumulator
from fedlora.strategies.validation import TensorSpec


@dataclass(frozen=True, eq=False)
class LowRankDelta:
    """SVD of one module's averaged update: Delta = U diag(S) Vh, in the accumulation dtype.

    q = len(S) is at least the rank of Delta, so every nonzero singular value is present.
    """

    U: Tensor  # d_out x q
    S: Tensor  # q, decreasing
    Vh: Tensor  # q x d_in
    dtype: torch.dtype

    def factors(self, rank: int, scaling: float) -> LoraFactors:
        """Rank-``rank`` factors for a client with scaling s: s B A = U_r S_r Vh_r."""
        if not 1 <= rank <= self.S.shape[0]:
            raise ValueError(f"rank must be in 1..{self.S.shape[0]}, got {rank}")
        if not math.isfinite(scaling) or scaling == 0.0:
            raise ValueError(f"scaling must be finite and nonzero, got {scaling}")
        b = self.U[:, :rank] * (self.S[:rank] / scaling)  # d_out x rank
        return LoraFactors(A=self.Vh[:rank].to(self.dtype), B=b.to(self.dtype), scaling=scaling)

    def truncation_error(self, rank: int) -> float:
        """||Delta - U_r S_r Vh_r||_F = sqrt(sum of the dropped S_i^2)."""
        return float(torch.linalg.vector_norm(self.S[rank:]))


def flexlora_from_sums(
    sums: Mapping[str, DeltaSum],
    max_rank: int | None = None,
) -> dict[str, LowRankDelta]:
    """SVD of each averaged update, cheap when the summed ranks are small against d.

    Parameters
    ----------
    max_rank
        Largest rank any client of the federation may ask for, including clients that did
        not reply this round; default the largest rank among the replies. Components beyond
        rank(Delta) have zero singular values but still orthonormal directions, so such a
        client gets a full-rank A.
    """
    out: dict[str, LowRankDelta] = {}
    for name, ds in sums.items():
        want = max(ds.rank_bound, ds.max_rank, max_rank or 0)
        u, s, vh = thin_svd(ds.delta, min(want, *ds.delta.shape))
        out[name] = LowRankDelta(U=u, S=s, Vh=vh, dtype=ds.dtype)
    return out


def flexlora_aggregate(
    modules_per_client: Sequence[Mapping[str, LoraFactors]],
    weights: Sequence[float],
    max_rank: int | None = None,
) -> dict[str, LowRankDelta]:
    """One-shot FlexLoRA over a :class:`DeltaSumAccumulator`: per module, the SVD of Delta."""
    check_clients(modules_per_client, weights)
    acc = DeltaSumAccumulator()
    for modules, weight in zip(modules_per_client, weights, strict=True):
        acc.add(modules, weight)
    return flexlora_from_sums(acc.result(), max_rank)


def flexlora_client_factors(
    global_deltas: Mapping[str, LowRankDelta],
    rank: int | Mapping[str, int],
    scaling: float | Mapping[str, float],
) -> dict[str, LoraFactors]:
    """One client's adapter: each module truncated to that client's rank, with its scaling."""
    out: dict[str, LoraFactors] = {}
    for name, lrd in global_deltas.items():
        if isinstance(rank, Mapping) and name not in rank:
            raise ValueError(f"no rank given for module {name!r}")
        if isinstance(scaling, Mapping) and name not in scaling:
            raise ValueError(f"no scaling given for module {name!r}")
        r = rank[name] if isinstance(rank, Mapping) else rank
        s = scaling[name] if isinstance(scaling, Mapping) else scaling
        try:
            out[name] = lrd.factors(int(r), float(s))
        except ValueError as err:
            raise ValueError(f"module {name!r}: {err}") from err
    return out


@dataclass(frozen=True)
class FlexLoraSettings(MethodSettings):
    """FlexLoRA's run-config section: ``flexlora-ranks``, the clients' LoRA ranks.

    Comma-separated ranks that client p cycles through (``ranks[p % len(ranks)]``); empty: every
    client trains at ``lora-rank``. The server keeps the global SVD at the largest rank.
    """

    prefix: ClassVar[str] = "flexlora-"

    ranks: str = ""

    def __post_init__(self) -> None:
        if any(r < 1 for r in self.rank_list):
            raise ValueError(f"flexlora-ranks must be positive integers, got {self.ranks!r}")

    @property
    def rank_list(self) -> list[int]:
        try:
            return [int(r) for r in self.ranks.split(",") if r.strip()]
        except ValueError:
            raise ValueError(f"flexlora-ranks must be comma-separated integers, got {self.ranks!r}") from None

    def client_rank(self, partition: int, lora_rank: int) -> int:
        ranks = self.rank_list
        return ranks[partition % len(ranks)] if ranks else lora_rank

    def state_rank(self, lora_rank: int) -> int:
        return max([lora_rank, *self.rank_list])


class FlexLora(LoraAlgorithm):
    """FlexLoRA: clients of different ranks; the server averages s_k B_k A_k and ships its SVD.

    The state holds the SVD at ``max_rank`` (the largest rank of ``lora_rank`` and the settings'
    ranks) as factors with scaling 1 (B = U S, A = Vh, in decreasing singular-value order); a
    client of rank r takes the first r components and divides B by its own scaling
    (:func:`truncate_for_client`). Replies carry their own rank and scaling.
    """

    name = "flexlora"
    server_optimizer = False  # re-factorises the global product by SVD each round
    defaults = AlgorithmDefaults(lr=3e-3, alpha=16.0)
    settings_cls = FlexLoraSettings
    product_based = True  # s_k B_k A_k of each client, ranks differing

    @property
    def max_rank(self) -> int:
        """The rank of the global state: the largest any client of the run trains at."""
        return self.settings.state_rank(self.lora_rank)

    def initial_state(self, adapter: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The initial adapter (any rank <= max_rank), stored at scaling 1: B absorbs s."""
        out: dict[str, Tensor] = {}
        for k, v in adapter.items():
            out[k] = v * self.scaling if k.endswith(LORA_B_SUFFIX) else v.clone()
        return out

    @classmethod
    def client_adapter(
        cls, download: Mapping[str, Tensor], *, local_a: Mapping[str, Tensor], seed: int, rank: int, scaling: float
    ) -> dict[str, Tensor]:
        """The global SVD truncated to the client's rank, at the client's scaling."""
        return truncate_for_client(download, rank, scaling)

    @classmethod
    def global_alpha(cls, rank: int, alpha: float) -> float:
        """The state is kept at scaling 1 (B absorbs s), so its PEFT files say alpha = r."""
        return float(rank)

    def reply_spec(self, server_round: int, state: Mapping[str, Tensor]) -> dict[str, TensorSpec]:
        """Both factors, of any rank: A is r x d_in and B d_out x r for the client's own r."""
        specs = {}
        for k in factor_keys(state, "both"):
            d_out_or_r, r_or_d_in = tuple(state[k].shape)
            shape = (-1, r_or_d_in) if k.endswith(LORA_A_SUFFIX) else (d_out_or_r, -1)
            specs[k] = TensorSpec(shape, state[k].dtype)
        return specs

    def reply_scaling(self, tensors: Mapping[str, Tensor], metrics: Mapping[str, Any]) -> float:
        """The scaling of the reply's rank, computed here from the run's alpha (a client's own
        ``lora-scaling`` metric is ignored: a false one would multiply its weight in the average);
        the rank is one value in 1..max_rank."""
        ranks = {t.shape[0] for k, t in tensors.items() if k.endswith(LORA_A_SUFFIX)}
        ranks |= {t.shape[1] for k, t in tensors.items() if k.endswith(LORA_B_SUFFIX)}
        if len(ranks) != 1 or not 1 <= next(iter(ranks)) <= self.max_rank:
            raise ValueError(f"ranks {sorted(ranks)} must be one value in 1..{self.max_rank}")
        return self.scaling_at(next(iter(ranks)))

    def state_modules(self, state: Mapping[str, Tensor]) -> dict[str, LoraFactors]:
        """The state is kept at scaling 1 (B = U S, A = Vh)."""
        return split_adapter(factor_part(state), 1.0)

    def reply_modules(self, state: Mapping[str, Tensor], reply: Reply) -> dict[str, LoraFactors]:
        """The reply alone: a client's factors are of its own rank, never mixed with the state's."""
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
