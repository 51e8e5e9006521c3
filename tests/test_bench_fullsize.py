"""bench/bench_fullsize.py cannot rot: its --smoke run (CPU) and its FLOP formula.

The smoke runs the full-size benchmark's code (meta build + on-device random fill, fp8,
compile, forced SDPA backend, planner placements, block swap, host/fp8 KV caches, VAE decode)
on a scaled-down model; the FLOP formula is checked against torch's FlopCounterMode.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bench_modules import bench_module

from liveavatar_pack.liveavatar.config import WAN_S2V_14B, DiTConfig, SamplerConfig

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "bench_fullsize.py"
HEADER = ("config", "size", "placement", "ms/blk-step", "fps", "peak GiB", "alloc GiB", "planner GiB", "plan/meas",
          "host GiB", "TFLOP/s", "MFU", "notes")


def _bench_module():
    return bench_module("bench_fullsize")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_smoke_table_has_one_row_per_configuration(smoke):
    stdout, result = smoke
    bench = _bench_module()
    configs = bench.SMOKE_CONFIGS.split(",")
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("config "))
    assert [c.strip() for c in lines[header].split(" | ")] == list(HEADER)
    rows = [line.split(" | ") for line in lines[header + 2 : header + 2 + len(configs)]]
    assert [r[0].strip() for r in rows] == configs
    for cells in rows:
        assert len(cells) == len(HEADER)
        values = dict(zip(HEADER, (c.strip() for c in cells)))
        assert values["size"] == "64*64"
        assert float(values["ms/blk-step"]) > 0 and float(values["fps"]) > 0 and float(values["planner GiB"]) > 0
        assert values["peak GiB"] == "n/a" and values["MFU"] == "n/a"  # CUDA-only, said so in the notes
        assert "no CUDA" in values["notes"]

    rows = {r["config"]: r for r in result["rows"]}
    assert all(r["status"] == "ok" for r in rows.values())
    assert all(r["block_steps_timed"] >= 1 and r["frames_timed"] > 0 for r in rows.values())
    # the code paths each row stands for really ran
    assert rows["fp8+compile+sdpa=math"]["notes"].startswith("compile: eager")
    assert "dequantised" in rows["fp8+cap24"]["notes"]
    assert rows["fp8+cap24"]["placement_config"]["kv_cache_device"] == "cpu"  # the planner's 24 GB choice
    swap = rows["fp8+cap48+swap=20+kv=fp8"]["placement_config"]
    assert swap["blocks_on_device"] == 2 and swap["kv_cache_dtype"] == "float8_e4m3fn"
    assert set(result["env"]["sdpa_backends"]) == {"math", "flash", "efficient", "cudnn"}
    assert result["env"]["sdpa_backends"]["math"] == "ok"


def test_smoke_flop_formula_matches_flop_counter(smoke):
    _, result = smoke
    check = result["flop_check"]
    assert abs(check["ratio"] - 1) < 0.03, check
    assert result["flops"]["64*64"]["total"] == check["formula"]


def test_flop_formula_on_another_geometry():
    """Non-square size, 2-block KV window, one injector, short text: still what FlopCounterMode counts."""
    bench = _bench_module()
    cfg = DiTConfig(dim=256, ffn_dim=384, num_heads=2, num_layers=2, text_dim=32, audio_dim=32, text_len=64,
                    audio_inject_layers=(1,))
    scfg = SamplerConfig(frames_per_clip=24)
    model = bench.build_dit(cfg, torch.device("cpu"), "bf16", seed=3)
    counted = bench.counted_block_step_flops(model, scfg, 160, 96)
    terms = bench.block_step_flops(cfg, scfg, 160, 96)
    assert abs(sum(terms.values()) / counted - 1) < 0.03
    # dropping the attention terms would be caught: they are not negligible at this size
    assert (terms["self_attn"] + terms["text_cross_attn"]) / counted > 0.05


def test_14b_flops_per_block_step():
    """~121 TFLOP per block-step at 704*384 (DESIGN.md: ~130): 10 fps at 4 steps needs ~400 TFLOP/s."""
    bench = _bench_module()
    total = sum(bench.block_step_flops(WAN_S2V_14B, SamplerConfig(), 704, 384).values())
    assert 110e12 < total < 135e12


def test_build_fills_every_tensor_on_the_device():
    bench = _bench_module()
    cfg = DiTConfig(dim=256, ffn_dim=256, num_heads=2, num_layers=2, text_dim=16, audio_dim=16, audio_inject_layers=(0,))
    model = bench.build_dit(cfg, torch.device("cpu"), "fp8", seed=0)
    fp8 = [m for m in model.modules() if isinstance(m, bench.FP8Linear)]
    assert len(fp8) == len(bench.fp8_target_names(bench.empty_model(cfg))) > 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert t.device.type == "cpu" and torch.isfinite(t.float()).all(), name
        if t.dtype != torch.float8_e4m3fn and t.numel() > 1:
            assert t.float().std() > 0, name  # nothing left as to_empty garbage-zero or constant
    assert model.blocks[0].modulation.dtype == torch.float32  # keep_in_fp32 kept
    assert model.blocks[0].norm3.weight.dtype == torch.bfloat16
