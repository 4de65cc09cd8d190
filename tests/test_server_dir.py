"""The server directory: ``init`` (CA, certificate, server.toml), settings validation, node enrollment."""

from __future__ import annotations

import datetime
import ipaddress
import json
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from fedlora.core.config import FederationConfig
from fedlora.core.pki import (
    CertificateError,
    create_ca,
    fingerprint,
    issue_server_certificate,
    issued_by,
    load_certificate,
    load_node_public_key,
    load_private_key_pem,
    write_certificate,
    write_node_keypair,
    write_private_key_pem,
)
from fedlora.server.server_dir import (
    DEFAULT_DEPLOY_RUN_CONFIG,
    ServerDir,
    ServerSettings,
    SuperlinkSettings,
    load_settings,
)

HOSTS = ["server.example.org", "10.0.0.5"]

SETTINGS = """\
[superlink]
host = "0.0.0.0"
port = 9092
names = ["server.example.org"]
expose-control = false
[run]
strategy = "ffa-lora"
num-rounds = 2
"""


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def node_key(tmp_path: Path, name: str) -> Path:
    """A node's ``client.pub``, as ``fl-client keygen`` writes it."""
    return write_node_keypair(tmp_path / "nodes-home" / name, f"{name}@lab")[1]


@pytest.fixture(scope="module")
def server_dir(tmp_path_factory: pytest.TempPathFactory) -> ServerDir:
    """One initialised directory for the read-only tests (key generation is the slow part)."""
    return ServerDir.init(tmp_path_factory.mktemp("server"), HOSTS)


# ------------------------------------------------------------------------------ init


def test_default_deploy_run_config_is_valid_and_small() -> None:
    config = FederationConfig.from_run_config(DEFAULT_DEPLOY_RUN_CONFIG)
    assert (config.strategy, config.num_rounds, config.num_clients, config.min_replies) == ("ffa-lora", 5, 3, 2)
    assert (config.local_steps, config.num_train, config.round_timeout) == (20, 500, 300.0)
    assert (config.dp.enabled, config.dp.target_epsilon, config.server_eval) == (True, 8.0, True)
    assert config.task_list == ["adddigit-4", "rotate-2", "repeat-3"]
    assert len(DEFAULT_DEPLOY_RUN_CONFIG) == 13


def test_init_writes_the_layout(server_dir: ServerDir) -> None:
    root = server_dir.root
    assert sorted(p.name for p in root.iterdir()) == [
        "ca.key",
        "ca.pem",
        "nodes",
        "runs",
        "server.key",
        "server.pem",
        "server.toml",
    ]
    assert (mode(server_dir.ca_key_path), mode(server_dir.server_key_path)) == (0o600, 0o600)
    ca_cert = load_certificate(server_dir.ca_cert_path)
    server_cert = load_certificate(server_dir.server_cert_path)
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert issued_by(server_cert, ca_cert)
    assert load_private_key_pem(server_dir.server_key_path).public_key() == server_cert.public_key()
    sans = server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["server.example.org", "localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address(a) for a in ("10.0.0.5", "127.0.0.1", "::1")
    ]
    server_dir.check_certificates()


def test_init_settings_round_trip(server_dir: ServerDir) -> None:
    settings = server_dir.settings()
    assert settings.superlink == SuperlinkSettings(host="0.0.0.0", port=9092, names=tuple(HOSTS), expose_control=False)
    assert settings.run == DEFAULT_DEPLOY_RUN_CONFIG
    assert list(settings.run) == list(DEFAULT_DEPLOY_RUN_CONFIG)  # written in this order
    text = server_dir.settings_path.read_text()
    assert '"dp.enabled" = true\n' in text
    assert (
        "# The Flower run config of the federated run: every key of `fl-sim --print-run-config` is accepted.\n[run]\n"
        in text
    )


