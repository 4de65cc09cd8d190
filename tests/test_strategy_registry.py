"""A new strategy is one class and one ``register`` call: the generic Flower strategy aggregates
it, the run configuration validates it, ``fl-sim --list-strategies`` lists it."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from torch import Tensor

from fedlora.core.config import DEFAULT_RUN_CONFIG, FederationConfig
from fedlora.simulations.cli import main as fl_sim
from fedlora.strategies import registry
from fedlora.strategies.adapter import join_adapter
from fedlora.strategies.algorithms import Accumulator, Factors, LoraAlgorithm, MethodSettings
from fedlora.strategies.fedavg_lora import FedAvgLora
from fedlora.strategies.flower import LoraStrategy
from fedlora.strategies.streaming import FactorSumAccumulator

SEVEN = "fedavg-lora, ffa-lora, lora-fair, fedex-lora, rolora, fedsvd, flexlora"
A_KEY, B_KEY = "base_model.model.m0.lora_A.weight", "base_model.model.m0.lora_B.weight"


class ServerStepB(LoraAlgorithm):
    """Toy method: clients train B only; the server moves B half way to the weighted mean of the
    replies (a server learning rate of 0.5), A stays as it is."""

    name = "toy-server-step"
    step: ClassVar[float] = 0.5

    def trained_factors(self, server_round: int) -> Factors:
        return "B"

    def finish(
        self, server_round: int, acc: Accumulator, state: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        assert isinstance(acc, FactorSumAccumulator)
        new = join_adapter(acc.result())
        for key in new:
            if key.endswith(".lora_B.weight"):
                new[key] = state[key] + self.step * (new[key] - state[key])
        return new, {"server-step": self.step}


@pytest.fixture
def toy() -> Iterator[type[LoraAlgorithm]]:
    registry.register(ServerStepB)  # the one line that adds a method
    yield ServerStepB
    registry.STRATEGIES.pop(ServerStepB.name)  # leave the registry as other tests expect it


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """Messages need a run identity outside a Flower process."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def _reply(node: int, tensors: dict[str, Tensor], num_examples: int) -> Message:
    request = Message(RecordDict(), dst_node_id=node, message_type="train")
    content = RecordDict({"metrics": MetricRecord({"num-examples": num_examples}), "arrays": ArrayRecord(tensors)})
    return Message(content, reply_to=request)


def test_a_registered_toy_strategy_aggregates_through_the_generic_flower_strategy(toy: type[LoraAlgorithm]) -> None:
    strategy = LoraStrategy(registry.create("toy-server-step", scaling=2.0))
    assert strategy.lr == 3e-3  # the base class's tuned default
    state = {A_KEY: torch.tensor([[1.0, 2.0]]), B_KEY: torch.tensor([[0.0], [4.0]])}  # A: r x d_in, B: d_out x r
    replies = [
        _reply(1, {B_KEY: torch.tensor([[1.0], [2.0]])}, 10),
        _reply(2, {B_KEY: torch.tensor([[3.0], [6.0]])}, 30),
        _reply(3, {A_KEY: torch.tensor([[9.0, 9.0]]), B_KEY: torch.tensor([[9.0], [9.0]])}, 20),  # A: refused
    ]
    new, summary = strategy.aggregate_train_from(1, replies, state)
    assert new is not None
    # B_bar = (10 [1, 2] + 30 [3, 6]) / 40 = [2.5, 5]; B = [0, 4] + 0.5 ([2.5, 5] - [0, 4]) = [1.25, 4.5]
    assert torch.equal(new[B_KEY], torch.tensor([[1.25], [4.5]]))
    assert torch.equal(new[A_KEY], torch.tensor([[1.0, 2.0]]))
    assert summary["accepted"] == 2 and summary["rejected"] == 1 and summary["num-examples"] == 40
    assert strategy.rounds[1].reasons[3] == f"unknown tensor name(s): {A_KEY}"
    assert summary["server-step"] == 0.5
    assert summary["update-norm"] == math.sqrt(1.25**2 + 0.5**2)
    assert summary["bytes-received"] == 2 * 2 * 4  # two B-only replies of two float32 values


