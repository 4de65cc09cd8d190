"""What moves federated LoRA toward centralised training on a ``fl-sim reproduce`` cell.

Each *variant* changes run-config keys of one arm of a cell (more local steps and fewer rounds at the
same gradient budget, a larger client lr, a server optimizer over the aggregate, a larger rank,
LoRA-FAIR's lambda) and runs the chosen strategies over seeds at fixed client learning rates (the
ones the cell's own run chose, ``--lrs``), plus the centralised baseline under the same change. The
table reports each variant's mean ± sd, its move from the baseline variant and the share of the
baseline's gap to centralised that move closes:

    closed = (variant - baseline) / (centralised - baseline)   (all on the baseline variant's setting)

The variant's own centralised mean is shown beside it: a change of rank or budget moves it too. The
last lines are ``ratio gap_closed_<strategy> = <best closed fraction>`` per strategy, the variant named
beside it.

    python bench/bench_gap.py --cell fair-domains --arm no-dp --strategies fedavg-lora,lora-fair \\
        --lrs fedavg-lora=0.006,lora-fair=0.006 --out runs/bench-gap/fair

``--quick``: the cell's ``--quick`` sizes, FedAvg-LoRA alone, one seed, the baseline and FedAvgM (a smoke
run of the machinery, in a temporary directory unless ``--out`` is given; meaningless figures).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console

from fedlora.simulations.compare import Launch, plan_grid, run_planned
from fedlora.simulations.compare_report import SummaryRow, summarise
from fedlora.simulations.reproduce import CELLS, parse_changes
from fedlora.strategies.registry import STRATEGIES

#: variant -> run-config changes (applied to every run of the variant, centralised included)
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "client-lr-x2": {"lr-scale": 2.0},
    "steps-x2-rounds-half": {"steps-scale": 2.0},
    "steps-half-rounds-x2": {"steps-scale": 0.5},
    "steps-fifth-rounds-x5": {"steps-scale": 0.2},
    "server-avgm-0.9": {"server-opt.optimizer": "avgm", "server-opt.beta1": 0.9, "server-opt.lr": 1.0},
    "server-adam-1e-3": {"server-opt.optimizer": "adam", "server-opt.lr": 1e-3},
    "server-lr-2": {"server-opt.optimizer": "none", "server-opt.lr": 2.0},
    "steps-half-rounds-x2-avgm": {
        "steps-scale": 0.5,
        "server-opt.optimizer": "avgm",
        "server-opt.beta1": 0.9,
        "server-opt.lr": 1.0,
    },
    "rank-16": {"lora-rank": 16},
    "lora-fair-lambda-0.1": {"lora-fair-lambda": 0.1},
}


def variant_config(base: Mapping[str, Any], change: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``change`` applied; ``steps-scale`` keeps the gradient budget (steps x rounds)."""
    config = dict(base)
    change = dict(change)
    scale = float(change.pop("steps-scale", 1.0))
    if scale != 1.0:
        config["local-steps"] = max(1, round(int(config["local-steps"]) * scale))
        config["num-rounds"] = max(1, round(int(config["num-rounds"]) / scale))
    change.pop("lr-scale", None)
    return config | change


def _closed(table: Mapping[str, list[SummaryRow]]) -> dict[tuple[str, str], tuple[float, float | None]]:
    """(variant, strategy) -> (its mean minus the baseline's, that as a share of the baseline's gap to the
    baseline's centralised mean); the share is None without a baseline row or gap."""
    base = {r.strategy: r.final_em_mean for r in table.get("baseline", [])}
    central = base.get("centralised")
    out = {}
    for name, rows in table.items():
        for r in rows:
            if r.strategy == "centralised" or r.strategy not in base:
                continue
            moved = r.final_em_mean - base[r.strategy]
            gap = None if central is None else central - base[r.strategy]
            out[(name, r.strategy)] = (moved, moved / gap if gap and gap > 0 else None)
    return out


