"""Run a Flower app on a private SuperLink: as a simulation bound to 127.0.0.1, or (``Deployment``)
on real SuperNodes with TLS and node authentication (``fl-server start``).

Why this route: ``flwr.simulation.run_simulation`` is deprecated and passes no run config,
and the in-process path needs private Flower API. So we start ``flower-superlink
--simulation`` ourselves on a free loopback port with an isolated ``FLWR_HOME``, submit with
``flwr run --run-config FILE``, follow ``flwr log --stream`` (it ends when the run
finishes), read the final status with ``flwr ls`` and always tear everything down.

The app directory holds only a generated ``pyproject.toml`` (see :func:`write_app_dir`):
``flwr run`` ships the whole directory as a FAB, which drops ``*.safetensors`` and would
shadow our installed packages, so the app code is imported from the environment of the
SuperLink (our virtualenv plus ``FlowerRunRequest.pythonpath``). The same directory and
run-config file work by hand: ``flwr run APP_DIR CONNECTION --run-config run_config.toml``.

Everything listens on 127.0.0.1 only (the SuperLink, and Ray, which otherwise binds every
interface without authentication). Every process of a run inherits a unique env tag; the
teardown, and a watchdog if this process is killed before its ``finally``, SIGKILL
whatever still carries it. Linux only (``/proc``).
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any

import tomli_w  # a dependency of flwr itself

from fedlora.atomic import write_json_atomic

ConfigValue = bool | int | float | str

PUBLISHER = "fedlora"
CONNECTION = "local-sim"  # name of the SuperLink connection in the run's own FLWR_HOME
NODES_FILE = "nodes.json"  # in a deployment's work dir: the node id Flower gave each enrolled name
RUN_TAG_VAR = "FEDLORA_SIM_TAG"  # env marker that every process of one run inherits
#: fedlora's own ServerApp and ClientApp, the components of every run (simulated or deployed); a
#: deployed node runs its installed ClientApp whatever a bundle names (fedlora.client.executor)
FEDLORA_COMPONENTS = ("fedlora.server.app:app", "fedlora.client.app:app")

_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?$")
_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")  # flwr's APP_VERSION_PATTERN
_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_COMPONENT_RE = re.compile(rf"^{_DOTTED}:{_DOTTED}$")
_KEY_PART_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# The runner owns these: a caller overriding them would break isolation or teardown.
_RESERVED_ENV = frozenset({"FLWR_HOME", "RAY_TMPDIR", "RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", RUN_TAG_VAR})

_SUPERLINK_START_TIMEOUT = 60.0
_CLI_TIMEOUT = 60.0  # one `flwr run|ls|stop` call; each takes ~1 s
_STATUS_POLL = 0.5
_TEARDOWN_GRACE = 15.0  # for processes to leave on their own before SIGKILL (Ray is slow under load)
_INTERRUPT_GRACE = 3.0  # after SIGTERM when the run is interrupted: every write of a run is atomic
_LOG_TAIL_LINES = 40


class FlowerRunError(RuntimeError):
    """The run machinery (SuperLink, SuperNodes, `flwr` CLI) failed, as opposed to the app."""


@dataclass(frozen=True, kw_only=True)
class Deployment:
    """Run on real SuperNodes instead of the simulation runtime (``fl-server start``).

    ``superlink_command`` is the whole command that starts the SuperLink (TLS and node
    authentication are the caller's choice); it must listen on ``port`` and
    answer ``/health`` there, over HTTPS verified with ``ca_file`` unless that is None. The
    runner's own processes always reach it over loopback. ``nodes`` are ``(name, public key
    file)`` pairs registered (``flwr supernode register``) before the run is submitted.
    """

    superlink_command: tuple[str, ...]
    port: int
    ca_file: Path | None = None
    nodes: tuple[tuple[str, Path], ...] = ()

    def __post_init__(self) -> None:
        if not self.superlink_command:
            raise ValueError("superlink_command is empty")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port!r}")
        if self.ca_file is not None and not Path(self.ca_file).is_file():
            raise ValueError(f"CA certificate {self.ca_file} does not exist")


@dataclass(frozen=True, kw_only=True)
class FlowerRunRequest:
    """Everything one run of a Flower app needs (a simulation, or with ``deployment`` real SuperNodes);
    validated here, once, with clear messages.

    ``default_config`` becomes ``[tool.flwr.app.config]``; keys may be dotted
    (``"audit.save-updates"``), which Flower hands to the apps under the same dotted key.
    ``overrides`` must name known keys with values of the default's type (an ``int`` is
    accepted for a ``float`` default). ``pythonpath`` entries are prepended to
    ``PYTHONPATH`` for every process of the run, so the apps can live outside the venv.
    ``timeout`` counts from the call until the run is stopped; teardown adds a few seconds.
    """

    components: tuple[str, str]  # ("pkg.module:server_app", "pkg.module:client_app")
    app_name: str
    default_config: Mapping[str, ConfigValue]
    overrides: Mapping[str, ConfigValue] = field(default_factory=dict)
    num_supernodes: int
    client_num_cpus: int = 1
    client_num_gpus: float = 0.0  # a GPU share per virtual client (Ray assigns the device; 0.25: four per GPU)
    ray_num_cpus: int | None = None
    ray_address: str | None = None  # an existing (multi-node) Ray cluster, e.g. "auto" or "10.0.0.5:6379"
    timeout: float
    workdir: Path
    extra_env: Mapping[str, str] = field(default_factory=dict)
    pythonpath: tuple[Path, ...] = ()
    deployment: Deployment | None = None  # real SuperNodes: see Deployment

    def __post_init__(self) -> None:
        components = _checked_components(self.components)
        _check_app_name(self.app_name)
        defaults = _checked_flat_config(self.default_config)
        overrides = _checked_overrides(defaults, self.overrides)
        _check_count("num_supernodes", self.num_supernodes)
        _check_count("client_num_cpus", self.client_num_cpus)
        if isinstance(self.client_num_gpus, bool) or not isinstance(self.client_num_gpus, int | float):
            raise ValueError(f"client_num_gpus must be a number, got {self.client_num_gpus!r}")
        if not (0.0 <= self.client_num_gpus <= 1.0 or float(self.client_num_gpus).is_integer()):
            raise ValueError(f"client_num_gpus must be a share in [0, 1] or a whole number, got {self.client_num_gpus}")
        if self.ray_num_cpus is not None:
            _check_count("ray_num_cpus", self.ray_num_cpus)
            if self.ray_num_cpus < self.client_num_cpus:
                raise ValueError(
                    f"ray_num_cpus={self.ray_num_cpus} < client_num_cpus={self.client_num_cpus}: "
                    "no ClientApp could ever be scheduled and the run would hang"
                )
        if self.ray_address is not None and not re.fullmatch(r"[A-Za-z0-9_.:/-]+", self.ray_address):
            raise ValueError(f"ray_address must look like 'auto' or 'HOST:PORT', got {self.ray_address!r}")
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, int | float):
            raise ValueError(f"timeout must be a number of seconds, got {self.timeout!r}")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError(f"timeout must be a positive, finite number of seconds, got {self.timeout!r}")
        env = dict(self.extra_env)
        bad = sorted(k for k, v in env.items() if not (isinstance(k, str) and isinstance(v, str)))
        if bad:
            raise ValueError(f"extra_env keys and values must be strings; bad entries: {bad}")
        reserved = sorted(_RESERVED_ENV & env.keys())
        if reserved:
            raise ValueError(f"extra_env must not set {reserved}: the runner owns them to isolate and stop the run")
        # Store immutable, normalised copies: a frozen request must not change under us.
        object.__setattr__(self, "components", components)
        object.__setattr__(self, "default_config", MappingProxyType(defaults))
        object.__setattr__(self, "overrides", MappingProxyType(overrides))
        object.__setattr__(self, "timeout", float(self.timeout))
        object.__setattr__(self, "workdir", Path(self.workdir))
        object.__setattr__(self, "extra_env", MappingProxyType(env))
        object.__setattr__(self, "pythonpath", tuple(Path(p) for p in self.pythonpath))


@dataclass(frozen=True)
class FlowerRunOutcome:
    """What happened: Flower's final status plus where to look for details.

    ``status`` is Flower's ``finished:completed|failed|stopped`` (``stopped`` after our
    timeout); ``status_details`` carries the app's exception text on failure (Flower says
    ``"N/A"`` on success). ``seconds`` is the wall time of the whole call, teardown included.
    """

    run_id: int
    status: str
    status_details: str
    seconds: float
    log_path: Path
    superlink_log_path: Path
    timed_out: bool
    leftover_pids_killed: tuple[int, ...]

    @property
    def completed(self) -> bool:
        return self.status == "finished:completed"


# --------------------------------------------------------------------------- validation


def _check_app_name(name: str, label: str = "app_name") -> None:
    if not (isinstance(name, str) and _NAME_RE.match(name)):
        raise ValueError(
            f"{label} {name!r} is not a valid Flower project name: use letters, digits, '-' and '_', "
            "starting and ending with a letter or digit"
        )


def _checked_components(components: Iterable[str]) -> tuple[str, str]:
    parts = tuple(components)
    if len(parts) != 2:
        raise ValueError(f"components must be (serverapp, clientapp), got {parts!r}")
    for role, ref in zip(("serverapp", "clientapp"), parts, strict=True):
        if not (isinstance(ref, str) and _COMPONENT_RE.match(ref)):
            raise ValueError(f"{role} component {ref!r} must look like 'package.module:attribute'")
    return parts[0], parts[1]


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _checked_flat_config(config: Mapping[str, ConfigValue]) -> dict[str, ConfigValue]:
    """Return a plain copy of a flat run config, or raise on keys/values Flower would mangle."""
    flat = dict(config)
    for key, value in flat.items():
        if not (isinstance(key, str) and all(_KEY_PART_RE.match(part) for part in key.split("."))):
            raise ValueError(
                f"run-config key {key!r} is not valid: use letters, digits, '-' and '_', with '.' between "
                "nesting levels (e.g. 'audit.save-updates')"
            )
        if not isinstance(value, bool | int | float | str):
            raise ValueError(f"run-config key {key!r}: value {value!r} is not a bool, int, float or str")
    for key in flat:
        parts = key.split(".")
        for i in range(1, len(parts)):
            prefix = ".".join(parts[:i])
            if prefix in flat:
                raise ValueError(
                    f"run-config keys {prefix!r} and {key!r} clash: {prefix!r} cannot be a value and a table"
                )
    return flat


def _checked_overrides(
    defaults: Mapping[str, ConfigValue], overrides: Mapping[str, ConfigValue]
) -> dict[str, ConfigValue]:
    """Return overrides coerced to the defaults' types; unknown keys and wrong types raise."""
    unknown = sorted(str(k) for k in overrides if k not in defaults)
    if unknown:
        raise ValueError(f"unknown run-config key(s) {unknown}; known keys: {sorted(defaults)}")
    checked: dict[str, ConfigValue] = {}
    for key, value in overrides.items():
        default = defaults[key]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            value = float(value) if ok else value
        else:
            ok = isinstance(value, str)
        if not ok:
            raise ValueError(
                f"run-config key {key!r} expects {type(default).__name__} (default {default!r}), "
                f"got {type(value).__name__} {value!r}"
            )
        checked[key] = value
    return checked


