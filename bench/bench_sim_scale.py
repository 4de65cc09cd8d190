"""Simulation scale benchmark: round time and whole-run memory at 10 to 10,000 virtual clients.

Run ``python bench/bench_sim_scale.py`` (sizes 10, 1,000 and 10,000; several minutes) or ``--quick``
(a smoke check, about a minute per app: 4 clients, all sampled, one task each, 2 rounds, no
waiting for an idle machine, no re-runs, no report file unless ``--out`` is given). Absolute
figures first, then ``peak_mb_<largest N> = <value>`` and one
``ratio round_time_ours_vs_bare_<N> = <value>`` line per size, ratios last.

What runs: for every N, two Flower simulations through ``fedlora.core.flower_runner`` (a private
SuperLink on 127.0.0.1, Flower's simulation runtime on Ray with one actor of 1 CPU per core, or
``$FEDLORA_RAY_CPUS`` actors, as fl-sim), each with N virtual clients of which 10 are sampled per
round for training and 10 for evaluation (fraction-train = fraction-evaluate = 10 / N, at least 1 reply), 3 rounds,
the embedded tiny model with LoRA r = 8, 5 local steps of batch 16 on 32 training and 16
test examples per client, no DP:

- ours: fedlora's ServerApp / ClientApp (``fedlora.server.app:app``, ``fedlora.client.app:app``) with
  strategy fedavg-lora, an IID split of the embedded tasks (when the run config has the
  partition key), a run directory in a temporary directory;
- bare: ``bench/bench_bare_fedavg.py``, stock ``flwr.serverapp.strategy.FedAvg`` and a minimal
  ClientApp training the same LoRA model with the same building blocks on one embedded
  task per partition, model cached per worker process, one torch thread.

How it is measured:

- round time: the arrival time (``time.monotonic``) of Flower's ``[ROUND k/R]`` log lines
  through the runner's ``on_log_line``; round k lasts until round k + 1 starts, the last
  round until Flower's ``Strategy execution finished`` line (the end of the strategy run;
  the last line of the log if it is missing). s/round is the median of rounds 2..R (round 1
  includes the workers' warm-up: imports, model load, data). The log reaches us through
  Flower's log upload (every 0.2 s) and ``flwr log --stream`` (polls every 0.5 s), so each
  stamp carries up to ~0.7 s of jitter (round times come out near multiples of 0.5 s). The
  mean of rounds 2..R is printed too: the jitter enters it once, so with ``--rounds 10`` it
  resolves ~0.1 s. total s is the runner's whole call (SuperLink start to teardown);
- peak memory: every ~0.2 s, the sum of PSS (``/proc/PID/smaps_rollup``; RSS where that is
  unreadable) over every process carrying the run's marker env var ``FEDLORA_BENCH_TAG``
  (passed in ``extra_env``, inherited by the SuperLink, SuperExec, flwr-simulation with the
  ServerApp, Ray's GCS / raylet / workers and the ``flwr`` CLI calls). PSS splits shared
  pages among the processes that map them, so the sum does not count shared libraries
  and the page-cached model twice. The breakdown at the peak is printed per process kind,
  with the CPU seconds each kind used (where the time goes);
- a quiet machine: the same sampler counts the CPU time of every other process. Before each
  run the benchmark waits (``--max-wait``, default 600 s) until the machine is idle, and a
  run during which other processes used more than 15% of the CPU is repeated (``--retries``,
  default 2); the table shows that share ("other CPU") for the run kept.

``--set KEY=VALUE`` adds run-config overrides to our app (e.g. ``partition.scheme=tasks-per-
client`` or ``server-eval=false``, to see what they cost); ``--keep`` keeps run directories.

Goals: ours / bare round time <= 1.2 at every N; peak memory at 10,000 clients <= 5000 MB.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

from fedlora.core.flower_runner import FEDLORA_COMPONENTS, FlowerRunOutcome, FlowerRunRequest, run_flower_app  # noqa: E402
from fedlora.simulations.simulate import local_ray_cpus  # noqa: E402

TAG_VAR = "FEDLORA_BENCH_TAG"
SAMPLED = 10  # clients sampled per round, for training and for evaluation
RUN_TIMEOUT = 900.0
SAMPLE_EVERY = 0.2
QUIET = 0.15  # a run is clean if other processes use less than this share of the CPU
ROUND_RE = re.compile(r"\[ROUND (\d+)/(\d+)\]")
END_MARK = "Strategy execution finished"
WORKLOAD: dict[str, int] = {"local-steps": 5, "batch-size": 16, "num-train": 32, "num-test": 16}
TASKS = "adddigit-4,rotate-2,repeat-3,sort-desc"
APPS = ("ours", "bare")


APP_PACKAGES = ("fedlora", "bench_bare_fedavg")  # reloaded between runs (the runner itself stays)


def import_app_module(name: str, attempts: int = 5, wait: float = 60.0) -> ModuleType:
    """Import the current version of a module of the app (the code may change between runs),
    retrying: another engineer may be mid-edit."""
    for attempt in range(attempts):
        stale = [m for m in sys.modules if m.split(".")[0] in APP_PACKAGES and m != "fedlora"]
        for mod in stale:
            if mod != "fedlora.core.flower_runner":  # ours, and in use
                del sys.modules[mod]
        try:
            return importlib.import_module(name)
        except Exception as exc:  # an app module broken mid-edit raises anything
            if attempt == attempts - 1:
                raise
            print(f"# import {name} failed ({type(exc).__name__}: {exc}); retrying in {wait:.0f} s", flush=True)
            time.sleep(wait)
    raise AssertionError("unreachable")


# --- memory of the whole run -------------------------------------------------------------------


def _kb(text: str, field_name: str) -> int | None:
    match = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def process_mb(pid: int) -> float | None:
    """PSS of one process in MB (RSS where smaps_rollup is unreadable); None if it is gone."""
    for name, key in (("smaps_rollup", "Pss"), ("status", "VmRSS")):
        try:
            kb = _kb(Path(f"/proc/{pid}/{name}").read_text(), key)
        except OSError:
            continue
        if kb is not None:
            return kb / 1024
    return None


_KINDS = {
    "flower-superlink": "superlink",
    "fedlora.core.superlink": "superlink",
    "flower-superexec": "superexec",
    "flwr-simulation": "flwr-simulation (ServerApp)",
    "flwr": "flwr-cli",
    "raylet": "ray-raylet",
    "gcs_server": "ray-gcs",
    "default_worker.py": "ray-workers",
    "setup_worker.py": "ray-workers",
}


def kind_of(pid: int) -> str:
    """A short label for a process of the run, for the breakdowns: its program (the script
    for Python), or Ray's process title (``ray::ClientAppActor``, ``ray::IDLE``, agents)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        if not argv[0]:  # exiting, or a forked child not yet exec'd
            return "comm:" + Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"
    if argv and argv[0].startswith("ray::"):
        title = argv[0].split()[0]
        return "ray-workers" if title.startswith(("ray::ClientAppActor", "ray::IDLE")) else "ray-agents"
    program = Path(argv[0]).name if argv else "?"
    if program.startswith("python"):
        script = next((a for a in argv[1:] if a and not a.startswith("-")), "")
        program = Path(script).name
        if script.startswith(str(Path(sys.executable).parent.parent / "lib")) and program not in _KINDS:
            return "ray-agents"  # dashboard, monitor, log_monitor, runtime-env agent
    return _KINDS.get(program, program[:30] or "?")


