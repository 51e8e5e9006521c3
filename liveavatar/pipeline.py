"""Conditioning in, video frames out: the streaming pipeline shared by the CLI, nodes and workers.

Semantics follow upstream's multi-GPU ("TPP") pipeline in every mode: the reference
latent is the VAE encode of the single reference frame, the motion latents encode the
reference repeated ``motion_video_frames`` times, the clip-1 sink takes clip 0's first
generated latent as its reference, and one continuous streaming decode (warmed on the
oldest motion latents) turns each block into frames as soon as it is clean. Nothing
grows with the video's length: frames leave as they are decoded.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .config import SamplerConfig
from .kv_cache import CacheStorage
from .sampler import AudioSource, BlockOutput, RopeOffsets, SinkInputs, StreamingSampler
from .transformer import LiveAvatarTransformer, TextContext
from .vae import BlockDecoder, WanVAE, to_uint8


@dataclass
class Conditioning:
    """Everything a video depends on besides the models and the seed."""

    text: torch.Tensor | TextContext  # [L, text_dim] umT5 output (or already embedded)
    audio: AudioSource  # per-video-frame wav2vec2 features
    sink: SinkInputs  # reference latent + motion latents (clip 0)
    height: int  # pixels
    width: int


def encode_reference(vae: WanVAE, pixels: torch.Tensor, cfg: SamplerConfig) -> SinkInputs:
    """Reference pixels [3, H, W] in [-1, 1] -> clip 0's sink inputs (TPP rule).

    Reference latent: one-frame encode. Motion latents: the frame repeated
    ``motion_video_frames`` times (73 -> 19 latents), as if the person had held still.
    """
    frame = pixels[:, None]
    ref = vae.encode(frame)
    motion = vae.encode(frame.expand(-1, cfg.motion_video_frames, -1, -1))
    return SinkInputs(ref.float().cpu(), motion.float().cpu())


def count_clips(audio: AudioSource, cfg: SamplerConfig, requested: int | None = None) -> int:
    """Clips to generate: ``requested`` if given (> 0), else as many as the audio asks for."""
    if requested:
        if requested < 0:
            raise ValueError(f"number of clips must be positive, got {requested}")
        return requested
    num_clips = getattr(audio, "num_clips", None)
    if num_clips is None:
        raise ValueError("the audio source cannot tell its length; give the number of clips")
    return num_clips(cfg.frames_per_clip)


def video_frame_count(num_clips: int, cfg: SamplerConfig) -> int:
    """Frames of a video of ``num_clips`` clips (the first block loses its first frames)."""
    return num_clips * cfg.frames_per_clip - cfg.dropped_first_frames


@dataclass
class FrameChunk:
    """Decoded frames of one block, with where they sit in the video."""

    frames: torch.Tensor  # uint8 [n, H, W, 3] on the CPU
    first_frame: int
    clip: int
    block: int
    blocks_done: int
    blocks_total: int


class VideoStream:
    """Iterates the video's frames block by block; holds only the current block's frames."""

    def __init__(
        self,
        model: LiveAvatarTransformer,
        vae: WanVAE,
        cond: Conditioning,
        cfg: SamplerConfig,
        seed: int,
        num_clips: int | None = None,
        rope_offsets: RopeOffsets | None = None,
        noise: Callable[[int], torch.Tensor] | None = None,
        cache_storage: CacheStorage | None = None,
        check_cancel: Callable[[], None] | None = None,
        block_source: Callable[..., Iterator[BlockOutput]] | None = None,
        frame_source: Callable[[int], Iterator[FrameChunk]] | None = None,
    ):
        """``frame_source(num_clips)``: frames decoded elsewhere (a distributed decode rank); then neither
        ``model`` nor ``vae`` is used here (both may be None)."""
        cfg.validate()
        self.cfg, self.vae, self.cond = cfg, vae, cond
        self.num_clips = count_clips(cond.audio, cfg, num_clips)
        self.total_frames = video_frame_count(self.num_clips, cfg)
        self.blocks_total = self.num_clips * cfg.blocks_per_clip
        self._frames = frame_source
        if frame_source is not None and block_source is not None:
            raise ValueError("give block_source or frame_source, not both")
        if block_source is None and frame_source is None:
            sampler = StreamingSampler(
                model, cfg, cond.text, cond.audio, cond.sink, seed,
                rope_offsets=rope_offsets, noise=noise, cache_storage=cache_storage, check_cancel=check_cancel,
            )
            block_source = sampler.blocks
        self._blocks = block_source

    def __iter__(self) -> Iterator[FrameChunk]:
        if self._frames is not None:
            yield from self._frames(self.num_clips)
            return
        decoder = BlockDecoder.from_config(self.vae, self.cfg)
        decoder.warm_up(self.cond.sink.motion_latents)
        first = 0
        for done, block in enumerate(self._blocks(self.num_clips), start=1):
            frames = to_uint8(decoder.decode_block(block.latents))
            yield FrameChunk(frames, first, block.clip, block.block, done, self.blocks_total)
            first += frames.shape[0]


def write_mp4(
    stream: VideoStream,
    path: str | Path,
    audio: Any = None,
    sample_rate: int | None = None,
    on_chunk: Callable[[FrameChunk], None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Stream the video into an MP4 with sound; on failure a playable ``*.partial.mp4`` stays.
    An existing ``path`` is replaced only with ``overwrite``."""
    from .video import Mp4Writer

    with Mp4Writer(path, fps=stream.cfg.fps, audio=audio, sample_rate=sample_rate, overwrite=overwrite) as writer:
        for chunk in stream:
            writer.write(chunk.frames)
            if on_chunk is not None:
                on_chunk(chunk)
    return writer.final_path or Path(path)
