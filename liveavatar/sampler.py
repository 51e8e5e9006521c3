"""The streaming few-step sampler: clips of blocks, one KV cache per denoising step.

For every block of 3 latent frames, step i runs the DiT once against cache i (which has
seen only step-i keys) and takes one flow-matching Euler step. Blocks are yielded as
soon as they are clean, so decode, progress, cancellation and other processes can hook
in between. ``StepWorker`` is the unit of work a pipeline rank runs; ``StreamingSampler``
chains all steps in one process.

Determinism contract: clip r's noise is ``randn(C, T, h, w)`` from a CPU generator seeded
``seed + r``; the sink's RoPE offset rd of (clip, block, step) is a pure function of
(seed, clip, block, step), never of the process that runs the step. Both are injectable.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

import torch

from .config import SamplerConfig
from .kv_cache import CacheStorage, CondCache, KVCache
from .transformer import LiveAvatarTransformer, TextContext


class Cancelled(Exception):
    """Raised by a cancel check to stop sampling between two DiT calls."""


@dataclass
class SinkInputs:
    """What the sink prefill sees: reference latent [C, 1, h, w] and motion latents [C, T, h, w]."""

    ref_latent: torch.Tensor
    motion_latents: torch.Tensor


class AudioSource(Protocol):
    def frames(self, start: int, stop: int) -> torch.Tensor:
        """Features [1, layers, D, stop - start] of video frames [start, stop); zeros past the end."""


class TensorAudio:
    """An AudioSource over features already in memory, [1, layers, D, T]."""

    def __init__(self, features: torch.Tensor):
        self.features = features

    @property
    def num_frames(self) -> int:
        return self.features.shape[-1]

    def frames(self, start: int, stop: int) -> torch.Tensor:
        out = self.features.new_zeros(*self.features.shape[:-1], stop - start)
        end = min(stop, self.num_frames)
        if end > start:
            out[..., : end - start] = self.features[..., start:end]
        return out


class RopeOffsets(Protocol):
    def __call__(self, clip: int, block: int, step: int) -> int: ...


@dataclass(frozen=True)
class SeededRopeOffsets:
    """rd drawn uniformly from [low, high] by a generator seeded from (seed, clip, block, step)."""

    seed: int
    low: int
    high: int

    def __call__(self, clip: int, block: int, step: int) -> int:
        return random.Random(f"liveavatar-rd/{self.seed}/{clip}/{block}/{step}").randint(self.low, self.high)


@dataclass(frozen=True)
class TableRopeOffsets:
    """Injected offsets, indexed [clip][block][step] (e.g. recorded from another run)."""

    table: Sequence[Sequence[Sequence[int]]]

    @classmethod
    def from_stream(cls, flat: Sequence[int], blocks_per_clip: int, steps: int) -> "TableRopeOffsets":
        """Offsets listed in (clip, block, step) order, as a sequential loop consumes them."""
        per_clip = blocks_per_clip * steps
        if len(flat) % per_clip:
            raise ValueError(f"{len(flat)} offsets do not fill whole clips of {blocks_per_clip} x {steps}")
        return cls(
            [
                [list(flat[c * per_clip + b * steps : c * per_clip + (b + 1) * steps]) for b in range(blocks_per_clip)]
                for c in range(len(flat) // per_clip)
            ]
        )

    def __call__(self, clip: int, block: int, step: int) -> int:
        return int(self.table[clip][block][step])


def clip_noise(seed: int, clip: int, shape: Sequence[int]) -> torch.Tensor:
    """Clip r's initial noise: CPU generator seeded seed + r, so every device and mode agree."""
    return torch.randn(*shape, generator=torch.Generator("cpu").manual_seed(seed + clip))


def flow_schedule(cfg: SamplerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps [steps], sigmas [steps + 1]) float32 of the shifted flow-matching Euler schedule."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.num_train_timesteps, shift=cfg.shift)
    scheduler.set_timesteps(cfg.steps)
    return scheduler.timesteps.float().cpu(), scheduler.sigmas.float().cpu()


def reference_rope_frame(cfg: SamplerConfig, frame_start: int, rd: int) -> int:
    """Temporal RoPE position of the reference token for a block starting at latent frame F.

    It stays at ``rope_ref_frame`` until the block comes within ``rope_ref_frame - rd``
    frames of it, then keeps rd frames ahead.
    """
    return cfg.rope_ref_frame + max(0, frame_start - (cfg.rope_ref_frame - rd))


