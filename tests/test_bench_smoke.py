"""Every benchmark still runs: ``python bench/<script>.py --quick`` from the repo root, exit 0,
and its last lines are ``ratio <name> = <number>`` (a NaN or a missing ratio fails).

The quick modes use tiny sizes and one repetition: the figures mean nothing, the code paths are
the real ones. Slow lane (``-m slow``): a few minutes for all of them, three of which start real
Flower processes (SuperLink, Ray, SuperNodes).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux", reason="the benchmarks read /proc"),
]

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
#: every runnable script (helpers such as bench_procmem.py and bench_bare_fedavg.py have no main)
SCRIPTS = sorted(p.name for p in BENCH.glob("bench_*.py") if 'if __name__ == "__main__":' in p.read_text())
#: seconds before a quick run counts as hung (on two shared cores; the Flower ones take longest)
TIMEOUT = {"bench_deploy_overhead.py": 900, "bench_sim_scale.py": 600, "bench_lr_sweep.py": 600}
DEFAULT_TIMEOUT = 420
RATIO = re.compile(r"ratio \S+ = [0-9.eE+-]+")


def test_every_bench_script_is_smoke_tested() -> None:
    assert len(SCRIPTS) >= 8, SCRIPTS  # the glob still finds them
    assert not [p.name for p in BENCH.glob("*.py") if not p.name.startswith("bench_")], (
        "bench scripts are named bench_*.py: a bare name on sys.path[0] can shadow a package (e.g. 'kernels')"
    )


def _run(script: str) -> tuple[int, str, str]:
    """The script's quick mode in its own session; on timeout the whole group is killed."""
    proc = subprocess.Popen(
        [sys.executable, str(BENCH / script), "--quick"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    timeout = TIMEOUT.get(script, DEFAULT_TIMEOUT)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the benches tear their servers down on SIGTERM
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        pytest.fail(f"{script} --quick ran over {timeout} s\n{out[-3000:]}\n{err[-3000:]}")
    return proc.returncode, out, err


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_quick(script: str) -> None:
    code, out, err = _run(script)
    tail = f"--- stdout (tail)\n{out[-4000:]}\n--- stderr (tail)\n{err[-4000:]}"
    assert code == 0, f"{script} --quick exited with {code}\n{tail}"
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    ratios = []
    for line in reversed(lines):  # the trailing block of ratio lines (comment lines may sit among them)
        if line.startswith("#"):
            continue
        if not line.startswith("ratio "):
            break
        ratios.append(line)
    assert ratios, f"{script} --quick printed no ratio lines last\n{tail}"
    bad = [line for line in ratios if not RATIO.fullmatch(line)]
    assert not bad, f"{script} --quick: ratio lines without a number: {bad}\n{tail}"
