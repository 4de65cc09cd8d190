"""A hostile client among honest ones, for fedlora's own ServerApp in a real simulation.

Partition 0 runs :data:`ATTACKS`, one a round (round r: ``ATTACKS[r - 1]``), each built on its
honest reply; every other partition is fedlora's own ClientApp. ``reference_app`` is the
honest-only run the attacked one must equal: partition 0 fails in the rounds the server must
drop it, and replies honestly in the round whose attack (a false LoRA scaling) the server
must simply ignore.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from fedlora.client.app import request_of, to_message
from fedlora.client.compute import compute

#: one attack a round, in this order; "false-scaling" is the one the server must accept
ATTACKS = (
    "loss-as-list",
    "nan-partition-id",
    "unreadable-arrays",
    "huge-example-count",
    "huge-values",
    "false-scaling",
)
IGNORED = {"false-scaling"}

attacking_app = ClientApp()
reference_app = ClientApp()


def _honest(msg: Message, context: Context) -> Message:
    return to_message(msg, compute(request_of("train", msg, context)))


def _attack(name: str, reply: Message) -> Message:
    content = reply.content
    metrics = dict(content.metric_records["metrics"])
    arrays = content.array_records["arrays"]
    if name == "loss-as-list":
        metrics["train-loss"] = [float(metrics.get("train-loss", 1.0))] * 3
    elif name == "nan-partition-id":
        metrics["partition-id"] = float("nan")
    elif name == "unreadable-arrays":
        key = next(iter(arrays))
        array = arrays[key]
        assert isinstance(array.data, bytes)
        header = array.data[: len(array.data) - int(np.prod(array.shape)) * 4]
        arrays[key] = Array(dtype=array.dtype, shape=array.shape, stype=array.stype, data=header)  # no data
    elif name == "huge-example-count":
        metrics["num-examples"] = 1e12
    elif name == "huge-values":
        for key in list(arrays):
            if ".lora_B." in key:
                arrays[key] = Array(arrays[key].numpy() * np.float32(1e12))
    elif name == "false-scaling":
        metrics["lora-scaling"] = 1e6
    content["metrics"] = MetricRecord(metrics)
    return reply


def _round(msg: Message) -> int:
    return int(msg.content.config_records["config"]["server-round"])


@attacking_app.train()
def attack(msg: Message, context: Context) -> Message:
    reply = _honest(msg, context)
    if int(context.node_config["partition-id"]) != 0:
        return reply
    return _attack(ATTACKS[(_round(msg) - 1) % len(ATTACKS)], reply)


@reference_app.train()
def reference(msg: Message, context: Context) -> Message:
    if int(context.node_config["partition-id"]) == 0 and ATTACKS[(_round(msg) - 1) % len(ATTACKS)] not in IGNORED:
        raise RuntimeError("absent this round (the attacked run drops this client)")
    return _honest(msg, context)


@attacking_app.evaluate()
def attacked_evaluate(msg: Message, context: Context) -> Message:
    return to_message(msg, compute(request_of("evaluate", msg, context)))


@reference_app.evaluate()
def reference_evaluate(msg: Message, context: Context) -> Message:
    return to_message(msg, compute(request_of("evaluate", msg, context)))
