"""The hub's pure parts: names and scopes, manifests and signatures, provenance and adapter
checks, settings; and the ``fl-hub`` / ``fl-client`` commands against a real server."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.numpy import save as save_numpy
from safetensors.torch import save as save_torch

from fedlora.hub.hub_dir import HubDir, HubSettings
from fedlora.hub.sdk.manifest import (
    DOMAIN,
    AdapterInfo,
    BaseModel,
    Provenance,
    VerificationError,
    build_manifest,
    canonical,
    check_adapter_files,
    describe_base_model,
    sign,
    verify_file,
    verify_record,
    weights_sha256,
)
from fedlora.hub.sdk.names import Principal, check_name, check_prefix
from fedlora.hub.store import Registry, Unauthorized

CONFIG = json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}).encode()


def _weights(rank: int = 2, dtype: torch.dtype = torch.float32) -> bytes:
    return save_torch(
        {
            "base_model.model.q_proj.lora_A.weight": torch.ones(rank, 8, dtype=dtype),
            "base_model.model.q_proj.lora_B.weight": torch.zeros(8, rank, dtype=dtype),
        }
    )


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "an adapter name is required"),
        ("models/x", "unknown namespace 'models'"),
        ("clients/alice", "has the form clients/<client>/<name>"),
        ("clients/alice/..", "not a valid name"),
        ("clients/alice/.hidden", "not a valid name"),
        ("clients/alice/a..b", "not a valid name"),
        ("tasks/" + "x" * 65, "not a valid name"),
        ("tasks/a b", "not a valid name"),
        ("tasks/a\\b", "not a valid name"),
        ("global/run/final", "round number"),
        ("global/run", "has the form global/<run>/<round>"),
    ],
)
def test_bad_names_are_refused_with_the_reason(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_name(name)


def test_good_names_and_prefixes() -> None:
    for name in ("global/sim/8", "clients/alice/math-v2", "tasks/sort_desc", "generated/3f2a.1"):
        assert check_name(name) == name
    for prefix in ("", "global", "global/sim", "clients/alice/", "tasks"):
        assert check_prefix(prefix) == prefix
    with pytest.raises(ValueError, match="longer than a tasks name"):
        check_prefix("tasks/a/b")


def test_scopes_matrix() -> None:
    alice, op = Principal("client", "alice"), Principal("operator")
    readable = {
        n: alice.can_read(n) for n in ("global/r/1", "tasks/t", "generated/g", "clients/alice/x", "clients/bob/x")
    }
    assert readable == {
        "global/r/1": True,
        "tasks/t": True,
        "generated/g": True,
        "clients/alice/x": True,
        "clients/bob/x": False,
    }
    writable = {n: alice.can_write(n) for n in readable}
    assert writable == {n: n == "clients/alice/x" for n in readable}
    assert all(op.can_read(n) and op.can_write(n) for n in readable)
    with pytest.raises(ValueError, match="client name"):
        Principal("client", "../etc")
    with pytest.raises(ValueError, match="belongs to no client"):
        Principal("operator", "alice")


def test_canonical_sign_verify_round_trip_and_every_alteration_fails() -> None:
    key = Ed25519PrivateKey.generate()
    files = {"adapter_config.json": CONFIG, "adapter_model.safetensors": _weights()}
    prov = Provenance(BaseModel("m", "a" * 64), "tests", epsilon=1.5, delta=1e-5, privacy_unit="one example")
    manifest = canonical(build_manifest("tasks/t", 3, files, check_adapter_files(files), prov, "now", "operator"))
    assert manifest == canonical(json.loads(manifest))  # canonical form is a fixed point
    assert b" " not in manifest.replace(b"one example", b"")
    record = {"manifest": manifest.decode(), "signature": sign(key, manifest)}
    m = verify_record(record, key.public_key(), "tasks/t", 3)
    assert m["files"]["adapter_model.safetensors"]["size"] == len(files["adapter_model.safetensors"])
    verify_file(m, "adapter_model.safetensors", files["adapter_model.safetensors"])
    with pytest.raises(VerificationError, match="does not match its signed hash"):
        verify_file(m, "adapter_model.safetensors", files["adapter_model.safetensors"][:-1] + b"\x01")
    altered = {**record, "manifest": record["manifest"].replace('"epsilon":1.5', '"epsilon":0.5')}
    with pytest.raises(VerificationError, match="does not verify"):
        verify_record(altered, key.public_key(), "tasks/t")
    with pytest.raises(VerificationError, match="does not verify"):
        verify_record(record, Ed25519PrivateKey.generate().public_key(), "tasks/t")
    with pytest.raises(VerificationError, match="v3 when tasks/t v4 was asked for"):
        verify_record(record, key.public_key(), "tasks/t", 4)
    # the domain separator: a signature over the bare manifest is not a manifest signature
    bare = {**record, "signature": __import__("base64").b64encode(key.sign(manifest)).decode()}
    with pytest.raises(VerificationError, match="does not verify"):
        verify_record(bare, key.public_key(), "tasks/t")
    assert key.public_key().verify(__import__("base64").b64decode(record["signature"]), DOMAIN + manifest) is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"producer": ""}, "producer must name"),
        ({"round": "3"}, "round must be int"),
        ({"round": True}, "round must be int"),
        ({"epsilon": -1.0, "privacy_unit": "x"}, "epsilon must be a finite number >= 0"),
        ({"epsilon": float("inf"), "privacy_unit": "x"}, "finite"),
        ({"delta": 1.0}, "delta must be < 1"),
        ({"epsilon": 1.0}, "must state its privacy_unit"),
        ({"description": "x" * 4001}, "longer than 4000"),
        ({"extra": {"x": float("nan")}}, "Out of range float values"),
    ],
)
def test_provenance_is_validated(change: dict[str, object], message: str) -> None:
    values = {"base_model": {"id": "m", "sha256": "a" * 64}, "producer": "tests", **change}
    with pytest.raises(ValueError, match=message):
        Provenance.from_mapping(values)


def test_provenance_base_model_and_unknown_fields() -> None:
    with pytest.raises(ValueError, match="64 lower-case hex"):
        Provenance.from_mapping({"base_model": {"id": "m", "sha256": "A" * 64}, "producer": "p"})
    with pytest.raises(ValueError, match=r"unknown provenance field\(s\) colour"):
        Provenance.from_mapping({"base_model": {"id": "m", "sha256": "a" * 64}, "producer": "p", "colour": 1})


def test_adapter_checks() -> None:
    files = {"adapter_config.json": CONFIG, "adapter_model.safetensors": _weights()}
    assert check_adapter_files(files) == AdapterInfo("LORA", 2, 4.0, ["q_proj", "v_proj"], 32, 2)
    bf16 = check_adapter_files({**files, "adapter_model.safetensors": _weights(dtype=torch.bfloat16)})
    assert bf16.num_parameters == 32
    cases = [
        ({"adapter_model.safetensors": _weights(rank=3)}, "has rank 3, but adapter_config.json says r = 2"),
        ({"adapter_model.safetensors": save_numpy({"lora_A.weight": np.ones((2, 8), np.int32)})}, "floating type"),
        ({"adapter_model.safetensors": save_numpy({"embed.weight": np.ones((2, 8), np.float32)})}, "neither a LoRA"),
        ({"adapter_config.json": b"{"}, "not valid JSON"),
        ({"adapter_config.json": json.dumps({"peft_type": "LORA", "r": 0}).encode()}, "r must be a positive integer"),
        ({"adapter_config.json": json.dumps({"peft_type": "LORA", "r": 2}).encode()}, "target_modules must name"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            check_adapter_files({**files, **change})


def test_weights_hash_is_the_embedded_models_and_moves_with_any_byte(tmp_path: Path) -> None:
    from fedlora.core.embedded import default_model_dir

    base = describe_base_model()
    assert base.id == "fedlora/embedded-base" and base.sha256 == weights_sha256(default_model_dir())
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    first = weights_sha256(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"abd")
    assert weights_sha256(tmp_path) != first
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors weights"):
        weights_sha256(tmp_path / "missing")


def test_settings_and_hub_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"port must be 1\.\.65535"):
        HubSettings(port=0)
    with pytest.raises(ValueError, match="max-upload-mb"):
        HubSettings(max_upload_mb=0)
    with pytest.raises(ValueError, match="tls-cert and tls-key go together"):
        HubSettings(tls_cert="c.pem")
    hub, kid = HubDir.init(tmp_path / "h", HubSettings(port=9999))
    assert kid.startswith("SHA256:") and hub.settings().port == 9999
    assert oct(hub.key_path.stat().st_mode & 0o777) == "0o600"
    assert oct(hub.operator_token_path.stat().st_mode & 0o777) == "0o600"
    # every client's personal adapter lives here: the directory, database and blobs are the hub's
    assert oct(hub.root.stat().st_mode & 0o777) == "0o700"
    assert oct((hub.root / "hub.db").stat().st_mode & 0o777) == "0o600"
    digest = hub.registry().blobs.put(b"a personal adapter")
    assert oct(hub.registry().blobs.path(digest).stat().st_mode & 0o777) == "0o600"
    hub.root.chmod(0o755)  # a hub made before these modes is tightened when opened
    (hub.root / "hub.db").chmod(0o644)
    hub.registry()
    assert oct(hub.root.stat().st_mode & 0o777) == "0o700"
    assert oct((hub.root / "hub.db").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(ValueError, match="already holds a hub"):
        HubDir.init(tmp_path / "h", HubSettings())
    hub.settings_path.write_text(hub.settings_path.read_text() + "colour = 'blue'\n")
    with pytest.raises(ValueError, match=r"unknown \[hub\] key\(s\) colour"):
        hub.settings()
    with pytest.raises(FileNotFoundError, match="fl-hub init"):
        HubDir(tmp_path / "nothing").registry()


def test_tokens_are_stored_hashed(tmp_path: Path) -> None:
    hub, _ = HubDir.init(tmp_path / "h", HubSettings())
    registry: Registry = hub.registry()
    token = registry.create_token("client", "alice", "laptop")
    assert token.startswith("flh_") and len(token) > 40
    registry.engine.dispose()  # close the pool: WAL contents go back into hub.db
    stored = b"".join(p.read_bytes() for p in (tmp_path / "h").glob("hub.db*"))
    assert token.encode() not in stored and token[4:20].encode() not in stored
    import sqlite3

    with sqlite3.connect(tmp_path / "h" / "hub.db") as db:
        hashes = [h for (h,) in db.execute("SELECT token_sha256 FROM tokens")]
    assert __import__("hashlib").sha256(token.encode()).hexdigest() in hashes
    assert registry.authenticate(token) == Principal("client", "alice", "laptop")
    assert [t["client"] for t in registry.tokens()] == [None, "alice"]


# --- commands against a real server ---------------------------------------------------------


@pytest.mark.slow
def test_cli_token_ls_pull_push(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from hub_server import HubServer

    from fedlora.client.cli import main as fl_client
    from fedlora.core.lora_settings import LoraSettings
    from fedlora.core.model import load_base_model, save_adapter, wrap_lora
    from fedlora.hub.cli import main as fl_hub

    assert fl_hub(["init", str(tmp_path / "h")]) == 0  # HTTPS with the hub's own CA, by default
    hub = HubDir(tmp_path / "h")
    assert "give clients" in capsys.readouterr().out
    for secret in (hub.ca_key_path, hub.tls_key_path):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert hub.settings().tls_cert == str(hub.tls_cert_path.resolve())
    ca = str(hub.ca_cert_path)
    alice_file = tmp_path / "alice.token"
    assert (
        fl_hub(["token", "create", str(hub.root), "--client", "alice", "--label", "phone", "--out", str(alice_file)])
        == 0
    )
    assert oct(alice_file.stat().st_mode & 0o777) == "0o600" and "(mode 0600)" in capsys.readouterr().out
    alice = alice_file.read_text().strip()
    assert alice.startswith("flh_")
    adapter = save_adapter(wrap_lora(load_base_model(), LoraSettings(rank=2)), tmp_path / "adapter")
    with HubServer(hub.root, tmp_path / "hub.log", ca=hub.ca_cert_path) as server:
        url, key = server.url, str(hub.public_key_path)
        assert url.startswith("https://")
        token_file = str(hub.operator_token_path)
        publish = ["publish", "tasks/demo", str(adapter), "--hub", url, "--token-file", token_file, "--hub-key", key]
        assert fl_hub(publish) == 2  # the hub's certificate is from its own CA: not trusted without --hub-ca
        assert "CERTIFICATE_VERIFY_FAILED" in capsys.readouterr().err
        assert fl_hub([*publish, "--hub-ca", ca]) == 0
        assert "published tasks/demo v1" in capsys.readouterr().out
        common = ["--hub", url, "--token-file", str(alice_file), "--hub-key", key, "--hub-ca", ca]
        # a token on the command line is refused with the reason (any local account reads ps)
        refused = ["pull", "--hub", url, "--token", alice, "--hub-key", key, "--task", "demo", "--out", "r"]
        assert fl_client(refused) == 2
        assert "--token puts the token where any local account reads it" in capsys.readouterr().err
        assert fl_client(["pull", *common, "--task", "demo", "--out", str(tmp_path / "t")]) == 0
        out = capsys.readouterr().out
        assert "pulled tasks/demo v1" in out and "signature and hashes verified" in out
        assert fl_client(["push", *common, "--personal", "mine", "--adapter", str(tmp_path / "t")]) == 0
        assert "published clients/alice/mine v1" in capsys.readouterr().out
        assert fl_client(["pull", *common, "--personal", "mine", "--out", str(tmp_path / "p")]) == 0
        (tmp_path / "precious").mkdir()
        (tmp_path / "precious" / "notes.txt").write_text("keep me")
        assert fl_client(["pull", *common, "--task", "demo", "--out", str(tmp_path / "precious")]) == 2
        assert (
            "is not an adapter pulled from a hub (or holds other files): refusing to replace it"
            in capsys.readouterr().err
        )
        assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"
        assert fl_client(["pull", *common, "--task", "nope", "--out", str(tmp_path / "n")]) == 2
        assert "hub refused (404): no adapter tasks/nope" in capsys.readouterr().err
        monkeypatch.setenv("FEDLORA_HUB_TOKEN", alice)  # the other way in: the environment
        assert fl_hub(["ls", "--hub", url, "--hub-ca", ca]) == 0
        listing = capsys.readouterr().out
        assert "clients/alice/mine" in listing and "tasks/demo" in listing
        assert fl_hub(["token", "revoke", str(hub.root), "--client", "alice"]) == 0
        assert fl_client(["pull", *common, "--task", "demo", "--out", str(tmp_path / "t2")]) == 2
        assert "token revoked" in capsys.readouterr().err
    assert fl_hub(["ls", "--dir", str(hub.root), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["clients/alice/mine", "tasks/demo"]
    assert fl_hub(["token", "ls", str(hub.root)]) == 0
    assert alice not in capsys.readouterr().out


@pytest.mark.slow
def test_hub_over_tls_is_verified_by_the_ca(tmp_path: Path) -> None:
    from hub_server import HubServer

    from fedlora.core.pki import create_ca, issue_server_certificate, write_certificate, write_private_key_pem
    from fedlora.hub.cli import main as fl_hub
    from fedlora.hub.sdk.client import HubClient, HubRequestError

    ca_key, ca_cert = create_ca()
    key, cert = issue_server_certificate(ca_key, ca_cert, ["hub.example"])
    write_certificate(tmp_path / "ca.pem", ca_cert)
    write_certificate(tmp_path / "hub.pem", cert)
    write_private_key_pem(tmp_path / "hub.key", key)
    argv = [
        "init",
        str(tmp_path / "h"),
        "--tls-cert",
        str(tmp_path / "hub.pem"),
        "--tls-key",
        str(tmp_path / "hub.key"),
    ]
    assert fl_hub(argv) == 0
    assert fl_hub(["init", str(tmp_path / "h2"), "--tls-cert", str(tmp_path / "nothing.pem"), "--tls-key", "k"]) == 2
    assert fl_hub(["init", str(tmp_path / "h3"), "--insecure", "--name", "hub.example"]) == 2
    assert fl_hub(["init", str(tmp_path / "h4"), "--insecure"]) == 0  # plain HTTP only when asked for
    assert HubDir(tmp_path / "h4").settings().tls_cert == "" and not HubDir(tmp_path / "h4").ca_cert_path.exists()
    assert HubDir(tmp_path / "h").settings().tls_cert == str((tmp_path / "hub.pem").resolve())  # its own certificate
    assert not HubDir(tmp_path / "h").ca_cert_path.exists()
    hub = HubDir(tmp_path / "h")
    token = hub.operator_token_path.read_text().strip()
    with HubServer(hub.root, tmp_path / "hub.log", ca=tmp_path / "ca.pem") as server:
        assert server.url.startswith("https://")
        with HubClient(server.url, token, ca=tmp_path / "ca.pem") as client:
            assert client.whoami()["role"] == "operator"
        with (
            HubClient(server.url, token) as untrusting,
            pytest.raises(HubRequestError, match="CERTIFICATE_VERIFY_FAILED"),
        ):
            untrusting.whoami()


def test_a_run_name_from_the_server_cannot_leave_the_state_directory() -> None:
    from fedlora.client.compute import NodeContext, personalize_reply

    context = NodeContext(run_config={}, node_config={}, run_id=1)
    for bad in ("../../home", "/tmp/victim", "a/b"):
        with pytest.raises(ValueError, match="run name"):
            personalize_reply(context, {}, {"run-name": bad, "server-round": 1})


def test_token_cache_is_emptied_by_any_commit_and_never_refilled_with_a_stale_read(tmp_path: Path) -> None:
    """White box: the interleaving a thread pool could produce, replayed step by step."""
    hub, _ = HubDir.init(tmp_path / "h", HubSettings())
    serving, elsewhere = hub.registry(), hub.registry()  # two connections: the server and `fl-hub token revoke`
    token = serving.create_token("client", "erin")
    assert serving.authenticate(token) == Principal("client", "erin")
    assert len(serving._principals) == 1  # cached
    seen = serving._cache_valid()  # request A starts and reads the token (still valid) ...
    assert elsewhere.revoke_tokens(client="erin") == 1  # ... the token is revoked elsewhere ...
    with pytest.raises(Unauthorized, match="token revoked"):  # ... request B sees the change and is refused
        serving.authenticate(token)
    assert not serving._still(seen)  # ... so A may not put what it read back in the cache
    assert serving._principals == {}


@pytest.mark.slow
def test_the_hub_never_imports_torch() -> None:
    """The hub stores and checks files; a server process without torch starts in a fraction of a second."""
    import subprocess
    import sys

    code = (
        "import sys, fedlora.hub.app, fedlora.hub.cli, fedlora.hub.sdk.client, fedlora.hub.sdk.publish, "
        "fedlora.hub.store; "
    )
    code += "print(sorted({'torch', 'opacus', 'peft'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_record_of_versions_seen_is_kept_or_refused_with_the_fix(tmp_path: Path) -> None:
    from fedlora.hub.sdk.seen import SEEN_ENV, SeenVersions, prefix_rank

    seen = SeenVersions(tmp_path / "state" / "seen.json").check()
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    seen.accept("k1", "tasks/t", 3)
    seen.accept("k1", "tasks/t", 2)  # a lower version never lowers the mark
    seen.accept_under("k1", "global/run", prefix_rank("global/run/10", "2026-01-02"))
    seen.accept_under("k1", "global/run", prefix_rank("global/run/9", "2026-01-03"))  # round 10 > round 9
    again = SeenVersions(tmp_path / "state" / "seen.json")
    assert again.highest("k1", "tasks/t") == 3 and again.highest("k2", "tasks/t") == 0  # per hub key
    assert again.newest_under("k1", "global/run") == [10, "2026-01-02"]
    assert stat.S_IMODE(again.path.stat().st_mode) == 0o600
    (tmp_path / "ro").mkdir(mode=0o500)
    if os.geteuid() != 0:  # root writes anywhere
        with pytest.raises(ValueError, match=SEEN_ENV):
            SeenVersions(tmp_path / "ro" / "seen.json").check()
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a record of hub versions seen"):
        SeenVersions(tmp_path / "bad.json").check()