def split_pids(tag: str) -> tuple[list[int], list[int]]:
    """(PIDs carrying the run's tag, every other PID but this process)."""
    needle = f"{TAG_VAR}={tag}".encode()
    me = os.getpid()
    tagged, others = [], []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            mine = needle in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours to read
            mine = False
        (tagged if mine else others).append(int(entry))
    return tagged, others


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far; None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass
class MemorySampler:
    """Samples the run's processes in a thread every ~0.2 s.

    Keeps the peak of their summed PSS with its breakdown by process kind, the CPU seconds
    they use by kind, and the CPU seconds every other process uses meanwhile (another job
    on the machine skews the timings: the report shows it). CPU time is counted between
    samples, so a process's last < 0.2 s before it exits is missed.
    """

    tag: str
    peak_mb: float = 0.0
    peak_breakdown: dict[str, tuple[int, float]] = field(default_factory=dict)
    cpu_by_kind: dict[str, float] = field(default_factory=dict)
    other_cpu_s: float = 0.0
    wall_s: float = 0.0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _cpu: dict[int, float] = field(default_factory=dict)

    def __enter__(self) -> MemorySampler:
        self.wall_s = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.wall_s = time.monotonic() - self.wall_s

    def other_cpu_share(self) -> float:
        """CPU used by processes outside the run, as a share of all the machine's cores."""
        return self.other_cpu_s / (self.wall_s * (os.cpu_count() or 1)) if self.wall_s > 0 else float("nan")

    def _kind(self, pid: int) -> str:
        return kind_of(pid)  # not cached: Ray retitles a worker when it becomes an actor

    def _count_cpu(self, pids: list[int], kinds: bool) -> None:
        for pid in pids:
            now = cpu_seconds(pid)
            if now is None:
                continue
            before = self._cpu.get(pid, 0.0)  # first seen: started during the run
            self._cpu[pid] = now
            if kinds:
                kind = self._kind(pid)
                self.cpu_by_kind[kind] = self.cpu_by_kind.get(kind, 0.0) + now - before
            else:
                self.other_cpu_s += now - before

    def _run(self) -> None:
        first = True
        while not self._stop.is_set():
            started = time.monotonic()
            tagged, others = split_pids(self.tag)
            if first:  # the others' CPU time counts from the run's start, not since they started
                self._cpu.update({pid: t for pid in others if (t := cpu_seconds(pid)) is not None})
                first = False
            else:
                self._count_cpu(others, kinds=False)
            self._count_cpu(tagged, kinds=True)
            sizes = {pid: process_mb(pid) for pid in tagged}
            total = sum(mb for mb in sizes.values() if mb is not None)
            self.samples += 1
            if total > self.peak_mb:
                self.peak_mb = total
                breakdown: dict[str, tuple[int, float]] = {}
                for pid, mb in sizes.items():
                    if mb is not None:
                        count, acc = breakdown.get(self._kind(pid), (0, 0.0))
                        breakdown[self._kind(pid)] = (count + 1, acc + mb)
                self.peak_breakdown = breakdown
            self._stop.wait(max(0.0, SAMPLE_EVERY - (time.monotonic() - started)))


