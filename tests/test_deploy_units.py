"""Deployment pieces without Flower processes: the SuperLink's loopback guard, the client's
TLS probe against real sockets, bad input refused before anything starts, dropout-tolerant
sampling, node data, and the privacy report built from histories the clients reported."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import logging
import os
import socket
import ssl
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.app.constants import DEFAULT_TTL
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from fedlora.client.cli import main as client_main
from fedlora.client.node import NodeError, NodeOptions, ServerAway, probe_server, split_address
from fedlora.core.client_data import check_node_data, node_examples
from fedlora.core.config import DpSection, FederationConfig
from fedlora.core.pki import (
    create_ca,
    fingerprint,
    generate_node_key,
    issue_server_certificate,
    write_certificate,
    write_private_key_pem,
)
from fedlora.core.reports import privacy_records
from fedlora.core.superlink import SOCKET_TABLES, ControlGuard, is_loopback, peer_owner, socket_owner
from fedlora.privacy.accounting import compute_epsilon
from fedlora.privacy.report import build_report
from fedlora.server.cli import main as server_main
from fedlora.server.server_dir import ServerDir
from fedlora.strategies.ffa_lora import FfaLora
from fedlora.strategies.flower import LoraStrategy

# ---------------------------------------------------------------------------------------- guard


def _app(status: int = 200) -> Starlette:
    async def ok(request: Request) -> Response:
        return PlainTextResponse("ok", status_code=status)

    routes = [Route(p, ok, methods=["GET", "POST"]) for p in ("/v1/control/x", "/v1/runtime/y", "/v1/fleet/pull")]
    routes.append(Route("/v1/fleet/activate-node", ok, methods=["POST"]))
    return Starlette(routes=routes)


def _guard(owner: int | None = 1000, **kwargs: Any) -> ControlGuard:
    """The guard of a SuperLink run by uid 1000, every connection owned by ``owner``."""
    return ControlGuard(_app(), operator_uid=1000, owner_of=lambda scope: owner, **kwargs)


@pytest.mark.parametrize("path", ["/v1/control/x", "/v1/runtime/y"])
def test_guard_refuses_control_and_runtime_from_other_machines(path: str) -> None:
    remote = TestClient(_guard(), client=("10.1.2.3", 40000))
    assert remote.get(path).status_code == 403
    assert remote.get("/v1/fleet/pull").status_code == 200  # nodes must reach the Fleet API
    for local in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
        assert TestClient(_guard(), client=(local, 40000)).get(path).status_code == 200
    exposed = TestClient(_guard(expose_control=True), client=("10.1.2.3", 40000))
    assert exposed.get(path).status_code == 200


@pytest.mark.parametrize("path", ["/v1/control/x", "/v1/runtime/y"])
def test_guard_refuses_loopback_connections_of_other_accounts(path: str) -> None:
    for owner in (65534, 0, None):  # nobody, root (not the operator here), a socket not found
        answer = TestClient(_guard(owner), client=("127.0.0.1", 40000)).get(path)
        assert answer.status_code == 403
        assert "operator's account (uid 1000) only" in answer.json()["detail"]
    for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):  # the peer's address must be the socket's
        answer = TestClient(_guard(1000), client=("127.0.0.1", 40000)).get(path, headers={header: "127.0.0.1:1"})
        assert answer.status_code == 403 and "proxy headers" in answer.json()["detail"]
    other = TestClient(_guard(65534), client=("127.0.0.1", 40000))
    assert other.get("/v1/fleet/pull").status_code == 200  # the Fleet API is for everyone (node auth is Flower's)
    assert TestClient(_guard(65534, expose_control=True), client=("127.0.0.1", 1)).get(path).status_code == 200


_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:2384 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 11 1
   1: 0100007F:9C40 0100007F:2384 01 00000000:00000000 00:00000000 00000000 65534        0 12 1
   2: 0100007F:2384 0100007F:9C40 01 00000000:00000000 00:00000000 00000000  1000        0 13 1
   3: 0100007F:9C41 0100007F:2384 06 00000000:00000000 00:00000000 00000000     0        0 0 1
   4: 0100007F:9C44 0100007F:2384 05 00000000:00000000 00:00000000 00000000     0        0 0 1
"""
_TCP6 = """\
  sl  local_address                         remote_address                        st tx rx tr retr uid
   0: 0000000000000000FFFF00000100007F:9C42 0000000000000000FFFF00000100007F:2384 01 0:0 0:0 0 1001 0 14
   1: 00000000000000000000000001000000:9C43 00000000000000000000000001000000:2384 01 0:0 0:0 0 1002 0 15
"""


