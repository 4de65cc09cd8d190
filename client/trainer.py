"""The node's warm trainer: one process that keeps the base model loaded across messages.

``fl-client start`` runs :func:`serve` on a Unix socket in the node's state directory (mode
0600 in a 0700 directory: only the node's own user can talk to it); every client-app process
Flower starts for a message (:mod:`fedlora.client.app`) sends its :class:`~fedlora.client.messages.Request` and
waits for the :class:`~fedlora.client.messages.ReplyContent`. Requests are served one at a time, as the
node trains one message at a time. The payload is pickled: both ends are this node's own
processes of the same installation.
"""

from __future__ import annotations

import os
import pickle
import socket
import socketserver
import struct
import tempfile
import threading
from pathlib import Path
from typing import Any

from fedlora.client.messages import ReplyContent, Request

SOCKET_NAME = "trainer.sock"
_HEADER = struct.Struct("!Q")
_MAX_PATH = 100  # AF_UNIX paths are limited to 108 bytes


def socket_path(state_dir: Path) -> Path:
    """Where the trainer listens: the state directory, or a private temp directory if that path is too long."""
    path = state_dir.resolve() / SOCKET_NAME
    if len(str(path)) <= _MAX_PATH:
        return path
    return Path(tempfile.mkdtemp(prefix="fedlora-")) / SOCKET_NAME  # mkdtemp: mode 0700


def _send(sock: socket.socket, payload: Any) -> None:
    data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(data)) + data)


def _receive(sock: socket.socket) -> Any:
    header = _read_exactly(sock, _HEADER.size)
    return pickle.loads(_read_exactly(sock, _HEADER.unpack(header)[0]))


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the trainer closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def ask(path: str, request: Request) -> ReplyContent:
    """Send one request to the trainer at ``path``; its errors come back raised here."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        _send(sock, request)
        ok, value = _receive(sock)
    if not ok:
        raise RuntimeError(f"trainer: {value}")
    assert isinstance(value, ReplyContent)
    return value


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        # lazy: torch, transformers, PEFT and Opacus; the ClientApp's process imports this module for ask()
        from fedlora.client.compute import compute

        request = _receive(self.request)
        server: Trainer = self.server  # type: ignore[assignment]
        with server.lock:
            try:
                reply: tuple[bool, Any] = (True, compute(request))
            except Exception as err:  # the client app's own errors travel back to the message's process
                reply = (False, f"{type(err).__name__}: {err}")
        _send(self.request, reply)


class Trainer(socketserver.ThreadingUnixStreamServer):
    """The socket server; :meth:`start` serves in a daemon thread, :meth:`close` stops it."""

    daemon_threads = True

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.unlink(missing_ok=True)  # a socket left by a killed predecessor
        super().__init__(str(path), _Handler)
        os.chmod(path, 0o600)
        self.path = path
        self.lock = threading.Lock()

    def start(self) -> None:
        # lazy: torch, transformers, PEFT and Opacus, loaded once here before the first message
        import fedlora.client.compute  # noqa: F401

        threading.Thread(target=self.serve_forever, name="fedlora-trainer", daemon=True).start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.path.unlink(missing_ok=True)
