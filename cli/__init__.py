"""Headless command line on the same engine as the nodes (``python -m liveavatar``)."""
from __future__ import annotations

import argparse
import os
import sys

from . import commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m liveavatar", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in commands.ALL:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (commands.UserError, ValueError, OSError) as err:
        # Bad input or a file problem: a message the user can act on, not a traceback
        # (set LIVEAVATAR_DEBUG=1 to see where it came from).
        if os.environ.get("LIVEAVATAR_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
