"""Aggregation benchmark: streaming memory and time per reply, and LoRA-FAIR's two solvers.

Run ``python bench/bench_aggregation.py`` (about 2 minutes on two idle cores) or ``--quick`` (a
smoke run, about half a minute: smaller adapter and LoRA-FAIR module, 10 and 100 replies, one
run per memory cell; ratios at 100 replies instead of 1000). Absolute figures first, then one
``ratio <name> = <value>`` line per ratio.

Memory is measured two ways:

- peak RSS growth, the honest process-level figure: each measurement runs in a fresh
  subprocess (torch's allocations are invisible to tracemalloc, and no run inherits another's
  heap), warms up on a tiny adapter, builds the simulated clients' starting point, records
  its RSS as the baseline, resets the peak with ``/proc/self/clear_refs`` (Linux >= 4.0) and
  aggregates; growth = ``VmHWM`` - baseline, i.e. the server's sums, the reply in flight,
  the result, and whatever glibc's heap keeps. glibc's heap makes that last part vary by a
  few tens of MB from run to run, so each cell is the median of several runs;
- state, the exact bytes of the tensors an accumulator holds after the last reply.

Replies are generated on the fly, one at a time, and dropped after ``add``; generating them
is not timed. The time per reply covers ``split_adapter`` and ``add`` (plus the error sketch
for fedavg) and the final ``result()`` spread over the replies.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_procmem import reset_peak, status_mb

from fedlora.strategies import (
    ErrorSketch,
    FactorSumAccumulator,
    ProductSumAccumulator,
    aggregation_error_from_sums,
    init_lora_A,
    lora_fair_correction_closed_form,
    lora_fair_correction_iterative,
    lora_fair_objective,
    split_adapter,
)

SKETCH_SIZE = 128  # width of the aggregation-error sketch the FedAvg-LoRA server keeps
METHODS = {
    "fedavg": "A and B running sums (float64) + aggregation-error sketch (m = 128)",
    "ffa": "B running sums (float64); A checked bit-identical and passed through",
}


# --- simulated replies -------------------------------------------------------------------


def module_names(layers: int) -> list[str]:
    """PEFT names of LoRA on q_proj and v_proj of a Llama-style model."""
    prefix = "base_model.model.model.layers"
    return [f"{prefix}.{i}.self_attn.{p}_proj" for i in range(layers) for p in ("q", "v")]


@dataclass(frozen=True)
class Simulation:
    """The round's global adapter (A0 = PEFT's init, B0 small) and a few drift directions.

    Client k's reply is A0 + a_k dA_(k mod P), B0 + b_k dB_(k+1 mod P) with varying a_k, b_k:
    fresh tensors from one fused op each, so 1000 replies take seconds, not minutes, to make.
    """

    start: dict[str, tuple[torch.Tensor, torch.Tensor]]
    drifts: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]

    @classmethod
    def make(cls, layers: int, width: int, rank: int, pool: int = 3) -> Simulation:
        g = torch.Generator().manual_seed(7)
        names = module_names(layers)
        start = {}
        for m in names:
            start[m] = (
                init_lora_A((rank, width), 0, m),
                torch.randn(width, rank, generator=g) * 1e-2,
            )
        drifts = [
            {
                m: (
                    torch.randn(rank, width, generator=g) * (0.3 / math.sqrt(width)),
                    torch.randn(width, rank, generator=g) * 1e-2,
                )
                for m in names
            }
            for _ in range(pool)
        ]
        return cls(start=start, drifts=drifts)

    def replies(self, n: int, *, shared_a: bool) -> Iterator[dict[str, torch.Tensor]]:
        """``n`` fresh fp32 replies in PEFT's flat format, one at a time.

        With ``shared_a`` (FFA-LoRA) every reply carries its own bit-identical copy of A0, as
        a deserialised message would.
        """
        pool = len(self.drifts)
        for k in range(n):
            a_coef, b_coef = math.cos(0.7 * k), math.sin(1.3 * k + 0.4)
            flat: dict[str, torch.Tensor] = {}
            for name, (a0, b0) in self.start.items():
                d_a, d_b = self.drifts[k % pool][name][0], self.drifts[(k + 1) % pool][name][1]
                a = a0.clone() if shared_a else torch.add(a0, d_a, alpha=a_coef)
                flat[f"{name}.lora_A.weight"] = a
                flat[f"{name}.lora_B.weight"] = torch.add(b0, d_b, alpha=b_coef)
            yield flat


# --- one measurement, in a fresh process -------------------------------------------------


def tensor_mb(*objs: object) -> float:
    """Bytes held in the tensors of the given objects' attributes (dicts of tensors included)."""
    total = 0
    for obj in objs:
        if obj is None:
            continue
        for value in vars(obj).values():
            items = value.values() if isinstance(value, dict) else [value]
            total += sum(v.numel() * v.element_size() for v in items if isinstance(v, torch.Tensor))
    return total / 2**20


