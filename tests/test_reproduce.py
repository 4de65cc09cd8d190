"""``fl-sim reproduce``: every cell's configuration validates (full and ``--quick``), bad requests are
refused naming the problem, and each cell runs end to end with ``--quick`` on tiny sizes (a subset of
its strategies or arms where a full quick run would cost the suite minutes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.simulations.claims import NOT_RUN
from fedlora.simulations.cli import main
from fedlora.simulations.compare import plan_grid
from fedlora.simulations.reproduce import CELLS


@pytest.mark.parametrize("name", sorted(CELLS))
def test_every_cell_validates_full_and_quick(name: str, tmp_path: Path) -> None:
    cell = CELLS[name]
    assert len(cell.arms) >= 1 and cell.seeds >= 3 and len(cell.lr_grid) >= 2
    for arm in cell.arms:
        for quick in (False, True):
            runs = plan_grid(cell.run_config(arm, quick), cell.strategies, cell.seeds, cell.lr_grid, tmp_path)
            assert len(runs) == len(cell.strategies) * cell.seeds * len(cell.lr_grid)
            assert all(r["fraction-evaluate"] == 1.0 for r in runs)


def test_a_plan_refuses_what_any_one_of_its_strategies_refuses(tmp_path: Path) -> None:
    """Every planned run's config is checked, not one per seed: FedSVD refuses a server optimizer
    that FedAvg-LoRA, planned with the same seeds, accepts."""
    base = CELLS["hetero-tasks"].run_config(CELLS["hetero-tasks"].arms[0], True) | {"server-opt.optimizer": "adam"}
    assert len(plan_grid(base, ["fedavg-lora"], 1, (1.0,), tmp_path)) == 1
    with pytest.raises(ValueError, match="fedsvd"):
        plan_grid(base, ["fedsvd", "fedavg-lora"], 1, (1.0,), tmp_path)


def test_the_cells_are_the_ones_the_papers_name() -> None:
    assert {"ffa-dp-text", "fair-domains", "hetero-tasks"} <= set(CELLS)
    text = CELLS["ffa-dp-text"]
    assert text.base["model.kind"] == "seq-cls" and text.base["num-clients"] == 3
    assert text.base["partition.scheme"] == "dirichlet" and text.base["dp.delta"] == 1e-5
    assert [a.config["dp.target-epsilon"] for a in text.arms] == [6.0, 3.0, 1.0]
    assert text.base["partition.seed"] == 0 and text.version == 2  # one split, the seeds vary training
    fair = CELLS["fair-domains"]
    assert fair.base["model.kind"] == "image-cls" and fair.base["partition.tasks-per-client"] == 1
    assert {"fedavg-lora", "ffa-lora", "flexlora", "lora-fair", "fedex-lora"} == set(fair.strategies)
    hetero = CELLS["hetero-tasks"]
    assert hetero.base["num-clients"] == 8 and len(hetero.base["tasks"].split(",")) == 8
    assert [a.config["dp.enabled"] for a in hetero.arms] == [False, True]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "name a cell: one of ffa-dp-text"),
        (["fedmagic"], "unknown cell 'fedmagic'"),
        (["fair-domains", "--strategies", "rolora"], "does not compare rolora"),
        (["ffa-dp-text", "--arms", "eps-2"], "has no arm eps-2; its arms: eps-6, eps-3, eps-1"),
        (["fair-domains", "--set", "seed=3"], "the cell sets seed per run"),
        (["fair-domains", "--set", "lora-rank"], "expected KEY=VALUE"),
        (["fair-domains", "--set", "server-opt.optimizer=lamb"], "server-opt.optimizer 'lamb' is unknown"),
        (["fair-domains", "--set", "server-opt.optimizer=adam"], "server-opt works with fedavg-lora, ffa-lora"),
        (["fair-domains", "--lr-grid", "1,-2"], "--lr-grid multipliers must be > 0"),
    ],
)
def test_bad_requests_are_refused_before_anything_runs(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # --quick: a refusal this test misses costs a smoke run, not a whole cell
    assert main(["reproduce", *argv, "--quick", "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "runs").exists()


def test_list_names_every_cell_its_arms_and_paper(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out
    for cell in CELLS.values():
        assert f"{cell.name} (v{cell.version})" in out
    assert "eps-6 (ε = 6)" in out and "LoRA-FAIR" in out


def _result(out: Path) -> dict:
    return json.loads((out / "reproduce.json").read_text())


@pytest.mark.slow
@pytest.mark.flower
def test_fair_domains_quick_writes_the_table_beside_the_papers_numbers(tmp_path: Path) -> None:
    out = tmp_path / "fair"
    argv = ["reproduce", "fair-domains", "--quick", "--strategies", "lora-fair,fedavg-lora", "--arms", "no-dp"]
    argv += ["--out", str(out)]
    assert main(argv) == 0
    result = _result(out)
    assert result["cell"] == "fair-domains" and result["quick"] is True
    rows = {r["strategy"]: r for r in result["arms"]["no-dp"]}
    assert set(rows) == {"lora-fair", "fedavg-lora", "centralised"}
    assert rows["lora-fair"]["paper"] == 77.07 and rows["fedavg-lora"]["paper"] == 75.75
    assert all(len(r["finals"]) == 1 and 0 <= r["mean"] <= 1 for r in rows.values())
    verdicts = {c["claim"]: c["verdict"] for c in result["claims"]}
    assert verdicts["LoRA-FAIR is the best of the methods the paper compares"] == NOT_RUN  # no FFA, FlexLoRA
    assert verdicts["LoRA-FAIR ≥ FedIT (FedAvg-LoRA)"] != NOT_RUN
    md = (out / "reproduce.md").read_text()
    assert "77.07%" in md and "smoke run, not evidence" in md
    assert json.loads((out / "wall_time.json").read_text())["invocations"] == 1
    assert (out / "no-dp" / "compare.md").is_file()
    with pytest.raises(SystemExit):
        main(["reproduce", "fair-domains", "--out", str(out), "--bogus"])
    assert main(["reproduce", "fair-domains", "--out", str(out), "--strategies", "lora-fair"]) == 2  # not --quick


@pytest.mark.slow
@pytest.mark.flower
def test_ffa_dp_text_quick_runs_dp_on_the_encoder(tmp_path: Path) -> None:
    out = tmp_path / "text"
    argv = ["reproduce", "ffa-dp-text", "--quick", "--arms", "eps-1", "--strategies", "ffa-lora", "--out", str(out)]
    assert main(argv) == 0
    result = _result(out)
    assert set(result["arms"]) == {"eps-1"}
    assert {r["strategy"] for r in result["arms"]["eps-1"]} == {"ffa-lora", "centralised"}
    assert all(c["verdict"] == NOT_RUN for c in result["claims"])  # each needs FedAvg-LoRA or another arm
    runs = json.loads((out / "eps-1" / "runs" / "ffa-lora" / "lr-0.01" / "seed-0" / "config.json").read_text())
    assert runs["model.kind"] == "seq-cls" and runs["dp.enabled"] and runs["dp.target-epsilon"] == 1.0
    central = (out / "eps-1" / "compare.csv").read_text()
    assert "centralised" in central


@pytest.mark.slow
@pytest.mark.flower
def test_hetero_tasks_quick_runs_the_causal_cell(tmp_path: Path) -> None:
    out = tmp_path / "hetero"
    argv = ["reproduce", "hetero-tasks", "--quick", "--arms", "eps-3", "--strategies", "ffa-lora"]
    argv += ["--set", "server-opt.optimizer=avgm", "--set", "server-opt.lr=0.5"]
    assert main([*argv, "--out", str(out)]) == 0
    result = _result(out)
    assert result["changes"] == {"server-opt.optimizer": "avgm", "server-opt.lr": 0.5}
    assert "`server-opt.optimizer=avgm`" in (out / "reproduce.md").read_text()
    config = json.loads((out / "eps-3" / "runs" / "ffa-lora" / "lr-0.01" / "seed-0" / "config.json").read_text())
    assert config["server-opt.optimizer"] == "avgm" and config["server-opt.lr"] == 0.5
    assert main([*argv[:-2], "--out", str(out)]) == 2  # other changes: not into the same directory
    assert {r["strategy"] for r in result["arms"]["eps-3"]} == {"ffa-lora", "centralised"}
    assert result["arms"]["eps-3"][0]["finals"] and result["claims"][0]["verdict"] == NOT_RUN
