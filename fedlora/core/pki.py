"""Keys and certificates of a real deployment: the federation's CA, the SuperLink's TLS
certificate, and the SuperNodes' authentication keys.

Two kinds of key, two formats, both what Flower 1.41 reads:

* TLS (``ca.pem``, ``server.pem``, ``server.key``): X.509 certificates and PKCS8 PEM keys, EC
  P-384, given to the SuperLink as ``--ssl-*`` files and to the SuperNodes as ``--root-certificates``.
* Node authentication (``client.key``, ``client.pub``): an OpenSSH-format EC key pair; the
  SuperNode loads the private key with ``load_ssh_private_key`` and ``flwr supernode register``
  loads the public key with ``load_ssh_public_key`` (NIST curves only).

Pure functions over ``cryptography``; imports no other package of ours.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlora.atomic import write_atomic

#: names and addresses every server certificate carries: the server's own processes dial loopback
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")

#: curves Flower accepts for node keys (``flwr.supercore.primitives.asymmetric.uses_nist_ec_curve``)
NIST_CURVES = (ec.SECP192R1, ec.SECP224R1, ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)

#: certificates start this much in the past, so a peer whose clock is a little behind accepts them
_BACKDATE = datetime.timedelta(hours=1)

#: a SuperNode's name (enrolment, reports, node config): what fits a file name and a key comment
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")


class CertificateError(ValueError):
    """A certificate or TLS key file is missing, unreadable, expired or not issued by the CA."""


# ------------------------------------------------------------------------------ files


def write_private_key_pem(path: str | Path, key: ec.EllipticCurvePrivateKey) -> None:
    """PKCS8 PEM, unencrypted (the SuperLink reads it unattended), mode 0600."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_atomic(path, pem, mode=0o600)


def write_certificate(path: str | Path, cert: x509.Certificate) -> None:
    """PEM; certificates are public, so mode 0644."""
    write_atomic(path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _read(path: Path, what: str) -> bytes:
    """The bytes of a certificate or key file; a missing or unreadable file names itself."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertificateError(f"{path}: {what} file does not exist") from None
    except OSError as err:
        raise CertificateError(f"{path}: cannot read the {what} ({err.strerror})") from None


def load_certificate(path: str | Path) -> x509.Certificate:
    """The first PEM certificate in ``path``."""
    path = Path(path)
    data = _read(path, "certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise CertificateError(f"{path}: not a PEM certificate (no valid BEGIN CERTIFICATE block)") from None


def load_private_key_pem(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """An unencrypted PEM EC private key (``ca.key``, ``server.key``)."""
    path = Path(path)
    data = _read(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CertificateError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{path}: a {type(key).__name__}, not an EC private key")
    return key


# ------------------------------------------------------------------------------ certificates


def san_for_host(host: str) -> x509.GeneralName:
    """The SubjectAlternativeName entry for a name or address clients dial.

    Raises ``ValueError`` naming the value when it is neither an IP address nor a DNS name,
    or is a bind-only address such as 0.0.0.0.
    """
    value = host.strip() if isinstance(host, str) else host
    if not isinstance(value, str) or not value:
        raise ValueError(f"host name {host!r} is empty")
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        if address.is_unspecified:
            raise ValueError(f"host {host!r} is a bind address, not one clients can dial; give the server's name or IP")
        return x509.IPAddress(address)
    if len(value) > 253 or not _DNS_NAME.fullmatch(value):
        raise ValueError(
            f"host {host!r} is neither an IP address nor a DNS name (give the bare name, without scheme, port or path)"
        )
    if value.rsplit(".", 1)[-1].isdigit():
        raise ValueError(f"host {host!r} looks like an IP address but is not a valid one")
    return x509.DNSName(value.lower())


def is_host(value: str) -> bool:
    """True for an IP address (including bind-only ones like 0.0.0.0) or a DNS name."""
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        pass
    try:
        san_for_host(value)
        return True
    except ValueError:
        return False


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def create_ca(
    common_name: str = "fedlora federation CA", days: int = 3650
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA (EC P-384) that signs the SuperLink's certificate; clients trust only it."""
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.UTC)
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def issue_server_certificate(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: Sequence[str], days: int = 825
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's TLS key and certificate, valid for ``hosts`` plus the loopback names.

    825 days is the longest validity TLS clients commonly accept; it is cut to the CA's own end.
    """
    if isinstance(hosts, str):
        raise TypeError("hosts must be a sequence of names, not one string")
    if not hosts:
        raise ValueError("at least one host name or address is needed (what the clients dial)")
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    sans: list[x509.GeneralName] = []
    for host in [*hosts, *LOOPBACK_HOSTS]:
        san = san_for_host(host)
        if san not in sans:
            sans.append(san)
    first = str(sans[0].value)
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.UTC)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(first if len(first) <= 64 else "fedlora superlink"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


class OwnCaFiles:
    """Where a directory that serves TLS with a CA of its own (``fl-server init``, ``fl-hub
    init``) keeps that CA: clients are given ``ca.pem``; ``ca.key`` (0600) never leaves."""

    root: Path

    @property
    def ca_cert_path(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key_path(self) -> Path:
        return self.root / "ca.key"


def write_own_tls(
    ca_key_path: Path,
    ca_cert_path: Path,
    key_path: Path,
    cert_path: Path,
    hosts: Sequence[str],
    days: int = 825,
    ca_name: str = "fedlora federation CA",
) -> None:
    """A CA of one's own and a server certificate it issued for ``hosts`` (+ loopback), written
    as PEM files (keys 0600): what ``fl-server init`` and ``fl-hub init`` serve TLS with."""
    ca_key, ca_cert = create_ca(ca_name)
    server_key, server_cert = issue_server_certificate(ca_key, ca_cert, hosts, days=days)
    write_private_key_pem(ca_key_path, ca_key)
    write_certificate(ca_cert_path, ca_cert)
    write_private_key_pem(key_path, server_key)
    write_certificate(cert_path, server_cert)


def check_validity(cert: x509.Certificate, path: str | Path, now: datetime.datetime | None = None) -> None:
    """Raise :class:`CertificateError` unless ``cert`` is valid at ``now`` (default: now, UTC)."""
    now = now or datetime.datetime.now(datetime.UTC)
    if now > cert.not_valid_after_utc:
        raise CertificateError(f"{path}: certificate expired on {cert.not_valid_after_utc:%Y-%m-%d} (UTC)")
    if now < cert.not_valid_before_utc:
        raise CertificateError(
            f"{path}: certificate not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} (UTC); "
            "check this machine's clock"
        )


def issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """True when ``ca_cert`` signed ``cert`` (issuer name and signature both checked)."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def sans_of(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for, as strings."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(name.value) for name in ext if isinstance(name, x509.DNSName | x509.IPAddress)]


