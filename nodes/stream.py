"""The sampler's output: a streaming latent handle that may be consumed any number of times.

ComfyUI caches node outputs, so the handle the sampler returns is reused whenever its inputs
did not change (e.g. only the save node's file name did). Choice: **replay from an on-disk
latent cache**, filled by the first consumer while it streams. Why not recompute: recomputing
repeats every DiT call (minutes on a 14B model) for a change that touches nothing upstream;
the latents are small (16 x 3 x 48 x 88 float32 = 0.8 MB per 12-frame block at 704x384, about
100 MB per minute of video), while decoded frames would be 40x bigger. The cache lives in
ComfyUI's temp folder (emptied by ComfyUI at start-up) and is deleted with the handle.

A half-consumed handle never gives a truncated video: the cache is marked complete only after
the last block. A consumer that finds it incomplete (a previous run was interrupted or failed)
discards it and recomputes from the start; the run is deterministic (seeded noise and RoPE
draws), so the recomputed blocks equal the lost ones.

The handle does not run anything itself; the consumer (decode or save node) drives it, which is
where progress, preview and interrupt happen. Distributed execution plugs in as another
``BlockBackend`` (an object with ``blocks(...)``) in place of the local one.
"""
from __future__ import annotations

import shutil
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch

from . import runtime


class BlockBackend(Protocol):
    """Produces clean latent blocks in order (the local DiT, or a distributed pipeline)."""

    def blocks(self, cond, cfg, seed: int, num_clips: int, check_cancel: Callable[[], None],
               on_call: Callable[[int, int, int], None] | None = None) -> Iterator[Any]:
        """Yield ``liveavatar.sampler.BlockOutput`` for every block of ``num_clips`` clips; call
        ``on_call(clip, block, step)`` after each DiT call where the backend can see them."""


class LocalBackend:
    """The DiT in this process (``nodes.loaders.LiveAvatarModel``)."""

    def __init__(self, model):
        self.model = model

    def blocks(self, cond, cfg, seed, num_clips, check_cancel, on_call=None):
        from ..liveavatar.sampler import StreamingSampler

        if self.model.placed is not None:  # not registered with ComfyUI: ask it to make room instead
            runtime.free_vram(self.model.device_bytes(cond.width, cond.height, cfg))
        with self.model.session() as (dit, storage):
            with torch.inference_mode():
                sampler = StreamingSampler(dit, cfg, cond.text, cond.audio, cond.sink, seed,
                                           cache_storage=storage, check_cancel=check_cancel, on_call=on_call)
                yield from sampler.blocks(num_clips)


@dataclass
class Soundtrack:
    waveform: torch.Tensor  # [C, T]
    sample_rate: int


class LatentStream:
    """The streaming latent handle (``LIVEAVATAR_LATENTS``)."""

    def __init__(self, backend: BlockBackend, cond, cfg, seed: int, num_clips: int, soundtrack: Soundtrack,
                 cache_root: Path | None = None):
        from ..liveavatar.pipeline import video_frame_count

        self.backend, self.cond, self.cfg, self.seed = backend, cond, cfg, seed
        self.num_clips = num_clips
        self.blocks_total = num_clips * cfg.blocks_per_clip
        self.calls_total = self.blocks_total * cfg.steps  # DiT calls: the unit of progress
        self.total_frames = video_frame_count(num_clips, cfg)
        self.soundtrack = soundtrack
        self.height, self.width = cond.height, cond.width
        root = cache_root if cache_root is not None else runtime.temp_dir() / "liveavatar"
        self.cache_dir = Path(root) / f"latents-{uuid.uuid4().hex}"
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.cache_dir), True)
        self.runs = 0  # times the backend was driven (tests and logs)

    # ------------------------------------------------------------------ cache
    @property
    def complete(self) -> bool:
        return (self.cache_dir / "complete").is_file()

    def _block_file(self, i: int) -> Path:
        return self.cache_dir / f"block_{i:06d}.pt"

    def _replay(self, progress: Callable[[int], None]) -> Iterator[Any]:
        from ..liveavatar.sampler import BlockOutput

        for i in range(self.blocks_total):
            data = torch.load(self._block_file(i), map_location="cpu", weights_only=True)
            progress((i + 1) * self.cfg.steps)
            yield BlockOutput(int(data["clip"]), int(data["block"]), data["latents"])

    def _generate(self, check_cancel, progress: Callable[[int], None]) -> Iterator[Any]:
        shutil.rmtree(self.cache_dir, ignore_errors=True)  # an incomplete cache is never reused
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.runs += 1
        count = 0
        steps, per_clip = self.cfg.steps, self.cfg.blocks_per_clip

        def on_call(clip: int, block: int, step: int) -> None:
            progress((clip * per_clip + block) * steps + step + 1)

        blocks = self.backend.blocks(self.cond, self.cfg, self.seed, self.num_clips, check_cancel, on_call)
        try:
            for i, block in enumerate(blocks):
                latents = block.latents.detach().float().cpu().contiguous()
                torch.save({"clip": block.clip, "block": block.block, "latents": latents}, self._block_file(i))
                count += 1
                progress((i + 1) * steps)  # backends that report only whole blocks (the distributed pool)
                yield type(block)(block.clip, block.block, latents)
        finally:
            # Stop the backend now, also when ComfyUI's progress hook raised the interrupt here: the traceback
            # keeps this frame alive, and the sampler (its caches, the workers' job) must not wait for it.
            blocks.close()
        if count != self.blocks_total:
            raise RuntimeError(f"the sampler produced {count} blocks, {self.blocks_total} expected")
        (self.cache_dir / "complete").write_text(str(count))

    def blocks(self, check_cancel: Callable[[], None] = runtime.check_interrupt,
               progress: Callable[[int], None] | None = None) -> Iterator[Any]:
        """Every clean latent block in order: replayed from disk when a previous run completed.

        ``progress(n)`` is told the DiT calls done so far (of ``calls_total``) after every DiT call,
        and after every block (replay, or a backend that reports only blocks); n may repeat.
        """
        progress = progress or (lambda n: None)
        if self.complete:
            yield from self._replay(progress)
        else:
            yield from self._generate(check_cancel, progress)

    # ------------------------------------------------------------------ frames
    def frames(self, vae, check_cancel: Callable[[], None] = runtime.check_interrupt,
               progress: Callable[[int], None] | None = None):
        """A ``liveavatar.pipeline.VideoStream`` of uint8 frame chunks, decoded block by block."""
        from ..liveavatar.pipeline import VideoStream

        def source(num_clips):
            for block in self.blocks(check_cancel, progress):
                check_cancel()
                yield block

        return VideoStream(None, vae, self.cond, self.cfg, self.seed, num_clips=self.num_clips, block_source=source)

    def describe(self) -> str:
        seconds = self.total_frames / self.cfg.fps
        return (f"{self.width}x{self.height}, {self.num_clips} clips, {self.total_frames} frames ({seconds:.1f} s), "
                f"{self.cfg.steps} steps, seed {self.seed}")
