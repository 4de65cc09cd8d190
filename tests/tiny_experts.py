"""The tiny expert set the zero-shot tests train generators on: four tasks, rank 1 on q/v,
six steps, two checkpoints (seconds, not minutes)."""

from __future__ import annotations

from fedlora.core.lora_settings import LoraSettings
from fedlora.hub.generators.experts import ExpertConfig

TINY_TASKS = ("adddigit-3", "adddigit-5", "rotate-1", "rotate-3")
TINY = ExpertConfig(
    tasks=TINY_TASKS,
    lora=LoraSettings(rank=1, alpha=2.0, target_modules=("q_proj", "v_proj")),
    steps=6,
    checkpoints=2,
    checkpoint_every=3,
    train_examples=64,
    test_examples=16,
    task_examples=8,
)