def test_init_with_overrides_and_options(tmp_path: Path) -> None:
    overrides = {"dp": {"enabled": False}, "num-rounds": 8, "lora-rank": 4, "dp.target-epsilon": 3}
    server_dir = ServerDir.init(tmp_path / "srv", ["10.1.2.3"], port=10443, host="127.0.0.1", run_overrides=overrides)
    settings = server_dir.settings()
    assert (settings.superlink.host, settings.superlink.port, settings.superlink.names) == (
        "127.0.0.1",
        10443,
        ("10.1.2.3",),
    )
    assert settings.run == DEFAULT_DEPLOY_RUN_CONFIG | {
        "dp.enabled": False,
        "num-rounds": 8,
        "lora-rank": 4,
        "dp.target-epsilon": 3,
    }
    config = settings.federation_config()
    assert (config.dp.enabled, config.num_rounds, config.lora.rank, config.dp.target_epsilon) == (False, 8, 4, 3.0)


def test_init_refuses_an_existing_directory_unless_forced(tmp_path: Path) -> None:
    server_dir = ServerDir.init(tmp_path / "srv", HOSTS)
    ca_before = server_dir.ca_cert_path.read_bytes()
    toml_before = server_dir.settings_path.read_bytes()
    server_dir.enroll(node_key(tmp_path, "alice"), "alice")
    with pytest.raises(FileExistsError, match=r"already a server directory .*every client would need the new ca\.pem"):
        ServerDir.init(tmp_path / "srv", ["other.example.org"])
    assert server_dir.ca_cert_path.read_bytes() == ca_before
    assert server_dir.settings_path.read_bytes() == toml_before

    ServerDir.init(tmp_path / "srv", ["other.example.org"], force=True)
    assert server_dir.ca_cert_path.read_bytes() != ca_before
    assert server_dir.settings().superlink.names == ("other.example.org",)
    assert [e.name for e in server_dir.enrolled()] == ["alice"]  # node keys are not signed by the CA: kept
    server_dir.check_certificates()


def test_init_refuses_a_lone_ca_key(tmp_path: Path) -> None:
    (tmp_path / "ca.key").write_text("a CA key from elsewhere\n")
    with pytest.raises(FileExistsError, match=r"ca\.key"):
        ServerDir.init(tmp_path, HOSTS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.key"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"run_overrides": {"num-roundz": 3}}, r"unknown key\(s\) \['num-roundz'\]"),
        ({"run_overrides": {"dp": {"enabeld": True}}}, r"\['dp.enabeld'\]"),
        ({"run_overrides": {"num-rounds": 0}}, "num-rounds must be an integer >= 1"),
        ({"run_overrides": {"strategy": "fedprox"}}, "fedprox"),
        ({"port": 0}, "port must be an integer in 1..65535"),
        ({"port": 70000}, "port must be an integer in 1..65535"),
        ({"host": "not a host"}, "superlink host 'not a host'"),
        ({"hosts": ["ok.example.org", "https://bad"]}, "'https://bad'"),
        ({"hosts": []}, "at least one name"),
        ({"days": 0}, "days must be >= 1"),
    ],
)
def test_init_writes_nothing_on_bad_input(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"hosts": HOSTS} | kwargs
    with pytest.raises(ValueError, match=message):
        ServerDir.init(tmp_path / "srv", **args)
    assert not (tmp_path / "srv").exists()


# ------------------------------------------------------------------------------ settings


