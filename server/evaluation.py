"""The server's own evaluation of the global adapter, per task, before training and after each round.

Federated evaluation reports what the sampled clients see; this one sees every task of the
pool on fixed test sets, every round, including round 0 (the base model), so the summary can
say "before -> after" per task and the plots have one line per task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from peft import PeftModel
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from fedlora.core.data import Encoded, encode
from fedlora.core.model import max_positions, set_adapter_state, set_base_deltas
from fedlora.core.tasks import Example
from fedlora.core.train import evaluate
from fedlora.strategies.algorithms import adapter_part, base_deltas


class ServerEvaluator:
    """Exact match and loss of a global state on fixed per-task test sets."""

    def __init__(
        self, model: PeftModel, tokenizer: PreTrainedTokenizerBase, sets: Mapping[str, Sequence[Example]]
    ) -> None:
        self.model = model
        self.pad = int(tokenizer.pad_token_id)
        max_len = max_positions(model)
        self.sets: dict[str, list[Encoded]] = {t: encode(tokenizer, ex, max_len) for t, ex in sets.items() if ex}
        self.pristine: dict[str, Tensor] = {}

    def __bool__(self) -> bool:
        return bool(self.sets)

    def __call__(self, state: Mapping[str, Tensor]) -> dict[str, dict[str, float]]:
        set_adapter_state(self.model, adapter_part(state))
        set_base_deltas(self.model, base_deltas(state), self.pristine)
        out = {}
        for task, data in self.sets.items():
            res = evaluate(self.model, data, self.pad)
            out[task] = {"exact-match": res.exact_match, "eval-loss": res.loss, "num-examples": res.num_examples}
        return out
