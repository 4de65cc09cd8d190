"""Local training under DP-SGD: the one training loop, wrapped by Opacus.

Both a federated round (:mod:`fedlora.client.compute`) and a personalisation
(:mod:`fedlora.client.personalize`) train this way, so it sits below both.
"""

from __future__ import annotations

import torch

from fedlora.core.data import Item, collate
from fedlora.core.train import TrainResult, TrainSettings, train_in
from fedlora.privacy.dp import DPSGDConfig, dp_sgd


def train_private(
    model: torch.nn.Module, data: list[Item], settings: TrainSettings, pad: int, dp: DPSGDConfig, seed: int
) -> TrainResult:
    """The same training loop, wrapped by Opacus: Poisson batches, clipped and noised gradients,
    AdamW at a constant learning rate (the server's schedule sets it per round). A Poisson batch
    runs in physical batches of ``settings.physical_batch_size`` examples when that is set."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr)
    with dp_sgd(model, optimizer, data, lambda b: collate(b, pad), settings.batch_size, dp, seed) as pt:
        return train_in(pt, data, settings, pad)
