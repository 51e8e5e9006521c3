"""The VRAM planner against what the engine really allocates on tiny models (CPU).

Exact terms (weights, KV caches, sink store, text K/V, block-swap residency) must match byte
counts of the tensors the engine allocates. The activation term is an estimate, checked
against the peak of live CPU allocations recorded by torch's profiler during one steady-state
forward_block (float32, so the bf16->float32 copies of a GPU run are not exercised); the 14B
numbers themselves are predictions to be checked by a GPU measurement.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from liveavatar_pack.cli import main as cli_main
from liveavatar_pack.liveavatar.config import TINY, WAN_S2V_14B, DiTConfig, SamplerConfig
from liveavatar_pack.liveavatar.kv_cache import CacheStorage
from liveavatar_pack.liveavatar.tiny import TINY_LATENT_HW, tiny_transformer
from liveavatar_pack.model_loaders.placement import PlacementConfig, apply_placement
from liveavatar_pack.model_loaders import planner
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

H, W = TINY_LATENT_HW  # non-square (liveavatar/tiny.py)
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
    # --host-ram 0: no host limit, so the verdicts do not depend on this machine's free RAM
    assert cli_main(["plan", "--gpus", "1x80", "--size", "704*384", "--host-ram", "0"]) == 0
    out = capsys.readouterr().out
    assert "KV caches" in out and "chosen placement" in out and "fits" in out
    assert cli_main(["plan", "--gpus", "1x24", "--size", "704*384", "--blocks-on-device", "40", "--host-ram", "0"]) == 1
    assert "does not fit" in capsys.readouterr().out
    assert cli_main(["plan", "--gpus", "4x24", "--size", "688*368", "--precision", "fp8", "--mode", "sp",
                     "--host-ram", "0"]) == 0


# ---------------------------------------------------------------------------- host RAM
def host_total_printed(out: str) -> float:
    """The TOTAL line of the plan output's '-- host RAM' block, GiB."""
    block = out.split("-- host RAM", 1)[1]
    line = next(l for l in block.splitlines() if l.strip().startswith("TOTAL"))
    return float(line.split()[1])


def test_verdict_counts_host_ram():
    plan = plan_memory(WAN_S2V_14B, "fp8", 704, 384, SCFG, PlacementConfig(kv_cache_device="cpu"))
    assert verdict(plan, "1x24", host_ram_gib=None).fits
    short = verdict(plan, "1x24", host_ram_gib=32)
    assert not short.fits and short.host_headroom < 0
    assert "host RAM: needs" in short.message and "fp8 KV caches" in short.message and "fewer steps" in short.message
    assert verdict(plan, "1x24", host_ram_gib=64).fits


def test_choice_stays_within_host_ram_and_falls_back_to_fp8_kv():
    """1x24 fp8: with room on the host the exact and the fp8 host KV caches are both possible; with
    40 GiB only fp8 KV caches fit there (21 GiB instead of 41), and the plan says host RAM limited it."""
    pc, plan = choose_placement(WAN_S2V_14B, "fp8", 704, 384, SCFG, "1x24", host_ram_gib=40, allow_fp8_kv=False)
    assert pc is None and "host RAM" in verdict(plan, "1x24", 40).message
    pc, plan = choose_placement(WAN_S2V_14B, "fp8", 704, 384, SCFG, "1x24", host_ram_gib=40)
    assert pc is not None and pc.kv_fp8 and plan.host_total <= 0.95 * 40 * GiB
    assert verdict(plan, "1x24", 40).fits
    # 1x80 bf16: block swap keeps swapped blocks in host RAM; with 12 GiB of host RAM that is
    # too much, so fp8 KV caches on the GPU make room for every block instead
    pc, plan = choose_placement(WAN_S2V_14B, "bf16", 704, 384, SCFG, "1x80")
    assert pc.blocks_on_device is not None and not pc.kv_fp8 and plan.host_total > 0.95 * 12 * GiB
    pc, plan = choose_placement(WAN_S2V_14B, "bf16", 704, 384, SCFG, "1x80", host_ram_gib=12)
    assert pc.blocks_on_device is None and pc.kv_fp8 and plan.host_total <= 0.95 * 12 * GiB
    # 1x48 bf16: fp8 KV caches on the host need 32.1 GiB; block swap would need less while sampling
    # (24.3 GiB), but a swapping placement loads the whole bf16 DiT on the host first (31 GiB + the
    # encoders: bench/simulate_fullsize.py measured 42.35 GiB), so with 32 GiB nothing fits
    pc, plan = choose_placement(WAN_S2V_14B, "bf16", 704, 384, SCFG, "1x48")
    assert pc.kv_cache_device == "cpu" and plan.host_total > 0.95 * 32 * GiB
    pc, plan = choose_placement(WAN_S2V_14B, "bf16", 704, 384, SCFG, "1x48", host_ram_gib=32)
    assert pc is None and "host RAM" in verdict(plan, "1x48", 32).message
    swap = plan_memory(WAN_S2V_14B, "bf16", 704, 384, SCFG,
                       PlacementConfig(blocks_on_device=21, kv_cache_dtype=torch.float8_e4m3fn))
    run = sum(t.bytes for t in swap.host)
    loading = sum(t.bytes for t in swap.host_load)
    assert run <= 0.95 * 32 * GiB < loading == swap.host_total
    assert loading >= weight_bytes(WAN_S2V_14B, "bf16").total(WAN_S2V_14B.num_layers)
    # with 48 GiB the host holds the load, and the choice is limited by host RAM no more
    pc, plan = choose_placement(WAN_S2V_14B, "bf16", 704, 384, SCFG, "1x48", host_ram_gib=48)
    assert pc is not None and plan.host_total <= 0.95 * 48 * GiB


