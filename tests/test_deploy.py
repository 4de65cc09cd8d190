"""Real deployment on 127.0.0.1: ``fl-server start`` and three ``fl-client start`` processes.

Every process is started in its own session, waited for with a deadline and stopped by its
process group. The federations are tiny (3 local steps, 64 examples per client) so the time
goes into what deployment costs: a fresh client-app process per message.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from processes import Proc, wait_for
from safetensors.torch import load_file

from fedlora.core.flower_runner import free_port
from fedlora.core.pki import fingerprint, load_node_public_key
from fedlora.core.run_dir import RunDir
from fedlora.privacy.accounting import compute_epsilon
from fedlora.privacy.ledger import PrivacyLedger
from fedlora.server.server_dir import ServerDir

pytestmark = [pytest.mark.flower, pytest.mark.slow]

BIN = Path(sys.executable).parent
CLIENTS = ("alice", "bob", "carol")
RUN = (
    "num-rounds=2 local-steps=3 num-train=64 num-test=8 dp.plan-examples=64 round-timeout=60.0 "
    'min-replies=2 fraction-evaluate=0.0 tasks="adddigit-4,repeat-3"'
)


class Federation:
    """A server directory with three enrolled client keys, and the processes of one test."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.server_dir = ServerDir.init(root / "server", ["127.0.0.1", "localhost"], port=self.port)
        self.procs: list[Proc] = []
        for name in CLIENTS:
            assert self.cli("fl-client", "keygen", "--out", str(root / "keys" / name), "--name", name) == 0
            pub = str(root / "keys" / name / "client.pub")
            assert self.cli("fl-server", "enroll", str(self.server_dir.root), pub, "--name", name) == 0

    def cli(self, *argv: str) -> int:
        return subprocess.run([str(BIN / argv[0]), *argv[1:]], cwd=self.root, capture_output=True).returncode

    def start(self, argv: list[str], log: str) -> Proc:
        proc = Proc([str(BIN / argv[0]), *argv[1:]], self.root / log, self.root)
        self.procs.append(proc)
        return proc

    def server(self, *extra: str, log: str = "server.log") -> Proc:
        return self.start(["fl-server", "start", str(self.server_dir.root), "--run-config", RUN, *extra], log)

    def client(self, name: str, *extra: str, key: Path | None = None, log: str | None = None) -> Proc:
        key = key or self.root / "keys" / name / "client.key"
        argv = ["fl-client", "start", "--server", f"127.0.0.1:{self.port}", "--ca", str(self.server_dir.ca_cert_path)]
        argv += ["--key", str(key), "--data", "embedded:adddigit-4,repeat-3", "--state-dir", str(self.state(name))]
        return self.start([*argv, "--name", name, *extra], log or f"client-{name}.log")

    def state(self, name: str) -> Path:
        return self.root / "state" / name

    def stop_all(self) -> None:
        """SIGTERM every group at once, then SIGKILL what is left after a shared 20 s."""
        for proc in self.procs:
            proc.kill(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs:
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            proc.kill(signal.SIGKILL)
            proc.popen.wait(timeout=10)


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    fed = Federation(tmp_path)
    try:
        yield fed
    finally:
        fed.stop_all()


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    """The rows written so far (read while the run goes: a line being appended is skipped)."""
    return RunDir(run_dir).rows(missing_ok=True)


def test_secure_federation_of_three_with_dp_refuses_strangers(
    federation: Federation, request: pytest.FixtureRequest
) -> None:
    """TLS + node auth + DP FFA-LoRA, 2 rounds; an unenrolled key and a plain-HTTP client are refused.
    The server publishes the final adapter to a hub; then every client personalises it, and alice,
    who has a hub token, publishes hers to clients/alice/run."""
    from hub_server import HubServer
    from peft import PeftModel

    from fedlora.core.model import load_base_model
    from fedlora.hub.hub_dir import HubDir, HubSettings
    from fedlora.hub.sdk.client import HubClient
    from fedlora.hub.sdk.manifest import load_public_key

    fed = federation
    hub_dir, _ = HubDir.init(fed.root / "hub", HubSettings(), tls_names=["localhost"])  # HTTPS, the hub's own CA
    alice_token = fed.root / "alice.token"
    alice_token.write_text(hub_dir.registry().create_token("client", "alice") + "\n")
    hub = HubServer(hub_dir.root, fed.root / "hub.log", ca=hub_dir.ca_cert_path).start()
    request.addfinalizer(hub.stop)
    hub_key = str(hub_dir.public_key_path)
    run_dir = fed.root / "run"
    hub_ca = ["--hub-ca", str(hub_dir.ca_cert_path)]
    publish = ["--hub", hub.url, "--hub-token-file", str(hub_dir.operator_token_path), "--hub-key", hub_key, *hub_ca]
    server = fed.server("--run-dir", str(run_dir), *publish, "--run-config", "personalize.steps=3")
    with_hub = ["--hub", hub.url, "--hub-token-file", str(alice_token), "--hub-key", hub_key, *hub_ca]
    clients = [fed.client(name, *(with_hub if name == "alice" else [])) for name in CLIENTS]

    stranger_keys = fed.root / "keys" / "mallory"
    assert fed.cli("fl-client", "keygen", "--out", str(stranger_keys)) == 0
    stranger = fed.client("mallory", key=stranger_keys / "client.key")
    plain = fed.client("eve", "--insecure", log="client-eve.log")

    assert plain.wait(timeout=120) == 2
    assert "speaks TLS but this client was started with --insecure" in plain.text()
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):  # plain HTTP is not served at all
        urllib.request.urlopen(f"http://127.0.0.1:{fed.port}/health", timeout=10)

    fp = fingerprint(load_node_public_key(stranger_keys / "client.pub"))
    wait_for("the stranger to be refused", lambda: f"refused this node's key {fp}" in stranger.text(), 180)
    assert stranger.popen.poll() is None  # it keeps asking (an operator may enroll it), never admitted
    stranger.stop()

    assert server.wait(timeout=400) == 0, server.text()[-3000:]
    superlink_log = (run_dir / "deploy" / "logs" / "superlink.log").read_text()
    assert f"key {fp} is not enrolled" in superlink_log  # the operator sees who knocked

    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        trained = row["per-client-train"]
        assert isinstance(trained, dict)
        assert sorted(m["client-name"] for m in trained.values()) == list(CLIENTS)
    base = load_base_model()
    model = PeftModel.from_pretrained(base, str(run_dir / "adapters" / "global"))
    assert any("lora_B" in name for name, _ in model.named_parameters())

    report = json.loads((run_dir / "report" / "privacy.json").read_text())
    assert report["rounds_completed"] == 2
    by_name = {c["client_name"]: c for c in report["clients"]}
    assert sorted(by_name) == list(CLIENTS)
    delta = float(report["delta"])
    for name in CLIENTS:
        ledger = PrivacyLedger(fed.state(name))
        assert ledger.path.is_file()
        history = ledger.history()
        assert len(history) == 3  # two rounds, charged once each, then the personalisation
        assert ledger.entries()[-1].run_id.startswith("personalize-")
        history = history[:2]  # the report covers the federated rounds; it is written before personalising
        mine = compute_epsilon(history, delta, "rdp")
        assert by_name[name]["epsilon"] == pytest.approx(mine, rel=1e-12)
        assert by_name[name]["epsilon"] <= 8.0 + 1e-6
        assert [(h["noise_multiplier"], h["sample_rate"], h["steps"]) for h in by_name[name]["history"]] == [
            tuple(h) for h in history
        ]
    personalised = json.loads((run_dir / "personalize.json").read_text())
    assert (personalised["asked"], personalised["personalised"]) == (3, 3)
    assert sorted(c["client"] for c in personalised["clients"]) == list(CLIENTS)
    for name in ("bob", "carol"):  # no hub: their personal adapters stay on their machines
        assert (fed.state(name) / "personal" / "run" / "adapter_model.safetensors").is_file()
    alice_client = HubClient(
        hub.url, alice_token.read_text().strip(), load_public_key(hub_dir.public_key_path), ca=hub_dir.ca_cert_path
    )
    with alice_client as alice:
        final = alice.pull("global/run/2", fed.root / "pulled-global")
        assert final.manifest["provenance"]["epsilon"] == pytest.approx(report["epsilon_max"], rel=1e-12)
        mine = alice.pull("clients/alice/run", fed.root / "pulled-personal")
    assert mine.manifest["published_by"] == "client alice"
    assert mine.manifest["provenance"]["epsilon"] == pytest.approx(
        compute_epsilon(PrivacyLedger(fed.state("alice")).history(), mine.manifest["provenance"]["delta"], "rdp"),
        rel=1e-12,
    )
    assert [c.get("pushed") for c in sorted(personalised["clients"], key=lambda c: c["client"])] == [1, 0, 0]
    hub.stop()
    for proc in clients:
        assert proc.popen.poll() is None  # clients outlive a run: they wait for the next one
        proc.stop()
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.popen.pid, 0)  # nothing of theirs is left behind


