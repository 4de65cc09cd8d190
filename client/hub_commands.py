"""``fl-client pull``, ``push`` and ``personalize``: the edge side of the adapter hub."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console

from fedlora.core.embedded import default_model_dir
from fedlora.hub.sdk.client import PULLED_MANIFEST, HubClient, open_hub
from fedlora.hub.sdk.manifest import GENERATOR_METHODS, describe_base_model, weights_sha256
from fedlora.hub.sdk.publish import adapter_files, fedlora_version
from fedlora.hub.sdk.request import MAX_EXAMPLES
from fedlora.privacy.engines import ENGINES
from fedlora.privacy.policy import PrivacyPolicy


def add_hub_connection(p: argparse.ArgumentParser, key_required: bool = True, hub_required: bool = True) -> None:
    p.add_argument("--hub", required=hub_required, metavar="URL", help="the hub, e.g. https://hub.example:9480")
    p.add_argument("--token", help=argparse.SUPPRESS)  # refused with the reason: a token in ps
    p.add_argument(
        "--token-file",
        type=Path,
        help="a file (0600) holding this client's hub token (fl-hub token create --client NAME --out FILE); "
        "or set FEDLORA_HUB_TOKEN",
    )
    p.add_argument(
        "--hub-key", type=Path, required=key_required, metavar="HUB_PUB", help="the hub's public key (hub.pub)"
    )
    p.add_argument("--hub-ca", type=Path, help="CA bundle for an https hub with a private CA")


def add_pull_parser(sub: Any) -> None:
    p = sub.add_parser(
        "pull",
        help="pull a global, personal or task adapter from the hub (signature and base model verified)",
        description="Fetch an adapter's signed manifest, verify it with the hub's public key, check that the "
        "local base model's weights hash is the one the adapter was trained on, fetch and verify every file, "
        "then write a PEFT directory (plus hub_manifest.json with the provenance).",
    )
    add_hub_connection(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--global", dest="global_run", metavar="RUN[/ROUND]", help="a run's global adapter (last round)")
    which.add_argument("--personal", metavar="NAME", help="this client's personal adapter clients/<me>/NAME")
    which.add_argument(
        "--task",
        metavar="NAME|DESCRIPTION",
        help="a task adapter tasks/NAME; with --method, a description of a new task to generate an adapter for",
    )
    which.add_argument("--name", metavar="FULL_NAME", help="any adapter by full name")
    p.add_argument(
        "--method",
        choices=GENERATOR_METHODS,
        help="generate a zero-shot adapter for the task described by --task (stored by the hub in generated/)",
    )
    p.add_argument(
        "--examples",
        type=Path,
        metavar="FILE",
        help="with --method: a JSONL file of a few {prompt, completion} examples of the task (ICM-LoRA reads them)",
    )
    p.add_argument("--version", type=int, help="a specific version (default: the latest)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="where the PEFT directory goes")
    p.add_argument("--base-model", type=Path, metavar="DIR", help="the local base model (default: the embedded one)")


def add_push_parser(sub: Any) -> None:
    p = sub.add_parser(
        "push",
        help="publish one of this client's adapters to its own namespace clients/<me>/NAME",
        description="Publish a PEFT directory; provenance comes from the personalize.json that "
        "`fl-client personalize` writes beside the adapter, else only base model and producer.",
    )
    add_hub_connection(p, key_required=False)
    p.add_argument("--personal", required=True, metavar="NAME", help="the adapter's name under clients/<me>/")
    p.add_argument("--adapter", type=Path, required=True, metavar="DIR", help="the PEFT directory to publish")
    p.add_argument("--base-model", type=Path, metavar="DIR", help="the local base model (default: the embedded one)")


def add_personalize_parser(sub: Any) -> None:
    p = sub.add_parser(
        "personalize",
        help="fine-tune the global adapter on this client's data with DP-SGD, charged to its ledger; push it",
        description="Start from a global adapter (a local PEFT directory, or pulled and verified from the hub), "
        "evaluate it on this client's held-out split, fine-tune it for a few DP-SGD steps (sigma planned once "
        "for all of them, charged to the lifetime ledger in --state-dir before anything is written), evaluate "
        "again, write the personal adapter with its provenance (personalize.json) and, with --push, publish it "
        "to clients/<me>/NAME, where any device holding this client's token can pull it.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--adapter", type=Path, metavar="DIR", help="the global adapter, a local PEFT directory")
    src.add_argument("--global", dest="global_run", metavar="RUN[/ROUND]", help="pull the run's global adapter")
    p.add_argument(
        "--data", required=True, metavar="PATH", help="JSONL file or embedded:TASK[,TASK], as fl-client start"
    )
    p.add_argument(
        "--state-dir", type=Path, required=True, metavar="DIR", help="the client's ledger (as fl-client start)"
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="where the personal adapter goes")
    p.add_argument("--name", help="this node's name, as fl-client start --name (default: this host's name)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epsilon", type=float, default=1.0, help="epsilon of this personalisation alone (default 1)")
    p.add_argument("--noise-multiplier", type=float, help="a fixed sigma instead of --epsilon")
    p.add_argument("--delta", type=float, default=0.0, help="default: from the training split's size")
    p.add_argument("--max-epsilon", type=float, help="refuse if the ledger's lifetime epsilon would pass this")
    p.add_argument(
        "--dp-engine",
        choices=ENGINES,
        default="opacus",
        help="per-example clipping engine (the same result up to float rounding)",
    )
    p.add_argument(
        "--no-dp",
        dest="dp",
        action="store_false",
        help="plain fine-tuning, nothing charged or claimed (only where STATE_DIR/policy.toml has require-dp = false)",
    )
    p.add_argument("--seed", type=int, default=0, help="the federation's run seed (it seeds the node's split)")
    p.add_argument("--model", type=Path, metavar="DIR", help="the local base model (default: the embedded one)")
    p.add_argument("--device", default="auto", help="auto (a GPU when present, default), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="base weights")
    p.add_argument("--push", metavar="NAME", help="publish the result as clients/<me>/NAME (needs --hub)")
    add_hub_connection(p, key_required=False, hub_required=False)  # for --global (with --hub-key) and --push


def connect(args: argparse.Namespace) -> HubClient:
    return open_hub(args.hub, args.token, args.token_file, args.hub_key, args.hub_ca)


def pull(args: argparse.Namespace, console: Console) -> int:
    if (args.method or args.examples) and not args.task:
        raise ValueError('--method and --examples generate an adapter for a task described by --task "..."')
    if args.examples and not args.method:
        raise ValueError("--examples needs --method (examples describe a task to generate an adapter for)")
    examples = _read_examples(args.examples) if args.examples else []
    with connect(args) as hub:
        record = None
        if args.method:
            if args.version is not None:
                raise ValueError("--version does not apply to a generated adapter")
            if hub.public_key is None:
                raise ValueError("pulling needs the hub's public key (--hub-key hub.pub) to verify signatures")

            local = weights_sha256(args.base_model or default_model_dir())
            record = hub.generate(args.task, args.method, examples, base_model_sha256=local)
            name = str(record["name"])
        elif args.global_run:
            run = args.global_run.strip("/")
            if "/" in run:
                name = f"global/{run}"
            else:
                if args.version is not None:
                    raise ValueError("--version needs --global RUN/ROUND (a run's rounds are separate adapters)")
                record = hub.latest(f"global/{run}")
                name = str(record["name"])
        elif args.personal:
            name = f"clients/{hub.client_name()}/{args.personal}"
        elif args.task:
            name = f"tasks/{args.task}"
        else:
            name = args.name
        pulled = hub.pull(name, args.out, version=args.version, base_model_dir=args.base_model, record=record)
    show_pulled(pulled.manifest, pulled.path, console)
    return 0


def _read_examples(path: Path) -> list[Any]:
    """A few examples of a task: JSONL records {"prompt", "completion"} (at most 32)."""
    # lazy: pulls in torch, which this module does not need at import
    from fedlora.core.data import load_jsonl

    examples = load_jsonl(path)
    if len(examples) > MAX_EXAMPLES:
        raise ValueError(f"{path}: {len(examples)} examples; a generation request takes at most {MAX_EXAMPLES}")
    return examples


def show_pulled(manifest: dict[str, Any], path: Path, console: Console) -> None:
    prov, adapter = manifest["provenance"], manifest["adapter"]
    privacy = (
        f"epsilon {prov['epsilon']:.3g} at delta {prov.get('delta')} ({prov.get('accountant')})"
        if prov.get("epsilon") is not None
        else (prov.get("privacy_unit") or "no privacy guarantee stated")
    )
    lines = [
        f"pulled {manifest['name']} v{manifest['version']} -> {path} (signature and hashes verified)",
        f"  base model {prov['base_model']['id']} (weights {prov['base_model']['sha256'][:16]}..., matches local)",
        f"  LoRA r={adapter['rank']} on {', '.join(adapter['target_modules'])}; published by "
        f"{manifest['published_by']} at {manifest['created']}",
        f"  privacy: {privacy}",
    ]
    if prov.get("strategy") or prov.get("run"):
        lines.append(f"  strategy {prov.get('strategy')}, run {prov.get('run')}, round {prov.get('round')}")
    generator = (prov.get("extra") or {}).get("generator")
    if generator:
        experts = prov["extra"].get("experts") or []
        lines.append(
            f"  generated zero-shot by {generator['name']} v{generator['version']} for {prov.get('description')!r} "
            f"from {len(experts)} experts ({prov['extra'].get('generation_ms')} ms)"
        )
    console.print("\n".join(lines), markup=False, highlight=False)


PERSONALIZE_FILE = "personalize.json"


def push_adapter(hub: Any, personal: str, adapter_dir: Path, base_model_dir: Path | None) -> dict[str, Any]:
    """Publish ``adapter_dir`` as clients/<me>/``personal`` with the provenance beside it."""

    base = describe_base_model(base_model_dir)
    sidecar = adapter_dir / PERSONALIZE_FILE
    provenance: dict[str, Any] = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    provenance.setdefault("producer", f"fl-client push {fedlora_version()}")
    provenance["base_model"] = {"id": base.id, "sha256": base.sha256}
    name = f"clients/{hub.client_name()}/{personal}"
    result: dict[str, Any] = hub.publish(name, adapter_files(adapter_dir, base.id), provenance)
    return result


def push(args: argparse.Namespace, console: Console) -> int:
    with connect(args) as hub:
        record = push_adapter(hub, args.personal, args.adapter, args.base_model)
    console.print(f"published {record['name']} v{record['version']}", markup=False, highlight=False)
    return 0


def personal_provenance(
    result: Any, global_manifest: dict[str, Any] | None, share_metrics: bool = True
) -> dict[str, Any]:
    """What a personal adapter claims: this client's lifetime epsilon (the ledger composes the
    federated rounds it took part in with this personalisation), the evaluation of both adapters
    on its held-out split, and the global adapter it started from. Without ``share_metrics``
    (the node's policy in a DP run) the evaluation and the training-set size stay on the node:
    they are not noised."""

    g = (global_manifest or {}).get("provenance", {})
    prov: dict[str, Any] = {
        "producer": f"fl-client personalize {fedlora_version()}",
        "strategy": f"personalized from {g.get('strategy') or 'a global adapter'}",
        "run": g.get("run"),
        "round": g.get("round"),
        "evaluation": {
            "num-test": result.num_test_examples,
            "global-exact-match": result.before_exact_match,
            "global-loss": result.before_loss,
            "personal-exact-match": result.after_exact_match,
            "personal-loss": result.after_loss,
        },
        "extra": {
            "personalization": {
                "steps": result.steps,
                "lr": result.lr,
                "batch_size": result.batch_size,
                "num_train": result.num_train_examples,
                "noise_multiplier": result.noise_multiplier,
                "sample_rate": result.sample_rate,
                "max_grad_norm": result.max_grad_norm,
                "epsilon": result.personalization_epsilon,
                "ledger_run": result.ledger_run_id,
            },
            "global_adapter": {
                "name": (global_manifest or {}).get("name"),
                "version": (global_manifest or {}).get("version"),
                "epsilon": g.get("epsilon"),
                "delta": g.get("delta"),
            },
        },
    }
    if result.dp:
        prov |= {
            "epsilon": result.lifetime_epsilon,
            "delta": result.delta,
            "accountant": result.accountant,
            "privacy_unit": f"{result.privacy_unit}; for this client's examples: the lifetime epsilon of its ledger "
            "(federated rounds and personalisations); other clients' examples keep the global adapter's guarantee",
        }
    else:
        prov["privacy_unit"] = "none for this client's data: personalised without differential privacy"
    if not share_metrics:
        del prov["evaluation"]
        del prov["extra"]["personalization"]["num_train"]
    return prov


def personalize(args: argparse.Namespace, console: Console) -> int:
    # lazy: torch, PEFT and Opacus, which pull and push never need
    from fedlora.client.personalize import DEFAULT_LR, PersonalizeConfig
    from fedlora.client.personalize import personalize as run_personalize

    if (args.global_run or args.push) and not args.hub:
        raise ValueError("--global and --push need --hub URL and a token")
    policy = PrivacyPolicy.load(args.state_dir)  # the node's own, as in its federated rounds
    cfg = PersonalizeConfig(
        data=args.data,
        state_dir=args.state_dir,
        steps=args.steps,
        lr=args.lr if args.lr is not None else DEFAULT_LR,
        batch_size=args.batch_size,
        target_epsilon=args.epsilon,
        noise_multiplier=args.noise_multiplier,
        delta=args.delta,
        max_epsilon=args.max_epsilon,
        dp_engine=args.dp_engine,
        model_dir=str(args.model) if args.model else None,
        seed=args.seed,
        name=args.name,
        dp=args.dp,
        device=args.device,
        dtype=args.dtype,
        policy=policy,
    )
    hub: Any = connect(args) if args.hub else None
    try:
        global_dir = args.adapter
        if args.global_run:
            run = args.global_run.strip("/")
            name = f"global/{run}" if "/" in run else str(hub.latest(f"global/{run}")["name"])
            global_dir = args.state_dir / "pulled" / name.replace("/", "-")
            show_pulled(hub.pull(name, global_dir, base_model_dir=args.model).manifest, global_dir, console)
        sidecar = global_dir / PULLED_MANIFEST
        global_manifest = json.loads(sidecar.read_text()) if sidecar.is_file() else None
        result = run_personalize(global_dir, cfg, args.out)
        provenance = personal_provenance(result, global_manifest, policy.metrics_may_leave(result.dp))
        (args.out / PERSONALIZE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        spent = ""
        if result.dp:
            spent = f", lifetime epsilon {result.lifetime_epsilon:.3f} (this one {result.personalization_epsilon:.3f})"
        console.print(
            f"personalised: {result.steps} steps on {result.num_train_examples} examples in {result.seconds:.1f} s"
            f"{spent}\nexact match on {result.num_test_examples} held-out examples: global "
            f"{result.before_exact_match:.3f} -> personal {result.after_exact_match:.3f}\nadapter: {args.out}",
            markup=False,
            highlight=False,
        )
        if args.push:
            record = push_adapter(hub, args.push, args.out, args.model)
            console.print(f"published {record['name']} v{record['version']}", markup=False, highlight=False)
    finally:
        if hub is not None:
            hub.close()
    return 0
