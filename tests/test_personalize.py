"""Personalisation of a global adapter on a client's own data: the ledger charge, the budget cap,
the written adapter, the improvement it buys and the errors bad input gets."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

import fedlora.client.personalize as personalize_module
from fedlora.client.personalize import DP_OFF, PersonalizeConfig, PrivacyBudgetError, personalize
from fedlora.core.client_data import node_examples
from fedlora.core.config import FederationConfig
from fedlora.core.data import encode
from fedlora.core.lora_settings import LoraSettings
from fedlora.core.model import load_base_model, save_adapter, wrap_lora
from fedlora.core.model_dirs import load_tokenizer
from fedlora.core.tasks import get_task
from fedlora.core.train import TrainSettings, evaluate, train
from fedlora.privacy.accounting import compute_epsilon
from fedlora.privacy.ledger import LEDGER_FILE, PrivacyLedger
from fedlora.privacy.planning import default_delta
from fedlora.privacy.units import PRIVACY_UNIT

#: a task held out of pretraining: the base model (and the global adapter) cannot do it
TASK = "embedded:rotate-2"


@pytest.fixture(scope="module")
def global_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A global adapter with non-zero B: LoRA on every linear layer, 5 steps on sort-desc."""
    tokenizer = load_tokenizer()
    model = wrap_lora(load_base_model(), LoraSettings())
    data = encode(tokenizer, get_task("sort-desc").examples(64, 0), 64)
    train(model, data, TrainSettings(steps=5, lr=3e-3, batch_size=16), int(tokenizer.pad_token_id))
    return save_adapter(model, tmp_path_factory.mktemp("global") / "adapter")


def _cfg(state_dir: Path, **overrides: object) -> PersonalizeConfig:
    values: dict[str, object] = {
        "data": TASK,
        "state_dir": state_dir,
        "steps": 10,
        "lr": 1e-2,
        "num_train": 256,
        "num_test": 32,
        "name": "node-a",
        "target_epsilon": 4.0,
        **overrides,
    }
    return PersonalizeConfig(**values)  # type: ignore[arg-type]


def _jsonl(path: Path, n: int) -> Path:
    examples = get_task("rotate-2").examples(n, 1)
    path.write_text("".join(json.dumps({"prompt": e.prompt, "completion": e.completion}) + "\n" for e in examples))
    return path


