"""The per-block plan of a run: the one place the clip/block/step order and rd are decided.

A run is a sequence of blocks (3 latent frames each); every block runs the DiT once per
denoising step. ``schedule(cfg, num_clips, seed)`` yields one ``BlockPlan`` per block in
generation order, lazily (memory is flat in length): which clip and block it is, its
latent frames, which slice of which seeded clip noise starts it, what the shared sink
store does first (prefill, the TPP clip-1 refresh, nothing), the audio frames it reads,
and for every step the rope offset rd and the reference token's RoPE frame. The local
sampler, every distributed rank (tpp, sp, the decode rank), the parent that feeds the
ranks their per-block audio, and the planner's step split all read it from here.

Determinism contract: clip r's noise is ``randn(C, T, h, w)`` from a CPU generator seeded
``seed + r``; rd of (clip, block, step) is a pure function of (seed, clip, block, step),
never of the process that runs the step. Both are injectable (``RopeOffsets``, the
sampler's ``noise``).
"""
from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import torch

from .config import SamplerConfig


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


def default_rope_offsets(cfg: SamplerConfig, seed: int) -> SeededRopeOffsets:
    """The rd a run draws unless offsets are injected."""
    return SeededRopeOffsets(seed, *cfg.rope_offset_range)


def clip_noise(seed: int, clip: int, shape: Sequence[int]) -> torch.Tensor:
    """Clip r's initial noise: CPU generator seeded seed + r, so every device and mode agree."""
    return torch.randn(*shape, generator=torch.Generator("cpu").manual_seed(seed + clip))


def reference_rope_frame(cfg: SamplerConfig, frame_start: int, rd: int) -> int:
    """Temporal RoPE position of the reference token for a block starting at latent frame F.

    It stays at ``rope_ref_frame`` until the block comes within ``rope_ref_frame - rd``
    frames of it, then keeps rd frames ahead.
    """
    return cfg.rope_ref_frame + max(0, frame_start - (cfg.rope_ref_frame - rd))


def assign_steps(steps: int, world: int) -> list[list[int]]:
    """Contiguous runs of steps per tpp rank; earlier ranks take one more when it does not divide."""
    if not 1 <= world <= steps:
        raise ValueError(f"tpp needs between 1 and {steps} ranks for {steps} steps, got {world}")
    base, extra = divmod(steps, world)
    out, start = [], 0
    for rank in range(world):
        n = base + (rank < extra)
        out.append(list(range(start, start + n)))
        start += n
    return out


class SinkAction(str, enum.Enum):
    """What the shared sink (cond) store does before a block's first step."""

    PREFILL = "prefill"  # clip 0: the given reference + motion latents
    REFRESH = "refresh"  # clip 1 (TPP rule): clip 0's first generated latent becomes the reference
    NONE = "none"


@dataclass(frozen=True)
class StepPlan:
    """One DiT call: denoising step ``step`` of a block, with its rope offset."""

    step: int
    rd: int
    ref_frame: int  # reference token's temporal RoPE position in this call


@dataclass(frozen=True)
class BlockPlan:
    """Everything a block needs decided before it runs."""

    index: int  # position in the run (g), 0-based
    clip: int
    block: int
    frame_start: int  # absolute latent frames [frame_start, frame_stop)
    frame_stop: int
    noise_seed: int  # the clip's noise generator seed (seed + clip)
    noise_start: int  # this block's latent frames within the clip's noise [noise_start, noise_stop)
    noise_stop: int
    sink: SinkAction
    refresh_source: bool  # its clean latents give the clip-1 sink its reference (clip 0, block 0)
    audio_start: int  # video frames of audio features it reads [audio_start, audio_stop)
    audio_stop: int
    steps: tuple[StepPlan, ...]

    @property
    def where(self) -> tuple[int, int]:
        return self.clip, self.block

    @property
    def noise_slice(self) -> slice:
        return slice(self.noise_start, self.noise_stop)

    def rd(self, step: int) -> int:
        return self.steps[step].rd


@dataclass(frozen=True)
class Schedule:
    """The plan of ``num_clips`` clips; iterate it for ``BlockPlan``s in order (computed on demand)."""

    cfg: SamplerConfig
    num_clips: int
    seed: int
    rope_offsets: RopeOffsets

    def __len__(self) -> int:
        return self.num_clips * self.cfg.blocks_per_clip

    def __iter__(self) -> Iterator[BlockPlan]:
        return (self.block_at(g) for g in range(len(self)))

    def block_at(self, index: int) -> BlockPlan:
        """The plan of block ``index`` (0-based, in generation order)."""
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} is outside this schedule of {len(self)} blocks")
        cfg = self.cfg
        nf = cfg.latent_frames_per_block
        clip, block = divmod(index, cfg.blocks_per_clip)
        frame_start = clip * cfg.latent_frames_per_clip + block * nf
        video_start = frame_start * cfg.vae_temporal_stride
        sink = SinkAction.NONE
        if block == 0 and clip == 0:
            sink = SinkAction.PREFILL
        elif block == 0 and clip == 1:
            sink = SinkAction.REFRESH
        steps = []
        for step in range(cfg.steps):
            rd = int(self.rope_offsets(clip, block, step))
            steps.append(StepPlan(step, rd, reference_rope_frame(cfg, frame_start, rd)))
        return BlockPlan(
            index=index, clip=clip, block=block, frame_start=frame_start, frame_stop=frame_start + nf,
            noise_seed=self.seed + clip, noise_start=block * nf, noise_stop=(block + 1) * nf,
            sink=sink, refresh_source=clip == 0 and block == 0,
            audio_start=video_start, audio_stop=video_start + cfg.frames_per_block, steps=tuple(steps),
        )

    def rd_table(self) -> list[list[list[int]]]:
        """Every rd, indexed [clip][block][step] (what a ``TableRopeOffsets`` takes)."""
        table: list[list[list[int]]] = [[] for _ in range(self.num_clips)]
        for plan in self:
            table[plan.clip].append([s.rd for s in plan.steps])
        return table


def schedule(cfg: SamplerConfig, num_clips: int, seed: int, rope_offsets: RopeOffsets | None = None) -> Schedule:
    """The run's plan; rd defaults to ``default_rope_offsets(cfg, seed)``."""
    cfg.validate()
    if num_clips < 0:
        raise ValueError(f"num_clips must be >= 0, got {num_clips}")
    return Schedule(cfg, int(num_clips), int(seed), rope_offsets or default_rope_offsets(cfg, seed))
