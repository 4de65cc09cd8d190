"""DP-SGD overhead benchmark: step time and peak memory of DP-SGD (Opacus) against plain LoRA.

Run ``python bench/bench_dp_overhead.py`` (about 6 minutes on two idle cores) or ``--quick`` (a
smoke run, about a minute: one repetition of one timed step, trainable=both only, live-allocator
memory of one step of the embedded model only; same code paths, meaningless figures).
Absolute figures first, then one ``ratio <name> = <value>`` line per ratio, the four headline
ratios last.

Two models, both wrapped with LoRA r = 8 on all linear layers, 1 torch thread, batch 32 of
``rotate-2`` examples (512 of them, so DP's Poisson rate is q = 32 / 512):

- the embedded base model (``load_base_model()``);
- a ~19M-parameter ``LlamaForCausalLM`` built from a ``LlamaConfig`` with random weights
  (the embedded model's 259-token byte vocabulary, hidden 384, 8 layers, MLP 1536, 6 heads).

Every step goes through ``fedlora.core.train.train``; DP-SGD wraps it with ``fedlora.privacy.dp.dp_sgd`` as
the client does (``client/private_train.py::train_private``: AdamW, constant lr, no extra clipping).
Plain LoRA is ``train`` as the non-DP client runs it (AdamW, global-norm clipping at 1.0).
Two figures per mode:

- end to end: each mode's own batches (shuffled epochs for plain, Poisson batches for DP),
  batch assembly included. DP's batch size and width vary, so this is not the same work:
  the mean batch and width are printed next to it;
- fixed batch: both modes cycle through the same pre-collated batches of exactly 32 examples
  (same batch and sequence length), so the time is forward + backward + optimizer step only;
  for DP, per-sample gradients, clipping and noise included. This is the figure the goal
  (ratio <= 1.10) is about.

Timing runs in one fresh process per model and trainable-factor setting; plain and DP blocks
are interleaved (order alternating), a step's time is the gap between the loop's requests
for consecutive batches, one untimed warm-up block per mode precedes the timed ones, and each
figure is the median over all timed steps of that mode (entering ``dp_sgd``, once per round,
is not part of a step).

Peak memory: each (model, factors, mode) runs in its own fresh process, builds the model and
the batches, warms up with one single-example step in each mode (lazy imports, thread pools
and kernels: the same in every process), records RSS as the baseline, resets the peak
(``/proc/self/clear_refs``), runs a few fixed-batch steps (entering ``dp_sgd`` included for
DP) and reports ``VmHWM`` - baseline. Two allocator settings:

- live: ``MALLOC_MMAP_THRESHOLD_=65536``, so every large tensor is its own mapping, returned
  to the OS when freed: the peak tracks the tensors alive at once (activations, gradients,
  optimizer state, Opacus' per-sample gradients). Reproducible; the headline ratios;
- default glibc: what a client process sees, plus whatever the heap keeps after freeing,
  which grows from step to step by up to hundreds of MB and varies from run to run.

Median of several runs per cell, plain and DP interleaved.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_procmem import reset_peak, status_mb

from fedlora.core.data import Encoded, collate, encode
from fedlora.core.lora_settings import Factors, LoraSettings
from fedlora.core.model import load_base_model, wrap_lora
from fedlora.core.model_dirs import load_tokenizer
from fedlora.core.tasks import get_task
from fedlora.core.train import TrainSettings, batches, train
from fedlora.privacy.dp import DPSGDConfig, dp_sgd

BATCH = 32
NUM_EXAMPLES = 512
RANK = 8
DP = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0)
MODELS = ("embedded", "20m")
FACTORS: tuple[Factors, ...] = ("both", "B")
MODES = ("plain", "dp")


# --- the models and data -------------------------------------------------------------------


def build(kind: str, trainable: Factors) -> tuple[torch.nn.Module, list[Encoded], int, int]:
    """(LoRA-wrapped model, encoded examples, pad id, base parameter count)."""
    tokenizer = load_tokenizer()
    pad = int(tokenizer.pad_token_id)
    torch.manual_seed(0)
    if kind == "embedded":
        base: Any = load_base_model()
    else:
        from fedlora.simulations.pretrain import make_model

        base = make_model(len(tokenizer), seed=0, hidden=384, intermediate=1536, layers=8, heads=6)
    base_params = sum(p.numel() for p in base.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = wrap_lora(base, LoraSettings(rank=RANK, trainable=trainable))
    max_len = int(base.config.max_position_embeddings)
    data = encode(tokenizer, get_task("rotate-2").examples(NUM_EXAMPLES, seed=0), max_len)
    return model, data, pad, base_params


def fixed_batches(data: list[Encoded], pad: int, count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of exactly BATCH examples, collated once and shared by both modes."""
    return [collate(data[i * BATCH : (i + 1) * BATCH], pad) for i in range(count)]


