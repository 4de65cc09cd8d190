"""The fused DP-SGD engine against Opacus' hooks, through ``fedlora.privacy.dp.dp_sgd``: the same private
update at noise 0 with clipping active (relative 1e-6, float64), the same noise for the same seed,
the same Poisson batches; what the fused engine cannot handle is refused by name."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from fedlora.core.data import collate, encode, per_sequence_loss
from fedlora.core.lora_settings import LoraSettings
from fedlora.core.model import load_base_model, set_trainable_factors, wrap_lora
from fedlora.core.model_dirs import load_tokenizer
from fedlora.core.tasks import get_task
from fedlora.privacy.dp import DPSGDConfig, dp_sgd
from fedlora.privacy.fused import LoraTaps


@pytest.fixture(scope="module")
def setup() -> tuple[torch.nn.Module, list]:
    tok = load_tokenizer()
    model = wrap_lora(load_base_model(dtype=torch.float64), LoraSettings(rank=2, target_modules=("q_proj", "v_proj")))
    with torch.no_grad():  # non-zero B, so A's gradients are not zero
        g = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return model, encode(tok, get_task("rotate-1").examples(6, 0), 64)


def _step(model: torch.nn.Module, data: list, config: DPSGDConfig, batch_size: int) -> dict[str, torch.Tensor]:
    """One DP-SGD step with SGD at lr 1; returns the update of every trainable parameter."""
    model = copy.deepcopy(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.SGD(list(params.values()), lr=1.0)
    with dp_sgd(model, opt, data, lambda b: collate(b, 0), batch_size, config, seed=7) as pt:
        batch = next(pt.batches)
        pt.optimizer.zero_grad()
        logits = pt.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_sequence_loss(logits, batch["labels"]).mean().backward()
        pt.optimizer.step()
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in model.parameters())
    return {n: before[n] - p.detach() for n, p in params.items()}


def _per_example_norms(model: torch.nn.Module, data: list) -> torch.Tensor:
    """Brute force: each example's own backward, its gradient norm over all trainable parameters."""
    model = copy.deepcopy(model)
    norms = []
    for example in data:
        model.zero_grad()
        batch = collate([example], 0)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_sequence_loss(logits, batch["labels"]).sum().backward()
        norms.append(torch.sqrt(sum((p.grad**2).sum() for p in model.parameters() if p.grad is not None)))
    return torch.stack(norms)


@pytest.mark.parametrize(("clipping", "factors"), [("all", "both"), ("some", "both"), ("none", "both"), ("some", "B")])
def test_fused_engine_equals_opacus_at_noise_zero(
    setup: tuple[torch.nn.Module, list], clipping: str, factors: str
) -> None:
    """``factors = "B"``: FFA-LoRA, A frozen (no per-example work for it, and no tap of v)."""
    model, data = setup
    model = copy.deepcopy(model)
    set_trainable_factors(model, factors)  # type: ignore[arg-type]
    norms = _per_example_norms(model, data)
    clip_norm = {"all": 0.05, "some": float(norms.median()), "none": 1e3}[clipping]
    clipped = int((norms > clip_norm).sum())
    assert clipped == {"all": len(data), "none": 0}.get(clipping, clipped) and (
        clipping != "some" or 0 < clipped < len(data)
    )
    updates = {
        engine: _step(model, data, DPSGDConfig(0.0, clip_norm, engine), len(data))  # type: ignore[arg-type]
        for engine in ("opacus", "fused")
    }
    # A and B of q_proj, v_proj in 4 layers; B alone under FFA-LoRA
    assert len(updates["fused"]) == len(updates["opacus"]) == (16 if factors == "both" else 8)
    for name, want in updates["opacus"].items():
        have = updates["fused"][name]
        assert want.abs().max() > 0, name
        torch.testing.assert_close(have, want, rtol=1e-6, atol=1e-12 * want.abs().max().item())


