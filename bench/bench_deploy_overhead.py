"""Deployment overhead benchmark: per-round overhead of a real SuperLink + SuperNodes run.

Run ``python bench/bench_deploy_overhead.py --only bare`` (3 clients, 4 rounds, 20 local steps;
about 3 minutes per app on two idle cores) and ``--save`` to write
``bench/results/deploy_overhead.txt``. Absolute figures first, then
``ratio deploy_overhead_ours_over_bare = <value>`` last (NaN while one app is missing).
Goal: ours / bare <= 0.5. ``--quick`` is a smoke run of bare and ours (1 client, 2 rounds of 2
local steps, no waiting for an idle machine, no re-runs; ``--only`` picks other apps): about a
minute per app on two shared cores, meaningless figures.

Knobs: ``--threads`` (torch threads per process, default 1: three clients on two cores
with torch's default of one thread per core run their training loops up to 20x slower, and
their imports too), ``--superlink-db memory`` (the bare SuperLink's state in memory instead
of an SQLite file: Flower then moves the messages' objects several times faster),
``--env KEY=VALUE`` (e.g. ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.05``, for both apps),
``--keep`` (work directories and stamped logs), ``--timeout``.

Overhead of a round = its wall time minus its slowest client's training time: everything
that is not the one training loop the round has to wait for (message pickup and delivery,
ClientApp process start and imports, model loading, the evaluation round trip, aggregation).
Wall time of round r = the server's round-end stamp of r minus that of r - 1; round 0 is
Flower's ``evaluate_fn(0)`` call before training, so round 1 counts from there. Slowest = the
largest ``train-seconds`` (the training loop alone, ``time.perf_counter``) among the round's
replies. Figures: mean and median over rounds 2..R (round 1 includes the warm-up: the first
FAB fetch, cold page cache) and over 1..R; the goal's figure is the mean over rounds 2..R.

Two apps behind one :class:`App` interface (start server side and clients, wait for the end,
read round stamps and train seconds), on the same machine and model (the embedded model,
LoRA r = 8 on all linear layers), every process on 127.0.0.1:

- bare (:class:`BareApp`): ``bench/bench_bare_deploy/``, Flower's stock FedAvg with Flower's
  defaults (a train and an evaluate message to every node each round), a ClientApp that
  imports torch / transformers / peft and loads the model in every message, as Flower's LLM
  example does; ``flower-superlink --insecure`` + N ``flower-supernode --insecure``, submitted
  with ``flwr run APP_DIR CONNECTION --stream``. Round stamps and replies (with the
  ClientApp's own timing stamps) come from the ServerApp's events file; the SuperNodes'
  output is stamped line by line on arrival, for when each message was picked up and sent;
- ours (:class:`OursApp`): fedlora's ``fl-server start`` + N ``fl-client start``; round
  stamps and train seconds from the run directory's ``metrics.jsonl``. A stub until those
  commands exist: the lead fills in :meth:`OursApp.launch` and :meth:`OursApp.wait`.

Every process the benchmark starts gets its own process group (killed by group on timeout,
error or exit: ``finally`` and ``atexit``) and the run's env tag, which the teardown sweep
and ``fedlora.core.flower_runner``'s reaper (a watchdog for when this process is killed outright)
use to find anything left over. The same quiet-machine check and CPU/memory sampler as
``bench/bench_sim_scale.py``.
"""

from __future__ import annotations

import abc
import argparse
import atexit
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

import bench_sim_scale  # noqa: E402
from bench_sim_scale import QUIET, TAG_VAR, MemorySampler, wait_until_quiet  # noqa: E402

from fedlora.core.flower_runner import (  # noqa: E402
    CONNECTION,
    RUN_TAG_VAR,
    FlowerRunError,
    _FlowerCli,
    _json_object,
    _kill_tagged,
    _LogPaths,
    _release_reaper,
    _start_reaper,
    _wait_healthy,
    _write_connection,
    free_port,
    write_run_config,
)
from fedlora.core.run_dir import RunDir  # noqa: E402

BARE_APP_DIR = BENCH / "bench_bare_deploy"
RUN_TIMEOUT = 900.0
START_TIMEOUT = 60.0
TEARDOWN_GRACE = 5.0
ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
APPS = ("bare", "ours", "ours-nodp")
# The sampler's /proc scans cost CPU, which on two cores is part of what we measure: once a
# second, not every 0.2 s (a process's last < 1 s of CPU before it exits goes uncounted).
bench_sim_scale.SAMPLE_EVERY = 1.0
NAN = float("nan")


# --- processes -----------------------------------------------------------------------------------


