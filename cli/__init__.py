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
    except Exception as err:
        # Bad input, a file problem or a worker's failure: a message the user can act on, not a
        # traceback (LIVEAVATAR_DEBUG=1 shows where it came from). Anything else propagates to the
        # caller (tests and scripts calling main() see it); run() makes it one line for a user.
        if os.environ.get("LIVEAVATAR_DEBUG") or not _expected(err):
            raise
        return _print_error(err)


def run(argv: list[str] | None = None) -> int:
    """The process entry (``python -m liveavatar``, the ``liveavatar`` command): ``main`` plus one
    ``error:`` line, without a traceback, for the unexpected (a bug, a torch RuntimeError,
    MemoryError); ``LIVEAVATAR_DEBUG=1`` shows the traceback instead."""
    try:
        return main(argv)
    except Exception as err:  # noqa: BLE001 - the last resort before the user's terminal
        if os.environ.get("LIVEAVATAR_DEBUG"):
            raise
        return _print_error(err)


def _print_error(err: BaseException) -> int:
    message, status = describe_error(err)
    print(f"error: {message}", file=sys.stderr)
    return status


def _worker_error_class():
    try:
        from ..distributed.launcher import WorkerError
    except ImportError:  # the error path must not fail on an optional part
        return None
    return WorkerError


def _expected(err: BaseException) -> bool:
    worker_error = _worker_error_class()
    return isinstance(err, (commands.UserError, ValueError, OSError)) or bool(worker_error and isinstance(err, worker_error))


DEBUG_HINT = "set LIVEAVATAR_DEBUG=1 for the traceback"


def describe_error(err: BaseException) -> tuple[str, int]:
    """(what to print after ``error: ``, exit status) for an exception that ends a command.

    Bad input or a file problem (``UserError``, ``ValueError``, ``OSError``) is a message the user
    can act on, printed whole (a preflight lists one problem a line), status 2. A worker failure
    is its first line plus the worker's own exception line: the remote traceback and the torchrun
    log tail it carries are printed only with ``LIVEAVATAR_DEBUG=1``. Anything else is a bug or
    a resource limit: its type and first line, and how to see the traceback; status 1.
    """
    worker_error = _worker_error_class()
    if worker_error and isinstance(err, worker_error):
        first = str(err).splitlines()[0] if str(err).strip() else type(err).__name__
        tail = [line.strip() for line in (err.traceback_tail or "").splitlines() if line.strip()]
        reason = f": {tail[-1]}" if tail and tail[-1] not in first else ""
        return f"{first}{reason} ({DEBUG_HINT} and the worker's)", 1
    if isinstance(err, (commands.UserError, ValueError, OSError)):
        return str(err) or type(err).__name__, 2
    if isinstance(err, MemoryError):
        return f"out of host memory: MemoryError ({DEBUG_HINT})", 1
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else 'no message'} ({DEBUG_HINT})", 1
