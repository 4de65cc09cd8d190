"""Local LoRA fine-tuning of one adapter on one data source: the centralised baseline and
the README's first job. ``fl-client finetune`` calls :func:`run`."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fedlora.core.data import DataSpec, encode
from fedlora.core.embedded import default_model_dir
from fedlora.core.lora_settings import LoraSettings
from fedlora.core.model import (
    from_mapping,
    load_base_model,
    lora_settings_dict,
    max_positions,
    resolve_device,
    save_adapter,
    wrap_lora,
)
from fedlora.core.model_dirs import load_tokenizer
from fedlora.core.train import EvalResult, TrainResult, TrainSettings, evaluate, train


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything one local fine-tuning job needs, validated before any work starts."""

    data: DataSpec
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    model_dir: str | None = None  # None: the embedded base model
    device: str = "auto"
    threads: int = 1
    out: str = "runs/finetune"

    def __post_init__(self) -> None:
        if not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"threads must be an integer >= 1, got {self.threads!r}")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.model_dir is not None and not (Path(self.model_dir) / "config.json").is_file():
            raise FileNotFoundError(f"model directory {self.model_dir} does not exist or has no config.json")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> FinetuneConfig:
        """Build from a nested mapping (a JSON config file); unknown keys are refused."""
        sections = {"data": DataSpec, "lora": LoraSettings, "train": TrainSettings}
        top = {k: v for k, v in values.items() if k not in sections}
        nested = {k: from_mapping(c, values.get(k, {}), k) for k, c in sections.items()}
        if "data" not in values:
            raise ValueError("config: missing 'data' section (an embedded 'task' or a JSONL 'path')")
        return from_mapping(cls, {**top, **nested}, "config")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lora"] = lora_settings_dict(self.lora)
        return d


@dataclass(frozen=True)
class FinetuneResult:
    before: EvalResult
    after: EvalResult
    training: TrainResult
    adapter_dir: Path
    trainable_parameters: int


def run(cfg: FinetuneConfig, console: Console | None = None, progress: bool = True) -> FinetuneResult:
    """Evaluate the base model, fine-tune the adapter, evaluate again, save the adapter."""
    console = console or Console()
    torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    model_dir = Path(cfg.model_dir) if cfg.model_dir else default_model_dir()
    train_ex, test_ex = cfg.data.load()  # malformed data fails before any model work
    tokenizer = load_tokenizer(model_dir)
    base = load_base_model(model_dir, device)
    max_len = max_positions(base)
    train_enc = encode(tokenizer, train_ex, max_len)
    test_enc = encode(tokenizer, test_ex, max_len)
    pad = int(tokenizer.pad_token_id)

    model = wrap_lora(base, cfg.lora)  # base is on its device before PEFT wraps it
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    source = cfg.data.task or cfg.data.path
    console.print(
        f"base model {model_dir} on {device}; LoRA r={cfg.lora.rank} alpha={cfg.lora.alpha} "
        f"({n_trainable:,} trainable parameters); data {source}: {len(train_enc)} train / {len(test_enc)} test"
    )
    before = evaluate(model, test_enc, pad)
    console.print(f"exact match before: {before.exact_match:.3f} (loss {before.loss:.3f})")
    t0 = time.perf_counter()
    result = train(model, train_enc, cfg.train, pad, progress=progress, description=f"LoRA on {source}")
    after = evaluate(model, test_enc, pad)
    console.print(
        f"exact match after {cfg.train.steps} steps ({time.perf_counter() - t0:.1f} s): "
        f"{after.exact_match:.3f} (loss {after.loss:.3f})"
    )
    out = Path(cfg.out)
    adapter_dir = save_adapter(model, out / "adapter", base_model_dir=model_dir)
    metrics = {
        "before": asdict(before),
        "after": asdict(after),
        "train": {k: v for k, v in asdict(result).items() if k != "losses"},
        "losses": result.losses,
        "trainable_parameters": n_trainable,
    }
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    console.print(f"PEFT adapter written to {adapter_dir}")
    return FinetuneResult(before, after, result, adapter_dir, n_trainable)
