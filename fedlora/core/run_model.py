"""A run's base model with its LoRA adapter, built the same way by every party: the server, each
client, personalisation and the centralised baseline.

The kind (``model.kind``) picks the Auto class, the processor and the heads; ``model.device`` and
``model.dtype`` where and in what precision the frozen base weights live; the label space of a
classifier comes from :func:`fedlora.core.client_data.run_labels`, so every party builds the same
head from the same seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel

from fedlora.core.client_data import run_labels
from fedlora.core.config import FederationConfig
from fedlora.core.kinds import get_kind
from fedlora.core.kinds.base import DTYPES, Encoding, ModelKind
from fedlora.core.lora_settings import LoraSettings
from fedlora.core.model import resolve_device, wrap_lora
from fedlora.core.records import Record


@dataclass
class RunModel:
    """The wrapped model and what encodes data for it."""

    model: PeftModel
    processor: Any  # a tokenizer or an image processor
    kind: ModelKind
    labels: tuple[str, ...]
    max_length: int  # the run's model.max-length (0: the model's own limit, refusing longer records)

    @property
    def pad_id(self) -> int:
        return self.kind.pad_id(self.processor)

    def encode(self, records: Sequence[Record]) -> Encoding:
        """Items for this model; longer than ``model.max-length`` is truncated, longer than the
        model's own limit (without a max-length) refused with the length to pass."""
        limit = self.max_length or self.kind.max_positions(self.model)
        return self.kind.encode(self.processor, records, self.labels, limit, truncate=self.max_length > 0)


def run_device(cfg: FederationConfig) -> torch.device:
    """Where this process puts the model: ``model.device`` (auto: a GPU this process sees, as
    Ray assigns them to virtual clients with ``--gpus-per-client``, else the CPU)."""
    return resolve_device(cfg.model.device)


def load_run_model(cfg: FederationConfig, lora: LoraSettings, device: torch.device | None = None) -> RunModel:
    """The base model of the run's kind, on its device and in its dtype, wrapped with ``lora``."""
    kind = get_kind(cfg.model.kind)
    path = cfg.base_model_dir()
    labels = run_labels(cfg)
    if kind.classifier and len(labels) < 2:
        raise ValueError(f"a {kind.name} run needs at least 2 labels, got {list(labels)} (set model.labels)")
    processor = kind.load_processor(path)
    base = kind.load_model(path, device or run_device(cfg), DTYPES[cfg.model.dtype], labels, seed=cfg.seed)
    config = getattr(base, "config", None)
    if kind.classifier and config is not None and getattr(config, "pad_token_id", None) is None:
        # a decoder classifier pools the last non-pad token: it must know which id pads
        config.pad_token_id = kind.pad_id(processor)
    model = wrap_lora(base, lora, kind.peft_task_type, kind.head_modules(base))
    return RunModel(model, processor, kind, labels, cfg.model.max_length)