# ------------------------------------------------------------------------------ node keys


def generate_node_key() -> ec.EllipticCurvePrivateKey:
    """A SuperNode's authentication key: P-384, as ``flwr`` itself generates them."""
    return ec.generate_private_key(ec.SECP384R1())


def openssh_public_line(public_key: ec.EllipticCurvePublicKey, comment: str = "") -> str:
    """``ecdsa-sha2-nistp384 AAAA... comment``, the one line of a ``.pub`` file."""
    if "\n" in comment or "\r" in comment:
        raise ValueError(f"a key comment must be one line, got {comment!r}")
    line = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return f"{line} {comment.strip()}" if comment.strip() else line


def write_node_keypair(directory: Path, comment: str) -> tuple[Path, Path]:
    """Write ``client.key`` (OpenSSH private key, 0600) and ``client.pub`` in ``directory``.

    Refuses to replace either file: a node's key is its identity, and the server knows it by
    the public half. Returns (private key path, public key path).
    """
    directory = Path(directory)
    private_path, public_path = directory / "client.key", directory / "client.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise FileExistsError(f"{path} already exists; a node key is its identity, so it is never overwritten")
    key = generate_node_key()
    public_line = openssh_public_line(key.public_key(), comment)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    private_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    write_atomic(private_path, private_bytes, mode=0o600)
    write_atomic(public_path, (public_line + "\n").encode(), mode=0o644)
    return private_path, public_path


def _check_node_key(public_key: object, path: Path, key_type: str) -> ec.EllipticCurvePublicKey:
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise ValueError(
            f"{path}: key type {key_type!r} is not EC; Flower node keys are EC, P-384 expected "
            "(fl-client keygen makes one)"
        )
    if not isinstance(public_key.curve, NIST_CURVES):
        raise ValueError(f"{path}: EC curve {public_key.curve.name} is not a NIST curve; P-384 expected")
    return public_key


def load_node_public_key(path: str | Path) -> ec.EllipticCurvePublicKey:
    """A SuperNode's public key from an OpenSSH ``.pub`` file, checked as Flower checks it
    (EC on a NIST curve), with a message that names the file and the problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: public key file does not exist") from None
    if "PRIVATE KEY-----" in text:
        raise ValueError(f"{path}: this is a private key; enroll the .pub file (keep the private key on the node)")
    if "-----BEGIN" in text:
        raise ValueError(f"{path}: a PEM file; node public keys are OpenSSH lines ('ecdsa-sha2-nistp384 AAAA...')")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if len(lines) != 1:
        found = "no key" if not lines else f"{len(lines)} lines"
        raise ValueError(f"{path}: expected one OpenSSH public key line, found {found}")
    key_type = lines[0].split()[0]
    try:
        with warnings.catch_warnings():  # cryptography deprecates DSA keys; they are refused below anyway
            warnings.simplefilter("ignore")
            public_key = serialization.load_ssh_public_key(lines[0].encode())
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError(
            f"{path}: not a readable OpenSSH public key (type {key_type!r}); P-384 expected "
            "('ecdsa-sha2-nistp384 AAAA...', as fl-client keygen writes)"
        ) from None
    return _check_node_key(public_key, path, key_type)


def fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """``SHA256:...``: what ``ssh-keygen -lf`` prints (sha256 of the OpenSSH wire blob, base64 unpadded)."""
    line = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    digest = hashlib.sha256(base64.b64decode(line.split()[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def fingerprint_pem(pem: bytes) -> str:
    """The fingerprint of a PEM SubjectPublicKeyInfo: how Flower carries node keys
    (``public_key_to_bytes``; base64 of it in the ``flwr-public-key`` HTTP header)."""
    try:
        public_key = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError("not a PEM public key") from None
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise ValueError(f"a {type(public_key).__name__}, not an EC public key")
    return fingerprint(public_key)
