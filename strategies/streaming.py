"""Streaming accumulators: the server folds each reply in as it arrives and drops it.

Memory is independent of the number of replies. Two families:

- sum-based (FedAvg-LoRA, FFA-LoRA, RoLoRA, FedSVD): :class:`FactorSumAccumulator` keeps
  running weighted sums of the trained factors, r x (d_in + d_out) per module, and one copy of
  a frozen factor, which every reply must match bit for bit;
- product-based (LoRA-FAIR, FedEx-LoRA, the exact aggregation error):
  :class:`ProductSumAccumulator` also keeps sum_k n_k B_k A_k, a dense d_out x d_in matrix per
  module; FlexLoRA's mixed ranks use :class:`DeltaSumAccumulator`, which keeps only
  sum_k n_k s_k B_k A_k.

Sums are over n_k (examples) and divided by sum n_k once, in :meth:`result`, so nothing needs
to know the number of replies in advance. Accumulation is in ``accum_dtype`` (float64 by
default: exact for small-integer oracles, and 1000 fp32 replies lose nothing visible); results
come back in the replies' dtype, except the product sums, which stay in ``accum_dtype`` for
the solver that consumes them. A dense float64 sum of a 4096 x 4096 module is 128 MB; pass
``accum_dtype=torch.float32`` to halve it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fedlora.strategies.adapter import LoraFactors, check_weight

TrainedFactors = Literal["both", "A", "B"]


@dataclass(frozen=True)
class _ModuleSpec:
    """What every reply must agree on for one module, fixed by the first reply."""

    d_out: int
    d_in: int
    rank: int
    dtype: torch.dtype
    scaling: float


class BaseAccumulator:
    """Reply bookkeeping shared by the accumulators: weights, module sets, shapes, dtypes.

    ``same_rank`` and ``same_scaling`` are relaxed for mixed-rank aggregation, where only the
    adapted layer's shape (d_out x d_in) must agree.
    """

    def __init__(self, *, accum_dtype: torch.dtype, same_rank: bool, same_scaling: bool) -> None:
        if not accum_dtype.is_floating_point:
            raise ValueError(f"accum_dtype must be a floating point dtype, got {accum_dtype}")
        self.accum_dtype = accum_dtype
        self._same_rank = same_rank
        self._same_scaling = same_scaling
        self._specs: dict[str, _ModuleSpec] = {}
        self._total = 0.0
        self._count = 0
        self._finalized = False

    @property
    def num_replies(self) -> int:
        """Replies folded in so far."""
        return self._count

    @property
    def total_weight(self) -> float:
        """sum n_k over the replies folded in so far."""
        return self._total

    def _admit(self, modules: Mapping[str, LoraFactors], weight: float) -> float:
        """Validate one reply against the first, without changing any state; return its weight.

        Validation comes before any sum is touched so that a rejected reply leaves the
        accumulator as it was and the round can go on without it.
        """
        if self._finalized:
            raise ValueError("result() was already taken; use a new accumulator per round")
        w = check_weight(weight)
        if not modules:
            raise ValueError("a reply must contain at least one LoRA module")
        if self._count == 0:
            for name, f in modules.items():
                if not f.A.dtype.is_floating_point or f.B.dtype != f.A.dtype:
                    raise ValueError(
                        f"module {name!r}: factors must share one floating point dtype, "
                        f"got A {f.A.dtype} and B {f.B.dtype}"
                    )
        else:
            self._check_reply(modules)
        return w

    def _commit(self, modules: Mapping[str, LoraFactors], w: float) -> bool:
        """Count an admitted reply; return True if it is the first (it fixes the specs)."""
        first = self._count == 0
        if first:
            for name, f in modules.items():
                self._specs[name] = _ModuleSpec(f.d_out, f.d_in, f.rank, f.A.dtype, f.scaling)
        self._count += 1
        self._total += w
        return first

    def _check_reply(self, modules: Mapping[str, LoraFactors]) -> None:
        missing = [m for m in self._specs if m not in modules]
        unexpected = [m for m in modules if m not in self._specs]
        if missing or unexpected:
            more = " (and more)" if len(missing) > 3 or len(unexpected) > 3 else ""
            raise ValueError(
                f"reply's modules differ from the first reply's: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}{more}"
            )
        for name, f in modules.items():
            spec = self._specs[name]
            if (f.d_out, f.d_in) != (spec.d_out, spec.d_in):
                raise ValueError(
                    f"module {name!r}: layer shape {f.d_out} x {f.d_in} differs from the first "
                    f"reply's {spec.d_out} x {spec.d_in}"
                )
            if self._same_rank and f.rank != spec.rank:
                want = spec.rank
                raise ValueError(f"module {name!r}: rank {f.rank}, first reply's {want}")
            if f.A.dtype != spec.dtype or f.B.dtype != spec.dtype:
                got = f"A {f.A.dtype} / B {f.B.dtype}"
                raise ValueError(f"module {name!r}: dtype {got}, expected {spec.dtype}")
            if self._same_scaling and f.scaling != spec.scaling:
                got_s, want_s = f.scaling, spec.scaling
                raise ValueError(f"module {name!r}: scaling {got_s}, first reply's {want_s}")

    def _finalize(self) -> float:
        """Mark the round as closed and return sum n_k."""
        if self._count == 0:
            raise ValueError("no replies to aggregate")
        if self._total <= 0.0:
            raise ValueError("the replies' weights sum to zero; cannot normalise")
        self._finalized = True
        return self._total


class FactorSumAccumulator(BaseAccumulator):
    """Running weighted sums of A and/or B (FedAvg-LoRA, FFA-LoRA, RoLoRA, FedSVD).

    Parameters
    ----------
    trained
        ``"both"`` averages A and B (FedAvg-LoRA); ``"B"`` averages B and passes A through
        (FFA-LoRA, FedSVD, RoLoRA's B rounds); ``"A"`` the reverse (RoLoRA's A rounds). A
        frozen factor must be bit-identical in every reply, else :meth:`add` raises: a client
        that changed it trained the wrong factor, and averaging would hide that.
    accum_dtype
        dtype of the running sums.
    """

    def __init__(
        self,
        trained: TrainedFactors = "both",
        *,
        accum_dtype: torch.dtype = torch.float64,
    ) -> None:
        if trained not in ("both", "A", "B"):
            raise ValueError(f"trained must be 'both', 'A' or 'B', got {trained!r}")
        super().__init__(accum_dtype=accum_dtype, same_rank=True, same_scaling=True)
        self.trained: TrainedFactors = trained
        self._sum_a: dict[str, Tensor] = {}  # module -> r x d_in, sum n_k A_k
        self._sum_b: dict[str, Tensor] = {}  # module -> d_out x r, sum n_k B_k
        self._frozen: dict[str, Tensor] = {}  # module -> the factor every reply must repeat
        self._result: dict[str, LoraFactors] | None = None

    def add(self, modules: Mapping[str, LoraFactors], weight: float) -> None:
        """Fold in one reply with weight n_k (its number of examples)."""
        w = self._admit(modules, weight)
        if self.trained != "both" and self._count > 0:
            for name, f in modules.items():
                sent = f.B if self.trained == "A" else f.A
                if not torch.equal(sent, self._frozen[name]):
                    frozen = "lora_B" if self.trained == "A" else "lora_A"
                    raise ValueError(
                        f"module {name!r}: {frozen} differs from the first reply's, but it is "
                        f"frozen this round (only lora_{self.trained} is trained)"
                    )
        first = self._commit(modules, w)
        for name, f in modules.items():
            if first:
                self._start(name, f)
            if self.trained in ("both", "A"):
                self._sum_a[name].add_(f.A, alpha=w)  # mixed-dtype in-place add: no temporary
            if self.trained in ("both", "B"):
                self._sum_b[name].add_(f.B, alpha=w)

    def _start(self, name: str, f: LoraFactors) -> None:
        if self.trained in ("both", "A"):
            self._sum_a[name] = torch.zeros(f.A.shape, dtype=self.accum_dtype)
        if self.trained in ("both", "B"):
            self._sum_b[name] = torch.zeros(f.B.shape, dtype=self.accum_dtype)
        if self.trained == "A":
            self._frozen[name] = f.B.detach().clone()
        elif self.trained == "B":
            self._frozen[name] = f.A.detach().clone()

    def result(self) -> dict[str, LoraFactors]:
        """The aggregate per module, in the replies' dtype; frozen factors are returned as sent."""
        if self._result is None:
            total = self._finalize()
            out: dict[str, LoraFactors] = {}
            for name, spec in self._specs.items():
                if self.trained == "B":
                    a = self._frozen[name]
                else:
                    a = (self._sum_a[name] / total).to(spec.dtype)
                if self.trained == "A":
                    b = self._frozen[name]
                else:
                    b = (self._sum_b[name] / total).to(spec.dtype)
                out[name] = LoraFactors(A=a, B=b, scaling=spec.scaling)
            self._sum_a.clear()
            self._sum_b.clear()
            self._result = out
        return self._result


