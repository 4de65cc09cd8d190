"""The per-example clipping engines of DP-SGD (``dp.engine``): a registry importable without torch.

An engine is one module plus one line here. The module defines ``attach(model) -> Attached``:
the model to call (hooked or tapped), a factory for the private optimizer, and what removes the
hooks. Engines are imported by name when a run uses them (they pull in torch and Opacus), so the
CLIs can list and check engine names cheaply.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any, NamedTuple

Engine = str

#: in a PEFT model's parameter names, what marks a module trained in full besides LoRA (PEFT's
#: ``modules_to_save``: a classifier's head), which an engine clips like any other parameter
HEAD_MARKER = ".modules_to_save."

#: engine name -> the module implementing it. ``opacus``: Opacus' grad-sample hooks;
#: ``fused``: taps on the LoRA layers (:mod:`fedlora.privacy.fused`)
ENGINES: dict[str, str] = {
    "opacus": "fedlora.privacy.opacus_engine",
    "fused": "fedlora.privacy.fused",
}


class Attached(NamedTuple):
    """An engine attached to a model for one local run."""

    model: Any  # torch.nn.Module: what the training loop calls
    make_optimizer: Callable[[Any, dict[str, Any]], Any]  # (optimizer, DPOptimizer settings) -> DPOptimizer
    close: Callable[[], None]  # removes the hooks (also when the optimizer could not be built)


def check_engine(name: object) -> Engine:
    """``name`` as an engine, or a ValueError naming the choices."""
    if not isinstance(name, str) or name not in ENGINES:
        raise ValueError(f"dp.engine must be one of {', '.join(ENGINES)}, got {name!r}")
    return name


def load_engine(name: str) -> ModuleType:
    """The module of engine ``name`` (imported by name: engines pull in torch and Opacus)."""
    return importlib.import_module(ENGINES[check_engine(name)])
