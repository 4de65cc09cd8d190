"""Checks a client reply must pass before it reaches an accumulator.

A reply that fails is dropped with the reason this module returns; nothing of it is folded in.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
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


def check_array_bytes(arrays: Mapping[str, Any], max_bytes: int | None = None) -> str | None:
    """The reason to refuse a reply's serialised arrays before any is decoded, or None.

    Each must be a plain ``.npy`` (Flower's ``numpy.ndarray`` type) whose header's shape and
    dtype account for exactly the bytes sent: NumPy allocates what a header declares before
    reading, so a 60-byte array declaring 400 GB would exhaust the server's memory.
    """
    total = 0
    for key, array in arrays.items():
        stype = getattr(array, "stype", None)
        data = getattr(array, "data", None)
        if stype != "numpy.ndarray" or not isinstance(data, bytes):
            return f"array {key} is serialised as {str(stype)[:40]!r}, not numpy.ndarray"
        buf = io.BytesIO(data)
        try:
            version = np.lib.format.read_magic(buf)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(buf)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(buf)
            else:
                return f"array {key} has .npy format version {version}"
        except (ValueError, TypeError, SyntaxError, EOFError) as err:
            return f"array {key} has no readable .npy header: {str(err)[:120]}"
        if dtype.hasobject or dtype.fields is not None:
            return f"array {key} has dtype {dtype}, not a plain number type"
        declared = math.prod(shape) * dtype.itemsize
        carried = len(data) - buf.tell()
        if declared != carried:
            return f"array {key} declares {declared} bytes of data but carries {carried}"
        total += declared
    if max_bytes is not None and total > max_bytes:
        return f"payload of {total} bytes exceeds the limit of {max_bytes} bytes"
    return None


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


#: a train reply's scalar metrics the server reads, and the values each may take
_SCALARS: dict[str, tuple[str, Callable[[float], bool]]] = {
    "num-examples": ("a positive number", lambda v: v > 0),
    "partition-id": ("an integer >= 0", lambda v: v >= 0 and v == int(v)),
    "lora-rank": ("an integer >= 1", lambda v: v >= 1 and v == int(v)),
    "lora-scaling": ("a positive number", lambda v: v > 0),
    "pid": ("an integer >= 0", lambda v: v >= 0 and v == int(v)),
    "train-loss": ("a number >= 0", lambda v: v >= 0),
    "train-loss-final": ("a number >= 0", lambda v: v >= 0),
    "seconds": ("a number >= 0", lambda v: v >= 0),
    "train-seconds": ("a number >= 0", lambda v: v >= 0),
    "load-seconds": ("a number >= 0", lambda v: v >= 0),
    "epsilon": ("a number >= 0", lambda v: v >= 0),
    "delta": ("a number in [0, 1)", lambda v: 0 <= v < 1),
    "noise-multiplier": ("a number >= 0", lambda v: v >= 0),
    "sample-rate": ("a number in (0, 1]", lambda v: 0 < v <= 1),
    "dp-steps": ("an integer >= 0", lambda v: v >= 0 and v == int(v)),
}
#: the lifetime ledger a deployed client reports (public parameters only), element by element
_LISTS: dict[str, tuple[str, Callable[[float], bool]]] = {
    "ledger-noise": ("numbers >= 0", lambda v: v >= 0),
    "ledger-rate": ("numbers in (0, 1]", lambda v: 0 < v <= 1),
    "ledger-steps": ("integers >= 0", lambda v: v >= 0 and v == int(v)),
}
#: longest ledger history a reply may carry (rounds of a client's whole lifetime)
MAX_HISTORY = 100_000


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_metrics(metrics: Mapping[str, Any]) -> str | None:
    """The reason to reject a reply's metrics, or None when every value is of its kind and range.

    Every scalar must be a finite number (unknown names are allowed: a newer client may report
    more); the names the server reads must also be in range; lists are only the ledger's three,
    of equal length, at most :data:`MAX_HISTORY` long, each element in range.
    """
    for key, value in metrics.items():
        if isinstance(value, list):
            if key not in _LISTS:
                return f"metric {key!r} is a list; only {', '.join(_LISTS)} may be"
            what, ok = _LISTS[key]
            if len(value) > MAX_HISTORY:
                return f"metric {key!r} holds {len(value)} values, more than {MAX_HISTORY}"
            if not all(_is_number(v) and math.isfinite(v) and ok(v) for v in value):
                return f"metric {key!r} must hold {what}"
            continue
        if not _is_number(value) or not math.isfinite(value):
            return f"metric {key!r} must be a finite number, got {_short(value)}"
        if key in _SCALARS and not _SCALARS[key][1](value):
            return f"metric {key!r} must be {_SCALARS[key][0]}, got {_short(value)}"
    lengths = {len(v) for k, v in metrics.items() if k in _LISTS and isinstance(v, list)}
    present = [k for k in _LISTS if k in metrics]
    if present and (len(present) != len(_LISTS) or len(lengths) != 1):
        return f"the ledger metrics {', '.join(_LISTS)} must come together, of equal length"
    return None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
