"""The Triton kernel of ``fedlora::lora_gathered`` (:mod:`fedlora.core.multi_adapter`), registered for
CUDA tensors when this module is imported on a machine with CUDA. Tested on CPU under Triton's
interpreter (``TRITON_INTERPRET=1`` set before import).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fedlora.core.multi_adapter import check_gathered, lora_gathered

BLOCK_T, BLOCK_D, BLOCK_O = 16, 32, 32


@triton.jit
def _gathered_lora(  # type: ignore[no-untyped-def]  # a Triton kernel: constexpr annotations only
    x_ptr, a_ptr, b_ptr, idx_ptr, out_ptr, T, D, R, OUT,
    s_xn, s_xt, s_xd, s_ak, s_ar, s_ad, s_bk, s_bo, s_br, s_on, s_ot, s_oo,
    scaling,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr,
):  # fmt: skip
    """out[n, t, o] = scaling * sum_r (sum_d x[n, t, d] A[k, r, d]) B[k, o, r], k = idx[n], over
    one (t, o) tile of sequence n: the bottleneck u stays in registers."""
    n = tl.program_id(0).to(tl.int64)  # offsets past 2**31 elements stay exact
    k = tl.load(idx_ptr + n)
    offs_t = (tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_o = (tl.program_id(2) * BLOCK_O + tl.arange(0, BLOCK_O)).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    u = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        x = tl.load(
            x_ptr + n * s_xn + offs_t[:, None] * s_xt + offs_d[None, :] * s_xd,
            mask=(offs_t[:, None] < T) & (offs_d[None, :] < D),
            other=0.0,
        )
        a_t = tl.load(  # A[k]^T tile: (BLOCK_D, BLOCK_R)
            a_ptr + k * s_ak + offs_d[:, None] * s_ad + offs_r[None, :] * s_ar,
            mask=(offs_d[:, None] < D) & (offs_r[None, :] < R),
            other=0.0,
        )
        u += tl.dot(x, a_t, input_precision="ieee")
    b_t = tl.load(  # B[k]^T tile: (BLOCK_R, BLOCK_O)
        b_ptr + k * s_bk + offs_r[:, None] * s_br + offs_o[None, :] * s_bo,
        mask=(offs_r[:, None] < R) & (offs_o[None, :] < OUT),
        other=0.0,
    )
    out = tl.dot(u, b_t, input_precision="ieee") * scaling
    tl.store(
        out_ptr + n * s_on + offs_t[:, None] * s_ot + offs_o[None, :] * s_oo,
        out,
        mask=(offs_t[:, None] < T) & (offs_o[None, :] < OUT),
    )


def lora_gathered_triton(x: Tensor, bank_a: Tensor, bank_b: Tensor, index: Tensor, scaling: float) -> Tensor:
    """The Triton path of ``fedlora::lora_gathered`` (float32 accumulation, output in x's dtype)."""
    check_gathered(x, bank_a, bank_b, index)
    n, t, d = x.shape
    _, r, _ = bank_a.shape
    o = bank_b.shape[1]
    xf, af, bf = x.float().contiguous(), bank_a.float().contiguous(), bank_b.float().contiguous()
    out = torch.empty(n, t, o, dtype=torch.float32, device=x.device)
    block_r = max(16, triton.next_power_of_2(r))  # tl.dot needs tiles of at least 16
    grid = (n, triton.cdiv(t, BLOCK_T), triton.cdiv(o, BLOCK_O))
    _gathered_lora[grid](
        xf, af, bf, index.contiguous(), out, t, d, r, o,
        *xf.stride(), *af.stride(), *bf.stride(), *out.stride(), scaling,
        BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, BLOCK_R=block_r, BLOCK_O=BLOCK_O,
    )  # fmt: skip
    return out.to(x.dtype)


def register() -> None:
    """Use the Triton kernel for CUDA tensors."""
    lora_gathered.register_kernel("cuda")(lora_gathered_triton)


if torch.cuda.is_available():  # on CPU (the interpreter tests) the PyTorch implementation stays
    register()
