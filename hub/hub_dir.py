"""The hub directory: what ``fl-hub init`` creates and ``fl-hub serve`` runs from.

HUB_DIR/
  hub.key (0600), hub.pub   Ed25519 signing key; clients get hub.pub (or pin its key id)
  hub.toml                  [hub] host, port, database URL, upload limit, workers, TLS files
  hub.db                    the registry (SQLite) unless hub.toml names another database
  blobs/sha256/ab/<hash>    adapter files, content-addressed
  operator.token (0600)     the first operator token (publishing to global/ and tasks/)
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import tomli_w
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedlora.atomic import write_atomic
from fedlora.core.pki import OwnCaFiles, is_host, write_own_tls
from fedlora.hub.sdk.manifest import describe_base_model, key_id, load_private_key, private_pem, public_pem
from fedlora.hub.store import Registry

DEFAULT_PORT = 9480


@dataclass(frozen=True)
class HubSettings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    database: str = ""  # empty: sqlite:///HUB_DIR/hub.db
    max_upload_mb: float = 64.0
    workers: int = 1
    tls_cert: str = ""
    tls_key: str = ""
    header_timeout: float = 10.0  # seconds for a request's headers (half-open connections are closed)
    body_timeout: float = 30.0  # seconds between reads of a request body

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not is_host(self.host):
            raise ValueError(f"host must be a host name or IP address, got {self.host!r}")
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 1 <= self.port <= 65535:
            raise ValueError(f"port must be 1..65535, got {self.port!r}")
        if not isinstance(self.database, str):
            raise ValueError(f"database must be an SQLAlchemy URL string, got {self.database!r}")
        if (
            not isinstance(self.max_upload_mb, (int, float))
            or isinstance(self.max_upload_mb, bool)
            or not 0 < self.max_upload_mb <= 4096
        ):
            raise ValueError(f"max-upload-mb must be in (0, 4096], got {self.max_upload_mb!r}")
        if not isinstance(self.workers, int) or isinstance(self.workers, bool) or not 1 <= self.workers <= 64:
            raise ValueError(f"workers must be 1..64, got {self.workers!r}")
        for what, seconds in (("header-timeout", self.header_timeout), ("body-timeout", self.body_timeout)):
            if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 < seconds <= 3600:
                raise ValueError(f"{what} must be seconds in (0, 3600], got {seconds!r}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls-cert and tls-key go together")
        for what, path in (("tls-cert", self.tls_cert), ("tls-key", self.tls_key)):
            if path and not Path(path).is_file():
                raise ValueError(f"{what} {path} does not exist")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * (1 << 20))


def _toml_key(name: str) -> str:
    return name.replace("_", "-")


class HubDir(OwnCaFiles):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def key_path(self) -> Path:
        return self.root / "hub.key"

    @property
    def public_key_path(self) -> Path:
        return self.root / "hub.pub"

    @property
    def settings_path(self) -> Path:
        return self.root / "hub.toml"

    @property
    def blob_dir(self) -> Path:
        return self.root / "blobs"

    @property
    def operator_token_path(self) -> Path:
        return self.root / "operator.token"

    @property
    def tls_cert_path(self) -> Path:
        return self.root / "tls.pem"

    @property
    def tls_key_path(self) -> Path:
        return self.root / "tls.key"

    @classmethod
    def init(cls, root: str | Path, settings: HubSettings, tls_names: Sequence[str] = ()) -> tuple[HubDir, str]:
        """Create the directory, key, settings and database; register the embedded base
        model; write the first operator token. With ``tls_names``, also a CA of the hub's own
        and a server certificate for those names (plus loopback), which the settings then
        serve, as ``fl-server init`` does for the SuperLink. Refuses a directory that already
        has a key."""
        hub = cls(root)
        if hub.key_path.exists():
            raise ValueError(f"{hub.root} already holds a hub (hub.key exists); serve it or pick another directory")
        if tls_names and settings.tls_cert:
            raise ValueError("a certificate of your own (tls-cert) or one from the hub's own CA (names), not both")
        hub.root.mkdir(parents=True, exist_ok=True)
        hub.root.chmod(0o700)
        if tls_names:
            paths = (hub.ca_key_path, hub.ca_cert_path, hub.tls_key_path, hub.tls_cert_path)
            write_own_tls(*paths, list(tls_names), ca_name="fedlora hub CA")
            cert, key_file = str(hub.tls_cert_path.resolve()), str(hub.tls_key_path.resolve())
            settings = replace(settings, tls_cert=cert, tls_key=key_file)
        key = Ed25519PrivateKey.generate()
        write_atomic(hub.key_path, private_pem(key), 0o600)
        write_atomic(hub.public_key_path, public_pem(key.public_key()), 0o644)
        table = {_toml_key(f.name): getattr(settings, f.name) for f in fields(settings)}
        text = "# fedlora hub settings: written by `fl-hub init`, read by `fl-hub serve`.\n" + tomli_w.dumps(
            {"hub": table}
        )
        write_atomic(hub.settings_path, text.encode(), 0o644)
        registry = hub.registry()
        base = describe_base_model()
        registry.add_base_model(base.id, base.sha256)
        token = registry.create_token("operator", label="init")
        write_atomic(hub.operator_token_path, (token + "\n").encode(), 0o600)
        return hub, key_id(key.public_key())

    def settings(self) -> HubSettings:
        try:
            raw = tomllib.loads(self.settings_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{self.settings_path} does not exist: is {self.root} a hub directory (fl-hub init)?"
            ) from None
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{self.settings_path}: not valid TOML ({err})") from None
        unknown = sorted(set(raw) - {"hub"})
        if unknown:
            raise ValueError(f"{self.settings_path}: unknown section(s) {', '.join(unknown)} (known: hub)")
        table: dict[str, Any] = raw.get("hub", {})
        known = {_toml_key(f.name): f.name for f in fields(HubSettings)}
        bad = sorted(set(table) - set(known))
        if bad:
            raise ValueError(
                f"{self.settings_path}: unknown [hub] key(s) {', '.join(bad)} (known: {', '.join(sorted(known))})"
            )
        try:
            return HubSettings(**{known[k]: v for k, v in table.items()})
        except ValueError as err:
            raise ValueError(f"{self.settings_path}: {err}") from None

    def database_url(self, settings: HubSettings | None = None) -> str:
        settings = settings or self.settings()
        return settings.database or f"sqlite:///{(self.root / 'hub.db').resolve()}"

    def registry(self) -> Registry:
        if not self.key_path.is_file():
            raise FileNotFoundError(f"{self.key_path} does not exist: is {self.root} a hub directory (fl-hub init)?")
        key = load_private_key(self.key_path)
        url = self.database_url()
        registry = Registry(url, self.blob_dir, key, key_id(key.public_key()))
        self._tighten(url)
        return registry

    def _tighten(self, database_url: str) -> None:
        """The directory 0700 and its SQLite database 0600, every time it is opened (a hub made
        before these modes gets them too): it holds every client's personal adapter, which token
        scopes guard over HTTP and file modes on the disk."""
        self.root.chmod(0o700)
        db = Path(database_url.removeprefix("sqlite:///")) if database_url.startswith("sqlite:///") else None
        if db is not None and db.is_file() and db.resolve().parent == self.root.resolve():
            db.chmod(0o600)
