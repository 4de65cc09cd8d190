"""ServerApp: Flower's stock FedAvg on the LoRA adapter, round boundaries and replies logged.

Flower's defaults (fraction-train = fraction-evaluate = 1.0: a training and an evaluation
message to every node each round), with every node sampled (``min_*_nodes`` = the number of
clients, so no round starts before all have connected). ``evaluate_fn`` does no evaluation:
it stamps the round boundaries. Each line of the run config's ``events-file`` (JSONL) is one
event, ``t`` in ``time.time()`` seconds:

- ``{"event": "round-end", "round": r, "t": ...}``: Flower's ``evaluate_fn(r)``; round 0 is
  its call before the first round, round r > 0 the end of round r (train + evaluate);
- ``{"event": "push", "kind": "train"|"evaluate", "round": r, "t": ...}``: messages built,
  about to be sent;
- ``{"event": "replies", "kind": ..., "round": r, "t": ...}``: every reply received;
- ``{"event": "reply", "kind": ..., "round": r, "node": ..., "id": ..., "reply-to": ...,
  "metrics": {...}}``: one per reply (train-seconds and the ClientApp's timing stamps), or
  ``"error"``; ``id`` and ``reply-to`` are the message IDs the SuperNodes log.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


class LoggedFedAvg(FedAvg):
    """FedAvg that appends when it sends and what comes back to a JSONL file."""

    def __init__(self, events_file: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.events_file = Path(events_file) if events_file else None

    def log_event(self, row: dict[str, Any]) -> None:
        if self.events_file is not None:
            with self.events_file.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def _sent(self, kind: str, server_round: int, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        self.log_event({"event": "push", "kind": kind, "round": server_round, "t": time.time()})
        return messages

    def _received(self, kind: str, server_round: int, replies: Iterable[Message]) -> list[Message]:
        replies = list(replies)
        self.log_event({"event": "replies", "kind": kind, "round": server_round, "t": time.time()})
        for reply in replies:
            meta = reply.metadata
            row: dict[str, Any] = {"event": "reply", "kind": kind, "round": server_round, "node": meta.src_node_id}
            row |= {"id": meta.message_id, "reply-to": meta.reply_to_message_id}
            if reply.has_error():
                row["error"] = reply.error.reason
            else:
                row["metrics"] = {k: v for rec in reply.content.metric_records.values() for k, v in rec.items()}
            self.log_event(row)
        return replies

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._sent("train", server_round, super().configure_train(server_round, arrays, config, grid))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return super().aggregate_train(server_round, self._received("train", server_round, replies))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._sent("evaluate", server_round, super().configure_evaluate(server_round, arrays, config, grid))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return super().aggregate_evaluate(server_round, self._received("evaluate", server_round, replies))


@app.main()
def main(grid: Grid, context: Context) -> None:
    from peft import get_peft_model_state_dict

    from .common import load_lora_model

    rc = context.run_config
    n = int(rc["num-clients"])
    strategy = LoggedFedAvg(str(rc["events-file"]), min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n)
    model, _ = load_lora_model()
    initial = ArrayRecord({k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()})

    def stamp_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        strategy.log_event({"event": "round-end", "round": server_round, "t": time.time()})
        return None

    strategy.start(grid=grid, initial_arrays=initial, num_rounds=int(rc["num-rounds"]), evaluate_fn=stamp_round)
