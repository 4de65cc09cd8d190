"""The server's own evaluation of the global adapter, per task, before training and after each round.

Federated evaluation reports what the sampled clients see; this one sees every task of the
pool on fixed test sets, every round, including round 0 (the base model), so the summary can
say "before -> after" per task and the plots have one line per task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from fedlora.core.data import Item
from fedlora.core.model import set_adapter_state, set_base_deltas
from fedlora.core.records import Record
from fedlora.core.run_model import RunModel
from fedlora.core.train import evaluate
from fedlora.strategies.algorithms import adapter_part, base_deltas


class ServerEvaluator:
    """Exact match (a classifier's accuracy, plus its macro-F1) and loss of a global state on
    fixed per-task test sets."""

    def __init__(self, run: RunModel, sets: Mapping[str, Sequence[Record]], batch_size: int = 64) -> None:
        self.model = run.model
        self.pad = run.pad_id
        self.batch_size = batch_size
        self.sets: dict[str, list[Item]] = {t: run.encode(ex).items for t, ex in sets.items() if ex}
        self.pristine: dict[str, Tensor] = {}

    def __bool__(self) -> bool:
        return bool(self.sets)

    def __call__(self, state: Mapping[str, Tensor]) -> dict[str, dict[str, float]]:
        set_adapter_state(self.model, adapter_part(state))
        set_base_deltas(self.model, base_deltas(state), self.pristine)
        out = {}
        for task, data in self.sets.items():
            res = evaluate(self.model, data, self.pad, self.batch_size)
            out[task] = {
                "exact-match": res.exact_match,
                "eval-loss": res.loss,
                "num-examples": res.num_examples,
                **res.metrics,
            }
        return out
