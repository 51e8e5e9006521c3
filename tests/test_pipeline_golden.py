"""End-to-end parity with upstream's TPP pipeline (pipeline_tpp/), our default semantics.

From the reference image file, the audio file (through the golden wav2vec2), the text
context, the recorded noise and offsets to the uint8 video. Sizes come from the golden
call log; the VAE, audio encoder and DiT are the golden tiny models.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import golden_subdir
from goldens import assert_close, golden_dit, golden_sampler_config, read_json
from liveavatar_pack.liveavatar.audio import encode_audio
from liveavatar_pack.liveavatar.image import load_reference_image
from liveavatar_pack.liveavatar.pipeline import Conditioning, VideoStream, encode_reference, video_frame_count
from liveavatar_pack.liveavatar.sampler import TableRopeOffsets
from liveavatar_pack.model_loaders.audio_encoder import load_audio_encoder
from liveavatar_pack.model_loaders.vae import load_wan_vae

pytestmark = pytest.mark.golden


def test_tpp_video_from_files(golden_dir):
    tpp = golden_subdir(golden_dir, "pipeline_tpp")
    single = golden_subdir(golden_dir, "pipeline")
    golden = load_file(tpp / "golden.safetensors")
    noise = load_file(single / "golden.safetensors")
    log = read_json(tpp / "call_log.json")
    launch = log["launch"]
    cfg = golden_sampler_config({**golden, **noise}, log)

    vae = load_wan_vae(golden_subdir(golden_dir, "vae") / "vae.safetensors", config=golden_dir / "vae" / "config.json")
    pixels = load_reference_image(single / "ref_image.png", launch["max_area"])
    assert list(pixels.shape[1:]) == log["generated_size_hw"]
    sink = encode_reference(vae, pixels, cfg)
    assert_close(sink.ref_latent, golden["ref_latents_clip0"][0], "reference latent")
    assert_close(sink.motion_latents, golden["motion_latents"][0], "motion latents")

    encoder = load_audio_encoder(golden_subdir(golden_dir, "audio") / "wav2vec2")
    audio = encode_audio(encoder, golden_dir / "audio" / "test_16k.wav")
    num_clips = min(launch["num_repeat"], audio.num_clips(cfg.frames_per_clip))
    assert num_clips == log["num_clips"]

    cond = Conditioning(golden["text_context"], audio, sink, *pixels.shape[1:])
    stream = VideoStream(
        golden_dit(golden_subdir(golden_dir, "dit")), vae, cond, cfg, seed=launch["seed"], num_clips=num_clips,
        rope_offsets=TableRopeOffsets(golden["rope_offsets"].tolist()), noise=lambda clip: noise[f"clip{clip}_noise"],
    )
    chunks = list(stream)
    video = torch.cat([c.frames for c in chunks])
    assert video.shape == golden["video_uint8"].shape == (video_frame_count(num_clips, cfg), *pixels.shape[1:], 3)
    assert video.shape[0] == log["final_frame_count"]
    ranges = [c for c in log["stream_decode_calls"] if c["video_frames"]]
    assert [[c.first_frame, c.first_frame + c.frames.shape[0]] for c in chunks] == [c["video_frames"] for c in ranges]
    diff = (video.int() - golden["video_uint8"].int()).abs()
    assert diff.max() <= 1, f"uint8 frames differ by up to {int(diff.max())}"
    assert (diff > 0).float().mean() <= 1e-3, f"{int((diff > 0).sum())} uint8 values differ"
