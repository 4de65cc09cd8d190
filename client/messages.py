"""What one message asks of a client and what it answers, in plain Python and numpy: the
ClientApp (:mod:`fedlora.client.app`) turns Flower's messages into these, and the reply's
computation (:mod:`fedlora.client.compute`) never sees a Flower object."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

MetricValue = int | float | list[int] | list[float]


@dataclass
class ReplyContent:
    """What a reply carries, independent of Flower's message objects."""

    metrics: dict[str, MetricValue]
    tensors: dict[str, np.ndarray] | None = None
    status: str | None = None  # why the client declined
    name: str | None = None  # a deployed node's name


@dataclass(frozen=True)
class Request:
    """One message's work, in plain Python and numpy."""

    kind: str  # "train", "evaluate" or "personalize"
    run_config: dict[str, Any]
    node_config: dict[str, Any]
    run_id: int
    state: dict[str, np.ndarray]
    config: dict[str, Any]