@pytest.mark.slow
def test_dp_personalize_charges_the_ledger_and_writes_a_loadable_adapter(global_adapter: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = personalize(global_adapter, _cfg(state), tmp_path / "out")

    ledger = PrivacyLedger(state)
    entries = ledger.entries()
    assert len(entries) == 1
    entry = entries[0]
    assert entry.run_id == first.ledger_run_id and entry.run_id.startswith("personalize-")
    assert entry.history_entry == (first.noise_multiplier, first.sample_rate, 10)
    assert first.sample_rate == 32 / 256 and first.num_train_examples == 256 and first.num_test_examples == 32
    assert first.delta == default_delta(256) == entry.delta and first.accountant == "rdp"
    assert first.noise_multiplier is not None and first.personalization_epsilon is not None
    assert 4.0 - 0.01 <= first.personalization_epsilon <= 4.0  # sigma calibrated once for all 10 steps
    assert first.lifetime_epsilon is not None
    assert math.isclose(first.lifetime_epsilon, compute_epsilon(ledger.history(), 1e-4), rel_tol=1e-12)
    assert math.isclose(first.lifetime_epsilon, first.personalization_epsilon, rel_tol=1e-12)
    assert first.dp and first.privacy_unit == PRIVACY_UNIT and first.max_grad_norm == 1.0
    # secret noise, so not reproducible: measured loss 8.52 -> 2.7 .. 4.15 over 6 runs (exact match stays 0)
    assert first.after_loss < 0.75 * first.before_loss, "10 noisy steps still learn something"

    # the output is a plain PEFT directory with the global adapter's config and new weights
    out = tmp_path / "out"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "state"]  # no temp sibling left behind
    fresh = PeftModel.from_pretrained(load_base_model(), str(out))
    tokenizer = load_tokenizer()
    test_ex = node_examples(FederationConfig(num_train=256, num_test=32), TASK, _cfg(state).split_seed)[1]
    reloaded = evaluate(fresh, encode(tokenizer, test_ex, 64), int(tokenizer.pad_token_id))
    assert math.isclose(reloaded.loss, first.after_loss, rel_tol=1e-5)
    assert reloaded.exact_match == first.after_exact_match
    old_cfg = json.loads((global_adapter / "adapter_config.json").read_text())
    new_cfg = json.loads((out / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "target_modules", "peft_type", "use_rslora"):
        assert new_cfg[key] == old_cfg[key]
    old, new = (
        load_file(str(global_adapter / "adapter_model.safetensors")),
        load_file(str(out / "adapter_model.safetensors")),
    )
    assert old.keys() == new.keys() and all(old[k].shape == new[k].shape for k in old)
    assert any(not torch.equal(old[k], new[k]) for k in old)

    # a second personalisation is a fresh charge; a cap just above what it reaches lets it through
    q = 32 / 256
    projected = compute_epsilon([*ledger.history(), (1.0, q, 10)], 1e-4)
    second = personalize(global_adapter, _cfg(state, noise_multiplier=1.0, max_epsilon=projected * (1 + 1e-9)), out)
    entries = ledger.entries()
    assert len(entries) == 2 and entries[0] == entry and entries[1].run_id == second.ledger_run_id != entry.run_id
    assert entries[1].history_entry == (1.0, q, 10) and second.noise_multiplier == 1.0
    assert second.lifetime_epsilon is not None and second.lifetime_epsilon > first.lifetime_epsilon
    assert math.isclose(second.lifetime_epsilon, compute_epsilon(ledger.history(), 1e-4), rel_tol=1e-12)
    assert math.isclose(second.lifetime_epsilon, projected, rel_tol=1e-12)
    assert second.personalization_epsilon == compute_epsilon([(1.0, q, 10)], 1e-4)
    newer = load_file(str(out / "adapter_model.safetensors"))  # replaced in place
    assert any(not torch.equal(new[k], newer[k]) for k in new)


def test_max_epsilon_refuses_before_training_and_charges_nothing(
    global_adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    ledger = PrivacyLedger(state)
    ledger.charge("12345", 1, 1.1, 0.02, 50, accountant="rdp", delta=1e-4)  # an earlier federated round
    before = ledger.path.read_bytes()
    spent = ledger.epsilon(1e-4)

    def no_training(*_: object) -> None:
        raise AssertionError("the model must not even be loaded when the budget refuses")

    monkeypatch.setattr(personalize_module, "_load_model", no_training)
    data = _jsonl(tmp_path / "mine.jsonl", 100)  # 90 train, 10 test: q = 32 / 90
    cfg = _cfg(state, data=str(data), noise_multiplier=1.0, max_epsilon=spent + 0.01, delta=1e-3)
    with pytest.raises(PrivacyBudgetError, match=r"past max_epsilon = .*nothing was charged"):
        personalize(global_adapter, cfg, tmp_path / "out")
    assert ledger.path.read_bytes() == before
    assert sorted(p.name for p in state.iterdir()) == [LEDGER_FILE, "privacy_ledger.lock"]  # no DP secret drawn
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_without_dp_a_few_steps_learn_the_task(global_adapter: Path, tmp_path: Path) -> None:
    # measured: exact match 0.0 -> 0.953 (20 steps, lr 1e-2, 256 examples, node-a); node-b 0.92, node-c 0.94
    cfg = _cfg(tmp_path / "state", dp=False, steps=20, num_test=64)
    result = personalize(global_adapter, cfg, tmp_path / "out")
    assert result.before_exact_match <= 0.05
    assert result.after_exact_match >= 0.8
    assert result.after_exact_match >= result.before_exact_match and result.after_loss < result.before_loss / 10
    assert not result.dp and result.privacy_unit == DP_OFF
    assert result.lifetime_epsilon is None and result.personalization_epsilon is None and result.ledger_run_id is None
    assert result.noise_multiplier is None and result.sample_rate is None and result.delta is None
    assert not (tmp_path / "state").exists()  # nothing charged, nothing written there
    PeftModel.from_pretrained(load_base_model(), str(tmp_path / "out"))


def _bad_adapter(root: Path, kind: str) -> Path:
    path = root / kind
    path.mkdir()
    if kind == "no-weights":
        (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    elif kind == "not-lora":
        (path / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
        (path / "adapter_model.safetensors").write_bytes(b"")
    return path


@pytest.mark.parametrize(
    ("kind", "error", "match"),
    [
        ("missing", FileNotFoundError, r"global adapter directory .*missing does not exist"),
        ("empty", FileNotFoundError, r"not a PEFT adapter directory: no adapter_config.json and no adapter_model"),
        ("no-weights", FileNotFoundError, r"not a PEFT adapter directory: no adapter_model.safetensors"),
        ("not-lora", ValueError, r"not a LoRA adapter \(peft_type 'PROMPT_TUNING'"),
    ],
)
def test_bad_global_adapter(tmp_path: Path, kind: str, error: type[Exception], match: str) -> None:
    path = tmp_path / "missing" if kind == "missing" else _bad_adapter(tmp_path, kind)
    with pytest.raises(error, match=match):
        personalize(path, _cfg(tmp_path / "state"), tmp_path / "out")


@pytest.mark.slow
def test_an_adapter_for_another_model_is_refused(global_adapter: Path, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "adapter_model.safetensors").write_bytes((global_adapter / "adapter_model.safetensors").read_bytes())
    config = json.loads((global_adapter / "adapter_config.json").read_text())
    (wrong / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))
    brief = r"does not fit the base model .*: Error\(s\) in loading state_dict .* size mismatch for .*\(and \d+ more\)$"
    with pytest.raises(ValueError, match=brief):
        personalize(wrong, _cfg(tmp_path / "state"), tmp_path / "out")
    assert not (tmp_path / "state" / LEDGER_FILE).exists()


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"data": "embedded:nope"}, ValueError, r"data 'embedded:nope': unknown task 'nope'; known tasks: "),
        ({"data": "embedded:"}, ValueError, r"names no task"),
        ({"data": "hf:some/dataset"}, FileNotFoundError, r"neither an existing JSONL file nor embedded:TASK"),
        ({"steps": 0}, ValueError, r"steps must be an integer >= 1, got 0"),
        ({"batch_size": 0}, ValueError, r"batch_size must be an integer >= 1, got 0"),
        ({"lr": 0.0}, ValueError, r"lr must be a finite number > 0, got 0.0"),
        ({"target_epsilon": -1.0}, ValueError, r"target_epsilon must be a finite number > 0, got -1.0"),
        ({"noise_multiplier": 0.0}, ValueError, r"noise_multiplier must be a finite number > 0 .*got 0.0"),
        ({"delta": 1.0}, ValueError, r"delta must be in \[0, 1\)"),
        ({"accountant": "gdp"}, ValueError, r"unknown accountant 'gdp'"),
        ({"max_epsilon": -1.0}, ValueError, r"max_epsilon must be a finite number >= 0 or None, got -1.0"),
        ({"dp": False, "max_epsilon": 5.0}, ValueError, r"apply to DP-SGD only, but dp=False"),
        ({"model_dir": "/nonexistent"}, FileNotFoundError, r"model directory /nonexistent does not exist"),
    ],
)
def test_bad_config(tmp_path: Path, overrides: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        _cfg(tmp_path / "state", **overrides)


@pytest.mark.parametrize(
    ("records", "overrides", "match"),
    [
        (20, {}, r"gives 18 training examples, fewer than batch_size=32"),
        (8, {"batch_size": 2}, r"gives no test examples .*at least 10 records"),
        (100, {"delta": 0.05}, r"delta 0.05 is not below 1/n = 1/90"),
        (100, {"batch_size": 4}, r"batch size 4 is too small .* 0.16, .*the smallest safe batch size is 11"),
    ],
)
def test_too_little_data(
    global_adapter: Path, tmp_path: Path, records: int, overrides: dict[str, object], match: str
) -> None:
    cfg = _cfg(tmp_path / "state", data=str(_jsonl(tmp_path / "mine.jsonl", records)), **overrides)
    with pytest.raises(ValueError, match=match):
        personalize(global_adapter, cfg, tmp_path / "out")
    assert not (tmp_path / "state").exists() and not (tmp_path / "out").exists()


def test_output_directory_is_checked(global_adapter: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"is the global adapter directory itself"):
        personalize(global_adapter, _cfg(tmp_path / "state"), global_adapter)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"exists, is not empty and is not an adapter directory"):
        personalize(global_adapter, _cfg(tmp_path / "state"), busy)
    assert (busy / "notes.txt").read_text() == "keep me"


def test_fedex_base_deltas_are_applied_and_kept(global_adapter: Path, tmp_path: Path) -> None:
    """A FedEx-LoRA global adapter moved base weights (base_delta.safetensors): the global model is
    evaluated and trained with them, and the personalised adapter carries the same file."""
    fedex = tmp_path / "fedex"
    shutil.copytree(global_adapter, fedex)
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{module}.base_delta": torch.full((128, 128), 0.05)}, str(fedex / "base_delta.safetensors"))
    cfg = _cfg(tmp_path / "state", dp=False, steps=1, num_test=16)
    plain = personalize(global_adapter, cfg, tmp_path / "plain")
    moved = personalize(fedex, cfg, tmp_path / "out")
    assert moved.before_loss != plain.before_loss
    assert (tmp_path / "out" / "base_delta.safetensors").read_bytes() == (fedex / "base_delta.safetensors").read_bytes()
    assert not (tmp_path / "plain" / "base_delta.safetensors").exists()
