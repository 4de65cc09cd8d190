"""Every model kind on a CUDA device, in float32 and bfloat16, with and without DP-SGD (both
engines): the same code path as on the CPU, with the base model where ``model.device`` says and
the LoRA factors and heads in float32. Skipped without a GPU (``-m gpu`` selects them)."""

from __future__ import annotations

import pytest
import torch

from fedlora.client.private_train import train_private
from fedlora.core.client_data import client_examples
from fedlora.core.config import FederationConfig, ModelSection
from fedlora.core.run_model import load_run_model
from fedlora.core.train import TrainSettings, evaluate, train
from fedlora.privacy.dp import DPSGDConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("kind", ["causal-lm", "seq-cls", "image-cls"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("engine", [None, "opacus", "fused"])
def test_a_kind_trains_on_the_gpu(kind: str, dtype: str, engine: str | None) -> None:
    cfg = FederationConfig(model=ModelSection(kind=kind, device="cuda", dtype=dtype), num_train=64, num_test=16)
    run = load_run_model(cfg, cfg.lora_settings(8, 16.0))
    base = [p for n, p in run.model.named_parameters() if not p.requires_grad]
    trained = [p for p in run.model.parameters() if p.requires_grad]
    assert all(p.device.type == "cuda" for p in base + trained)
    assert {p.dtype for p in trained} == {torch.float32}  # factors and heads train in fp32
    assert any(p.dtype == getattr(torch, dtype) for p in base)
    train_ex, test_ex = client_examples(cfg, 0)
    data, test = run.encode(train_ex).items, run.encode(test_ex).items
    before = evaluate(run.model, test, run.pad_id)
    settings = TrainSettings(steps=15, lr=3e-3, batch_size=16)
    if engine is None:
        result = train(run.model, data, settings, run.pad_id)
    else:
        dp = DPSGDConfig(noise_multiplier=0.5, max_grad_norm=1.0, engine=engine)
        result = train_private(run.model, data, settings, run.pad_id, dp, seed=0)
    after = evaluate(run.model, test, run.pad_id)
    assert result.steps == 15 and torch.isfinite(torch.tensor(after.loss))
    assert after.loss < before.loss
