"""DP-SGD on the trainable (LoRA) parameters, by wrapping: Opacus' parts turn a model, an
optimizer and a dataset into their private versions; the training loop is unchanged.

Two engines compute the per-example clipping (``DPSGDConfig.engine``): ``opacus``, Opacus'
grad-sample hooks (any trainable layer Opacus supports), and ``fused``, taps on the LoRA
layers with the ops of :mod:`fedlora.privacy.kernels` (:mod:`fedlora.privacy.fused`; LoRA factors of linear
layers only). Both use the same Poisson batches, Opacus' DPOptimizer noise and scaling, and the
same seeds: they release the same adapter up to float rounding.

Only parameters that require gradients get per-sample gradients, so whatever the strategy
freezes (A under FFA-LoRA, the whole base model always) costs no per-sample work. Sampling is
Poisson with rate exactly q = batch / n (Opacus' ``make_private`` would use 1 / ceil(n /
batch), below the rate the ledger charges); the gradient sum is divided by q n. Accounting is
not done here: the caller charges its ledger with (sigma, q, steps).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator

from fedlora.privacy.engines import HEAD_MARKER, Engine, check_engine, load_engine
from fedlora.privacy.sampling import sample_rate


@dataclass(frozen=True)
class DPSGDConfig:
    """Sample-level DP-SGD: clip each example's gradient to ``max_grad_norm``, add Gaussian noise
    of standard deviation ``noise_multiplier * max_grad_norm`` to the sum."""

    noise_multiplier: float
    max_grad_norm: float
    engine: Engine = "opacus"

    def __post_init__(self) -> None:
        check_engine(self.engine)
        if not math.isfinite(self.noise_multiplier) or self.noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier!r}")
        if not math.isfinite(self.max_grad_norm) or self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {self.max_grad_norm!r}")


class ClippedAccumulation:
    """Physical batches under DP-SGD (``fedlora.core.train.Accumulation``), as Opacus'
    ``BatchMemoryManager`` does it: each physical batch backpropagates its own mean loss (both
    engines recover each example's gradient from it), the optimizer clips those examples into its
    running sum and drops their per-sample gradients (a skipped step), and the logical batch's
    last backward is followed by the one real step: noise once, divided by the expected batch
    size. The same release as the whole Poisson batch at once, up to float rounding; the ledger
    charges the logical batch (one step at rate q), whatever the physical size."""

    def __init__(self, optimizer: DPOptimizer) -> None:
        self.optimizer = optimizer

    def loss(self, losses: torch.Tensor, logical_size: int) -> torch.Tensor:
        return losses.mean()

    def accumulate(self) -> None:
        self.optimizer.signal_skip_step(do_skip=True)
        self.optimizer.step()  # clips this physical batch into p.summed_grad; no noise, no update
        self.optimizer.zero_grad(set_to_none=True)  # per-sample gradients go; the clipped sum stays


@dataclass
class PrivateTraining:
    """What the wrapped training loop uses: the model to call, the optimizer, the batches and how
    physical batches of one Poisson batch add up."""

    model: torch.nn.Module
    optimizer: DPOptimizer
    batches: Iterator[dict[str, torch.Tensor]]
    sample_rate: float
    accumulation: ClippedAccumulation


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

    The training loop calls ``optimizer.zero_grad()``, one forward and one backward of the
    batch-mean loss, and ``optimizer.step()``; or, in physical batches, one forward and backward
    of each one's mean loss, with ``accumulation.accumulate()`` between them, and one
    ``optimizer.step()``. The engine's hooks are removed on exit, so a
    model cached across messages (simulation) can be wrapped again next round with other
    trainable factors.
    """
    model.zero_grad(set_to_none=True)  # stale gradients of a cached model must not leak into step one
    model.train()
    ModuleValidator.validate(model, strict=True)  # e.g. batch norm mixes examples: refused by name
    q = sample_rate(batch_size, len(dataset))
    # Opacus inspects dataset[0] as a tuple of fields: wrap each example in a 1-tuple
    items: list[tuple[Any]] = [(example,) for example in dataset]
    loader = DPDataLoader(
        items,
        sample_rate=q,
        collate_fn=lambda items: collate_fn([item[0] for item in items]),
        generator=torch.Generator().manual_seed(seed),
    )
    settings: dict[str, Any] = {
        "noise_multiplier": config.noise_multiplier,
        "max_grad_norm": config.max_grad_norm,
        "expected_batch_size": min(batch_size, len(dataset)),  # q n
        "generator": torch.Generator().manual_seed(seed + 1),
    }
    own = {id(p) for p in model.parameters()}
    if any(id(p) not in own for group in optimizer.param_groups for p in group["params"]):
        raise ValueError("the optimizer holds parameters that are not the model's: DP-SGD would not clip them")
    engine = config.engine
    if engine == "fused":
        heads = [n for n, p in model.named_parameters() if p.requires_grad and HEAD_MARKER in n]
        if heads:  # a head trained in full has no LoRA factors to tap: Opacus' hooks clip it
            engine = "opacus"
            warnings.warn(
                f"dp.engine = fused taps LoRA factors only and this model trains a head in full ({heads[0]}"
                f"{' ...' if len(heads) > 1 else ''}): DP-SGD runs on Opacus' engine instead",
                stacklevel=3,
            )
    attached = load_engine(engine).attach(model)

    def endless() -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield from loader

    try:  # from here on the hooks come off whatever happens, a failing optimizer included
        private_opt = attached.make_optimizer(optimizer, settings)
        yield PrivateTraining(attached.model, private_opt, endless(), q, ClippedAccumulation(private_opt))
    finally:
        attached.close()
        for p in model.parameters():  # the optimizers' bookkeeping attribute
            if hasattr(p, "summed_grad"):
                del p.summed_grad
