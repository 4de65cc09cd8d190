"""Oracle tests of the aggregation math: hand-computed examples and the identities of ALGORITHMS.md.

The hand examples share two clients with weights 1 and 3 (p = 1/4, 3/4) and small integer
factors, so every expected value below is exact in float64.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor, nn

from fedlora.strategies import (
    LoraFactors,
    LoraFairConfig,
    aggregation_error,
    aggregation_residual,
    apply_base_delta,
    fedavg_lora_aggregate,
    fedex_lora_aggregate,
    fedsvd_aggregate,
    ffa_lora_aggregate,
    flexlora_aggregate,
    flexlora_client_factors,
    lora_fair_aggregate,
    lora_fair_correction_closed_form,
    lora_fair_correction_iterative,
    lora_fair_objective,
    rolora_aggregate,
    rolora_trained_factor,
)
from fedlora.strategies.linalg import refactor_orthonormal, thin_svd

F64 = torch.float64
WEIGHTS = [1.0, 3.0]


def t(rows: list[list[float]]) -> Tensor:
    return torch.tensor(rows, dtype=F64)


# Client 1 and client 2 of the hand examples, one module "m", scaling 2.
A1, A2 = t([[1, 0], [0, 1]]), t([[5, 4], [0, 1]])
B1, B2 = t([[1, 2], [3, 4]]), t([[1, 0], [-1, 4]])
# By hand: A_bar = (A1 + 3 A2) / 4, B_bar = (B1 + 3 B2) / 4, T = (B1 A1 + 3 B2 A2) / 4.
A_BAR, B_BAR = t([[4, 3], [0, 1]]), t([[1, 0.5], [0, 4]])
T_HAND = t([[4, 3.5], [-3, 1]])  # B1 A1 = [[1,2],[3,4]], B2 A2 = [[5,4],[-5,0]]
E_HAND = t([[0, 0], [3, 3]])  # B_bar A_bar - T = [[4,3.5],[0,4]] - T


def hand_clients(
    a1: Tensor = A1,
    a2: Tensor = A2,
    b1: Tensor = B1,
    b2: Tensor = B2,
) -> list[dict[str, LoraFactors]]:
    return [
        {"m": LoraFactors(A=a1, B=b1, scaling=2.0)},
        {"m": LoraFactors(A=a2, B=b2, scaling=2.0)},
    ]


def random_clients(
    seed: int,
    k: int,
    shapes: dict[str, tuple[int, int, int]],
    *,
    same_a: bool = False,
    same_b: bool = False,
    scaling: float = 2.0,
    dtype: torch.dtype = F64,
) -> tuple[list[dict[str, LoraFactors]], list[float]]:
    """K clients; shapes maps module -> (d_out, r, d_in)."""
    g = torch.Generator().manual_seed(seed)
    shared = {}
    for m, (do, r, di) in shapes.items():
        shared[m] = (torch.randn(r, di, generator=g), torch.randn(do, r, generator=g))
    clients = []
    for _ in range(k):
        modules = {}
        for m, (do, r, di) in shapes.items():
            a = shared[m][0] if same_a else torch.randn(r, di, generator=g)
            b = shared[m][1] if same_b else torch.randn(do, r, generator=g)
            modules[m] = LoraFactors(A=a.to(dtype), B=b.to(dtype), scaling=scaling)
        clients.append(modules)
    weights = [float(w) for w in torch.randint(1, 50, (k,), generator=g)]
    return clients, weights


def reference_products(
    clients: list[dict[str, LoraFactors]],
    weights: list[float],
    name: str,
) -> tuple[Tensor, ...]:
    """A_bar, B_bar, T of one module, straight from the definitions, in float64."""
    p = [w / sum(weights) for w in weights]
    a_bar = sum(pk * c[name].A.double() for pk, c in zip(p, clients, strict=True))
    b_bar = sum(pk * c[name].B.double() for pk, c in zip(p, clients, strict=True))
    assert isinstance(a_bar, Tensor) and isinstance(b_bar, Tensor)
    return a_bar, b_bar, ideal_product(clients, weights, name)


def ideal_product(clients: list[dict[str, LoraFactors]], weights: list[float], name: str) -> Tensor:
    """T = sum_k p_k B_k A_k of one module, in float64."""
    target = torch.zeros(clients[0][name].d_out, clients[0][name].d_in, dtype=F64)
    for w, c in zip(weights, clients, strict=True):
        target += (w / sum(weights)) * c[name].B.double() @ c[name].A.double()
    return target


SHAPES = [
    {"q": (6, 2, 5)},
    {"q": (8, 3, 8), "v": (4, 1, 9)},  # a square module and a wide one
    {"q": (3, 3, 7)},  # r = d_out
]
SEEDS = [0, 1, 2]


# --- FedAvg-LoRA -------------------------------------------------------------------------


def test_fedavg_hand_example() -> None:
    out = fedavg_lora_aggregate(hand_clients(), WEIGHTS)["m"]
    assert torch.equal(out.A, A_BAR)
    assert torch.equal(out.B, B_BAR)
    assert out.scaling == 2.0
    # ||E||^2 = 18, ||T||^2 = 16 + 12.25 + 9 + 1 = 38.25, error = sqrt(18 / 38.25) = sqrt(8 / 17)
    err = aggregation_error(hand_clients(), WEIGHTS)
    assert err.per_module["m"] == pytest.approx(math.sqrt(8 / 17), rel=1e-15)
    assert err.overall == pytest.approx(math.sqrt(8 / 17), rel=1e-15)
    assert torch.equal(aggregation_residual(hand_clients(), WEIGHTS)["m"], E_HAND)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shapes", SHAPES)
def test_fedavg_error_identity(seed: int, shapes: dict[str, tuple[int, int, int]]) -> None:
    clients, weights = random_clients(seed, 4, shapes)
    out = fedavg_lora_aggregate(clients, weights)
    resid = aggregation_residual(clients, weights)
    err = aggregation_error(clients, weights)
    for name in shapes:
        a_bar, b_bar, target = reference_products(clients, weights, name)
        torch.testing.assert_close(out[name].A, a_bar, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(out[name].B, b_bar, rtol=1e-13, atol=1e-13)
        # B_bar A_bar - T = -sum p_k (B_k - B_bar)(A_k - A_bar)
        torch.testing.assert_close(b_bar @ a_bar - target, resid[name], rtol=1e-12, atol=1e-12)
        expected = float(torch.linalg.norm(b_bar @ a_bar - target) / torch.linalg.norm(target))
        assert err.per_module[name] == pytest.approx(expected, rel=1e-10)
        assert err.per_module[name] > 0.01  # random factors: far from exact


@pytest.mark.parametrize("same", ["A", "B"])
def test_fedavg_error_vanishes_when_one_factor_is_shared(same: str) -> None:
    clients, weights = random_clients(
        3,
        5,
        {"q": (7, 2, 6)},
        same_a=same == "A",
        same_b=same == "B",
    )
    assert aggregation_error(clients, weights).overall < 1e-14
    assert float(aggregation_residual(clients, weights)["q"].abs().max()) < 1e-14


# --- FFA-LoRA ----------------------------------------------------------------------------


def test_ffa_hand_example() -> None:
    a = t([[1, 2], [3, 4]])
    out = ffa_lora_aggregate(hand_clients(a1=a, a2=a.clone()), WEIGHTS)["m"]
    assert torch.equal(out.A, a)
    assert torch.equal(out.B, B_BAR)
    assert torch.equal(out.B @ out.A, t([[2.5, 4], [12, 16]]))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shapes", SHAPES)
def test_ffa_exactness_and_frozen_a(seed: int, shapes: dict[str, tuple[int, int, int]]) -> None:
    clients, weights = random_clients(seed, 4, shapes, same_a=True, dtype=torch.float32)
    out = ffa_lora_aggregate(clients, weights)
    for name in shapes:
        assert torch.equal(out[name].A, clients[0][name].A)  # bit-exact, not just close
        assert out[name].B.dtype == torch.float32
        ideal = ideal_product(clients, weights, name)
        torch.testing.assert_close(
            out[name].B.double() @ out[name].A.double(),
            ideal,
            rtol=1e-6,
            atol=1e-6,
        )


def test_ffa_rejects_a_client_that_changed_A() -> None:
    a = t([[1, 2], [3, 4]])
    moved = a.clone()
    moved[0, 0] += 1e-12
    with pytest.raises(ValueError, match="module 'm': lora_A differs from the first reply's"):
        ffa_lora_aggregate(hand_clients(a1=a, a2=moved), WEIGHTS)


# --- LoRA-FAIR ---------------------------------------------------------------------------


def test_lora_fair_hand_example_closed_form() -> None:
    # lam = 1: dB (A A^T + I) = -(B_bar A_bar - T) A_bar^T = [[0,0],[-21,-3]],
    # A A^T + I = [[26,3],[3,2]] (det 43), so dB = [[0,0],[-33/43,-15/43]].
    db = lora_fair_correction_closed_form(T_HAND, A_BAR, B_BAR, 1.0)
    torch.testing.assert_close(db, t([[0, 0], [-33 / 43, -15 / 43]]), rtol=1e-15, atol=1e-15)
    # lam = 0 and A_bar invertible: the correction makes the product exact, B = T A_bar^-1
    db0 = lora_fair_correction_closed_form(T_HAND, A_BAR, B_BAR, 0.0)
    torch.testing.assert_close(db0, t([[0, 0], [-0.75, -0.75]]), rtol=1e-15, atol=1e-15)
    out = lora_fair_aggregate(
        hand_clients(),
        WEIGHTS,
        LoraFairConfig(lam=1.0, solver="closed_form", objective="squared"),
    )
    assert torch.equal(out["m"].A, A_BAR)
    torch.testing.assert_close(
        out["m"].B,
        B_BAR + t([[0, 0], [-33 / 43, -15 / 43]]),
        rtol=1e-15,
        atol=1e-15,
    )


def test_lora_fair_hand_example_objective_values() -> None:
    zero = torch.zeros(2, 2, dtype=F64)
    # columns of T: (4, -3), (3.5, 1); of B_bar A_bar: (4, 0), (3.5, 4)
    cos1 = 16 / (5 * 4)
    cos2 = 16.25 / math.sqrt(13.25 * 28.25)
    value = lora_fair_objective(T_HAND, A_BAR, B_BAR, zero, 0.01)
    assert float(value) == pytest.approx(1 - (cos1 + cos2) / 2, rel=1e-14)
    db = t([[1, 0], [0, 0]])  # penalty 0.01 * 1; columns become (8, 0), (6.5, 4)
    cos1b, cos2b = 32 / (5 * 8), (22.75 + 4) / math.sqrt(13.25 * (42.25 + 16))
    value = lora_fair_objective(T_HAND, A_BAR, B_BAR, db, 0.01)
    assert float(value) == pytest.approx(1 - (cos1b + cos2b) / 2 + 0.01, rel=1e-14)
    assert float(lora_fair_objective(T_HAND, A_BAR, B_BAR, zero, 0.5, "squared")) == 18.0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("lam", [0.0, 0.01, 3.0])
def test_lora_fair_closed_form_solves_its_normal_equations(seed: int, lam: float) -> None:
    clients, weights = random_clients(seed, 5, {"q": (9, 3, 7)})
    a_bar, b_bar, target = reference_products(clients, weights, "q")
    db = lora_fair_correction_closed_form(target, a_bar, b_bar, lam)
    normal = (b_bar + db) @ a_bar @ a_bar.T - target @ a_bar.T + lam * db
    assert float(normal.abs().max()) < 1e-11
    # and it is the minimum: the autograd gradient of the objective vanishes there
    x = db.clone().requires_grad_(True)
    lora_fair_objective(target, a_bar, b_bar, x, lam, "squared").backward()
    assert x.grad is not None and float(x.grad.abs().max()) < 1e-10
    # lam -> 0: the product becomes T projected on A_bar's row space, T A^+ A
    if lam == 0.0:
        projected = target @ torch.linalg.pinv(a_bar) @ a_bar
        torch.testing.assert_close((b_bar + db) @ a_bar, projected, rtol=1e-10, atol=1e-10)


def test_lora_fair_correction_vanishes_as_lambda_grows() -> None:
    clients, weights = random_clients(4, 4, {"q": (8, 2, 6)})
    a_bar, b_bar, target = reference_products(clients, weights, "q")
    norms = [
        float(torch.linalg.norm(lora_fair_correction_closed_form(target, a_bar, b_bar, lam)))
        for lam in (0.0, 0.1, 10.0, 1e3, 1e6)
    ]
    assert all(x > y for x, y in itertools.pairwise(norms))
    assert norms[-1] < 1e-5 * norms[0]
    # the iterative cosine solve also shrinks with lam
    big = lora_fair_correction_iterative(target, a_bar, b_bar, 1e3, steps=200, lr=1e-4)
    small = lora_fair_correction_iterative(target, a_bar, b_bar, 1e-3, steps=200, lr=1e-4)
    assert float(torch.linalg.norm(big)) < 0.1 * float(torch.linalg.norm(small))


@pytest.mark.parametrize("seed", SEEDS)
def test_lora_fair_iterative_matches_closed_form_in_squared_error_limit(seed: int) -> None:
    clients, weights = random_clients(seed, 3, {"q": (5, 3, 12)})
    a_bar, b_bar, target = reference_products(clients, weights, "q")
    lam = 1e-9
    closed = lora_fair_correction_closed_form(target, a_bar, b_bar, lam)
    eig = torch.linalg.eigvalsh(a_bar @ a_bar.T)
    lr = 1.0 / (2.0 * float(eig.max()))  # 1 / L for the gradient 2 (dB + B_bar) A A^T - ...
    steps = int(30 * float(eig.max() / eig.min())) + 100  # enough for 1e-12 at this condition
    iterative = lora_fair_correction_iterative(
        target,
        a_bar,
        b_bar,
        lam,
        objective="squared",
        steps=steps,
        lr=lr,
    )
    torch.testing.assert_close(iterative, closed, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("objective", ["cosine", "squared"])
def test_lora_fair_iterative_gradient_matches_direct_objective(objective: str) -> None:
    # One SGD step from 0 is -lr * grad: the fast loss and the direct objective must agree.
    clients, weights = random_clients(5, 3, {"q": (6, 2, 5)})
    a_bar, b_bar, target = reference_products(clients, weights, "q")
    x = torch.zeros_like(b_bar, requires_grad=True)
    lora_fair_objective(target, a_bar, b_bar, x, 0.3, objective).backward()  # type: ignore[arg-type]
    assert x.grad is not None
    step = lora_fair_correction_iterative(
        target,
        a_bar,
        b_bar,
        0.3,
        objective=objective,  # type: ignore[arg-type]
        steps=1,
        lr=1e-3,
    )
    torch.testing.assert_close(step, -1e-3 * x.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_lora_fair_cosine_solve_improves_objective_and_keeps_a(optimizer: str) -> None:
    clients, weights = random_clients(6, 4, {"q": (10, 2, 8)})
    cfg = LoraFairConfig(lam=0.01, steps=300, lr=0.01, optimizer=optimizer)  # type: ignore[arg-type]
    out = lora_fair_aggregate(clients, weights, cfg)["q"]
    avg = fedavg_lora_aggregate(clients, weights)["q"]
    assert torch.equal(out.A, avg.A)  # A_bar is not touched by the server
    a_bar, b_bar, target = reference_products(clients, weights, "q")
    before = float(lora_fair_objective(target, a_bar, b_bar, torch.zeros_like(b_bar), 0.01))
    after = float(lora_fair_objective(target, a_bar, b_bar, out.B - avg.B, 0.01))
    assert after < before - 0.01


def test_lora_fair_config_validation() -> None:
    with pytest.raises(ValueError, match="squared-error objective only"):
        LoraFairConfig(solver="closed_form")
    with pytest.raises(ValueError, match="lam must be"):
        LoraFairConfig(lam=-1.0)
    with pytest.raises(ValueError, match="lr must be positive"):
        LoraFairConfig(lr=0.0)
    with pytest.raises(ValueError, match="optimizer must be"):
        LoraFairConfig(optimizer="lbfgs")  # type: ignore[arg-type]


# --- FedEx-LoRA --------------------------------------------------------------------------


def test_fedex_hand_example_both_orientations() -> None:
    w0 = t([[1, 0], [0, 1]])
    lin = fedex_lora_aggregate(hand_clients(), WEIGHTS, fan_in_fan_out=False)
    conv = fedex_lora_aggregate(hand_clients(), WEIGHTS, fan_in_fan_out=True)
    # R = T - B_bar A_bar = [[0,0],[-3,-3]], s = 2
    assert torch.equal(lin.base_deltas["m"], t([[0, 0], [-6, -6]]))
    assert torch.equal(conv.base_deltas["m"], t([[0, -6], [0, -6]]))
    assert torch.equal(apply_base_delta(w0, lin.base_deltas["m"]), t([[1, 0], [-6, -5]]))
    assert torch.equal(lin.factors["m"].A, A_BAR) and torch.equal(lin.factors["m"].B, B_BAR)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_fedex_exactness_and_residual_rank(
    seed: int,
    shapes: dict[str, tuple[int, int, int]],
    fan_in_fan_out: bool,
) -> None:
    k = 3
    clients, weights = random_clients(seed, k, shapes)
    out = fedex_lora_aggregate(clients, weights, fan_in_fan_out)
    g = torch.Generator().manual_seed(seed + 100)
    for name, (d_out, r, d_in) in shapes.items():
        _, _, target = reference_products(clients, weights, name)
        f = out.factors[name]
        s = f.scaling
        layout = (d_in, d_out) if fan_in_fan_out else (d_out, d_in)
        w0 = torch.randn(layout, generator=g, dtype=F64)
        w1 = apply_base_delta(w0, out.base_deltas[name], name)
        lora, ideal = s * f.B @ f.A, s * target  # d_out x d_in
        if fan_in_fan_out:
            lora, ideal = lora.T, ideal.T
        torch.testing.assert_close(w1 + lora, w0 + ideal, rtol=1e-12, atol=1e-12)
        resid = out.base_deltas[name] / s
        assert int(torch.linalg.matrix_rank(resid)) <= min((k - 1) * r, d_out, d_in)


def test_fedex_orientation_matters_on_square_matrices() -> None:
    clients, weights = random_clients(9, 3, {"q": (6, 2, 6)})
    lin = fedex_lora_aggregate(clients, weights, False).base_deltas["q"]
    conv = fedex_lora_aggregate(clients, weights, True).base_deltas["q"]
    assert lin.shape == conv.shape  # nothing in the shapes would catch a wrong layout...
    assert torch.equal(conv, lin.T) and not torch.allclose(lin, conv)  # ...the values differ
    with pytest.raises(ValueError, match="check fan_in_fan_out"):
        apply_base_delta(torch.zeros(6, 5), lin, "q")


@pytest.mark.parametrize("layer", ["linear", "conv1d"])
def test_fedex_forward_pass_equals_ideal_update(layer: str) -> None:
    """Through real layers: base W0' plus LoRA (A_bar, B_bar) computes x -> x (W0 + s T)."""
    d = 6  # square, where a wrong orientation is silent
    clients, weights = random_clients(11, 3, {"q": (d, 2, d)})
    _, _, target = reference_products(clients, weights, "q")
    out = fedex_lora_aggregate(clients, weights, fan_in_fan_out=layer == "conv1d")
    f = out.factors["q"]
    x = torch.randn(4, d, dtype=F64, generator=torch.Generator().manual_seed(0))
    if layer == "linear":
        base = nn.Linear(d, d, bias=False).double()
        ideal = x @ (base.weight.detach() + f.scaling * target).T
    else:
        conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
        base = conv1d(d, d).double()  # weight d_in x d_out, y = x W + b
        ideal = x @ (base.weight.detach() + f.scaling * target.T) + base.bias.detach()
    with torch.no_grad():
        base.weight.copy_(apply_base_delta(base.weight, out.base_deltas["q"]))
        y = base(x) + f.scaling * (x @ f.A.T @ f.B.T)  # PEFT's LoRA path: s B A x
    torch.testing.assert_close(y, ideal, rtol=1e-12, atol=1e-12)


