"""Opacus' DP-SGD engine (``dp.engine = opacus``): grad-sample hooks on every trainable layer
Opacus supports, clipping and noise by Opacus' own ``DPOptimizer``."""

from __future__ import annotations

from typing import Any

import torch
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedlora.privacy.engines import Attached


def attach(model: torch.nn.Module) -> Attached:
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    gsm.forbid_grad_accumulation()  # one Poisson batch per step, as the ledger charges (as make_private)

    def make_optimizer(optimizer: torch.optim.Optimizer, settings: dict[str, Any]) -> DPOptimizer:
        return DPOptimizer(optimizer, loss_reduction="mean", **settings)

    return Attached(gsm, make_optimizer, gsm._close)  # _close removes hooks and per-sample attributes
