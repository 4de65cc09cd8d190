"""Model kinds benchmark: DP-SGD's step time per kind, ``fl-sim``'s round time per kind, worker
memory against the number of virtual clients, and the memory of one DP-SGD step of a causal LM
with a 152k-token vocabulary before and after logits-on-targets and physical batches.

Run ``python bench/bench_kinds.py`` (about 10 minutes on two idle cores) or ``--quick`` (a smoke
run, well under a minute: one timed step per mode, no simulations, part 4 on 64-token records;
same code paths, meaningless figures). Absolute figures first, then one
``ratio <name> = <value>`` line per ratio.

1. Step time, DP-SGD over plain LoRA, per kind: the embedded byte Llama (causal-lm), MiniLM
   (seq-cls, its pooler and head trained in full) and the shipped tiny ViT (image-cls), each
   built by ``fedlora.core.run_model.load_run_model`` as a client builds it (LoRA r = 8 on all
   linear layers), batch 32 of the kind's default tasks, 1 torch thread, one fresh process per
   kind. Plain and DP cycle through the same pre-collated batches of exactly 32 examples and
   run through ``fedlora.core.train.train`` (DP wrapped by ``fedlora.privacy.dp.dp_sgd`` with
   ``--engine``, default Opacus' as a run's, as ``client/private_train.py`` does; the fused
   engine falls back to Opacus' for the classifiers, whose heads train in full); blocks of the two modes
   interleaved (order alternating), one untimed warm-up block each, a step's time the gap
   between the loop's requests for consecutive batches, the figure the median over all timed
   steps. Goal: ``dp_over_plain_<kind>`` <= 1.10 for every kind.
2. Round wall time of a simulation per kind: 8 virtual clients, all sampled, 3 rounds, the
   workload of ``bench_sim_scale.py`` (5 local steps of batch 16, 32 training examples per
   client, no DP), Flower's simulation runtime on Ray limited to 2 CPUs, 1 CPU per client;
   s/round is the median of rounds 2..3 from Flower's round log lines (about 0.7 s of jitter
   per stamp, see ``bench_sim_scale.py``). Not in ``--quick``.
3. Worker memory against clients: the same run (causal-lm) at 4 and at 32 virtual clients on
   the same 2 workers (10 sampled per round); the peak over the run of the summed PSS of Ray's
   worker processes (the actors running the ClientApps and the idle workers Ray keeps ready;
   PSS, so shared pages count once), sampled every 0.2 s with ``bench_sim_scale.py``'s process
   helpers; the whole run's peak besides. A worker keeps one model and the client it runs, so
   more clients must not cost memory. Goal:
   ``worker_memory_32_over_4_clients`` <= 1.1. Not in ``--quick``.
4. Peak memory of one DP-SGD step (``--engine``, AdamW, LoRA r = 8 on all linear layers, 1
   thread) on a Qwen2-shaped causal LM built here with random weights: vocabulary 151,936,
   hidden 128, 4 layers, 4 heads (2 key/value heads), MLP 512, tied embeddings (20.4M
   parameters, 19.4M of them the embedding); a logical batch of 32 records of 400 random
   tokens, the last 64 the completion. Before: every position's logits (a forward without
   ``logits_to_keep``), the whole batch at once, as the code was; after: logits only where a
   completion token needs them, physical batches of 4 (and, to show each change's share,
   logits on the completion with the whole batch at once). Each in a fresh process: the peak
   RSS of the whole process (``VmHWM``, the model and the interpreter included) over building
   the batch and running the step, default allocator. Before does not fit on a small machine (each
   (32, 400, 151936) float32 tensor is 7.8 GB): unless the free memory allows the real run, it
   is measured at logical batches 1 and 2 and extrapolated linearly to 32 (the logits and
   their gradients are linear in the batch), and says so. Goal: after fits in 6 GB.

The last line is the headline: ``memory_after_over_6gb``, part 4's peak after the change over
the 6 GB a client should fit in (goal <= 1): memory that scales with real models is what this
benchmark is about; ``memory_after_over_before`` is printed just before it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from bench_procmem import reset_peak, status_mb  # noqa: E402

from fedlora.core.data import Encoded, Item, batch_size, collate  # noqa: E402
from fedlora.privacy.engines import ENGINES  # noqa: E402

KINDS = ("causal-lm", "seq-cls", "image-cls")
BATCH = 32
RANK = 8
NOISE_MULTIPLIER, MAX_GRAD_NORM = 1.0, 1.0  # the defaults of dp.*
MODES = ("plain", "dp")
BUDGET_GB = 6.0


# --- shared: one training block on fixed batches -----------------------------------------------------


class Stamped:
    """Wraps a batch stream; records when the training loop asks for each batch (the gap between
    two requests is one step: forward, backward, optimizer step)."""

    def __init__(self, stream: Iterator[dict[str, torch.Tensor]]) -> None:
        self.stream = stream
        self.stamps: list[float] = []

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        self.stamps.append(time.perf_counter())
        return next(self.stream)

    def step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]


def cycle(batches: list[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        yield from batches


def run_block(
    model: torch.nn.Module,
    data: list[Item],
    pad: int,
    mode: str,
    steps: int,
    fixed: list[dict[str, torch.Tensor]],
    engine: str,
    physical: int = 0,
) -> Stamped:
    """``steps`` training steps in ``mode`` on ``fixed`` batches through ``fedlora.core.train.train``:
    plain as the non-DP client trains (AdamW, global-norm clipping at 1), DP as
    ``client/private_train.py`` (``dp_sgd``'s optimizer and physical batches, no extra clipping)."""
    # imported here: the main process only starts workers, and these pull in transformers and Opacus
    from fedlora.core.train import TrainSettings, train
    from fedlora.privacy.dp import DPSGDConfig, dp_sgd

    dp = DPSGDConfig(NOISE_MULTIPLIER, MAX_GRAD_NORM, engine)
    stream = Stamped(cycle(fixed))
    logical = batch_size(fixed[0])
    if mode == "plain":
        settings = TrainSettings(steps=steps, batch_size=logical, physical_batch_size=physical)
        train(model, data, settings, pad, batch_stream=stream)
    else:
        settings = TrainSettings(steps=steps, batch_size=logical, physical_batch_size=physical, max_grad_norm=None)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=settings.lr)
        with dp_sgd(model, optimizer, data, lambda b: collate(b, pad), logical, dp, seed=0) as pt:
            constant = torch.optim.lr_scheduler.LambdaLR(pt.optimizer, lambda _: 1.0)
            train(
                pt.model,
                data,
                settings,
                pad,
                optimizer=(pt.optimizer, constant),
                batch_stream=stream,
                accumulation=pt.accumulation,
            )
    stream.stamps.append(time.perf_counter())  # the end of the last step
    return stream


