"""LoRA kernels on this machine's CPU (one torch thread), side by side in one run:

- the gathered multi-adapter matmul (a batch of 128 sequences over 64 adapters, one adapter per
  sequence) against a loop over the adapters, at T = 8..64 (goal: >= 1.2x at every T >= 16);
- evaluating 64 personal adapters on their own examples with the embedded model: one batched
  pass (:func:`fedlora.core.multi_adapter.evaluate_many`) against loading each into PEFT in turn;
- per-sample squared gradient norms of a LoRA layer: materialised per-sample gradients (the
  op) against ghost (Gram-matrix) norms, which cost ~T/r more arithmetic for LoRA shapes;
- one DP-SGD step (zero_grad, forward, backward, optimizer step) on the embedded model with
  LoRA r=8 on all linear layers, batch 32, through ``fedlora.privacy.dp.dp_sgd``: ``dp.engine = fused``
  against ``opacus`` (goal: >= parity).

Run: ``python bench/bench_kernels.py``; the last lines are the ratios (> 1: the first named is faster).
``--quick`` (a smoke run, seconds): T = 8 and 16 only, 8 adapters to evaluate, one repetition of
every timing pass, a few repeats per timing; same code paths, meaningless figures.

glibc's malloc returns freed megabyte-sized buffers to the OS and takes them back with page
faults, depending on what ran before: measured here, that alone made the same gathered matmul
0.45 ms or 1.6 ms depending on whether the loop had just run. The bench fixes malloc's mmap and
trim thresholds (``mallopt``, as ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` would;
jemalloc and tcmalloc, which PyTorch's CPU tuning guide recommends, behave alike) so both sides
of every ratio run under the same allocator.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedlora.core.multi_adapter import lora_gathered
from fedlora.privacy.kernels import lora_per_sample_sq_norms


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


def dp_step_times(repeat: int = 15, passes: int = 2) -> tuple[float, float, float]:
    """Median seconds of one private step (zero_grad, forward, backward, optimizer step) through
    ``fedlora.privacy.dp.dp_sgd``: the fused engine and Opacus' hooks (same model, batch, C, sigma), and
    of the same step without DP (what neither engine can make faster)."""
    import copy

    from fedlora.core.data import collate, encode, per_sequence_loss
    from fedlora.core.lora_settings import LoraSettings
    from fedlora.core.model import load_base_model, wrap_lora
    from fedlora.core.model_dirs import load_tokenizer
    from fedlora.core.tasks import get_task
    from fedlora.privacy.dp import DPSGDConfig, dp_sgd

    tok = load_tokenizer()
    model = wrap_lora(load_base_model(), LoraSettings(rank=8))
    data = encode(tok, get_task("rotate-1").examples(64, 0), 64)
    batch = collate(data[:32], int(tok.pad_token_id))

    def step_of(m: torch.nn.Module, opt: torch.optim.Optimizer) -> Callable[[], None]:
        def step() -> None:
            opt.zero_grad(set_to_none=True)
            logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            per_sequence_loss(logits, batch["labels"]).mean().backward()
            opt.step()

        return step

    times: dict[str, list[float]] = {"opacus": [], "fused": [], "plain": []}
    for engine in ("opacus", "fused", "plain") * passes:
        m = copy.deepcopy(model)
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.0)
        if engine == "plain":
            times[engine].append(timed(step_of(m, opt), repeat=repeat))
            continue
        config = DPSGDConfig(1.0, 1.0, engine)  # type: ignore[arg-type]
        with dp_sgd(m, opt, data, lambda b: collate(b, 0), 32, config, seed=0) as pt:
            times[engine].append(timed(step_of(pt.model, pt.optimizer), repeat=repeat))
    return min(times["fused"]), min(times["opacus"]), min(times["plain"])


def batched_eval_times(adapters: int = 64, per_adapter: int = 8, repeat: int = 3) -> tuple[float, float]:
    """Seconds to evaluate ``adapters`` personal adapters (r=8, all linear layers) on
    ``per_adapter`` test examples each: one batched pass against loading each into PEFT in turn."""
    import tempfile

    from fedlora.core.adapter_format import read_adapter_dir
    from fedlora.core.data import encode
    from fedlora.core.lora_settings import LoraSettings
    from fedlora.core.model import get_adapter_state, load_base_model, save_adapter, set_adapter_state, wrap_lora
    from fedlora.core.model_dirs import load_tokenizer
    from fedlora.core.multi_adapter import LoadedAdapter, evaluate_many
    from fedlora.core.tasks import get_task
    from fedlora.core.train import evaluate

    tok = load_tokenizer()
    peft_model = wrap_lora(load_base_model(), LoraSettings(rank=8))
    gen = torch.Generator().manual_seed(0)
    states, loaded = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(adapters):
            state = {n: 0.05 * torch.randn(v.shape, generator=gen) for n, v in get_adapter_state(peft_model).items()}
            set_adapter_state(peft_model, state)
            states.append(state)
            loaded.append(
                LoadedAdapter.from_files(str(k), read_adapter_dir(save_adapter(peft_model, Path(tmp) / str(k))))
            )
    tasks = ["rotate-2", "sort-desc", "adddigit-4", "repeat-3"]
    data = [encode(tok, get_task(tasks[k % 4]).examples(per_adapter, k), 64) for k in range(adapters)]
    pad = int(tok.pad_token_id)
    base = load_base_model()

    def batched() -> list:
        return evaluate_many(base, loaded, list(enumerate(data)), pad, batch_size=64)

    def loop() -> list:
        out = []
        for state, d in zip(states, data, strict=True):
            set_adapter_state(peft_model, state)
            out.append(evaluate(peft_model, d, pad, batch_size=64))
        return out

    for got, want in zip(batched(), loop(), strict=True):
        assert abs(got.loss - want.loss) <= 1e-4 * abs(want.loss) and got.exact_match == want.exact_match
    return min(timed(batched, repeat), timed(batched, repeat)), min(timed(loop, repeat), timed(loop, repeat))


def steady_malloc() -> None:
    """Keep freed buffers in the heap (glibc only; a no-op elsewhere)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 64 << 20)
    libc.mallopt(m_trim_threshold, 128 << 20)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, one repetition (seconds)")
    args = parser.parse_args()
    repeat = 3 if args.quick else 30
    steady_malloc()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    k, n, d, r, s = 64, 128, 128, 8, 2.0
    bank_a, bank_b = torch.randn(k, r, d, generator=gen), torch.randn(k, d, r, generator=gen)
    index = torch.randint(0, k, (n,), generator=gen)  # a batch of 128 sequences over 64 adapters
    ratios: dict[int, float] = {}
    for t in (8, 16) if args.quick else (8, 16, 32, 64):
        x = torch.randn(n, t, d, generator=gen)

        def gathered(x: torch.Tensor = x) -> torch.Tensor:
            return lora_gathered(x, bank_a, bank_b, index, s)

        def loop_over(x: torch.Tensor = x) -> torch.Tensor:
            """One adapter at a time: its sequences through its two small matmuls."""
            out = torch.empty(x.shape[0], x.shape[1], d)
            for i in index.unique().tolist():
                rows = (index == i).nonzero().squeeze(1)
                out[rows] = s * (x[rows] @ bank_a[i].T) @ bank_b[i].T
            return out

        assert torch.allclose(gathered(), loop_over(), atol=1e-3)
        op = min(timed(gathered, repeat), timed(gathered, repeat))
        loop = min(timed(loop_over, repeat), timed(loop_over, repeat))
        ratios[t] = loop / op
        print(
            f"gathered LoRA layer, {n} sequences over {k} adapters, d={d} r={r} T={t}: "
            f"op {1e3 * op:.3f} ms, loop {1e3 * loop:.3f} ms, {ratios[t]:.2f}x"
        )
    adapters, per_adapter = (8, 2) if args.quick else (64, 8)
    batched_s, loop_s = batched_eval_times(adapters, per_adapter, 1 if args.quick else 3)
    print(
        f"evaluating {adapters} adapters (r=8, all linear) on {per_adapter} examples each, embedded model: "
        f"batched {batched_s:.3f} s, one adapter at a time (PEFT) {loop_s:.3f} s"
    )
    x = torch.randn(32, 64, d, generator=gen)
    g = torch.randn(32, 64, d, generator=gen)
    a, b = bank_a[0], bank_b[0]
    assert torch.allclose(sum(lora_per_sample_sq_norms(x, g, a, b, s)), ghost_norms(x, g, a, b, s), rtol=1e-3)
    mat = timed(lambda: lora_per_sample_sq_norms(x, g, a, b, s), repeat)
    ghost = timed(lambda: ghost_norms(x, g, a, b, s), repeat)
    print(f"per-sample norms, N=32 T=64 d={d} r={r}: materialised {1e3 * mat:.3f} ms, ghost {1e3 * ghost:.3f} ms")
    fused_s, opacus_s, plain_s = dp_step_times(2, 1) if args.quick else dp_step_times()
    print(
        f"DP-SGD step, embedded model, LoRA r=8 all-linear, batch 32: fused {1e3 * fused_s:.1f} ms, "
        f"Opacus {1e3 * opacus_s:.1f} ms (without DP {1e3 * plain_s:.1f} ms)"
    )
    print(f"ratio materialised_over_ghost_norms_speed = {ghost / mat:.3f}")
    print(f"ratio batched_eval_over_loop_speed = {loop_s / batched_s:.3f}")
    print(f"ratio gathered_over_loop_min_t16 = {min(v for t, v in ratios.items() if t >= 16):.3f}")
    print(f"ratio fused_over_opacus_step_speed = {opacus_s / fused_s:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
