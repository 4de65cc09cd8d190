"""A hostile client in a real simulation (fedlora's ServerApp, Flower's SuperLink and Ray): one
attack a round from ``flower_hostile.apps``, under FlexLoRA (the method whose scalings a client
used to declare). Every attack is dropped with its reason or, for a false scaling, made
harmless; the run completes on the honest clients and its global adapter is bit for bit the
one of the honest-only reference run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flower_hostile.apps import ATTACKS, IGNORED
from safetensors.torch import load_file

from fedlora.core.config import DEFAULT_RUN_CONFIG
from fedlora.core.flower_runner import FlowerRunRequest, run_flower_app
from fedlora.core.run_dir import RunDir

pytestmark = [pytest.mark.flower, pytest.mark.slow]

TESTS = Path(__file__).resolve().parent
RUN = {
    "strategy": "flexlora",
    "flexlora-ranks": "2,4",
    "num-rounds": len(ATTACKS),
    "num-clients": 4,
    "local-steps": 2,
    "num-train": 64,
    "num-test": 8,
    "tasks": "adddigit-4,rotate-2,repeat-3,sort-desc",
    "fraction-evaluate": 0.0,
    "server-eval": False,
}
#: what the server's reason says for each attack it drops
REASONS = {
    "loss-as-list": "metric 'train-loss' is a list",
    "nan-partition-id": "metric 'partition-id' must be a finite number, got nan",
    "unreadable-arrays": "bytes of data but carries 0",
    "huge-example-count": "num-examples 1e+12 is above the run's cap of 64 (robust.max-examples)",
    "huge-values": "x the round's median update",
}


def _run(tmp_path: Path, name: str, client_app: str) -> RunDir:
    run = RunDir(tmp_path / name)
    outcome = run_flower_app(
        FlowerRunRequest(
            components=("fedlora.server.app:app", f"flower_hostile.apps:{client_app}"),
            app_name="fedlora",
            default_config=DEFAULT_RUN_CONFIG,
            overrides={**RUN, "run-dir": str(run.root)},
            num_supernodes=4,
            timeout=400,
            workdir=tmp_path / f"work-{name}",
            pythonpath=(TESTS,),
        )
    )
    assert outcome.completed, f"{outcome.status}: {outcome.status_details}\n{outcome.log_path.read_text()[-3000:]}"
    return run


def test_a_hostile_client_neither_crashes_nor_moves_the_run(tmp_path: Path) -> None:
    attacked = _run(tmp_path, "attacked", "attacking_app")
    rows = [r for r in attacked.rows() if r["round"] > 0]
    assert [r["round"] for r in rows] == list(range(1, len(ATTACKS) + 1))
    for row, attack in zip(rows, ATTACKS, strict=True):
        train = row["train"]
        if attack in IGNORED:  # a false scaling: the server uses its own, the reply counts
            assert (train["accepted"], train["rejected"]) == (4, 0), (attack, row["dropped"])
            continue
        assert (train["accepted"], train["rejected"]) == (3, 1), (attack, row["dropped"])
        (reason,) = row["dropped"].values()
        assert REASONS[attack] in reason, (attack, reason)

    reference = _run(tmp_path, "reference", "reference_app")
    ref_rows = [r for r in reference.rows() if r["round"] > 0]
    assert [r["train"]["accepted"] for r in ref_rows] == [r["train"]["accepted"] for r in rows]
    a = load_file(str(attacked.global_adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(reference.global_adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the attacks moved the global adapter"
