"""Paper-ready figures and a per-client table of one run, read from nothing but its run directory.

A run directory written by the server app (``config.json``, ``metrics.jsonl``, optionally
``partition.json``), read through :class:`fedlora.core.run_dir.RunDir`, is the only input, so a
figure can be regenerated long after the run, on another machine, without Flower. Outputs go to
``<run_dir>/report/``::

    training.png / training.pdf   train loss, exact match (federated mean with min-max band, server
                                  eval per task), per-client exact match spread per round
    clients.csv / clients.md      one row per virtual client (partition id): tasks, examples,
                                  final global and local exact match, epsilon, participation

Node ids are random per run, so clients are identified by their ``partition-id``. Rows of
``metrics.jsonl`` may repeat a round when a run was resumed: the last row for a round wins.
Matplotlib is used through its object API with the Agg canvas (never pyplot), so this works
headless and from threads.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedlora.core.kinds import DEFAULT_KIND, headline
from fedlora.core.run_dir import RunDir, as_run_dir

CLIENT_COLUMNS = (
    "partition",
    "tasks",
    "train_examples",
    "final_exact_match",
    "final_round",
    "local_exact_match",
    "local_round",
    "epsilon",
    "rounds_participated",
    "rounds_evaluated",
)
_CLIENT_HEADER = (
    "partition",
    "tasks",
    "train examples",
    "final global EM",
    "(round)",
    "local EM",
    "(round)",
    "epsilon",
    "rounds trained",
    "rounds evaluated",
)

# ------------------------------------------------------------------------------------------ rows


def section(row: Mapping[str, Any], key: str) -> dict[str, Any]:
    """A sub-dict of a row; missing, null or empty all read as ``{}`` (failed or unevaluated rounds)."""
    value = row.get(key)
    return value if isinstance(value, dict) else {}


def finite(value: Any) -> float | None:
    """A finite float, or None for missing, null, non-numeric, NaN or infinite values."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def _partition(metrics: Any) -> int | None:
    if not isinstance(metrics, dict):
        return None
    p = finite(metrics.get("partition-id"))
    return int(p) if p is not None else None


def dp_label(config: Mapping[str, Any], rows: Sequence[Mapping[str, Any]] = ()) -> str:
    """``"DP off"`` or ``"DP, target ε = 8"`` (plus the largest epsilon the run reported, when it did)."""
    if not bool(config.get("dp.enabled", False)):
        return "DP off"
    parts = ["DP"]
    target = finite(config.get("dp.target-epsilon"))
    if target:
        parts.append(f"target ε = {target:g}")
    reached = [e for row in rows if (e := finite(section(row, "train").get("epsilon-max"))) is not None]
    if reached:
        parts.append(f"reached ε = {max(reached):.3g}")
    return ", ".join(parts)


def run_title(config: Mapping[str, Any], rows: Sequence[Mapping[str, Any]] = ()) -> str:
    """Strategy, client count and privacy of a run, for figure titles."""
    strategy = str(config.get("strategy", "") or "unknown strategy")
    bits = [strategy]
    if config.get("num-clients"):
        bits.append(f"{config['num-clients']} clients")
    if config.get("partition.scheme"):
        bits.append(f"partition {config['partition.scheme']}")
    bits.append(dp_label(config, rows))
    return " — ".join(bits)


# ------------------------------------------------------------------------------------------ figures


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no data: {what}", ha="center", va="center", transform=ax.transAxes, color="grey")


def _plot_train_loss(ax: Axes, rows: Sequence[Mapping[str, Any]]) -> None:
    """The clients' training loss; under DP, where clients keep it to themselves, their test loss."""
    points = [(r["round"], v) for r in rows if (v := finite(section(r, "train").get("train-loss"))) is not None]
    what = "train"
    if not points:
        points = [(r["round"], v) for r in rows if (v := finite(section(r, "evaluate").get("eval-loss"))) is not None]
        what = "test"
    if points:
        ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=f"{what} loss (weighted mean)")
        ax.legend(fontsize="small")
    else:
        _no_data(ax, "no round reported a train or test loss")
    ax.set_xlabel("server round")
    ax.set_ylabel(f"{what} loss")
    ax.set_title("Training loss" if what == "train" else "Test loss (DP clients keep their train loss)")