def test_fedex_with_peft_merge_conv1d() -> None:
    """PEFT's own merge (fan_in_fan_out=True) of (A_bar, B_bar) into W0' reproduces W0 + s T^T."""
    peft = pytest.importorskip("peft")
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_attn = conv1d(5, 5)

        def forward(self, x: Tensor) -> Tensor:
            return self.c_attn(x)

    d, r = 5, 2
    clients, weights = random_clients(
        12,
        3,
        {"base_model.model.c_attn": (d, r, d)},
        scaling=4 / r,
        dtype=torch.float32,
    )
    name = "base_model.model.c_attn"
    out = fedex_lora_aggregate(clients, weights, fan_in_fan_out=True)
    torch.manual_seed(0)
    model = peft.get_peft_model(
        Tiny(),
        peft.LoraConfig(r=r, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True),
    )
    w0 = model.base_model.model.c_attn.base_layer.weight.detach().clone()
    peft.set_peft_model_state_dict(
        model,
        {
            f"{name}.lora_A.weight": out.factors[name].A,
            f"{name}.lora_B.weight": out.factors[name].B,
        },
    )
    with torch.no_grad():
        model.base_model.model.c_attn.base_layer.weight.add_(out.base_deltas[name])
    merged = model.merge_and_unload().c_attn.weight.detach().double()
    _, _, target = reference_products(clients, weights, name)
    torch.testing.assert_close(merged, w0.double() + (4 / r) * target.T, rtol=1e-5, atol=1e-5)


