"""The conditional VAE both generators share: Conv1d encoder and decoder over a flat
parameter vector (ICM-LoRA's design), conditioned on

- ``cond_seq`` (B, C, L): conditions aligned with the parameters (SG-LoRA's mixture mean and
  log-variance per parameter), concatenated as channels at full resolution, and/or
- ``cond_vec`` (B, E): a task vector (ICM-LoRA), joined to the latent code.

Loss: MSE + beta * KL (ICM-LoRA: beta = 0.005). Generation decodes the latent mean (z = 0),
so the same request always yields the same adapter.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

STRIDE = 4
LEVELS = 3  # the encoder shortens the vector by STRIDE**LEVELS


@dataclass(frozen=True)
class CVAESettings:
    latent: int = 16
    width: int = 32
    cond_hidden: int = 64
    beta: float = 0.005
    steps: int = 600
    lr: float = 1e-3
    batch_size: int = 16
    weight_decay: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("latent", "width", "cond_hidden", "steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"generator {name} must be an integer >= 1, got {value!r}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"generator lr must be a finite number > 0, got {self.lr!r}")
        if not self.beta >= 0:
            raise ValueError(f"generator beta must be >= 0, got {self.beta!r}")


class ConvCVAE(nn.Module):
    def __init__(self, length: int, seq_channels: int, vec_dim: int, s: CVAESettings) -> None:
        super().__init__()
        self.length = length
        unit = STRIDE**LEVELS
        self.padded = -(-length // unit) * unit
        self.coarse = self.padded // unit
        self.seq_channels, self.vec_dim, self.latent, self.width = seq_channels, vec_dim, s.latent, s.width
        w = s.width
        # channels grow as the resolution shrinks: the full-length layers stay cheap
        widths = [max(1, w >> (LEVELS - 1 - i)) for i in range(LEVELS)]  # e.g. 8, 16, 32
        enc: list[nn.Module] = []
        c_in = 1 + seq_channels
        for c_out in widths:
            enc += [nn.Conv1d(c_in, c_out, 2 * STRIDE + 1, stride=STRIDE, padding=STRIDE), nn.GELU()]
            c_in = c_out
        self.encoder = nn.Sequential(*enc)
        self.cond = nn.Sequential(nn.Linear(vec_dim, s.cond_hidden), nn.GELU()) if vec_dim else None
        c_dim = s.cond_hidden if vec_dim else 0
        self.to_latent = nn.Linear(w * self.coarse + c_dim, 2 * s.latent)
        self.from_latent = nn.Linear(s.latent + c_dim, w * self.coarse)
        dec: list[nn.Module] = []
        outs = [*reversed(widths[:-1]), widths[0]]  # e.g. 16, 8, 8
        c_in = w
        for c_out in outs:
            dec += [nn.ConvTranspose1d(c_in, c_out, STRIDE, stride=STRIDE), nn.GELU()]
            c_in = c_out
        self.decoder = nn.Sequential(*dec)
        # a linear map from (z, condition) to every parameter, beside the convolutions: the
        # experts span a low-dimensional subspace the convolutions alone reproduce poorly
        self.basis = nn.Linear(s.latent + c_dim, length)
        nn.init.zeros_(self.basis.weight)
        nn.init.zeros_(self.basis.bias)
        self.head = nn.Conv1d(widths[0] + seq_channels, 1, 5, padding=2)

    def _pad(self, t: torch.Tensor) -> torch.Tensor:  # (B, C, L) -> (B, C, padded)
        return nn.functional.pad(t, (0, self.padded - t.shape[-1]))

    def _cond(self, cond_vec: torch.Tensor | None, batch: int) -> torch.Tensor:
        if self.cond is None or cond_vec is None:
            return torch.zeros(batch, 0)
        out: torch.Tensor = self.cond(cond_vec)
        return out

    def encode(
        self, x: torch.Tensor, cond_seq: torch.Tensor | None, cond_vec: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [x.unsqueeze(1)] + ([cond_seq] if cond_seq is not None else [])
        h = self.encoder(self._pad(torch.cat(parts, 1))).flatten(1)  # (B, w * coarse)
        stats = self.to_latent(torch.cat([h, self._cond(cond_vec, x.shape[0])], 1))
        mu, logvar = stats.chunk(2, dim=1)
        return mu, logvar.clamp(-10, 10)

    def decode(self, z: torch.Tensor, cond_seq: torch.Tensor | None, cond_vec: torch.Tensor | None) -> torch.Tensor:
        h = self.from_latent(torch.cat([z, self._cond(cond_vec, z.shape[0])], 1)).view(-1, self.width, self.coarse)
        h = self.decoder(h)  # (B, w, padded)
        if cond_seq is not None:
            h = torch.cat([h, self._pad(cond_seq)], 1)
        out: torch.Tensor = self.head(h)[:, 0, : self.length] + self.basis(
            torch.cat([z, self._cond(cond_vec, z.shape[0])], 1)
        )
        return out

    def forward(
        self, x: torch.Tensor, cond_seq: torch.Tensor | None, cond_vec: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x, cond_seq, cond_vec)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return self.decode(z, cond_seq, cond_vec), mu, logvar

    @torch.no_grad()
    def generate(self, cond_seq: torch.Tensor | None, cond_vec: torch.Tensor | None) -> torch.Tensor:
        batch = (cond_seq if cond_seq is not None else cond_vec).shape[0]  # type: ignore[union-attr]
        return self.decode(torch.zeros(batch, self.latent), cond_seq, cond_vec)


@dataclass(frozen=True)
class FitResult:
    steps: int
    final_loss: float
    final_mse: float
    seconds: float


#: draws a training batch: (batch size, generator) -> (x, aligned condition, task-vector condition)
Sampler = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]


def fit_cvae(model: ConvCVAE, sample: Sampler, settings: CVAESettings) -> FitResult:
    """Train on batches from ``sample(batch_size, generator) -> (x, cond_seq, cond_vec)``.

    The sampler builds conditions afresh each batch (a random description of the task, a
    random subset of its examples, modality dropout), so conditions vary as they will at
    generation time."""
    g = torch.Generator().manual_seed(settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, settings.steps)
        model.train()
        start = time.perf_counter()
        loss_v, mse_v = float("nan"), float("nan")
        for _ in range(settings.steps):
            x, cond_seq, cond_vec = sample(settings.batch_size, g)
            recon, mu, logvar = model(x, cond_seq, cond_vec)
            mse = nn.functional.mse_loss(recon, x)
            kl = -0.5 * torch.mean(torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1))
            loss = mse + settings.beta * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            loss_v, mse_v = float(loss.detach()), float(mse.detach())
        model.eval()
    return FitResult(settings.steps, loss_v, mse_v, time.perf_counter() - start)
