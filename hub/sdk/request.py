"""A generation request and the bounds on what a task may carry: checked at the hub's
boundary before any model work (and without torch, so the API refuses bad input cheaply)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedlora.core.tasks import Example
from fedlora.hub.sdk.manifest import GENERATOR_METHODS


def check_method(method: str) -> str:
    if method not in GENERATOR_METHODS:  # each is stored under generators/<method>
        raise ValueError(f"unknown generation method {method!r} (known: {', '.join(GENERATOR_METHODS)})")
    return method


#: bounds on what a task may carry (descriptions feed the text encoder, examples the base model)
MAX_DESCRIPTION_CHARS = 1000
MAX_EXAMPLES = 32
MAX_EXAMPLE_CHARS = 256
MAX_REQUEST_BYTES = 256 << 10
REQUEST_KEYS = ("description", "method", "examples", "base_model_sha256")


def check_description(text: Any, where: str = "description") -> str:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where} is empty: describe the task in words (e.g. 'add 4 to each digit')")
    if len(text) > MAX_DESCRIPTION_CHARS:
        raise ValueError(f"{where} is {len(text)} characters long; the limit is {MAX_DESCRIPTION_CHARS}")
    return text.strip()


def check_examples(values: Any, where: str = "examples") -> tuple[Example, ...]:
    """Examples as ``[{"prompt": str, "completion": str}, ...]``, bounded in number and size."""
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{where} must be a list of {{'prompt': ..., 'completion': ...}} objects")
    if len(values) > MAX_EXAMPLES:
        raise ValueError(f"{where}: {len(values)} examples, at most {MAX_EXAMPLES} are accepted")
    out = []
    for i, item in enumerate(values):
        if isinstance(item, Example):
            item = {"prompt": item.prompt, "completion": item.completion}
        if not isinstance(item, Mapping) or set(item) != {"prompt", "completion"}:
            raise ValueError(f"{where}[{i}] must be an object with exactly 'prompt' and 'completion'")
        prompt, completion = item["prompt"], item["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
            raise ValueError(f"{where}[{i}]: 'prompt' and 'completion' must be strings, the completion non-empty")
        if len(prompt) + len(completion) > MAX_EXAMPLE_CHARS:
            raise ValueError(f"{where}[{i}] is longer than {MAX_EXAMPLE_CHARS} characters")
        out.append(Example(prompt, completion))
    return tuple(out)


def examples_json(examples: Sequence[Example]) -> list[dict[str, str]]:
    return [{"prompt": e.prompt, "completion": e.completion} for e in examples]


@dataclass(frozen=True)
class GenerationRequest:
    """``POST /v1/generate``'s body: a description, optional examples, the method, and the
    requester's base-model weights hash (a generator for other weights is refused)."""

    description: str
    method: str = "sg-lora"
    examples: tuple[Example, ...] = ()
    base_model_sha256: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "description", check_description(self.description))
        check_method(self.method)
        object.__setattr__(self, "examples", check_examples(self.examples))
        sha = self.base_model_sha256
        if sha is not None and (
            not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)
        ):
            raise ValueError(f"base_model_sha256 must be a sha256 hex digest, got {sha!r}")

    @classmethod
    def from_json(cls, payload: Any) -> GenerationRequest:
        if not isinstance(payload, Mapping):
            raise ValueError('the body must be {"description": "...", "method": "sg-lora", "examples": [...]}')
        unknown = sorted(set(payload) - set(REQUEST_KEYS))
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)} (known: {', '.join(REQUEST_KEYS)})")
        if "description" not in payload:
            raise ValueError("description is missing: describe the task in words")
        return cls(
            payload["description"],
            payload.get("method", "sg-lora"),
            payload.get("examples", ()),
            payload.get("base_model_sha256"),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"description": self.description, "method": self.method}
        if self.examples:
            out["examples"] = examples_json(self.examples)
        if self.base_model_sha256:
            out["base_model_sha256"] = self.base_model_sha256
        return out

    def key(self) -> str:
        """What identifies the generated adapter (the base model is the generator's)."""
        data = {"description": self.description, "examples": examples_json(self.examples)}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
