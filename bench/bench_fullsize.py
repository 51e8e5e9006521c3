"""Full-size LiveAvatar (Wan2.2-S2V-14B layout) speed and memory on one GPU, random weights.

Weights' values do not change speed, so the DiT is built with random weights straight on
the device: meta init (``empty_model``), fp8 Linears swapped in on meta when asked, then
``to_empty(device)`` and an in-place seeded fill with a generator on the device (fp8
weights: a float32 scratch of one tensor filled on the device and quantised into the fp8
buffer with ``quantize_fp8_into``). No weight ever passes through host memory, except the
blocks / caches a placement deliberately keeps there. The VAE is a random-weight full-size
Wan 2.1 VAE (diffusers ``AutoencoderKLWan(base_dim=96)``) built under the device.

One row per configuration; a configuration is ``+``-joined tokens:

  ``bf16`` | ``fp8``         weights (fp8: FP8Linear e4m3 per-tensor for blocks/audio_injector)
  ``compile``                torch.compile of every DiT block's forward (see ``compile_blocks``)
  ``sdpa=NAME``              force one SDPA backend (math, flash, efficient, cudnn) for the DiT
  ``cap24`` / ``cap48``      ``torch.cuda.set_per_process_memory_fraction(N GiB / total)``; the
                             placement is the VRAM planner's choice (``choose_placement``) for
                             that budget unless ``swap``/``kv`` give it
  ``swap=N``                 block swap, N of the 14B's 40 blocks resident (scaled in --smoke)
  ``kv=fp8|host|host-fp8``   KV + sink caches in fp8 on the device / in host RAM / both

Measured per configuration, after ``--warmup-clips`` clips (compile, sink prefills and a
filling KV window are excluded; the window is full from clip 1 on, so the measured calls are
the steady state the FLOP count assumes):

* ms per block-step: mean time of one StepWorker call (one ``forward_block`` + Euler step
  of one 3-latent block at one timestep), CUDA events around each call;
* fps: video frames out per second of the whole streaming loop (all steps + VAE decode of
  each block + uint8 frames on the host), wall clock between synchronised points;
* peak GPU memory: ``max_memory_reserved`` + memory outside PyTorch's allocator (CUDA
  context, measured as used - reserved after the run), and ``max_memory_allocated``;
  next to the VRAM planner's prediction (``plan_memory``, runtime reserve included) and
  the ratio planner / measured (goal: within 10%);
* host RAM: process RSS (psutil), maximum over samples taken at every block;
* TFLOP/s and MFU against the GPU's dense bf16 peak, from ``block_step_flops`` (the planner's FLOP count).

``--smoke`` runs the same code on the CPU with a scaled-down model (dim 256, 4 layers, 2 heads
of 128, 64*64 pixels, one 12-frame block per clip, 2 steps, tiny
VAE warmed on one latent) in seconds; CUDA-only pieces degrade and say so in the
notes column, and the FLOP formula is checked against ``torch.utils.flop_counter``.

Usage (GPU):  python bench/bench_fullsize.py --sizes 704*384,688*368 --configs bf16,fp8,fp8+cap24 --json out.json
       (CPU): python bench/bench_fullsize.py --smoke
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
import traceback
import types
from contextlib import nullcontext
from dataclasses import dataclass, replace

import psutil
import torch
import torch.nn as nn
import torch.nn.functional as F

import _pack

_pack.load()
from liveavatar_pack.liveavatar.config import WAN_S2V_14B, DiTConfig, SamplerConfig  # noqa: E402
from liveavatar_pack.liveavatar.pipeline import Conditioning, VideoStream  # noqa: E402
from liveavatar_pack.liveavatar.sampler import SinkInputs, StreamingSampler, TensorAudio  # noqa: E402
from liveavatar_pack.liveavatar.transformer import DiTBlock, LiveAvatarTransformer  # noqa: E402
from liveavatar_pack.liveavatar.kv_cache import CacheStorage  # noqa: E402
from liveavatar_pack.model_loaders.dit import empty_model  # noqa: E402
from liveavatar_pack.model_loaders.fp8 import FP8Linear, fp8_matmul_supported, fp8_target_names, quantize_fp8_into, replace_linears  # noqa: E402
from liveavatar_pack.model_loaders.placement import PlacementConfig, apply_placement  # noqa: E402
from liveavatar_pack.model_loaders.planner import GiB, VAESize, block_step_flops, choose_placement, geometry, parse_size, plan_memory  # noqa: E402

SMOKE_CFG = DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=4, text_dim=64, audio_dim=64, audio_inject_layers=(0, 2))
SMOKE_SIZES = "64*64"
GPU_SIZES = "704*384,688*368"
# First the bf16 baseline, fp8 and the 24 GB cap (the order), then the rest.
GPU_CONFIGS = (
    "bf16,fp8,fp8+cap24,fp8+compile,bf16+compile,fp8+cap24+compile,fp8+cap48,fp8+cap48+compile,"
    "fp8+cap24+swap=20+kv=fp8,fp8+kv=fp8+compile"
)
# fp8 weights are dequantised per call on a CPU (slow there): the smoke keeps few fp8 rows
SMOKE_CONFIGS = "bf16,fp8+compile+sdpa=math,fp8+cap24,fp8+cap48+swap=20+kv=fp8"
FULL_LAYERS = WAN_S2V_14B.num_layers
SDPA_NAMES = {"math": "MATH", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION"}
# Dense (no sparsity) tensor-core peaks in TFLOP/s: (bf16, fp8). Vendor data sheets.
GPU_PEAKS = (
    ("H100 PCIe", (756.0, 1513.0)),
    ("H100 NVL", (835.0, 1671.0)),
    ("H100", (989.4, 1978.9)),
    ("H200", (989.4, 1978.9)),
    ("H800", (989.4, 1978.9)),
    ("A100", (312.0, None)),
    ("L40S", (362.1, 733.0)),
    ("L4", (121.0, 242.5)),
)


# ============================================================================ FLOP count
def counted_block_step_flops(model: LiveAvatarTransformer, scfg: SamplerConfig, width: int, height: int) -> int:
    """FLOPs of one steady-state ``forward_block`` as ``FlopCounterMode`` counts them (math SDPA,
    which decomposes into counted matmuls; CPU fused attention kernels are not counted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    h, w = height // 8, width // 8
    cfg, dev = model.cfg, model.device
    storage = CacheStorage(dev, model.dtype)
    cache = model.new_kv_cache(h, w, scfg.latent_frames_per_clip, storage)
    cond = model.new_cond_cache(h, w, storage)
    gen = torch.Generator().manual_seed(1)
    text = model.embed_text(torch.randn(16, cfg.text_dim, generator=gen))
    model.prefill_sink(torch.randn(16, 1, h, w, generator=gen), torch.randn(16, cfg.motion_latent_frames, h, w, generator=gen),
                       text, cond, scfg.rope_ref_frame)
    nf = scfg.latent_frames_per_block
    x = torch.randn(16, nf, h, w, generator=gen)
    audio = torch.randn(1, cfg.num_audio_layers, cfg.audio_dim, scfg.frames_per_block, generator=gen)
    start = scfg.latent_frames_per_clip  # window full: every cached token is attended
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.forward_block(x, torch.full((nf,), 500.0), text, audio, cache, cond, start, scfg.rope_ref_frame,
                            scfg.motion_video_frames)
    return int(counter.get_total_flops())


# ============================================================================ building
@torch.no_grad()
def random_fill_(model: nn.Module, seed: int) -> nn.Module:
    """Seeded random values for every tensor, generated where the tensor lives (no host copy).

    Matrices ~ N(0, 1/fan_in) (activations stay O(1) through 40 layers), norm weights ~ 1,
    everything else ~ N(0, 0.02); fp8 weights: filled in a float32 scratch on the device, then
    quantised into the fp8 buffer (per-tensor scale) by ``quantize_fp8_into``.
    """
    device = next(model.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    scratch = None
    for mname, module in model.named_modules():
        if isinstance(module, FP8Linear):
            n = module.weight.numel()
            if scratch is None or scratch.numel() < n:
                scratch = None
                scratch = torch.empty(n, dtype=torch.float32, device=device)
            w = scratch[:n].view(module.weight.shape).normal_(0.0, module.in_features ** -0.5, generator=gen)
            module.weight_scale.copy_(quantize_fp8_into(w, module.weight, module.per_channel).reshape(module.weight_scale.shape))
            if module.bias is not None:
                module.bias.normal_(0.0, 0.02, generator=gen)
            continue
        for pname, t in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if pname == "weight" and (mname.endswith(("norm_q", "norm_k", "norm3"))):
                t.normal_(1.0, 0.02, generator=gen)
            elif full == "casual_audio_encoder.weights":
                t.normal_(0.5, 0.02, generator=gen)  # silu(w) > 0: the layer mix divides by its sum
            elif t.dim() >= 2 and pname == "weight":
                t.normal_(0.0, (t.numel() // t.shape[0]) ** -0.5, generator=gen)
            else:
                t.normal_(0.0, 0.02, generator=gen)
    return model


def build_dit(cfg: DiTConfig, device: torch.device, precision: str, seed: int = 0) -> LiveAvatarTransformer:
    """Meta init -> (fp8 Linears on meta) -> bf16 dtypes on meta -> to_empty(device) -> random fill on device."""
    model = empty_model(cfg)
    if precision == "fp8":
        replace_linears(model, fp8_target_names(model), compute_dtype=torch.bfloat16, quantize=False)
    model.cast(torch.bfloat16)  # meta tensors: only the dtypes change (keep_in_fp32 stays float32)
    model.to_empty(device=device)
    return random_fill_(model, seed).eval()


def build_vae(device: torch.device, smoke: bool, seed: int = 0):
    """Random-weight Wan 2.1 VAE on ``device``: full size (base_dim 96, bf16) or the tiny one (smoke, fp32)."""
    from liveavatar_pack.liveavatar.tiny import tiny_vae
    from liveavatar_pack.liveavatar.vae import WanVAE

    if smoke:
        vae = tiny_vae(seed)
        return vae if device.type == "cpu" else vae.to(device)
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    with torch.device(device):  # parameters are created (and initialised) on the device
        model = AutoencoderKLWan(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                 temperal_downsample=[False, True, True])
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # the "keep in float32" advice: this VAE has no such modules
    try:
        model = model.to(dtype=torch.bfloat16)
    finally:
        diffusers_logging.set_verbosity(level)
    return WanVAE(model.eval())


# ============================================================================ compile
class _AttendSlot:
    fn = None


@torch.compiler.disable
def _attend_eager(q, k, v):
    """The self-attention with its KV-cache reads/writes stays eager (a graph break)."""
    return _AttendSlot.fn(q, k, v)


def _block_core(block, x, mod, text_kv):
    return DiTBlock.forward(block, x, mod, text_kv, _attend_eager)


def compile_blocks(model: LiveAvatarTransformer, backend: str, mode: str | None) -> None:
    """Regional compile: one ``torch.compile`` of ``DiTBlock.forward`` shared by all blocks.

    Every block's ``forward`` becomes a shim that parks the per-layer ``attend`` closure (cache
    write, RoPE, cache read, SDPA) in a slot and calls the compiled core with the block as an
    argument; the core calls ``attend`` through a ``torch.compiler.disable``d function. So the
    compiled graphs are the norm/modulation/q,k,v projections before the attention and
    o-projection, text cross-attention and FFN after it, and - as parameters are graph inputs
    (inline_inbuilt_nn_modules) - the same graphs serve all 40 blocks and swapped-in copies.
    Shapes are static (``dynamic=False``): one graph set for the block, one for the sink prefill.
    Block-swap hooks still run around each block (they live in ``Module.__call__``).
    """
    core = torch.compile(_block_core, backend=backend, mode=mode, dynamic=False)

    def forward(self, x, mod, text_kv, attend):
        _AttendSlot.fn = attend
        try:
            return core(self, x, mod, text_kv)
        finally:
            _AttendSlot.fn = None

    for block in model.blocks:
        block.forward = types.MethodType(forward, block)


# ============================================================================ configurations
@dataclass
class Spec:
    name: str
    precision: str = "bf16"
    compile: bool = False
    sdpa: str | None = None
    cap_gib: float | None = None
    swap: int | None = None  # resident blocks of the 14B's 40
    kv: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Spec":
        spec = cls(text)
        for tok in text.split("+"):
            key, _, val = tok.partition("=")
            if tok in ("bf16", "fp8"):
                spec.precision = tok
            elif tok == "compile":
                spec.compile = True
            elif key == "sdpa" and val in SDPA_NAMES:
                spec.sdpa = val
            elif tok.startswith("cap"):
                spec.cap_gib = float(tok[3:].lstrip("="))
            elif key == "swap":
                spec.swap = int(val)
            elif key == "kv" and val in ("fp8", "host", "host-fp8", "device"):
                spec.kv = val
            else:
                raise SystemExit(f"unknown configuration token {tok!r} in {text!r} (see --help)")
        return spec


def sdpa_backends(device: torch.device, dtype: torch.dtype, head_dim: int) -> dict[str, str]:
    """Which SDPA backends run here: probe each with a [1, 2, 64, head_dim] attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    q = torch.randn(1, 2, 64, head_dim, device=device, dtype=dtype)
    kv = torch.randn(1, 2, 96, head_dim, device=device, dtype=dtype)
    for name, member in SDPA_NAMES.items():
        backend = getattr(SDPBackend, member, None)
        if backend is None:
            out[name] = "absent from this torch"
            continue
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, kv, kv)
            out[name] = "ok"
        except RuntimeError as exc:
            out[name] = "unavailable: " + str(exc).splitlines()[0][:60]
    return out


def placement_for(spec: Spec, cfg: DiTConfig, scfg: SamplerConfig, width: int, height: int, device: torch.device,
                  smoke: bool, notes: list[str]) -> PlacementConfig | None:
    """The spec's placement: explicit swap/kv, else the planner's choice for the cap, else all on device."""
    pc = PlacementConfig(device=str(device))
    if spec.cap_gib is not None and spec.swap is None and spec.kv is None:
        # the planner chooses for the real model at the real size; --smoke maps the choice onto the small model
        full_cfg = WAN_S2V_14B if smoke else cfg
        fw, fh = (704, 384) if smoke else (width, height)
        chosen, _ = choose_placement(full_cfg, spec.precision, fw, fh, scfg, [spec.cap_gib], device=str(device))
        if chosen is None:
            notes.append(f"planner: nothing fits {spec.cap_gib:g} GiB")
            return None
        pc = chosen
        notes.append("planner's placement" + (" for 14B at 704*384" if smoke else ""))
    if spec.swap is not None:
        n = spec.swap
        if smoke:
            n = max(1, min(cfg.num_layers - 1, round(n * cfg.num_layers / FULL_LAYERS)))
            notes.append(f"swap {spec.swap}/{FULL_LAYERS} -> {n}/{cfg.num_layers}")
        pc = replace(pc, blocks_on_device=n)
    if spec.kv is not None:
        pc = replace(pc, kv_cache_device="cpu" if spec.kv.startswith("host") else "device",
                     kv_cache_dtype=torch.float8_e4m3fn if spec.kv.endswith("fp8") else None)
    pc.validate()
    return pc


def short_placement(pc: PlacementConfig) -> str:
    parts = ["all" if pc.blocks_on_device is None else f"swap{pc.blocks_on_device}"]
    kv = "kv-host" if pc.kv_cache_device == "cpu" else "kv-dev"
    parts.append(kv + ("-fp8" if pc.kv_fp8 else ""))
    return ",".join(parts)


class StepTimer:
    """Durations of the measured calls: CUDA events on a GPU, wall clock on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pairs: list = []

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, token) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.pairs.append((token, ev))
        else:
            self.pairs.append((token, time.perf_counter()))

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in self.pairs]
        return [b - a for a, b in self.pairs]


class TimedWorker:
    """A StepWorker under the spec's SDPA backend, timing the calls of the measured clips."""

    def __init__(self, worker, timer: StepTimer, steady_from: int, sdpa_ctx):
        self.worker, self.timer, self.steady_from, self.sdpa_ctx = worker, timer, steady_from, sdpa_ctx

    def prefill(self, sink):
        with self.sdpa_ctx():
            return self.worker.prefill(sink)

    def __call__(self, x, frame_start, audio, rd):
        token = self.timer.start() if frame_start >= self.steady_from else None
        with self.sdpa_ctx():
            out = self.worker(x, frame_start, audio, rd)
        if token is not None:
            self.timer.stop(token)
        return out

    def __getattr__(self, name):
        return getattr(self.worker, name)


def gpu_peaks(name: str) -> tuple[float | None, float | None]:
    for key, peaks in GPU_PEAKS:
        if key.lower() in name.lower():
            return peaks
    return None, None


def _free_device(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        host_empty = getattr(torch._C, "_host_emptyCache", None)
        if host_empty is not None:
            host_empty()  # pinned host blocks of block swap / host KV


# ============================================================================ one row
def run_one(spec: Spec, cfg: DiTConfig, scfg: SamplerConfig, width: int, height: int, device: torch.device, args,
            env: dict) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cuda = device.type == "cuda"
    notes: list[str] = []
    row = {"config": spec.name, "size": f"{width}*{height}", "weights": spec.precision, "status": "ok"}
    flops = sum(block_step_flops(cfg, scfg, width, height).values())
    row["flop_per_block_step"] = flops

    if spec.sdpa is not None and env["sdpa_backends"].get(spec.sdpa) != "ok":
        row.update(status="skipped", notes=f"sdpa {spec.sdpa} {env['sdpa_backends'].get(spec.sdpa)}")
        return row
    pc = placement_for(spec, cfg, scfg, width, height, device, args.smoke, notes)
    if pc is None:
        row.update(status="skipped", notes="; ".join(notes))
        return row
    row["placement"] = short_placement(pc)
    row["placement_config"] = pc.to_dict()

    vae_size = VAESize(base_dim=4, params=0, dtype_bytes=4) if args.smoke else VAESize()
    # memory budget
    total = torch.cuda.get_device_properties(device).total_memory if cuda else None
    budget = total
    if spec.cap_gib is not None:
        if cuda:
            cap = min(spec.cap_gib * GiB, total)
            torch.cuda.set_per_process_memory_fraction(cap / total, device)
            budget = cap
        else:
            notes.append(f"cap {spec.cap_gib:g} GiB not enforced (CPU)")
    elif cuda:
        torch.cuda.set_per_process_memory_fraction(1.0, device)

    if cuda:
        _free_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    proc = psutil.Process()
    rss_max = proc.memory_info().rss
    model = vae = placed = stream = sampler = None
    try:
        t0 = time.perf_counter()
        model = build_dit(cfg, device, spec.precision, seed=args.seed)
        vae = build_vae(device, args.smoke, seed=args.seed)
        vae_params = sum(p.numel() for p in vae.model.parameters())
        vae_size = replace(vae_size, params=vae_params)
        plan = plan_memory(cfg, spec.precision, width, height, scfg, pc, vae=vae_size,
                           model_name="smoke DiT" if args.smoke else "Wan2.2-S2V-14B (LiveAvatar)")
        row["planner_gib"] = plan.peak_device / GiB
        if cuda and plan.peak_device > budget and not args.force:
            row.update(status="skipped", notes=f"planner predicts {plan.peak_device / GiB:.1f} GiB > "
                       f"{budget / GiB:.1f} GiB available (--force to try; or +kv=fp8)")
            return row
        placed = apply_placement(model, pc)
        model = placed.model
        if spec.compile:
            backend = args.compile_backend or ("inductor" if cuda else "eager")
            torch._dynamo.reset()
            compile_blocks(model, backend, args.compile_mode if backend == "inductor" else None)
            notes.append(f"compile: {backend}" + ("" if cuda else " backend on CPU (dynamo traced; inductor on GPU)"))
        if spec.precision == "fp8":
            notes.append("fp8: _scaled_mm" if fp8_matmul_supported(device) else "fp8: dequantised matmul (no fp8 tensor cores)")
        row["build_s"] = time.perf_counter() - t0
        rss_max = max(rss_max, proc.memory_info().rss)

        # inputs (random; all the sampler needs)
        h, w = height // 8, width // 8
        gen = torch.Generator().manual_seed(args.seed)
        frames_total = args.clips * scfg.frames_per_clip
        audio = TensorAudio(torch.randn(1, cfg.num_audio_layers, cfg.audio_dim, frames_total, generator=gen))
        sink = SinkInputs(torch.randn(16, 1, h, w, generator=gen), torch.randn(16, cfg.motion_latent_frames, h, w, generator=gen))
        text = torch.randn(64, cfg.text_dim, generator=gen).to(device)
        sdpa_ctx = (lambda: sdpa_kernel(getattr(SDPBackend, SDPA_NAMES[spec.sdpa]))) if spec.sdpa else nullcontext
        with placed.in_use():
            if cuda:
                used_before = total - torch.cuda.mem_get_info(device)[0]
                torch.cuda.reset_peak_memory_stats(device)
            with sdpa_ctx():
                sampler = StreamingSampler(model, scfg, text, audio, sink, args.seed, cache_storage=placed.cache_storage())
            timer = StepTimer(device)
            steady_from = args.warmup_clips * scfg.latent_frames_per_clip
            sampler.workers = [TimedWorker(wk, timer, steady_from, sdpa_ctx) for wk in sampler.workers]
            cond = Conditioning(sampler.text, audio, sink, height, width)
            stream = VideoStream(model, vae, cond, scfg, args.seed, num_clips=args.clips, block_source=sampler.blocks)
            t_start = time.perf_counter() if args.warmup_clips == 0 else None
            frames = blocks = 0
            for chunk in stream:  # chunk.frames are uint8 on the host: the block is done
                rss_max = max(rss_max, proc.memory_info().rss)
                if chunk.clip < args.warmup_clips:
                    if chunk.clip == args.warmup_clips - 1 and chunk.block == scfg.blocks_per_clip - 1:
                        t_start = time.perf_counter()
                    continue
                frames += chunk.frames.shape[0]
                blocks += 1
            if cuda:
                torch.cuda.synchronize(device)
            wall = time.perf_counter() - t_start
            step_s = timer.seconds()
        ms = 1000 * sum(step_s) / len(step_s)
        row.update(
            ms_per_block_step=ms,
            block_steps_timed=len(step_s),
            fps=frames / wall,
            frames_timed=frames,
            decode_and_rest_ms_per_block=1000 * (wall - sum(step_s)) / blocks,
            tflops=flops / (ms / 1000) / 1e12,
            host_rss_gib=rss_max / GiB,
        )
        if cuda:
            nonpt = (total - torch.cuda.mem_get_info(device)[0]) - torch.cuda.memory_reserved(device)
            measured = torch.cuda.max_memory_reserved(device) + max(nonpt, 0)
            row.update(peak_alloc_gib=torch.cuda.max_memory_allocated(device) / GiB,
                       peak_reserved_gib=torch.cuda.max_memory_reserved(device) / GiB,
                       outside_allocator_gib=max(nonpt, 0) / GiB, peak_gib=measured / GiB,
                       planner_over_measured=plan.peak_device / measured, used_before_run_gib=used_before / GiB)
            if any(isinstance(m, FP8Linear) and not m.use_scaled_mm for m in model.modules()):
                notes.append("scaled_mm failed: fell back to dequantised matmul")
        else:
            notes.append("no CUDA: wall clock, no GPU memory")
        peak_bf16, peak_fp8 = env.get("peak_tflops_bf16"), env.get("peak_tflops_fp8")
        if peak_bf16:
            row["mfu"] = row["tflops"] / peak_bf16
            if peak_fp8:
                row["mfu_vs_fp8_peak"] = row["tflops"] / peak_fp8
    except torch.OutOfMemoryError as exc:
        row.update(status="OOM", notes=str(exc).splitlines()[0][:120])
        return row
    finally:
        stream = sampler = placed = model = vae = None
        if spec.compile:
            torch._dynamo.reset()
        _free_device(device)
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    row["notes"] = "; ".join(notes)
    return row


# ============================================================================ table
COLUMNS = (
    ("config", "config", "{}"), ("size", "size", "{}"), ("placement", "placement", "{}"),
    ("ms/blk-step", "ms_per_block_step", "{:.1f}"), ("fps", "fps", "{:.2f}"),
    ("peak GiB", "peak_gib", "{:.2f}"), ("alloc GiB", "peak_alloc_gib", "{:.2f}"),
    ("planner GiB", "planner_gib", "{:.2f}"), ("plan/meas", "planner_over_measured", "{:.3f}"),
    ("host GiB", "host_rss_gib", "{:.2f}"), ("TFLOP/s", "tflops", "{:.3g}"), ("MFU", "mfu", "{:.1%}"),
    ("notes", "notes", "{}"),
)


def format_table(rows: list[dict]) -> str:
    cells = [[name for name, _, _ in COLUMNS]]
    for r in rows:
        line = []
        for _, key, fmt in COLUMNS:
            v = r.get(key)
            if key == "notes" and r.get("status", "ok") != "ok":
                v = f"{r['status'].upper()}: {r.get('notes', '')}"
            line.append("n/a" if v is None or v == "" else fmt.format(v))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    out = [" | ".join(c.ljust(w) for c, w in zip(cells[0], widths))]
    out.append("-+-".join("-" * w for w in widths))
    out += [" | ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells[1:]]
    return "\n".join(out)


# ============================================================================ main
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, scaled-down model, tiny VAE: the same code in seconds")
    p.add_argument("--sizes", help=f"W*H list (default {GPU_SIZES}; smoke {SMOKE_SIZES})")
    p.add_argument("--configs", help=f"comma-separated configurations (default {GPU_CONFIGS}; smoke {SMOKE_CONFIGS})")
    p.add_argument("--clips", type=int, help="clips per configuration (default 3; smoke 2)")
    p.add_argument("--warmup-clips", type=int, help="clips excluded from the measurement (default 2; smoke 1)")
    p.add_argument("--steps", type=int, help="denoising steps (default 4; smoke 2)")
    p.add_argument("--frames-per-clip", type=int, help="video frames per clip = KV window (default 48; smoke 12: one block)")
    p.add_argument("--device", help="default cuda (cpu with --smoke)")
    p.add_argument("--compile-backend", help="torch.compile backend (default inductor on CUDA, eager on CPU)")
    p.add_argument("--compile-mode", default=None, help="inductor mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak of this device in TFLOP/s (else from its name)")
    p.add_argument("--force", action="store_true", help="run configurations the planner says will not fit")
    p.add_argument("--keep-going", action="store_true", help="record a failing configuration and continue")
    p.add_argument("--no-flop-check", action="store_true", help="skip the FlopCounterMode cross-check (on by default in --smoke)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=min(2, torch.get_num_threads()))
    p.add_argument("--json", help="write rows, environment and FLOP counts here")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --smoke (CPU) or on a GPU machine")
    cfg = SMOKE_CFG if args.smoke else WAN_S2V_14B
    scfg = SamplerConfig(steps=args.steps or (2 if args.smoke else 4),
                         frames_per_clip=args.frames_per_clip or (12 if args.smoke else 48),
                         decoder_warmup_latents=1 if args.smoke else SamplerConfig.decoder_warmup_latents)
    scfg.validate()
    clips = args.clips or (2 if args.smoke else 3)
    args.warmup_clips = args.warmup_clips if args.warmup_clips is not None else (1 if args.smoke else 2)
    args.clips = clips
    if not 0 <= args.warmup_clips < clips:
        raise SystemExit("--warmup-clips must be below --clips")
    if args.warmup_clips < 1:
        print("note: with no warm-up clip the KV window is still filling and compile time is counted")
    sizes = [parse_size(s) for s in (args.sizes or (SMOKE_SIZES if args.smoke else GPU_SIZES)).split(",")]
    specs = [Spec.parse(s) for s in (args.configs or (SMOKE_CONFIGS if args.smoke else GPU_CONFIGS)).split(",")]

    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {args.threads} threads)",
        "torch": torch.__version__, "python": sys.version.split()[0], "smoke": args.smoke,
        "model": "smoke DiT " + str(cfg) if args.smoke else "Wan2.2-S2V-14B (LiveAvatar) architecture, random weights",
        "clips": clips, "warmup_clips": args.warmup_clips, "steps": scfg.steps,
        "sdpa_backends": sdpa_backends(device, torch.bfloat16, cfg.head_dim),
    }
    if device.type == "cuda":
        env["total_gib"] = torch.cuda.get_device_properties(device).total_memory / GiB
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        bf16_peak, fp8_peak = gpu_peaks(env["device"])
    else:
        bf16_peak, fp8_peak = None, None
    if args.peak_tflops:
        bf16_peak, fp8_peak = args.peak_tflops, 2 * args.peak_tflops
    env["peak_tflops_bf16"], env["peak_tflops_fp8"] = bf16_peak, fp8_peak
    print(f"device: {env['device']}; torch {env['torch']}; SDPA backends: "
          + ", ".join(f"{k} {v}" for k, v in env["sdpa_backends"].items()))
    print(f"peak for MFU: {f'{bf16_peak} TFLOP/s dense bf16' if bf16_peak else 'unknown (n/a; give --peak-tflops)'}")

    result = {"env": env, "flops": {}, "rows": []}
    for width, height in sizes:
        terms = block_step_flops(cfg, scfg, width, height)
        total = sum(terms.values())
        result["flops"][f"{width}*{height}"] = {"total": total, "terms": terms,
                                                  "geometry": vars(geometry(cfg, scfg, width, height))}
        print(f"{width}*{height}: {total / 1e12:.4g} TFLOP per block-step ("
              + ", ".join(f"{k} {v / total:.1%}" for k, v in terms.items()) + ")")
    if args.smoke and not args.no_flop_check:
        w0, h0 = sizes[0]
        model = build_dit(cfg, torch.device("cpu"), "bf16", seed=args.seed)
        counted = counted_block_step_flops(model, scfg, w0, h0)
        formula = sum(block_step_flops(cfg, scfg, w0, h0).values())
        result["flop_check"] = {"size": f"{w0}*{h0}", "formula": formula, "flop_counter": counted, "ratio": formula / counted}
        print(f"FLOP check ({w0}*{h0}, smoke config, FlopCounterMode with math SDPA): formula {formula:.6g}, "
              f"counted {counted:.6g}, ratio {formula / counted:.4f}")
        del model

    for width, height in sizes:
        for spec in specs:
            t0 = time.perf_counter()
            try:
                row = run_one(spec, cfg, scfg, width, height, device, args, env)
            except Exception as exc:  # noqa: BLE001
                if not args.keep_going:
                    raise
                traceback.print_exc()
                row = {"config": spec.name, "size": f"{width}*{height}", "status": "failed", "notes": repr(exc)[:160]}
            row["seconds"] = time.perf_counter() - t0
            result["rows"].append(row)
            print(f"  {spec.name} @ {width}*{height}: {row.get('status')} in {row['seconds']:.1f} s", flush=True)

    print()
    print(format_table(result["rows"]))
    print("ms/blk-step: one forward_block + Euler step of a 3-latent block (steady state, warm-up excluded); "
          "fps: frames out of the whole loop (steps + VAE decode); peak GiB: max reserved + outside the allocator; "
          "MFU vs the dense bf16 peak.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return result


if __name__ == "__main__":
    main()
