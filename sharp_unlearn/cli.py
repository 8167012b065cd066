"""The ``sharp-unlearn`` command line: parse, validate, call the library.

Exit codes: 0 ok, 2 bad input (one line on stderr, no traceback unless
``--debug``), 1 failure. Each sub-command lives in ``sharp_unlearn/commands``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import traceback

from sharp_unlearn import __version__
from sharp_unlearn.commands import COMMANDS
from sharp_unlearn.commands.examples import epilog
from sharp_unlearn.errors import (
    ConfigError,
    MissingExtra,
    TrainingDiverged,
    note_only,
    termination_requested,
    watch_termination,
)

DESCRIPTION = ("sharpness-aware machine unlearning: pretrain with SGD/SAM, unlearn a forget set, "
               "evaluate, sweep and compare the runs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sharp-unlearn", description=DESCRIPTION,
                                     epilog="run 'sharp-unlearn COMMAND --help' for a command's options and examples")
    parser.add_argument("--version", action="version", version=f"sharp-unlearn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        command = COMMANDS.get(name)()
        # RawDescription keeps the examples' line breaks
        p = sub.add_parser(name, help=command.help, description=command.help, epilog=epilog(name),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--quiet", action="store_true", help="no progress bars; only the final table")
        p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        command.add_arguments(p)
        p.set_defaults(_command=command)
    return parser


def _interrupted(args) -> int:
    """Exit 130 after SIGTERM / Ctrl-C, whatever the unwinding raised (a cancelled Ray task, Ray's
    own ``sys.exit``); the traceback only with ``--debug``. A Ray session still open is shut down
    first, so what Ray prints while its workers die comes before the final "interrupted" line."""
    if args.debug:
        traceback.print_exc()
    # one interruption is enough: a repeated signal while stopping must not abort the line below
    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGTERM, note_only)
        signal.signal(signal.SIGINT, note_only)
    ray = sys.modules.get("ray")
    if ray is not None:
        try:
            if ray.is_initialized():
                ray.shutdown()
        except BaseException:  # noqa: BLE001 - a second signal while stopping: still an interruption
            pass
    sys.stdout.flush()
    print(f"sharp-unlearn {args.command}: interrupted", file=sys.stderr, flush=True)
    return 130


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse drops `key=value` overrides placed after options that follow another positional
    # (`evaluate CKPT --metrics mia forget.size=100`); they are still overrides
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # SIGTERM unwinds like Ctrl-C from here on, and either signal is noted whatever handler a
    # library (Ray) installs meanwhile: any error after it is part of the interruption
    with watch_termination():
        try:
            result = args._command.run(args)
        except BaseException as exc:  # noqa: BLE001 - SystemExit too: Ray's SIGTERM handler calls sys.exit
            if isinstance(exc, KeyboardInterrupt) or termination_requested():
                return _interrupted(args)
            if isinstance(exc, SystemExit):
                raise
            if args.debug:
                traceback.print_exc()
            if isinstance(exc, (ConfigError, MissingExtra)):
                print(f"sharp-unlearn {args.command}: error: {exc}", file=sys.stderr)
                return 2
            if isinstance(exc, TrainingDiverged):
                print(f"sharp-unlearn {args.command}: diverged: {exc}", file=sys.stderr)
                return 1
            # a failure, not bad input
            print(f"sharp-unlearn {args.command}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    if args.json and result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
