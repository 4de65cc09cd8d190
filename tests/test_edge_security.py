"""Attacks on a node by a hostile server and by another local account, on real processes over
127.0.0.1: each must fail, and honest runs before and after must still complete.

Two nodes join a plain-HTTP test server (``--insecure``: transport security is test_deploy's):
alice with the default policy (DP required, noise >= 0.5, lifetime epsilon <= 10, no metrics
out under DP) and bob with a looser one (noise >= 0.2, lifetime epsilon <= 100) who pinned one
extra bundle. The server
side is what an attacker controls: ``fl-server start`` for honest runs, and for the attacks its
own SuperLink and ``flwr run`` of bundles the test writes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from processes import Proc, wait_for

from fedlora.client.bundle import sha256_of
from fedlora.client.executor import SECRET_FILE
from fedlora.core.config import DEFAULT_RUN_CONFIG
from fedlora.core.flower_runner import free_port, write_app_dir
from fedlora.core.run_dir import RunDir
from fedlora.privacy.ledger import PrivacyLedger
from fedlora.privacy.policy import POLICY_FILE
from fedlora.server.deploy import DEPLOYED_KEY, superlink_command
from fedlora.server.server_dir import ServerDir

# one federation (module fixture) for every test: they share one pytest-xdist worker
pytestmark = [pytest.mark.flower, pytest.mark.slow, pytest.mark.xdist_group("edge-security")]

BIN = Path(sys.executable).parent
RUN = {
    "num-rounds": 1,
    "num-clients": 2,
    "local-steps": 2,
    "num-train": 64,
    "num-test": 8,
    "dp.enabled": True,
    "dp.plan-examples": 64,
    "dp.target-epsilon": 3.0,  # two runs stay within alice's default lifetime cap of 10
    "round-timeout": 60.0,
    "min-replies": 1,
    "fraction-evaluate": 0.0,
    "tasks": "adddigit-4",
}
EVIL_SERVER = """
import json, pathlib, time
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()

@app.main()
def main(grid: Grid, context: Context) -> None:
    nodes, deadline = [], time.time() + 60
    while len(nodes) < 2 and time.time() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    content = RecordDict({"config": ConfigRecord({"server-round": 1})})
    replies = grid.send_and_receive([Message(content, dst_node_id=n, message_type="train") for n in nodes], timeout=60)
    got = [r.error.reason if r.has_error() else sorted(r.content.keys()) for r in replies]
    pathlib.Path(OUT).write_text(json.dumps(got))
