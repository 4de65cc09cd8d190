"""The runner's logs: an earlier attempt's are kept, numbered, and no secret reaches them."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedlora.core import flower_runner as runner


def test_a_resumed_run_keeps_each_earlier_attempts_logs(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    files = tuple(logs / n for n in ("run.log", "superlink.log", "teardown.log"))
    assert runner.keep_earlier_logs(logs, files) is None  # a first run: nothing to keep
    for attempt in (1, 2):
        for f in files[:2]:
            f.write_text(f"attempt {attempt}\n")
        kept = runner.keep_earlier_logs(logs, files)
        assert kept == logs / f"attempt-{attempt}"
        assert sorted(p.name for p in kept.iterdir()) == ["run.log", "superlink.log"]
        assert (kept / "run.log").read_text() == f"attempt {attempt}\n"
        assert not any(f.exists() for f in files)  # the new attempt starts with empty logs


def test_secret_options_are_redacted_in_logged_command_lines() -> None:
    argv = ["flwr-simulation", "--runtime-api-address", "127.0.0.1:1", "--token", "f00dcafe", "--insecure"]
    assert runner.redact(argv) == [*argv[:4], "<redacted>", "--insecure"]
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "--token", "f00dcafe"])
    try:
        deadline = time.monotonic() + 10
        while "--token" not in (line := runner._cmdline(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "--token <redacted>" in line and "f00dcafe" not in line
    finally:
        proc.kill()
        proc.wait()


def test_the_workdir_is_the_operators_alone(tmp_path: Path) -> None:
    """``run_flower_app`` makes its workdir 0700 before anything is written there; shown on the
    same call it makes (the whole run is tested in test_runner.py)."""
    workdir = tmp_path / "w"
    workdir.mkdir(mode=0o755)
    os.chmod(workdir, 0o755)
    with pytest.raises(runner.FlowerRunError, match="did not become healthy in time"):  # a 1 ms budget
        runner.run_flower_app(
            runner.FlowerRunRequest(
                components=("nowhere:app", "nowhere:app"),
                app_name="x",
                default_config={},
                overrides={},
                num_supernodes=1,
                timeout=0.001,
                workdir=workdir,
            )
        )
    assert stat.S_IMODE(workdir.stat().st_mode) == 0o700


def test_a_run_directory_is_its_operators_alone(tmp_path: Path) -> None:
    from fedlora.core.run_dir import RunDir

    old = os.umask(0o022)
    try:
        run = RunDir(tmp_path / "runs" / "r1")
        run.make()
        assert stat.S_IMODE(run.root.stat().st_mode) == 0o700
        run.root.chmod(0o755)  # a run made before, or loosened: resuming it tightens it again
        run.make()
        assert stat.S_IMODE(run.root.stat().st_mode) == 0o700
    finally:
        os.umask(old)
