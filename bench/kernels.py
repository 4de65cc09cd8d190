"""LoRA kernels on this machine's CPU, side by side in one run (work in progress for issue 9):

- the gathered multi-adapter matmul (one adapter per sequence, 64 adapters) against a loop
  over the adapters, at several sequence lengths (goal: >= 1.2x at T >= 16);
- per-sample squared gradient norms of a LoRA layer: materialised per-sample gradients (the
  op) against ghost (Gram-matrix) norms, which cost ~T/r more arithmetic for LoRA shapes.

- one DP-SGD step (forward, backward, private gradient) on the embedded model with LoRA r=8 on
  all linear layers, batch 32: the fused step (:mod:`privacy.fused`) against Opacus'
  GradSampleModule + DPOptimizer (goal: >= parity).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client.multi_adapter import lora_gathered
from privacy.kernels import lora_per_sample_sq_norms


def timed(fn: Callable[[], object], repeat: int = 30) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ghost_norms(x: torch.Tensor, g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """||G_A[n]||^2 + ||G_B[n]||^2 by Gram matrices (Opacus' ghost clipping): O(T^2 (d + r))."""
    u, v = x @ a.T, s * (g @ b)
    norm_a = ((v @ v.transpose(1, 2)) * (x @ x.transpose(1, 2))).sum((1, 2))
    norm_b = s * s * ((g @ g.transpose(1, 2)) * (u @ u.transpose(1, 2))).sum((1, 2))
    return norm_a + norm_b


def dp_step_times() -> tuple[float, float]:
    """Median seconds of one private step: fused taps vs Opacus hooks (same model, batch, C)."""
    import copy

    from opacus.grad_sample import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from client.data import collate, encode, per_sequence_loss
    from client.model import LoraSettings, load_base_model, load_tokenizer, wrap_lora
    from privacy.fused import LoraTaps, private_gradients
    from simulations.tasks import get_task

    tok = load_tokenizer()
    model = wrap_lora(load_base_model(), LoraSettings(rank=8))
    twin = copy.deepcopy(model)
    batch = collate(encode(tok, get_task("rotate-1").examples(32, 0), 64), int(tok.pad_token_id))

    def loss_of(m: torch.nn.Module) -> torch.Tensor:
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return per_sequence_loss(logits, batch["labels"]).mean()

    gsm = GradSampleModule(model)
    params = [p for p in gsm.parameters() if p.requires_grad]
    opt = DPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=32)

    def opacus_step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_of(gsm).backward()
        opt.pre_step()

    taps = LoraTaps(twin)

    def fused_step() -> None:
        twin.zero_grad(set_to_none=True)
        loss_of(twin).backward()
        private_gradients(taps, 1.0, 1.0, expected_batch_size=32, loss_scale=32, seed=0)

    times = {}
    for name, fn in (("opacus", opacus_step), ("fused", fused_step), ("opacus2", opacus_step), ("fused2", fused_step)):
        times[name] = timed(fn, repeat=10)
    return min(times["fused"], times["fused2"]), min(times["opacus"], times["opacus2"])


def main() -> int:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    k, d, r, s = 64, 128, 4, 2.0
    bank_a, bank_b = torch.randn(k, r, d, generator=gen), torch.randn(k, d, r, generator=gen)
    index = torch.arange(k)
    ratios: dict[int, float] = {}
    for t in (8, 16, 32, 64):
        x = torch.randn(k, t, d, generator=gen)

        def gathered(x: torch.Tensor = x) -> torch.Tensor:
            return lora_gathered(x, bank_a, bank_b, index, s)

        def loop_over(x: torch.Tensor = x) -> list[torch.Tensor]:
            return [s * (x[i] @ bank_a[i].T) @ bank_b[i].T for i in range(k)]

        fused, loop = timed(gathered), timed(loop_over)
        ratios[t] = loop / fused
        print(
            f"gathered LoRA, {k} adapters, T={t}: op {1e3 * fused:.3f} ms, loop {1e3 * loop:.3f} ms, {ratios[t]:.2f}x"
        )
    x = torch.randn(32, 64, d, generator=gen)
    g = torch.randn(32, 64, d, generator=gen)
    a, b = bank_a[0], bank_b[0]
    assert torch.allclose(sum(lora_per_sample_sq_norms(x, g, a, b, s)), ghost_norms(x, g, a, b, s), rtol=1e-3)
    mat = timed(lambda: lora_per_sample_sq_norms(x, g, a, b, s))
    ghost = timed(lambda: ghost_norms(x, g, a, b, s))
    print(f"per-sample norms, N=32 T=64 d={d} r={r}: materialised {1e3 * mat:.3f} ms, ghost {1e3 * ghost:.3f} ms")
    fused_s, opacus_s = dp_step_times()
    print(
        f"DP-SGD step, embedded model, LoRA r=8 all-linear, batch 32: fused {1e3 * fused_s:.1f} ms, "
        f"Opacus {1e3 * opacus_s:.1f} ms"
    )
    print(f"ratio gathered_over_loop_t16 = {ratios[16]:.3f}")
    print(f"ratio materialised_over_ghost_norms_speed = {ghost / mat:.3f}")
    print(f"ratio fused_over_opacus_step_speed = {opacus_s / fused_s:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
