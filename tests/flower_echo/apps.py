"""Echo ServerApp and ClientApp: numpy arithmetic whose FedAvg result is known by hand.

Client ``i`` (its ``partition-id``) adds ``lr * (i + 1)`` to every weight and reports
``10 * (i + 1)`` examples, so one FedAvg round over ``n`` clients moves every weight by
``lr * sum((i + 1) ** 2) / sum(i + 1)``. Both sides write the run config they saw to
``out-dir``, so a test can check that overrides and dotted keys reach every process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

INITIAL_WEIGHTS = (0.0, 1.0, 2.0, 3.0)

server_app = ServerApp()
client_app = ClientApp()
failing_server_app = ServerApp()


def _write_json(path: Path, payload: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True), encoding="utf-8")
    tmp.replace(path)  # readers never see half a file


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    num_nodes = int(rc["expected-nodes"])
    print(f"[echo-server] start: {num_nodes} nodes, {rc['num-rounds']} rounds", flush=True)
    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=num_nodes,
        min_available_nodes=num_nodes,  # or an early round may sample fewer nodes
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord({"w": Array(np.asarray(INITIAL_WEIGHTS, dtype=np.float64))}),
        num_rounds=int(rc["num-rounds"]),
        timeout=60.0,
    )
    final_w = result.arrays["w"].numpy()
    _write_json(
        Path(str(rc["out-dir"])) / "server.json",
        {
            "run_config": dict(rc),
            "final_w": final_w.tolist(),
            "rounds": sorted(int(r) for r in result.train_metrics_clientapp),
        },
    )
    print(f"[echo-server] done: final_w={final_w.tolist()}", flush=True)


@failing_server_app.main()
def failing_main(grid: Grid, context: Context) -> None:
    raise RuntimeError("echo server app failed on purpose")


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    partition = int(context.node_config["partition-id"])
    server_round = int(cast(int, msg.content.config_records["config"]["server-round"]))
    rc = context.run_config
    _write_json(
        Path(str(rc["out-dir"])) / f"client-{partition}-round-{server_round}.json",
        {"run_config": dict(rc), "num-partitions": int(context.node_config["num-partitions"])},
    )
    w = msg.content.array_records["arrays"]["w"].numpy()
    new_w = w + float(rc["lr"]) * (partition + 1)
    reply = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(new_w)}),
            "metrics": MetricRecord({"num-examples": 10 * (partition + 1)}),
        }
    )
    return Message(content=reply, reply_to=msg)