# --- RoLoRA ------------------------------------------------------------------------------


def test_rolora_alternates_starting_with_b() -> None:
    assert [rolora_trained_factor(n) for n in (1, 2, 3, 4)] == ["B", "A", "B", "A"]
    with pytest.raises(ValueError, match="counts from 1"):
        rolora_trained_factor(0)


def test_rolora_hand_example() -> None:
    a = t([[1, 2], [3, 4]])
    odd = rolora_aggregate(hand_clients(a1=a, a2=a.clone()), WEIGHTS, server_round=1)["m"]
    assert torch.equal(odd.A, a) and torch.equal(odd.B, B_BAR)
    b = t([[1, 2], [3, 4]])
    even = rolora_aggregate(hand_clients(b1=b, b2=b.clone()), WEIGHTS, server_round=2)["m"]
    assert torch.equal(even.B, b) and torch.equal(even.A, A_BAR)
    with pytest.raises(ValueError, match="lora_B differs from the first reply's"):
        rolora_aggregate(hand_clients(), WEIGHTS, server_round=2)
    with pytest.raises(ValueError, match="lora_A differs from the first reply's"):
        rolora_aggregate(hand_clients(), WEIGHTS, server_round=3)


@pytest.mark.parametrize("server_round", [1, 2])
def test_rolora_rounds_are_exact(server_round: int) -> None:
    trained = rolora_trained_factor(server_round)
    clients, weights = random_clients(
        13,
        4,
        {"q": (7, 3, 5)},
        same_a=trained == "B",
        same_b=trained == "A",
    )
    out = rolora_aggregate(clients, weights, server_round)["q"]
    _, _, target = reference_products(clients, weights, "q")
    torch.testing.assert_close(out.B @ out.A, target, rtol=1e-12, atol=1e-12)


