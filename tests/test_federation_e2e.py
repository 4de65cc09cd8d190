"""Every registered strategy end to end on Flower's simulation runtime (real SuperLink, real
Ray workers, the embedded model, non-IID task splits), and audit files that let anyone
recompute an aggregation."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fedlora.core.config import DEFAULT_RUN_CONFIG, FederationConfig
from fedlora.core.embedded import default_model_dir
from fedlora.server.app import algorithm_kwargs
from fedlora.simulations.simulate import simulate
from fedlora.strategies import registry
from fedlora.strategies.adapter import split_adapter
from fedlora.strategies.algorithms import Reply
from fedlora.strategies.fedavg_lora import fedavg_lora_aggregate

pytestmark = [pytest.mark.flower, pytest.mark.slow]

SMALL = {
    "num-rounds": 2,  # round 2 aggregates onto a global that round 1 moved
    "num-clients": 3,
    "local-steps": 8,
    "num-train": 256,
    "num-test": 40,
    "tasks": "adddigit-4,rotate-2,repeat-3",  # one task per client: non-IID
    "flexlora-ranks": "4,8,2",
    "lora-fair-steps": 200,
    "audit.save-updates": True,
}


def run_federation(tmp_path: Path, strategy: str, **overrides: object) -> Path:
    """One run through ``fl-sim``'s own path (validation, run config, simulation runtime)."""
    run_dir = tmp_path / "run"
    config = {**SMALL, "strategy": strategy, "run-dir": str(run_dir), **overrides}
    outcome = simulate(config, console=Console(quiet=True), quiet=True, timeout=400)
    assert outcome.completed, f"{outcome.status}: {outcome.status_details}\nlog: {outcome.log_path.read_text()[-3000:]}"
    assert outcome.leftover_pids_killed == ()
    return run_dir


def _rows(run_dir: Path) -> list[dict]:
    """The rounds' rows (round 0 holds only the server's evaluation of the base model)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["round"] == 0 and set(rows[0]["server-eval"]) == set(SMALL["tasks"].split(","))
    return rows[1:]


def _state(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(adapter_dir / "adapter_model.safetensors"))


@pytest.mark.parametrize("strategy", sorted(registry.STRATEGIES))
def test_strategy_end_to_end(strategy: str, tmp_path: Path) -> None:
    run_dir = run_federation(tmp_path, strategy)
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["train"]["accepted"] == 3 and r["train"]["rejected"] == 0 for r in rows)
    losses = [r["train"]["train-loss"] for r in rows]
    assert losses[-1] < losses[0], losses
    assert 0.0 <= rows[-1]["evaluate"]["exact-match"] <= 1.0
    assert len(rows[-1]["per-client"]) == 3

    final = run_dir / "adapters" / "global"
    for r in range(3):
        assert (run_dir / "checkpoints" / f"round-{r}" / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(str(default_model_dir()))
    model = PeftModel.from_pretrained(base, str(final))
    ids = torch.tensor([[3 + ord(c) for c in "o2:abcde="]])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["strategy"] == strategy and config["lr"] > 0
    for name in ("partition.json", "report/privacy.md", "report/training.png", "report/clients.csv"):
        assert (run_dir / name).is_file(), name
    assert all(0 <= m["local-exact-match"] <= 1 for m in rows[-1]["per-client-train"].values())
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700  # the operator's alone

    state = _state(final)
    if strategy == "ffa-lora":  # A never moves: bit-identical to round 0
        a0 = _state(run_dir / "checkpoints" / "round-0")
        a_keys = [k for k in state if ".lora_A." in k]
        assert a_keys and all(torch.equal(state[k], a0[k]) for k in a_keys)
        assert rows[-1]["train"]["bytes-received"] == rows[-1]["train"]["bytes-sent"]  # B up, B down only
    if strategy == "fedsvd":  # A has orthonormal rows after the server's SVD
        a = state[next(k for k in state if ".lora_A." in k)].double()
        assert torch.allclose(a @ a.T, torch.eye(a.shape[0], dtype=torch.float64), atol=1e-5)
    if strategy == "fedex-lora":
        deltas = load_file(str(final / "base_delta.safetensors"))
        assert deltas and all(torch.isfinite(v).all() for v in deltas.values())
    if strategy in ("fedavg-lora", "lora-fair"):
        assert all(0 < r["train"]["aggregation-error"] < 1 for r in rows)
    if strategy == "fedavg-lora":
        _check_fedavg_from_audit_files(run_dir, server_round=2)
    if strategy == "flexlora":
        assert all("truncation-error" in r["train"] for r in rows)
    _check_recompute_from_files(run_dir, strategy, server_round=2)


def _checkpoint(run_dir: Path, name: str) -> dict[str, torch.Tensor]:
    """A global state as the server held it: the PEFT adapter plus FedEx-LoRA's base deltas."""
    d = run_dir / "checkpoints" / name
    state = _state(d)
    if (d / "base_delta.safetensors").is_file():
        state |= load_file(str(d / "base_delta.safetensors"))
    return state


