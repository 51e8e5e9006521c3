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
    cfg, clips, seed = SamplerConfig(frames_per_clip=24), 3, 11  # 2 blocks per clip: clip 2 runs sink-free
    model = tiny_transformer(1)
    trace = Trace(model)
    gen = torch.Generator().manual_seed(5)
    sink = SinkInputs(torch.randn(16, 1, H, W, generator=gen), torch.randn(16, 19, H, W, generator=gen))
    audio = TensorAudio(torch.randn(1, TINY.num_audio_layers, TINY.audio_dim, cfg.frames_per_clip * clips - 7, generator=gen))
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


# ----------------------------------------------------------------------------- golden runs
def _golden_plan(golden_dir, name: str):
    from safetensors.torch import load_file

    from conftest import golden_subdir
    from goldens import golden_sampler_config, read_json
    from liveavatar_pack.liveavatar.schedule import TableRopeOffsets

    d = golden_subdir(golden_dir, name)
    golden = load_file(d / "golden.safetensors")
    noise = load_file(golden_subdir(golden_dir, "pipeline") / "golden.safetensors")
    golden.update({k: v for k, v in noise.items() if k.endswith("_noise")})
    log = read_json(d / "call_log.json")
    cfg = golden_sampler_config(golden, log)
    if name == "pipeline":  # one flat stream in (clip, block, step) order
        offsets = TableRopeOffsets.from_stream(read_json(d / "rope_offsets.json"), cfg.blocks_per_clip, cfg.steps)
    else:  # indexed [clip, block, step]
        offsets = TableRopeOffsets(golden["rope_offsets"].tolist())
    seed = read_json(golden_subdir(golden_dir, "pipeline_tpp") / "call_log.json")["launch"]["seed"]
    return cfg, golden, log, list(schedule(cfg, log["num_clips"], seed, offsets)), seed


@pytest.mark.golden
def test_single_gpu_golden_calls_follow_the_schedule(golden_dir):
    """pipeline/: every DiT call in order - sinks before the planned block, then (clip, block, step), token
    range and rd - as one flat stream, the order a single process runs."""
    cfg, golden, log, plans, _ = _golden_plan(golden_dir, "pipeline")
    fsl = log["frame_seq_length"]
    ours = iter([(p, s) for p in plans for s in p.steps])
    sink_clips = set()
    pending_sink = False
    for call in log["calls"]:
        if call["kind"] == "sink":
            pending_sink = True
            sink_clips.add(call["clip"])
            continue
        plan, step = next(ours)
        assert (call["clip"], call["block"], call["step"]) == (plan.clip, plan.block, step.step)
        assert (call["current_start"], call["current_end"]) == (plan.frame_start * fsl, plan.frame_stop * fsl)
        assert call["relative_dist"] == step.rd
        if step.step == 0:
            assert (plan.sink is not SinkAction.NONE) == pending_sink, f"{plan.where}: sink {plan.sink.value}"
            pending_sink = False
    assert next(ours, None) is None
    assert sink_clips == {p.clip for p in plans if p.sink is not SinkAction.NONE} == {0, 1}
    assert [s.rd for p in plans for s in p.steps] == golden["rope_relative_dist"].tolist()


@pytest.mark.golden
def test_each_tpp_ranks_golden_calls_are_its_steps_of_the_schedule(golden_dir):
    """pipeline_tpp/: rank k's calls are the schedule's blocks at rank k's steps (``assign_steps``), with the
    recorded rd and reference RoPE frame - unshifted and shifted both occur - and the sinks (clip-0 prefill,
    clip-1 refresh with the broadcast reference) where the plan puts them."""
    from liveavatar_pack.liveavatar.schedule import assign_steps

    cfg, golden, log, plans, _ = _golden_plan(golden_dir, "pipeline_tpp")
    fsl = log["frame_seq_length"]
    dit_ranks = [k for k, r in sorted(log["ranks"].items()) if r["dit_calls"]]
    split = assign_steps(cfg.steps, len(dit_ranks))
    refs = set()
    for k in dit_ranks:
        calls = log["ranks"][k]["dit_calls"]
        blocks = [c for c in calls if c["kind"] == "block"]
        planned = [(p, p.steps[s]) for p in plans for s in split[int(k)]]
        assert [(c["clip"], c["block"], c["step"]) for c in blocks] == [(p.clip, p.block, s.step) for p, s in planned]
        for call, (plan, step) in zip(blocks, planned):
            assert call["current_start"] == plan.frame_start * fsl
            assert (call["relative_dist"], call["ref_rope_frame"]) == (step.rd, step.ref_frame), (k, plan.where)
            refs.add(step.ref_frame)
        sinks = [c for c in calls if c["kind"] == "sink"]
        planned_sinks = [p for p in plans if p.sink is not SinkAction.NONE]
        assert [c["clip"] for c in sinks] == [p.clip for p in planned_sinks]
        assert [c["ref_latents"] for c in sinks] == [
            "ref_latents_clip0" if p.sink is SinkAction.PREFILL else "ref_latents_clip1" for p in planned_sinks]
    assert cfg.rope_ref_frame in refs and max(refs) > cfg.rope_ref_frame, refs  # both rd cases are covered
    # the reference broadcast sits between the refresh source's clip and the refresh
    comm = [c for c in log["ranks"][str(len(dit_ranks))]["comm"] if c["op"] in ("recv", "broadcast")]
    at = [c["op"] for c in comm].index("broadcast")
    refresh = next(p for p in plans if p.sink is SinkAction.REFRESH)
    assert (comm[at + 1]["clip"], comm[at + 1]["block"]) == refresh.where
    assert (comm[at]["last_clip"], comm[at]["last_block"]) == plans[refresh.index - 1].where
    # the refreshed reference is the first latent of the refresh source block (golden: clip0_final[:, 0:1])
    (source,) = [p for p in plans if p.refresh_source]
    assert torch.equal(golden[f"clip{source.clip}_final_latents"][:, source.noise_slice][:, :1], golden["ref_latents_clip1"][0])


