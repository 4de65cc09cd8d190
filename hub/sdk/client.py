"""Talking to a hub: publish, list and pull with verification (what ``fl-client pull``/``push``,
``fl-sim`` and ``fl-server`` use). Nothing reaches the disk before the signature, the name,
the base model's hash and every file's hash have been checked."""

from __future__ import annotations

import base64
import builtins
import json
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedlora.core.adapter_format import ADAPTER_FILES, read_adapter_dir
from fedlora.core.embedded import default_model_dir
from fedlora.hub.sdk.manifest import (
    VerificationError,
    key_id,
    load_public_key,
    verify_file,
    verify_freshness,
    verify_record,
    weights_sha256,
    write_adapter_dir,
)
from fedlora.hub.sdk.names import check_name, check_prefix
from fedlora.hub.sdk.request import GenerationRequest
from fedlora.hub.sdk.seen import SeenVersions, default_seen_path, prefix_rank

PULLED_MANIFEST = "hub_manifest.json"


class HubRequestError(RuntimeError):
    """The hub refused a request; the message carries its reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"hub refused ({status}): {reason}")
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Pulled:
    path: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> int:
        return int(self.manifest["version"])


class HubClient:
    def __init__(
        self,
        url: str,
        token: str,
        public_key: Ed25519PublicKey | None = None,
        *,
        timeout: float = 30.0,
        ca: str | Path | None = None,
        seen: SeenVersions | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"hub URL must start with http:// or https://, got {url!r}")
        if not token or any(c.isspace() for c in token):
            raise ValueError("a hub token is required (fl-hub token create prints one)")
        self.url = url.rstrip("/")
        self.public_key = public_key
        self.seen = seen  # the highest versions this client accepted before (None: not kept)
        verify: Any = str(ca) if ca else True
        self.http = httpx.Client(
            base_url=self.url, headers={"authorization": f"Bearer {token}"}, timeout=timeout, verify=verify
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as err:
            raise HubRequestError(0, f"cannot reach the hub at {self.url}: {err}") from None
        if response.status_code >= 400:
            try:
                reason = str(response.json().get("error"))
            except (json.JSONDecodeError, AttributeError):
                reason = response.text[:500]
            raise HubRequestError(response.status_code, reason)
        return response

    # --- reading ---------------------------------------------------------------------
    def whoami(self) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", "/v1/whoami").json()
        return result

    def client_name(self) -> str:
        """The client this token belongs to (personal adapters live under clients/<it>/)."""
        who = self.whoami()
        if who.get("role") != "client" or not who.get("client"):
            raise ValueError(
                "this token is an operator token: name the client's adapter in full (clients/<client>/<name>)"
            )
        return str(who["client"])

    def list(self, prefix: str = "", query: str = "", limit: int = 1000) -> list[dict[str, Any]]:
        check_prefix(prefix)
        result: list[dict[str, Any]] = self._request(
            "GET", "/v1/adapters", params={"prefix": prefix, "q": query, "limit": limit}
        ).json()
        return result

    def record(self, name: str, version: int | None = None) -> dict[str, Any]:
        """A version's record, or the latest one's: then (with the hub's key) signed over a fresh
        nonce of this request, so no recorded answer can be replayed as the latest."""
        check_name(name)
        params: dict[str, Any] = {"version": version} if version is not None else {}
        nonce = secrets.token_hex(16) if version is None and self.public_key is not None else None
        if nonce is not None:
            params["nonce"] = nonce
        result: dict[str, Any] = self._request("GET", f"/v1/adapters/{name}", params=params).json()
        if nonce is not None and self.public_key is not None:
            verify_freshness(result, self.public_key, nonce, name)
        return result

    def latest(self, prefix: str) -> dict[str, Any]:
        """The hub's newest adapter under ``prefix``; an answer naming anything outside it is
        refused (the signature check of a pull then binds the content to that name). With the
        hub's key the answer must be signed over this request's nonce, and must not be older
        than the newest this client accepted under ``prefix`` before."""
        check_prefix(prefix)
        prefix = prefix.rstrip("/")
        nonce = secrets.token_hex(16) if self.public_key is not None else None
        params = {"nonce": nonce} if nonce is not None else {}
        result: dict[str, Any] = self._request("GET", f"/v1/latest/{prefix}", params=params).json()
        if not str(result.get("name", "")).startswith(prefix + "/"):
            raise VerificationError(f"the hub answered {result.get('name')!r} for the latest adapter under {prefix}/")
        if nonce is None or self.public_key is None:
            return result
        verify_freshness(result, self.public_key, nonce, prefix)
        manifest = verify_record(result, self.public_key, str(result["name"]))
        if self.seen is not None:
            kid, rank = key_id(self.public_key), prefix_rank(manifest["name"], str(manifest["created"]))
            before = self.seen.newest_under(kid, prefix)
            if before is not None and rank < before:
                raise VerificationError(
                    f"the hub offers {manifest['name']} as the latest under {prefix}/, older than what this "
                    f"client accepted before (round {before[0]}, {before[1]}): refusing a rollback "
                    f"(record: {self.seen.path}); nothing was written"
                )
            self.seen.accept_under(kid, prefix, rank)
        return result

    def pull(
        self,
        name: str,
        out: str | Path,
        *,
        version: int | None = None,
        base_model_dir: str | Path | None = None,
        record: Mapping[str, Any] | None = None,
    ) -> Pulled:
        """Fetch, verify and write ``name`` (latest version unless given) as a PEFT directory.

        ``base_model_dir``: the local base model (None: the embedded one); its weights' hash
        must equal the adapter's recorded base-model hash."""
        if self.public_key is None:
            raise ValueError("pulling needs the hub's public key (--hub-key hub.pub) to verify signatures")
        out = Path(out)
        previous = _previous_pull(out)
        record = record or self.record(name, version)
        manifest = verify_record(record, self.public_key, name, version)
        if previous is not None and previous.get("name") == name and version is None:
            if int(previous.get("version", 0)) > int(manifest["version"]):
                raise VerificationError(
                    f"{out} holds {name} v{previous['version']}, the hub offers v{manifest['version']} as the latest: "
                    "refusing a rollback (ask for --version explicitly to go back); nothing was written"
                )
        kid = key_id(self.public_key)
        if self.seen is not None and version is None:
            highest = self.seen.highest(kid, name)
            if highest > int(manifest["version"]):
                raise VerificationError(
                    f"this client accepted {name} v{highest} before, the hub offers v{manifest['version']} as the "
                    f"latest: refusing a rollback (record: {self.seen.path}; ask for --version explicitly to go "
                    "back); nothing was written"
                )
        base = manifest["provenance"]["base_model"]
        if base_model_dir is None:
            base_model_dir = default_model_dir()
        local = weights_sha256(base_model_dir)
        if local != base["sha256"]:
            raise VerificationError(
                f"{name} v{manifest['version']} was trained on base model {base['id']} "
                f"(weights {base['sha256'][:16]}...), "
                f"but the local base model {base_model_dir} has weights {local[:16]}...: "
                "it would not load correctly; nothing was written"
            )
        manifest, files = self.fetch(name, manifest["version"], record=record)
        pulled = Pulled(write_adapter_dir(out, files, manifest), manifest)
        if self.seen is not None:
            self.seen.accept(kid, name, int(manifest["version"]))
        return pulled

    def fetch(
        self, name: str, version: int | None = None, record: Mapping[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, bytes]]:
        """A version's verified manifest and files, in memory (signature, name, every hash)."""
        if self.public_key is None:
            raise ValueError("fetching needs the hub's public key (--hub-key hub.pub) to verify signatures")
        record = record or self.record(name, version)
        manifest = verify_record(record, self.public_key, name, version)
        files = {}
        for fname, meta in manifest["files"].items():
            data = self._request("GET", f"/v1/files/{meta['sha256']}", params={"name": name}).content
            verify_file(manifest, fname, data)
            files[fname] = data
        return manifest, files

    def versions(self, name: str) -> builtins.list[int]:
        check_name(name)
        result: builtins.list[int] = self._request("GET", f"/v1/versions/{name}").json()["versions"]
        return result

    def generate(
        self,
        description: str,
        method: str,
        examples: Sequence[Any] = (),
        base_model_sha256: str | None = None,
    ) -> dict[str, Any]:
        """Ask the hub for a zero-shot adapter; the answer is the signed record of
        ``generated/<id>`` (pull it by that record to verify and write it)."""

        if self.public_key is None:
            raise ValueError("generating needs the hub's public key (--hub-key hub.pub) to verify the answer")
        request = GenerationRequest(description, method, tuple(examples), base_model_sha256)
        result: dict[str, Any] = self._request("POST", "/v1/generate", json=request.to_json()).json()
        name = str(result.get("name", ""))
        if not (name.startswith(f"generated/{method}-") and name.endswith(request.key()[:20])):
            raise VerificationError(f"the hub answered {name!r} for a {method} generation of this request")
        extra = verify_record(result, self.public_key, name)["provenance"].get("extra") or {}
        if extra.get("request_sha256") != request.key() or (extra.get("generator") or {}).get("method") != method:
            raise VerificationError(f"the hub answered {name}, which was generated for another request")
        return result

    # --- writing ---------------------------------------------------------------------
    def publish(self, name: str, files: Mapping[str, bytes], provenance: Mapping[str, Any]) -> dict[str, Any]:
        check_name(name)
        body = {"provenance": dict(provenance), "files": {f: base64.b64encode(d).decode() for f, d in files.items()}}
        data = json.dumps(body).encode()
        response = self._request(
            "POST", f"/v1/adapters/{name}", content=data, headers={"content-type": "application/json"}
        )
        result: dict[str, Any] = response.json()
        if self.public_key is not None:  # the hub must have signed exactly what was sent
            manifest = verify_record(result, self.public_key, name, result.get("version"))
            for fname, fdata in files.items():
                verify_file(manifest, fname, fdata)
        return result

    def publish_dir(self, name: str, adapter_dir: str | Path, provenance: Mapping[str, Any]) -> dict[str, Any]:
        return self.publish(name, read_adapter_dir(Path(adapter_dir)), provenance)


def _previous_pull(out: Path) -> dict[str, Any] | None:
    """The manifest of what an earlier pull wrote to ``out`` (None: nothing there); anything
    else in ``out`` (a user's files) is refused, never replaced."""

    if not out.exists():
        return None
    if not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory: refusing to replace it")
    names = {p.name for p in out.iterdir()}
    if not names:
        return None
    if PULLED_MANIFEST not in names or names - {*ADAPTER_FILES, PULLED_MANIFEST}:
        raise ValueError(
            f"{out} exists and is not an adapter pulled from a hub (or holds other files): refusing to replace it"
        )
    try:
        previous: dict[str, Any] = json.loads((out / PULLED_MANIFEST).read_text())
        return previous
    except (OSError, json.JSONDecodeError):
        return None


#: where a hub token may come from besides ``--token-file`` (never the command line: ``ps``
#: and shell histories show it to every local account)
TOKEN_ENV = "FEDLORA_HUB_TOKEN"


def read_token(token: str | None, token_file: str | Path | None) -> str:
    """The token from ``--token-file``, else from the ``FEDLORA_HUB_TOKEN`` environment variable.

    ``token`` is what a ``--token`` option received: refused with the reason, since a token on
    a command line is readable in ``ps`` by any local account.
    """
    if token:
        raise ValueError(
            f"--token puts the token where any local account reads it (ps, shell history): "
            f"give it with --token-file FILE (mode 0600) or the {TOKEN_ENV} environment variable"
        )
    if token_file:
        path = Path(token_file)
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            raise FileNotFoundError(f"token file {path} does not exist") from None
    env = os.environ.get(TOKEN_ENV, "").strip()
    if not env:
        raise ValueError(f"give the hub token with --token-file FILE or the {TOKEN_ENV} environment variable")
    return env


def open_hub(
    url: str,
    token: str | None,
    token_file: str | Path | None,
    key_file: str | Path | None = None,
    ca: str | Path | None = None,
) -> HubClient:
    """A HubClient from what a command line names: the URL, a token or its file, the hub's public
    key file (pulls are verified with it) and a CA for a hub with its own certificate."""
    key = load_public_key(Path(key_file)) if key_file is not None else None
    seen = SeenVersions(default_seen_path()).check() if key is not None else None  # a command-line client keeps marks
    return HubClient(url, read_token(token, token_file), key, ca=ca, seen=seen)