"""
STEAL = """
import pathlib
pathlib.Path(MARKER).write_text("the server's code ran on this node")
"""


def _fl(*argv: str) -> list[str]:
    return [str(BIN / argv[0]), *argv[1:]]


class Edge:
    """The test's server directory, its two nodes, and how to run things against them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.server_dir = ServerDir.init(root / "server", ["127.0.0.1", "localhost"], port=self.port)
        self.procs: list[Proc] = []
        path = os.pathsep.join([str(BIN), os.environ.get("PATH", "")])  # the SuperLink starts Flower's helpers by name
        self.env = {**os.environ, "FLWR_HOME": str(root / "flwr_home"), "PATH": path}
        self.bob_pins: list[str] = []

    def start_node(self, name: str, *extra: str) -> Proc:
        argv = _fl("fl-client", "start", "--insecure", "--server", f"127.0.0.1:{self.port}", "--name", name)
        argv += ["--data", "embedded:adddigit-4", "--state-dir", str(self.state(name)), *extra]
        proc = Proc(argv, self.root / f"client-{name}.log", self.root)
        self.procs.append(proc)
        return proc

    def state(self, name: str) -> Path:
        return self.root / "state" / name

    def log(self, name: str) -> str:
        return (self.root / f"client-{name}.log").read_text(errors="replace")

    def honest_run(self, run_dir: Path, **overrides: Any) -> Proc:
        """``fl-server start --insecure``, to its end."""
        pairs = " ".join(f"{k}={json.dumps(v)}" for k, v in {**RUN, **overrides}.items())
        argv = _fl("fl-server", "start", str(self.server_dir.root), "--insecure", "--run-dir", str(run_dir))
        server = Proc([*argv, "--run-config", pairs], self.root / f"server-{run_dir.name}.log", self.root)
        assert server.wait(timeout=240) == 0, server.text()[-3000:]
        return server

    def submit(self, app_dir: Path, run_config: dict[str, Any], until: Callable[[], bool] | None = None) -> str:
        """What only the server's operator can do: run any bundle on the federation's SuperLink.
        Returns the SuperLink's log; the run is stopped once ``until()`` holds (else when it ends)."""
        link_log = self.root / f"superlink-{app_dir.name}.log"
        command = superlink_command(self.server_dir, "127.0.0.1", self.port, insecure=True, expose_control=False)
        link = Proc(command, link_log, self.root, self.env)
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(exist_ok=True)
        connection = {"superlink": {"default": "here", "here": {"address": f"127.0.0.1:{self.port}", "insecure": True}}}
        (home / "config.toml").write_text(tomli_w.dumps(connection))
        (self.root / "run_config.toml").write_text(tomli_w.dumps(run_config))
        try:
            deadline = time.monotonic() + 60
            while True:
                argv = _fl("flwr", "run", str(app_dir), "here", "--run-config", str(self.root / "run_config.toml"))
                done = subprocess.run(
                    [*argv, "--format", "json"], env=self.env, capture_output=True, text=True, timeout=120
                )
                if '"success": true' in done.stdout or time.monotonic() > deadline:
                    break
                time.sleep(1)  # the SuperLink is still starting
            assert '"success": true' in done.stdout, done.stdout + done.stderr
            run_id = str(json.loads(done.stdout)["run-id"])
            if until is not None:
                wait_for(f"the hostile run ({app_dir.name})", until, 150)
            else:
                wait_for("the run to finish", lambda: self._finished(run_id), 240)
            subprocess.run(_fl("flwr", "stop", run_id, "here"), env=self.env, capture_output=True, timeout=60)
        finally:
            link.stop()
        return link.text()

    def _finished(self, run_id: str) -> bool:
        done = subprocess.run(
            _fl("flwr", "ls", "--run-id", run_id, "here", "--format", "json"),
            env=self.env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        return re.search(r'"status":\s*"finished', done.stdout) is not None

    def stop_all(self) -> None:
        for proc in self.procs:
            proc.stop()


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    fed = Edge(tmp_path_factory.mktemp("edge"))
    readme_bundle = _readme_bundle(fed.root)
    fed.bob_pins.append(sha256_of(_build(readme_bundle)))
    fed.start_node("alice")
    fed.start_node("bob", "--min-noise", "0.2", "--max-epsilon", "100", "--allow-bundle", fed.bob_pins[0])
    try:
        yield fed
    finally:
        fed.stop_all()


def _build(app_dir: Path) -> bytes:
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(app_dir)


def _readme_bundle(root: Path) -> Path:
    """fedlora's own app plus a README: not configuration-only, harmless, and pinned by bob."""
    shutil.rmtree(root / "readme-app", ignore_errors=True)  # built again, byte for byte the same
    app = write_app_dir(
        root / "readme-app",
        app_name="fedlora",
        components=("fedlora.server.app:app", "fedlora.client.app:app"),
        default_config=DEFAULT_RUN_CONFIG,
    )
    (app / "README.md").write_text("Our federation's app: the config only, and this note.\n")
    return app


def _evil_bundle(root: Path, marker: Path, out: Path) -> Path:
    """A server's bundle that shadows fedlora's client modules and Flower's usual app names."""
    app = root / "evil-app"
    pyproject = {
        "project": {"name": "fedlora", "version": "1.0.0", "dependencies": []},
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedlora",
                    "components": {"serverapp": "evil_server:app", "clientapp": "evil_client:app"},
                    "config": {},
                }
            }
        },
    }
    steal = f"MARKER = {str(marker)!r}\n" + STEAL
    files = {
        "pyproject.toml": tomli_w.dumps(pyproject),
        "evil_server.py": f"OUT = {str(out)!r}\n" + EVIL_SERVER,
        "evil_client.py": steal + "from flwr.clientapp import ClientApp\napp = ClientApp()\n",
        "fedlora/__init__.py": steal,
        "fedlora/client/__init__.py": steal,
        "fedlora/client/app.py": steal,
        "client/__init__.py": steal,
        "client/edge.py": steal,
    }
    for name, text in files.items():
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        (app / name).write_text(text)
    return app


