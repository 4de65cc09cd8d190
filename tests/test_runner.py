"""fedlora.core.flower_runner: request validation, the generated app dir, and real simulations on loopback.

The ``flower`` tests start a real SuperLink, flwr-simulation and Ray (tens of seconds each)
and run the echo app in ``tests/flower_echo``, whose FedAvg result is known by hand.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from flower_echo.apps import INITIAL_WEIGHTS
from processes import gone

from fedlora.core import flower_runner as runner
from fedlora.core.flower_runner import FlowerRunError, FlowerRunOutcome, FlowerRunRequest, run_flower_app

TESTS = Path(__file__).resolve().parent
ECHO_SERVER = "flower_echo.apps:server_app"
ECHO_CLIENT = "flower_echo.apps:client_app"
DEFAULTS: dict[str, bool | int | float | str] = {
    "num-rounds": 1,
    "lr": 0.1,
    "expected-nodes": 3,
    "out-dir": "",
    "tag": "default",
    "audit.save-updates": False,
    "audit.level": 2,
}


def _request(workdir: Path, **changes: Any) -> FlowerRunRequest:
    fields: dict[str, Any] = {
        "components": (ECHO_SERVER, ECHO_CLIENT),
        "app_name": "flower-echo",
        "default_config": DEFAULTS,
        "overrides": {},
        "num_supernodes": 3,
        "timeout": 60.0,
        "workdir": workdir,
        "pythonpath": (TESTS,),  # the SuperLink's processes import flower_echo from here
    }
    fields.update(changes)
    return FlowerRunRequest(**fields)


def _live_descendants() -> list[str]:
    """Descendants of this pytest process (Ray raylet/GCS/workers, flwr processes)."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,cmd="], capture_output=True, text=True, check=True).stdout
    kids: dict[int, list[tuple[int, str]]] = {}
    for line in out.splitlines():
        pid_text, ppid_text, *cmd_text = line.split(None, 2)
        kids.setdefault(int(ppid_text), []).append((int(pid_text), cmd_text[0] if cmd_text else ""))
    found: list[str] = []
    todo = [os.getpid()]
    while todo:
        for pid, cmd in kids.get(todo.pop(), []):
            if not cmd.startswith("ps -eo"):
                found.append(f"{pid} {cmd}")
                todo.append(pid)
    return found


