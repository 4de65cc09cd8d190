"""Server-side optimizers over the aggregated update: FedAvgM, FedAdagrad, FedAdam, FedYogi.

FedOpt (Reddi et al., Adaptive Federated Optimization, ICLR 2021) treats ``delta = aggregate - global``
as a pseudo-gradient and steps the global state with a server optimizer, which is how a federation
gains speed where client drift makes plain averaging slow: the moments carry the consistent part of
the clients' pulls from round to round. The formulas are Flower's (``flwr.serverapp.strategy``
FedAdagrad, FedYogi, FedAvgM: moments start at zero, Yogi's ``v`` too; Flower's FedAdagrad fixes
``beta1 = 0``, here it is a setting as in the paper); FedAdam's bias correction
counts the optimizer's own steps (``t = 1`` at its first step: Kingma & Ba), where Flower's counts
``server_round + 1``.

``none`` with ``lr`` 1 is plain aggregation; ``none`` with another ``lr`` is the server learning rate
alone (``global + lr * delta``). Every tensor of the global state steps (LoRA factors and classifier
heads); a factor no client trained has ``delta = 0`` and, with zero moments, stays put. Methods that
re-factorise the global state each round (SVD, products) have no consistent factor coordinates for
moments to live in and refuse a server optimizer (:attr:`LoraAlgorithm.server_optimizer`).

The math is pure: :func:`server_step` returns the next global state and the next optimizer state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Final

import torch
from torch import Tensor

OPTIMIZERS: Final = ("none", "avgm", "adagrad", "adam", "yogi")


@dataclass(frozen=True)
class ServerOptimizer:
    """The run config's ``server-opt.*`` section: which optimizer and its hyperparameters (``lr`` is
    Flower's eta, then ``beta1``, ``beta2``, ``tau``)."""

    prefix: ClassVar[str] = "server-opt."

    optimizer: str = "none"
    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"server-opt.optimizer {self.optimizer!r} is unknown; known: {', '.join(OPTIMIZERS)}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"server-opt.lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.beta1 < 1 or not 0 <= self.beta2 < 1:
            raise ValueError(f"server-opt.beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if not self.tau > 0:
            raise ValueError(f"server-opt.tau must be > 0, got {self.tau}")

    @property
    def plain(self) -> bool:
        """Whether this is plain aggregation (the aggregate becomes the global state as it is)."""
        return self.optimizer == "none" and self.lr == 1.0


@dataclass(frozen=True)
class OptimizerState:
    """The moments per state key and the number of steps taken; empty before the first step."""

    step: int = 0
    m: Mapping[str, Tensor] = field(default_factory=dict)
    v: Mapping[str, Tensor] = field(default_factory=dict)

    def to_tensors(self) -> dict[str, Tensor]:
        """Flat, for a checkpoint: ``m/<key>``, ``v/<key>`` and ``step``."""
        out = {f"m/{k}": t for k, t in self.m.items()} | {f"v/{k}": t for k, t in self.v.items()}
        return out | {"step": torch.tensor(self.step, dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, flat: Mapping[str, Tensor]) -> OptimizerState:
        if not flat:
            return cls()
        if "step" not in flat:
            raise ValueError("server optimizer state has no 'step'")
        m = {k.removeprefix("m/"): t for k, t in flat.items() if k.startswith("m/")}
        v = {k.removeprefix("v/"): t for k, t in flat.items() if k.startswith("v/")}
        return cls(int(flat["step"]), m, v)


def server_step(
    opt: ServerOptimizer,
    current: Mapping[str, Tensor],
    aggregate: Mapping[str, Tensor],
    state: OptimizerState,
) -> tuple[dict[str, Tensor], OptimizerState]:
    """The next global state from the current one and the round's aggregate, and the next optimizer state."""
    if set(current) != set(aggregate):
        differ = sorted(set(current) ^ set(aggregate))
        raise ValueError(f"the aggregate's keys differ from the global state's: {differ}")
    if opt.plain:
        return dict(aggregate), state
    new, m_next, v_next = {}, {}, {}
    t = state.step + 1
    for k, x in current.items():
        if not x.is_floating_point():
            new[k] = aggregate[k]
            continue
        delta = aggregate[k].to(torch.float64) - x.to(torch.float64)
        m = state.m.get(k, torch.zeros_like(delta)).to(torch.float64)
        if opt.optimizer == "none":
            step = delta
        elif opt.optimizer == "avgm":  # Flower's FedAvgM: momentum = beta1 * momentum + delta
            m = opt.beta1 * m + delta
            step = m
        else:
            m = opt.beta1 * m + (1 - opt.beta1) * delta
            v = state.v.get(k, torch.zeros_like(delta)).to(torch.float64)
            if opt.optimizer == "adagrad":
                v = v + delta**2
            elif opt.optimizer == "adam":
                v = opt.beta2 * v + (1 - opt.beta2) * delta**2
            else:  # yogi
                v = v - (1 - opt.beta2) * delta**2 * torch.sign(v - delta**2)
            v_next[k] = v.to(x.dtype)
            scale = math.sqrt(1 - opt.beta2**t) / (1 - opt.beta1**t) if opt.optimizer == "adam" else 1.0
            step = scale * m / (v.sqrt() + opt.tau)
        if opt.optimizer != "none":
            m_next[k] = m.to(x.dtype)
        new[k] = (x.to(torch.float64) + opt.lr * step).to(x.dtype)
    return new, OptimizerState(t, m_next, v_next)


__all__ = ["OPTIMIZERS", "OptimizerState", "ServerOptimizer", "server_step"]
