"""LoRA on the embedded model: learning a held-out task, PEFT round trips, frozen factors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from fedlora.core.data import encode
from fedlora.core.embedded import default_model_dir
from fedlora.core.lora_settings import LoraSettings
from fedlora.core.model import (
    get_adapter_state,
    load_adapter,
    load_base_model,
    save_adapter,
    set_adapter_state,
    wrap_lora,
)
from fedlora.core.tasks import get_task
from fedlora.core.train import TrainSettings, evaluate, train


def _data(tokenizer: PreTrainedTokenizerBase, task: str, n: int, split: str, seed: int = 0) -> list:
    return encode(tokenizer, get_task(task).examples(n, seed, split), 64)


@pytest.mark.slow
def test_lora_learns_held_out_task(tokenizer: PreTrainedTokenizerBase) -> None:
    model = wrap_lora(load_base_model(), LoraSettings(rank=8, alpha=16))
    test = _data(tokenizer, "adddigit-4", 200, "test")
    before = evaluate(model, test, 0).exact_match
    result = train(model, _data(tokenizer, "adddigit-4", 2000, "train"), TrainSettings(steps=80, lr=3e-3), 0)
    after = evaluate(model, test, 0).exact_match
    assert before < 0.10
    assert after >= 0.90, f"exact match {before:.2f} -> {after:.2f} after 80 steps"
    assert result.final_loss < result.losses[0] / 4


def _batch(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    ids = tokenizer([":abcdef=", ":qrs=xy"], add_special_tokens=False, padding=True, return_tensors="pt")
    return ids["input_ids"]


def _perturbed(model: PeftModel, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in get_adapter_state(model).items()}


def test_saved_adapter_loads_in_plain_peft_with_identical_logits(
    tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    model = wrap_lora(load_base_model(), LoraSettings(rank=4, alpha=8, target_modules=("q_proj", "v_proj")))
    set_adapter_state(model, _perturbed(model, 0))  # non-zero B, so the adapter matters
    ids = _batch(tokenizer)
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        base_only = model.get_base_model()
    out = save_adapter(model, tmp_path / "adapter", base_model_dir=default_model_dir())
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}

    fresh = AutoModelForCausalLM.from_pretrained(str(default_model_dir()))
    peft_model = PeftModel.from_pretrained(fresh, str(out))
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    assert torch.equal(ours, theirs)
    with torch.no_grad(), model.disable_adapter():
        assert not torch.allclose(base_only(input_ids=ids).logits, ours)  # the adapter changes logits
    reloaded = load_adapter(load_base_model(), out)
    theirs_state, ours_state = get_adapter_state(reloaded), get_adapter_state(model)
    assert theirs_state.keys() == ours_state.keys()
    assert all(torch.equal(theirs_state[k], ours_state[k]) for k in ours_state)


def test_flat_mapping_round_trips_bit_exactly() -> None:
    model = wrap_lora(load_base_model(), LoraSettings(rank=3))
    state = _perturbed(model, 1)
    set_adapter_state(model, state)
    back = get_adapter_state(model)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert len(state) == 2 * 4 * 7  # A and B for 7 linear layers in each of 4 blocks
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert tuple(state[key].shape) == (3, 128)
    only_b = get_adapter_state(model, "B")
    assert only_b and all(".lora_B." in k for k in only_b)


def test_set_adapter_state_rejects_unknown_names_and_shapes() -> None:
    model = wrap_lora(load_base_model(), LoraSettings(rank=2))
    state = get_adapter_state(model)
    key = next(iter(state))
    with pytest.raises(KeyError, match="unknown tensor name"):
        set_adapter_state(model, {"nope.lora_A.weight": state[key]})
    with pytest.raises(ValueError, match=r"has shape \(3, 128\), expected \(2, 128\)"):
        set_adapter_state(model, {key: torch.zeros(3, 128)})


def test_frozen_a_stays_bit_identical_and_seeded_init_is_shared(tokenizer: PreTrainedTokenizerBase) -> None:
    lora = LoraSettings(rank=4, trainable="B", init_seed=7)
    m1 = wrap_lora(load_base_model(), lora)
    m2 = wrap_lora(load_base_model(), lora)
    a0 = get_adapter_state(m1, "A")
    assert all(torch.equal(a0[k], v) for k, v in get_adapter_state(m2, "A").items())  # same seed, same A
    assert not any(p.requires_grad for n, p in m1.named_parameters() if ".lora_A." not in n and ".lora_B." not in n)
    train(m1, _data(tokenizer, "rotate-2", 256, "train"), TrainSettings(steps=5, lr=1e-2, batch_size=16), 0)
    assert all(torch.equal(a0[k], v) for k, v in get_adapter_state(m1, "A").items())
    assert any(v.abs().sum() > 0 for v in get_adapter_state(m1, "B").values())  # B did train
    other = wrap_lora(load_base_model(), LoraSettings(rank=4, init_seed=8))
    assert not torch.equal(next(iter(get_adapter_state(other, "A").values())), next(iter(a0.values())))
