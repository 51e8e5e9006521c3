"""N gloo ranks of the Ulysses layout in one process tree, for tests/test_ulysses.py.

``python tests/ulysses_ranks.py '<json>' OUT.pt``: world 1 runs the plain engine (the reference);
world N installs ``enable_ulysses`` (and FSDP2 with ``shard``). Each rank samples ``clips`` clips
with the StreamingSampler, then runs one more DiT call (clip 1's first block, step 0: a full cache
window) under FlopCounterMode and the WireMeter, and saves latents, FLOPs and bytes sent.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _pack():
    spec = importlib.util.spec_from_file_location("_liveavatar_bootstrap", ROOT / "liveavatar" / "bootstrap.py")
    boot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(boot)
    boot.load_pack(ROOT)


def attention_flops() -> dict:
    """FlopCounterMode's formula for the CPU kernel of scaled_dot_product_attention (not in its table)."""
    from torch.utils.flop_counter import sdpa_flop_count

    def cpu_flash(q, k, v, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(q, k, v)  # FlopCounterMode passes shapes

    return {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash}


def run_rank(rank: int, world: int, port: int, args: dict, out: str) -> None:
    _pack()
    import torch.distributed as dist
    from torch.utils.flop_counter import FlopCounterMode

    from liveavatar_pack.distributed.sharding import shard_model
    from liveavatar_pack.distributed.ulysses import WireMeter, enable_ulysses
    from liveavatar_pack.liveavatar.config import TINY, DiTConfig, SamplerConfig
    from liveavatar_pack.liveavatar.kv_cache import CacheStorage
    from liveavatar_pack.liveavatar.sampler import SinkInputs, StreamingSampler, TensorAudio
    from liveavatar_pack.liveavatar.tiny import tiny_transformer

    torch.set_num_threads(1)
    cfg = DiTConfig.from_dict({**TINY.__dict__, **args.get("dit", {})})
    model = tiny_transformer(1, cfg)
    heads = None
    comm = None
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        comm = enable_ulysses(model, rank, world)
        heads = (comm.head_start, comm.head_stop)
        if args.get("shard"):
            from torch.distributed.device_mesh import init_device_mesh

            shard_model(model, init_device_mesh("cpu", (world,)))
    h, w = args["hw"]
    clips = int(args.get("clips", 1))
    gen = torch.Generator().manual_seed(123)
    sink = SinkInputs(torch.randn(16, 1, h, w, generator=gen), torch.randn(16, 19, h, w, generator=gen))
    audio = TensorAudio(torch.randn(1, cfg.num_audio_layers, cfg.audio_dim, 48 * (clips + 1) + 6, generator=gen))
    text = torch.randn(7, cfg.text_dim, generator=gen)
    scfg = SamplerConfig()
    storage = CacheStorage(device="cpu", dtype=torch.float32, heads=heads)
    sampler = StreamingSampler(model, scfg, text, audio, sink, seed=0, cache_storage=storage)
    latents = [b.latents for b in sampler.blocks(clips)]

    worker = sampler.workers[0]
    x = torch.randn(16, scfg.latent_frames_per_block, h, w, generator=gen)
    frame_start = scfg.latent_frames_per_clip * clips
    feats = audio.frames(frame_start * 4, frame_start * 4 + scfg.frames_per_block)
    prefetched, measuring = [], []

    def issued(k):  # block k starts: is block k+1's all-gather already on its way?
        if measuring:
            group = model.blocks[k + 1]._get_fsdp_state()._fsdp_param_group
            prefetched.append(group._all_gather_result is not None)

    if args.get("shard"):
        for k in range(len(model.blocks) - 1):
            model.blocks[k].register_forward_pre_hook(lambda _m, _a, k=k: issued(k))
    measuring.append(True)
    meter = WireMeter(rank, world)
    sent_before = comm.sent_bytes if comm else 0
    with FlopCounterMode(display=False, custom_mapping=attention_flops()) as flops, meter:
        v = model.forward_block(x, worker.timestep.repeat(x.shape[1]), worker.text, feats, worker.cache, worker.cond,
                                frame_start, 20, scfg.motion_video_frames)
    torch.save({
        "latents": latents, "velocity": v, "flops": flops.get_total_flops(), "wire": meter.sent,
        "wire_by_op": meter.by_op, "all_to_all_bytes": (comm.sent_bytes - sent_before) if comm else 0,
        "heads": heads, "prefetched": prefetched, "kv_bytes": sum(wk.cache.nbytes() for wk in sampler.workers),
    }, f"{out}.{rank}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    spec, out = json.loads(sys.argv[1]), sys.argv[2]
    world = int(spec["world"])
    if world == 1:
        run_rank(0, 1, 0, spec, out)
    else:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.multiprocessing.spawn(run_rank, args=(world, port, spec, out), nprocs=world)


def golden_model(dit_dir: str):
    """The golden tiny DiT with its LoRA merged (a worker's ``callable`` model spec)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from goldens import golden_dit

    return golden_dit(Path(dit_dir))
