"""The adapter hub through a real ``fl-hub serve`` on 127.0.0.1: publish, pull, scopes,
signatures, tampering, restarts, concurrency and bad input."""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import shutil
import sqlite3
import stat
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from hub_server import HubServer
from peft import PeftModel
from safetensors.torch import save_file

from fedlora.core.adapter_format import read_adapter_dir
from fedlora.core.embedded import default_model_dir
from fedlora.core.lora_settings import LoraSettings
from fedlora.core.model import load_base_model, save_adapter, wrap_lora
from fedlora.hub.hub_dir import HubDir, HubSettings
from fedlora.hub.sdk.client import HubClient, HubRequestError
from fedlora.hub.sdk.manifest import VerificationError, describe_base_model, load_public_key, sign_freshness
from fedlora.hub.sdk.publish import adapter_files
from fedlora.hub.sdk.seen import SeenVersions

# a real hub server (module fixture) in every test; later tests read what earlier ones published,
# so the module stays on one pytest-xdist worker, in file order
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("hub")]

PROMPT = torch.tensor([[5, 17, 23, 9, 31, 4, 12, 8]])


def _adapter(out: Path, seed: int) -> Path:
    """A PEFT adapter on the embedded model whose B factors are non-zero (it changes the logits)."""
    model = wrap_lora(load_base_model(), LoraSettings(rank=4))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return save_adapter(model, out)


def _logits(adapter_dir: Path) -> torch.Tensor:
    model = PeftModel.from_pretrained(load_base_model(), str(adapter_dir))
    with torch.no_grad():
        return model(input_ids=PROMPT).logits


def _provenance(**extra: Any) -> dict[str, Any]:
    base = describe_base_model()
    return {"base_model": {"id": base.id, "sha256": base.sha256}, "producer": "tests", **extra}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return _adapter(root / "one", 1), _adapter(root / "two", 2)


class Hub:
    def __init__(self, root: Path) -> None:
        self.dir, _ = HubDir.init(root / "hub", HubSettings(max_upload_mb=1.0))
        registry = self.dir.registry()
        self.operator = self.dir.operator_token_path.read_text().strip()
        self.alice = registry.create_token("client", "alice")
        self.bob = registry.create_token("client", "bob")
        self.key = load_public_key(self.dir.public_key_path)
        self.server = HubServer(self.dir.root, root / "hub.log").start()

    def client(self, token: str, key: bool = True) -> HubClient:
        return HubClient(self.server.url, token, self.key if key else None)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    h = Hub(tmp_path_factory.mktemp("hub"))
    try:
        yield h
    finally:
        h.server.stop()


def test_publish_pull_gives_identical_logits_and_full_provenance(
    hub: Hub, adapters: tuple[Path, Path], tmp_path: Path
) -> None:
    one, _ = adapters
    prov = _provenance(strategy="ffa-lora", run="r1", round=3, epsilon=2.5, delta=1e-5, privacy_unit="one example")
    with hub.client(hub.operator) as op:
        record = op.publish("global/r1/3", adapter_files(one, "fedlora/embedded-base"), prov)
    assert (record["name"], record["version"]) == ("global/r1/3", 1)
    with hub.client(hub.alice) as alice:
        pulled = alice.pull("global/r1/3", tmp_path / "pulled")
    assert torch.equal(_logits(one), _logits(pulled.path))
    assert not torch.equal(_logits(one), load_base_model()(input_ids=PROMPT).logits)  # the adapter matters
    m = pulled.manifest
    assert m["provenance"]["base_model"] == prov["base_model"]
    assert (m["provenance"]["epsilon"], m["provenance"]["delta"], m["provenance"]["round"]) == (2.5, 1e-5, 3)
    assert m["adapter"]["rank"] == 4 and "q_proj" in m["adapter"]["target_modules"]
    assert m["published_by"] == "operator (init)" and m["created"]
    assert json.loads((pulled.path / "hub_manifest.json").read_text()) == m
    files = read_adapter_dir(pulled.path)
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "fedlora/embedded-base"


def test_versions_and_latest_round(hub: Hub, adapters: tuple[Path, Path], tmp_path: Path) -> None:
    one, two = adapters
    with hub.client(hub.operator) as op:
        op.publish_dir("global/r2/1", one, _provenance(run="r2", round=1))
        op.publish_dir("global/r2/10", two, _provenance(run="r2", round=10))
        op.publish_dir("global/r2/2", one, _provenance(run="r2", round=2))
        again = op.publish_dir("global/r2/10", one, _provenance(run="r2", round=10, description="republished"))
    assert again["version"] == 2
    with hub.client(hub.alice) as alice:
        latest = alice.latest("global/r2")
        assert (latest["name"], latest["version"]) == ("global/r2/10", 2)  # round 10 > 2 numerically
        old = alice.pull("global/r2/10", tmp_path / "v1", version=1)
        assert torch.equal(_logits(old.path), _logits(two))
        with pytest.raises(HubRequestError, match="no adapter global/r2/10 version 7"):
            alice.record("global/r2/10", version=7)


