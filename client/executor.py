"""The node's own task executor: the part of Flower's SuperExec a fedlora node keeps for itself.

``fl-client start`` runs ``flower-supernode --isolation process`` with a SuperExec secret, so the
SuperNode starts nothing on its own and its local runtime API hands out tasks only to a caller
that signs with the secret (Flower's SuperExec authentication). This module is that caller. For
each task it pulls the message, context and bundle, and then, instead of installing the bundle
and importing its client app as Flower's ``flwr-clientapp`` would:

- checks the bundle (:mod:`fedlora.client.bundle`) without unpacking it: a refused one is logged
  with its SHA-256 and answered with an error, and none of it runs;
- drops a message whose time to live has passed (the server closed that round), so a late node
  spends no privacy budget on it;
- runs the node's installed ClientApp (:mod:`fedlora.client.app`) on it, in this process, where
  the model stays loaded between messages.

Only one task runs at a time, as the node trains one message at a time.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest, SendTaskHeartbeatRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from fedlora.atomic import write_atomic
from fedlora.client.bundle import check_bundle
from fedlora.privacy.policy import PrivacyPolicy

SECRET_FILE = "superexec.secret"
SECRET_BYTES = 32
_ACQUIRE = "/flwr.proto.Runtime/AcquireTask"
HEARTBEAT_SECONDS = 10.0


def ensure_secret(state_dir: Path) -> Path:
    """The shared secret of this node's SuperNode and executor (created once, owner only)."""
    path = Path(state_dir) / SECRET_FILE
    if not path.exists() or path.stat().st_size < SECRET_BYTES:
        write_atomic(path, secrets.token_hex(SECRET_BYTES).encode(), mode=0o600)
    path.chmod(0o600)
    return path


@dataclass(frozen=True)
class TaskOutcome:
    """Whether the app ran on a task's message, and what to log about it."""

    ran: bool
    detail: str


class Executor:
    """Acquires this node's tasks with the SuperExec secret and runs them with ``app``."""

    def __init__(
        self,
        state_dir: Path,
        secret: bytes,
        app: ClientApp,
        say: Callable[[str], None],
        poll: float = 0.05,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.secret = secret
        self.app = app
        self.say = say
        self.poll = poll
        self.port: int | None = None  # the SuperNode's runtime API port (set when it starts)
        self.stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the loop

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="fedlora-executor", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30.0)

    def _loop(self) -> None:
        client: RuntimeHttpClient | None = None
        bound = None
        while not self.stop.is_set():
            port = self.port
            if port is None:
                self.stop.wait(0.2)
                continue
            if client is None or bound != port:
                if client is not None:
                    client.close()
                client, bound = self._client(port, auth=True), port
            try:
                res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            except (httpx.HTTPError, OSError):
                self.stop.wait(0.5)  # the SuperNode is (re)starting
                continue
            if res.HasField("task") and res.token:
                try:
                    self._execute(port, res.token, int(res.task.task_id), int(res.task.run_id))
                except Exception as err:  # a task must never take the node down
                    self.say(f"task {res.task.task_id} failed: {type(err).__name__}: {err}")
            else:
                self.stop.wait(self.poll)
        if client is not None:
            client.close()

    def _client(self, port: int, *, auth: bool = False, token: str | None = None) -> RuntimeHttpClient:
        interceptors: list[object] = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
        if auth:
            interceptors.append(SuperExecAuthHttpInterceptor(master_secret=self.secret, protected_methods={_ACQUIRE}))
        if token is not None:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        return RuntimeHttpClient.from_server_address(
            server_address=f"127.0.0.1:{port}",
            insecure=True,  # loopback to our own SuperNode; the task token and the secret are what guard it
            root_certificates=None,
            interceptors=interceptors,  # type: ignore[arg-type]
        )

    # ------------------------------------------------------------------ one task

    def _execute(self, port: int, token: str, task_id: int, run_id: int) -> None:
        client = self._client(port, token=token)
        beating = threading.Event()
        heart = threading.Thread(target=self._heartbeat, args=(client, beating), daemon=True)
        heart.start()
        context: Context | None = None
        status, detail = SubStatus.FAILED, "the task did not finish"
        try:
            message, context, _, fab = pull_task_input(client)
            outcome, reply = self._answer(message, context, fab.content)
            self.say(f"run {run_id}, task {task_id}: {message.metadata.message_type}: {outcome.detail}")
            push_message(client, reply, context)
            status, detail = (SubStatus.COMPLETED, "") if outcome.ran else (SubStatus.FAILED, outcome.detail)
        finally:
            beating.set()
            push_task_output(client, context, status, detail)
            client.close()

    def _answer(self, message: Message, context: Context, fab: bytes) -> tuple[TaskOutcome, Message]:
        """The reply to ``message``: the app's, or an error saying why it was not run."""
        policy = PrivacyPolicy.load(self.state_dir)
        verdict = check_bundle(fab, policy.allowed_bundles)
        if not verdict.accepted:
            return self._refuse(message, verdict.reason)
        meta = message.metadata
        if meta.created_at + meta.ttl < time.time():
            ago = time.time() - (meta.created_at + meta.ttl)
            return self._refuse(message, f"message expired {ago:.0f} s ago (its round is over): not trained")
        try:
            reply = self.app(message=message, context=context)
        except Exception as err:  # the app's own failure goes back to the server, as Flower's runtime does
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(err).__name__}: {err}")
            return TaskOutcome(False, f"failed: {type(err).__name__}: {err}"), Message(error, reply_to=message)
        return TaskOutcome(True, f"done ({verdict.reason}, sha256:{verdict.sha256[:12]})"), reply

    def _refuse(self, message: Message, reason: str) -> tuple[TaskOutcome, Message]:
        error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"fedlora node: {reason}")
        return TaskOutcome(False, f"REFUSED: {reason}"), Message(error, reply_to=message)

    def _heartbeat(self, client: RuntimeHttpClient, done: threading.Event) -> None:
        """Keep the task alive while it trains (Flower's sender would SIGINT this whole process on a
        refused beat; here a refused beat only ends the beating)."""
        while not done.wait(HEARTBEAT_SECONDS):
            try:
                if not client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success:
                    return
            except httpx.HTTPError:
                continue