# --- round timing --------------------------------------------------------------------------------


@dataclass
class RoundClock:
    """Arrival times of Flower's round lines, the end-of-strategy line and the last line."""

    starts: dict[int, float] = field(default_factory=dict)
    strategy_end: float | None = None
    last_line: float | None = None
    tail: list[str] = field(default_factory=list)

    def __call__(self, line: str) -> None:
        now = time.monotonic()
        self.last_line = now
        self.tail = [*self.tail[-59:], line]
        match = ROUND_RE.search(line)
        if match:
            self.starts.setdefault(int(match.group(1)), now)
        elif END_MARK in line and self.strategy_end is None:
            self.strategy_end = now

    def round_seconds(self) -> dict[int, float]:
        end = self.strategy_end if self.strategy_end is not None else self.last_line
        rounds = sorted(self.starts)
        out: dict[int, float] = {}
        for k in rounds:
            stop = self.starts.get(k + 1, end if k == rounds[-1] else None)
            if stop is not None:
                out[k] = stop - self.starts[k]
        return out


# --- one run ----------------------------------------------------------------------------------------


@dataclass
class RunResult:
    app: str
    n: int
    status: str
    total_s: float
    rounds: dict[int, float]
    peak_mb: float
    breakdown: dict[str, tuple[int, float]]
    samples: int
    cpu_by_kind: dict[str, float]
    other_cpu: float  # share of the machine's CPU used by processes outside the run
    workdir: Path
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed" and len(self.rounds) > 0

    @property
    def s_per_round(self) -> float:
        later = [s for k, s in self.rounds.items() if k >= 2]
        return statistics.median(later or list(self.rounds.values())) if self.rounds else float("nan")

    @property
    def mean_per_round(self) -> float:
        """Mean of rounds 2..R: start of round 2 to the end, over R - 1; the stamps' jitter
        enters once, not once per round, so it is the more precise figure when R > 3."""
        later = [s for k, s in self.rounds.items() if k >= 2]
        return statistics.fmean(later or list(self.rounds.values())) if self.rounds else float("nan")


