"""Learning-rate sweep: every strategy at every rate of its grid, as a real federated run.

Each cell is one run of our real Flower server and client apps (``fedlora.server.app:app``,
``fedlora.client.app:app``) on a private SuperLink with Ray simulation, through
:func:`fedlora.core.flower_runner.run_flower_app`; the numbers come from the run's own
``metrics.jsonl``. This is the sweep behind the per-strategy defaults (``defaults =
AlgorithmDefaults(...)`` in each method's module in ``strategies/``): frozen-factor methods (FFA-LoRA, FedSVD,
RoLoRA's half-rounds) move only one factor, so their grid starts at plain LoRA's rate and
goes 30x higher.

Run ``python bench/bench_lr_sweep.py`` (24 runs, about 30 minutes on two shared cores) or
``--quick`` (FFA-LoRA at plain LoRA's rate only, 2 clients, 2 rounds of 2 steps on 32
examples: a smoke test of the machinery, about a minute; its report goes to a temporary
directory unless ``--outdir`` is given). Results go
to ``--outdir`` (default ``bench/results``) as ``lr_sweep.md`` and ``lr_sweep.csv``; the
script prints one progress line per run, then ``best-lr <strategy> = <lr>`` per strategy and
``ratio ffa_best_over_ffa_at_lora_lr = <value>``.

The best rate of a strategy is the one with the highest final-round mean exact match
(averaged over ``--seeds``); ties go to the higher best-round exact match, then to the lower
final training loss. The baseline row is the untrained global adapter (B = 0, so the base
model itself) evaluated in-process on the same clients' test splits: Flower's federated
evaluation only starts after round 1.

LoRA-FAIR's server correction is an iterative solve (``--lora-fair-steps``, default 200
instead of the app's 1000) and dominates its runs' time; it is slow, not broken.
Exact-match numbers are deterministic per seed for the same code; wall times depend on what
else the machine is doing.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedlora.core.config import DEFAULT_RUN_CONFIG, FederationConfig
from fedlora.core.flower_runner import FEDLORA_COMPONENTS, FlowerRunError, FlowerRunRequest, run_flower_app
from fedlora.core.run_dir import RunDir
from fedlora.simulations.simulate import local_ray_cpus
from fedlora.strategies.registry import STRATEGIES

PLAIN_GRID = (1e-3, 3e-3, 1e-2)
FROZEN_GRID = (3e-3, 1e-2, 3e-2, 1e-1)
#: frozen-factor methods train one factor at a time and get the higher grid
FROZEN_FACTOR = ("ffa-lora", "fedsvd", "rolora")
STRATEGY_ORDER = ("fedavg-lora", "lora-fair", "fedex-lora", "flexlora", "ffa-lora", "fedsvd", "rolora")
LORA_LR = 3e-3  # plain LoRA's rate; FFA-LoRA's grid includes it on purpose
BENCH = Path(__file__).resolve().parent
EXTRA_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def default_grid(strategy: str) -> tuple[float, ...]:
    return FROZEN_GRID if strategy in FROZEN_FACTOR else PLAIN_GRID


@dataclass(frozen=True)
class Settings:
    """Everything shared by the runs of one sweep (CLI-overridable)."""

    num_clients: int = 4
    tasks: str = "adddigit-4,rotate-2,swap,sort-desc"
    tagged: bool = True
    num_rounds: int = 6
    local_steps: int = 10
    num_train: int = 512
    num_test: int = 64
    lora_fair_steps: int = 200
    flexlora_ranks: str = "4,8"
    timeout: float = 1800.0

    def overrides(self, strategy: str, lr: float, seed: int, run_dir: Path) -> dict[str, bool | int | float | str]:
        """The run config of one cell; lora-alpha stays 0 (the strategy's default, 16 for all)."""
        return {
            "strategy": strategy,
            "lr": lr,
            "seed": seed,
            "num-rounds": self.num_rounds,
            "num-clients": self.num_clients,
            "local-steps": self.local_steps,
            "tasks": self.tasks,
            "tagged": self.tagged,
            "num-train": self.num_train,
            "num-test": self.num_test,
            "lora-fair-steps": self.lora_fair_steps,
            "flexlora-ranks": self.flexlora_ranks,
            "run-dir": str(run_dir),
        }


@dataclass
class RunResult:
    strategy: str
    lr: float
    seed: int
    status: str
    final_em: float = math.nan
    final_em_min: float = math.nan
    final_em_max: float = math.nan
    best_em: float = math.nan
    best_round: int = 0
    final_train_loss: float = math.nan
    final_eval_loss: float = math.nan
    rounds: int = 0
    seconds: float = math.nan
    em_per_round: list[float] = field(default_factory=list)
    em_per_task: dict[str, float] = field(default_factory=dict)  # final round, by the client's task
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed" and self.rounds > 0


# --------------------------------------------------------------------------- runs


def read_metrics(run_dir: Path, result: RunResult, tasks: Sequence[str]) -> None:
    """Fill ``result`` from the run's metrics.jsonl (one JSON line per round)."""
    run = RunDir(run_dir)
    if not run.holds_run():
        result.error = result.error or f"no {run.metrics_path}"
        return
    rows = [r for r in run.rows() if "evaluate" in r and "exact-match" in r["evaluate"]]
    if not rows:
        result.error = result.error or "metrics.jsonl has no evaluated round"
        return
    last = rows[-1]
    if run.config_path.is_file():  # the rate the server actually used, after its own defaults
        used = float(run.config().get("lr", math.nan))
        if not math.isclose(used, result.lr, rel_tol=1e-9):
            result.error = result.error or f"the server used lr {used}, not {result.lr}"
    result.rounds = int(last["round"])
    result.em_per_round = [float(r["evaluate"]["exact-match"]) for r in rows]
    result.final_em = result.em_per_round[-1]
    result.final_em_min = float(last["evaluate"].get("exact-match-min", math.nan))
    result.final_em_max = float(last["evaluate"].get("exact-match-max", math.nan))
    result.final_eval_loss = float(last["evaluate"].get("eval-loss", math.nan))
    best = max(range(len(rows)), key=lambda i: (result.em_per_round[i], -i))  # earliest round on ties
    result.best_em, result.best_round = result.em_per_round[best], int(rows[best]["round"])
    result.final_train_loss = float(last.get("train", {}).get("train-loss", math.nan))
    for client in last.get("per-client", {}).values():
        if "partition-id" in client and "exact-match" in client:
            task = tasks[int(client["partition-id"]) % len(tasks)]
            result.em_per_task[task] = float(client["exact-match"])


def run_one(settings: Settings, strategy: str, lr: float, seed: int, workroot: Path) -> RunResult:
    """One federated simulation; failures are recorded, not raised, so the sweep goes on."""
    cell = workroot / f"{strategy}_lr{lr:g}_seed{seed}"
    run_dir = cell / "run"
    request = FlowerRunRequest(
        components=FEDLORA_COMPONENTS,
        app_name="fedlora",
        default_config=DEFAULT_RUN_CONFIG,
        overrides=settings.overrides(strategy, lr, seed, run_dir),
        num_supernodes=settings.num_clients,
        ray_num_cpus=local_ray_cpus(None, None),  # $FEDLORA_RAY_CPUS, as fl-sim honours it
        timeout=settings.timeout,
        workdir=cell / "work",
        extra_env=EXTRA_ENV,
    )
    result = RunResult(strategy=strategy, lr=lr, seed=seed, status="not-started")
    started = time.monotonic()
    try:
        outcome = run_flower_app(request)
    except FlowerRunError as err:
        result.status, result.error = "simulation-error", str(err).splitlines()[0][:300]
    else:
        result.status = outcome.status + (" (timed out)" if outcome.timed_out else "")
        if not outcome.completed:
            result.error = f"{outcome.status_details[:300]} (log: {outcome.log_path})"
    result.seconds = time.monotonic() - started
    read_metrics(run_dir, result, settings.tasks.split(","))
    return result


def baseline(settings: Settings, seeds: Sequence[int]) -> dict[int, tuple[float, dict[str, float]]]:
    """Exact match of the untrained global adapter (B = 0) on each client's test split, per seed.

    Same data path as the client app: ``fedlora.core.client_data.client_examples``, ``encode``,
    ``evaluate``; the test split depends on the seed, the adapter's B = 0 does not.
    """
    import torch

    from fedlora.core.client_data import build_partition, client_examples
    from fedlora.core.data import encode
    from fedlora.core.model import load_base_model, wrap_lora
    from fedlora.core.model_dirs import load_tokenizer
    from fedlora.core.train import evaluate

    torch.set_num_threads(1)
    tokenizer = load_tokenizer()
    out: dict[int, tuple[float, dict[str, float]]] = {}
    for seed in seeds:
        cfg = FederationConfig.from_run_config(
            {k: v for k, v in settings.overrides("fedavg-lora", 0.0, seed, Path("unused")).items() if k != "run-dir"}
        )
        alpha = cfg.alpha_for(STRATEGIES["fedavg-lora"].defaults.alpha)
        model = wrap_lora(load_base_model(), cfg.lora_settings(cfg.lora.rank, alpha))
        assert all(float(p.detach().abs().max()) == 0.0 for n, p in model.named_parameters() if ".lora_B." in n)
        max_len = int(getattr(model.config, "max_position_embeddings", 2048))
        hits, total, per_task = 0.0, 0, {}
        split = build_partition(cfg)
        assert split is not None  # the embedded pool, split among the clients
        for partition in range(cfg.num_clients):
            _, test = client_examples(cfg, partition)
            res = evaluate(model, encode(tokenizer, test, max_len), int(tokenizer.pad_token_id))
            hits += res.exact_match * res.num_examples
            total += res.num_examples
            per_task["+".join(share.task for share in split.clients[partition])] = res.exact_match
        out[seed] = (hits / total, per_task)
    return out


# --------------------------------------------------------------------------- summary


def mean(values: Sequence[float]) -> float:
    good = [v for v in values if not math.isnan(v)]
    return statistics.fmean(good) if good else math.nan


def cell_key(results: Sequence[RunResult]) -> tuple[float, float, float]:
    """Sort key of one (strategy, lr) cell: final EM, then best-round EM, then -final train loss."""
    loss = mean([r.final_train_loss for r in results])
    return (mean([r.final_em for r in results]), mean([r.best_em for r in results]), -loss if loss == loss else -1e9)


def best_lr(results: Sequence[RunResult], strategy: str) -> float | None:
    by_lr: dict[float, list[RunResult]] = {}
    for r in results:
        if r.strategy == strategy and r.ok:
            by_lr.setdefault(r.lr, []).append(r)
    if not by_lr:
        return None
    return max(sorted(by_lr), key=lambda lr: cell_key(by_lr[lr]))


def fmt(v: float, digits: int = 3) -> str:
    return "n/a" if v != v else f"{v:.{digits}f}"


def fmt_cell(runs: Sequence[RunResult]) -> str:
    ok = [r for r in runs if r.ok]
    if not ok:
        return "failed" if runs else ""
    ems = [r.final_em for r in ok]
    text = fmt(mean(ems))
    if len(ems) > 1:
        text += f" ({fmt(min(ems), 2)}-{fmt(max(ems), 2)})"
    return text


def write_csv(path: Path, results: Sequence[RunResult], tasks: Sequence[str]) -> None:
    cols = [
        "strategy",
        "lr",
        "seed",
        "status",
        "final_em",
        "final_em_min",
        "final_em_max",
        "best_em",
        "best_round",
        "final_train_loss",
        "final_eval_loss",
        "rounds",
        "seconds",
        *[f"final_em_{t}" for t in tasks],
        "em_per_round",
        "error",
    ]
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in results:
            d = asdict(r)
            row: list[Any] = [d[c] for c in cols[:13]]
            row += [r.em_per_task.get(t, "") for t in tasks]
            row += [" ".join(f"{v:.4f}" for v in r.em_per_round), r.error]
            w.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])


