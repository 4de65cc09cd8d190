"""The privacy report of a run: what each client spent, recomputable by anyone from the run directory.

A privacy officer should not have to trust our numbers. So the report is computed from nothing but
files in the run directory (``config.json``, ``privacy_plan.json``, ``metrics.jsonl``) and the client
ledgers in the state directory ``config.json`` names, recomputes every client's epsilon from its
ledger history with :func:`fedlora.privacy.accounting.compute_epsilon`, and writes that history into
``report/privacy.json`` next to the result, so the number can be checked again without us::

    report/privacy.json   every number, each client's full ledger history, and how to recompute
    report/privacy.md     headline, parameters, per-client table, privacy unit, declined clients
    report/privacy.html   the same, self-contained (inline CSS, plots as base64 PNG): opens offline

The layers are separate: the run directory's own reader (``fedlora.core.run_dir``, which this
package may not import) reads the files into :class:`RunRecords` (``fedlora.core.reports``),
:func:`build_report` is pure computation into a JSON-able dict, the renderers turn that dict into
Markdown and HTML, and :func:`write_report` writes the three files.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedlora.atomic import write_atomic
from fedlora.privacy.accounting import compute_epsilon
from fedlora.privacy.ledger import LEDGER_FILE, PrivacyLedger
from fedlora.privacy.planning import default_delta
from fedlora.privacy.units import PRIVACY_UNIT

REPORT_FORMAT = "fedlora-privacy-report"
REPORT_VERSION = 1
DP_OFF = "Differential privacy was off for this run (dp.enabled = false): no privacy guarantee, no epsilon."


class ReportError(RuntimeError):
    """The run directory cannot be reported on (a file missing or malformed); the message names the file."""


@dataclass(frozen=True)
class ReportPaths:
    """Where :func:`write_privacy_report` put the three report files."""

    json: Path
    markdown: Path
    html: Path


@dataclass(frozen=True)
class RunRecords:
    """Everything the report is computed from, as read from disk (``plan`` is None with DP off).

    ``sources`` names the files the numbers come from (``config``, ``plan``, ``metrics``), for the
    report's recomputation note."""

    run_dir: Path
    config: dict[str, Any]
    plan: dict[str, Any] | None
    rows: list[dict[str, Any]]
    state_root: Path
    ledgers: dict[int, PrivacyLedger]
    client_level: dict[str, Any] | None
    sources: Mapping[str, Path]


# ------------------------------------------------------------------------------------------ reading


def trained_partitions(rows: Sequence[Mapping[str, Any]]) -> set[int]:
    """The partitions of every client whose training reply the server accepted."""
    return {p for p, _ in _train_rows(rows)}