class Stamped:
    """Wraps a batch stream; records when the loop asks for each batch, and the batch's shape.

    The gap between two requests is one step: fetching (and for end-to-end, assembling) the
    batch, forward, backward, optimizer step.
    """

    def __init__(self, stream: Iterator[dict[str, torch.Tensor]]) -> None:
        self.stream = stream
        self.stamps: list[float] = []
        self.shapes: list[tuple[int, int]] = []

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        self.stamps.append(time.perf_counter())
        batch = next(self.stream)
        n, width = batch["input_ids"].shape
        self.shapes.append((int(n), int(width)))
        return batch

    def step_times(self, end: float) -> list[float]:
        ends = [*self.stamps[1:], end]
        return [b - a for a, b in zip(self.stamps, ends, strict=True)]


def run_block(
    model: torch.nn.Module,
    data: list[Encoded],
    pad: int,
    mode: str,
    steps: int,
    seed: int,
    fixed: list[dict[str, torch.Tensor]] | None,
) -> Stamped:
    """``steps`` training steps in ``mode`` through ``fedlora.core.train.train``.

    ``fixed`` given: cycle through those batches; otherwise each mode's own batches.
    """
    if mode == "plain":
        own = (collate(b, pad) for b in batches(data, BATCH, seed))  # what train() builds itself
        stream = Stamped(itertools.cycle(fixed) if fixed is not None else own)
        train(model, data, TrainSettings(steps=steps, batch_size=BATCH, seed=seed), pad, batch_stream=stream)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=TrainSettings.lr)
        settings = TrainSettings(steps=steps, batch_size=BATCH, max_grad_norm=None, seed=seed)
        with dp_sgd(model, optimizer, data, lambda b: collate(b, pad), BATCH, DP, seed) as pt:
            constant = torch.optim.lr_scheduler.LambdaLR(pt.optimizer, lambda _: 1.0)
            stream = Stamped(itertools.cycle(fixed) if fixed is not None else pt.batches)
            train(pt.model, data, settings, pad, optimizer=(pt.optimizer, constant), batch_stream=stream)
    stream.stamps.append(time.perf_counter())  # end of the last step (train's own bookkeeping is negligible)
    return stream


# --- workers (fresh processes) ---------------------------------------------------------------


def time_worker(kind: str, trainable: Factors, reps: int, steps: int) -> dict[str, Any]:
    """Interleaved plain / DP blocks, end to end and on fixed batches; per-step times."""
    torch.set_num_threads(1)
    model, data, pad, base_params = build(kind, trainable)
    fixed = fixed_batches(data, pad, 4)
    lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    times: dict[str, list[float]] = {}
    block_medians: dict[str, list[float]] = {}
    shapes: dict[str, list[tuple[int, int]]] = {}
    blocks = [(m, s) for s in ("e2e", "fixed") for m in MODES]
    for mode, setting in blocks:  # warm-up: first calls, lazy imports, kernels; not timed
        run_block(model, data, pad, mode, 1, 999, fixed if setting == "fixed" else None)
    for rep in range(reps):
        order = blocks if rep % 2 == 0 else blocks[::-1]
        for mode, setting in order:
            key = f"{mode}_{setting}"
            stream = run_block(model, data, pad, mode, steps, 1000 + rep, fixed if setting == "fixed" else None)
            kept = stream.step_times(stream.stamps.pop())
            times.setdefault(key, []).extend(kept)
            block_medians.setdefault(key, []).append(statistics.median(kept))
            shapes.setdefault(key, []).extend(stream.shapes)
    return {
        "base_params": base_params,
        "lora_params": lora_params,
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "block_min_s": {k: min(v) for k, v in block_medians.items()},
        "block_max_s": {k: max(v) for k, v in block_medians.items()},
        "steps": {k: len(v) for k, v in times.items()},
        "mean_batch": {k: statistics.mean(n for n, _ in v) for k, v in shapes.items()},
        "mean_width": {k: statistics.mean(w for _, w in v) for k, v in shapes.items()},
    }


