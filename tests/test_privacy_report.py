"""The privacy report: every epsilon recomputable from the run directory, the HTML readable offline.

No Flower run: each test builds a synthetic run directory with the files the server writes
(``config.json``, ``privacy_plan.json``, ``metrics.jsonl``) and real ledgers charged through
``PrivacyLedger.charge``, exactly as the client app charges them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from fedlora.core.reports import write_privacy_report
from fedlora.privacy.accounting import compute_epsilon
from fedlora.privacy.ledger import LedgerError, PrivacyLedger
from fedlora.privacy.report import PRIVACY_UNIT, ReportError
from fedlora.server.cli import main

pytestmark = [
    pytest.mark.filterwarnings("ignore:Optimal order:UserWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

NUM_TRAIN = 300
DELTA = 1e-4  # default_delta(300): dp.delta = 0 means derived from num-train
SIGMA, Q, STEPS, C = 0.7, 32 / NUM_TRAIN, 10, 1.0
RUN = "run-b"
NODES = {0: "111", 1: "222"}


def _config(run_dir: Path, *, dp: bool = True, state_dir: str = "") -> dict[str, Any]:
    return {
        "strategy": "ffa-lora",
        "num-rounds": 2,
        "num-clients": 3,
        "local-steps": STEPS,
        "num-train": NUM_TRAIN,
        "run-dir": str(run_dir),
        "state-dir": state_dir,
        "dp.enabled": dp,
        "dp.noise-multiplier": 0.0,
        "dp.target-epsilon": 8.0,
        "dp.delta": 0.0,
        "dp.max-grad-norm": C,
        "dp.accountant": "rdp",
        "dp.max-epsilon": 0.0,
    }


def _client_metrics(partition: int, ledger: PrivacyLedger) -> dict[str, float]:
    """What the client app reports after charging: its lifetime epsilon from the ledger."""
    return {
        "num-examples": float(NUM_TRAIN),
        "partition-id": float(partition),
        "epsilon": ledger.epsilon(DELTA, "rdp"),
        "delta": DELTA,
        "noise-multiplier": SIGMA,
        "sample-rate": Q,
        "dp-steps": float(sum(n for _, _, n in ledger.history())),
    }


def make_run(tmp_path: Path, *, dp: bool = True, state_dir: Path | None = None) -> Path:
    """A 2-round run of 3 clients: partition 0 trains both rounds (and an earlier run), partition 1
    trains round 1 and declines round 2, partition 2 is never sampled."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = _config(run_dir, dp=dp, state_dir=str(state_dir) if state_dir else "")
    (run_dir / "config.json").write_text(json.dumps(config))
    rows: list[dict[str, Any]] = []
    if dp:
        states = state_dir or run_dir / "client-state"
        ledgers = {p: PrivacyLedger(states / f"partition-{p}") for p in (0, 1)}
        ledgers[0].charge("run-a", 1, 1.5, 0.05, 4, accountant="rdp", delta=DELTA)  # an earlier run, other (sigma, q)
        plan = {"target_epsilon": 8.0, "delta": DELTA, "sample_rate": Q, "noise_multiplier_used": SIGMA}
        (run_dir / "privacy_plan.json").write_text(json.dumps(plan | {"max_grad_norm": C}))
        for rnd, partitions in ((1, (0, 1)), (2, (0,))):
            per_client = {}
            for p in partitions:
                ledgers[p].charge(RUN, rnd, SIGMA, Q, STEPS, accountant="rdp", delta=DELTA)
                per_client[NODES[p]] = _client_metrics(p, ledgers[p])
            dropped = {NODES[1]: "privacy budget: past dp.max-epsilon"} if rnd == 2 else {}
            rows.append({"round": rnd, "train": {}, "per-client-train": per_client, "dropped": dropped})
    else:
        rows = [{"round": r, "train": {}, "per-client-train": {}, "dropped": {}} for r in (1, 2)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def test_report_files_exist(tmp_path: Path) -> None:
    paths = write_privacy_report(make_run(tmp_path))
    for path in (paths.json, paths.markdown, paths.html):
        assert path.is_file() and path.parent.name == "report" and path.stat().st_size > 0
    assert {paths.json.name, paths.markdown.name, paths.html.name} == {"privacy.json", "privacy.md", "privacy.html"}


def test_json_epsilon_is_compute_epsilon_of_the_ledger_and_recomputes_from_its_own_history(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    report = json.loads(write_privacy_report(run_dir).json.read_text())
    clients = {cl["partition"]: cl for cl in report["clients"]}
    assert sorted(clients) == [0, 1, 2]
    for p, cl in clients.items():
        ledger = PrivacyLedger(run_dir / "client-state" / f"partition-{p}")
        assert cl["epsilon"] == compute_epsilon(ledger.history(), DELTA, "rdp")
        own = [(h["noise_multiplier"], h["sample_rate"], h["steps"]) for h in cl["history"]]
        assert own == ledger.history()
        assert compute_epsilon(own, cl["delta"], cl["accountant"]) == cl["epsilon"]
    assert clients[2]["epsilon"] == 0.0 and clients[2]["history"] == []
    assert (clients[0]["rounds_taken_part_in"], clients[0]["runs"], clients[0]["steps"]) == (3, ["run-a", RUN], 24)
    assert clients[0]["noise_multipliers"] == [1.5, SIGMA] and clients[0]["max_grad_norm"] == C
    assert clients[0]["rounds_in_this_run"] == [1, 2] and clients[1]["rounds_in_this_run"] == [1]
    # per-round epsilon is what the client reported; the last one is the ledger's lifetime epsilon
    assert clients[0]["epsilon_by_round"]["2"] == clients[0]["epsilon"]
    assert report["epsilon_max"] == clients[0]["epsilon"] and report["epsilon_median"] == clients[1]["epsilon"]
    assert (report["delta"], report["accountant"], report["privacy_unit"]) == (DELTA, "rdp", PRIVACY_UNIT)
    assert report["declined"] == [
        {"round": 2, "node_id": NODES[1], "partition": 1, "reason": "privacy budget: past dp.max-epsilon"}
    ]
    assert "config.json" in report["recompute"] and "metrics.jsonl" in report["recompute"]
    assert "privacy_ledger.json" in report["recompute"] and "privacy_plan.json" in report["recompute"]


def test_ledgers_in_a_shared_state_dir_outside_the_run_dir(tmp_path: Path) -> None:
    shared = tmp_path / "shared-state"
    report = json.loads(write_privacy_report(make_run(tmp_path, state_dir=shared)).json.read_text())
    client0 = report["clients"][0]
    assert client0["ledger"] == str(shared / "partition-0" / "privacy_ledger.json") and client0["ledger_found"]
    assert client0["epsilon"] == PrivacyLedger(shared / "partition-0").epsilon(DELTA, "rdp")


def test_html_is_self_contained(tmp_path: Path) -> None:
    page = write_privacy_report(make_run(tmp_path)).html.read_text()
    assert page.count('<img alt="') == 2 and page.count('src="data:image/png;base64,') == 2
    assert not re.search(r"https?://", page)
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", page)
    assert "<link" not in page and "<script" not in page and "@import" not in page
    assert "<style>" in page and "clipping norm C" in page


def test_markdown_states_headline_privacy_unit_and_declined(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    text = write_privacy_report(run_dir).markdown.read_text()
    epsilon0 = PrivacyLedger(run_dir / "client-state" / "partition-0").epsilon(DELTA, "rdp")
    assert f"max {epsilon0:.4g}" in text and "delta = 0.0001 (rdp accountant)" in text
    assert PRIVACY_UNIT in text
    assert "round 2: node 222 (partition 1) — privacy budget: past dp.max-epsilon" in text


def test_dp_off_says_so_without_epsilon(tmp_path: Path) -> None:
    paths = write_privacy_report(make_run(tmp_path, dp=False))
    report = json.loads(paths.json.read_text())
    assert report["dp_enabled"] is False and "epsilon_max" not in report and "clients" not in report
    for text in (paths.markdown.read_text(), paths.html.read_text()):
        assert "Differential privacy was off for this run" in text
        assert "epsilon over" not in text.lower()


@pytest.mark.parametrize("missing", ["config.json", "metrics.jsonl", "privacy_plan.json"])
def test_missing_file_is_named(tmp_path: Path, missing: str) -> None:
    run_dir = make_run(tmp_path)
    (run_dir / missing).unlink()
    with pytest.raises(ReportError, match=re.escape(str(run_dir / missing))):
        write_privacy_report(run_dir)


def test_corrupt_ledger_is_an_error_not_zero(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    (run_dir / "client-state" / "partition-1" / "privacy_ledger.json").write_text("{not json")
    with pytest.raises(LedgerError, match="partition-1"):
        write_privacy_report(run_dir)


def test_unnoised_round_reports_infinite_epsilon(tmp_path: Path) -> None:
    """sigma = 0 released a raw gradient: epsilon is infinite, and JSON (which has no infinity) says "inf"."""
    run_dir = make_run(tmp_path)
    PrivacyLedger(run_dir / "client-state" / "partition-2").charge(RUN, 2, 0.0, Q, 1, accountant="rdp", delta=DELTA)
    paths = write_privacy_report(run_dir)
    report = json.loads(paths.json.read_text())
    assert report["clients"][2]["epsilon"] == "inf" and report["epsilon_max"] == "inf"
    assert "max inf" in paths.markdown.read_text()


def test_cli_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = make_run(tmp_path)
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "Lifetime epsilon over 3 clients" in out and str(run_dir / "report" / "privacy.html") in out
    assert (run_dir / "report" / "privacy.json").is_file()


def test_cli_report_missing_run_dir_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "nowhere")]) == 1
    assert "nowhere" in capsys.readouterr().err
