"""Local LoRA training and evaluation: the building block of every client and the
centralised baseline. One loop for CPU and CUDA alike."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fedlora.core.data import Item, batch_size, collate, forward, physical_batches

if TYPE_CHECKING:
    from fedlora.privacy.dp import PrivateTraining


@dataclass(frozen=True)
class TrainSettings:
    """Local optimisation: AdamW on whatever parameters require gradients.

    ``batch_size`` is the logical batch: one optimizer step (under DP-SGD, the expected size of
    one Poisson batch, one noise draw). ``physical_batch_size`` > 0 runs it through the model
    at most that many examples at a time, accumulating gradients: the same step up to float
    rounding, with the activation memory of the smaller batch (0: the whole batch at once)."""

    steps: int = 200
    lr: float = 3e-3
    batch_size: int = 32
    physical_batch_size: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    warmup_steps: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"train steps must be an integer >= 0, got {self.steps!r}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"train lr must be a finite number > 0, got {self.lr!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"train batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not isinstance(self.physical_batch_size, int) or self.physical_batch_size < 0:
            raise ValueError(
                f"train physical_batch_size must be an integer >= 0 (0: the whole batch at once), "
                f"got {self.physical_batch_size!r}"
            )
        if self.weight_decay < 0:
            raise ValueError(f"train weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"train max_grad_norm must be > 0 or null, got {self.max_grad_norm!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"train warmup_steps must be >= 0, got {self.warmup_steps!r}")


class Accumulation(Protocol):
    """How the physical batches of one logical batch add up to one optimizer step."""

    def loss(self, losses: torch.Tensor, logical_size: int) -> torch.Tensor:
        """The scalar to backpropagate for one physical batch's per-example losses (n,), part of
        a logical batch of ``logical_size`` examples."""
        ...

    def accumulate(self) -> None:
        """After a physical batch's backward, when another of the same logical batch follows."""
        ...


class GradientAccumulation:
    """Plain training: each physical batch backpropagates its share of the logical batch's mean
    loss, sum(losses) / N, and autograd sums the gradients in ``.grad``."""

    def loss(self, losses: torch.Tensor, logical_size: int) -> torch.Tensor:
        return losses.sum() / logical_size

    def accumulate(self) -> None:
        pass


@dataclass
class TrainResult:
    steps: int
    mean_loss: float
    final_loss: float
    seconds: float
    losses: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class EvalResult:
    """``exact_match``: the share of examples whose whole target the model gets right (a causal
    LM's completion token for token, a classifier's class: its accuracy); ``metrics`` adds what
    the kind reports besides (macro-F1 of a classifier)."""

    loss: float
    exact_match: float
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


