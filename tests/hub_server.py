"""A real ``fl-hub serve`` on 127.0.0.1 for tests: started in its own session, waited for with a
deadline, stopped by its process group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from fedlora.core.flower_runner import free_port


class HubServer:
    def __init__(self, hub_dir: Path, log: Path, workers: int = 1, ca: Path | None = None) -> None:
        self.hub_dir = hub_dir
        self.ca = ca  # set: the hub serves HTTPS with a certificate this CA issued
        self.log = log
        self.workers = workers
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.ca else 'http'}://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> HubServer:
        self.port = free_port()
        cmd = [sys.executable, "-m", "fedlora.hub.cli", "serve", str(self.hub_dir), "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--workers", str(self.workers)]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fl-hub serve exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                verify = str(self.ca) if self.ca else True
                if httpx.get(self.url + "/v1/health", timeout=1.0, verify=verify).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"fl-hub serve did not answer within {timeout} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        self.proc = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
