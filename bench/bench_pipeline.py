"""End-to-end streaming cost and memory over many clips: DiT + streaming VAE decode + MP4 writer.

Tiny random models with the real architectures on the CPU. A leak (frames or caches kept)
shows as resident memory growing between an early clip and the last one, or as later
blocks costing more to decode. Usage:
  python bench/bench_pipeline.py [--size 256*256] [--clips 21] [--json out.json]
"""
from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch

import _pack

_pack.load()
from liveavatar_pack.liveavatar.audio import AudioFeatures, Waveform  # noqa: E402
from liveavatar_pack.liveavatar.config import SamplerConfig  # noqa: E402
from liveavatar_pack.liveavatar.demo_assets import synth_face, synth_speech  # noqa: E402
from liveavatar_pack.liveavatar.image import load_reference_image  # noqa: E402
from liveavatar_pack.liveavatar.pipeline import Conditioning, VideoStream, encode_reference  # noqa: E402
from liveavatar_pack.liveavatar.tiny import tiny_audio_encoder, tiny_transformer, tiny_vae  # noqa: E402
from liveavatar_pack.liveavatar.video import Mp4Writer  # noqa: E402


def run() -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="256*256")
    parser.add_argument("--clips", type=int, default=21)
    parser.add_argument("--baseline-clip", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = SamplerConfig()
    seconds = args.clips * cfg.frames_per_clip / cfg.fps
    pixels = load_reference_image(synth_face(), args.size)
    vae = tiny_vae(seed=1)
    cond = Conditioning(
        torch.randn(9, 32, generator=torch.Generator().manual_seed(0)),
        AudioFeatures(tiny_audio_encoder(seed=2), Waveform(synth_speech(seconds), 16000, "synthetic")),
        encode_reference(vae, pixels, cfg), *pixels.shape[1:],
    )
    stream = VideoStream(tiny_transformer(seed=0), vae, cond, cfg, seed=0, num_clips=args.clips)
    # Time the decode alone: wrap the block decoder's call.
    from liveavatar_pack.liveavatar import vae as vae_module

    decode_seconds: list[float] = []
    original = vae_module.BlockDecoder.decode_block

    def timed(self, latents):
        t = time.perf_counter()
        out = original(self, latents)
        decode_seconds.append(time.perf_counter() - t)
        return out

    vae_module.BlockDecoder.decode_block = timed
    proc = psutil.Process()
    clip_seconds, clip_cpu, clip_rss = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.mp4"
        tick, cpu_tick = time.perf_counter(), time.process_time()
        with Mp4Writer(out, fps=cfg.fps) as writer:
            for chunk in stream:
                writer.write(chunk.frames)
                if chunk.block == cfg.blocks_per_clip - 1:
                    gc.collect()
                    clip_seconds.append(time.perf_counter() - tick)
                    clip_cpu.append(time.process_time() - cpu_tick)  # this process (ffmpeg excluded)
                    clip_rss.append(proc.memory_info().rss)
                    print(f"clip {chunk.clip:3d}: {clip_seconds[-1]:6.2f} s wall {clip_cpu[-1]:6.2f} s cpu  rss {clip_rss[-1] / 2**20:8.1f} MiB  "
                          f"decode/block {np.mean(decode_seconds[-cfg.blocks_per_clip:]):.3f} s", flush=True)
                    tick, cpu_tick = time.perf_counter(), time.process_time()
                del chunk
    vae_module.BlockDecoder.decode_block = original
    base, last = args.baseline_clip, args.clips - 1
    per_block = decode_seconds[1:]  # the first block also finishes the warm-up path
    bpc = cfg.blocks_per_clip
    early = float(np.mean(per_block[base * bpc - 1 : (base + 1) * bpc - 1]))
    late = float(np.mean(per_block[-bpc:]))
    height, width = pixels.shape[1:]
    result = {
        "size": f"{width}*{height}", "clips": args.clips, "threads": args.threads,
        "seconds_per_clip": clip_seconds,
        "cpu_seconds_per_clip": clip_cpu,
        "clip_time_ratio_last_vs_baseline": clip_seconds[last] / clip_seconds[base],
        "clip_cpu_ratio_last_vs_baseline": clip_cpu[last] / clip_cpu[base],
        "decode_seconds_per_block_baseline_clip": early, "decode_seconds_per_block_last_clip": late,
        "decode_ratio_last_vs_baseline": late / early,
        "rss_growth_bytes": clip_rss[last] - clip_rss[base],
        "one_clip_uint8_frames_bytes": cfg.frames_per_clip * height * width * 3,
        "one_clip_float_frames_bytes": cfg.frames_per_clip * height * width * 3 * 4,
    }
    print(f"\nclip {last}/clip {base} time {result['clip_time_ratio_last_vs_baseline']:.3f} wall, "
          f"{result['clip_cpu_ratio_last_vs_baseline']:.3f} cpu; decode per block "
          f"{early:.3f} s -> {late:.3f} s ({result['decode_ratio_last_vs_baseline']:.3f}); RSS growth "
          f"{result['rss_growth_bytes'] / 2**20:.1f} MiB (one clip of frames: {result['one_clip_uint8_frames_bytes'] / 2**20:.1f} MiB "
          f"uint8, {result['one_clip_float_frames_bytes'] / 2**20:.1f} MiB float32); {args.threads} threads")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    run()