def _plot_exact_match(ax: Axes, rows: Sequence[Mapping[str, Any]], metric: str) -> None:
    fed: list[tuple[int, float, float, float]] = []
    tasks: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        ev = section(row, "evaluate")
        mean = finite(ev.get("exact-match"))
        if mean is not None:
            low = finite(ev.get("exact-match-min"))
            high = finite(ev.get("exact-match-max"))
            fed.append((row["round"], mean, mean if low is None else low, mean if high is None else high))
        for task, metrics in section(row, "server-eval").items():
            em = finite(metrics.get("exact-match")) if isinstance(metrics, dict) else None
            if em is not None:
                tasks.setdefault(str(task), []).append((row["round"], em))
    if fed:
        rounds, means, lows, highs = zip(*fed, strict=True)
        (line,) = ax.plot(rounds, means, marker="o", markersize=3, label="federated eval (mean over clients)")
        ax.fill_between(rounds, lows, highs, color=line.get_color(), alpha=0.2, label="client min–max")
    for task, points in sorted(tasks.items()):
        ax.plot(*zip(*points, strict=True), linestyle="--", marker=".", label=f"server eval: {task}")
    if fed or tasks:
        ax.legend(fontsize="small")
    else:
        _no_data(ax, "no round was evaluated")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("server round")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric.capitalize()} of the global model")


def _plot_client_spread(ax: Axes, rows: Sequence[Mapping[str, Any]], metric: str) -> None:
    per_round: list[tuple[int, list[float]]] = []
    for row in rows:
        clients = [m for m in section(row, "per-client").values() if isinstance(m, dict)]
        values = [v for m in clients if (v := finite(m.get("exact-match"))) is not None]
        if values:
            per_round.append((row["round"], values))
    if per_round:
        ax.boxplot(
            [v for _, v in per_round],
            positions=[r for r, _ in per_round],
            widths=0.6,
            manage_ticks=False,
            flierprops={"markersize": 3},
        )
        ax.set_xlim(min(r for r, _ in per_round) - 0.7, max(r for r, _ in per_round) + 0.7)
    else:
        _no_data(ax, "no per-client evaluation")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("server round")
    ax.set_ylabel(f"{metric} per client")
    ax.set_title("Per-client accuracy spread")


