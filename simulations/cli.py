"""``fl-sim``: federated LoRA with many virtual clients on Flower's simulation runtime.

It runs the same server and client apps as a deployment (``fedlora.server.app:app``,
``fedlora.client.app:app``) through a real SuperLink on 127.0.0.1 and Flower's Ray backend, one
virtual client per partition. Every option is a key of the apps' run config, so a run is
reproducible with ``flwr run --run-config`` too (``--print-run-config`` shows it).

    fl-sim                       the main job: federated DP LoRA over non-IID clients
    fl-sim --resume DIR          continue an interrupted run from its last checkpoint
    fl-sim compare ...           strategies x seeds (+ centralised baseline) on one split
    fl-sim reproduce CELL        a seed paper's setting in miniature, its claims checked (--list)
    fl-sim report DIR            rewrite a run's plots, client table and privacy report
    fl-sim personal-eval DIR     personal adapters x personalised clients' test splits, batched
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console

from fedlora.core.flower_runner import run_config_toml
from fedlora.core.run_dir import RunDir
from fedlora.hub.sdk.publish import Following, RunPublisher, add_hub_options, fedlora_version, hub_target
from fedlora.simulations.options import OPTION_KEYS, add_run_options, run_config_from

# -------------------------------------------------------------------------------- commands


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fl-sim",
        description="Federated LoRA fine-tuning with virtual clients on Flower's simulation runtime. "
        "With no options: the main job (DP FFA-LoRA, 8 non-IID clients holding 2 of 4 tasks each, 8 rounds, "
        "epsilon 8). "
        "Subcommands: 'fl-sim compare --help', 'fl-sim reproduce --list', 'fl-sim report DIR', "
        "'fl-sim personal-eval DIR'.",
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
    # lazy: torch, PEFT and Flower load once a run is asked for; fl-sim --help and option errors answer at once
    from fedlora.core.cli import never_accepted, report_published, resume_config, summary
    from fedlora.simulations.simulate import simulate, validate
    from fedlora.strategies.registry import STRATEGIES

    if args.list_strategies:
        console.print("\n".join(sorted(STRATEGIES)))
        return 0
    if args.resume is not None:
        options = [o for o in [*OPTION_KEYS, "clients_per_round", "dp", "config", "out"] if o != "round_timeout"]
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
    target = hub_target(args.hub, args.hub_token_file, args.hub_key, bool(args.hub_every_round), args.hub_ca)
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
                gpus_per_client=args.gpus_per_client,
                ray_address=args.ray_address,
                ray_cpus=args.ray_cpus,
            )
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/yellow]; continue with: fl-sim --resume {run_dir}")
        return 130
    if not outcome.completed:
        console.print(f"[red]run {outcome.status}[/red]: {outcome.status_details}", markup=True)
        console.print(f"log: {outcome.log_path}; continue with: fl-sim --resume {run_dir}")
        return 1
    nothing = never_accepted(run_dir.resolve())
    if nothing is not None:
        console.print(f"[red]run failed[/red]: {nothing}", markup=True, highlight=False)
        console.print(f"log: {outcome.log_path}; per-round reasons: {RunDir(run_dir).metrics_path}")
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
    from fedlora.simulations.personal_eval import evaluate_personal  # lazy: torch, PEFT

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
    from fedlora.simulations.personal_eval import evaluate_personal, markdown  # lazy: torch, PEFT

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
    # lazy: matplotlib, torch (the run configuration) only when reports are written
    from fedlora.core.cli import summary
    from fedlora.core.reports import write_plots, write_privacy_report

    privacy = write_privacy_report(run)
    paths = [privacy.json, privacy.markdown, privacy.html, *write_plots(run)]
    console.print("\n".join(str(p) for p in paths), markup=False)
    console.print("\n".join(summary(args.run_dir)), markup=False, highlight=False)
    return 0


def cmd_compare(argv: Sequence[str], console: Console) -> int:
    """``fl-sim compare``: see :mod:`fedlora.simulations.compare`."""
    from fedlora.simulations import compare  # lazy: torch, PEFT and Flower (the centralised baseline trains)

    return compare.cmd_compare(argv, console)


def cmd_reproduce(argv: Sequence[str], console: Console) -> int:
    """``fl-sim reproduce``: see :mod:`fedlora.simulations.reproduce`."""
    from fedlora.simulations import reproduce  # lazy: torch, PEFT and Flower (the cells train)

    return reproduce.cmd_reproduce(argv, console)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    console = Console(soft_wrap=True)
    commands: dict[str, Callable[[Sequence[str], Console], int]] = {
        "report": cmd_report,
        "personal-eval": cmd_personal_eval,
        "compare": cmd_compare,
        "reproduce": cmd_reproduce,
    }
    try:
        if argv and argv[0] in commands:
            return commands[argv[0]](argv[1:], console)
        return cmd_run(argv, console)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        Console(stderr=True, soft_wrap=True).print(f"fl-sim: error: {err}", markup=False, highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
