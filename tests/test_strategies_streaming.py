"""Streaming accumulators: one-shot results, constant state, rejection that changes nothing."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch import Tensor

from fedlora.strategies import (
    DeltaSumAccumulator,
    ErrorSketch,
    FactorSumAccumulator,
    LoraFactors,
    LoraFairConfig,
    ProductSumAccumulator,
    aggregation_error,
    aggregation_error_from_sums,
    fedavg_lora_aggregate,
    fedex_lora_aggregate,
    fedex_lora_from_sums,
    fedsvd_aggregate,
    fedsvd_from_sums,
    ffa_lora_aggregate,
    flexlora_aggregate,
    flexlora_from_sums,
    lora_fair_aggregate,
    lora_fair_from_sums,
    rolora_accumulator,
    rolora_aggregate,
)

F64 = torch.float64
SHAPES = {"q": (8, 3, 6), "v": (5, 2, 7)}  # module -> (d_out, r, d_in)


def clients(
    seed: int,
    k: int,
    *,
    same_a: bool = False,
    same_b: bool = False,
    dtype: torch.dtype = F64,
) -> tuple[list[dict[str, LoraFactors]], list[float]]:
    g = torch.Generator().manual_seed(seed)
    shared = {}
    for m, (do, r, di) in SHAPES.items():
        shared[m] = (torch.randn(r, di, generator=g), torch.randn(do, r, generator=g))
    out = []
    for _ in range(k):
        modules = {}
        for m, (do, r, di) in SHAPES.items():
            a = shared[m][0] if same_a else torch.randn(r, di, generator=g)
            b = shared[m][1] if same_b else torch.randn(do, r, generator=g)
            modules[m] = LoraFactors(A=a.to(dtype), B=b.to(dtype), scaling=2.0)
        out.append(modules)
    return out, [float(w) for w in torch.randint(1, 50, (k,), generator=g)]


def same_factors(x: dict[str, LoraFactors], y: dict[str, LoraFactors]) -> bool:
    if set(x) != set(y):
        return False
    return all(torch.equal(x[m].A, y[m].A) and torch.equal(x[m].B, y[m].B) for m in x) and all(
        x[m].scaling == y[m].scaling for m in x
    )


def state_numel(obj: object) -> int:
    """Elements held in an accumulator's tensors (its server-side memory)."""
    total = 0
    for value in vars(obj).values():
        items = value.values() if isinstance(value, dict) else [value]
        total += sum(v.numel() for v in items if isinstance(v, Tensor))
    return total


# --- streaming == one-shot ---------------------------------------------------------------


def test_sum_based_streaming_equals_one_shot() -> None:
    cs, ws = clients(0, 6)
    acc = FactorSumAccumulator("both")
    for c, w in zip(cs, ws, strict=True):
        acc.add(c, w)
    assert same_factors(acc.result(), fedavg_lora_aggregate(cs, ws))

    cs, ws = clients(1, 6, same_a=True)
    acc = FactorSumAccumulator("B")
    for c, w in zip(cs, ws, strict=True):
        acc.add(c, w)
    averaged = acc.result()
    assert same_factors(averaged, ffa_lora_aggregate(cs, ws))
    assert same_factors(averaged, rolora_aggregate(cs, ws, server_round=1))
    assert same_factors(fedsvd_from_sums(averaged), fedsvd_aggregate(cs, ws))

    cs, ws = clients(2, 6, same_b=True)
    acc = rolora_accumulator(server_round=4)
    for c, w in zip(cs, ws, strict=True):
        acc.add(c, w)
    assert same_factors(acc.result(), rolora_aggregate(cs, ws, server_round=4))


def test_product_based_streaming_equals_one_shot() -> None:
    cs, ws = clients(3, 5)
    acc = ProductSumAccumulator()
    for c, w in zip(cs, ws, strict=True):
        acc.add(c, w)
    sums = acc.result()
    cfg = LoraFairConfig(steps=20)
    assert same_factors(lora_fair_from_sums(sums, cfg), lora_fair_aggregate(cs, ws, cfg))
    streamed, one_shot = fedex_lora_from_sums(sums, True), fedex_lora_aggregate(cs, ws, True)
    assert same_factors(streamed.factors, one_shot.factors)
    assert all(torch.equal(streamed.base_deltas[m], one_shot.base_deltas[m]) for m in SHAPES)
    assert aggregation_error_from_sums(sums) == aggregation_error(cs, ws)
    # the product accumulator's A_bar, B_bar are FedAvg-LoRA's, bit for bit
    avg = fedavg_lora_aggregate(cs, ws)
    for m in SHAPES:
        assert torch.equal(sums[m].A_bar, avg[m].A) and torch.equal(sums[m].B_bar, avg[m].B)

    dacc = DeltaSumAccumulator()
    for c, w in zip(cs, ws, strict=True):
        dacc.add(c, w)
    streamed_svd, one_shot_svd = flexlora_from_sums(dacc.result()), flexlora_aggregate(cs, ws)
    assert all(torch.equal(streamed_svd[m].S, one_shot_svd[m].S) for m in SHAPES)


