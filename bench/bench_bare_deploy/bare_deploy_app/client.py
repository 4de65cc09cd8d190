"""ClientApp: train and evaluate the LoRA adapter, loading everything per message.

In deployment every message runs in a fresh ``flwr-clientapp`` process, so each handler
imports torch / transformers / peft, loads the base model and wraps it with LoRA, as
Flower's LLM example does. Each reply carries, besides ``num-examples`` and the loss,
``train-seconds`` (the training loop alone, ``time.perf_counter``) and wall-clock stamps
(``time.time()``, seconds) of this message's life in the process, for the benchmark's
breakdown: ``t-process-start`` (from ``/proc/self/stat``), ``t-module`` (this module
imported), ``t-handler`` (handler entered), ``t-imports`` (torch & co. imported),
``t-model`` (model, data and received state ready), ``t-work-end`` (training or evaluation
done) and ``t-reply`` (reply built).
"""

from __future__ import annotations

import time

T_MODULE = time.time()  # first thing: when flwr-clientapp imported this app

import os  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

app = ClientApp()


def process_start_time() -> float:
    """Wall-clock time this process was created (``/proc/self/stat`` field 22, 10 ms ticks).

    Measured against ``/proc/uptime`` rather than the integer boot time, so the stamp is
    good to ~10 ms; NaN off Linux."""
    try:
        started_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return float("nan")
    return time.time() - (uptime - started_ticks / os.sysconf("SC_CLK_TCK"))


T_PROCESS_START = process_start_time()


def _stamps(t_handler: float, t_imports: float, t_model: float, t_work_end: float) -> dict[str, float]:
    return {
        "t-process-start": T_PROCESS_START,
        "t-module": T_MODULE,
        "t-handler": t_handler,
        "t-imports": t_imports,
        "t-model": t_model,
        "t-work-end": t_work_end,
        "t-reply": time.time(),
        "pid": float(os.getpid()),
    }


def _load(msg: Message, context: Context, split: str) -> tuple[Any, Any, list[Any], int, float]:
    """What every message does first, as Flower's LLM example: import torch & co., load the base
    model with LoRA, make this client's examples, set the received adapter. Returns the model,
    tokenizer, encoded data, partition and the time the imports were done."""
    from peft import set_peft_model_state_dict

    from fedlora.core.data import encode
    from fedlora.core.tasks import get_task

    from .common import load_lora_model

    t_imports = time.time()
    rc = context.run_config
    partition = int(context.node_config["partition-id"])
    model, tokenizer = load_lora_model()
    count = int(rc["num-train" if split == "train" else "num-test"])
    examples = get_task(str(rc["task"])).examples(count, partition, split, True)
    data = encode(tokenizer, examples, int(model.config.max_position_embeddings))
    set_peft_model_state_dict(model, msg.content.array_records["arrays"].to_torch_state_dict())
    return model, tokenizer, data, partition, t_imports


@app.train()
def train(msg: Message, context: Context) -> Message:
    t_handler = time.time()
    model, tokenizer, data, partition, t_imports = _load(msg, context, "train")
    import torch
    from peft import get_peft_model_state_dict

    from fedlora.core.data import collate

    rc = context.run_config
    config = msg.content.config_records["config"]
    server_round = int(config["server-round"])  # type: ignore[arg-type]
    steps, batch_size = int(rc["local-steps"]), int(rc["batch-size"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=float(rc["lr"]))
    generator = torch.Generator().manual_seed(1000 * server_round + partition)
    model.train()
    t_model = time.time()

    started = time.perf_counter()
    losses = []
    for _ in range(steps):
        rows = torch.randint(len(data), (batch_size,), generator=generator).tolist()
        loss = model(**collate([data[i] for i in rows], int(tokenizer.pad_token_id))).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    train_seconds = time.perf_counter() - started

    t_work_end = time.time()
    state = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()}
    metrics = MetricRecord(
        {
            "num-examples": len(data),
            "train-loss": sum(losses) / max(1, len(losses)),
            "train-seconds": train_seconds,
            "partition-id": partition,
            **_stamps(t_handler, t_imports, t_model, t_work_end),
        }
    )
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    t_handler = time.time()
    model, tokenizer, data, partition, t_imports = _load(msg, context, "test")
    import torch

    from fedlora.core.data import collate

    model.eval()
    t_model = time.time()
    with torch.no_grad():
        loss = float(model(**collate(data, int(tokenizer.pad_token_id))).loss)
    t_work_end = time.time()
    metrics = MetricRecord(
        {
            "num-examples": len(data),
            "eval-loss": loss,
            "partition-id": partition,
            **_stamps(t_handler, t_imports, t_model, t_work_end),
        }
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
