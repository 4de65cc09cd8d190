"""The federated run configuration is validated once, with messages that name the problem."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedlora.core.config import DEFAULT_RUN_CONFIG, FederationConfig
from fedlora.core.run_dir import ResumeError, RunDir
from fedlora.server.app import prepare_run_dir


def test_defaults_round_trip_through_flower_keys() -> None:
    cfg = FederationConfig.from_run_config(DEFAULT_RUN_CONFIG)
    assert cfg == FederationConfig()
    assert cfg.to_run_config() == DEFAULT_RUN_CONFIG
    assert {"audit.save-updates", "dp.enabled", "dp.max-grad-norm", "dp.client-level"} <= set(DEFAULT_RUN_CONFIG)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rounds": 3}, r"unknown key\(s\) \['rounds'\]"),
        ({"num-rounds": "3"}, "num-rounds must be a int, got '3'"),
        ({"dp.enabled": 1}, "dp.enabled must be true or false, got 1"),
        ({"num-rounds": 0}, "num-rounds must be an integer >= 1, got 0"),
        ({"fraction-train": 1.5}, r"fraction-train must be in \(0, 1\], got 1.5"),
        ({"strategy": "fedprox"}, "unknown strategy 'fedprox'; known strategies: fedavg-lora"),
        ({"tasks": "copy,caesar-99"}, "unknown task 'caesar-99'"),
        ({"flexlora-ranks": "4,x"}, "flexlora-ranks must be comma-separated integers"),
        ({"dp.accountant": "gdp"}, "unknown accountant 'gdp'"),
        ({"dp.engine": "ghost"}, "dp.engine must be one of opacus, fused, got 'ghost'"),
        ({"lora-fair-solver": "exact"}, "lora-fair-solver must be 'iterative' or 'closed-form'"),
        ({"model-dir": "/nowhere"}, "model-dir /nowhere does not exist"),
    ],
)
def test_bad_values_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises((ValueError, KeyError, FileNotFoundError), match=message):
        FederationConfig.from_run_config({**DEFAULT_RUN_CONFIG, **overrides})


def test_client_level_dp_only_where_the_math_allows() -> None:
    ok = {"dp.client-level": "server-side", "strategy": "fedavg-lora"}
    assert FederationConfig.from_run_config(ok).dp_client_level == "server-side"
    with pytest.raises(ValueError, match=r"dp\.client-level works with \['fedavg-lora'\] only, not 'ffa-lora'"):
        FederationConfig.from_run_config({**ok, "strategy": "ffa-lora"})


@pytest.mark.parametrize("strategy", ["lora-fair", "fedex-lora", "flexlora"])
def test_secure_aggregation_refused_for_product_based_methods(strategy: str) -> None:
    with pytest.raises(ValueError, match="needs each client's own product B_k A_k"):
        FederationConfig.from_run_config({"secure-aggregation": True, "strategy": strategy})


@pytest.mark.parametrize("strategy", ["fedavg-lora", "ffa-lora", "rolora", "fedsvd"])
def test_secure_aggregation_refused_with_the_flower_reason_for_sum_methods(strategy: str) -> None:
    with pytest.raises(ValueError, match=r"SecAgg\+ only as a legacy workflow"):
        FederationConfig.from_run_config({"secure-aggregation": True, "strategy": strategy})


def test_client_state_dirs() -> None:
    cfg = FederationConfig(run_dir="runs/x")
    assert str(cfg.client_state_dir(2)) == "runs/x/client-state/partition-2"
    assert str(FederationConfig(state_dir="/s").client_state_dir(0)) == "/s/partition-0"
    assert str(cfg.client_state_dir(0, "/node")) == "/node"


def test_resume_takes_keys_newer_than_the_stored_run_as_their_defaults_and_keeps_the_dp_engine(
    tmp_path: Path,
) -> None:
    """A run stored before ``dp.engine`` existed resumes with the default engine; a stored run
    never switches engines (a replayed round must release the identical bits)."""
    resolved = {**DEFAULT_RUN_CONFIG, "resume": True}
    old = {k: v for k, v in DEFAULT_RUN_CONFIG.items() if k != "dp.engine"}
    (tmp_path / "config.json").write_text(json.dumps(old))
    run_dir = RunDir(tmp_path)
    cfg = SimpleNamespace(resume=True)
    prepare_run_dir(run_dir, cfg, resolved)  # type: ignore[arg-type]
    with pytest.raises(ResumeError, match=r"dp\.engine: 'opacus' -> 'fused'"):
        prepare_run_dir(run_dir, cfg, {**resolved, "dp.engine": "fused"})  # type: ignore[arg-type]
