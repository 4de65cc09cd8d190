"""The simplest faithful Flower app doing fedlora's work: the baseline of ``bench/bench_sim_scale.py``.

A ServerApp running Flower's stock ``flwr.serverapp.strategy.FedAvg`` on the LoRA adapter of
the embedded model, and a ClientApp that trains and evaluates that adapter with the project's
own building blocks (``fedlora.core.model``, ``fedlora.core.data``, ``fedlora.core.train``): same model, LoRA
settings, optimiser, local steps, batch size and kind of data (one embedded task per
partition) as fedlora's ``fedavg-lora`` client, without anything else (no run directory,
checkpoints, validation, privacy or audit). Model and data are cached per worker process, as
fedlora's client does, with one torch thread.

Run it through ``fedlora.core.flower_runner`` with components ``bench_bare_fedavg:server_app`` and
``bench_bare_fedavg:client_app``, ``pythonpath=(bench/,)`` and :data:`DEFAULT_CONFIG`.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedlora.core.data import DataSpec, Encoded, encode
from fedlora.core.lora_settings import LoraSettings
from fedlora.core.model import get_adapter_state, load_base_model, set_adapter_state, wrap_lora
from fedlora.core.model_dirs import load_tokenizer
from fedlora.core.train import TrainSettings, evaluate, train

#: the run config of the bare app (fedlora's fedavg-lora defaults for lr, rank and alpha)
DEFAULT_CONFIG: dict[str, bool | int | float | str] = {
    "num-clients": 10,
    "num-rounds": 3,
    "fraction-train": 1.0,
    "fraction-evaluate": 1.0,
    "local-steps": 5,
    "batch-size": 16,
    "lr": 3e-3,
    "lora-rank": 8,
    "lora-alpha": 16.0,
    "num-train": 32,
    "num-test": 16,
    "tasks": "adddigit-4,rotate-2,repeat-3,sort-desc",
}

server_app = ServerApp()
client_app = ClientApp()


def _lora(context: Context) -> LoraSettings:
    return LoraSettings(rank=int(context.run_config["lora-rank"]), alpha=float(context.run_config["lora-alpha"]))


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    model = wrap_lora(load_base_model(), _lora(context))
    strategy = FedAvg(
        fraction_train=float(rc["fraction-train"]),
        fraction_evaluate=float(rc["fraction-evaluate"]),
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=int(rc["num-clients"]),
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(get_adapter_state(model)),
        num_rounds=int(rc["num-rounds"]),
        train_config=ConfigRecord({"lr": float(rc["lr"]), "local-steps": int(rc["local-steps"])}),
    )


# --- client: one model per worker process, data per partition ------------------------------

_MODELS: dict[LoraSettings, tuple[PeftModel, PreTrainedTokenizerBase]] = {}
_DATA: dict[DataSpec, tuple[list[Encoded], list[Encoded]]] = {}


def _setup(context: Context) -> tuple[PeftModel, int, int, list[Encoded], list[Encoded]]:
    """(model, pad id, partition, train data, test data), built once per worker process."""
    torch.set_num_threads(1)
    lora = _lora(context)
    if lora not in _MODELS:
        _MODELS[lora] = (wrap_lora(load_base_model(), lora), load_tokenizer())
    model, tokenizer = _MODELS[lora]
    rc = context.run_config
    partition = int(context.node_config["partition-id"])
    tasks = [t.strip() for t in str(rc["tasks"]).split(",") if t.strip()]
    spec = DataSpec(
        task=tasks[partition % len(tasks)],
        num_train=int(rc["num-train"]),
        num_test=int(rc["num-test"]),
        seed=partition,
        tagged=True,
    )
    if spec not in _DATA:
        train_ex, test_ex = spec.load()
        max_len = int(model.config.max_position_embeddings)
        _DATA[spec] = (encode(tokenizer, train_ex, max_len), encode(tokenizer, test_ex, max_len))
    return model, int(tokenizer.pad_token_id), partition, *_DATA[spec]


@client_app.train()
def train_handler(msg: Message, context: Context) -> Message:
    model, pad, partition, train_data, _ = _setup(context)
    config = msg.content.config_records["config"]
    server_round = int(config["server-round"])  # type: ignore[arg-type]
    set_adapter_state(model, msg.content.array_records["arrays"].to_torch_state_dict())
    settings = TrainSettings(
        steps=int(config["local-steps"]),  # type: ignore[arg-type]
        lr=float(config["lr"]),  # type: ignore[arg-type]
        batch_size=int(context.run_config["batch-size"]),
        seed=server_round * 10_007 + partition,
    )
    result = train(model, train_data, settings, pad)
    metrics = MetricRecord({"num-examples": len(train_data), "train-loss": result.mean_loss})
    content = RecordDict({"arrays": ArrayRecord(get_adapter_state(model)), "metrics": metrics})
    return Message(content, reply_to=msg)


@client_app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    model, pad, _, _, test_data = _setup(context)
    set_adapter_state(model, msg.content.array_records["arrays"].to_torch_state_dict())
    res = evaluate(model, test_data, pad)
    metrics = MetricRecord({"num-examples": res.num_examples, "eval-loss": res.loss, "exact-match": res.exact_match})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