@pytest.mark.skipif(sys.byteorder != "little", reason="the tables above are as a little-endian kernel prints them")
def test_socket_owner_reads_the_kernels_tables() -> None:
    port = 0x2384
    assert socket_owner(("127.0.0.1", 0x9C40), ("127.0.0.1", port), [_TCP, _TCP6]) == 65534  # the client's end
    assert socket_owner(("127.0.0.1", port), ("127.0.0.1", 0x9C40), [_TCP]) == 1000  # the server's own end
    assert socket_owner(("::ffff:127.0.0.1", 0x9C42), ("127.0.0.1", port), [_TCP, _TCP6]) == 1001  # v4-mapped
    assert socket_owner(("::1", 0x9C43), ("::1", port), [_TCP, _TCP6]) == 1002
    assert socket_owner(("127.0.0.1", 0x9C41), ("127.0.0.1", port), [_TCP]) is None  # TIME_WAIT has no owner
    # a client that sent its request and closed (FIN_WAIT2): listed as uid 0, inode 0, not root's
    assert socket_owner(("127.0.0.1", 0x9C44), ("127.0.0.1", port), [_TCP]) is None
    assert socket_owner(("127.0.0.1", 1), ("127.0.0.1", port), [_TCP, _TCP6, "garbage\n 0: zz:zz"]) is None


def test_peer_owner_finds_this_process_on_a_real_connection() -> None:
    assert all(Path(p).exists() for p in SOCKET_TABLES)
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.socket(family) as server:
            server.bind((host, 0))
            server.listen()
            with socket.create_connection(server.getsockname()[:2]) as client:
                accepted, _ = server.accept()
                with accepted:
                    scope = {"client": accepted.getpeername()[:2], "server": accepted.getsockname()[:2]}
                    assert peer_owner(scope) == os.getuid()
                    assert client.getsockname()[:2] == scope["client"]
    assert peer_owner({"client": ("testclient", 1), "server": ("127.0.0.1", 2)}) is None


def test_loopback_means_loopback() -> None:
    assert [is_loopback(h) for h in ("127.0.0.5", "::1", "::ffff:127.0.0.1")] == [True] * 3
    assert [is_loopback(h) for h in ("10.0.0.1", "0.0.0.0", "testclient", "", None, "::ffff:10.0.0.1")] == [False] * 6


def test_guard_logs_the_fingerprint_of_a_refused_node_key(caplog: pytest.LogCaptureFixture) -> None:
    key = generate_node_key()
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header = {"flwr-public-key": base64.b64encode(pem).decode()}
    with caplog.at_level(logging.WARNING, logger="fedlora.superlink"):
        refused = TestClient(ControlGuard(_app(status=401)), client=("10.1.2.3", 1))
        assert refused.post("/v1/fleet/activate-node", headers=header).status_code == 401
        accepted = TestClient(ControlGuard(_app(status=200)), client=("10.1.2.3", 1))
        assert accepted.post("/v1/fleet/activate-node", headers=header).status_code == 200
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines  # only the refusal is logged
    assert fingerprint(key.public_key()) in lines[0] and "not enrolled" in lines[0]