def test_client_killed_in_round_one_does_not_stop_the_run(federation: Federation) -> None:
    fed = federation
    run_dir = fed.root / "run"
    server = fed.server("--run-dir", str(run_dir), "--run-config", "round-timeout=90.0 num-rounds=5")
    clients = {name: fed.client(name) for name in CLIENTS}
    victim = clients["carol"]
    wait_for("carol to receive round 1", lambda: "Receiving: train message" in victim.text(), 240)
    victim.kill()  # SIGKILL to the whole group: fl-client (training the message) and its SuperNode, mid-round
    wait_for("round 1 to be written", lambda: len(_rows(run_dir)) >= 2, 200)
    clients["carol"] = fed.client("carol", log="client-carol-again.log")  # it may rejoin later
    assert server.wait(timeout=400) == 0, server.text()[-3000:]
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4, 5]
    round1 = rows[1]["train"]
    assert isinstance(round1, dict)
    assert round1["accepted"] == 2  # the two survivors made the round
    # Flower refuses the restarted node until its old session expires (2 heartbeats, <= 60 s)
    names = [{m["client-name"] for m in r["per-client-train"].values()} for r in rows[2:]]
    assert "carol" in set().union(*names), names  # it rejoined in a later round
    assert (run_dir / "adapters" / "global" / "adapter_model.safetensors").is_file()