def _nested(flat: Mapping[str, ConfigValue]) -> dict[str, Any]:
    """Turn dotted keys into TOML tables; Flower flattens them back to the same dotted keys."""
    root: dict[str, Any] = {}
    for key, value in flat.items():
        *tables, leaf = key.split(".")
        node = root
        for table in tables:
            node = node.setdefault(table, {})
        node[leaf] = value
    return root


# --------------------------------------------------------------------------- files


def write_app_dir(
    app_dir: Path,
    *,
    app_name: str,
    components: tuple[str, str],
    default_config: Mapping[str, ConfigValue],
    version: str = "1.0.0",
    publisher: str = PUBLISHER,
) -> Path:
    """Write a Flower app directory that holds only ``pyproject.toml`` and return it.

    Only the config goes into the FAB; the code comes from the installed packages (or
    ``PYTHONPATH``), so weights and our modules are never copied or shadowed. The
    directory must be empty or hold a previous ``pyproject.toml``: anything else in it
    would be shipped by ``flwr run``.
    """
    components = _checked_components(components)
    _check_app_name(app_name)
    _check_app_name(publisher, "publisher")
    if not _VERSION_RE.match(version):
        raise ValueError(f"version {version!r} must look like '1.2.3'")
    defaults = _checked_flat_config(default_config)
    app_dir = Path(app_dir)
    app_dir.mkdir(parents=True, exist_ok=True)
    others = sorted(p.name for p in app_dir.iterdir() if p.name != "pyproject.toml")
    if others:
        raise ValueError(
            f"{app_dir} must hold only the generated pyproject.toml (flwr run ships it all); found {others}"
        )
    project = {
        "project": {
            "name": app_name,
            "version": version,
            "description": (
                "Generated by fedlora.core.flower_runner: config only, the code is imported from the environment"
            ),
            "license": "Apache-2.0",
            "dependencies": ["flwr[simulation]>=1.41"],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": publisher,
                    "components": {"serverapp": components[0], "clientapp": components[1]},
                    "config": _nested(defaults),
                }
            }
        },
    }
    path = app_dir / "pyproject.toml"
    path.write_text(tomli_w.dumps(project), encoding="utf-8")
    return app_dir


