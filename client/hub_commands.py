"""``fl-client pull``, ``push`` and ``personalize``: the edge side of the adapter hub."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console


def add_hub_connection(p: argparse.ArgumentParser, key_required: bool = True) -> None:
    p.add_argument("--hub", required=True, metavar="URL", help="the hub, e.g. https://hub.example:9480")
    p.add_argument("--token", help="this client's hub token (fl-hub token create --client NAME)")
    p.add_argument("--token-file", type=Path, help="a file holding the token (safer than the command line)")
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
    which.add_argument("--task", metavar="NAME", help="a task adapter tasks/NAME")
    which.add_argument("--name", metavar="FULL_NAME", help="any adapter by full name")
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


def connect(args: argparse.Namespace) -> Any:
    from hub.client import HubClient, read_token
    from hub.manifest import load_public_key

    key = load_public_key(args.hub_key) if args.hub_key else None
    return HubClient(args.hub, read_token(args.token, args.token_file), key, ca=args.hub_ca)


def pull(args: argparse.Namespace, console: Console) -> int:
    with connect(args) as hub:
        record = None
        if args.global_run:
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
        lines.append(f"  from {prov.get('strategy')} run {prov.get('run')} round {prov.get('round')}")
    console.print("\n".join(lines), markup=False, highlight=False)


PERSONALIZE_FILE = "personalize.json"


def push(args: argparse.Namespace, console: Console) -> int:
    from hub.manifest import describe_base_model
    from hub.publish import adapter_files, fedlora_version

    base = describe_base_model(args.base_model)
    sidecar = args.adapter / PERSONALIZE_FILE
    provenance: dict[str, Any] = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    provenance.setdefault("producer", f"fl-client push {fedlora_version()}")
    provenance["base_model"] = {"id": base.id, "sha256": base.sha256}
    with connect(args) as hub:
        name = f"clients/{hub.client_name()}/{args.personal}"
        record = hub.publish(name, adapter_files(args.adapter, base.id), provenance)
    console.print(f"published {record['name']} v{record['version']}", markup=False, highlight=False)
    return 0
