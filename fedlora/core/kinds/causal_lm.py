"""``causal-lm``: prompt/completion and chat records, loss and exact match on the completion."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from fedlora.core.data import IGNORE_INDEX, Encoded
from fedlora.core.embedded import default_model_dir
from fedlora.core.kinds.base import Encoding, ModelKind
from fedlora.core.model_dirs import load_tokenizer
from fedlora.core.records import ChatExample, Example, Record
from fedlora.core.tasks import TASKS


class CausalLM(ModelKind):
    name: ClassVar[str] = "causal-lm"
    peft_task_type: ClassVar[str | None] = "CAUSAL_LM"
    default_tasks: ClassVar[str] = "adddigit-4,rotate-2,repeat-3,sort-desc"
    classifier: ClassVar[bool] = False

    def default_model_dir(self) -> Path:
        return default_model_dir()

    def task_names(self) -> Sequence[str]:
        return list(TASKS)

    def auto_class(self) -> Any:
        return AutoModelForCausalLM

    def load_processor(self, path: Path) -> PreTrainedTokenizerBase:
        return load_tokenizer(path)

    def encode(
        self, processor: Any, records: Sequence[Record], labels: Sequence[str], limit: int, truncate: bool
    ) -> Encoding:
        """Prompt and completion tokenised separately, the end-of-sequence token appended; a chat
        record through the tokenizer's chat template, the loss on its assistant turns only."""
        tokenizer: PreTrainedTokenizerBase = processor
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no end-of-sequence token")
        eos = int(tokenizer.eos_token_id)
        plain = [r for r in records if isinstance(r, Example)]
        prompts = tokenizer([e.prompt for e in plain], add_special_tokens=False)["input_ids"] if plain else []
        completions = tokenizer([e.completion for e in plain], add_special_tokens=False)["input_ids"] if plain else []
        pairs = iter(zip(plain, prompts, completions, strict=True))
        items: list[Encoded] = []
        cut = 0
        for record in records:
            if isinstance(record, ChatExample):
                # lazy: the data-file readers load the datasets library only when a file needs it
                from fedlora.core.data_files import encode_chat

                ids, target, was_cut = encode_chat(tokenizer, record, limit if truncate else None)
                cut += was_cut
                if not truncate and len(ids) > limit:
                    raise ValueError(_too_long(record.key, len(ids), limit))
                if all(t == IGNORE_INDEX for t in target):
                    raise ValueError(f"chat record {record.key[:80]!r} keeps no assistant token within {limit} tokens")
                items.append(Encoded(ids, target))
                continue
            if not isinstance(record, Example):
                raise TypeError(f"a causal LM trains on prompt/completion or chat records, not {type(record).__name__}")
            ex, p, c = next(pairs)
            ids = list(p) + list(c) + [eos]
            target = [IGNORE_INDEX] * len(p) + list(c) + [eos]
            if len(ids) > limit:
                if not truncate:
                    raise ValueError(_too_long(f"{ex.prompt!r} -> {ex.completion!r}", len(ids), limit))
                ids, target, cut = ids[:limit], target[:limit], cut + 1
                if all(t == IGNORE_INDEX for t in target):
                    raise ValueError(
                        f"example {ex.prompt[:60]!r} keeps no completion token within max-length {limit}: "
                        "raise --max-length or shorten the prompt"
                    )
            items.append(Encoded(ids, target))
        return Encoding(list(items), cut)


def _too_long(what: str, n: int, limit: int) -> str:
    return f"example {what} is {n} tokens, longer than the model's {limit} positions (--max-length {limit} truncates)"


KIND = CausalLM()
