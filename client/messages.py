"""What one message asks of a client and what it answers, in plain Python and numpy: the
ClientApp (:mod:`fedlora.client.app`), the node's warm trainer (:mod:`fedlora.client.trainer`) and
the reply's computation (:mod:`fedlora.client.compute`) all speak it, and it crosses the trainer's
socket as is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

MetricValue = int | float | list[int] | list[float]


@dataclass
class ReplyContent:
    """What a reply carries, independent of Flower's message objects (so it can cross a socket)."""

    metrics: dict[str, MetricValue]
    tensors: dict[str, np.ndarray] | None = None
    status: str | None = None  # why the client declined
    name: str | None = None  # a deployed node's name


@dataclass(frozen=True)
class Request:
    """One message's work, as the trainer receives it (plain Python and numpy)."""

    kind: str  # "train", "evaluate" or "personalize"
    run_config: dict[str, Any]
    node_config: dict[str, Any]
    run_id: int
    state: dict[str, np.ndarray]
    config: dict[str, Any]
