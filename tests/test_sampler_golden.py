"""Parity of the streaming sampler with both upstream pipelines' latents (pipeline/, pipeline_tpp/).

Everything is read from the golden directory: sizes, step count, noise, offsets, the
sink inputs and the call order. The single-GPU run (pipeline/) is replayed with its own
conditioning injected; the TPP run (pipeline_tpp/) is our default semantics.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import golden_subdir
from goldens import CallRecorder, assert_close, golden_audio_features, golden_dit, golden_sampler_config, read_json
from liveavatar_pack.liveavatar.sampler import (
    SinkInputs,
    StreamingSampler,
    TableRopeOffsets,
    TensorAudio,
    flow_schedule,
    reference_rope_frame,
)

pytestmark = pytest.mark.golden


@pytest.fixture(scope="module")
def model(golden_dir):
    return golden_dit(golden_subdir(golden_dir, "dit"))


@pytest.fixture(scope="module")
def audio(golden_dir):
    return TensorAudio(golden_audio_features(golden_subdir(golden_dir, "audio")))


def _run(model, cfg, golden, audio, sink, offsets, num_clips, sink_refresh=None):
    recorder = CallRecorder(model)
    try:
        sampler = StreamingSampler(
            model, cfg, golden["text_context"], audio, sink, seed=0, rope_offsets=offsets,
            noise=lambda clip: golden[f"clip{clip}_noise"], sink_refresh=sink_refresh,
        )
        blocks = list(sampler.blocks(num_clips))
    finally:
        del model.forward_block  # drop the recording wrapper
    return blocks, recorder.calls, sampler


def _clip_latents(blocks, clip):
    return torch.cat([b.latents for b in blocks if b.clip == clip], dim=1)


def _check_call_order(calls, golden_calls, fsl, cfg):
    block_calls = [c for c in golden_calls if c["kind"] == "block"]
    assert len(calls) == len(block_calls), f"{len(calls)} DiT block calls, golden has {len(block_calls)}"
    for ours, theirs in zip(calls, block_calls):
        assert ours["frame_start"] * fsl == theirs["current_start"]
        assert ours["timestep"] == pytest.approx(theirs["timestep"], abs=0)
        expected_ref = theirs.get("ref_rope_frame", reference_rope_frame(cfg, theirs["current_start"] // fsl, theirs["relative_dist"]))
        assert ours["ref_frame"] == expected_ref


def test_schedule(golden_dir):
    golden = load_file(golden_subdir(golden_dir, "pipeline") / "golden.safetensors")
    log = read_json(golden_dir / "pipeline" / "call_log.json")
    timesteps, sigmas = flow_schedule(golden_sampler_config(golden, log))
    assert torch.equal(timesteps, golden["timesteps"])
    assert torch.equal(sigmas, golden["sigmas"])


def test_single_gpu_pipeline_latents(golden_dir, model, audio):
    """pipeline/: per-step latents and velocities of clip 0 block 0, and every clip's final latents."""
    d = golden_subdir(golden_dir, "pipeline")
    golden = load_file(d / "golden.safetensors")
    checks = load_file(d / "model_checks.safetensors")
    log = read_json(d / "call_log.json")
    cfg = golden_sampler_config(golden, log)
    offsets = TableRopeOffsets.from_stream(read_json(d / "rope_offsets.json"), cfg.blocks_per_clip, cfg.steps)
    assert [offsets(c, b, s) for c in range(log["num_clips"]) for b in range(cfg.blocks_per_clip) for s in range(cfg.steps)] \
        == golden["rope_relative_dist"].tolist()
    sink = SinkInputs(checks["sink.in.ref_latents"][0], checks["sink.in.motion_latents_last19"][0])
    refresh = lambda first: SinkInputs(first[:, :1], golden["vae_motion_latents_v1_last19"])  # noqa: E731
    blocks, calls, _ = _run(model, cfg, golden, audio, sink, offsets, log["num_clips"], refresh)

    _check_call_order(calls, log["calls"], log["frame_seq_length"], cfg)
    x = golden["clip0_noise"][:, : cfg.latent_frames_per_block]
    for step in range(cfg.steps):
        assert_close(calls[step]["out"], golden[f"clip0_block0_step{step}_noise_pred"], f"velocity step {step}")
        x = x + (golden["sigmas"][step + 1] - golden["sigmas"][step]) * calls[step]["out"]
        assert_close(x, golden[f"clip0_block0_after_step{step}"], f"latents after step {step}")
    for clip in range(log["num_clips"]):
        assert_close(_clip_latents(blocks, clip), golden[f"clip{clip}_final_latents"], f"clip {clip} final latents")


def test_tpp_pipeline_latents(golden_dir, model, audio):
    """pipeline_tpp/ (our default semantics): hand-offs between steps and every clip's latents."""
    d = golden_subdir(golden_dir, "pipeline_tpp")
    golden = load_file(d / "golden.safetensors")
    noise = load_file(golden_subdir(golden_dir, "pipeline") / "golden.safetensors")
    golden.update({k: v for k, v in noise.items() if k.endswith("_noise")})
    log = read_json(d / "call_log.json")
    cfg = golden_sampler_config(golden, log)
    offsets = TableRopeOffsets(golden["rope_offsets"].tolist())
    sink = SinkInputs(golden["ref_latents_clip0"][0], golden["motion_latents"][0])
    blocks, calls, sampler = _run(model, cfg, golden, audio, sink, offsets, log["num_clips"])  # default TPP refresh

    rank_calls = [c for c in log["ranks"]["0"]["dit_calls"] if c["kind"] == "block"]
    ours_step0 = calls[:: cfg.steps]
    assert [c["frame_start"] * log["frame_seq_length"] for c in ours_step0] == [c["current_start"] for c in rank_calls]
    assert [c["ref_frame"] for c in ours_step0] == [c["ref_rope_frame"] for c in rank_calls]

    x = golden["clip0_noise"][:, : cfg.latent_frames_per_block]
    for step in range(cfg.steps - 1):
        x = x + (golden["sigmas"][step + 1] - golden["sigmas"][step]) * calls[step]["out"]
        assert_close(x, golden[f"clip0_block0_after_step{step}"], f"hand-off after step {step}")
    for clip in range(log["num_clips"]):
        assert_close(_clip_latents(blocks, clip), golden[f"clip{clip}_final_latents"], f"clip {clip} final latents")
    assert_close(_clip_latents(blocks, 0)[:, :1], golden["ref_latents_clip1"][0], "clip-1 sink reference")
