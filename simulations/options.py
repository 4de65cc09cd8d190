"""``fl-sim``'s run options: the main job's defaults, the options that set run-config keys, and the
run config they add up to. Light on purpose (no torch; Flower's config helpers only when used):
``fl-sim --help`` and a mistyped option answer at once."""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedlora.core.flower_runner import parse_run_config_pairs
from fedlora.core.kinds import KINDS
from fedlora.privacy.engines import ENGINES
from fedlora.strategies.server_opt import OPTIMIZERS

#: ``fl-sim`` with no options: a DP run on a non-IID split that visibly learns in a few minutes
#: on 2 CPU cores (see README). Explicit options override these.
MAIN_JOB: dict[str, Any] = {
    "strategy": "ffa-lora",
    "num-clients": 8,
    "num-rounds": 8,
    "local-steps": 20,
    "partition.scheme": "tasks-per-client",
    "partition.tasks-per-client": 2,
    "tasks": "adddigit-4,rotate-2,repeat-3,sort-desc",
    "num-train": 1000,
    "num-test": 100,
    "dp.enabled": True,
    "dp.target-epsilon": 8.0,
    "run-dir": "runs/sim",
}


#: option name -> run-config key, for the options that are plain values
OPTION_KEYS: dict[str, str] = {
    "strategy": "strategy",
    "rounds": "num-rounds",
    "clients": "num-clients",
    "local_steps": "local-steps",
    "lr": "lr",
    "lr_decay": "lr-decay",
    "batch_size": "batch-size",
    "rank": "lora-rank",
    "lora_alpha": "lora-alpha",
    "targets": "lora-targets",
    "epsilon": "dp.target-epsilon",
    "delta": "dp.delta",
    "noise_multiplier": "dp.noise-multiplier",
    "max_grad_norm": "dp.max-grad-norm",
    "max_epsilon": "dp.max-epsilon",
    "accountant": "dp.accountant",
    "dp_engine": "dp.engine",
    "partition": "partition.scheme",
    "dirichlet_alpha": "partition.alpha",
    "tasks_per_client": "partition.tasks-per-client",
    "size_skew": "partition.size-skew",
    "partition_seed": "partition.seed",
    "tasks": "tasks",
    "num_train": "num-train",
    "num_test": "num-test",
    "seed": "seed",
    "model": "model-dir",
    "data": "data-path",
    "min_replies": "min-replies",
    "round_timeout": "round-timeout",
    "server_opt": "server-opt.optimizer",
    "server_lr": "server-opt.lr",
    "state_dir": "state-dir",
    "kind": "model.kind",
    "device": "model.device",
    "dtype": "model.dtype",
    "max_length": "model.max-length",
    "eval_batch_size": "model.eval-batch-size",
    "physical_batch_size": "model.physical-batch-size",
    "labels": "model.labels",
    "text_column": "columns.text",
    "label_column": "columns.label",
    "prompt_column": "columns.prompt",
    "completion_column": "columns.completion",
    "messages_column": "columns.messages",
    "image_column": "columns.image",
    "task_column": "columns.task",
}

