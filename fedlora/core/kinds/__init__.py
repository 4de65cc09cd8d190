"""The model kinds: one module each, one line each in :data:`KINDS`.

``causal-lm`` (prompt/completion and chat records), ``seq-cls`` (text classification) and
``image-cls`` (image classification). Kinds are imported by name when a run uses one, so a
causal run never loads the vision model's modules and the registry itself is cheap.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from fedlora.core import embedded

if TYPE_CHECKING:
    from fedlora.core.kinds.base import ModelKind


class KindEntry(NamedTuple):
    """Where a kind lives, what its headline metric (``exact-match`` in the metrics) is called, and
    its shipped base model (cheap to ask: the hub SDK describes a run's base model without torch)."""

    module: str
    headline: str
    default_dir: Callable[[], Path]


#: kind name -> the module defining ``KIND``, the headline metric's name in reports, the default model
KINDS: dict[str, KindEntry] = {
    "causal-lm": KindEntry("fedlora.core.kinds.causal_lm", "exact match", embedded.default_model_dir),
    "seq-cls": KindEntry("fedlora.core.kinds.seq_cls", "accuracy", embedded.default_text_model_dir),
    "image-cls": KindEntry("fedlora.core.kinds.image_cls", "accuracy", embedded.default_vision_model_dir),
}
DEFAULT_KIND = "causal-lm"


def headline(kind: str) -> str:
    """What reports call a run's headline metric: a causal LM's exact match, a classifier's accuracy
    (both are the share of examples whose whole target the model gets right). Unknown kinds (a
    run directory of a newer version) read as exact match."""
    entry = KINDS.get(kind)
    return entry.headline if entry is not None else "exact match"


#: the dtypes a base model may be loaded in (LoRA factors, heads and optimizer state stay float32)
DTYPE_NAMES = ("float32", "bfloat16", "float16")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device(device: object, what: str = "model.device") -> str:
    """``device`` as a device name (auto, cpu, cuda, cuda:N), or a ValueError naming ``what``."""
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise ValueError(f"{what} must be auto, cpu, cuda or cuda:<index>, got {device!r}")
    return device


def check_dtype(dtype: object, what: str = "model.dtype") -> str:
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"{what} must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    return str(dtype)


def run_model_dir(config: Mapping[str, Any]) -> Path:
    """The base model directory of a run config (flat keys, as a run directory's ``config.json``):
    ``model-dir``, else the shipped default of its ``model.kind``."""
    explicit = config.get("model-dir")
    if explicit:
        return Path(str(explicit))
    return KINDS[check_kind(config.get("model.kind") or DEFAULT_KIND)].default_dir()


def check_kind(name: object) -> str:
    """``name`` as a kind, or a ValueError naming the choices."""
    if not isinstance(name, str) or name not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {name!r}")
    return name


def get_kind(name: str) -> ModelKind:
    """The kind called ``name`` (its module is imported on first use)."""
    kind: ModelKind = importlib.import_module(KINDS[check_kind(name)].module).KIND
    return kind