def test_same_seed_same_noise_and_same_poisson_batches(setup: tuple[torch.nn.Module, list]) -> None:
    model, data = setup
    noisy = {e: _step(model, data, DPSGDConfig(1.0, 30.0, e), 4) for e in ("opacus", "fused")}  # type: ignore[arg-type]
    quiet = _step(model, data, DPSGDConfig(0.0, 30.0, "fused"), 4)
    for name, want in noisy["opacus"].items():
        torch.testing.assert_close(noisy["fused"][name], want, rtol=1e-6, atol=1e-9)
        assert (want - quiet[name]).abs().max() > 1.0  # the noise is there (sigma C / batch = 7.5)

    def draws(engine: str, n: int) -> list[int]:
        m = copy.deepcopy(model)
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1.0)
        with dp_sgd(m, opt, data + data[:4], lambda b: collate(b, 0), 4, DPSGDConfig(1.0, 1.0, engine), 3) as pt:  # type: ignore[arg-type]
            assert pt.sample_rate == 0.4 and pt.optimizer.expected_batch_size == 4
            return [int(next(pt.batches)["input_ids"].shape[0]) for _ in range(n)]

    sizes = draws("fused", 600)
    assert sizes[:20] == draws("opacus", 20)
    # Poisson at exactly q = 4 / 10 (mean 4, sd of the mean 0.06); Opacus' make_private would
    # sample at 1 / ceil(10 / 4) = 1 / 3 (mean 3.3), below the rate the ledger charges
    assert abs(sum(sizes) / len(sizes) - 4.0) < 0.25


def test_fused_engine_refuses_what_it_cannot_clip(setup: tuple[torch.nn.Module, list]) -> None:
    model, data = setup
    other = copy.deepcopy(model)
    norm = next(p for n, p in other.named_parameters() if n.endswith("model.norm.weight"))
    norm.requires_grad_(True)
    with pytest.raises(ValueError, match=r"trains LoRA factors only; .*model\.norm\.weight .*dp.engine = opacus"):
        LoraTaps(other)
    dora = get_peft_model(load_base_model(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match=r"q_proj is Linear with the LoRA variant DoraLinearVariant"):
        LoraTaps(dora)
    with pytest.raises(ValueError, match=r"dp\.engine must be one of opacus, fused, got 'ghost'"):
        DPSGDConfig(1.0, 1.0, "ghost")  # type: ignore[arg-type]

    twice = copy.deepcopy(model)
    taps = LoraTaps(twice)
    batch = collate(data[:2], 0)
    logits = twice(input_ids=batch["input_ids"]).logits
    (logits[:, :3].sum() + logits[:, 2:].sum()).backward()  # one forward, one backward: fine
    with pytest.raises(RuntimeError, match="ran forward again after a backward, before the optimizer step"):
        twice(input_ids=batch["input_ids"])  # gradient accumulation
    taps.clear()
    q_proj = twice.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, q_proj.in_features, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="got two gradients before one optimizer step"):
        (q_proj(x) + q_proj(x)).sum().backward()  # a layer called twice in one pass
    taps.clear()
    with torch.no_grad():  # evaluation passes are not tapped
        twice(input_ids=batch["input_ids"])
    assert all(t.x is None and t.u is None for t in taps.taps)
    taps.close()
    assert all(not t.handles for t in taps.taps)


@pytest.mark.parametrize("engine", ["opacus", "fused"])
def test_both_engines_refuse_accumulation_and_foreign_parameters(
    setup: tuple[torch.nn.Module, list], engine: str
) -> None:
    """Two Poisson batches in one step would be charged as one; a parameter outside the model
    would be updated unclipped. Nothing is left on the model after a refusal."""
    model, data = setup
    model = copy.deepcopy(model)
    config = DPSGDConfig(1.0, 1.0, engine)  # type: ignore[arg-type]
    params = [p for p in model.parameters() if p.requires_grad]
    stranger = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="parameters that are not the model's"):
        with dp_sgd(model, torch.optim.SGD([*params, stranger], lr=1.0), data, lambda b: collate(b, 0), 4, config, 0):
            pass
    assert not any(m._forward_hooks for m in model.modules())
    with dp_sgd(model, torch.optim.SGD(params, lr=1.0), data, lambda b: collate(b, 0), 4, config, 0) as pt:
        batch = collate(data[:3], 0)

        def forward_backward() -> None:
            logits = pt.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            per_sequence_loss(logits, batch["labels"]).mean().backward()

        pt.optimizer.zero_grad()
        forward_backward()
        with pytest.raises((ValueError, RuntimeError), match="accumulation"):
            forward_backward()
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
