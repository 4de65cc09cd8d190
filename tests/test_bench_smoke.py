"""Every benchmark still runs: ``python bench/<script>.py --quick`` from the repo root, exit 0,
and its last lines are ``ratio <name> = <number>`` (a NaN or a missing ratio fails).

The quick modes use tiny sizes and one repetition: the figures mean nothing, the code paths are
the real ones. Slow lane (``-m slow``). Three of the scripts start real Flower processes
(SuperLink, Ray, SuperNodes) and spend much of their time waiting on them, so the selected
scripts run ``FEDLORA_BENCH_SMOKE_JOBS`` at a time (default 3; 1: one after the other), the
longest first, from the first of these tests on; each test waits for its own script. Under
pytest-xdist (``make test``) each test runs its own script instead, the workers sharing the cores.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the benchmarks read /proc")

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
#: every runnable script (the helper modules HELPERS have no main)
SCRIPTS = sorted(p.name for p in BENCH.glob("bench_*.py") if 'if __name__ == "__main__":' in p.read_text())
HELPERS = {"bench_procmem.py", "bench_bare_fedavg.py"}
#: rough seconds of each quick run alone on two shared cores: the longest start first
EXPECTED = {
    "bench_deploy_overhead.py": 120,
    "bench_sim_scale.py": 90,
    "bench_dp_overhead.py": 50,
    "bench_lr_sweep.py": 45,
    "bench_zero_shot.py": 70,
    "bench_gap.py": 30,
}
#: seconds before a quick run counts as hung, from its own start (runs share the cores)
TIMEOUT = 900
RATIO = re.compile(r"ratio (\S+) = (\S+)")


def test_every_bench_script_is_smoke_tested() -> None:
    """Static: every bench script but the known helpers has a main, so none escapes the quick runs."""
    assert {p.name for p in BENCH.glob("bench_*.py")} - set(SCRIPTS) == HELPERS
    assert len(SCRIPTS) >= 8, SCRIPTS
    assert not [p.name for p in BENCH.glob("*.py") if not p.name.startswith("bench_")], (
        "bench scripts are named bench_*.py: a bare name on sys.path[0] can shadow a package (e.g. 'kernels')"
    )


def _is_ratio(line: str) -> bool:
    """``ratio <name> = <a finite number>``."""
    match = RATIO.fullmatch(line)
    try:
        return match is not None and math.isfinite(float(match.group(2)))
    except ValueError:
        return False


@dataclass(frozen=True)
class Run:
    code: int | None  # None: timed out, killed
    out: str
    err: str
    seconds: float


class QuickRuns:
    """The selected scripts' quick runs, a few at a time, each in its own session (killed as a
    group on timeout or when the tests end early)."""

    def __init__(self, scripts: list[str], jobs: int) -> None:
        self._procs: dict[str, subprocess.Popen[str]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="bench-smoke")
        order = sorted(scripts, key=lambda s: -EXPECTED.get(s, 0))
        self._futures: dict[str, Future[Run]] = {s: self._pool.submit(self._run, s) for s in order}

    def _run(self, script: str) -> Run:
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, str(BENCH / script), "--quick"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        with self._lock:
            self._procs[script] = proc
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
            return Run(proc.returncode, out, err, time.monotonic() - started)
        except subprocess.TimeoutExpired:
            out, err = self._stop(proc)
            return Run(None, out, err, time.monotonic() - started)

    @staticmethod
    def _stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
        """SIGTERM to the group (the benches tear their servers down on it), SIGKILL after 30 s."""
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                return proc.communicate(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        return "", ""

    def result(self, script: str) -> Run:
        future = self._futures.get(script)
        return future.result() if future is not None else self._run(script)

    def close(self) -> None:
        for future in self._futures.values():
            future.cancel()
        with self._lock:
            live = [p for p in self._procs.values() if p.poll() is None]
        for proc in live:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self._pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def quick_runs(request: pytest.FixtureRequest) -> Iterator[QuickRuns]:
    # Under pytest-xdist each worker collects every test but runs only some: there each test
    # runs its own script when it comes (the other worker keeps the second core busy).
    selected = (
        [
            str(item.callspec.params["script"])
            for item in request.session.items
            if isinstance(item, pytest.Function)
            and item.path == Path(__file__)
            and item.originalname == "test_bench_quick"
        ]
        if "PYTEST_XDIST_WORKER" not in os.environ
        else []
    )
    runs = QuickRuns(selected, int(os.environ.get("FEDLORA_BENCH_SMOKE_JOBS", "3")))
    yield runs
    runs.close()


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_quick(script: str, quick_runs: QuickRuns) -> None:
    run = quick_runs.result(script)
    tail = f"--- stdout (tail)\n{run.out[-4000:]}\n--- stderr (tail)\n{run.err[-4000:]}"
    assert run.code is not None, f"{script} --quick ran over {TIMEOUT} s and was stopped\n{tail}"
    assert run.code == 0, f"{script} --quick exited with {run.code} after {run.seconds:.0f} s\n{tail}"
    lines = [line.strip() for line in run.out.splitlines() if line.strip()]
    ratios = []
    for line in reversed(lines):  # the trailing block of ratio lines (comment lines may sit among them)
        if line.startswith("#"):
            continue
        if not line.startswith("ratio "):
            break
        ratios.append(line)
    assert ratios, f"{script} --quick printed no ratio lines last\n{tail}"
    bad = [line for line in ratios if not _is_ratio(line)]
    assert not bad, f"{script} --quick: ratio lines without a number: {bad}\n{tail}"
    print(f"{script} --quick: {run.seconds:.0f} s, {len(ratios)} ratio lines")