def _record_ray_tmpdirs(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Spy on the runner's mkdtemp so a test can check the per-run RAY_TMPDIR is removed."""
    made: list[Path] = []
    real: Callable[..., str] = tempfile.mkdtemp

    def mkdtemp(*args: Any, **kwargs: Any) -> str:
        path = real(*args, **kwargs)
        made.append(Path(path))
        return path

    monkeypatch.setattr(runner.tempfile, "mkdtemp", mkdtemp)
    return made


# --------------------------------------------------------------------------- validation (fast)


def test_unknown_run_config_key_is_rejected_with_known_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown run-config key\(s\) \['learning-rate'\]; known keys: \[") as err:
        _request(tmp_path, overrides={"learning-rate": 0.5})
    assert "'lr'" in str(err.value) and "'audit.save-updates'" in str(err.value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"overrides": {"num-rounds": 2.5}}, r"'num-rounds' expects int \(default 1\), got float 2.5"),
        ({"overrides": {"audit.save-updates": 1}}, r"'audit.save-updates' expects bool"),
        ({"overrides": {"tag": 3}}, r"'tag' expects str"),
        ({"default_config": {"audit": 1, "audit.level": 2}}, r"'audit' and 'audit.level' clash"),
        ({"default_config": {"bad key": 1}}, r"run-config key 'bad key' is not valid"),
        ({"default_config": {"a..b": 1}}, r"run-config key 'a..b' is not valid"),
        ({"default_config": {"xs": [1, 2]}}, r"is not a bool, int, float or str"),
        ({"components": ("flower_echo.apps", ECHO_CLIENT)}, r"serverapp component .* 'package.module:attribute'"),
        ({"components": (ECHO_SERVER,)}, r"components must be \(serverapp, clientapp\)"),
        ({"app_name": "flower echo"}, r"not a valid Flower project name"),
        ({"num_supernodes": 0}, r"num_supernodes must be an integer >= 1"),
        ({"ray_num_cpus": 1, "client_num_cpus": 2}, r"no ClientApp could ever be scheduled"),
        ({"timeout": float("inf")}, r"timeout must be a positive, finite number"),
        ({"extra_env": {"FLWR_HOME": "/x"}}, r"extra_env must not set \['FLWR_HOME'\]"),
    ],
)
def test_request_validation(tmp_path: Path, changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _request(tmp_path, **changes)


def test_request_is_normalised_and_immutable(tmp_path: Path) -> None:
    overrides = {"lr": 1}
    request = dataclasses.replace(_request(tmp_path, overrides=overrides), workdir=cast(Any, str(tmp_path)))
    overrides["lr"] = 2  # the caller's dict is copied, not kept
    assert request.overrides == {"lr": 1.0} and isinstance(request.overrides["lr"], float)
    assert isinstance(request.workdir, Path)
    with pytest.raises(TypeError):
        request.overrides["lr"] = 3.0  # type: ignore[index]


def test_app_dir_and_run_config_file_give_flower_the_dotted_keys(tmp_path: Path) -> None:
    """Flower's own parser (as flwr-simulation uses it) must see 'audit.save-updates' as one key."""
    from flwr.common.config import get_fused_config_from_dir, parse_config_args

    app_dir = runner.write_app_dir(
        tmp_path / "app", app_name="flower-echo", components=(ECHO_SERVER, ECHO_CLIENT), default_config=DEFAULTS
    )
    assert sorted(p.name for p in app_dir.iterdir()) == ["pyproject.toml"]
    overrides = {"audit.save-updates": True, "lr": 0.3}
    run_config = runner.write_run_config(tmp_path / "run_config.toml", overrides)
    fused = get_fused_config_from_dir(app_dir, parse_config_args([str(run_config)]))
    assert fused == {**DEFAULTS, **overrides}

    (app_dir / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"must hold only the generated pyproject.toml.*weights.safetensors"):
        runner.write_app_dir(app_dir, app_name="flower-echo", components=(ECHO_SERVER, ECHO_CLIENT), default_config={})


@pytest.mark.slow
def test_reaper_kills_the_run_when_the_runner_dies_without_teardown(tmp_path: Path) -> None:
    """SIGKILL (or a `timeout` wrapper's SIGTERM) skips `finally`: the reaper must clean up."""
    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    script = f"""
import os, signal, subprocess, sys
from pathlib import Path
from fedlora.core import flower_runner as runner
tag = "reaper-test-{os.getpid()}"
runner._start_reaper(tag, Path({str(tmp_path / "teardown.log")!r}), Path({str(ray_tmp)!r}))
env = dict(os.environ, **{{runner.RUN_TAG_VAR: tag}})
deaf = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(120)"
stubborn = subprocess.Popen([sys.executable, "-c", deaf], env=env, stdout=subprocess.PIPE)
stubborn.stdout.readline()
plain = subprocess.Popen(["sleep", "120"], env=env)
print(stubborn.pid, plain.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == -9, done.stderr
    pids = [int(p) for p in done.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 20
    while not all(gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(gone(pid) for pid in pids), (tmp_path / "teardown.log").read_text()
    while ray_tmp.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not ray_tmp.exists()
    assert "runner died without teardown" in (tmp_path / "teardown.log").read_text()


def test_terminate_group_sigterms_then_sigkills_what_stays() -> None:
    """The one process-group teardown (fl-client's SuperNode): a group that leaves on SIGTERM
    needs no SIGKILL; a member that ignores SIGTERM is SIGKILLed after the grace period."""
    deaf = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(120)"
    polite = subprocess.Popen(["sleep", "120"], start_new_session=True)
    leader = subprocess.Popen([sys.executable, "-c", deaf], stdout=subprocess.PIPE, start_new_session=True)
    assert leader.stdout is not None and leader.stdout.readline() == b"1\n"
    reaping = threading.Thread(target=polite.wait)  # as the SuperNode's supervisor does: no zombie stays
    reaping.start()
    t0 = time.monotonic()
    assert runner.terminate_group(polite.pid, grace=10.0) is False
    reaping.join(timeout=5)
    assert polite.returncode == -15 and time.monotonic() - t0 < 5
    t0 = time.monotonic()
    assert runner.terminate_group(leader.pid, grace=0.5) is True
    assert leader.wait(timeout=5) == -9 and time.monotonic() - t0 >= 0.5
    assert runner.terminate_group(leader.pid) is False  # gone: nothing to do
    leader.stdout.close()


def test_terminate_group_takes_an_exited_unreaped_leader_as_gone() -> None:
    """fl-client's SIGTERM handler runs in the thread that reaps the SuperNode: the SuperNode left
    at once, but as a zombie its group answered ``kill(0)`` until SIGKILL 10 s later."""
    leader = subprocess.Popen(["sleep", "120"], start_new_session=True)
    t0 = time.monotonic()
    assert runner.terminate_group(leader.pid, grace=10.0) is False  # nobody reaps it meanwhile
    assert time.monotonic() - t0 < 5
    assert Path(f"/proc/{leader.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    assert leader.wait(timeout=5) == -15


# --------------------------------------------------------------------------- real simulations


@pytest.mark.slow
@pytest.mark.flower
def test_echo_simulation_gives_the_weighted_average(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ray_tmpdirs = _record_ray_tmpdirs(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    overrides = {"num-rounds": 2, "lr": 0.3, "out-dir": str(out), "tag": "from-test", "audit.save-updates": True}
    lines: list[str] = []

    outcome = run_flower_app(_request(tmp_path / "run", overrides=overrides), on_log_line=lines.append)

    assert outcome.status == "finished:completed", outcome
    assert outcome.completed and not outcome.timed_out and outcome.leftover_pids_killed == ()
    server = json.loads((out / "server.json").read_text())
    # Clients add lr * (i + 1) with weight 10 * (i + 1): one round moves w by lr * 140 / 60.
    step = 0.3 * (10 * 1 + 20 * 2 + 30 * 3) / (10 + 20 + 30)
    assert server["final_w"] == pytest.approx([w + 2 * step for w in INITIAL_WEIGHTS], rel=1e-12)
    assert server["final_w"] == pytest.approx([1.4, 2.4, 3.4, 4.4], rel=1e-12)
    assert server["rounds"] == [1, 2]
    # Overrides, the dotted key and the untouched nested default reach the server and every client.
    expected_config = {**DEFAULTS, **overrides}
    assert server["run_config"] == expected_config
    client_files = sorted(out.glob("client-*.json"))
    assert [p.name for p in client_files] == [f"client-{i}-round-{r}.json" for i in range(3) for r in (1, 2)]
    for path in client_files:
        seen = json.loads(path.read_text())
        assert seen["run_config"] == expected_config, path.name
        assert seen["num-partitions"] == 3
    # Progress reached the callback line by line, without colour codes, and the log file.
    assert any("[echo-server] done" in line for line in lines)
    assert not any("\x1b[" in line for line in lines)
    assert "[echo-server] done" in outcome.log_path.read_text()
    assert "Uvicorn running on http://127.0.0.1:" in outcome.superlink_log_path.read_text()
    # Nothing left behind: no child processes, no Ray session dir.
    assert _live_descendants() == []
    assert len(ray_tmpdirs) == 1 and not ray_tmpdirs[0].exists()
    print(f"echo simulation: {outcome.seconds:.1f} s")


@pytest.mark.slow
@pytest.mark.flower
def test_failing_server_app_and_timeout_are_reported_and_cleaned_up(tmp_path: Path) -> None:
    """Two runs at once (the runner holds no global state): a ServerApp that raises, and one
    that waits forever for 5 nodes out of 3, which only the runner's timeout ends."""
    outcomes: dict[str, FlowerRunOutcome] = {}
    errors: dict[str, BaseException] = {}

    def run(name: str, request: FlowerRunRequest) -> None:
        try:
            outcomes[name] = run_flower_app(request)
        except BaseException as exc:  # surfaced by the asserts below
            errors[name] = exc

    failing = _request(tmp_path / "failing", components=("flower_echo.apps:failing_server_app", ECHO_CLIENT))
    # long enough for the ServerApp to start and log its wait on a loaded machine
    hanging = _request(tmp_path / "hanging", overrides={"expected-nodes": 5, "out-dir": str(tmp_path)}, timeout=40.0)
    started = time.monotonic()
    threads = [threading.Thread(target=run, args=item) for item in (("failing", failing), ("hanging", hanging))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    elapsed = time.monotonic() - started

    assert not any(thread.is_alive() for thread in threads), "a run outlived its own timeout"
    assert errors == {}
    failed = outcomes["failing"]
    assert failed.status == "finished:failed", failed
    assert "echo server app failed on purpose" in failed.status_details
    assert not failed.timed_out
    stopped = outcomes["hanging"]
    assert stopped.timed_out and stopped.status == "finished:stopped", stopped
    assert "minimum required: 5" in stopped.log_path.read_text()
    assert _live_descendants() == []
    print(f"failing run: {failed.seconds:.1f} s, timed-out run: {stopped.seconds:.1f} s, both: {elapsed:.1f} s")


@pytest.mark.slow
@pytest.mark.flower
def test_flwr_run_failure_raises_with_the_cli_output(tmp_path: Path) -> None:
    request = _request(tmp_path, components=("flower_echo.no_such_module:app", ECHO_CLIENT))
    with pytest.raises(FlowerRunError, match=r"(?s)`flwr run` failed.*flower_echo.no_such_module"):
        run_flower_app(request)
    assert _live_descendants() == []
