"""Local data: the embedded task suite or a user's JSONL file, tokenised for causal LM training.

A record is ``{"prompt": ..., "completion": ...}``. The loss and the exact-match metric only
look at the completion (plus the end-of-sequence token), so the same code serves every task.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from transformers import PreTrainedTokenizerBase

from fedlora.core.tasks import Example, get_task

IGNORE_INDEX = -100
R = TypeVar("R")


def read_jsonl(path: str | Path) -> list[tuple[Example, str | None]]:
    """Read prompt/completion records, each with its optional ``task`` label (used to split one
    file into non-IID clients); a malformed line is refused with its file and line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {p} does not exist")
    out: list[tuple[Example, str | None]] = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected an object with 'prompt' and 'completion'")
            missing = [k for k in ("prompt", "completion") if k not in rec]
            if missing:
                raise ValueError(f"{where}: missing key(s) {missing}; a record needs 'prompt' and 'completion'")
            extra = sorted(set(rec) - {"prompt", "completion", "task"})
            if extra:
                raise ValueError(f"{where}: unknown key(s) {extra}; allowed: 'prompt', 'completion', 'task'")
            if not isinstance(rec["prompt"], str) or not isinstance(rec["completion"], str):
                raise ValueError(f"{where}: 'prompt' and 'completion' must be strings")
            if not rec["completion"]:
                raise ValueError(f"{where}: 'completion' is empty")
            task = rec.get("task")
            if task is not None and (not isinstance(task, str) or not task):
                raise ValueError(f"{where}: 'task' must be a non-empty string")
            out.append((Example(rec["prompt"], rec["completion"]), task))
    if not out:
        raise ValueError(f"{p}: no records")
    return out


def load_jsonl(path: str | Path) -> list[Example]:
    """The examples of a JSONL file (see :func:`read_jsonl`)."""
    return [ex for ex, _ in read_jsonl(path)]


@dataclass(frozen=True)
class DataSpec:
    """Where a client's examples come from: an embedded task or a JSONL file."""

    task: str | None = None
    path: str | None = None
    num_train: int = 2000
    num_test: int = 200
    seed: int = 0
    tagged: bool = False

    def __post_init__(self) -> None:
        if (self.task is None) == (self.path is None):
            raise ValueError("give exactly one data source: an embedded task or a JSONL path")
        if self.task is not None:
            get_task(self.task)  # raises with the known names
        if self.num_train < 1 or self.num_test < 0:
            raise ValueError(f"num_train must be >= 1 and num_test >= 0, got {self.num_train}, {self.num_test}")

    def load(self) -> tuple[list[Example], list[Example]]:
        """(train, test) examples. A JSONL file is split 90/10 deterministically by ``seed``."""
        if self.task is not None:
            t = get_task(self.task)
            return (
                t.examples(self.num_train, self.seed, "train", self.tagged),
                t.examples(self.num_test, self.seed, "test", self.tagged),
            )
        assert self.path is not None
        return split_train_test(load_jsonl(self.path), self.num_test, self.seed)


def split_train_test(records: Sequence[R], num_test: int, seed: int) -> tuple[list[R], list[R]]:
    """A seeded shuffle, then at most ``num_test`` and at most 10% of the records held out for testing."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(records), generator=g).tolist()
    n_test = min(num_test, len(records) // 10)
    return [records[i] for i in order[n_test:]], [records[i] for i in order[:n_test]]


@dataclass(frozen=True)
class Encoded:
    """A tokenised example: ``labels`` is -100 on the prompt, the target ids elsewhere."""

    input_ids: list[int]
    labels: list[int]


def encode(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_length: int) -> list[Encoded]:
    """Tokenise prompt and completion separately and append the end-of-sequence token."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no end-of-sequence token")
    eos = int(tokenizer.eos_token_id)
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    completions = tokenizer([e.completion for e in examples], add_special_tokens=False)["input_ids"]
    out: list[Encoded] = []
    for ex, p, c in zip(examples, prompts, completions, strict=True):
        ids = list(p) + list(c) + [eos]
        if len(ids) > max_length:
            raise ValueError(
                f"example {ex.prompt!r} -> {ex.completion!r} is {len(ids)} tokens, "
                f"longer than the model's {max_length} positions"
            )
        out.append(Encoded(ids, [IGNORE_INDEX] * len(p) + list(c) + [eos]))
    return out


