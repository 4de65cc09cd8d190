"""Train replies as a Flower server receives them, for strategy tests outside a Flower process."""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity


def set_task_identity() -> None:
    """Messages need a run identity outside a Flower process."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def train_reply(node: int, tensors: dict[str, torch.Tensor] | None, metrics: dict[str, Any] | None = None) -> Message:
    """Node ``node``'s reply to a train message: ``tensors`` as its arrays (None: no arrays) and
    ``metrics`` (default: ``num-examples`` = 10 x node)."""
    request = Message(RecordDict(), dst_node_id=node, message_type="train")
    content = RecordDict({"metrics": MetricRecord(metrics if metrics is not None else {"num-examples": 10 * node})})
    if tensors is not None:
        content["arrays"] = ArrayRecord(tensors)
    return Message(content, reply_to=request)
