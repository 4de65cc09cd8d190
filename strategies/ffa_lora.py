"""FFA-LoRA (Federated Freeze-A): A is seeded, shared and never trained; only B is averaged.

Exact by construction: B_bar @ A == sum_k p_k B_k @ A because A is the same matrix everywhere.
Only B travels, both ways: clients rebuild A from the run seed (:func:`shared_a_state`).

A classifier's heads (PEFT's ``modules_to_save``) are not this method's business: every method's
replies carry them in full and :class:`fedlora.strategies.flower.LoraStrategy` averages them
weighted by examples (FedAvg), outside the math above.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedlora.strategies.adapter import LORA_A_SUFFIX, LoraFactors, check_clients
from fedlora.strategies.algorithms import AlgorithmDefaults, Factors, LoraAlgorithm, factor_keys
from fedlora.strategies.linalg import stable_seed
from fedlora.strategies.streaming import FactorSumAccumulator


def module_seed(seed: int, module_name: str) -> int:
    """The generator seed of one module's A: a stable hash of the run seed and the module name.

    Different modules get different A (one seed for all would correlate every layer's
    adapter); every client derives the same value without any communication.
    """
    return stable_seed(f"ffa-lora:{seed}:{module_name}")


def init_lora_A(
    shape: tuple[int, int],
    seed: int,
    module_name: str,
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The shared, frozen A of one module: PEFT's default init on a seeded generator.

    PEFT initialises ``lora_A`` with ``kaiming_uniform_(a=sqrt(5))``, i.e. U(-1/sqrt(d_in),
    1/sqrt(d_in)), from the global RNG; here the draw comes from a generator seeded by
    :func:`module_seed`, so any process rebuilds the same A. Values are drawn in float32 and
    then cast, so every dtype sees the same numbers (up to its own rounding).

    Parameters
    ----------
    shape
        (r, d_in).
    seed
        Run-wide seed shared by server and clients.
    module_name
        PEFT module name, e.g. ``base_model.model.model.layers.0.self_attn.q_proj``.
    """
    r, d_in = shape
    if r < 1 or d_in < 1:
        raise ValueError(f"module {module_name!r}: bad lora_A shape {shape}")
    a = torch.empty((r, d_in), dtype=torch.float32)
    g = torch.Generator().manual_seed(module_seed(seed, module_name))
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
    return a.to(dtype)


def ffa_lora_aggregate(
    modules_per_client: Sequence[Mapping[str, LoraFactors]], weights: Sequence[float]
) -> dict[str, LoraFactors]:
    """B_bar = sum p_k B_k; A returned bit-exactly as sent (ValueError if clients' A differ).

    One-shot form of :class:`FactorSumAccumulator` with ``trained="B"``.
    """
    check_clients(modules_per_client, weights)
    acc = FactorSumAccumulator("B")
    for modules, weight in zip(modules_per_client, weights, strict=True):
        acc.add(modules, weight)
    return acc.result()


def shared_a_state(adapter: Mapping[str, Tensor], seed: int) -> dict[str, Tensor]:
    """``adapter`` with every lora_A replaced by FFA-LoRA's seeded A; B left as it is."""
    out: dict[str, Tensor] = {}
    for k, v in adapter.items():
        if k.endswith(LORA_A_SUFFIX):
            module = k[: -len(LORA_A_SUFFIX)]
            out[k] = init_lora_A((int(v.shape[0]), int(v.shape[1])), seed, module, dtype=v.dtype)
        else:
            out[k] = v.clone()
    return out


class FfaLora(LoraAlgorithm):
    """FFA-LoRA: A drawn once from the shared seed and never trained; only B travels up and down."""

    name = "ffa-lora"
    defaults = AlgorithmDefaults(lr=1e-2, alpha=16.0)

    def initial_state(self, adapter: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return shared_a_state(adapter, self.seed)

    def trained_factors(self, server_round: int) -> Factors:
        return "B"

    def download(self, server_round: int, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """B only: clients rebuild A from the run seed (:meth:`client_adapter`)."""
        return {k: state[k] for k in factor_keys(state, "B")}

    @classmethod
    def client_adapter(
        cls, download: Mapping[str, Tensor], *, local_a: Mapping[str, Tensor], seed: int, rank: int, scaling: float
    ) -> dict[str, Tensor]:
        """The seeded A (shaped like the client's own) with the downloaded B."""
        return {**shared_a_state(local_a, seed), **download}