@dataclass(frozen=True, eq=False)
class ProductSums:
    """Averages of one module for the product-based methods, in the accumulation dtype.

    ``T = sum_k p_k B_k A_k`` is the ideal aggregate (without the scaling s, which all
    clients share); ``dtype`` is the replies' dtype, for casting results back.
    """

    A_bar: Tensor  # r x d_in
    B_bar: Tensor  # d_out x r
    T: Tensor  # d_out x d_in
    scaling: float
    dtype: torch.dtype


class ProductSumAccumulator(BaseAccumulator):
    """Running sums of A, B and the products B_k A_k (LoRA-FAIR, FedEx-LoRA, exact error).

    Memory is d_out x d_in per module in ``accum_dtype`` whatever the number of replies;
    clients must share ranks and scalings (mixed ranks: :class:`DeltaSumAccumulator`).
    """

    def __init__(self, *, accum_dtype: torch.dtype = torch.float64) -> None:
        super().__init__(accum_dtype=accum_dtype, same_rank=True, same_scaling=True)
        self._sum_a: dict[str, Tensor] = {}  # r x d_in
        self._sum_b: dict[str, Tensor] = {}  # d_out x r
        self._sum_t: dict[str, Tensor] = {}  # d_out x d_in, sum n_k B_k A_k
        self._result: dict[str, ProductSums] | None = None

    def add(self, modules: Mapping[str, LoraFactors], weight: float) -> None:
        """Fold in one reply with weight n_k."""
        w = self._admit(modules, weight)
        first = self._commit(modules, w)
        for name, f in modules.items():
            if first:
                self._sum_a[name] = torch.zeros(f.A.shape, dtype=self.accum_dtype)
                self._sum_b[name] = torch.zeros(f.B.shape, dtype=self.accum_dtype)
                self._sum_t[name] = torch.zeros((f.d_out, f.d_in), dtype=self.accum_dtype)
            a = f.A.to(self.accum_dtype)  # r x d_in, small
            b = f.B.to(self.accum_dtype)  # d_out x r, small
            self._sum_a[name].add_(a, alpha=w)
            self._sum_b[name].add_(b, alpha=w)
            self._sum_t[name].addmm_(b, a, alpha=w)  # no d_out x d_in temporary

    def result(self) -> dict[str, ProductSums]:
        """Per module: A_bar, B_bar and T in ``accum_dtype`` (the sums are divided in place)."""
        if self._result is None:
            total = self._finalize()
            self._result = {
                name: ProductSums(
                    A_bar=self._sum_a[name].div_(total),
                    B_bar=self._sum_b[name].div_(total),
                    T=self._sum_t[name].div_(total),
                    scaling=spec.scaling,
                    dtype=spec.dtype,
                )
                for name, spec in self._specs.items()
            }
        return self._result


