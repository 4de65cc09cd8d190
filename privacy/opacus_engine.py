"""Opacus' DP-SGD engine (``dp.engine = opacus``): grad-sample hooks on every trainable layer
Opacus supports, clipping and noise by Opacus' own ``DPOptimizer``.

Opacus takes the first dimension of every hooked layer's input to be the example. A model that
folds examples and positions into one dimension before a layer (OPT reshapes its hidden states
to (N T, d) before ``fc1`` and ``fc2``) gives that layer N T "per-example" gradients: Opacus
would then fail on mismatched sizes, or, when every trainable layer is such a layer, clip per
token and release an adapter whose privacy guarantee does not hold. Every step therefore checks,
before clipping, that each trainable parameter has exactly one gradient per example of the batch
the model was called on, and refuses with the layers that do not and the ones to target instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedlora.privacy.engines import HEAD_MARKER, Attached

_LORA_FACTORS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def attach(model: torch.nn.Module) -> Attached:
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    gsm.forbid_grad_accumulation()  # one Poisson batch per step, as the ledger charges (as make_private)
    batch = BatchSize()
    hook = gsm.register_forward_pre_hook(batch.record, with_kwargs=True)
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}

    def make_optimizer(optimizer: torch.optim.Optimizer, settings: dict[str, Any]) -> DPOptimizer:
        return _CheckedDPOptimizer(optimizer, model, names, batch, loss_reduction="mean", **settings)

    def close() -> None:
        hook.remove()
        gsm._close()  # removes hooks and per-sample attributes

    return Attached(gsm, make_optimizer, close)


class BatchSize:
    """How many examples the last forward pass got: the leading size of its first tensor input."""

    def __init__(self) -> None:
        self.n: int | None = None

    def record(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.ndim > 0]
        self.n = int(tensors[0].shape[0]) if tensors else None


class _CheckedDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer that first checks every per-example gradient belongs to one example."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: torch.nn.Module,
        names: Mapping[int, str],
        batch: BatchSize,
        **kwargs: Any,
    ) -> None:
        super().__init__(optimizer, **kwargs)
        self._model = model
        self._names = names
        self._batch = batch

    def clip_and_accumulate(self) -> None:
        if self._batch.n is not None:
            leading = {
                self._names.get(id(p), f"parameter {i}"): len(g)
                for i, (p, g) in enumerate(zip(self.params, self.grad_samples, strict=True))
            }
            check_per_example(leading, self._batch.n, self._model)
        super().clip_and_accumulate()


def check_per_example(leading: Mapping[str, int], batch: int, model: torch.nn.Module) -> None:
    """Refuse per-example gradients that are not one per example: ``leading`` maps each trainable
    parameter's name to the leading size of its per-example gradients, ``batch`` is the number of
    examples. The message names the layers whose sizes disagree and the ``--targets`` to use instead
    (the targeted layers that do line up, else the model's other linear layers); it is one line,
    short enough that the server's log of a client's error keeps all of it."""
    wrong: dict[str, int] = {}
    right: list[str] = []
    for name, size in leading.items():
        layer = _layer(name)
        if size != batch:
            wrong.setdefault(layer, size)
        elif HEAD_MARKER not in name and layer not in right:
            right.append(layer)
    if not wrong:
        return
    right = [layer for layer in right if layer not in wrong]
    targets = right or [n for n in _linear_layers(model) if n not in wrong]
    sizes = sorted(set(wrong.values()))
    fix = f"pass --targets {','.join(targets)} (lora-targets)" if targets else "target other layers (--targets)"
    raise ValueError(
        f"DP-SGD: per-example gradients of {', '.join(wrong)} have leading size "
        f"{', '.join(map(str, sizes))}, not the batch's {batch} (the model flattens examples before "
        f"{'these layers' if len(wrong) > 1 else 'this layer'}): {fix}, or --no-dp"
    )


def _layer(parameter: str) -> str:
    """The short name of the layer a parameter belongs to: ``fc1`` for ``...layers.0.fc1.lora_A.default.weight``,
    ``classifier`` for ``...classifier.modules_to_save.default.weight``, ``dense`` for ``...dense.weight``."""
    parts = parameter.split(".")
    for i, part in enumerate(parts):
        if i > 0 and (part in _LORA_FACTORS or part == "modules_to_save"):
            return parts[i - 1]
    return parts[-2] if len(parts) > 1 else parameter


def _linear_layers(model: torch.nn.Module) -> list[str]:
    """Short names of the base model's linear layers (LoRA's and the heads' copies left out, and
    the output layer, which PEFT's ``all-linear`` skips too), in the model's order."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    names: list[str] = []
    for full, module in model.named_modules():
        parts = full.split(".")
        if any(p in _LORA_FACTORS or p in ("modules_to_save", "original_module") for p in parts):
            continue
        if module is output or not (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"):
            continue
        short = parts[-2] if parts[-1] == "base_layer" and len(parts) > 1 else parts[-1]
        if short not in names:
            names.append(short)
    return names
