"""Resident memory of distributed ranks along a long video: flat in length with per-block audio.

A tpp pool of tiny DiTs with the real audio feature size (25 wav2vec2 layers x 1024 = 102 kB
per video frame) runs a video of ``--clips`` clips. When the blocks of the ``--at`` clips
arrive, the parent holds the block back until the ranks are idle (no DiT call's activations
in flight: with per-block audio they wait for the next block's features) and reads each
rank's RSS (psutil), against its RSS before the job (after a warm-up job of the same shape).
Also printed: the audio bytes each rank received and held at most at once (its stats), and
the size of the job message for a short and a long video.

Usage: python bench/bench_rank_memory.py [--clips 21] [--at 3 20] [--workers 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import psutil
import torch

import _pack

_pack.load()
from liveavatar_pack.distributed import protocol  # noqa: E402
from liveavatar_pack.distributed.launcher import PoolOptions, WorkerPool  # noqa: E402
from liveavatar_pack.distributed.sampler import DistributedSampler  # noqa: E402
from liveavatar_pack.liveavatar.config import TINY, SamplerConfig  # noqa: E402
from liveavatar_pack.liveavatar.sampler import SinkInputs, TensorAudio  # noqa: E402
from liveavatar_pack.liveavatar.tiny import TINY_LATENT_HW  # noqa: E402

DIT = dataclasses.replace(TINY, audio_dim=1024)  # the real per-frame feature size
CFG = SamplerConfig(frames_per_clip=24)  # 2 blocks per clip: many clips, few DiT calls
MiB = 2**20


def conditioning(clips: int):
    h, w = TINY_LATENT_HW
    gen = torch.Generator().manual_seed(9)
    sink = SinkInputs(torch.randn(16, 1, h, w, generator=gen), torch.randn(16, 19, h, w, generator=gen))
    audio = TensorAudio(torch.randn(1, DIT.num_audio_layers, DIT.audio_dim, CFG.frames_per_clip * clips, generator=gen))
    return torch.randn(7, DIT.text_dim, generator=gen), audio, sink


def track_bytes(clips: int) -> int:
    return clips * CFG.frames_per_clip * DIT.num_audio_layers * DIT.audio_dim * 4


def rss(pids: list[int]) -> list[int]:
    return [psutil.Process(pid).memory_info().rss for pid in pids]


def quiet(pids: list[int], timeout_s: float = 60.0) -> list[int]:
    """Wait until the processes stop using CPU (no DiT call in flight), then return them."""
    def cpu() -> float:
        return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids)

    deadline, last = time.monotonic() + timeout_s, cpu()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = cpu()
        if now - last < 0.02:
            break
        last = now
    return pids


def job_bytes(clips: int) -> int:
    """Bytes of the job message (what every rank receives up front) for a video of ``clips`` clips."""
    pool = WorkerPool(PoolOptions(model="tiny:1", workers=2))  # never started
    return len(protocol.encode(DistributedSampler(pool, CFG, *conditioning(clips), seed=0).job(clips)))


def measure(clips: int = 21, at: tuple[int, ...] = (3, 20), workers: int = 2) -> dict:
    """Per DiT rank: RSS before the job and at each ``at`` clip, audio bytes received / held at most."""
    # glibc's dynamic mmap threshold would serve the 1.2 MB block messages from the heap, whose freed pages
    # RSS keeps showing: a fixed threshold returns them, so RSS follows the bytes held (inherited by the ranks)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    spec = {"kind": "tiny", "seed": 1, "config": dataclasses.asdict(DIT)}
    text, audio, sink = conditioning(clips)
    with WorkerPool(PoolOptions(model=spec, workers=workers, mode="tpp", collective_timeout_s=60)) as pool:
        list(DistributedSampler(pool, CFG, *conditioning(4), seed=0).blocks(4))  # caches, buffers, allocator warm
        pids = [pool.worker_pids[r] for r in sorted(pool.worker_pids)]
        before = rss(quiet(pids))
        seen: dict[int, list[int]] = {}
        for out in DistributedSampler(pool, CFG, text, audio, sink, seed=0).blocks(clips):
            if out.block == 0 and out.clip in at:  # holding the block back pauses the ranks (or not)
                seen[out.clip] = rss(quiet(pids))
        stats = pool.last_stats
    return {
        "track_bytes": track_bytes(clips),
        "ranks": [
            {"rank": rank, "rss_before": before[rank], "rss_at": {clip: seen[clip][rank] for clip in at},
             "audio_bytes_received": stats[rank].get("audio_bytes_received"),
             "audio_bytes_peak": stats[rank].get("audio_bytes_peak")}
            for rank in range(len(pids))
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=21)
    parser.add_argument("--at", type=int, nargs="+", default=[3, 20])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not all(0 <= c < args.clips for c in args.at):
        parser.error(f"--at clips must lie in 0..{args.clips - 1}")
    sizes = {n: job_bytes(n) for n in (4, args.clips)}
    result = measure(args.clips, tuple(args.at), args.workers)
    result["job_bytes"] = sizes
    print(f"{args.clips} clips x {CFG.frames_per_clip} frames, audio features {result['track_bytes'] / MiB:.1f} MiB "
          f"in all; tpp, {args.workers} ranks, {psutil.cpu_count()} logical cores")
    print(f"job message: {sizes[4] / 1024:.1f} KiB for 4 clips, {sizes[args.clips] / 1024:.1f} KiB for {args.clips}")
    print("| rank | RSS before the job | " + " | ".join(f"at clip {c}" for c in args.at) + " | audio received | held at most |")
    print("|---|---|" + "---|" * len(args.at) + "---|---|")
    for r in result["ranks"]:
        cells = [f"{r['rss_before'] / MiB:.1f} MiB"]
        cells += [f"+{(r['rss_at'][c] - r['rss_before']) / MiB:.1f} MiB" for c in args.at]
        got, peak = r["audio_bytes_received"], r["audio_bytes_peak"]
        cells += [f"{got / MiB:.1f} MiB" if got is not None else "(whole track in the job)",
                  f"{peak / MiB:.2f} MiB" if peak is not None else "-"]
        print(f"| {r['rank']} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