def write_markdown(
    path: Path,
    *,
    results: Sequence[RunResult],
    strategies: Sequence[str],
    grids: dict[str, tuple[float, ...]],
    settings: Settings,
    seeds: Sequence[int],
    base: dict[int, tuple[float, dict[str, float]]],
    command: str,
    started: dt.datetime,
    total_seconds: float,
    ratio: float | None,
) -> None:
    tasks = settings.tasks.split(",")
    all_lrs = sorted({lr for s in strategies for lr in grids[s]})
    lines = [
        "# Learning-rate sweep per strategy (`bench/bench_lr_sweep.py`)",
        "",
        f"Date: {started:%Y-%m-%d %H:%M} (local time); total wall time {total_seconds / 60:.1f} min "
        f"for {len(results)} runs on {_cpus()} CPU cores shared with other work (timings are indicative only).",
        "",
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
        "Settings: every run is the real Flower server and client apps on a private SuperLink with Ray "
        f"simulation: {settings.num_clients} clients, one task each ({', '.join(f'`{t}`' for t in tasks)}; "
        f"tagged prompts: {str(settings.tagged).lower()}), {settings.num_rounds} rounds, {settings.local_steps} "
        f"local AdamW steps per round (batch 32), {settings.num_train} train / {settings.num_test} test examples "
        f"per client, LoRA r = 8 on all linear layers, alpha = 16 (each strategy's default), seeds "
        f"{', '.join(map(str, seeds))}; FlexLoRA client ranks {settings.flexlora_ranks}; LoRA-FAIR iterative "
        f"server solve with {settings.lora_fair_steps} steps (the app's default is 1000: too slow for a sweep).",
        "",
        "Cells: mean exact match over the clients' test splits after the last round"
        + (" (mean over seeds, min-max in brackets)" if len(seeds) > 1 else "")
        + "; **bold** = best rate of the strategy (highest final exact match, ties broken by best-round exact "
        "match, then lower final training loss). `default` is the rate in the method's module in `strategies/` at the "
        "time of the run.",
        "",
        "| strategy | " + " | ".join(f"lr {lr:g}" for lr in all_lrs) + " | best lr | default |",
        "|---|" + "---:|" * len(all_lrs) + "---:|---:|",
    ]
    base_em = mean([base[s][0] for s in seeds]) if base else math.nan
    if base:
        lines.append("| untrained (B = 0) | " + " | ".join(fmt(base_em) for _ in all_lrs) + " | - | - |")
    for s in strategies:
        best = best_lr(results, s)
        cells = []
        for lr in all_lrs:
            runs = [r for r in results if r.strategy == s and r.lr == lr]
            text = fmt_cell(runs) if lr in grids[s] else "-"
            cells.append(f"**{text}**" if best is not None and lr == best else text)
        default = STRATEGIES[s].defaults.lr
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {'n/a' if best is None else f'{best:g}'} | {default:g} |")
    lines += ["", "Untrained adapter per task: " + _per_task_text(base, seeds, tasks), ""]
    if ratio is not None:
        lines += [
            f"`ratio ffa_best_over_ffa_at_lora_lr = {fmt(ratio)}`: FFA-LoRA's final exact match at its best rate "
            f"over the same at plain LoRA's rate ({LORA_LR:g}).",
            "",
        ]
    lines += [
        "## Every run",
        "",
        "Final = last round; best = best round (round number in brackets); EM per task = final round, one "
        "client per task; time = wall time of the whole simulation including SuperLink/Ray start and teardown.",
        "",
        "| strategy | lr | seed | final EM | best EM (round) | EM per round | final EM per task ("
        + ", ".join(tasks)
        + ") | final train loss | time (s) | status |",
        "|---|---:|---:|---:|---:|---|---|---:|---:|---|",
    ]
    for r in results:
        per_task = " / ".join(fmt(r.em_per_task.get(t, math.nan), 2) for t in tasks)
        rounds = " ".join(f"{v:.2f}" for v in r.em_per_round)
        status = r.status if not r.error else f"{r.status}: {r.error[:120]}"
        lines.append(
            f"| {r.strategy} | {r.lr:g} | {r.seed} | {fmt(r.final_em)} | {fmt(r.best_em)} ({r.best_round}) | "
            f"{rounds} | {per_task} | {fmt(r.final_train_loss)} | {r.seconds:.0f} | {status} |"
        )
    lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")