def training_figure(config: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> Figure:
    """The three-panel training figure, built without pyplot (safe headless and in threads)."""
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    _plot_train_loss(axes[0], rows)
    metric = headline(str(config.get("model.kind", DEFAULT_KIND)))
    _plot_exact_match(axes[1], rows, metric)
    _plot_client_spread(axes[2], rows, metric)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.suptitle(run_title(config, rows))
    return fig


def save_figure(fig: Figure, stem: Path) -> list[Path]:
    """PNG (for reading) and PDF (vector, for papers) next to each other, without volatile metadata."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    png, pdf = stem.with_suffix(".png"), stem.with_suffix(".pdf")
    fig.savefig(png, format="png", dpi=150, metadata={"Software": None})
    fig.savefig(pdf, format="pdf", metadata={"Creator": None, "Producer": None, "CreationDate": None})
    return [png, pdf]


def write_training_plots(run_dir: Path | str | RunDir) -> list[Path]:
    """Write ``report/training.{png,pdf}`` for the run; panels without data say so instead of failing."""
    run = as_run_dir(run_dir)
    fig = training_figure(run.config(missing_ok=True), run.rounds())
    return save_figure(fig, run.training_stem)


# ------------------------------------------------------------------------------------------ client table


def client_table(run_dir: Path | str | RunDir) -> list[dict[str, Any]]:
    """One row per partition id (in ``partition.json`` or seen in the metrics), keys :data:`CLIENT_COLUMNS`.

    ``final_exact_match`` is the global model's exact match on that client's data in the last round it
    was evaluated (``final_round``); ``local_exact_match`` is what the client measured after its own last
    local training that reported it (``local_round``); ``epsilon`` is the lifetime epsilon it reported at
    its last participation (DP only). Missing values are None.
    """
    run = as_run_dir(run_dir)
    rows = run.rounds()
    summary = run.partition_summary() or {}
    sizes = summary.get("client_sizes") or []
    task_counts = summary.get("client_task_counts") or []
    partitions: set[int] = set(range(max(len(sizes), len(task_counts))))
    trained: dict[int, list[tuple[int, dict[str, Any]]]] = {}
    evaluated: dict[int, list[tuple[int, dict[str, Any]]]] = {}
    for row in rows:
        for key, into in (("per-client-train", trained), ("per-client", evaluated)):
            for metrics in section(row, key).values():
                p = _partition(metrics)
                if p is not None:
                    into.setdefault(p, []).append((row["round"], metrics))
                    partitions.add(p)

    table: list[dict[str, Any]] = []
    for p in sorted(partitions):
        train = trained.get(p, [])
        evals = [(r, em) for r, m in evaluated.get(p, []) if (em := finite(m.get("exact-match"))) is not None]
        local = [(r, em) for r, m in train if (em := finite(m.get("local-exact-match"))) is not None]
        eps = [e for _, m in train if (e := finite(m.get("epsilon"))) is not None]
        reported = [n for _, m in train if (n := finite(m.get("num-examples")))]
        counts = task_counts[p] if p < len(task_counts) and isinstance(task_counts[p], dict) else {}
        if p < len(sizes) and finite(sizes[p]) is not None:
            examples: int | None = int(sizes[p])
        else:
            examples = int(max(reported)) if reported else None
        table.append(
            {
                "partition": p,
                "tasks": ", ".join(f"{task}: {int(n)}" for task, n in counts.items()),
                "train_examples": examples,
                "final_exact_match": evals[-1][1] if evals else None,
                "final_round": evals[-1][0] if evals else None,
                "local_exact_match": local[-1][1] if local else None,
                "local_round": local[-1][0] if local else None,
                "epsilon": eps[-1] if eps else None,
                "rounds_participated": len({r for r, _ in train}),
                "rounds_evaluated": len({r for r, _ in evaluated.get(p, [])}),
            }
        )
    return table


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_client_table(run_dir: Path | str | RunDir) -> list[Path]:
    """Write ``report/clients.csv`` (machine-readable, empty cell = missing) and ``report/clients.md``."""
    run = as_run_dir(run_dir)
    table = client_table(run)
    csv_path, md_path = run.clients_csv, run.clients_md
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CLIENT_COLUMNS)
        writer.writeheader()
        writer.writerows({k: "" if row[k] is None else row[k] for k in CLIENT_COLUMNS} for row in table)
    config = run.config(missing_ok=True)
    lines = [
        f"# Clients: {run.root.name}",
        "",
        f"{run_title(config)}. One row per virtual client (partition id); node ids change between runs.",
        "",
        "| " + " | ".join(_CLIENT_HEADER) + " |",
        "|" + "|".join("---" for _ in _CLIENT_HEADER) + "|",
        *("| " + " | ".join(_cell(row[k]) for k in CLIENT_COLUMNS) + " |" for row in table),
        "",
        "Final global EM: the global model on the client's evaluation data, in the last round the client was "
        "evaluated. Local EM: what the client measured after its own last local training. Epsilon: the lifetime "
        "epsilon the client reported at its last participation (DP runs only). — means not reported.",
        "",
    ]
    md_path.write_text("\n".join(lines), encoding="utf-8")
    return [csv_path, md_path]


__all__ = [
    "CLIENT_COLUMNS",
    "client_table",
    "dp_label",
    "finite",
    "run_title",
    "save_figure",
    "section",
    "training_figure",
    "write_client_table",
    "write_training_plots",
]