@dataclass(frozen=True)
class EncodedLabel:
    """A tokenised text to classify: ``label`` is the class id in the run's label space."""

    input_ids: list[int]
    label: int


@dataclass(frozen=True, eq=False)
class EncodedImage:
    """An image as the model's processor prepared it (C x H x W) and its class id."""

    pixel_values: torch.Tensor
    label: int


#: what a model kind encodes records into; :func:`collate` and :func:`forward` dispatch on it
Item = Encoded | EncodedLabel | EncodedImage


def collate(batch: Sequence[Item], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack one kind's items into model inputs. Causal LMs and texts are right-padded, padded
    positions masked out of attention and loss; classification batches carry ``label`` (N,)."""
    first = batch[0]
    if isinstance(first, EncodedImage):
        images = [e for e in batch if isinstance(e, EncodedImage)]
        if len(images) != len(batch):
            raise ValueError("a batch mixes model kinds")
        return {
            "pixel_values": torch.stack([e.pixel_values for e in images]),
            "label": torch.tensor([e.label for e in images], dtype=torch.long),
        }
    width = max(len(e.input_ids) for e in batch if not isinstance(e, EncodedImage))
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        assert not isinstance(e, EncodedImage), "a batch mixes model kinds"
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
    if isinstance(first, EncodedLabel):
        classes = [e.label for e in batch if isinstance(e, EncodedLabel)]
        if len(classes) != len(batch):
            raise ValueError("a batch mixes model kinds")
        label = torch.tensor(classes, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "label": label}
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(batch):
        if not isinstance(e, Encoded):
            raise ValueError("a batch mixes model kinds")
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batch_size(batch: dict[str, torch.Tensor]) -> int:
    """The number of examples of a collated batch (the first dimension of every tensor)."""
    return int(next(iter(batch.values())).shape[0])


def physical_batches(batch: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """A collated (logical) batch as consecutive batches of at most ``size`` examples each (0, or
    at least the batch: the batch itself). A text part keeps only the positions its own longest
    sequence uses: right padding past them changes no output, as no position attends to it."""
    n = batch_size(batch)
    if size < 0:
        raise ValueError(f"physical batch size must be >= 0 (0: the whole batch), got {size}")
    if size == 0 or size >= n:
        return [batch]
    parts = []
    for start in range(0, n, size):
        part = {k: v[start : start + size] for k, v in batch.items()}
        mask = part.get("attention_mask")
        if mask is not None:
            width = int(mask.any(dim=0).nonzero().max()) + 1 if bool(mask.any()) else mask.shape[1]
            part = {k: v[:, :width] if v.shape == mask.shape else v for k, v in part.items()}
        parts.append(part)
    return parts


@dataclass
class Outputs:
    """One batch through a model: per-example loss (what training averages and DP-SGD clips per
    example) and per-example correctness (exact match of a completion, or of a class)."""

    loss: torch.Tensor  # (N,)
    correct: torch.Tensor  # (N,) bool
    predicted: torch.Tensor | None = None  # (N,) class ids of a classifier
    target: torch.Tensor | None = None  # (N,)
    tokens: torch.Tensor | None = None  # (N,) a causal LM's target tokens per example
    token_hits: torch.Tensor | None = None  # (N,) how many of them the argmax gets right


def forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Outputs:
    """Run ``model`` on a collated batch of any kind. The loss is computed in float32 whatever
    the model's dtype, so bf16 and fp16 models train on the same objective.

    A causal LM computes its LM head only at the positions some target token needs
    (:func:`target_positions`, passed as transformers' ``logits_to_keep``): with a large
    vocabulary the logits of every position, not the model, dominate memory. Loss and exact match
    equal :func:`per_sequence_loss` and :func:`exact_matches` on the full logits (the other
    positions carry no target). A model whose ``forward`` takes no ``logits_to_keep`` computes
    every position, as before."""
    if "label" in batch:
        inputs = {k: v for k, v in batch.items() if k != "label"}
        logits = model(**inputs).logits.float()
        target = batch["label"]
        loss = torch.nn.functional.cross_entropy(logits, target, reduction="none")
        predicted = logits.argmax(dim=-1)
        return Outputs(loss, predicted == target, predicted.detach(), target)
    labels = batch["labels"]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    positions = target_positions(labels)
    if positions.numel() and takes_logits_to_keep(model):
        logits = model(**inputs, logits_to_keep=positions).logits  # (N, K, V): position t predicts t + 1
        targets = labels[:, positions + 1]  # (N, K)
    else:
        logits = model(**inputs).logits[:, :-1]  # (N, T - 1, V)
        targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    hits = (logits.detach().argmax(dim=-1) == targets) & mask
    correct = (hits | ~mask).all(dim=1)  # target_matches, from the same argmax
    return Outputs(target_loss(logits, targets), correct, tokens=mask.sum(dim=1), token_hits=hits.sum(dim=1))


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions whose next-token logits some sequence of the batch is scored on, ascending:
    every t with ``labels[n, t + 1] != -100`` for some n. labels: (N, T) -> (K,), K <= T - 1.

    One set for the whole batch (the union over its sequences), so the kept logits stay
    (N, K, V), example first, as per-example gradients need; the positions other sequences
    need carry -100 in this one's targets."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)


def takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the causal LM inside ``model`` (under Opacus' GradSampleModule, a PEFT model:
    wrappers that pass keyword arguments through) computes logits only where told to."""
    inner = model
    for _ in range(8):  # wrappers nest a few levels at most
        wrapped = getattr(inner, "_module", None)  # Opacus' GradSampleModule
        get_base = getattr(inner, "get_base_model", None)  # PEFT
        if not isinstance(wrapped, torch.nn.Module) and callable(get_base):
            wrapped = get_base()
        if not isinstance(wrapped, torch.nn.Module) or wrapped is inner:
            break
        inner = wrapped
    return "logits_to_keep" in inspect.signature(type(inner).forward).parameters


def target_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of each sequence over its own target tokens (-100: none).

    Normalising per sequence (not per batch of tokens) means one sample's gradient never
    depends on another sample's length, which DP-SGD's per-sample clipping relies on.
    logits: (N, K, V) predicting targets: (N, K) -> (N,)
    """
    mask = targets != IGNORE_INDEX
    tok = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        targets.reshape(-1).clamp_min(0),
        reduction="none",
    ).view_as(targets)
    tok = tok * mask
    return tok.sum(dim=1) / mask.sum(dim=1).clamp_min(1)


def target_matches(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per sequence: whether the argmax equals every target token (-100: none).
    logits: (N, K, V), targets: (N, K) -> (N,) bool"""
    mask = targets != IGNORE_INDEX
    return ((logits.argmax(dim=-1) == targets) | ~mask).all(dim=1)


def per_sequence_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """:func:`target_loss` of full next-token logits against the labels shifted by one.
    logits: (N, T, V), labels: (N, T) -> (N,)
    """
    return target_loss(logits[:, :-1, :], labels[:, 1:])


def exact_matches(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sequence: whether the teacher-forced argmax equals every target token.

    This equals exact match of greedy decoding: if every next-token argmax along the gold
    completion is right, greedy generation produces exactly that completion.
    logits: (N, T, V), labels: (N, T) -> (N,) bool
    """
    return target_matches(logits[:, :-1, :], labels[:, 1:])
