"""Batched evaluation of many adapters (one adapter per sequence, ``fedlora::lora_gathered``)
against PEFT evaluating each adapter on its own: the same losses and exact matches for adapters
of different ranks, alphas, rsLoRA and target modules, and FedEx-LoRA residuals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors

from fedlora.core.adapter_format import BASE_DELTA_FILE, read_adapter_dir
from fedlora.core.data import encode
from fedlora.core.lora_settings import LoraSettings
from fedlora.core.model import (
    get_adapter_state,
    load_adapter,
    load_base_model,
    save_adapter,
    set_adapter_state,
    set_base_deltas,
    wrap_lora,
)
from fedlora.core.model_dirs import load_tokenizer
from fedlora.core.multi_adapter import AdapterBank, LoadedAdapter, evaluate_many
from fedlora.core.tasks import get_task
from fedlora.core.train import evaluate
from fedlora.strategies.algorithms import BASE_DELTA_SUFFIX

SETTINGS = [
    LoraSettings(rank=1, alpha=4.0, target_modules=("q_proj", "v_proj")),
    LoraSettings(rank=3, alpha=2.0),  # all linear layers
    LoraSettings(rank=2, alpha=8.0, use_rslora=True, target_modules=("o_proj", "down_proj", "q_proj")),
]


def _adapter(tmp: Path, i: int, settings: LoraSettings, delta: dict[str, torch.Tensor] | None = None) -> Path:
    model = wrap_lora(load_base_model(), settings)
    g = torch.Generator().manual_seed(i)
    state = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in get_adapter_state(model).items()}
    set_adapter_state(model, state)
    out = save_adapter(model, tmp / f"adapter-{i}")
    if delta is not None:  # FedEx-LoRA's residual, named as the strategy writes it
        (out / BASE_DELTA_FILE).write_bytes(save_safetensors({k + BASE_DELTA_SUFFIX: v for k, v in delta.items()}))
    return out


@pytest.fixture(scope="module")
def data() -> tuple[list, list]:
    tok = load_tokenizer()
    first = encode(tok, get_task("rotate-2").examples(5, 0), 64)
    second = encode(tok, get_task("sort-desc").examples(4, 1), 64)
    return first, second


def _one_by_one(path: Path, examples: list, delta: dict[str, torch.Tensor] | None = None) -> tuple[float, float]:
    model = load_adapter(load_base_model(), path)
    if delta is not None:
        set_base_deltas(model, delta, {})
    res = evaluate(model, examples, 0)
    return res.loss, res.exact_match


def test_batched_evaluation_equals_peft_one_adapter_at_a_time(tmp_path: Path, data: tuple[list, list]) -> None:
    paths = [_adapter(tmp_path, i, s) for i, s in enumerate(SETTINGS)]
    adapters = [LoadedAdapter.from_files(p.name, read_adapter_dir(p)) for p in paths]
    jobs = [(k, d) for k in range(len(paths)) for d in data]  # every adapter on both datasets, mixed
    model = load_base_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    results = evaluate_many(model, adapters, jobs, pad_id=0, batch_size=4)
    for (k, d), res in zip(jobs, results, strict=True):
        loss, em = _one_by_one(paths[k], d)
        assert res.num_examples == len(d)
        assert res.loss == pytest.approx(loss, rel=1e-5), (k, res.loss, loss)
        assert res.exact_match == em
    assert len({round(r.loss, 3) for r in results}) == len(results)  # the adapters really differ
    # the base model is given back untouched, its linear layers restored
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_fedex_residuals_are_folded_in_one_bank_per_residual(tmp_path: Path, data: tuple[list, list]) -> None:
    base = load_base_model()
    name = "base_model.model.model.layers.1.self_attn.v_proj"
    w = base.model.layers[1].self_attn.v_proj.weight
    delta = {name: torch.randn(w.shape, generator=torch.Generator().manual_seed(9)) * 0.2}
    paths = [_adapter(tmp_path, i, SETTINGS[i], delta) for i in range(2)]
    adapters = [LoadedAdapter.from_files(p.name, read_adapter_dir(p)) for p in paths]
    results = evaluate_many(base, adapters, [(0, data[0]), (1, data[0])], pad_id=0)
    for path, res in zip(paths, results, strict=True):
        loss, em = _one_by_one(path, data[0], delta)
        assert res.loss == pytest.approx(loss, rel=1e-5) and res.exact_match == em
    assert torch.equal(base.model.layers[1].self_attn.v_proj.weight, w)  # the residual was taken out again
    # another residual: one bank cannot hold it, evaluate_many gives it a bank of its own
    other_delta = {name: delta[name] * 2}
    other = _adapter(tmp_path, 5, SETTINGS[0], other_delta)
    mixed = [*adapters, LoadedAdapter.from_files("other", read_adapter_dir(other))]
    with pytest.raises(ValueError, match="different base weights"):
        AdapterBank(base, mixed)
    results = evaluate_many(base, mixed, [(k, data[0]) for k in range(3)], pad_id=0)
    for path, d, res in zip([*paths, other], [delta, delta, other_delta], results, strict=True):
        loss, em = _one_by_one(path, data[0], d)
        assert res.loss == pytest.approx(loss, rel=1e-5) and res.exact_match == em
    assert len({round(r.loss, 4) for r in results}) == 3


def test_adapters_of_another_model_and_bad_jobs_are_refused(tmp_path: Path, data: tuple[list, list]) -> None:
    path = _adapter(tmp_path, 0, SETTINGS[0])
    files = read_adapter_dir(path)
    good = LoadedAdapter.from_files("good", files)
    wide = LoadedAdapter("wide", {m: (torch.zeros(1, a.shape[1] + 1), b) for m, (a, b) in good.factors.items()}, None)
    model = load_base_model()
    with pytest.raises(ValueError, match=r"adapter wide: .*q_proj is 128 -> 128 in the base model.*another base model"):
        AdapterBank(model, [good, wide])
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # a refused bank leaves nothing behind
    nowhere = LoadedAdapter("nowhere", {"model.layers.0.mlp.nonexistent": good.factors[next(iter(good.factors))]}, None)
    with pytest.raises(ValueError, match=r"adapter nowhere: the base model has no linear layer 'model\.layers\.0\.mlp"):
        AdapterBank(model, [nowhere])
    with pytest.raises(ValueError, match="job 0 names adapter 3; there are 1"):
        evaluate_many(model, [good], [(3, data[0])], pad_id=0)
    with pytest.raises(ValueError, match=r"needs adapter_config\.json"):
        LoadedAdapter.from_files("empty", {})


def test_fl_sim_personal_eval_scores_every_personal_adapter_on_every_client(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``fl-sim personal-eval RUN_DIR`` on a run directory: the matrix equals PEFT evaluating each
    adapter on each virtual client's test split (the split the run config defines)."""
    import json

    from fedlora.core.client_data import client_examples
    from fedlora.core.config import DEFAULT_RUN_CONFIG, FederationConfig
    from fedlora.simulations.cli import main as fl_sim

    run = tmp_path / "run"
    config = {**DEFAULT_RUN_CONFIG, "num-clients": 2, "num-test": 6, "num-train": 16, "tasks": "rotate-2,sort-desc"}
    (run / "personal").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({**config, "run-dir": str(run)}))
    assert fl_sim(["personal-eval", str(run)]) == 2
    assert "has no personal adapters" in capsys.readouterr().err
    _adapter(tmp_path, 7, SETTINGS[0]).rename(run / "personal" / "partition-1")
    _adapter(tmp_path, 8, SETTINGS[1]).rename(run / "personal" / "partition-0")
    assert fl_sim(["personal-eval", str(run), "--batch-size", "5"]) == 0
    assert "| partition-0 | **" in capsys.readouterr().out
    report = json.loads((run / "report" / "personal.json").read_text())
    assert report["adapters"] == ["partition-0", "partition-1"] and report["clients"] == [0, 1]
    cfg = FederationConfig.from_run_config(config)
    tok = load_tokenizer()
    for k in range(2):
        for j in range(2):
            test = encode(tok, client_examples(cfg, j)[1], 64)
            loss, em = _one_by_one(run / "personal" / f"partition-{k}", test)
            assert report["exact_match"][k][j] == em and report["loss"][k][j] == pytest.approx(loss, rel=1e-5)
    assert report["personal_own_mean"] == (report["exact_match"][0][0] + report["exact_match"][1][1]) / 2
    assert (run / "report" / "personal.md").is_file()