@dataclass(frozen=True, eq=False)
class DeltaSum:
    """The weighted update ``sum_k p_k s_k B_k A_k`` of one module, for mixed ranks.

    ``rank_bound`` = min(sum of the replies' ranks, d_out, d_in) bounds the rank of
    ``delta``; the SVD uses it to stay cheap.
    """

    delta: Tensor  # d_out x d_in, in the accumulation dtype
    rank_bound: int
    max_rank: int
    dtype: torch.dtype


class DeltaSumAccumulator(BaseAccumulator):
    """Running sum of s_k B_k A_k when clients use different ranks and scalings (FlexLoRA).

    Raw factors of different ranks cannot be averaged, so only the scaled products are.
    """

    def __init__(self, *, accum_dtype: torch.dtype = torch.float64) -> None:
        super().__init__(accum_dtype=accum_dtype, same_rank=False, same_scaling=False)
        self._sum_d: dict[str, Tensor] = {}  # d_out x d_in
        self._rank_sum: dict[str, int] = {}
        self._max_rank: dict[str, int] = {}
        self._result: dict[str, DeltaSum] | None = None

    def add(self, modules: Mapping[str, LoraFactors], weight: float) -> None:
        """Fold in one reply with weight n_k; each module carries its own rank and scaling."""
        w = self._admit(modules, weight)
        first = self._commit(modules, w)
        for name, f in modules.items():
            if first:
                self._sum_d[name] = torch.zeros((f.d_out, f.d_in), dtype=self.accum_dtype)
                self._rank_sum[name] = 0
                self._max_rank[name] = 0
            b, a = f.B.to(self.accum_dtype), f.A.to(self.accum_dtype)  # d_out x r, r x d_in
            self._sum_d[name].addmm_(b, a, alpha=w * f.scaling)
            self._rank_sum[name] += f.rank
            self._max_rank[name] = max(self._max_rank[name], f.rank)

    def result(self) -> dict[str, DeltaSum]:
        """Per module: the averaged update and a bound on its rank."""
        if self._result is None:
            total = self._finalize()
            self._result = {
                name: DeltaSum(
                    delta=self._sum_d[name].div_(total),
                    rank_bound=min(self._rank_sum[name], spec.d_out, spec.d_in),
                    max_rank=self._max_rank[name],
                    dtype=spec.dtype,
                )
                for name, spec in self._specs.items()
            }
        return self._result


class HeadAccumulator:
    """Example-weighted running sums of the heads a classifier trains in full (``modules_to_save``):
    every method averages them the same way, FedAvg's rule, as they have no low-rank structure.
    Results come back in the replies' dtype."""

    def __init__(self, *, accum_dtype: torch.dtype = torch.float64) -> None:
        self.accum_dtype = accum_dtype
        self._sums: dict[str, Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._total = 0.0

    def add(self, heads: Mapping[str, Tensor], weight: float) -> None:
        """Fold one reply's heads in (they were checked against the state's names and shapes)."""
        w = check_weight(weight)
        if self._sums and set(heads) != set(self._sums):
            raise ValueError(f"reply heads {sorted(heads)} differ from earlier replies' {sorted(self._sums)}")
        for name, t in heads.items():
            term = t.to(self.accum_dtype) * w
            self._sums[name] = self._sums[name] + term if name in self._sums else term
            self._dtypes[name] = t.dtype
        self._total += w

    def result(self) -> dict[str, Tensor]:
        if not self._sums:
            return {}
        return {k: (v / self._total).to(self._dtypes[k]) for k, v in self._sums.items()}
