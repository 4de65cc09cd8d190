"""``fl-client``: the edge role.

``keygen`` creates this node's key pair, ``start`` joins a federation as a SuperNode (and keeps
rejoining), ``finetune`` trains one LoRA adapter on local data without any server.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from fedlora.client.hub_commands import (
    add_personalize_parser,
    add_pull_parser,
    add_push_parser,
    personalize,
    pull,
    push,
)
from fedlora.client.identity import default_name
from fedlora.client.node import NodeError, NodeOptions, start
from fedlora.core.pki import CertificateError, fingerprint, load_node_public_key, write_node_keypair
from fedlora.core.tasks import TASKS
from fedlora.hub.sdk.client import HubRequestError
from fedlora.hub.sdk.manifest import VerificationError
from fedlora.privacy.policy import PolicyError


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
    # lazy: pulls in torch, which this module does not need at import
    from fedlora.client.finetune import FinetuneConfig

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
    # Opacus' notes on its own defaults and on the sigma search's intermediate candidates
    for message in ("Optimal order is the largest alpha", "Secure RNG turned off", "Full backward hook is firing"):
        warnings.filterwarnings("ignore", message=message)


def _fail(e: Exception) -> int:
    """One line on stderr naming the problem; exit status 2 like argparse's own errors."""
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"fl-client: error: {msg}", file=sys.stderr)
    return 2


def _keygen_parser(sub: Any) -> None:
    p = sub.add_parser(
        "keygen",
        help="create this node's key pair (client.key stays here, client.pub goes to the operator)",
        description="Write KEYDIR/client.key (OpenSSH EC P-384 private key, mode 600) and KEYDIR/client.pub; "
        "the operator enrolls client.pub with `fl-server enroll`. Existing keys are never overwritten.",
    )
    p.add_argument("--out", type=Path, default=Path("client-keys"), metavar="KEYDIR", help="default ./client-keys")
    p.add_argument("--name", help="a comment in client.pub, e.g. the node's name (default: this host's name)")


def _start_parser(sub: Any) -> None:
    p = sub.add_parser(
        "start",
        help="join a federation as a SuperNode: train with DP on local data, keep the privacy ledger",
        description="Run Flower's SuperNode against the server, with TLS verified by --ca and the node key; "
        "reconnects with backoff when the server is away; Ctrl-C stops it. Every message is run by this "
        "process with the installed fedlora client: app bundles that carry code are refused, and rounds "
        "that break this node's privacy policy are declined before any training.",
    )
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="the server's SuperLink address")
    p.add_argument("--ca", type=Path, metavar="CA", help="the federation's ca.pem (from the operator)")
    p.add_argument("--key", type=Path, metavar="KEY", help="this node's client.key (fl-client keygen)")
    p.add_argument(
        "--data",
        required=True,
        metavar="PATH",
        help="JSONL file of prompt/completion records, or embedded:TASK[,TASK] for the embedded tasks",
    )
    p.add_argument(
        "--state-dir", type=Path, required=True, metavar="DIR", help="privacy ledger and DP secret (keep it)"
    )
    p.add_argument("--name", help="this node's name in logs and the data seed (default: this host's name)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP to an --insecure test server (warns)")
    p.add_argument("--device", help="where this node trains: auto (a GPU when present), cpu, cuda or cuda:N")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="the base model's dtype on this node (default float32)",
    )
    p.add_argument("--max-wait", type=float, metavar="SECONDS", help="give up when the server is away this long")
    g = p.add_argument_group("hub: where this client's personal adapters go (runs with personalize.steps > 0)")
    g.add_argument(
        "--hub", metavar="URL", help="the adapter hub; personal adapters are published as clients/<me>/<run>"
    )
    g.add_argument("--hub-token-file", type=Path, metavar="FILE", help="this client's hub token (fl-hub token create)")
    g.add_argument("--hub-key", type=Path, metavar="HUB_PUB", help="the hub's public key (hub.pub)")
    g.add_argument("--hub-ca", type=Path, metavar="CA", help="the hub's ca.pem (fl-hub init made it)")
    _policy_options(p)