def test_cli_plan_1x24_fp8_within_32_gib_or_says_why(capsys):
    code = cli_main(["plan", "--gpus", "1x24", "--size", "704*384", "--precision", "fp8", "--host-ram", "32"])
    out = capsys.readouterr().out
    assert "host RAM limit: 32.0 GiB (--host-ram)" in out
    if code == 0:
        assert host_total_printed(out) <= 32
    else:
        assert "chosen placement: none fits" in out and "host RAM: needs" in out
    # 3 steps: one KV cache less, which fits
    assert cli_main(["plan", "--gpus", "1x24", "--size", "704*384", "--precision", "fp8", "--host-ram", "32",
                     "--steps", "3"]) == 0
    assert host_total_printed(capsys.readouterr().out) <= 32


def test_cli_plan_reads_available_host_ram(capsys, monkeypatch):
    monkeypatch.setattr(planner, "available_host_ram_gib", lambda: 12.0)
    assert cli_main(["plan", "--gpus", "1x80", "--size", "704*384"]) == 0
    out = capsys.readouterr().out
    assert "host RAM limit: 12.0 GiB (available now" in out and "limited by host RAM" in out
    assert host_total_printed(out) <= 12


# ---------------------------------------------------------------------------- choice by predicted time
def test_1x48_fp8_keeps_fp8_kv_caches_on_the_card():
    """fp8 weights + fp8 KV caches fit 48 GB: no copies, instead of 11.7 GiB of host KV per call."""
    pc, plan = choose_placement(WAN_S2V_14B, "fp8", 704, 384, SCFG, "1x48")
    assert plan.traffic_per_forward < GiB and pc.kv_cache_device == "device" and pc.kv_fp8
    exact, eplan = choose_placement(WAN_S2V_14B, "fp8", 704, 384, SCFG, "1x48", allow_fp8_kv=False)
    assert not exact.kv_fp8 and eplan.timing.call_s > plan.timing.call_s
    assert any("limited by exact" in line for line in eplan.choice)