# ---------------------------------------------------------------------------------------- probe


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = create_ca()
    key, cert = issue_server_certificate(ca_key, ca_cert, ["127.0.0.1"])
    _, other_ca = create_ca("another federation")
    now = datetime.datetime.now(datetime.UTC)
    expired = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=30))
        .not_valid_after(now - datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {n: root / f"{n}.pem" for n in ("ca", "other-ca", "cert", "expired", "key")}
    write_certificate(paths["ca"], ca_cert)
    write_certificate(paths["other-ca"], other_ca)
    write_certificate(paths["cert"], cert)
    write_certificate(paths["expired"], expired)
    write_private_key_pem(paths["key"], key)
    return paths


def _serve(certfile: Path | None, keyfile: Path) -> Iterator[int]:
    """A one-thread server on 127.0.0.1: TLS with ``certfile``, or plain HTTP when None."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def loop() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                try:
                    if certfile is not None:
                        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                        ctx.load_cert_chain(certfile, keyfile)
                        with ctx.wrap_socket(conn, server_side=True) as tls:
                            tls.recv(1)
                    else:
                        conn.recv(100)
                        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nok")
                except (OSError, ssl.SSLError):
                    pass

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield port
    stop.set()
    thread.join(timeout=5)
    listener.close()


@pytest.fixture
def tls_server(pki: dict[str, Path]) -> Iterator[int]:
    yield from _serve(pki["cert"], pki["key"])


@pytest.fixture
def expired_server(pki: dict[str, Path]) -> Iterator[int]:
    yield from _serve(pki["expired"], pki["key"])


@pytest.fixture
def plain_server(pki: dict[str, Path]) -> Iterator[int]:
    yield from _serve(None, pki["key"])


def _options(port: int, ca: Path | None, insecure: bool = False, tmp: Path = Path("/tmp")) -> NodeOptions:
    return NodeOptions(
        server=f"127.0.0.1:{port}", ca=ca, key=tmp / "k", data="embedded:adddigit-4", state_dir=tmp / "s",
        name="n", insecure=insecure,
    )  # fmt: skip


def test_probe_accepts_the_federation_certificate(tls_server: int, pki: dict[str, Path]) -> None:
    probe_server(_options(tls_server, pki["ca"]))


def test_probe_refuses_a_certificate_from_another_ca(tls_server: int, pki: dict[str, Path]) -> None:
    with pytest.raises(NodeError, match="not issued by --ca"):
        probe_server(_options(tls_server, pki["other-ca"]))


def test_probe_refuses_an_expired_certificate(expired_server: int, pki: dict[str, Path]) -> None:
    with pytest.raises(NodeError, match="has expired"):
        probe_server(_options(expired_server, pki["ca"]))


def test_probe_refuses_a_plain_http_server(plain_server: int, pki: dict[str, Path]) -> None:
    with pytest.raises(NodeError, match="does not speak TLS"):
        probe_server(_options(plain_server, pki["ca"]))
    probe_server(_options(plain_server, None, insecure=True))  # what --insecure is for


def test_insecure_client_is_told_the_server_speaks_tls(tls_server: int, pki: dict[str, Path]) -> None:
    with pytest.raises(NodeError, match="speaks TLS but this client was started with --insecure"):
        probe_server(_options(tls_server, None, insecure=True))


def test_nobody_listening_is_waited_for_not_an_error(pki: dict[str, Path]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(ServerAway):
            probe_server(_options(port, pki["ca"]))


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--server", "localhost"], "must be HOST:PORT"),
        (["--server", "h:70000"], "port must be in 1..65535"),
        (["--server", "h:9092", "--data", "embedded:nosuchtask"], "nosuchtask"),
        (["--server", "h:9092", "--data", "missing.jsonl"], "missing.jsonl does not exist"),
        (["--server", "h:9092", "--name", "bad name"], "--name 'bad name'"),
        (["--server", "h:9092", "--ca", "nope.pem"], "nope.pem"),
    ],
)
def test_fl_client_start_refuses_bad_input_before_connecting(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], pki: dict[str, Path]
) -> None:
    key = generate_node_key()
    key_path = tmp_path / "client.key"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    base = {"--ca": str(pki["ca"]), "--key": str(key_path), "--data": "embedded:adddigit-4", "--name": "n"}
    given = dict(zip(argv[::2], argv[1::2], strict=True))
    merged = [x for k, v in {**base, **given}.items() for x in (k, v)]
    assert client_main(["start", *merged, "--state-dir", str(tmp_path / "state")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "state").exists()  # nothing started


def test_fl_client_start_refuses_a_non_ec_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], pki: dict[str, Path]
) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "rsa.key"
    path.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    argv = ["start", "--server", "h:9092", "--ca", str(pki["ca"]), "--key", str(path), "--data", "embedded:adddigit-4"]
    assert client_main([*argv, "--state-dir", str(tmp_path / "s")]) == 2
    assert "is not an EC key" in capsys.readouterr().err


def test_split_address() -> None:
    assert split_address("server.example.org:9092") == ("server.example.org", 9092)
    assert split_address("[::1]:9092") == ("::1", 9092)


def test_fl_server_start_refuses_an_unknown_key_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sd = ServerDir.init(tmp_path / "srv", ["127.0.0.1"])
    text = sd.settings_path.read_text()
    sd.settings_path.write_text(text.replace("[run]\n", '[run]\ncolour = "blue"\n'))
    assert server_main(["start", str(sd.root)]) == 2
    assert "colour" in capsys.readouterr().err
    assert not (sd.root / "superlink.db").exists() and not any(sd.runs_dir.iterdir())


def test_fl_server_start_needs_an_enrolled_client_and_known_overrides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sd = ServerDir.init(tmp_path / "srv", ["127.0.0.1"])
    assert server_main(["start", str(sd.root)]) == 2
    assert "no client is enrolled" in capsys.readouterr().err
    assert server_main(["start", str(sd.root), "--run-config", "colour=1"]) == 2
    assert "colour" in capsys.readouterr().err


def test_deployed_dp_needs_a_planned_client_size() -> None:
    with pytest.raises(ValueError, match=r"dp\.plan-examples must be set in deployment"):
        FederationConfig(deployed=True, dp=DpSection(enabled=True))
    FederationConfig(deployed=True, dp=DpSection(enabled=True, plan_examples=500))


# -------------------------------------------------------------------------------- sampling, data


@pytest.fixture
def _task_identity() -> None:
    """Messages need a run identity outside a Flower process."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


class _Grid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


@pytest.mark.usefixtures("_task_identity")
def test_after_round_one_the_strategy_samples_whoever_is_connected() -> None:
    state = {"m.lora_A.weight": torch.zeros(2, 4), "m.lora_B.weight": torch.zeros(4, 2)}
    strategy = LoraStrategy(FfaLora(scaling=1.0), min_train_nodes=3, min_available_nodes=3, min_replies=2, lr=0.01)
    grid = _Grid([1, 2, 3])
    assert len(list(strategy.configure_train(1, ArrayRecord(state), ConfigRecord({}), grid))) == 3  # type: ignore[arg-type]
    grid.nodes = [1, 3]  # node 2 died in round 1
    sent = list(strategy.configure_train(2, ArrayRecord(state), ConfigRecord({}), grid))  # type: ignore[arg-type]
    assert sorted(m.metadata.dst_node_id for m in sent) == [1, 3]
    grid.nodes = [1, 2, 3]  # it rejoined
    sent = list(strategy.configure_train(3, ArrayRecord(state), ConfigRecord({}), grid))  # type: ignore[arg-type]
    assert len(sent) == 3


def test_node_data_is_seeded_by_node_and_checked() -> None:
    cfg = FederationConfig(num_train=30, num_test=6, tasks="adddigit-4")
    a_train, a_test = node_examples(cfg, "embedded:adddigit-4,repeat-3", seed=1)
    again, _ = node_examples(cfg, "embedded:adddigit-4,repeat-3", seed=1)
    b_train, _ = node_examples(cfg, "embedded:adddigit-4,repeat-3", seed=2)
    assert (len(a_train), len(a_test)) == (30, 6)
    assert a_train == again and a_train != b_train
    assert not {e.prompt for e in a_test} & {e.prompt for e in a_train}
    with pytest.raises(ValueError, match="names no task"):
        check_node_data("embedded:")


# ----------------------------------------------------------------------------- report from reports


def test_report_recomputes_a_deployed_clients_epsilon_from_its_reported_history(tmp_path: Path) -> None:
    history = [(0.9, 0.05, 10), (0.9, 0.05, 10), (1.1, 0.1, 5)]
    metrics = {
        "partition-id": 12345,
        "client-name": "alice",
        "epsilon": 1.0,
        "ledger-noise": [h[0] for h in history],
        "ledger-rate": [h[1] for h in history],
        "ledger-steps": [h[2] for h in history],
    }
    (tmp_path / "config.json").write_text(
        json.dumps({"dp.enabled": True, "deployed": True, "num-clients": 3, "num-train": 100, "dp.delta": 1e-5})
    )
    (tmp_path / "privacy_plan.json").write_text(json.dumps({"delta": 1e-5, "noise_multiplier_used": 0.9}))
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"round": 0}) + "\n" + json.dumps({"round": 1, "per-client-train": {"77": metrics}}) + "\n"
    )
    report = build_report(privacy_records(tmp_path))
    [client] = report["clients"]  # deployed: only clients that trained, not range(num-clients)
    assert client["client_name"] == "alice"
    assert client["epsilon"] == pytest.approx(compute_epsilon(history, 1e-5, "rdp"), rel=1e-12)
    assert client["steps"] == 25 and client["rounds_taken_part_in"] == 3
    assert "reported by the client" in client["history_source"]
    assert client["runs"] is None  # the run ids stay on the client: not claimed as zero