@dataclass
class Process:
    """A started process in its own group, its output stamped (``time.time()``) line by line."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    lines: list[tuple[float, str]] = field(default_factory=list)
    reader: threading.Thread | None = None

    def pump(self, stream: IO[bytes]) -> None:
        with self.log_path.open("a", encoding="utf-8") as log:
            for raw in iter(stream.readline, b""):
                now = time.time()
                text = ANSI_RE.sub("", raw.decode(errors="replace")).rstrip("\r\n")
                self.lines.append((now, text))
                log.write(f"{now:.3f} {text}\n")
                log.flush()

    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class Deployment:
    """What the harness owns for one app's run: a work directory, the environment every
    process gets, the workload, a deadline, and every process started (through :meth:`spawn`).

    :meth:`teardown` (called by the harness in ``finally`` and at exit) kills each process
    group, then anything else still carrying the run's tag.
    """

    workdir: Path
    env: Mapping[str, str]
    clients: int
    rounds: int
    local_steps: int
    deadline: float  # time.monotonic()
    tag: str
    processes: dict[str, Process] = field(default_factory=dict)
    torn_down: bool = False

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    @property
    def bin_dir(self) -> Path:
        return Path(sys.executable).parent

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def spawn(self, name: str, cmd: Sequence[str], env: Mapping[str, str] | None = None) -> Process:
        """Start ``cmd`` in a new session (its own process group), stdout + stderr stamped
        into ``logs/NAME.log`` and :attr:`Process.lines`."""
        if name in self.processes:
            raise ValueError(f"a process called {name!r} was started already")
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{name}.log"
        with log_path.open("a", encoding="utf-8") as log:
            log.write(f"# $ {' '.join(cmd)}\n")
        popen = subprocess.Popen(
            list(cmd),
            env={**self.env, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        proc = Process(name, popen, log_path)
        assert popen.stdout is not None
        proc.reader = threading.Thread(target=proc.pump, args=(popen.stdout,), daemon=True)
        proc.reader.start()
        self.processes[name] = proc
        return proc

    def check_alive(self, *names: str) -> None:
        """Raise if one of these processes has exited."""
        for name in names:
            proc = self.processes[name]
            if not proc.alive():
                tail = "\n".join(text for _, text in proc.lines[-30:])
                raise RuntimeError(f"{name} exited with code {proc.popen.returncode}; last lines:\n{tail}")

    def teardown(self) -> tuple[int, ...]:
        """SIGTERM every process group, SIGKILL what is left after a grace period, then the
        tagged stragglers (PIDs returned). Idempotent."""
        if self.torn_down:
            return ()
        self.torn_down = True
        live = [p for p in self.processes.values() if p.alive()]
        for proc in live:
            _signal_group(proc.popen.pid, signal.SIGTERM)
        end = time.monotonic() + TEARDOWN_GRACE
        for proc in live:
            try:
                proc.popen.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.processes.values():
            _signal_group(proc.popen.pid, signal.SIGKILL)  # the group's other members too
            if proc.alive():
                proc.popen.wait()
        leftovers = _kill_tagged(self.tag, grace=0.5, log_path=self.logs / "teardown.log")
        for proc in self.processes.values():
            if proc.reader is not None:
                proc.reader.join(timeout=5.0)
        return leftovers


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone


_LIVE: list[Deployment] = []  # torn down at exit, whatever happens


@atexit.register
def _teardown_live() -> None:
    for dep in _LIVE:
        dep.teardown()


def _sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # runs the finally blocks and atexit


def child_env(tag: str, threads: int, extra: Mapping[str, str]) -> dict[str, str]:
    """The environment of every process of a run: quiet and offline Flower, unbuffered
    output, ``threads`` torch threads per process (0: torch's default, one per core), no
    proxy for loopback, this venv's tools on PATH (the SuperLink and SuperNodes start
    ``flower-superexec`` and the app processes by name) and the run's tag."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_")}
    env.update(
        {
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            **({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}),
            "PATH": os.pathsep.join(p for p in (str(Path(sys.executable).parent), os.environ.get("PATH", "")) if p),
            TAG_VAR: tag,  # sim_scale's CPU / memory sampler
            RUN_TAG_VAR: tag,  # the runner's teardown sweep and reaper
        }
    )
    for var in ("NO_PROXY", "no_proxy"):
        env[var] = ",".join(p for p in (env.get(var, ""), "127.0.0.1,localhost") if p)
    env.update(extra)
    return env


# --- what an app reports -------------------------------------------------------------------------


