"""``fl-sim``: federated LoRA with many virtual clients on Flower's simulation runtime.

It runs the same server and client apps as a deployment (``fedlora.server.app:app``,
``fedlora.client.app:app``) through a real SuperLink on 127.0.0.1 and Flower's Ray backend, one
virtual client per partition. Every option is a key of the apps' run config, so a run is
reproducible with ``flwr run --run-config`` too (``--print-run-config`` shows it).

    fl-sim                       the main job: federated DP LoRA over non-IID clients
    fl-sim --resume DIR          continue an interrupted run from its last checkpoint
    fl-sim compare ...           strategies x seeds (+ centralised baseline) on one split
    fl-sim report DIR            rewrite a run's plots, client table and privacy report
    fl-sim personal-eval DIR     personal adapters x personalised clients' test splits, batched
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from fedlora.core.cli import Progress, parse_run_config_pairs, report_published, resume_config, summary
from fedlora.core.client_data import build_partition, client_train_sizes
from fedlora.core.config import DEFAULT_RUN_CONFIG, FederationConfig
from fedlora.core.flower_runner import SimulationRequest, run_config_toml, run_simulation_app
from fedlora.core.reports import write_plots, write_privacy_report
from fedlora.core.run_dir import RunDir
from fedlora.hub.sdk.publish import Following, RunPublisher, add_hub_options, fedlora_version, hub_target
from fedlora.privacy.engines import ENGINES
from fedlora.simulations.personal_eval import evaluate_personal, markdown
from fedlora.strategies.registry import STRATEGIES

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
_OPTION_KEYS: dict[str, str] = {
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
    "tasks": "tasks",
    "num_train": "num-train",
    "num_test": "num-test",
    "seed": "seed",
    "model": "model-dir",
    "data": "data-path",
    "min_replies": "min-replies",
    "round_timeout": "round-timeout",
    "state_dir": "state-dir",
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
    g.add_argument("--tasks", help="comma-separated embedded tasks making up the pool")
    g.add_argument("--num-train", type=int, help="mean training examples per client (default 1000)")
    g.add_argument("--num-test", type=int, help="test examples per client (default 100)")
    g.add_argument("--data", help="a JSONL file split by us, or a directory with one JSONL file per client")
    g.add_argument("--model", help="a local Hugging Face model directory (default: the embedded model)")
    g.add_argument("--seed", type=int, help="seeds the split, the adapters and local training (default 0)")
    g = p.add_argument_group("run")
    g.add_argument("--run-config", action="append", default=[], help="extra run-config 'key=value' pairs")
    g.add_argument("--config", type=Path, help="a TOML file of run-config keys (options override it)")
    g.add_argument("--timeout", type=float, default=3600.0, help="stop the whole run after this many seconds")
    g.add_argument("--verbose", action="store_true", help="stream Flower's log")
    g.add_argument("--cpus-per-client", type=int, default=1, help="CPUs Ray gives each virtual client (default 1)")
    g.add_argument(
        "--ray-address", help="run the virtual clients on an existing Ray cluster ('auto' or HOST:PORT), not locally"
    )
    g.add_argument("--quiet", action="store_true", help="no progress display; errors and a one-line result only")


def run_config_from(args: argparse.Namespace, base: Mapping[str, Any] = MAIN_JOB) -> dict[str, Any]:
    """The run config of a run: ``base``, then ``--config``, then options (last wins)."""
    from flwr.common.config import flatten_dict

    values = dict(base)
    if args.config is not None:
        if not args.config.is_file():
            raise FileNotFoundError(f"config file {args.config} does not exist")
        try:
            values |= flatten_dict(tomllib.loads(args.config.read_text()))
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{args.config}: not valid TOML ({e})") from None
    values |= parse_run_config_pairs(args.run_config)
    for option, key in _OPTION_KEYS.items():
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


def validate(run_config: Mapping[str, Any]) -> FederationConfig:
    """Everything that can be checked before any process starts: config, split, data files."""
    cfg = FederationConfig.from_run_config(run_config)
    if cfg.num_clients * cfg.fraction_train < 1 - 1e-9:
        raise ValueError(f"fraction-train {cfg.fraction_train} of {cfg.num_clients} clients samples nobody; raise it")
    build_partition(cfg)  # a split that leaves a client empty, or an unreadable file, fails here
    client_train_sizes(cfg)  # with a directory of files: every client's file is read and checked
    return cfg


# -------------------------------------------------------------------------------- progress


# -------------------------------------------------------------------------------- running


def simulate(
    run_config: Mapping[str, Any],
    *,
    console: Console,
    quiet: bool = False,
    verbose: bool = False,
    timeout: float = 3600.0,
    on_log_line: Callable[[str], None] | None = None,
    cpus_per_client: int = 1,
    ray_address: str | None = None,
) -> Any:
    """Validate, run on the simulation runtime, and return the runner's outcome."""
    cfg = validate(run_config)
    run = RunDir(Path(cfg.run_dir).resolve())
    overrides = {k: v for k, v in run_config.items() if DEFAULT_RUN_CONFIG.get(k) != v}
    overrides["run-dir"] = str(run.root)
    if cfg.state_dir:
        overrides["state-dir"] = str(Path(cfg.state_dir).resolve())
    if cfg.model_dir:
        overrides["model-dir"] = str(Path(cfg.model_dir).resolve())
    if cfg.data_path:
        overrides["data-path"] = str(Path(cfg.data_path).resolve())
    run.root.mkdir(parents=True, exist_ok=True)
    request = SimulationRequest(
        components=("fedlora.server.app:app", "fedlora.client.app:app"),
        app_name="fedlora",
        default_config=DEFAULT_RUN_CONFIG,
        overrides=overrides,
        num_supernodes=cfg.num_clients,
        client_num_cpus=cpus_per_client,
        ray_address=ray_address,
        timeout=timeout,
        workdir=run.sim_workdir,
        pythonpath=(Path(__file__).resolve().parent.parent,),
    )

    def log_line(line: str) -> None:
        if verbose:
            console.print(line, markup=False, highlight=False)
        if on_log_line is not None:
            on_log_line(line)

    start_round = run.last_round() if cfg.resume else 0
    if quiet:
        return run_simulation_app(request, log_line)
    with Progress(console, run.root, cfg.num_rounds, start_round):
        return run_simulation_app(request, log_line)


