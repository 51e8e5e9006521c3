"""The planner's layouts (tpp, Ulysses sp, tpp x sp, decode rank): per-rank memory, FLOPs, bytes
on the wire, time per block, and the choice of the fastest layout that fits (``plan --gpus``).

Everything here is a prediction from the configs; the tiny-model tests tie the traffic model to the
tensors the engine really builds (q/k/v/o of every self-attention, the block latent).
"""
from __future__ import annotations

import math
import re

import pytest
import torch

from liveavatar_pack.cli import main as cli_main
from liveavatar_pack.liveavatar.config import TINY, WAN_S2V_14B, SamplerConfig
from liveavatar_pack.liveavatar.tiny import TINY_LATENT_HW
from liveavatar_pack.model_loaders import planner
from liveavatar_pack.model_loaders.placement import PlacementConfig
from liveavatar_pack.model_loaders.planner import (
    Layout,
    SpeedModel,
    block_step_flops,
    choose_layout,
    enumerate_layouts,
    layout_wire_bytes,
    plan_memory,
    verdict,
    weight_bytes,
)

SCFG = SamplerConfig()
FP8_KV = PlacementConfig(kv_cache_dtype=torch.float8_e4m3fn)


# ---------------------------------------------------------------------------- memory per rank
@pytest.mark.parametrize("n", [2, 4, 5, 8])
def test_sp_memory_per_rank_is_1_over_n_for_the_sharded_terms(n):
    """Ulysses sp N, weights sharded: KV and sink caches (split by heads) are exactly 1/N of one
    process's; the weights are a 1/N shard plus the gathered block and its prefetch; activations
    shrink with the rank's 1/N of the tokens; the text K/V (every head, for the rank's queries) is kept whole."""
    one = plan_memory(WAN_S2V_14B, "fp8", 704, 384, SCFG, FP8_KV)
    sp = plan_memory(WAN_S2V_14B, "fp8", 704, 384, SCFG, FP8_KV, layout=Layout(1, n, sharded=True))
    w = weight_bytes(WAN_S2V_14B, "fp8")
    assert sp.term("KV caches") * n == one.term("KV caches")
    assert sp.term("sink cache") * n == one.term("sink cache")
    assert sp.term("weights") == math.ceil(w.total(WAN_S2V_14B.num_layers) / n) + 2 * w.block
    assert sp.term("text K/V") == one.term("text K/V")
    # activations: 1/N of the tokens (+ the all-to-all buffers, the RoPE tables of every token)
    assert sp.term("activations") < one.term("activations") / n * 1.6
    assert sp.term("activations") > one.term("activations") / n
    # replicated weights: the whole model on every rank, the caches still split
    rep = plan_memory(WAN_S2V_14B, "fp8", 704, 384, SCFG, FP8_KV, layout=Layout(1, n, sharded=False))
    assert rep.term("weights") == one.term("weights") and rep.term("KV caches") == sp.term("KV caches")
    # one rank decodes: the VAE term on one device entry of count 1, the others without it
    assert [d.count for d in sp.devices] == [1, n - 1]
    assert sp.term("VAE decode", 0) > 0 and sp.term("VAE decode", 1) == 0


def test_hybrid_memory_each_group_holds_its_steps():
    """tpp 2 x sp 2: each rank keeps its group's 2 step caches, 1/2 of the heads; 5 GPUs of which one decodes."""
    one = plan_memory(WAN_S2V_14B, "bf16", 704, 384, SCFG)
    hyb = plan_memory(WAN_S2V_14B, "bf16", 704, 384, SCFG, layout=Layout(2, 2, sharded=True, decode_rank=True))
    assert hyb.term("KV caches") == one.term("KV caches") * 2 // 4 // 2
    assert sum(d.count for d in hyb.devices) == 5 and hyb.devices[-1].role == "decode rank"
    assert all(hyb.term("VAE decode", i) == 0 for i in range(len(hyb.devices) - 1))
    assert hyb.settings["mode"] == "tpp" and hyb.settings["world_size"] == 5
    # uneven: 3 groups for 4 steps -> the first group runs 2 steps, its calls set the block time
    three = plan_memory(WAN_S2V_14B, "bf16", 704, 384, SCFG, layout=Layout(3, 2, sharded=True))
    assert three.timing.calls_per_block == 2


