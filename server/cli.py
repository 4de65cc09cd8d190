"""``fl-server``: the server role. ``report RUN_DIR`` writes the privacy report of a finished run.

Subcommands are verbs of the role; each registers its parser in :func:`build_parser` and its
handler through ``set_defaults(handler=...)``, so adding ``init``, ``start`` or ``enroll`` touches
no existing branch. Heavy imports happen inside handlers: ``fl-server --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console


def _report(args: argparse.Namespace, console: Console) -> int:
    """Write report/privacy.{json,md,html} for a run directory and print the headline and paths."""
    from privacy.ledger import LedgerError
    from privacy.report import ReportError, headline, write_privacy_report

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fl-server`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return int(args.handler(args, Console(soft_wrap=True)))


if __name__ == "__main__":
    sys.exit(main())
