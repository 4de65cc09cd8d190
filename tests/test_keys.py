"""Keys and certificates: the CA, the SuperLink certificate, node keys in Flower's formats.

Flower's own loaders read the node keys; a real TLS handshake over loopback checks the
certificates; fingerprints are pinned to what ``ssh-keygen -lf`` printed for a fixed key.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import ipaddress
import os
import socket
import ssl
import stat
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlora.core.pki import (
    CertificateError,
    check_validity,
    create_ca,
    fingerprint,
    fingerprint_pem,
    generate_node_key,
    issue_server_certificate,
    issued_by,
    load_certificate,
    load_node_public_key,
    load_private_key_pem,
    openssh_public_line,
    write_atomic,
    write_certificate,
    write_node_keypair,
    write_private_key_pem,
)

UTC = datetime.UTC

#: ``ssh-keygen -lf`` (OpenSSH) on the public key of ``ec.derive_private_key(123456789, curve)``
GOLDEN_FINGERPRINTS = {
    "secp384r1": "SHA256:E+k/1XYY6iIqvN+VcNckHszMfdxQrKbHyxQvh78vM/A",
    "secp256r1": "SHA256:vzQOBZDci4gQywQpIQel2N3uveNiA0P5itO2mkU1e/s",
}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def build_certificate(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, start: datetime.datetime, end: datetime.datetime
) -> x509.Certificate:
    """A leaf certificate with an arbitrary validity window, built directly (the API refuses the past)."""
    key = ec.generate_private_key(ec.SECP384R1())
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .sign(ca_key, hashes.SHA384())
    )


def wire_blob(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """RFC 5656 ecdsa-sha2-nistp384 public key blob, built by hand (not by cryptography's encoder)."""

    def ssh_string(data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + data

    n = public_key.public_numbers()
    point = b"\x04" + n.x.to_bytes(48, "big") + n.y.to_bytes(48, "big")
    return ssh_string(b"ecdsa-sha2-nistp384") + ssh_string(b"nistp384") + ssh_string(point)


def sha256_fingerprint(blob: bytes) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


@pytest.fixture(scope="module")
def ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    return create_ca()


# ------------------------------------------------------------------------------ CA and server certificate


def test_ca_is_a_p384_signing_ca(ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]) -> None:
    key, cert = ca
    assert isinstance(key.curve, ec.SECP384R1)
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "fedlora federation CA"
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert (usage.key_cert_sign, usage.crl_sign, usage.digital_signature) == (True, True, False)
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == datetime.timedelta(days=3650, hours=1)
    assert issued_by(cert, cert)


def test_server_certificate_sans_include_loopback(ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]) -> None:
    hosts = ["Server.Example.org", "10.0.0.5", "2001:db8::1", "localhost", "10.0.0.5", " edge.example.org "]
    key, cert = issue_server_certificate(*ca, hosts)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["server.example.org", "localhost", "edge.example.org"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address(a) for a in ("10.0.0.5", "2001:db8::1", "127.0.0.1", "::1")
    ]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "server.example.org"
    assert cert.public_key() == key.public_key()
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca[1].extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    assert cert.issuer == ca[1].subject
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == datetime.timedelta(days=825, hours=1)


def test_server_certificate_never_outlives_its_ca() -> None:
    ca_key, ca_cert = create_ca(days=30)
    _, cert = issue_server_certificate(ca_key, ca_cert, ["server.example.org"], days=825)
    assert cert.not_valid_after_utc == ca_cert.not_valid_after_utc


def test_certificate_verifies_against_its_ca_only(ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]) -> None:
    _, cert = issue_server_certificate(*ca, ["server.example.org"])
    _, other_ca = create_ca()  # same subject name: only the signature tells them apart
    assert other_ca.subject == ca[1].subject
    assert issued_by(cert, ca[1])
    assert not issued_by(cert, other_ca)
    _, renamed_ca = create_ca("another federation")
    assert not issued_by(cert, renamed_ca)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "   ",
        "my host",
        "https://server.example.org",
        "server.example.org:9092",
        "0.0.0.0",  # a bind address, not one clients can dial
        "::",
        "-a.org",
        "a..b",
        "1.2.3",  # looks like an IP address
        "server/x",
        "a" * 64 + ".org",  # a label longer than 63
    ],
)
def test_server_certificate_rejects_bad_hosts(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], bad: str
) -> None:
    with pytest.raises(ValueError, match="host") as info:
        issue_server_certificate(*ca, ["server.example.org", bad])
    assert repr(bad) in str(info.value)


def test_server_certificate_needs_a_host(ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]) -> None:
    with pytest.raises(ValueError, match="at least one host"):
        issue_server_certificate(*ca, [])


