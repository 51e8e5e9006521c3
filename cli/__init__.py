"""Headless command line on the same engine as the nodes (``liveavatar`` once installed, or ``python -m liveavatar``)."""
from __future__ import annotations

import argparse
import os
import sys

from . import commands
from .interrupts import Interrupted, exit_status, signal_name, sigterm_as_interrupt


def build_parser() -> argparse.ArgumentParser:
    # ``liveavatar`` when run as the installed console command, else ``python -m liveavatar``
    prog = "liveavatar" if os.path.basename(sys.argv[0]) == "liveavatar" else "python -m liveavatar"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in commands.ALL:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with sigterm_as_interrupt():  # SIGTERM ends a run like Ctrl+C: partial kept, with sound
            return int(args.run(args) or 0)
    except KeyboardInterrupt as err:
        # On a line of its own (the progress line is closed first), naming the partial video if any.
        print(str(err) if isinstance(err, Interrupted) else f"interrupted by {signal_name(err)}", file=sys.stderr)
        return exit_status(err)
    except (commands.UserError, ValueError, OSError) as err:
        # Bad input or a file problem: a message the user can act on, not a traceback
        # (set LIVEAVATAR_DEBUG=1 to see where it came from).
        if os.environ.get("LIVEAVATAR_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
