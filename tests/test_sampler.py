"""Sampler behaviour the golden data cannot show, on tiny random models."""
from __future__ import annotations

import pytest
import torch

from liveavatar_pack.liveavatar.config import TINY, SamplerConfig
from liveavatar_pack.liveavatar.kv_cache import CacheStorage
from liveavatar_pack.liveavatar.sampler import (
    Cancelled,
    SeededRopeOffsets,
    SinkAction,
    SinkInputs,
    StepWorker,
    StreamingSampler,
    TableRopeOffsets,
    flow_schedule,
    TensorAudio,
)
from liveavatar_pack.liveavatar.tiny import TINY_LATENT_HW, tiny_transformer

H, W = TINY_LATENT_HW  # non-square (liveavatar/tiny.py)


@pytest.fixture(scope="module")
def model():
    return tiny_transformer(seed=1)


def make_sampler(model, seed=0, cfg=SamplerConfig(), **kwargs):
    gen = torch.Generator().manual_seed(123)
    sink = SinkInputs(torch.randn(16, 1, H, W, generator=gen), torch.randn(16, 19, H, W, generator=gen))
    audio = TensorAudio(torch.randn(1, TINY.num_audio_layers, TINY.audio_dim, 150, generator=gen))
    text = torch.randn(7, TINY.text_dim, generator=gen)
    return StreamingSampler(model, cfg, text, audio, sink, seed=seed, **kwargs)


def run(model, clips=2, **kwargs):
    return [b.latents for b in make_sampler(model, **kwargs).blocks(clips)]


