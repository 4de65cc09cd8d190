"""DP federated training end to end: every client's lifetime ledger, composed across runs,
recomputes the epsilon the run reports; a client at its cap declines and the run goes on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.federation import DEFAULT_RUN_CONFIG
from privacy.accounting import compute_epsilon
from privacy.ledger import PrivacyLedger
from simulations.runner import SimulationRequest, run_simulation_app

pytestmark = pytest.mark.flower

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
    outcome = run_simulation_app(
        SimulationRequest(
            components=("server.app:app", "client.app:app"),
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
    return run_dir, rows


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

    # a second run on the same client state: epsilon composes; the cap admits one more round only
    three = compute_epsilon([(sigma, q, 18)], delta, "rdp")
    four = compute_epsilon([(sigma, q, 24)], delta, "rdp")
    _, rows2 = _run(
        tmp_path, "run2", strategy="fedavg-lora", **{"state-dir": str(state), "dp.max-epsilon": (three + four) / 2}
    )
    assert rows2[0]["train"]["accepted"] == 3
    assert rows2[0]["train"]["epsilon-max"] == pytest.approx(three, rel=1e-9)
    assert rows2[1]["train"]["declined"] == 3 and rows2[1]["train"]["accepted"] == 0
    assert all("past dp.max-epsilon" in reason for reason in rows2[1]["dropped"].values())
    for ledger in ledgers:
        assert len(ledger.history()) == 3  # never charged for the declined round
        assert ledger.epsilon(delta, "rdp") == pytest.approx(three, rel=1e-9)

    fresh = PrivacyLedger(tmp_path / "elsewhere")
    assert fresh.epsilon(delta, "rdp") == 0.0  # a new state directory starts at zero
