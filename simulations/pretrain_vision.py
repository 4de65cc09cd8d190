"""Rebuild the embedded vision model: a tiny ViT pretrained on the digit domains that are not
held out (clean, plus shifted and thick-stroked digits as cheap variety). Seeded and offline.

    python -m fedlora.simulations.pretrain_vision --out fedlora/core/embedded/vit-digits
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from transformers import (
    AutoImageProcessor,
    BaseImageProcessor,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
)

from fedlora.core.embedded import default_vision_model_dir
from fedlora.core.image_tasks import IMAGE_SIZE, IMAGE_TASKS, LABELS
from fedlora.core.records import ImageExample

PATCH_SIZE = 4
PIXEL_MEAN = 0.5  # grey levels 0..255 -> [-1, 1]
PIXEL_STD = 0.5
LABEL2ID: dict[str, int] = {label: i for i, label in enumerate(LABELS)}


def make_processor() -> ViTImageProcessorPil:
    """Resize to ``IMAGE_SIZE`` (a no-op for the domains' images), rescale to [0, 1] and
    normalise to [-1, 1]: one grey channel, as the domains' images have. The PIL backend needs
    no torchvision; it saves as a plain ``ViTImageProcessor``."""
    return ViTImageProcessorPil(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[PIXEL_MEAN],
        image_std=[PIXEL_STD],
    )


def make_model(
    seed: int, hidden: int = 64, intermediate: int = 128, layers: int = 4, heads: int = 4, dropout: float = 0.1
) -> ViTForImageClassification:
    """ViT over 4x4 patches of a 16x16 grey image: 16 patch tokens plus [CLS]."""
    config = ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=1,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=0.0,
        id2label=dict(enumerate(LABELS)),
        label2id=LABEL2ID,
    )
    torch.manual_seed(seed)
    return ViTForImageClassification(config)


def to_tensors(processor: BaseImageProcessor, examples: Sequence[ImageExample]) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values (N, 1, S, S), labels (N,)) exactly as a client gets them from the processor."""
    pixels = processor(images=[ex.image for ex in examples], return_tensors="pt")["pixel_values"]
    labels = torch.tensor([LABEL2ID[ex.label] for ex in examples], dtype=torch.long)
    return pixels, labels


@torch.no_grad()
def accuracy(model: ViTForImageClassification, pixels: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    right = 0
    for i in range(0, len(labels), batch):
        logits = model(pixel_values=pixels[i : i + batch]).logits  # (B, 10)
        right += int((logits.argmax(-1) == labels[i : i + batch]).sum())
    return right / max(1, len(labels))


def domain_table(
    model: ViTForImageClassification, processor: BaseImageProcessor, n: int, seed: int
) -> dict[str, float]:
    """Test accuracy per domain on ``n`` fresh examples of test-split source images."""
    return {
        name: accuracy(model, *to_tensors(processor, task.examples(n, seed, "test")))
        for name, task in IMAGE_TASKS.items()
    }


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak rate."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain(
    model: ViTForImageClassification,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> float:
    """Full-model AdamW over shuffled epochs of the data; returns the mean loss of the last 100 steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps, min(100, steps // 10 + 1)))
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=gen)
    cursor = 0
    recent: list[float] = []
    model.train()
    for _ in range(steps):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(labels), generator=gen), 0
        idx = order[cursor : cursor + batch_size]
        cursor += batch_size
        loss = model(pixel_values=pixels[idx], labels=labels[idx]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        recent = [*recent[-99:], loss.item()]
    return float(np.mean(recent)) if recent else float("nan")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m fedlora.simulations.pretrain_vision", description=(__doc__ or "").split("\n\n")[0]
    )
    ap.add_argument("--out", type=Path, default=default_vision_model_dir(), help="output model directory")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--examples-per-domain", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-examples", type=int, default=1000)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console()

    # train through the processor as saved: what a client loads is what the model learnt on
    args.out.mkdir(parents=True, exist_ok=True)
    make_processor().save_pretrained(str(args.out))
    processor = AutoImageProcessor.from_pretrained(str(args.out), local_files_only=True)

    model = make_model(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    domains = [name for name, task in IMAGE_TASKS.items() if not task.held_out]
    console.print(f"tiny ViT: {n_params / 1e3:.0f}k parameters; pretraining domains: {', '.join(domains)}")

    examples = [ex for name in domains for ex in IMAGE_TASKS[name].examples(args.examples_per_domain, args.seed)]
    pixels, labels = to_tensors(processor, examples)
    start = time.perf_counter()
    final_loss = pretrain(model, pixels, labels, args.steps, args.batch_size, args.lr, args.seed)
    minutes = (time.perf_counter() - start) / 60

    table = domain_table(model, processor, args.eval_examples, args.seed + 1)
    model.save_pretrained(str(args.out))
    for path in args.out.iterdir():  # the weights are written through a private temporary file (0600)
        path.chmod(0o644)
    report: dict[str, Any] = {
        "command": f"python -m fedlora.simulations.pretrain_vision --steps {args.steps} --batch-size "
        f"{args.batch_size} --lr {args.lr} --examples-per-domain {args.examples_per_domain} --seed {args.seed} "
        f"--threads {args.threads}",
        "parameters": n_params,
        "pretraining_domains": domains,
        "minutes": round(minutes, 2),
        "final_loss": round(final_loss, 4),
        "test_accuracy": {name: round(acc, 3) for name, acc in table.items()},
    }
    (args.out / "pretrain_report.json").write_text(json.dumps(report, indent=2) + "\n")

    out = Table(title=f"test accuracy, {args.eval_examples} examples per domain")
    for column in ("domain", "held out", "accuracy"):
        out.add_column(column)
    for name, acc in table.items():
        out.add_row(name, "yes" if IMAGE_TASKS[name].held_out else "no", f"{acc:.3f}")
    console.print(out)
    console.print(f"saved to {args.out} after {minutes:.1f} min of training (final loss {final_loss:.3f})")


if __name__ == "__main__":
    main()
