"""Hub load benchmark: pull throughput and latency of ``fl-hub serve`` under 64 concurrent clients.

Run ``python bench/bench_hub_load.py`` (about 1 minute on two idle cores; longer while it waits for
other processes to finish) and ``--save`` to write ``bench/results/hub_load.txt``;
``--hub-src DIR`` serves the ``hub`` package in ``DIR`` instead of the installed one (to measure
a patch side by side with the bare app); ``--quick`` is a smoke run (seconds: 1 worker, 8
clients, 1 s measured in one segment, 2 client pulls, no waiting for an idle machine, no
re-runs; meaningless figures). Absolute figures first, then ``ratio <name> = <value>``
lines, the goal's three last:

- ``ratio hub_pulls_per_s_over_goal``: the hub's pulls/s / 500 (goal >= 1);
- ``ratio hub_p99_ms_over_goal``: the hub's p99 pull latency in ms / 100 (goal <= 1);
- ``ratio hub_over_bare_pulls``: the hub's pulls/s / the bare app's pulls/s, same workers.

The goal's figures are those of the worker count (``--workers``, default 1 and 2) at which the
hub pulled the most per second; the other worker counts' ratios come just before them.

Setup, in a temporary directory: ``fl-hub init``, ``fl-hub token create --client bench``, then
one ~1 MB LoRA adapter in PEFT's format, sized for the embedded model (r chosen so that
lora_A / lora_B float32 factors on all 7 linear modules of its 4 layers total ``--adapter-mb``),
published as ``tasks/bench-load`` through ``HubClient.publish`` with the operator token and
the embedded model's provenance. A pull of it is 3 requests: the record (signed manifest,
~1.5 kB of JSON), then ``adapter_config.json`` (~0.4 kB) and ``adapter_model.safetensors``
(~1 MB) by hash.

Two servers, each a subprocess on 127.0.0.1 with the same uvicorn settings (``--workers``
processes, uvloop + httptools, access log off), both running while either is measured (the idle
one uses no CPU):

- hub: ``fl-hub serve DIR --workers N``, as shipped: token lookup, name and access checks,
  record lookup, blob cache;
- bare: a minimal FastAPI app on uvicorn (this file, ``--serve-bare``) with the same two
  routes and path/query parameters, answering with the same record bytes (fetched from the
  hub once) and blob bytes from memory: no token, no database, no checks. hub / bare is the
  cost of the hub's own work per pull.

Load generator (this process, uvloop): ``--clients`` connections (default 64), one keep-alive
HTTP/1.1 connection per client, each a closed loop of pulls: GET the record, parse it and the
manifest inside it (JSON), GET every file it lists, one request at a time (no pipelining), as
``HubClient.pull`` does. Raw ``asyncio.BufferedProtocol`` connections reading into one
preallocated buffer and parsing the status line and ``Content-Length`` themselves: httpx
would cost several times the server's CPU per request, and client and server share the two
cores. Every ``--verify-every``-th pull (not all: the hashing is charged to the shared CPU)
also checks the record's signature (the hub's public key) and each file's size and SHA-256
against the manifest. Any status other than 200, a size or hash mismatch or a dropped
connection is an error; errors are counted and reported, and errored pulls are not counted.

Each (server, workers) pair is measured in ``--rounds`` segments (order ABBA...: hub, bare,
bare, hub, ...) of ``--duration / --rounds`` seconds each after ``--warmup`` seconds of
unmeasured load on fresh connections. A pull counts in the segment it completes in; pulls/s =
count / window; latency = the pull's first request sent -> last body byte read (with 64 clients
in a closed loop, mean latency = 64 / pulls/s by Little's law: p99 < 100 ms needs well over
640 pulls/s). CPU: the server's processes and this one (``/proc``), per pull; irq = interrupt time
(``/proc/stat``: loopback TCP's receive path, charged to no process); other CPU = the machine's
busy time minus those three, as a share of all cores. Before each segment the benchmark waits
(up to ``--max-wait`` s) until other processes use under 15% of the CPU, and measures a segment
again (up to ``--retries`` times) if they used more meanwhile; each segment's share is reported.

Last, ``--pulls`` (default 20) full ``HubClient.pull`` calls one after the other against each
server (1 worker, no other load): signature, base-model hash (cached after an untimed first
pull), file hashes, PEFT directory written with fsync; the per-pull latency of the real client.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ADAPTER = "tasks/bench-load"
GOAL_PULLS_PER_S = 500.0
GOAL_P99_MS = 100.0
START_TIMEOUT = 60.0
BARE_DIR_ENV = "FEDLORA_BENCH_BARE_DIR"
QUIET = 0.15  # other processes' share of the CPU above which a segment is flagged
LLAMA_MODULES = (
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
)
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- the bare baseline app -----------------------------------------------------------------------


def bare_app() -> Any:
    """uvicorn's factory for the bare app: the hub's two pull routes, from memory, no checks."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response

    root = Path(os.environ[BARE_DIR_ENV])
    record = (root / "record.json").read_bytes()
    blobs = {p.name: p.read_bytes() for p in (root / "blobs").iterdir()}
    app = FastAPI(title="bare", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/v1/health")
    async def health() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    @app.get("/v1/adapters/{name:path}")
    async def get_adapter(name: str, version: int | None = None) -> Response:
        return Response(record, media_type="application/json")

    @app.get("/v1/files/{sha256}")
    async def file(sha256: str, name: str) -> Response:
        data = blobs.get(sha256)
        if data is None:
            return JSONResponse({"error": "no such blob", "status": 404}, status_code=404)
        return Response(data, media_type="application/octet-stream", headers={"x-sha256": sha256})

    return app


def serve_bare(root: Path, port: int, workers: int) -> None:
    """Serve :func:`bare_app` with the settings ``fl-hub serve`` uses."""
    import uvicorn

    os.environ[BARE_DIR_ENV] = str(root)
    common: dict[str, Any] = {"host": "127.0.0.1", "port": port, "log_level": "warning", "access_log": False}
    if workers == 1:
        uvicorn.run(bare_app(), **common)
    else:
        sys.path.insert(0, str(BENCH))
        uvicorn.run("hub_load:bare_app", factory=True, workers=workers, **common)


# --- processes -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_started: list[Server] = []  # every server subprocess still to stop


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (``/proc/*/task/*/children``)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo.extend(int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split())
        except OSError:
            continue
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def machine_cpu() -> tuple[float, float, float]:
    """(busy, total, irq) CPU seconds of the whole machine so far (``/proc/stat``; idle and
    iowait are not busy; irq: hard and soft interrupts, e.g. loopback TCP's receive path, which
    no process is charged for)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(values[:8])  # guest time is already in user
    return (total - values[3] - values[4]) / CLK_TCK, total / CLK_TCK, (values[5] + values[6]) / CLK_TCK


def machine_busy(seconds: float) -> float:
    """Share of all cores that processes other than this one and its servers kept busy."""
    own = [os.getpid()] + [pid for server in _started for pid in descendants(server.popen.pid)]
    busy0, total0, _ = machine_cpu()
    own0 = cpu_seconds(own)
    time.sleep(seconds)
    busy1, total1, _ = machine_cpu()
    own1 = cpu_seconds(own)
    return max(0.0, busy1 - busy0 - (own1 - own0)) / max(1e-9, total1 - total0)


def wait_until_quiet(max_wait: float) -> float:
    """Wait (up to ``max_wait`` s) until other processes leave the machine idle."""
    deadline = time.monotonic() + max_wait
    busy = machine_busy(1.0)
    if busy > QUIET:
        print(f"# other processes keep the machine {100 * busy:.0f}% busy; waiting up to {max_wait:.0f} s", flush=True)
    while busy > QUIET and time.monotonic() < deadline:
        busy = machine_busy(2.0)
    return busy


@dataclass
class Server:
    """A server subprocess in its own process group (stopped by its id: :meth:`stop`)."""

    kind: str  # "hub" or "bare"
    workers: int
    port: int
    popen: subprocess.Popen[bytes]
    log: Path
    pids: list[int] = field(default_factory=list)  # the server's processes
    worker_pids: list[int] = field(default_factory=list)  # those answering requests

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(timeout=10)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)


def _stop_all() -> None:
    while _started:
        _started.pop().stop()


def start_server(kind: str, command: list[str], workers: int, port: int, workdir: Path) -> Server:
    log = workdir / f"{kind}-w{workers}-{port}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
    server = Server(kind, workers, port, popen, log)
    _started.append(server)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if popen.poll() is not None:
            raise RuntimeError(
                f"{kind} server exited with code {popen.returncode} at start:\n{log.read_text()[-3000:]}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"{kind} server not healthy after {START_TIMEOUT:.0f} s:\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
                sock.sendall(f"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    break
        except OSError:
            pass
        time.sleep(0.1)
    # With several workers the first one answers /v1/health while the others may still be
    # importing: wait until there are as many workers as asked and none uses CPU any more, so
    # that the load generator's connections spread over all of them.
    while time.monotonic() < deadline:
        pids = descendants(popen.pid)
        before = cpu_seconds(pids)
        time.sleep(0.3)
        if len(pids) >= workers + (workers > 1) and cpu_seconds(pids) - before < 0.02:
            break
    server.pids = descendants(popen.pid)
    server.worker_pids = server.pids[:1]
    if workers > 1:  # uvicorn's workers, not multiprocessing's resource tracker
        server.worker_pids = [p for p in server.pids[1:] if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
    return server


def connections_per_worker(server: Server) -> list[int]:
    """How many established connections on the server's port each worker process holds."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        if int(cols[1].split(":")[1], 16) == server.port and cols[3] == "01":
            inodes.add(cols[9])
    counts = []
    for pid in server.worker_pids:
        n = 0
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    n += 1
        except OSError:
            pass
        counts.append(n)
    return counts


def fl_hub_command(src: Path | None = None) -> list[str]:
    """``fl-hub``; with ``src``, the ``hub`` package in that directory instead of the installed one."""
    if src is not None:
        code = (
            f"import sys; sys.path.insert(0, {str(src.resolve())!r}); "
            "from fedlora.hub.cli import main; sys.exit(main())"
        )
        return [sys.executable, "-c", code]
    exe = Path(sys.executable).parent / "fl-hub"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "fedlora.hub.cli"]