# --- part 1: step time per kind (worker process) ------------------------------------------------------


def build_kind(kind: str, examples: int) -> tuple[torch.nn.Module, list[Item], int]:
    """The kind's default model with LoRA as a client builds it, and client 0's training items."""
    from fedlora.core.client_data import client_examples
    from fedlora.core.config import FederationConfig, ModelSection
    from fedlora.core.lora_settings import LoraSettings
    from fedlora.core.run_model import load_run_model

    cfg = FederationConfig(model=ModelSection(kind=kind, device="cpu"), num_clients=4, num_train=examples)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_model = load_run_model(cfg, LoraSettings(rank=RANK))
    items = run_model.encode(client_examples(cfg, 0)[0]).items
    return run_model.model, items, run_model.pad_id


def time_worker(kinds: list[str], reps: int, steps: int, engine: str) -> dict[str, dict[str, Any]]:
    """Each kind's step times (a fresh process per kind, except in ``--quick``)."""
    torch.set_num_threads(1)
    return {kind: time_kind(kind, reps, steps, engine) for kind in kinds}


def time_kind(kind: str, reps: int, steps: int, engine: str) -> dict[str, Any]:
    model, items, pad = build_kind(kind, 4 * BATCH)
    fixed = [collate(items[i * BATCH : (i + 1) * BATCH], pad) for i in range(2)]
    for mode in MODES:  # warm-up: lazy imports, first calls; not timed
        run_block(model, items, pad, mode, 1, fixed, engine)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for rep in range(reps):
        for mode in MODES if rep % 2 == 0 else MODES[::-1]:
            times[mode].extend(run_block(model, items, pad, mode, steps, fixed, engine).step_times())
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "shape": list(fixed[0]["input_ids" if "input_ids" in fixed[0] else "pixel_values"].shape),
        "median_s": {m: statistics.median(t) for m, t in times.items()},
        "steps": {m: len(t) for m, t in times.items()},
    }


