"""``fl-server start``: one federated run on real SuperNodes, secure by default.

The SuperLink is Flower's own (``fedlora.core.superlink`` adds only a loopback guard for the
Control and Runtime APIs), started with TLS from the server directory and SuperNode
authentication on; every enrolled key is registered before the run is submitted. The
run itself is our ServerApp, submitted with ``flwr run`` like ``fl-sim`` does, through the
same runner (``fedlora.core.flower_runner``), so the run directory has the same layout. The
SuperLink lives as long as the run: Ctrl-C (or the end of the run) stops it and every
process it started; SuperNodes keep retrying until the next ``fl-server start``.
"""

from __future__ import annotations

import datetime
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from fedlora.core.flower_runner import FEDLORA_COMPONENTS, Deployment, FlowerRunRequest, run_flower_app
from fedlora.core.run_dir import RunDir
from fedlora.server.server_dir import ServerDir

#: the key of our run config saying the clients are real SuperNodes with their own data
DEPLOYED_KEY = "deployed"
#: how long ``fl-server start`` waits for a run by default (it may wait for clients a long time)
DEFAULT_TIMEOUT = 7 * 24 * 3600.0
INSECURE_WARNING = (
    "WARNING: --insecure: plain HTTP, no TLS and no SuperNode authentication. Anyone who can reach "
    "this port can join the federation, read the global adapter and inject updates. Use it on a "
    "trusted network for tests only."
)


@dataclass(frozen=True)
class StartOptions:
    """What ``fl-server start`` was asked to do, validated before anything starts."""

    server_dir: Path
    run_dir: Path | None = None
    resume: Path | None = None
    insecure: bool = False
    expose_control: bool | None = None  # None: the server directory's setting
    run_overrides: Mapping[str, Any] | None = None
    timeout: float = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        if self.resume is not None and (self.run_dir is not None or self.run_overrides):
            raise ValueError("--resume continues a run as it was configured: it takes no --run-dir or --run-config")
        if not self.timeout > 0:
            raise ValueError(f"--timeout must be > 0 seconds, got {self.timeout}")


@dataclass(frozen=True)
class Plan:
    """The resolved run: its config (validated), its directory and the SuperLink to start."""

    run_config: dict[str, Any]
    run_dir: Path
    deployment: Deployment
    num_rounds: int
    start_round: int
    nodes: tuple[str, ...]


def superlink_command(server_dir: Any, host: str, port: int, insecure: bool, expose_control: bool) -> list[str]:
    """Flower's SuperLink behind our loopback guard, with TLS and node authentication unless insecure.

    Its state stays in memory: a SuperLink lives for one run, every enrolled key is registered
    again at each start, and what must survive (checkpoints, metrics, ledgers) is in our own
    files. An SQLite file would cost seconds per round (Flower stores every array chunk in it)
    and would keep a crashed run's node sessions "online", refusing their reconnection for up
    to a minute.
    """
    command = [sys.executable, "-m", "fedlora.core.superlink"]
    if expose_control:
        command.append("--expose-control")
    command.append("--")
    if insecure:
        command.append("--insecure")
    else:
        command += [
            "--ssl-ca-certfile",
            str(server_dir.ca_cert_path),
            "--ssl-certfile",
            str(server_dir.server_cert_path),
            "--ssl-keyfile",
            str(server_dir.server_key_path),
            "--enable-supernode-auth",
        ]
    command += [
        "--host",
        host,
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    return command


def plan_start(options: StartOptions) -> Plan:
    """Read and validate everything (settings, certificates, run config, resume) before any process starts."""
    from fedlora.core.cli import resume_config  # lazy: torch, PEFT (fl-server --help stays fast)
    from fedlora.core.config import FederationConfig  # lazy: torch, PEFT

    sd = ServerDir(options.server_dir.resolve())  # its processes may run elsewhere than here
    settings = sd.settings()
    if not options.insecure:
        sd.check_certificates()
    link = settings.superlink
    expose = link.expose_control if options.expose_control is None else options.expose_control
    start_round = 0
    if options.resume is not None:
        run_dir = options.resume.resolve()
        run_config = resume_config(run_dir)
        if not run_config.get(DEPLOYED_KEY):
            raise ValueError(f"{run_dir} is not a deployed run (fl-sim made it): resume it with fl-sim --resume")
        start_round = RunDir(run_dir).last_round()
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = (options.run_dir or sd.runs_dir / stamp).resolve()
        if RunDir(run_dir).holds_run():
            raise ValueError(f"{run_dir} already holds a run: resume it with --resume {run_dir} or choose another")
        run_config = {**settings.run, **dict(options.run_overrides or {}), "run-dir": str(run_dir)}
    run_config[DEPLOYED_KEY] = True
    cfg = FederationConfig.from_run_config(run_config)  # refuses unknown keys and bad values, naming them
    enrolled = () if options.insecure else tuple(sd.enrolled())
    if not options.insecure and not enrolled:
        raise ValueError(
            f"no client is enrolled in {sd.root}: run `fl-client keygen` on each client, then "
            f"`fl-server enroll {sd.root} CLIENT.pub --name NAME` here"
        )
    deployment = Deployment(
        superlink_command=tuple(superlink_command(sd, link.host, link.port, options.insecure, expose)),
        port=link.port,
        ca_file=None if options.insecure else sd.ca_cert_path,
        nodes=tuple((e.name, e.path) for e in enrolled),
    )
    return Plan(run_config, run_dir, deployment, cfg.num_rounds, start_round, tuple(e.name for e in enrolled))


def run_plan(
    plan: Plan,
    console: Console,
    *,
    quiet: bool = False,
    verbose: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    on_log_line: Callable[[str], None] | None = None,
) -> Any:
    """Start the SuperLink, register the nodes, submit the run, follow it; always tear down."""
    from fedlora.core.cli import Progress  # lazy: torch, PEFT, Flower
    from fedlora.core.config import DEFAULT_RUN_CONFIG  # lazy: torch, PEFT

    overrides = {k: v for k, v in plan.run_config.items() if DEFAULT_RUN_CONFIG.get(k) != v}
    RunDir(plan.run_dir).make()
    request = FlowerRunRequest(
        components=FEDLORA_COMPONENTS,
        app_name="fedlora",
        default_config=DEFAULT_RUN_CONFIG,
        overrides=overrides,
        num_supernodes=1,  # unused in deployment: the clients are real SuperNodes
        timeout=timeout,
        workdir=RunDir(plan.run_dir).deploy_workdir,
        deployment=plan.deployment,
    )
    waiting = _WaitingLine(console) if not quiet else None

    def log_line(line: str) -> None:
        if verbose:
            console.print(line, markup=False, highlight=False)
        elif waiting is not None:
            waiting(line)
        if on_log_line is not None:
            on_log_line(line)

    if quiet:
        return run_flower_app(request, log_line)
    with Progress(console, plan.run_dir, plan.num_rounds, plan.start_round):
        return run_flower_app(request, log_line)


class _WaitingLine:
    """Turn Flower's "Waiting for nodes to connect" log lines into one line per change."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.last = ""

    def __call__(self, line: str) -> None:
        marker = "Waiting for nodes to connect:"
        if marker in line:
            text = "waiting for clients: " + line.split(marker, 1)[1].strip().rstrip(".")
            if text != self.last:
                self.last = text
                self.console.print(text, markup=False, highlight=False)