def ours_request(
    n: int, rounds: int, workdir: Path, tmp: Path, tag: str, extra: Mapping[str, str] | None = None
) -> FlowerRunRequest:
    federation = import_app_module("fedlora.core.config")
    defaults: Mapping[str, Any] = federation.DEFAULT_RUN_CONFIG
    overrides: dict[str, bool | int | float | str] = {
        "num-clients": n,
        "fraction-train": min(SAMPLED, n) / n,
        "fraction-evaluate": min(SAMPLED, n) / n,
        "num-rounds": rounds,
        **WORKLOAD,
        "run-dir": str(tmp / "runs" / workdir.name),
        "tasks": TASKS,
    }
    # the bare app's data: one task per client (an IID mix pads every batch to the longest task)
    overrides["partition.scheme"] = "tasks-per-client"
    overrides["partition.tasks-per-client"] = 1
    for key, text in (extra or {}).items():  # --set KEY=VALUE, typed like the key's default
        default = defaults[key] if key in defaults else ""
        value: bool | int | float | str = text
        if isinstance(default, bool):
            value = text.lower() in ("1", "true", "yes")
        elif isinstance(default, int | float):
            value = type(default)(text)
        overrides[key] = value
    return _request(FEDLORA_COMPONENTS, "fedlora-sim-scale", defaults, overrides, n, workdir, tag)


def bare_request(n: int, rounds: int, workdir: Path, tag: str) -> FlowerRunRequest:
    bare = import_app_module("bench_bare_fedavg")
    overrides: dict[str, bool | int | float | str] = {
        "num-clients": n,
        "fraction-train": min(SAMPLED, n) / n,
        "fraction-evaluate": min(SAMPLED, n) / n,
        "num-rounds": rounds,
        **WORKLOAD,
        "tasks": TASKS,
    }
    components = ("bench_bare_fedavg:server_app", "bench_bare_fedavg:client_app")
    return _request(components, "bare-fedavg", bare.DEFAULT_CONFIG, overrides, n, workdir, tag, (BENCH,))


def _request(
    components: tuple[str, str],
    app_name: str,
    defaults: Mapping[str, Any],
    overrides: Mapping[str, bool | int | float | str],
    n: int,
    workdir: Path,
    tag: str,
    pythonpath: tuple[Path, ...] = (),
) -> FlowerRunRequest:
    """One benchmark run: n supernodes, one CPU per actor, tagged so its processes can be measured."""
    return FlowerRunRequest(
        components=components,
        app_name=app_name,
        default_config=dict(defaults),
        overrides=overrides,
        num_supernodes=n,
        client_num_cpus=1,
        ray_num_cpus=local_ray_cpus(None, None),  # $FEDLORA_RAY_CPUS, as fl-sim honours it
        timeout=RUN_TIMEOUT,
        workdir=workdir,
        extra_env={TAG_VAR: tag},
        pythonpath=pythonpath,
    )


def machine_busy(seconds: float = 3.0) -> float:
    """Share of all cores busy over ``seconds`` (``/proc/stat``: everything but idle and iowait)."""

    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(values), values[3] + values[4]

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_until_quiet(max_wait: float) -> float:
    """Wait (up to ``max_wait`` s) until the machine is idle: other jobs skew the timings."""
    deadline = time.monotonic() + max_wait
    busy = machine_busy()
    if busy > QUIET:
        print(f"# machine {100 * busy:.0f}% busy; waiting up to {max_wait:.0f} s for it to be idle", flush=True)
    while busy > QUIET and time.monotonic() < deadline:
        busy = machine_busy(5.0)
    return busy


