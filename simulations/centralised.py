"""The centralised reference of a comparison: one LoRA adapter trained on all clients' data pooled.

It answers "how far from centralised training is federated?". It gets the same gradient budget
as the federation (per round, local steps x clients sampled), the same learning rate as
FedAvg-LoRA, and, with DP on, DP-SGD on the pooled data at the same target epsilon (the pooled
example is the privacy unit). It is evaluated like the federation: on every client's own test
split, example-weighted; and it writes a run directory of the same shape (``config.json``,
``metrics.jsonl``, ``adapters/global``), so the comparison reads both the same way.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from fedlora.core.client_data import client_examples
from fedlora.core.config import FederationConfig
from fedlora.core.data import Item, collate
from fedlora.core.records import Record
from fedlora.core.run_dir import RunDir
from fedlora.core.run_model import load_run_model
from fedlora.core.train import TrainSettings, batches, evaluate, seeded_global_rng, train, train_in
from fedlora.privacy.accounting import compute_epsilon
from fedlora.privacy.dp import DPSGDConfig, dp_sgd
from fedlora.privacy.planning import default_delta, plan_noise
from fedlora.privacy.sampling import sample_rate
from fedlora.strategies.fedavg_lora import FedAvgLora


def run_centralised(cfg: FederationConfig, out: Path) -> Path:
    """Train and evaluate the pooled baseline for ``cfg``; returns the run directory ``out``.

    Dropout draws from torch's global RNG, so the run forks it and seeds it from ``cfg.seed`` (as
    clients do): the baseline is a function of its seed, not of what the process ran before."""
    with seeded_global_rng(cfg.seed):
        return _run_centralised(cfg, out)


def _run_centralised(cfg: FederationConfig, out: Path) -> Path:
    torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    lr = cfg.lr_for(FedAvgLora.defaults.lr)
    alpha = cfg.alpha_for(FedAvgLora.defaults.alpha)
    loaded = load_run_model(cfg, cfg.lora_settings(cfg.lora.rank, alpha))
    model = loaded.model
    run = RunDir(out, model, cfg.base_model_dir())
    pad = loaded.pad_id
    train_ex: list[Record] = []
    tests: list[list[Item]] = []
    for p in range(cfg.num_clients):
        tr, te = client_examples(cfg, p)
        train_ex.extend(tr)
        tests.append(loaded.encode(te).items)
    pooled = loaded.encode(train_ex).items
    sampled = cfg.clients_per_round
    steps_per_round = cfg.local_steps * sampled
    config: dict[str, Any] = {
        "strategy": "centralised",
        "lr": lr,
        "lora-alpha": alpha,
        "seed": cfg.seed,
        "num-rounds": cfg.num_rounds,
        "steps-per-round": steps_per_round,
        "pooled-examples": len(pooled),
        "dp.enabled": cfg.dp.enabled,
        "dp.target-epsilon": cfg.dp.target_epsilon,
    }
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    settings = TrainSettings(
        steps=steps_per_round,
        lr=lr,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        physical_batch_size=cfg.model.physical_batch_size,
    )
    started = time.perf_counter()
    if not cfg.dp.enabled:
        run.write_config(config)
        stream = (collate(b, pad) for b in batches(pooled, cfg.batch_size, cfg.seed))
        for r in range(1, cfg.num_rounds + 1):
            res = train(model, pooled, settings, pad, optimizer=(optimizer, constant), batch_stream=stream)
            _record(run, r, res.mean_loss, model, tests, pad, started, None)
    else:
        q = sample_rate(cfg.batch_size, len(pooled))
        delta = cfg.dp.delta or default_delta(len(pooled))
        total = steps_per_round * cfg.num_rounds
        planned = plan_noise(cfg.dp.target_epsilon, delta, 1, 1.0, total, q, cfg.dp.accountant)
        sigma = cfg.dp.noise_multiplier or planned.noise_multiplier
        config |= {"dp.noise-multiplier": sigma, "dp.delta": delta, "sample-rate": q}
        run.write_config(config)
        dp = DPSGDConfig(sigma, cfg.dp.max_grad_norm, cfg.dp.engine)
        with dp_sgd(model, optimizer, pooled, lambda b: collate(b, pad), cfg.batch_size, dp, cfg.seed) as pt:
            for r in range(1, cfg.num_rounds + 1):
                res = train_in(pt, pooled, settings, pad)
                eps = compute_epsilon([(sigma, q, steps_per_round * r)], delta, cfg.dp.accountant)
                _record(run, r, res.mean_loss, model, tests, pad, started, eps)
    run.save_global()
    return out


def _record(
    run: RunDir,
    server_round: int,
    loss: float,
    model: torch.nn.Module,
    tests: list[list[Item]],
    pad: int,
    started: float,
    epsilon: float | None,
) -> None:
    """One metrics row in the federated runs' shape: train loss, example-weighted exact match."""
    results = [evaluate(model, t, pad) for t in tests if t]
    total = sum(r.num_examples for r in results)
    ems = [r.exact_match for r in results]
    train: dict[str, float] = {"train-loss": loss}
    if epsilon is not None:
        train["epsilon-max"] = epsilon
    row = {
        "round": server_round,
        "elapsed": round(time.perf_counter() - started, 3),
        "train": train,
        "evaluate": {
            "num-examples": total,
            "clients": len(results),
            "exact-match": sum(r.exact_match * r.num_examples for r in results) / total,
            "exact-match-min": min(ems),
            "exact-match-max": max(ems),
        },
    }
    run.append_row(row)