# ---------------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("cfg,w,h", [(WAN_S2V_14B, 704, 384), (WAN_S2V_14B, 688, 368), (TINY, 80, 64)])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_sp_flops_per_rank_within_1_over_n_plus_10_percent(cfg, w, h, n):
    single = sum(block_step_flops(cfg, SCFG, w, h).values())
    rank = sum(block_step_flops(cfg, SCFG, w, h, sp=n).values())
    assert single / n <= rank <= single * (1 / n + 0.10)
    assert block_step_flops(cfg, SCFG, w, h, sp=1) == block_step_flops(cfg, SCFG, w, h)


# ---------------------------------------------------------------------------- bytes on the wire
@pytest.mark.parametrize("n", [2, 3, 4])
def test_wire_bytes_are_the_measured_ulysses_formula(n):
    """The planner's sp traffic is ``predicted_wire_bytes`` (which tests/test_ulysses.py matches byte
    for byte against the collectives a rank dispatches), for every precision: the all-to-all terms
    equal, the weight all-gather scaled by the precision's weight bytes; the tpp hand-off is
    one float32 block latent. At 14B the all-to-all is close to the closed form
    4 * layers * (N-1)/N * ceil(L/N) * dim * 2 (within 1%)."""
    from liveavatar_pack.model_loaders.planner import geometry
    from liveavatar_pack.model_loaders.wire_bytes import SPLayout, predicted_wire_bytes

    h, w = TINY_LATENT_HW
    for cfg, (W, H) in ((TINY, (8 * w, 8 * h)), (WAN_S2V_14B, (704, 384))):
        g = geometry(cfg, SCFG, W, H)
        latent = cfg.out_dim * SCFG.latent_frames_per_block * g.latent_h * g.latent_w * 4
        for precision, b in (("fp32", 4), ("bf16", 2), ("fp8", 2)):
            wire = layout_wire_bytes(cfg, SCFG, W, H, precision, sp=n, sharded=True, handoff=True)
            ref = predicted_wire_bytes(cfg, g, SPLayout(n, True, b, b))
            assert wire.all_to_all == ref["all_to_all"] + ref["gather"]
            assert wire.handoff == latent
            scale = weight_bytes(cfg, precision).total(cfg.num_layers) / weight_bytes(cfg, "bf16").total(cfg.num_layers)
            expect = ref["weights"] if precision != "fp8" else ref["weights"] * scale
            assert abs(wire.all_gather - expect) <= 1
            assert layout_wire_bytes(cfg, SCFG, W, H, precision, sp=n, sharded=False).all_gather == 0
            assert layout_wire_bytes(cfg, SCFG, W, H, precision).per_call == 0  # one process: nothing on the wire
    cfg = WAN_S2V_14B
    g = geometry(cfg, SCFG, 704, 384)
    closed = 4 * cfg.num_layers * (n - 1) / n * -(-g.block_tokens // n) * cfg.dim * 2
    assert abs(layout_wire_bytes(cfg, SCFG, 704, 384, "bf16", sp=n).all_to_all / closed - 1) < 0.01


# ---------------------------------------------------------------------------- time per block and fps
@pytest.mark.parametrize("link", ["pcie", "nvlink"])
def test_fps_is_frames_per_block_over_time_per_block(link):
    speed = SpeedModel(25, 66, link)
    for layout in (Layout(), Layout(4, 1), Layout(1, 4, True), Layout(2, 2, True, True), Layout(3, 1)):
        plan = plan_memory(WAN_S2V_14B, "fp8", 704, 384, SCFG, PlacementConfig(kv_cache_device="cpu"),
                           speed=speed, layout=layout)
        t = plan.timing
        assert t.calls_per_block == max(layout.group_steps(SCFG.steps))
        moved = t.copy_s + t.gather_s if link == "pcie" else max(t.copy_s, t.gather_s)
        assert t.call_s == pytest.approx(t.a2a_s + max(t.compute_s, moved))
        assert t.block_s == pytest.approx(t.calls_per_block * t.call_s + t.handoff_s)
        assert t.fps == pytest.approx(SCFG.frames_per_block / t.block_s)
        assert t.compute_s == pytest.approx(sum(block_step_flops(WAN_S2V_14B, SCFG, 704, 384, layout.sp).values()) / 66e12)
        gbps = planner.LINKS[link].gbps * 1e9
        assert t.a2a_s == pytest.approx(t.a2a_bytes / gbps) and t.gather_s == pytest.approx(t.gather_bytes / gbps)
        assert (t.handoff_bytes > 0) == (layout.groups > 1 or layout.decode_rank)
    # without prefetch nothing overlaps
    plan = plan_memory(WAN_S2V_14B, "fp8", 704, 384, SCFG, PlacementConfig(prefetch=False), speed=speed,
                       layout=Layout(1, 4, True))
    t = plan.timing
    assert t.call_s == pytest.approx(t.a2a_s + t.compute_s + t.copy_s + t.gather_s)


def test_link_follows_the_card_size_and_can_be_overridden():
    assert SpeedModel().with_gpus([24.0] * 4).gpu_link.kind == "pcie"
    assert SpeedModel().with_gpus([48.0] * 2).gpu_link.kind == "pcie-p2p"
    assert SpeedModel().with_gpus([80.0] * 4).gpu_link.kind == "nvlink"
    assert SpeedModel(link="nvlink").with_gpus([24.0]).gpu_link.kind == "nvlink"
    assert SpeedModel(link_gbps=3).with_gpus([80.0]).gpu_link.gbps == 3
    with pytest.raises(ValueError):
        SpeedModel(link="infiniband")
    with pytest.raises(ValueError):
        SpeedModel(link_gbps=0)


# ---------------------------------------------------------------------------- the choice
def _brute_force_best(gpus, precision, speed):
    """Fastest block time over every layout and every placement that fits, by direct enumeration."""
    best = math.inf
    for layout in enumerate_layouts(len(gpus), SCFG.steps, WAN_S2V_14B.num_heads):
        for kv_dtype in (None, torch.float8_e4m3fn):
            for kv_dev in ("device", "cpu"):
                for n in [None] + list(range(1, WAN_S2V_14B.num_layers)):
                    if layout.sharded and n is not None:
                        continue
                    # distributed ranks keep every block and their KV caches on the GPU in the model dtype
                    if layout.gpus > 1 and (n is not None or kv_dev != "device" or kv_dtype is not None):
                        continue
                    pc = PlacementConfig(device="cuda", blocks_on_device=n, kv_cache_device=kv_dev, kv_cache_dtype=kv_dtype)
                    plan = plan_memory(WAN_S2V_14B, precision, 704, 384, SCFG, pc, speed=speed, layout=layout)
                    if verdict(plan, gpus[:layout.gpus]).fits:
                        best = min(best, plan.timing.block_s)
    return best


@pytest.mark.parametrize("gpus,precision", [("4x24", "fp8"), ("8x24", "bf16"), ("2x48", "fp8")])
def test_recommendation_is_the_fastest_layout_that_fits(gpus, precision):
    g = planner.parse_gpus(gpus)
    speed = SpeedModel(tflops=66).with_gpus(g)
    choice = choose_layout(WAN_S2V_14B, precision, 704, 384, SCFG, g, speed=speed)
    best = choice.best
    assert best is not None and verdict(best.plan, g).fits
    assert best.plan.timing.block_s == pytest.approx(_brute_force_best(g, precision, speed))
    times = [o.plan.timing.block_s for o in choice.ranked]
    assert times == sorted(times) and all(o.fits for o in choice.ranked)
    assert all(not o.fits and not verdict(o.plan, g[:o.layout.gpus]).fits for o in choice.unfit)
    assert len(choice.ranked) + len(choice.unfit) == len(enumerate_layouts(len(g), SCFG.steps, WAN_S2V_14B.num_heads))


def test_recommendation_changes_with_the_link_bandwidth():
    """8x80 bf16: over NVLink tpp 4 x sp 2 halves each call's compute for little traffic and wins;
    at 5 GB/s its all-to-alls cost more than they save, and plain tpp 4 (no traffic per call) wins."""
    fast = choose_layout(WAN_S2V_14B, "bf16", 704, 384, SCFG, "8x80")
    assert fast.speed.gpu_link.kind == "nvlink"
    assert (fast.best.layout.groups, fast.best.layout.sp) == (4, 2)
    slow = choose_layout(WAN_S2V_14B, "bf16", 704, 384, SCFG, "8x80", speed=SpeedModel(link_gbps=5))
    assert (slow.best.layout.groups, slow.best.layout.sp) == (4, 1)
    assert slow.best.plan.timing.fps < fast.best.plan.timing.fps


def test_layouts_cover_every_mode():
    names = {lay.name() for lay in enumerate_layouts(8, 4, 40)}
    for name in ("single", "tpp 4", "tpp 4 + decode rank", "sp 8 (sharded)", "sp 8 (replicated)",
                 "tpp 4 x sp 2 (sharded)", "tpp 2 x sp 2 (replicated) + decode rank", "sp 5 (sharded)"):
        assert name in names
    assert "sp 3 (sharded)" not in names  # 40 heads do not split over 3
    assert Layout(4, 2, True).flags() == "--workers 8 --mode tpp --sp 2"
    assert Layout(1, 4, True).flags() == "--workers 4 --mode sp"
    assert Layout(4, 1, decode_rank=True).flags() == "--workers 4 --mode tpp --decode-rank"
    assert all(lay.gpus <= 8 for lay in enumerate_layouts(8, 4, 40))


# ---------------------------------------------------------------------------- the CLI
FPS = re.compile(r"\s(\d+\.\d) fps\s")


def test_cli_plan_gpus_recommends_the_fastest_and_lists_runners_up(capsys):
    assert cli_main(["plan", "--gpus", "8x24", "--size", "704*384", "--precision", "fp8", "--host-ram", "0"]) == 0
    out = capsys.readouterr().out
    ranking = out.split("recommended (the fastest that fits):", 1)[1].split("-- recommended layout in detail", 1)[0]
    rows = [line for line in ranking.splitlines() if re.match(r"\s+\d+\. ", line)]
    fps = [float(FPS.search(line).group(1)) for line in rows]
    assert len(rows) >= 3 and fps[0] == max(fps) and fps == sorted(fps, reverse=True)
    assert "runners-up:" in ranking and all("GiB per device:" in line for line in rows)
    assert "assumptions: 400 TFLOP/s sustained per GPU, 25 GB/s host->device, 12 GB/s between GPUs" in out
    assert "recommended layout: " in out and "fits: peak" in out
    first = rows[0].strip().split(". ", 1)[1].split("  ")[0]
    assert f"recommended layout: {first}:" in out
    # the link override is printed and moves the numbers of layouts with traffic
    assert cli_main(["plan", "--gpus", "8x24", "--size", "704*384", "--precision", "fp8", "--host-ram", "0",
                     "--link-gbps", "100"]) == 0
    assert "100 GB/s between GPUs (given" in capsys.readouterr().out


def test_ranks_are_planned_with_the_placement_they_run():
    """Distributed ranks keep every block and their KV caches on the GPU in the model dtype
    (distributed/runtime.py has no block swap or host KV), so no layout on several GPUs is ranked
    with a placement they cannot run; one process may still swap or keep its caches on the host."""
    g = planner.parse_gpus("4x24")
    choice = choose_layout(WAN_S2V_14B, "fp8", 704, 384, SCFG, g, speed=SpeedModel(tflops=66).with_gpus(g))
    for option in choice.ranked + choice.unfit:
        if option.layout.gpus > 1:
            pc = option.plan.settings["placement_dict"]
            assert pc.get("blocks_on_device") is None and pc.get("kv_cache_device", "device") == "device"
            assert pc.get("kv_cache_dtype") is None and not pc.get("offload_model_between_uses")


def test_cli_plan_explicit_layouts(capsys):
    assert cli_main(["plan", "--gpus", "4x48", "--precision", "fp8", "--mode", "tpp", "--sp", "2", "--host-ram", "0"]) == 0
    out = capsys.readouterr().out
    assert "recommended layout: tpp 2 x sp 2" in out and "--workers 4 --mode tpp --sp 2" in out
    assert cli_main(["plan", "--gpus", "5x48", "--precision", "fp8", "--mode", "tpp", "--sp", "2", "--decode-rank",
                     "--host-ram", "0"]) == 0
    assert "--workers 4 --mode tpp --sp 2 --decode-rank" in capsys.readouterr().out
    assert cli_main(["plan", "--gpus", "4x24", "--mode", "tpp", "--sp", "3"]) == 2
    err = capsys.readouterr().err
    assert "--sp 3" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert cli_main(["plan", "--gpus", "4x24", "--mode", "sp", "--sp", "2"]) == 2
    assert "goes with --mode tpp" in capsys.readouterr().err


def test_cli_plan_gpus_when_nothing_fits(capsys):
    assert cli_main(["plan", "--gpus", "2x8", "--precision", "bf16", "--host-ram", "0"]) == 1
    out = capsys.readouterr().out
    assert "no layout fits; closest:" in out and "recommended layout: none fits" in out and "does not fit" in out


# ---------------------------------------------------------------------------- README
def test_readme_layout_table_is_the_scripts_output():
    """The README's layout table is regenerated by bench/layout_table.py, never edited by hand."""
    from pathlib import Path

    from bench_modules import bench_module

    root = Path(__file__).resolve().parent.parent
    module = bench_module("layout_table")
    table = module.table()
    for gpus in ("4x24", "5x24", "8x24", "2x48", "4x80"):
        assert f"| {gpus} |" in table
    assert FPS.search(table.replace("|", " "))
    assert table in (root / "README.md").read_text(), "README layout table is stale: run python bench/layout_table.py"
