"""What every generator is and how it is stored: ``generator.json`` (method, base model,
adapter layout, the experts it learned from, its text embedder, settings) and
``generator.safetensors`` (its network and the arrays it conditions on). No pickles: a
generator pulled from a hub is data, never code."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any, ClassVar

import torch
from safetensors.torch import save as save_safetensors

from fedlora.core.tasks import Example
from fedlora.hub.generators.cvae import ConvCVAE, CVAESettings, FitResult
from fedlora.hub.generators.embedding import TextEmbedder
from fedlora.hub.generators.library import ExpertLibrary, Layout
from fedlora.hub.sdk.manifest import GENERATOR_CONFIG_FILE, GENERATOR_FORMAT_VERSION, GENERATOR_WEIGHTS_FILE, BaseModel


class Generator(ABC):
    """A trained map from a task (description, examples) to a flat LoRA vector."""

    method: ClassVar[str]

    def __init__(
        self,
        layout: Layout,
        base_model: BaseModel,
        experts: Sequence[str],
        embedder: TextEmbedder,
        settings: CVAESettings,
        cvae: ConvCVAE,
        training: Mapping[str, Any] | None = None,
    ) -> None:
        self.layout, self.base_model, self.experts = layout, base_model, list(experts)
        self.embedder, self.settings, self.cvae = embedder, settings, cvae
        self.training = dict(training or {})
        self.task_model: Any = None  # (model, tokenizer) of the base model, for hidden-state task vectors

    @classmethod
    @abstractmethod
    def fit(cls, library: ExpertLibrary, settings: CVAESettings, **options: Any) -> Generator: ...

    @abstractmethod
    def generate_vector(self, description: str, examples: Sequence[Example] = ()) -> torch.Tensor:
        """The flat adapter (D,) for a task."""

    @abstractmethod
    def arrays(self) -> dict[str, torch.Tensor]:
        """Everything besides the CVAE's weights that generation needs."""

    @abstractmethod
    def options(self) -> dict[str, Any]:
        """The method's own JSON settings."""

    @classmethod
    @abstractmethod
    def keywords(cls, arrays: dict[str, torch.Tensor], options: Mapping[str, Any]) -> dict[str, Any]:
        """The method's own constructor keywords, from its stored arrays and options."""

    @classmethod
    def restore(
        cls, common: dict[str, Any], cvae: ConvCVAE, arrays: dict[str, torch.Tensor], options: Mapping[str, Any]
    ) -> Generator:
        c, keywords = common, cls.keywords(arrays, options)
        return cls(
            c["layout"], c["base_model"], c["experts"], c["embedder"], c["settings"], cvae, c["training"], **keywords
        )

    @property
    def needs_base_model(self) -> bool:
        return False

    def generate(self, description: str, examples: Sequence[Example] = ()) -> dict[str, bytes]:
        """A PEFT adapter directory's files for a task."""
        vector = self.generate_vector(description, examples)
        return self.layout.adapter_files(vector, self.base_model.id)

    def record_fit(self, fit: FitResult, library: ExpertLibrary) -> None:
        self.training = {
            **asdict(fit),
            "experts": len(library.experts),
            "checkpoints": sum(int(e.checkpoints.shape[0]) for e in library.experts),
            "parameters": sum(p.numel() for p in self.cvae.parameters()),
        }

    def to_files(self) -> dict[str, bytes]:
        config = {
            "format": "fedlora-generator",
            "format_version": GENERATOR_FORMAT_VERSION,
            "method": self.method,
            "base_model": asdict(self.base_model),
            "layout": self.layout.to_dict(),
            "experts": self.experts,
            "embedder": self.embedder.state(),
            "settings": asdict(self.settings),
            "cvae": {"length": self.cvae.length, "seq_channels": self.cvae.seq_channels, "vec_dim": self.cvae.vec_dim},
            "options": self.options(),
            "training": self.training,
        }
        tensors = {f"cvae.{k}": v.detach().contiguous() for k, v in self.cvae.state_dict().items()}
        tensors.update({f"arrays.{k}": v.detach().to(torch.float32).contiguous() for k, v in self.arrays().items()})
        return {
            GENERATOR_CONFIG_FILE: (json.dumps(config, sort_keys=True) + "\n").encode(),
            GENERATOR_WEIGHTS_FILE: save_safetensors(tensors, metadata={"format": "pt"}),
        }


def per_tensor(vector: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """Views of a flat (..., D) vector, one per tensor of the layout."""
    return [vector[..., sl] for sl in layout.slices]


def expand_per_tensor(values: torch.Tensor, layout: Layout) -> torch.Tensor:
    """(..., T) per-tensor values -> (..., D), each repeated over its tensor."""
    sizes = torch.tensor([sl.stop - sl.start for sl in layout.slices])
    return torch.repeat_interleave(values, sizes, dim=-1)
