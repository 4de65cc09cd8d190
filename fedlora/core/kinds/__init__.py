"""The model kinds: one module each, one line each in :data:`KINDS`.

``causal-lm`` (prompt/completion and chat records), ``seq-cls`` (text classification) and
``image-cls`` (image classification). Kinds are imported by name when a run uses one, so a
causal run never loads the vision model's modules and the registry itself is cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedlora.core.kinds.base import ModelKind

#: kind name -> the module defining ``KIND``
KINDS: dict[str, str] = {
    "causal-lm": "fedlora.core.kinds.causal_lm",
    "seq-cls": "fedlora.core.kinds.seq_cls",
    "image-cls": "fedlora.core.kinds.image_cls",
}
DEFAULT_KIND = "causal-lm"


def check_kind(name: object) -> str:
    """``name`` as a kind, or a ValueError naming the choices."""
    if not isinstance(name, str) or name not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {name!r}")
    return name


def get_kind(name: str) -> ModelKind:
    """The kind called ``name`` (its module is imported on first use)."""
    kind: ModelKind = importlib.import_module(KINDS[check_kind(name)]).KIND
    return kind
