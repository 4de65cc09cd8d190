"""The reports of a run, from its run directory alone: the privacy report (computed by
:mod:`fedlora.privacy.report`, which may not read the run directory itself), the training
plots and the per-client table (:mod:`fedlora.core.plots`).

The server app writes them when a run ends; ``fl-sim report`` and ``fl-server report`` write
them again, also for a run that was killed (its torn last metrics line is skipped).
"""

from __future__ import annotations

from pathlib import Path

from fedlora.core.plots import write_client_table, write_training_plots
from fedlora.core.run_dir import RunDir, as_run_dir
from fedlora.privacy.ledger import LEDGER_FILE, PrivacyLedger
from fedlora.privacy.report import ReportError, ReportPaths, RunRecords, trained_partitions, write_report


def privacy_records(run_dir: str | Path | RunDir) -> RunRecords:
    """What the privacy report is computed from: ``config.json``, ``metrics.jsonl``, with DP on
    ``privacy_plan.json``, and the ledger of every client known to the run.

    Raises ReportError naming the file if one of them is missing or malformed.
    """
    run = as_run_dir(run_dir)
    if not run.root.is_dir():
        raise ReportError(f"{run.root}: run directory does not exist")
    try:
        config = run.config()
        rows = run.rows()
        plan = run.plan() if config.get("dp.enabled", False) else None
        client_level = run.client_level_dp()
    except (FileNotFoundError, ValueError) as error:
        raise ReportError(str(error)) from None
    state_dir = str(config.get("state-dir", "") or "")
    # deployed nodes are numbered by a hash of their names: only those that trained are known
    partitions = set() if config.get("deployed") else set(range(int(config.get("num-clients", 0))))
    partitions |= trained_partitions(rows)
    partitions |= {p for p, d in run.client_state_dirs(state_dir).items() if (d / LEDGER_FILE).is_file()}
    ledgers = {p: PrivacyLedger(run.client_state_dir(p, state_dir)) for p in sorted(partitions)}
    sources = {"config": run.config_path, "plan": run.plan_path, "metrics": run.metrics_path}
    return RunRecords(run.root, config, plan, rows, run.client_state_root(state_dir), ledgers, client_level, sources)


def write_privacy_report(run_dir: str | Path | RunDir) -> ReportPaths:
    """Write ``report/privacy.{json,md,html}`` of a run directory; returns their paths.

    Raises
    ------
    ReportError
        If ``config.json``, ``metrics.jsonl`` (or, with DP on, ``privacy_plan.json``) is missing or malformed.
    fedlora.privacy.ledger.LedgerError
        If a client ledger exists but cannot be trusted (never read as zero).
    """
    run = as_run_dir(run_dir)
    records = privacy_records(run)
    paths = ReportPaths(run.privacy_json, run.privacy_md, run.privacy_html)
    write_report(records, paths)
    return paths


def write_plots(run_dir: str | Path | RunDir) -> list[Path]:
    """``report/training.{png,pdf}`` and ``report/clients.{csv,md}``; returns their paths."""
    return [*write_training_plots(run_dir), *write_client_table(run_dir)]