def worker(
    method: str,
    n: int,
    layers: int,
    width: int,
    rank: int,
) -> dict[str, float | bool | str]:
    """Aggregate ``n`` simulated replies with ``method``; report time and memory."""
    torch.set_num_threads(2)
    scaling, weight = 2.0, 100.0
    shared_a = method == "ffa"

    def run(sim: Simulation, count: int) -> tuple[float, float, float]:
        acc = FactorSumAccumulator("B" if shared_a else "both")
        sketch = ErrorSketch(SKETCH_SIZE) if method == "fedavg" else None
        busy = 0.0
        for flat in sim.replies(count, shared_a=shared_a):
            start = time.perf_counter()
            modules = split_adapter(flat, scaling)
            acc.add(modules, weight)
            if sketch is not None:
                sketch.add(modules, weight)
            busy += time.perf_counter() - start
            del flat, modules  # the server keeps nothing of a reply
        state = tensor_mb(acc, sketch)
        start = time.perf_counter()
        result = acc.result()
        error = sketch.estimate(result).overall if sketch is not None else math.nan
        busy += time.perf_counter() - start
        return busy, state, error

    run(Simulation.make(1, 64, rank), 2)  # warm-up: kernels and threads, without growing the heap
    sim = Simulation.make(layers, width, rank)  # the simulation's memory, not the server's
    baseline = status_mb("VmRSS")
    reset_ok = reset_peak()
    busy, state, error = run(sim, n)
    peak = status_mb("VmHWM")
    return {
        "aggregate_s": busy,
        "state_mb": state,
        "baseline_mb": baseline,
        "peak_mb": peak,
        "growth_mb": peak - baseline,
        "peak_reset": reset_ok,
        "error_estimate": error,
    }


