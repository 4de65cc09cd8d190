"""The registry: adapter metadata in a SQL database (SQLite by default, any SQLAlchemy URL),
file contents in content-addressed blobs on disk.

Published versions are immutable: a publish writes its blobs first (``blobs/sha256/ab/<hash>``,
each written atomically and never rewritten), then inserts one row whose ``(name, version)``
is unique. Two concurrent publishes of one name cannot both take a version: the loser retries
with the next one, so the registry is consistent whatever interleaving happens, and a crash
between the blobs and the row leaves only an unreferenced blob. Tokens are stored as SHA-256
of the token (they are 256-bit random strings, so a fast hash is the right one).
"""

from __future__ import annotations

import builtins
import datetime
import hashlib
import json
import secrets
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import (
    Engine,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    or_,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from fedlora.atomic import fsync_dir, write_atomic
from fedlora.hub.sdk.manifest import (
    AdapterInfo,
    BaseModel,
    Provenance,
    build_manifest,
    canonical,
    check_adapter_files,
    check_generator_files,
    sha256_hex,
    sign,
)
from fedlora.hub.sdk.names import Principal, check_name, check_prefix, namespace, owner

TOKEN_PREFIX = "flh_"
RECORD_CACHE_SIZE = 1024


class Base(DeclarativeBase):
    pass


class AdapterRow(Base):
    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("name", "version", name="one_row_per_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    namespace: Mapped[str] = mapped_column(String(20), index=True)
    owner: Mapped[str | None] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer)
    manifest: Mapped[str] = mapped_column(Text)  # the exact signed bytes, as text
    signature: Mapped[str] = mapped_column(String(100))
    key_id: Mapped[str] = mapped_column(String(64))
    created: Mapped[str] = mapped_column(String(40))
    size: Mapped[int] = mapped_column(Integer)
    search_text: Mapped[str] = mapped_column(Text)


class FileRow(Base):
    """Which blobs an adapter version references (for authorising blob reads and for gc)."""

    __tablename__ = "adapter_files"
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id"), primary_key=True)
    filename: Mapped[str] = mapped_column(String(64), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)


class TokenRow(Base):
    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(10))
    client: Mapped[str | None] = mapped_column(String(64), index=True)
    label: Mapped[str] = mapped_column(String(100))
    created: Mapped[str] = mapped_column(String(40))
    revoked: Mapped[str | None] = mapped_column(String(40))


class BaseModelRow(Base):
    __tablename__ = "base_models"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    added: Mapped[str] = mapped_column(String(40))


class HubError(Exception):
    """A request the hub refuses; ``status`` is the HTTP status it maps to."""

    status = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class NotFound(HubError):
    status = 404


class Forbidden(HubError):
    status = 403


class Unauthorized(HubError):
    status = 401


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Record:
    """One stored adapter version as the API returns it."""

    name: str
    version: int
    manifest: str
    signature: str
    key_id: str
    created: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "manifest": self.manifest,
            "signature": self.signature,
            "key_id": self.key_id,
            "created": self.created,
            "size": self.size,
        }


def _record(row: AdapterRow) -> Record:
    return Record(row.name, row.version, row.manifest, row.signature, row.key_id, row.created, row.size)


def make_engine(url: str) -> Engine:
    """An engine; SQLite gets WAL, a busy timeout and foreign keys (several server processes
    may share the file)."""
    sqlite = url.startswith("sqlite")
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False} if sqlite else {})
    if sqlite:

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    Base.metadata.create_all(engine)
    return engine


class BlobStore:
    """Immutable content-addressed files; an in-memory LRU of recently read blobs, each
    checked against its hash when first read from disk."""

    def __init__(self, root: Path, cache_bytes: int = 256 << 20) -> None:
        self.root = root
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cached = 0
        self._lock = threading.Lock()

    def path(self, sha256: str) -> Path:
        return self.root / "sha256" / sha256[:2] / sha256

    def put(self, data: bytes) -> str:
        digest = sha256_hex(data)
        path = self.path(digest)
        # identical content is stored once; a stored copy that no longer matches its hash (a disk
        # error, a tamperer) is replaced by the good bytes a publisher just sent
        if not path.exists() or sha256_hex(path.read_bytes()) != digest:
            write_atomic(path, data, 0o600)  # personal adapters among them: the hub's alone
        return digest

    def get(self, sha256: str) -> bytes:
        with self._lock:
            if sha256 in self._cache:
                self._cache.move_to_end(sha256)
                return self._cache[sha256]
        try:
            data = self.path(sha256).read_bytes()
        except FileNotFoundError:
            raise HubError(f"blob {sha256} is missing from the hub's store", 500) from None
        if sha256_hex(data) != sha256:
            raise HubError(
                f"stored blob {sha256} is corrupt (its content no longer matches its hash); refusing to serve it", 500
            )
        if len(data) <= self.cache_bytes // 4:
            with self._lock:
                self._cache[sha256] = data
                self._cached += len(data)
                while self._cached > self.cache_bytes:
                    _, old = self._cache.popitem(last=False)
                    self._cached -= len(old)
        return data


