"""``fl-sim compare``: several strategies on the same splits over several seeds, plus the pooled baseline.

Each run is an ordinary ``fl-sim`` run directory under ``OUT/runs/<strategy>/lr-<lr>/seed-<s>``,
so a comparison that is interrupted continues where it stopped (finished runs are kept,
unfinished ones resumed). Seed s fixes the split, the initial adapter and local training for
every strategy alike. The table (``compare.md``/``.csv``) reports means and spreads over
seeds and calls a difference smaller than the spread a tie.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from fedlora.core.cli import resume_config
from fedlora.core.config import FederationConfig, stored_run_config
from fedlora.core.kinds import DEFAULT_KIND, headline
from fedlora.core.run_dir import RESUME_MAY_CHANGE, RunDir, config_changes
from fedlora.simulations.centralised import run_centralised
from fedlora.simulations.compare_report import RunResult, load_run_result, write_compare
from fedlora.simulations.options import MAIN_JOB, add_run_options, run_config_from
from fedlora.simulations.simulate import simulate, validate
from fedlora.strategies.registry import STRATEGIES

DEFAULT_STRATEGIES = "fedavg-lora,ffa-lora,lora-fair,fedex-lora"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fl-sim compare",
        description="Run strategies x seeds on the same splits (and a centralised LoRA baseline on the pooled "
        "data), then write compare.md, compare.csv and compare.png. Run options as for fl-sim; each strategy "
        "runs at its own tuned learning rate unless --lr or --lr-grid says otherwise.",
    )
    p.add_argument("--strategies", default=DEFAULT_STRATEGIES, help=f"comma-separated (default {DEFAULT_STRATEGIES})")
    p.add_argument("--seeds", type=int, default=3, help="seeds per strategy (default 3)")
    p.add_argument(
        "--lr-grid", help="comma-separated multipliers of each strategy's tuned lr (e.g. 0.5,1,2); best reported"
    )
    p.add_argument("--no-centralised", action="store_true", help="skip the pooled-data baseline")
    p.add_argument("--target", type=float, default=0.5, help="exact match for 'rounds to reach' (default 0.5)")
    p.add_argument("--title", help="title of the table and plot")
    p.add_argument("--out", type=Path, default=Path("runs/compare"), help="output directory (default runs/compare)")
    add_run_options(p)
    return p


def parse_grid(text: str | None) -> tuple[float, ...]:
    """``--lr-grid``: comma-separated multipliers > 0 of each strategy's tuned lr (none: just the tuned lr)."""
    try:
        grid = tuple(float(m) for m in text.split(",")) if text else (1.0,)
    except ValueError:
        raise ValueError(f"--lr-grid must be comma-separated numbers, got {text!r}") from None
    if any(not m > 0 for m in grid):
        raise ValueError(f"--lr-grid multipliers must be > 0, got {text!r}")
    return grid


def plan_grid(
    base: Mapping[str, Any], strategies: Sequence[str], seeds: int, grid: Sequence[float], out: Path
) -> list[dict[str, Any]]:
    """The run config of every federated run: strategies x lrs (each strategy's tuned lr, or ``base``'s
    explicit one, times the grid) x seeds, under ``out/runs/<strategy>/lr-<lr>/seed-<s>``; validated before
    any starts."""
    if not strategies:
        raise ValueError("--strategies names no strategy")
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    first_seed = int(base.get("seed", 0))
    runs = []
    for strategy in strategies:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; registered: {', '.join(sorted(STRATEGIES))}")
        tuned = float(base["lr"]) if base.get("lr") else STRATEGIES[strategy].defaults.lr
        for lr in sorted({round(tuned * m, 10) for m in grid}):
            for seed in range(first_seed, first_seed + seeds):
                run_dir = out / "runs" / strategy / f"lr-{lr:g}" / f"seed-{seed}"
                runs.append(dict(base) | {"strategy": strategy, "lr": lr, "seed": seed, "run-dir": str(run_dir)})
    for config in runs:  # a strategy's own refusals (a server optimizer it cannot take) show here
        FederationConfig.from_run_config(config)
    for config in {c["seed"]: c for c in runs}.values():  # the data and its split depend on the seed only
        validate(config)
    return runs


def plan_runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The run config of every federated run of the comparison, validated before any starts."""
    base = run_config_from(args, MAIN_JOB)
    base["fraction-evaluate"] = 1.0  # every client evaluates: the comparison's metric
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    return plan_grid(base, strategies, args.seeds, parse_grid(args.lr_grid), args.out)


def stored_changes(config: dict[str, Any], run_dir: Path) -> list[str]:
    """How a run directory's stored configuration differs from the one planned for it."""
    run = RunDir(run_dir)
    if not run.config_path.is_file():
        return []
    planned = FederationConfig.from_run_config(config).to_run_config()
    ignore = RESUME_MAY_CHANGE | {"run-dir", "scaling"} | ({"lora-alpha"} if not planned["lora-alpha"] else set())
    return config_changes(stored_run_config(run), planned, frozenset(ignore))


