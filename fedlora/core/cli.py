"""Helpers every console script shares: run-config pairs, following a run's progress, the
summary a user reads when a run ends, and publishing a finished run's adapter to the hub."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console

from fedlora.core.config import DEFAULT_RUN_CONFIG
from fedlora.core.kinds import DEFAULT_KIND, headline
from fedlora.core.run_dir import RunDir
from fedlora.privacy.report import client_label


def resume_config(run_dir: Path) -> dict[str, Any]:
    """The run config of an interrupted run, from its ``config.json``, marked to resume."""

    run = RunDir(run_dir)
    if not run.config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: no {run.config_path.name} (nothing to resume)")
    config = {k: v for k, v in run.config().items() if k in DEFAULT_RUN_CONFIG}
    return config | {"resume": True, "run-dir": str(run_dir)}


class Progress:
    """Follows ``metrics.jsonl`` while the run goes and prints one line per finished round."""

    def __init__(self, console: Console, run_dir: Path, rounds: int, start_round: int = 0) -> None:
        self.console = console
        self.run = RunDir(run_dir)
        self.rounds = rounds
        self.seen = start_round
        self.start_round = start_round
        self.t0: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._metric: str | None = None

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._poll()

    def _follow(self) -> None:
        while not self._stop.wait(0.5):
            self._poll()

    def _poll(self) -> None:
        for row in self.run.rows(missing_ok=True):  # a line still being written is skipped
            r = row["round"]
            if r == self.start_round and self.t0 is None:
                self.t0 = float(row.get("elapsed", 0.0))  # round 0 (or the resumed round): the clock's origin
            if r > self.seen:
                self.seen = r
                self.console.print(self.describe(row), soft_wrap=True)

    def metric(self) -> str:
        """The run's headline metric (exact match, or a classifier's accuracy), once its config is written."""
        if self._metric is None and self.run.config_path.is_file():
            self._metric = run_metric(self.run)
        return self._metric or "exact match"

    def describe(self, row: Mapping[str, Any]) -> str:
        r = int(row["round"])
        train, ev = row.get("train") or {}, row.get("evaluate") or {}
        parts = [f"round {r}/{self.rounds}"]
        parts.append(
            f"clients {int(train.get('accepted', 0))}/{int(train.get('sampled', 0))} replied"
            + (f", {int(train['rejected'])} rejected" if train.get("rejected") else "")
            + (f", {int(train['declined'])} declined" if train.get("declined") else "")
        )
        if "train-loss" in train:
            parts.append(f"loss {train['train-loss']:.3f}")
        elif "eval-loss" in ev:  # DP clients do not report their training loss
            parts.append(f"test loss {ev['eval-loss']:.3f}")
        metric = self.metric()
        if "exact-match" in ev:
            parts.append(f"{metric} {ev['exact-match']:.3f}")
        else:  # no evaluation round trip (deployment): the clients' own test splits after training
            local = [
                m["local-exact-match"] for m in (row.get("per-client-train") or {}).values() if "local-exact-match" in m
            ]
            if local:
                parts.append(f"local {metric} {sum(local) / len(local):.3f}")
        server_eval = [t["exact-match"] for t in (row.get("server-eval") or {}).values() if "exact-match" in t]
        if server_eval:
            parts.append(f"server {metric} {sum(server_eval) / len(server_eval):.3f}")
        if "epsilon-max" in train:
            parts.append(f"max ε {train['epsilon-max']:.2f}")
        if row.get("failed"):
            parts.append(f"[red]failed: {row['failed']}[/red]")
        elapsed = float(row.get("elapsed", 0.0))  # the server's clock: excludes start-up
        if self.t0 is None:
            self.t0 = elapsed if r == self.start_round else 0.0
        done = r - self.start_round
        left = (self.rounds - r) * (elapsed - self.t0) / done if done > 0 else 0.0
        parts.append(f"{_clock(elapsed)} elapsed, ~{_clock(left)} left")
        return "  ".join(parts)


def _clock(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m}:{s:02d}"


_HINTS = (
    ("longer than the model's", "records too long for the model: pass --max-length to truncate them"),
    ("too small for DP-SGD's Poisson batches", "the DP batch is too small for the clients' data: see the reason"),
    ("Per sample gradient", "per-example gradients failed: target other modules with --targets, or use --no-dp"),
    (
        "flattens examples before",
        "the model folds a batch's examples together before the layers named, so DP-SGD cannot clip per example "
        "there: leave them out of LoRA with the --targets the reason gives, or use --no-dp",
    ),
)


def run_metric(run: RunDir) -> str:
    """What a run's headline metric is called: exact match, or a classifier's accuracy."""
    config = run.config() if run.config_path.is_file() else {}
    return headline(str(config.get("model.kind", DEFAULT_KIND)))


def never_accepted(run_dir: Path) -> str | None:
    """Why a finished run accomplished nothing, or None: no round accepted a single reply. The
    reasons the server logged for every dropped or declined reply are counted, most common first."""
    rows = [r for r in RunDir(run_dir).rounds() if int(r.get("round", 0)) > 0]
    if not rows or any(int((r.get("train") or {}).get("accepted", 0)) > 0 for r in rows):
        return None
    reasons: Counter[str] = Counter(str(v) for r in rows for v in (r.get("dropped") or {}).values())
    lines = [f"no client reply was accepted in any of {len(rows)} round(s); the global adapter never changed"]
    lines += [f"  {n} x {reason}" for reason, n in reasons.most_common(5)]
    lines += [f"  hint: {hint}" for needle, hint in _HINTS if any(needle in reason for reason in reasons)]
    return "\n".join(lines)


def summary(run_dir: Path) -> list[str]:
    """What a user wants to read when a run ends: per-task accuracy before and after, epsilon
    per client, and where the adapter and the reports are."""

    run = RunDir(run_dir)
    rows = run.rounds()
    metric = run_metric(run)
    lines: list[str] = []
    first = next((r["server-eval"] for r in rows if r.get("server-eval")), None)
    last = next((r["server-eval"] for r in reversed(rows) if r.get("server-eval")), None)
    if first and last:
        lines.append(f"{metric} per task (server test sets), before -> after:")
        for task in last:
            before = first.get(task, {}).get("exact-match", float("nan"))
            f1 = last[task].get("macro-f1")
            extra = f"  (macro-F1 {f1:.2f})" if isinstance(f1, float) else ""
            lines.append(f"  {task:<14} {before:.2f} -> {last[task]['exact-match']:.2f}{extra}")
    ev = next((r["evaluate"] for r in reversed(rows) if r.get("evaluate")), None)
    if ev:
        lines.append(
            f"clients' own test splits: {metric} {ev['exact-match']:.3f} "
            f"(min {ev.get('exact-match-min', float('nan')):.2f}, max {ev.get('exact-match-max', float('nan')):.2f})"
        )
    report = run.privacy_report()
    if report is not None:
        if report.get("dp_enabled"):
            eps = ", ".join(f"{client_label(c)}: {c['epsilon']:.2f}" for c in report.get("clients", []))
            lines.append(f"epsilon per client (delta {report.get('delta')}): {eps}")
        else:
            lines.append("differential privacy: off")
    p = run.personalize()
    if p is not None:
        if p.get("personalised"):
            line = f"personalised on {p['personalised']}/{p['asked']} clients ({p['steps']} steps each)"
            if "personal-exact-match-mean" in p:  # the clients whose policy lets their scores leave
                line += (
                    f": exact match on their own test splits {p['global-exact-match-mean']:.3f} -> "
                    f"{p['personal-exact-match-mean']:.3f}"
                )
            else:
                line += ": their scores stay on the clients (their privacy policy, DP run)"
            lines.append(line)
    personal_eval = run.personal_eval()
    if personal_eval is not None:
        lines.append(summary_line(personal_eval))
    for label, path in (
        ("global adapter", run.global_adapter_dir),
        ("personal adapters", run.personal_dir),
        ("personal x clients", run.personal_eval_md),
        ("privacy report", run.privacy_md),
        ("training plots", run.training_stem.with_suffix(".png")),
        ("per-client table", run.clients_md),
        ("metrics", run.metrics_path),
    ):
        if path.exists():
            lines.append(f"{label + ':':<18}{path}")
    return lines


def report_published(publisher: Any, rounds: int, console: Console) -> int:
    """Publish the final adapter of a completed run (``--hub``) and say what went where; 3 if
    the hub failed (the run itself is complete: ``fl-hub publish-run`` retries)."""
    if publisher is None:
        return 0
    publisher.finish(rounds)
    for server_round, what in sorted(publisher.published.items()):
        console.print(f"published round {server_round} to the hub as {what}", markup=False, highlight=False)
    if publisher.personal:
        console.print(f"published personal adapters: {', '.join(publisher.personal)}", markup=False, highlight=False)
    if publisher.errors:
        err = Console(stderr=True, soft_wrap=True)
        for message in publisher.errors:
            err.print(f"hub: publishing failed: {message}", markup=False, highlight=False)
        err.print(f"retry with: fl-hub publish-run {publisher.run_dir} --hub {publisher.target.url} ...", markup=False)
        return 3
    return 0


def summary_line(report: dict[str, Any]) -> str:
    parts = [f"personal adapters on their own clients' test splits {report['personal_own_mean']:.3f}"]
    if report.get("personal_others_mean") is not None:
        parts.append(f"on other clients' {report['personal_others_mean']:.3f}")
    if report.get("global_mean") is not None:
        parts.append(f"global adapter {report['global_mean']:.3f}")
    return ", ".join(parts) + " (exact match)"