def measure(
    method: str,
    n: int,
    layers: int,
    width: int,
    rank: int,
) -> dict[str, float | bool | str]:
    cmd = [sys.executable, __file__, "--worker", method, str(n), str(layers), str(width), str(rank)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result: dict[str, float | bool | str] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# --- the error sketch against the exact error ---------------------------------------------


def sketch_accuracy(modules: int, width: int, rank: int, clients: int) -> tuple[float, float]:
    """Exact FedAvg-LoRA aggregation error (dense T) and the sketch's estimate, same replies."""
    sim = Simulation.make(modules // 2, width, rank)
    exact_acc, sums, sketch = (
        ProductSumAccumulator(),
        FactorSumAccumulator(),
        ErrorSketch(SKETCH_SIZE),
    )
    for k, flat in enumerate(sim.replies(clients, shared_a=False)):
        reply = split_adapter(flat, 2.0)
        for acc in (exact_acc, sums, sketch):
            acc.add(reply, 10.0 + k)
    return aggregation_error_from_sums(exact_acc.result()).overall, sketch.estimate(
        sums.result(),
    ).overall


# --- LoRA-FAIR ---------------------------------------------------------------------------


def lora_fair_bench(width: int, rank: int, clients: int, steps: int) -> dict[str, float]:
    """Closed form vs the paper's iterative solve on one d x d module, from float64 sums."""
    g = torch.Generator().manual_seed(1)
    a0 = init_lora_A((rank, width), 0, "bench.q_proj")
    b0 = torch.randn(width, rank, generator=g) * 1e-2
    acc = ProductSumAccumulator()
    for _ in range(clients):  # clients drift apart from a common start, as after local training
        a = a0 + torch.randn(rank, width, generator=g) * (0.5 / math.sqrt(width))
        b = b0 + torch.randn(width, rank, generator=g) * 1e-2
        n_k = 100.0 + float(torch.randint(0, 100, (1,), generator=g))
        acc.add(split_adapter({"m.lora_A.weight": a, "m.lora_B.weight": b}, 2.0), n_k)
    sums = acc.result()["m"]
    target, a_bar, b_bar, lam = sums.T, sums.A_bar, sums.B_bar, 0.01

    closed_times = []
    for _ in range(9):
        start = time.perf_counter()
        db_closed = lora_fair_correction_closed_form(target, a_bar, b_bar, lam)
        closed_times.append(time.perf_counter() - start)
    start = time.perf_counter()
    db_iter = lora_fair_correction_iterative(
        target,
        a_bar,
        b_bar,
        lam,
        objective="cosine",
        steps=steps,
        lr=0.01,
    )
    iter_time = time.perf_counter() - start

    t_sq = float((target * target).sum())
    out = {"closed_s": statistics.median(closed_times), "iterative_s": iter_time}
    for label, db in (("zero", torch.zeros_like(b_bar)), ("closed", db_closed), ("iter", db_iter)):
        out[f"cos_{label}"] = float(lora_fair_objective(target, a_bar, b_bar, db, lam, "cosine"))
        sq = float(lora_fair_objective(target, a_bar, b_bar, db, lam, "squared"))
        out[f"sq_{label}"] = sq / t_sq
    return out


# --- main --------------------------------------------------------------------------------


def print_cell(method: str, n: int, runs: list[dict[str, float | bool | str]]) -> dict[str, float]:
    """One table row: medians over the runs, and the spread of the memory growth."""
    keys = ("aggregate_s", "state_mb", "baseline_mb", "peak_mb", "growth_mb")
    med = {key: statistics.median(float(r[key]) for r in runs) for key in keys}
    growths = [float(r["growth_mb"]) for r in runs]
    note = "" if all(r["peak_reset"] for r in runs) else "  (peak not reset: includes start-up)"
    row = (
        f"{method:<8}{n:>8}{1000 * med['aggregate_s'] / n:>10.2f}{med['aggregate_s']:>9.2f}",
        f"{med['state_mb']:>10.1f}{med['baseline_mb']:>13.0f}{med['peak_mb']:>9.0f}",
        f"{med['growth_mb']:>11.0f}  [{min(growths):.0f}, {max(growths):.0f}]{note}",
    )
    print("".join(row), flush=True)
    return med


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: smaller sizes, one run per cell")
    parser.add_argument("--repeats", type=int, default=None, help="runs per memory cell (median; default 3, quick 1)")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, n, layers, width, rank = args.worker
        print(json.dumps(worker(method, int(n), int(layers), int(width), int(rank))))
        return

    torch.set_num_threads(2)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    sizes = (10, 100) if args.quick else (10, 100, 1000)
    layers, width, rank = (8, 1024, 16) if args.quick else (32, 4096, 16)
    fair_width, fair_steps = (1024, 200) if args.quick else (4096, 1000)
    reply_mb = 2 * len(module_names(layers)) * rank * width * 4 / 2**20
    quick = " --quick: reduced sizes, memory growth near RSS noise" if args.quick else ""
    print(f"# aggregation benchmark{quick}")
    print(
        f"adapter: rank {rank} on q_proj, v_proj of {layers} layers, width {width}, fp32: "
        f"{2 * layers} modules, {reply_mb:.1f} MB per reply; torch {torch.__version__}, 2 threads"
    )
    for method, what in METHODS.items():
        print(f"  {method}: {what}")
    print(f"memory: peak RSS over the baseline, fresh process, median of {args.repeats} [min, max]")
    print()
    header = ("method", "replies", "ms/reply", "total s", "state MB", "baseline MB", "peak MB")
    widths = (8, 8, 10, 9, 10, 13, 9)
    cols = [f"{h:>{w}}" for h, w in zip(header, widths, strict=True)]
    print(f"{header[0]:<{widths[0]}}" + "".join(cols[1:]) + "  growth MB  [min, max]")
    cells: dict[tuple[str, int], dict[str, float]] = {}
    for method in METHODS:
        for n in sizes:
            runs = [measure(method, n, layers, width, rank) for _ in range(args.repeats)]
            cells[(method, n)] = print_cell(method, n, runs)
    live = 4 * reply_mb  # float64 sums of A and B, one reply in flight, the fp32 result
    print(
        f"live tensors for fedavg at most: float64 sums {2 * reply_mb:.0f} MB + reply in flight "
        f"{reply_mb:.0f} MB + fp32 result {reply_mb:.0f} MB = {live:.0f} MB"
    )
    exact, estimate = sketch_accuracy(16, 1024, rank, 10)
    print(
        f"error sketch vs exact (16 modules 1024 x 1024, rank {rank}, 10 drifting clients): "
        f"exact {exact:.5f}, sketch {estimate:.5f} ({100 * (estimate / exact - 1):+.1f}%)"
    )
    print()

    fair = lora_fair_bench(fair_width, rank, clients=6, steps=fair_steps)
    size = f"{fair_width} x {fair_width}"
    print(f"LoRA-FAIR: one {size} module, rank {rank}, 6 clients, lambda 0.01, float64 sums")
    closed_ms, iter_s = 1000 * fair["closed_s"], fair["iterative_s"]
    print(f"  closed form (squared-error variant, r x r solve): {closed_ms:.1f} ms, median of 9")
    print(
        f"  iterative (paper's cosine objective, {fair_steps} SGD steps, lr 0.01): {iter_s:.2f} s",
    )
    print(f"  {'objective reached':<36}{'dB = 0':>10}{'closed':>10}{'iterative':>10}")
    for label, key in (
        ("1 - mean column cos + lam |dB|^2", "cos"),
        ("sq. error + lam |dB|^2, / |T|^2", "sq"),
    ):
        values = [fair[f"{key}_{x}"] for x in ("zero", "closed", "iter")]
        print(f"  {label:<36}" + "".join(f"{v:>10.6f}" for v in values))
    print()

    most, fewest = sizes[-1], sizes[0]

    def ratio(method: str, key: str) -> float:
        return cells[(method, most)][key] / cells[(method, fewest)][key]

    cos_ratio = fair["cos_closed"] / fair["cos_iter"]
    print(f"ratio fedavg_state_{most}_vs_{fewest} = {ratio('fedavg', 'state_mb'):.3f}")
    print(f"ratio ffa_memory_{most}_vs_{fewest} = {ratio('ffa', 'growth_mb'):.3f}")
    print(f"ratio fedavg_memory_{most}_vs_{fewest} = {ratio('fedavg', 'growth_mb'):.3f}")
    print(f"ratio error_sketch_vs_exact = {estimate / exact:.4f}")
    print(f"ratio lora_fair_cosine_objective_closed_vs_iterative = {cos_ratio:.4f}")
    print(f"ratio lora_fair_closed_vs_iterative_speed = {iter_s / fair['closed_s']:.1f}")


if __name__ == "__main__":
    main()
