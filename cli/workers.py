"""``--workers N --mode tpp|sp [--sp M]``: run the DiT on torchrun workers instead of in this process."""
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
                   help="tpp: denoising steps pipelined over the workers; sp: every layer's tokens split over all "
                        "workers (Ulysses; weights sharded: 24 GB cards)")
    p.add_argument("--sp", type=int, default=1, metavar="N",
                   help="with --mode tpp: step groups of N sequence-parallel workers (e.g. --workers 4 --mode tpp "
                        "--sp 2: 2 groups x 2-way sp); --workers must be a multiple of N")
    p.add_argument("--gpus", default=None, help="comma-separated GPU ids for the workers (default: the first N)")
    p.add_argument("--nnodes", type=int, default=1,
                   help="machines in the pool; the others run `python -m liveavatar worker-agent` (README)")
    p.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                   help="with --nnodes > 1: this machine's address and a free port, where the agents join")
    p.add_argument("--channel-host", default="127.0.0.1",
                   help="address the job channel listens on; other machines need this machine's LAN address "
                        "or 0.0.0.0 (trusted networks only)")
    p.add_argument("--nccl-p2p-disable", action="store_true",
                   help="NCCL_P2P_DISABLE=1 on every rank (consumer cards without working peer-to-peer)")
    p.add_argument("--decode-rank", action="store_true",
                   help="tpp: one more worker (GPU) holds the VAE and streams the decoded frames (upstream's 4+1 layout)")


def check_worker_layout(args: argparse.Namespace, cfg: SamplerConfig) -> None:
    """One-line error for an impossible --workers/--mode/--sp/--steps combination (before any model loads)."""
    from ..distributed.launcher import check_sp_layout

    if args.workers:
        check_sp_layout(args.mode, args.workers * getattr(args, "nnodes", 1), getattr(args, "sp", 1), cfg.steps)
    elif getattr(args, "sp", 1) != 1:
        raise ValueError(f"--sp {args.sp} needs --workers (a multiple of {args.sp})")


def worker_sources(args: argparse.Namespace, model: dict, cfg: SamplerConfig, cond: Conditioning, seed: int,
                   vae: dict) -> dict:
    """``VideoStream`` keyword arguments: ``block_source``, or with ``--decode-rank`` a ``frame_source``
    (the VAE described by ``vae`` then decodes on the extra worker)."""
    if not getattr(args, "decode_rank", False):
        return {"block_source": worker_block_source(args, model, cfg, cond, seed)}
    return {"frame_source": worker_block_source(args, model, cfg, cond, seed, vae=vae)}


def worker_block_source(args: argparse.Namespace, model: dict, cfg: SamplerConfig, cond: Conditioning,
                        seed: int, vae: dict | None = None) -> Callable[[int], Iterator[BlockOutput]]:
    """A ``VideoStream`` block source backed by the shared worker pool (with ``vae``: a decode rank's frames)."""
    from ..distributed.sampler import DistributedSampler

    opts = pool_options(args, model, decode_rank=vae is not None)
    sampler = DistributedSampler(opts, cfg, cond.text, cond.audio, cond.sink, seed, vae=vae)
    return sampler.frames if vae is not None else sampler.blocks


def pool_options(args: argparse.Namespace, model: dict, decode_rank: bool = False):
    """The ``PoolOptions`` the worker flags describe (``generate``, ``demo`` and ``live`` share them)."""
    from ..distributed.launcher import LOOPBACK, PoolOptions

    gpus = tuple(int(g) for g in args.gpus.split(",")) if args.gpus else None
    nnodes = getattr(args, "nnodes", 1)
    channel_host = getattr(args, "channel_host", "127.0.0.1")
    tcp = nnodes > 1 or channel_host not in LOOPBACK
    return PoolOptions(model=model, workers=args.workers, mode=args.mode, gpus=gpus,
                       threads=max(1, torch.get_num_threads() // max(1, args.workers)),
                       nnodes=nnodes, rdzv_endpoint=getattr(args, "rdzv_endpoint", None),
                       channel="tcp" if tcp else "unix", channel_host=channel_host,
                       nccl_p2p_disable=getattr(args, "nccl_p2p_disable", False), decode_rank=decode_rank,
                       sp=getattr(args, "sp", 1))
