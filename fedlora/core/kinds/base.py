"""What a model kind is: how the platform loads, encodes and scores one family of models.

Everything else (training, DP-SGD, the strategies, the hub) is kind-agnostic: it sees a model,
encoded items (:data:`fedlora.core.data.Item`) and a flat adapter state whose non-LoRA entries are
the kind's trainable heads (PEFT's ``modules_to_save``). A new kind is one module here plus one
line in :mod:`fedlora.core.kinds`.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fedlora.core.data import Item
from fedlora.core.model_dirs import check_model_dir
from fedlora.core.records import Record

if TYPE_CHECKING:  # the model classes cost seconds to import; validation never needs them
    from transformers import PreTrainedModel

#: the dtypes a run may load its base model in (the LoRA factors and heads always train in fp32)
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Encoding:
    """A kind's encoded records and how many of them were cut to the maximum length."""

    items: list[Item]
    truncated: int = 0


class ModelKind(ABC):
    """One family of models: causal LMs, text classifiers, image classifiers."""

    name: ClassVar[str]
    #: PEFT's task type (None: PEFT's generic model; the head then is named in ``modules_to_save``)
    peft_task_type: ClassVar[str | None]
    #: the embedded tasks a run of this kind uses by default
    default_tasks: ClassVar[str]
    classifier: ClassVar[bool] = True

    @abstractmethod
    def default_model_dir(self) -> Path:
        """The base model shipped with the project (or a wheel it depends on)."""

    @abstractmethod
    def task_names(self) -> Sequence[str]:
        """The embedded tasks of this kind."""

    @abstractmethod
    def auto_class(self) -> Any:
        """The transformers Auto class that loads this kind's models."""

    @abstractmethod
    def load_processor(self, path: Path) -> Any:
        """The tokenizer or image processor saved with the model."""

    @abstractmethod
    def encode(
        self, processor: Any, records: Sequence[Record], labels: Sequence[str], limit: int, truncate: bool
    ) -> Encoding:
        """Turn records into items of at most ``limit`` positions: a longer record is cut (and
        counted) when ``truncate``, refused otherwise, naming the ``--max-length`` to pass."""

    def pad_id(self, processor: Any) -> int:
        pad = getattr(processor, "pad_token_id", None)
        return int(pad) if pad is not None else 0

    def model_kwargs(self, labels: Sequence[str]) -> dict[str, Any]:
        """Extra ``from_pretrained`` arguments (a classifier's label space)."""
        if not self.classifier:
            return {}
        return {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)},
            "ignore_mismatched_sizes": True,  # a head for another label space is replaced
        }

    def load_model(
        self, path: Path, device: torch.device, dtype: torch.dtype, labels: Sequence[str], seed: int = 0
    ) -> PreTrainedModel:
        """The base model on ``device`` in ``dtype``, from a local directory only. A classifier's
        new head is initialised from ``seed``, so every party builds the same one."""
        check_model_dir(path)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.auto_class().from_pretrained(
                str(path), local_files_only=True, dtype=dtype, **self.model_kwargs(labels)
            )
        torch.nn.Module.to(model, device)
        return model

    def head_modules(self, model: torch.nn.Module) -> tuple[str, ...]:
        """Short names of the modules trained in full besides LoRA (the classification head)."""
        if not self.classifier:
            return ()
        heads = tuple(n for n in ("classifier", "score") if isinstance(getattr(model, n, None), torch.nn.Module))
        if not heads:
            raise ValueError(f"{type(model).__name__} has no 'classifier' or 'score' head to train")
        return heads

    def max_positions(self, model: torch.nn.Module) -> int:
        config = getattr(model, "config", None)
        return int(getattr(config, "max_position_embeddings", 0) or 2048)
