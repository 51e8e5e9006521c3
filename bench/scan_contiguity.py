"""Where do non-contiguous tensors flow through ``forward_block``? Full width, fake tensors, then a CPU timing.

Issue #13 found one waste: ``_patchify`` returned a transposed view, so every LayerNorm and
residual add of every block worked on strided memory (fixed: it returns a contiguous tensor).
This looks for the same pattern elsewhere:

1. scan: one steady-state ``forward_block`` of the 14B's width (dim 5120, 40 heads, 704*384, a
   full KV window; 2 layers, as every layer runs the same code) on fake tensors on the
   simulated device (``simulate_fullsize``), under a dispatch mode that records every operation
   receiving a non-contiguous tensor of more than 1M elements (views themselves excluded), with
   the engine line that issued it (attention as the flash kernel, as on a GPU);
2. timing: a small real model on the CPU, ``forward_block`` as is against the same with the
   attention heads made contiguous (``SelfAttention.heads``: the one per-layer view the scan
   shows feeding compute), best of N, 1 thread, and whether the outputs are bitwise equal.

Usage: python bench/scan_contiguity.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import collections
import statistics
import time
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import simulate_fullsize as sim  # noqa: E402  (loads the pack)
from liveavatar_pack.liveavatar.config import WAN_S2V_14B, DiTConfig, SamplerConfig, replace  # noqa: E402
from liveavatar_pack.liveavatar import transformer as transformer_mod  # noqa: E402
from liveavatar_pack.liveavatar.kv_cache import CacheStorage  # noqa: E402
from liveavatar_pack.liveavatar.transformer import SelfAttention  # noqa: E402
from liveavatar_pack.model_loaders.dit import empty_model  # noqa: E402

VIEWS = {getattr(torch.ops.aten, n).default for n in ("view", "permute", "t", "expand", "_unsafe_view", "alias",
                                                        "unsqueeze", "detach")} | {
    torch.ops.aten.transpose.int, torch.ops.aten.select.int, torch.ops.aten.slice.Tensor, torch.ops.aten.unbind.int,
    torch.ops.aten.split.Tensor, torch.ops.aten.split_with_sizes.default}
MIN_NUMEL = 1_000_000


class NonContiguous(TorchDispatchMode):
    """Counts (op, input shape/strides, engine line) for large non-contiguous inputs of compute ops."""

    def __init__(self):
        super().__init__()
        self.hits: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.prim.device.default:
            return args[0].fake_device
        out = func(*args, **(kwargs or {}))
        if func in VIEWS:
            return out
        for a in tree_flatten((args, kwargs))[0]:
            if isinstance(a, torch.Tensor) and a.numel() > MIN_NUMEL and not a.is_contiguous():
                frames = [f for f in traceback.extract_stack() if "/liveavatar/" in f.filename or "/model_loaders/" in f.filename]
                where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno} {frames[-1].name}" if frames else "?"
                self.hits[(str(func), tuple(a.shape), tuple(a.stride()), where)] += 1
        return out


def scan(width: int = 704, height: int = 384) -> collections.Counter:
    from torch._subclasses.fake_tensor import FakeTensorMode

    sim.register_device()
    cfg = replace(WAN_S2V_14B, num_layers=2, audio_inject_layers=(0,))
    scfg = SamplerConfig()
    h, w = height // 8, width // 8
    dev = sim.SIM
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = empty_model(cfg).cast(torch.bfloat16)
        for m in model.modules():  # the meta model's tensors as fake tensors on the simulated device
            for n, p in list(m._parameters.items()):
                m._parameters[n] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=dev), requires_grad=False)
            for n, b in list(m._buffers.items()):
                m._buffers[n] = torch.empty(b.shape, dtype=b.dtype, device=dev)
        storage = CacheStorage(dev, torch.bfloat16)
        cache = model.new_kv_cache(h, w, scfg.latent_frames_per_clip, storage)
        cond = model.new_cond_cache(h, w, storage)
        text = model.embed_text(torch.zeros(cfg.text_len, cfg.text_dim, dtype=torch.bfloat16, device=dev))
        model.prefill_sink(torch.zeros(16, 1, h, w), torch.zeros(16, cfg.motion_latent_frames, h, w), text, cond,
                           scfg.rope_ref_frame)
        mode = NonContiguous()
        nf = scfg.latent_frames_per_block
        attention, transformer_mod.attention = transformer_mod.attention, sim.flash_attention  # as on a GPU
        try:
            with mode:
                model.forward_block(torch.zeros(16, nf, h, w, device=dev), torch.full((nf,), 500.0), text,
                                    torch.zeros(1, cfg.num_audio_layers, cfg.audio_dim, scfg.frames_per_block), cache,
                                    cond, scfg.latent_frames_per_clip, scfg.rope_ref_frame, scfg.motion_video_frames)
        finally:
            transformer_mod.attention = attention
    return mode.hits


def timing(repeats: int) -> tuple[float, bool]:
    """forward_block CPU time with contiguous heads / as is (median of per-round ratios), bitwise equality."""
    torch.set_num_threads(1)
    cfg = DiTConfig(dim=512, ffn_dim=1024, num_heads=4, num_layers=4, text_dim=64, audio_dim=64, num_audio_layers=3,
                    audio_inject_layers=(0, 2))
    scfg = SamplerConfig(frames_per_clip=24)
    torch.manual_seed(0)
    from liveavatar_pack.liveavatar.transformer import LiveAvatarTransformer

    model = LiveAvatarTransformer(cfg).cast(torch.bfloat16).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    h, w = 48, 88
    gen = torch.Generator().manual_seed(1)
    storage = CacheStorage("cpu", torch.bfloat16)
    text = model.embed_text(torch.randn(64, cfg.text_dim, generator=gen))
    x = torch.randn(16, 3, h, w, generator=gen)
    audio = torch.randn(1, cfg.num_audio_layers, cfg.audio_dim, 12, generator=gen)
    sink = (torch.randn(16, 1, h, w, generator=gen), torch.randn(16, cfg.motion_latent_frames, h, w, generator=gen))

    cache = model.new_kv_cache(h, w, scfg.latent_frames_per_clip, storage)
    cond = model.new_cond_cache(h, w, storage)
    model.prefill_sink(*sink, text, cond, scfg.rope_ref_frame)

    def call():
        t0 = time.perf_counter()
        out = model.forward_block(x, torch.full((3,), 500.0), text, audio, cache, cond, 3, scfg.rope_ref_frame, 73)
        return time.perf_counter() - t0, out

    as_is = SelfAttention.heads
    contiguous = lambda self, t: as_is(self, t).contiguous()  # noqa: E731
    times: dict[str, list[float]] = {"as is": [], "contiguous": []}
    outs = {}
    try:
        for _ in range(repeats):  # interleaved, one call each per round: the machine's load changes
            for name, fn in (("as is", as_is), ("contiguous", contiguous)):
                SelfAttention.heads = fn
                t, outs[name] = call()
                times[name].append(t)
    finally:
        SelfAttention.heads = as_is
    ratio = statistics.median(c / a for a, c in zip(times["as is"], times["contiguous"]))
    return ratio, torch.equal(outs["as is"], outs["contiguous"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args(argv)
    hits = scan()
    print(f"non-contiguous inputs (> {MIN_NUMEL:,} elements) of compute ops in one 14B-width forward_block "
          "(2 layers, fake tensors), count | op | shape | strides | engine line:")
    for (op, shape, stride, where), n in sorted(hits.items(), key=lambda kv: (kv[0][3], kv[0][0])):
        print(f"  {n:3d} | {op} | {list(shape)} | {list(stride)} | {where}")
    ratio, equal = timing(args.repeats)
    print(f"\nCPU (1 thread), forward_block with contiguous attention heads / as is: {ratio:.3f} "
          f"({'bitwise equal' if equal else 'NOT bitwise equal'})")


if __name__ == "__main__":
    main()
