"""LoRA adapters as named tensors: the wire format and the per-module view the math uses.

A client adapter travels as the flat mapping returned by ``peft.get_peft_model_state_dict``
(``<module>.lora_A.weight`` of shape r x d_in, ``<module>.lora_B.weight`` of shape d_out x r).
The aggregation math works per module on :class:`LoraFactors`, which also carries the
module's scaling s (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA) so that the update a
module adds to its base weight is ``s * B @ A``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"


@dataclass(frozen=True, eq=False)
class LoraFactors:
    """One LoRA module: ``A`` (r x d_in), ``B`` (d_out x r) and the scaling s.

    ``eq=False`` because tensors have no single truth value; compare factors with
    ``torch.equal`` on the fields.
    """

    A: Tensor  # r x d_in
    B: Tensor  # d_out x r
    scaling: float

    def __post_init__(self) -> None:
        if self.A.ndim != 2 or self.B.ndim != 2:
            shapes = f"A {tuple(self.A.shape)} and B {tuple(self.B.shape)}"
            raise ValueError(f"LoRA factors must be matrices, got {shapes}")
        if self.B.shape[1] != self.A.shape[0]:
            raise ValueError(
                f"rank mismatch: B {tuple(self.B.shape)} has {self.B.shape[1]} columns "
                f"but A {tuple(self.A.shape)} has {self.A.shape[0]} rows"
            )
        if not math.isfinite(self.scaling):
            raise ValueError(f"scaling must be finite, got {self.scaling}")

    @property
    def rank(self) -> int:
        """The LoRA rank r."""
        return int(self.A.shape[0])

    @property
    def d_in(self) -> int:
        """Input features of the adapted layer."""
        return int(self.A.shape[1])

    @property
    def d_out(self) -> int:
        """Output features of the adapted layer."""
        return int(self.B.shape[0])


def lora_scaling(alpha: float, r: int, *, use_rslora: bool = False) -> float:
    """PEFT's scaling s: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    if r <= 0:
        raise ValueError(f"rank must be positive, got {r}")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def split_adapter(
    flat: Mapping[str, Tensor],
    scaling: float | Mapping[str, float],
) -> dict[str, LoraFactors]:
    """Group a flat PEFT state dict into per-module factors.

    Parameters
    ----------
    flat
        ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` -> tensor, as returned by
        ``get_peft_model_state_dict``.
    scaling
        One scaling for every module, or module name -> scaling (PEFT's ``rank_pattern`` /
        ``alpha_pattern`` give modules different scalings).

    Returns
    -------
    dict
        Module name (the key prefix) -> :class:`LoraFactors`, in the order modules first
        appear in ``flat``.

    Raises
    ------
    ValueError
        Naming the key, for keys that are not LoRA factors, unpaired factors, factors that
        are not matrices, ranks that disagree, or a module missing from ``scaling``.
    """
    a_of: dict[str, Tensor] = {}
    b_of: dict[str, Tensor] = {}
    order: dict[str, None] = {}
    for key, tensor in flat.items():
        if key.endswith(LORA_A_SUFFIX):
            module = key[: -len(LORA_A_SUFFIX)]
            a_of[module] = tensor
        elif key.endswith(LORA_B_SUFFIX):
            module = key[: -len(LORA_B_SUFFIX)]
            b_of[module] = tensor
        else:
            raise ValueError(
                f"{key!r} is not a LoRA factor: expected a key ending in "
                f"{LORA_A_SUFFIX!r} or {LORA_B_SUFFIX!r}, as get_peft_model_state_dict returns"
            )
        order[module] = None

    modules: dict[str, LoraFactors] = {}
    for module in order:
        key_a, key_b = module + LORA_A_SUFFIX, module + LORA_B_SUFFIX
        if module not in b_of:
            raise ValueError(f"{key_a!r} has no matching {key_b!r}")
        if module not in a_of:
            raise ValueError(f"{key_b!r} has no matching {key_a!r}")
        a, b = a_of[module], b_of[module]
        if a.ndim != 2:
            raise ValueError(f"{key_a!r} must be a matrix (r x d_in), got shape {tuple(a.shape)}")
        if b.ndim != 2:
            raise ValueError(f"{key_b!r} must be a matrix (d_out x r), got shape {tuple(b.shape)}")
        if b.shape[1] != a.shape[0]:
            raise ValueError(
                f"rank mismatch in module {module!r}: {key_b!r} has shape {tuple(b.shape)} "
                f"but {key_a!r} has shape {tuple(a.shape)}"
            )
        if isinstance(scaling, Mapping):
            if module not in scaling:
                raise ValueError(f"no scaling given for module {module!r}")
            s = float(scaling[module])
        else:
            s = float(scaling)
        if not math.isfinite(s):
            raise ValueError(f"scaling of module {module!r} must be finite, got {s}")
        modules[module] = LoraFactors(A=a, B=b, scaling=s)
    return modules


