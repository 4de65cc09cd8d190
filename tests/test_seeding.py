"""A run is a function of its seed: training with dropout (the tiny ViT's, MiniLM's) gives the same
numbers whatever the process ran before, on a client (a Ray worker runs many clients and rounds)
and in the centralised baseline (a comparison runs one per seed in one process). Both drew from
torch's global RNG unseeded before; each test fails on that code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora.client.compute import NodeContext, train_reply
from fedlora.core.config import FederationConfig
from fedlora.core.model import get_adapter_state
from fedlora.core.run_dir import RunDir
from fedlora.core.run_model import load_run_model
from fedlora.simulations.centralised import run_centralised

IMAGE_RUN = {
    "model.kind": "image-cls",
    "tasks": "digits-rotate,digits-noise",
    "num-clients": 2,
    "partition.tasks-per-client": 1,
    "num-train": 32,
    "num-test": 8,
    "batch-size": 8,
    "num-rounds": 1,
    "local-steps": 3,
    "strategy": "fedavg-lora",
    "dp.enabled": False,
}


@pytest.mark.slow
def test_a_clients_training_without_dp_is_a_function_of_its_seed(tmp_path: Path) -> None:
    cfg = FederationConfig.from_run_config(IMAGE_RUN | {"run-dir": str(tmp_path)})
    assert cfg.model.kind == "image-cls"
    state = get_adapter_state(load_run_model(cfg, cfg.lora_settings(cfg.lora.rank, 16.0)).model)
    context = NodeContext(cfg.to_run_config(), {"partition-id": 0, "num-partitions": 2}, 1)
    replies = []
    for draws in (10, 1000):
        torch.rand(draws)  # what the worker ran before
        reply = train_reply(context, state, {"server-round": 1, "train-factors": "both", "local-steps": 3, "lr": 0.01})
        assert reply.tensors is not None
        replies.append(reply.tensors)
    assert replies[0].keys() == replies[1].keys()
    assert all(np.array_equal(replies[0][k], replies[1][k]) for k in replies[0])


@pytest.mark.slow
def test_the_centralised_baseline_is_a_function_of_its_seed(tmp_path: Path) -> None:
    curves = []
    for draws in (10, 1000):
        torch.rand(draws)
        out = tmp_path / str(draws)
        run_centralised(FederationConfig.from_run_config(IMAGE_RUN | {"run-dir": str(out)}), out)
        curves.append([(r["train"]["train-loss"], r["evaluate"]["exact-match"]) for r in RunDir(out).rows()])
    assert curves[0] == curves[1] and len(curves[0]) == 1
