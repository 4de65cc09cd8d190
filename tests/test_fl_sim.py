"""``fl-sim`` as a user runs it: bad input refused before anything starts, an interrupted run
resumed to the same adapter bit for bit, a hard-killed run reported and resumed, and ``compare``
producing its table."""

from __future__ import annotations

import csv
import json
import os
import signal
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch
from flwr.common.config import flatten_dict
from processes import gone
from safetensors.torch import load_file

from fedlora.core import flower_runner as runner
from fedlora.core.run_dir import SERVER_OPT_FILE, RunDir
from fedlora.simulations.cli import main
from fedlora.simulations.options import MAIN_JOB

FL_SIM = [sys.executable, "-m", "fedlora.simulations.cli"]
TINY = [
    "--clients", "3", "--local-steps", "4", "--num-train", "64", "--num-test", "16",
    "--tasks", "adddigit-4,rotate-2,repeat-3", "--partition", "tasks-per-client",
]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--strategy", "fedmagic"], "unknown strategy 'fedmagic'"),
        (["--clients", "4", "--clients-per-round", "5"], "--clients-per-round 5 must be between 1 and"),
        (["--clients", "2", "--tasks-per-client", "1"], "cover only 2 of 4 tasks"),
        (["--clients", "500", "--num-train", "1", "--partition", "dirichlet"], "left at least one of 500 clients"),
        (["--run-config", "secure-aggregation=true", "--strategy", "lora-fair"], "secure-aggregation cannot work"),
        (["--run-config", 'colour="blue"'], "unknown key(s) ['colour']"),
        (["--run-config", "colour=blue"], "values must be of type bool, int, string"),
        (["--epsilon", "-1"], "dp.target-epsilon"),
    ],
)
def test_bad_input_is_refused_before_anything_starts(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err.replace("\n", " "), err
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_unparseable_jsonl_and_existing_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "data.jsonl"
    bad.write_text('{"prompt": "a:", "completion": "b", "task": "t"}\n{"prompt": \n')
    assert main(["--data", str(bad), "--partition", "iid", "--clients", "1", "--out", str(tmp_path / "r")]) == 2
    assert "data.jsonl:2: not valid JSON" in capsys.readouterr().err
    run = tmp_path / "old"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"round": 1}\n')
    assert main(["--out", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == '{"round": 1}\n'  # nothing lost


def test_print_run_config_round_trips_through_flower_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--print-run-config", "--rounds", "3", "--no-dp", "--run-config", "lora-rank=4"]) == 0
    config = flatten_dict(tomllib.loads(capsys.readouterr().out))
    assert config["num-rounds"] == 3 and config["dp.enabled"] is False and config["lora-rank"] == 4
    assert config["partition.scheme"] == "tasks-per-client"
    assert set(MAIN_JOB) <= set(config)


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapters" / "global" / "adapter_model.safetensors"))


#: a run that an interrupted one must reproduce bit for bit: DP randomness from the public config,
#: so two separate runs (two client secrets) can match
RESUMABLE = [*TINY, "--rounds", "3", "--local-steps", "8", "--strategy", "fedavg-lora", "--epsilon", "8", "--quiet"]
RESUMABLE += ["--run-config", "dp.secret-noise=false"]
# a server optimizer with moments: a resume that lost them would not give the straight run's adapter
RESUMABLE += ["--server-opt", "adam", "--server-lr", "0.003"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run, shared by the interrupted ones (the same worker: one xdist group)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    subprocess.run([*FL_SIM, *RESUMABLE, "--out", str(out)], check=True, timeout=400)
    return out


@pytest.mark.slow
@pytest.mark.flower
@pytest.mark.xdist_group("resume")
def test_resume_after_an_interrupt_gives_the_uninterrupted_adapter(straight: Path, tmp_path: Path) -> None:
    """Ctrl-C after round 1 of 3, ``fl-sim --resume``: the same final adapter as one straight run.
    The interrupt stops the run at once (the runner terminates the simulation, it does not wait
    for the round in flight), so round 3 cannot finish first."""
    broken = tmp_path / "broken"
    proc = subprocess.Popen([*FL_SIM, *RESUMABLE, "--out", str(broken)])
    deadline = time.monotonic() + 300
    while not (broken / "checkpoints" / "round-1" / "state.safetensors").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before round 1"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    assert not (broken / "adapters" / "global").exists()
    done = max(int(p.name.split("-")[1]) for p in (broken / "checkpoints").glob("round-*"))
    assert 1 <= done < 3

    subprocess.run([*FL_SIM, "--resume", str(broken), "--quiet"], check=True, timeout=400)
    a, b = _adapter(straight), _adapter(broken)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(ln) for ln in (broken / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]  # rows of the repeated round were replaced
    plan = json.loads((broken / "privacy_plan.json").read_text())
    assert plan == json.loads((straight / "privacy_plan.json").read_text())
    report = json.loads((broken / "report" / "privacy.json").read_text())
    straight_report = json.loads((straight / "report" / "privacy.json").read_text())
    # the round trained again after the interrupt replays the same output and is charged once
    assert report["rounds_completed"] == 3 and report["epsilon_max"] == pytest.approx(straight_report["epsilon_max"])
    assert report["epsilon_max"] <= 8.0 + 1e-6
    config = json.loads((broken / "config.json").read_text())
    assert len(config["resumed-as"]) == 1 and config["run-id"] != config["resumed-as"][0]
    # the operator's alone: the run directory, each virtual client's state and every secret in it
    assert stat.S_IMODE(broken.stat().st_mode) == 0o700
    states = [d for d in (broken / "client-state").iterdir() if d.is_dir()]
    assert len(states) == 3 and all(stat.S_IMODE(d.stat().st_mode) == 0o700 for d in states)
    assert all((d / "privacy_ledger.json").is_file() for d in states)
    files = [f for d in states for f in d.iterdir() if f.is_file()]
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files), files


def _reaper_of(run: RunDir) -> tuple[int, str] | None:
    """(pid, run tag) of the Flower runner's reaper watching the run in ``run`` (its command line
    names the run's teardown log), or None before it started."""
    log = str(run.sim_workdir / "logs" / "teardown.log").encode()
    for entry in os.listdir("/proc"):
        try:
            argv = Path("/proc", entry, "cmdline").read_bytes().split(b"\0") if entry.isdigit() else []
        except OSError:
            continue
        if b"--reap" in argv and log in argv:
            return int(entry), argv[argv.index(b"--reap") + 1].decode()
    return None


@pytest.mark.slow
@pytest.mark.flower
@pytest.mark.xdist_group("resume")
def test_a_hard_kill_leaves_a_run_that_reports_and_resumes(straight: Path, tmp_path: Path) -> None:
    """SIGKILL to fl-sim's whole process group after round 1 (no ``finally`` runs): the runner's
    reaper takes the Flower and Ray processes down; ``fl-sim report`` reads the run despite a torn
    last metrics line, and ``fl-sim --resume`` finishes it with the straight run's adapter."""
    run = RunDir((tmp_path / "killed").resolve())
    argv = [*RESUMABLE, "--out", str(run.root)]
    proc = subprocess.Popen([*FL_SIM, *argv], start_new_session=True)
    deadline = time.monotonic() + 300
    while (reaper := _reaper_of(run)) is None or run.last_round() < 1:
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before round 1"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    pid, tag = reaper
    deadline = time.monotonic() + 60
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    teardown_log = (run.sim_workdir / "logs" / "teardown.log").read_text()
    assert gone(pid) and "runner died without teardown" in teardown_log
    assert runner._pids_with_env(runner.RUN_TAG_VAR, tag) == set(), teardown_log  # no Flower or Ray process left
    assert not run.global_adapter_dir.exists()
    assert (run.checkpoint_dir(1) / SERVER_OPT_FILE).is_file()  # the moments, kept with the round's state
    with run.metrics_path.open("a") as f:  # the tear a kill mid-append leaves, made certain
        f.write('{"round": 2, "train": {"train-lo')

    done = subprocess.run([*FL_SIM, "report", str(run.root)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    png, pdf = run.training_stem.with_suffix(".png"), run.training_stem.with_suffix(".pdf")
    assert png.read_bytes().startswith(b"\x89PNG") and pdf.read_bytes().startswith(b"%PDF")
    assert run.clients_csv.is_file() and run.privacy_md.is_file()
    assert json.loads(run.privacy_json.read_text())["rounds_completed"] >= 1

    subprocess.run([*FL_SIM, "--resume", str(run.root), "--quiet"], check=True, timeout=400)
    assert [r["round"] for r in run.rows()] == [0, 1, 2, 3]  # the torn line and repeated rounds replaced
    assert run.metrics_path.read_text().endswith("}\n")
    a, b = _adapter(straight), _adapter(run.root)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads(run.privacy_json.read_text())["rounds_completed"] == 3


@pytest.mark.slow
@pytest.mark.flower
def test_compare_writes_the_table_and_keeps_finished_runs(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    # one seed each: the table's spread and tie logic over seeds is tested in test_sim_report.py
    # (fl-sim reproduce's tests run several strategies through the same loop)
    argv = [*TINY, "--rounds", "2", "--no-dp", "--strategies", "ffa-lora", "--seeds", "1"]
    argv += ["--out", str(out), "--target", "0.3"]
    assert main(["compare", *argv]) == 0
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert {r["strategy"]: r["verdict"] for r in rows} == {"ffa-lora": "best", "centralised": "reference"}
    assert (out / "compare.md").read_text().count("|") > 10 and (out / "compare.png").stat().st_size > 1000
    runs = list(csv.DictReader((out / "compare_runs.csv").open()))
    assert len(runs) == 2  # 1 strategy x 1 seed + 1 centralised
    stamp = (out / "runs" / "ffa-lora" / "lr-0.01" / "seed-0" / "metrics.jsonl").stat().st_mtime
    assert main(["compare", *argv]) == 0  # everything done before: kept, only the table is rewritten
    assert (out / "runs" / "ffa-lora" / "lr-0.01" / "seed-0" / "metrics.jsonl").stat().st_mtime == stamp


def test_resume_refuses_new_options_and_force_keeps_the_ledgers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["--resume", str(tmp_path), "--rounds", "12"]) == 2
    assert "drop --rounds" in capsys.readouterr().err
    run = tmp_path / "run"
    (run / "client-state" / "partition-0").mkdir(parents=True)
    (run / "client-state" / "partition-0" / "privacy_ledger.json").write_text("{}")
    (run / "checkpoints").mkdir()
    (run / "metrics.jsonl").write_text('{"round": 1}\n')
    import fedlora.simulations.simulate as simulate

    monkeypatch.setattr(simulate, "simulate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["--force", "--out", str(run), "--quiet"]) == 130
    assert sorted(p.name for p in run.iterdir()) == ["client-state"]
    assert (run / "client-state" / "partition-0" / "privacy_ledger.json").exists()
