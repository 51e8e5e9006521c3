"""Headless command line on the same engine as the nodes (``python -m liveavatar``)."""
from __future__ import annotations

import argparse
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
    except commands.UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
