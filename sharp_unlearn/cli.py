"""The ``sharp-unlearn`` command line: parse, validate, call the library.

Exit codes: 0 ok, 2 bad input (one line on stderr, no traceback unless
``--debug``), 1 failure. Each sub-command lives in ``sharp_unlearn/commands``.
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback

from sharp_unlearn import __version__
from sharp_unlearn.commands import COMMANDS
from sharp_unlearn.errors import ConfigError, MissingExtra, TrainingDiverged, termination_requested


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sharp-unlearn", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"sharp-unlearn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        command = COMMANDS.get(name)()
        p = sub.add_parser(name, help=command.help, description=command.help)
        p.add_argument("--quiet", action="store_true", help="no progress bars; only the final table")
        p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        command.add_arguments(p)
        p.set_defaults(_command=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse drops `key=value` overrides placed after options that follow another positional
    # (`evaluate CKPT --metrics mia forget.size=100`); they are still overrides
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        result = args._command.run(args)
    except (ConfigError, MissingExtra) as exc:
        if args.debug:
            traceback.print_exc()
        print(f"sharp-unlearn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        if args.debug:
            traceback.print_exc()
        print(f"sharp-unlearn {args.command}: diverged: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sharp-unlearn {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a failure, not bad input
        if args.debug:
            traceback.print_exc()
        if termination_requested():  # raised while unwinding from SIGTERM / Ctrl-C: still an interruption
            print(f"sharp-unlearn {args.command}: interrupted ({type(exc).__name__} while stopping)",
                  file=sys.stderr)
            return 130
        print(f"sharp-unlearn {args.command}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json and result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
