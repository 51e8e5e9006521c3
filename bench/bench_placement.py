"""Block-swap and KV-offload overhead against all-on-device, side by side in one run.

On the CPU a "transfer" moves nothing, so the ratios measure the bookkeeping the placement
adds (hooks, slot swaps, prefetch tickets, fp8 encode/decode of caches); on a GPU the same
script measures real transfers. Usage:
  python bench/bench_placement.py [--device cpu|cuda] [--size 256*256] [--clips 2] [--repeats 2]
"""
from __future__ import annotations

import argparse
import time

import torch

import _pack

_pack.load()
from liveavatar_pack.liveavatar.config import TINY, SamplerConfig  # noqa: E402
from liveavatar_pack.liveavatar.sampler import SinkInputs, StreamingSampler, TensorAudio  # noqa: E402
from liveavatar_pack.liveavatar.tiny import tiny_transformer  # noqa: E402
from liveavatar_pack.model_loaders.placement import PlacementConfig, apply_placement  # noqa: E402

CONFIGS = {
    "all on device": None,
    "block swap, 2 blocks resident": dict(blocks_on_device=2),
    "block swap, 1 block resident": dict(blocks_on_device=1),
    "KV caches in host memory": dict(kv_cache_device="cpu"),
    "KV caches fp8": dict(kv_cache_dtype="float8_e4m3fn"),
    "block swap 1 + KV host": dict(blocks_on_device=1, kv_cache_device="cpu"),
}


def one_run(placement, device, h, w, clips) -> float:
    model = tiny_transformer(seed=0)
    gen = torch.Generator().manual_seed(0)
    sink = SinkInputs(torch.randn(16, 1, h, w, generator=gen), torch.randn(16, 19, h, w, generator=gen))
    audio = TensorAudio(torch.randn(1, TINY.num_audio_layers, TINY.audio_dim, clips * 48, generator=gen))
    text = torch.randn(9, TINY.text_dim, generator=gen)
    cfg = SamplerConfig()
    if placement is None:
        model.to(device)
        sampler = StreamingSampler(model, cfg, text, audio, sink, seed=0)
        start = time.perf_counter()
        for _ in sampler.blocks(clips):
            pass
    else:
        placed = apply_placement(model, PlacementConfig(device=device, **placement))
        with placed.in_use():
            sampler = StreamingSampler(model, cfg, text, audio, sink, seed=0, cache_storage=placed.cache_storage())
            start = time.perf_counter()
            for _ in sampler.blocks(clips):
                pass
        placed.remove()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default="256*256")
    parser.add_argument("--clips", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the best time counts")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("*"))
    h, w = height // 8, width // 8
    best = {name: float("inf") for name in CONFIGS}
    for _ in range(args.repeats):  # interleaved, so machine noise hits every configuration alike
        for name, placement in CONFIGS.items():
            best[name] = min(best[name], one_run(placement, args.device, h, w, args.clips))
    base = best["all on device"]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"| placement ({device_name}, {args.size}, {args.clips} clips) | seconds | vs all on device |")
    print("|---|---|---|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.2f} | {seconds / base:.2f} |")


if __name__ == "__main__":
    main()
