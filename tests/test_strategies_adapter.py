"""The adapter wire format: PEFT keys <-> per-module factors, weights, scalings, FFA's seeded A."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from fedlora.strategies import (
    LoraFactors,
    client_proportions,
    delta_weight,
    init_lora_A,
    join_adapter,
    lora_scaling,
    module_seed,
    split_adapter,
)

Q = "base_model.model.model.layers.0.self_attn.q_proj"
V = "base_model.model.model.layers.0.self_attn.v_proj"


def _flat(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"{Q}.lora_A.weight": torch.randn(4, 8, generator=g),
        f"{Q}.lora_B.weight": torch.randn(6, 4, generator=g),
        f"{V}.lora_A.weight": torch.randn(2, 8, generator=g),
        f"{V}.lora_B.weight": torch.randn(5, 2, generator=g),
    }


def test_split_groups_by_module_and_keeps_the_tensors() -> None:
    flat = _flat()
    modules = split_adapter(flat, {Q: 2.0, V: 0.5})
    assert list(modules) == [Q, V]
    assert modules[Q].A is flat[f"{Q}.lora_A.weight"]
    assert modules[Q].B is flat[f"{Q}.lora_B.weight"]
    assert (modules[Q].rank, modules[Q].d_in, modules[Q].d_out) == (4, 8, 6)
    assert (modules[V].rank, modules[V].d_in, modules[V].d_out) == (2, 8, 5)
    assert modules[Q].scaling == 2.0 and modules[V].scaling == 0.5


def test_split_join_round_trip_is_bit_exact() -> None:
    flat = _flat(1)
    back = join_adapter(split_adapter(flat, 1.0))
    assert set(back) == set(flat)
    for key, tensor in flat.items():
        assert back[key] is tensor
    again = split_adapter(back, 1.0)
    for name, f in split_adapter(flat, 1.0).items():
        assert torch.equal(again[name].A, f.A) and torch.equal(again[name].B, f.B)


def test_split_accepts_keys_in_any_order() -> None:
    flat = _flat(2)
    reordered = dict(reversed(list(flat.items())))
    modules = split_adapter(reordered, 1.0)
    assert set(modules) == {Q, V}
    assert torch.equal(modules[Q].A, flat[f"{Q}.lora_A.weight"])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda f: f.pop(f"{Q}.lora_B.weight"), "q_proj.lora_A.weight' has no matching"),
        (lambda f: f.pop(f"{V}.lora_A.weight"), "v_proj.lora_B.weight' has no matching"),
        (lambda f: f.update({f"{Q}.lora_B.weight": torch.zeros(6, 3)}), "rank mismatch in module"),
        (lambda f: f.update({f"{Q}.lora_A.weight": torch.zeros(4, 8, 1)}), "must be a matrix"),
        (
            lambda f: f.update({"base_model.model.lm_head.weight": torch.zeros(2)}),
            "lm_head.weight' is not",
        ),
        (
            lambda f: f.update({f"{Q}.lora_A.default.weight": torch.zeros(4, 8)}),
            "not a LoRA factor",
        ),
    ],
)
def test_split_rejects_bad_adapters_naming_the_key(
    mutate: Callable[[dict[str, torch.Tensor]], object],
    message: str,
) -> None:
    flat = _flat()
    mutate(flat)
    with pytest.raises(ValueError, match=message):
        split_adapter(flat, 1.0)


def test_split_needs_a_finite_scaling_for_every_module() -> None:
    with pytest.raises(ValueError, match=f"no scaling given for module '{V}'"):
        split_adapter(_flat(), {Q: 1.0})
    with pytest.raises(ValueError, match="must be finite"):
        split_adapter(_flat(), math.nan)


def test_lora_factors_reject_inconsistent_shapes() -> None:
    with pytest.raises(ValueError, match="rank mismatch"):
        LoraFactors(A=torch.zeros(2, 3), B=torch.zeros(4, 3), scaling=1.0)
    with pytest.raises(ValueError, match="must be matrices"):
        LoraFactors(A=torch.zeros(2), B=torch.zeros(4, 2), scaling=1.0)


def test_delta_weight_and_scaling() -> None:
    f = LoraFactors(
        A=torch.tensor([[1.0, 2.0]], dtype=torch.float64),
        B=torch.tensor([[3.0], [4.0]], dtype=torch.float64),
        scaling=0.5,
    )
    expected = torch.tensor([[1.5, 3.0], [2.0, 4.0]], dtype=torch.float64)
    assert torch.equal(delta_weight(f), expected)
    assert lora_scaling(16, 8) == 2.0
    assert lora_scaling(16, 4, use_rslora=True) == 8.0
    with pytest.raises(ValueError, match="rank must be positive"):
        lora_scaling(16, 0)


def test_client_proportions() -> None:
    assert client_proportions([1, 3]) == [0.25, 0.75]
    assert client_proportions([0, 2]) == [0.0, 1.0]
    for bad in ([0, 0], [-1, 2], [math.inf, 1], [math.nan, 1]):
        with pytest.raises(ValueError, match=r"client weight|positive sum"):
            client_proportions(bad)


def test_init_lora_A_is_seeded_per_module_and_bounded() -> None:
    a1 = init_lora_A((4, 64), 7, Q)
    assert torch.equal(a1, init_lora_A((4, 64), 7, Q))
    assert not torch.equal(a1, init_lora_A((4, 64), 7, V))
    assert not torch.equal(a1, init_lora_A((4, 64), 8, Q))
    assert a1.dtype == torch.float32 and a1.shape == (4, 64)
    # kaiming_uniform_(a=sqrt(5)) is U(-1/sqrt(d_in), 1/sqrt(d_in))
    assert float(a1.abs().max()) <= 1 / math.sqrt(64)
    assert float(a1.abs().max()) > 0.8 / math.sqrt(64)
    # same numbers in every dtype: drawn in float32, then cast
    assert torch.equal(init_lora_A((4, 64), 7, Q, dtype=torch.float64), a1.double())
    assert module_seed(7, Q) == module_seed(7, Q) != module_seed(7, V)
    with pytest.raises(ValueError, match="bad lora_A shape"):
        init_lora_A((0, 64), 7, Q)


def test_init_lora_A_matches_peft_default_init() -> None:
    peft = pytest.importorskip("peft")

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = nn.Linear(12, 10)

    model = peft.get_peft_model(
        Tiny(),
        peft.LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj"]),
    )
    flat = peft.get_peft_model_state_dict(model)
    modules = split_adapter(flat, 2.0)
    (name,) = modules
    assert name == "base_model.model.q_proj"
    assert modules[name].A.shape == (3, 12) and modules[name].B.shape == (10, 3)

    layer = model.base_model.model.q_proj
    torch.manual_seed(module_seed(5, name))  # PEFT draws from the global generator
    layer.reset_lora_parameters("default", True)
    assert torch.equal(layer.lora_A["default"].weight.detach(), init_lora_A((3, 12), 5, name))
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
