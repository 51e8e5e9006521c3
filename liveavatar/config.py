"""Typed configuration of the model and the streaming sampler.

Every size, layer list and schedule rule lives here, so nothing downstream is
hard-wired to the 14B model, to one resolution or to upstream's 4 steps.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DiTConfig:
    """The causal S2V transformer (constructor arguments of upstream ``CausalWanModel_S2V``)."""

    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 16
    out_dim: int = 16
    cond_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    audio_dim: int = 1024
    num_audio_layers: int = 25  # wav2vec2 hidden states mixed by learned weights
    num_audio_token: int = 4
    audio_inject_layers: tuple[int, ...] = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    zip_frame_buckets: tuple[int, int, int] = (1, 2, 16)  # newest, 2x, 4x motion buckets

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def motion_latent_frames(self) -> int:
        """Latent frames the frame packer reads (19 = 1 + 2 + 16)."""
        return sum(self.zip_frame_buckets)

    @classmethod
    def from_dict(cls, raw: dict) -> "DiTConfig":
        """Build from an upstream/diffusers ``config.json`` dict, ignoring unrelated keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in names}
        for key in ("audio_inject_layers", "patch_size", "zip_frame_buckets"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> "DiTConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def validate(self) -> None:
        if self.dim % self.num_heads or self.head_dim % 2:
            raise ValueError(f"dim {self.dim} must split into {self.num_heads} heads of even size")
        bad = [i for i in self.audio_inject_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"audio_inject_layers {bad} outside 0..{self.num_layers - 1}")
        if self.dim % 4:
            raise ValueError(f"dim {self.dim} must be a multiple of 4 for the audio encoder")


WAN_S2V_14B = DiTConfig()

TINY = DiTConfig(
    dim=64, ffn_dim=128, num_heads=4, num_layers=4, text_dim=32, audio_dim=16, audio_inject_layers=(0, 2)
)

PRESETS = {"14B": WAN_S2V_14B, "tiny": TINY}


@dataclass(frozen=True)
class SamplerConfig:
    """The streaming few-step flow-matching sampler (LiveAvatar's causal schedule)."""

    steps: int = 4  # the LoRA was distilled for 4; 3 and 5 also work
    shift: float = 3.0
    num_train_timesteps: int = 1000
    frames_per_clip: int = 48  # video frames; a multiple of frames_per_block * temporal stride
    latent_frames_per_block: int = 3
    vae_temporal_stride: int = 4
    fps: int = 25
    rope_ref_frame: int = 30  # reference token's temporal RoPE position at the prefill
    rope_offset_range: tuple[int, int] = (4, 30)  # rd drawn uniformly in this closed range
    motion_video_frames: int = 73  # frames encoded for the motion latents (19 latents)
    decoder_warmup_latents: int = 7  # oldest motion latents that warm the streaming decoder
    dropped_first_frames: int = 3  # dropped from the first decoded block

    @property
    def frames_per_block(self) -> int:
        return self.latent_frames_per_block * self.vae_temporal_stride

    @property
    def latent_frames_per_clip(self) -> int:
        return self.frames_per_clip // self.vae_temporal_stride

    @property
    def blocks_per_clip(self) -> int:
        return self.latent_frames_per_clip // self.latent_frames_per_block

    def validate(self) -> None:
        if not 1 <= self.steps <= 50:
            raise ValueError(f"steps must be between 1 and 50, got {self.steps}")
        fpb = self.frames_per_block
        if self.frames_per_clip <= 0 or self.frames_per_clip % fpb:
            raise ValueError(
                f"frames_per_clip must be a positive multiple of {fpb} (e.g. {fpb}, {2 * fpb}, 48, {5 * fpb}); "
                f"got {self.frames_per_clip}"
            )
        lo, hi = self.rope_offset_range
        if not 0 <= lo <= hi <= self.rope_ref_frame:
            raise ValueError(f"rope_offset_range {self.rope_offset_range} must lie within 0..{self.rope_ref_frame}")


def replace(cfg, **changes):
    """``dataclasses.replace`` re-exported for configs."""
    return dataclasses.replace(cfg, **changes)


__all__ = ["DiTConfig", "SamplerConfig", "PRESETS", "TINY", "WAN_S2V_14B", "replace"]
