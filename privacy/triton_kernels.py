"""Triton kernels for :mod:`fedlora.privacy.kernels`, registered for CUDA tensors on the same ops.

Importing this module registers them (on a machine with CUDA). Without a GPU the kernels still
run under Triton's interpreter
(``TRITON_INTERPRET=1`` set before this module is imported) on CPU tensors, about 10,000x slower
than eager PyTorch: that is how CI tests them against the PyTorch implementations.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fedlora.privacy.kernels import (
    add_seeded_noise,
    check_clip_factors,
    lora_bottlenecks,
    lora_clipped_noised_sum,
    lora_per_sample_sq_norms,
)

BLOCK_P, BLOCK_Q, BLOCK_T = 16, 16, 16


@triton.jit
def _per_sample_outer_sq_norm(  # type: ignore[no-untyped-def]  # a Triton kernel: constexpr annotations only
    a_ptr, b_ptr, out_ptr, T, P, Q,
    s_an, s_at, s_ap, s_bn, s_bt, s_bq,
    scaling,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """out[n, tile] = || scaling * sum_t a[n, t, p] b[n, t, q] ||^2 over one (p, q) tile: each tile
    writes its own slot (no atomics), so the caller's sum over tiles is deterministic."""
    n = tl.program_id(0).to(tl.int64)  # offsets past 2**31 elements stay exact
    pid_p, pid_q = tl.program_id(1), tl.program_id(2)
    offs_p = (pid_p * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    offs_q = (pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.int64)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        a = tl.load(
            a_ptr + n * s_an + offs_t[:, None] * s_at + offs_p[None, :] * s_ap,
            mask=(offs_t[:, None] < T) & (offs_p[None, :] < P),
            other=0.0,
        )
        b = tl.load(
            b_ptr + n * s_bn + offs_t[:, None] * s_bt + offs_q[None, :] * s_bq,
            mask=(offs_t[:, None] < T) & (offs_q[None, :] < Q),
            other=0.0,
        )
        acc += tl.dot(tl.trans(a), b, input_precision="ieee")
    acc = acc * scaling
    tl.store(
        out_ptr + n * tl.num_programs(1) * tl.num_programs(2) + pid_p * tl.num_programs(2) + pid_q, tl.sum(acc * acc)
    )


@triton.jit
def _weighted_outer_sum(  # type: ignore[no-untyped-def]  # a Triton kernel: constexpr annotations only
    a_ptr, b_ptr, w_ptr, out_ptr, M, T, P, Q,
    s_am, s_ap, s_bm, s_bq, s_op, s_oq,
    scaling,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """out[p, q] = scaling * sum_m w[m // T] a[m, p] b[m, q] over the flattened (N * T) rows."""
    offs_p = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    offs_q = (tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.int64)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_T):
        offs_m = (m0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        w = tl.load(w_ptr + offs_m // T, mask=offs_m < M, other=0.0)
        a = tl.load(
            a_ptr + offs_m[:, None] * s_am + offs_p[None, :] * s_ap,
            mask=(offs_m[:, None] < M) & (offs_p[None, :] < P),
            other=0.0,
        )
        b = tl.load(
            b_ptr + offs_m[:, None] * s_bm + offs_q[None, :] * s_bq,
            mask=(offs_m[:, None] < M) & (offs_q[None, :] < Q),
            other=0.0,
        )
        acc += tl.dot(tl.trans(a * w[:, None]), b, input_precision="ieee")
    tl.store(
        out_ptr + offs_p[:, None] * s_op + offs_q[None, :] * s_oq,
        acc * scaling,
        mask=(offs_p[:, None] < P) & (offs_q[None, :] < Q),
    )


def weighted_outer_sum(a: Tensor, b: Tensor, weights: Tensor, scaling: float) -> Tensor:
    """scaling * sum_n weights[n] a[n]^T b[n]: the clipped sum without per-sample tensors."""
    n, t, p = a.shape
    q = b.shape[2]
    a2, b2 = a.reshape(n * t, p).float().contiguous(), b.reshape(n * t, q).float().contiguous()
    out = torch.empty(p, q, dtype=torch.float32, device=a.device)
    grid = (triton.cdiv(p, BLOCK_P), triton.cdiv(q, BLOCK_Q))
    _weighted_outer_sum[grid](
        a2, b2, weights.float().contiguous(), out, n * t, t, p, q,
        *a2.stride(), *b2.stride(), *out.stride(), scaling,
        BLOCK_P=BLOCK_P, BLOCK_Q=BLOCK_Q, BLOCK_T=BLOCK_T,
    )  # fmt: skip
    return out


def lora_clipped_noised_sum_triton(
    x: Tensor,
    g: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    clip_factors: Tensor,
    noise_std: float,
    seed: int,
) -> tuple[Tensor, Tensor]:
    """The Triton path of ``fedlora::lora_clipped_noised_sum`` (noise drawn as the reference does)."""
    u, v = lora_bottlenecks(x, g, lora_a, lora_b, scaling)
    check_clip_factors(x, clip_factors)
    sum_a = weighted_outer_sum(v, x, clip_factors, 1.0).to(x.dtype)
    sum_b = weighted_outer_sum(g, u, clip_factors, scaling).to(x.dtype)
    return add_seeded_noise(sum_a, sum_b, noise_std, seed)


def per_sample_outer_sq_norms(a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """||scaling * a[n]^T b[n]||^2 for every n, without forming a[n]^T b[n] in memory."""
    n, t, p = a.shape
    q = b.shape[2]
    grid = (n, triton.cdiv(p, BLOCK_P), triton.cdiv(q, BLOCK_Q))
    tiles = torch.empty(n, grid[1] * grid[2], dtype=torch.float32, device=a.device)
    _per_sample_outer_sq_norm[grid](
        a, b, tiles, t, p, q, *a.stride(), *b.stride(), scaling, BLOCK_P=BLOCK_P, BLOCK_Q=BLOCK_Q, BLOCK_T=BLOCK_T
    )
    return tiles.sum(1)


def lora_per_sample_sq_norms_triton(
    x: Tensor, g: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float
) -> tuple[Tensor, Tensor]:
    """The Triton path of ``fedlora::lora_per_sample_sq_norms``: G_A[n] = v[n]^T x[n] with
    v = s g B, and G_B[n] = s g[n]^T u[n] with u = x A^T (u and v are (N, T, r): small)."""
    u, v = (t.float().contiguous() for t in lora_bottlenecks(x, g, lora_a, lora_b, scaling))
    norm_a = per_sample_outer_sq_norms(v, x.float().contiguous(), 1.0)
    norm_b = per_sample_outer_sq_norms(g.float().contiguous(), u, scaling)
    return norm_a.to(x.dtype), norm_b.to(x.dtype)


def register() -> None:
    """Use the Triton kernels for CUDA tensors."""
    lora_per_sample_sq_norms.register_kernel("cuda")(lora_per_sample_sq_norms_triton)
    lora_clipped_noised_sum.register_kernel("cuda")(lora_clipped_noised_sum_triton)


if torch.cuda.is_available():  # on CPU (the interpreter tests) the PyTorch implementations stay
    register()
