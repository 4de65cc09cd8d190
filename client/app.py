"""fedlora's Flower ClientApp, in simulation and deployment: thin, the work in :mod:`fedlora.client.compute`.

Flower's deployment runtime starts a fresh client-app process for every message, and importing
torch, transformers, PEFT and Opacus and loading the base model would cost seconds each time.
``fl-client start`` keeps one trainer process warm (:mod:`fedlora.client.trainer`, model loaded once,
listening on a Unix socket in the node's state directory, owner only); this app imports only
Flower and numpy, hands the message's arrays and config to the trainer and turns its answer
into the reply. Without a trainer (``trainer`` absent from the node config, or its socket
gone), and always in simulation, it computes the reply itself in this process; Ray's workers keep
that process, and with it the loaded model, across messages.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedlora.client.messages import ReplyContent, Request
from fedlora.client.trainer import ask

app = ClientApp()


def process_start_time() -> float:
    """When this process started (Unix time; Linux ``/proc``, else now): Flower starts a fresh
    process per message in deployment, and what that costs before our code runs is worth seeing."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])  # to 10 ms; /proc/stat's btime is whole seconds
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


PROCESS_STARTED = process_start_time()


def to_message(msg: Message, content: ReplyContent) -> Message:
    """The reply to ``msg``: metrics, the tensors, why it declined and who sent it."""
    record = RecordDict({"metrics": MetricRecord(dict(content.metrics))})
    if content.tensors is not None:
        record["arrays"] = ArrayRecord(array_dict={k: Array(v) for k, v in content.tensors.items()})
    if content.status is not None:
        record["status"] = ConfigRecord({"reason": content.status})
    if content.name:  # a deployed node's name, so reports can say who is who
        record["client"] = ConfigRecord({"name": content.name})
    return Message(record, reply_to=msg)


def request_of(kind: str, msg: Message, context: Context) -> Request:
    """The work ``msg`` asks for, in plain Python."""
    arrays = msg.content.array_records["arrays"]
    config = msg.content.config_records.get("config")
    return Request(
        kind=kind,
        run_config=dict(context.run_config),
        node_config=dict(context.node_config),
        run_id=int(context.run_id),
        state={k: a.numpy() for k, a in arrays.items()},
        config=dict(config) if config is not None else {},
    )


def client_level_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's client-side fixed clipping, only when the server's DP wrapper asked for it."""
    config = msg.content.config_records.get("config")
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def _handle(kind: str, msg: Message, context: Context) -> Message:
    request = request_of(kind, msg, context)
    socket_path = str(context.node_config.get("trainer") or "")
    if socket_path and Path(socket_path).exists():
        content = ask(socket_path, request)
    else:  # no warm trainer on this node: do the work here
        # lazy: torch, transformers, PEFT and Opacus load only when this process computes the reply itself
        from fedlora.client.compute import compute

        content = compute(request)
    if kind == "train":
        content.metrics["process-seconds"] = time.time() - PROCESS_STARTED  # what this message cost end to end
    return to_message(msg, content)


@app.train(mods=[client_level_clipping_mod])
def train_handler(msg: Message, context: Context) -> Message:
    """Local training: see :func:`fedlora.client.compute.train_reply`."""
    return _handle("train", msg, context)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """The global adapter on this node's test split: see :func:`fedlora.client.compute.evaluate_reply`."""
    return _handle("evaluate", msg, context)


@app.query("personalize")
def personalize_handler(msg: Message, context: Context) -> Message:
    """The end of a run (``personalize.steps`` > 0): see :func:`fedlora.client.compute.personalize_reply`."""
    return _handle("personalize", msg, context)