def test_ec_key_helper_is_p384() -> None:
    assert isinstance(generate_node_key().curve, ec.SECP384R1)


class _SlowGrid:
    """Replies arrive over three pulls; counts pulls and keeps what was pushed."""

    def __init__(self, batches: list[list[str]]) -> None:
        self.batches = batches
        self.pulls = 0
        self.run_id = 7
        self.pushed: list[_Msg] = []

    def push_messages(self, messages: list[_Msg]) -> list[str]:
        self.pushed = list(messages)
        return [m.metadata.group_id for m in messages]

    def pull_messages(self, ids: set[str]) -> list[object]:
        self.pulls += 1
        got = self.batches.pop(0) if self.batches else []
        return [type("M", (), {"metadata": type("D", (), {"reply_to_message_id": i})()})() for i in got if i in ids]


class _Meta:
    def __init__(self, group_id: str) -> None:
        self.group_id, self.ttl = group_id, DEFAULT_TTL


class _Msg:
    """What PromptGrid touches of a message: its metadata (Flower's own need a running run)."""

    def __init__(self, group_id: str) -> None:
        self.metadata = _Meta(group_id)


def _messages(*ids: str) -> list[Message]:
    return [_Msg(i) for i in ids]  # type: ignore[misc]


def test_prompt_grid_collects_every_reply_quickly_and_delegates() -> None:
    from fedlora.server.app import PromptGrid

    grid = _SlowGrid([["a"], [], ["b", "c"]])
    prompt = PromptGrid(grid, poll=0.01)  # type: ignore[arg-type]
    replies = list(prompt.send_and_receive(_messages("a", "b", "c"), timeout=10))
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b", "c"]
    assert grid.pulls == 3
    assert prompt.run_id == 7  # everything else is the wrapped grid's
    late = _SlowGrid([])
    assert list(PromptGrid(late, poll=0.01).send_and_receive(_messages("x"), timeout=0.05)) == []  # type: ignore[arg-type]
    assert late.pulls >= 2


