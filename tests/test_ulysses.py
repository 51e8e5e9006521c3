"""Ulysses sequence parallel (distributed/ulysses.py) and the tpp x sp layouts.

Every layout must give the single-process latents (within 1e-5 of max|x|) on the golden
conditioning and the same decoded video (within 1 grey level); each sp rank must execute at
most 1/N + 10% of the single-process FLOPs of a DiT call, and send the bytes
``predicted_wire_bytes`` predicts (within 10%).
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import golden_subdir
from goldens import golden_audio_features, golden_sampler_config, read_json
from liveavatar_pack.distributed.launcher import PoolOptions, WorkerError, WorkerPool
from liveavatar_pack.distributed.sampler import DistributedSampler
from liveavatar_pack.distributed.ulysses import UlyssesGroup, UlyssesSplit, head_range, split_sizes, token_range
from liveavatar_pack.liveavatar.config import TINY, SamplerConfig
from liveavatar_pack.liveavatar.sampler import Cancelled, SinkInputs, StreamingSampler, TableRopeOffsets, TensorAudio
from liveavatar_pack.liveavatar.transformer import token_segments
from liveavatar_pack.model_loaders.wire_bytes import SPLayout, predicted_wire_bytes

TESTS = Path(__file__).resolve().parent
RANKS = TESTS / "ulysses_ranks.py"


# ----------------------------------------------------------------------------- no processes
def test_uneven_token_and_head_splits():
    assert split_sizes(7, 3) == [3, 2, 2] and split_sizes(6, 3) == [2, 2, 2]
    assert [token_range(7, r, 3) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
    assert [head_range(4, r, 3) for r in range(3)] == [(0, 2), (2, 3), (3, 4)]
    with pytest.raises(ValueError, match="at least 5 attention heads"):
        head_range(4, 0, 5)
    with pytest.raises(ValueError, match="sequence of 2 tokens"):
        UlyssesSplit(UlyssesGroup(0, 3, 6)).shard(2)
    # a slice crossing frame boundaries: per-frame modulation rows, relative token ranges
    assert token_segments(15, 45, 20) == [(0, 0, 5), (1, 5, 25), (2, 25, 30)]
    assert token_segments(0, 20, 20) == [(0, 0, 20)]


def test_wire_bytes_formula_scales_like_ulysses():
    """Activation bytes per rank ~ 4 * L * dim * (N-1)/N per layer; weights ~ (N-1)/N of the call's units."""
    cfg = dataclasses.replace(TINY, dim=96, num_heads=6, ffn_dim=192)
    geo = SimpleNamespace(block_tokens=240)
    two = predicted_wire_bytes(cfg, geo, SPLayout(2, shard_weights=False, activation_bytes=4))
    assert two["all_to_all"] == cfg.num_layers * 4 * 120 * 96 * 4 // 2 * 1
    three = predicted_wire_bytes(cfg, geo, SPLayout(3, shard_weights=False, activation_bytes=4))
    assert three["all_to_all"] == cfg.num_layers * 4 * 80 * 96 * 4 * 2 // 3
    assert predicted_wire_bytes(cfg, geo, SPLayout(1))["total"] == 0
    sharded = predicted_wire_bytes(cfg, geo, SPLayout(2, activation_bytes=4, weight_bytes=4))
    assert sharded["total"] == sharded["all_to_all"] + sharded["gather"] + sharded["weights"] and sharded["weights"] > 0