#: what ``--kind`` changes in the main job: one domain or task family per client, a pool that a
#: 22.7M-parameter encoder or the tiny ViT trains through in a few minutes on 2 CPU cores
KIND_JOBS: dict[str, dict[str, Any]] = {
    "seq-cls": {"num-clients": 4, "partition.tasks-per-client": 1, "num-train": 400, "local-steps": 10},
    "image-cls": {"num-clients": 4, "partition.tasks-per-client": 1, "num-train": 500, "local-steps": 20},
}


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Options shared by a single run and ``compare`` (all map onto run-config keys)."""
    g = p.add_argument_group("federation")
    g.add_argument("--strategy", help="aggregation strategy (default ffa-lora; fl-sim --list-strategies)")
    g.add_argument("--rounds", type=int, help="federated rounds (default 8)")
    g.add_argument("--clients", type=int, help="virtual clients (default 8)")
    g.add_argument("--clients-per-round", type=int, help="clients sampled per round (default: all)")
    g.add_argument("--local-steps", type=int, help="local optimizer steps per round (default 20)")
    g.add_argument("--lr", type=float, help="client learning rate (default: the strategy's tuned one)")
    g.add_argument("--lr-decay", type=float, help="per-round learning-rate factor (default 1)")
    g.add_argument("--batch-size", type=int, help="local batch size (default 32)")
    g.add_argument("--min-replies", type=int, help="fewest valid replies that make a round (default 1)")
    g.add_argument("--round-timeout", type=float, help="seconds a round waits for replies (default 600)")
    g.add_argument(
        "--server-opt",
        choices=list(OPTIMIZERS),
        help="server optimizer over each round's aggregate (FedOpt; default none; betas and tau: "
        "--run-config server-opt.beta1=...)",
    )
    g.add_argument("--server-lr", type=float, help="server learning rate over the aggregated update (default 1)")
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, help="LoRA rank (default 8)")
    g.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the strategy's)")
    g.add_argument("--targets", help="comma-separated target modules or all-linear (default)")
    g = p.add_argument_group("privacy")
    dp = g.add_mutually_exclusive_group()
    dp.add_argument("--dp", dest="dp", action="store_true", default=None, help="DP-SGD on every client (default)")
    dp.add_argument("--no-dp", dest="dp", action="store_false", help="train without differential privacy")
    g.add_argument("--epsilon", type=float, help="target epsilon per client over the whole run (default 8)")
    g.add_argument("--delta", type=float, help="delta (default: power of ten <= 1/(10 n), n the smallest client)")
    g.add_argument("--noise-multiplier", type=float, help="fixed noise multiplier instead of a target epsilon")
    g.add_argument("--max-grad-norm", type=float, help="per-example clipping norm (default 1)")
    g.add_argument("--max-epsilon", type=float, help="lifetime budget: a client declines past it")
    g.add_argument("--accountant", choices=["rdp", "prv"], help="privacy accountant (default rdp)")
    g.add_argument(
        "--dp-engine",
        choices=ENGINES,
        help="per-example clipping: Opacus' hooks (default) or the fused LoRA kernels (the same result up to "
        "float rounding)",
    )
    g.add_argument("--state-dir", help="where client ledgers live (default RUN_DIR/client-state)")
    g = p.add_argument_group("data")
    schemes = ["iid", "dirichlet", "tasks-per-client"]
    g.add_argument("--partition", choices=schemes, help="how the pool is split (default tasks-per-client)")
    g.add_argument("--dirichlet-alpha", type=float, help="Dirichlet concentration (default 0.5; smaller: more skew)")
    g.add_argument("--tasks-per-client", type=int, help="tasks per client for --partition tasks-per-client (default 2)")
    g.add_argument("--size-skew", type=float, help="lognormal sigma of client sizes (default 0: equal)")
    g.add_argument(
        "--partition-seed", type=int, help="seed of the data and its split (default --seed; fixed: seeds vary training)"
    )
    g.add_argument("--tasks", help="comma-separated embedded tasks making up the pool")
    g.add_argument("--num-train", type=int, help="mean training examples per client (default 1000)")
    g.add_argument("--num-test", type=int, help="test examples per client (default 100)")
    g.add_argument(
        "--data",
        help="a JSONL, JSON, CSV or Parquet file or a saved datasets directory, split by us; or a directory with "
        "one JSONL file per client",
    )
    for name, what in (
        ("text", "the text to classify (default: text or sentence)"),
        ("label", "the class label (default: label)"),
        ("prompt", "a causal LM's prompt (default: prompt; instruction/input with Alpaca-style records)"),
        ("completion", "a causal LM's completion (default: completion; output with Alpaca-style records)"),
        ("messages", "chat turns, role/content objects (default: messages)"),
        ("image", "the image: an image feature, pixel array or file path (default: image or img)"),
        ("task", "what splits the data among clients (default: task; else a classifier's label)"),
    ):
        g.add_argument(f"--{name}-column", help=f"column of {what}")
    g.add_argument("--model", help="a local Hugging Face model directory (default: the kind's shipped model)")
    g = p.add_argument_group("model")
    g.add_argument("--kind", choices=list(KINDS), help="model kind (default causal-lm)")
    g.add_argument("--device", help="auto (default: a GPU when the process sees one), cpu, cuda or cuda:N")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="base weights' dtype (default float32)")
    g.add_argument("--max-length", type=int, help="truncate records to this many tokens (default: refuse longer)")
    g.add_argument("--eval-batch-size", type=int, help="evaluation batch size (default 64)")
    g.add_argument(
        "--physical-batch-size",
        type=int,
        help="run each batch in chunks of this many examples (one optimizer step, one DP noise draw; default: whole)",
    )
    g.add_argument("--labels", help="a classifier's labels, comma-separated (default: from the tasks or the data)")
    g.add_argument(
        "--gpus-per-client", type=float, default=0.0, help="GPU share Ray gives each virtual client (default 0)"
    )
    g.add_argument("--seed", type=int, help="seeds the split, the adapters and local training (default 0)")
    g = p.add_argument_group("run")
    g.add_argument("--run-config", action="append", default=[], help="extra run-config 'key=value' pairs")
    g.add_argument("--config", type=Path, help="a TOML file of run-config keys (options override it)")
    g.add_argument("--timeout", type=float, default=3600.0, help="stop the whole run after this many seconds")
    g.add_argument("--verbose", action="store_true", help="stream Flower's log")
    g.add_argument("--cpus-per-client", type=int, default=1, help="CPUs Ray gives each virtual client (default 1)")
    g.add_argument(
        "--ray-cpus",
        type=int,
        help="CPUs the local Ray runtime may use, so at most this many clients train at once, each process "
        "loading its own model (default: $FEDLORA_RAY_CPUS, else every core)",
    )
    g.add_argument(
        "--ray-address", help="run the virtual clients on an existing Ray cluster ('auto' or HOST:PORT), not locally"
    )
    g.add_argument("--quiet", action="store_true", help="no progress display; errors and a one-line result only")


def run_config_from(args: argparse.Namespace, base: Mapping[str, Any] = MAIN_JOB) -> dict[str, Any]:
    """The run config of a run: ``base``, then ``--config``, then options (last wins)."""
    from flwr.common.config import flatten_dict  # Flower's own, loaded only for a --config file

    values = dict(base)
    kind = getattr(args, "kind", None)
    if kind is not None and base is MAIN_JOB:
        values.pop("tasks", None)  # the kind's own default tasks
        values |= KIND_JOBS.get(kind, {})
    if args.config is not None:
        if not args.config.is_file():
            raise FileNotFoundError(f"config file {args.config} does not exist")
        try:
            values |= flatten_dict(tomllib.loads(args.config.read_text()))
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{args.config}: not valid TOML ({e})") from None
    values |= parse_run_config_pairs(args.run_config)
    for option, key in OPTION_KEYS.items():
        value = getattr(args, option, None)
        if value is not None:
            values[key] = value
    if args.dp is not None:
        values["dp.enabled"] = args.dp
    out = getattr(args, "out", None)
    if out is not None:
        values["run-dir"] = str(out)
    per_round = getattr(args, "clients_per_round", None)
    if per_round is not None:
        n = int(values.get("num-clients", 1))
        if not 1 <= per_round <= n:
            raise ValueError(f"--clients-per-round {per_round} must be between 1 and the number of clients ({n})")
        values["fraction-train"] = values["fraction-evaluate"] = per_round / n
    return values
