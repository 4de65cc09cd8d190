"""A real ``fl-hub serve`` closes half-open requests in seconds and keeps serving meanwhile.

Before, uvicorn left a connection that sent nothing, or headers or a body a byte at a time,
open for as long as the client liked (1,000 held for 30 s, none closed).
"""

from __future__ import annotations

import resource
import selectors
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hub_server import HubServer

from fedlora.hub.hub_dir import HubDir, HubSettings

HELD = 1000
TIMEOUT = 2.0  # the hub's header and body timeouts in this test (defaults: 10 s and 30 s)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubServer]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * HELD + 200  # ours and the hub's (it inherits the limit)
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"needs {need} file descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    hub_dir, _ = HubDir.init(tmp_path / "hub", HubSettings(header_timeout=TIMEOUT, body_timeout=TIMEOUT))
    server = HubServer(hub_dir.root, tmp_path / "hub.log").start()
    try:
        yield server
    finally:
        server.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _stall(sock: socket.socket, i: int) -> None:
    """Three kinds of half-open request: nothing, headers cut short, a body cut short."""
    if i % 3 == 1:
        sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: hub\r\n")
    elif i % 3 == 2:
        sock.sendall(b"POST /v1/tokens HTTP/1.1\r\nHost: hub\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)


def test_a_thousand_half_open_requests_are_closed_and_the_hub_serves_meanwhile(hub: HubServer) -> None:
    socks = []
    try:
        for i in range(HELD):
            sock = socket.create_connection(("127.0.0.1", hub.port), timeout=10)
            _stall(sock, i)
            sock.setblocking(False)
            socks.append(sock)
        opened = time.monotonic()
        # the hub answers others while the 1,000 are held
        assert httpx.get(hub.url + "/v1/health", timeout=10).status_code == 200

        selector = selectors.DefaultSelector()
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        closed: set[socket.socket] = set()
        deadline = opened + TIMEOUT + 30
        while len(closed) < HELD and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=1.0):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(4096)
                except ConnectionResetError:
                    data = b""
                if not data:  # EOF: the hub closed it
                    closed.add(sock)
                    selector.unregister(sock)
        assert len(closed) == HELD, f"{HELD - len(closed)} of {HELD} half-open requests still open"
        log = hub.log.read_text()
        assert f"no complete request headers within {TIMEOUT:g} s" in log
        assert f"the request body stalled for {TIMEOUT:g} s" in log
        assert httpx.get(hub.url + "/v1/health", timeout=10).status_code == 200
    finally:
        for sock in socks:
            sock.close()


def test_a_slow_but_steady_upload_is_not_cut_and_a_trickle_is(hub: HubServer) -> None:
    """The body clock runs between reads, within an overall deadline of ``body_timeout`` plus the
    body at 16 KiB/s: 48 KiB in three pieces 1.2 s apart is read; a byte every 1.2 s is not."""
    body = b'{"x": "' + b"y" * (48 * 1024 - 10) + b'"}'
    with socket.create_connection(("127.0.0.1", hub.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/tokens HTTP/1.1\r\nHost: hub\r\nContent-Type: application/json\r\n")
        sock.sendall(f"Content-Length: {len(body)}\r\n\r\n".encode())
        third = len(body) // 3
        for piece in (body[:third], body[third : 2 * third], body[2 * third :]):
            time.sleep(TIMEOUT * 0.6)
            sock.sendall(piece)
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 "), answer  # an answer (401: no token), not a closed connection

    with socket.create_connection(("127.0.0.1", hub.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/tokens HTTP/1.1\r\nHost: hub\r\nContent-Length: 1000\r\n\r\n")
        started, closed = time.monotonic(), False
        for _ in range(20):  # a byte every 0.6 x the timeout: each read in time, the whole far too slow
            time.sleep(TIMEOUT * 0.6)
            try:
                sock.sendall(b"x")
            except OSError:
                closed = True
                break
        assert closed and time.monotonic() - started < 10 * TIMEOUT
    assert "the request body came slower than 16384 bytes/s on average" in hub.log.read_text()
