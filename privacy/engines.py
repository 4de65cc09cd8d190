"""The per-example clipping engines of DP-SGD (``dp.engine``), importable without torch (CLIs)."""

from __future__ import annotations

from typing import Literal

Engine = Literal["opacus", "fused"]
#: ``opacus``: Opacus' grad-sample hooks; ``fused``: taps on the LoRA layers (:mod:`fedlora.privacy.fused`)
ENGINES: tuple[Engine, ...] = ("opacus", "fused")


def check_engine(name: object) -> Engine:
    """``name`` as an engine, or a ValueError naming the choices."""
    if name not in ENGINES:
        raise ValueError(f"dp.engine must be one of {', '.join(ENGINES)}, got {name!r}")
    return name