def _policy_options(p: Any) -> None:
    """This node's privacy policy (kept in STATE_DIR/policy.toml; a server's run can only tighten it)."""
    g = p.add_argument_group(
        "privacy policy: kept in STATE_DIR/policy.toml, these options change it; rounds that break it are declined"
    )
    dp = g.add_mutually_exclusive_group()
    dp.add_argument(
        "--require-dp", dest="require_dp", action="store_true", default=None, help="train with DP only (default)"
    )
    dp.add_argument("--allow-no-dp", dest="require_dp", action="store_false", help="also take part in runs without DP")
    g.add_argument("--min-noise", type=float, metavar="SIGMA", help="smallest noise multiplier accepted (default 0.5)")
    g.add_argument(
        "--max-sample-rate", type=float, metavar="Q", help="largest Poisson sample rate accepted (default 1)"
    )
    g.add_argument("--max-delta", type=float, metavar="DELTA", help="largest delta accepted (default: below 1/n)")
    g.add_argument("--accountant", choices=["rdp", "prv"], help="how this node measures its epsilon (default rdp)")
    g.add_argument("--max-epsilon", type=float, metavar="EPS", help="lifetime epsilon cap over all runs (default 10)")
    share = g.add_mutually_exclusive_group()
    share.add_argument(
        "--share-metrics", dest="share_metrics", action="store_true", default=None,
        help="let evaluation results and losses leave this node in DP runs",
    )  # fmt: skip
    share.add_argument(
        "--no-share-metrics", dest="share_metrics", action="store_false", help="keep them here (default)"
    )
    g.add_argument(
        "--allow-bundle", action="append", metavar="SHA256",
        help="also accept this app bundle (its SHA-256, from a refusal in the log); its code never runs",
    )  # fmt: skip


def _policy_changes(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "require_dp": args.require_dp,
        "min_noise_multiplier": args.min_noise,
        "max_sample_rate": args.max_sample_rate,
        "max_delta": args.max_delta,
        "accountant": args.accountant,
        "max_epsilon": args.max_epsilon,
        "share_metrics": args.share_metrics,
        "allowed_bundles": tuple(args.allow_bundle) if args.allow_bundle else None,
    }


def _keygen(args: argparse.Namespace, console: Console) -> int:
    try:
        private, public = write_node_keypair(args.out, args.name or default_name())
    except (FileExistsError, ValueError, OSError) as e:
        return _fail(e)
    console.print(f"private key {private} (keep it here)", markup=False, highlight=False)
    console.print(f"public key  {public}  {fingerprint(load_node_public_key(public))}", markup=False, highlight=False)
    console.print(
        f"give {public.name} to the operator: fl-server enroll SERVER_DIR {public.name} --name NAME",
        markup=False,
        highlight=False,
    )
    return 0


def _start(args: argparse.Namespace, console: Console) -> int:
    try:
        options = NodeOptions(
            server=args.server,
            ca=args.ca,
            key=args.key,
            data=args.data,
            state_dir=args.state_dir,
            name=args.name or default_name(),
            insecure=args.insecure,
            max_wait=args.max_wait,
            hub=args.hub,
            hub_token_file=args.hub_token_file,
            hub_key=args.hub_key,
            hub_ca=args.hub_ca,
            device=args.device,
            dtype=args.dtype,
            policy_changes=_policy_changes(args),
        )
        return start(options, console)
    except (NodeError, CertificateError, PolicyError) as e:
        return _fail(e)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fl-client", description="fedlora edge client")
    sub = parser.add_subparsers(dest="command", required=True)
    _finetune_parser(sub)
    _keygen_parser(sub)
    _start_parser(sub)
    add_pull_parser(sub)
    add_push_parser(sub)
    add_personalize_parser(sub)
    args = parser.parse_args(argv)
    if args.command in ("keygen", "start"):
        return {"keygen": _keygen, "start": _start}[args.command](args, Console(soft_wrap=True))
    if args.command in ("pull", "push", "personalize"):
        if args.command == "personalize":
            _quiet_libraries()
        try:
            command = {"pull": pull, "push": push, "personalize": personalize}[args.command]
            return command(args, Console(soft_wrap=True))
        except (HubRequestError, VerificationError, ValueError, FileNotFoundError, NotADirectoryError) as e:
            return _fail(e)
    _quiet_libraries()
    console = Console(soft_wrap=True)
    if args.command == "finetune":
        if args.list_tasks:
            for t in TASKS.values():
                console.print(f"{t.name:12s} {'held out ' if t.held_out else ''}{t.descriptions[0]}")
            return 0
        try:
            cfg = _finetune_config(args)
        except (ValueError, KeyError, FileNotFoundError, TypeError) as e:
            return _fail(e)
        # lazy: pulls in torch, which this module does not need at import
        from fedlora.client.finetune import run

        try:
            run(cfg, console, progress=not args.quiet)
        except (ValueError, KeyError, FileNotFoundError) as e:
            return _fail(e)
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
