"""The VRAM planner against what the engine really allocates on tiny models (CPU).

Exact terms (weights, KV caches, sink store, text K/V, block-swap residency) must match byte
counts of the tensors the engine allocates. The activation term is an estimate, checked
against the peak of live CPU allocations recorded by torch's profiler during one steady-state
forward_block (float32, so the bf16->float32 copies of a GPU run are not exercised); the 14B
numbers themselves are predictions to be checked by a GPU measurement.
"""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from liveavatar_pack.cli import main as cli_main
from liveavatar_pack.liveavatar.config import TINY, WAN_S2V_14B, DiTConfig, SamplerConfig
from liveavatar_pack.liveavatar.kv_cache import CacheStorage
from liveavatar_pack.liveavatar.tiny import tiny_transformer
from liveavatar_pack.model_loaders.placement import PlacementConfig, apply_placement
from liveavatar_pack.model_loaders.planner import (
    GiB,
    activation_terms,
    choose_placement,
    geometry,
    parse_gpus,
    parse_size,
    plan_memory,
    verdict,
    weight_bytes,
)

H = W = 8  # latent size; pixels 64 x 64
SCFG = SamplerConfig()


def param_bytes(module):
    return sum(p.nbytes for p in module.parameters()) + sum(b.nbytes for b in module.buffers())


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_weights_are_exact(precision, dtype):
    model = tiny_transformer(0).cast(dtype)
    w = weight_bytes(TINY, precision)
    assert w.block == param_bytes(model.blocks[0])
    assert w.total(TINY.num_layers) == param_bytes(model)
    plan = plan_memory(TINY, precision, 8 * W, 8 * H, SCFG, PlacementConfig(device="cpu"))
    assert plan.term("weights") == param_bytes(model)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "fp8"])
def test_weights_equal_what_load_dit_allocates(tmp_path, precision):
    """The planner's weight terms against the bytes ``load_dit`` really allocates, for a tiny model
    written to disk: fp8 keeps the blocks' and injectors' Linears in fp8 (+ one float32 scale each)
    and every other tensor in bf16 (keep_in_fp32 modules in float32)."""
    from safetensors.torch import save_file

    from liveavatar_pack.model_loaders.dit import load_dit

    path = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_transformer(0).state_dict().items()}, path)
    model, report = load_dit(path, precision=precision, config=TINY)
    w = weight_bytes(TINY, precision)
    assert w.block == param_bytes(model.blocks[0])
    assert w.total(TINY.num_layers) == param_bytes(model) == report.model_bytes
    assert w.base_params + TINY.num_layers * w.block_params == sum(p.numel() for p in tiny_transformer(0).parameters())
    plan = plan_memory(TINY, precision, 8 * W, 8 * H, SCFG, PlacementConfig(device="cpu"))
    assert plan.term("weights") == param_bytes(model)


