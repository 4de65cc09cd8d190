"""Checks a client reply must pass before it reaches an accumulator.

A reply that fails is dropped with the reason this module returns; nothing of it is folded in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TensorSpec:
    """What the server expects under one key. ``shape`` entries of -1 accept any size."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def matches(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.shape) and all(e in (-1, s) for e, s in zip(self.shape, shape, strict=True))


def payload_bytes(tensors: Mapping[str, Tensor]) -> int:
    """Bytes of tensor data in a reply."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def check_reply(
    tensors: Mapping[str, Tensor], expected: Mapping[str, TensorSpec], max_bytes: int | None = None
) -> str | None:
    """The reason to reject ``tensors``, or None when they are acceptable.

    Checks, in order: payload size, missing names, unknown names, shapes, dtypes, finiteness.
    """
    size = payload_bytes(tensors)
    if max_bytes is not None and size > max_bytes:
        return f"payload of {size} bytes exceeds the limit of {max_bytes} bytes"
    missing = [k for k in expected if k not in tensors]
    if missing:
        return f"missing tensor(s): {_names(missing)}"
    unknown = [k for k in tensors if k not in expected]
    if unknown:
        return f"unknown tensor name(s): {_names(unknown)}"
    for key, spec in expected.items():
        t = tensors[key]
        if not spec.matches(tuple(t.shape)):
            return f"tensor {key} has shape {tuple(t.shape)}, expected {spec.shape}"
        if t.dtype != spec.dtype:
            return f"tensor {key} has dtype {t.dtype}, expected {spec.dtype}"
        if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            return f"tensor {key} has non-finite values"
    return None


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
