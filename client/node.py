"""``fl-client start``: this machine as one SuperNode of a federation, kept running.

Flower's ``flower-supernode`` does the talking (TLS, signed requests with the node key); this
module checks everything first and supervises it:

- the CA file, the node key and the data are checked before anything starts, so a mistake is
  one clear line, not a traceback from a subprocess;
- the server is probed with a TLS handshake verified by the CA: an expired or foreign
  certificate, or a server speaking plain HTTP, stops the client with a message saying which;
  a server that is away (refused, unreachable) is waited for with exponential backoff;
- the SuperNode is restarted with backoff whenever it exits on its own (the server restarted,
  the network dropped), and stopped with its whole process group on Ctrl-C;
- a key the server refuses is retried and reported with its fingerprint, to give the operator;
- the SuperNode runs in Flower's ``process`` isolation with a SuperExec secret: it starts no
  client-app process of its own, and its local runtime API gives tasks only to this process's
  executor (:mod:`fedlora.client.executor`), which refuses bundles that carry code and runs every
  message with the installed client, the model loaded once;
- the node's privacy policy (:mod:`fedlora.privacy.policy`) is the operator's: kept in the
  state directory, changed by this command's options, never by a server.

The node's data path, state directory and name reach the client app through Flower's node config.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rich.console import Console

from fedlora.client.executor import SECRET_FILE, Executor, ensure_secret
from fedlora.core.flower_runner import free_port, terminate_group
from fedlora.core.kinds import check_device, check_dtype
from fedlora.core.pki import NODE_NAME, check_validity, fingerprint, load_certificate
from fedlora.hub.sdk.manifest import load_public_key
from fedlora.privacy.policy import PolicyError, PrivacyPolicy

#: backoff between attempts to reach the server or restart the SuperNode (seconds)
BACKOFF_START, BACKOFF_MAX = 1.0, 30.0
#: the longest wait after the server refused the node key: a server registers enrolled keys just
#: after it starts listening, and a node restarted after a crash is refused until its previous
#: session expires (Flower: 2 heartbeats of 30 s), so a refusal is retried, and said each time
REFUSED_RETRY = 10.0
#: Flower's messages when the SuperLink refuses a node key (unregistered or revoked)
_REFUSED = re.compile(r"Failed to activate SuperNode|Invalid SuperNode authentication")


class NodeError(RuntimeError):
    """A problem the operator must fix (exit status 2): the message says what and where."""


class ServerAway(RuntimeError):
    """The server cannot be reached right now: wait and try again."""


@dataclass(frozen=True)
class NodeOptions:
    """``fl-client start`` options, validated once."""

    server: str
    ca: Path | None
    key: Path | None
    data: str
    state_dir: Path
    name: str
    insecure: bool = False
    max_wait: float | None = None  # give up after this many seconds without a server (None: never)
    hub: str | None = None  # where personal adapters go at the end of a run (personalize.steps > 0)
    hub_token_file: Path | None = None
    hub_key: Path | None = None
    hub_ca: Path | None = None
    device: str | None = None  # where this node's model runs (model.device), whatever the server's run says
    dtype: str | None = None  # the base weights' dtype on this node (model.dtype)
    policy_changes: dict[str, Any] = field(default_factory=dict)  # --min-noise & co. (None: keep the file's)

    def __post_init__(self) -> None:
        host, port = split_address(self.server)
        del host, port

        try:  # the run config's own checks, so a node refuses what a run would
            check_device(self.device or "auto", "--device")
            check_dtype(self.dtype or "float32", "--dtype")
        except ValueError as err:
            raise NodeError(str(err)) from None
        if not NODE_NAME.fullmatch(self.name):
            raise NodeError(f"--name {self.name!r}: use 1-63 letters, digits, '.', '_' or '-'")
        if not self.insecure and (self.ca is None or self.key is None):
            raise NodeError("--ca and --key are required (or --insecure for a plain-HTTP test server)")
        hub_files = (("--hub-token-file", self.hub_token_file), ("--hub-key", self.hub_key), ("--hub-ca", self.hub_ca))
        for label, value in (("--data", self.data), ("--state-dir", str(self.state_dir)), *hub_files):
            if value is not None and re.search(r'[\s"\']', str(value)):
                raise NodeError(f"{label} {value!r}: paths with spaces or quotes cannot travel in Flower's node config")
        self._check_hub()

    def _check_hub(self) -> None:
        """A hub is checked now (URL, token file, key), not at the end of the first run."""
        if self.hub is None:
            if self.hub_token_file is not None or self.hub_key is not None or self.hub_ca is not None:
                raise NodeError("--hub-token-file, --hub-key and --hub-ca need --hub URL")
            return
        if not self.hub.startswith(("http://", "https://")) or re.search(r'[\s"\']', self.hub):
            raise NodeError(f"--hub {self.hub!r}: a URL starting with http:// or https://")
        if self.hub_token_file is None or self.hub_key is None:
            raise NodeError("--hub needs --hub-token-file (this client's token) and --hub-key (the hub's hub.pub)")

        try:
            if not self.hub_token_file.read_text().strip():
                raise NodeError(f"--hub-token-file {self.hub_token_file} is empty")
            load_public_key(self.hub_key)
            if self.hub_ca is not None and not self.hub_ca.is_file():
                raise NodeError(f"--hub-ca {self.hub_ca} does not exist")
        except (OSError, ValueError) as err:
            raise NodeError(f"hub: {err}") from None


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) -> (host, port); a clear error otherwise."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\s/]+):(\d+)", address)
    if not match:
        raise NodeError(f"--server {address!r} must be HOST:PORT, e.g. server.example.org:9092")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 < port < 65536:
        raise NodeError(f"--server {address!r}: port must be in 1..65535")
    return host, port


def check_inputs(options: NodeOptions) -> None:
    """Everything local that can be wrong, checked before the first connection."""
    # lazy: pulls in peft, which this module does not need at import
    from fedlora.core.client_data import check_node_data

    if options.ca is not None and not options.insecure:
        cert = load_certificate(options.ca)
        check_validity(cert, options.ca)
    if options.key is not None and not options.insecure:
        node_public_key(options.key)
    try:
        check_node_data(options.data)
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise NodeError(f"--data: {err.args[0] if isinstance(err, KeyError) and err.args else err}") from None


def node_public_key(key_path: Path) -> str:
    """The fingerprint of the node's key (what the operator enrolled), from the private key file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not key_path.is_file():
        raise NodeError(f"--key {key_path} does not exist (create it with fl-client keygen)")
    try:
        key = serialization.load_ssh_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise NodeError(f"--key {key_path} is not an OpenSSH private key ({err}); use keygen's client.key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise NodeError(f"--key {key_path} is not an EC key: Flower's node authentication needs one (fl-client keygen)")
    return fingerprint(key.public_key())


def probe_server(options: NodeOptions, timeout: float = 10.0) -> None:
    """One TLS handshake with the server, verified by the CA (or a TCP connect with --insecure).

    Raises :class:`ServerAway` when nobody answers and :class:`NodeError` when somebody answers
    whom we must not talk to: a certificate not from this CA, expired, for another name, or
    plain HTTP where TLS was expected.
    """
    host, port = split_address(options.server)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as err:
        raise ServerAway(f"{options.server}: {err.strerror or err}") from None
    with sock:
        if options.insecure:
            _check_plain_http(sock, options)
            return
        context = ssl.create_default_context(cafile=str(options.ca))
        try:
            with context.wrap_socket(sock, server_hostname=host):
                return
        except ssl.SSLCertVerificationError as err:
            raise NodeError(_verification_message(err, options)) from None
        except ssl.SSLError as err:
            if "WRONG_VERSION_NUMBER" in str(err) or "record layer" in str(err).lower() or "packet length" in str(err):
                raise NodeError(
                    f"{options.server} does not speak TLS (a server started with --insecure?): this client "
                    "sends nothing in the clear; use --insecure on both sides for a test setup only"
                ) from None
            raise NodeError(f"TLS handshake with {options.server} failed: {err}") from None
        except (TimeoutError, ConnectionError) as err:
            raise ServerAway(f"{options.server}: TLS handshake interrupted ({err})") from None


def _check_plain_http(sock: socket.socket, options: NodeOptions) -> None:
    """With --insecure: the server must answer plain HTTP; a TLS server is refused with the fix."""
    host, port = split_address(options.server)
    try:
        sock.sendall(f"GET /health HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        answer = sock.recv(5)
    except OSError:
        answer = b""
    if answer.startswith(b"HTTP/"):
        return
    probe = ssl.create_default_context()
    probe.check_hostname, probe.verify_mode = False, ssl.CERT_NONE  # only asks "is this TLS?"
    try:
        with socket.create_connection((host, port), timeout=10.0) as raw, probe.wrap_socket(raw):
            speaks_tls = True
    except (OSError, ssl.SSLError):
        speaks_tls = False
    if speaks_tls:
        raise NodeError(
            f"{options.server} speaks TLS but this client was started with --insecure (plain HTTP): "
            "drop --insecure and pass --ca with the federation's ca.pem"
        )
    raise NodeError(f"{options.server} does not answer HTTP; is it a fedlora server (fl-server start)?")


def _verification_message(err: ssl.SSLCertVerificationError, options: NodeOptions) -> str:
    code = getattr(err, "verify_code", None)
    what = getattr(err, "verify_message", str(err))
    if code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
        return f"the server's certificate at {options.server} has expired: the operator must renew it (fl-server init)"
    if code == 9:
        return f"the server's certificate at {options.server} is not valid yet (check both clocks)"
    if code in (18, 19, 20, 21):  # self-signed / unknown issuer
        return (
            f"the server at {options.server} presented a certificate not issued by --ca {options.ca}: "
            "wrong CA file, or not the server you think (ask the operator for the federation's ca.pem)"
        )
    if code == 62:  # hostname mismatch
        return f"the server's certificate does not name {split_address(options.server)[0]!r}: {what}"
    return f"the server's certificate at {options.server} was refused: {what}"


def supernode_command(options: NodeOptions, runtime_port: int) -> list[str]:
    """Flower's SuperNode for these options: process isolation with this node's SuperExec secret
    (the node config carries data, state and name)."""
    node_config = f'data-path="{options.data}" state-dir="{options.state_dir.resolve()}" client-name="{options.name}"'
    if options.hub is not None:
        assert options.hub_token_file is not None and options.hub_key is not None
        node_config += f' hub-url="{options.hub}" hub-token-file="{options.hub_token_file.resolve()}"'
        node_config += f' hub-key="{options.hub_key.resolve()}"'
        if options.hub_ca is not None:
            node_config += f' hub-ca="{options.hub_ca.resolve()}"'
    if options.device is not None:
        node_config += f' device="{options.device}"'
    if options.dtype is not None:
        node_config += f' dtype="{options.dtype}"'
    command = [str(Path(sys.executable).parent / "flower-supernode"), "--superlink", options.server]
    if options.insecure:
        command.append("--insecure")
    else:
        assert options.ca is not None and options.key is not None
        command += ["--root-certificates", str(options.ca), "--auth-supernode-private-key", str(options.key)]
    command += ["--node-config", node_config, "--port", str(runtime_port), "--host", "127.0.0.1"]
    secret = (options.state_dir / SECRET_FILE).resolve()
    command += ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
    return command


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    # the SuperNode starts flower-superexec and flwr-clientapp by name: this installation's, never
    # another Flower found first on PATH (a different version refuses to talk to it)
    env["PATH"] = os.pathsep.join(p for p in (str(Path(sys.executable).parent), env.get("PATH", "")) if p)
    return env


class Supervisor:
    """Runs ``flower-supernode`` until stopped, restarting it with backoff."""

    def __init__(
        self,
        options: NodeOptions,
        console: Console,
        executor: Executor | None = None,
    ) -> None:
        self.options = options
        self.executor = executor
        self.console = console
        self.stop = threading.Event()
        self._sleep = self.stop.wait  # True when stopped meanwhile
        self.proc: subprocess.Popen[str] | None = None
        self.refused = False

    def say(self, text: str) -> None:
        self.console.print(f"fl-client: {text}", markup=False, highlight=False)

    def run(self) -> int:
        """Until Ctrl-C: probe, start, watch, restart. Returns the exit status."""
        delay, waited_since = BACKOFF_START, time.monotonic()
        while not self.stop.is_set():
            try:
                probe_server(self.options)
            except ServerAway as away:
                limit = self.options.max_wait
                if limit is not None and time.monotonic() - waited_since > limit:
                    self.say(f"server still away after {limit:.0f} s ({away}); giving up")
                    return 1
                self.say(f"server away ({away}); retrying in {delay:.0f} s")
                if self._sleep(delay):
                    break
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            self.refused = False
            code = self._run_supernode()
            if self.stop.is_set():
                break
            if self.refused:  # not enrolled (yet), revoked, or this node's previous session not expired
                fp = node_public_key(self.options.key) if self.options.key is not None else "?"
                wait = min(delay, REFUSED_RETRY)
                self.say(
                    f"the server refused this node's key {fp}: not enrolled (ask the operator: `fl-server enroll "
                    f"SERVER_DIR client.pub --name {self.options.name}`), revoked, or a previous session of this "
                    f"node not yet expired (up to 60 s); retrying in {wait:.0f} s"
                )
                if self._sleep(wait):
                    break
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            self.say(f"SuperNode exited with status {code}; reconnecting in {delay:.0f} s")
            if self._sleep(delay):
                break
            delay = min(delay * 2, BACKOFF_MAX)
            waited_since = time.monotonic()
        return 0

    def _run_supernode(self) -> int:
        port = free_port()
        command = supernode_command(self.options, port)
        if self.executor is not None:
            self.executor.port = port  # it acquires this SuperNode's tasks from now on
        self.proc = proc = subprocess.Popen(
            command,
            env=_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,  # whatever it starts goes down with it, as a group
            preexec_fn=_die_with_parent,
        )
        self.say(f"SuperNode started (pid {proc.pid}) for {self.options.server}, local runtime API 127.0.0.1:{port}")
        assert proc.stdout is not None
        pump = threading.Thread(target=self._pump, args=(proc.stdout,), daemon=True)
        pump.start()
        code = proc.wait()
        terminate_group(proc.pid)  # helpers it started (its SuperExec) would otherwise outlive it
        pump.join(timeout=5.0)
        return code

    def _pump(self, stream: IO[str]) -> None:
        for line in iter(stream.readline, ""):
            text = line.rstrip("\n")
            self.console.print(text, markup=False, highlight=False)
            if _REFUSED.search(text):
                self.refused = True

    def terminate(self) -> None:
        """Stop the SuperNode and everything it started (its process group)."""
        self.stop.set()
        if self.proc is not None:
            terminate_group(self.proc.pid)


def _die_with_parent() -> None:
    """In the SuperNode's process, before exec: SIGKILL it when ``fl-client`` dies (Linux), so a
    killed client leaves no SuperNode behind heartbeating for it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: Ctrl-C and SIGTERM still stop the group through terminate()


def node_policy(options: NodeOptions) -> PrivacyPolicy:
    """The policy in the state directory with this start's options applied, written back (0600)."""
    try:
        policy = PrivacyPolicy.load(options.state_dir).with_options(**options.policy_changes)
    except PolicyError as err:
        raise NodeError(str(err)) from None
    policy.save(options.state_dir)
    return policy


def start(options: NodeOptions, console: Console) -> int:
    """Check, then run the supervised SuperNode until Ctrl-C or SIGTERM."""
    check_inputs(options)
    options.state_dir.mkdir(parents=True, exist_ok=True)
    options.state_dir.chmod(0o700)  # the privacy ledger, the DP secret and the SuperExec secret live here
    policy = node_policy(options)
    console.print(f"fl-client: privacy policy: {policy.describe()}", markup=False, highlight=False)
    if options.insecure:
        console.print(
            "WARNING: --insecure: plain HTTP, the server is not authenticated and this node's updates travel "
            "in the clear. For a test setup only.",
            markup=False,
            highlight=False,
        )
    else:
        assert options.key is not None
        console.print(f"fl-client: node key {node_public_key(options.key)}", markup=False, highlight=False)

    # lazy: torch, transformers, PEFT and Opacus load once, here, before the first message
    import fedlora.client.compute  # noqa: F401
    from fedlora.client.app import app

    secret = ensure_secret(options.state_dir).read_bytes()
    supervisor = Supervisor(options, console)
    executor = Executor(options.state_dir, secret, app, supervisor.say)
    supervisor.executor = executor
    executor.start()

    def on_signal(signum: int, frame: object) -> None:
        del signum, frame
        supervisor.terminate()

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        return supervisor.run()
    except KeyboardInterrupt:
        return 0
    finally:
        supervisor.terminate()
        executor.close()
        signal.signal(signal.SIGTERM, previous)
