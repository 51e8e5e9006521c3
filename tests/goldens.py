"""Shared helpers for the parity tests: build engine objects from a golden directory."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from liveavatar_pack.liveavatar.config import DiTConfig, SamplerConfig
from liveavatar_pack.liveavatar.lora import merge_lora
from liveavatar_pack.liveavatar.transformer import LiveAvatarTransformer


def assert_close(actual: torch.Tensor, golden: torch.Tensor, what: str, rel: float = 2e-5) -> float:
    """|actual - golden| <= rel * max(1, max|golden|) everywhere; returns the max error."""
    assert actual.shape == golden.shape, f"{what}: shape {tuple(actual.shape)} != golden {tuple(golden.shape)}"
    err = (actual.float() - golden.float()).abs().max().item() if golden.numel() else 0.0
    bound = rel * max(1.0, golden.abs().max().item() if golden.numel() else 0.0)
    assert err <= bound, f"{what}: max |diff| {err:.3g} > {bound:.3g}"
    return err


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def golden_dit(dit_dir: Path) -> LiveAvatarTransformer:
    """The golden tiny DiT with its LoRA merged, float32."""
    cfg = DiTConfig.from_json(dit_dir / "config.json")
    model = LiveAvatarTransformer(cfg)
    model.load_state_dict(load_file(dit_dir / "dit_base.safetensors"), strict=True)
    lora_cfg = read_json(dit_dir / "lora_config.json")
    merge_lora(model, load_file(dit_dir / "lora.safetensors"), config_alpha=lora_cfg["lora_alpha"])
    return model.eval()


def golden_sampler_config(golden: dict, call_log: dict) -> SamplerConfig:
    """Sampler settings of a golden run, read from its tensors and call log."""
    base = SamplerConfig()
    latent_frames = golden["clip0_noise"].shape[1]
    return SamplerConfig(
        steps=golden["timesteps"].numel(),
        frames_per_clip=latent_frames * base.vae_temporal_stride,
        motion_video_frames=call_log.get("motion_frames", base.motion_video_frames),
    )


def golden_audio_features(audio_dir: Path) -> torch.Tensor:
    """[1, layers, D, frames]: the pipeline's audio_emb, a permutation of the stored bucket."""
    bucket = load_file(audio_dir / "golden.safetensors")["bucket"]  # [frames, layers, D]
    return bucket.permute(1, 2, 0)[None].contiguous()


class CallRecorder:
    """Wraps ``model.forward_block`` to record each call's arguments and output."""

    def __init__(self, model: LiveAvatarTransformer):
        self.calls: list[dict] = []
        inner = model.forward_block

        def recorded(x, timestep, text, audio, cache, cond, frame_start, ref_frame, *args, **kwargs):
            out = inner(x, timestep, text, audio, cache, cond, frame_start, ref_frame, *args, **kwargs)
            self.calls.append(dict(frame_start=frame_start, timestep=float(timestep[0]), ref_frame=ref_frame, out=out))
            return out

        model.forward_block = recorded