# --- FedSVD ------------------------------------------------------------------------------


def test_fedsvd_hand_example() -> None:
    a = t([[1, 0, 0], [0, 1, 0]])
    out = fedsvd_aggregate(
        hand_clients(a1=a, a2=a.clone(), b1=t([[2, 0], [0, 0]]), b2=t([[2, 0], [0, 4]])),
        WEIGHTS,
    )["m"]
    # B_bar = [[2,0],[0,3]], B_bar A = [[2,0,0],[0,3,0]]: singular values 3, 2
    torch.testing.assert_close(out.B.abs(), t([[0, 2], [3, 0]]), rtol=0, atol=1e-14)
    torch.testing.assert_close(out.A.abs(), t([[0, 1, 0], [1, 0, 0]]), rtol=0, atol=1e-14)
    torch.testing.assert_close(out.B @ out.A, t([[2, 0, 0], [0, 3, 0]]), rtol=0, atol=1e-14)
    assert out.scaling == 2.0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shapes", SHAPES)
def test_fedsvd_exact_with_orthonormal_a(
    seed: int,
    shapes: dict[str, tuple[int, int, int]],
) -> None:
    clients, weights = random_clients(seed, 4, shapes, same_a=True)
    out = fedsvd_aggregate(clients, weights)
    for name, (_, r, _) in shapes.items():
        _, _, target = reference_products(clients, weights, name)
        f = out[name]
        assert f.A.shape == clients[0][name].A.shape and f.B.shape == clients[0][name].B.shape
        torch.testing.assert_close(
            f.scaling * f.B @ f.A,
            f.scaling * target,
            rtol=1e-12,
            atol=1e-12,
        )
        torch.testing.assert_close(f.A @ f.A.T, torch.eye(r, dtype=F64), rtol=0, atol=1e-13)
        col_norms = torch.linalg.norm(f.B, dim=0)  # the singular values, decreasing
        assert bool((col_norms[:-1] >= col_norms[1:]).all())
        torch.testing.assert_close(
            col_norms,
            torch.linalg.svdvals(target)[:r],
            rtol=1e-12,
            atol=1e-12,
        )


