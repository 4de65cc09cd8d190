"""The records each model kind trains on, in one place below every task suite and data reader.

A task suite (the embedded procedural tasks, the text-classification family, the digit-image
domains) and a user's data file both produce these; a model kind (:mod:`fedlora.core.kinds`)
turns them into tensors. Every record has a ``key``: what identifies its input, so test sets can
avoid inputs a client trains on.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np


@dataclass(frozen=True)
class Example:
    """One supervised pair of a causal LM: the model sees ``prompt`` and must produce ``completion``."""

    prompt: str
    completion: str

    @property
    def key(self) -> str:
        return self.prompt


@dataclass(frozen=True)
class Message:
    """One turn of a chat record (``role`` is system, user or assistant)."""

    role: str
    content: str


@dataclass(frozen=True)
class ChatExample:
    """A causal-LM conversation: rendered through the tokenizer's chat template, with the loss on
    the assistant turns only."""

    messages: tuple[Message, ...]

    @property
    def key(self) -> str:
        return json.dumps([[m.role, m.content] for m in self.messages if m.role != "assistant"])


@dataclass(frozen=True)
class TextExample:
    """A text to classify and its label's name."""

    text: str
    label: str

    @property
    def key(self) -> str:
        return self.text


@dataclass(frozen=True, eq=False)
class ImageExample:
    """An image to classify (``uint8`` array, H x W grey or H x W x C) and its label's name.
    ``key`` names where the image came from (source index and transform), as images have no text."""

    image: np.ndarray
    label: str
    key: str

    def __post_init__(self) -> None:
        if not isinstance(self.image, np.ndarray) or self.image.ndim not in (2, 3):
            raise ValueError(f"an image must be a 2-D or 3-D numpy array, got {type(self.image).__name__}")


Record = Example | ChatExample | TextExample | ImageExample


class Named(Protocol):
    @property
    def name(self) -> str: ...


N = TypeVar("N", bound=Named)


def by_name(items: Iterable[N], what: str = "task") -> dict[str, N]:
    """A suite's registry: its items by name, a repeated name refused (it would shadow another)."""
    registry: dict[str, N] = {}
    for item in items:
        if item.name in registry:
            raise AssertionError(f"duplicate {what} {item.name}")
        registry[item.name] = item
    return registry


def label_of(record: Any) -> str | None:
    """The class label of a classification record; None for causal-LM records."""
    return record.label if isinstance(record, TextExample | ImageExample) else None