@dataclass(frozen=True)
class Launch:
    """How each simulation of a comparison starts: the run options that are not run config."""

    timeout: float = 3600.0
    verbose: bool = False
    cpus_per_client: int = 1
    gpus_per_client: float = 0.0
    ray_address: str | None = None
    ray_cpus: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Launch:
        return cls(
            timeout=args.timeout,
            verbose=args.verbose,
            cpus_per_client=args.cpus_per_client,
            gpus_per_client=args.gpus_per_client,
            ray_address=args.ray_address,
            ray_cpus=args.ray_cpus,
        )


def run_planned(
    runs: Sequence[Mapping[str, Any]],
    out: Path,
    launch: Launch,
    console: Console,
    *,
    target: float,
    centralised: bool = True,
    centralised_lr: float | None = None,
) -> list[RunResult]:
    """Run (or keep, or resume) every planned federated run, then the centralised baseline per seed
    under ``out/runs/centralised/seed-<s>`` at FedAvg-LoRA's lr (``centralised_lr`` when given); returns
    every run's result."""
    metric = headline(str(runs[0].get("model.kind", DEFAULT_KIND)))
    dirs: list[Path] = []
    for i, planned in enumerate(runs, start=1):
        config = dict(planned)
        run_dir = Path(config["run-dir"])
        dirs.append(run_dir)
        label = f"[{i}/{len(runs)}] {config['strategy']} lr {config['lr']:g} seed {config['seed']}"
        changed = stored_changes(config, run_dir)
        if changed:
            raise ValueError(
                f"{run_dir} holds a run with another configuration ({', '.join(changed)}): use another --out "
                "or delete it"
            )
        if RunDir(run_dir).global_adapter_dir.is_dir():
            console.print(f"{label}: done before, kept", markup=False)
            continue
        if RunDir(run_dir).holds_run():
            config = resume_config(run_dir)
        outcome = simulate(
            config,
            console=console,
            quiet=True,
            verbose=launch.verbose,
            timeout=launch.timeout,
            cpus_per_client=launch.cpus_per_client,
            gpus_per_client=launch.gpus_per_client,
            ray_address=launch.ray_address,
            ray_cpus=launch.ray_cpus,
        )
        if not outcome.completed:
            raise RuntimeError(f"{label} {outcome.status}: {outcome.status_details} (log: {outcome.log_path})")
        result = load_run_result(run_dir, target)
        console.print(f"{label}: {metric} {result.final_exact_match:.3f} ({outcome.seconds:.0f} s)", markup=False)
    results = [load_run_result(d, target) for d in dirs]
    if centralised:
        for seed in sorted({int(c["seed"]) for c in runs}):
            run_dir = out / "runs" / "centralised" / f"seed-{seed}"
            results.append(run_pooled(runs[0], seed, centralised_lr, run_dir, console, target))
    return results


def run_pooled(
    config: Mapping[str, Any], seed: int, lr: float | None, run_dir: Path, console: Console, target: float
) -> RunResult:
    """The centralised baseline of ``config``'s setting at ``seed`` and ``lr`` (None: FedAvg-LoRA's tuned lr)
    in ``run_dir``, kept when it finished before."""
    if not RunDir(run_dir).global_adapter_dir.is_dir():
        base = {k: v for k, v in config.items() if k != "lr"} | {"seed": seed, "strategy": "fedavg-lora"}
        if lr is not None:
            base["lr"] = lr
        base["run-dir"] = str(run_dir)
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a partial pooled run is cheap to redo
        run_centralised(FederationConfig.from_run_config(base), run_dir)
    result = load_run_result(run_dir, target)
    metric = headline(str(config.get("model.kind", DEFAULT_KIND)))
    console.print(f"centralised lr {result.lr:g} seed {seed}: {metric} {result.final_exact_match:.3f}", markup=False)
    return result


def cmd_compare(argv: Sequence[str], console: Console) -> int:
    args = _parser().parse_args(argv)
    runs = plan_runs(args)
    metric = headline(str(runs[0].get("model.kind", DEFAULT_KIND)))
    console.print(f"fl-sim compare: {len(runs)} federated runs -> {args.out}")
    # the centralised baseline takes FedAvg-LoRA's lr: the explicit --lr, else its tuned default
    results = run_planned(
        runs,
        args.out,
        Launch.from_args(args),
        console,
        target=args.target,
        centralised=not args.no_centralised,
        centralised_lr=args.lr,
    )
    title = args.title or _title(runs[0])
    paths = write_compare(args.out, results, title, args.target, metric)
    md = next((p for p in paths if p.suffix == ".md"), None)
    if md is not None:
        console.print(md.read_text(), markup=False, highlight=False)
    console.print("\n".join(str(p) for p in paths), markup=False)
    return 0


def _title(config: Mapping[str, Any]) -> str:
    split = str(config.get("partition.scheme", "tasks-per-client"))
    if split == "dirichlet":
        split += f"({config.get('partition.alpha', 0.5)})"
    dp = f"DP epsilon {config.get('dp.target-epsilon')}" if config.get("dp.enabled") else "no DP"
    return f"{config.get('num-clients')} clients, {split}, {config.get('num-rounds')} rounds, {dp}"