def test_a_revoked_client_is_dropped_from_the_run_in_progress(federation: Federation) -> None:
    """Before, ``fl-server revoke`` took effect at the next start: the revoked key reconnected to
    the running server. Now the running SuperLink unregisters it: its SuperNode is disconnected
    within seconds, refused when it dials again, and the run goes on with the others."""
    fed = federation
    run_dir = fed.root / "run"
    server = fed.server("--run-dir", str(run_dir), "--run-config", "num-rounds=3")
    clients = {name: fed.client(name) for name in CLIENTS}
    wait_for("round 1 to be written", lambda: len(_rows(run_dir)) >= 2, 300)
    revoked = subprocess.run(
        [str(BIN / "fl-server"), "revoke", str(fed.server_dir.root), "carol"],
        cwd=fed.root, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert revoked.returncode == 0, revoked.stdout + revoked.stderr
    assert "dropped from the run in progress" in revoked.stdout, revoked.stdout
    wait_for("carol to be refused", lambda: "the server refused this node's key" in clients["carol"].text(), 120)
    assert server.wait(timeout=400) == 0, server.text()[-3000:]
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    last = {m["client-name"] for m in rows[-1]["per-client-train"].values()}
    assert last == {"alice", "bob"}  # carol trained no later round
    assert not fed.server_dir.running_path.exists()  # the marker of the run in progress is gone with it


def test_server_killed_after_round_one_resumes_to_the_same_adapter(federation: Federation) -> None:
    """Without DP (whose noise is secret per client, by design), a resumed run equals a straight one."""
    fed = federation
    for name in CLIENTS:
        fed.client(name, "--allow-no-dp")  # their operators accept a run without DP
    plain = "dp.enabled=false num-rounds=2"
    straight = fed.root / "straight"
    assert fed.server("--run-dir", str(straight), "--run-config", plain, log="straight.log").wait(400) == 0

    run_dir = fed.root / "interrupted"
    server = fed.server("--run-dir", str(run_dir), "--run-config", plain, log="interrupted.log")
    wait_for("round 1's checkpoint", lambda: (run_dir / "checkpoints" / "round-1").is_dir(), 300)
    server.kill()  # the operator's machine dies: no clean shutdown
    server.popen.wait(timeout=30)
    wait_for("the port to be free", lambda: _port_free(fed.port), 60)

    resumed = fed.start(["fl-server", "start", str(fed.server_dir.root), "--resume", str(run_dir)], "resumed.log")
    assert resumed.wait(timeout=400) == 0, resumed.text()[-3000:]
    assert [r["round"] for r in _rows(run_dir)] == [0, 1, 2]
    a = load_file(str(straight / "adapters" / "global" / "adapter_model.safetensors"))
    b = load_file(str(run_dir / "adapters" / "global" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _port_free(port: int) -> bool:
    """Nothing listens on ``port`` (as uvicorn binds: connections in TIME_WAIT do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True
