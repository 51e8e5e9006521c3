"""A one-line progress display for long CLI work (blocks done, frames, frames per second)."""
from __future__ import annotations

import sys
import time


class BlockProgress:
    def __init__(self, total_blocks: int, total_frames: int, stream=sys.stderr):
        self.total_blocks, self.total_frames = total_blocks, total_frames
        self.stream = stream
        self.start = time.perf_counter()
        self.frames = 0

    def __call__(self, chunk) -> None:
        self.frames += chunk.frames.shape[0]
        elapsed = time.perf_counter() - self.start
        fps = self.frames / elapsed if elapsed > 0 else 0.0
        end = "\n" if chunk.blocks_done == self.total_blocks else ""
        self.stream.write(
            f"\rclip {chunk.clip + 1} block {chunk.block + 1}: {chunk.blocks_done}/{self.total_blocks} blocks, "
            f"{self.frames}/{self.total_frames} frames, {fps:.2f} frames/s{end}"
        )
        self.stream.flush()