def test_same_seed_same_video_other_seed_differs(model):
    a, b, c = run(model, seed=5), run(model, seed=5), run(model, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.allclose(a[0], c[0]) and not torch.allclose(a[-1], c[-1])


def test_blocks_do_not_depend_on_later_blocks(model):
    """Changing the noise of clip 1 leaves every block of clip 0 unchanged (causality)."""
    cfg = SamplerConfig()
    shape = (16, cfg.latent_frames_per_clip, H, W)
    base = lambda clip: torch.randn(*shape, generator=torch.Generator().manual_seed(clip))  # noqa: E731
    other = lambda clip: base(clip) if clip == 0 else -base(clip)  # noqa: E731
    a, b = run(model, noise=base), run(model, noise=other)
    n = cfg.blocks_per_clip
    assert all(torch.equal(x, y) for x, y in zip(a[:n], b[:n]))
    assert not torch.allclose(a[n], b[n])


def test_rope_offsets_are_a_function_of_seed_clip_block_step():
    offsets = SeededRopeOffsets(7, 4, 30)
    draws = [offsets(c, b, s) for c in range(3) for b in range(4) for s in range(4)]
    assert draws == [SeededRopeOffsets(7, 4, 30)(c, b, s) for c in range(3) for b in range(4) for s in range(4)]
    assert all(4 <= d <= 30 for d in draws) and len(set(draws)) > 5
    assert draws != [SeededRopeOffsets(8, 4, 30)(c, b, s) for c in range(3) for b in range(4) for s in range(4)]


def test_injected_offsets_change_the_result(model):
    cfg = SamplerConfig()
    flat_a = [4] * (2 * cfg.blocks_per_clip * cfg.steps)
    flat_b = [30] * len(flat_a)
    a = run(model, rope_offsets=TableRopeOffsets.from_stream(flat_a, cfg.blocks_per_clip, cfg.steps))
    b = run(model, rope_offsets=TableRopeOffsets.from_stream(flat_b, cfg.blocks_per_clip, cfg.steps))
    # rd only moves the reference once blocks come within 30 - rd frames of it: clip 1 here
    assert torch.equal(a[0], b[0])
    assert not torch.allclose(a[-1], b[-1])


@pytest.mark.parametrize("steps", [3, 4, 5])
def test_step_counts(model, steps):
    sampler = make_sampler(model, cfg=SamplerConfig(steps=steps))
    blocks = list(sampler.blocks(2))
    assert len(sampler.workers) == steps
    assert all(w.calls == len(blocks) for w in sampler.workers)
    assert all(torch.isfinite(b.latents).all() for b in blocks)


@pytest.mark.parametrize("frames", [12, 24, 96])
def test_frames_per_clip_multiples_of_12(model, frames):
    cfg = SamplerConfig(frames_per_clip=frames)
    blocks = list(make_sampler(model, cfg=cfg).blocks(2))
    assert len(blocks) == 2 * frames // 12


@pytest.mark.parametrize("frames", [0, 30, 50])
def test_other_frames_per_clip_refused(model, frames):
    with pytest.raises(ValueError, match="multiple of 12"):
        make_sampler(model, cfg=SamplerConfig(frames_per_clip=frames))


def test_caches_roll_in_place(model):
    """Same storage throughout; clips past the first wrap around the window."""
    sampler = make_sampler(model)
    pointers = [(w.cache.k.data_ptr(), w.cache.v.data_ptr()) for w in sampler.workers] + [(sampler.cond.k.data_ptr(), 0)]
    gen = sampler.blocks(5)
    for _ in range(SamplerConfig().blocks_per_clip * 2):
        next(gen)
    snapshot = [w.cache.k.clone() for w in sampler.workers]
    for _ in gen:
        pass
    assert pointers == [(w.cache.k.data_ptr(), w.cache.v.data_ptr()) for w in sampler.workers] + [(sampler.cond.k.data_ptr(), 0)]
    assert all(not torch.equal(s, w.cache.k) for s, w in zip(snapshot, sampler.workers))


def test_cancel_between_steps(model):
    calls = {"n": 0}

    def check():
        calls["n"] += 1
        if calls["n"] > 6:
            raise Cancelled("stop")

    sampler = make_sampler(model, check_cancel=check)
    with pytest.raises(Cancelled):
        list(sampler.blocks(2))
    assert sum(w.calls for w in sampler.workers) == 6


def test_step_workers_with_own_caches_equal_sampler(model):
    """Each step as a separate stage with its own KV cache and sink store (a pipeline rank's view)."""
    cfg = SamplerConfig()
    ref = run(model, clips=3)
    inputs = make_sampler(model)
    storage = CacheStorage()
    schedule = flow_schedule(cfg)
    workers = [
        StepWorker(model, cfg, i, inputs.text, model.new_kv_cache(H, W, cfg.latent_frames_per_clip, storage),
                   model.new_cond_cache(H, W, storage), schedule)
        for i in range(cfg.steps)
    ]
    out, first, noise = [], None, None
    for plan in inputs.schedule(3):
        if plan.block == 0:
            noise = inputs.noise(plan.clip)
        if plan.sink is not SinkAction.NONE:
            sink = inputs.sink if plan.sink is SinkAction.PREFILL else inputs.sink_refresh(first)
            for worker in workers:
                worker.prefill(sink)
        audio = inputs.audio.frames(plan.audio_start, plan.audio_stop)
        x = noise[:, plan.noise_slice]
        for step in plan.steps:
            x = workers[step.step](x, plan.frame_start, audio, step.rd)
        first = x if plan.refresh_source else first
        out.append(x)
    assert len(out) == len(ref) and all(torch.equal(a, b) for a, b in zip(ref, out))


def test_text_context_holds_no_autograd_graph(model):
    """The per-layer text k/v live for a whole video: they must not keep activations for backward."""
    assert any(p.requires_grad for p in model.parameters())
    text = model.embed_text(torch.randn(7, TINY.text_dim))
    assert all(not k.requires_grad and not v.requires_grad for k, v in text.kv)


def test_positions_beyond_upstreams_45000_frame_table():
    """RoPE angles come from the positions (no table cap): past ~2 hours of video the rotation still
    depends only on position differences, with the same float16-table rounding as early on."""
    from liveavatar_pack.liveavatar.rope import TokenGrid, apply_rope, rope_table

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 3, 16, generator=gen)
    k = torch.randn(1, 4, 3, 16, generator=gen)

    def scores(start):
        grid = TokenGrid(tuple(range(start, start + 3)), (0,), (0,))
        table = rope_table([grid], 16)
        return apply_rope(q, table) @ apply_rope(k, table).transpose(-1, -2)

    early, shifted, late = scores(100), scores(200), scores(50_000)
    rounding = (early - shifted).abs().max()
    assert 0 < (early - late).abs().max() <= 4 * rounding + 1e-6
    assert torch.allclose(early, late, atol=1e-2)


def test_block_call_far_beyond_the_table(model):
    sampler = make_sampler(model)
    worker = sampler.workers[0]
    worker.prefill(sampler.sink)
    frame = 46_000  # > 45000 latent frames: about 2 h 3 min of video
    audio = sampler.audio.frames(0, SamplerConfig().frames_per_block)
    out = worker(torch.randn(16, 3, H, W), frame, audio, rd=17)
    assert out.shape == (16, 3, H, W) and torch.isfinite(out).all()
