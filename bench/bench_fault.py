"""Distributed fault report latency on the CPU: how long after a rank raises does the caller get
its ``WorkerError`` (with the rank's traceback), and how long until the pool is down.

A tiny DiT whose ``after``-th block call raises on one rank (the same fault as
``tests/test_distributed.py::test_rank_that_raises_reports_its_traceback``) writes the wall-clock
time of the raise to a file; the caller compares it with the time the error reached it. The test
asserts only what happened (the error, its rank and traceback, the pool ended): a loaded machine
makes the latency vary (13.4 s was seen under load against ~1-3 s idle), so it is measured here.

``--kill``: the other fault, ``kill -9`` of the last rank (the one streaming blocks) while the caller
consumes slowly (``--consume-s`` per block, so received blocks queue up): the time from the kill to
the ``WorkerError`` at the caller, which must name that rank and SIGKILL (goal < 10 s; before the
failure path was separate from the data it queued behind the blocks: 27-54 s).

Usage: python bench/bench_fault.py [--repeats 3] [--channel tcp] [--kill [--consume-s 0.5]] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when a worker imports this file by path
import _pack  # noqa: E402

_pack.load()
from liveavatar_pack.distributed.launcher import PoolOptions, WorkerError, WorkerPool  # noqa: E402
from liveavatar_pack.distributed.sampler import DistributedSampler  # noqa: E402
from liveavatar_pack.liveavatar.config import TINY, SamplerConfig  # noqa: E402
from liveavatar_pack.liveavatar.sampler import SinkInputs, TensorAudio  # noqa: E402
from liveavatar_pack.liveavatar.tiny import TINY_LATENT_HW, tiny_transformer  # noqa: E402

H, W = TINY_LATENT_HW


def faulty_model(seed: int, rank: int, after: int, stamp: str):
    """The tiny DiT; on ``rank`` its ``after``-th block call writes time.time() to ``stamp`` and raises."""
    model = tiny_transformer(seed)
    if int(os.environ.get("RANK", -1)) == rank:
        forward, calls = model.forward_block, {"n": 0}

        def failing(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] > after:
                Path(stamp).write_text(repr(time.time()))
                raise RuntimeError("injected fault in forward_block")
            return forward(*args, **kwargs)

        model.forward_block = failing
    return model


def one_fault(channel: str, stamp: Path) -> dict:
    gen = torch.Generator().manual_seed(123)
    sink = SinkInputs(torch.randn(16, 1, H, W, generator=gen), torch.randn(16, 19, H, W, generator=gen))
    audio = TensorAudio(torch.randn(1, TINY.num_audio_layers, TINY.audio_dim, 48 * 2 + 6, generator=gen))
    text = torch.randn(7, TINY.text_dim, generator=gen)
    spec = {"kind": "callable", "target": f"{Path(__file__).resolve()}:faulty_model",
            "kwargs": {"seed": 1, "rank": 1, "after": 3, "stamp": str(stamp)}}
    pool = WorkerPool(PoolOptions(model=spec, workers=2, collective_timeout_s=60, channel=channel))
    with pool:
        try:
            list(DistributedSampler(pool, SamplerConfig(), text, audio, sink, seed=0).blocks(2))
            raise RuntimeError("the injected fault did not reach the caller")
        except WorkerError as err:
            reported = time.time()
            assert err.rank == 1 and "injected fault in forward_block" in err.traceback_tail
        raised = float(stamp.read_text())
        while pool.running and time.time() - reported < 120:
            time.sleep(0.01)
        down = time.time()
    return {"report_s": reported - raised, "pool_down_s": down - raised}


def one_kill(channel: str, consume_s: float) -> dict:
    gen = torch.Generator().manual_seed(123)
    clips = 6
    sink = SinkInputs(torch.randn(16, 1, H, W, generator=gen), torch.randn(16, 19, H, W, generator=gen))
    audio = TensorAudio(torch.randn(1, TINY.num_audio_layers, TINY.audio_dim, 48 * clips + 6, generator=gen))
    text = torch.randn(7, TINY.text_dim, generator=gen)
    with WorkerPool(PoolOptions(model="tiny:1", workers=2, collective_timeout_s=60, channel=channel)) as pool:
        victim = pool.worker_pids[1]
        killed = None
        consumed = 0
        try:
            for _ in DistributedSampler(pool, SamplerConfig(), text, audio, sink, seed=0).blocks(clips):
                if killed is None:
                    os.kill(victim, signal.SIGKILL)
                    killed = time.time()
                else:
                    consumed += 1
                time.sleep(consume_s)  # a slow consumer (e.g. decoding and writing video): blocks queue up
            raise RuntimeError("the kill did not reach the caller")
        except WorkerError as err:
            reported = time.time()
            assert err.rank == 1 and "SIGKILL" in str(err).splitlines()[0], str(err)
    return {"report_s": reported - killed, "blocks_after_kill": consumed}


def kill_main(args) -> dict:
    runs = []
    for i in range(args.repeats):
        runs.append(one_kill(args.channel, args.consume_s))
        print(f"run {i + 1}: kill -9 of rank 1 reported {runs[-1]['report_s']:.3f} s later "
              f"({runs[-1]['blocks_after_kill']} blocks consumed after the kill)")
    result = {"fault": "kill -9", "channel": args.channel, "cores": os.cpu_count(), "consume_s": args.consume_s,
              "runs": runs, "median_report_s": statistics.median(r["report_s"] for r in runs)}
    print(f"median: kill -9 reported after {result['median_report_s']:.3f} s ({args.repeats} runs, "
          f"{result['cores']} cores, channel {args.channel}, {args.consume_s} s per consumed block)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--channel", default="tcp", help="worker channel (tcp or unix)")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--kill", action="store_true", help="kill -9 the last rank instead of raising in it")
    parser.add_argument("--consume-s", type=float, default=0.5, help="--kill: the caller's time per block")
    args = parser.parse_args()
    if args.kill:
        return kill_main(args)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            runs.append(one_fault(args.channel, Path(tmp) / f"raised-{i}"))
            print(f"run {i + 1}: error at the caller {runs[-1]['report_s']:.3f} s after the raise, "
                  f"pool down after {runs[-1]['pool_down_s']:.3f} s")
    result = {"channel": args.channel, "cores": os.cpu_count(), "runs": runs,
              "median_report_s": statistics.median(r["report_s"] for r in runs),
              "median_pool_down_s": statistics.median(r["pool_down_s"] for r in runs)}
    print(f"median: report {result['median_report_s']:.3f} s, pool down {result['median_pool_down_s']:.3f} s "
          f"({args.repeats} runs, {result['cores']} cores, channel {args.channel})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