def _train_rows(rows: Sequence[Mapping[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """``(partition, metrics | {"round", "node"})`` for every accepted training reply, in round order."""
    out: list[tuple[int, dict[str, Any]]] = []
    for row in rows:
        for node, metrics in (row.get("per-client-train") or {}).items():
            if "partition-id" in metrics:
                out.append((int(metrics["partition-id"]), {**metrics, "round": int(row["round"]), "node": str(node)}))
    return out


# ------------------------------------------------------------------------------------------ computing


def reported_history(reported: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """A deployed client's lifetime ledger as it sent it with its latest reply (``ledger-noise``,
    ``ledger-rate``, ``ledger-steps``: public parameters only), shaped like
    :meth:`PrivacyLedger.summary`; None when the client sent none. Its ledger file stays on
    its own machine; the client recomputes the same epsilon from it."""
    for metrics in reversed(reported):
        noise, rate, steps = (metrics.get(k) for k in ("ledger-noise", "ledger-rate", "ledger-steps"))
        if isinstance(noise, list) and isinstance(rate, list) and isinstance(steps, list):
            if not len(noise) == len(rate) == len(steps):
                return None
            history = [
                {"noise_multiplier": float(s), "sample_rate": float(q), "steps": int(n)}
                for s, q, n in zip(noise, rate, steps, strict=True)
            ]
            return {
                "history": history,
                "total_steps": sum(h["steps"] for h in history),
                "rounds_taken_part_in": len(history),
                "runs": None,  # the run ids stay in the client's ledger
            }
    return None


def run_delta(config: Mapping[str, Any], plan: Mapping[str, Any] | None = None) -> float:
    """The delta every epsilon is stated at: ``dp.delta``, else the plan's (derived from the smallest
    client, which every client then uses), else derived from ``num-train`` as older runs did."""
    explicit = float(config.get("dp.delta", 0.0) or 0.0)
    if explicit > 0:
        return explicit
    if plan and float(plan.get("delta", 0.0) or 0.0) > 0:
        return float(plan["delta"])
    return default_delta(int(config["num-train"]))


def _number(value: float) -> float | str:
    """JSON has no infinity; an un-noised step (sigma = 0) makes epsilon ``"inf"``."""
    return value if math.isfinite(value) else "inf"


def _distinct(values: Sequence[float]) -> list[float]:
    return list(dict.fromkeys(values))


def build_report(run: RunRecords) -> dict[str, Any]:
    """The report as a JSON-able dict: every epsilon recomputed from the ledgers, nothing taken on trust."""
    cfg = run.config
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "run_dir": str(run.run_dir),
        "strategy": cfg.get("strategy"),
        "dp_enabled": bool(cfg.get("dp.enabled", False)),
        "rounds_completed": len({int(r["round"]) for r in run.rows if int(r["round"]) > 0}),
    }
    if run.client_level is not None:
        report["client_level_dp"] = {
            **run.client_level,
            "note": "a different privacy unit (one client's whole dataset); never combined with sample-level epsilon",
        }
    if not report["dp_enabled"]:
        report["statement"] = DP_OFF
        return report

    plan = run.plan or {}
    delta = run_delta(cfg, plan)
    accountant = str(cfg.get("dp.accountant", "rdp"))
    c = cfg.get("dp.max-grad-norm", plan.get("max_grad_norm"))
    by_partition: dict[int, list[dict[str, Any]]] = {}
    for partition, metrics in _train_rows(run.rows):
        by_partition.setdefault(partition, []).append(metrics)
    node_partition = {m["node"]: p for p, ms in by_partition.items() for m in ms}

    clients: list[dict[str, Any]] = []
    for partition, ledger in run.ledgers.items():
        reported = by_partition.get(partition, [])
        summary = ledger.summary(delta, accountant)
        source = "ledger"
        if not ledger.path.is_file() and (copy := reported_history(reported)) is not None:
            summary, source = copy, f"reported by the client with its round-{reported[-1]['round']} reply"
        history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in summary["history"]]
        epsilon = compute_epsilon(history, delta, accountant)
        names = [str(m["client-name"]) for m in reported if m.get("client-name")]
        clients.append(
            {
                "partition": partition,
                "client_name": names[-1] if names else None,
                "node_ids": list(dict.fromkeys(m["node"] for m in reported)),
                "ledger": str(ledger.path) if source == "ledger" else "on the client's machine",
                "ledger_found": ledger.path.is_file(),
                "history_source": source,
                "accountant": accountant,
                "delta": delta,
                "epsilon": _number(epsilon),
                "noise_multipliers": _distinct([h[0] for h in history]),
                "max_grad_norm": c,
                "sample_rates": _distinct([h[1] for h in history]),
                "steps": summary["total_steps"],
                "rounds_taken_part_in": summary["rounds_taken_part_in"],
                "runs": summary["runs"],
                "rounds_in_this_run": [m["round"] for m in reported],
                "epsilon_by_round": {str(m["round"]): _number(float(m["epsilon"])) for m in reported if "epsilon" in m},
                "history": summary["history"],
            }
        )
    finite = [float(cl["epsilon"]) if cl["epsilon"] != "inf" else math.inf for cl in clients]
    declined = []
    for row in run.rows:
        for node, reason in (row.get("dropped") or {}).items():
            declined.append(
                {
                    "round": int(row["round"]),
                    "node_id": str(node),
                    "partition": node_partition.get(str(node)),
                    "reason": str(reason),
                }
            )
    rounds_part = [cl["rounds_taken_part_in"] for cl in clients]
    config_file, plan_file, metrics_file = (run.sources[k].name for k in ("config", "plan", "metrics"))
    report |= {
        "privacy_unit": PRIVACY_UNIT,
        "accountant": accountant,
        "delta": delta,
        "epsilon_max": _number(max(finite)) if finite else 0.0,
        "epsilon_median": _number(statistics.median(finite)) if finite else 0.0,
        "parameters": {
            "accountant": accountant,
            "delta": delta,
            "noise_multiplier": plan.get("noise_multiplier_used", cfg.get("dp.noise-multiplier")),
            "max_grad_norm": c,
            "sample_rate": plan.get("sample_rate"),
            "local_steps_per_round": cfg.get("local-steps"),
            "planned_rounds": cfg.get("num-rounds"),
            "steps_min": min((cl["steps"] for cl in clients), default=0),
            "steps_max": max((cl["steps"] for cl in clients), default=0),
            "rounds_taken_part_in_min": min(rounds_part, default=0),
            "rounds_taken_part_in_max": max(rounds_part, default=0),
            "target_epsilon": plan.get("target_epsilon"),
            "max_epsilon_per_client": cfg.get("dp.max-epsilon") or None,
        },
        "plan": run.plan,
        "clients": clients,
        "declined": declined,
        "recompute": (
            f"Every epsilon here is compute_epsilon(history, delta, accountant) from privacy/accounting.py "
            f"(Opacus' {accountant.upper()} accountant) over the client's ledger history "
            f"[(noise_multiplier, sample_rate, steps), ...], read from {run.state_root}/partition-<p>/{LEDGER_FILE} "
            f"and copied into clients[].history. delta is dp.delta from {config_file}, or when 0 the plan's delta "
            f"in {plan_file}: the largest power of ten <= 1/(10 n), n the smallest client's training examples "
            f"(privacy/planning.default_delta), one delta for every client of the run. "
            f"C is dp.max-grad-norm in {config_file}; "
            f"the plan is {plan_file}; epsilon_by_round and the declined list are the per-client-train and dropped "
            f"fields of {metrics_file} (what each client reported after that round). The ledger is the lifetime "
            f"record: it also holds rounds of other runs sharing the state directory, and rounds charged whose "
            f"reply the server never accepted."
        ),
    }
    return report


# ------------------------------------------------------------------------------------------ rendering


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, list):
        return ", ".join(_fmt(v, digits) for v in value) or "—"
    return str(value)


def headline(report: Mapping[str, Any]) -> str:
    """One sentence: the largest and median lifetime epsilon, at which delta, by which accountant."""
    if not report["dp_enabled"]:
        return DP_OFF
    return (
        f"Lifetime epsilon over {len(report['clients'])} clients: max {_fmt(report['epsilon_max'])}, "
        f"median {_fmt(report['epsilon_median'])} at delta = {report['delta']:g} ({report['accountant']} accountant)"
    )


def parameter_rows(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(name, value) rows of the parameters table, shared by the Markdown and the HTML."""
    p = report["parameters"]

    def span(low: Any, high: Any) -> str:
        return str(low) if low == high else f"{low}–{high}"

    return [
        ("accountant", p["accountant"]),
        ("delta", f"{p['delta']:g}"),
        ("noise multiplier sigma", _fmt(p["noise_multiplier"], 6)),
        ("clipping norm C", _fmt(p["max_grad_norm"])),
        ("sample rate q", _fmt(p["sample_rate"])),
        ("local steps per round", _fmt(p["local_steps_per_round"])),
        ("planned rounds", _fmt(p["planned_rounds"])),
        ("DP-SGD steps per client (lifetime)", span(p["steps_min"], p["steps_max"])),
        ("rounds taken part in (lifetime)", span(p["rounds_taken_part_in_min"], p["rounds_taken_part_in_max"])),
        ("target epsilon (plan)", _fmt(p["target_epsilon"])),
        ("max epsilon per client (enforced)", _fmt(p["max_epsilon_per_client"])),
    ]


_CLIENT_HEADER = ("partition", "epsilon", "sigma", "C", "q", "steps", "rounds (lifetime)", "rounds this run", "runs")


def client_label(client: Mapping[str, Any]) -> str:
    """A deployed client's name, else its partition number."""
    return str(client.get("client_name") or client["partition"])


def client_rows(report: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """One row per client for the per-client table."""
    return [
        (
            client_label(cl) + ("" if cl["ledger_found"] or cl.get("client_name") else " (no ledger)"),
            _fmt(cl["epsilon"]),
            _fmt(cl["noise_multipliers"], 6),
            _fmt(cl["max_grad_norm"]),
            _fmt(cl["sample_rates"]),
            str(cl["steps"]),
            str(cl["rounds_taken_part_in"]),
            _fmt(cl["rounds_in_this_run"]),
            str(len(cl["runs"])) if cl["runs"] is not None else "—",
        )
        for cl in report["clients"]
    ]


def _declined_lines(report: Mapping[str, Any]) -> list[str]:
    return [
        f"round {d['round']}: node {d['node_id']}"
        + (f" (partition {d['partition']})" if d["partition"] is not None else "")
        + f" — {d['reason']}"
        for d in report["declined"]
    ]


def _client_level_lines(report: Mapping[str, Any]) -> list[str]:
    cl = report.get("client_level_dp")
    if cl is None:
        return []
    return [
        f"Client-level DP ({cl.get('clipping')} fixed clipping) also ran; its privacy unit is "
        f"{cl.get('privacy-unit')}, reported separately and never combined with the numbers above: "
        f"planned epsilon {_fmt(cl.get('epsilon-after-planned-rounds'))} at delta {_fmt(cl.get('delta'))}."
    ]


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report for people: headline first, then what it rests on."""
    lines = [f"# Privacy report: {report['run_dir']}", "", f"**{headline(report)}**", ""]
    if not report["dp_enabled"]:
        return "\n".join([*lines, *_client_level_lines(report), ""])
    lines += [
        f"**Privacy unit:** {report['privacy_unit']}.",
        "",
        "## Parameters",
        "",
        *_md_table(("parameter", "value"), parameter_rows(report)),
        "",
        "## Per client",
        "",
        *_md_table(_CLIENT_HEADER, client_rows(report)),
        "",
        "## Declined or dropped clients",
        "",
        *([f"- {line}" for line in _declined_lines(report)] or ["None: every sampled client's reply was accepted."]),
        "",
    ]
    extra = _client_level_lines(report)
    if extra:
        lines += ["## Client-level DP", "", *extra, ""]
    lines += ["## Recomputing these numbers", "", report["recompute"], ""]
    return "\n".join(lines)


def _png(fig: Figure) -> str:
    """A figure as a base64 PNG, rendered by Agg without pyplot's global state."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plot_epsilon_over_rounds(report: Mapping[str, Any]) -> str:
    """Each client's reported lifetime epsilon after each round of this run (base64 PNG)."""
    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = fig.add_subplot()
    plotted = False
    for cl in report["clients"]:
        points = sorted((int(r), float(e)) for r, e in cl["epsilon_by_round"].items())
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=f"partition {cl['partition']}")
            plotted = True
    target = report["parameters"]["target_epsilon"]
    if target:
        ax.axhline(float(target), color="grey", linestyle="--", linewidth=1, label="target epsilon")
    if plotted:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no client trained in this run", ha="center", va="center", transform=ax.transAxes)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("server round")
    ax.set_ylabel(f"epsilon at delta {report['delta']:g}")
    ax.set_title("Lifetime epsilon per client over rounds")
    return _png(fig)


def plot_final_epsilon(report: Mapping[str, Any]) -> str:
    """Final lifetime epsilon across clients as bars (base64 PNG)."""
    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = fig.add_subplot()
    names = [str(cl["partition"]) for cl in report["clients"]]
    values = [float(cl["epsilon"]) if cl["epsilon"] != "inf" else math.nan for cl in report["clients"]]
    ax.bar(names, values, color="#4c72b0")
    cap = report["parameters"]["max_epsilon_per_client"]
    if cap:
        ax.axhline(float(cap), color="#c44e52", linestyle="--", linewidth=1, label="max epsilon (enforced)")
        ax.legend(fontsize="small")
    ax.set_xlabel("partition")
    ax.set_ylabel(f"epsilon at delta {report['delta']:g}")
    ax.set_title("Final lifetime epsilon per client (recomputed from ledgers)")
    return _png(fig)


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; color: #222; line-height: 1.45; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
.headline { font-size: 1.15rem; font-weight: 600; padding: .6rem .8rem; background: #eef3fb; border-radius: 4px; }
table { border-collapse: collapse; margin: .5rem 0; } td, th { border: 1px solid #ccc; padding: .25rem .6rem; }
th { background: #f4f4f4; text-align: left; } td { font-variant-numeric: tabular-nums; }
img { max-width: 100%; } .note { color: #555; font-size: .9rem; }
"""


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(alt: str, png_base64: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{png_base64}">'


def render_html(report: Mapping[str, Any]) -> str:
    """One self-contained page: inline CSS, plots as data URIs, no external resource of any kind."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Privacy report: {esc(report['run_dir'])}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Privacy report: {esc(report['run_dir'])}</h1>",
        f'<p class="headline">{esc(headline(report))}</p>',
    ]
    if report["dp_enabled"]:
        declined = _declined_lines(report)
        parts += [
            f"<p><strong>Privacy unit:</strong> {esc(report['privacy_unit'])}.</p>",
            "<h2>Parameters</h2>",
            _html_table(("parameter", "value"), parameter_rows(report)),
            "<h2>Epsilon per client over rounds</h2>",
            _img("epsilon per client over rounds", plot_epsilon_over_rounds(report)),
            "<h2>Final epsilon across clients</h2>",
            _img("final epsilon per client", plot_final_epsilon(report)),
            "<h2>Per client</h2>",
            _html_table(_CLIENT_HEADER, client_rows(report)),
            "<h2>Declined or dropped clients</h2>",
            "<ul>" + "".join(f"<li>{esc(line)}</li>" for line in declined) + "</ul>"
            if declined
            else "<p>None: every sampled client's reply was accepted.</p>",
        ]
    parts += [f"<p>{esc(line)}</p>" for line in _client_level_lines(report)]
    if report["dp_enabled"]:
        parts += ["<h2>Recomputing these numbers</h2>", f'<p class="note">{esc(report["recompute"])}</p>']
    parts.append("</body></html>\n")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------ writing


def write_report(run: RunRecords, paths: ReportPaths) -> dict[str, Any]:
    """Compute the report of ``run``, write it to ``paths`` (JSON, Markdown, HTML), return it.

    Raises
    ------
    fedlora.privacy.ledger.LedgerError
        If a client ledger exists but cannot be trusted (never read as zero).
    """
    report = build_report(run)
    write_atomic(paths.json, (json.dumps(report, indent=2, allow_nan=False) + "\n").encode())
    write_atomic(paths.markdown, render_markdown(report).encode())
    write_atomic(paths.html, render_html(report).encode())
    return report


__all__ = [
    "PRIVACY_UNIT",
    "ReportError",
    "ReportPaths",
    "RunRecords",
    "build_report",
    "headline",
    "render_html",
    "render_markdown",
    "trained_partitions",
    "write_report",
]