@dataclass
class MessageTiming:
    """One message's life, ``time.time()`` stamps (NaN where an app does not report them)."""

    kind: str  # "train" or "evaluate"
    round: int
    client: str
    pushed: float = NAN  # the ServerApp sent it
    picked_up: float = NAN  # the SuperNode pulled it (its "Receiving" line)
    received: float = NAN  # the SuperNode pulled its objects ("Received successfully")
    process_start: float = NAN  # the ClientApp process was created
    flwr_started: float = NAN  # flwr-clientapp's main began ("Start `flwr-clientapp` process")
    module: float = NAN  # the app module was imported
    handler: float = NAN  # the handler was entered
    imports: float = NAN  # torch / transformers / peft imported
    model: float = NAN  # model, data and received state ready
    work_end: float = NAN  # training / evaluation done
    reply: float = NAN  # the reply was built
    sending: float = NAN  # the SuperNode found the reply ("Sending" line)
    sent: float = NAN  # the SuperNode finished sending it ("Sent successfully")
    collected: float = NAN  # the ServerApp had every reply of this kind and round
    process_seconds: float = NAN  # process start to reply, when only that is known


@dataclass
class RunTimings:
    """Round-end stamps (round 0 = before training; any clock, only differences count),
    per round the train seconds of each client, and whatever per-message detail the app has."""

    round_end: dict[int, float] = field(default_factory=dict)
    train_seconds: dict[int, dict[str, float]] = field(default_factory=dict)
    messages: list[MessageTiming] = field(default_factory=list)
    server_gaps: dict[str, list[float]] = field(default_factory=dict)  # label -> seconds, rounds 2..R

    def rounds(self) -> dict[int, tuple[float, float, float]]:
        """round -> (wall, slowest train, overhead) for every round with both stamps."""
        out: dict[int, tuple[float, float, float]] = {}
        for r in sorted(self.round_end):
            if r >= 1 and r - 1 in self.round_end and self.train_seconds.get(r):
                wall = self.round_end[r] - self.round_end[r - 1]
                slowest = max(self.train_seconds[r].values())
                out[r] = (wall, slowest, wall - slowest)
        return out


class App(abc.ABC):
    """One federated app under test. Start every process through ``dep.spawn`` (the harness
    bounds them in time and tears them down); stay within ``dep.deadline``."""

    name: str

    @abc.abstractmethod
    def launch(self, dep: Deployment) -> None:
        """Start the server side and ``dep.clients`` clients; return once the run is submitted."""

    @abc.abstractmethod
    def wait(self, dep: Deployment) -> str:
        """Block until the run ends or the deadline passes; return its final status
        (``finished:completed`` on success)."""

    @abc.abstractmethod
    def timings(self, dep: Deployment) -> RunTimings:
        """The run's round stamps and train seconds (after :meth:`wait`, before teardown)."""


# --- bare: a stock Flower app on a SuperLink and SuperNodes -----------------------------------------


