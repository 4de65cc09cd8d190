"""``fl-hub``: the adapter hub's one console script.

fl-hub init DIR [--host H] [--port P] [--database URL] [--max-upload-mb N]
fl-hub serve DIR [--host H] [--port P] [--workers N]
fl-hub token create DIR (--client NAME | --operator) [--label TEXT] [--out FILE]
fl-hub token revoke DIR (--client NAME | --token-file F)
fl-hub token ls DIR
fl-hub base-model add DIR MODEL_DIR [--id ID]
fl-hub ls [PREFIX] (--dir DIR | --hub URL --token-file F) [--query WORDS] [--json]
fl-hub publish NAME ADAPTER_DIR --hub URL --token-file F [--provenance JSON_FILE]
fl-hub build-experts --out DIR [--tasks T,T] [--steps N] [--hub URL --token-file F]
fl-hub train-generator --method sg-lora|icm-lora (--experts DIR | --hub URL --hub-key K) [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console

from fedlora.atomic import write_atomic
from fedlora.core.adapter_format import CONFIG_FILE
from fedlora.core.run_dir import RunDir
from fedlora.hub.evaluate import evaluate_prefix, load_examples
from fedlora.hub.sdk.client import HubClient, open_hub, read_token
from fedlora.hub.sdk.manifest import GENERATOR_METHODS, describe_base_model, load_public_key
from fedlora.hub.sdk.names import Principal
from fedlora.hub.sdk.publish import HubTarget, fedlora_version, publish_global


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fl-hub", description="The fedlora adapter hub: registry, signatures, access control."
    )
    sub = p.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="create a hub directory: signing key, settings, database, operator token")
    init.add_argument("dir", type=Path)
    init.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    init.add_argument("--port", type=int, default=None)
    init.add_argument("--database", default="", help="SQLAlchemy URL (default: sqlite in DIR/hub.db)")
    init.add_argument("--max-upload-mb", type=float, default=64.0)
    init.add_argument(
        "--name",
        action="append",
        default=[],
        metavar="NAME",
        help="a name or address clients dial (repeatable; the certificate's SANs, loopback always included)",
    )
    init.add_argument("--tls-cert", type=Path, default=None, help="serve HTTPS with this certificate (PEM) ...")
    init.add_argument("--tls-key", type=Path, default=None, help="... and its private key (PEM), not the hub's own CA")
    init.add_argument(
        "--insecure",
        action="store_true",
        help="serve plain HTTP (tokens and adapters travel in clear): only behind a TLS proxy of your own",
    )

    serve = sub.add_parser("serve", help="serve the HTTP API")
    serve.add_argument("dir", type=Path)
    serve.add_argument("--host", default=None, help="override hub.toml's host")
    serve.add_argument("--port", type=int, default=None, help="override hub.toml's port")
    serve.add_argument("--workers", type=int, default=None, help="override hub.toml's worker processes")
    serve.add_argument(
        "--base-model",
        type=Path,
        action="append",
        default=[],
        help="a base model directory generators may need besides the embedded one (repeatable)",
    )

    token = sub.add_parser("token", help="create, revoke or list access tokens")
    tsub = token.add_subparsers(dest="token_command", required=True)
    create = tsub.add_parser("create", help="print a new token (stored hashed; shown once)")
    create.add_argument("dir", type=Path)
    who = create.add_mutually_exclusive_group(required=True)
    who.add_argument(
        "--client", help="a client token: reads global/, tasks/, generated/; reads and writes clients/NAME/"
    )
    who.add_argument("--operator", action="store_true", help="an operator token: publishes anywhere")
    create.add_argument("--label", default="")
    create.add_argument(
        "--out", type=Path, default=None, help="write the token to this file (0600) instead of printing it"
    )
    revoke = tsub.add_parser("revoke", help="revoke a client's tokens or one token")
    revoke.add_argument("dir", type=Path)
    what = revoke.add_mutually_exclusive_group(required=True)
    what.add_argument("--client")
    what.add_argument("--token-file", type=Path, help="revoke the one token this file holds")
    tls = tsub.add_parser("ls", help="list tokens (never their values)")
    tls.add_argument("dir", type=Path)

    base = sub.add_parser("base-model", help="base models the hub accepts adapters for")
    bsub = base.add_subparsers(dest="base_command", required=True)
    badd = bsub.add_parser("add", help="register a local base model directory by its weights' hash")
    badd.add_argument("dir", type=Path)
    badd.add_argument("model_dir", type=Path)
    badd.add_argument("--id", default=None, help="the id adapters name it by (default: from its config / directory)")
    bls = bsub.add_parser("ls")
    bls.add_argument("dir", type=Path)

    ls = sub.add_parser("ls", help="list adapters (latest version of each)")
    ls.add_argument("prefix", nargs="?", default="")
    ls.add_argument("--dir", type=Path, default=None, help="read a local hub directory (operator view)")
    _remote_options(ls)
    ls.add_argument("--query", "-q", default="", help="words every listed adapter's text contains")
    ls.add_argument("--json", action="store_true")

    pub = sub.add_parser("publish", help="publish a PEFT adapter directory")
    pub.add_argument("name", help="e.g. tasks/sort-desc or clients/alice/math")
    pub.add_argument("adapter_dir", type=Path)
    _remote_options(pub)
    pub.add_argument("--hub-key", type=Path, default=None, help="the hub's public key: verify what it signed")
    pub.add_argument("--provenance", type=Path, default=None, help="JSON file with provenance fields")
    pub.add_argument("--base-model", type=Path, default=None, help="the base model directory (default: embedded)")
    pub.add_argument("--description", default=None)
    run = sub.add_parser("publish-run", help="publish a finished run's global adapter (what fl-sim/fl-server --hub do)")
    run.add_argument("run_dir", type=Path)
    _remote_options(run)
    run.add_argument("--hub-key", type=Path, default=None, help="the hub's public key: verify what it signed")
    run.add_argument("--round", type=int, default=None, help="a round's checkpoint instead of the final adapter")

    experts = sub.add_parser(
        "build-experts", help="train one expert adapter per task (zero-shot generators learn from them)"
    )
    experts.add_argument("--out", type=Path, required=True, help="the expert directory to write")
    experts.add_argument(
        "--kind",
        choices=["causal-lm", "seq-cls"],
        default="causal-lm",
        help="the suite: procedural string tasks on the byte Llama (default) or the text-classification "
        "family on the MiniLM encoder (each expert with the head over the family's labels)",
    )
    experts.add_argument("--tasks", default="", help="comma-separated embedded tasks (default: every seen task)")
    experts.add_argument("--steps", type=int, default=200)
    experts.add_argument("--checkpoints", type=int, default=3, help="late checkpoints kept per expert")
    experts.add_argument("--checkpoint-every", type=int, default=20)
    experts.add_argument("--rank", type=int, default=4)
    experts.add_argument(
        "--targets", default="", help="comma-separated target modules (default: all-linear; query,value for seq-cls)"
    )
    experts.add_argument("--lr", type=float, default=3e-3)
    experts.add_argument("--seed", type=int, default=0)
    experts.add_argument(
        "--warm-start",
        choices=["shared", "family-chain"],
        default=None,
        help="each expert from the previous expert of its family (default), or all from one initial "
        "adapter (the default for --kind seq-cls, and the only choice with --federated)",
    )
    experts.add_argument("--threads", type=int, default=1)
    experts.add_argument("--base-model", type=Path, default=None, help="the base model directory (default: embedded)")
    experts.add_argument(
        "--federated", action="store_true", help="train each expert by an fl-sim federation of its task's clients"
    )
    experts.add_argument("--clients", type=int, default=4, help="with --federated: clients per federation")
    experts.add_argument("--rounds", type=int, default=10, help="with --federated: rounds (the last are checkpoints)")
    experts.add_argument("--local-steps", type=int, default=20, help="with --federated: local steps per round")
    _remote_options(experts)
    experts.add_argument("--hub-key", type=Path, default=None, help="the hub's public key: verify what it signed")

    gen = sub.add_parser("train-generator", help="train a zero-shot generator on expert adapters")
    gen.add_argument("--method", required=True, choices=GENERATOR_METHODS)
    gen.add_argument("--experts", type=Path, default=None, help="an expert directory (default: tasks/ of --hub)")
    gen.add_argument("--out", type=Path, default=None, help="write the generator's files here")
    gen.add_argument("--embedding", default="tfidf", choices=["tfidf", "minilm"], help="description embedding")
    gen.add_argument("--exclude", default="", help="comma-separated experts to leave out (held-out evaluation)")
    gen.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="sg-lora: the softmax temperature over the top experts (default 0.02, near retrieval; "
        "larger mixes more of them)",
    )
    gen.add_argument("--steps", type=int, default=600)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--threads", type=int, default=1)
    gen.add_argument("--base-model", type=Path, default=None, help="the base model directory (default: embedded)")
    _remote_options(gen)
    gen.add_argument("--hub-key", type=Path, default=None, help="the hub's public key (verifies the experts)")

    ev = sub.add_parser(
        "evaluate", help="score the latest adapter of every name under a prefix on one dataset (batched)"
    )
    ev.add_argument("prefix", help="e.g. clients/ (personal adapters) or tasks/")
    ev.add_argument("--data", required=True, help="a JSONL file of {prompt, completion} or embedded:TASK[,TASK]")
    ev.add_argument("--num-examples", type=int, default=200, help="examples evaluated (default 200)")
    ev.add_argument("--seed", type=int, default=0, help="seeds the embedded tasks' examples")
    ev.add_argument("--batch-size", type=int, default=64, help="sequences per batch, mixed over the adapters")
    ev.add_argument("--base-model", type=Path, default=None, help="the base model directory (default: embedded)")
    _remote_options(ev)
    ev.add_argument("--hub-key", type=Path, default=None, help="the hub's public key (verifies every adapter)")
    ev.add_argument("--json", action="store_true")
    return p


def remote_client(args: argparse.Namespace, key_required: bool = False) -> HubClient:
    """The HubClient that ``--hub``, ``--token``/``--token-file`` and ``--hub-key`` name."""
    if not args.hub:
        raise ValueError(f"fl-hub {args.command} needs --hub URL")
    key_file = getattr(args, "hub_key", None)
    if key_required and key_file is None:
        raise ValueError(f"fl-hub {args.command} needs --hub-key hub.pub (what the hub signs is verified)")
    return open_hub(args.hub, args.token, args.token_file, key_file, args.hub_ca)


def _remote_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hub", default=None, help="hub URL, e.g. https://127.0.0.1:9480")
    p.add_argument("--hub-ca", type=Path, default=None, help="the hub's ca.pem (fl-hub init made it)")
    p.add_argument("--token", default=None, help=argparse.SUPPRESS)  # refused with the reason: a token in ps
    p.add_argument(
        "--token-file", type=Path, default=None, help="a file (0600) holding the token; or FEDLORA_HUB_TOKEN"
    )


def _init(args: argparse.Namespace, console: Console) -> int:
    # lazy: pulls in sqlalchemy, which this module does not need at import
    from fedlora.hub.hub_dir import DEFAULT_PORT, HubDir, HubSettings

    settings = HubSettings(
        host=args.host,
        port=args.port or DEFAULT_PORT,
        database=args.database,
        max_upload_mb=args.max_upload_mb,
        tls_cert=str(args.tls_cert.resolve()) if args.tls_cert else "",
        tls_key=str(args.tls_key.resolve()) if args.tls_key else "",
    )
    if args.insecure and (args.tls_cert or args.name):
        raise ValueError("--insecure serves plain HTTP: it takes no --tls-cert or --name")
    own_ca = not args.insecure and not args.tls_cert
    names = args.name or ([args.host] if args.host not in ("0.0.0.0", "::") else []) or ["localhost"]
    hub, kid = HubDir.init(args.dir, settings, tls_names=names if own_ca else ())
    console.print(f"hub directory {hub.root}\nsigning key {kid} (give clients {hub.public_key_path})")
    if own_ca:
        console.print(
            f"HTTPS with the hub's own CA: certificate for {', '.join(names)} (+ loopback); "
            f"give clients {hub.ca_cert_path} (--hub-ca)"
        )
    elif args.insecure:
        console.print("plain HTTP (--insecure): tokens and adapters travel in clear")
    console.print(f"operator token in {hub.operator_token_path}\nserve it with: fl-hub serve {hub.root}")
    return 0


def _serve(args: argparse.Namespace, console: Console) -> int:
    import uvicorn

    # lazy: pulls in fastapi, which this module does not need at import
    from fedlora.hub.app import BASE_MODELS_ENV, HUB_DIR_ENV, create_app
    from fedlora.hub.http_timeouts import BODY_TIMEOUT_ENV, HEADER_TIMEOUT_ENV, TimedH11Protocol

    # lazy: pulls in sqlalchemy, which this module does not need at import
    from fedlora.hub.hub_dir import HubDir

    hub = HubDir(args.dir.resolve())
    s = hub.settings()
    s = dataclasses.replace(s, host=args.host or s.host, port=args.port or s.port, workers=args.workers or s.workers)
    registry = hub.registry()  # fail here, before binding, on a broken directory or database
    base_dirs = [str(p.resolve()) for p in args.base_model]
    for p in args.base_model:
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"--base-model {p} is not a model directory (no config.json)")
    scheme = "https" if s.tls_cert else "http"
    console.print(
        f"fl-hub: serving {hub.root} on {scheme}://{s.host}:{s.port} "
        f"(signing key {registry.key_id}, {s.workers} worker(s))"
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    tls: dict[str, Any] = {"ssl_certfile": s.tls_cert, "ssl_keyfile": s.tls_key} if s.tls_cert else {}
    # every worker process reads the request timeouts from its environment
    os.environ[HEADER_TIMEOUT_ENV], os.environ[BODY_TIMEOUT_ENV] = str(s.header_timeout), str(s.body_timeout)
    common: dict[str, Any] = {"host": s.host, "port": s.port, "log_level": "warning", "access_log": False, **tls}
    common["http"] = TimedH11Protocol
    if s.workers == 1:
        uvicorn.run(create_app(registry, s.max_upload_bytes, base_dirs), **common)
    else:
        os.environ[HUB_DIR_ENV] = str(hub.root)
        os.environ[BASE_MODELS_ENV] = os.pathsep.join(base_dirs)
        uvicorn.run("fedlora.hub.app:app_from_env", factory=True, workers=s.workers, **common)
    return 0


def _token(args: argparse.Namespace, console: Console) -> int:
    # lazy: pulls in sqlalchemy, which this module does not need at import
    from fedlora.hub.hub_dir import HubDir

    registry = HubDir(args.dir).registry()
    if args.token_command == "create":
        token = registry.create_token(
            "operator" if args.operator else "client", None if args.operator else args.client, args.label
        )
        if args.out is None:
            print(token)
        else:
            write_atomic(args.out, (token + "\n").encode(), 0o600)
            console.print(f"token written to {args.out} (mode 0600)")
        return 0
    if args.token_command == "revoke":
        one = read_token(None, args.token_file) if args.token_file else None
        n = registry.revoke_tokens(client=args.client, token=one)
        if n == 0:
            raise ValueError("no matching token that is not already revoked")
        console.print(f"revoked {n} token(s)")
        return 0
    for t in registry.tokens():
        state = f"revoked {t['revoked']}" if t["revoked"] else "active"
        console.print(f"{t['id']:>4}  {t['role']:<8} {t['client'] or '-':<20} {state:<40} {t['label']}", markup=False)
    return 0


def _base_model(args: argparse.Namespace, console: Console) -> int:
    # lazy: pulls in sqlalchemy, which this module does not need at import
    from fedlora.hub.hub_dir import HubDir

    registry = HubDir(args.dir).registry()
    if args.base_command == "add":
        base = describe_base_model(args.model_dir)
        model_id = args.id or base.id
        registry.add_base_model(model_id, base.sha256)
        console.print(f"{model_id} {base.sha256}", markup=False)
        return 0
    for model_id, digest in sorted(registry.base_models().items()):
        console.print(f"{model_id} {digest}", markup=False)
    return 0


def _ls(args: argparse.Namespace, console: Console) -> int:
    if args.dir is not None:
        # lazy: pulls in sqlalchemy, which this module does not need at import
        from fedlora.hub.hub_dir import HubDir

        rows = HubDir(args.dir).registry().list(Principal("operator", label="local"), args.prefix, args.query)
    else:
        if not args.hub:
            raise ValueError("fl-hub ls needs --dir DIR (on the hub) or --hub URL with a token")
        with remote_client(args) as hub:
            rows = hub.list(args.prefix, args.query)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        p = r["provenance"]
        eps = f"eps {p['epsilon']:.2f}" if p.get("epsilon") is not None else "no DP"
        where = " ".join(x for x in (p.get("strategy") or "", f"run {p['run']}" if p.get("run") else "") if x)
        console.print(
            f"{r['name']:<40} v{r['version']:<3} r={r['adapter']['rank']:<3} {eps:<10} "
            f"{r['size'] / 1e6:7.2f} MB  {where}  {r['created']}",
            markup=False,
            highlight=False,
        )
    if not rows:
        console.print("(nothing)")
    return 0


def _publish(args: argparse.Namespace, console: Console) -> int:
    provenance: dict[str, Any] = {}
    if args.provenance is not None:
        provenance = json.loads(args.provenance.read_text())
        if not isinstance(provenance, dict):
            raise ValueError(f"{args.provenance}: provenance must be a JSON object")
    provenance.setdefault("producer", "fl-hub publish")
    provenance.setdefault("base_model", describe_base_model(args.base_model).__dict__)
    if args.description is not None:
        provenance["description"] = args.description
    with remote_client(args) as hub:
        record = hub.publish_dir(args.name, args.adapter_dir, provenance)
    console.print(f"published {record['name']} v{record['version']} ({record['size']} bytes)", markup=False)
    return 0


def _publish_run(args: argparse.Namespace, console: Console) -> int:
    if not args.hub:
        raise ValueError("fl-hub publish-run needs --hub URL")
    run = RunDir(args.run_dir.resolve())
    key = load_public_key(args.hub_key) if args.hub_key else None
    target = HubTarget(args.hub, read_token(args.token, args.token_file), key, ca=args.hub_ca)
    if args.round is None:
        server_round, adapter_dir, final = run.last_round(), run.global_adapter_dir, True
        if not (adapter_dir / CONFIG_FILE).is_file():
            raise ValueError(f"{run.root} has no final adapter ({adapter_dir}): publish a --round checkpoint instead")
    else:
        server_round, adapter_dir, final = args.round, run.checkpoint_dir(args.round), False
    record = publish_global(
        target, run.root, server_round, adapter_dir, final, f"fl-hub publish-run {fedlora_version()}"
    )
    console.print(f"published {record['name']} v{record['version']}", markup=False, highlight=False)
    return 0


def _build_experts(args: argparse.Namespace, console: Console) -> int:
    # lazy: pulls in torch, which this module does not need at import
    from fedlora.hub.generators.commands import build_experts_command

    return build_experts_command(args, console)


def _train_generator(args: argparse.Namespace, console: Console) -> int:
    # lazy: pulls in torch, which this module does not need at import
    from fedlora.hub.generators.commands import train_generator_command

    return train_generator_command(args, console)


def _evaluate(args: argparse.Namespace, console: Console) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    examples = load_examples(args.data, args.num_examples, args.seed)
    with remote_client(args, key_required=True) as hub:
        result = evaluate_prefix(hub, args.prefix, examples, args.base_model, args.batch_size)
    if args.json:
        print(json.dumps({"scores": [asdict(s) for s in result.scores], "skipped": result.skipped}, indent=2))
        return 0
    lines = [f"{s.name:<40} v{s.version:<3} exact match {s.exact_match:.3f}  loss {s.loss:.4f}" for s in result.scores]
    lines += [f"skipped {reason}" for reason in result.skipped]
    lines.append(f"{len(result.scores)} adapters x {len(examples)} examples, one batched pass, {result.seconds:.1f} s")
    console.print("\n".join(lines), markup=False, highlight=False)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console(soft_wrap=True)
    commands = {
        "init": _init,
        "serve": _serve,
        "token": _token,
        "base-model": _base_model,
        "ls": _ls,
        "publish": _publish,
        "publish-run": _publish_run,
        "build-experts": _build_experts,
        "train-generator": _train_generator,
        "evaluate": _evaluate,
    }
    try:
        return commands[args.command](args, console)
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as err:
        Console(stderr=True, soft_wrap=True).print(f"fl-hub: error: {err}", markup=False, highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