def write_settings(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(text)
    return path


def test_load_settings_reads_both_dotted_key_forms(tmp_path: Path) -> None:
    nested = load_settings(write_settings(tmp_path, SETTINGS + "dp.enabled = true\ndp.plan-examples = 90\n"))
    quoted = load_settings(write_settings(tmp_path, SETTINGS + '"dp.enabled" = true\n"dp.plan-examples" = 90\n'))
    table = load_settings(write_settings(tmp_path, SETTINGS + "[run.dp]\nenabled = true\nplan-examples = 90\n"))
    expected = {"strategy": "ffa-lora", "num-rounds": 2, "dp.enabled": True, "dp.plan-examples": 90}
    assert nested.run == quoted.run == table.run == expected
    assert nested.superlink == SuperlinkSettings(names=("server.example.org",))


def test_load_settings_defaults_for_optional_keys(tmp_path: Path) -> None:
    settings = load_settings(write_settings(tmp_path, '[superlink]\nnames = ["10.0.0.5"]\n'))
    assert settings == ServerSettings(SuperlinkSettings("0.0.0.0", 9092, ("10.0.0.5",), False), {})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (SETTINGS + "[superlinks]\nport = 1\n", r"unknown \['superlinks'\]; allowed: \['run', 'superlink'\]"),
        ("port = 9092\n" + SETTINGS, r"unknown \['port'\]"),
        (
            SETTINGS.replace("port = 9092", "port = 9092\nbind = '::'"),
            r"\[superlink\] key\(s\): unknown \['bind'\]; allowed: \['expose-control', 'host', 'names', 'port'\]",
        ),
        (SETTINGS + "num-roundz = 3\n", r"unknown key\(s\) \['num-roundz'\]; allowed: \[.*'num-rounds'"),
        (SETTINGS + "dp.enabeld = true\n", r"unknown key\(s\) \['dp.enabeld'\]"),
        (SETTINGS + "num-rounds = 3\n", "not valid TOML"),
        (SETTINGS.replace("port = 9092", 'port = "9092"'), "port must be an integer in 1..65535, got '9092'"),
        (SETTINGS.replace("expose-control = false", "expose-control = 1"), "expose-control must be true or false"),
        (SETTINGS.replace('names = ["server.example.org"]', 'names = "x.org"'), "names must be a list of strings"),
        (SETTINGS.replace('names = ["server.example.org"]', "names = []"), "at least one name"),
        (SETTINGS.replace('"ffa-lora"', "true"), "strategy must be a str"),
        (SETTINGS + "tasks = ['a']\n", "needs to be of type"),
        (
            'run = "x"\n' + SETTINGS.replace("[run]\n", "").replace('strategy = "ffa-lora"\nnum-rounds = 2\n', ""),
            r"\[run\] table",
        ),
        ("[run]\nnum-rounds = 2\n", r"no \[superlink\] table"),
    ],
)
def test_load_settings_refuses_bad_files_naming_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = write_settings(tmp_path, text)
    with pytest.raises(ValueError, match=message) as info:
        load_settings(path)
    assert str(info.value).startswith(f"{path}: ")


def test_settings_of_a_directory_that_is_not_one(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a fedlora server directory: run fl-server init DIR first"):
        ServerDir(tmp_path).settings()


# ------------------------------------------------------------------------------ certificates


def test_check_certificates_catches_each_problem(tmp_path: Path) -> None:
    server_dir = ServerDir.init(tmp_path / "srv", HOSTS)
    server_dir.check_certificates()
    ca_key = load_private_key_pem(server_dir.ca_key_path)
    ca_cert = load_certificate(server_dir.ca_cert_path)
    good_pem, good_key = server_dir.server_cert_path.read_bytes(), server_dir.server_key_path.read_bytes()

    def restore() -> None:
        server_dir.server_cert_path.write_bytes(good_pem)
        server_dir.server_key_path.write_bytes(good_key)
        server_dir.server_key_path.chmod(0o600)
        server_dir.check_certificates()

    with pytest.raises(CertificateError, match=r"server\.pem: certificate expired on"):
        server_dir.check_certificates(now=datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=826))

    other_key, other_cert = issue_server_certificate(*create_ca(), HOSTS)
    write_certificate(server_dir.server_cert_path, other_cert)
    write_private_key_pem(server_dir.server_key_path, other_key)
    with pytest.raises(CertificateError, match=r"server\.pem was not issued by .*ca\.pem"):
        server_dir.check_certificates()
    restore()

    write_private_key_pem(server_dir.server_key_path, ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(CertificateError, match=r"server\.key does not belong to the certificate in .*server\.pem"):
        server_dir.check_certificates()
    restore()

    server_dir.server_key_path.chmod(0o644)
    with pytest.raises(CertificateError, match=r"server\.key: readable by others \(mode 644\); chmod 600 it"):
        server_dir.check_certificates()
    restore()

    narrow_key, narrow_cert = issue_server_certificate(ca_key, ca_cert, ["server.example.org"])
    write_certificate(server_dir.server_cert_path, narrow_cert)
    write_private_key_pem(server_dir.server_key_path, narrow_key)
    with pytest.raises(CertificateError, match=r"names \['10\.0\.0\.5'\] but .*server\.pem is valid only for"):
        server_dir.check_certificates()
    restore()

    key = ec.generate_private_key(ec.SECP384R1())
    past = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    expired = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "server.example.org")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(past)
        .not_valid_after(past + datetime.timedelta(days=365))
        .sign(ca_key, hashes.SHA384())
    )
    write_certificate(server_dir.server_cert_path, expired)
    write_private_key_pem(server_dir.server_key_path, key)
    with pytest.raises(CertificateError, match=r"server\.pem: certificate expired on 2024-12-31 \(UTC\)"):
        server_dir.check_certificates()