def test_scopes_are_enforced_both_ways(hub: Hub, adapters: tuple[Path, Path], tmp_path: Path) -> None:
    one, _ = adapters
    with hub.client(hub.alice) as alice, hub.client(hub.bob) as bob, hub.client(hub.operator) as op:
        alice.publish_dir("clients/alice/math", one, _provenance())
        bob.publish_dir("clients/bob/math", one, _provenance())
        op.publish_dir("tasks/sort-desc", one, _provenance(description="sort the digits in descending order"))
        for who, name in ((alice, "clients/bob/math"), (bob, "clients/alice/math")):
            with pytest.raises(HubRequestError, match="may not read") as err:
                who.record(name)
            assert err.value.status == 403
        with pytest.raises(HubRequestError, match="a client writes only clients/alice/") as err:
            alice.publish_dir("clients/bob/evil", one, _provenance())
        assert err.value.status == 403
        for name in ("global/x/1", "tasks/evil", "generated/evil"):
            with pytest.raises(HubRequestError, match="needs an operator token"):
                alice.publish_dir(name, one, _provenance())
        sha = json.loads(bob.record("clients/bob/math")["manifest"])["files"]["adapter_model.safetensors"]["sha256"]
        with pytest.raises(HubRequestError, match="may not read clients/bob/math"):  # the blob too, by its hash
            alice._request("GET", f"/v1/files/{sha}", params={"name": "clients/bob/math"})
        names = {r["name"] for r in alice.list()}
        assert "clients/alice/math" in names and "tasks/sort-desc" in names and "global/r1/3" in names
        assert not any(n.startswith("clients/bob") for n in names)
        assert {r["name"] for r in op.list("clients/")} >= {"clients/alice/math", "clients/bob/math"}
        assert [r["name"] for r in alice.list("tasks", query="descending")] == ["tasks/sort-desc"]
        assert alice.pull("tasks/sort-desc", tmp_path / "task").version == 1
        assert op.record("clients/alice/math")["version"] == 1  # the operator reads everything
    with hub.client("flh_not-a-token") as stranger, pytest.raises(HubRequestError, match="unknown token") as err:
        stranger.list()
    assert err.value.status == 401
    r = httpx.get(hub.server.url + "/v1/adapters")
    assert r.status_code == 401 and r.json() == {"error": r.json()["error"], "status": 401}
    assert "no token" in r.json()["error"]


def test_revoked_token_is_refused(hub: Hub) -> None:
    registry = hub.dir.registry()
    token = registry.create_token("client", "carol")
    with hub.client(token) as carol:
        assert carol.whoami() == {"role": "client", "client": "carol", "label": ""}
        assert registry.revoke_tokens(client="carol") == 1
        with pytest.raises(HubRequestError, match="token revoked"):
            carol.list()


def _flip_files(path: str, body: bytes) -> bytes:
    return bytes([body[0] ^ 1]) + body[1:] if path.startswith("/v1/files/") else body


class _TamperingProxy(http.server.ThreadingHTTPServer):
    """A man in the middle: ``rewrite(path, body)`` changes what the hub answers (default: flips
    one byte of every file)."""

    def __init__(self, upstream: str, rewrite: Any = _flip_files) -> None:
        upstream_url = upstream

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                r = httpx.get(upstream_url + self.path, headers={"authorization": self.headers["authorization"]})
                body = rewrite(self.path, r.content)
                self.send_response(r.status_code)
                self.send_header("content-type", r.headers["content-type"])
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


