"""Causal LMs other than the embedded Llama: GPT-2 (its ``Conv1D`` layers) in a federation
through ``fl-sim --model DIR``, GPT-NeoX, Qwen2 and OPT through a client's own training path,
tiny models built here from their configs with a byte-level BPE ``tokenizer.json``. OPT's
decoder flattens a batch's examples and positions into one dimension before ``fc1``/``fc2``: with
DP-SGD on every linear layer each client refuses with the layers and the ``--targets`` to use
instead (fl-sim exits 1 with that reason and a hint); with those targets DP-SGD trains."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from fedlora.client.private_train import train_private
from fedlora.core.client_data import client_examples
from fedlora.core.config import FederationConfig
from fedlora.core.data import Encoded, collate, forward
from fedlora.core.lora_settings import LoraSettings
from fedlora.core.model import save_adapter, wrap_lora
from fedlora.core.run_dir import RunDir
from fedlora.core.run_model import load_run_model
from fedlora.core.train import TrainSettings, train
from fedlora.privacy.dp import DPSGDConfig, dp_sgd
from fedlora.simulations.cli import main

CLIENTS = 2
SMALL = ["--rounds", "1", "--clients", str(CLIENTS), "--local-steps", "2", "--num-train", "32", "--num-test", "8"]
SMALL += ["--tasks", "adddigit-4,rotate-2", "--quiet"]
PAD, EOS = "<pad>", "</s>"
OPT_ATTENTION = {"q_proj", "k_proj", "v_proj", "out_proj"}


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2's byte-level BPE without merges: one token per byte, plus pad and end-of-sequence."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([PAD, EOS, *alphabet])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS)


#: architecture -> model class, config class and its sizes: hidden 32, 2 layers, 64 positions (the tasks fit)
TINY: dict[str, tuple[type[PreTrainedModel], type[PretrainedConfig], dict[str, Any]]] = {
    "gpt2": (GPT2LMHeadModel, GPT2Config, {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64}),
    "gpt-neox": (
        GPTNeoXForCausalLM,
        GPTNeoXConfig,
        {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
         "max_position_embeddings": 64},
    ),
    "qwen2": (
        Qwen2ForCausalLM,
        Qwen2Config,
        {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
         "intermediate_size": 64, "max_position_embeddings": 64},
    ),
    "opt": (
        OPTForCausalLM,
        OPTConfig,
        {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "ffn_dim": 64,
         "max_position_embeddings": 64, "word_embed_proj_dim": 32},
    ),
}  # fmt: skip


def save_tiny_model(arch: str, folder: Path) -> Path:
    tokenizer = byte_level_tokenizer()
    model_cls, config_cls, sizes = TINY[arch]
    ids: dict[str, Any] = {"vocab_size": len(tokenizer), "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1}
    config = config_cls(**ids, **sizes)
    torch.manual_seed(0)
    model_cls(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    assert (folder / "tokenizer.json").is_file()
    return folder


def fl_sim(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """fl-sim's exit code and everything it printed (lines unwrapped)."""
    code = main(argv)
    out = capsys.readouterr()
    return code, " ".join((out.out + "\n" + out.err).split())


TARGETED = {
    "gpt2": {"c_attn", "c_proj", "c_fc"},  # Conv1D layers, all of them
    "gpt-neox": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"},
    "qwen2": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "opt": OPT_ATTENTION,
}


def _check_adapter(model_dir: Path, adapter_dir: Path, targeted: set[str]) -> None:
    """The adapter targets exactly ``targeted``, loads with plain PEFT as saved, and trained (B != 0)."""
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in saved} == targeted
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(adapter_dir))
    loaded = get_peft_model_state_dict(model)
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert any(".lora_B." in k and saved[k].abs().sum() > 0 for k in saved)  # B starts at zero: it trained
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tokenizer(["ad:123+4="], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)


