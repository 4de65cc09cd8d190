"""Server optimizers over the aggregate (FedOpt): the math against Flower's own FedAvgM, FedAdagrad and
FedYogi over several rounds, FedAdam against Kingma & Ba's bias-corrected step, the LoRA strategy
stepping its aggregate, checkpoints that carry the moments, and refusals with their reasons."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flower_replies import set_task_identity, train_reply
from flwr.app import ArrayRecord, Message
from flwr.serverapp.strategy import FedAdagrad, FedAvgM, FedYogi

from fedlora.core.config import FederationConfig
from fedlora.strategies import registry
from fedlora.strategies.adapter import split_adapter
from fedlora.strategies.fedavg_lora import fedavg_lora_aggregate
from fedlora.strategies.flower import LoraStrategy
from fedlora.strategies.server_opt import OptimizerState, ServerOptimizer, server_step

KEYS = [f"base_model.model.m{i}.lora_{f}.weight" for i in range(2) for f in "AB"]


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    set_task_identity()


def _state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn((2, 3) if ".lora_A." in k else (4, 2), generator=g) for k in KEYS}


def _reply(node: int, tensors: dict[str, torch.Tensor], n: int) -> Message:
    return train_reply(node, tensors, {"num-examples": n})


@pytest.mark.parametrize(
    ("ours", "flower"),
    [
        (ServerOptimizer("avgm", lr=0.7, beta1=0.5), FedAvgM(server_learning_rate=0.7, server_momentum=0.5)),
        (ServerOptimizer("adagrad", lr=0.1, beta1=0.0, tau=1e-3), FedAdagrad(eta=0.1, tau=1e-3)),
        (ServerOptimizer("yogi", lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3), FedYogi(eta=0.01, tau=1e-3)),
    ],
)
def test_the_step_is_flowers_over_several_rounds(ours: ServerOptimizer, flower: FedAvgM) -> None:
    current = _state(0)
    opt_state = OptimizerState()
    for server_round in (1, 2, 3):
        clients = [current | {k: v + 0.1 * torch.randn_like(v) for k, v in _state(10 * server_round + c).items()}
                   for c in range(3)]  # fmt: skip
        weights = [10, 20, 30]
        aggregate = {k: sum(w * c[k] for w, c in zip(weights, clients, strict=True)) / 60 for k in KEYS}
        # the global each strategy stored in configure_train: FedOpt's as arrays, FedAvgM's as a record
        arrays = {k: v.numpy().copy() for k, v in current.items()}
        flower.current_arrays = ArrayRecord(dict(current)) if isinstance(flower, FedAvgM) else arrays
        record, _ = flower.aggregate_train(
            server_round, [_reply(i + 1, c, w) for i, (c, w) in enumerate(zip(clients, weights, strict=True))]
        )
        assert record is not None
        theirs = {k: torch.from_numpy(np.asarray(a.numpy())) for k, a in record.items()}
        current, opt_state = server_step(ours, current, aggregate, opt_state)
        for k in KEYS:
            torch.testing.assert_close(current[k], theirs[k], rtol=1e-5, atol=1e-6)
    assert opt_state.step == 3


def test_adam_takes_the_bias_corrected_step() -> None:
    opt = ServerOptimizer("adam", lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    x, agg1, agg2 = torch.tensor([1.0, -2.0]), torch.tensor([1.5, -2.5]), torch.tensor([2.0, -2.0])
    s1, st = server_step(opt, {"w": x}, {"w": agg1}, OptimizerState())
    d = agg1 - x
    m, v = 0.1 * d, 0.01 * d**2
    expected = x + 0.01 * (math.sqrt(1 - 0.99) / (1 - 0.9)) * m / (v.sqrt() + 1e-3)
    torch.testing.assert_close(s1["w"], expected)
    s2, st = server_step(opt, s1, {"w": agg2}, st)
    d2 = agg2 - s1["w"]
    m, v = 0.9 * m + 0.1 * d2, 0.99 * v + 0.01 * d2**2
    expected = s1["w"] + 0.01 * (math.sqrt(1 - 0.99**2) / (1 - 0.9**2)) * m / (v.sqrt() + 1e-3)
    torch.testing.assert_close(s2["w"], expected)
    assert st.step == 2


def test_plain_and_server_lr_alone() -> None:
    x, agg = _state(0), _state(1)
    same, st = server_step(ServerOptimizer(), x, agg, OptimizerState())
    assert all(torch.equal(same[k], agg[k]) for k in KEYS) and st.step == 0
    half, _ = server_step(ServerOptimizer("none", lr=0.5), x, agg, OptimizerState())
    for k in KEYS:
        torch.testing.assert_close(half[k], x[k] + 0.5 * (agg[k] - x[k]))
    frozen = x | {KEYS[0]: x[KEYS[0]].clone()}  # a factor no client trained stays where it was
    stepped, _ = server_step(ServerOptimizer("adam", lr=0.1), x, frozen, OptimizerState())
    assert torch.equal(stepped[KEYS[0]], x[KEYS[0]])
    with pytest.raises(ValueError, match="keys differ"):
        server_step(ServerOptimizer("adam"), x, {KEYS[0]: x[KEYS[0]]}, OptimizerState())


def test_the_moments_survive_a_checkpoint_round_trip() -> None:
    _, st = server_step(ServerOptimizer("adam", lr=0.1), _state(0), _state(1), OptimizerState())
    back = OptimizerState.from_tensors(st.to_tensors())
    assert back.step == 1 and back.m.keys() == st.m.keys() == back.v.keys()
    assert all(torch.equal(back.m[k], st.m[k]) and torch.equal(back.v[k], st.v[k]) for k in KEYS)
    assert OptimizerState.from_tensors({}) == OptimizerState()


def test_the_lora_strategy_steps_its_aggregate_and_keeps_the_moments() -> None:
    opt = ServerOptimizer("adam", lr=0.05)
    strategy = LoraStrategy(registry.create("fedavg-lora", scaling=2.0), server_opt=opt)
    state = _state(0)
    clients = [_state(i) for i in (1, 2, 3)]
    new, summary = strategy.aggregate_train_from(
        1, [_reply(i + 1, c, 10 * (i + 1)) for i, c in enumerate(clients)], state
    )
    assert new is not None
    plain = fedavg_lora_aggregate([split_adapter(c, 2.0) for c in clients], [10, 20, 30])
    aggregate = {f"{m}.lora_{f}.weight": getattr(fac, f) for m, fac in plain.items() for f in "AB"}
    expected, _ = server_step(opt, state, aggregate, OptimizerState())
    assert all(torch.equal(new[k], expected[k]) for k in KEYS)
    assert strategy.server_opt_state.step == 1 and summary["accepted"] == 3


@pytest.mark.parametrize("strategy", ["fedex-lora", "fedsvd", "flexlora", "rolora"])
def test_methods_that_refactorise_refuse_a_server_optimizer(strategy: str) -> None:
    with pytest.raises(ValueError, match="server-opt works with fedavg-lora, ffa-lora, lora-fair only"):
        FederationConfig.from_run_config({"strategy": strategy, "server-opt.optimizer": "adam"})
    FederationConfig.from_run_config({"strategy": strategy, "server-opt.optimizer": "none"})  # plain: fine
    with pytest.raises(ValueError, match="cannot take a server optimizer"):
        LoraStrategy(registry.create(strategy, scaling=2.0), server_opt=ServerOptimizer("adam"))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"server-opt.optimizer": "lamb"}, "server-opt.optimizer 'lamb' is unknown"),
        ({"server-opt.lr": 0.0}, "server-opt.lr must be a finite number > 0"),
        ({"server-opt.beta1": 1.0}, "beta1 and beta2 must be in [0, 1)"),
        ({"server-opt.tau": 0.0}, "server-opt.tau must be > 0"),
    ],
)
def test_bad_server_optimizer_settings_are_refused(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", "\\[").replace(")", "\\)")):
        FederationConfig.from_run_config({"strategy": "ffa-lora", **values})