def test_tpp_x_sp_layouts_are_chosen_on_the_cli_and_the_launcher_node_with_one_line_errors(tmp_path, capsys):
    from node_env import comfy_double

    from liveavatar_pack import cli

    with comfy_double(tmp_path):
        from liveavatar_pack.nodes.distributed import DistributedLauncher, pool_options

        assert "sp" in [i.id for i in DistributedLauncher.define_schema().inputs]
        opts = pool_options("/m/dit.safetensors", "dit.safetensors", None, None, "fp8", "0-3", 0, "tpp", 0, sp=2)
        with pytest.raises(ValueError, match="4 workers do not split into groups of 3"):
            pool_options("/m/dit.safetensors", "dit.safetensors", None, None, "fp8", "0-3", 0, "tpp", 0, sp=3)
    assert (opts.workers, opts.sp, opts.sp_size, opts.step_groups) == (4, 2, 2, 2)
    assert PoolOptions(workers=8, mode="tpp", sp=2).step_groups == 4 and PoolOptions(workers=3, mode="sp").sp_size == 3
    assert PoolOptions(workers=4, mode="tpp", sp=2, decode_rank=True).procs == 5
    with pytest.raises(ValueError, match="mode sp runs all 4 workers as one sp group"):
        PoolOptions(workers=4, mode="sp", sp=2)
    out = str(tmp_path / "x.mp4")
    for argv, message in (
        (["--workers", "3", "--mode", "tpp", "--sp", "2"], "3 workers do not split into groups of 2"),
        (["--workers", "10", "--mode", "tpp", "--sp", "2"], "5 step groups (10 workers / sp 2) for 4 steps"),
        (["--sp", "2"], "--sp 2 needs --workers"),
    ):
        assert cli.main(["demo", "--out", out, *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not Path(out).exists()


# ----------------------------------------------------------------------------- gloo ranks (one DiT call measured)
def _ranks(tmp_path, world: int, **spec) -> list[dict]:
    out = tmp_path / f"w{world}"
    subprocess.run([sys.executable, str(RANKS), json.dumps({"world": world, **spec}), str(out)], check=True,
                   timeout=300, stdin=subprocess.DEVNULL)
    return [torch.load(f"{out}.{r}", weights_only=True) for r in range(world)]


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> float:
    err = (a - b).abs().max().item()
    assert err <= rel * max(1.0, b.abs().max().item()), f"max |diff| {err:.3g}"
    return err


# 6 heads (splits over 2 and 3), 9 x 11 patches a frame: 297 tokens a block, uneven over 2 ranks
FLOP_SPEC = {"hw": [18, 22], "dit": {"dim": 96, "num_heads": 6, "ffn_dim": 192}}


@pytest.mark.distributed
def test_each_sp_rank_runs_a_1_over_n_share_of_the_flops_and_sends_the_predicted_bytes(tmp_path):
    single = _ranks(tmp_path, 1, **FLOP_SPEC)[0]
    cfg = dataclasses.replace(TINY, **FLOP_SPEC["dit"])
    for n in (2, 3):
        ranks = _ranks(tmp_path, n, **FLOP_SPEC)
        for rank, got in enumerate(ranks):
            for a, b in zip(got["latents"], single["latents"]):
                _close(a, b)
            _close(got["velocity"], single["velocity"])
            share = got["flops"] / single["flops"]
            assert share <= 1.1 / n, f"sp {n} rank {rank}: {share:.3f} of the single-process FLOPs"
            predicted = predicted_wire_bytes(cfg, SimpleNamespace(block_tokens=297),
                                             SPLayout(n, shard_weights=False, activation_bytes=4), rank)
            assert abs(got["wire"] - predicted["total"]) <= 0.1 * predicted["total"], (n, rank, got["wire_by_op"], predicted)
            assert got["wire"] == got["all_to_all_bytes"]  # nothing but the wrapper's all-to-alls went out


@pytest.mark.distributed
def test_sharded_weights_bytes_match_the_prediction_and_the_next_block_is_prefetched(tmp_path):
    single = _ranks(tmp_path, 1, hw=[8, 10])[0]
    ranks = _ranks(tmp_path, 2, hw=[8, 10], shard=True)
    for rank, got in enumerate(ranks):
        for a, b in zip(got["latents"], single["latents"]):
            _close(a, b)
        predicted = predicted_wire_bytes(TINY, SimpleNamespace(block_tokens=60),
                                         SPLayout(2, activation_bytes=4, weight_bytes=4), rank)
        assert predicted["weights"] > 0 and got["wire_by_op"]["all_gather"] > 0
        assert abs(got["wire"] - predicted["total"]) <= 0.1 * predicted["total"], (got["wire_by_op"], predicted)
        # when block k starts computing, block k+1's all-gather is already issued
        assert got["prefetched"] == [True] * (TINY.num_layers - 1)


# ----------------------------------------------------------------------------- worker pools, golden conditioning
@pytest.fixture(scope="module")
def golden(golden_dir):
    tpp = load_file(golden_subdir(golden_dir, "pipeline_tpp") / "golden.safetensors")
    noise = load_file(golden_subdir(golden_dir, "pipeline") / "golden.safetensors")
    log = read_json(golden_dir / "pipeline_tpp" / "call_log.json")
    g = {**tpp, **{k: v for k, v in noise.items() if k.endswith("_noise")}}
    return SimpleNamespace(
        cfg=golden_sampler_config(g, log), clips=log["num_clips"], text=g["text_context"],
        audio=TensorAudio(golden_audio_features(golden_subdir(golden_dir, "audio"))),
        sink=SinkInputs(g["ref_latents_clip0"][0], g["motion_latents"][0]),
        offsets=TableRopeOffsets(g["rope_offsets"].tolist()), noise=[g["clip0_noise"], g["clip1_noise"]],
        spec={"kind": "callable", "target": f"{RANKS}:golden_model", "kwargs": {"dit_dir": str(golden_dir / "dit")}},
    )


@pytest.fixture(scope="module")
def golden_reference(golden):
    sys.path.insert(0, str(TESTS))
    from ulysses_ranks import golden_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = golden_model(golden.spec["kwargs"]["dit_dir"])
        sampler = StreamingSampler(model, golden.cfg, golden.text, golden.audio, golden.sink, seed=0,
                                   rope_offsets=golden.offsets, noise=lambda c: golden.noise[c])
        return [b.latents for b in sampler.blocks(golden.clips)]
    finally:
        torch.set_num_threads(threads)


def _decoded(cfg, sink, blocks) -> torch.Tensor:
    from liveavatar_pack.liveavatar.tiny import tiny_vae
    from liveavatar_pack.liveavatar.vae import BlockDecoder, to_uint8

    decoder = BlockDecoder.from_config(tiny_vae(3), cfg)
    decoder.warm_up(sink.motion_latents)
    return torch.cat([to_uint8(decoder.decode_block(b)) for b in blocks])


def _golden_run(pool, golden, check_cancel=None, clips=None):
    sampler = DistributedSampler(pool, golden.cfg, golden.text, golden.audio, golden.sink, seed=0,
                                 rope_offsets=golden.offsets, noise=lambda c: golden.noise[c % 2],
                                 check_cancel=check_cancel)
    return [b.latents for b in sampler.blocks(clips or golden.clips)], sampler.stats


# sp2 shards the weights (FSDP2, the default); the others keep them whole per rank (the same math, less
# CPU: FSDP2's hooks cost more than the tiny model's compute); test_distributed.py and the tpp x sp fault
# test below run sharded pools too
LAYOUTS = {"sp2": dict(workers=2, mode="sp"), "sp3": dict(workers=3, mode="sp", shard_weights=False),
           "tpp2xsp2": dict(workers=4, mode="tpp", sp=2, shard_weights=False)}
TINY_VAE = {"kind": "tiny_vae", "seed": 3}


@pytest.mark.distributed
@pytest.mark.golden
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_gives_the_single_process_latents_and_video_on_golden_conditioning(layout, golden, golden_reference):
    opts = PoolOptions(model=golden.spec, collective_timeout_s=60, **LAYOUTS[layout])
    with WorkerPool(opts) as pool:
        out, stats = _golden_run(pool, golden)
    assert len(out) == len(golden_reference)
    for a, b in zip(out, golden_reference):
        _close(a, b)
    video, ref_video = _decoded(golden.cfg, golden.sink, out), _decoded(golden.cfg, golden.sink, golden_reference)
    assert (video.int() - ref_video.int()).abs().max().item() <= 1
    n = opts.sp if opts.mode == "tpp" else opts.workers
    tokens = golden.cfg.latent_frames_per_block * 16  # 8 x 8 latents: 16 tokens a frame
    for rank, s in stats.items():
        assert s["all_to_alls"] > 0
        assert s["tokens_per_call"] == split_sizes(tokens, n)
        assert tuple(s["heads"]) == head_range(TINY.num_heads, rank % n, n)


@pytest.mark.distributed
@pytest.mark.golden
def test_tpp_x_sp_with_a_decode_rank_streams_the_single_process_video(golden, golden_reference):
    """2 step groups x 2-way sp + the decode rank (5 ranks): its frames are the single-process decode."""
    opts = PoolOptions(model=golden.spec, workers=4, mode="tpp", sp=2, decode_rank=True, shard_weights=False,
                       collective_timeout_s=60)
    with WorkerPool(opts) as pool:
        sampler = DistributedSampler(pool, golden.cfg, golden.text, golden.audio, golden.sink, seed=0,
                                     rope_offsets=golden.offsets, noise=lambda c: golden.noise[c], vae=TINY_VAE)
        chunks = list(sampler.frames(golden.clips))
        stats = sampler.stats
    video = torch.cat([c.frames for c in chunks])
    ref_video = _decoded(golden.cfg, golden.sink, golden_reference)
    assert video.shape == ref_video.shape and (video.int() - ref_video.int()).abs().max().item() <= 1
    assert stats[4]["dit_calls"] == 0 and len(stats[4]["block_times"]) == len(golden_reference)


@pytest.mark.distributed
def test_tpp_x_sp_layout_interrupt_crash_reuse_and_release():
    """4 ranks = 2 step groups x 2-way sp on the tiny DiT: an interrupt stops every rank at one block and the
    warm pool runs again; a killed rank fails the run within 10 s and the next run starts fresh; close frees all."""
    import psutil

    from test_distributed import distributed, inputs, single_process

    reference = single_process(2)
    pool = WorkerPool(PoolOptions(model="tiny:1", workers=4, mode="tpp", sp=2, collective_timeout_s=60))
    try:
        out, stats = distributed(pool, 2)
        assert all((a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item()) for a, b in zip(out, reference))
        assert {r: s["steps"] for r, s in stats.items()} == {0: [0, 1], 1: [0, 1], 2: [2, 3], 3: [2, 3]}
        assert all(s["tokens_per_call"] == [30, 30] for s in stats.values())
        starts, seen = pool.starts, []
        sampler = DistributedSampler(pool, SamplerConfig(), *inputs(3), seed=0,
                                     check_cancel=lambda: (_ for _ in ()).throw(Cancelled()) if len(seen) >= 2 else None)
        with pytest.raises(Cancelled):
            for block in sampler.blocks(3):
                seen.append(block)
        stops = {r: s["stopped_at"] for r, s in pool.last_stats.items()}
        assert len(stops) == 4 and len(set(stops.values())) == 1 and None not in stops.values(), stops
        again, _ = distributed(pool, 2)
        assert all(torch.equal(a, b) for a, b in zip(again, out)) and pool.starts == starts

        victim, t_kill = pool.worker_pids[3], None
        with pytest.raises(WorkerError) as err:
            for _ in DistributedSampler(pool, SamplerConfig(), *inputs(6), seed=0).blocks(6):
                if t_kill is None:
                    os.kill(victim, signal.SIGKILL)
                    t_kill = time.monotonic()
        assert time.monotonic() - t_kill < 10 and not pool.running
        assert "died" in str(err.value) or "failed" in str(err.value)
        fresh, _ = distributed(pool, 2)
        assert all(torch.equal(a, b) for a, b in zip(fresh, out)) and pool.starts == starts + 1
        pids = [pool.agent_pid, *pool.worker_pids.values()]
    finally:
        pool.close()
    deadline = time.monotonic() + 15
    alive = lambda p: psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE  # noqa: E731
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    assert not [p for p in pids if alive(p)]