def _per_task_text(base: dict[int, tuple[float, dict[str, float]]], seeds: Sequence[int], tasks: Sequence[str]) -> str:
    if not base:
        return "not computed (`--no-baseline`)."
    return ", ".join(f"`{t}` {fmt(mean([base[s][1].get(t, math.nan) for s in seeds]), 2)}" for t in tasks) + "."


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--strategies", default=",".join(STRATEGY_ORDER), help="comma-separated (default: all 7)")
    p.add_argument("--lrs", default="", help="comma-separated rates replacing every strategy's own grid")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    p.add_argument("--rounds", type=int, default=d.num_rounds)
    p.add_argument("--clients", type=int, default=d.num_clients)
    p.add_argument("--local-steps", type=int, default=d.local_steps)
    p.add_argument("--num-train", type=int, default=d.num_train)
    p.add_argument("--num-test", type=int, default=d.num_test)
    p.add_argument("--tasks", default=d.tasks, help="one task per client, cycled")
    p.add_argument("--untagged", action="store_true", help="untagged prompts (default: tagged)")
    p.add_argument("--lora-fair-steps", type=int, default=d.lora_fair_steps)
    p.add_argument("--flexlora-ranks", default=d.flexlora_ranks)
    p.add_argument("--timeout", type=float, default=d.timeout, help="seconds per run before it is stopped")
    p.add_argument(
        "--outdir", type=Path, default=None, help="where the report goes (default: bench/results; --quick: a temp dir)"
    )
    p.add_argument(
        "--workdir", type=Path, default=None, help="keep the runs here (default: a temporary directory, removed)"
    )
    p.add_argument("--no-baseline", action="store_true", help="skip the untrained-adapter row")
    p.add_argument("--quick", action="store_true", help="smoke test: ffa-lora at 3e-3, 2 clients, 2 short rounds")
    return p.parse_args(argv)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:  # FFA-LoRA at LoRA's rate: the ratio's code path, with the fewest runs
        args.strategies, args.lrs, args.rounds, args.clients = "ffa-lora", f"{LORA_LR:g}", 2, 2
        args.local_steps, args.num_train, args.num_test = 2, 32, 8
        args.tasks = ",".join(args.tasks.split(",")[: args.clients])  # one task per client
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; known: {sorted(STRATEGIES)}")
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    grids = {s: _floats(args.lrs) or default_grid(s) for s in strategies}
    settings = Settings(
        num_clients=args.clients,
        tasks=args.tasks,
        tagged=not args.untagged,
        num_rounds=args.rounds,
        local_steps=args.local_steps,
        num_train=args.num_train,
        num_test=args.num_test,
        lora_fair_steps=args.lora_fair_steps,
        flexlora_ranks=args.flexlora_ranks,
        timeout=args.timeout,
    )
    for s in strategies:  # validate every run config before the first run starts
        for lr in grids[s]:
            cfg = {k: v for k, v in settings.overrides(s, lr, seeds[0], Path("x")).items() if k != "run-dir"}
            FederationConfig.from_run_config(cfg)
    command = shlex.join(["python", "bench/bench_lr_sweep.py", *(sys.argv[1:] if argv is None else argv)])
    started_at = dt.datetime.now()
    t0 = time.monotonic()
    n_runs = sum(len(grids[s]) for s in strategies) * len(seeds)
    print(f"lr sweep: {n_runs} runs, settings {asdict(settings)}, seeds {seeds}", flush=True)

    base: dict[int, tuple[float, dict[str, float]]] = {}
    if not args.no_baseline:
        base = baseline(settings, seeds)
        for seed, (em, per_task) in base.items():
            print(f"baseline seed {seed}: untrained adapter exact match {em:.3f} {per_task}", flush=True)

    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="lr_sweep_")
    workroot = Path(tmp.name) if tmp is not None else Path(args.workdir)
    results: list[RunResult] = []
    try:
        i = 0
        for s in strategies:
            for lr in grids[s]:
                for seed in seeds:
                    i += 1
                    r = run_one(settings, s, lr, seed, workroot)
                    results.append(r)
                    ems = " ".join(f"{v:.2f}" for v in r.em_per_round)
                    print(
                        f"[{i}/{n_runs}] {s} lr={lr:g} seed={seed}: {r.status} final-em={fmt(r.final_em)} "
                        f"best-em={fmt(r.best_em)}@{r.best_round} train-loss={fmt(r.final_train_loss)} "
                        f"em/round=[{ems}] {r.seconds:.0f}s elapsed={(time.monotonic() - t0) / 60:.1f}min"
                        + (f" ERROR {r.error}" if r.error else ""),
                        flush=True,
                    )
    finally:
        if tmp is not None:
            tmp.cleanup()

    total = time.monotonic() - t0
    ratio: float | None = None
    if "ffa-lora" in strategies and LORA_LR in grids["ffa-lora"]:
        ffa_best = best_lr(results, "ffa-lora")
        ffa = [r for r in results if r.strategy == "ffa-lora" and r.ok]
        if ffa_best is not None:
            num = mean([r.final_em for r in ffa if r.lr == ffa_best])
            den = mean([r.final_em for r in ffa if r.lr == LORA_LR])
            if ffa_best == LORA_LR:  # the same runs above and below the line
                ratio = 1.0
            else:
                ratio = num / den if den > 0 else (math.inf if num > 0 else math.nan)

    if args.outdir is None:
        args.outdir = Path(tempfile.mkdtemp(prefix="lr_sweep_report_")) if args.quick else BENCH / "results"
    args.outdir.mkdir(parents=True, exist_ok=True)
    write_csv(args.outdir / "lr_sweep.csv", results, settings.tasks.split(","))
    write_markdown(
        args.outdir / "lr_sweep.md",
        results=results,
        strategies=strategies,
        grids=grids,
        settings=settings,
        seeds=seeds,
        base=base,
        command=command,
        started=started_at,
        total_seconds=total,
        ratio=ratio,
    )
    print(f"total wall time {total / 60:.1f} min; wrote {args.outdir / 'lr_sweep.md'} and lr_sweep.csv", flush=True)
    for s in strategies:
        b = best_lr(results, s)
        print(f"best-lr {s} = {'n/a' if b is None else f'{b:g}'}", flush=True)
    if ratio is not None:
        print(f"ratio ffa_best_over_ffa_at_lora_lr = {fmt(ratio)}", flush=True)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