def test_a_registered_toy_strategy_goes_through_config_validation(
    toy: type[LoraAlgorithm], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = FederationConfig.from_run_config({"strategy": "toy-server-step", "lora-rank": 4})
    assert cfg.algorithm_class is ServerStepB and cfg.method == MethodSettings()
    assert (cfg.client_rank(3), cfg.max_rank()) == (4, 4)
    assert cfg.to_run_config() == DEFAULT_RUN_CONFIG | {
        "tasks": "adddigit-4,rotate-2,repeat-3,sort-desc",
        "strategy": "toy-server-step",
        "lora-rank": 4,
    }
    with pytest.raises(ValueError, match=r"dp\.client-level works with \['fedavg-lora'\] only, not 'toy-server-step'"):
        FederationConfig.from_run_config({"strategy": "toy-server-step", "dp.client-level": "server-side"})
    with pytest.raises(ValueError, match=r"SecAgg\+ only as a legacy workflow"):  # a sum-only method
        FederationConfig.from_run_config({"strategy": "toy-server-step", "secure-aggregation": True})
    with pytest.raises(ValueError, match=r"use a sum-only strategy \(fedavg-lora, ffa-lora, rolora, fedsvd, toy-"):
        FederationConfig.from_run_config({"strategy": "lora-fair", "secure-aggregation": True})
    assert fl_sim(["--list-strategies"]) == 0
    assert "toy-server-step" in capsys.readouterr().out.split()


@dataclass(frozen=True)
class StepSettings(MethodSettings):
    """A toy section: its one field is the run-config key ``toy-step-size``."""

    prefix: ClassVar[str] = "toy-step-"

    size: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.size <= 1:
            raise ValueError(f"toy-step-size must be in (0, 1], got {self.size!r}")


class SettledServerStepB(ServerStepB):
    """The toy with its step as a setting of its own."""

    name = "toy-settled-step"
    settings_cls = StepSettings

    @property
    def step(self) -> float:  # type: ignore[override]
        assert isinstance(self.settings, StepSettings)
        return self.settings.size


def test_a_strategy_section_brings_its_own_run_config_keys() -> None:
    registry.register(SettledServerStepB)
    try:
        cfg = FederationConfig.from_run_config({"strategy": "toy-settled-step", "toy-step-size": 1})
        assert cfg.method == StepSettings(size=1.0)
        assert cfg.to_run_config()["toy-step-size"] == 1.0
        assert FederationConfig.from_run_config({}).to_run_config()["toy-step-size"] == 0.5
        with pytest.raises(ValueError, match=r"toy-step-size must be in \(0, 1\], got 2\.0"):
            FederationConfig.from_run_config({"toy-step-size": 2})
        with pytest.raises(ValueError, match="run config: toy-step-size must be a float, got 'big'"):
            FederationConfig.from_run_config({"toy-step-size": "big"})
        algorithm = registry.create("toy-settled-step", scaling=1.0, settings=cfg.method)
        assert isinstance(algorithm, SettledServerStepB) and algorithm.step == 1.0
    finally:
        registry.STRATEGIES.pop(SettledServerStepB.name)
    with pytest.raises(ValueError, match=r"run config: unknown key\(s\) \['toy-step-size'\]"):
        FederationConfig.from_run_config({"toy-step-size": 0.5})


def test_unknown_and_duplicate_names_are_refused_with_the_known_ones(toy: type[LoraAlgorithm]) -> None:
    with pytest.raises(ValueError, match=f"unknown strategy 'fedprox'; known strategies: {SEVEN}, toy-server-step$"):
        registry.get("fedprox")
    with pytest.raises(ValueError, match=f"unknown strategy 'fedprox'; known strategies: {SEVEN}, toy-server-step$"):
        registry.create("fedprox", scaling=1.0)
    with pytest.raises(ValueError, match="unknown strategy 'fedprox'; known strategies: fedavg-lora, "):
        FederationConfig.from_run_config({"strategy": "fedprox"})
    known = f"known strategies: {SEVEN}, toy-server-step$"
    with pytest.raises(ValueError, match=f"strategy 'toy-server-step' is already registered; {known}"):
        registry.register(ServerStepB)
    with pytest.raises(ValueError, match=f"strategy 'fedavg-lora' is already registered; {known}"):
        registry.register(type("Again", (FedAvgLora,), {}))
    with pytest.raises(TypeError, match="a strategy is a LoraAlgorithm subclass"):
        registry.register(FederationConfig)  # type: ignore[arg-type]


def test_a_setting_may_not_take_a_key_the_run_config_already_has() -> None:
    @dataclass(frozen=True)
    class Clash(MethodSettings):
        prefix: ClassVar[str] = "lora-"
        rank: int = 2

    class Clashing(LoraAlgorithm):
        name = "toy-clash"
        settings_cls = Clash

    registry.register(Clashing)
    try:
        with pytest.raises(ValueError, match=r"run config: key 'lora-rank' of .* is already taken"):
            FederationConfig.from_run_config({})
    finally:
        registry.STRATEGIES.pop(Clashing.name)