# -------------------------------------------------------------------------------- commands


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fl-sim",
        description="Federated LoRA fine-tuning with virtual clients on Flower's simulation runtime. "
        "With no options: the main job (DP FFA-LoRA, 8 non-IID clients holding 2 of 4 tasks each, 8 rounds, "
        "epsilon 8). "
        "Subcommands: 'fl-sim compare --help', 'fl-sim report DIR', 'fl-sim personal-eval DIR'.",
    )
    p.add_argument("--out", type=Path, help="run directory (default runs/sim)")
    p.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--force", action="store_true", help="delete an existing run directory first")
    p.add_argument("--print-run-config", action="store_true", help="print the run config as TOML and exit")
    p.add_argument("--list-strategies", action="store_true", help="list the registered strategies and exit")
    add_run_options(p)
    add_hub_options(p)
    return p


def _clear_keeping_ledgers(run: RunDir, console: Console) -> None:
    """``--force``: delete a run directory but its clients' privacy ledgers: epsilon belongs to the
    data, and a new run on the same data must compose with what was spent."""
    for child in run.root.iterdir():
        if child == run.client_state_root():
            console.print(f"kept {child} (lifetime privacy ledgers); delete it yourself to reset them")
        elif child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()


def cmd_run(argv: Sequence[str], console: Console) -> int:
    args = _run_parser().parse_args(argv)
    if args.list_strategies:
        console.print("\n".join(sorted(STRATEGIES)))
        return 0
    if args.resume is not None:
        options = [o for o in [*_OPTION_KEYS, "clients_per_round", "dp", "config", "out"] if o != "round_timeout"]
        given = [f"--{o.replace('_', '-')}" for o in options if getattr(args, o, None) is not None]
        given += ["--run-config"] * bool(args.run_config) + ["--force"] * args.force
        if given:
            raise ValueError(
                f"--resume continues a run with its stored configuration; drop {', '.join(given)} "
                "(only --round-timeout, --timeout, --quiet and --verbose apply to a resumed run)"
            )
        run_config = resume_config(args.resume.resolve())
        if args.round_timeout is not None:
            run_config["round-timeout"] = args.round_timeout
    else:
        run_config = run_config_from(args)
    if args.print_run_config:
        validate(run_config)
        console.print(run_config_toml(run_config), markup=False, highlight=False)
        return 0
    target = hub_target(args.hub, args.hub_token_file, args.hub_key, bool(args.hub_every_round))
    run_dir = Path(str(run_config["run-dir"]))
    if args.resume is None and RunDir(run_dir).holds_run():
        if not args.force:
            raise ValueError(
                f"{run_dir} already holds a run: resume it with --resume {run_dir}, "
                "pick another --out, or pass --force to delete it"
            )
        _clear_keeping_ledgers(RunDir(run_dir), console)
    if not args.quiet:
        console.print(f"fl-sim: {run_config.get('strategy', 'fedavg-lora')} -> {run_dir}")
    rounds = int(run_config.get("num-rounds", 0))
    publisher = None
    if target is not None:
        start = RunDir(run_dir.resolve()).last_round() if args.resume is not None else 0
        publisher = RunPublisher(target, run_dir.resolve(), f"fl-sim {fedlora_version()}", start)
    try:
        with Following(publisher, rounds) if publisher is not None else contextlib.nullcontext():
            outcome = simulate(
                run_config,
                console=console,
                quiet=args.quiet,
                verbose=args.verbose,
                timeout=args.timeout,
                cpus_per_client=args.cpus_per_client,
                ray_address=args.ray_address,
            )
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/yellow]; continue with: fl-sim --resume {run_dir}")
        return 130
    if not outcome.completed:
        console.print(f"[red]run {outcome.status}[/red]: {outcome.status_details}", markup=True)
        console.print(f"log: {outcome.log_path}; continue with: fl-sim --resume {run_dir}")
        return 1
    personal_evaluation(run_dir.resolve(), console)
    lines = summary(run_dir.resolve())
    if args.quiet:
        console.print(f"fl-sim: completed in {outcome.seconds:.0f} s -> {run_dir}", markup=False)
    else:
        console.print(f"[green]completed[/green] in {outcome.seconds:.0f} s")
        console.print("\n".join(lines), markup=False, highlight=False)
    return report_published(publisher, rounds, console)


