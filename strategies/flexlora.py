"""FlexLoRA: clients of different ranks; average the updates, hand back truncated SVDs.

Factors of different ranks cannot be averaged, so the server averages the updates
Delta = sum_k p_k s_k B_k A_k and gives client k the best rank-r_k approximation of Delta
(Eckart-Young), as factors with that client's own scaling s_k: s_k B A = U_r S_r V_r^T, with
A = V_r^T (orthonormal rows, as FedSVD) and B = U_r S_r / s_k. The truncation error squared
equals the sum of the dropped squared singular values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedlora.strategies.adapter import LoraFactors, check_clients
from fedlora.strategies.linalg import thin_svd
from fedlora.strategies.streaming import DeltaSum, DeltaSumAccumulator


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