def test_round_messages_expire_with_the_round() -> None:
    """Flower's default lifetime is 12 h: a node back after the round's timeout would still train it."""
    from fedlora.server.app import PromptGrid

    messages = _messages("a", "b")
    assert messages[0].metadata.ttl == 43200  # Flower's default (12 h), what the fix is about
    grid = _SlowGrid([["a", "b"]])
    list(PromptGrid(grid, poll=0.01).send_and_receive(messages, timeout=37.5))  # type: ignore[arg-type]
    assert [m.metadata.ttl for m in grid.pushed] == [37.5, 37.5]


def test_the_guard_looks_up_each_connection_once_and_never_reuses_it_for_another() -> None:
    """uvicorn gives every request of a connection the same ``client`` tuple: one lookup per
    connection; a new connection from the same address and port (a new tuple) is looked up anew."""
    calls: list[object] = []
    owners = iter([1000, 65534])

    def owner_of(scope: Any) -> int:
        calls.append(scope["client"])
        return next(owners)

    guard = ControlGuard(_app(), operator_uid=1000, owner_of=owner_of)
    first = ("127.0.0.1", 40000)
    for _ in range(3):  # three requests on one keep-alive connection
        assert guard.refusal({"client": first}, "127.0.0.1") is None
    assert len(calls) == 1
    again = tuple(["127.0.0.1", 40000])  # equal, but another connection (another account's, now)
    assert again is not first
    assert "belongs to uid 65534" in str(guard.refusal({"client": again}, "127.0.0.1"))
    assert len(calls) == 2