def test_cli_plan_1x48_fp8_moves_under_1_gib(capsys):
    assert cli_main(["plan", "--gpus", "1x48", "--size", "704*384", "--precision", "fp8", "--host-ram", "64"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("host->device traffic per DiT call:"))
    assert float(line.split(":")[1].split()[0]) < 1
    assert "-- host RAM" in out and host_total_printed(out) <= 64


def test_choice_follows_the_predicted_time():
    """Copies hidden behind slow compute cost nothing: then the exact placement wins the tie; with
    fast compute the same copies dominate and halving them (fp8 KV caches) is chosen."""
    fast, slow = planner.SpeedModel(25, 400), planner.SpeedModel(25, 50)
    pc, plan = choose_placement(WAN_S2V_14B, "fp8", 704, 384, SCFG, "1x24", speed=fast)
    assert pc.kv_cache_device == "cpu" and pc.kv_fp8 and plan.timing.bound == "compute-bound"
    pc, plan = choose_placement(WAN_S2V_14B, "fp8", 704, 384, SCFG, "1x24", speed=slow)
    assert pc.kv_cache_device == "cpu" and not pc.kv_fp8
    t = plan.timing
    assert t.copy_s == pytest.approx(plan.traffic_per_forward / 25e9)
    assert t.compute_s == pytest.approx(t.flops / 50e12) and t.call_s == max(t.copy_s, t.compute_s)
    assert t.fps == pytest.approx(SCFG.frames_per_block / (SCFG.steps * t.call_s))
    no_prefetch = plan_memory(WAN_S2V_14B, "fp8", 704, 384, SCFG, replace(pc, prefetch=False), speed=slow)
    assert no_prefetch.timing.call_s == pytest.approx(t.copy_s + t.compute_s)


def test_cli_plan_prints_and_overrides_the_assumptions(capsys):
    args = ["plan", "--gpus", "1x24", "--size", "704*384", "--precision", "fp8", "--host-ram", "0", "--exact"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "assumptions: 25 GB/s host->device, 400 TFLOP/s sustained" in out
    assert "host->device traffic per DiT call: 11.68 GiB" in out and "predicted time per DiT call: 0.502 s" in out
    assert cli_main(args + ["--bandwidth", "50", "--tflops", "100"]) == 0
    out = capsys.readouterr().out
    assert "assumptions: 50 GB/s host->device, 100 TFLOP/s sustained" in out
    assert "predicted time per DiT call: 1.208 s" in out
    assert "float8" not in out.split("chosen placement:")[1]  # --exact: no fp8 KV caches


def test_vram_plan_node_inputs(tmp_path, monkeypatch):
    from node_env import comfy_double, run

    with comfy_double(tmp_path) as env:
        from liveavatar_pack.nodes.plan import VRAMPlan

        names = [i.id for i in VRAMPlan.define_schema().inputs]
        assert "host_ram_gib" in names and "allow_lossy" in names
        common = dict(model="14B", precision="fp8", size="704*384", steps=4, gpus="1x48")
        text, chosen = run(VRAMPlan, **common, host_ram_gib=64.0, allow_lossy=True).result[:2]
        assert chosen.kv_fp8 and "host RAM 64.0 GiB" in text
        text, chosen = run(VRAMPlan, **common, host_ram_gib=64.0, allow_lossy=False).result[:2]
        assert not chosen.kv_fp8 and "forbidden (exact)" in text
        text, chosen = run(VRAMPlan, **common, host_ram_gib=40.0, allow_lossy=False).result[:2]
        assert chosen is None and "fit the GPU but not host RAM" in text
        monkeypatch.setattr(planner, "available_host_ram_gib", lambda: 40.0)
        text, chosen = run(VRAMPlan, **common, allow_lossy=False).result[:2]
        assert chosen is None and "host RAM 40.0 GiB" in text


# ---------------------------------------------------------------------------- generate's pre-load check
def test_preload_host_check_counts_the_dit_on_a_cpu(tmp_path):
    from liveavatar_pack.cli import tiny_models as tm
    from liveavatar_pack.model_loaders.dit import load_dit

    path = tm.write_dit(tmp_path)[0]  # config read off the header (dim 128: heads inferred)
    assert planner.dit_config_of(path) == tm.tiny_dit_config()
    ok = planner.preload_host_check(path, "fp32", 64, 64, SCFG, "cpu", host_ram_gib=64)
    assert ok.fits and ok.host_headroom < 64 * 0.95
    need = (64 * 0.95 - ok.host_headroom) * GiB
    assert need > load_dit(path, precision="fp32")[1].model_bytes  # the weights live in host RAM
    short = planner.preload_host_check(path, "fp32", 64, 64, SCFG, "cpu", host_ram_gib=need / GiB)
    assert not short.fits and "host RAM" in short.message and "--host-ram" in short.message
    # on a GPU generate's default placement keeps nothing big in host RAM
    gpu = planner.preload_host_check(path, "fp32", 64, 64, SCFG, "cuda", host_ram_gib=need / GiB)
    assert gpu.fits and gpu.host_headroom == pytest.approx(need / GiB * 0.95)


def test_generate_refuses_short_host_ram_before_loading(tmp_path, capsys, monkeypatch):
    from liveavatar_pack.cli import generate
    from liveavatar_pack.cli import tiny_models as tm

    tm.write_tiny_models(tmp_path / "models")

    def must_not_load(*a, **k):
        raise AssertionError("a model was loaded before the host RAM check")

    for name in ("load_text_encoder", "load_wan_vae", "load_audio_encoder", "load_dit"):
        monkeypatch.setattr(generate, name, must_not_load)
    inputs = tmp_path / "input" if (tmp_path / "input").is_dir() else tmp_path / "models" / "input"
    code = cli_main(["generate", "--models", str(tmp_path / "models"), "--image", str(inputs / tm.IMAGE_FILE),
                     "--audio", str(inputs / tm.SPEECH_FILE), "--size", "128*128", "--device", "cpu",
                     "--out", str(tmp_path / "out.mp4"), "--host-ram", "0.001"])
    assert code == 2
    err = capsys.readouterr().err
    assert "host RAM" in err and "0.0 GiB available" in err and not (tmp_path / "out.mp4").exists()


def test_readme_planner_table_is_the_scripts_output():
    """The README's planner table is regenerated by bench/planner_table.py, never edited by hand."""
    from pathlib import Path

    from bench_modules import bench_module

    root = Path(__file__).resolve().parent.parent
    module = bench_module("planner_table")
    table = module.table(planner.SpeedModel())
    assert "| 1x24 | single | 704*384 | fp8 | 400 | 32 |" in table  # the host-RAM-limited row
    assert table in (root / "README.md").read_text(), "README planner table is stale: run python bench/planner_table.py"
