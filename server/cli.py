"""``fl-server``: the server role.

``init DIR`` creates a server directory (CA, server certificate, settings), ``enroll`` admits
a client's key, ``revoke`` removes it, ``start DIR`` runs one federation on real SuperNodes
(TLS and node authentication on), ``report RUN_DIR`` writes the privacy report of a run.

Subcommands are verbs of the role; each registers its parser in :func:`build_parser` and its
handler through ``set_defaults(handler=...)``, so adding ``init``, ``start`` or ``enroll`` touches
no existing branch. Heavy imports happen inside handlers: ``fl-server --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from fedlora.core.flower_runner import FlowerRunError, parse_run_config_pairs, unregister_node
from fedlora.core.pki import CertificateError
from fedlora.core.run_dir import RunDir
from fedlora.hub.sdk.publish import Following, RunPublisher, add_hub_options, fedlora_version, hub_target
from fedlora.server.deploy import INSECURE_WARNING, StartOptions, plan_start, run_plan
from fedlora.server.server_dir import ServerDir


def _report(args: argparse.Namespace, console: Console) -> int:
    """Write report/privacy.{json,md,html} for a run directory and print the headline and paths."""
    from fedlora.core.reports import write_privacy_report  # lazy: Opacus, matplotlib; fl-server --help stays fast
    from fedlora.privacy.ledger import LedgerError  # lazy: Opacus
    from fedlora.privacy.report import ReportError, headline  # lazy: Opacus, matplotlib

    try:
        paths = write_privacy_report(args.run_dir)
    except (ReportError, LedgerError) as error:
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {error}", markup=True, highlight=False)
        return 1
    report = json.loads(paths.json.read_text(encoding="utf-8"))  # what was written, not a second computation
    console.print(headline(report), markup=False, highlight=False)
    for path in (paths.json, paths.markdown, paths.html):
        console.print(f"  {path}", markup=False, highlight=False)
    return 0


def _error(message: object) -> int:
    Console(stderr=True, soft_wrap=True).print(f"fl-server: error: {message}", markup=False, highlight=False)
    return 2


def _run_overrides(pairs: Sequence[str] | None) -> dict[str, Any]:
    """``--run-config 'k=v k2=v2'`` through Flower's own parser (strings quoted)."""
    return parse_run_config_pairs(pairs)


def _init(args: argparse.Namespace, console: Console) -> int:
    """Create the server directory and say what each client needs."""

    try:
        sd = ServerDir.init(
            args.server_dir,
            args.host,
            port=args.port,
            host=args.bind,
            run_overrides=_run_overrides(args.run_config),
            days=args.days,
            force=args.force,
        )
    except (ValueError, FileExistsError, KeyError) as err:
        return _error(err)
    settings = sd.settings()
    console.print(f"server directory {sd.root}", markup=False, highlight=False)
    console.print(
        f"  certificate for {', '.join(settings.superlink.names)} (+ loopback), "
        f"SuperLink on {settings.superlink.host}:{settings.superlink.port}",
        markup=False,
        highlight=False,
    )
    console.print(f"  give every client {sd.ca_cert_path}; keep {sd.ca_key_path} private", markup=False)
    console.print(f"  run settings: {sd.settings_path}", markup=False, highlight=False)
    console.print(
        "next: each client runs `fl-client keygen --out KEYDIR`; you enroll its client.pub with "
        f"`fl-server enroll {sd.root} client.pub --name NAME`, then `fl-server start {sd.root}`",
        markup=False,
        highlight=False,
    )
    return 0


def _enroll(args: argparse.Namespace, console: Console) -> int:
    try:
        sd = ServerDir(args.server_dir)
        if not sd.settings_path.is_file():
            raise FileNotFoundError(f"{sd.root} is not a fedlora server directory: run fl-server init DIR first")
        enrollment = sd.enroll(args.public_key, args.name)
    except (ValueError, FileNotFoundError) as err:
        return _error(err)
    console.print(f"enrolled {enrollment.name}: {enrollment.fingerprint}", markup=False, highlight=False)
    console.print("it can join from the next `fl-server start`", markup=False, highlight=False)
    return 0


