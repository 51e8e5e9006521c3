"""A one-line progress display for long CLI work (blocks done, frames, frames per second)."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from ..liveavatar.pipeline import VideoStream, write_mp4
from ..liveavatar.video import partial_path_for
from .interrupts import Interrupted


class BlockProgress:
    """Rewrites one status line (``\\r``) per decoded block; :meth:`end_line` closes it early so
    that a message printed after an interrupt starts on a line of its own."""

    def __init__(self, total_blocks: int, total_frames: int, stream=None):
        self.total_blocks, self.total_frames = total_blocks, total_frames
        self.stream = stream or sys.stderr  # read at call time: sys.stderr may be replaced after import
        self.start = time.perf_counter()
        self.frames = 0
        self._line_open = False

    def __call__(self, chunk) -> None:
        self.frames += chunk.frames.shape[0]
        elapsed = time.perf_counter() - self.start
        fps = self.frames / elapsed if elapsed > 0 else 0.0
        last = chunk.blocks_done == self.total_blocks
        # Open before the write: a Ctrl+C delivered as flush() returns must still find the line open.
        self._line_open = True
        self.stream.write(
            f"\rclip {chunk.clip + 1} block {chunk.block + 1}: {chunk.blocks_done}/{self.total_blocks} blocks, "
            f"{self.frames}/{self.total_frames} frames, {fps:.2f} frames/s{chr(10) if last else ''}"
        )
        self.stream.flush()
        self._line_open = not last

    def end_line(self) -> None:
        if self._line_open:
            self.stream.write("\n")
            self.stream.flush()
            self._line_open = False


def write_with_progress(stream: VideoStream, out: Path, audio: Any, sample_rate: int | None = None,
                        overwrite: bool = False) -> Path:
    """``write_mp4`` with a progress line. Ctrl+C or SIGTERM -> :class:`Interrupted`, which names the
    partial file the writer finalised (with its sound) and the frames it holds."""
    progress = BlockProgress(stream.blocks_total, stream.total_frames)
    try:
        return write_mp4(stream, out, audio=audio, sample_rate=sample_rate, on_chunk=progress, overwrite=overwrite)
    except KeyboardInterrupt as err:
        progress.end_line()
        partial = partial_path_for(out)
        raise Interrupted(err, partial if partial.is_file() else None, progress.frames, stream.total_frames) from err