# ------------------------------------------------------------------------------ nodes


def test_enroll_copies_one_normalised_line_flower_accepts(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    server_dir = ServerDir(tmp_path / "srv")
    pub = node_key(tmp_path, "alice")
    pub.write_text("# alice's node\n\n" + pub.read_text() + "\n")  # comments and blank lines are dropped
    public_key = load_node_public_key(pub)
    enrollment = server_dir.enroll(pub, "alice")
    assert (enrollment.name, enrollment.fingerprint) == ("alice", fingerprint(public_key))
    assert enrollment.path == server_dir.nodes_dir / "alice.pub"
    blob = pub.read_text().split("\n")[2].split(" ")[1]
    assert enrollment.path.read_text() == f"ecdsa-sha2-nistp384 {blob} alice\n"
    assert try_load_public_key(enrollment.path) == public_key_to_bytes(public_key)
    index = json.loads(server_dir.index_path.read_text())
    assert list(index) == ["alice"]
    assert index["alice"]["fingerprint"] == enrollment.fingerprint
    enrolled_at = datetime.datetime.fromisoformat(index["alice"]["enrolled"])
    assert abs(datetime.datetime.now(datetime.UTC) - enrolled_at) < datetime.timedelta(minutes=1)
    assert server_dir.enrolled() == [enrollment]


def test_enroll_refuses_duplicates(tmp_path: Path) -> None:
    server_dir = ServerDir(tmp_path / "srv")
    alice, bob = node_key(tmp_path, "alice"), node_key(tmp_path, "bob")
    first = server_dir.enroll(alice, "alice")
    with pytest.raises(ValueError, match=r"a node named 'alice' is already enrolled \(SHA256:.*\); revoke it first"):
        server_dir.enroll(bob, "alice")
    with pytest.raises(ValueError, match=r"is already enrolled as 'alice'; it cannot also be 'alice-2'"):
        server_dir.enroll(alice, "alice-2")
    assert server_dir.enrolled() == [first]
    assert sorted(p.name for p in server_dir.nodes_dir.glob("*.pub")) == ["alice.pub"]


def test_enroll_refuses_private_and_non_ec_keys(tmp_path: Path) -> None:
    server_dir = ServerDir(tmp_path / "srv")
    pub = node_key(tmp_path, "alice")
    with pytest.raises(ValueError, match=r"this is a private key; enroll the \.pub file"):
        server_dir.enroll(pub.with_name("client.key"), "alice")
    rsa_pub = tmp_path / "rsa.pub"
    rsa_pub.write_bytes(
        rsa.generate_private_key(65537, 2048)
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    with pytest.raises(ValueError, match=r"rsa\.pub: key type 'ssh-rsa' is not EC.*P-384 expected"):
        server_dir.enroll(rsa_pub, "alice")
    assert server_dir.enrolled() == []


@pytest.mark.parametrize("bad", ["", "-alice", ".hidden", "al ice", "a/b", "../x", "a" * 64, "ünï", "index.json\n"])
def test_enroll_refuses_bad_names(tmp_path: Path, bad: str) -> None:
    server_dir = ServerDir(tmp_path / "srv")
    with pytest.raises(ValueError, match=r"node name .* is not allowed") as info:
        server_dir.enroll(node_key(tmp_path, "n"), bad)
    assert repr(bad) in str(info.value)
    assert not server_dir.nodes_dir.exists()


def test_enroll_accepts_the_longest_name(tmp_path: Path) -> None:
    name = "N0_." + "a" * 59
    assert len(name) == 63
    assert ServerDir(tmp_path).enroll(node_key(tmp_path, "n"), name).path.name == f"{name}.pub"


def test_enrolled_is_sorted_ignores_strays_and_reports_missing_files(tmp_path: Path) -> None:
    server_dir = ServerDir(tmp_path / "srv")
    for name in ("carol", "alice", "bob"):
        server_dir.enroll(node_key(tmp_path, name), name)
    (server_dir.nodes_dir / "stray.pub").write_text(node_key(tmp_path, "stray").read_text())
    assert [e.name for e in server_dir.enrolled()] == ["alice", "bob", "carol"]

    (server_dir.nodes_dir / "bob.pub").write_text(node_key(tmp_path, "mallory").read_text())
    with pytest.raises(ValueError, match=r"bob\.pub holds key SHA256:.* but .*index\.json enrolled SHA256:"):
        server_dir.enrolled()
    (server_dir.nodes_dir / "bob.pub").unlink()
    with pytest.raises(ValueError, match=r"node 'bob' is enrolled but .*bob\.pub is missing; revoke 'bob'"):
        server_dir.enrolled()


def test_revoke_removes_key_and_entry(tmp_path: Path) -> None:
    server_dir = ServerDir(tmp_path / "srv")
    alice_pub = node_key(tmp_path, "alice")
    alice = server_dir.enroll(alice_pub, "alice")
    bob = server_dir.enroll(node_key(tmp_path, "bob"), "bob")
    assert server_dir.revoke("alice") == alice
    assert not alice.path.exists()
    assert server_dir.enrolled() == [bob]
    assert list(json.loads(server_dir.index_path.read_text())) == ["bob"]
    with pytest.raises(ValueError, match=r"no node named 'alice' is enrolled; enrolled: \['bob'\]"):
        server_dir.revoke("alice")
    again = server_dir.enroll(alice_pub, "alice-new")  # the key may come back under a new name
    assert again.fingerprint == alice.fingerprint
    assert [e.name for e in server_dir.enrolled()] == ["alice-new", "bob"]


@pytest.mark.parametrize(
    ("bind", "reason"),
    [("::", "IPv6-only"), ("::1", "IPv6-only"), ("10.1.2.3", "leaves out 127.0.0.1")],
)
def test_init_refuses_a_bind_address_fl_server_start_could_not_reach(tmp_path: Path, bind: str, reason: str) -> None:
    """Before, ``--bind ::`` was accepted and ``fl-server start`` then failed (an IPv6-only listener)."""
    with pytest.raises(ValueError, match=reason):
        ServerDir.init(tmp_path / "srv", ["10.1.2.3"], host=bind)
    assert not (tmp_path / "srv").exists()  # nothing half-made
    for good in ("0.0.0.0", "127.0.0.1", "localhost"):
        ServerDir.init(tmp_path / good, ["10.1.2.3"], host=good)


def test_fl_server_revoke_says_when_the_key_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without a run in progress the key is refused from the next start; a stale marker of a
    server that died does not count as one."""
    from fedlora.server.cli import main as server_main

    server_dir = ServerDir(tmp_path / "srv")
    server_dir.enroll(node_key(tmp_path, "alice"), "alice")
    server_dir.enroll(node_key(tmp_path, "bob"), "bob")
    assert server_main(["revoke", str(server_dir.root), "alice"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "revoked alice" in out and "refused from the next `fl-server start`" in out and "no run in progress" in out
    assert server_main(["revoke", str(server_dir.root), "alice"]) == 2
    assert "no node named 'alice'" in capsys.readouterr().err
    with server_dir.running(tmp_path / "run"):
        assert stat.S_IMODE(server_dir.running_path.stat().st_mode) == 0o600
        assert server_dir.running_run_dir() == (tmp_path / "run").resolve()
        with pytest.raises(ValueError, match="is already serving a run"), server_dir.running(tmp_path / "other"):
            pass  # a second start on this directory: refused, and the first one's marker stays
        assert server_dir.running_run_dir() == (tmp_path / "run").resolve()
        (tmp_path / "run" / "deploy").mkdir(parents=True)
        (tmp_path / "run" / "deploy" / "nodes.json").write_text('{"alice": 7}')
        assert server_main(["revoke", str(server_dir.root), "bob"]) == 0  # that run registered no bob
        assert "never registered bob" in capsys.readouterr().out
    assert not server_dir.running_path.exists() and server_dir.running_run_dir() is None
    server_dir.running_path.write_text('{"pid": 999999999, "run-dir": "/nowhere"}')  # its server died
    assert server_dir.running_run_dir() is None
