"""``python -m liveavatar worker-agent``: this machine's GPUs join a head's worker pool (several machines)."""
from __future__ import annotations

import argparse


class WorkerAgent:
    """Run torchrun with the pack's worker entry as a non-head node of a multi-machine pool.

    Start one on every other machine (same pack version and model files), then run the head
    (ComfyUI's 'LiveAvatar Distributed Launcher' with nnodes > 1, or `generate --nnodes`).
    The agent rejoins each new pool of the head until stopped (Ctrl-C).
    Trusted networks only: torch's rendezvous and collectives are unauthenticated.
    """

    name = "worker-agent"

    def register(self, sub: argparse._SubParsersAction) -> None:
        p = sub.add_parser(self.name, help="join a multi-machine worker pool (run on each non-head machine)",
                           description=self.__doc__)
        p.add_argument("--rdzv-endpoint", required=True, metavar="HOST:PORT",
                       help="the head machine's rendezvous address (its rdzv_endpoint option)")
        p.add_argument("--nnodes", type=int, required=True, help="machines in the pool, the head included")
        p.add_argument("--nproc-per-node", type=int, default=1, help="workers on this machine (one per GPU)")
        p.add_argument("--gpus", default=None, help="comma-separated GPU ids for this machine's workers (default: the first K)")
        p.add_argument("--rdzv-id", default="liveavatar", help="rendezvous id; the head's rdzv_id (default liveavatar)")
        p.add_argument("--cpu", action="store_true", help="hide the GPUs (gloo pools on CPU)")
        p.add_argument("--nccl-p2p-disable", action="store_true",
                       help="NCCL_P2P_DISABLE=1 here (consumer cards without working peer-to-peer); "
                            "the head's pool option sets it on every rank as well")
        p.add_argument("--models", action="append", default=[], metavar="DIR",
                       help="this machine's model folder (ComfyUI models/ layout: DIR/diffusion_models, DIR/loras), "
                            "used when the head's file paths do not exist here; repeatable")
        p.add_argument("--once", action="store_true", help="serve one pool, then exit")
        p.set_defaults(run=self.run)

    def run(self, args: argparse.Namespace) -> int:
        from ..distributed.agent import Agent, AgentOptions

        gpus = tuple(int(g) for g in args.gpus.split(",") if g.strip()) if args.gpus else None
        opts = AgentOptions(rdzv_endpoint=args.rdzv_endpoint, nnodes=args.nnodes, nproc_per_node=args.nproc_per_node,
                            rdzv_id=args.rdzv_id, gpus=gpus, cpu=args.cpu, nccl_p2p_disable=args.nccl_p2p_disable,
                            model_dirs=tuple(args.models), once=args.once)
        return Agent(opts, log=lambda m: print(m, flush=True)).serve()
