"""Ctrl+C and SIGTERM end a CLI run the same way: the partial video is finalised with its sound
and named on a line of its own.

Python turns SIGINT into ``KeyboardInterrupt`` but lets SIGTERM (``kill``, a job scheduler, a
container stop) kill the process on the spot, so the writer never finalises the partial file and
its sound is lost. :func:`sigterm_as_interrupt` makes SIGTERM raise :class:`Terminated`, a
``KeyboardInterrupt``, so every clean-up path written for Ctrl+C runs for it too.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl+C raises ``KeyboardInterrupt``."""


class Interrupted(KeyboardInterrupt):
    """An interrupted video write: what was kept and where."""

    def __init__(self, cause: BaseException, partial: Path | None, frames: int, total_frames: int):
        super().__init__()
        self.cause, self.partial, self.frames, self.total_frames = cause, partial, frames, total_frames

    @property
    def signal_name(self) -> str:
        return signal_name(self.cause)

    def __str__(self) -> str:
        done = f"interrupted by {self.signal_name} after {self.frames} of {self.total_frames} frames"
        if self.partial is None:
            return f"{done}; no frame was written, so no video was kept"
        return f"{done}; the partial video (with sound) is {self.partial}"


def signal_name(err: BaseException) -> str:
    cause = getattr(err, "cause", err)
    return "SIGTERM" if isinstance(cause, Terminated) else "SIGINT"


def exit_status(err: BaseException) -> int:
    """128 + the signal number, as a shell reports a process ended by it."""
    return 128 + (signal.SIGTERM if signal_name(err) == "SIGTERM" else signal.SIGINT)


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` in the main thread (elsewhere: no change)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


__all__ = ["Interrupted", "Terminated", "exit_status", "signal_name", "sigterm_as_interrupt"]