@pytest.mark.golden
def test_golden_noise_and_audio_slices_are_the_planned_ones(golden_dir):
    """Clip r's noise is the seed + r draw (bitwise the golden noise), the blocks' noise slices tile it, and the
    blocks' audio frames tile the golden audio bucket (48 rows per clip) in order."""
    from safetensors.torch import load_file

    from conftest import golden_subdir

    cfg, golden, log, plans, seed = _golden_plan(golden_dir, "pipeline")
    bucket = load_file(golden_subdir(golden_dir, "audio") / "golden.safetensors")["bucket"]  # [frames, layers, D]
    for clip in range(log["num_clips"]):
        noise = golden[f"clip{clip}_noise"]
        mine = [p for p in plans if p.clip == clip]
        assert all(p.noise_seed == seed + clip for p in mine)
        assert torch.equal(clip_noise(seed, clip, tuple(noise.shape)), noise)
        assert torch.equal(torch.cat([noise[:, p.noise_slice] for p in mine], dim=1), noise)
    starts = [p.audio_start for p in plans]
    assert starts[0] == 0 and all(p.audio_stop == q.audio_start for p, q in zip(plans, plans[1:]))
    assert plans[-1].audio_stop == bucket.shape[0]
    assert all(p.audio_stop - p.audio_start == cfg.frames_per_block for p in plans)


# ----------------------------------------------------------------------------- rd and length
def test_reference_frame_for_every_rd_case():
    """Unshifted while F + rd <= the reference's prefill frame, then rd frames ahead of the block: at the
    boundary, for the range's ends, with an injected table and with the seeded default."""
    from liveavatar_pack.liveavatar.schedule import SeededRopeOffsets, TableRopeOffsets

    cfg = SamplerConfig()
    lo, hi = cfg.rope_offset_range
    ref = cfg.rope_ref_frame
    clips = 5
    rds = [lo, hi, ref - 3, ref - 6, ref - 9, lo + 1]  # F = 0, 3, 6, ... meets 30 - rd at blocks 1, 2, 3
    table = [[[rds[(c + b + s) % len(rds)] for s in range(cfg.steps)] for b in range(cfg.blocks_per_clip)]
             for c in range(clips)]
    cases = set()
    for rope in (TableRopeOffsets(table), SeededRopeOffsets(3, lo, hi)):
        for plan in schedule(cfg, clips, 3, rope):
            for step in plan.steps:
                assert step.rd == rope(plan.clip, plan.block, step.step) and lo <= step.rd <= hi
                f = plan.frame_start
                expected = ref if f + step.rd <= ref else f + step.rd
                assert step.ref_frame == expected, (plan.where, step)
                cases.add("shifted" if f + step.rd > ref else "boundary" if f + step.rd == ref else "unshifted")
    assert cases == {"unshifted", "boundary", "shifted"}
    assert schedule(cfg, 2, 3).rope_offsets == SeededRopeOffsets(3, lo, hi)  # the default rd


def test_a_long_video_is_planned_lazily_and_consistently():
    """4000 clips (over 45000 latent frames, past upstream's RoPE table): contiguous frames and audio, sinks
    only at clips 0 and 1, each block's plan independent of the length and of how it is reached, and the
    iteration holds no list of plans."""
    import tracemalloc

    cfg, clips, seed = SamplerConfig(), 4000, 42
    plan = schedule(cfg, clips, seed)
    assert len(plan) == clips * cfg.blocks_per_clip
    tracemalloc.start()
    try:
        prev = None
        for p in plan:
            if prev is None:
                assert (p.index, p.frame_start, p.audio_start, p.sink) == (0, 0, 0, SinkAction.PREFILL)
            else:
                assert p.index == prev.index + 1 and p.frame_start == prev.frame_stop and p.audio_start == prev.audio_stop
                assert p.sink is (SinkAction.REFRESH if p.where == (1, 0) else SinkAction.NONE)
            assert p.noise_stop - p.noise_start == cfg.latent_frames_per_block
            prev = p
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024, f"iterating the plan peaked at {peak} bytes"
    assert prev.frame_stop == clips * cfg.latent_frames_per_clip > 45000
    assert prev.audio_stop == clips * cfg.frames_per_clip
    last = prev.steps[-1]
    assert last.ref_frame == prev.frame_start + last.rd
    short = list(schedule(cfg, 3, seed))
    assert short == [plan.block_at(g) for g in range(len(short))]
    assert plan.block_at(len(plan) - 1) == prev
    with pytest.raises(IndexError, match="outside"):
        plan.block_at(len(plan))