def _revoke(args: argparse.Namespace, console: Console) -> int:
    """Remove the key from the server directory and, if a run is in progress, from its SuperLink."""
    sd = ServerDir(args.server_dir)
    try:
        enrollment = sd.revoke(args.name)
    except (ValueError, FileNotFoundError) as err:
        return _error(err)
    say = functools.partial(console.print, markup=False, highlight=False)
    say(f"revoked {enrollment.name} ({enrollment.fingerprint}): refused from the next `fl-server start`")
    run_dir = sd.running_run_dir()
    if run_dir is None:
        say("no run in progress")
        return 0
    try:
        node = unregister_node(RunDir(run_dir).deploy_workdir, enrollment.name)
    except FlowerRunError as err:
        return _error(f"the run in progress ({run_dir}) still admits {enrollment.name}: {err}")
    if node is None:
        say(f"the run in progress ({run_dir}) never registered {enrollment.name}")
    else:
        say(f"dropped from the run in progress ({run_dir}): node {node} is disconnected and refused from now on")
    return 0


def _start(args: argparse.Namespace, console: Console) -> int:
    """Validate everything, then run the federation until it ends or Ctrl-C."""
    # lazy: pulls in flwr, which this module does not need at import
    from fedlora.core.cli import never_accepted, report_published, summary

    try:
        options = StartOptions(
            server_dir=args.server_dir,
            run_dir=args.run_dir,
            resume=args.resume,
            insecure=args.insecure,
            expose_control=True if args.expose_control else None,
            run_overrides=_run_overrides(args.run_config),
            timeout=args.timeout,
        )
        plan = plan_start(options)
        target = hub_target(args.hub, args.hub_token_file, args.hub_key, bool(args.hub_every_round), args.hub_ca)
    except (ValueError, FileNotFoundError, KeyError, CertificateError) as err:
        return _error(err.args[0] if isinstance(err, KeyError) and err.args else err)
    if args.insecure:
        Console(stderr=True, soft_wrap=True).print(INSECURE_WARNING, markup=False, highlight=False)
    who = ", ".join(plan.nodes) if plan.nodes else "any node (insecure)"
    console.print(f"run directory {plan.run_dir}; enrolled clients: {who}", markup=False, highlight=False)
    publisher = None
    if target is not None:
        publisher = RunPublisher(target, plan.run_dir, f"fl-server {fedlora_version()}", plan.start_round)
    try:
        following = Following(publisher, plan.num_rounds) if publisher is not None else contextlib.nullcontext()
        with ServerDir(args.server_dir).running(plan.run_dir), following:
            outcome = run_plan(plan, console, quiet=args.quiet, verbose=args.verbose, timeout=args.timeout)
    except KeyboardInterrupt:
        console.print(
            f"stopped; the SuperLink and its processes are down. Resume: fl-server start {args.server_dir} "
            f"--resume {plan.run_dir}",
            markup=False,
            highlight=False,
        )
        return 130
    except (FlowerRunError, ValueError) as err:
        return _error(err)
    if not outcome.completed:
        detail = outcome.status_details if outcome.status_details not in ("", "N/A") else outcome.log_path
        return _error(f"run ended {outcome.status}: {detail}")
    nothing = never_accepted(plan.run_dir)
    if nothing is not None:
        return _error(f"run failed: {nothing}")
    for line in summary(plan.run_dir):
        console.print(line, markup=False, highlight=False)
    return report_published(publisher, plan.num_rounds, console)