# --- part 4: one DP step of a 152k-vocabulary LM (worker process) ---------------------------------------


VOCAB = 151936


class FullLogits(torch.nn.Module):
    """The code before the change: a causal LM called without ``logits_to_keep``, so
    ``fedlora.core.data.forward`` gets (and upcasts) every position's logits."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def qwen2_shaped(seed: int = 0) -> PreTrainedModel:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def random_records(count: int, length: int, completion: int, seed: int) -> list[Encoded]:
    """Records of ``length`` random token ids whose last ``completion`` are the target."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(2, VOCAB, (length,), generator=g).tolist()
        out.append(Encoded(ids, [-100] * (length - completion) + ids[length - completion :]))
    return out


def memory_worker(
    variant: str, engine: str, length: int, completion: int, logical: int, physical: int
) -> dict[str, Any]:
    """Peak RSS of one DP-SGD step on the 152k-vocabulary model: ``before`` (every position's
    logits, the whole batch) or else logits on targets, in physical batches of ``physical``
    (0: the whole batch)."""
    torch.set_num_threads(1)
    import fedlora.privacy.dp  # noqa: F401  (Opacus, loaded before the baseline is taken)
    from fedlora.core.lora_settings import LoraSettings
    from fedlora.core.model import wrap_lora

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model: torch.nn.Module = wrap_lora(qwen2_shaped(), LoraSettings(rank=RANK))
    params = sum(p.numel() for p in model.parameters())
    if variant == "before":
        model, physical = FullLogits(model), 0
    data: list[Item] = list(random_records(4 * logical, length, completion, seed=1))
    baseline = status_mb("VmRSS")
    reset_ok = reset_peak()
    fixed = [collate(data[:logical], 0)]
    stream = run_block(model, data, 0, "dp", 1, fixed, engine, physical)
    return {
        "params": params,
        "baseline_mb": baseline,
        "peak_mb": status_mb("VmHWM"),
        "peak_reset": reset_ok,
        "step_s": stream.stamps[-1] - stream.stamps[0],
    }


def available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


# --- parts 2 and 3: simulations -------------------------------------------------------------------


@dataclasses.dataclass
class SimResult:
    kind: str
    clients: int
    status: str
    s_per_round: float
    total_s: float
    worker_peak_mb: float
    run_peak_mb: float
    workers: int


