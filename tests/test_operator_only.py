"""The SuperLink's control and runtime APIs answer the operator's own processes only.

A real guarded SuperLink (``python -m fedlora.core.superlink``, as ``fl-server start`` and
``fl-sim`` run it) on 127.0.0.1: another local account (``runuser -u nobody``) is refused,
directly and through a TCP forwarder it runs, while the operator's ``flwr ls`` works.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w
from processes import wait_for

from fedlora.core.flower_runner import free_port

pytestmark = pytest.mark.flower

PROBE = """
import json, sys, urllib.error, urllib.request
port = sys.argv[1]
for method, path, extra in (("POST", "/v1/control/list-runs", {}), ("GET", "/v1/control/list-runs", {}),
                            ("POST", "/v1/runtime/pull-app-inputs", {}),
                            # claiming another peer (before: uvicorn rewrote the peer from this header)
                            ("POST", "/v1/control/list-runs", {"X-Forwarded-For": "127.0.0.1:" + sys.argv[2]})):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"" if method == "POST" else None,
                                     method=method, headers={"content-type": "application/protobuf", **extra})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            print("STATUS", answer.status)
    except urllib.error.HTTPError as err:
        print("STATUS", err.code, json.loads(err.read() or b"{}").get("detail", ""))
"""

FORWARDER = """
import socket, sys, threading
listen, target = int(sys.argv[1]), int(sys.argv[2])
server = socket.create_server(("127.0.0.1", listen))
print("LISTENING", flush=True)
def pipe(a, b):
    try:
        while data := a.recv(65536):
            b.sendall(data)
    except OSError:
        pass
    finally:
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
while True:
    conn, _ = server.accept()
    upstream = socket.create_connection(("127.0.0.1", target))
    threading.Thread(target=pipe, args=(conn, upstream), daemon=True).start()
    threading.Thread(target=pipe, args=(upstream, conn), daemon=True).start()
"""


def _needs_root() -> None:
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("runuser -u nobody needs root")


@pytest.fixture
def superlink(tmp_path: Path) -> Iterator[int]:
    """A guarded SuperLink on 127.0.0.1 (plain HTTP: the guard does not depend on TLS)."""
    port = free_port()
    log = (tmp_path / "superlink.log").open("wb")
    command = [sys.executable, "-m", "fedlora.core.superlink", "--", "--insecure", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--disable-runtime-dependency-installation"]
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "FLWR_DISABLE_UPDATE_CHECK": "1"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # flower-superexec
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_for("the SuperLink", lambda: _status(port, "/health") == 200 or proc.poll() is not None, 60)
        assert proc.poll() is None, (tmp_path / "superlink.log").read_text()[-2000:]
        yield port
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        log.close()


def _status(port: int, path: str) -> int | None:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except OSError:
        return None


def _operator_port(superlink: int) -> int:
    """The local port of a connection the operator's SuperExec holds open to the SuperLink (what
    a forged X-Forwarded-For would name), or 1 if none is open right now."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = fields[1].split(":"), fields[2].split(":")
            if int(remote[1], 16) == superlink and fields[3] == "01" and int(fields[7]) == os.getuid():
                return int(local[1], 16)
    return 1


def _flwr_ls(home: Path, port: int) -> subprocess.CompletedProcess[str]:
    """The operator's ``flwr ls`` against ``port`` (a connection in its own FLWR_HOME)."""
    home.mkdir(parents=True, exist_ok=True)
    link = {"address": f"127.0.0.1:{port}", "insecure": True}
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": "here", "here": link}}))
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    flwr = str(Path(sys.executable).parent / "flwr")
    return subprocess.run(
        [flwr, "ls", "here", "--format", "json"], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_another_local_account_is_refused_and_the_operator_served(superlink: int, tmp_path: Path) -> None:
    _needs_root()
    claimed = str(_operator_port(superlink))
    probe = subprocess.run(
        ["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c", PROBE, str(superlink), claimed],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    answers = re.findall(r"STATUS (\d+) ?(.*)", probe.stdout)
    assert [int(code) for code, _ in answers] == [403] * 4, probe.stdout  # before: 200 with the run list
    nobody = int(subprocess.run(["id", "-u", "nobody"], capture_output=True, text=True, check=True).stdout)
    assert all(f"this connection belongs to uid {nobody}" in detail for _, detail in answers[:3]), probe.stdout
    assert "take no proxy headers" in answers[3][1], probe.stdout

    mine = _flwr_ls(tmp_path / "operator", superlink)  # the README's flwr commands keep working
    assert mine.returncode == 0, mine.stdout + mine.stderr
    assert json.loads(mine.stdout)["success"] is True


def test_a_forwarder_another_account_runs_is_refused(superlink: int, tmp_path: Path) -> None:
    """``nobody`` forwards a port of its own to the SuperLink (as ``ssh -L`` or socat would): even
    the operator's own ``flwr ls`` through it is refused, the connection the SuperLink sees is nobody's."""
    _needs_root()
    listen = free_port()
    forwarder = subprocess.Popen(
        ["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c", FORWARDER, str(listen), str(superlink)],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert forwarder.stdout is not None and forwarder.stdout.readline().strip() == "LISTENING"
        assert _status(listen, "/health") == 200  # the forwarder works
        through = _flwr_ls(tmp_path / "operator", listen)
        assert json.loads(through.stdout)["success"] is False, through.stdout + through.stderr
        nobody = subprocess.run(["id", "-u", "nobody"], capture_output=True, text=True, check=True).stdout.strip()
        assert f"this connection belongs to uid {nobody}" in through.stdout, through.stdout
        direct = _flwr_ls(tmp_path / "operator", superlink)  # directly, it is served
        assert direct.returncode == 0 and json.loads(direct.stdout)["success"] is True
    finally:
        os.killpg(forwarder.pid, 9)
        forwarder.wait(timeout=30)
