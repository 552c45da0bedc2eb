"""The ``taskscope`` command (``python -m taskscope``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from taskscope import __version__
    from taskscope.demo.cli import add_arguments

    parser = argparse.ArgumentParser(
        prog="taskscope", description="Observable background tasks for Starlette and FastAPI."
    )
    parser.add_argument("--version", action="version", version=f"taskscope {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="run an instrumented FastAPI app under load and watch its background tasks live",
        description=(
            "Serve a small FastAPI app whose background tasks fail, queue for threads and "
            "block the event loop; drive it with a built-in load generator; show what "
            "taskscope measures, live, and a summary at the end. No infrastructure needed: "
            "metrics are served at /metrics."
        ),
    )
    add_arguments(demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.command == "demo":
        from taskscope.demo.cli import run

        try:
            return run(args)
        except BrokenPipeError:  # `taskscope demo | head`: stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
