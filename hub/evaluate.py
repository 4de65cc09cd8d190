"""``fl-hub evaluate``: the latest version of every adapter under a hub prefix (personal adapters
under ``clients/``, task adapters under ``tasks/``, ...) on one dataset, in one batched pass.

Adapters are fetched and verified like pulls (signature, hashes), kept in memory, and evaluated
with :func:`fedlora.core.multi_adapter.evaluate_many`: each sequence of a batch runs through its own
adapter, so a hundred adapters cost about one evaluation of the base model per batch instead of
a hundred. The data never leaves the machine that runs the command.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.core.tasks import Example
from fedlora.hub.sdk.manifest import describe_base_model

#: the most adapters one evaluation lists (the hub's listing limit)
LIST_LIMIT = 1000


@dataclass(frozen=True)
class AdapterScore:
    name: str
    version: int
    exact_match: float
    loss: float
    examples: int


@dataclass(frozen=True)
class HubEvaluation:
    scores: list[AdapterScore]  # best first
    skipped: list[str]  # adapters for another base model, with the reason
    seconds: float


def load_examples(spec: str, num: int, seed: int) -> list[Example]:
    """A JSONL file of {prompt, completion} (all of it, up to ``num``) or ``embedded:TASK[,TASK]``
    (``num`` examples of the tasks' test streams)."""
    # lazy: pulls in peft, which this module does not need at import
    from fedlora.core.client_data import EMBEDDED_PREFIX, check_node_data, node_examples

    # lazy: pulls in peft, which this module does not need at import
    from fedlora.core.config import FederationConfig

    # lazy: pulls in torch, which this module does not need at import
    from fedlora.core.data import load_jsonl

    if num < 1:
        raise ValueError(f"--num-examples must be >= 1, got {num}")
    if spec.startswith(EMBEDDED_PREFIX):
        try:
            check_node_data(spec)
        except KeyError as error:
            raise ValueError(f"--data {spec!r}: {error.args[0]}") from None
        records = node_examples(FederationConfig(num_train=1, num_test=num), spec, seed)[1]
        examples = [r for r in records if isinstance(r, Example)]
        if len(examples) != len(records):
            raise ValueError(f"--data {spec!r}: the hub evaluates causal-LM adapters on prompt/completion tasks only")
        return examples
    if not Path(spec).is_file():
        raise FileNotFoundError(f"--data {spec!r} is neither a JSONL file nor embedded:TASK[,TASK]")
    return load_jsonl(spec)[:num]


def evaluate_prefix(
    hub: Any,
    prefix: str,
    examples: Sequence[Example],
    model_dir: str | Path | None = None,
    batch_size: int = 64,
) -> HubEvaluation:
    """Fetch (verified) the latest adapter of every name under ``prefix`` made for the local base
    model and score them all on ``examples``."""
    # lazy: pulls in torch, which this module does not need at import
    from fedlora.core.data import encode
    from fedlora.core.model import load_base_model, max_positions

    # lazy: pulls in peft, which this module does not need at import
    from fedlora.core.model_dirs import load_tokenizer

    # lazy: pulls in peft, which this module does not need at import
    from fedlora.core.multi_adapter import LoadedAdapter, check_fits, evaluate_many

    if not examples:
        raise ValueError("no examples to evaluate on")
    started = time.perf_counter()
    local = describe_base_model(model_dir)
    adapters: list[tuple[str, int, LoadedAdapter]] = []
    skipped = []
    rows = hub.list(prefix, limit=LIST_LIMIT)
    if len(rows) >= LIST_LIMIT:
        raise ValueError(f"more than {LIST_LIMIT} adapters under {prefix!r}: evaluate a narrower prefix")
    for row in rows:
        name, version = str(row["name"]), int(row["version"])
        if not name.startswith(prefix):  # the listing is unsigned: an answer outside the prefix is not ours
            skipped.append(f"{name}: not under {prefix!r}")
            continue
        if row["provenance"]["base_model"].get("sha256") != local.sha256:  # unverified: saves a download
            skipped.append(f"{name} v{version}: made for base model {row['provenance']['base_model'].get('id')}")
            continue
        manifest, files = hub.fetch(name, version)  # verified: signature, name, version, every hash
        base = manifest["provenance"]["base_model"]
        if base.get("sha256") != local.sha256:  # what the hub signed decides
            skipped.append(f"{name} v{version}: signed for base model {base.get('id')}, not {local.id}")
            continue
        try:
            adapters.append((name, version, LoadedAdapter.from_files(f"{name} v{version}", files)))
        except ValueError as err:
            skipped.append(f"{name} v{version}: {err}")
    if not adapters:
        why = f" ({'; '.join(skipped)})" if skipped else ""
        raise ValueError(f"the hub has no adapters under {prefix!r} to evaluate for this base model{why}")
    tokenizer, model = load_tokenizer(model_dir), load_base_model(model_dir)
    fitting = []
    for name, version, adapter in adapters:
        try:
            check_fits(model, adapter)  # e.g. a FedEx residual for other modules: skipped, not fatal
            fitting.append((name, version, adapter))
        except ValueError as err:
            skipped.append(f"{name} v{version}: {err}")
    data = encode(tokenizer, examples, max_positions(model))
    results = evaluate_many(
        model, [a for _, _, a in fitting], [(k, data) for k in range(len(fitting))], int(tokenizer.pad_token_id),
        batch_size,
    ) if fitting else []  # fmt: skip
    scores = [
        AdapterScore(name, version, res.exact_match, res.loss, res.num_examples)
        for (name, version, _), res in zip(fitting, results, strict=True)
    ]
    if not scores:
        raise ValueError(f"no adapter under {prefix!r} could be evaluated: {'; '.join(skipped)}")
    scores.sort(key=lambda s: (-s.exact_match, s.loss, s.name))
    return HubEvaluation(scores, skipped, time.perf_counter() - started)
