"""LoRA kernels for DP-SGD and batched evaluation, registered as ``torch.library`` custom ops.

For a LoRA layer ``y = x W0^T + s (x A^T) B^T`` with input ``x`` (N, T, d_in), output gradient
``g = dL/dy`` (N, T, d_out), ``u = x A^T`` and ``v = dL/du = s g B`` (both (N, T, r)):

    per-sample gradients   G_A[n] = v[n]^T x[n]   (r, d_in)      G_B[n] = s g[n]^T u[n]   (d_out, r)

- ``fedlora::lora_per_sample_sq_norms``: ||G_A[n]||^2 and ||G_B[n]||^2. The per-sample
  gradients are materialised: for LoRA (T >> r) that is about T / r less arithmetic than ghost
  (Gram-matrix) norms, whose cost grows with T^2.
- ``fedlora::lora_clipped_noised_sum``: sum_n c[n] G[n] (+ Gaussian noise of std
  ``noise_std``), as one reweighted GEMM: no per-sample tensor is formed.
- ``fedlora::per_sample_linear_grads``: G[n] itself, for the fused engine's CPU path, which
  taps u and v from autograd and materialises each factor's per-sample gradients once.

(The gathered multi-adapter matmul, ``fedlora::lora_gathered``, lives with its user in
:mod:`fedlora.core.multi_adapter`.) Each op has a PyTorch implementation (the CPU path and the
oracle); the Triton kernels of :mod:`fedlora.privacy.triton_kernels` are registered for CUDA tensors
under the same op names, so callers do not change.
"""

from __future__ import annotations

import importlib.util
from importlib import import_module

import torch
from torch import Tensor


def lora_bottlenecks(x: Tensor, g: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """u = x A^T and v = dL/du = s g B, both (N, T, r), once the shapes are checked to fit one
    LoRA layer (every implementation of the ops starts here, so the CUDA path checks too)."""
    if x.ndim != 3 or g.ndim != 3 or x.shape[:2] != g.shape[:2]:
        raise ValueError(f"x and g must be (N, T, features) with the same N, T; got {tuple(x.shape)}, {tuple(g.shape)}")
    r, d_in = lora_a.shape
    d_out, r_b = lora_b.shape
    if x.shape[2] != d_in or g.shape[2] != d_out or r_b != r:
        raise ValueError(
            f"shapes do not fit a LoRA layer: x {tuple(x.shape)}, g {tuple(g.shape)}, "
            f"A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)}"
        )
    return x @ lora_a.T, scaling * (g @ lora_b)


def check_clip_factors(x: Tensor, clip_factors: Tensor) -> None:
    if clip_factors.shape != (x.shape[0],):
        raise ValueError(f"clip_factors must be (N,) = ({x.shape[0]},), got {tuple(clip_factors.shape)}")


def _per_sample_outer(left: Tensor, right: Tensor) -> Tensor:
    """sum_t left[n, t]^T right[n, t] for every n: (N, P, Q) from (N, T, P) and (N, T, Q)."""
    return torch.bmm(left.transpose(1, 2), right)


@torch.library.custom_op("fedlora::lora_per_sample_sq_norms", mutates_args=())
def lora_per_sample_sq_norms(
    x: Tensor, g: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float
) -> tuple[Tensor, Tensor]:
    """(||G_A[n]||^2, ||G_B[n]||^2), each (N,), from the layer input and output gradient."""
    u, v = lora_bottlenecks(x, g, lora_a, lora_b, scaling)
    grad_a = _per_sample_outer(v, x)  # (N, r, d_in)
    grad_b = scaling * _per_sample_outer(g, u)  # (N, d_out, r)
    return grad_a.pow(2).sum((1, 2)), grad_b.pow(2).sum((1, 2))


@lora_per_sample_sq_norms.register_fake
def _(x: Tensor, g: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape[0]), x.new_empty(x.shape[0])


@torch.library.custom_op("fedlora::per_sample_linear_grads", mutates_args=())
def per_sample_linear_grads(grad_output: Tensor, inputs: Tensor) -> Tensor:
    """Per-sample weight gradients of a bias-free linear map, (N, d_out, d_in), from its output
    gradient (N, T, d_out) and input (N, T, d_in): sum_t grad_output[n, t]^T inputs[n, t].

    For LoRA, G_A = per_sample_linear_grads(v, x) and G_B = per_sample_linear_grads(s g, u), both
    small (r rows or columns): materialising them once costs about T / r less arithmetic than
    ghost norms, and the clipped sum is then one contraction."""
    if grad_output.ndim != 3 or inputs.ndim != 3 or grad_output.shape[:2] != inputs.shape[:2]:
        raise ValueError(
            f"need (N, T, d_out) and (N, T, d_in) with the same N, T; got {tuple(grad_output.shape)}, "
            f"{tuple(inputs.shape)}"
        )
    return _per_sample_outer(grad_output, inputs)


@per_sample_linear_grads.register_fake
def _(grad_output: Tensor, inputs: Tensor) -> Tensor:
    return inputs.new_empty(inputs.shape[0], grad_output.shape[2], inputs.shape[2])


@torch.library.custom_op("fedlora::lora_clipped_noised_sum", mutates_args=())
def lora_clipped_noised_sum(
    x: Tensor,
    g: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    clip_factors: Tensor,
    noise_std: float,
    seed: int,
) -> tuple[Tensor, Tensor]:
    """(sum_n c[n] G_A[n] + noise, sum_n c[n] G_B[n] + noise): one reweighted GEMM each."""
    u, v = lora_bottlenecks(x, g, lora_a, lora_b, scaling)
    check_clip_factors(x, clip_factors)
    c = clip_factors.to(x.dtype)[:, None, None]
    r, d_in = lora_a.shape
    sum_a = (c * v).reshape(-1, r).T @ x.reshape(-1, d_in)  # (r, d_in)
    sum_b = scaling * ((c * g).reshape(-1, g.shape[2]).T @ u.reshape(-1, r))  # (d_out, r)
    return add_seeded_noise(sum_a, sum_b, noise_std, seed)


def add_seeded_noise(sum_a: Tensor, sum_b: Tensor, noise_std: float, seed: int) -> tuple[Tensor, Tensor]:
    """N(0, noise_std^2) on both sums, drawn from a generator seeded with ``seed`` (A's first):
    every implementation of the op draws the same noise."""
    if noise_std <= 0:
        return sum_a, sum_b
    gen = torch.Generator(device=sum_a.device).manual_seed(seed)
    noise_a = torch.randn(sum_a.shape, generator=gen, device=sum_a.device, dtype=sum_a.dtype)
    noise_b = torch.randn(sum_b.shape, generator=gen, device=sum_b.device, dtype=sum_b.dtype)
    return sum_a + noise_std * noise_a, sum_b + noise_std * noise_b


@lora_clipped_noised_sum.register_fake
def _(
    x: Tensor,
    g: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    clip_factors: Tensor,
    noise_std: float,
    seed: int,
) -> tuple[Tensor, Tensor]:
    return lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)


def load_triton(module: str) -> None:
    """Import ``module``, whose Triton kernels register themselves for CUDA tensors, where CUDA and
    Triton both exist. (Either side may be imported first: the kernels register at the end of
    their module.)"""
    if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
        import_module(module)


load_triton("fedlora.privacy.triton_kernels")