def memory_worker(kind: str, trainable: Factors, mode: str, steps: int) -> dict[str, Any]:
    """Peak RSS growth of ``steps`` fixed-batch steps in ``mode`` over the built model's RSS."""
    torch.set_num_threads(1)
    model, data, pad, _ = build(kind, trainable)
    fixed = fixed_batches(data, pad, steps)
    tiny = [collate(data[:1], pad)]
    for warm in MODES:  # identical in every process, whatever mode it measures
        run_block(model, data, pad, warm, 1, 0, tiny)
    baseline = status_mb("VmRSS")
    reset_ok = reset_peak()
    run_block(model, data, pad, mode, steps, 0, fixed)
    peak = status_mb("VmHWM")
    return {"baseline_mb": baseline, "peak_mb": peak, "growth_mb": peak - baseline, "peak_reset": reset_ok}


ALLOCATORS = {"live": {"MALLOC_MMAP_THRESHOLD_": "65536"}, "default": {}}


def spawn(*args: str, allocator: str = "default") -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | ALLOCATORS[allocator]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# --- main --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: one repetition, trainable=both only")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        what, kind, trainable, *rest = args.worker
        if what == "time":
            print(json.dumps(time_worker(kind, trainable, int(rest[0]), int(rest[1]))))
        else:
            print(json.dumps(memory_worker(kind, trainable, rest[0], int(rest[1]))))
        return

    # (repetitions, timed steps per block) per model; memory runs per cell, steps per run
    plan = {"embedded": (1, 1), "20m": (1, 1)} if args.quick else {"embedded": (6, 10), "20m": (5, 3)}
    mem_repeats, mem_steps = (1, 1) if args.quick else (2, 3)
    time_factors = FACTORS[:1] if args.quick else FACTORS
    quick = " --quick: a smoke run, meaningless figures" if args.quick else ""
    print(f"# DP-SGD overhead benchmark{quick}")
    print(
        f"LoRA r={RANK} all-linear, batch {BATCH} of rotate-2 ({NUM_EXAMPLES} examples, DP Poisson q = "
        f"{BATCH / NUM_EXAMPLES:.4f}), sigma {DP.noise_multiplier}, C {DP.max_grad_norm}; "
        f"torch {torch.__version__}, 1 thread"
    )
    print()

    timing: dict[tuple[str, str], dict[str, Any]] = {}
    for kind in MODELS:
        reps, steps = plan[kind]
        for trainable in time_factors:
            timing[(kind, trainable)] = spawn("time", kind, trainable, str(reps), str(steps))
        t = timing[(kind, "both")]
        lora = ", ".join(f"{timing[(kind, f)]['lora_params']:,} ({'B only' if f == 'B' else f})" for f in time_factors)
        print(
            f"model {kind}: {t['base_params']:,} base parameters; trainable LoRA parameters "
            f"{lora}; {reps} interleaved repetitions x {steps} timed steps per mode"
        )
    print()
    print("step time, median ms [min, max of block medians]; mean batch x width of the timed steps")
    head = f"{'model':<10}{'factors':<9}{'setting':<8}{'plain ms':>10}{'':>17}{'DP ms':>10}{'':>17}"
    print(head + f"{'DP/plain':>9}  {'plain batch':>13}  {'DP batch':>13}")
    for (kind, trainable), t in timing.items():
        for setting in ("e2e", "fixed"):
            p, d = f"plain_{setting}", f"dp_{setting}"
            cells = []
            for key in (p, d):
                med, lo, hi = (1000 * t[k][key] for k in ("median_s", "block_min_s", "block_max_s"))
                cells.append(f"{med:>10.1f}{f'[{lo:.1f}, {hi:.1f}]':>17}")
            shape = [f"{t['mean_batch'][k]:>6.1f} x {t['mean_width'][k]:<4.1f}" for k in (p, d)]
            ratio = t["median_s"][d] / t["median_s"][p]
            print(f"{kind:<10}{trainable:<9}{setting:<8}{''.join(cells)}{ratio:>9.3f}  {shape[0]:>13}  {shape[1]:>13}")
    print()

    allocators = ("live",) if args.quick else ("live", "default")
    mem_factors = FACTORS[:1] if args.quick else FACTORS
    mem_models = MODELS[:1] if args.quick else MODELS
    growth: dict[tuple[str, str, str, str], float] = {}
    for allocator in allocators:
        memory: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for kind in mem_models:
            for trainable in mem_factors:
                for rep in range(mem_repeats):
                    for mode in MODES if rep % 2 == 0 else MODES[::-1]:
                        run = spawn("memory", kind, trainable, mode, str(mem_steps), allocator=allocator)
                        memory.setdefault((kind, trainable, mode), []).append(run)
        print(
            f"peak memory ({allocator} allocator) over the warmed-up process's RSS, fresh process, "
            f"{mem_steps} fixed-batch steps, median of {mem_repeats} [min, max]"
        )
        print(f"{'model':<10}{'factors':<9}{'mode':<7}{'baseline MB':>12}{'peak MB':>9}{'growth MB':>11}  [min, max]")
        for (kind, trainable, mode), runs in memory.items():
            g = [float(r["growth_mb"]) for r in runs]
            base = statistics.median(float(r["baseline_mb"]) for r in runs)
            peak = statistics.median(float(r["peak_mb"]) for r in runs)
            growth[(allocator, kind, trainable, mode)] = statistics.median(g)
            note = "" if all(r["peak_reset"] for r in runs) else "  (peak not reset: includes start-up)"
            print(
                f"{kind:<10}{trainable:<9}{mode:<7}{base:>12.0f}{peak:>9.0f}{statistics.median(g):>11.1f}"
                f"  [{min(g):.1f}, {max(g):.1f}]{note}"
            )
        print()

    def time_ratio(kind: str, trainable: str, setting: str) -> float:
        med = timing[(kind, trainable)]["median_s"]
        return float(med[f"dp_{setting}"] / med[f"plain_{setting}"])

    def memory_ratio(kind: str, trainable: str, allocator: str = "live") -> float:
        return growth[(allocator, kind, trainable, "dp")] / growth[(allocator, kind, trainable, "plain")]

    for kind in MODELS:
        print(f"ratio dp_step_time_end_to_end_{kind} = {time_ratio(kind, 'both', 'e2e'):.3f}")
        if "B" in time_factors:
            print(f"ratio dp_step_time_end_to_end_ffa_{kind} = {time_ratio(kind, 'B', 'e2e'):.3f}")
    if "default" in allocators:
        for kind in MODELS:
            print(f"ratio dp_peak_memory_default_malloc_{kind} = {memory_ratio(kind, 'both', 'default'):.3f}")
            print(f"ratio dp_peak_memory_default_malloc_ffa_{kind} = {memory_ratio(kind, 'B', 'default'):.3f}")
    for kind in MODELS:
        if "B" in time_factors:
            print(f"ratio dp_step_time_ffa_{kind} = {time_ratio(kind, 'B', 'fixed'):.3f}")
        if "B" in mem_factors:
            print(f"ratio dp_peak_memory_ffa_{kind} = {memory_ratio(kind, 'B'):.3f}")
    for kind in MODELS:
        print(f"ratio dp_step_time_{kind} = {time_ratio(kind, 'both', 'fixed'):.3f}")
    for kind in mem_models:
        print(f"ratio dp_peak_memory_{kind} = {memory_ratio(kind, 'both'):.3f}")


if __name__ == "__main__":
    main()
