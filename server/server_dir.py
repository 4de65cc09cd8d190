"""The server directory: what an operator creates once with ``fl-server init`` and starts from.

SERVER_DIR/
  ca.pem, ca.key (0600)          the federation's CA (clients get ca.pem)
  server.pem, server.key (0600)  the SuperLink's certificate; SANs are the [superlink] names
  server.toml                    deployment settings ([superlink]) + the run config ([run])
  nodes/<name>.pub               enrolled SuperNode public keys (OpenSSH format)
  nodes/index.json               {name: {"fingerprint": ..., "enrolled": ISO time}}
  runs/                          run directories

Everything is validated before anything is written or started: a bad host, port or run-config
key fails ``init`` with nothing on disk, and fails ``settings()`` before a process is spawned.
"""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import json
import os
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w  # a dependency of flwr itself

if TYPE_CHECKING:
    from fedlora.core.config import FederationConfig

from fedlora.atomic import write_json_atomic
from fedlora.core.pki import (
    NODE_NAME,
    CertificateError,
    OwnCaFiles,
    check_validity,
    fingerprint,
    is_host,
    issued_by,
    load_certificate,
    load_node_public_key,
    load_private_key_pem,
    openssh_public_line,
    san_for_host,
    sans_of,
    write_atomic,
    write_own_tls,
)

RunConfigValue = bool | int | float | str

#: the run config ``fl-server init`` writes: a small DP run on the embedded tasks (others default)
DEFAULT_DEPLOY_RUN_CONFIG: dict[str, RunConfigValue] = {
    "strategy": "ffa-lora",
    "num-rounds": 5,
    "num-clients": 3,
    "min-replies": 2,
    "local-steps": 20,
    "tasks": "adddigit-4,rotate-2,repeat-3",
    "num-train": 500,
    "server-eval": True,
    "round-timeout": 300.0,
    "fraction-evaluate": 0.0,  # clients evaluate their own test split in the train reply: one message per round
    "dp.enabled": True,
    "dp.target-epsilon": 8.0,
    "dp.plan-examples": 500,  # the server cannot see the clients' data: the plan covers clients this large
}

DEFAULT_PORT = 9092
DEFAULT_BIND = "0.0.0.0"

_SUPERLINK_KEYS = ("host", "port", "names", "expose-control")
_SECTIONS = ("superlink", "run")


