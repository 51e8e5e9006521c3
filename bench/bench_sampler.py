"""Streaming sampler cost and memory over many clips (CPU, tiny model, real architecture).

A leak or a cache that grows with the video shows as later clips costing more time or
resident memory than early ones. Clips 0-1 carry the sink prefills, so clip 3 is the
baseline. Usage: python bench/bench_sampler.py [--size 512*512] [--clips 21] [--json out.json]
"""
from __future__ import annotations

import argparse
import gc
import json
import time

import psutil
import torch

import _pack

_pack.load()
from liveavatar_pack.liveavatar.config import TINY, SamplerConfig  # noqa: E402
from liveavatar_pack.liveavatar.sampler import SinkInputs, StreamingSampler, TensorAudio  # noqa: E402
from liveavatar_pack.liveavatar.tiny import tiny_transformer  # noqa: E402


def run() -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="512*512", help="W*H in pixels")
    parser.add_argument("--clips", type=int, default=21)
    parser.add_argument("--baseline-clip", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.size.split("*"))
    h, w = height // 8, width // 8
    cfg = SamplerConfig()
    model = tiny_transformer(seed=0)
    gen = torch.Generator().manual_seed(0)
    audio = TensorAudio(torch.randn(1, TINY.num_audio_layers, TINY.audio_dim, args.clips * cfg.frames_per_clip, generator=gen))
    sink = SinkInputs(torch.randn(16, 1, h, w, generator=gen), torch.randn(16, 19, h, w, generator=gen))
    sampler = StreamingSampler(model, cfg, torch.randn(12, TINY.text_dim, generator=gen), audio, sink, seed=0)

    proc = psutil.Process()
    seconds, cpu_seconds, rss = [], [], []
    tick, cpu_tick = time.perf_counter(), time.process_time()
    for out in sampler.blocks(args.clips):
        if out.block == cfg.blocks_per_clip - 1:
            gc.collect()
            seconds.append(time.perf_counter() - tick)
            cpu_seconds.append(time.process_time() - cpu_tick)  # this process only: robust to a busy machine
            rss.append(proc.memory_info().rss)
            print(f"clip {out.clip:3d}: {seconds[-1]:7.2f} s wall {cpu_seconds[-1]:7.2f} s cpu  "
                  f"rss {rss[-1] / 2**20:8.1f} MiB", flush=True)
            tick, cpu_tick = time.perf_counter(), time.process_time()
        del out
    base, last = args.baseline_clip, args.clips - 1
    clip_latent_bytes = 16 * cfg.latent_frames_per_clip * h * w * 4
    clip_frame_bytes = cfg.frames_per_clip * height * width * 3 * 4
    result = {
        "size": args.size,
        "threads": args.threads,
        "clips": args.clips,
        "seconds_per_clip": seconds,
        "cpu_seconds_per_clip": cpu_seconds,
        "time_ratio_last_vs_baseline": seconds[last] / seconds[base],
        "cpu_time_ratio_last_vs_baseline": cpu_seconds[last] / cpu_seconds[base],
        "rss_growth_bytes": rss[last] - rss[base],
        "one_clip_latent_bytes": clip_latent_bytes,
        "one_clip_decoded_frames_bytes": clip_frame_bytes,
        "kv_cache_bytes": sum(wk.cache.nbytes() for wk in sampler.workers) + sampler.cond.nbytes(),
    }
    print(
        f"\nclip {last} / clip {base} time: {result['time_ratio_last_vs_baseline']:.3f} wall, "
        f"{result['cpu_time_ratio_last_vs_baseline']:.3f} cpu   "
        f"RSS growth clip {base} -> {last}: {result['rss_growth_bytes'] / 2**20:.1f} MiB "
        f"(one clip: latents {clip_latent_bytes / 2**20:.1f} MiB, decoded frames {clip_frame_bytes / 2**20:.1f} MiB; "
        f"KV caches {result['kv_cache_bytes'] / 2**20:.1f} MiB, {args.threads} threads)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    run()
