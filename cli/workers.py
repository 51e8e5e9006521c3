"""``--workers N --mode tpp|sp``: run the DiT on torchrun workers instead of in this process."""
from __future__ import annotations

import argparse
from typing import Callable, Iterator

import torch

from ..liveavatar.config import SamplerConfig
from ..liveavatar.pipeline import Conditioning
from ..liveavatar.sampler import BlockOutput


def add_worker_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=0,
                   help="run the DiT on this many torchrun worker processes (one per GPU; gloo on the CPU)")
    p.add_argument("--mode", choices=["tpp", "sp"], default="tpp",
                   help="tpp: denoising steps pipelined over the workers; sp: attention heads split (24 GB cards)")
    p.add_argument("--gpus", default=None, help="comma-separated GPU ids for the workers (default: the first N)")


def worker_block_source(args: argparse.Namespace, model: dict, cfg: SamplerConfig, cond: Conditioning,
                        seed: int) -> Callable[[int], Iterator[BlockOutput]]:
    """A ``VideoStream`` block source backed by the shared worker pool."""
    from ..distributed.launcher import PoolOptions
    from ..distributed.sampler import DistributedSampler

    gpus = tuple(int(g) for g in args.gpus.split(",")) if args.gpus else None
    opts = PoolOptions(model=model, workers=args.workers, mode=args.mode, gpus=gpus,
                       threads=max(1, torch.get_num_threads() // max(1, args.workers)))
    return DistributedSampler(opts, cfg, cond.text, cond.audio, cond.sink, seed).blocks
