"""DP-SGD on the trainable (LoRA) parameters, by wrapping: Opacus' PrivacyEngine turns a model,
an optimizer and a data loader into their private versions; the training loop is unchanged.

Only parameters that require gradients get per-sample gradients (Opacus hooks only modules
with trainable parameters), so whatever the strategy freezes (A under FFA-LoRA, the whole
base model always) costs no per-sample work. Sampling is Poisson with rate q = batch / n.
Accounting is not done here: the caller charges its ledger with (sigma, q, steps).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.grad_sample import GradSampleModule
from torch.utils.data import DataLoader


@dataclass(frozen=True)
class DPSGDConfig:
    """Sample-level DP-SGD: clip each example's gradient to ``max_grad_norm``, add Gaussian noise
    of standard deviation ``noise_multiplier * max_grad_norm`` to the sum."""

    noise_multiplier: float
    max_grad_norm: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.noise_multiplier) or self.noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier!r}")
        if not math.isfinite(self.max_grad_norm) or self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {self.max_grad_norm!r}")


def sample_rate(batch_size: int, num_examples: int) -> float:
    """Poisson sampling rate q = expected batch / local examples (at most 1)."""
    if num_examples < 1 or batch_size < 1:
        raise ValueError(f"need batch_size >= 1 and examples >= 1, got {batch_size}, {num_examples}")
    return min(1.0, batch_size / num_examples)


#: largest accepted chance that some Poisson batch of a local run is empty: Opacus then hands the
#: loop a batch of zero examples, which the model's forward cannot take (nothing is charged, but
#: the run is lost), so such a run is refused before it starts
MAX_EMPTY_BATCH_RISK = 1e-4


def empty_batch_risk(q: float, num_examples: int, steps: int) -> float:
    """Chance that at least one of ``steps`` Poisson batches (each example in with probability q) is empty."""
    return float(1 - (1 - (1 - q) ** num_examples) ** steps)


def check_poisson_batches(batch_size: int, num_examples: int, steps: int) -> None:
    """Refuse a DP-SGD run whose Poisson batches could come out empty (see MAX_EMPTY_BATCH_RISK)."""
    risk = empty_batch_risk(sample_rate(batch_size, num_examples), num_examples, steps)
    if risk > MAX_EMPTY_BATCH_RISK:
        raise ValueError(
            f"batch size {batch_size} is too small for DP-SGD's Poisson batches over {num_examples} examples: "
            f"some of the {steps} steps would draw an empty batch with probability {risk:.2g}, which the training "
            "loop cannot take; use a larger batch size"
        )


@dataclass
class PrivateTraining:
    """What the wrapped training loop uses: the model to call, the optimizer, the batches."""

    model: GradSampleModule
    optimizer: torch.optim.Optimizer
    batches: Iterator[dict[str, torch.Tensor]]
    sample_rate: float


@contextmanager
def dp_sgd(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: Sequence[Any],
    collate_fn: Callable[[list[Any]], dict[str, torch.Tensor]],
    batch_size: int,
    config: DPSGDConfig,
    seed: int,
) -> Iterator[PrivateTraining]:
    """Private versions of ``model``, ``optimizer`` and batches of ``dataset`` for one local run.

    The model's hooks are removed on exit, so a model cached across messages (simulation)
    can be wrapped again next round with other trainable factors.
    """
    model.zero_grad(set_to_none=True)  # stale gradients of a cached model must not leak into step one
    model.train()  # Opacus validates training mode; a cached model may come back from evaluation
    q = sample_rate(batch_size, len(dataset))
    generator = torch.Generator().manual_seed(seed)
    # Opacus inspects dataset[0] as a tuple of fields: wrap each example in a 1-tuple
    items: list[tuple[Any]] = [(example,) for example in dataset]
    loader: DataLoader[tuple[Any]] = DataLoader(
        items,  # type: ignore[arg-type]  # a list is a map-style dataset
        batch_size=batch_size,
        collate_fn=lambda items: collate_fn([item[0] for item in items]),
        generator=generator,
    )
    engine = PrivacyEngine(accountant="rdp")  # its own accountant goes unused: the ledger charges
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        private_model, private_opt, private_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=config.noise_multiplier,
            max_grad_norm=config.max_grad_norm,
            poisson_sampling=True,
            noise_generator=torch.Generator().manual_seed(seed + 1),
        )
    assert isinstance(private_model, GradSampleModule)

    def endless() -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield from private_loader

    try:
        yield PrivateTraining(private_model, private_opt, endless(), q)
    finally:
        private_model._close()  # remove hooks and per-sample attributes
