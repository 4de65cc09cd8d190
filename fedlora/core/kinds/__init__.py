"""The model kinds: one module each, one line each in :data:`KINDS`.

``causal-lm`` (prompt/completion and chat records), ``seq-cls`` (text classification) and
``image-cls`` (image classification). Kinds are imported by name when a run uses one, so a
causal run never loads the vision model's modules and the registry itself is cheap.
"""

from __future__ import annotations

import importlib
import re
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from fedlora.core.kinds.base import ModelKind


class KindEntry(NamedTuple):
    """Where a kind lives and what its headline metric (``exact-match`` in the metrics) is called."""

    module: str
    headline: str


#: kind name -> the module defining ``KIND``, and the headline metric's name in reports
KINDS: dict[str, KindEntry] = {
    "causal-lm": KindEntry("fedlora.core.kinds.causal_lm", "exact match"),
    "seq-cls": KindEntry("fedlora.core.kinds.seq_cls", "accuracy"),
    "image-cls": KindEntry("fedlora.core.kinds.image_cls", "accuracy"),
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


def check_kind(name: object) -> str:
    """``name`` as a kind, or a ValueError naming the choices."""
    if not isinstance(name, str) or name not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {name!r}")
    return name


def get_kind(name: str) -> ModelKind:
    """The kind called ``name`` (its module is imported on first use)."""
    kind: ModelKind = importlib.import_module(KINDS[check_kind(name)].module).KIND
    return kind
