"""`modeldiff` command line: one sub-command per stage of the data flow.

The sub-commands live in one module per group: `data` (harvest, train, analyze, match),
`evaluate` (evaluate), `interp` (explain, score), `verify` (steer, stitch, exclusivity,
steer-eval) and `tools` (export, dashboard, toy, demo); `planted` comes from
`engine.planted.cli`. The handlers call the stages of `engine.stages`, as the demo does.

Errors a user can cause (`engine.errors.UserError` and its subclasses) are printed as one
line starting with ``error:`` (no traceback) and exit with status 2; an interrupted run
exits with 130 and resumes when rerun.
"""

from __future__ import annotations

import argparse
import signal
import sys

from engine.cli import data, evaluate, interop, interp, tools, verify
from engine.cli.tools import dashboard_command, is_loopback
from engine.cli.types import Parser
from engine.errors import UserError

__all__ = ["USER_ERRORS", "build_parser", "dashboard_command", "is_loopback", "main"]

# What the CLI reports on one line: every project error a user can fix derives from
# UserError (engine.errors); a missing file from the standard library is one too.
USER_ERRORS: tuple[type[Exception], ...] = (UserError, FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="modeldiff",
        description="Cross-architecture model diffing with Dedicated Feature Crosscoders.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    from engine.organisms.cli import add_bench_parser as add_organism_bench
    from engine.organisms.cli import add_parser as add_organism
    from engine.organisms.cli import add_verify_parser as add_organism_verify
    from engine.planted.cli import add_parser as add_planted

    # In the order `modeldiff --help` lists them.
    for add in (
        data.add_harvest, data.add_train, data.add_analyze, data.add_match,
        evaluate.add_evaluate,
        interp.add_explain, interp.add_score,
        tools.add_export, tools.add_dashboard,
        interop.add_push, interop.add_import_paper, interop.add_export_paper,
        verify.add_steer, verify.add_stitch, verify.add_exclusivity, verify.add_effects,
        verify.add_steer_eval,
        add_planted, add_organism, add_organism_bench, add_organism_verify,
        tools.add_toy, tools.add_demo,
    ):  # fmt: skip
        add(sub)
    return parser


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `modeldiff` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Schedulers stop jobs with SIGTERM: treat it like Ctrl-C, which saves a checkpoint.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    if args.command == "toy":
        args.toy_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        status = args.func(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return status or 0