def _trained_by(run_dir: Path) -> list[str]:
    rows = RunDir(run_dir).rows()
    trained = rows[-1]["per-client-train"]
    return sorted(m["client-name"] for m in trained.values())


def test_a_bundle_that_ships_code_is_refused_and_never_runs(edge: Edge) -> None:
    """The critical attack of the issue: before, the node ran the bundle's modules within 20 s."""
    edge.honest_run(edge.root / "before")
    assert _trained_by(edge.root / "before") == ["alice", "bob"]

    marker, out = edge.root / "stolen.txt", edge.root / "evil-replies.json"
    evil = _evil_bundle(edge.root, marker, out)
    digest = sha256_of(_build(evil))
    edge.submit(evil, {}, until=out.exists)  # the hostile server app writes down what came back
    replies = json.loads(out.read_text())
    assert len(replies) == 2 and all("refused" in str(r) and digest in str(r) for r in replies), replies
    for name in ("alice", "bob"):
        assert f"bundle sha256:{digest} refused" in edge.log(name)
    assert not marker.exists()  # none of the bundle's modules was imported on either node

    edge.honest_run(edge.root / "after")
    assert _trained_by(edge.root / "after") == ["alice", "bob"]


def test_a_pinned_bundle_is_accepted_by_its_node_only(edge: Edge) -> None:
    """bob pinned the hash of a bundle that carries a README; alice did not. Either way the node's
    installed client runs the message, never the bundle's."""
    app = _readme_bundle(edge.root)
    digest = sha256_of(_build(app))
    assert [digest] == edge.bob_pins
    run_dir = edge.root / "pinned"
    config = {"run-dir": str(run_dir), DEPLOYED_KEY: True, **RUN}
    edge.submit(app, config)
    assert "README.md" in str(re.findall(rf"bundle sha256:{digest} refused: [^\n]*", edge.log("alice")))
    assert f"sha256:{digest[:12]}" in edge.log("bob")
    assert _trained_by(run_dir) == ["bob"]
    dropped = RunDir(run_dir).rows()[-1]["dropped"]
    assert any(f"sha256:{digest} refused" in reason for reason in dropped.values())


def test_a_round_below_a_nodes_noise_floor_is_declined_and_not_charged(edge: Edge) -> None:
    """The server asks for sigma 0.4: alice's floor is 0.5, bob's 0.2. The run completes with bob."""
    before = PrivacyLedger(edge.state("alice")).history()
    run_dir = edge.root / "low-noise"
    edge.honest_run(run_dir, **{"dp.noise-multiplier": 0.4, "dp.target-epsilon": 30.0})
    assert _trained_by(run_dir) == ["bob"]
    assert PrivacyLedger(edge.state("alice")).history() == before  # nothing trained, nothing charged
    reasons = list(RunDir(run_dir).rows()[-1]["dropped"].values())
    assert any("noise multiplier 0.4 is below this node's floor 0.5" in r for r in reasons), reasons
    report = json.loads((run_dir / "report" / "privacy.json").read_text())
    assert any("below this node's floor" in d["reason"] for d in report["declined"])
    trained = RunDir(run_dir).rows()[-1]["per-client-train"]
    assert not [k for m in trained.values() for k in m if k.startswith("local-")]  # no unnoised score left


