"""Distributed sampler on the CPU: tpp with 2 and 3 ranks, Ulysses sp with 2, against one process; channel cost.

All runs use the same tiny model and inputs, one torch thread per process, side by side
in one invocation (ratios are what count; the core count is printed with them). Each
pool gets a warm-up job first, so start-up and first-call costs are not timed.

* frames/s of one in-process ``StreamingSampler`` (1 thread), and of ``DistributedSampler``
  on tpp pools of 1, 2 and 3 workers (1 worker = the worker path's own overhead), and on sp
  (Ulysses) pools of ``--sp`` workers, with FSDP-sharded weights and (``--sp-whole``) without;
* the channel's cost per block: a block message [16, 3, h, w] sent and received over a
  unix socket pair with the job protocol (torch.save / torch.load(weights_only=True)).

Usage: python bench/bench_distributed.py [--size 256*256] [--clips 3] [--ranks 1 2 3] [--sp 2] [--sp-whole]
       [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import threading
import time

import psutil
import torch

import _pack

_pack.load()
from liveavatar_pack.distributed import protocol  # noqa: E402
from liveavatar_pack.distributed.launcher import PoolOptions, WorkerPool  # noqa: E402
from liveavatar_pack.distributed.sampler import DistributedSampler  # noqa: E402
from liveavatar_pack.liveavatar.config import TINY, SamplerConfig  # noqa: E402
from liveavatar_pack.liveavatar.sampler import SinkInputs, StreamingSampler, TensorAudio  # noqa: E402
from liveavatar_pack.liveavatar.tiny import tiny_transformer  # noqa: E402


def make_inputs(h: int, w: int, clips: int):
    gen = torch.Generator().manual_seed(0)
    sink = SinkInputs(torch.randn(16, 1, h, w, generator=gen), torch.randn(16, 19, h, w, generator=gen))
    audio = TensorAudio(torch.randn(1, TINY.num_audio_layers, TINY.audio_dim, clips * 48 + 6, generator=gen))
    return torch.randn(12, TINY.text_dim, generator=gen), audio, sink


def channel_cost(h: int, w: int, repeats: int = 200) -> dict:
    """Seconds per block message through a socket pair (encode, send, receive, decode)."""
    a, b = socket.socketpair()
    tx, rx = protocol.Connection(a), protocol.Connection(b)
    latents = torch.randn(16, 3, h, w)
    msg = {"type": "block", "job": 1, "clip": 0, "block": 0, "latents": latents}
    got = []
    reader = threading.Thread(target=lambda: got.extend(rx.recv() for _ in range(repeats)))
    reader.start()
    tick = time.perf_counter()
    for _ in range(repeats):
        tx.send(msg)
    reader.join()
    seconds = (time.perf_counter() - tick) / repeats
    tx.close(), rx.close()
    assert torch.equal(got[-1]["latents"], latents)
    return {"seconds_per_block": seconds, "payload_bytes": len(protocol.encode(msg)), "latent_bytes": latents.nbytes}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="256*256", help="W*H in pixels")
    parser.add_argument("--clips", type=int, default=3)
    parser.add_argument("--ranks", type=int, nargs="*", default=[1, 2, 3], help="tpp pool sizes to time")
    parser.add_argument("--sp", type=int, nargs="*", default=[2], help="sp (Ulysses) pool sizes to time")
    parser.add_argument("--sp-whole", action="store_true", help="also time sp with whole (unsharded) weights per rank")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("*"))
    h, w = height // 8, width // 8
    cfg = SamplerConfig()
    text, audio, sink = make_inputs(h, w, args.clips)
    frames = args.clips * cfg.frames_per_clip
    blocks = args.clips * cfg.blocks_per_clip

    torch.set_num_threads(1)
    model = tiny_transformer(0)
    list(StreamingSampler(model, cfg, text, audio, sink, seed=0).blocks(1))  # warm-up
    tick, cpu_tick = time.perf_counter(), time.process_time()
    reference = [b.latents for b in StreamingSampler(model, cfg, text, audio, sink, seed=0).blocks(args.clips)]
    single = time.perf_counter() - tick
    single_cpu = time.process_time() - cpu_tick
    result = {
        "size": args.size,
        "clips": args.clips,
        "blocks": blocks,
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads_per_process": 1,
        "single_process": {"seconds": single, "frames_per_s": frames / single, "cpu_seconds": single_cpu},
        "tpp": {},
        "sp": {},
    }
    print(f"cores: {result['usable_cores']} usable ({result['logical_cores']} logical); 1 torch thread per process")
    print(f"load average: {os.getloadavg()[0]:.1f} (other processes share the cores: compare the CPU-time ratio)")
    print(f"single process: {single:7.2f} s  {frames / single:7.2f} frames/s  cpu {single_cpu:6.2f} s")
    for ranks in args.ranks:
        with WorkerPool(PoolOptions(model="tiny:0", workers=ranks, mode="tpp")) as pool:
            list(DistributedSampler(pool, cfg, text, audio, sink, seed=0).blocks(1))  # warm-up
            tick = time.perf_counter()
            out = [b.latents for b in DistributedSampler(pool, cfg, text, audio, sink, seed=0).blocks(args.clips)]
            seconds = time.perf_counter() - tick
        same = all(torch.equal(a, b) for a, b in zip(out, reference))
        entry = {
            "seconds": seconds,
            "frames_per_s": frames / seconds,
            "speedup_vs_single": single / seconds,
            "overhead_per_block_s": (seconds - single) / blocks if ranks == 1 else None,
            "equal_to_single": same,
        }
        result["tpp"][ranks] = entry
        extra = f"  worker-path overhead {entry['overhead_per_block_s'] * 1e3:7.2f} ms/block" if ranks == 1 else ""
        print(f"tpp {ranks} rank(s):  {seconds:7.2f} s  {frames / seconds:7.2f} frames/s  x{single / seconds:5.2f}  equal={same}{extra}")
    for ranks in args.sp:
        for shard in (True, False) if args.sp_whole else (True,):
            opts = PoolOptions(model="tiny:0", workers=ranks, mode="sp", shard_weights=shard)
            with WorkerPool(opts) as pool:
                list(DistributedSampler(pool, cfg, text, audio, sink, seed=0).blocks(1))  # warm-up
                procs = [psutil.Process(pid) for pid in pool.worker_pids.values()]
                before = [sum(p.cpu_times()[:2]) for p in procs]
                tick = time.perf_counter()
                out = [b.latents for b in DistributedSampler(pool, cfg, text, audio, sink, seed=0).blocks(args.clips)]
                seconds = time.perf_counter() - tick
                cpu = max(sum(p.cpu_times()[:2]) - b for p, b in zip(procs, before))  # the busiest rank
            err = max((a - b).abs().max().item() / max(1.0, b.abs().max().item()) for a, b in zip(out, reference))
            name = f"{ranks}{'' if shard else '_whole_weights'}"
            result["sp"][name] = {"seconds": seconds, "frames_per_s": frames / seconds,
                                  "speedup_vs_single": single / seconds, "max_rel_error": err, "sharded_weights": shard,
                                  "busiest_rank_cpu_seconds": cpu, "cpu_speedup_vs_single": single_cpu / cpu}
            print(f"sp {ranks} rank(s){'' if shard else ' (whole weights)'}:  {seconds:7.2f} s  "
                  f"{frames / seconds:7.2f} frames/s  x{single / seconds:5.2f}  busiest rank cpu {cpu:6.2f} s "
                  f"(x{single_cpu / cpu:4.2f})  max rel err {err:.1e}")
    result["channel"] = channel_cost(h, w)
    ch = result["channel"]
    print(f"channel: {ch['seconds_per_block'] * 1e6:8.1f} us per block message ({ch['payload_bytes']} bytes, {ch['latent_bytes']} of latents)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