def test_rank_and_alpha_patterns_scale_as_peft_does_and_variants_are_refused(
    tmp_path: Path, data: tuple[list, list]
) -> None:
    from peft import LoraConfig, get_peft_model

    key = "^model.layers.0.self_attn.q_proj"  # PEFT's documented, anchored form: matched on base-model names
    config = LoraConfig(
        r=2, lora_alpha=16, target_modules=["q_proj", "v_proj"], rank_pattern={key: 4}, alpha_pattern={key: 1}
    )
    model = get_peft_model(load_base_model(), config)
    g = torch.Generator().manual_seed(3)
    set_adapter_state(model, {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in get_adapter_state(model).items()})
    path = save_adapter(model, tmp_path / "patterned")
    adapter = LoadedAdapter.from_files("patterned", read_adapter_dir(path))
    a = adapter.factors["model.layers.0.self_attn.q_proj"][0]
    assert a.shape[0] == 4  # the patterned module's rank; its B carries alpha 1 / r 4
    res = evaluate_many(load_base_model(), [adapter], [(0, data[0])], pad_id=0)[0]
    loss, em = _one_by_one(path, data[0])
    assert res.loss == pytest.approx(loss, rel=1e-5) and res.exact_match == em

    files = read_adapter_dir(path)
    dora = json.loads(files["adapter_config.json"]) | {"use_dora": True}
    with pytest.raises(ValueError, match=r"adapter d: uses the PEFT LoRA variant\(s\) use_dora"):
        LoadedAdapter.from_files("d", {**files, "adapter_config.json": json.dumps(dora).encode()})
    with pytest.raises(ValueError, match=r"adapter bad: .*"):
        LoadedAdapter.from_files("bad", {**files, "adapter_model.safetensors": b"not safetensors"})


