"""The LoRA kernels' PyTorch implementations against brute-force per-sample autograd, on odd
sizes (nothing a multiple of a tile size)."""

from __future__ import annotations

import pytest
import torch

from fedlora.core.multi_adapter import lora_gathered
from fedlora.privacy.kernels import lora_clipped_noised_sum, lora_per_sample_sq_norms, per_sample_linear_grads

N, T, D_IN, D_OUT, R, S = 3, 7, 5, 6, 3, 1.7


def _layer(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, T, D_IN, generator=g, dtype=torch.float64)
    a = torch.randn(R, D_IN, generator=g, dtype=torch.float64)
    b = torch.randn(D_OUT, R, generator=g, dtype=torch.float64)
    target = torch.randn(N, T, D_OUT, generator=g, dtype=torch.float64)
    return x, a, b, target


def _per_sample(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, target: torch.Tensor):
    """Per-sample gradients of A and B by autograd, one sample at a time, and dL/dy."""
    grads_a, grads_b, outs = [], [], []
    for n in range(N):
        a_n, b_n = a.clone().requires_grad_(), b.clone().requires_grad_()
        y = S * (x[n] @ a_n.T) @ b_n.T
        y.retain_grad()
        loss = ((y - target[n]) ** 2).sum() / 2
        loss.backward()
        grads_a.append(a_n.grad)
        grads_b.append(b_n.grad)
        outs.append(y.grad)
    return torch.stack(grads_a), torch.stack(grads_b), torch.stack(outs)


def test_per_sample_norms_and_gradients_equal_brute_force_autograd() -> None:
    x, a, b, target = _layer()
    grads_a, grads_b, g = _per_sample(x, a, b, target)
    norm_a, norm_b = lora_per_sample_sq_norms(x, g, a, b, S)
    assert torch.allclose(norm_a, grads_a.pow(2).sum((1, 2)), rtol=1e-12)
    assert torch.allclose(norm_b, grads_b.pow(2).sum((1, 2)), rtol=1e-12)
    # the fused engine's CPU path: from the tapped u = x A^T and lora_B's output gradient s g
    u, v = x @ a.T, S * g @ b
    mat_a, mat_b = per_sample_linear_grads(v, x), per_sample_linear_grads(S * g, u)
    assert torch.allclose(mat_a, grads_a, rtol=1e-12) and torch.allclose(mat_b, grads_b, rtol=1e-12)


def test_clipped_sum_equals_the_reweighted_per_sample_sum_and_noise_is_seeded() -> None:
    x, a, b, target = _layer(1)
    grads_a, grads_b, g = _per_sample(x, a, b, target)
    norms = (grads_a.pow(2).sum((1, 2)) + grads_b.pow(2).sum((1, 2))).sqrt()
    clip = (1.0 / norms).clamp(max=1.0)  # clipping at 1 is active for every sample
    assert bool((clip < 1).all())
    sum_a, sum_b = lora_clipped_noised_sum(x, g, a, b, S, clip, 0.0, 0)
    assert torch.allclose(sum_a, (clip[:, None, None] * grads_a).sum(0), rtol=1e-12)
    assert torch.allclose(sum_b, (clip[:, None, None] * grads_b).sum(0), rtol=1e-12)
    noisy = lora_clipped_noised_sum(x, g, a, b, S, clip, 0.5, 7)
    again = lora_clipped_noised_sum(x, g, a, b, S, clip, 0.5, 7)
    assert torch.equal(noisy[0], again[0]) and not torch.allclose(noisy[0], sum_a)
    noise = torch.cat([(noisy[0] - sum_a).flatten(), (noisy[1] - sum_b).flatten()])
    assert 0.2 < float(noise.std()) < 0.9  # 33 draws of N(0, 0.25)


def test_gathered_matmul_equals_a_loop_over_adapters() -> None:
    g = torch.Generator().manual_seed(2)
    k = 4
    bank_a, bank_b = torch.randn(k, R, D_IN, generator=g), torch.randn(k, D_OUT, R, generator=g)
    x = torch.randn(5, T, D_IN, generator=g)
    index = torch.tensor([3, 0, 3, 1, 2])
    out = lora_gathered(x, bank_a, bank_b, index, S)
    for n, i in enumerate(index.tolist()):
        assert torch.allclose(out[n], S * (x[n] @ bank_a[i].T) @ bank_b[i].T, atol=1e-5)


def test_bad_shapes_are_refused() -> None:
    x, a, b, _ = _layer()
    with pytest.raises(ValueError, match="do not fit a LoRA layer"):
        lora_per_sample_sq_norms(x, torch.zeros(N, T, D_OUT + 1, dtype=x.dtype), a, b, S)
    with pytest.raises(ValueError, match="clip_factors"):
        lora_clipped_noised_sum(x, torch.zeros(N, T, D_OUT, dtype=x.dtype), a, b, S, torch.ones(N + 1), 0.0, 0)
    with pytest.raises(ValueError, match="one adapter per sequence"):
        lora_gathered(x.float(), a[None].float(), b[None].float(), torch.tensor([0]), S)


@pytest.mark.slow
def test_triton_kernels_under_the_interpreter_equal_the_reference() -> None:
    """Triton's interpreter on CPU tensors (a subprocess: TRITON_INTERPRET must be set before
    the kernels are defined); skipped with a message only when triton is not installed."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed: the Triton kernels cannot be tested here")
    code = """
