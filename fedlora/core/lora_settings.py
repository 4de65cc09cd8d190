"""What a LoRA adapter looks like (rank, alpha, targets, which factors train): the settings a run
config validates, kept apart from :mod:`fedlora.core.model` so that reading a config, as every
command does, never imports PEFT, transformers or torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from peft import LoraConfig

Factors = Literal["both", "A", "B"]
ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class LoraSettings:
    """What the adapter looks like and which of its factors train."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = (ALL_LINEAR,)
    use_rslora: bool = False
    trainable: Factors = "both"
    init_seed: int = 0  # seeds lora_A's init, so every client can draw the same A

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        if self.trainable not in ("both", "A", "B"):
            raise ValueError(f"lora trainable must be 'both', 'A' or 'B', got {self.trainable!r}")
        if not self.target_modules or any(not isinstance(t, str) or not t for t in self.target_modules):
            raise ValueError(f"lora target_modules must be non-empty names, got {self.target_modules!r}")
        if ALL_LINEAR in self.target_modules and len(self.target_modules) > 1:
            raise ValueError(f"'{ALL_LINEAR}' cannot be combined with other target modules")

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)

    def peft_config(self, task_type: str | None = "CAUSAL_LM", heads: tuple[str, ...] = ()) -> LoraConfig:
        """PEFT's config; ``heads`` are trained in full and travel with the factors (a classifier's
        head, PEFT's ``modules_to_save``)."""
        from peft import LoraConfig  # lazy: PEFT (and torch) only when a model is wrapped

        targets: str | list[str] = ALL_LINEAR if self.target_modules == (ALL_LINEAR,) else list(self.target_modules)
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,  # type: ignore[arg-type]  # PEFT divides it by r; floats work
            lora_dropout=self.dropout,
            target_modules=targets,
            use_rslora=self.use_rslora,
            bias="none",
            task_type=task_type,
            modules_to_save=list(heads) or None,
            exclude_modules=list(heads) or None,  # a head trains in full, never through LoRA
        )
