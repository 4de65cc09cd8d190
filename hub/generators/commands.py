"""``fl-hub build-experts`` and ``fl-hub train-generator`` (imported only when they run: torch)."""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict

import torch
from rich.console import Console

from fedlora.atomic import atomic_directory
from fedlora.core.embedded import default_text_model_dir
from fedlora.core.lora_settings import LoraSettings
from fedlora.hub.generators.cvae import CVAESettings
from fedlora.hub.generators.embedding import load_task_model
from fedlora.hub.generators.experts import (
    EXPERT_LORA,
    TEXT_EXPERT_LORA,
    ExpertConfig,
    ExpertResult,
    FederatedExperts,
    build_experts,
    publish_experts,
)
from fedlora.hub.generators.library import ExpertLibrary
from fedlora.hub.generators.registry import generator_class
from fedlora.hub.sdk.client import HubClient, open_hub
from fedlora.hub.sdk.manifest import describe_base_model
from fedlora.hub.sdk.publish import fedlora_version


def remote_hub(args: argparse.Namespace) -> HubClient | None:
    """The hub ``--hub`` names (None without one): a bad token file or URL fails before training."""
    if not args.hub:
        return None
    return open_hub(args.hub, args.token, args.token_file, getattr(args, "hub_key", None), args.hub_ca)


def build_experts_command(args: argparse.Namespace, console: Console) -> int:
    torch.set_num_threads(args.threads)
    default = TEXT_EXPERT_LORA if args.kind == "seq-cls" else EXPERT_LORA
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip()) or default.target_modules
    cfg = ExpertConfig(
        kind=args.kind,
        tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()) if args.tasks else (),
        lora=LoraSettings(rank=args.rank, alpha=2.0 * args.rank, target_modules=targets, init_seed=args.seed),
        steps=args.steps,
        checkpoints=args.checkpoints,
        checkpoint_every=args.checkpoint_every,
        lr=args.lr,
        seed=args.seed,
        # text experts start apart: a chain would hand each one its elders' label rows
        warm_start=args.warm_start or ("shared" if args.federated or args.kind == "seq-cls" else "family-chain"),
    )
    if args.federated and cfg.warm_start != "shared":
        raise ValueError("--federated experts all start from the shared initialisation (--warm-start shared)")
    federated = FederatedExperts(args.clients, args.rounds, args.local_steps) if args.federated else None
    # a bad token file or URL fails before any training
    hub = remote_hub(args)
    how = (
        f"a federation each ({args.clients} clients, {args.rounds} rounds of {args.local_steps} steps), "
        f"checkpoints after the last {cfg.checkpoints} rounds"
        if federated
        else f"{cfg.steps} steps, checkpoints at {cfg.checkpoint_steps()}"
    )
    console.print(
        f"training {len(cfg.task_list())} experts: LoRA r={cfg.adapter.rank} on {', '.join(targets)}, "
        f"{how} -> {args.out}"
    )

    metric = "accuracy" if cfg.kind == "seq-cls" else "exact match"  # a classifier's exact match

    def show(r: ExpertResult) -> None:
        console.print(f"  {r.task:<26} {metric} {r.exact_match:.3f}  ({r.seconds:.1f} s)", highlight=False)

    results = build_experts(cfg, args.out, args.base_model, progress=show, federated=federated)
    weak = [r.task for r in results if r.exact_match < 0.5]
    if weak:
        console.print(f"[yellow]experts below 0.5 {metric} (more --steps?): {', '.join(weak)}[/]")
    if hub is not None:
        build = f"experts-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        with hub:
            published = publish_experts(hub, args.out, build, f"fl-hub build-experts {fedlora_version()}")
        console.print(f"published {len(published)} checkpoints to tasks/ as build {build}", highlight=False)
    return 0


def train_generator_command(args: argparse.Namespace, console: Console) -> int:
    torch.set_num_threads(args.threads)
    settings = CVAESettings(steps=args.steps, seed=args.seed)
    base_dir = args.base_model
    base = describe_base_model(base_dir)
    hub = remote_hub(args)
    if args.experts is not None:
        library = ExpertLibrary.from_dir(args.experts, base)
    elif hub is not None:
        if hub.public_key is None:
            raise ValueError("reading experts from a hub needs --hub-key hub.pub (every expert is verified)")
        library = ExpertLibrary.from_hub(hub)
    else:
        raise ValueError("name the experts: --experts DIR (fl-hub build-experts --out) or --hub URL")
    task_type = library.layout.adapter_config.get("task_type")
    if base_dir is None and task_type == "SEQ_CLS":  # text experts: the text classifiers' embedded encoder
        base_dir = default_text_model_dir()
        base = describe_base_model(base_dir)
    if library.base_model.sha256 != base.sha256:
        raise ValueError(
            f"the experts were trained on base model {library.base_model.id} (weights "
            f"{library.base_model.sha256[:16]}...), not on {base.id} ({base.sha256[:16]}...): pass --base-model"
        )
    excluded = [t.strip() for t in args.exclude.split(",") if t.strip()] if args.exclude else []
    if excluded:
        library = library.without(*excluded)
    console.print(
        f"{args.method}: {len(library.experts)} experts, {library.layout.size:,} parameters per adapter, "
        f"{settings.steps} training steps"
    )
    task_model = None
    if args.method == "icm-lora":
        task_model = load_task_model(base_dir, task_type)
    options = {}
    if args.temperature is not None:
        if args.method != "sg-lora":
            raise ValueError("--temperature is SG-LoRA's (the softmax over its top experts)")
        if not args.temperature > 0:
            raise ValueError(f"--temperature must be > 0, got {args.temperature}")
        options["temperature"] = args.temperature
    generator = generator_class(args.method).fit(
        library, settings, embedding=args.embedding, task_model=task_model, **options
    )
    t = generator.training
    console.print(
        f"trained in {t['seconds']:.1f} s: {t['parameters']:,} generator parameters, final MSE {t['final_mse']:.4f}",
        highlight=False,
    )
    files = generator.to_files()
    if args.out is not None:
        with atomic_directory(args.out) as tmp:
            for fname, data in files.items():
                (tmp / fname).write_bytes(data)
        console.print(f"generator written to {args.out}", highlight=False)
    if hub is not None:
        provenance = {
            "base_model": asdict(library.base_model),
            "producer": f"fl-hub train-generator {fedlora_version()}",
            "description": f"{args.method} generator over {len(library.experts)} experts",
            "extra": {"experts": library.names(), "training": t, "embedding": args.embedding},
        }
        with hub:
            record = hub.publish(f"generators/{args.method}", files, provenance)
        console.print(f"published {record['name']} v{record['version']}", highlight=False)
    return 0
