"""LoRA-FAIR: FedAvg-LoRA plus a server-side correction dB of B towards the ideal update T.

The paper's objective, per module::

    dB = argmin  [1 - mean_j cos(T[:, j], ((B_bar + dB) A_bar)[:, j])] + lam ||dB||_F^2

with the cosine taken per column (each of the d_in columns, a vector of length d_out) and
averaged, as in the reference code; it is solved iteratively from dB = 0. Its squared-error
variant ``||T - (B_bar + dB) A_bar||_F^2 + lam ||dB||_F^2`` has the closed form

    dB* = (T A_bar^T - B_bar A_bar A_bar^T)(A_bar A_bar^T + lam I)^-1,

an r x r solve, used as the fast path. Either way A_bar is left unchanged and clients restart
from (A_bar, B_bar + dB). Note that lam does not mean the same in the two objectives: the
cosine term is scale free, the squared error scales with ||T||^2.

A classifier's heads (PEFT's ``modules_to_save``) are not this method's business: every method's
replies carry them in full and :class:`fedlora.strategies.flower.LoraStrategy` averages them
weighted by examples (FedAvg), outside the math above.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor

from fedlora.strategies.adapter import LoraFactors, check_clients, join_adapter
from fedlora.strategies.algorithms import Accumulator, AlgorithmDefaults, LoraAlgorithm, MethodSettings
from fedlora.strategies.diagnostics import aggregation_error_from_sums
from fedlora.strategies.streaming import ProductSumAccumulator, ProductSums

Objective = Literal["cosine", "squared"]

COSINE_EPS = 1e-8  # lower bound on column norms, as torch.nn.functional.cosine_similarity


@dataclass(frozen=True)
class LoraFairConfig:
    """How the server computes the correction.

    Attributes
    ----------
    lam
        The regulariser lambda on ||dB||^2 (paper: 0.01).
    solver
        ``"iterative"`` minimises ``objective`` with a torch optimiser from dB = 0;
        ``"closed_form"`` solves the squared-error variant exactly (needs
        ``objective="squared"``).
    objective
        ``"cosine"`` (the paper's) or ``"squared"``.
    steps, lr, optimizer
        Iterative solver settings; the reference code runs 1000 SGD steps at lr 0.01.
    """

    lam: float = 0.01
    solver: Literal["iterative", "closed_form"] = "iterative"
    objective: Objective = "cosine"
    steps: int = 1000
    lr: float = 0.01
    optimizer: Literal["sgd", "adam"] = "sgd"

    def __post_init__(self) -> None:
        if not math.isfinite(self.lam) or self.lam < 0.0:
            raise ValueError(f"lam must be finite and >= 0, got {self.lam}")
        if self.solver not in ("iterative", "closed_form"):
            raise ValueError(f"solver must be 'iterative' or 'closed_form', got {self.solver!r}")
        if self.objective not in ("cosine", "squared"):
            raise ValueError(f"objective must be 'cosine' or 'squared', got {self.objective!r}")
        if self.solver == "closed_form" and self.objective != "squared":
            raise ValueError("the closed form solves the squared-error objective only")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not math.isfinite(self.lr) or self.lr <= 0.0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")


def column_cosine(x: Tensor, y: Tensor) -> Tensor:
    """Cosine similarity of matching columns of two d_out x d_in matrices: a d_in vector."""
    num = (x * y).sum(dim=0)
    x_norm = torch.linalg.vector_norm(x, dim=0).clamp_min(COSINE_EPS)
    y_norm = torch.linalg.vector_norm(y, dim=0).clamp_min(COSINE_EPS)
    cos: Tensor = num / (x_norm * y_norm)
    return cos


def lora_fair_objective(
    T: Tensor, A_bar: Tensor, B_bar: Tensor, dB: Tensor, lam: float, objective: Objective = "cosine"
) -> Tensor:
    """The objective at ``dB``, evaluated directly from the dense product (a 0-d tensor)."""
    p = (B_bar + dB) @ A_bar  # d_out x d_in
    penalty = lam * (dB * dB).sum()
    if objective == "cosine":
        return 1.0 - column_cosine(T, p).mean() + penalty
    if objective == "squared":
        return ((T - p) ** 2).sum() + penalty
    raise ValueError(f"objective must be 'cosine' or 'squared', got {objective!r}")


def lora_fair_correction_closed_form(T: Tensor, A_bar: Tensor, B_bar: Tensor, lam: float) -> Tensor:
    """Exact minimiser dB* (d_out x r) of the squared-error objective.

    Solves the normal equations dB (A A^T + lam I) = T A^T - B_bar A A^T with an r x r solve
    (no explicit inverse). With lam = 0, A_bar must have full row rank.
    """
    aat = A_bar @ A_bar.T  # r x r
    rhs = T @ A_bar.T - B_bar @ aat  # d_out x r
    m = aat + lam * torch.eye(aat.shape[0], dtype=aat.dtype)
    dB: Tensor = torch.linalg.solve(m, rhs, left=False)  # dB m = rhs
    return dB


def lora_fair_correction_iterative(
    T: Tensor,
    A_bar: Tensor,
    B_bar: Tensor,
    lam: float,
    *,
    objective: Objective = "cosine",
    steps: int = 1000,
    lr: float = 0.01,
    optimizer: Literal["sgd", "adam"] = "sgd",
) -> Tensor:
    """Minimise the objective over dB with a torch optimiser, starting from dB = 0.

    The dense d_out x d_in product is never formed: per step the cosine needs B^T T (r x d_in)
    and B^T B (r x r), the squared error only r x r and d_out x r terms precomputed from T.
    Matches :func:`lora_fair_objective` up to a constant (``||T||^2`` for the squared error).
    """
    T, A_bar, B_bar = T.detach(), A_bar.detach(), B_bar.detach()
    with torch.enable_grad():
        dB = torch.zeros_like(B_bar, requires_grad=True)
        opt: torch.optim.Optimizer
        if optimizer == "sgd":
            opt = torch.optim.SGD([dB], lr=lr)
        elif optimizer == "adam":
            opt = torch.optim.Adam([dB], lr=lr)
        else:
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")

        # Shapes below are for one module; a leading batch dimension (modules of one shape,
        # stacked) is carried along: the summed loss has independent per-module gradients.
        if objective == "cosine":
            t_norm = torch.linalg.vector_norm(T, dim=-2).clamp_min(COSINE_EPS)  # d_in
            bt_t = B_bar.mT @ T  # r x d_in, the fixed part of (B_bar + dB)^T T

            def loss_fn() -> Tensor:
                b = B_bar + dB  # d_out x r
                num = ((bt_t + dB.mT @ T) * A_bar).sum(dim=-2)  # d_in: <T_j, B a_j>
                p_sq = ((b.mT @ b @ A_bar) * A_bar).sum(dim=-2)  # d_in: ||B a_j||^2
                p_norm = p_sq.clamp_min(COSINE_EPS**2).sqrt()
                cos: Tensor = num / (t_norm * p_norm)
                return -cos.mean(dim=-1).sum() + lam * (dB * dB).sum()

        elif objective == "squared":
            t_at = T @ A_bar.mT  # d_out x r
            aat = A_bar @ A_bar.mT  # r x r

            def loss_fn() -> Tensor:
                b = B_bar + dB
                return -2.0 * (b * t_at).sum() + ((b.mT @ b) * aat).sum() + lam * (dB * dB).sum()

        else:
            raise ValueError(f"objective must be 'cosine' or 'squared', got {objective!r}")

        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.backward()  # type: ignore[no-untyped-call,unused-ignore]
            opt.step()
    return dB.detach()


def lora_fair_correction(T: Tensor, A_bar: Tensor, B_bar: Tensor, config: LoraFairConfig) -> Tensor:
    """dB (d_out x r) as ``config`` says."""
    if config.solver == "closed_form":
        return lora_fair_correction_closed_form(T, A_bar, B_bar, config.lam)
    return lora_fair_correction_iterative(
        T,
        A_bar,
        B_bar,
        config.lam,
        objective=config.objective,
        steps=config.steps,
        lr=config.lr,
        optimizer=config.optimizer,
    )


def lora_fair_from_sums(
    sums: Mapping[str, ProductSums], config: LoraFairConfig | None = None
) -> dict[str, LoraFactors]:
    """Clients' restart point (A_bar, B_bar + dB) per module, in the replies' dtype.

    The solve runs in the accumulation dtype; A_bar is returned exactly as FedAvg-LoRA
    would return it.
    """
    cfg = config if config is not None else LoraFairConfig()
    corrections: dict[str, Tensor] = {}
    if cfg.solver == "iterative":
        # one batched solve per module shape: a model has few distinct shapes, many modules
        groups: dict[tuple[tuple[int, ...], tuple[int, ...]], list[str]] = {}
        for name, ps in sums.items():
            groups.setdefault((tuple(ps.T.shape), tuple(ps.A_bar.shape)), []).append(name)
        for names in groups.values():
            stacked = [torch.stack([getattr(sums[n], f) for n in names]) for f in ("T", "A_bar", "B_bar")]
            dBs = lora_fair_correction(stacked[0], stacked[1], stacked[2], cfg)
            corrections.update(zip(names, dBs.unbind(0), strict=True))
    else:
        corrections = {n: lora_fair_correction(ps.T, ps.A_bar, ps.B_bar, cfg) for n, ps in sums.items()}
    out: dict[str, LoraFactors] = {}
    for name, ps in sums.items():
        dB = corrections[name]
        if not bool(torch.isfinite(dB).all()):
            raise ValueError(f"module {name!r}: LoRA-FAIR correction is not finite (lower lr?)")
        b = (ps.B_bar + dB).to(ps.dtype)
        out[name] = LoraFactors(A=ps.A_bar.to(ps.dtype), B=b, scaling=ps.scaling)
    return out


def lora_fair_aggregate(
    modules_per_client: Sequence[Mapping[str, LoraFactors]],
    weights: Sequence[float],
    config: LoraFairConfig | None = None,
) -> dict[str, LoraFactors]:
    """One-shot LoRA-FAIR over a :class:`ProductSumAccumulator`."""
    check_clients(modules_per_client, weights)
    acc = ProductSumAccumulator()
    for modules, weight in zip(modules_per_client, weights, strict=True):
        acc.add(modules, weight)
    return lora_fair_from_sums(acc.result(), config)


@dataclass(frozen=True)
class LoraFairSettings(MethodSettings):
    """LoRA-FAIR's run-config section: ``lora-fair-lambda``, ``lora-fair-solver``, ``lora-fair-steps``.

    ``solver = "closed-form"`` solves the squared-error variant exactly; ``"iterative"`` runs
    ``steps`` SGD steps on the paper's cosine objective (:class:`LoraFairConfig`).
    """

    prefix: ClassVar[str] = "lora-fair-"

    lam: float = field(default=0.01, metadata={"key": "lora-fair-lambda"})
    solver: str = "iterative"
    steps: int = 1000

    def __post_init__(self) -> None:
        if not math.isfinite(self.lam) or self.lam < 0:
            raise ValueError(f"lora-fair-lambda must be a finite number >= 0, got {self.lam!r}")
        if self.solver not in ("iterative", "closed-form"):
            raise ValueError(f"lora-fair-solver must be 'iterative' or 'closed-form', got {self.solver!r}")
        if self.steps < 0:
            raise ValueError(f"lora-fair-steps must be >= 0, got {self.steps!r}")

    def solver_config(self) -> LoraFairConfig:
        """The server's solve: the closed form of the squared error, or the iterative cosine one."""
        closed = self.solver == "closed-form"
        return LoraFairConfig(
            lam=self.lam,
            solver="closed_form" if closed else "iterative",
            objective="squared" if closed else "cosine",
            steps=self.steps,
        )


class LoraFair(LoraAlgorithm):
    """LoRA-FAIR: FedAvg-LoRA plus the server's correction of B; clients restart from it."""

    name = "lora-fair"
    defaults = AlgorithmDefaults(lr=3e-3, alpha=16.0)
    settings_cls = LoraFairSettings
    product_based = True

    @property
    def fair(self) -> LoraFairConfig:
        """How the server solves for the correction dB."""
        assert isinstance(self.settings, LoraFairSettings)  # the base checked the settings' type
        return self.settings.solver_config()

    def new_accumulator(self, server_round: int) -> Accumulator:
        return ProductSumAccumulator()

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