def build_parser() -> argparse.ArgumentParser:
    """The ``fl-server`` parser with one subparser per verb."""

    parser = argparse.ArgumentParser(prog="fl-server", description="fedlora server")
    sub = parser.add_subparsers(dest="command", required=True)
    report = sub.add_parser(
        "report",
        help="write the privacy report (JSON, Markdown, self-contained HTML) of a run directory",
        description="Recompute every client's epsilon from its ledger and write RUN_DIR/report/privacy.{json,md,html}.",
    )
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run directory (holds config.json)")
    report.set_defaults(handler=_report)

    init = sub.add_parser(
        "init",
        help="create a server directory: CA, server certificate, settings (server.toml)",
        description="Create SERVER_DIR with a CA, a server certificate whose names are the --host values "
        "(plus loopback), and server.toml holding the SuperLink settings and the run configuration.",
    )
    init.add_argument("server_dir", type=Path, metavar="SERVER_DIR")
    init.add_argument(
        "--host",
        action="append",
        required=True,
        metavar="NAME_OR_IP",
        help="a name or address clients dial (repeat for several); it goes into the certificate",
    )
    init.add_argument("--port", type=int, default=9092, help="SuperLink port (default 9092)")
    init.add_argument(
        "--bind",
        default="0.0.0.0",
        help="address the SuperLink listens on: 0.0.0.0 (default) or a loopback address; IPv4, since "
        "fl-server start reaches its control API at 127.0.0.1",
    )
    init.add_argument(
        "--run-config",
        action="append",
        metavar="'k=v ...'",
        help="run settings for server.toml, e.g. 'num-rounds=5 strategy=\"ffa-lora\"'",
    )
    init.add_argument("--days", type=int, default=825, help="server certificate validity (default 825 days)")
    init.add_argument("--force", action="store_true", help="replace an existing CA (every client needs the new ca.pem)")
    init.set_defaults(handler=_init)

    enroll = sub.add_parser("enroll", help="admit a client's public key (SuperNode authentication)")
    enroll.add_argument("server_dir", type=Path, metavar="SERVER_DIR")
    enroll.add_argument("public_key", type=Path, metavar="PUBKEY", help="the client's client.pub (fl-client keygen)")
    enroll.add_argument("--name", required=True, help="the client's name (letters, digits, '.', '_', '-')")
    enroll.set_defaults(handler=_enroll)

    revoke = sub.add_parser("revoke", help="remove an enrolled client; it is refused from the next start")
    revoke.add_argument("server_dir", type=Path, metavar="SERVER_DIR")
    revoke.add_argument("name")
    revoke.set_defaults(handler=_revoke)

    start = sub.add_parser(
        "start",
        help="run one federation: SuperLink (TLS + node auth), the run, progress, the run directory",
        description="Start a SuperLink from SERVER_DIR with TLS and SuperNode authentication, register the enrolled "
        "clients, submit the run, show per-round progress and write the run directory; Ctrl-C stops everything.",
    )
    start.add_argument("server_dir", type=Path, metavar="SERVER_DIR")
    start.add_argument("--run-dir", type=Path, help="where the run goes (default SERVER_DIR/runs/<time>)")
    start.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run from its checkpoint")
    start.add_argument("--run-config", action="append", metavar="'k=v ...'", help="override server.toml's [run]")
    start.add_argument(
        "--insecure", action="store_true", help="plain HTTP, no TLS, no node authentication (tests only; warns)"
    )
    start.add_argument(
        "--expose-control",
        action="store_true",
        help="let other machines reach the control and runtime APIs (default: loopback only)",
    )
    start.add_argument("--timeout", type=float, default=7 * 24 * 3600.0, help="stop the run after this many seconds")
    start.add_argument("--quiet", action="store_true", help="no per-round progress")
    start.add_argument("--verbose", action="store_true", help="print the run's log")
    add_hub_options(start)
    start.set_defaults(handler=_start)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fl-server`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return int(args.handler(args, Console(soft_wrap=True)))


if __name__ == "__main__":
    sys.exit(main())