def test_fedsvd_rank_deficient_b_still_gives_orthonormal_a() -> None:
    a = torch.randn(3, 8, dtype=F64, generator=torch.Generator().manual_seed(0))
    b, new_a = refactor_orthonormal(torch.zeros(5, 3, dtype=F64), a)  # round 0: B = 0
    assert float(b.abs().max()) == 0.0
    torch.testing.assert_close(new_a @ new_a.T, torch.eye(3, dtype=F64), rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="rank 4 exceeds"):
        refactor_orthonormal(torch.zeros(3, 4, dtype=F64), torch.zeros(4, 8, dtype=F64))


# --- FlexLoRA ----------------------------------------------------------------------------


def test_flexlora_hand_example() -> None:
    # rank 1 with s B A = [[2,0],[0,0]]; rank 2 with s B A = [[0,0],[0,2]]
    c1 = {"m": LoraFactors(A=t([[1, 0]]), B=t([[1], [0]]), scaling=2.0)}
    c2 = {"m": LoraFactors(A=t([[0, 0], [0, 2]]), B=t([[0, 0], [0, 2]]), scaling=0.5)}
    # Delta = 1/4 [[2,0],[0,0]] + 3/4 [[0,0],[0,2]] = [[0.5,0],[0,1.5]]
    glob = flexlora_aggregate([c1, c2], WEIGHTS)
    torch.testing.assert_close(glob["m"].S, t([[1.5, 0.5]])[0], rtol=0, atol=1e-15)
    f1 = flexlora_client_factors(glob, 1, 2.0)["m"]
    assert f1.A.shape == (1, 2) and f1.B.shape == (2, 1) and f1.scaling == 2.0
    torch.testing.assert_close(f1.scaling * f1.B @ f1.A, t([[0, 0], [0, 1.5]]), rtol=0, atol=1e-15)
    assert glob["m"].truncation_error(1) == pytest.approx(0.5, rel=1e-15)
    f2 = flexlora_client_factors(glob, {"m": 2}, {"m": 0.5})["m"]
    torch.testing.assert_close(
        f2.scaling * f2.B @ f2.A,
        t([[0.5, 0], [0, 1.5]]),
        rtol=0,
        atol=1e-15,
    )
    assert glob["m"].truncation_error(2) == 0.0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("d", [(12, 10), (40, 30)])  # full SVD path, and the range-finder path