class BareApp(App):
    """``bench/bench_bare_deploy/`` on ``flower-superlink`` + N ``flower-supernode``, plain HTTP."""

    name = "bare"

    def __init__(self, database: bool = True) -> None:
        self.database = database  # SuperLink state in an SQLite file, else in memory
        self.home = Path()
        self.events = Path()
        self.cli: _FlowerCli | None = None

    def launch(self, dep: Deployment) -> None:
        self.home = dep.workdir / "flwr_home"  # the SuperLink's and the `flwr` CLI's
        self.home.mkdir(parents=True, exist_ok=True)
        home_env = {"FLWR_HOME": str(self.home)}
        paths = _LogPaths(superlink=dep.logs / "superlink.log", run=dep.logs / "flwr-run.log", cli=dep.logs / "cli.log")
        for attempt in range(3):
            port = free_port()
            name = "superlink" if attempt == 0 else f"superlink-{attempt}"
            paths = _LogPaths(superlink=dep.logs / f"{name}.log", run=paths.run, cli=paths.cli)
            link = dep.spawn(
                name,
                [
                    str(dep.bin_dir / "flower-superlink"),
                    "--insecure",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--disable-runtime-dependency-installation",
                    *(["--database", str(dep.workdir / "superlink.db")] if self.database else []),
                ],
                home_env,
            )
            # _wait_healthy watches a Popen and reads the log for its error message
            if _wait_healthy(link.popen, port, time.monotonic() + min(START_TIMEOUT, dep.remaining()), paths):
                break
            if attempt == 2 or "address already in use" not in "\n".join(t for _, t in link.lines).lower():
                dep.check_alive(name)
        self.superlink = name
        _write_connection(self.home, port)
        self.cli = _FlowerCli(bin_dir=dep.bin_dir, env={**dep.env, **home_env}, log_path=paths.cli)
        for i in range(dep.clients):
            node_home = dep.workdir / f"node-{i}" / "flwr_home"  # each node its own, as on its own machine
            node_home.mkdir(parents=True, exist_ok=True)
            dep.spawn(
                f"supernode-{i}",
                [
                    str(dep.bin_dir / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{port}",
                    "--port",
                    str(free_port()),
                    "--node-config",
                    f"partition-id={i} num-partitions={dep.clients}",
                ],
                {"FLWR_HOME": str(node_home)},
            )
        self.events = dep.workdir / "events.jsonl"
        overrides: dict[str, bool | int | float | str] = {
            "num-clients": dep.clients,
            "num-rounds": dep.rounds,
            "local-steps": dep.local_steps,
            "events-file": str(self.events),
        }
        run_config = write_run_config(dep.workdir / "run_config.toml", overrides)
        cmd = [str(dep.bin_dir / "flwr"), "run", str(BARE_APP_DIR), CONNECTION, "--stream", "--run-config"]
        dep.spawn("flwr-run", [*cmd, str(run_config)], home_env)

    def wait(self, dep: Deployment) -> str:
        nodes = [f"supernode-{i}" for i in range(dep.clients)]
        run = dep.processes["flwr-run"]
        while run.alive():  # `flwr run --stream` follows the log until the run has finished
            dep.check_alive(self.superlink, *nodes)
            if dep.remaining() <= 0:
                return "timed out"
            time.sleep(0.2)
        assert self.cli is not None
        done = self.cli.call(["ls", CONNECTION, "--format", "json"], timeout=30.0)
        runs = (_json_object(done.stdout).get("runs") or []) if done is not None else []
        if not runs:
            return f"unknown (`flwr run` exited with {run.popen.returncode}; `flwr ls` shows no run)"
        status, details = str(runs[0].get("status", "?")), str(runs[0].get("status-details", ""))
        return status if status == "finished:completed" else f"{status}: {details}"

    def timings(self, dep: Deployment) -> RunTimings:
        rows = [json.loads(line) for line in self.events.read_text().splitlines() if line.strip()]
        out = RunTimings()
        stamps: dict[tuple[str, str, int], float] = {}  # (event, kind, round) -> t
        for row in rows:
            if row["event"] == "round-end":
                out.round_end[row["round"]] = row["t"]
            elif row["event"] in ("push", "replies"):
                stamps[(row["event"], row["kind"], row["round"])] = row["t"]
        node_log: dict[str, dict[str, float]] = {}  # message ID -> SuperNode stamps
        for i in range(dep.clients):
            node_log |= supernode_stamps(dep.processes[f"supernode-{i}"].lines)
        for row in rows:
            if row["event"] != "reply" or "metrics" not in row:
                continue
            m, kind, r = row["metrics"], row["kind"], row["round"]
            client = str(int(m["partition-id"]))
            if kind == "train":
                out.train_seconds.setdefault(r, {})[client] = m["train-seconds"]
            node = {**node_log.get(row["reply-to"], {}), **node_log.get(row["id"], {})}
            out.messages.append(
                MessageTiming(
                    kind=kind,
                    round=r,
                    client=client,
                    pushed=stamps.get(("push", kind, r), NAN),
                    picked_up=node.get("picked_up", NAN),
                    received=node.get("received", NAN),
                    process_start=m["t-process-start"],
                    flwr_started=node.get("flwr_started", NAN),
                    module=m["t-module"],
                    handler=m["t-handler"],
                    imports=m["t-imports"],
                    model=m["t-model"],
                    work_end=m["t-work-end"],
                    reply=m["t-reply"],
                    sending=node.get("sending", NAN),
                    sent=node.get("sent", NAN),
                    collected=stamps.get(("replies", kind, r), NAN),
                    process_seconds=m["t-reply"] - m["t-process-start"],
                )
            )
        for r in range(2, dep.rounds + 1):

            def gap(a: tuple[str, str, int] | int, b: tuple[str, str, int] | int) -> float:
                """Seconds from stamp a to stamp b: an event key, or a round number for its end."""
                ta = out.round_end.get(a, NAN) if isinstance(a, int) else stamps.get(a, NAN)
                tb = out.round_end.get(b, NAN) if isinstance(b, int) else stamps.get(b, NAN)
                return tb - ta

            gaps = {
                "last reply sent -> ServerApp has all train replies (polls every 3 s)": _last_sent_gap(
                    out.messages, "train", r
                ),
                "train replies -> evaluate messages sent (aggregation)": gap(
                    ("replies", "train", r), ("push", "evaluate", r)
                ),
                "last reply sent -> ServerApp has all evaluate replies": _last_sent_gap(out.messages, "evaluate", r),
                "evaluate replies -> round end": gap(("replies", "evaluate", r), r),
                "round end -> next round's train messages sent": gap(r, ("push", "train", r + 1)),
                "train phase (sent -> all replies)": gap(("push", "train", r), ("replies", "train", r)),
                "evaluate phase (sent -> all replies)": gap(("push", "evaluate", r), ("replies", "evaluate", r)),
            }
            for label, seconds in gaps.items():
                out.server_gaps.setdefault(label, []).append(seconds)
        return out


def _last_sent_gap(messages: list[MessageTiming], kind: str, r: int) -> float:
    mine = [m for m in messages if m.kind == kind and m.round == r]
    sent = [m.sent for m in mine if m.sent == m.sent]
    return mine[0].collected - max(sent) if sent else NAN


MESSAGE_LINE = re.compile(r"(Receiving|Sending): \w+ message \(ID: (\w+)\)")


def supernode_stamps(lines: list[tuple[float, str]]) -> dict[str, dict[str, float]]:
    """Message ID -> when this SuperNode's output showed what happened to it.

    For a message from the server: ``picked_up`` ("Receiving: ... (ID: X)"), ``received``
    ("Received successfully": its objects are pulled) and ``flwr_started`` (the ClientApp
    process's "Start `flwr-clientapp` process", logged once flwr is imported). For a reply:
    ``sending`` ("Sending: ... (ID: Y)") and ``sent`` ("Sent successfully"). A SuperNode
    handles one message at a time, so each unlabelled line belongs to the last message named.
    """
    out: dict[str, dict[str, float]] = {}
    current: dict[str, float] | None = None
    for t, text in lines:
        if match := MESSAGE_LINE.search(text):
            current = out.setdefault(match.group(2), {})
            current.setdefault("picked_up" if match.group(1) == "Receiving" else "sending", t)
        elif current is None:
            continue
        elif "Received successfully" in text:
            current.setdefault("received", t)
        elif "Start `flwr-clientapp` process" in text:
            current.setdefault("flwr_started", t)
        elif "Sent successfully" in text:
            current.setdefault("sent", t)
    return out


# --- ours: fedlora's fl-server / fl-client ----------------------------------------------------------


class OursApp(App):
    """fedlora deployed as its users run it: ``fl-server init`` / ``keygen`` / ``enroll``, then
    ``fl-server start SERVER_DIR`` (its own SuperLink, TLS + SuperNode authentication, the run
    submitted) and N x ``fl-client start`` (a supervised SuperNode each). The run is the shipped
    default (FFA-LoRA, DP-SGD at epsilon 8, one message per round, server-side evaluation) with
    the bare app's clients, rounds, local steps, batch, LoRA rank, task and data sizes; ``dp``
    False turns DP off to show what it costs."""

    name = "ours"

    def __init__(self, dp: bool = True) -> None:
        self.dp = dp
        self.name = "ours" if dp else "ours-nodp"
        self.run: RunDir | None = None

    def _cli(self, dep: Deployment, *argv: str) -> None:
        done = subprocess.run(
            [str(dep.bin_dir / argv[0]), *argv[1:]], env=dict(dep.env), capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {done.stdout}{done.stderr}")

    def launch(self, dep: Deployment) -> None:
        port = free_port()
        server_dir = dep.workdir / "server"
        run = (
            f"num-clients={dep.clients} num-rounds={dep.rounds} local-steps={dep.local_steps} num-train=256 "
            f'num-test=32 dp.plan-examples=256 tasks="adddigit-4" dp.enabled={str(self.dp).lower()}'
        )
        self._cli(dep, "fl-server", "init", str(server_dir), "--host", "127.0.0.1", "--port", str(port))
        for i in range(dep.clients):
            keys = dep.workdir / f"node-{i}" / "keys"
            self._cli(dep, "fl-client", "keygen", "--out", str(keys), "--name", f"client-{i}")
            self._cli(dep, "fl-server", "enroll", str(server_dir), str(keys / "client.pub"), "--name", f"client-{i}")
        run_dir = dep.workdir / "run"
        self.run = RunDir(run_dir)
        start = ["fl-server", "start", str(server_dir), "--run-dir", str(run_dir), "--run-config", run]
        dep.spawn("fl-server", [str(dep.bin_dir / start[0]), *start[1:]])
        for i in range(dep.clients):
            node = dep.workdir / f"node-{i}"
            client = [
                str(dep.bin_dir / "fl-client"), "start", "--server", f"127.0.0.1:{port}",
                "--ca", str(server_dir / "ca.pem"), "--key", str(node / "keys" / "client.key"),
                "--data", "embedded:adddigit-4", "--state-dir", str(node / "state"), "--name", f"client-{i}",
            ]  # fmt: skip
            dep.spawn(f"fl-client-{i}", client)

    def wait(self, dep: Deployment) -> str:
        server = dep.processes["fl-server"]
        while server.alive():  # fl-server start returns when the run has ended
            dep.check_alive(*(f"fl-client-{i}" for i in range(dep.clients)))
            if dep.remaining() <= 0:
                return "timed out"
            time.sleep(0.2)
        code = server.popen.returncode
        return "finished:completed" if code == 0 else f"fl-server start exited with {code}"

    def timings(self, dep: Deployment) -> RunTimings:
        if self.run is None:
            raise RuntimeError("ours: no run directory (launch did not run)")
        return timings_from_metrics(self.run)


def timings_from_metrics(run: RunDir) -> RunTimings:
    """Round stamps and train seconds from a fedlora run directory's ``metrics.jsonl``: one
    row per round (round 0 before training), ``elapsed`` seconds since the start and
    ``per-client-train`` {node: {"train-seconds": s, "process-seconds": s, ...}}."""
    out = RunTimings()
    for row in run.rows():  # a torn last line is skipped
        r = row["round"]
        out.round_end[r] = float(row["elapsed"])
        for node, metrics in (row.get("per-client-train") or {}).items():
            if "train-seconds" in metrics:
                out.train_seconds.setdefault(r, {})[str(node)] = float(metrics["train-seconds"])
            if "process-seconds" in metrics:
                out.messages.append(
                    MessageTiming("train", r, str(node), process_seconds=float(metrics["process-seconds"]))
                )
    return out


# --- one run -------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    app: str
    status: str
    total_s: float
    timings: RunTimings
    cpu_by_kind: dict[str, float]
    peak_mb: float
    other_cpu: float
    workdir: Path
    leftovers: tuple[int, ...] = ()
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed" and bool(self.timings.rounds())

    def overheads(self, first: int) -> list[float]:
        return [o for r, (_, _, o) in self.timings.rounds().items() if r >= first]


def make_app(name: str, args: argparse.Namespace) -> App:
    if name == "bare":
        return BareApp(database=args.superlink_db == "file")
    return OursApp(dp=name == "ours")


def run_one(app: App, args: argparse.Namespace, tmp: Path, attempt: int) -> RunResult:
    tag = uuid.uuid4().hex
    workdir = tmp / (app.name + (f"-retry{attempt}" if attempt else ""))
    dep = Deployment(
        workdir=workdir,
        env=child_env(tag, args.threads, dict(item.split("=", 1) for item in args.env)),
        clients=args.clients,
        rounds=args.rounds,
        local_steps=args.local_steps,
        deadline=time.monotonic() + args.timeout,
        tag=tag,
    )
    dep.logs.mkdir(parents=True, exist_ok=True)
    placeholder = workdir / "reaper"  # the reaper removes this dir (Ray's, in the runner) when it acts
    placeholder.mkdir()
    print(f"# running {app.name}: {args.clients} clients, {args.rounds} rounds ...", flush=True)
    _LIVE.append(dep)
    reaper = _start_reaper(tag, dep.logs / "teardown.log", placeholder)
    started = time.monotonic()
    timings, detail = RunTimings(), ""
    try:
        with MemorySampler(tag) as sampler:
            try:
                app.launch(dep)
                status = app.wait(dep)
                total = time.monotonic() - started
                timings = app.timings(dep)
            except Exception as exc:  # the app's own errors, NotImplementedError included
                status, detail, total = "error", f"{type(exc).__name__}: {exc}", time.monotonic() - started
            finally:
                leftovers = dep.teardown()
    finally:
        dep.teardown()
        _release_reaper(reaper)
        _LIVE.remove(dep)
    result = RunResult(
        app=app.name,
        status=status,
        total_s=total,
        timings=timings,
        cpu_by_kind=sampler.cpu_by_kind,
        peak_mb=sampler.peak_mb,
        other_cpu=sampler.other_cpu_share(),
        workdir=workdir,
        leftovers=leftovers,
        detail=detail,
    )
    rounds_text = ", ".join(f"{r}: {w:.2f}/{s:.2f}/{o:.2f}" for r, (w, s, o) in result.timings.rounds().items())
    print(
        f"#   {status}: {total:.1f} s; rounds (wall/slowest/overhead s) [{rounds_text}]; "
        f"other processes used {100 * result.other_cpu:.0f}% of the CPU",
        flush=True,
    )
    if detail:
        print(f"#   details: {detail[:3000]}\n#   logs in {dep.logs}", flush=True)
    return result


# --- report -------------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v == v]
    return statistics.fmean(finite) if finite else NAN


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if v == v]
    return statistics.median(finite) if finite else NAN


# per-message segments: (label, start attribute, end attribute)
SEGMENTS = (
    ("ServerApp sent -> SuperNode pulled it (idle SuperNode: every 3 s)", "pushed", "picked_up"),
    ("pulled -> ClientApp process created (SuperExec polls every 1 s)", "picked_up", "process_start"),
    ("process created -> flwr-clientapp main (python, flwr imports)", "process_start", "flwr_started"),
    ("flwr-clientapp main -> app module imported (pull task, FAB)", "flwr_started", "module"),
    ("app module imported -> handler entered", "module", "handler"),
    ("handler: import torch / transformers / peft", "handler", "imports"),
    ("handler: load model + LoRA, data, set state", "imports", "model"),
    ("handler: train / evaluate", "model", "work_end"),
    ("handler: build reply", "work_end", "reply"),
    ("handler returned -> SuperNode found the reply (polls every 0.5 s)", "reply", "sending"),
    ("SuperNode found the reply -> sent to the SuperLink", "sending", "sent"),
)
# not on the path above: the SuperNode pulls the message's objects while the process starts
SIDE_SEGMENTS = (("(meanwhile) SuperNode pulling the message's objects", "picked_up", "received"),)


def breakdown(r: RunResult) -> list[str]:
    later = [m for m in r.timings.messages if m.round >= 2]
    lines: list[str] = []
    for kind in ("train", "evaluate"):
        mine = [m for m in later if m.kind == kind]
        if not mine:
            continue
        lines.append(f"  {kind} messages (mean over {len(mine)}: {r.app}):")
        for label, start, end in SEGMENTS + SIDE_SEGMENTS:
            seconds = [getattr(m, end) - getattr(m, start) for m in mine]
            if any(s == s for s in seconds):
                lines.append(f"    {label:<66}{_mean(seconds):>7.2f}  (max {max(seconds):.2f})")
        cost = [m.handler - m.process_start for m in mine]
        if any(c == c for c in cost):
            label = "= per-message process cost: process created -> handler entered"
            lines.append(f"    {label:<66}{_mean(cost):>7.2f}")
        label = "= process created -> reply built"
        lines.append(f"    {label:<66}{_mean([m.process_seconds for m in mine]):>7.2f}")
    if any(s == s for seconds in r.timings.server_gaps.values() for s in seconds):
        lines.append(f"  server side (mean over rounds 2..R: {r.app}):")
        for label, seconds in r.timings.server_gaps.items():
            lines.append(f"    {label:<66}{_mean(seconds):>7.2f}")
    return lines


def report(results: list[RunResult], args: argparse.Namespace) -> list[str]:
    lines = [
        "# Deployment overhead benchmark: per-round overhead = round wall time - slowest client's training time",
        f"{args.clients} clients, {args.rounds} rounds, {args.local_steps} local steps of batch 32 (AdamW), "
        f"embedded model, LoRA r=8 on all linear layers; bare: stock FedAvg, plain HTTP, no DP, Flower's default "
        "train + evaluate messages per round; ours: fl-server start + fl-client start as shipped (TLS, SuperNode "
        "auth, FFA-LoRA with DP-SGD, one message per round, server-side evaluation); ours-nodp: the same without DP; "
        f"1 SuperLink + {args.clients} SuperNodes on "
        f"127.0.0.1 (bare: SuperLink state in {'an SQLite file' if args.superlink_db == 'file' else 'memory'}); "
        f"{os.cpu_count()} CPUs on this machine; torch threads per process: {args.threads or 'default'}"
        + (f"; extra env {args.env}" if args.env else ""),
        "wall: between the ServerApp's round-end stamps (round 1 from Flower's evaluate_fn(0) call before "
        "training); slowest: max train-seconds (training loop alone) of the round's replies; "
        "2..R: rounds 2 to R (round 1 is warm-up); total s: start of the first process to the end of the run; "
        "other CPU: share of the machine used by other processes meanwhile (should be ~0)",
        "",
        f"{'app':<10}{'overhead s':>11}{'median':>8}{'mean 1..R':>11}{'median 1..R':>13}{'wall s':>8}"
        f"{'slowest s':>11}{'total s':>9}{'other CPU':>11}  status",
        f"{'':<10}{'mean 2..R':>11}{'2..R':>8}{'':>11}{'':>13}{'2..R':>8}{'2..R':>11}",
    ]
    for r in results:
        rounds = r.timings.rounds()
        later = {k: v for k, v in rounds.items() if k >= 2}
        lines.append(
            f"{r.app:<10}{_mean(r.overheads(2)):>11.2f}{_median(r.overheads(2)):>8.2f}{_mean(r.overheads(1)):>11.2f}"
            f"{_median(r.overheads(1)):>13.2f}{_mean([w for w, _, _ in later.values()]):>8.2f}"
            f"{_mean([s for _, s, _ in later.values()]):>11.2f}{r.total_s:>9.1f}{100 * r.other_cpu:>10.0f}%  "
            f"{r.status}"
        )
    lines += ["", "per round: wall / slowest train / overhead, s"]
    for r in results:
        text = "; ".join(f"{k}: {w:.2f} / {s:.2f} / {o:.2f}" for k, (w, s, o) in r.timings.rounds().items())
        lines.append(f"  {r.app:<9} {text or '-'}")
    details = [line for r in results for line in breakdown(r)]
    if details:
        lines += ["", "where the time goes (rounds 2..R; time.time() stamps of the ServerApp, the SuperNodes' output "]
        lines[-1] += "lines on arrival, and the ClientApp; pid start from /proc, +-10 ms):"
        lines += details
    lines += ["", "CPU seconds by process kind; peak memory (summed PSS):"]
    for r in results:
        cpu = sorted(r.cpu_by_kind.items(), key=lambda kv: -kv[1])
        text = ", ".join(f"{k} {s:.1f}" for k, s in cpu if s >= 0.05) or "-"
        lines.append(f"  {r.app:<9} {text}; peak {r.peak_mb:.0f} MB")
    failed = [r for r in results if not r.ok]
    if failed:
        lines += ["", "failed runs:"]
        lines += [f"  {r.app:<9} {r.status}: {r.detail.strip().splitlines()[0] if r.detail else ''}" for r in failed]
    lines.append("")
    by = {r.app: r for r in results}
    figure = {app: _mean(by[app].overheads(2)) if app in by and by[app].ok else NAN for app in APPS}
    for app in APPS:
        lines.append(f"deploy_overhead_{app}_s = {figure[app]:.3f}")
    if "ours-nodp" in (args.only or APPS):
        lines.append(f"ratio deploy_overhead_ours_nodp_over_bare = {figure['ours-nodp'] / figure['bare']:.3f}")
    lines.append(f"ratio deploy_overhead_ours_over_bare = {figure['ours'] / figure['bare']:.3f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--only", choices=APPS, action="append", help="run only these apps (repeatable)")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=RUN_TIMEOUT, help="seconds per app run, start to end")
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="extra env for every process of both apps"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (OMP_NUM_THREADS), both apps; 0: torch's default (one per core)",
    )
    parser.add_argument(
        "--superlink-db",
        choices=("file", "memory"),
        default="memory",  # as fl-server start runs its SuperLink
        help="bare app: SuperLink state (objects included) in an SQLite file in the work dir, or in memory",
    )
    parser.add_argument("--retries", type=int, default=1, help="re-runs of a run during which the machine was busy")
    parser.add_argument("--max-wait", type=float, default=600.0, help="seconds to wait for an idle machine per run")
    parser.add_argument("--keep", action="store_true", help="keep work directories and logs")
    parser.add_argument("--save", action="store_true", help="write the report to --out")
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "deploy_overhead.txt")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 client, 2 rounds of 2 steps, no idle wait")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.rounds, args.local_steps, args.retries, args.max_wait = 1, 2, 2, 0, 0.0
        args.only = args.only or ["bare", "ours"]
    if args.clients < 1 or args.rounds < 2 or args.local_steps < 1:
        parser.error("need clients >= 1, rounds >= 2 (round 1 is warm-up) and local steps >= 1")
    signal.signal(signal.SIGTERM, _sigterm)

    tmp = Path(tempfile.mkdtemp(prefix="deploy_overhead_"))
    results: list[RunResult] = []
    for name in args.only or list(APPS):
        attempts: list[RunResult] = []
        for attempt in range(args.retries + 1):
            wait_until_quiet(args.max_wait)
            attempts.append(run_one(make_app(name, args), args, tmp, attempt))
            if attempts[-1].other_cpu <= QUIET or attempt == args.retries or not attempts[-1].ok:
                break
            print(f"#   other processes used {100 * attempts[-1].other_cpu:.0f}% of the CPU: running it again")
        # the completed run on the quietest machine
        results.append(min(attempts, key=lambda r: (not r.ok, r.other_cpu)))
    text = "\n".join(report(results, args)) + "\n"
    print()
    print(text, end="")
    if args.save:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    if all(r.ok for r in results) and not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"# work directories and logs kept in {tmp}")


if __name__ == "__main__":
    try:
        main()
    except FlowerRunError as exc:  # the SuperLink did not come up
        sys.exit(f"error: {exc}")