def join_adapter(modules: Mapping[str, LoraFactors]) -> dict[str, Tensor]:
    """Inverse of :func:`split_adapter`: the flat PEFT state dict (same tensor objects)."""
    flat: dict[str, Tensor] = {}
    for module, factors in modules.items():
        flat[module + LORA_A_SUFFIX] = factors.A
        flat[module + LORA_B_SUFFIX] = factors.B
    return flat


def delta_weight(factors: LoraFactors) -> Tensor:
    """The update ``s * B @ A`` (d_out x d_in) the module adds to an ``nn.Linear`` weight."""
    return factors.scaling * (factors.B @ factors.A)


def product_inner(f: LoraFactors, g: LoraFactors) -> float:
    """<s_f B_f A_f, s_g B_g A_g> (Frobenius) = s_f s_g tr((B_f^T B_g)(A_g A_f^T)): r x r
    products only, never the d_out x d_in matrices, in float64."""
    bf, af, bg, ag = (t.detach().to(torch.float64) for t in (f.B, f.A, g.B, g.A))
    return f.scaling * g.scaling * float(torch.trace((bf.T @ bg) @ (ag @ af.T)))


def product_distance(ours: Mapping[str, LoraFactors], theirs: Mapping[str, LoraFactors]) -> float:
    """||s B A - s' B' A'||_F over every module of either side (a module missing on one side
    counts as zero there): how far one adapter moves the model from another, whatever the
    ranks and scalings of the two."""
    total = 0.0
    for name in ours.keys() | theirs.keys():
        f, g = ours.get(name), theirs.get(name)
        total += product_inner(f, f) if f is not None else 0.0
        total += product_inner(g, g) if g is not None else 0.0
        total -= 2.0 * product_inner(f, g) if f is not None and g is not None else 0.0
    return math.sqrt(max(total, 0.0))  # rounding can leave a tiny negative for equal adapters


def client_proportions(weights: Sequence[float]) -> list[float]:
    """p_k = n_k / sum(n), after checking that the weights can be normalised."""
    checked = [check_weight(w) for w in weights]
    total = math.fsum(checked)
    if total <= 0.0:
        raise ValueError(f"client weights must have a positive sum, got {list(weights)}")
    return [w / total for w in checked]


def check_weight(weight: float) -> float:
    """A client's weight (its number of examples) as a finite, non-negative float."""
    w = float(weight)
    if not math.isfinite(w) or w < 0.0:
        raise ValueError(f"a client weight must be finite and non-negative, got {weight}")
    return w


def check_clients(
    modules_per_client: Sequence[Mapping[str, LoraFactors]],
    weights: Sequence[float],
) -> None:
    """Reject one-shot inputs whose lengths disagree or that have no client at all."""
    if len(modules_per_client) != len(weights):
        n_adapters, n_weights = len(modules_per_client), len(weights)
        raise ValueError(f"got {n_adapters} client adapters but {n_weights} weights")
    if not modules_per_client:
        raise ValueError("cannot aggregate zero clients")


def as_float64(t: Tensor) -> Tensor:
    """A float64 view of the math (no copy when already float64)."""
    return t.to(torch.float64)