def _check_recompute_from_files(run_dir: Path, strategy: str, server_round: int) -> None:
    """An outsider's recomputation: the round's audit replies and the previous checkpoint,
    through the same math, give the round's checkpoint."""
    config = json.loads((run_dir / "config.json").read_text())
    cfg = FederationConfig.from_run_config({k: v for k, v in config.items() if k in DEFAULT_RUN_CONFIG})
    algorithm = registry.create(strategy, **algorithm_kwargs(cfg, config["scaling"], fan_in_fan_out=False))
    previous = _checkpoint(run_dir, f"round-{server_round - 1}")
    acc = algorithm.new_accumulator(server_round)
    for f in sorted((run_dir / "audit" / f"round-{server_round}").glob("node-*.safetensors")):
        with safe_open(str(f), "pt") as handle:
            meta = handle.metadata()
        reply = Reply(load_file(str(f)), float(meta["num-examples"]), float(meta["scaling"]))
        acc.add(algorithm.reply_modules(previous, reply), reply.num_examples)
    recomputed, _ = algorithm.finish(server_round, acc, previous)
    saved = _checkpoint(run_dir, f"round-{server_round}")
    assert recomputed.keys() == saved.keys()
    for key in saved:
        if key.endswith(".lora_A.weight"):  # compare the update each module adds: B A (SVD signs are free)
            module = key[: -len(".lora_A.weight")]
            b_key = module + ".lora_B.weight"
            torch.testing.assert_close(
                recomputed[b_key] @ recomputed[key], saved[b_key] @ saved[key], rtol=1e-4, atol=1e-6
            )
        elif not key.endswith(".lora_B.weight"):
            torch.testing.assert_close(recomputed[key], saved[key], rtol=1e-4, atol=1e-6)


def _audit(run_dir: Path, server_round: int) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    replies, weights = [], []
    for f in sorted((run_dir / "audit" / f"round-{server_round}").glob("node-*.safetensors")):
        replies.append(load_file(str(f)))
        with safe_open(str(f), "pt") as handle:
            weights.append(float(handle.metadata()["num-examples"]))
    return replies, weights


def _check_fedavg_from_audit_files(run_dir: Path, server_round: int) -> None:
    """From one round's audit files alone, FedAvg-LoRA's global adapter is recomputed exactly
    with the plain factor average (no strategy object in the loop)."""
    replies, weights = _audit(run_dir, server_round)
    assert len(replies) == 3 and all(w == 256 for w in weights)
    scaling = json.loads((run_dir / "config.json").read_text())["scaling"]
    result = fedavg_lora_aggregate([split_adapter(r, scaling) for r in replies], weights)
    saved = _state(run_dir / "checkpoints" / f"round-{server_round}")
    assert len(saved) == 2 * len(result)
    for module, f in result.items():
        torch.testing.assert_close(saved[module + ".lora_A.weight"], f.A, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(saved[module + ".lora_B.weight"], f.B, rtol=1e-6, atol=1e-7)