def test_fl_hub_evaluate_trusts_only_what_the_hub_signed_and_skips_what_it_cannot_load(
    tmp_path: Path, data: tuple[list, list]
) -> None:
    """The listing is unsigned: the verified manifest's base model decides, names outside the
    prefix are dropped; an adapter (or a FedEx residual) that does not load is skipped with its
    reason, the others are still scored."""
    from fedlora.hub.evaluate import evaluate_prefix
    from fedlora.hub.sdk.manifest import describe_base_model

    local = describe_base_model()
    good = read_adapter_dir(_adapter(tmp_path, 0, SETTINGS[0]))
    ours = {"id": local.id, "sha256": local.sha256}
    other = {"id": "elsewhere/model", "sha256": "0" * 64}

    def residual(key: str) -> bytes:
        return save_safetensors({key: torch.zeros(128, 344)})

    entries = {  # name: (what the listing claims, what the signed manifest says, files)
        "clients/a/good": (ours, ours, good),
        "clients/b/liar": (ours, other, good),
        "clients/c/broken": (ours, ours, {**good, "adapter_model.safetensors": b"junk"}),
        "clients/d/other": (other, other, good),
        "clients/e/misfit": (ours, ours, {**good, BASE_DELTA_FILE: residual("model.layers.0.mlp.nope.base_delta")}),
        "clients/f/unnamed": (ours, ours, {**good, BASE_DELTA_FILE: residual("model.layers.0.mlp.down_proj")}),
        "tasks/outside": (ours, ours, good),
    }

    class FakeHub:
        def list(self, prefix: str, limit: int) -> list[dict]:
            return [{"name": n, "version": 1, "provenance": {"base_model": e[0]}} for n, e in entries.items()]

        def fetch(self, name: str, version: int) -> tuple[dict, dict]:
            return {"provenance": {"base_model": entries[name][1]}}, entries[name][2]

    result = evaluate_prefix(FakeHub(), "clients/", [*get_task("rotate-2").examples(4, 0)])
    assert [s.name for s in result.scores] == ["clients/a/good"] and result.scores[0].examples == 4
    reasons = " | ".join(result.skipped)
    assert "clients/b/liar v1: signed for base model elsewhere/model" in reasons
    assert "clients/c/broken v1: adapter clients/c/broken v1:" in reasons
    assert "clients/d/other v1: made for base model elsewhere/model" in reasons
    assert "clients/e/misfit v1: adapter clients/e/misfit v1: the base model has no linear layer" in reasons
    assert "clients/f/unnamed v1: adapter clients/f/unnamed v1: base_delta.safetensors must hold" in reasons
    assert "tasks/outside: not under 'clients/'" in reasons