def test_flexlora_truncation_error_equals_dropped_singular_values(
    seed: int,
    d: tuple[int, int],
) -> None:
    d_out, d_in = d
    g = torch.Generator().manual_seed(seed)
    ranks, scalings = [2, 4, 3], [2.0, 1.0, 16 / math.sqrt(3)]
    clients = [
        {
            "m": LoraFactors(
                A=torch.randn(r, d_in, generator=g, dtype=F64),
                B=torch.randn(d_out, r, generator=g, dtype=F64),
                scaling=s,
            )
        }
        for r, s in zip(ranks, scalings, strict=True)
    ]
    weights = [2.0, 5.0, 1.0]
    p = [w / sum(weights) for w in weights]
    delta = sum(pk * c["m"].scaling * c["m"].B @ c["m"].A for pk, c in zip(p, clients, strict=True))
    assert isinstance(delta, Tensor)
    sv = torch.linalg.svdvals(delta)
    glob = flexlora_aggregate(clients, weights)
    torch.testing.assert_close(glob["m"].S[:9], sv[:9], rtol=1e-10, atol=1e-10)
    for r, s in zip(ranks, scalings, strict=True):
        f = flexlora_client_factors(glob, r, s)["m"]
        assert f.rank == r and f.scaling == s
        actual = float(torch.linalg.norm(delta - s * f.B @ f.A) ** 2)
        dropped = float((sv[r:] ** 2).sum())
        assert actual == pytest.approx(dropped, rel=1e-9)
        assert glob["m"].truncation_error(r) ** 2 == pytest.approx(dropped, rel=1e-9)
        torch.testing.assert_close(f.A @ f.A.T, torch.eye(r, dtype=F64), rtol=0, atol=1e-12)