@pytest.mark.slow
@pytest.mark.flower
def test_gpt2_conv1d_trains_in_a_federation_and_its_adapter_loads_with_plain_peft(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = save_tiny_model("gpt2", tmp_path / "gpt2")
    run = RunDir(tmp_path / "run")
    code, printed = fl_sim([*SMALL, "--no-dp", "--model", str(model_dir), "--out", str(run.root)], capsys)
    assert code == 0, printed[-3000:]
    (row,) = [r for r in run.rounds() if r["round"] > 0]
    assert row["train"]["accepted"] == CLIENTS, row.get("dropped")
    _check_adapter(model_dir, run.global_adapter_dir, TARGETED["gpt2"])


@pytest.mark.parametrize(
    ("arch", "dp", "targets"),
    [
        pytest.param("gpt-neox", False, "all-linear", id="gpt-neox"),
        pytest.param("qwen2", False, "all-linear", id="qwen2"),
        # OPT under DP-SGD on the layers that keep examples apart
        pytest.param("opt", True, ",".join(sorted(OPT_ATTENTION)), id="opt-dp"),
    ],
)
def test_architecture_trains_as_a_client_does_and_its_adapter_loads_with_plain_peft(
    arch: str, dp: bool, targets: str, tmp_path: Path
) -> None:
    """A client's own path (the run's model builder, its encoding, DP-SGD) on each architecture."""
    model_dir = save_tiny_model(arch, tmp_path / arch)
    cfg = FederationConfig.from_run_config(
        {"model-dir": str(model_dir), "tasks": "adddigit-4,rotate-2", "num-clients": 2, "num-train": 32,
         "num-test": 8, "lora-targets": targets}
    )  # fmt: skip
    run = load_run_model(cfg, cfg.lora_settings(8, 16.0))
    data = run.encode(client_examples(cfg, 0)[0]).items
    settings = TrainSettings(steps=4, lr=1e-2, batch_size=16)
    if dp:
        train_private(run.model, data, settings, run.pad_id, DPSGDConfig(1.0, 1.0), seed=0)
    else:
        train(run.model, data, settings, run.pad_id)
    _check_adapter(model_dir, save_adapter(run.model, tmp_path / "adapter", model_dir), TARGETED[arch])


@pytest.mark.slow
@pytest.mark.flower
def test_opt_with_dp_on_every_linear_layer_fails_with_the_layers_and_the_targets_to_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = save_tiny_model("opt", tmp_path / "opt")
    run = RunDir(tmp_path / "run")
    code, printed = fl_sim(
        [*SMALL, "--dp", "--batch-size", "16", "--model", str(model_dir), "--out", str(run.root)], capsys
    )
    assert code == 1, printed[-3000:]
    assert "no client reply was accepted in any of 1 round(s)" in printed
    (row,) = [r for r in run.rounds() if r["round"] > 0]
    assert row["train"]["accepted"] == 0
    reasons = list(row["dropped"].values())
    assert len(reasons) == CLIENTS
    for reason in reasons:  # each client's reply says why, in full within the server's log of it
        assert "per-example gradients of fc1, fc2 have leading size" in reason, reason
        assert "the model flattens examples before these layers" in reason
        match = re.search(r"pass --targets ([\w,]+) \(lora-targets\), or --no-dp", reason)
        assert match is not None and set(match.group(1).split(",")) == OPT_ATTENTION, reason
    assert "hint: the model folds a batch's examples together before the layers named" in printed
    assert not run.global_adapter_dir.exists() or _unchanged(run)


def _unchanged(run: RunDir) -> bool:
    """The final global adapter is the initial one (nothing was aggregated)."""
    final = load_file(str(run.global_adapter_dir / "adapter_model.safetensors"))
    initial = load_file(str(run.checkpoint_dir(0) / "adapter_model.safetensors"))
    return final.keys() == initial.keys() and all(torch.equal(final[k], initial[k]) for k in final)


@pytest.mark.parametrize(
    ("targets", "suggested"),
    [
        pytest.param(("all-linear",), OPT_ATTENTION, id="all-linear"),  # the targeted layers that line up
        # none does (this trained before, clipping per token, not per example): the model's other layers
        pytest.param(("fc1", "fc2"), OPT_ATTENTION, id="fc1-fc2"),
    ],
)
@pytest.mark.parametrize("engine", ["opacus", "fused"])
def test_both_engines_refuse_gradients_of_examples_flattened_together(
    targets: tuple[str, ...], suggested: set[str], engine: str, tmp_path: Path
) -> None:
    """OPT's fc1/fc2 see (N T, d): one DP-SGD step stops before clipping, naming the layers, the
    sizes and the targets to use; nothing is released. The attention layers train. (Before, with
    fc1 and fc2 alone both engines clipped per token and released the adapter.)"""
    model_dir = save_tiny_model("opt", tmp_path / "opt")
    for lora_targets, refused in ((targets, True), (tuple(sorted(OPT_ATTENTION)), False)):
        model = wrap_lora(
            AutoModelForCausalLM.from_pretrained(str(model_dir)), LoraSettings(target_modules=lora_targets)
        )
        trainable = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        data = [Encoded([5, 6, 7, 8 + i % 5, 1], [-100, -100, 7, 8 + i % 5, 1]) for i in range(32)]
        dp = DPSGDConfig(1.0, 1.0, engine)
        with dp_sgd(model, optimizer, data, lambda b: collate(b, 0), 16, dp, seed=0) as private:
            batch = next(private.batches)
            n, t = batch["input_ids"].shape
            private.optimizer.zero_grad()
            forward(private.model, batch).loss.mean().backward()
            if not refused:
                private.optimizer.step()
            else:
                with pytest.raises(ValueError) as err:
                    private.optimizer.step()
                message = str(err.value)
                assert "\n" not in message and len(message) < 250  # the server logs a reply's last line, cut at 300
                assert f"per-example gradients of fc1, fc2 have leading size {n * t}, not the batch's {n}" in message
                match = re.search(r"pass --targets ([\w,]+) \(lora-targets\), or --no-dp", message)
                assert match is not None and set(match.group(1).split(",")) == suggested, message
        after = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
        changed = any(not torch.equal(trainable[k], after[k]) for k in trainable)
        assert changed is not refused