import torch
from fedlora.privacy.kernels import lora_per_sample_sq_norms
from fedlora.privacy.triton_kernels import lora_clipped_noised_sum_triton, lora_per_sample_sq_norms_triton
from fedlora.privacy.kernels import lora_clipped_noised_sum
g = torch.Generator().manual_seed(3)
for n, t, d_in, d_out, r in [(3, 7, 5, 6, 3), (2, 19, 17, 33, 2), (1, 1, 3, 2, 1)]:
    x, gr = torch.randn(n, t, d_in, generator=g), torch.randn(n, t, d_out, generator=g)
    a, b = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
    got = lora_per_sample_sq_norms_triton(x, gr, a, b, 1.3)
    ref = lora_per_sample_sq_norms(x, gr, a, b, 1.3)
    for u, v in zip(got, ref):
        assert torch.allclose(u, v, rtol=1e-4), (u, v)
    clip = torch.rand(n, generator=g)
    for noise in (0.0, 0.3):
        got = lora_clipped_noised_sum_triton(x, gr, a, b, 1.3, clip, noise, 5)
        ref = lora_clipped_noised_sum(x, gr, a, b, 1.3, clip, noise, 5)
        for u, v in zip(got, ref):
            assert torch.allclose(u, v, rtol=1e-4, atol=1e-4), (u - v).abs().max()
from fedlora.core.multi_adapter import lora_gathered
from fedlora.core.multi_adapter_triton import lora_gathered_triton
for n, t, d, o, r, k in [(5, 7, 5, 6, 3, 4), (3, 19, 37, 33, 2, 2), (1, 1, 3, 2, 1, 1)]:
    x = torch.randn(n, t, d, generator=g)
    bank_a, bank_b = torch.randn(k, r, d, generator=g), torch.randn(k, o, r, generator=g)
    index = torch.randint(0, k, (n,), generator=g)
    got, ref = lora_gathered_triton(x, bank_a, bank_b, index, 1.3), lora_gathered(x, bank_a, bank_b, index, 1.3)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4), (got - ref).abs().max()
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the Triton kernels run there)")


@pytest.mark.gpu
@cuda
def test_ops_on_cuda_run_the_triton_kernels_and_equal_the_cpu_reference() -> None:
    from fedlora.core.multi_adapter_triton import lora_gathered_triton
    from fedlora.privacy.triton_kernels import lora_per_sample_sq_norms_triton

    x, a, b, target = (t.float() for t in _layer(4))
    g = target - x @ a.T @ b.T
    for cpu, gpu in zip(
        lora_per_sample_sq_norms(x, g, a, b, S),
        lora_per_sample_sq_norms(x.cuda(), g.cuda(), a.cuda(), b.cuda(), S),
        strict=True,
    ):
        assert torch.allclose(gpu.cpu(), cpu, rtol=1e-4)
    clip = torch.rand(N)
    ref = lora_clipped_noised_sum(x, g, a, b, S, clip, 0.0, 0)
    got = lora_clipped_noised_sum(x.cuda(), g.cuda(), a.cuda(), b.cuda(), S, clip.cuda(), 0.0, 0)
    for u, v in zip(got, ref, strict=True):
        assert torch.allclose(u.cpu(), v, rtol=1e-4, atol=1e-5)
    bank_a, bank_b, index = a[None].repeat(2, 1, 1), b[None].repeat(2, 1, 1), torch.tensor([1, 0, 1])
    want = lora_gathered(x, bank_a, bank_b, index, S)
    have = lora_gathered(x.cuda(), bank_a.cuda(), bank_b.cuda(), index.cuda(), S)
    assert torch.allclose(have.cpu(), want, rtol=1e-4, atol=1e-5)
    assert lora_per_sample_sq_norms_triton is not None and lora_gathered_triton is not None  # importable on GPU hosts


@pytest.mark.gpu
@cuda
def test_fused_engine_on_cuda_equals_opacus() -> None:
    """One DP-SGD step on the GPU with both engines at noise 0 (clipping active)."""
    import copy

    from fedlora.core.data import collate, encode, per_sequence_loss
    from fedlora.core.lora_settings import LoraSettings
    from fedlora.core.model import load_base_model, wrap_lora
    from fedlora.core.model_dirs import load_tokenizer
    from fedlora.core.tasks import get_task
    from fedlora.privacy.dp import DPSGDConfig, dp_sgd

    tok = load_tokenizer()
    model = wrap_lora(load_base_model(device="cuda"), LoraSettings(rank=2, target_modules=("q_proj", "v_proj")))
    data = encode(tok, get_task("rotate-1").examples(6, 0), 64)
    updates = {}
    for engine in ("opacus", "fused"):
        m = copy.deepcopy(model)
        params = {n: p for n, p in m.named_parameters() if p.requires_grad}
        before = {n: p.detach().clone() for n, p in params.items()}
        opt = torch.optim.SGD(list(params.values()), lr=1.0)
        with dp_sgd(m, opt, data, lambda e: collate(e, 0), 6, DPSGDConfig(0.0, 0.05, engine), 0) as pt:  # type: ignore[arg-type]
            batch = {k: v.cuda() for k, v in next(pt.batches).items()}
            pt.optimizer.zero_grad()
            logits = pt.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            per_sequence_loss(logits, batch["labels"]).mean().backward()
            pt.optimizer.step()
        updates[engine] = {n: (before[n] - p.detach()).cpu() for n, p in params.items()}
    for name, want in updates["opacus"].items():
        assert torch.allclose(updates["fused"][name], want, rtol=1e-3, atol=1e-7), name
