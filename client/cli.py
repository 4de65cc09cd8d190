"""``fl-client``: the edge role. ``finetune`` trains one LoRA adapter on local data."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console


def _finetune_parser(sub: Any) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a LoRA adapter on local data and report exact match before and after",
        description="Fine-tune a LoRA adapter on an embedded task or a JSONL file of "
        '{"prompt": ..., "completion": ...} records; flags override --config.',
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--task", help="embedded task name, e.g. caesar-7 (see --list-tasks)")
    src.add_argument("--data", help="JSONL file of prompt/completion records")
    p.add_argument("--list-tasks", action="store_true", help="list the embedded tasks and exit")
    p.add_argument("--config", type=Path, help="JSON config with sections data, lora, train")
    p.add_argument("--model", dest="model_dir", help="local Hugging Face model directory (default: embedded)")
    p.add_argument("--rank", type=int)
    p.add_argument("--alpha", type=float)
    p.add_argument("--dropout", type=float)
    p.add_argument("--targets", help="comma-separated target modules, or all-linear")
    p.add_argument("--rslora", action="store_true", default=None, help="scale by alpha/sqrt(r)")
    p.add_argument("--trainable", choices=["both", "A", "B"], help="which LoRA factors train")
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--num-train", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto (default), cpu or cuda[:N]")
    p.add_argument("--threads", type=int, help="torch threads (default 1)")
    p.add_argument("--out", help="output directory (default runs/finetune)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _finetune_config(args: argparse.Namespace) -> Any:
    from client.finetune import FinetuneConfig

    values: dict[str, Any] = {}
    if args.config is not None:
        if not args.config.is_file():
            raise FileNotFoundError(f"config file {args.config} does not exist")
        try:
            values = json.loads(args.config.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{args.config}: not valid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{args.config}: expected a JSON object")
    data = dict(values.get("data", {}))
    lora = dict(values.get("lora", {}))
    train = dict(values.get("train", {}))
    if args.task is not None:
        data.pop("path", None)
        data["task"] = args.task
    if args.data is not None:
        data.pop("task", None)
        data["path"] = args.data
    if not data:
        data["task"] = "caesar-7"
    for key, section, name in [
        ("num_train", data, "num_train"),
        ("seed", data, "seed"),
        ("rank", lora, "rank"),
        ("alpha", lora, "alpha"),
        ("dropout", lora, "dropout"),
        ("rslora", lora, "use_rslora"),
        ("trainable", lora, "trainable"),
        ("steps", train, "steps"),
        ("lr", train, "lr"),
        ("batch_size", train, "batch_size"),
        ("seed", train, "seed"),
    ]:
        if getattr(args, key) is not None:
            section[name] = getattr(args, key)
    if args.targets is not None:
        lora["target_modules"] = [t.strip() for t in args.targets.split(",") if t.strip()]
    top = {k: v for k, v in values.items() if k not in ("data", "lora", "train")}
    for key in ("model_dir", "device", "threads", "out"):
        if getattr(args, key) is not None:
            top[key] = getattr(args, key)
    return FinetuneConfig.from_mapping({**top, "data": data, "lora": lora, "train": train})


def _quiet_libraries() -> None:
    """Our own progress bar is enough; hide the libraries' loading bars and deprecation chatter."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")


def _fail(e: Exception) -> int:
    """One line on stderr naming the problem; exit status 2 like argparse's own errors."""
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"fl-client: error: {msg}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fl-client", description="fedlora edge client")
    sub = parser.add_subparsers(dest="command", required=True)
    _finetune_parser(sub)
    args = parser.parse_args(argv)
    _quiet_libraries()
    console = Console(soft_wrap=True)
    if args.command == "finetune":
        if args.list_tasks:
            from simulations.tasks import TASKS

            for t in TASKS.values():
                console.print(f"{t.name:12s} {'held out ' if t.held_out else ''}{t.descriptions[0]}")
            return 0
        try:
            cfg = _finetune_config(args)
        except (ValueError, KeyError, FileNotFoundError, TypeError) as e:
            return _fail(e)
        from client.finetune import run

        try:
            run(cfg, console, progress=not args.quiet)
        except (ValueError, KeyError, FileNotFoundError) as e:
            return _fail(e)
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
