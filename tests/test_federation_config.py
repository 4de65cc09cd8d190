"""The federated run configuration is validated once, with messages that name the problem."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedlora.core.cli import resume_config
from fedlora.core.config import DEFAULT_RUN_CONFIG, FederationConfig
from fedlora.core.run_dir import ResumeError, RunDir
from fedlora.server.app import prepare_run_dir


def test_defaults_round_trip_through_flower_keys() -> None:
    cfg = FederationConfig.from_run_config(DEFAULT_RUN_CONFIG)
    assert cfg == FederationConfig()
    # an empty ``tasks`` is the kind's default, written out resolved so a resumed run never depends on it
    assert DEFAULT_RUN_CONFIG["tasks"] == "" and DEFAULT_RUN_CONFIG["model.kind"] == "causal-lm"
    assert cfg.to_run_config() == DEFAULT_RUN_CONFIG | {"tasks": "adddigit-4,rotate-2,repeat-3,sort-desc"}
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
    assert FederationConfig.from_run_config(ok).dp.client_level == "server-side"
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


#: the run config of every run directory written before the configuration had sections
FLAT_DEFAULTS_BEFORE_SECTIONS = {
    "strategy": "fedavg-lora", "num-rounds": 3, "num-clients": 4, "fraction-train": 1.0, "fraction-evaluate": 1.0,
    "min-replies": 1, "local-steps": 20, "lr": 0.0, "lr-decay": 1.0, "batch-size": 32, "lora-rank": 8,
    "lora-alpha": 0.0, "lora-dropout": 0.0, "lora-targets": "all-linear", "lora-rslora": False, "flexlora-ranks": "",
    "lora-fair-lambda": 0.01, "lora-fair-solver": "iterative", "lora-fair-steps": 1000,
    "tasks": "adddigit-4,rotate-2,repeat-3,sort-desc", "tagged": True, "num-train": 2000, "num-test": 100,
    "data-path": "", "partition.scheme": "tasks-per-client", "partition.alpha": 0.5, "partition.tasks-per-client": 1,
    "partition.size-skew": 0.0, "server-eval": True, "seed": 0, "model-dir": "", "run-dir": "runs/sim",
    "round-timeout": 600.0, "max-reply-mb": 256.0, "threads": 1, "audit.save-updates": False, "state-dir": "",
    "dp.enabled": False, "dp.noise-multiplier": 0.0, "dp.target-epsilon": 8.0, "dp.delta": 0.0,
    "dp.max-grad-norm": 1.0, "dp.accountant": "rdp", "dp.plan-examples": 0, "dp.max-epsilon": 0.0,
    "dp.secret-noise": True, "dp.engine": "opacus", "dp.client-level": "off", "dp.client-noise-multiplier": 1.0,
    "dp.client-clipping-norm": 1.0, "secure-aggregation": False, "personalize.steps": 0, "personalize.epsilon": 1.0,
    "resume": False, "deployed": False,
}  # fmt: skip


#: keys added with the model kinds; an old run directory lacks them and resumes at these defaults
MODEL_KIND_KEYS = {
    "model.kind": "causal-lm", "model.device": "auto", "model.dtype": "float32", "model.max-length": 0,
    "model.eval-batch-size": 64, "model.physical-batch-size": 0, "model.labels": "", "columns.text": "",
    "columns.label": "", "columns.prompt": "",
    "columns.completion": "", "columns.messages": "", "columns.image": "", "columns.task": "",
}  # fmt: skip
#: keys added after the sections (new keys only: every earlier key keeps its name and default)
ROBUST_KEYS = {
    "robust.max-examples": 0,
    "robust.norm-factor": 10.0,
    "robust.max-update-norm": 0.0,
    "robust.aggregate": "mean",
    "robust.trim": 0.1,
}
#: added with the server optimizers; their defaults are plain aggregation
SERVER_OPT_KEYS = {
    "server-opt.optimizer": "none",
    "server-opt.lr": 1.0,
    "server-opt.beta1": 0.9,
    "server-opt.beta2": 0.99,
    "server-opt.tau": 0.001,
}
#: added with a split that stays while the run's seed varies; -1: the run's seed, as before
PARTITION_SEED_KEYS = {"partition.seed": -1}


def test_the_flat_keys_and_defaults_are_those_of_before_the_sections() -> None:
    before = FLAT_DEFAULTS_BEFORE_SECTIONS
    added = MODEL_KIND_KEYS | ROBUST_KEYS | SERVER_OPT_KEYS | PARTITION_SEED_KEYS
    assert DEFAULT_RUN_CONFIG == before | {"tasks": ""} | added  # "": the kind's tasks
    assert FederationConfig().to_run_config() == before | added
    assert FederationConfig.from_run_config(before) == FederationConfig()


def test_flat_keys_land_in_their_sections_and_come_back() -> None:
    flat = {
        "strategy": "flexlora",
        "lora-rank": 4,
        "lora-rslora": True,
        "flexlora-ranks": "2,8",
        "lora-fair-lambda": 0.5,
        "lora-fair-solver": "closed-form",
        "partition.scheme": "dirichlet",
        "partition.alpha": 2,
        "dp.enabled": True,
        "dp.max-grad-norm": 0.5,
        "dp.client-level": "off",
        "audit.save-updates": True,
        "personalize.steps": 3,
    }
    cfg = FederationConfig.from_run_config(flat)
    assert (cfg.lora.rank, cfg.lora.rslora, cfg.partition.scheme, cfg.partition.alpha) == (4, True, "dirichlet", 2.0)
    assert (cfg.dp.enabled, cfg.dp.max_grad_norm, cfg.audit.save_updates, cfg.personalize.steps) == (True, 0.5, True, 3)
    assert cfg.method is cfg.methods["flexlora"] and (cfg.client_rank(0), cfg.client_rank(1), cfg.max_rank()) == (
        2,
        8,
        8,
    )
    assert cfg.methods["lora-fair"].solver_config().solver == "closed_form"  # type: ignore[attr-defined]
    assert cfg.to_run_config() == DEFAULT_RUN_CONFIG | {"tasks": "adddigit-4,rotate-2,repeat-3,sort-desc"} | flat | {
        "partition.alpha": 2.0
    }
    again = FederationConfig.from_run_config(cfg.to_run_config())
    assert again == cfg and hash(again) == hash(cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lora-rank": 0}, "lora-rank must be an integer >= 1, got 0"),
        ({"lora-alpha": -1.0}, "lora-alpha must be a finite number >= 0, got -1.0"),
        ({"lora-fair-lambda": -1.0}, "lora-fair-lambda must be a finite number >= 0, got -1.0"),
        ({"lora-fair-steps": -1}, "lora-fair-steps must be >= 0, got -1"),
        ({"flexlora-ranks": "4,0"}, "flexlora-ranks must be positive integers, got '4,0'"),
        ({"dp.noise-multiplier": -1.0}, "dp.noise-multiplier must be a finite number >= 0, got -1.0"),
        ({"dp.delta": 1.0}, r"dp\.delta must be in \[0, 1\)"),
        ({"dp.client-level": "both"}, "dp.client-level must be 'off', 'server-side' or 'client-side', got 'both'"),
        ({"personalize.steps": -1}, r"personalize\.steps must be an integer >= 0 \(0: off\), got -1"),
        ({"personalize.epsilon": 0.0}, r"personalize\.epsilon must be a finite number > 0, got 0\.0"),
    ],
)
def test_each_section_names_its_key(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FederationConfig.from_run_config(overrides)


def test_a_run_directory_from_before_the_sections_resumes(tmp_path: Path) -> None:
    """A config.json written by the flat config of before: fl-sim --resume reads it back into the
    sections with the same values, and the stored run is accepted (a changed key is not)."""
    stored = {**FLAT_DEFAULTS_BEFORE_SECTIONS, "strategy": "lora-fair", "lora-fair-steps": 200, "flexlora-ranks": "4"}
    stored["run-dir"] = str(tmp_path)  # a run stores the directory it ran in
    (tmp_path / "config.json").write_text(json.dumps(stored | {"lr": 0.003, "lora-alpha": 16.0, "run-id": 7}))
    cfg = FederationConfig.from_run_config(resume_config(tmp_path))  # what fl-sim --resume submits
    assert cfg.resume and cfg.method.steps == 200 and cfg.methods["flexlora"].ranks == "4"
    resolved = cfg.to_run_config() | {"lr": 0.003, "lora-alpha": 16.0, "run-id": 8}
    same = set(stored) - {"resume", "lr", "lora-alpha"}  # resume and the strategy's defaults set these
    assert {k: resolved[k] for k in same} == {k: stored[k] for k in same}
    prepare_run_dir(RunDir(tmp_path), cfg, resolved)
    changed = cfg.to_run_config() | {"lr": 0.003, "lora-alpha": 16.0, "lora-fair-steps": 300}
    with pytest.raises(ResumeError, match=r"lora-fair-steps: 200 -> 300"):
        prepare_run_dir(RunDir(tmp_path), cfg, changed)


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({"model.kind": "audio-cls"}, "kind must be one of causal-lm, seq-cls, image-cls, got 'audio-cls'"),
        ({"model.device": "tpu"}, "model.device must be auto, cpu, cuda or cuda:<index>, got 'tpu'"),
        ({"model.dtype": "int8"}, "model.dtype must be one of float32, bfloat16, float16, got 'int8'"),
        ({"model.max-length": -1}, "model.max-length must be an integer >= 0"),
        ({"model.physical-batch-size": -2}, "model.physical-batch-size must be an integer >= 0"),
        ({"model.kind": "seq-cls", "tasks": "adddigit-4"}, "unknown task 'adddigit-4' for model.kind = seq-cls"),
        ({"model.kind": "image-cls", "personalize.steps": 3}, "personalize.steps works with model.kind = causal-lm"),
        ({"model.kind": "seq-cls", "deployed": True}, "model.labels must be set for a deployed seq-cls run"),
    ],
)
def test_model_section_refuses_bad_values_by_key(values: dict[str, object], problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        FederationConfig.from_run_config(values)


def test_a_kind_brings_its_default_tasks() -> None:
    cfg = FederationConfig.from_run_config({"model.kind": "image-cls", "model.physical-batch-size": 4})
    assert cfg.task_list == ["digits-rotate", "digits-scale", "digits-noise", "digits-invert"]
    assert cfg.model.physical_batch_size == 4 and cfg.to_run_config()["tasks"] == cfg.tasks


def test_partition_seed_keeps_one_split_while_the_run_seed_varies() -> None:
    runs = [FederationConfig.from_run_config({"seed": s, "partition.seed": 7}) for s in (0, 1)]
    assert [c.partition_spec().seed for c in runs] == [7, 7]
    default = [FederationConfig.from_run_config({"seed": s}) for s in (0, 3)]
    assert [c.partition_spec().seed for c in default] == [0, 3]  # -1: the run's seed
    for bad in (-2, 1.5, True):
        with pytest.raises(ValueError, match=r"partition\.seed must be"):
            FederationConfig.from_run_config({"partition.seed": bad})
