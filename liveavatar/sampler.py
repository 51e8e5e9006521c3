"""The streaming few-step sampler: clips of blocks, one KV cache per denoising step.

For every block of 3 latent frames, step i runs the DiT once against cache i (which has
seen only step-i keys) and takes one flow-matching Euler step. Blocks are yielded as
soon as they are clean, so decode, progress, cancellation and other processes can hook
in between. ``StepWorker`` is the unit of work a pipeline rank runs; ``StreamingSampler``
chains all steps in one process.

The clip/block/step order, the sink actions, the noise and audio slices and every rd come
from ``schedule.py`` (its docstring states the determinism contract); this module only runs
the plan.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch

from .config import SamplerConfig
from .kv_cache import CacheStorage, CondCache, KVCache
from .schedule import (  # noqa: F401 - the determinism contract lives there; re-exported for callers
    BlockPlan,
    RopeOffsets,
    Schedule,
    SeededRopeOffsets,
    SinkAction,
    TableRopeOffsets,
    clip_noise,
    default_rope_offsets,
    reference_rope_frame,
    schedule,
)
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


def flow_schedule(cfg: SamplerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps [steps], sigmas [steps + 1]) float32 of the shifted flow-matching Euler schedule."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.num_train_timesteps, shift=cfg.shift)
    scheduler.set_timesteps(cfg.steps)
    return scheduler.timesteps.float().cpu(), scheduler.sigmas.float().cpu()


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
        self.rope_offsets = rope_offsets or default_rope_offsets(cfg, seed)
        c, _, self.h, self.w = sink.ref_latent.shape
        self.latent_channels = c
        self.noise = noise or (lambda clip: clip_noise(seed, clip, (c, cfg.latent_frames_per_clip, self.h, self.w)))
        self.sink_refresh = sink_refresh or tpp_sink_refresh(sink)
        self.check_cancel = check_cancel or (lambda: None)
        self.on_call = on_call or (lambda clip, block, step: None)
        storage = cache_storage or CacheStorage(device=model.device, dtype=model.dtype)
        levels = flow_schedule(cfg)
        self.cond = model.new_cond_cache(self.h, self.w, storage)
        self.workers = [
            StepWorker(model, cfg, i, self.text, model.new_kv_cache(self.h, self.w, cfg.latent_frames_per_clip, storage), self.cond, levels)
            for i in range(cfg.steps)
        ]

    def schedule(self, num_clips: int) -> Schedule:
        """The plan ``blocks`` follows (liveavatar/schedule.py)."""
        return schedule(self.cfg, num_clips, self.seed, self.rope_offsets)

    def blocks(self, num_clips: int) -> Iterator[BlockOutput]:
        first_block, noise = None, None
        for plan in self.schedule(num_clips):
            if plan.block == 0:
                noise = self.noise(plan.clip)
            if plan.sink is SinkAction.PREFILL:
                self.workers[0].prefill(self.sink)  # the cond store is shared by all steps
            elif plan.sink is SinkAction.REFRESH:
                self.workers[0].prefill(self.sink_refresh(first_block))
            x = noise[:, plan.noise_slice].to(self.model.device, torch.float32)
            audio = self.audio.frames(plan.audio_start, plan.audio_stop)
            for step in plan.steps:
                self.check_cancel()
                x = self.workers[step.step](x, plan.frame_start, audio, step.rd)
                self.on_call(plan.clip, plan.block, step.step)
            if plan.refresh_source:
                first_block = x
            yield BlockOutput(plan.clip, plan.block, x)