def test_flexlora_rejects_a_rank_beyond_the_svd() -> None:
    ones = torch.ones(1, 4, dtype=F64)
    c = {"m": LoraFactors(A=ones, B=ones.T, scaling=1.0)}
    glob = flexlora_aggregate([c], [1.0])
    with pytest.raises(ValueError, match=r"module 'm': rank must be in 1\.\.1, got 2"):
        flexlora_client_factors(glob, 2, 1.0)
    # a federation with larger ranks than this round's replies asks for them up front
    wide = flexlora_aggregate([c], [1.0], max_rank=3)
    f = flexlora_client_factors(wide, 3, 1.0)["m"]
    torch.testing.assert_close(f.B @ f.A, torch.ones(4, 4, dtype=F64), rtol=0, atol=1e-14)
    torch.testing.assert_close(f.A @ f.A.T, torch.eye(3, dtype=F64), rtol=0, atol=1e-14)
    assert wide["m"].truncation_error(1) < 1e-14
    with pytest.raises(ValueError, match="no rank given for module 'm'"):
        flexlora_client_factors(glob, {}, 1.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_thin_svd_fast_path_matches_full_svd(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(60, 5, generator=g, dtype=F64) @ torch.randn(5, 50, generator=g, dtype=F64)
    u, s, vh = thin_svd(m, rank_bound=5)
    assert s.shape == (5,)
    torch.testing.assert_close(s, torch.linalg.svdvals(m)[:5], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(u @ torch.diag(s) @ vh, m, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(u.T @ u, torch.eye(5, dtype=F64), rtol=0, atol=1e-12)


# --- dtypes ------------------------------------------------------------------------------


def test_results_come_back_in_the_replies_dtype() -> None:
    clients, weights = random_clients(14, 3, {"q": (6, 2, 5)}, same_a=True, dtype=torch.float32)
    for out in (
        fedavg_lora_aggregate(clients, weights),
        ffa_lora_aggregate(clients, weights),
        fedsvd_aggregate(clients, weights),
        lora_fair_aggregate(clients, weights, LoraFairConfig(steps=5)),
        fedex_lora_aggregate(clients, weights).factors,
        flexlora_client_factors(flexlora_aggregate(clients, weights), 2, 2.0),
    ):
        assert out["q"].A.dtype == torch.float32 and out["q"].B.dtype == torch.float32
    assert fedex_lora_aggregate(clients, weights).base_deltas["q"].dtype == torch.float32


def test_lora_fair_batched_solve_equals_per_module_solves() -> None:
    """Modules of one shape are solved as one batch; each must get its own solution."""
    from fedlora.strategies.lora_fair import LoraFairConfig, lora_fair_correction_iterative, lora_fair_from_sums
    from fedlora.strategies.streaming import ProductSums

    g = torch.Generator().manual_seed(11)
    sums = {
        f"m{i}": ProductSums(
            A_bar=torch.randn(3, d_in, generator=g, dtype=torch.float64),
            B_bar=torch.randn(d_out, 3, generator=g, dtype=torch.float64),
            T=torch.randn(d_out, d_in, generator=g, dtype=torch.float64),
            scaling=2.0,
            dtype=torch.float64,
        )
        for i, (d_out, d_in) in enumerate([(5, 4), (5, 4), (7, 4), (5, 4)])
    }
    cfg = LoraFairConfig(lam=0.01, steps=50)
    batched = lora_fair_from_sums(sums, cfg)
    for name, ps in sums.items():
        dB = lora_fair_correction_iterative(ps.T, ps.A_bar, ps.B_bar, 0.01, steps=50)
        torch.testing.assert_close(batched[name].B, ps.B_bar + dB, rtol=1e-12, atol=1e-12)
        assert not torch.equal(dB, torch.zeros_like(dB))
