"""The simulation report: training figures, the per-client table and the strategy comparison.

No Flower run: each test writes a run directory by hand with the files the server app writes
(``config.json``, ``metrics.jsonl``, ``partition.json``), including the awkward cases a real run
produces (a resumed run repeating a round, failed rounds without evaluation, a base-model row 0).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest

from fedlora.core.plots import client_table, write_client_table, write_training_plots
from fedlora.core.reports import write_privacy_report
from fedlora.core.run_dir import RunDir
from fedlora.hub.sdk.publish import run_provenance
from fedlora.privacy.report import ReportError
from fedlora.simulations.compare_report import (
    RunResult,
    load_run_result,
    render_markdown,
    summarise,
    verdict,
    write_compare,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NODES = {0: "9001", 1: "9002", 2: "9003"}  # random node ids of this run -> partition id


def _config(**overrides: Any) -> dict[str, Any]:
    return {
        "strategy": "fedavg",
        "num-rounds": 3,
        "num-clients": 3,
        "lr": 1e-3,
        "seed": 0,
        "dp.enabled": False,
        "dp.target-epsilon": 8.0,
        "partition": "dirichlet",
        "tasks": "arith,copy",
        **overrides,
    }


def _round(r: int, em: float, *, bytes_each: int = 1000, eps: float | None = None, **extra: Any) -> dict[str, Any]:
    """A successful round: partitions 0 and 1 train, all three are evaluated."""
    train: dict[str, Any] = {
        "sampled": 2,
        "accepted": 2,
        "rejected": 0,
        "declined": 0,
        "bytes-sent": bytes_each,
        "bytes-received": bytes_each,
        "num-examples": 60.0,
        "train-loss": 2.0 / r,
        "update-norm": 0.5,
    }
    per_train: dict[str, dict[str, float]] = {}
    for p in (0, 1):
        m = {"num-examples": 30.0, "train-loss": 2.0 / r, "partition-id": float(p), "local-exact-match": em + 0.1}
        if eps is not None:
            m["epsilon"] = eps * (p + 1) / 2
        per_train[NODES[p]] = m
    if eps is not None:
        train["epsilon-max"] = eps
    per_client = {
        NODES[p]: {"num-examples": 10.0, "eval-loss": 1.0, "exact-match": em + 0.05 * (p - 1), "partition-id": float(p)}
        for p in range(3)
    }
    return {
        "round": r,
        "elapsed": 10.0 * r,
        "train": train,
        "evaluate": {
            "num-examples": 30.0,
            "clients": 3,
            "eval-loss": 1.0,
            "exact-match": em,
            "exact-match-min": em - 0.05,
            "exact-match-max": em + 0.05,
        },
        "per-client": per_client,
        "per-client-train": per_train,
        "server-eval": {
            "arith": {"exact-match": em - 0.1, "eval-loss": 1.2, "num-examples": 50},
            "copy": {"exact-match": em + 0.1, "eval-loss": 0.8, "num-examples": 50},
        },
        "dropped": {},
        "failed": None,
        **extra,
    }


def _write_run(
    run_dir: Path, rows: list[dict[str, Any]], config: dict[str, Any] | None = None, partition: bool = True
) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config or _config()))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if partition:
        counts = [{"arith": 20, "copy": 10}, {"arith": 5, "copy": 25}, {"copy": 30}]
        doc = {
            "format": 1,
            "spec": {"scheme": "dirichlet", "num_clients": 3, "seed": 0, "tasks": ["arith", "copy"]},
            "source": "embedded",
            "summary": {"client_sizes": [30, 30, 30], "client_task_counts": counts},
            "clients": [],
        }
        (run_dir / "partition.json").write_text(json.dumps(doc))
    return run_dir


def _typical_rows() -> list[dict[str, Any]]:
    """Base-model row 0, three rounds, round 2 failed (no evaluation), round 3 written twice (resume)."""
    base = {"round": 0, "elapsed": 0.0, "server-eval": {"arith": {"exact-match": 0.05, "num-examples": 50}}}
    failed = {"round": 2, "elapsed": 20.0, "train": {}, "evaluate": {}, "failed": "too few replies"}
    return [base, _round(1, 0.4), failed, _round(3, 0.1), _round(3, 0.7)]


# ------------------------------------------------------------------------------------------ plots.py


def test_rounds_sort_and_last_row_wins(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "run", [_round(2, 0.5), _round(1, 0.3), _round(2, 0.6)])
    rows = RunDir(run).rounds()
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[1]["evaluate"]["exact-match"] == 0.6
    assert [r["round"] for r in RunDir(run).rows()] == [2, 1, 2]  # as written


def test_a_torn_middle_line_is_refused_naming_file_and_line(tmp_path: Path) -> None:
    """Only the last line can be torn by a hard kill; a bad line before it is damage, never skipped."""
    run = _write_run(tmp_path / "run", [_round(1, 0.3)])
    with (run / "metrics.jsonl").open("a") as f:
        f.write("\n")
        f.write('{"round": 2, "train": \n')
        f.write(json.dumps(_round(3, 0.5)) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 3: not valid JSON"):
        RunDir(run).rows()
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 3: not valid JSON"):
        write_training_plots(run)
    with pytest.raises(ReportError, match=r"metrics\.jsonl, line 3: not valid JSON"):
        write_privacy_report(run)
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 3: not valid JSON"):
        RunDir(run).truncate_rows(1)  # a resume refuses too, and keeps the file as it is
    assert '{"round": 2, "train": \n' in (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text('{"elapsed": 1}\n')
    with pytest.raises(ValueError, match=r"line 1: expected an object with a 'round'"):
        RunDir(run).rows()
    (run / "metrics.jsonl").write_text('{"round": -1}\n')
    with pytest.raises(ValueError, match=r"line 1: 'round' must be a non-negative integer, got -1"):
        RunDir(run).rows()
    for bad in ("Infinity", "NaN", "1.5"):  # JSON that Python's parser takes, and no round number
        (run / "metrics.jsonl").write_text(f'{{"round": {bad}}}\n{{"round": 1}}\n')
        with pytest.raises(ValueError, match=r"metrics\.jsonl, line 1: 'round' must be a non-negative integer"):
            RunDir(run).rows()


def test_a_torn_last_line_is_skipped_by_every_reader(tmp_path: Path) -> None:
    """A hard kill mid-append leaves half a line at the end: every reader of the run directory
    reads the rows before it; a resume drops it."""
    rows = [_round(1, 0.3, eps=1.0), _round(2, 0.5, eps=2.0)]
    run = _write_run(tmp_path / "run", rows, _config(**{"dp.enabled": False}))
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"round": 3, "train": {"train-lo')
    rd = RunDir(run)
    assert [r["round"] for r in rd.rows()] == [1, 2] and rd.last_round() == 2
    assert [r["round"] for r in rd.rounds()] == [1, 2]
    assert [p.name for p in write_training_plots(run)] == ["training.png", "training.pdf"]
    assert [row["final_round"] for row in client_table(run)] == [2, 2, 2]
    assert json.loads(write_privacy_report(run).json.read_text())["rounds_completed"] == 2
    assert load_run_result(run, target=0.4).final_exact_match == pytest.approx(0.5)
    assert run_provenance(run, 2, final=False, producer="test")["evaluation"]["exact-match"] == pytest.approx(0.5)
    assert rd.truncate_rows(2) == 1  # the resume: the torn line goes, the rows stay
    assert (run / "metrics.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in rows)


def test_training_plots_are_written_and_valid(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "run", _typical_rows(), _config(**{"dp.enabled": True}))
    paths = write_training_plots(run)
    assert [p.name for p in paths] == ["training.png", "training.pdf"]
    assert all(p.parent == run / "report" for p in paths)
    assert paths[0].read_bytes().startswith(PNG_SIGNATURE)
    assert paths[1].read_bytes().startswith(b"%PDF")


def test_training_plots_without_any_data_do_not_crash(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "run", [{"round": 1, "failed": "no replies"}], partition=False)
    (run / "config.json").unlink()
    png, _ = write_training_plots(run)
    assert png.read_bytes().startswith(PNG_SIGNATURE)


def test_client_table(tmp_path: Path) -> None:
    rows = _typical_rows()
    rows[-1] = _round(3, 0.7, eps=4.0)
    del rows[-1]["per-client-train"][NODES[1]]["local-exact-match"]
    del rows[-1]["per-client"][NODES[2]]  # partition 2 not evaluated in round 3
    run = _write_run(tmp_path / "run", rows, _config(**{"dp.enabled": True}))
    table = {row["partition"]: row for row in client_table(run)}
    assert sorted(table) == [0, 1, 2]
    p0, p1, p2 = table[0], table[1], table[2]
    assert p0["tasks"] == "arith: 20, copy: 10" and p0["train_examples"] == 30
    assert p0["final_exact_match"] == pytest.approx(0.65) and p0["final_round"] == 3
    assert p0["local_exact_match"] == pytest.approx(0.8) and p0["local_round"] == 3
    assert p1["local_exact_match"] == pytest.approx(0.5) and p1["local_round"] == 1  # round 3 did not report it
    assert p0["epsilon"] == pytest.approx(2.0) and p1["epsilon"] == pytest.approx(4.0)
    assert p0["rounds_participated"] == 2 and p0["rounds_evaluated"] == 2
    # partition 2 never trained; its last evaluation was round 1
    assert p2["rounds_participated"] == 0 and p2["epsilon"] is None and p2["local_exact_match"] is None
    assert p2["final_exact_match"] == pytest.approx(0.45) and p2["final_round"] == 1

    csv_path, md_path = write_client_table(run)
    with csv_path.open() as f:
        parsed = list(csv.DictReader(f))
    assert [r["partition"] for r in parsed] == ["0", "1", "2"]
    assert float(parsed[0]["final_exact_match"]) == pytest.approx(0.65)
    assert parsed[2]["epsilon"] == ""
    md = md_path.read_text()
    assert "| 2 | copy: 30 | 30 |" in md and "DP" in md


def test_client_table_without_partition_manifest(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "run", [_round(1, 0.4)], partition=False)
    table = client_table(run)
    assert [r["partition"] for r in table] == [0, 1, 2]
    assert table[0]["tasks"] == "" and table[0]["train_examples"] == 30  # from num-examples reported
    assert table[2]["train_examples"] is None


# ------------------------------------------------------------------------------------------ compare_report.py


def _result(strategy: str, seed: int, final: float, lr: float = 1e-3, **kw: Any) -> RunResult:
    fields: dict[str, Any] = {
        "curve": (final / 2, final),
        "rounds_to_target": None,
        "bytes_communicated": 2_000_000,
        "epsilon": None,
        "run_dir": f"runs/{strategy}-{seed}-{lr:g}",
    }
    return RunResult(strategy=strategy, seed=seed, lr=lr, final_exact_match=final, **(fields | kw))


def _seeds(strategy: str, mean: float, sd: float, lr: float = 1e-3) -> list[RunResult]:
    """Three seeds with exactly this mean and sample sd: mean - sd, mean, mean + sd."""
    return [_result(strategy, s, mean + d * sd, lr) for s, d in enumerate((-1.0, 0.0, 1.0))]


def test_load_run_result(tmp_path: Path) -> None:
    rows = _typical_rows()
    rows[1] = _round(1, 0.4, bytes_each=500, eps=2.5)
    rows[-2] = _round(3, 0.9, bytes_each=10**9)  # overwritten by the resumed row: must not count
    rows[-1] = _round(3, 0.7, bytes_each=1500, eps=3.5)
    run = _write_run(tmp_path / "run", rows, _config(strategy="ffa-lora", seed=7, lr=2e-3))
    result = load_run_result(run, target=0.5)
    assert (result.strategy, result.seed, result.lr) == ("ffa-lora", 7, 2e-3)
    assert result.final_exact_match == pytest.approx(0.7)
    assert result.curve[0] == pytest.approx(0.4) and math.isnan(result.curve[1]) and len(result.curve) == 3
    assert result.rounds_to_target == 3
    assert load_run_result(run, target=0.4).rounds_to_target == 1
    assert load_run_result(run, target=0.95).rounds_to_target is None
    assert result.bytes_communicated == 2 * 500 + 2 * 1500  # failed round 2 sent nothing
    assert result.epsilon == pytest.approx(3.5)
    assert result.run_dir == str(run)


def test_load_run_result_final_is_last_evaluated_round(tmp_path: Path) -> None:
    rows = [_round(1, 0.3), _round(2, 0.6), {"round": 3, "train": {"bytes-sent": 10, "bytes-received": 10}}]
    result = load_run_result(_write_run(tmp_path / "run", rows), target=0.5)
    assert result.final_exact_match == pytest.approx(0.6) and result.epsilon is None
    with pytest.raises(ValueError, match="no round has an evaluated exact match"):
        load_run_result(_write_run(tmp_path / "empty", [{"round": 1, "failed": "x"}]), target=0.5)


def test_tie_rule() -> None:
    assert verdict(0.80, 0.05, 0.78, 0.04) == "tie"  # 0.02 <= max(0.05, 0.04)
    assert verdict(0.80, 0.01, 0.60, 0.02) == "worse"  # 0.20 > 0.02
    assert verdict(0.80, 0.01, 0.75, 0.05) == "tie"  # equal to the spread: not a win
    assert verdict(0.80, 0.0, 0.79, 0.0) == "worse"  # one seed each: no spread


def test_summarise_verdicts_and_centralised_reference() -> None:
    results = [
        *_seeds("fedavg", 0.80, 0.05),
        *_seeds("ffa-lora", 0.78, 0.04),
        *_seeds("flexlora", 0.60, 0.02),
        *_seeds("centralised", 0.90, 0.01),
    ]
    rows = {r.strategy: r for r in summarise(results)}
    assert [r.strategy for r in summarise(results)] == ["fedavg", "ffa-lora", "flexlora", "centralised"]
    assert rows["fedavg"].verdict == "best"
    assert rows["ffa-lora"].verdict == "tie"
    assert rows["flexlora"].verdict == "worse"
    assert rows["centralised"].verdict == "reference" and rows["centralised"].gap_to_centralised is None
    fedavg = rows["fedavg"]
    assert fedavg.final_em_mean == pytest.approx(0.80) and fedavg.final_em_sd == pytest.approx(0.05)
    assert (fedavg.final_em_min, fedavg.final_em_max) == pytest.approx((0.75, 0.85))
    assert fedavg.n_seeds == 3 and fedavg.seeds == (0, 1, 2)
    assert fedavg.gap_to_centralised == pytest.approx(-0.10)
    assert rows["flexlora"].gap_to_centralised == pytest.approx(-0.30)


def test_summarise_single_seed_has_zero_sd() -> None:
    rows = summarise([_result("fedavg", 0, 0.8), _result("ffa-lora", 0, 0.6)])
    assert [r.final_em_sd for r in rows] == [0.0, 0.0]
    assert [r.verdict for r in rows] == ["best", "worse"]


def test_summarise_picks_lr_with_best_mean() -> None:
    results = [
        *_seeds("fedavg", 0.50, 0.01, lr=1e-4),
        *_seeds("fedavg", 0.70, 0.01, lr=1e-3),
        *_seeds("fedavg", 0.65, 0.01, lr=1e-2),
        *_seeds("ffa-lora", 0.60, 0.01, lr=1e-3),
    ]
    rows = {r.strategy: r for r in summarise(results)}
    assert rows["fedavg"].lr == 1e-3 and rows["fedavg"].lr_grid == (1e-4, 1e-3, 1e-2)
    assert rows["fedavg"].final_em_mean == pytest.approx(0.70) and rows["fedavg"].n_seeds == 3
    assert rows["ffa-lora"].lr_grid == (1e-3,)
    assert "1e-3" not in render_markdown(list(rows.values()), "t", 0.5)  # lr printed as 0.001
    assert "0.001 (best of 0.0001, 0.001, 0.01)" in render_markdown(list(rows.values()), "t", 0.5)


def test_summarise_rounds_bytes_epsilon() -> None:
    results = [
        _result("dp", 0, 0.6, rounds_to_target=4, bytes_communicated=1_000_000, epsilon=3.0),
        _result("dp", 1, 0.6, rounds_to_target=6, bytes_communicated=3_000_000, epsilon=5.0),
        _result("dp", 2, 0.6, rounds_to_target=None, bytes_communicated=2_000_000, epsilon=4.0),
    ]
    (row,) = summarise(results)
    assert row.rounds_to_target_mean == pytest.approx(5.0) and row.reached_target == 2
    assert row.bytes_mean == pytest.approx(2_000_000) and row.epsilon_max == pytest.approx(5.0)


def test_write_compare(tmp_path: Path) -> None:
    results = [
        *_seeds("fedavg", 0.80, 0.05),
        *_seeds("ffa-lora", 0.60, 0.01),
        *_seeds("ffa-lora", 0.40, 0.01, lr=1e-2),
        _result("centralised", 0, 0.9, curve=(0.5, 0.8, 0.9)),
    ]
    paths = write_compare(tmp_path / "cmp", results, title="fedavg vs ffa-lora", target=0.5)
    names = [p.name for p in paths]
    assert names == ["compare.md", "compare.csv", "compare_runs.csv", "compare.png", "compare.pdf"]
    assert all(p.is_file() for p in paths)
    assert (tmp_path / "cmp" / "compare.png").read_bytes().startswith(PNG_SIGNATURE)
    assert (tmp_path / "cmp" / "compare.pdf").read_bytes().startswith(b"%PDF")

    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert md.startswith("# fedavg vs ffa-lora")
    assert "| fedavg | 0.001 | 3 | 0.800 ± 0.050 [0.750, 0.850] | best | −0.100 |" in md
    assert "gap to centralised" in md and "| reference |" in md
    assert "smaller than or equal to the larger of the two standard deviations" in md
    assert "EM is >= 0.5" in md

    with (tmp_path / "cmp" / "compare.csv").open() as f:
        summary = list(csv.DictReader(f))
    assert [r["strategy"] for r in summary] == ["fedavg", "ffa-lora", "centralised"]
    assert float(summary[1]["final_em_mean"]) == pytest.approx(0.60) and summary[1]["lr_grid"] == "0.001;0.01"
    assert summary[1]["verdict"] == "worse" and summary[2]["gap_to_centralised"] == ""
    with (tmp_path / "cmp" / "compare_runs.csv").open() as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == len(results)
    selected = {(r["strategy"], float(r["lr"])): r["selected"] for r in runs}
    assert selected[("ffa-lora", 1e-3)] == "True" and selected[("ffa-lora", 1e-2)] == "False"
    assert json.loads(runs[0]["curve"]) == [0.5, 0.8, 0.9] and runs[0]["strategy"] == "centralised"
    fedavg_seed1 = next(r for r in runs if r["strategy"] == "fedavg" and r["seed"] == "1")
    assert json.loads(fedavg_seed1["curve"]) == [pytest.approx(0.4), pytest.approx(0.8)]


def test_write_compare_from_run_dirs_end_to_end(tmp_path: Path) -> None:
    results = []
    for strategy, ems in (("fedavg", (0.5, 0.6)), ("ffa-lora", (0.55, 0.45))):
        for seed, em in enumerate(ems):
            rows = [_round(1, em / 2), {"round": 2, "failed": "x"}, _round(3, em)]
            run = _write_run(tmp_path / f"{strategy}-{seed}", rows, _config(strategy=strategy, seed=seed))
            results.append(load_run_result(run, target=0.5))
    paths = write_compare(tmp_path / "out", results, title="two strategies", target=0.5)
    assert paths[3].read_bytes().startswith(PNG_SIGNATURE)
    summary = {r.strategy: r for r in summarise(results)}
    assert summary["fedavg"].verdict == "best" and summary["ffa-lora"].verdict == "tie"  # 0.05 <= sd 0.0707


def test_write_compare_refuses_no_results(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no run results"):
        write_compare(tmp_path, [], title="x", target=0.5)
