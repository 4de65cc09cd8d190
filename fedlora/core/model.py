"""Base models and LoRA adapters.

The base model is the embedded default or any local Hugging Face causal-LM directory. PEFT
wraps it with LoRA; the adapter travels as a flat mapping ``name -> tensor`` (PEFT's own
state-dict keys, the unit every strategy aggregates) and is stored as a PEFT directory, so
plain ``PeftModel.from_pretrained`` loads whatever this platform writes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils import ModulesToSaveWrapper
from transformers import AutoModelForCausalLM, PreTrainedModel

from fedlora.core.adapter_format import CONFIG_FILE
from fedlora.core.embedded import default_model_dir
from fedlora.core.lora_settings import ALL_LINEAR, Factors, LoraSettings
from fedlora.core.model_dirs import check_model_dir
from fedlora.privacy.engines import HEAD_MARKER


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; anything else is taken as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
    return torch.device(device)


def from_mapping(cls: Any, values: Mapping[str, Any], where: str) -> Any:
    """Build a config dataclass from a mapping, refusing keys it does not have."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**args)


def load_base_model(
    model_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """Load a causal LM from a local directory (default: the embedded model), never the hub."""
    path = Path(model_dir) if model_dir is not None else default_model_dir()
    check_model_dir(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    torch.nn.Module.to(model, resolve_device(device) if isinstance(device, str) else device)
    return model


def max_positions(model: torch.nn.Module) -> int:
    """The longest sequence the model takes (what tokenised examples are checked against)."""
    return int(getattr(getattr(model, "config", None), "max_position_embeddings", 2048))


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Short names of the linear layers LoRA can target (``q_proj``, ``c_attn``, ...)."""
    names: set[str] = set()
    for full, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D":
            names.add(full.rsplit(".", 1)[-1])
    return sorted(names)


def wrap_lora(
    model: PreTrainedModel, lora: LoraSettings, task_type: str | None = "CAUSAL_LM", heads: tuple[str, ...] = ()
) -> PeftModel:
    """Wrap ``model`` (already on its device) with LoRA and freeze what must not train.

    Freezing happens after PEFT wraps the model: flags set before wrapping are overwritten. The
    LoRA factors and the ``heads`` train in float32 whatever the base model's dtype, so the
    optimizer state and the aggregated state are float32 too.
    """
    if lora.target_modules != (ALL_LINEAR,):
        available = linear_module_names(model)
        unknown = [t for t in lora.target_modules if t not in available]
        if unknown:
            raise ValueError(f"unknown target module(s) {unknown}; this model's linear layers: {available}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(lora.init_seed)
        peft_model = get_peft_model(model, lora.peft_config(task_type, heads))
    assert isinstance(peft_model, PeftModel)
    for name, p in peft_model.named_parameters():
        if HEAD_MARKER in name and p.dtype != torch.float32:
            p.data = p.data.float()
    if heads and any(p.dtype != torch.float32 for p in peft_model.parameters() if p.is_floating_point()):
        for module in peft_model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                # a bfloat16/float16 base hands its activations to a float32 head: PEFT does the same
                # for the LoRA factors, and per-example gradients (Opacus) then see one dtype
                module.register_forward_pre_hook(_to_float32)
    set_trainable_factors(peft_model, lora.trainable)
    return peft_model


def _to_float32(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    del module
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def set_trainable_factors(model: PeftModel, trainable: Factors) -> None:
    """Train lora_A, lora_B or both, and the heads always; everything else stays frozen."""
    for name, p in model.named_parameters():
        if HEAD_MARKER in name:
            p.requires_grad_(True)
        elif ".lora_A." in name:
            p.requires_grad_(trainable in ("both", "A"))
        elif ".lora_B." in name:
            p.requires_grad_(trainable in ("both", "B"))
        else:
            p.requires_grad_(False)


def get_adapter_state(model: PeftModel, factors: Factors = "both") -> dict[str, torch.Tensor]:
    """The adapter as a flat mapping of PEFT state-dict keys to detached CPU tensors: the given
    factors, and the heads (always trained) when the model has any."""
    state = get_peft_model_state_dict(model)
    keep = {"both": (".lora_A.", ".lora_B."), "A": (".lora_A.",), "B": (".lora_B.",)}[factors]
    return {
        k: v.detach().to("cpu", copy=True)
        for k, v in state.items()
        if any(s in k for s in keep) or not any(s in k for s in (".lora_A.", ".lora_B."))
    }


def set_adapter_state(model: PeftModel, state: Mapping[str, torch.Tensor]) -> None:
    """Load a (possibly partial, e.g. B-only) flat mapping; unknown names or shapes raise."""
    current = get_peft_model_state_dict(model)
    unknown = sorted(set(state) - set(current))
    if unknown:
        raise KeyError(f"adapter has unknown tensor name(s): {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(current[k].shape):
            raise ValueError(f"adapter tensor {k} has shape {tuple(v.shape)}, expected {tuple(current[k].shape)}")
    result = set_peft_model_state_dict(model, dict(state))
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected:
        raise KeyError(f"PEFT did not accept adapter tensor(s): {unexpected[:5]}")


def set_base_deltas(model: PeftModel, deltas: Mapping[str, torch.Tensor], pristine: dict[str, torch.Tensor]) -> None:
    """Make each named LoRA layer's base weight ``pristine + delta`` (FedEx-LoRA's residual).

    ``pristine`` keeps the original weights of every layer ever touched, so a later state with
    other (or no) deltas restores them exactly instead of adding residuals up.
    """
    if not deltas and not pristine:
        return
    modules = dict(model.named_modules())
    for name in set(deltas) | set(pristine):
        weight = modules[name].base_layer.weight
        assert isinstance(weight, torch.Tensor)
        if name not in pristine:
            pristine[name] = weight.detach().clone()
        base = pristine[name]
        with torch.no_grad():
            weight.copy_(base + deltas[name].to(base.dtype) if name in deltas else base)


def save_adapter(model: PeftModel, out_dir: str | Path, base_model_dir: str | Path | None = None) -> Path:
    """Write a PEFT directory (adapter_config.json + adapter_model.safetensors)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if base_model_dir is not None:
        model.peft_config["default"].base_model_name_or_path = str(base_model_dir)
    model.save_pretrained(str(out))
    return out


def load_adapter(model: PreTrainedModel, adapter_dir: str | Path, is_trainable: bool = False) -> PeftModel:
    """Load a PEFT adapter directory onto a base model, as any PEFT user would."""
    path = Path(adapter_dir)
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a PEFT adapter directory (no {CONFIG_FILE})")
    return PeftModel.from_pretrained(model, str(path), is_trainable=is_trainable)


def lora_settings_dict(lora: LoraSettings) -> dict[str, Any]:
    d = asdict(lora)
    d["target_modules"] = list(lora.target_modules)
    return d