class _Changes:
    """Whether an SQLite database has changed since the last look: ``PRAGMA data_version``
    on a private read-only connection changes whenever any other connection commits (another
    thread's session, another worker process, ``fl-hub token revoke``). A few microseconds a
    look, against a few hundred for an ORM query: what lets the registry cache tokens and latest
    versions without ever serving a revoked token or a superseded version."""

    def __init__(self, path: str) -> None:
        self._conn = sqlite3.connect(
            Path(path).resolve().as_uri() + "?mode=ro", uri=True, check_same_thread=False, isolation_level=None
        )
        self._lock = threading.Lock()
        self._seen: int | None = None

    def look(self) -> tuple[bool, int]:
        """(changed since the previous look, the version now)."""
        with self._lock:
            version = int(self._conn.execute("PRAGMA data_version").fetchone()[0])
            changed, self._seen = version != self._seen, version
        return changed, version

    def still(self, version: int) -> bool:
        """True if nothing was committed since a look returned ``version`` (whoever looked
        since): only then may a query made after that look be cached, or a request that read a
        token just before its revocation could put it back after another request cleared it."""
        with self._lock:
            return bool(self._conn.execute("PRAGMA data_version").fetchone()[0] == version)


class Registry:
    """The hub's state: database + blobs + signing key. Thread-safe; several processes may
    share one database and blob directory."""

    def __init__(self, database_url: str, blob_dir: Path, signing_key: Ed25519PrivateKey, key_id: str) -> None:
        self.engine = make_engine(database_url)
        self.blobs = BlobStore(blob_dir)
        self.signing_key = signing_key
        self.key_id = key_id
        # versions are immutable: the most recently read ones are kept (bounded: a manifest is at
        # most a few tens of KB, see Provenance's size cap, so this stays under ~100 MB)
        self._records: OrderedDict[tuple[str, int], Record] = OrderedDict()
        self._referenced: set[tuple[str, str]] = set()  # (name, blob) pairs seen: rows are never deleted
        # token hash -> principal, name -> latest record: valid while the database is unchanged
        database = self.engine.url.database if self.engine.url.get_backend_name() == "sqlite" else None
        self._changes = _Changes(database) if database and database != ":memory:" else None
        self._principals: dict[str, Principal] = {}
        self._latest: dict[str, Record] = {}

    def _cache_valid(self) -> int | None:
        """The database version if the caches may be used (emptied first if the database
        changed since the last look); a query made after this call may fill them if
        :meth:`_still` that version. None without SQLite: no caching."""
        if self._changes is None:
            return None
        changed, version = self._changes.look()
        if changed:
            self._principals.clear()
            self._latest.clear()
        return version

    def _still(self, version: int | None) -> bool:
        return version is not None and self._changes is not None and self._changes.still(version)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine) as s:
            yield s

    # --- tokens -----------------------------------------------------------------------
    def create_token(self, role: str, client: str | None = None, label: str = "") -> str:
        principal = Principal(role, client, label)  # type: ignore[arg-type]
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.session() as s, s.begin():
            s.add(
                TokenRow(
                    token_sha256=_hash_token(token),
                    role=principal.role,
                    client=client,
                    label=label,
                    created=now(),
                    revoked=None,
                )
            )
        return token

    def authenticate(self, token: str | None) -> Principal:
        if not token:
            raise Unauthorized("no token: send Authorization: Bearer <token> (fl-hub token create)")
        digest = _hash_token(token)
        seen = self._cache_valid()
        if seen is not None and (known := self._principals.get(digest)) is not None:
            return known
        with self.session() as s:
            row = s.scalars(select(TokenRow).where(TokenRow.token_sha256 == digest)).first()
        if row is None:
            raise Unauthorized("unknown token")
        if row.revoked is not None:
            raise Unauthorized(f"token revoked at {row.revoked}")
        principal = Principal(row.role, row.client, row.label)  # type: ignore[arg-type]
        if self._still(seen):  # valid tokens only: unknown ones cannot grow the cache
            self._principals[digest] = principal
        return principal

    def revoke_tokens(self, client: str | None = None, token: str | None = None) -> int:
        with self.session() as s, s.begin():
            query = select(TokenRow).where(TokenRow.revoked.is_(None))
            if token is not None:
                query = query.where(TokenRow.token_sha256 == _hash_token(token))
            elif client is not None:
                query = query.where(TokenRow.client == client)
            else:
                raise ValueError("revoke needs a client or a token")
            rows = list(s.scalars(query))
            for row in rows:
                row.revoked = now()
        return len(rows)

    def tokens(self) -> list[dict[str, Any]]:
        with self.session() as s:
            rows = s.scalars(select(TokenRow).order_by(TokenRow.id))
            return [
                {
                    "id": r.id,
                    "role": r.role,
                    "client": r.client,
                    "label": r.label,
                    "created": r.created,
                    "revoked": r.revoked,
                }
                for r in rows
            ]

    # --- base models ------------------------------------------------------------------
    def add_base_model(self, model_id: str, sha256: str) -> None:
        BaseModel(model_id, sha256)
        with self.session() as s, s.begin():
            row = s.get(BaseModelRow, model_id)
            if row is not None and row.sha256 != sha256:
                raise ValueError(
                    f"base model {model_id} is already known with weights {row.sha256[:16]}...; pick another id"
                )
            if row is None:
                s.add(BaseModelRow(id=model_id, sha256=sha256, added=now()))

    def base_models(self) -> dict[str, str]:
        with self.session() as s:
            return {r.id: r.sha256 for r in s.scalars(select(BaseModelRow))}

    # --- adapters ---------------------------------------------------------------------
    def publish(
        self, principal: Principal, name: str, files: Mapping[str, bytes], provenance: Mapping[str, Any]
    ) -> Record:
        """Check everything, store blobs, then take the next version of ``name``."""
        check_name(name)
        if not principal.can_write(name):
            raise Forbidden(principal.write_denied(name))
        try:
            prov = Provenance.from_mapping(provenance)
            if namespace(name) == "generators":
                info = check_generator_files(files, prov.base_model, name)
            else:
                info = check_adapter_files(files)
        except (TypeError, ValueError) as err:
            raise HubError(str(err)) from None
        known = self.base_models()
        base = prov.base_model
        if base.id not in known:
            raise HubError(
                f"unknown base model {base.id!r}: the hub knows {', '.join(sorted(known)) or 'none'} "
                "(the operator adds one with fl-hub base-model add)"
            )
        if known[base.id] != base.sha256:
            raise HubError(
                f"base model {base.id!r}: the adapter was trained on weights {base.sha256[:16]}..., "
                f"the hub knows that id with weights {known[base.id][:16]}..."
            )
        digests = {fname: self.blobs.put(data) for fname, data in files.items()}
        fsync_dir(self.blobs.root)
        text = _search_text(name, prov, info)
        for _ in range(50):
            with self.session() as s:
                latest = s.scalar(select(func.max(AdapterRow.version)).where(AdapterRow.name == name)) or 0
                s.rollback()  # end the read; the insert below is its own transaction
                version = latest + 1
                created = now()
                manifest = canonical(build_manifest(name, version, files, info, prov, created, principal.describe))
                row = AdapterRow(
                    name=name,
                    namespace=namespace(name),
                    owner=owner(name),
                    version=version,
                    manifest=manifest.decode(),
                    signature=sign(self.signing_key, manifest),
                    key_id=self.key_id,
                    created=created,
                    size=sum(len(d) for d in files.values()),
                    search_text=text,
                )
                try:
                    with s.begin():
                        s.add(row)
                        s.flush()
                        s.add_all(FileRow(adapter_id=row.id, filename=f, sha256=d) for f, d in digests.items())
                except IntegrityError:  # another publish took this version first
                    continue
                return _record(row)
        raise HubError(f"could not allocate a version of {name}: too many concurrent publishes", 503)

    def get(self, principal: Principal, name: str, version: int | None = None) -> Record:
        check_name(name)
        if not principal.can_read(name):
            raise Forbidden(principal.read_denied(name))
        if version is not None and (name, version) in self._records:
            self._records.move_to_end((name, version))
            return self._records[(name, version)]
        seen = self._cache_valid() if version is None else None
        if seen is not None and (latest := self._latest.get(name)) is not None:
            return latest
        with self.session() as s:
            query = select(AdapterRow).where(AdapterRow.name == name)
            query = (
                query.where(AdapterRow.version == version)
                if version is not None
                else query.order_by(AdapterRow.version.desc())
            )
            row = s.scalars(query.limit(1)).first()
            if row is None:
                raise NotFound(f"no adapter {name}" + (f" version {version}" if version is not None else ""))
            record = _record(row)
        self._records[(record.name, record.version)] = record
        while len(self._records) > RECORD_CACHE_SIZE:
            self._records.popitem(last=False)
        if self._still(seen):
            self._latest[name] = record
        return record

    def latest_under(self, principal: Principal, prefix: str) -> Record:
        """The newest adapter whose name starts with ``prefix/``, by numeric last segment
        (``global/<run>`` -> its last published round)."""
        listing = self.list(principal, prefix, limit=None)  # every round: the newest may sort past any limit
        if not listing:
            raise NotFound(f"nothing published under {prefix}/")
        best = max(
            listing,
            key=lambda r: (
                int(r["name"].rsplit("/", 1)[1]) if r["name"].rsplit("/", 1)[1].isdigit() else -1,
                r["created"],
            ),
        )
        return self.get(principal, best["name"], best["version"])

    def list(
        self, principal: Principal, prefix: str = "", query: str = "", limit: int | None = 1000
    ) -> builtins.list[dict[str, Any]]:
        """The latest version of every readable adapter under ``prefix`` whose text matches ``query``
        (by name, the first ``limit``; None: all, for :meth:`latest_under`)."""
        check_prefix(prefix)
        if limit is not None and not 1 <= limit <= 10000:
            raise HubError(f"limit must be 1..10000, got {limit}")
        latest = select(AdapterRow.name, func.max(AdapterRow.version).label("v")).group_by(AdapterRow.name)
        if prefix:
            latest = latest.where(
                or_(
                    AdapterRow.name == prefix.rstrip("/"),
                    # substr, not LIKE: SQLite's LIKE ignores case, and global/R is not global/r
                    func.substr(AdapterRow.name, 1, len(prefix.rstrip("/")) + 1) == prefix.rstrip("/") + "/",
                )
            )
        if principal.role == "client":
            latest = latest.where(
                or_(AdapterRow.namespace.in_(("global", "tasks", "generated")), AdapterRow.owner == principal.client)
            )
        sub = latest.subquery()
        stmt = select(AdapterRow).join(sub, (AdapterRow.name == sub.c.name) & (AdapterRow.version == sub.c.v))
        for word in query.lower().split():
            stmt = stmt.where(AdapterRow.search_text.contains(word, autoescape=True))
        stmt = stmt.order_by(AdapterRow.name)
        if limit is not None:
            stmt = stmt.limit(limit)
        with self.session() as s:
            rows = list(s.scalars(stmt))
        out = []
        for row in rows:
            manifest = json.loads(row.manifest)
            out.append(
                {
                    "name": row.name,
                    "version": row.version,
                    "created": row.created,
                    "size": row.size,
                    "provenance": manifest["provenance"],
                    "adapter": manifest["adapter"],
                }
            )
        return out

    def versions(self, principal: Principal, name: str) -> builtins.list[int]:
        check_name(name)
        if not principal.can_read(name):
            raise Forbidden(principal.read_denied(name))
        with self.session() as s:
            return list(
                s.scalars(select(AdapterRow.version).where(AdapterRow.name == name).order_by(AdapterRow.version))
            )

    def blob(self, principal: Principal, name: str, sha256: str) -> bytes:
        """A file of ``name`` (any version) by its hash, if ``principal`` may read ``name``."""
        check_name(name)
        if not principal.can_read(name):
            raise Forbidden(principal.read_denied(name))
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise HubError(f"{sha256!r} is not a sha256 hex digest")
        key = (name, sha256)
        if key not in self._referenced:
            with self.session() as s:
                hit = s.scalar(
                    select(FileRow.sha256)
                    .join(AdapterRow, AdapterRow.id == FileRow.adapter_id)
                    .where(AdapterRow.name == name, FileRow.sha256 == sha256)
                    .limit(1)
                )
            if hit is None:
                raise NotFound(f"{name} has no file with sha256 {sha256}")
            self._referenced.add(key)
        return self.blobs.get(sha256)


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _search_text(name: str, prov: Provenance, info: AdapterInfo) -> str:
    parts = [
        name,
        prov.base_model.id,
        prov.strategy or "",
        prov.run or "",
        prov.description or "",
        prov.producer,
        *info.target_modules,
    ]
    return " ".join(parts).lower()
