"""The Flower layer of the strategies: registry, reply validation, aggregation through replies."""

from __future__ import annotations

import logging

import pytest
import torch
from flower_replies import set_task_identity, train_reply
from flwr.app import Error, Message, RecordDict

from fedlora.strategies import registry
from fedlora.strategies.adapter import split_adapter
from fedlora.strategies.fedavg_lora import FedAvgLora, fedavg_lora_aggregate
from fedlora.strategies.ffa_lora import FfaLora, shared_a_state
from fedlora.strategies.flexlora import FlexLoraSettings
from fedlora.strategies.flower import LoraStrategy

KEYS = [f"base_model.model.m{i}.lora_{f}.weight" for i in range(2) for f in "AB"]


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    set_task_identity()


def _adapter(seed: int, b_scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k in KEYS:
        shape = (2, 3) if ".lora_A." in k else (4, 2)
        out[k] = torch.randn(shape, generator=g) * (b_scale if ".lora_B." in k else 1.0)
    return out


_reply = train_reply


def test_registry_holds_the_seven_methods() -> None:
    assert sorted(registry.STRATEGIES) == sorted(
        ["fedavg-lora", "ffa-lora", "lora-fair", "fedex-lora", "rolora", "fedsvd", "flexlora"]
    )
    with pytest.raises(ValueError, match="unknown strategy 'fedprox'; known strategies: fedavg-lora, ffa-lora"):
        registry.get("fedprox")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(FedAvgLora)
    s = LoraStrategy(registry.create("lora-fair", scaling=2.0))
    assert (
        isinstance(s, LoraStrategy)
        and s.algorithm.name == "lora-fair"
        and s.lr == registry.get("lora-fair").defaults.lr
    )
    with pytest.raises(TypeError, match="needs a LoraAlgorithm"):
        LoraStrategy(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ffa-lora takes MethodSettings settings, got FlexLoraSettings"):
        registry.create("ffa-lora", scaling=1.0, settings=FlexLoraSettings())


def test_frozen_factor_methods_default_to_a_larger_learning_rate() -> None:
    plain = registry.get("fedavg-lora").defaults.lr
    for name in ("ffa-lora", "fedsvd", "rolora"):
        assert registry.get(name).defaults.lr > plain


def test_replies_are_aggregated_exactly_as_the_pure_function() -> None:
    strategy = LoraStrategy(registry.create("fedavg-lora", scaling=2.0))
    state = _adapter(0)
    clients = [_adapter(i) for i in (1, 2, 3)]
    new, summary = strategy.aggregate_train_from(1, [_reply(i + 1, c) for i, c in enumerate(clients)], state)
    assert new is not None
    expected = fedavg_lora_aggregate([split_adapter(c, 2.0) for c in clients], [10, 20, 30])
    for module, f in expected.items():
        assert torch.equal(new[module + ".lora_A.weight"], f.A)
        assert torch.equal(new[module + ".lora_B.weight"], f.B)
    assert summary["accepted"] == 3 and summary["rejected"] == 0 and summary["num-examples"] == 60
    assert 0 < summary["aggregation-error"] < 1
    assert summary["bytes-received"] == 3 * sum(t.numel() * 4 for t in clients[0].values())


def _bad_cases() -> list[tuple[Message, str]]:
    good = _adapter(5)
    missing = {k: v for k, v in good.items() if k != KEYS[0]}
    unknown = {**good, "base_model.model.m9.lora_A.weight": torch.zeros(2, 3)}
    shape = {**good, KEYS[0]: torch.zeros(3, 3)}
    dtype = {**good, KEYS[1]: good[KEYS[1]].double()}
    nan = {**good, KEYS[2]: torch.full((2, 3), float("nan"))}
    request = Message(RecordDict(), dst_node_id=19, message_type="train")
    return [
        (_reply(11, missing), "missing tensor(s): base_model.model.m0.lora_A.weight"),
        (_reply(12, unknown), "unknown tensor name(s): base_model.model.m9.lora_A.weight"),
        (_reply(13, shape), "has shape (3, 3), expected (2, 3)"),
        (_reply(14, dtype), "has dtype torch.float64, expected torch.float32"),
        (_reply(15, nan), "has non-finite values"),
        (_reply(16, good, {"num-examples": 0}), "num-examples must be a positive number, got 0"),
        (_reply(17, None), "reply has no 'arrays' record"),
        (_reply(18, good, {"num-examples": float("nan")}), "num-examples must be a positive number, got nan"),
        (Message(Error(code=1, reason="out of memory"), reply_to=request), "client error: out of memory"),
    ]


def test_each_malformed_reply_is_rejected_with_its_reason(caplog: pytest.LogCaptureFixture) -> None:
    state = _adapter(0)
    size = sum(t.numel() * 4 for t in state.values())
    strategy = LoraStrategy(registry.create("fedavg-lora", scaling=1.0), max_reply_bytes=2 * size)
    cases = _bad_cases()
    strategy_small = LoraStrategy(registry.create("fedavg-lora", scaling=1.0), max_reply_bytes=size - 1)
    good = [_reply(1, _adapter(1)), _reply(2, _adapter(2))]
    with caplog.at_level(logging.WARNING):
        new, summary = strategy.aggregate_train_from(1, [*good, *(m for m, _ in cases)], state)
    assert new is not None, "the round goes on with the two good replies"
    assert summary["accepted"] == 2 and summary["rejected"] == len(cases)
    reasons = strategy.rounds[1].reasons
    for (_, reason), node in zip(cases, range(11, 20), strict=True):
        assert reason in reasons[node], (node, reasons[node])
        assert f"rejected reply of node {node}: " in caplog.text
    _, s2 = strategy_small.aggregate_train_from(1, [_reply(1, _adapter(1))], state)
    assert s2["rejected"] == 1
    assert strategy_small.rounds[1].reasons[1] == f"payload of {size} bytes exceeds the limit of {size - 1} bytes"


def test_round_fails_cleanly_without_enough_valid_replies() -> None:
    strategy = LoraStrategy(registry.create("fedavg-lora", scaling=1.0), min_replies=2)
    new, summary = strategy.aggregate_train_from(3, [_reply(1, _adapter(1)), _reply(2, None)], _adapter(0))
    assert new is None  # Flower keeps the previous global adapter
    assert summary["accepted"] == 1 and summary["rejected"] == 1
    assert "only 1 valid replies (fewer than min-replies=2); keeping the previous global adapter" in str(
        strategy.rounds[3].failed
    )


def test_declined_replies_are_counted_not_rejected() -> None:
    strategy = LoraStrategy(registry.create("fedavg-lora", scaling=1.0))
    declined = _reply(4, None, {"declined": 1, "num-examples": 0})
    _, summary = strategy.aggregate_train_from(1, [_reply(1, _adapter(1)), declined], _adapter(0))
    assert summary["declined"] == 1 and summary["rejected"] == 0 and summary["accepted"] == 1


def test_ffa_downloads_only_b_and_keeps_a_bit_identical() -> None:
    algo = FfaLora(scaling=2.0, seed=3)
    strategy = LoraStrategy(algo)
    state = algo.initial_state(_adapter(0, b_scale=0.0))
    assert all(torch.equal(state[k], v) for k, v in shared_a_state(_adapter(9), 3).items() if ".lora_A." in k)
    assert set(algo.download(1, state)) == {k for k in KEYS if ".lora_B." in k}
    replies = [_reply(i, {k: v for k, v in _adapter(i).items() if ".lora_B." in k}) for i in (1, 2)]
    new, summary = strategy.aggregate_train_from(1, replies, state)
    assert new is not None and summary["accepted"] == 2
    for k in KEYS:
        if ".lora_A." in k:
            assert torch.equal(new[k], state[k])
    # a reply that also sends A is malformed under FFA-LoRA
    _, s = strategy.aggregate_train_from(2, [_reply(5, _adapter(5))], state)
    assert s["rejected"] == 1 and "unknown tensor name(s)" in strategy.rounds[2].reasons[5]


def test_rolora_alternates_and_rejects_a_changed_frozen_factor() -> None:
    strategy = LoraStrategy(registry.create("rolora", scaling=1.0))
    state = _adapter(0)
    assert strategy.algorithm.trained_factors(1) == "B" and strategy.algorithm.trained_factors(2) == "A"
    b_only = {k: v for k, v in _adapter(1).items() if ".lora_B." in k}
    new, s = strategy.aggregate_train_from(1, [_reply(1, b_only)], state)
    assert new is not None and s["accepted"] == 1
    assert all(torch.equal(new[k], state[k]) for k in KEYS if ".lora_A." in k)


def test_fedavg_error_sketch_equals_exact_error_on_narrow_modules() -> None:
    """The constant-memory sketch is exact when a layer is at most its width (128) wide."""
    state = _adapter(0)
    replies = [_reply(i, _adapter(i)) for i in (1, 2, 3)]
    _, sketched = LoraStrategy(registry.create("fedavg-lora", scaling=1.0)).aggregate_train_from(1, replies, state)
    _, exact = LoraStrategy(registry.create("fedavg-lora", scaling=1.0, exact_error=True)).aggregate_train_from(
        1, replies, state
    )
    assert exact["aggregation-error"] > 0.05
    assert sketched["aggregation-error"] == pytest.approx(exact["aggregation-error"], rel=1e-6)