def render(table: Mapping[str, list[SummaryRow]]) -> list[str]:
    """One row per variant and strategy: its mean ± sd, the move from the baseline variant, the share of the
    baseline's gap to centralised that move closes, and the variant's own centralised mean (rank and budget
    variants move it too)."""
    closed = _closed(table)
    lines = [
        "| variant | strategy | mean ± sd | vs baseline | gap closed | own centralised |",
        "|---|---|---|---|---|---|",
    ]
    for name, rows in table.items():
        central = next((r for r in rows if r.strategy == "centralised"), None)
        for r in rows:
            if r.strategy == "centralised":
                continue
            moved, share = closed.get((name, r.strategy), (None, None))
            lines.append(
                f"| {name} | {r.strategy} | {r.final_em_mean:.3f} ± {r.final_em_sd:.3f} "
                f"| {'—' if moved is None else f'{moved:+.3f}'} | {'—' if share is None else f'{share:+.0%}'} "
                f"| {'—' if central is None else f'{central.final_em_mean:.3f}'} |"
            )
    return lines


def best_variants(table: Mapping[str, list[SummaryRow]]) -> dict[str, tuple[float, str]]:
    """strategy -> (the largest share of the gap a variant closed, that variant)."""
    best: dict[str, tuple[float, str]] = {}
    for (name, strategy), (_, share) in _closed(table).items():
        if share is not None and name != "baseline":
            best[strategy] = max(best.get(strategy, (-float("inf"), "")), (share, name))
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cell", default="fair-domains")
    p.add_argument("--arm", default="no-dp")
    p.add_argument("--strategies", default="fedavg-lora,lora-fair")
    p.add_argument("--lrs", default="", help="strategy=lr pairs (default: each strategy's tuned lr)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE changed in every variant (e.g. num-rounds=3)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument(
        "--central-lr", type=float, default=None, help="the centralised baseline's lr (default: FedAvg-LoRA's)"
    )
    p.add_argument("--out", type=Path, help="output directory (default runs/bench-gap)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one strategy, one seed, two variants")
    args = p.parse_args(argv)
    if args.quick:
        args.strategies, args.seeds, args.variants = "fedavg-lora", 1, "baseline,server-avgm-0.9"
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="bench-gap-")) if args.quick else Path("runs/bench-gap")
    cell = CELLS[args.cell]
    arm = next(a for a in cell.arms if a.name == args.arm)
    strategies = [s for s in args.strategies.split(",") if s]
    lrs = {k: float(v) for k, v in parse_changes([x for x in args.lrs.split(",") if x]).items()}
    console = Console(soft_wrap=True)
    launch = Launch()
    base = cell.run_config(arm, quick=args.quick, changes=parse_changes(args.set))
    table: dict[str, list[SummaryRow]] = {}
    for name in [v for v in args.variants.split(",") if v]:
        change = VARIANTS[name]
        started = time.perf_counter()
        runs: list[dict[str, Any]] = []
        out = args.out / name
        for strategy in strategies:
            if "lora-fair-" in ",".join(change) and strategy != "lora-fair":
                continue
            lr = lrs.get(strategy)
            config = variant_config(base, change) | ({"lr": lr} if lr else {})
            if "lr-scale" in change:
                config["lr"] = (lr or STRATEGIES[strategy].defaults.lr) * float(change["lr-scale"])
            runs += plan_grid(config, [strategy], args.seeds, (1.0,), out)
        if not runs:
            continue
        central_lr = args.central_lr or next(
            (r["lr"] for r in runs if r["strategy"] == "fedavg-lora"), lrs.get("fedavg-lora")
        )
        if args.central_lr and "lr-scale" in change:
            central_lr = args.central_lr * float(change["lr-scale"])
        results = run_planned(runs, out, launch, console, target=0.5, centralised_lr=central_lr)
        table[name] = summarise(results)
        console.print(f"{name}: {time.perf_counter() - started:.0f} s", markup=False)
    print("\n".join(render(table)))
    best = best_variants(table)
    for strategy in strategies:
        if strategy in best:
            print(f"best variant {strategy} = {best[strategy][1]}")
        else:  # the baseline reached centralised (quick sizes) or no variant ran: nothing to close
            print(f"best variant {strategy} = none (no gap to centralised on the baseline, or no variant)")
    for strategy in strategies:
        print(f"ratio gap_closed_{strategy} = {best.get(strategy, (0.0, ''))[0]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
