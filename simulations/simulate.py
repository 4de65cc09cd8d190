"""One simulated federation: the checks that run before any process starts, and the run itself on
Flower's simulation runtime (``fl-sim`` and ``fl-sim compare`` both start runs through
:func:`simulate`). The options that build its run config are in :mod:`fedlora.simulations.options`."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from transformers import AutoConfig

import fedlora
from fedlora.core.cli import Progress
from fedlora.core.client_data import build_partition, client_examples, client_train_sizes, run_labels
from fedlora.core.config import DEFAULT_RUN_CONFIG, FederationConfig
from fedlora.core.flower_runner import FEDLORA_COMPONENTS, FlowerRunRequest, run_flower_app
from fedlora.core.kinds import get_kind
from fedlora.core.run_dir import RunDir
from fedlora.privacy.sampling import check_poisson_batches

RAY_CPUS_ENV = "FEDLORA_RAY_CPUS"


def validate(run_config: Mapping[str, Any]) -> FederationConfig:
    """Everything that can be checked before any process starts: config, split, data files."""
    cfg = FederationConfig.from_run_config(run_config)
    if cfg.num_clients * cfg.fraction_train < 1 - 1e-9:
        raise ValueError(f"fraction-train {cfg.fraction_train} of {cfg.num_clients} clients samples nobody; raise it")
    build_partition(cfg)  # a split that leaves a client empty, or an unreadable file, fails here
    client_train_sizes(cfg)  # with a directory of files: every client's file is read and checked
    check_records(cfg)
    return cfg


@functools.lru_cache(maxsize=4)  # fl-sim validates, then simulates: the records are encoded once
def check_records(cfg: FederationConfig) -> int:
    """Encode every client's records as its client will, before anything starts, so a bad record,
    a label outside the run's label space, an over-long record or a DP batch too small for a
    client is refused here with the reason, never found by every client in every round. Returns
    how many records ``model.max-length`` truncates."""
    kind = get_kind(cfg.model.kind)
    path = cfg.base_model_dir()
    processor = kind.load_processor(path)
    positions = _max_positions(path)
    if cfg.model.max_length > positions:
        raise ValueError(
            f"--max-length {cfg.model.max_length} is longer than the model's {positions} positions: "
            f"use at most {positions}"
        )
    limit = cfg.model.max_length or positions
    labels = run_labels(cfg)
    if kind.classifier and len(labels) < 2:
        raise ValueError(f"a {kind.name} run needs at least 2 labels, got {list(labels)} (set --labels)")
    cut = total = 0
    for p in range(cfg.num_clients):
        train, test = client_examples(cfg, p)
        cut += kind.encode(processor, [*train, *test], labels, limit, truncate=True).truncated
        total += len(train) + len(test)
        if cfg.dp.enabled:
            try:
                check_poisson_batches(cfg.batch_size, len(train), cfg.local_steps)
            except ValueError as err:
                raise ValueError(f"client {p}: {err}") from None
    if cut and not cfg.model.max_length:
        raise ValueError(
            f"{cut} of {total} records are longer than the model's {limit} positions: pass --max-length {limit} "
            "(model.max-length) to truncate them, or shorten them"
        )
    return cut


def start_notes(cfg: FederationConfig) -> list[str]:
    """What a user should know before the run starts: records truncated to ``--max-length``, and a
    DP engine the run cannot use for this kind."""
    notes = []
    cut = check_records(cfg)
    if cut:
        notes.append(f"{cut} record(s) truncated to --max-length {cfg.model.max_length} tokens")
    if cfg.dp.enabled and cfg.dp.engine == "fused" and get_kind(cfg.model.kind).classifier:
        notes.append(
            f"dp.engine = fused taps LoRA factors only and a {cfg.model.kind} model trains its head in full: "
            "the clients run DP-SGD on Opacus' engine"
        )
    return notes


def local_ray_cpus(ray_cpus: int | None, ray_address: str | None) -> int | None:
    """The CPUs the run's own Ray runtime may use: ``--ray-cpus``, else ``$FEDLORA_RAY_CPUS``, else
    None (every core). Each CPU is one Ray worker process that loads the model for the clients it
    serves: fewer of them train fewer clients at once and start faster, which pays on a busy machine.
    An existing cluster (``ray_address``) has its own CPUs: the option is refused there, the
    variable ignored."""
    if ray_cpus is not None:
        if ray_address is not None:
            raise ValueError("--ray-cpus caps a local Ray runtime; a Ray cluster (--ray-address) has its own CPUs")
        if isinstance(ray_cpus, bool) or not isinstance(ray_cpus, int) or ray_cpus < 1:
            raise ValueError(f"--ray-cpus must be an integer >= 1, got {ray_cpus!r}")
        return ray_cpus
    raw = os.environ.get(RAY_CPUS_ENV, "").strip()
    if not raw or ray_address is not None:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"${RAY_CPUS_ENV} must be an integer >= 1, got {raw!r}")
    return int(raw)


def _max_positions(path: Path) -> int:
    """As the kinds read it from a loaded model (2048 when the config does not say)."""
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    return int(getattr(config, "max_position_embeddings", 0) or 2048)


def simulate(
    run_config: Mapping[str, Any],
    *,
    console: Console,
    quiet: bool = False,
    verbose: bool = False,
    timeout: float = 3600.0,
    on_log_line: Callable[[str], None] | None = None,
    cpus_per_client: int = 1,
    gpus_per_client: float = 0.0,
    ray_address: str | None = None,
    ray_cpus: int | None = None,
) -> Any:
    """Validate, run on the simulation runtime, and return the runner's outcome. ``ray_cpus``
    caps the CPUs of the local Ray runtime (default: ``$FEDLORA_RAY_CPUS``, else every core)."""
    cfg = validate(run_config)
    ray_num_cpus = local_ray_cpus(ray_cpus, ray_address)
    if ray_num_cpus is not None and ray_num_cpus < cpus_per_client:
        raise ValueError(
            f"--cpus-per-client {cpus_per_client} is more than the {ray_num_cpus} CPU(s) Ray may use "
            f"(--ray-cpus or ${RAY_CPUS_ENV}): no client could ever be scheduled"
        )
    for note in [] if quiet else start_notes(cfg):
        console.print(f"fl-sim: {note}", markup=False, highlight=False)
    run = RunDir(Path(cfg.run_dir).resolve())
    overrides = {k: v for k, v in run_config.items() if DEFAULT_RUN_CONFIG.get(k) != v}
    overrides["run-dir"] = str(run.root)
    if cfg.state_dir:
        overrides["state-dir"] = str(Path(cfg.state_dir).resolve())
    if cfg.model_dir:
        overrides["model-dir"] = str(Path(cfg.model_dir).resolve())
    if cfg.data_path:
        overrides["data-path"] = str(Path(cfg.data_path).resolve())
    run.make()
    request = FlowerRunRequest(
        components=FEDLORA_COMPONENTS,
        app_name="fedlora",
        default_config=DEFAULT_RUN_CONFIG,
        overrides=overrides,
        num_supernodes=cfg.num_clients,
        client_num_cpus=cpus_per_client,
        client_num_gpus=gpus_per_client,
        ray_address=ray_address,
        ray_num_cpus=ray_num_cpus,
        timeout=timeout,
        workdir=run.sim_workdir,
        pythonpath=(Path(fedlora.__file__).resolve().parent.parent,),  # where the fedlora package is
    )

    def log_line(line: str) -> None:
        if verbose:
            console.print(line, markup=False, highlight=False)
        if on_log_line is not None:
            on_log_line(line)

    start_round = run.last_round() if cfg.resume else 0
    if quiet:
        return run_flower_app(request, log_line)
    with Progress(console, run.root, cfg.num_rounds, start_round):
        return run_flower_app(request, log_line)