def parse_run_config_pairs(pairs: Sequence[str] | None) -> dict[str, Any]:
    """``--run-config 'k=v k2="s"'`` values through Flower's own parser, so the same pairs work
    for ``flwr run --run-config`` (strings must be quoted)."""
    from flwr.common.config import parse_config_args  # Flower's CLI stack: only when pairs are parsed

    try:
        return dict(parse_config_args(list(pairs or [])))
    except Exception as e:  # click.ClickException carries Flower's explanation
        raise ValueError(f"--run-config: {getattr(e, 'message', e)}") from None


def run_config_toml(overrides: Mapping[str, ConfigValue]) -> str:
    """Overrides as the TOML text ``flwr run --run-config FILE`` reads (dotted keys as tables)."""
    return tomli_w.dumps(_nested(_checked_flat_config(overrides)))


def write_run_config(path: Path, overrides: Mapping[str, ConfigValue]) -> Path:
    """Write overrides as a TOML file for ``flwr run --run-config FILE`` (no shell quoting)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_config_toml(overrides), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- running


def run_flower_app(request: FlowerRunRequest, on_log_line: Callable[[str], None] | None = None) -> FlowerRunOutcome:
    """Run one Flower app end to end (a simulation, or a deployment) and always tear it down.

    ``on_log_line`` receives each line of the run's log (ANSI colours stripped) as it
    arrives, in the calling thread; the same lines go to ``workdir/logs/run.log``. After
    ``request.timeout`` seconds the run is stopped (``flwr stop``) and the outcome says
    ``timed_out``. Raises :class:`FlowerRunError` when the SuperLink or ``flwr`` CLI fails.
    """
    started = time.monotonic()
    deadline = started + request.timeout
    bin_dir = _flower_bin_dir()
    workdir = request.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o700)  # logs, the app's FLWR_HOME and run config: the operator's alone
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    paths = _LogPaths(superlink=logs / "superlink.log", run=logs / "run.log", cli=logs / "flwr-cli.log")
    keep_earlier_logs(logs, (paths.superlink, paths.run, paths.cli, logs / "teardown.log"))
    app_dir = write_app_dir(
        workdir / "app",
        app_name=request.app_name,
        components=request.components,
        default_config=request.default_config,
    )
    run_config = write_run_config(workdir / "run_config.toml", request.overrides)
    home = workdir / "flwr_home"
    home.mkdir(exist_ok=True)
    tag = uuid.uuid4().hex
    # Ray's session dir holds AF_UNIX sockets (paths < 108 bytes) and is never deleted by
    # Ray: keep it per run, short, and remove it ourselves.
    ray_tmp = Path(tempfile.mkdtemp(prefix="flr", dir=_short_tmp_root()))
    reaper: subprocess.Popen[bytes] | None = None
    superlink: subprocess.Popen[bytes] | None = None
    try:
        reaper = _start_reaper(tag, logs / "teardown.log", ray_tmp)
        env = _child_env(request, bin_dir=bin_dir, home=home, ray_tmp=ray_tmp, tag=tag)
        cli = _FlowerCli(bin_dir=bin_dir, env=env, log_path=paths.cli)
        deployment = request.deployment
        ca_file = deployment.ca_file if deployment is not None else None
        for attempt in range(3):
            if deployment is None:
                port = free_port()
                command = _simulation_superlink_command(bin_dir, port)
            else:
                port, command = deployment.port, list(deployment.superlink_command)
            link = superlink = _start_superlink(command, env, paths.superlink)
            healthy_by = min(deadline, time.monotonic() + _SUPERLINK_START_TIMEOUT)
            if _wait_healthy(link, port, healthy_by, paths, ca_file):
                break
            if deployment is None and attempt < 2 and "address already in use" in _tail(paths.superlink).lower():
                continue  # lost the race for the free port
            raise FlowerRunError(_describe(f"SuperLink exited with code {link.returncode} at start", paths))
        _write_connection(home, port, ca_file)
        if deployment is not None:
            node_ids = _register_nodes(cli, deployment.nodes, paths)
            write_json_atomic(workdir / NODES_FILE, node_ids, 0o600)
        run_id = _submit(cli, request, app_dir, run_config, deadline, paths)
        ended = _follow_logs(cli, run_id, link, deadline, paths, on_log_line)
        status = _wait_finished(cli, run_id, link, deadline, paths) if ended else None
        timed_out = status is None
        if status is None:
            # The sampling wait for nodes never times out: stop the run, teardown kills the rest.
            cli.call(["stop", str(run_id), CONNECTION], timeout=15.0)
            status = _read_status_quietly(cli, run_id)
    except BaseException:
        # interrupted (Ctrl-C, a signal turned into an exception) or failed: stop training now. The
        # SuperLink's SIGTERM reaches flwr-simulation only after the round in flight, and measured
        # 17 s after a Ctrl-C, two more rounds had trained and written their checkpoints
        _kill_tagged(tag, grace=_INTERRUPT_GRACE, log_path=logs / "teardown.log", sigterm=True)
        raise
    finally:
        if superlink is not None:
            _stop_superlink(superlink)
        leftovers = _kill_tagged(tag, grace=_TEARDOWN_GRACE, log_path=logs / "teardown.log")
        shutil.rmtree(ray_tmp, ignore_errors=True)
        if reaper is not None:
            _release_reaper(reaper)
    return FlowerRunOutcome(
        run_id=run_id,
        status=status[0],
        status_details=status[1],
        seconds=time.monotonic() - started,
        log_path=paths.run,
        superlink_log_path=paths.superlink,
        timed_out=timed_out,
        leftover_pids_killed=leftovers,
    )


@dataclass(frozen=True)
class _LogPaths:
    superlink: Path
    run: Path
    cli: Path


@dataclass(frozen=True)
class _FlowerCli:
    """The ``flwr`` CLI against the run's own FLWR_HOME; every call is appended to a log."""

    bin_dir: Path
    env: Mapping[str, str]
    log_path: Path

    def call(self, args: list[str], timeout: float) -> subprocess.CompletedProcess[str] | None:
        """Run ``flwr ARGS``; None if it did not answer within ``timeout`` seconds."""
        cmd = [str(self.bin_dir / "flwr"), *args]
        try:
            done = subprocess.run(
                cmd,
                env=dict(self.env),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            self._record(f"$ flwr {' '.join(args)}\n(no answer within {timeout:.0f} s)\n")
            return None
        self._record(f"$ flwr {' '.join(args)}\n[exit {done.returncode}]\n{done.stdout}{done.stderr}\n")
        return done

    def _record(self, text: str) -> None:
        with self.log_path.open("a", encoding="utf-8") as log:
            log.write(text)


def _flower_bin_dir() -> Path:
    """The bin dir of this interpreter's environment: the SuperLink spawns Flower tools by name."""
    bin_dir = Path(sys.executable).parent
    missing = [
        n for n in ("flwr", "flower-superlink", "flower-superexec", "flwr-simulation") if not (bin_dir / n).exists()
    ]
    if missing:
        raise FlowerRunError(
            f"{bin_dir} lacks {missing}: install flwr[simulation] in the environment of {sys.executable}"
        )
    return bin_dir


def _short_tmp_root() -> str:
    return "/tmp" if os.access("/tmp", os.W_OK) else tempfile.gettempdir()


def _child_env(request: FlowerRunRequest, *, bin_dir: Path, home: Path, ray_tmp: Path, tag: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _RESERVED_ENV}
    env.update(
        {
            "FLWR_HOME": str(home),
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",  # trims the wait before flwr-simulation starts
            "RAY_TMPDIR": str(ray_tmp),
            "RAY_DEDUP_LOGS": "0",  # otherwise Ray folds look-alike lines of different clients
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # a 0-GPU client keeps CUDA_VISIBLE_DEVICES as is
            # Ray prestarts a worker per CPU, but Flower's clients run in actors, each of which gets a
            # worker of its own: the prestarted ones only import Ray and exit (CPU at the busiest moment)
            "RAY_enable_worker_prestart": "0",
            "RAY_prestart_worker_first_driver": "0",
            # Ray's GCS, raylet and workers listen on every interface by default, without
            # authentication; with "clusters" off Ray uses 127.0.0.1 for all of them.
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "PYTHONUNBUFFERED": "1",  # `flwr log` prints without flushing: we read it line by line
            RUN_TAG_VAR: tag,
        }
    )
    env.update(request.extra_env)
    env["PATH"] = os.pathsep.join(p for p in (str(bin_dir), env.get("PATH", "")) if p)
    extra = [str(p.resolve()) for p in request.pythonpath]
    if extra:
        env["PYTHONPATH"] = os.pathsep.join([*extra, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    # The CLI talks HTTP to 127.0.0.1: never through a proxy from the caller's environment.
    for var in ("NO_PROXY", "no_proxy"):
        env[var] = ",".join(p for p in (env.get(var, ""), "127.0.0.1,localhost") if p)
    return env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _simulation_superlink_command(bin_dir: Path, port: int) -> list[str]:
    """Flower's SuperLink behind our guard (``fedlora.core.superlink``): on a shared host every
    local account reaches 127.0.0.1, and the control API has no login in open-source Flower."""
    return [
        sys.executable,  # bin_dir's interpreter: Flower's tools are found beside it
        "-m",
        "fedlora.core.superlink",
        "--",
        "--insecure",  # loopback only, the operator's account only (the guard)
        "--simulation",
        "--disable-runtime-dependency-installation",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def _start_superlink(command: list[str], env: Mapping[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(command, env=dict(env), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


def _wait_healthy(
    proc: subprocess.Popen[bytes], port: int, deadline: float, paths: _LogPaths, ca_file: Path | None = None
) -> bool:
    """True once /health answers (over HTTPS verified by ``ca_file`` if given), False if the SuperLink exited first."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if ca_file is not None:
        handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=str(ca_file))))
    opener = urllib.request.build_opener(*handlers)
    url = f"{'https' if ca_file is not None else 'http'}://127.0.0.1:{port}/health"
    while True:
        if proc.poll() is not None:
            return False
        try:
            with opener.open(url, timeout=0.5) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise FlowerRunError(_describe(f"SuperLink on port {port} did not become healthy in time", paths))
        time.sleep(0.1)


def _write_connection(home: Path, port: int, ca_file: Path | None = None) -> None:
    link: dict[str, Any] = {"address": f"127.0.0.1:{port}"}
    link |= {"root-certificates": str(Path(ca_file).resolve())} if ca_file is not None else {"insecure": True}
    config = {"superlink": {"default": CONNECTION, CONNECTION: link}}
    (home / "config.toml").write_text(tomli_w.dumps(config), encoding="utf-8")


def _register_nodes(cli: _FlowerCli, nodes: Iterable[tuple[str, Path]], paths: _LogPaths) -> dict[str, int]:
    """Register every enrolled SuperNode key with the SuperLink, whose state is fresh (in
    parallel: nodes that dial in meanwhile are refused until theirs is done); the node id
    Flower gave each name."""

    def register(node: tuple[str, Path]) -> tuple[str, int | None, str | None]:
        name, key = node
        done = cli.call(["supernode", "register", str(key), CONNECTION, "--name", name], timeout=_CLI_TIMEOUT)
        if done is None:
            return name, None, f"`flwr supernode register` for {name} did not answer"
        if done.returncode != 0:
            return name, None, f"registering SuperNode {name} ({key}) failed: {(done.stdout + done.stderr).strip()}"
        found = re.search(r"SuperNode (\d+) registered", done.stdout + done.stderr)
        if found is None:  # `fl-server revoke` could not drop it from this run later
            return name, None, f"`flwr supernode register` for {name} named no node id: {done.stdout.strip()[-200:]}"
        return name, int(found.group(1)), None

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(register, nodes))
    errors = [e for _, _, e in results if e is not None]
    if errors:
        raise FlowerRunError(_describe("; ".join(errors), paths))
    return {name: node_id for name, node_id, _ in results if node_id is not None}


def unregister_node(workdir: Path, name: str) -> int | None:
    """Remove ``name``'s key from the running SuperLink of the deployment in ``workdir`` (its
    connected SuperNode is dropped and refused from then on); the node id, or None when that
    run registered no node of that name. Raises :class:`FlowerRunError` if the SuperLink refuses."""
    nodes = workdir / NODES_FILE
    deadline = time.monotonic() + _SUPERLINK_START_TIMEOUT + _CLI_TIMEOUT
    while not nodes.exists() and time.monotonic() < deadline:  # the run is still registering its nodes
        time.sleep(0.5)
    try:
        node_ids = json.loads(nodes.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    node_id = node_ids.get(name)
    if node_id is None:
        return None
    env = {**os.environ, "FLWR_HOME": str(workdir / "flwr_home"), "FLWR_DISABLE_UPDATE_CHECK": "1"}
    cli = _FlowerCli(bin_dir=_flower_bin_dir(), env=env, log_path=workdir / "logs" / "flwr-cli.log")
    done = cli.call(["supernode", "unregister", str(node_id), CONNECTION], timeout=_CLI_TIMEOUT)
    if done is None or done.returncode != 0 or "unregistered successfully" not in done.stdout + done.stderr:
        answer = "no answer" if done is None else (done.stdout + done.stderr).strip()[-300:]
        raise FlowerRunError(f"the running SuperLink did not unregister node {node_id} ({name}): {answer}")
    return int(node_id)


def _submit(
    cli: _FlowerCli, request: FlowerRunRequest, app_dir: Path, run_config: Path, deadline: float, paths: _LogPaths
) -> int:
    args = ["run", str(app_dir), CONNECTION, "--run-config", str(run_config)]
    if request.deployment is None:
        federation = f"num-supernodes={request.num_supernodes} client-resources-num-cpus={request.client_num_cpus}"
        if request.client_num_gpus:
            federation += f" client-resources-num-gpus={float(request.client_num_gpus)}"
        if request.ray_num_cpus is not None:
            federation += f" init-args-num-cpus={request.ray_num_cpus}"
        if request.ray_address is not None:
            federation += f' init-args-address="{request.ray_address}"'
        args += ["--federation-config", federation]
    budget = min(_CLI_TIMEOUT, deadline - time.monotonic())
    done = cli.call([*args, "--format", "json"], timeout=max(budget, 1.0))
    if done is None:
        raise FlowerRunError(_describe(f"`flwr run` did not answer within {max(budget, 1.0):.0f} s", paths))
    payload = _json_object(done.stdout)
    if done.returncode != 0 or not payload.get("success") or not payload.get("run-id"):
        reason = str(payload.get("error-message") or (done.stdout + done.stderr)).strip()
        raise FlowerRunError(_describe(f"`flwr run` failed: {reason}", paths))
    return int(payload["run-id"])


def _follow_logs(
    cli: _FlowerCli,
    run_id: int,
    superlink: subprocess.Popen[bytes],
    deadline: float,
    paths: _LogPaths,
    on_log_line: Callable[[str], None] | None,
) -> bool:
    """Copy ``flwr log --stream`` to the run log and the callback; False if the deadline hit first."""
    cmd = [str(cli.bin_dir / "flwr"), "log", str(run_id), CONNECTION, "--stream"]
    lines: queue.Queue[str | None] = queue.Queue()
    with paths.cli.open("a", encoding="utf-8") as cli_log:
        cli_log.write(f"$ flwr log {run_id} {CONNECTION} --stream  (stdout -> {paths.run.name})\n")
        cli_log.flush()
        proc = subprocess.Popen(
            cmd,
            env=dict(cli.env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=cli_log,
            text=True,
            errors="replace",
        )
    assert proc.stdout is not None
    reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
    reader.start()
    try:
        with paths.run.open("a", encoding="utf-8") as run_log:
            while True:
                try:
                    line = lines.get(timeout=0.2)
                except queue.Empty:
                    line = ""
                if line is None:
                    return True  # the stream ends when the run is finished
                if line:
                    text = _ANSI_RE.sub("", line).rstrip("\r\n")
                    run_log.write(text + "\n")
                    run_log.flush()
                    if on_log_line is not None:
                        on_log_line(text)
                if superlink.poll() is not None:
                    raise FlowerRunError(
                        _describe(f"SuperLink died (exit {superlink.returncode}) during the run", paths)
                    )
                if time.monotonic() > deadline:
                    return False
    finally:
        # a log reader only: killed at once (it ignores SIGTERM while streaming, and a graceful end
        # delayed an interrupt's stop of the run by up to 10 s, in which rounds went on training)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        reader.join(timeout=5.0)
        proc.stdout.close()


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in iter(stream.readline, ""):
        lines.put(line)
    lines.put(None)


def _wait_finished(
    cli: _FlowerCli, run_id: int, superlink: subprocess.Popen[bytes], deadline: float, paths: _LogPaths
) -> tuple[str, str] | None:
    """Flower's final (status, details); None if the run is not finished by the deadline."""
    while True:
        if superlink.poll() is not None:
            raise FlowerRunError(_describe(f"SuperLink died (exit {superlink.returncode}) during the run", paths))
        status = _read_status(cli, run_id)
        if status is None:
            raise FlowerRunError(_describe(f"`flwr ls` could not report run {run_id}", paths))
        if status[0].startswith("finished"):
            return status
        if time.monotonic() > deadline:
            return None
        time.sleep(_STATUS_POLL)


def _read_status(cli: _FlowerCli, run_id: int) -> tuple[str, str] | None:
    done = cli.call(["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], timeout=_CLI_TIMEOUT)
    if done is None or done.returncode != 0:
        return None
    runs = _json_object(done.stdout).get("runs") or []
    if not runs:
        return None
    return str(runs[0].get("status", "")), str(runs[0].get("status-details", ""))


def _read_status_quietly(cli: _FlowerCli, run_id: int) -> tuple[str, str]:
    return _read_status(cli, run_id) or ("unknown", "`flwr ls` gave no status after the run was stopped")


def _json_object(text: str) -> dict[str, Any]:
    """The JSON object the CLI printed with ``--format json`` ({} if there is none)."""
    start = text.find("{")
    while start != -1:
        try:
            value = json.loads(text[start:])
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        return value if isinstance(value, dict) else {}
    return {}


# --------------------------------------------------------------------------- teardown


def terminate_processes(send: Callable[[int], bool], grace: float, *, sigterm: bool = True, poll: float = 0.1) -> bool:
    """SIGTERM a set of processes, give them ``grace`` seconds to leave, SIGKILL what is left.

    The one teardown of everything we start: a process group (``fl-client start``'s SuperNode),
    every process carrying a run's env tag, a single child. ``send(sig)`` delivers ``sig`` to
    every member still there and says whether there was any (signal 0 only asks). Without
    ``sigterm`` the members are already on their way out (their parent was stopped) and are
    only waited for. Returns whether SIGKILL was needed.
    """
    if sigterm and not send(signal.SIGTERM):
        return False
    deadline = time.monotonic() + grace
    while send(0):
        if time.monotonic() >= deadline:
            send(signal.SIGKILL)
            return True
        time.sleep(poll)
    return False


def terminate_group(pgid: int, grace: float = 10.0) -> bool:
    """SIGTERM the process group ``pgid``, SIGKILL what is left after ``grace`` seconds.

    A member that has exited but is not reaped yet (a zombie) counts as gone: ``fl-client``'s
    SIGTERM handler runs this in the thread that would reap the SuperNode, which exits in half a
    second, and the group looked alive until the grace ran out (every client stop took 11 s)."""

    def send(sig: int) -> bool:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return False
        return sig != 0 or _group_has_live_members(pgid)

    return terminate_processes(send, grace)


def _group_has_live_members(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is still running, zombies aside (Linux ``/proc``; True
    where it cannot be read, as ``kill(0)`` says)."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            fields = Path("/proc", entry, "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            return True
    return False


def _end(proc: subprocess.Popen[Any], wait: float = 5.0) -> None:
    """SIGTERM one child, SIGKILL it after ``wait`` seconds, and reap it."""

    def send(sig: int) -> bool:
        if proc.poll() is not None:
            return False
        if sig:
            proc.send_signal(sig)
        return True

    terminate_processes(send, wait)
    proc.wait()


def _stop_superlink(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM: the SuperLink stops its SuperExec, and flwr-simulation exits with its parent."""
    _end(proc, wait=20.0)


def _start_reaper(tag: str, log_path: Path, ray_tmp: Path) -> subprocess.Popen[bytes]:
    """Start a watchdog that tears the run down if this process dies before its ``finally``.

    Python runs no ``finally`` when killed by a signal (a ``timeout`` wrapper, CI, a closed
    shell); flwr-simulation and its Ray workers then outlive the SuperLink and keep
    computing. The reaper sits in its own session (group kills miss it) and blocks on its
    stdin: EOF without our ``done`` line means we died, so it kills the tagged processes.
    """
    env = {k: v for k, v in os.environ.items() if k != RUN_TAG_VAR}
    cmd = [sys.executable, "-I", str(Path(__file__).resolve()), "--reap", tag, str(log_path), str(ray_tmp)]
    with log_path.open("ab") as log:
        return subprocess.Popen(
            cmd, env=env, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def _release_reaper(reaper: subprocess.Popen[bytes]) -> None:
    assert reaper.stdin is not None
    try:
        reaper.stdin.write(b"done\n")
        reaper.stdin.close()
    except OSError:
        pass  # it is gone already
    try:
        reaper.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        reaper.kill()
        reaper.wait()


def _reap_when_orphaned(tag: str, log_path: Path, ray_tmp: Path) -> None:
    """The reaper's body: wait for EOF; unless told ``done``, SIGTERM then SIGKILL the run."""
    if sys.stdin.buffer.read().strip() == b"done":
        return
    with log_path.open("a", encoding="utf-8") as log:
        log.write(f"runner died without teardown: SIGTERM {sorted(_pids_with_env(RUN_TAG_VAR, tag))}\n")
    # SIGTERM first: it lets the SuperLink stop its SuperExec
    _kill_tagged(tag, grace=_TEARDOWN_GRACE, log_path=log_path, sigterm=True)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _kill_tagged(tag: str, grace: float, log_path: Path, *, sigterm: bool = False) -> tuple[int, ...]:
    """SIGKILL every process still carrying this run's tag after ``grace`` seconds (SIGTERM
    them first with ``sigterm``); returns the pids killed, each logged with its command line.

    Ray's raylet, GCS and workers are re-parented when flwr-simulation exits and some
    ignore SIGTERM; the inherited env tag finds them wherever they ended up.
    """
    killed: list[int] = []

    def send(sig: int) -> bool:
        pids = sorted(_pids_with_env(RUN_TAG_VAR, tag))
        if sig == signal.SIGKILL and pids:
            killed.extend(pids)
            with log_path.open("a", encoding="utf-8") as log:
                log.writelines(f"SIGKILL {pid}: {_cmdline(pid)}\n" for pid in pids)
        for pid in pids if sig else ():
            try:
                os.kill(pid, sig)
            except OSError:  # already gone
                pass
        return bool(pids)

    terminate_processes(send, grace, sigterm=sigterm, poll=0.2)
    return tuple(killed)


def keep_earlier_logs(logs: Path, files: tuple[Path, ...]) -> Path | None:
    """Move an earlier attempt's logs (a resumed run reuses its workdir) to ``logs/attempt-N``,
    N the next free number, so two runs' lines never mix and none is lost; returns that folder."""
    present = [f for f in files if f.exists()]
    if not present:
        return None
    n = 1 + max(
        (int(p.name.split("-")[1]) for p in logs.glob("attempt-*") if p.name.split("-")[1].isdigit()), default=0
    )
    folder = logs / f"attempt-{n}"
    folder.mkdir()
    for f in present:
        f.rename(folder / f.name)
    return folder


#: command-line options whose value is a secret (flwr-simulation's and flwr-serverapp's runtime token)
_SECRET_OPTIONS = ("--token",)


def redact(argv: list[str]) -> list[str]:
    """``argv`` with the value of every secret option replaced, for logs."""
    return [("<redacted>" if i and argv[i - 1] in _SECRET_OPTIONS else a) for i, a in enumerate(argv)]


def _cmdline(pid: int) -> str:
    try:
        raw = Path("/proc", str(pid), "cmdline").read_bytes()
    except OSError:
        return "?"
    argv = raw.decode(errors="replace").split("\0")
    return " ".join(redact(argv)).strip()[:300]


def _pids_with_env(key: str, value: str) -> set[int]:
    """PIDs whose environment holds ``key=value`` (Linux /proc; zombies have an empty environ)."""
    needle = f"{key}={value}".encode()
    me = os.getpid()
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            if needle in Path("/proc", entry, "environ").read_bytes().split(b"\0"):
                found.add(int(entry))
        except OSError:
            continue
    return found


# --------------------------------------------------------------------------- messages


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(_ANSI_RE.sub("", text).splitlines()[-lines:])


def _describe(what: str, paths: _LogPaths) -> str:
    parts = [what]
    for path in (paths.superlink, paths.cli, paths.run):
        tail = _tail(path)
        if tail:
            parts.append(f"--- {path} (last lines) ---\n{tail}")
    return "\n".join(parts)


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--reap":
    _reap_when_orphaned(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
