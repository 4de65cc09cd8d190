"""DP-SGD by wrapping: Opacus' per-sample clipping on the LoRA parameters of the embedded model,
checked against plain training and against a brute-force per-sample reference."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from fedlora.core.data import collate, encode, per_sequence_loss
from fedlora.core.lora_settings import LoraSettings
from fedlora.core.model import get_adapter_state, load_base_model, set_adapter_state, wrap_lora
from fedlora.core.tasks import get_task
from fedlora.privacy.dp import DPSGDConfig, dp_sgd
from fedlora.privacy.engines import ENGINES, Engine
from fedlora.privacy.sampling import sample_rate


def _model(trainable: str = "both") -> torch.nn.Module:
    model = wrap_lora(load_base_model(), LoraSettings(rank=2, trainable=trainable))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(0)
    set_adapter_state(model, {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in get_adapter_state(model).items()})
    return model


def _one_dp_step(model: torch.nn.Module, data: list, config: DPSGDConfig) -> dict[str, torch.Tensor]:
    """One DP-SGD step with plain SGD at lr 1 over the whole dataset (q = 1): returns the update."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.SGD(list(params.values()), lr=1.0)
    with dp_sgd(model, opt, data, lambda b: collate(b, 0), len(data), config, seed=0) as pt:
        assert pt.sample_rate == 1.0
        batch = next(pt.batches)
        assert batch["input_ids"].shape[0] == len(data)  # Poisson sampling at q = 1 takes everyone
        loss = per_sequence_loss(
            pt.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
        ).mean()
        pt.optimizer.zero_grad()
        loss.backward()
        pt.optimizer.step()
    assert not any(hasattr(p, "grad_sample") for p in model.parameters()), "hooks and grad samples removed"
    return {n: before[n] - p.detach() for n, p in params.items()}


def _per_sample_grads(model: torch.nn.Module, data: list) -> list[dict[str, torch.Tensor]]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = []
    for example in data:
        batch = collate([example], 0)
        model.zero_grad()
        per_sequence_loss(
            model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits, batch["labels"]
        ).sum().backward()
        out.append({n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None})
    model.zero_grad()
    return out


def _data(tokenizer: PreTrainedTokenizerBase, n: int = 4) -> list:
    return encode(tokenizer, get_task("rotate-2").examples(n, seed=3), 64)


@pytest.mark.parametrize("engine", ENGINES)
def test_noise_zero_and_large_clip_equals_plain_gradient_step(
    tokenizer: PreTrainedTokenizerBase, engine: Engine
) -> None:
    data = _data(tokenizer)
    update = _one_dp_step(_model(), data, DPSGDConfig(noise_multiplier=0.0, max_grad_norm=1e6, engine=engine))
    grads = _per_sample_grads(_model(), data)
    for name, u in update.items():
        mean_grad = sum(g[name] for g in grads) / len(grads)
        torch.testing.assert_close(u, mean_grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("engine", ENGINES)
def test_clipping_matches_brute_force_per_sample_reference(tokenizer: PreTrainedTokenizerBase, engine: Engine) -> None:
    data = _data(tokenizer)
    c = 0.05
    grads = _per_sample_grads(_model(), data)
    norms = [torch.sqrt(sum((g**2).sum() for g in per.values())) for per in grads]
    assert all(n > c for n in norms), "clipping must be active for this test to mean anything"
    update = _one_dp_step(_model(), data, DPSGDConfig(noise_multiplier=0.0, max_grad_norm=c, engine=engine))
    for name, u in update.items():
        clipped = sum(g[name] * min(1.0, c / float(n)) for g, n in zip(grads, norms, strict=True))
        torch.testing.assert_close(u, clipped / len(data), rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("engine", ENGINES)
def test_frozen_a_gets_no_per_sample_work_and_noise_reaches_only_b(
    tokenizer: PreTrainedTokenizerBase, engine: Engine
) -> None:
    model = _model("B")
    a_before = get_adapter_state(model, "A")
    update = _one_dp_step(model, _data(tokenizer), DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, engine=engine))
    assert update and all(".lora_B." in n for n in update)
    assert all(torch.equal(a_before[k], v) for k, v in get_adapter_state(model, "A").items())


def test_sample_rate_and_config_validation() -> None:
    assert sample_rate(32, 2000) == 0.016 and sample_rate(64, 10) == 1.0
    for kwargs, msg in [
        ({"noise_multiplier": -1.0, "max_grad_norm": 1.0}, "noise_multiplier"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 0.0}, "max_grad_norm"),
    ]:
        try:
            DPSGDConfig(**kwargs)
        except ValueError as e:
            assert msg in str(e)
        else:
            raise AssertionError(f"{kwargs} accepted")


def test_empty_poisson_batch_risk_closed_form_and_refusal() -> None:
    from fedlora.privacy.sampling import check_poisson_batches, empty_batch_risk

    assert empty_batch_risk(1.0, 5, 3) == 0.0  # q = 1: every example in every batch
    assert empty_batch_risk(0.5, 1, 1) == pytest.approx(0.5)
    assert empty_batch_risk(0.5, 1, 2) == pytest.approx(0.75)  # 1 - (1 - 0.5)^2
    assert empty_batch_risk(0.5, 2, 1) == pytest.approx(0.25)
    check_poisson_batches(32, 2000, 300)  # the project's settings: risk ~ 300 e^-32
    with pytest.raises(ValueError, match=r"batch size 4 is too small .* 100 examples: .* probability 0.29"):
        check_poisson_batches(4, 100, 20)
