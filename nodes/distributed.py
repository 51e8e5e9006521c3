"""Distributed nodes: a launcher whose output the Clip Sampler takes in place of a local model, and a
node that frees the workers' GPUs.

'LiveAvatar Distributed Launcher' describes a pool of torchrun workers (``distributed/``) holding the
DiT: one per GPU, ``tpp`` (denoising steps pipelined over the GPUs) or ``sp`` (attention heads and
weight shards split, for 24 GB cards), optionally spanning several machines. It starts the shared
pool (the workers load the DiT from disk; ComfyUI's process never holds the weights) and outputs a
``LIVEAVATAR_MODEL`` whose ``backend()`` runs ``DistributedSampler`` over that pool, so the Clip
Sampler, the streaming latent handle and the decode/save nodes work unchanged: progress, preview and
ComfyUI's interrupt (every rank stops at one agreed block; the pool stays warm) come through them.

The pool is reused across prompts while its settings are unchanged, restarted when they change or
after a failure, closed after the idle timeout and when ComfyUI exits. ComfyUI's model management
cannot see or evict the workers' memory: 'LiveAvatar Release Workers' frees it on demand.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from comfy_api.latest import io

from . import runtime, types
from .loaders import PRECISIONS

CPU = "cpu"


# ----------------------------------------------------------------------------------- objects
def read_dit_config(path):
    """The DiT's configuration from the file's header and shapes (no weight is read)."""
    from ..liveavatar.config import DiTConfig
    from ..model_loaders.dit import infer_dit_config
    from ..model_loaders.formats import KIND_NAMES, ModelFileError, open_checkpoint

    with open_checkpoint(path) as ckpt:
        if ckpt.kind != "liveavatar_dit":
            raise ModelFileError(f"{path}: expected a LiveAvatar / Wan2.2-S2V DiT; found a {KIND_NAMES[ckpt.kind]} file "
                                 f"({ckpt.sample_keys()})")
        if ckpt.config is not None:
            return DiTConfig.from_dict(ckpt.config)
        return infer_dit_config({n: ckpt.shape(k) for n, k in ckpt.model_keys().items()})


class DistributedBackend:
    """``nodes.stream.BlockBackend`` over the shared worker pool (started again if it was released)."""

    def __init__(self, options):
        self.options = options
        self.stats: dict[int, dict] = {}

    def blocks(self, cond, cfg, seed, num_clips, check_cancel, on_call=None):
        """The workers report whole blocks only: progress moves per block (``LatentStream`` does it)."""
        from ..distributed.launcher import shared_pool
        from ..distributed.sampler import DistributedSampler

        sampler = DistributedSampler(shared_pool(self.options), cfg, cond.text, cond.audio, cond.sink, seed,
                                     check_cancel=check_cancel)
        yield from sampler.blocks(num_clips)
        self.stats = sampler.stats


@dataclass
class DistributedModel:
    """The launcher's ``LIVEAVATAR_MODEL``: the DiT lives in the workers; ``backend()`` drives them."""

    options: Any  # distributed.launcher.PoolOptions
    cfg: Any  # liveavatar.config.DiTConfig (the sampler checks the conditionings against it)
    name: str
    summary: str

    @property
    def model(self):  # the sampler reads ``model.model.cfg`` like a local model's
        return SimpleNamespace(cfg=self.cfg)

    @property
    def text_dim(self) -> int:
        return self.cfg.text_dim

    def backend(self) -> DistributedBackend:
        return DistributedBackend(self.options)


def parse_gpus(gpus: str, workers: int) -> tuple[tuple[int, ...] | None, int]:
    """(GPU ids or None for the CPU, worker count) from '0,1,2,3', a count such as '4', or 'cpu'."""
    text = gpus.strip().lower()
    if text in (CPU, ""):
        return None, workers or 2
    if "," in text or "-" in text:
        ids: list[int] = []
        for part in (p.strip() for p in text.split(",") if p.strip()):
            lo, sep, hi = part.partition("-")
            if not (lo.isdigit() and (not sep or hi.isdigit())):
                raise ValueError(f"gpus: {gpus!r} is not a list of GPU ids like '0,1,2,3' or '0-3', a count, or 'cpu'")
            ids.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
        if len(set(ids)) != len(ids):
            raise ValueError(f"gpus: {gpus!r} names a GPU twice")
    elif text.isdigit() and int(text) > 0:
        ids = list(range(int(text)))
    else:
        raise ValueError(f"gpus: {gpus!r} is not a list of GPU ids like '0,1,2,3', a count such as '4', or 'cpu'")
    workers = workers or len(ids)
    if workers > len(ids):
        raise ValueError(f"{workers} workers need {workers} GPUs; gpus {gpus!r} gives {len(ids)}")
    return tuple(ids[:workers]), workers