def _check_bind(host: str) -> None:
    """The SuperLink must also listen on 127.0.0.1: ``fl-server start`` and the operator's ``flwr``
    reach its control API there (the guard answers local connections only)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return  # a host name: resolved where the SuperLink starts
    if isinstance(address, ipaddress.IPv6Address):
        raise ValueError(
            f"superlink host {host!r}: an IPv6 listener here is IPv6-only (asyncio sets IPV6_V6ONLY), so IPv4 "
            "clients and fl-server start itself, which reaches the control API at 127.0.0.1, could not connect; "
            "use 0.0.0.0 (every IPv4 interface) and let IPv6 clients in through a proxy"
        )
    if not (address.is_unspecified or address.is_loopback):
        raise ValueError(
            f"superlink host {host!r}: a listener on one interface leaves out 127.0.0.1, where fl-server start "
            "and the operator's flwr reach the control API; use 0.0.0.0 and a firewall to choose interfaces"
        )


@dataclass(frozen=True)
class SuperlinkSettings:
    """Where the SuperLink listens and what clients dial (also the certificate's SANs)."""

    host: str = DEFAULT_BIND
    port: int = DEFAULT_PORT
    names: tuple[str, ...] = ()
    expose_control: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not is_host(self.host):
            raise ValueError(f"superlink host {self.host!r} is neither an IP address nor a host name")
        _check_bind(self.host)
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ValueError(f"superlink port must be an integer in 1..65535, got {self.port!r}")
        if isinstance(self.names, str) or not self.names:
            raise ValueError("superlink names must list at least one name or address clients dial")
        object.__setattr__(self, "names", tuple(self.names))
        for name in self.names:
            san_for_host(name)  # raises naming the value
        if not isinstance(self.expose_control, bool):
            raise ValueError(f"superlink expose-control must be true or false, got {self.expose_control!r}")


@dataclass(frozen=True)
class ServerSettings:
    """The whole of ``server.toml``: the SuperLink's settings and the run's Flower run config
    (flat keys as ``flwr run --run-config`` takes them, checked by :class:`FederationConfig`)."""

    superlink: SuperlinkSettings
    run: dict[str, RunConfigValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.federation_config()

    def federation_config(self) -> FederationConfig:
        """The run as ``fl-server start`` submits it: to real SuperNodes (``deployed``)."""
        # lazy: torch, transformers and PEFT, which enrol and revoke need not wait for
        from fedlora.core.config import FederationConfig

        return FederationConfig.from_run_config({**self.run, "deployed": True})


def _flat_run_config(table: Mapping[str, Any]) -> dict[str, RunConfigValue]:
    """Dotted keys (``dp.enabled``, nested tables in TOML) flattened as Flower flattens them."""
    from flwr.common.config import flatten_dict

    return dict(flatten_dict(dict(table)))


def _unknown(found: Sequence[str], allowed: Sequence[str], where: str) -> None:
    unknown = sorted(set(found) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown {unknown}; allowed: {sorted(allowed)}")


def load_settings(path: str | Path) -> ServerSettings:
    """Read and validate ``server.toml``; every problem is a ``ValueError`` naming the file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML ({err})") from None
    _unknown(list(raw), _SECTIONS, f"{path}: section(s)")
    for section in _SECTIONS:
        if section in raw and not isinstance(raw[section], dict):
            raise ValueError(f"{path}: {section} must be a [{section}] table")
    if "superlink" not in raw:
        raise ValueError(f"{path}: no [superlink] table")
    table = raw["superlink"]
    _unknown(list(table), _SUPERLINK_KEYS, f"{path}: [superlink] key(s)")
    names = table.get("names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: [superlink] names must be a list of strings, got {names!r}")
    try:
        superlink = SuperlinkSettings(
            host=table.get("host", DEFAULT_BIND),
            port=table.get("port", DEFAULT_PORT),
            names=tuple(names),
            expose_control=table.get("expose-control", False),
        )
        return ServerSettings(superlink=superlink, run=_flat_run_config(raw.get("run", {})))
    except (ValueError, FileNotFoundError) as err:  # FederationConfig: a data-path or model-dir that is not there
        raise ValueError(f"{path}: {err}") from None


def _toml_value(value: RunConfigValue | Sequence[str]) -> str:
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return tomli_w.dumps({"v": value}).strip().removeprefix("v = ")


def settings_toml(settings: ServerSettings) -> str:
    """``server.toml`` text: commented, dotted run-config keys quoted (``"dp.enabled" = true``)."""
    s = settings.superlink
    superlink = [
        (f"host = {_toml_value(s.host)}", "bind address"),
        (f"port = {s.port}", ""),
        (f"names = {_toml_value(s.names)}", "what clients dial; also server.pem's SANs"),
        (
            f"expose-control = {_toml_value(s.expose_control)}",
            "control + runtime APIs answer loopback only unless true",
        ),
    ]
    lines = ["# fedlora server settings: written by `fl-server init`, read when the server starts.", "", "[superlink]"]
    lines += [f"{line:<40} # {comment}" if comment else line for line, comment in superlink]
    lines += [
        "",
        "# The Flower run config of the federated run: every key of `fl-sim --print-run-config` is accepted.",
        "[run]",
    ]
    lines += [tomli_w.dumps({key: value}).strip() for key, value in settings.run.items()]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Enrollment:
    """One enrolled SuperNode: its name, key fingerprint and key file."""

    name: str
    fingerprint: str
    path: Path
    enrolled: str = ""  # ISO time, UTC


class ServerDir(OwnCaFiles):
    """A server directory; every path of the layout is a property."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def server_cert_path(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key_path(self) -> Path:
        return self.root / "server.key"

    @property
    def settings_path(self) -> Path:
        return self.root / "server.toml"

    @property
    def nodes_dir(self) -> Path:
        return self.root / "nodes"

    @property
    def index_path(self) -> Path:
        return self.nodes_dir / "index.json"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def running_path(self) -> Path:
        """Which run ``fl-server start`` is serving now (its pid and run directory), while it runs."""
        return self.root / "running.json"

    @contextmanager
    def running(self, run_dir: Path) -> Iterator[None]:
        """Mark ``run_dir`` as this server directory's run in progress (``fl-server revoke`` drops
        a revoked key from it) until the block ends."""
        serving = self.running_run_dir()
        if serving is not None:
            raise ValueError(f"{self.root} is already serving a run ({serving}): one fl-server start at a time")
        me = os.getpid()
        write_json_atomic(self.running_path, {"pid": me, "run-dir": str(run_dir.resolve())}, 0o600)
        try:
            yield
        finally:
            try:
                if json.loads(self.running_path.read_text(encoding="utf-8")).get("pid") == me:
                    self.running_path.unlink()
            except (OSError, ValueError):
                pass

    def running_run_dir(self) -> Path | None:
        """The run directory of the ``fl-server start`` serving now, or None (none, or it died)."""
        try:
            marker = json.loads(self.running_path.read_text(encoding="utf-8"))
            os.kill(int(marker["pid"]), 0)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return Path(marker["run-dir"])

    @classmethod
    def init(
        cls,
        path: str | Path,
        hosts: Sequence[str],
        port: int = DEFAULT_PORT,
        host: str = DEFAULT_BIND,
        run_overrides: Mapping[str, Any] | None = None,
        days: int = 825,
        force: bool = False,
    ) -> ServerDir:
        """Create the CA, the server certificate for ``hosts`` and ``server.toml``.

        Refuses an existing server directory unless ``force``: a new CA means every client
        needs the new ``ca.pem``. Enrolled nodes and runs are kept.
        """
        server_dir = cls(path)
        run = DEFAULT_DEPLOY_RUN_CONFIG | _flat_run_config(run_overrides or {})
        settings = ServerSettings(SuperlinkSettings(host=host, port=port, names=tuple(hosts)), run)
        if days < 1:
            raise ValueError(f"days must be >= 1, got {days}")
        existing = [p.name for p in [*server_dir._tls_paths(), server_dir.settings_path] if p.exists()]
        if existing and not force:
            raise FileExistsError(
                f"{server_dir.root} is already a server directory ({', '.join(existing)}); "
                "re-initialising replaces its CA, so every client would need the new ca.pem: pass force to do that"
            )
        server_dir.root.mkdir(parents=True, exist_ok=True)
        write_own_tls(
            server_dir.ca_key_path,
            server_dir.ca_cert_path,
            server_dir.server_key_path,
            server_dir.server_cert_path,
            settings.superlink.names,
            days=days,
        )
        server_dir.nodes_dir.mkdir(exist_ok=True)
        server_dir.runs_dir.mkdir(exist_ok=True)
        write_atomic(server_dir.settings_path, settings_toml(settings).encode())  # last: marks a complete init
        return server_dir

    def _tls_paths(self) -> list[Path]:
        return [self.ca_cert_path, self.ca_key_path, self.server_cert_path, self.server_key_path]

    def settings(self) -> ServerSettings:
        if not self.settings_path.is_file():
            raise FileNotFoundError(f"{self.root} is not a fedlora server directory: run fl-server init DIR first")
        return load_settings(self.settings_path)

    def check_certificates(self, now: datetime.datetime | None = None) -> None:
        """Raise :class:`CertificateError` unless the TLS files would work: both certificates
        valid ``now``, the server's issued by the CA, each key matching its certificate and
        readable by its owner only, and every ``names`` entry of server.toml among the SANs."""
        ca_cert = load_certificate(self.ca_cert_path)
        server_cert = load_certificate(self.server_cert_path)
        check_validity(ca_cert, self.ca_cert_path, now)
        check_validity(server_cert, self.server_cert_path, now)
        if not issued_by(server_cert, ca_cert):
            raise CertificateError(
                f"{self.server_cert_path} was not issued by {self.ca_cert_path}: "
                "clients trusting that CA would refuse it"
            )
        for key_path, cert in ((self.ca_key_path, ca_cert), (self.server_key_path, server_cert)):
            mode = key_path.stat().st_mode & 0o777 if key_path.exists() else 0o600
            if mode & 0o077:
                raise CertificateError(f"{key_path}: readable by others (mode {mode:o}); chmod 600 it")
            if load_private_key_pem(key_path).public_key() != cert.public_key():
                raise CertificateError(
                    f"{key_path} does not belong to the certificate in {key_path.with_suffix('.pem')}"
                )
        sans = sans_of(server_cert)
        missing = [n for n in self.settings().superlink.names if str(san_for_host(n).value) not in sans]
        if missing:
            raise CertificateError(
                f"{self.settings_path} names {missing} but {self.server_cert_path} is valid only for {sans}: "
                "clients dialing those names would fail the TLS host check"
            )

    # -------------------------------------------------------------------------- nodes

    @contextmanager
    def _nodes_locked(self) -> Iterator[None]:
        """An exclusive lock over nodes/ (index.json is replaced, so cannot carry the lock)."""
        self.nodes_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.nodes_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _read_index(self) -> dict[str, dict[str, str]]:
        if not self.index_path.exists():
            return {}
        try:
            index = json.loads(self.index_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{self.index_path}: not valid JSON ({err})") from None
        ok = isinstance(index, dict) and all(
            isinstance(v, dict) and isinstance(v.get("fingerprint"), str) for v in index.values()
        )
        if not ok:
            raise ValueError(f'{self.index_path}: expected {{name: {{"fingerprint": ..., "enrolled": ...}}}}')
        return index

    def _enrollment(self, name: str, entry: Mapping[str, str]) -> Enrollment:
        return Enrollment(name, entry["fingerprint"], self.nodes_dir / f"{name}.pub", entry.get("enrolled", ""))

    def enroll(self, pubkey: str | Path, name: str) -> Enrollment:
        """Admit a SuperNode: copy its public key (normalised to one OpenSSH line) to nodes/<name>.pub."""
        if not isinstance(name, str) or not NODE_NAME.fullmatch(name):
            raise ValueError(
                f"node name {name!r} is not allowed: 1-63 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        public_key = load_node_public_key(pubkey)
        fp = fingerprint(public_key)
        with self._nodes_locked():
            index = self._read_index()
            if name in index:
                raise ValueError(
                    f"a node named {name!r} is already enrolled ({index[name]['fingerprint']}); revoke it first"
                )
            other = next((n for n, e in index.items() if e["fingerprint"] == fp), None)
            if other is not None:
                raise ValueError(f"{pubkey}: key {fp} is already enrolled as {other!r}; it cannot also be {name!r}")
            entry = {"fingerprint": fp, "enrolled": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
            enrollment = self._enrollment(name, entry)
            write_atomic(enrollment.path, (openssh_public_line(public_key, name) + "\n").encode())
            write_json_atomic(self.index_path, {**index, name: entry})  # a key file without entry is ignored
        return enrollment

    def enrolled(self) -> list[Enrollment]:
        """Enrolled nodes sorted by name; a key file that disappeared or changed is an error naming it."""
        enrollments = []
        for name, entry in sorted(self._read_index().items()):
            enrollment = self._enrollment(name, entry)
            if not enrollment.path.is_file():
                raise ValueError(f"node {name!r} is enrolled but {enrollment.path} is missing; revoke {name!r}")
            on_disk = fingerprint(load_node_public_key(enrollment.path))
            if on_disk != enrollment.fingerprint:
                raise ValueError(
                    f"{enrollment.path} holds key {on_disk} but {self.index_path} enrolled {enrollment.fingerprint}"
                )
            enrollments.append(enrollment)
        return enrollments

    def revoke(self, name: str) -> Enrollment:
        """Remove a node: its index entry first, then its key file."""
        with self._nodes_locked():
            index = self._read_index()
            if name not in index:
                raise ValueError(f"no node named {name!r} is enrolled; enrolled: {sorted(index)}")
            enrollment = self._enrollment(name, index.pop(name))
            write_json_atomic(self.index_path, index)
            enrollment.path.unlink(missing_ok=True)
        return enrollment
