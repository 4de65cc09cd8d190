"""Serving generators: ``POST /v1/generate`` loads the latest ``generators/<method>`` from the
registry (verified like any blob), generates the adapter, and publishes it, signed, as
``generated/<method>-<hash>`` with provenance naming the generator and its experts. The same
request to the same generator version returns the adapter already stored."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fedlora.hub.generators.base import Generator
from fedlora.hub.generators.embedding import load_task_model
from fedlora.hub.generators.registry import load_generator
from fedlora.hub.sdk.manifest import GENERATOR_FILES, describe_base_model, embedded_text_model_dirs
from fedlora.hub.sdk.names import Principal
from fedlora.hub.sdk.request import GenerationRequest
from fedlora.hub.store import HubError, NotFound, Record, Registry

log = logging.getLogger("fedlora.hub")
#: the hub's own identity when it publishes what it generated
GENERATOR_PRINCIPAL = Principal("operator", label="generator")


class GeneratorService:
    def __init__(self, registry: Registry, base_model_dirs: Sequence[str | Path] = ()) -> None:
        self.registry = registry
        self.base_model_dirs = [Path(p) for p in base_model_dirs]
        self._generators: dict[tuple[str, int], Generator] = {}
        self._task_models: dict[str, Any] = {}
        self._lock = threading.Lock()  # one generation at a time: the CPU is the limit anyway
        self.lock_path = registry.blobs.root / "generate.lock"
        self._base_dirs: dict[str, Path | None] | None = None  # weights hash -> model directory

    def generate(self, principal: Principal, request: GenerationRequest) -> tuple[Record, bool, float]:
        """(the signed record, whether it was created now, milliseconds spent generating)."""
        source = f"generators/{request.method}"
        try:
            generator_record = self.registry.get(GENERATOR_PRINCIPAL, source)
        except NotFound:
            raise HubError(
                f"the hub has no {request.method} generator yet (the operator trains one: "
                f"fl-hub train-generator --method {request.method})",
                404,
            ) from None
        manifest = json.loads(generator_record.manifest)
        base = manifest["provenance"]["base_model"]
        if request.base_model_sha256 is not None and request.base_model_sha256 != base["sha256"]:
            raise HubError(
                f"the {request.method} generator was trained for base model {base['id']} (weights "
                f"{base['sha256'][:16]}...), your base model's weights are {request.base_model_sha256[:16]}...: "
                "its adapters would not fit your model",
                409,
            )
        name = f"generated/{request.method}-{generator_record.version}-{request.key()[:20]}"
        if not principal.can_read(name):
            raise HubError(principal.read_denied(name), 403)
        try:  # already generated: no need to wait for the lock
            return self.registry.get(GENERATOR_PRINCIPAL, name), False, 0.0
        except NotFound:
            pass
        with self._exclusive():  # one generation at a time, and a request that raced ours finds its result
            try:
                return self.registry.get(GENERATOR_PRINCIPAL, name), False, 0.0
            except NotFound:
                pass
            generator = self._load(generator_record, manifest)
            if request.examples and generator.needs_base_model and generator.task_model is None:
                task_type = generator.layout.adapter_config.get("task_type")
                generator.task_model = self._task_model(generator.base_model.sha256, task_type)
            start = time.perf_counter()
            try:
                files = generator.generate(request.description, request.examples)
            except (ValueError, RuntimeError, IndexError) as err:
                log.exception("generation with %s v%d failed", generator_record.name, generator_record.version)
                raise HubError(f"{generator_record.name} v{generator_record.version} failed ({err})", 503) from None
            ms = 1000 * (time.perf_counter() - start)
            provenance = _provenance(request, generator, generator_record, base, ms)
            record = self.registry.publish(GENERATOR_PRINCIPAL, name, files, provenance)
        log.info("generated %s v%d for %s in %.1f ms", record.name, record.version, principal.describe, ms)
        return record, True, ms

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """This process's lock and, for ``fl-hub serve --workers N``, a file lock beside the
        blobs that every worker on the hub directory shares."""
        with self._lock:
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
            with self.lock_path.open("a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)

    def _load(self, record: Record, manifest: dict[str, Any]) -> Generator:
        key = (record.name, record.version)
        if key not in self._generators:
            files = {
                fname: self.registry.blob(GENERATOR_PRINCIPAL, record.name, meta["sha256"])
                for fname, meta in manifest["files"].items()
                if fname in GENERATOR_FILES
            }
            try:
                generator = load_generator(files)
            except (ValueError, KeyError, RuntimeError) as err:
                raise HubError(f"{record.name} v{record.version} cannot be loaded ({err}): retrain it", 503) from None
            self._generators = {k: v for k, v in self._generators.items() if k[0] != record.name}
            self._generators[key] = generator
        return self._generators[key]

    def _task_model(self, sha256: str, task_type: str | None) -> Any:
        """The base model (and tokenizer) whose weights have ``sha256``: the embedded one or a
        directory given to ``fl-hub serve --base-model`` (a text classifier's encoder among them)."""
        if sha256 not in self._task_models:
            if self._base_dirs is None:  # hashed once per process
                candidates: list[Path | None] = [None, *embedded_text_model_dirs(), *self.base_model_dirs]
                self._base_dirs = {describe_base_model(p).sha256: p for p in candidates}
            if sha256 in self._base_dirs:
                self._task_models[sha256] = load_task_model(self._base_dirs[sha256], task_type)
            else:
                raise HubError(
                    f"the generator needs base model weights {sha256[:16]}... to read examples, and this hub "
                    "has only the embedded models: start it with fl-hub serve --base-model DIR",
                    409,
                )
        return self._task_models[sha256]


def _provenance(
    request: GenerationRequest, generator: Generator, source: Record, base: dict[str, Any], ms: float
) -> dict[str, Any]:
    """A generated adapter's provenance: the generator (name, version) and the experts it learned from."""
    return {
        "base_model": base,
        "producer": f"fl-hub generate ({source.name} v{source.version})",
        "description": request.description,
        "extra": {
            "generator": {"name": source.name, "version": source.version, "method": request.method},
            "experts": generator.experts,
            "examples": len(request.examples),
            "generation_ms": round(ms, 2),
            "request_sha256": request.key(),
        },
    }