def test_streaming_matches_the_definitions_in_any_order() -> None:
    cs, ws = clients(4, 7)
    forward = ProductSumAccumulator()
    backward = ProductSumAccumulator()
    for c, w in zip(cs, ws, strict=True):
        forward.add(c, w)
    for c, w in zip(reversed(cs), reversed(ws), strict=True):
        backward.add(c, w)
    p = [w / sum(ws) for w in ws]
    for m in SHAPES:
        target = sum(pk * c[m].B @ c[m].A for pk, c in zip(p, cs, strict=True))
        assert isinstance(target, Tensor)
        torch.testing.assert_close(forward.result()[m].T, target, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(backward.result()[m].T, target, rtol=1e-13, atol=1e-13)


def test_float32_replies_accumulate_in_float64() -> None:
    cs, ws = clients(5, 4, dtype=torch.float32)
    out = fedavg_lora_aggregate(cs, ws)
    assert out["q"].A.dtype == torch.float32
    exact = sum(w * c["q"].A.double() for w, c in zip(ws, cs, strict=True)) / sum(ws)
    assert isinstance(exact, Tensor)
    assert torch.equal(out["q"].A, exact.float())  # one rounding, at the end


# --- constant memory ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: FactorSumAccumulator("both"),
        lambda: FactorSumAccumulator("B"),
        ProductSumAccumulator,
        DeltaSumAccumulator,
        lambda: ErrorSketch(4),
    ],
)
def test_accumulator_state_does_not_grow_with_replies(make: object) -> None:
    assert callable(make)
    sizes = []
    for k in (2, 20):
        cs, ws = clients(6, k, same_a=True)
        acc = make()
        for c, w in zip(cs, ws, strict=True):
            acc.add(c, w)
        sizes.append(state_numel(acc))
    assert sizes[0] == sizes[1] > 0


# --- rejection leaves the accumulator untouched ------------------------------------------


def bad_replies(good: dict[str, LoraFactors]) -> list[tuple[dict[str, LoraFactors], float, str]]:
    q = good["q"]
    return [
        ({"q": q}, 1.0, r"missing \['v'\]"),
        ({**good, "k": q}, 1.0, r"unexpected \['k'\]"),
        (
            {**good, "q": LoraFactors(A=torch.zeros(3, 5, dtype=F64), B=q.B, scaling=2.0)},
            1.0,
            "module 'q': layer shape 8 x 5",
        ),
        (
            {
                **good,
                "q": LoraFactors(
                    A=torch.zeros(2, 6, dtype=F64),
                    B=torch.zeros(8, 2, dtype=F64),
                    scaling=2.0,
                ),
            },
            1.0,
            "module 'q': rank 2",
        ),
        (
            {**good, "q": LoraFactors(A=q.A.float(), B=q.B.float(), scaling=2.0)},
            1.0,
            "module 'q': dtype",
        ),
        ({**good, "q": LoraFactors(A=q.A, B=q.B, scaling=4.0)}, 1.0, "module 'q': scaling 4.0"),
        (good, -1.0, "non-negative"),
        (good, math.nan, "finite"),
        ({}, 1.0, "at least one LoRA module"),
    ]


@pytest.mark.parametrize("case", range(9))
def test_a_rejected_reply_leaves_the_sums_unchanged(case: int) -> None:
    cs, ws = clients(7, 3)
    acc = FactorSumAccumulator("both")
    acc.add(cs[0], ws[0])
    reply, weight, message = bad_replies(cs[1])[case]
    with pytest.raises(ValueError, match=message):
        acc.add(reply, weight)
    acc.add(cs[2], ws[2])
    assert acc.num_replies == 2
    assert same_factors(acc.result(), fedavg_lora_aggregate([cs[0], cs[2]], [ws[0], ws[2]]))