def fl_hub(*args: str) -> str:
    command = fl_hub_command()
    done = subprocess.run([*command, *args], capture_output=True, text=True, cwd=REPO, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"fl-hub {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return done.stdout


# --- the adapter ---------------------------------------------------------------------------------


def make_adapter(target_bytes: float) -> tuple[dict[str, bytes], int]:
    """A LoRA adapter in PEFT's format for the embedded model, all 7 linear modules of every
    layer, rank chosen so the float32 factors total ``target_bytes``: (files, rank)."""
    import numpy as np
    from safetensors.numpy import save

    from fedlora.core.embedded import default_model_dir

    config = json.loads((default_model_dir() / "config.json").read_text())
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim
    shapes = {  # (in, out) of each linear module
        "q_proj": (hidden, config["num_attention_heads"] * head_dim),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (config["num_attention_heads"] * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    per_rank = 4 * layers * sum(i + o for i, o in shapes.values())
    rank = max(1, round(target_bytes / per_rank))
    rng = np.random.default_rng(0)
    tensors = {}
    for layer in range(layers):
        for block, module in LLAMA_MODULES:
            fan_in, fan_out = shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (rng.standard_normal((rank, fan_in)) / math.sqrt(fan_in)).astype(
                np.float32
            )
            tensors[f"{prefix}.lora_B.weight"] = (rng.standard_normal((fan_out, rank)) * 1e-3).astype(np.float32)
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(default_model_dir()),
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(m for _, m in LLAMA_MODULES),
    }
    files = {
        "adapter_config.json": json.dumps(peft_config, indent=2).encode(),
        "adapter_model.safetensors": save(tensors),
    }
    return files, rank


# --- the load generator --------------------------------------------------------------------------


class HTTPError(Exception):
    pass


class Connection(asyncio.BufferedProtocol):
    """One keep-alive HTTP/1.1 connection, one request at a time. Reads into a preallocated
    buffer; a body is only copied out when the caller keeps it."""

    def __init__(self) -> None:
        self.buf = bytearray(1 << 18)
        self.view = memoryview(self.buf)
        self.held = 0  # header bytes in buf
        self.need = -1  # body bytes still to come; -1 while reading the header
        self.status = 0
        self.body: bytearray | None = None
        self.size = 0
        self.waiter: asyncio.Future[tuple[int, int, bytes | None]] | None = None
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("connection closed by the server")
        self._fail(self.lost)

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        self.waiter = None

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.held == len(self.buf):  # a header larger than the buffer: grow it
            self.buf.extend(bytes(len(self.buf)))
            self.view = memoryview(self.buf)
        return self.view[self.held :]

    def buffer_updated(self, nbytes: int) -> None:
        if self.waiter is None:
            self._protocol_error("data from the server with no request outstanding")
            return
        start = self.held
        self.held += nbytes
        if self.need >= 0:
            self._consume(start, nbytes)
            return
        end = self.buf.find(b"\r\n\r\n", max(0, start - 3), self.held)
        if end < 0:
            return
        lines = bytes(self.view[:end]).split(b"\r\n")
        try:
            self.status = int(lines[0].split(b" ", 2)[1])
        except (IndexError, ValueError):
            self._protocol_error(f"bad status line {lines[0][:80]!r}")
            return
        length = -1
        for line in lines[1:]:
            key, _, value = line.partition(b":")
            key = key.strip().lower()
            if key == b"content-length":
                length = int(value)
            elif key == b"transfer-encoding":
                self._protocol_error(f"transfer-encoding {value.strip()!r} is not supported")
                return
        if length < 0:
            self._protocol_error("a response without Content-Length")
            return
        self.need = length
        body_start = end + 4
        self._consume(body_start, self.held - body_start)

    def _consume(self, offset: int, count: int) -> None:
        take = min(count, self.need)
        if self.body is not None and take:
            self.body += self.view[offset : offset + take]
        self.need -= take
        self.size += take
        self.held = 0
        if take < count:
            self._protocol_error("more bytes than the response's Content-Length")
            return
        if self.need == 0:
            waiter, self.waiter = self.waiter, None
            self.need = -1
            if waiter is not None and not waiter.done():
                waiter.set_result((self.status, self.size, bytes(self.body) if self.body is not None else None))

    def _protocol_error(self, reason: str) -> None:
        self._fail(HTTPError(reason))
        if self.transport is not None:
            self.transport.close()

    async def get(self, request: bytes, keep: bool) -> tuple[int, int, bytes | None]:
        if self.lost is not None:
            raise self.lost
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.held, self.need, self.size = 0, -1, 0
        self.body = bytearray() if keep else None
        self.transport.write(request)
        return await self.waiter


@dataclass
class Window:
    """One measured segment."""

    kind: str
    workers: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # per pull, s
    record_latencies: list[float] = field(default_factory=list)  # the record request alone
    bytes: int = 0
    requests: int = 0
    verified: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    other_cpu: float = 0.0  # share of all cores
    irq: float = 0.0  # share of all cores
    attempts: int = 1
    spread: list[int] = field(default_factory=list)  # connections per worker


@dataclass
class Target:
    kind: str
    port: int
    token: str
    public_key: Any
    record_request: bytes = b""

    def request(self, path: str) -> bytes:
        return (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nAuthorization: Bearer {self.token}\r\n\r\n".encode()
        )


async def run_load(
    target: Target, server: Server, clients: int, warmup: float, seconds: float, verify_every: int
) -> Window:
    from fedlora.hub.sdk.manifest import VerificationError, verify_file, verify_record

    loop = asyncio.get_running_loop()
    window = Window(target.kind, server.workers)
    record_request = target.request(f"/v1/adapters/{ADAPTER}")
    file_requests: dict[str, bytes] = {}  # sha256 -> request bytes
    counter = 0

    conns = []
    for _ in range(clients):
        _, conn = await loop.create_connection(Connection, "127.0.0.1", target.port)
        conns.append(conn)
    await asyncio.sleep(0.05)
    window.spread = connections_per_worker(server)
    t_start = time.perf_counter()
    t_measure = t_start + warmup
    t_end = t_measure + seconds

    async def client(conn: Connection) -> None:
        nonlocal counter
        while (t0 := time.perf_counter()) < t_end:
            counter += 1
            verify = verify_every > 0 and counter % verify_every == 0
            try:
                status, size, body = await conn.get(record_request, keep=True)
                t_record = time.perf_counter()
                requests, received = 1, size
                if status != 200:
                    raise HTTPError(f"record: HTTP {status}")
                assert body is not None
                record = json.loads(body)
                if verify:
                    manifest = verify_record(record, target.public_key, ADAPTER)
                else:
                    manifest = json.loads(record["manifest"])
                for fname, meta in manifest["files"].items():
                    digest = meta["sha256"]
                    request = file_requests.get(digest)
                    if request is None:
                        request = file_requests[digest] = target.request(f"/v1/files/{digest}?name={ADAPTER}")
                    status, size, data = await conn.get(request, keep=verify)
                    requests += 1
                    received += size
                    if status != 200:
                        raise HTTPError(f"file: HTTP {status}")
                    if size != meta["size"]:
                        raise VerificationError(f"{fname}: {size} bytes, manifest says {meta['size']}")
                    if verify:
                        assert data is not None
                        verify_file(manifest, fname, data)
            except (HTTPError, VerificationError, OSError, ValueError) as err:
                if time.perf_counter() >= t_measure:
                    window.errors[f"{type(err).__name__}: {str(err)[:100]}"] += 1
                if conn.lost is not None:
                    return
                continue
            t1 = time.perf_counter()
            if t_measure <= t1 < t_end:
                window.latencies.append(t1 - t0)
                window.record_latencies.append(t_record - t0)
                window.bytes += received
                window.requests += requests
                window.verified += verify

    async def measure() -> tuple[float, float, float, float, float, float]:
        await asyncio.sleep(max(0.0, t_measure - time.perf_counter()))
        marks0 = (time.perf_counter(), *machine_cpu(), cpu_seconds(server.pids), time.process_time())
        await asyncio.sleep(max(0.0, t_end - time.perf_counter()))
        marks1 = (time.perf_counter(), *machine_cpu(), cpu_seconds(server.pids), time.process_time())
        return tuple(b - a for a, b in zip(marks0, marks1, strict=True))  # type: ignore[return-value]

    measuring = asyncio.ensure_future(measure())
    await asyncio.gather(*(client(c) for c in conns))
    wall, busy, total, irq, server_cpu, client_cpu = await measuring
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    window.seconds = wall
    window.server_cpu = server_cpu
    window.client_cpu = client_cpu
    window.irq = irq / max(1e-9, total)
    window.other_cpu = max(0.0, busy - irq - server_cpu - client_cpu) / max(1e-9, total)
    return window


def measure_segment(target: Target, server: Server, args: argparse.Namespace, seconds: float, label: str) -> Window:
    """One segment on a quiet machine; measured again (up to ``--retries`` times) if other
    processes were busy meanwhile."""
    for attempt in range(args.retries + 1):
        wait_until_quiet(args.max_wait)
        w = load_segment(target, server, args, seconds)
        w.attempts = attempt + 1
        print(
            f"# {label}: {ratio(len(w.latencies), w.seconds):7.1f} pulls/s, "
            f"p99 {1000 * quantile(w.latencies, 0.99):6.1f} ms, errors {sum(w.errors.values())}, "
            f"irq {100 * w.irq:.0f}%, other CPU {100 * w.other_cpu:.0f}%, "
            f"connections per worker {w.spread}",
            flush=True,
        )
        if w.other_cpu <= QUIET:
            break
        if attempt < args.retries:
            print("#   other processes were busy: measuring it again", flush=True)
    return w


def load_segment(target: Target, server: Server, args: argparse.Namespace, seconds: float) -> Window:
    import uvloop

    return uvloop.run(run_load(target, server, args.clients, args.warmup, seconds, args.verify_every))


# --- figures -------------------------------------------------------------------------------------


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def quantile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass
class Figures:
    kind: str
    workers: int
    pulls: int
    seconds: float
    pulls_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    record_p50_ms: float
    mb_per_s: float
    requests_per_s: float
    server_cpu_ms: float  # per pull
    client_cpu_ms: float
    other_cpu: float
    irq: float
    verified: int
    errors: Counter[str]
    segments: list[str]  # pulls/s, other CPU and attempts of each segment
    spread: list[list[int]]


def combine(windows: list[Window]) -> Figures:
    w = windows[0]
    seconds = sum(x.seconds for x in windows)
    lat = [v for x in windows for v in x.latencies]
    rec = [v for x in windows for v in x.record_latencies]
    pulls = len(lat)
    errors: Counter[str] = Counter()
    for x in windows:
        errors.update(x.errors)
    per = 1000.0 / max(1, pulls)
    return Figures(
        kind=w.kind,
        workers=w.workers,
        pulls=pulls,
        seconds=seconds,
        pulls_per_s=ratio(pulls, seconds),
        p50_ms=1000 * quantile(lat, 0.50),
        p99_ms=1000 * quantile(lat, 0.99),
        max_ms=1000 * max(lat, default=math.nan),
        record_p50_ms=1000 * quantile(rec, 0.50),
        mb_per_s=ratio(sum(x.bytes for x in windows), seconds) / 1e6,
        requests_per_s=ratio(sum(x.requests for x in windows), seconds),
        server_cpu_ms=per * sum(x.server_cpu for x in windows),
        client_cpu_ms=per * sum(x.client_cpu for x in windows),
        other_cpu=ratio(sum(x.other_cpu * x.seconds for x in windows), seconds),
        irq=ratio(sum(x.irq * x.seconds for x in windows), seconds),
        verified=sum(x.verified for x in windows),
        errors=errors,
        segments=[
            f"{ratio(len(x.latencies), x.seconds):.1f} (other {100 * x.other_cpu:.0f}%"
            + (f", attempt {x.attempts})" if x.attempts > 1 else ")")
            for x in windows
        ],
        spread=[x.spread for x in windows],
    )


# --- HubClient.pull --------------------------------------------------------------------------------


def client_pulls(urls: dict[str, str], token: str, key_path: Path, workdir: Path, count: int) -> dict[str, list[float]]:
    """``count`` timed ``HubClient.pull`` calls per server, alternating between the servers."""
    from fedlora.hub.sdk.client import HubClient
    from fedlora.hub.sdk.manifest import load_public_key

    key = load_public_key(key_path)
    clients = {kind: HubClient(url, token, key) for kind, url in urls.items()}
    times: dict[str, list[float]] = {kind: [] for kind in clients}
    try:
        for kind, client in clients.items():  # untimed: connection, base-model hash (cached per process)
            client.pull(ADAPTER, workdir / f"pulled-{kind}", version=1)
        for i in range(count):
            for kind in list(clients) if i % 2 == 0 else list(clients)[::-1]:
                t0 = time.perf_counter()
                # version 1, asked for: the bare server replays recorded answers, which a "latest"
                # request (signed over a fresh nonce) would refuse
                clients[kind].pull(ADAPTER, workdir / f"pulled-{kind}", version=1)
                times[kind].append(time.perf_counter() - t0)
    finally:
        for client in clients.values():
            client.close()
    return times


# --- the run -------------------------------------------------------------------------------------


def setup(workdir: Path, adapter_mb: float) -> tuple[Path, str, str, dict[str, bytes], int]:
    """Hub directory, client token, operator token, adapter files, rank."""
    hub_dir = workdir / "hub"
    # --insecure: the bench compares plain-HTTP request handling (fl-hub init defaults to HTTPS)
    fl_hub("init", str(hub_dir), "--port", str(free_port()), "--insecure")
    token = fl_hub("token", "create", str(hub_dir), "--client", "bench", "--label", "hub_load").strip()
    operator = (hub_dir / "operator.token").read_text().strip()
    files, rank = make_adapter(adapter_mb * (1 << 20))
    return hub_dir, token, operator, files, rank


def publish_and_snapshot(
    hub: Server, hub_dir: Path, operator: str, token: str, files: dict[str, bytes], bare_dir: Path
) -> None:
    """Publish the adapter on the hub; save the hub's record bytes and blobs for the bare app."""
    import httpx

    from fedlora.hub.sdk.client import HubClient
    from fedlora.hub.sdk.manifest import describe_base_model, load_public_key

    key = load_public_key(hub_dir / "hub.pub")
    provenance = {"base_model": describe_base_model().__dict__, "producer": "bench/bench_hub_load.py"}
    with HubClient(hub.url, operator, key) as client:
        client.publish(ADAPTER, files, provenance)
    (bare_dir / "blobs").mkdir(parents=True, exist_ok=True)
    with httpx.Client(base_url=hub.url, headers={"authorization": f"Bearer {token}"}) as http:
        response = http.get(f"/v1/adapters/{ADAPTER}")
        response.raise_for_status()
        (bare_dir / "record.json").write_bytes(response.content)
        manifest = json.loads(response.json()["manifest"])
        for meta in manifest["files"].values():
            blob = http.get(f"/v1/files/{meta['sha256']}", params={"name": ADAPTER})
            blob.raise_for_status()
            assert hashlib.sha256(blob.content).hexdigest() == meta["sha256"]
            (bare_dir / "blobs" / meta["sha256"]).write_bytes(blob.content)


def run(args: argparse.Namespace, workdir: Path) -> tuple[list[str], bool]:
    from fedlora.hub.sdk.manifest import load_public_key

    started = time.strftime("%Y-%m-%d %H:%M")
    load_before = os.getloadavg()
    busy_before = wait_until_quiet(args.max_wait)
    t_run = time.monotonic()
    hub_dir, token, operator, files, rank = setup(workdir, args.adapter_mb)
    key = load_public_key(hub_dir / "hub.pub")
    bare_dir = workdir / "bare"
    sizes = {f: len(d) for f, d in files.items()}
    print(f"# adapter: r={rank}, {', '.join(f'{f} {n:,} B' for f, n in sizes.items())}", flush=True)

    figures: dict[tuple[str, int], Figures] = {}
    pulls: dict[str, list[float]] = {}
    published = False
    segment = args.duration / args.rounds
    for workers in args.workers:
        hub_port = free_port()
        serve = ["serve", str(hub_dir), "--workers", str(workers), "--port", str(hub_port)]
        hub = start_server("hub", [*fl_hub_command(args.hub_src), *serve], workers, hub_port, workdir)
        try:
            if not published:
                publish_and_snapshot(hub, hub_dir, operator, token, files, bare_dir)
                published = True
            bare_port = free_port()
            bare = start_server(
                "bare",
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--serve-bare",
                    str(bare_dir),
                    "--port",
                    str(bare_port),
                    "--workers",
                    str(workers),
                ],
                workers,
                bare_port,
                workdir,
            )
            servers = {"hub": hub, "bare": bare}
            targets = {"hub": Target("hub", hub_port, token, key), "bare": Target("bare", bare_port, token, key)}
            windows: dict[str, list[Window]] = {"hub": [], "bare": []}
            order = ["hub", "bare"]
            for r in range(args.rounds):
                for kind in order if r % 2 == 0 else order[::-1]:
                    label = f"workers={workers} {kind:<4} segment {r + 1}"
                    windows[kind].append(measure_segment(targets[kind], servers[kind], args, segment, label))
            for kind in order:
                figures[(kind, workers)] = combine(windows[kind])
            if workers == min(args.workers) and args.pulls > 0:
                urls = {kind: servers[kind].url for kind in order}
                pulls = client_pulls(urls, token, hub_dir / "hub.pub", workdir, args.pulls)
                for kind, times in pulls.items():
                    print(f"# HubClient.pull from {kind}: median {1000 * statistics.median(times):.1f} ms", flush=True)
            for server in (bare, hub):
                server.stop()
        finally:
            _stop_all()
    run_seconds = time.monotonic() - t_run
    lines = report(args, figures, pulls, rank, sizes, started, load_before, busy_before, run_seconds)
    ok = all(not f.errors for f in figures.values())
    return lines, ok


def report(
    args: argparse.Namespace,
    figures: dict[tuple[str, int], Figures],
    pulls: dict[str, list[float]],
    rank: int,
    sizes: dict[str, int],
    started: str,
    load_before: tuple[float, float, float],
    busy_before: float,
    run_seconds: float,
) -> list[str]:
    total = sum(sizes.values())
    lines = [
        "# Hub load benchmark: pull throughput and latency, fl-hub serve vs a bare FastAPI app, on loopback",
        f"{started}; {os.cpu_count()} CPUs on this machine, load average {load_before[0]:.2f} before the run, "
        f"other processes using {100 * busy_before:.0f}% of the CPU when it started; run time {run_seconds:.0f} s",
        f"adapter {ADAPTER}: LoRA r={rank} on the embedded model's 7 linear modules x 4 layers, "
        f"{total:,} B ({', '.join(f'{f} {n:,}' for f, n in sizes.items())}); a pull = GET record + "
        f"{len(sizes)} x GET file; {args.clients} clients, one keep-alive connection each, closed loop "
        f"(uvloop, raw HTTP/1.1); each (server, workers) measured {args.duration:g} s in {args.rounds} segments "
        f"(ABBA order) after {args.warmup:g} s of warm-up each; every {args.verify_every}th pull verified "
        "(signature, sizes, SHA-256)",
        (f"hub: fl-hub serve from {args.hub_src} (--hub-src)" if args.hub_src else "hub: fl-hub serve as shipped")
        + " (tokens, access checks, SQLite, blob cache); bare: FastAPI + uvicorn, "
        "same routes, same record and blob bytes from memory, no auth/DB/checks; both uvicorn with uvloop + "
        "httptools, access log off, the same worker count",
        "latency: first request sent -> last body byte read; record p50: the record request alone; CPU ms/pull: "
        "server processes / this load generator, per pull; irq: interrupt time (loopback TCP), share of all "
        "cores; other CPU: the rest of the machine's busy time, share of all cores (should be ~0; a segment "
        f"with more than {100 * QUIET:.0f}% is measured again, up to {args.retries} times)",
        "",
        f"{'server':<6} {'workers':>7} {'pulls/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
        f"{'record p50':>10} {'MB/s':>7} {'req/s':>7} {'srv CPU':>7} {'gen CPU':>7} {'irq':>4} {'other':>5} "
        f"{'pulls':>6} {'verified':>8} {'errors':>6}",
        f"{'':<6} {'':>7} {'':>8} {'':>7} {'':>7} {'':>7} {'ms':>10} {'':>7} {'':>7} {'ms/pull':>7} "
        f"{'ms/pull':>7} {'':>4} {'CPU':>5}",
    ]
    for (kind, workers), f in sorted(figures.items(), key=lambda kv: (kv[0][1], kv[0][0] != "hub")):
        lines.append(
            f"{kind:<6} {workers:>7} {f.pulls_per_s:8.1f} {f.p50_ms:7.1f} {f.p99_ms:7.1f} {f.max_ms:7.1f} "
            f"{f.record_p50_ms:10.2f} {f.mb_per_s:7.1f} {f.requests_per_s:7.0f} {f.server_cpu_ms:7.2f} "
            f"{f.client_cpu_ms:7.2f} {100 * f.irq:3.0f}% {100 * f.other_cpu:4.0f}% {f.pulls:6d} {f.verified:8d} "
            f"{sum(f.errors.values()):6d}"
        )
    lines.append("")
    lines.append("per segment: pulls/s (other CPU); connections per worker process:")
    for (kind, workers), f in sorted(figures.items(), key=lambda kv: (kv[0][1], kv[0][0] != "hub")):
        lines.append(
            f"  {kind:<4} w={workers}: {', '.join(f.segments)}; {'; '.join('/'.join(map(str, s)) for s in f.spread)}"
        )
    errors = [(k, f) for k, f in figures.items() if f.errors]
    if errors:
        lines.append("errors:")
        for (kind, workers), f in errors:
            for reason, n in f.errors.most_common():
                lines.append(f"  {kind} w={workers}: {n} x {reason}")
    else:
        lines.append("errors: none (every response 200, every verified pull's signature and hashes matched)")
    if pulls:
        lines.append("")
        lines.append(
            f"HubClient.pull, {args.pulls} sequential pulls per server, {min(args.workers)} worker, no other load "
            "(httpx; signature, base-model hash (cached), file hashes, PEFT dir written + fsync):"
        )
        for kind, times in pulls.items():
            ms = [1000 * t for t in times]
            lines.append(
                f"  {kind:<4} median {statistics.median(ms):6.1f} ms, mean {statistics.mean(ms):6.1f} ms, "
                f"min {min(ms):6.1f} ms, max {max(ms):6.1f} ms"
            )
    lines.append("")
    best = []
    for workers in args.workers:
        hub, bare = figures[("hub", workers)], figures[("bare", workers)]
        best.append((workers, hub, bare))
        lines.append(f"ratio hub_pulls_per_s_over_goal_w{workers} = {ratio(hub.pulls_per_s, GOAL_PULLS_PER_S):.3f}")
        lines.append(f"ratio hub_p99_ms_over_goal_w{workers} = {ratio(hub.p99_ms, GOAL_P99_MS):.3f}")
        lines.append(f"ratio hub_over_bare_pulls_w{workers} = {ratio(hub.pulls_per_s, bare.pulls_per_s):.3f}")
        lines.append(f"ratio bare_pulls_per_s_over_goal_w{workers} = {ratio(bare.pulls_per_s, GOAL_PULLS_PER_S):.3f}")
        cpu = ratio(hub.server_cpu_ms, bare.server_cpu_ms)
        lines.append(f"ratio hub_over_bare_server_cpu_per_pull_w{workers} = {cpu:.3f}")
    if len(pulls) == 2:
        client = ratio(statistics.median(pulls["hub"]), statistics.median(pulls["bare"]))
        lines.append(f"ratio hubclient_pull_hub_over_bare = {client:.3f}")
    workers, hub, bare = max(best, key=lambda t: t[1].pulls_per_s)
    lines.append(f"# goal figures: workers={workers} (the hub's best pulls/s); goals: pulls/s >= 500, p99 < 100 ms")
    lines.append(f"ratio hub_pulls_per_s_over_goal = {ratio(hub.pulls_per_s, GOAL_PULLS_PER_S):.3f}")
    lines.append(f"ratio hub_p99_ms_over_goal = {ratio(hub.p99_ms, GOAL_P99_MS):.3f}")
    lines.append(f"ratio hub_over_bare_pulls = {ratio(hub.pulls_per_s, bare.pulls_per_s):.3f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--workers", default="1,2", help="uvicorn worker processes to measure, comma-separated")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (one connection each)")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per (server, workers)")
    parser.add_argument("--rounds", type=int, default=2, help="segments the duration is split into (ABBA order)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds of load before each segment")
    parser.add_argument("--verify-every", type=int, default=20, help="verify every Nth pull (0: none)")
    parser.add_argument("--adapter-mb", type=float, default=1.0, help="adapter size, MiB")
    parser.add_argument("--pulls", type=int, default=20, help="sequential HubClient.pull calls per server (0: none)")
    parser.add_argument("--max-wait", type=float, default=120.0, help="seconds to wait for an idle machine")
    parser.add_argument(
        "--retries", type=int, default=2, help="re-runs of a segment during which other processes were busy"
    )
    parser.add_argument(
        "--hub-src", type=Path, default=None, help="serve the hub package in this directory (to try a patch)"
    )
    parser.add_argument("--save", action="store_true", help="write the report to --out")
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "hub_load.txt")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (hub, server logs)")
    parser.add_argument("--serve-bare", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 worker, 8 clients, 1 s, no idle wait")
    args = parser.parse_args()
    if args.quick and args.serve_bare is None:
        args.workers, args.clients, args.duration, args.rounds, args.warmup = "1", 8, 1.0, 1, 0.2
        args.pulls, args.max_wait, args.retries = 2, 0.0, 0
    if args.serve_bare is not None:
        serve_bare(args.serve_bare, args.port, int(args.workers))
        return
    args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    if not args.workers or min(args.workers) < 1 or args.clients < 1 or args.rounds < 1 or args.duration <= 0:
        parser.error("workers, clients and rounds must be >= 1 and duration > 0")

    atexit.register(_stop_all)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix="hub_load_"))
    ok = False
    try:
        lines, ok = run(args, workdir)
    finally:
        _stop_all()
        if ok and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"# work directory and server logs kept in {workdir}")
    text = "\n".join(lines) + "\n"
    print()
    print(text, end="")
    if args.save:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