def pool_options(dit_path, dit_name: str, lora_path, lora_name: str | None, precision: str, gpus: str, workers: int,
                 mode: str, idle_timeout_min: float, threads_per_worker: int = 0, nnodes: int = 1,
                 rdzv_endpoint: str = "", channel_host: str = "127.0.0.1", nccl_p2p_disable: bool = False,
                 sp: int = 1):
    from ..distributed.launcher import LOOPBACK, PoolOptions

    ids, count = parse_gpus(gpus, workers)
    if mode == "tpp" and count * max(1, nnodes) < 2:
        raise ValueError("tpp pipelines the denoising steps over the workers: give it at least 2 (or use the local "
                         "'LiveAvatar Model Loader' for one GPU)")
    threads = threads_per_worker or max(1, min(8, (os.cpu_count() or 1) // count))
    channel_host = channel_host.strip() or "127.0.0.1"
    tcp = nnodes > 1 or channel_host not in LOOPBACK
    spec = {"kind": "dit", "path": str(dit_path), "name": dit_name, "precision": precision,
            "lora": None if lora_path is None else str(lora_path), "lora_name": lora_name}
    return PoolOptions(
        model=spec, workers=count, mode=mode, gpus=ids, backend="gloo" if ids is None else None, threads=threads,
        idle_timeout_s=idle_timeout_min * 60 if idle_timeout_min > 0 else None, channel="tcp" if tcp else "unix",
        nnodes=nnodes, rdzv_endpoint=rdzv_endpoint.strip() or None, channel_host=channel_host,
        nccl_p2p_disable=nccl_p2p_disable, sp=sp,
    )


# ----------------------------------------------------------------------------------- nodes
class DistributedLauncher(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveAvatarDistributedLauncher",
            display_name="LiveAvatar Distributed Launcher",
            category=types.CATEGORY,
            description="Runs the DiT on a pool of torchrun workers, one per GPU (or several machines), and outputs a "
                        "model for 'LiveAvatar Clip Sampler' in place of 'LiveAvatar Model Loader'. The workers load "
                        "the files themselves and stay warm between prompts; free their GPUs with "
                        "'LiveAvatar Release Workers' (ComfyUI's model management cannot unload them).",
            inputs=[
                io.Combo.Input("dit_name", options=runtime.dit_files(),
                               tooltip="Wan2.2-S2V-14B DiT from models/diffusion_models; every worker loads it "
                                       "(other machines: the same file, see the agent's --models)."),
                io.Combo.Input("lora_name", options=[runtime.NONE] + runtime.model_files("loras"),
                               default="liveavatar.safetensors",
                               tooltip="The LiveAvatar LoRA from models/loras, merged by every worker before quantization. "
                                       "'none' runs the base S2V model (not few-step: poor results)."),
                io.Combo.Input("precision", options=PRECISIONS, default="bf16",
                               tooltip="Weight precision on the workers. fp8 halves the weight memory (useful with sp on "
                                       "24 GB cards); bf16 is the reference; fp32 only for tests."),
                io.String.Input("gpus", default="0,1",
                                tooltip="GPUs of this machine for the workers: ids like '0,1,2,3' (or '0-3'), a count such "
                                        "as '4' (the first 4), or 'cpu' (gloo on the CPU, for tests). Keep the GPU "
                                        "ComfyUI itself uses out of the list if it is short of memory."),
                io.Combo.Input("mode", options=["tpp", "sp"], default="tpp",
                               tooltip="tpp: the denoising steps are pipelined over the workers (each holds the whole "
                                       "model; fastest; 2+ GPUs with room for the model). sp: every layer's tokens split "
                                       "over all workers (Ulysses) with weight shards (for 24 GB cards)."),
                io.Int.Input("workers", default=0, min=0, max=64,
                             tooltip="Workers on this machine; 0 = one per listed GPU (2 for 'cpu')."),
                io.Int.Input("idle_timeout_min", default=15, min=0, max=24 * 60,
                             tooltip="Stop the workers (freeing their GPUs) after this many minutes without a prompt; "
                                     "0 = keep them until released or ComfyUI exits."),
                io.Int.Input("threads_per_worker", default=0, min=0, max=256, optional=True,
                             tooltip="CPU threads per worker; 0 = the cores divided among the workers (at most 8)."),
                io.Int.Input("nnodes", default=1, min=1, max=64, optional=True,
                             tooltip="Machines in the pool, this one included. Above 1, start "
                                     "'python -m liveavatar worker-agent' on each other machine (README)."),
                io.String.Input("rdzv_endpoint", default="", optional=True,
                                tooltip="With nnodes > 1: HOST:PORT of THIS machine where the agents join torchrun's "
                                        "rendezvous, e.g. '192.168.1.10:29400' (open that port between the machines)."),
                io.String.Input("channel_host", default="127.0.0.1", optional=True,
                                tooltip="Address the job channel listens on. 127.0.0.1 serves this machine only; other "
                                        "machines need this machine's LAN address or 0.0.0.0. Trusted networks only: "
                                        "torch's rendezvous and collectives are unauthenticated."),
                io.Boolean.Input("nccl_p2p_disable", default=False, optional=True,
                                 tooltip="Set NCCL_P2P_DISABLE=1 on every worker (all machines): needed on some consumer "
                                         "cards whose peer-to-peer transfers hang or corrupt data."),
                io.Int.Input("sp", default=1, min=1, max=64, optional=True,
                             tooltip="With mode tpp: step groups of this many sequence-parallel workers (Ulysses, weights "
                                     "sharded in the group), e.g. 4 GPUs = 2 step groups x sp 2. 1 = plain tpp. The "
                                     "workers must be a multiple of it."),
            ],
            outputs=[types.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, dit_name, lora_name, precision, gpus, mode, workers, idle_timeout_min, threads_per_worker=0,
                nnodes=1, rdzv_endpoint="", channel_host="127.0.0.1", nccl_p2p_disable=False, sp=1) -> io.NodeOutput:
        from ..distributed.launcher import check_gpus, shared_pool

        dit_path = runtime.dit_path(dit_name)
        lora_path = None if lora_name == runtime.NONE else runtime.model_path("loras", lora_name)
        options = pool_options(dit_path, dit_name, lora_path, None if lora_path is None else lora_name, precision, gpus,
                               workers, mode, idle_timeout_min, threads_per_worker, nnodes, rdzv_endpoint, channel_host,
                               nccl_p2p_disable, sp)
        check_gpus(options)  # in a moment, before a running pool is replaced or a process started
        cfg = read_dit_config(dit_path)
        pool = shared_pool(options).start()  # load now: a bad file or a missing machine fails here, not mid-video
        where = "CPU (gloo)" if options.gpus is None else f"GPUs {list(options.gpus)}"
        machines = f" on {options.nnodes} machines" if options.nnodes > 1 else ""
        layout = f"{mode} x sp {sp}" if mode == "tpp" and sp > 1 else mode
        summary = f"{dit_name} ({precision}) on {pool.world} workers{machines}, {layout}, {where}"
        return io.NodeOutput(DistributedModel(options, cfg, dit_name, summary))


class ReleaseWorkers(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveAvatarReleaseWorkers",
            display_name="LiveAvatar Release Workers",
            category=types.CATEGORY,
            description="Stops the distributed workers now and frees their GPUs (ComfyUI's 'free model memory' cannot "
                        "reach them). The next prompt with 'LiveAvatar Distributed Launcher' starts them again.",
            inputs=[
                io.Video.Input("video", optional=True,
                               tooltip="Optional: connect 'LiveAvatar Save Video' to release after the video is saved."),
                io.Image.Input("images", optional=True,
                               tooltip="Optional: connect decoded frames to release after they are made."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return time.time_ns()  # runs on every prompt, never answered from the cache

    @classmethod
    def execute(cls, video=None, images=None) -> io.NodeOutput:
        from ..distributed.launcher import release_shared_pool

        release_shared_pool()
        runtime.release_memory()
        return io.NodeOutput()


NODES = [DistributedLauncher, ReleaseWorkers]