def run_one(
    app: str, n: int, rounds: int, tmp: Path, extra: Mapping[str, str] | None = None, attempt: int = 0
) -> RunResult:
    tag = uuid.uuid4().hex
    workdir = tmp / (f"{app}-{n}" + (f"-retry{attempt}" if attempt else ""))  # a run-dir holds one run
    if app == "ours":
        request = ours_request(n, rounds, workdir, tmp, tag, extra)
    else:
        request = bare_request(n, rounds, workdir, tag)
    clock = RoundClock()
    print(f"# running {app} with {n:,} clients ...", flush=True)
    with MemorySampler(tag) as memory:
        try:
            outcome: FlowerRunOutcome | None = run_flower_app(request, on_log_line=clock)
            error = ""
        except Exception as exc:  # FlowerRunError, or app code broken mid-edit
            outcome, error = None, f"{type(exc).__name__}: {exc}"
    status = outcome.status if outcome is not None else "error"
    if outcome is not None and outcome.timed_out:
        status += " (timed out)"
    detail = error or ("" if outcome is None or outcome.completed else outcome.status_details)
    result = RunResult(
        app=app,
        n=n,
        status=status,
        total_s=outcome.seconds if outcome is not None else float("nan"),
        rounds=clock.round_seconds() if outcome is not None and outcome.completed else {},
        peak_mb=memory.peak_mb,
        breakdown=memory.peak_breakdown,
        samples=memory.samples,
        cpu_by_kind=memory.cpu_by_kind,
        other_cpu=memory.other_cpu_share(),
        workdir=workdir,
        detail=detail,
    )
    rounds_text = ", ".join(f"{k}: {s:.2f}" for k, s in sorted(result.rounds.items()))
    print(
        f"#   {status}: {result.total_s:.1f} s total, rounds [{rounds_text}] s, peak {result.peak_mb:.0f} MB "
        f"({memory.samples} samples), other processes used {100 * result.other_cpu:.0f}% of the CPU",
        flush=True,
    )
    if not result.ok:
        print(f"#   details: {detail[:3000]}", flush=True)
        print("#   last log lines:\n" + "\n".join(f"#     {line}" for line in clock.tail[-40:]), flush=True)
        print(f"#   logs kept in {workdir / 'logs'}", flush=True)
    return result


# --- report ------------------------------------------------------------------------------------------