def macro_f1(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """Unweighted mean over the classes that occur (as target or prediction) of each class's F1."""
    classes = torch.unique(torch.cat([predicted, target]))
    scores = []
    for c in classes.tolist():
        tp = int(((predicted == c) & (target == c)).sum())
        fp = int(((predicted == c) & (target != c)).sum())
        fn = int(((predicted != c) & (target == c)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


def batches(data: Sequence[Item], batch_size: int, seed: int) -> Iterator[list[Item]]:
    """Endless shuffled epochs; deterministic in ``seed``."""
    if not data:
        raise ValueError("no training examples")
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(data), generator=g).tolist()
        for i in range(0, len(order), batch_size):
            yield [data[j] for j in order[i : i + batch_size]]


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def train(
    model: torch.nn.Module,
    data: Sequence[Item],
    settings: TrainSettings,
    pad_id: int,
    progress: bool = False,
    description: str = "train",
    optimizer: tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler] | None = None,
    batch_stream: Iterator[dict[str, torch.Tensor]] | None = None,
    accumulation: Accumulation | None = None,
) -> TrainResult:
    """Fine-tune the parameters that require gradients for ``settings.steps`` steps.

    ``optimizer`` replaces the default AdamW with linear warm-up (pretraining uses cosine);
    ``batch_stream`` replaces the shuffled epochs over ``data`` (DP-SGD's Poisson batches);
    ``accumulation`` how physical batches add up (default :class:`GradientAccumulation`;
    DP-SGD clips each physical batch's examples into the step). Wrappers such as DP-SGD supply
    all three and leave this loop as it is.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    device = params[0].device
    if optimizer is None:
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
        warm = settings.warmup_steps
        sched: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0
        )
    else:
        opt, sched = optimizer
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    stream = batch_stream or (collate(b, pad_id) for b in batches(data, settings.batch_size, settings.seed))
    combine = accumulation or GradientAccumulation()
    with _progress(progress) as bar:
        task = bar.add_task(description, total=settings.steps, loss=float("nan"))
        for _ in range(settings.steps):
            logical = next(stream)
            n = batch_size(logical)
            opt.zero_grad(set_to_none=True)  # before the forward: DP-SGD's per-sample grads go too
            parts = physical_batches(logical, settings.physical_batch_size)
            total = torch.zeros((), device=device)
            for i, part in enumerate(parts):
                per_example = forward(model, {k: v.to(device) for k, v in part.items()}).loss
                combine.loss(per_example, n).backward()
                total += per_example.detach().sum()
                if i < len(parts) - 1:
                    combine.accumulate()
            if settings.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            opt.step()
            sched.step()
            losses.append(float(total) / n)
            bar.update(task, advance=1, loss=losses[-1])
    seconds = time.perf_counter() - start
    model.eval()
    return TrainResult(
        steps=settings.steps,
        mean_loss=sum(losses) / len(losses) if losses else float("nan"),
        final_loss=losses[-1] if losses else float("nan"),
        seconds=seconds,
        losses=losses,
    )


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Sequence[Item], pad_id: int, batch_size: int = 128) -> EvalResult:
    """Mean per-example loss and exact match in one teacher-forced pass, plus a classifier's
    macro-F1 (its exact match is its accuracy) or a causal LM's token accuracy and perplexity
    (the exponential of the mean cross-entropy per target token)."""
    if not data:
        return EvalResult(float("nan"), 0.0, 0)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_loss, hits = 0.0, 0
    predicted: list[torch.Tensor] = []
    target: list[torch.Tensor] = []
    tokens = token_hits = 0
    token_loss = 0.0
    for i in range(0, len(data), batch_size):
        batch = {k: v.to(device) for k, v in collate(data[i : i + batch_size], pad_id).items()}
        out = forward(model, batch)
        total_loss += float(out.loss.sum())
        hits += int(out.correct.sum())
        if out.predicted is not None and out.target is not None:
            predicted.append(out.predicted.cpu())
            target.append(out.target.cpu())
        if out.tokens is not None and out.token_hits is not None:
            tokens += int(out.tokens.sum())
            token_hits += int(out.token_hits.sum())
            token_loss += float((out.loss.double() * out.tokens).sum())
    model.train(was_training)
    metrics = {"macro-f1": macro_f1(torch.cat(predicted), torch.cat(target))} if predicted else {}
    if tokens:  # a causal LM: per-token figures beside the per-example ones
        metrics |= {"token-accuracy": token_hits / tokens, "perplexity": math.exp(min(token_loss / tokens, 700.0))}
    return EvalResult(total_loss / len(data), hits / len(data), len(data), metrics)


def train_in(private: PrivateTraining, data: Sequence[Item], settings: TrainSettings, pad_id: int) -> TrainResult:
    """``settings.steps`` steps inside an open DP-SGD context (:func:`fedlora.privacy.dp.dp_sgd`):
    its hooked model, its private optimizer at a constant learning rate (the server's schedule sets
    it per round), its Poisson batches and its per-example accumulation over physical batches."""
    constant = torch.optim.lr_scheduler.LambdaLR(private.optimizer, lambda _: 1.0)
    return train(
        private.model,
        data,
        settings,
        pad_id,
        optimizer=(private.optimizer, constant),
        batch_stream=private.batches,
        accumulation=private.accumulation,
    )


@contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """Torch's global RNG forked and seeded for the block: dropout draws from it, so training is a
    function of its seed, not of what the process (a Ray worker, a comparison) ran before."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