class StepWorker:
    """Denoising step ``step`` of every block, with its own KV cache (one pipeline stage)."""

    def __init__(
        self,
        model: LiveAvatarTransformer,
        cfg: SamplerConfig,
        step: int,
        text: TextContext,
        cache: KVCache,
        cond: CondCache,
        schedule: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        timesteps, sigmas = schedule if schedule is not None else flow_schedule(cfg)
        self.model, self.cfg, self.step = model, cfg, step
        self.text, self.cache, self.cond = text, cache, cond
        self.timestep = timesteps[step]
        self.dt = sigmas[step + 1] - sigmas[step]
        self.calls = 0

    def prefill(self, sink: SinkInputs) -> None:
        """Write the sink into this worker's cond store (skip when the store is shared and filled)."""
        self.model.prefill_sink(sink.ref_latent, sink.motion_latents, self.text, self.cond, self.cfg.rope_ref_frame)

    def __call__(self, x: torch.Tensor, frame_start: int, audio: torch.Tensor, rd: int) -> torch.Tensor:
        """x [C, F, h, w] float32 at this step's noise level -> x at the next level."""
        nf = x.shape[1]
        v = self.model.forward_block(
            x,
            self.timestep.repeat(nf),
            self.text,
            audio,
            self.cache,
            self.cond,
            frame_start,
            reference_rope_frame(self.cfg, frame_start, rd),
            self.cfg.motion_video_frames,
        )
        self.calls += 1
        return x + self.dt * v.to(x.device)


@dataclass
class BlockOutput:
    clip: int
    block: int
    latents: torch.Tensor  # [C, latent_frames_per_block, h, w] float32, clean


def tpp_sink_refresh(first: SinkInputs) -> Callable[[torch.Tensor], SinkInputs]:
    """TPP rule for the clip-1 sink: clip 0's first generated latent becomes the reference, motion unchanged."""
    return lambda clip0_first_block: SinkInputs(clip0_first_block[:, :1], first.motion_latents)


class StreamingSampler:
    """All denoising steps in one process; yields every clean block in order."""

    def __init__(
        self,
        model: LiveAvatarTransformer,
        cfg: SamplerConfig,
        text: torch.Tensor | TextContext,
        audio: AudioSource,
        sink: SinkInputs,
        seed: int,
        rope_offsets: RopeOffsets | None = None,
        noise: Callable[[int], torch.Tensor] | None = None,
        sink_refresh: Callable[[torch.Tensor], SinkInputs] | None = None,
        cache_storage: CacheStorage | None = None,
        check_cancel: Callable[[], None] | None = None,
        on_call: Callable[[int, int, int], None] | None = None,
    ):
        """``on_call(clip, block, step)`` runs after every DiT call (progress: ``steps`` per block)."""
        cfg.validate()
        self.model, self.cfg, self.audio, self.sink, self.seed = model, cfg, audio, sink, seed
        self.text = text if isinstance(text, TextContext) else model.embed_text(text)
        self.rope_offsets = rope_offsets or SeededRopeOffsets(seed, *cfg.rope_offset_range)
        c, _, self.h, self.w = sink.ref_latent.shape
        self.latent_channels = c
        self.noise = noise or (lambda clip: clip_noise(seed, clip, (c, cfg.latent_frames_per_clip, self.h, self.w)))
        self.sink_refresh = sink_refresh or tpp_sink_refresh(sink)
        self.check_cancel = check_cancel or (lambda: None)
        self.on_call = on_call or (lambda clip, block, step: None)
        storage = cache_storage or CacheStorage(device=model.device, dtype=model.dtype)
        schedule = flow_schedule(cfg)
        self.cond = model.new_cond_cache(self.h, self.w, storage)
        self.workers = [
            StepWorker(model, cfg, i, self.text, model.new_kv_cache(self.h, self.w, cfg.latent_frames_per_clip, storage), self.cond, schedule)
            for i in range(cfg.steps)
        ]

    def blocks(self, num_clips: int) -> Iterator[BlockOutput]:
        cfg = self.cfg
        nb, nf = cfg.blocks_per_clip, cfg.latent_frames_per_block
        first_block = None
        for clip in range(num_clips):
            noise = self.noise(clip)
            if clip == 0:
                self.workers[0].prefill(self.sink)  # the cond store is shared by all steps
            elif clip == 1:
                self.workers[0].prefill(self.sink_refresh(first_block))
            for block in range(nb):
                x = noise[:, block * nf : (block + 1) * nf].to(self.model.device, torch.float32)
                frame_start = clip * cfg.latent_frames_per_clip + block * nf
                video_start = frame_start * cfg.vae_temporal_stride
                audio = self.audio.frames(video_start, video_start + cfg.frames_per_block)
                for step, worker in enumerate(self.workers):
                    self.check_cancel()
                    x = worker(x, frame_start, audio, self.rope_offsets(clip, block, step))
                    self.on_call(clip, block, step)
                if clip == 0 and block == 0:
                    first_block = x
                yield BlockOutput(clip, block, x)