@pytest.mark.parametrize(
    "kv_dtype,heads",
    [(None, None), (torch.float8_e4m3fn, None), (None, (0, 2))],
)
def test_kv_sink_and_text_terms_are_exact(kv_dtype, heads):
    model = tiny_transformer(0)
    placed = apply_placement(model, PlacementConfig(device="cpu", kv_cache_dtype=kv_dtype))
    storage = placed.cache_storage(heads)
    world, mode = (1, "single") if heads is None else (TINY.num_heads // (heads[1] - heads[0]), "sp")
    plan = plan_memory(TINY, "fp32", 8 * W, 8 * H, SCFG, placed.config, world, mode)
    caches = [model.new_kv_cache(H, W, SCFG.latent_frames_per_clip, storage) for _ in range(SCFG.steps)]
    cond = model.new_cond_cache(H, W, storage)
    assert plan.term("KV caches") == sum(c.nbytes() for c in caches)
    assert plan.term("sink cache") == cond.nbytes()
    assert geometry(TINY, SCFG, 8 * W, 8 * H).sink_tokens == model.sink_tokens(H, W)
    text = model.embed_text(torch.randn(5, TINY.text_dim))
    assert plan.term("text K/V") == sum(k.nbytes + v.nbytes for k, v in text.kv)


def test_tpp_ranks_hold_only_their_steps():
    plan = plan_memory(TINY, "fp32", 64, 64, SamplerConfig(steps=4), PlacementConfig(device="cpu"), 5, "tpp")
    one = plan_memory(TINY, "fp32", 64, 64, SamplerConfig(steps=4), PlacementConfig(device="cpu")).term("KV caches") // 4
    dit = plan.devices[0]
    assert dit.count == 4 and sum(t.bytes for t in dit.terms if t.name == "KV caches") == one
    assert plan.devices[-1].role == "decode rank"
    plan = plan_memory(TINY, "fp32", 64, 64, SamplerConfig(steps=5), PlacementConfig(device="cpu"), 2, "tpp")
    assert [d.count for d in plan.devices] == [1, 1]
    assert plan.term("KV caches", 0) == 3 * one and plan.term("KV caches", 1) == 2 * one


def test_block_swap_weight_term_matches_the_measured_residency():
    model = tiny_transformer(0)
    block = param_bytes(model.blocks[0])
    base = param_bytes(model) - TINY.num_layers * block
    for n in (1, 2):
        model = tiny_transformer(0)
        placed = apply_placement(model, PlacementConfig(device="cpu", blocks_on_device=n))
        model.embed_text(torch.randn(3, TINY.text_dim))  # runs every block's hooks
        measured = base + placed.swapper.max_on_device * block
        plan = plan_memory(TINY, "fp32", 64, 64, SCFG, placed.config)
        assert plan.term("weights") == measured
        assert plan.host[0].bytes == (TINY.num_layers - (n - 1)) * block


def measured_forward_peak(cfg: DiTConfig, scfg: SamplerConfig, h: int, w: int) -> int:
    """Peak of live CPU allocations during one steady-state forward_block (window already full)."""
    model = tiny_transformer(0, cfg)
    storage = CacheStorage("cpu", torch.float32)
    cache = model.new_kv_cache(h, w, scfg.latent_frames_per_clip, storage)
    cond = model.new_cond_cache(h, w, storage)
    text = model.embed_text(torch.randn(7, cfg.text_dim))
    model.prefill_sink(torch.randn(16, 1, h, w), torch.randn(16, 19, h, w), text, cond, 30)
    x, t = torch.randn(16, 3, h, w), torch.full((3,), 500.0)
    audio = torch.randn(1, cfg.num_audio_layers, cfg.audio_dim, 12)
    start = scfg.latent_frames_per_clip
    model.forward_block(x, t, text, audio, cache, cond, start, 30, 73)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model.forward_block(x, t, text, audio, cache, cond, start + 3, 30, 73)
    events = list(prof.events())
    # allocations are attributed to the op that made them, frees outside ops are "[memory]" events
    timeline = [(e.time_range.start, e.cpu_memory_usage) for e in events if e.name == "[memory]"]
    timeline += [(e.time_range.end, e.self_cpu_memory_usage) for e in events if e.name != "[memory]" and e.self_cpu_memory_usage]
    live = peak = 0
    for _, delta in sorted(timeline):
        live += delta
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize(
    "cfg,h,w",
    [
        (DiTConfig(dim=256, ffn_dim=512, num_heads=4, num_layers=2, text_dim=32, audio_dim=16, audio_inject_layers=(0,)), 32, 32),
        (DiTConfig(dim=128, ffn_dim=1024, num_heads=2, num_layers=2, text_dim=32, audio_dim=16, audio_inject_layers=(1,)), 24, 32),
    ],
)
def test_activation_estimate_against_measured_peak(cfg, h, w):
    """Measured ratios estimate/peak: 1.02 (attention-bound) and 0.90 (FFN-heavy); tolerance 25%."""
    scfg = SamplerConfig(frames_per_clip=24)
    peak = measured_forward_peak(cfg, scfg, h, w)
    est, parts = activation_terms(cfg, geometry(cfg, scfg, 8 * w, 8 * h), 4, 1.0, 0)
    print(f"activations: estimate {est} B, measured peak {peak} B, ratio {est / peak:.3f}, {parts}")
    assert 0.75 < est / peak < 1.25


def test_14b_verdicts_and_choice():
    scfg = SamplerConfig()
    bf16 = plan_memory(WAN_S2V_14B, "bf16", 704, 384, scfg, PlacementConfig())
    # one bf16 KV cache at 704x384 is ~10 GB (DESIGN.md): 40 layers x 2 x 12672 tokens x 5120 x 2 bytes
    assert bf16.term("KV caches") == 4 * 40 * 2 * 12672 * 5120 * 2
    refused = verdict(bf16, "1x24")
    assert not refused.fits
    for hint in ("fp8", "block swap", "host RAM", "more GPUs"):
        assert hint in refused.message
    assert verdict(bf16, "1x80", margin=0).fits  # 76 GiB: fits an 80 GiB card only without the safety margin
    assert verdict(plan_memory(WAN_S2V_14B, "fp8", 704, 384, scfg, PlacementConfig()), "1x80").fits
    pc, plan = choose_placement(WAN_S2V_14B, "fp8", 704, 384, scfg, "1x24")
    assert pc is not None and verdict(plan, "1x24").fits
    assert pc.kv_cache_device == "cpu" or pc.kv_fp8 or pc.blocks_on_device is not None
    tpp = plan_memory(WAN_S2V_14B, "bf16", 704, 384, scfg, PlacementConfig(), 5, "tpp")
    assert verdict(tpp, "5x80").fits and tpp.term("KV caches") == bf16.term("KV caches") // 4
    sp = plan_memory(WAN_S2V_14B, "fp8", 704, 384, scfg, PlacementConfig(), 4, "sp")
    assert sp.term("KV caches") == plan_memory(WAN_S2V_14B, "fp8", 704, 384, scfg).term("KV caches") // 4
    assert sp.peak_device < 40 * GiB


def test_parsers():
    assert parse_gpus("4x24") == [24.0] * 4 and parse_gpus("80") == [80.0] and parse_gpus("1x48") == [48.0]
    assert parse_size("704*384") == (704, 384) and parse_size("688*368") == (688, 368)
    with pytest.raises(ValueError):
        parse_gpus("lots")


def test_cli_plan(capsys):
    assert cli_main(["plan", "--gpus", "1x80", "--size", "704*384"]) == 0
    out = capsys.readouterr().out
    assert "KV caches" in out and "chosen placement" in out and "fits" in out
    assert cli_main(["plan", "--gpus", "1x24", "--size", "704*384", "--blocks-on-device", "40"]) == 1
    assert "does not fit" in capsys.readouterr().out
    assert cli_main(["plan", "--gpus", "4x24", "--size", "688*368", "--precision", "fp8", "--mode", "sp"]) == 0
