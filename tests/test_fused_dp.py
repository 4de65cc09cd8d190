"""The fused DP-SGD step against Opacus' DPOptimizer on a PEFT LoRA model: the same private
gradient at noise 0 with clipping active (relative 1e-6)."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer

from client.data import collate, encode, per_sequence_loss
from client.model import LoraSettings, load_base_model, load_tokenizer, wrap_lora
from privacy.fused import LoraTaps, private_gradients
from simulations.tasks import get_task


def _batch() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    tok = load_tokenizer()
    model = wrap_lora(load_base_model(dtype=torch.float64), LoraSettings(rank=2, target_modules=("q_proj", "v_proj")))
    with torch.no_grad():  # non-zero B, so A's gradients are not zero
        g = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    batch = collate(encode(tok, get_task("rotate-1").examples(6, 0), 64), int(tok.pad_token_id))
    return model, batch


def _loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return per_sequence_loss(logits, batch["labels"]).mean()


@pytest.mark.parametrize("clipping", ["all", "some", "none"])
def test_fused_step_equals_opacus_at_noise_zero(clipping: str) -> None:
    model, batch = _batch()
    twin = copy.deepcopy(model)
    n = batch["input_ids"].shape[0]
    clip_norm = {"all": 0.05, "some": 30.0, "none": 1e3}[clipping]  # per-example norms are 22-35 here

    gsm = GradSampleModule(model)
    params = [p for p in gsm.parameters() if p.requires_grad]
    opt = DPOptimizer(
        torch.optim.SGD(params, lr=0.1), noise_multiplier=0.0, max_grad_norm=clip_norm, expected_batch_size=n
    )
    _loss(gsm, batch).backward()
    norms = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in params]).norm(dim=0)  # type: ignore[attr-defined]
    clipped = int((norms > clip_norm).sum())
    assert clipped == {"all": n, "none": 0}.get(clipping, clipped) and (clipping != "some" or 0 < clipped < n), norms
    opt.pre_step()
    expected = {
        name: p.grad.clone()
        for name, p in zip([n_ for n_, p in gsm.named_parameters() if p.requires_grad], params, strict=True)
    }

    taps = LoraTaps(twin)
    _loss(twin, batch).backward()
    private_gradients(taps, clip_norm, 0.0, expected_batch_size=n, loss_scale=n, seed=0)
    taps.close()
    got = {name: p.grad for name, p in twin.named_parameters() if p.requires_grad}
    assert len(got) == len(expected) == 16  # A and B of q_proj, v_proj in 4 layers
    for (name, want), (name2, have) in zip(sorted(expected.items()), sorted(got.items()), strict=True):
        assert name.removeprefix("_module.") == name2
        assert torch.allclose(have, want, rtol=1e-6, atol=1e-12), (name, (have - want).abs().max())
