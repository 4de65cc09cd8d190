"""The hub's HTTP API (FastAPI on uvicorn, the stack Flower's SuperLink serves on).

  GET  /v1/health                       liveness + the signing key's id (no token)
  GET  /v1/key                          the hub's public key, PEM (no token; pin it out of band)
  GET  /v1/whoami                       the token's role and client
  GET  /v1/base-models                  base models the hub accepts adapters for
  GET  /v1/adapters?prefix=&q=&limit=   latest version of every readable adapter
  GET  /v1/adapters/{name}?version=N    one version's signed manifest (default: latest)
  GET  /v1/versions/{name}              the versions of a name
  GET  /v1/latest/{prefix}              the newest adapter under a prefix (global/<run> -> last round)
  GET  /v1/files/{sha256}?name=NAME     a file of NAME by its hash
  POST /v1/adapters/{name}              publish {"provenance": {...}, "files": {file: base64}}
  POST /v1/generate                     {"description", "method", "examples"?, "base_model_sha256"?}:
                                        a zero-shot adapter, signed and stored as generated/<id>

Every request but the first two needs ``Authorization: Bearer <token>``. Every refusal is
JSON ``{"error": reason, "status": code}`` and is logged with the reason.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from fedlora.hub.hub_dir import HubDir
from fedlora.hub.sdk.manifest import NONCE, public_pem, sign_freshness
from fedlora.hub.sdk.names import Principal
from fedlora.hub.sdk.request import MAX_REQUEST_BYTES, GenerationRequest
from fedlora.hub.store import HubError, Registry

log = logging.getLogger("fedlora.hub")
#: a version query parameter: a positive 31-bit integer (larger ones cannot name a version)
Version = Annotated[int | None, Query(ge=1, le=2**31 - 1)]
#: a client's nonce for a signed "this is the latest" answer (hex, 128 to 512 bits)
Nonce = Annotated[str | None, Query(pattern=NONCE.pattern)]


def _error(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": reason, "status": status}, status_code=status)


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data).encode(), status_code=status, media_type="application/json")


def create_app(registry: Registry, max_upload_bytes: int, base_model_dirs: Sequence[str] = ()) -> FastAPI:
    """The API over ``registry``; ``base_model_dirs``: base models besides the embedded one that
    generators may need (ICM-LoRA reads examples with the base model)."""
    app = FastAPI(title="fedlora hub", docs_url=None, redoc_url=None, openapi_url=None)
    key_pem = public_pem(registry.signing_key.public_key()).decode()

    def _fresh(record: dict[str, Any], nonce: str | None, asked: str) -> dict[str, Any]:
        """A "latest" answer, signed over the client's nonce when it sent one (so it cannot be replayed)."""
        if nonce is not None:
            record["fresh"] = sign_freshness(registry.signing_key, nonce, asked, record["name"], record["version"])
        return record

    services: list[Any] = []  # the generator service, created at the first generation (it imports torch)

    def generator_service() -> Any:
        if not services:
            # lazy: torch, loaded only when a generation request arrives (the hub itself never needs it)
            from fedlora.hub.generators.service import GeneratorService

            services.append(GeneratorService(registry, base_model_dirs))
        return services[0]

    @app.exception_handler(HubError)
    async def _hub_error(request: Request, err: HubError) -> JSONResponse:
        log.warning("refused %s %s: %s (%s)", request.method, request.url.path, err, err.status)
        return _error(err.status, str(err))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        reason = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        log.warning("refused %s %s: %s", request.method, request.url.path, reason)
        return _error(422, reason)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error(err.status_code, str(err.detail))

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error ({type(err).__name__}); the hub's log has the details")

    def principal(request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if header and scheme.lower() != "bearer":
            raise HubError("Authorization must be 'Bearer <token>'", 401)
        return registry.authenticate(token.strip() or None)

    @app.get("/v1/health")
    async def health() -> Response:
        return _json({"status": "ok", "key_id": registry.key_id})

    @app.get("/v1/key")
    async def key() -> Response:
        return Response(key_pem, media_type="application/x-pem-file", headers={"x-key-id": registry.key_id})

    @app.get("/v1/whoami")
    async def whoami(request: Request) -> Response:
        who = principal(request)
        return _json({"role": who.role, "client": who.client, "label": who.label})

    @app.get("/v1/base-models")
    async def base_models(request: Request) -> Response:
        principal(request)
        return _json(registry.base_models())

    @app.get("/v1/adapters")
    async def list_adapters(request: Request, prefix: str = "", q: str = "", limit: int = 1000) -> Response:
        who = principal(request)
        return _json(_checked(lambda: registry.list(who, prefix, q, limit)))

    @app.get("/v1/adapters/{name:path}")
    async def get_adapter(request: Request, name: str, version: Version = None, nonce: Nonce = None) -> Response:
        who = principal(request)
        record = _checked(lambda: registry.get(who, name, version)).to_dict()
        return _json(_fresh(record, nonce, name) if version is None else record)

    @app.get("/v1/versions/{name:path}")
    async def versions(request: Request, name: str) -> Response:
        who = principal(request)
        return _json({"name": name, "versions": _checked(lambda: registry.versions(who, name))})

    @app.get("/v1/latest/{prefix:path}")
    async def latest(request: Request, prefix: str, nonce: Nonce = None) -> Response:
        who = principal(request)
        return _json(_fresh(_checked(lambda: registry.latest_under(who, prefix)).to_dict(), nonce, prefix))

    @app.get("/v1/files/{sha256}")
    async def file(request: Request, sha256: str, name: str) -> Response:
        who = principal(request)
        data = _checked(lambda: registry.blob(who, name, sha256))
        return Response(data, media_type="application/octet-stream", headers={"x-sha256": sha256})

    @app.post("/v1/adapters/{name:path}")
    async def publish(request: Request, name: str) -> Response:
        who = principal(request)
        body = await _read_body(request, max_upload_bytes)

        def parse_and_publish() -> Any:  # decoding up to max-upload-mb: off the event loop
            files, provenance = _parse_publish(bytes(body))
            return _checked(lambda: registry.publish(who, name, files, provenance))

        record = await run_in_threadpool(parse_and_publish)
        log.info("published %s v%d by %s (%d bytes)", record.name, record.version, who.describe, record.size)
        return _json(record.to_dict(), status=201)

    @app.post("/v1/generate")
    async def generate(request: Request) -> Response:
        who = principal(request)
        payload = _parse_json(await _read_body(request, MAX_REQUEST_BYTES))
        generation = _checked(lambda: GenerationRequest.from_json(payload))
        record, created, ms = await run_in_threadpool(lambda: generator_service().generate(who, generation))
        response = _json(record.to_dict(), status=201 if created else 200)
        response.headers["x-generation-ms"] = f"{ms:.2f}"
        return response

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 once it exceeds ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HubError(f"upload of {int(declared)} bytes exceeds the hub's limit of {limit} bytes", 413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HubError(f"upload exceeds the hub's limit of {limit} bytes", 413)
    return bytes(body)


def _checked(call: Any) -> Any:
    """Run ``call``; a ValueError from name/prefix checks becomes a 400 with its message."""
    try:
        return call()
    except HubError:
        raise
    except ValueError as err:
        raise HubError(str(err)) from None
    except RecursionError:
        raise HubError("the request's JSON is nested too deeply") from None


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HubError(f"the body is not JSON ({err})") from None
    except RecursionError:
        raise HubError("the body's JSON is nested too deeply") from None


def _parse_publish(body: bytes) -> tuple[dict[str, bytes], dict[str, Any]]:
    payload = _parse_json(body)
    if not isinstance(payload, dict) or set(payload) != {"provenance", "files"}:
        raise HubError('the body must be {"provenance": {...}, "files": {"<file>": "<base64>", ...}}')
    files_in = payload["files"]
    if not isinstance(files_in, dict) or not all(isinstance(v, str) for v in files_in.values()):
        raise HubError('"files" must map file names to base64 strings')
    files = {}
    for fname, text in files_in.items():
        try:
            files[str(fname)] = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise HubError(f"file {fname!r} is not valid base64") from None
    return files, payload["provenance"]


HUB_DIR_ENV = "FEDLORA_HUB_DIR"
BASE_MODELS_ENV = "FEDLORA_HUB_BASE_MODELS"


def app_from_env() -> FastAPI:
    """uvicorn's factory in each worker process (``fl-hub serve --workers N``): the hub
    directory comes from the serving command through the environment."""
    import os

    hub = HubDir(os.environ[HUB_DIR_ENV])
    settings = hub.settings()
    base_dirs = [p for p in os.environ.get(BASE_MODELS_ENV, "").split(os.pathsep) if p]
    return create_app(hub.registry(), settings.max_upload_bytes, base_dirs)
