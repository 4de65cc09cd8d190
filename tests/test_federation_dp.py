"""DP federated training end to end: every client's lifetime ledger, composed across runs,
recomputes the epsilon the run reports; a client at its cap declines and the run goes on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.core.config import DEFAULT_RUN_CONFIG
from fedlora.core.flower_runner import FEDLORA_COMPONENTS, FlowerRunRequest, run_flower_app
from fedlora.privacy.accounting import compute_epsilon
from fedlora.privacy.ledger import PrivacyLedger

pytestmark = [pytest.mark.flower, pytest.mark.slow]

DP = {
    "num-rounds": 2,
    "num-clients": 3,
    "local-steps": 6,
    "num-train": 256,
    "num-test": 40,
    "tasks": "adddigit-4,rotate-2,repeat-3",
    "dp.enabled": True,
    "dp.target-epsilon": 6.0,
}


def _run(tmp_path: Path, name: str, **overrides: object) -> tuple[Path, list[dict]]:
    run_dir = tmp_path / name
    outcome = run_flower_app(
        FlowerRunRequest(
            components=FEDLORA_COMPONENTS,
            app_name="fedlora",
            default_config=DEFAULT_RUN_CONFIG,
            overrides={**DP, "run-dir": str(run_dir), **overrides},
            num_supernodes=3,
            timeout=400,
            workdir=tmp_path / f"work-{name}",
        )
    )
    assert outcome.completed, f"{outcome.status}: {outcome.status_details}"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, [r for r in rows if r["round"] > 0]  # round 0: the base model's evaluation only


def test_lifetime_ledgers_compose_across_runs_and_enforce_the_cap(tmp_path: Path) -> None:
    state = tmp_path / "state"
    run1, rows1 = _run(tmp_path, "run1", strategy="ffa-lora", **{"state-dir": str(state)})
    plan = json.loads((run1 / "privacy_plan.json").read_text())
    sigma, q, delta = plan["noise_multiplier_used"], plan["sample_rate"], plan["delta"]
    assert q == 32 / 256 and delta == 1e-4
    assert plan["expected_epsilon"] <= 6.0 + 0.01  # calibrated once for the whole run

    ledgers = [PrivacyLedger(state / f"partition-{p}") for p in range(3)]
    for ledger in ledgers:
        assert ledger.history() == [(sigma, q, 6), (sigma, q, 6)]
    two_rounds = compute_epsilon([(sigma, q, 12)], delta, "rdp")
    assert rows1[-1]["train"]["epsilon-max"] == pytest.approx(two_rounds, rel=1e-9)
    assert all(r["train"]["accepted"] == 3 for r in rows1)
    assert rows1[0]["train"]["epsilon-max"] < rows1[1]["train"]["epsilon-max"] <= 6.0 + 0.01
    report = json.loads((run1 / "report" / "privacy.json").read_text())  # written by the server at the end
    assert (run1 / "report" / "privacy.html").is_file() and (run1 / "report" / "privacy.md").is_file()
    assert max(c["epsilon"] for c in report["clients"]) == pytest.approx(two_rounds, rel=1e-9)

    # a second run on the same client state, with the fused engine: epsilon composes (the engines
    # charge alike); the cap admits one more round only
    three = compute_epsilon([(sigma, q, 18)], delta, "rdp")
    four = compute_epsilon([(sigma, q, 24)], delta, "rdp")
    overrides = {"state-dir": str(state), "dp.max-epsilon": (three + four) / 2, "dp.engine": "fused"}
    _, rows2 = _run(tmp_path, "run2", strategy="fedavg-lora", **overrides)
    assert rows2[0]["train"]["accepted"] == 3
    assert rows2[0]["train"]["epsilon-max"] == pytest.approx(three, rel=1e-9)
    assert rows2[1]["train"]["declined"] == 3 and rows2[1]["train"]["accepted"] == 0
    assert all(f"past this node's cap {overrides['dp.max-epsilon']:g}" in r for r in rows2[1]["dropped"].values())
    for ledger in ledgers:
        assert len(ledger.history()) == 3  # never charged for the declined round
        assert ledger.epsilon(delta, "rdp") == pytest.approx(three, rel=1e-9)

    fresh = PrivacyLedger(tmp_path / "elsewhere")
    assert fresh.epsilon(delta, "rdp") == 0.0  # a new state directory starts at zero


@pytest.mark.parametrize("clipping", ["server-side", "client-side"])
def test_client_level_dp_through_flower_wrappers(tmp_path: Path, clipping: str) -> None:
    """Flower's fixed-clipping wrapper around FedAvg-LoRA: the global adapter is the average of
    the (clipped) replies plus Gaussian noise of std sigma * C / m, and its client-level epsilon
    is reported apart from any sample-level epsilon."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    sigma, clip = 0.01, 0.5
    run_dir, rows = _run(
        tmp_path,
        "cl",
        strategy="fedavg-lora",
        **{
            "num-rounds": 1,
            "dp.enabled": False,
            "dp.client-level": clipping,
            "dp.client-noise-multiplier": sigma,
            "dp.client-clipping-norm": clip,
            "audit.save-updates": True,
        },
    )
    info = json.loads((run_dir / "client_level_dp.json").read_text())
    assert info["privacy-unit"].startswith("one client's whole dataset")
    eps = compute_epsilon([(sigma, 1.0, 1)], info["delta"], "rdp")
    assert rows[0]["client-level-dp"]["epsilon"] == pytest.approx(eps) and "epsilon-max" not in rows[0]["train"]

    start = load_file(str(run_dir / "checkpoints" / "round-0" / "adapter_model.safetensors"))
    final = load_file(str(run_dir / "adapters" / "global" / "adapter_model.safetensors"))
    replies, weights = [], []
    for f in sorted((run_dir / "audit" / "round-1").glob("node-*.safetensors")):
        replies.append(load_file(str(f)))
        with safe_open(str(f), "pt") as h:
            weights.append(float(h.metadata()["num-examples"]))
    assert len(replies) == 3 and len(set(weights)) == 1  # Flower's wrappers need uniform weights
    for reply in replies:  # each update was clipped to C (within float rounding)
        norm = torch.sqrt(sum(((reply[k] - start[k]).double() ** 2).sum() for k in reply))
        assert norm <= clip * (1 + 1e-4)
    noise = torch.cat([(final[k] - sum(r[k] for r in replies) / 3).flatten() for k in final])
    assert float(noise.std()) == pytest.approx(sigma * clip / 3, rel=0.1)