@contextmanager
def tls_server(cert: Path, key: Path) -> Iterator[int]:
    """A one-connection-at-a-time TLS echo server on 127.0.0.1; yields its port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            conn, _ = listener.accept()
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(tls.recv(16))
            except (ssl.SSLError, OSError):
                pass  # the client refused our certificate

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        socket.create_connection(("127.0.0.1", listener.getsockname()[1])).close()  # wake accept()
        thread.join()
        listener.close()


def tls_echo(port: int, ca_file: Path, server_hostname: str) -> bytes:
    context = ssl.create_default_context(cafile=ca_file)
    context.verify_flags |= ssl.VERIFY_X509_STRICT  # Python 3.13's default: AKI, critical constraints
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        context.wrap_socket(raw, server_hostname=server_hostname) as tls,
    ):
        tls.sendall(b"ping")
        return tls.recv(16)


def test_tls_handshake_over_loopback(tmp_path: Path, ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]) -> None:
    key, cert = issue_server_certificate(*ca, ["server.example.org"])
    write_private_key_pem(tmp_path / "server.key", key)
    write_certificate(tmp_path / "server.pem", cert)
    write_certificate(tmp_path / "ca.pem", ca[1])
    write_certificate(tmp_path / "other-ca.pem", create_ca()[1])
    with tls_server(tmp_path / "server.pem", tmp_path / "server.key") as port:
        assert tls_echo(port, tmp_path / "ca.pem", "127.0.0.1") == b"ping"
        assert tls_echo(port, tmp_path / "ca.pem", "localhost") == b"ping"
        with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
            tls_echo(port, tmp_path / "other-ca.pem", "127.0.0.1")
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            tls_echo(port, tmp_path / "ca.pem", "elsewhere.example.org")


# ------------------------------------------------------------------------------ validity and loading


def test_expired_and_future_certificates_are_named(
    tmp_path: Path, ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]
) -> None:
    expired = build_certificate(
        *ca, datetime.datetime(2024, 1, 1, tzinfo=UTC), datetime.datetime(2025, 1, 1, tzinfo=UTC)
    )
    with pytest.raises(CertificateError, match=r"old\.pem: certificate expired on 2025-01-01 \(UTC\)"):
        check_validity(expired, tmp_path / "old.pem")
    check_validity(expired, "old.pem", now=datetime.datetime(2024, 6, 1, tzinfo=UTC))  # valid then
    future = build_certificate(
        *ca, datetime.datetime(2999, 1, 1, tzinfo=UTC), datetime.datetime(3000, 1, 1, tzinfo=UTC)
    )
    with pytest.raises(CertificateError, match=r"not valid before 2999-01-01 00:00 \(UTC\)"):
        check_validity(future, "future.pem")
    check_validity(ca[1], "ca.pem")


def test_load_certificate_round_trip_and_errors(
    tmp_path: Path, ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]
) -> None:
    write_certificate(tmp_path / "ca.pem", ca[1])
    assert load_certificate(tmp_path / "ca.pem") == ca[1]
    assert mode(tmp_path / "ca.pem") == 0o644
    with pytest.raises(CertificateError, match=r"missing\.pem: certificate file does not exist"):
        load_certificate(tmp_path / "missing.pem")
    (tmp_path / "junk.pem").write_text("hello\n")
    with pytest.raises(CertificateError, match=r"junk\.pem: not a PEM certificate"):
        load_certificate(tmp_path / "junk.pem")


def test_private_keys_are_0600_from_creation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:  # the temp file, at the moment it takes the key's name
        seen.append(mode(Path(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    path = tmp_path / "server.key"
    path.write_text("old, world-readable\n")
    path.chmod(0o644)
    key = ec.generate_private_key(ec.SECP384R1())
    with umask(0):
        write_private_key_pem(path, key)
    assert seen == [0o600]
    assert mode(path) == 0o600
    assert path.read_text().startswith("-----BEGIN PRIVATE KEY-----\n")  # PKCS8, unencrypted
    assert load_private_key_pem(path).private_numbers() == key.private_numbers()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server.key"]  # no temp file left


def test_write_atomic_leaves_old_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "server.toml"
    path.write_text("old\n")

    def fail(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, b"new\n")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server.toml"]


def test_load_private_key_pem_errors(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="does not exist"):
        load_private_key_pem(tmp_path / "none.key")
    write_certificate(tmp_path / "cert.pem", create_ca()[1])
    with pytest.raises(CertificateError, match="not an unencrypted PEM private key"):
        load_private_key_pem(tmp_path / "cert.pem")


# ------------------------------------------------------------------------------ node keys


def test_node_keypair_loads_with_flowers_own_loaders(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    private_path, public_path = write_node_keypair(tmp_path / "node", "alice@lab")
    assert (private_path, public_path) == (tmp_path / "node" / "client.key", tmp_path / "node" / "client.pub")
    assert mode(private_path) == 0o600
    assert private_path.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----\n")

    args = argparse.Namespace(auth_supernode_private_key=str(private_path), auth_supernode_public_key=None)
    loaded = _try_setup_client_authentication(args)  # what `flower-supernode --auth-supernode-private-key` does
    assert loaded is not None
    private_key, public_key = loaded
    assert isinstance(private_key.curve, ec.SECP384R1)

    pem = try_load_public_key(public_path)  # what `flwr supernode register client.pub` does
    assert pem == public_key_to_bytes(public_key)
    assert load_node_public_key(public_path) == public_key
    assert fingerprint_pem(pem) == fingerprint(public_key)

    kind, blob, comment = public_path.read_text().strip().split(" ")
    assert (kind, comment) == ("ecdsa-sha2-nistp384", "alice@lab")
    assert base64.b64decode(blob) == wire_blob(public_key)


def test_node_keypair_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "client.pub").write_text("someone else's key\n")
    with pytest.raises(FileExistsError, match=r"client\.pub already exists"):
        write_node_keypair(tmp_path, "bob")
    assert not (tmp_path / "client.key").exists()
    assert (tmp_path / "client.pub").read_text() == "someone else's key\n"
    with pytest.raises(ValueError, match="one line"):
        write_node_keypair(tmp_path / "fresh", "two\nlines")
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize("curve", [ec.SECP384R1(), ec.SECP256R1()])
def test_fingerprint_matches_ssh_keygen(curve: ec.EllipticCurve) -> None:
    public_key = ec.derive_private_key(123456789, curve).public_key()
    assert fingerprint(public_key) == GOLDEN_FINGERPRINTS[curve.name]


def test_fingerprint_equals_independent_computation(tmp_path: Path) -> None:
    _, public_path = write_node_keypair(tmp_path, "carol")
    public_key = load_node_public_key(public_path)
    blob = base64.b64decode(public_path.read_text().split()[1])
    assert fingerprint(public_key) == sha256_fingerprint(blob) == sha256_fingerprint(wire_blob(public_key))
    assert fingerprint(load_node_public_key(public_path)) == fingerprint(public_key)  # stable across reloads
    assert len(fingerprint(public_key)) == len("SHA256:") + 43  # 32 bytes, unpadded base64
    other = generate_node_key().public_key()
    assert fingerprint(other) != fingerprint(public_key)


def test_fingerprint_pem_refuses_non_ec_and_garbage() -> None:
    rsa_pem = (
        rsa.generate_private_key(65537, 2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ValueError, match="not an EC public key"):
        fingerprint_pem(rsa_pem)
    with pytest.raises(ValueError, match="not a PEM public key"):
        fingerprint_pem(b"nonsense")


def ssh_public(key: object) -> bytes:
    assert isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey)
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def test_load_node_public_key_explains_each_mistake(tmp_path: Path) -> None:
    private_path, public_path = write_node_keypair(tmp_path, "dave")
    pkcs8 = tmp_path / "pkcs8.key"
    write_private_key_pem(pkcs8, generate_node_key())
    cases = {
        "rsa.pub": (ssh_public(rsa.generate_private_key(65537, 2048)), "key type 'ssh-rsa' is not EC.*P-384 expected"),
        "ed.pub": (ssh_public(ed25519.Ed25519PrivateKey.generate()), "key type 'ssh-ed25519' is not EC"),
        "secp256k1.pub": (b"ecdsa-sha2-secp256k1 AAAAE2VjZHNh x\n", "not a readable .*'ecdsa-sha2-secp256k1'.*P-384"),
        "junk.pub": (b"hello world\n", "not a readable OpenSSH public key"),
        "empty.pub": (b"\n# only a comment\n", "found no key"),
        "two.pub": (public_path.read_bytes() * 2, "found 2 lines"),
        "spki.pem": (
            generate_node_key()
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
            "a PEM file",
        ),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=message) as info:
            load_node_public_key(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)
    for private in (private_path, pkcs8):
        with pytest.raises(ValueError, match=r"this is a private key; enroll the \.pub file"):
            load_node_public_key(private)
    with pytest.raises(FileNotFoundError, match=r"nope\.pub"):
        load_node_public_key(tmp_path / "nope.pub")


def test_openssh_public_line_without_comment() -> None:
    public_key = ec.derive_private_key(123456789, ec.SECP384R1()).public_key()
    line = openssh_public_line(public_key)
    assert line.split(" ")[0] == "ecdsa-sha2-nistp384" and len(line.split(" ")) == 2
    assert openssh_public_line(public_key, "  node-1 ") == line + " node-1"


def test_the_key_and_enrolment_commands_never_import_torch() -> None:
    """``fl-client keygen`` and ``fl-server init|enroll|revoke`` read and write keys: their modules
    import neither torch nor Opacus (through the privacy policy's accounting, they once took 4.5 s)."""
    import subprocess
    import sys

    code = "import sys, fedlora.client.cli, fedlora.server.cli; "
    code += "print(sorted({'torch', 'opacus', 'transformers', 'peft'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
