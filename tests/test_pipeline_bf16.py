"""The whole pipeline in bfloat16 (what a GPU runs), on the CPU: no dtype mismatch anywhere."""
from __future__ import annotations

import torch

from liveavatar_pack.liveavatar.audio import AudioFeatures, Waveform
from liveavatar_pack.liveavatar.config import SamplerConfig
from liveavatar_pack.liveavatar.demo_assets import synth_face, synth_speech
from liveavatar_pack.liveavatar.image import load_reference_image
from liveavatar_pack.liveavatar.pipeline import Conditioning, VideoStream, encode_reference
from liveavatar_pack.liveavatar.text import encode_text
from liveavatar_pack.liveavatar.tiny import byte_tokens, tiny_audio_encoder, tiny_text_encoder, tiny_transformer, tiny_vae


def _video(dtype):
    cfg = SamplerConfig()
    vae = tiny_vae(1).to(dtype=dtype)
    pixels = load_reference_image(synth_face(), "64*64")
    audio = AudioFeatures(tiny_audio_encoder(2).to(dtype), Waveform(synth_speech(1.0), 16000, "synthetic"))
    text = encode_text(tiny_text_encoder(3).to(dtype), *byte_tokens("hello", 256, 512))
    model = tiny_transformer(0).cast(dtype)
    latents = []
    stream = VideoStream(model, vae, Conditioning(text, audio, encode_reference(vae, pixels, cfg), 64, 64), cfg,
                         seed=0, num_clips=1)
    original = stream._blocks

    def recording(n):
        for block in original(n):
            latents.append(block.latents)
            yield block

    stream._blocks = recording
    frames = torch.cat([c.frames for c in stream])
    return frames, torch.cat(latents, dim=1)


def test_bf16_pipeline_runs_and_tracks_float32():
    """Measured here: 3.8e-3 of max|x| on the latents; the bound leaves 5x room for other CPUs."""
    frames16, lat16 = _video(torch.bfloat16)
    frames32, lat32 = _video(torch.float32)
    assert frames16.shape == frames32.shape == (45, 64, 64, 3) and frames16.dtype == torch.uint8
    assert lat16.dtype == torch.float32 and torch.isfinite(lat16).all()
    rel = ((lat16 - lat32).abs().max() / lat32.abs().max()).item()
    assert rel < 0.02, f"bf16 latents deviate from float32 by {rel:.3g} of max|x|"
    assert frames16.float().std() > 1.0  # not a constant picture
