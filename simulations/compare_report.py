"""The report of ``fl-sim compare``: several strategies x seeds (x an optional lr grid) on one split.

Each run directory becomes a :class:`RunResult`; :func:`summarise` groups them by strategy and
:func:`write_compare` writes ``compare.md``, ``compare.csv``, ``compare_runs.csv`` and
``compare.{png,pdf}``.

Learning rate. When a strategy was run at several learning rates, the lr with the best mean
final exact match over seeds is reported (ties: the smaller lr). It is chosen on the same seeds it
is reported on, which flatters a strategy with a larger grid; the row says which grid it came from.

Tie rule. Per strategy, the spread is the sample standard deviation (ddof=1; 0 with one seed) of
its final exact match over seeds. The strategy with the best mean is "best". Another strategy is
"tie" when ``best mean - its mean <= max(sd of best, its sd)`` (up to 1e-12 for rounding), else
"worse". A difference no larger than the spread is never called a win. With one seed per strategy
the spread is 0 and every difference counts: run more seeds before trusting such a verdict.

Centralised. A strategy named "centralised" (the centralised LoRA baseline on the pooled data) is a
reference, not a competitor: its verdict is "reference", it never is "best", and each federated row
reports ``gap to centralised`` = its mean minus the centralised mean.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedlora.core.plots import finite, save_figure, section
from fedlora.core.run_dir import RunDir

REFERENCE_STRATEGIES = frozenset({"centralised", "centralized"})
TIE_TOLERANCE = 1e-12
BEST, TIE, WORSE, REFERENCE = "best", "tie", "worse", "reference"
SUMMARY_COLUMNS = (
    "strategy",
    "lr",
    "lr_grid",
    "n_seeds",
    "seeds",
    "final_em_mean",
    "final_em_sd",
    "final_em_min",
    "final_em_max",
    "verdict",
    "gap_to_centralised",
    "rounds_to_target_mean",
    "reached_target",
    "bytes_mean",
    "epsilon_max",
)
RUN_COLUMNS = (
    "strategy",
    "seed",
    "lr",
    "selected",
    "final_exact_match",
    "rounds_to_target",
    "bytes_communicated",
    "epsilon",
    "run_dir",
    "curve",
)


@dataclass(frozen=True)
class RunResult:
    """One run of one strategy at one seed and lr; ``curve[i]`` is the exact match after round i + 1 (NaN if
    that round was not evaluated)."""

    strategy: str
    seed: int
    lr: float
    final_exact_match: float
    curve: tuple[float, ...]
    rounds_to_target: int | None
    bytes_communicated: int
    epsilon: float | None
    run_dir: str


@dataclass(frozen=True)
class SummaryRow:
    """One strategy at its selected lr, aggregated over seeds; see the module docstring for ``verdict``."""

    strategy: str
    lr: float
    lr_grid: tuple[float, ...]
    seeds: tuple[int, ...]
    finals: tuple[float, ...]
    final_em_mean: float
    final_em_sd: float
    final_em_min: float
    final_em_max: float
    verdict: str
    gap_to_centralised: float | None
    rounds_to_target_mean: float | None
    reached_target: int
    bytes_mean: float
    epsilon_max: float | None

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)

    @property
    def is_reference(self) -> bool:
        return self.verdict == REFERENCE


# ------------------------------------------------------------------------------------------ loading


def load_run_result(run_dir: Path | str, target: float) -> RunResult:
    """A run's result from ``config.json`` (strategy, seed, lr) and ``metrics.jsonl``.

    Raises ValueError when no round has a federated exact match: a run that never evaluated has no result,
    and silently counting it as 0 would bias the mean.
    """
    run = RunDir(run_dir)
    config = run.config()
    rows = [r for r in run.rounds() if r["round"] >= 1]
    by_round = {r["round"]: finite(section(r, "evaluate").get("exact-match")) for r in rows}
    last = max(by_round, default=0)
    curve = tuple(math.nan if (v := by_round.get(i)) is None else v for i in range(1, last + 1))
    evaluated = [(r, v) for r, v in by_round.items() if v is not None]
    if not evaluated:
        raise ValueError(f"{run.metrics_path}: no round has an evaluated exact match")
    reached = [r for r, v in evaluated if v >= target]
    epsilons = [e for r in rows if (e := finite(section(r, "train").get("epsilon-max"))) is not None]
    sent = 0
    for row in rows:
        train = section(row, "train")
        sent += int(finite(train.get("bytes-sent")) or 0) + int(finite(train.get("bytes-received")) or 0)
    missing = [k for k in ("strategy", "seed", "lr") if k not in config]
    if missing:
        raise ValueError(f"{run.config_path}: missing {', '.join(missing)}")
    return RunResult(
        strategy=str(config["strategy"]),
        seed=int(config["seed"]),
        lr=float(config["lr"]),
        final_exact_match=evaluated[-1][1],
        curve=curve,
        rounds_to_target=min(reached) if reached else None,
        bytes_communicated=sent,
        epsilon=max(epsilons) if epsilons else None,
        run_dir=str(run.root),
    )


# ------------------------------------------------------------------------------------------ summarising


def _sd(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def is_reference(strategy: str) -> bool:
    """Whether the strategy is the centralised baseline (reported as a gap, never ranked)."""
    return strategy.lower() in REFERENCE_STRATEGIES


def select_lr(results: Sequence[RunResult]) -> tuple[float, list[RunResult]]:
    """The lr with the best mean final exact match over seeds (ties: the smaller lr) and its runs."""
    by_lr: dict[float, list[RunResult]] = {}
    for r in results:
        by_lr.setdefault(r.lr, []).append(r)
    best = min(by_lr, key=lambda lr: (-statistics.fmean(x.final_exact_match for x in by_lr[lr]), lr))
    return best, sorted(by_lr[best], key=lambda x: x.seed)


def verdict(best_mean: float, best_sd: float, mean: float, sd: float) -> str:
    """``"tie"`` when the difference of means is within the larger of the two sds, else ``"worse"``."""
    return TIE if best_mean - mean <= max(best_sd, sd) + TIE_TOLERANCE else WORSE


def summarise(results: Sequence[RunResult]) -> list[SummaryRow]:
    """One row per strategy at its selected lr: federated rows by mean (best first), the reference last."""
    groups: dict[str, list[RunResult]] = {}
    for r in results:
        groups.setdefault(r.strategy, []).append(r)
    stats: dict[str, tuple[float, list[RunResult], tuple[float, ...]]] = {}
    for name, runs in groups.items():
        lr, chosen = select_lr(runs)
        stats[name] = (lr, chosen, tuple(sorted({r.lr for r in runs})))

    def mean_sd(name: str) -> tuple[float, float]:
        finals = [r.final_exact_match for r in stats[name][1]]
        return statistics.fmean(finals), _sd(finals)

    federated = sorted((n for n in stats if not is_reference(n)), key=lambda n: (-mean_sd(n)[0], n))
    references = sorted(n for n in stats if is_reference(n))
    central = mean_sd(references[0])[0] if references else None
    best = federated[0] if federated else None

    rows: list[SummaryRow] = []
    for name in [*federated, *references]:
        lr, chosen, grid = stats[name]
        finals = tuple(r.final_exact_match for r in chosen)
        mean, sd = mean_sd(name)
        if is_reference(name):
            label, gap = REFERENCE, None
        else:
            label = BEST if name == best else verdict(*mean_sd(best or name), mean, sd)
            gap = None if central is None else mean - central
        reached = [r.rounds_to_target for r in chosen if r.rounds_to_target is not None]
        epsilons = [r.epsilon for r in chosen if r.epsilon is not None]
        rows.append(
            SummaryRow(
                strategy=name,
                lr=lr,
                lr_grid=grid,
                seeds=tuple(r.seed for r in chosen),
                finals=finals,
                final_em_mean=mean,
                final_em_sd=sd,
                final_em_min=min(finals),
                final_em_max=max(finals),
                verdict=label,
                gap_to_centralised=gap,
                rounds_to_target_mean=statistics.fmean(reached) if reached else None,
                reached_target=len(reached),
                bytes_mean=statistics.fmean(r.bytes_communicated for r in chosen),
                epsilon_max=max(epsilons) if epsilons else None,
            )
        )
    return rows


# ------------------------------------------------------------------------------------------ rendering


def _lr_text(row: SummaryRow) -> str:
    if len(row.lr_grid) <= 1:
        return f"{row.lr:g}"
    return f"{row.lr:g} (best of {', '.join(f'{x:g}' for x in row.lr_grid)})"


def _em_text(row: SummaryRow) -> str:
    return f"{row.final_em_mean:.3f} ± {row.final_em_sd:.3f} [{row.final_em_min:.3f}, {row.final_em_max:.3f}]"


def _signed(value: float | None) -> str:
    return "—" if value is None else f"{value:+.3f}".replace("-", "−")


def _rounds_text(row: SummaryRow) -> str:
    if row.rounds_to_target_mean is None:
        return f"not reached (0/{row.n_seeds})"
    return f"{row.rounds_to_target_mean:.1f} ({row.reached_target}/{row.n_seeds} reached)"


def _abbrev(metric: str) -> str:
    return "".join(w[0] for w in metric.split()).upper() if " " in metric else metric[:3].upper()


def tie_rule_text(target: float, metric: str = "exact match") -> str:
    """The footer: how verdicts are decided and what rounds-to-target means."""
    em = _abbrev(metric)
    return (
        f"Verdict: the federated strategy with the best mean final {metric} ({em}) is *best*. Another strategy is "
        "*tie* when the difference of means to the best is smaller than or equal to the larger of the two standard "
        "deviations over seeds (sample sd, ddof = 1; 0 with one seed), else *worse*: a difference within the spread "
        "is never called a win. With one seed the spread is 0, so run more seeds before trusting a verdict. "
        f"The centralised baseline is a *reference*, excluded from verdicts; *gap to centralised* is a strategy's "
        f"mean {em} minus the centralised mean. Rounds to target: the first round whose federated {em} is >= "
        f"{target:g}, averaged over the seeds that reached it. When several learning rates were run, the lr with the "
        f"best mean final {em} is shown, chosen on the same seeds (an optimistic choice). MB communicated: mean "
        "over seeds of bytes sent + received over all rounds, 1 MB = 10^6 bytes. Epsilon: the largest per-client "
        "epsilon any round reported (DP runs)."
    )


def render_markdown(rows: Sequence[SummaryRow], title: str, target: float, metric: str = "exact match") -> str:
    """``compare.md``: one table row per strategy, the tie rule in the footer; ``metric`` names the
    kind's headline metric (a classifier's accuracy)."""
    em = _abbrev(metric)
    with_gap = any(r.is_reference for r in rows)
    header = ["strategy", "lr", "seeds", f"final {em} mean ± sd [min, max]", "verdict"]
    header += ["gap to centralised"] if with_gap else []
    header += [f"rounds to {em} ≥ {target:g}", "MB communicated", "epsilon"]
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        cells = [r.strategy, _lr_text(r), str(r.n_seeds), _em_text(r), r.verdict]
        cells += [_signed(r.gap_to_centralised)] if with_gap else []
        cells += [
            _rounds_text(r),
            f"{r.bytes_mean / 1e6:.2f}",
            "—" if r.epsilon_max is None else f"{r.epsilon_max:.3g}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", tie_rule_text(target, metric), ""])


def _csv_value(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, tuple):
        return ";".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return value


def _write_csv(path: Path, columns: Sequence[str], records: Sequence[dict[str, object]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows({c: _csv_value(rec[c]) for c in columns} for rec in records)
    return path


def _curve_band(runs: Sequence[RunResult]) -> tuple[list[int], list[float], list[float]]:
    """Rounds, mean and sd over seeds of the exact-match curves (rounds no seed evaluated are skipped)."""
    rounds, means, sds = [], [], []
    for i in range(max(len(r.curve) for r in runs)):
        values = [r.curve[i] for r in runs if i < len(r.curve) and math.isfinite(r.curve[i])]
        if values:
            rounds.append(i + 1)
            means.append(statistics.fmean(values))
            sds.append(_sd(values))
    return rounds, means, sds


def compare_figure(
    rows: Sequence[SummaryRow], results: Sequence[RunResult], title: str, target: float, metric: str = "exact match"
) -> Figure:
    """Left: final EM mean ± sd per strategy with each seed as a dot. Right: EM per round, mean ± sd band."""
    fig = Figure(figsize=(12, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    bars, curves = fig.subplots(1, 2, width_ratios=(1, 1.4))
    colors = [f"C{i % 10}" for i in range(len(rows))]
    positions = list(range(len(rows)))
    bars.bar(
        positions,
        [r.final_em_mean for r in rows],
        yerr=[r.final_em_sd for r in rows],
        capsize=4,
        color=colors,
        alpha=0.55,
        hatch=["//" if r.is_reference else "" for r in rows],
        edgecolor="black",
        linewidth=0.6,
    )
    for x, r, color in zip(positions, rows, colors, strict=True):
        offsets = [0.0] if len(r.finals) == 1 else [-0.15 + 0.3 * k / (len(r.finals) - 1) for k in range(len(r.finals))]
        bars.scatter([x + o for o in offsets], r.finals, color=color, edgecolor="black", s=18, zorder=3)
    bars.set_xticks(positions, [f"{r.strategy}\n({r.verdict})" for r in rows], fontsize="small")
    bars.set_ylim(0, 1.02)
    bars.set_ylabel(f"final {metric}")
    bars.set_title(f"Final {metric} (mean ± sd, dots = seeds)")

    for r, color in zip(rows, colors, strict=True):
        chosen = [x for x in results if x.strategy == r.strategy and x.lr == r.lr and x.seed in r.seeds]
        rounds, means, sds = _curve_band(chosen)
        if not rounds:
            continue
        style = "--" if r.is_reference else "-"
        curves.plot(rounds, means, linestyle=style, color=color, label=f"{r.strategy} (lr {r.lr:g}, n={r.n_seeds})")
        curves.fill_between(
            rounds,
            [m - s for m, s in zip(means, sds, strict=True)],
            [m + s for m, s in zip(means, sds, strict=True)],
            color=color,
            alpha=0.15,
        )
    curves.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target:g}")
    curves.set_ylim(0, 1.02)
    curves.xaxis.set_major_locator(MaxNLocator(integer=True))
    curves.set_xlabel("server round (centralised: local steps x sampled clients)")
    curves.set_ylabel(metric)
    curves.set_title(f"{metric.capitalize()} per round (mean ± sd over seeds)")
    curves.legend(fontsize="small")
    for ax in (bars, curves):
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    return fig


def write_compare(
    out_dir: Path | str, results: Sequence[RunResult], title: str, target: float, metric: str = "exact match"
) -> list[Path]:
    """Write ``compare.{md,csv,png,pdf}`` and ``compare_runs.csv`` (every run) to ``out_dir``; returns the paths."""
    if not results:
        raise ValueError("no run results to compare")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarise(results)
    md = out / "compare.md"
    md.write_text(render_markdown(rows, title, target, metric), encoding="utf-8")
    summary_csv = _write_csv(
        out / "compare.csv",
        SUMMARY_COLUMNS,
        [{**asdict(r), "n_seeds": r.n_seeds} for r in rows],
    )
    selected = {(r.strategy, r.lr) for r in rows}
    runs_csv = _write_csv(
        out / "compare_runs.csv",
        RUN_COLUMNS,
        [
            {
                **asdict(r),
                "selected": (r.strategy, r.lr) in selected,
                "curve": json.dumps([v if math.isfinite(v) else None for v in r.curve]),
            }
            for r in sorted(results, key=lambda x: (x.strategy, x.lr, x.seed))
        ],
    )
    figures = save_figure(compare_figure(rows, results, title, target, metric), out / "compare")
    return [md, summary_csv, runs_csv, *figures]


__all__ = [
    "RunResult",
    "SummaryRow",
    "is_reference",
    "load_run_result",
    "render_markdown",
    "select_lr",
    "summarise",
    "tie_rule_text",
    "verdict",
    "write_compare",
]