def report(results: list[RunResult], sizes: list[int], rounds: int, extra: Mapping[str, str]) -> list[str]:
    lines = [
        "# Simulation scale benchmark",
        f"min({SAMPLED}, N) clients sampled per round (train and evaluate), {rounds} rounds, embedded model, LoRA r=8, "
        f"local-steps {WORKLOAD['local-steps']}, batch {WORKLOAD['batch-size']}, {WORKLOAD['num-train']} train / "
        f"{WORKLOAD['num-test']} test examples per client, no DP; 2 Ray actors x 1 CPU; "
        f"{os.cpu_count()} CPUs on this machine",
        "s/round: median of rounds 2..R from Flower's [ROUND k/R] log lines (+-0.7 s log-stream jitter per stamp; "
        "the mean of rounds 2..R carries it once, so it is the more precise figure with more rounds); "
        "total s: SuperLink start to teardown; peak MB: summed PSS of every process of the run, sampled every 0.2 s; "
        "other CPU: share of the machine's CPU used by processes outside the run meanwhile (should be ~0)",
        *([f"extra overrides of our app: {dict(extra)}"] if extra else []),
        "",
        f"{'N':>7}  {'app':<5}{'s/round':>9}{'mean 2..R':>11}{'round 1 s':>11}{'total s':>9}{'peak MB':>9}"
        f"{'other CPU':>11}  status",
    ]
    for r in results:
        r1 = r.rounds.get(1, float("nan"))
        lines.append(
            f"{r.n:>7,}  {r.app:<5}{r.s_per_round:>9.2f}{r.mean_per_round:>11.2f}{r1:>11.2f}{r.total_s:>9.1f}"
            f"{r.peak_mb:>9.0f}{100 * r.other_cpu:>10.0f}%  {r.status}"
        )
    lines += ["", "per-round seconds; memory at the peak by process kind (count x MB); CPU seconds by process kind:"]
    for r in results:
        rounds_text = ", ".join(f"{s:.2f}" for _, s in sorted(r.rounds.items())) or "-"
        kinds = sorted(r.breakdown.items(), key=lambda kv: -kv[1][1])
        mem_text = ", ".join(f"{k} {c}x {mb:.0f}" for k, (c, mb) in kinds) or "-"
        cpu = sorted(r.cpu_by_kind.items(), key=lambda kv: -kv[1])
        cpu_text = ", ".join(f"{k} {sec:.1f}" for k, sec in cpu if sec >= 0.05) or "-"
        lines.append(f"{r.n:>7,}  {r.app:<5} rounds [{rounds_text}]")
        lines.append(f"{'':>14} memory: {mem_text}")
        lines.append(f"{'':>14} CPU s: {cpu_text}")
    failed = [r for r in results if not r.ok]
    if failed:
        lines += ["", "failed runs:"]
        for r in failed:
            lines.append(f"{r.n:>7,}  {r.app:<5} {r.status}: {r.detail.strip().splitlines()[0] if r.detail else ''}")
    lines.append("")
    by = {(r.app, r.n): r for r in results}
    largest = max(sizes)
    ours_largest = by.get(("ours", largest))
    peak_name = f"peak_mb_{largest}"
    peak = ours_largest.peak_mb if ours_largest is not None and ours_largest.ok else float("nan")
    lines.append(f"{peak_name} = {peak:.0f}")
    for n in sizes:
        ours, bare = by.get(("ours", n)), by.get(("bare", n))
        ok = ours is not None and bare is not None and ours.ok and bare.ok
        ratio = ours.s_per_round / bare.s_per_round if ok and ours and bare else float("nan")
        lines.append(f"ratio round_time_ours_vs_bare_{n} = {ratio:.3f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default="10,1000,10000", help="numbers of virtual clients, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke check: size 10, 2 rounds, no idle wait")
    parser.add_argument("--apps", default="ours,bare", help="which apps to run: ours, bare or both")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra run-config override of our app"
    )
    parser.add_argument(
        "--retries", type=int, default=2, help="re-runs of a run during which other processes were busy"
    )
    parser.add_argument("--max-wait", type=float, default=600.0, help="seconds to wait for an idle machine per run")
    parser.add_argument("--keep", action="store_true", help="keep the run directories and logs")
    parser.add_argument("--out", type=Path, default=None, help="report file (default: bench/results/sim_scale.txt)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.retries, args.max_wait = 2, 0, 0.0
    elif args.out is None:
        args.out = BENCH / "results" / "sim_scale.txt"
    quick_size = len(TASKS.split(","))  # one task per client, as the full run's clients have
    sizes = [quick_size] if args.quick else [int(s) for s in args.sizes.split(",") if s.strip()]
    apps = [a for a in args.apps.split(",") if a in APPS]
    if any(n < SAMPLED for n in sizes if not args.quick) or args.rounds < 1:
        parser.error(f"sizes must be >= {SAMPLED} and rounds >= 1")

    extra = dict(item.split("=", 1) for item in args.set)
    tmp = Path(tempfile.mkdtemp(prefix="sim_scale_"))
    results: list[RunResult] = []
    for n in sizes:
        for app in apps:
            for attempt in range(args.retries + 1):
                wait_until_quiet(args.max_wait)
                result = run_one(app, n, args.rounds, tmp, extra, attempt)
                if result.other_cpu <= QUIET or attempt == args.retries:
                    break
                print(
                    f"#   other processes used {100 * result.other_cpu:.0f}% of the CPU: running it again", flush=True
                )
            results.append(result)
    lines = report(results, sizes, args.rounds, extra)
    text = "\n".join(lines) + "\n"
    print()
    print(text, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    if all(r.ok for r in results) and not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"# run directories and logs kept in {tmp}")


if __name__ == "__main__":
    main()