def personal_evaluation(run_dir: Path, console: Console) -> None:
    """After a run that personalised: every personal adapter on every personalised client's test split, batched
    (a failure here is reported, never fails the finished run)."""
    if not RunDir(run_dir).personal_adapters():
        return
    try:
        evaluate_personal(run_dir)
    except Exception as err:  # the run is complete whatever happens here
        console.print(f"[yellow]personal adapters not evaluated[/yellow]: {err}")


def cmd_personal_eval(argv: Sequence[str], console: Console) -> int:
    p = argparse.ArgumentParser(
        prog="fl-sim personal-eval",
        description="Evaluate every personal adapter of a run (and its global adapter) on the test split of "
        "every virtual client that personalised, in one batched pass; writes report/personal.json and .md.",
    )
    p.add_argument("run_dir", type=Path)
    p.add_argument("--batch-size", type=int, default=64, help="sequences per batch, mixed over the adapters")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    report = evaluate_personal(args.run_dir, args.batch_size)
    console.print(markdown(report), markup=False, highlight=False)
    console.print(str(RunDir(args.run_dir).personal_eval_md), markup=False, highlight=False)
    return 0


def cmd_report(argv: Sequence[str], console: Console) -> int:
    p = argparse.ArgumentParser(prog="fl-sim report", description="Rewrite a run directory's reports and plots.")
    p.add_argument("run_dir", type=Path)
    args = p.parse_args(argv)
    run = RunDir(args.run_dir)
    if not run.metrics_path.is_file():
        raise FileNotFoundError(f"{run.root} is not a run directory: no {run.metrics_path.name}")
    privacy = write_privacy_report(run)
    paths = [privacy.json, privacy.markdown, privacy.html, *write_plots(run)]
    console.print("\n".join(str(p) for p in paths), markup=False)
    console.print("\n".join(summary(args.run_dir)), markup=False, highlight=False)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    console = Console(soft_wrap=True)
    commands: dict[str, Callable[[Sequence[str], Console], int]] = {
        "report": cmd_report,
        "personal-eval": cmd_personal_eval,
    }
    try:
        from fedlora.simulations.compare import cmd_compare

        commands["compare"] = cmd_compare
        if argv and argv[0] in commands:
            return commands[argv[0]](argv[1:], console)
        return cmd_run(argv, console)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        Console(stderr=True, soft_wrap=True).print(f"fl-sim: error: {err}", markup=False, highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