def test_frozen_factor_mismatch_is_rejected_before_any_sum_changes() -> None:
    cs, ws = clients(8, 3, same_a=True)
    moved = {**cs[1], "v": LoraFactors(A=cs[1]["v"].A + 1.0, B=cs[1]["v"].B, scaling=2.0)}
    acc = FactorSumAccumulator("B")
    acc.add(cs[0], ws[0])
    with pytest.raises(ValueError, match="module 'v': lora_A differs"):
        acc.add(moved, ws[1])
    acc.add(cs[2], ws[2])
    assert same_factors(acc.result(), ffa_lora_aggregate([cs[0], cs[2]], [ws[0], ws[2]]))


def test_mixed_rank_accumulator_checks_layer_shapes_only() -> None:
    cs, ws = clients(9, 2)
    acc = DeltaSumAccumulator()
    acc.add(cs[0], ws[0])
    other_rank = {m: LoraFactors(A=f.A[:1], B=f.B[:, :1], scaling=7.0) for m, f in cs[1].items()}
    acc.add(other_rank, ws[1])  # different rank and scaling: fine
    with pytest.raises(ValueError, match="module 'q': layer shape 8 x 5"):
        acc.add(
            {
                **cs[1],
                "q": LoraFactors(
                    A=torch.zeros(3, 5, dtype=F64),
                    B=torch.zeros(8, 3, dtype=F64),
                    scaling=1.0,
                ),
            },
            1.0,
        )
    assert acc.result()["q"].rank_bound == 4 and acc.result()["q"].max_rank == 3


def test_result_is_final_and_needs_weight() -> None:
    cs, ws = clients(10, 2)
    acc = FactorSumAccumulator()
    with pytest.raises(ValueError, match="no replies to aggregate"):
        acc.result()
    acc.add(cs[0], 0.0)
    with pytest.raises(ValueError, match="weights sum to zero"):
        acc.result()
    products = ProductSumAccumulator()
    products.add(cs[0], ws[0])
    first = products.result()
    assert products.result() is first
    with pytest.raises(ValueError, match="already taken"):
        products.add(cs[1], ws[1])
    with pytest.raises(ValueError, match="trained must be"):
        FactorSumAccumulator("AB")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="got 2 client adapters but 1 weights"):
        fedavg_lora_aggregate(cs, [1.0])
    with pytest.raises(ValueError, match="zero clients"):
        fedavg_lora_aggregate([], [])


# --- the constant-memory error sketch ----------------------------------------------------


def test_error_sketch_is_exact_when_as_wide_as_the_layer() -> None:
    cs, ws = clients(11, 5)
    sketch, acc = ErrorSketch(size=16), FactorSumAccumulator()
    for c, w in zip(cs, ws, strict=True):
        sketch.add(c, w)
        acc.add(c, w)
    estimate = sketch.estimate(acc.result())
    exact = aggregation_error(cs, ws)
    assert estimate.overall == pytest.approx(exact.overall, rel=1e-12)
    for m in SHAPES:
        assert estimate.per_module[m] == pytest.approx(exact.per_module[m], rel=1e-12)


def test_error_sketch_estimates_within_its_stated_accuracy() -> None:
    g = torch.Generator().manual_seed(12)
    cs = [
        {
            "m": LoraFactors(
                A=torch.randn(4, 30, generator=g, dtype=F64),
                B=torch.randn(40, 4, generator=g, dtype=F64),
                scaling=1.0,
            )
        }
        for _ in range(5)
    ]
    ws = [1.0, 2.0, 3.0, 4.0, 5.0]
    avg = fedavg_lora_aggregate(cs, ws)
    exact = aggregation_error(cs, ws).overall
    estimates = []
    for seed in range(40):
        sketch = ErrorSketch(size=16, seed=seed)
        for c, w in zip(cs, ws, strict=True):
            sketch.add(c, w)
        estimates.append(sketch.estimate(avg).overall)
    assert all(abs(e / exact - 1) < 0.25 for e in estimates)
    assert statistics.mean(estimates) == pytest.approx(exact, rel=0.05)
    assert len(set(estimates)) > 30  # the seed matters: these are genuine random sketches


def test_error_sketch_is_zero_for_an_exact_aggregate() -> None:
    cs, ws = clients(13, 4, same_a=True, dtype=torch.float32)
    sketch, acc = ErrorSketch(size=4), FactorSumAccumulator()
    for c, w in zip(cs, ws, strict=True):
        sketch.add(c, w)
        acc.add(c, w)
    assert sketch.estimate(acc.result()).overall < 1e-6
    with pytest.raises(ValueError, match="sketch size must be positive"):
        ErrorSketch(0)
