"""The per-block plan (liveavatar/schedule.py): what it decides, and that the engine follows it.

The golden runs pin the order, the offsets, the reference RoPE frames, the sink calls, the
noise and the audio slices; the tiny model checks that the sampler runs exactly the plan,
on a non-square latent.
"""
from __future__ import annotations

import pytest
import torch

from liveavatar_pack.liveavatar.config import TINY, SamplerConfig
from liveavatar_pack.liveavatar.sampler import SinkInputs, StreamingSampler, TensorAudio
from liveavatar_pack.liveavatar.schedule import SinkAction, clip_noise, schedule
from liveavatar_pack.liveavatar.tiny import TINY_LATENT_HW, tiny_transformer

H, W = TINY_LATENT_HW  # non-square (liveavatar/tiny.py)


class Trace:
    """Records the DiT calls a sampler makes: prefills and block calls with their inputs, in order."""

    def __init__(self, model):
        self.events: list[tuple] = []
        block, prefill = model.forward_block, model.prefill_sink

        def forward_block(x, timestep, text, audio, cache, cond, frame_start, ref_frame, *args, **kwargs):
            self.events.append(("block", x.clone(), float(timestep[0]), audio.clone(), frame_start, ref_frame))
            return block(x, timestep, text, audio, cache, cond, frame_start, ref_frame, *args, **kwargs)

        def prefill_sink(ref_latent, motion_latents, *args, **kwargs):
            self.events.append(("sink", ref_latent.clone()))
            return prefill(ref_latent, motion_latents, *args, **kwargs)

        model.forward_block, model.prefill_sink = forward_block, prefill_sink


def test_the_sampler_runs_exactly_the_schedule_on_a_non_square_latent():
    assert H != W
    cfg, clips, seed = SamplerConfig(), 3, 11
    model = tiny_transformer(1)
    trace = Trace(model)
    gen = torch.Generator().manual_seed(5)
    sink = SinkInputs(torch.randn(16, 1, H, W, generator=gen), torch.randn(16, 19, H, W, generator=gen))
    audio = TensorAudio(torch.randn(1, TINY.num_audio_layers, TINY.audio_dim, 48 * clips - 7, generator=gen))
    sampler = StreamingSampler(model, cfg, torch.randn(7, TINY.text_dim, generator=gen), audio, sink, seed=seed)
    out = list(sampler.blocks(clips))
    plans = list(schedule(cfg, clips, seed))
    assert [(o.clip, o.block) for o in out] == [p.where for p in plans]

    events = iter(trace.events)
    first = None
    for plan, block in zip(plans, out):
        if plan.sink is not SinkAction.NONE:
            kind, ref = next(events)
            assert kind == "sink", f"{plan.where}: expected the {plan.sink.value} prefill first"
            assert torch.equal(ref, sink.ref_latent if plan.sink is SinkAction.PREFILL else first[:, :1])
        noise = clip_noise(seed, plan.clip, (16, cfg.latent_frames_per_clip, H, W))
        assert plan.noise_seed == seed + plan.clip
        for i, step in enumerate(plan.steps):
            kind, x, _, block_audio, frame_start, ref_frame = next(events)
            assert kind == "block" and x.shape == (16, cfg.latent_frames_per_block, H, W)
            if i == 0:
                assert torch.equal(x, noise[:, plan.noise_slice]), f"{plan.where}: not the planned noise slice"
            assert torch.equal(block_audio, audio.frames(plan.audio_start, plan.audio_stop))
            assert (frame_start, ref_frame) == (plan.frame_start, step.ref_frame)
        first = block.latents if plan.refresh_source else first
    assert next(events, None) is None
    assert sum(w.calls for w in sampler.workers) == len(plans) * cfg.steps
