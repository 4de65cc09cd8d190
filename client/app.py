"""fedlora's Flower ClientApp, in simulation and deployment: thin, the work in :mod:`fedlora.client.compute`.

In simulation Ray's worker processes run it and keep the loaded model across messages. On a
deployed node ``fl-client start`` runs it in its own process (:mod:`fedlora.client.executor`),
never from the app bundle a server sends, so the model also stays loaded there.
"""

from __future__ import annotations

import time

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedlora.client.messages import ReplyContent, Request

app = ClientApp()


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
    # lazy: PEFT and Opacus load with the first message; Flower also imports this module in the
    # ServerApp's process, only to check that it loads (~0.8 s of CPU a simulation saved there)
    from fedlora.client.compute import compute

    started = time.time()
    content = compute(request_of(kind, msg, context))
    if kind == "train" and "declined" not in content.metrics:
        content.metrics["process-seconds"] = time.time() - started  # what this message cost on the node
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
