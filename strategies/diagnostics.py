"""The aggregation error ||B_bar A_bar - T||_F / ||T||_F, exactly or from a constant-size sketch.

Exact needs T = sum_k p_k B_k A_k, and no statistic smaller than T can give it from a stream:
to update ||T||^2 with a new client's product B A one needs <T_sofar, B A> for whatever rank-r
B A arrives next, which pins down T_sofar itself. So the exact value costs a dense d_out x d_in
matrix per module (:class:`~fedlora.strategies.streaming.ProductSumAccumulator`, 4 GB in fp32 for
rank 16 on q, v of a 32-layer 4096-wide model) or all replies' factors (growing with K).

:class:`ErrorSketch` is the constant-memory alternative for FedAvg-LoRA, whose sums are
otherwise tiny: both sides of every product go through a CountSketch (a sparse random sign
projection: each of the d_out rows of B and d_in columns of A lands in one of m buckets with
a random sign), Psi (d_out x m) and Omega (d_in x m), so that E||Psi^T X Omega||_F^2 =
||X||_F^2 for any X. The server keeps the m x m matrix Psi^T T Omega per module (128 KB for
m = 128 in float64), folds in (Psi^T B_k)(A_k Omega) at O((d_out + d_in) r + m^2 r) per reply
and projects B_bar A_bar the same way at the end. Trade-off: an estimate, unbiased for the
squared norms, with relative standard deviation up to about sqrt(4 / m) when the error is
rank one (m = 128: 18% on the squared norm, 9% on the norm) and far less when the error is
spread over many directions, as it is for K clients of rank r; with m >= d a side becomes a
signed permutation, and m >= max(d_out, d_in) makes the value exact. Buckets and signs are
shared by all modules of the same width.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from fedlora.strategies.adapter import LoraFactors
from fedlora.strategies.linalg import seeded_generator
from fedlora.strategies.streaming import BaseAccumulator, ProductSums


def relative_error(error_sq: float, target_sq: float) -> float:
    """sqrt(error_sq / target_sq); 0 when both vanish, inf when only the target does."""
    if target_sq > 0.0:
        return math.sqrt(error_sq / target_sq)
    return 0.0 if error_sq == 0.0 else math.inf


@dataclass(frozen=True)
class AggregationError:
    """Relative Frobenius error per module and over the whole adapter.

    ``overall`` is sqrt(sum_m ||E_m||^2 / sum_m ||T_m||^2), the error of the adapter as one
    long vector, so large modules weigh more than small ones.
    """

    per_module: dict[str, float]
    overall: float

    @classmethod
    def from_squares(
        cls,
        error_sq: Mapping[str, float],
        target_sq: Mapping[str, float],
    ) -> AggregationError:
        """Combine per-module squared norms ||E_m||^2 and ||T_m||^2."""
        per_module = {m: relative_error(error_sq[m], target_sq[m]) for m in error_sq}
        overall = relative_error(math.fsum(error_sq.values()), math.fsum(target_sq.values()))
        return cls(per_module=per_module, overall=overall)


def aggregation_error_from_sums(
    sums: Mapping[str, ProductSums], factors: Mapping[str, LoraFactors] | None = None
) -> AggregationError:
    """Exact ||B A - T|| / ||T|| per module from a product accumulator's result.

    Parameters
    ----------
    sums
        Output of :meth:`ProductSumAccumulator.result`.
    factors
        The factors the server ships, e.g. LoRA-FAIR's (A_bar, B_bar + dB); default
        (A_bar, B_bar), the FedAvg-LoRA error.
    """
    error_sq: dict[str, float] = {}
    target_sq: dict[str, float] = {}
    for name, ps in sums.items():
        if factors is None:
            b, a = ps.B_bar, ps.A_bar
        else:
            if name not in factors:
                raise ValueError(f"no factors given for module {name!r}")
            f = factors[name]
            if (f.d_out, f.d_in) != tuple(ps.T.shape):
                got, want = (f.d_out, f.d_in), tuple(ps.T.shape)
                raise ValueError(f"module {name!r}: factors make a {got} matrix, T is {want}")
            b, a = f.B.to(ps.T.dtype), f.A.to(ps.T.dtype)
        err = torch.addmm(ps.T, b, a, beta=-1.0)  # d_out x d_in: B A - T
        error_sq[name] = float(torch.linalg.vector_norm(err) ** 2)
        target_sq[name] = float(torch.linalg.vector_norm(ps.T) ** 2)
    return AggregationError.from_squares(error_sq, target_sq)


class ErrorSketch(BaseAccumulator):
    """Constant-memory estimate of the FedAvg-LoRA aggregation error (see the module notes).

    Feed it the same replies and weights as the :class:`FactorSumAccumulator`, then pass that
    accumulator's result to :meth:`estimate`.

    Parameters
    ----------
    size
        Sketch width m per side (clipped to each side's dimension, where it becomes exact).
    seed
        Seed of the buckets and signs; fixed so that the estimate is reproducible.
    """

    def __init__(
        self,
        size: int = 128,
        *,
        seed: int = 0,
        accum_dtype: torch.dtype = torch.float64,
    ) -> None:
        if size < 1:
            raise ValueError(f"sketch size must be positive, got {size}")
        super().__init__(accum_dtype=accum_dtype, same_rank=True, same_scaling=True)
        self.size = size
        self.seed = seed
        self._y: dict[str, Tensor] = {}  # module -> m_out x m_in, sum n_k (Psi^T B_k)(A_k Omega)
        self._buckets: dict[int, Tensor] = {}  # width d -> d bucket indices in [0, m)
        self._signs: dict[tuple[int, torch.dtype], Tensor] = {}  # (d, dtype) -> d signs

    def sketch_of(self, d: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Buckets and signs of the CountSketch for width d (balanced: d / m per bucket)."""
        if d not in self._buckets:
            m = min(self.size, d)
            g = seeded_generator(f"error-sketch:{self.seed}:{d}")
            self._buckets[d] = (torch.arange(d) % m)[torch.randperm(d, generator=g)]
            signs = torch.randint(0, 2, (d,), generator=g, dtype=torch.float64) * 2.0 - 1.0
            self._signs[(d, torch.float64)] = signs
        key = (d, dtype)
        if key not in self._signs:
            self._signs[key] = self._signs[(d, torch.float64)].to(dtype)
        return self._buckets[d], self._signs[key]

    def _project(self, b: Tensor, a: Tensor) -> Tensor:
        """(Psi^T B)(A Omega): m_out x m_in, in O((d_out + d_in) r + m_out m_in r)."""
        rows, row_signs = self.sketch_of(b.shape[0], b.dtype)
        cols, col_signs = self.sketch_of(a.shape[1], a.dtype)
        m_out, m_in = min(self.size, b.shape[0]), min(self.size, a.shape[1])
        psi_b = torch.zeros(m_out, b.shape[1], dtype=b.dtype)  # m_out x r
        psi_b.index_add_(0, rows, b * row_signs[:, None])
        a_omega = torch.zeros(a.shape[0], m_in, dtype=a.dtype)  # r x m_in
        a_omega.index_add_(1, cols, a * col_signs)
        return psi_b @ a_omega

    def add(self, modules: Mapping[str, LoraFactors], weight: float) -> None:
        """Fold in one reply: about the cost of adding its factors, nothing kept from it."""
        w = self._admit(modules, weight)
        first = self._commit(modules, w)
        for name, f in modules.items():
            small = self._project(f.B, f.A)  # m_out x m_in, in the reply's dtype
            if first:
                self._y[name] = torch.zeros(small.shape, dtype=self.accum_dtype)
            self._y[name].add_(small, alpha=w)

    def estimate(self, averaged: Mapping[str, LoraFactors]) -> AggregationError:
        """Estimated ||B_bar A_bar - T|| / ||T|| given the averaged factors of the same replies."""
        total = self._finalize()
        error_sq: dict[str, float] = {}
        target_sq: dict[str, float] = {}
        for name in self._specs:
            if name not in averaged:
                raise ValueError(f"no averaged factors given for module {name!r}")
            f = averaged[name]
            y = self._y[name] / total  # Psi^T T Omega
            z = self._project(f.B.to(self.accum_dtype), f.A.to(self.accum_dtype))
            error_sq[name] = float(torch.linalg.vector_norm(z - y) ** 2)
            target_sq[name] = float(torch.linalg.vector_norm(y) ** 2)
        return AggregationError.from_squares(error_sq, target_sq)