NOBODY_PROBE = """
import sys, urllib.error, urllib.request
port, path = sys.argv[1], sys.argv[2]
try:
    print(open(path, "rb").read()[:4])
    sys.exit("read the node's secret")
except OSError:
    pass
request = urllib.request.Request(  # AcquireTaskRequest(supported_task_types=["flwr-clientapp"]), by hand
    f"http://127.0.0.1:{port}/v1/runtime/acquire-task",
    data=bytes([10, 14]) + b"flwr-clientapp",
    headers={"content-type": "application/protobuf"},
)
try:
    with urllib.request.urlopen(request, timeout=10) as answer:
        print("STATUS", answer.status, answer.read()[:200])
except urllib.error.HTTPError as err:
    print("STATUS", err.code)
"""


def test_another_local_account_gets_no_task_and_reads_no_secret(edge: Edge) -> None:
    """``nobody`` on the node's host: before, acquire-task handed it the oldest pending task's token."""
    if os.geteuid() != 0:
        pytest.skip("runuser needs root")
    command = superlink_command(edge.server_dir, "127.0.0.1", edge.port, insecure=True, expose_control=False)
    link = Proc(command, edge.root / "superlink-idle.log", edge.root, edge.env)  # the nodes connect and wait
    try:
        _probe_nodes(edge)
    finally:
        link.stop()


def _runtime_port(edge: Edge, name: str) -> str | None:
    """The port of the node's running SuperNode's local runtime API (None: not up yet)."""
    ports = re.findall(r"local runtime API 127\.0\.0\.1:(\d+)", edge.log(name))
    if not ports:
        return None
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return ports[-1] if sock.connect_ex(("127.0.0.1", int(ports[-1]))) == 0 else None


def _probe_nodes(edge: Edge) -> None:
    for name in ("alice", "bob"):
        state = edge.state(name)
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        for path in [p for p in state.rglob("*") if p.is_file()]:
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, f"{path} is readable by others"
        assert (state / POLICY_FILE).is_file() and (state / SECRET_FILE).is_file()
        secret = str(state / SECRET_FILE)
        for attempt in range(3):  # a SuperNode restarted between finding its port and probing it: again
            wait_for(f"{name}'s SuperNode", lambda n=name: _runtime_port(edge, n) is not None, 120)  # type: ignore[misc]
            port = str(_runtime_port(edge, name))
            probe = subprocess.run(
                ["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c", NOBODY_PROBE, port, secret],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            # the same request signed with the secret (what the node's own executor does) is served
            own = subprocess.run(
                [sys.executable, "-c", _SIGNED_PROBE, port, secret],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            refused = any(word in p.stderr for p in (probe, own) for word in ("ConnectError", "Connection refused"))
            if attempt < 2 and refused:
                time.sleep(2)
                continue
            break
        assert probe.returncode == 0, probe.stdout + probe.stderr
        status = int(re.findall(r"STATUS (\d+)", probe.stdout)[0])
        assert status in (401, 403), probe.stdout  # refused: not signed with the node's secret
        assert own.returncode == 0 and "ACQUIRED-NOTHING" in own.stdout, own.stdout + own.stderr


_SIGNED_PROBE = """
import sys
from pathlib import Path
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
from flwr.supercore.runtime import RuntimeHttpClient
port, secret = sys.argv[1], Path(sys.argv[2]).read_bytes()
auth = SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={"/flwr.proto.Runtime/AcquireTask"})
client = RuntimeHttpClient.from_server_address(
    f"127.0.0.1:{port}", True, None, [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), auth]
)
res = client.AcquireTask(AcquireTaskRequest(supported_task_types=["flwr-clientapp-none"]))
print("ACQUIRED-NOTHING" if not res.token else "ACQUIRED")
"""