class RunMemory:
    """Every ~0.2 s, the summed PSS of the run's processes and of its Ray workers (the processes
    that run the ClientApps: actors, and idle workers Ray keeps ready); keeps both peaks and the
    most workers seen at once."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.run_peak_mb = 0.0
        self.worker_peak_mb = 0.0
        self.workers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RunMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        from bench_sim_scale import SAMPLE_EVERY, kind_of, process_mb, split_pids

        while not self._stop.is_set():
            tagged, _ = split_pids(self.tag)
            sizes = {pid: mb for pid in tagged if (mb := process_mb(pid)) is not None}
            workers = [mb for pid, mb in sizes.items() if kind_of(pid) == "ray-workers"]
            self.run_peak_mb = max(self.run_peak_mb, sum(sizes.values()))
            self.worker_peak_mb = max(self.worker_peak_mb, sum(workers))
            self.workers = max(self.workers, len(workers))
            self._stop.wait(SAMPLE_EVERY)


def simulate(kind: str, clients: int, rounds: int, tmp: Path) -> SimResult:
    """One run of our apps (``bench_sim_scale.ours_request``: its workload, no DP) of ``kind`` on
    Ray limited to 2 CPUs, 1 per client."""
    import bench_sim_scale as sim

    from fedlora.core.flower_runner import run_flower_app

    tag = uuid.uuid4().hex
    workdir = tmp / f"{kind}-{clients}"
    extra = {"model.kind": kind, "tasks": ""}  # empty: the kind's default tasks
    request = dataclasses.replace(sim.ours_request(clients, rounds, workdir, tmp, tag, extra), ray_num_cpus=2)
    clock = sim.RoundClock()
    print(f"# simulating {kind} with {clients} clients ...", flush=True)
    with RunMemory(tag) as memory:
        try:
            outcome = run_flower_app(request, on_log_line=clock)
            status, total = outcome.status, outcome.seconds
            detail = "" if outcome.completed else outcome.status_details
        except Exception as exc:  # a broken app or runner: reported, the other parts still run
            status, total, detail = "error", float("nan"), f"{type(exc).__name__}: {exc}"
    rounds_s = clock.round_seconds() if status == "finished:completed" else {}
    later = [s for k, s in rounds_s.items() if k >= 2] or list(rounds_s.values())
    result = SimResult(
        kind,
        clients,
        status,
        statistics.median(later) if later else float("nan"),
        total,
        memory.worker_peak_mb,
        memory.run_peak_mb,
        memory.workers,
    )
    rounds_text = ", ".join(f"{k}: {v:.1f}" for k, v in sorted(rounds_s.items()))
    print(
        f"#   {status}: {total:.1f} s, rounds [{rounds_text}] s, worker peak {memory.worker_peak_mb:.0f} MB", flush=True
    )
    if detail:
        print("#   " + detail[:2000].replace("\n", "\n#   "), flush=True)
        print("#   last log lines:\n" + "\n".join(f"#     {line}" for line in clock.tail[-30:]), flush=True)
    return result


# --- main ---------------------------------------------------------------------------------------------


def spawn(*args: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, no simulations")
    parser.add_argument(
        "--engine", choices=list(ENGINES), default="opacus", help="DP-SGD engine (default opacus, the run default)"
    )
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        what, *rest = args.worker
        if what == "time":
            print(json.dumps(time_worker(rest[0].split(","), int(rest[1]), int(rest[2]), rest[3])))
        else:
            print(json.dumps(memory_worker(rest[0], rest[1], *(int(v) for v in rest[2:]))))
        return

    quick = args.quick
    reps, steps = (1, 1) if quick else (5, 4)
    length, completion, logical, physical = (64, 16, 8, 2) if quick else (400, 64, BATCH, 4)
    print(f"# Model kinds benchmark{' --quick: a smoke run, meaningless figures' if quick else ''}")
    print(f"torch {torch.__version__}, 1 thread per worker process, {os.cpu_count()} CPUs on this machine")
    print()

    print(f"1. step time, batch {BATCH}, LoRA r={RANK}, DP sigma {NOISE_MULTIPLIER} C {MAX_GRAD_NORM}")
    print(f"   engine {args.engine}; median of {reps} interleaved blocks x {steps} steps per mode")
    head = f"{'kind':<11}{'parameters':>12}{'trainable':>11}  {'batch shape':<18}"
    print(f"{head}{'plain ms':>9}{'DP ms':>9}{'DP/plain':>9}")
    timing: dict[str, dict[str, Any]] = {}
    for group in [KINDS] if quick else [(kind,) for kind in KINDS]:  # --quick: one process, fewer start-ups
        timing |= spawn("time", ",".join(group), str(reps), str(steps), args.engine)
    for kind in KINDS:
        t = timing[kind]
        med = t["median_s"]
        print(
            f"{kind:<11}{t['params']:>12,}{t['trainable']:>11,}  {'x'.join(map(str, t['shape'])):<18}"
            f"{1000 * med['plain']:>9.1f}{1000 * med['dp']:>9.1f}{med['dp'] / med['plain']:>9.3f}"
        )
    print()

    sims: dict[tuple[str, int], SimResult] = {}
    if quick:
        print("2./3. simulations: skipped in --quick")
    else:
        tmp = Path(tempfile.mkdtemp(prefix="bench_kinds_"))
        for kind in KINDS:
            sims[kind, 8] = simulate(kind, 8, 3, tmp)
        for clients in (4, 32):
            sims["causal-lm", clients] = simulate("causal-lm", clients, 3, tmp)
        print()
        print("2. round wall time, 8 clients, 3 rounds, no DP, Ray on 2 CPUs (s/round: median of rounds 2..3)")
        print(f"{'kind':<11}{'s/round':>9}{'total s':>9}  status")
        for kind in KINDS:
            r = sims[kind, 8]
            print(f"{kind:<11}{r.s_per_round:>9.2f}{r.total_s:>9.1f}  {r.status}")
        print()
        print("3. worker memory (summed PSS of Ray's workers, peak over the run), causal-lm, 2 workers")
        print(f"{'clients':>7}{'worker MB':>11}{'workers':>9}{'whole run MB':>14}  status")
        for clients in (4, 8, 32):
            r = sims["causal-lm", clients]
            print(f"{clients:>7}{r.worker_peak_mb:>11.0f}{r.workers:>9}{r.run_peak_mb:>14.0f}  {r.status}")
        if all(r.status == "finished:completed" for r in sims.values()):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"# run directories and logs kept in {tmp}")
        print()

    shape = f"{logical} records x {length} tokens ({completion} completion)"
    print(f"4. one DP-SGD step, vocabulary {VOCAB:,}, {shape}: peak RSS of a fresh process")
    after = spawn("memory", "after", args.engine, str(length), str(completion), str(logical), str(physical))
    before_note = "measured"
    need = 4 * logical * length * VOCAB * 4 / 2**30  # ~four (N, T, V) float32 tensors alive at once
    if quick or available_gb() > 1.5 * need:
        before = spawn("memory", "before", args.engine, str(length), str(completion), str(logical), "0")
        before_gb = before["peak_mb"] / 1024
    else:
        small = {b: spawn("memory", "before", args.engine, str(length), str(completion), str(b), "0") for b in (1, 2)}
        per_example = small[2]["peak_mb"] - small[1]["peak_mb"]
        before_gb = (small[1]["peak_mb"] + per_example * (logical - 1)) / 1024
        before = small[2]
        before_note = (
            f"extrapolated from logical batches 1 ({small[1]['peak_mb'] / 1024:.2f} GB) and 2 "
            f"({small[2]['peak_mb'] / 1024:.2f} GB): {per_example / 1024:.2f} GB per example; "
            f"{available_gb():.1f} GB free here"
        )
    after_gb = after["peak_mb"] / 1024
    print(f"   model: {after['params']:,} parameters (Qwen2-shaped, tied embeddings); process RSS before the step")
    print(f"   {after['baseline_mb'] / 1024:.2f} GB")
    print(f"   before (every position's logits, whole batch of {logical}): {before_gb:.2f} GB ({before_note})")
    if not quick:  # the two changes apart: logits on targets alone
        targets = spawn("memory", "targets", args.engine, str(length), str(completion), str(logical), "0")
        print(
            f"   logits on completion tokens, whole batch of {logical}: {targets['peak_mb'] / 1024:.2f} GB, "
            f"step {targets['step_s']:.1f} s"
        )
    print(
        f"   after (logits on completion tokens, physical batches of {physical}): {after_gb:.2f} GB, "
        f"step {after['step_s']:.1f} s"
    )
    if not (after["peak_reset"] and before["peak_reset"]):
        print("   (peak not reset: the figures include start-up)")
    print()

    for kind in KINDS:
        med = timing[kind]["median_s"]
        print(f"ratio dp_over_plain_{kind} = {med['dp'] / med['plain']:.3f}")
    if sims:
        small_run, large_run = sims["causal-lm", 4], sims["causal-lm", 32]
        ok = small_run.worker_peak_mb > 0 and large_run.worker_peak_mb > 0
        ratio = large_run.worker_peak_mb / small_run.worker_peak_mb if ok else float("nan")
        print(f"ratio worker_memory_32_over_4_clients = {ratio:.3f}")
    print(f"ratio memory_after_over_before = {after_gb / before_gb:.3f}")
    print(f"ratio memory_after_over_6gb = {after_gb / BUDGET_GB:.3f}")


if __name__ == "__main__":
    main()