def test_tampered_blob_in_transit_is_refused_and_nothing_written(
    hub: Hub, adapters: tuple[Path, Path], tmp_path: Path
) -> None:
    with hub.client(hub.operator) as op:
        op.publish_dir("tasks/tamper", adapters[0], _provenance())
    with _proxied(hub.server.url) as url, HubClient(url, hub.alice, hub.key) as mitm:
        with pytest.raises(VerificationError, match="does not match its signed hash"):
            mitm.pull("tasks/tamper", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary leftovers either


@contextlib.contextmanager
def _proxied(upstream: str, rewrite: Any = _flip_files) -> Iterator[str]:
    proxy = _TamperingProxy(upstream, rewrite)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{proxy.server_address[1]}"
    finally:
        proxy.shutdown()


def test_substituted_latest_and_rollback_are_refused(hub: Hub, adapters: tuple[Path, Path], tmp_path: Path) -> None:
    """A man in the middle (or a bad hub) answering another, validly signed, adapter for the
    latest of a run, or an older version of the name than the one already pulled."""
    with hub.client(hub.operator) as op:
        op.publish_dir("global/Case/1", adapters[1], _provenance(run="Case", round=1))
        op.publish_dir("global/case/7", adapters[0], _provenance(run="case", round=7))
        for _ in range(2):
            op.publish_dir("tasks/rolling", adapters[0], _provenance())
        other = op.record("tasks/sort-desc")
        old = op.record("tasks/rolling", version=1)
    with hub.client(hub.alice) as alice:
        assert alice.latest("global/Case")["name"] == "global/Case/1"  # names are case-sensitive
        alice.pull("tasks/rolling", tmp_path / "rolling")  # v2

    def swap_latest(path: str, body: bytes) -> bytes:
        return json.dumps(other).encode() if path.startswith("/v1/latest/") else body

    with _proxied(hub.server.url, swap_latest) as url, HubClient(url, hub.alice, hub.key) as mitm:
        with pytest.raises(
            VerificationError, match="answered 'tasks/sort-desc' for the latest adapter under global/case/"
        ):
            mitm.latest("global/case")

    def roll_back(path: str, body: bytes) -> bytes:
        latest = path.startswith("/v1/adapters/tasks/rolling") and "version=" not in path
        return json.dumps(old).encode() if latest else body

    # before: v1 for v2 into a fresh directory was accepted (validly signed); now the "latest"
    # answer must be signed over this request's nonce, and the recorded v1 is not
    with _proxied(hub.server.url, roll_back) as url, HubClient(url, hub.alice, hub.key) as mitm:
        with pytest.raises(VerificationError, match="not signed over this request's nonce"):
            mitm.pull("tasks/rolling", tmp_path / "fresh")
        assert not (tmp_path / "fresh").exists()
        assert mitm.pull("tasks/rolling", tmp_path / "rolling", version=1).version == 1  # asked for: fine
    with hub.client(hub.alice) as alice:  # a genuine fresh answer, recorded, then replayed seconds later
        recorded = alice.record("tasks/rolling")
        assert recorded["version"] == 2 and "fresh" in recorded

    def replay(path: str, body: bytes) -> bytes:
        latest = path.startswith("/v1/adapters/tasks/rolling") and "version=" not in path
        return json.dumps(recorded).encode() if latest else body

    with _proxied(hub.server.url, replay) as url, HubClient(url, hub.alice, hub.key) as mitm:
        with pytest.raises(VerificationError, match="not signed over this request's nonce"):
            mitm.record("tasks/rolling")

    # a hub that itself answers an older version as the latest (its key signs anything): a client
    # keeping its marks refuses it in any directory, once it accepted the newer one
    seen = SeenVersions(tmp_path / "seen.json")
    signing_key = hub.dir.registry().signing_key

    def signed_anew(where: str, record: dict[str, Any], asked: str) -> Any:
        """A proxy rewrite: the answer to the latest of ``asked`` (requests to ``where``) is
        ``record``, signed over the request's own nonce with the hub's key (a bad hub)."""

        def rewrite(path: str, body: bytes) -> bytes:
            if not (path.startswith(where) and "version=" not in path):
                return body
            nonce = path.split("nonce=", 1)[1].split("&", 1)[0]
            fresh = sign_freshness(signing_key, nonce, asked, record["name"], record["version"])
            return json.dumps(record | {"fresh": fresh}).encode()

        return rewrite

    bad_hub = signed_anew("/v1/adapters/tasks/rolling", old, "tasks/rolling")

    with HubClient(hub.server.url, hub.alice, hub.key, seen=seen) as alice:
        assert alice.pull("tasks/rolling", tmp_path / "marked").version == 2
    with _proxied(hub.server.url, bad_hub) as url, HubClient(url, hub.alice, hub.key, seen=seen) as fooled:
        with pytest.raises(VerificationError, match="this client accepted tasks/rolling v2 before"):
            fooled.pull("tasks/rolling", tmp_path / "elsewhere")
        assert not (tmp_path / "elsewhere").exists()
    with _proxied(hub.server.url, bad_hub) as url, HubClient(url, hub.alice, hub.key) as forgetful:
        assert forgetful.pull("tasks/rolling", tmp_path / "elsewhere").version == 1  # without marks: fooled
    assert json.loads((tmp_path / "seen.json").read_text())  # kept in a file, across directories

    # the same for the latest round of a run: round 7 replayed, or answered by a bad hub, after 8
    with hub.client(hub.operator) as op:
        round7 = op.record("global/case/7")
        op.publish_dir("global/case/8", adapters[0], _provenance(run="case", round=8))

    old_round = signed_anew("/v1/latest/global/case", round7, "global/case")

    with HubClient(hub.server.url, hub.alice, hub.key, seen=seen) as alice:
        assert alice.latest("global/case")["name"] == "global/case/8"
    with _proxied(
        hub.server.url, lambda path, body: json.dumps(round7).encode() if "/v1/latest/" in path else body
    ) as url:
        with HubClient(url, hub.alice, hub.key) as mitm, pytest.raises(VerificationError, match="nonce"):
            mitm.latest("global/case")
    with _proxied(hub.server.url, old_round) as url, HubClient(url, hub.alice, hub.key, seen=seen) as fooled:
        with pytest.raises(VerificationError, match="global/case/7 as the latest under global/case/, older than"):
            fooled.latest("global/case")
    assert stat.S_IMODE((tmp_path / "seen.json").stat().st_mode) == 0o600
    (tmp_path / "rolling" / "notes.txt").write_text("mine")
    with hub.client(hub.alice) as alice, pytest.raises(ValueError, match="or holds other files"):
        alice.pull("tasks/rolling", tmp_path / "rolling")
    assert (tmp_path / "rolling" / "notes.txt").read_text() == "mine"


def test_tampered_manifest_and_foreign_key_are_refused(hub: Hub, adapters: tuple[Path, Path], tmp_path: Path) -> None:
    with hub.client(hub.operator) as op:
        op.publish_dir("tasks/forged", adapters[0], _provenance(epsilon=1.0, privacy_unit="one example"))
    db = sqlite3.connect(hub.dir.root / "hub.db")
    with db:  # an attacker with database access raises the claimed privacy
        forged = "replace(manifest, '\"epsilon\":1.0', '\"epsilon\":0.1')"
        db.execute(f"UPDATE adapters SET manifest = {forged} WHERE name = 'tasks/forged'")
    db.close()
    with hub.client(hub.alice) as alice:
        record = alice.record("tasks/forged")
        assert '"epsilon":0.1' in record["manifest"]
        with pytest.raises(VerificationError, match="does not verify against the hub's public key"):
            alice.pull("tasks/forged", tmp_path / "out")
    other = HubDir.init(tmp_path / "other", HubSettings())[0]
    with HubClient(hub.server.url, hub.alice, load_public_key(other.public_key_path)) as wrong_key:
        with pytest.raises(VerificationError, match="does not verify"):
            wrong_key.pull("tasks/sort-desc", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_signed_manifest_of_another_name_is_refused(hub: Hub) -> None:
    from fedlora.hub.sdk.manifest import verify_record

    with hub.client(hub.alice) as alice:
        record = alice.record("tasks/sort-desc")
    with pytest.raises(VerificationError, match="when tasks/other was asked for"):
        verify_record(record, hub.key, "tasks/other")


def test_base_model_hash_mismatch_on_pull(hub: Hub, tmp_path: Path) -> None:
    other = tmp_path / "other-base"
    shutil.copytree(default_model_dir(), other)
    weights = other / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with hub.client(hub.alice) as alice:
        with pytest.raises(VerificationError, match="was trained on base model fedlora/embedded-base"):
            alice.pull("tasks/sort-desc", tmp_path / "out", base_model_dir=other)
    assert not (tmp_path / "out").exists()


def _config(files: dict[str, bytes], **change: Any) -> bytes:
    return json.dumps({**json.loads(files["adapter_config.json"]), **change}).encode()


def _post(hub: Hub, token: str, name: str, body: bytes) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
    return httpx.post(f"{hub.server.url}/v1/adapters/{name}", content=body, headers=headers, timeout=30)


def test_bad_uploads_are_refused_with_reasons_and_nothing_is_lost(
    hub: Hub, adapters: tuple[Path, Path], tmp_path: Path
) -> None:
    one, _ = adapters
    files = read_adapter_dir(one)
    with hub.client(hub.operator) as op:
        op.publish("tasks/keep", files, _provenance())

    def body(files: dict[str, bytes], prov: dict[str, Any]) -> bytes:
        return json.dumps(
            {"provenance": prov, "files": {k: base64.b64encode(v).decode() for k, v in files.items()}}
        ).encode()

    bad_weights = dict(files, **{"adapter_model.safetensors": files["adapter_model.safetensors"][:-7]})
    nan_path = tmp_path / "nan.safetensors"
    save_file({"base_model.model.x.lora_A.weight": torch.full((4, 8), float("nan"))}, str(nan_path))
    not_lora = dict(files, **{"adapter_config.json": json.dumps({"peft_type": "PREFIX_TUNING"}).encode()})
    cases = [
        (body(bad_weights, _provenance()), 400, "adapter_model.safetensors is not a valid safetensors file"),
        (body(dict(files, **{"adapter_model.safetensors": nan_path.read_bytes()}), _provenance()), 400, "NaN"),
        (body(not_lora, _provenance()), 400, "the hub stores LORA adapters"),
        (
            body({"adapter_config.json": files["adapter_config.json"]}, _provenance()),
            400,
            "adapter_model.safetensors is missing",
        ),
        (body(dict(files, **{"../../etc/passwd": b"x"}), _provenance()), 400, "unexpected file"),
        (
            body(files, {**_provenance(), "base_model": {"id": "llama-7b", "sha256": "0" * 64}}),
            400,
            "unknown base model 'llama-7b'",
        ),
        (
            body(files, {**_provenance(), "base_model": {"id": "fedlora/embedded-base", "sha256": "1" * 64}}),
            400,
            "the hub knows that id",
        ),
        (body(files, {"producer": "x"}), 400, "needs base_model"),
        (body(files, {**_provenance(), "epsilon": 1.0}), 400, "must state its privacy_unit"),
        (body(files, {**_provenance(), "owner": "me"}), 400, "unknown provenance field"),
        (b"not json", 400, "not JSON"),
        (b"[" * 100_000, 400, "nested too deeply"),
        (
            body(dict(files, **{"adapter_config.json": _config(files, rank_pattern=["q_proj"])}), _provenance()),
            400,
            "rank_pattern must map",
        ),
        (
            body(dict(files, **{"adapter_config.json": _config(files, lora_alpha=float("nan"))}), _provenance()),
            400,
            "lora_alpha must be a finite",
        ),
        (body(files, {**_provenance(), "extra": {"x": "y" * 70_000}}), 400, "more than 65536"),
        (b"x" * (2 << 20), 413, "exceeds the hub's limit of 1048576 bytes"),
    ]
    blobs_before = sorted(hub.dir.blob_dir.rglob("*"))
    for payload, status, reason in cases:
        r = _post(hub, hub.operator, "tasks/keep", payload)
        assert (r.status_code, r.json()["status"]) == (status, status), (reason, r.text)
        assert reason in r.json()["error"], (reason, r.json())
    for name, reason in (
        ("clients/alice/..", "a clients name has the form"),  # the URL's '..' collapsed: still refused
        ("tasks/a/b", "has the form tasks/<name>"),
        ("secrets/x", "unknown namespace"),
        ("global/run/latest", "round number"),
        ("clients/alice/%2e%2e", "not a valid name"),
    ):
        r = _post(hub, hub.operator, name, body(files, _provenance()))
        assert r.status_code == 400 and reason in r.json()["error"], (name, r.text)
    r = httpx.get(
        f"{hub.server.url}/v1/adapters/tasks/keep",
        params={"version": str(2**63)},
        headers={"authorization": f"Bearer {hub.alice}"},
    )
    assert r.status_code == 422 and "version" in r.json()["error"]
    r = httpx.get(
        f"{hub.server.url}/v1/adapters/tasks/keep",
        params={"version": "x"},
        headers={"authorization": f"Bearer {hub.alice}"},
    )
    assert r.status_code == 422 and "version" in r.json()["error"]
    with hub.client(hub.alice) as alice:
        assert alice.record("tasks/keep")["version"] == 1  # every refusal left the stored adapter alone
        assert torch.equal(_logits(alice.pull("tasks/keep", tmp_path / "kept").path), _logits(one))
    assert sorted(hub.dir.blob_dir.rglob("*")) == blobs_before  # and wrote no blob: checks come first
    assert "refused POST /v1/adapters/tasks/keep: unknown base model" in hub.server.log.read_text()


def test_concurrent_publishes_of_one_name_stay_consistent(
    hub: Hub, adapters: tuple[Path, Path], tmp_path: Path
) -> None:
    variants = [adapter_files(adapters[i % 2], f"variant-{i}") for i in range(12)]

    def publish(i: int) -> dict[str, Any]:
        with hub.client(hub.operator) as op:
            return op.publish("tasks/busy", variants[i], _provenance(description=f"variant {i}"))

    with ThreadPoolExecutor(max_workers=6) as pool:
        records = list(pool.map(publish, range(12)))
    assert sorted(r["version"] for r in records) == list(range(1, 13))
    with hub.client(hub.alice) as alice:
        assert alice._request("GET", "/v1/versions/tasks/busy").json()["versions"] == list(range(1, 13))
        for r in records:  # every version is the publish that got it, intact
            pulled = alice.pull("tasks/busy", tmp_path / f"v{r['version']}", version=r["version"])
            i = int(pulled.manifest["provenance"]["description"].split()[1])
            assert read_adapter_dir(pulled.path) == variants[i]
    db = sqlite3.connect(hub.dir.root / "hub.db")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert db.execute(
        "SELECT COUNT(*) FROM adapter_files f JOIN adapters a ON a.id = f.adapter_id WHERE a.name = 'tasks/busy'"
    ).fetchone() == (24,)
    db.close()


def test_registry_survives_a_restart_and_a_corrupt_blob_is_not_served(
    hub: Hub, adapters: tuple[Path, Path], tmp_path: Path
) -> None:
    with hub.client(hub.alice) as alice:
        before = {r["name"]: r["version"] for r in alice.list()}
    hub.server.stop()
    hub.server.start()
    with hub.client(hub.alice) as alice:
        assert {r["name"]: r["version"] for r in alice.list()} == before
        manifest = json.loads(alice.record("tasks/tamper")["manifest"])
        pulled = alice.pull("tasks/tamper", tmp_path / "again")
        assert pulled.version == 1
    sha = manifest["files"]["adapter_model.safetensors"]["sha256"]
    blob = hub.dir.blob_dir / "sha256" / sha[:2] / sha
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.write_bytes(bytes(data))
    hub.server.stop()  # a fresh process: nothing cached, the blob is read (and checked) from disk
    hub.server.start()
    with hub.client(hub.alice) as alice:
        with pytest.raises(HubRequestError, match="is corrupt") as err:
            alice.pull("tasks/tamper", tmp_path / "corrupt")
        assert err.value.status == 500
    assert not (tmp_path / "corrupt").exists()
    assert f"stored blob {sha} is corrupt" in hub.server.log.read_text()
    with hub.client(hub.operator) as op:  # publishing the same content again repairs the stored copy
        op.publish_dir("tasks/tamper", adapters[0], _provenance())
    assert __import__("hashlib").sha256(blob.read_bytes()).hexdigest() == sha
    with hub.client(hub.alice) as alice:
        assert alice.pull("tasks/tamper", tmp_path / "repaired", version=1).version == 1


FL_SIM_TINY = [
    "--clients", "3", "--local-steps", "4", "--num-train", "64", "--num-test", "16",
    "--tasks", "adddigit-4,rotate-2,repeat-3", "--partition", "tasks-per-client",
]  # fmt: skip


@pytest.mark.flower
def test_fl_sim_publishes_every_round_and_the_final_adapter(
    hub: Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import subprocess
    import sys

    from safetensors.torch import load_file

    from fedlora.privacy.accounting import compute_epsilon
    from fedlora.privacy.ledger import PrivacyLedger

    run = tmp_path / "hubrun"
    argv = [
        sys.executable,
        "-m",
        "fedlora.simulations.cli",
        *FL_SIM_TINY,
        "--rounds",
        "3",
        "--epsilon",
        "8",
        "--out",
        str(run),
    ]
    argv += ["--hub", hub.server.url, "--hub-token-file", str(hub.dir.operator_token_path)]
    argv += ["--hub-key", str(hub.dir.public_key_path), "--hub-every-round"]
    argv += ["--run-config", "personalize.steps=4 personalize.epsilon=2.0"]  # then each client personalises
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "published round 3 to the hub as global/hubrun/3 v1" in done.stdout
    report = json.loads((run / "report" / "privacy.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    with hub.client(hub.alice) as alice:
        assert [r["name"] for r in alice.list("global/hubrun")] == [
            "global/hubrun/1",
            "global/hubrun/2",
            "global/hubrun/3",
        ]
        final = alice.pull("global/hubrun/3", tmp_path / "final")
        for r in (1, 2):
            prov = json.loads(alice.record(f"global/hubrun/{r}")["manifest"])["provenance"]
            assert prov["extra"]["final"] is False and prov["round"] == r
            assert prov["epsilon"] == rows[r]["train"]["epsilon-max"]  # the clients' largest so far
    prov = final.manifest["provenance"]
    assert prov["extra"]["final"] is True and prov["strategy"] == "ffa-lora" and prov["run"] == "hubrun"
    assert (prov["epsilon"], prov["delta"]) == (report["epsilon_max"], report["delta"])
    assert prov["privacy_unit"] == report["privacy_unit"] and prov["privacy_report"]["dp_enabled"] is True
    assert prov["producer"].startswith("fl-sim ") and "server-exact-match" in prov["evaluation"]
    ours = load_file(str(run / "adapters" / "global" / "adapter_model.safetensors"))
    pulled = load_file(str(final.path / "adapter_model.safetensors"))
    assert ours.keys() == pulled.keys() and all(torch.equal(ours[k], pulled[k]) for k in ours)
    assert torch.equal(_logits(final.path), _logits(run / "adapters" / "global"))
    # the end of the run: every virtual client personalised the final adapter, charged to its ledger
    summary = json.loads((run / "personalize.json").read_text())
    assert (summary["asked"], summary["personalised"], summary["steps"]) == (3, 3, 4)
    with hub.client(hub.operator) as op:
        for p in range(3):
            ledger = PrivacyLedger(run / "client-state" / f"partition-{p}")
            entries = ledger.entries()
            assert len(entries) == 4 and entries[-1].run_id.startswith("personalize-")  # 3 rounds, then this
            personal = op.pull(f"clients/partition-{p}/hubrun", tmp_path / f"personal-{p}")
            prov = personal.manifest["provenance"]
            assert prov["epsilon"] == pytest.approx(compute_epsilon(ledger.history(), prov["delta"], "rdp"), rel=1e-12)
            assert prov["extra"]["personalization"]["epsilon"] <= 2.0 + 1e-6
            assert prov["extra"]["global_adapter"]["name"] == "global/hubrun/3"
            assert torch.equal(_logits(personal.path), _logits(run / "personal" / f"partition-{p}"))
    assert "published personal adapters: clients/partition-0/hubrun v1" in done.stdout

    # fl-sim evaluated every personal adapter on every client's split in one batched pass: its
    # diagonal is what each client measured itself with PEFT
    personal_eval = json.loads((run / "report" / "personal.json").read_text())
    assert personal_eval["adapters"] == ["global", "partition-0", "partition-1", "partition-2"]
    diagonal = [personal_eval["exact_match"][p + 1][p] for p in range(3)]
    assert sorted(diagonal) == sorted(c["personal-exact-match"] for c in summary["clients"])
    assert sorted(personal_eval["exact_match"][0]) == sorted(c["global-exact-match"] for c in summary["clients"])
    assert "personal adapters on their own clients' test splits" in done.stdout

    # fl-hub evaluate: the three personal adapters from the hub (verified), scored in one batch,
    # the same as PEFT scores each pulled adapter
    from fedlora.core.data import encode
    from fedlora.core.model_dirs import load_tokenizer
    from fedlora.core.train import evaluate
    from fedlora.hub.cli import main as fl_hub
    from fedlora.hub.evaluate import load_examples

    capsys.readouterr()
    argv = ["evaluate", "clients/", "--data", "embedded:rotate-2", "--num-examples", "12", "--json"]
    argv += ["--hub", hub.server.url, "--token-file", str(hub.dir.operator_token_path)]
    assert fl_hub([*argv, "--hub-key", str(hub.dir.public_key_path)]) == 0
    scores = [s for s in json.loads(capsys.readouterr().out)["scores"] if s["name"].endswith("/hubrun")]
    assert sorted(s["name"] for s in scores) == [f"clients/partition-{p}/hubrun" for p in range(3)]
    tok = load_tokenizer()
    data = encode(tok, load_examples("embedded:rotate-2", 12, 0), 64)
    for s in scores:
        p = int(s["name"].split("/")[1].removeprefix("partition-"))
        want = evaluate(PeftModel.from_pretrained(load_base_model(), str(tmp_path / f"personal-{p}")), data, 0)
        assert s["exact_match"] == want.exact_match and s["loss"] == pytest.approx(want.loss, rel=1e-5)
    assert fl_hub(argv) == 2  # without the hub's key nothing is fetched unverified
    assert "needs --hub-key" in capsys.readouterr().err


def test_a_hub_that_is_down_does_not_fail_the_run_but_the_exit_status_says_so(
    hub: Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rich.console import Console

    from fedlora.core.cli import report_published
    from fedlora.core.flower_runner import free_port
    from fedlora.hub.sdk.publish import HubTarget, RunPublisher

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"strategy": "fedavg-lora", "dp.enabled": False}))
    (run / "metrics.jsonl").write_text(json.dumps({"round": 0}) + "\n" + json.dumps({"round": 1}) + "\n")
    _adapter(run / "adapters" / "global", 3)
    down = RunPublisher(HubTarget(f"http://127.0.0.1:{free_port()}", hub.operator), run, "tests")
    assert report_published(down, 1, Console()) == 3
    err = capsys.readouterr().err
    assert "cannot reach the hub" in err and f"retry with: fl-hub publish-run {run}" in err
    up = RunPublisher(HubTarget(hub.server.url, hub.operator, hub.key), run, "tests")
    assert report_published(up, 1, Console()) == 0
    with hub.client(hub.alice) as alice:
        prov = json.loads(alice.record("global/run/1")["manifest"])["provenance"]
    assert prov["privacy_unit"] == "none: trained without differential privacy" and prov["epsilon"] is None


def test_personalize_pull_global_charge_push_and_pull_from_another_device(
    hub: Hub, adapters: tuple[Path, Path], tmp_path: Path
) -> None:
    from fedlora.client.cli import main as fl_client
    from fedlora.privacy.accounting import compute_epsilon
    from fedlora.privacy.ledger import PrivacyLedger

    with hub.client(hub.operator) as op:
        op.publish(
            "global/fed/5",
            adapter_files(adapters[1], "fedlora/embedded-base"),
            _provenance(run="fed", round=5, strategy="ffa-lora"),
        )
    phone = hub.dir.registry().create_token("client", "alice", "phone")  # a second device of the same client
    token_file = tmp_path / "alice.token"
    token_file.write_text(hub.alice + "\n")
    token_file.chmod(0o600)
    state = tmp_path / "state"
    argv = [
        "personalize",
        "--global",
        "fed",
        "--hub",
        hub.server.url,
        "--token-file",
        str(token_file),
        "--hub-key",
        str(hub.dir.public_key_path),
    ]
    argv += [
        "--data",
        "embedded:rotate-2",
        "--state-dir",
        str(state),
        "--out",
        str(tmp_path / "personal"),
        "--name",
        "alice",
    ]
    argv += ["--steps", "4", "--epsilon", "2", "--push", "rotate"]
    assert fl_client(argv) == 0
    ledger = PrivacyLedger(state)
    assert len(ledger.entries()) == 1
    with hub.client(phone) as other:
        pulled = other.pull("clients/alice/rotate", tmp_path / "on-the-phone")
    prov = pulled.manifest["provenance"]
    assert prov["epsilon"] == pytest.approx(compute_epsilon(ledger.history(), prov["delta"], "rdp"), rel=1e-12)
    assert prov["epsilon"] <= 2.0 + 1e-6 and prov["accountant"] == "rdp"
    assert prov["extra"]["global_adapter"]["name"] == "global/fed/5" and (prov["run"], prov["round"]) == ("fed", 5)
    # under DP the scores and the training-set size stay on the device (its default privacy policy)
    assert prov.get("evaluation") is None and "num_train" not in prov["extra"]["personalization"]
    assert pulled.manifest["published_by"] == "client alice"
    assert torch.equal(_logits(pulled.path), _logits(tmp_path / "personal"))
    assert not torch.equal(_logits(pulled.path), _logits(adapters[1]))  # it was fine-tuned
    with hub.client(hub.bob) as bob, pytest.raises(HubRequestError, match="may not read clients/alice/rotate"):
        bob.record("clients/alice/rotate")
    over = [*argv[: argv.index("--push")], "--max-epsilon", "2.05", "--out", str(tmp_path / "second")]
    assert (
        fl_client(over) == 2
    )  # a second personalisation would take the lifetime epsilon (1.99) past 2.05 (to about 2.10)
    assert len(PrivacyLedger(state).entries()) == 1 and not (tmp_path / "second").exists()


def test_two_server_processes_on_one_registry_stay_consistent(
    hub: Hub, adapters: tuple[Path, Path], tmp_path: Path
) -> None:
    """A second ``fl-hub serve`` (2 workers) on the same directory: publishes through both, at
    once, get distinct versions; a revocation through one is seen by the other."""
    second = HubServer(hub.dir.root, tmp_path / "second.log", workers=2).start()
    try:
        urls = [hub.server.url, second.url]

        def publish(i: int) -> int:
            with HubClient(urls[i % 2], hub.operator, hub.key) as op:
                record = op.publish("tasks/two-servers", adapter_files(adapters[i % 2], f"v{i}"), _provenance())
            return int(record["version"])

        with ThreadPoolExecutor(max_workers=8) as pool:
            versions = sorted(pool.map(publish, range(16)))
        assert versions == list(range(1, 17))
        token = hub.dir.registry().create_token("client", "dave")
        for url in urls:  # every server process caches dave's token ...
            with HubClient(url, token, hub.key) as dave:
                for _ in range(6):
                    assert dave.record("tasks/two-servers")["version"] == 16
        assert (
            hub.dir.registry().revoke_tokens(client="dave") == 1
        )  # ... and a revocation from elsewhere reaches them all
        for url in urls:
            with HubClient(url, token, hub.key) as dave:
                for _ in range(6):
                    with pytest.raises(HubRequestError, match="token revoked"):
                        dave.record("tasks/two-servers")
    finally:
        second.stop()


def test_an_image_classifier_run_is_published_and_pulled_with_its_head(hub: Hub, tmp_path: Path) -> None:
    import subprocess
    import sys

    from transformers import AutoModelForImageClassification

    from fedlora.core.embedded import default_vision_model_dir

    vision = describe_base_model(default_vision_model_dir())
    hub.dir.registry().add_base_model(vision.id, vision.sha256)  # the operator's fl-hub base-model add
    run = tmp_path / "vision"
    argv = [sys.executable, "-m", "fedlora.simulations.cli", "--kind", "image-cls", "--no-dp", "--quiet"]
    argv += ["--clients", "2", "--rounds", "1", "--local-steps", "3", "--num-train", "40", "--num-test", "8"]
    argv += ["--tasks", "digits-rotate,digits-invert", "--batch-size", "8", "--out", str(run)]
    argv += ["--hub", hub.server.url, "--hub-token-file", str(hub.dir.operator_token_path)]
    argv += ["--hub-key", str(hub.dir.public_key_path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    with hub.client(hub.alice) as alice:
        with pytest.raises(VerificationError, match="base model"):  # not the byte Llama's adapter
            alice.pull("global/vision/1", tmp_path / "wrong")
        pulled = alice.pull("global/vision/1", tmp_path / "pulled", base_model_dir=default_vision_model_dir())
    assert pulled.manifest["adapter"]["rank"] == 8
    assert pulled.manifest["provenance"]["base_model"]["id"] == "fedlora/embedded-vit-digits"
    config = json.loads((pulled.path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]

    def logits(adapter: Path) -> torch.Tensor:
        base = AutoModelForImageClassification.from_pretrained(
            str(default_vision_model_dir()), num_labels=10, local_files_only=True
        )
        with torch.no_grad():
            return PeftModel.from_pretrained(base, str(adapter))(pixel_values=torch.ones(2, 1, 16, 16)).logits

    assert torch.equal(logits(pulled.path), logits(run / "adapters" / "global"))
