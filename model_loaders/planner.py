"""VRAM / host-RAM planner: per-device peak of a configuration, before anything is loaded.

Everything is counted from the configs (``DiTConfig``, ``SamplerConfig``, ``PlacementConfig``,
the encoder/VAE sizes), never from hard-wired 14B numbers:

* weights: parameters counted on a meta-device model, per precision (fp8: the Linear layers
  of ``blocks``/``audio_injector`` at 1 byte + a float32 scale per tensor, the rest in bf16,
  ``keep_in_fp32`` modules in float32 - the set ``model_loaders/fp8.py`` quantizes); block
  swap: non-block weights + N resident blocks + one prefetch buffer; sp sharded: 1/N of the
  weights (FSDP shards) + the gathered block and its prefetch (replicated: all of them);
* KV caches: steps x layers x 2 x tokens x heads x head_dim x bytes (+ fp8 scales), one clip
  window of tokens (latent_frames_per_clip x tokens per frame); tpp: each rank only its steps;
  sp: heads split across ranks (Ulysses); sink store: sink tokens instead of the window;
* activations of one ``forward_block`` (an estimate; see ``activation_terms``; Ulysses sp: a
  rank's 1/N of the tokens + the all-to-all buffers), text K/V of
  every layer (kept for the whole run), VAE decode of one block (estimate), encoders when
  kept resident, and a fixed runtime reserve (CUDA context, cuBLAS workspace, allocator).

Exact terms (weights, KV, sink, text K/V) equal what the engine allocates; tests/test_planner.py
checks them against tiny models (weights against ``load_dit`` in every precision) and the
activation estimate against a measured peak.

``choose_placement`` picks, among every placement the engine offers, the fastest one that fits the
GPUs and the host RAM, by a predicted time per DiT call (``Timing``: copies / bandwidth against
FLOPs / throughput, two stated assumptions in ``SpeedModel``); fp8 KV caches are the one lossy
choice and can be forbidden. ``plan.choice`` says what limited the choice.

Several GPUs: a ``Layout`` (tpp step groups x Ulysses sp ranks, weights sharded or replicated,
optional decode rank) is planned per rank, with the traffic between GPUs (``layout_wire_bytes``)
over an assumed link (``SpeedModel.link``, by card size) in its time per block; ``choose_layout``
ranks every layout on the GPUs by predicted fps and recommends the fastest that fits.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

from ..liveavatar.config import DiTConfig, SamplerConfig
from ..liveavatar.schedule import assign_steps
from .gguf_quants import QUANT_TYPES
from .placement import PlacementConfig, dtype_name

GiB = 1024**3
PRECISIONS = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
# bytes per parameter outside the fp8 Linears (fp8: bf16, the compute dtype of FP8Linear)
STORAGE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 2}
FP8_SCOPES = ("blocks", "audio_injector")
# GGUF files: those scopes' Linear weights in a GGML type at (block bytes, block values) each (bytes per
# parameter = ratio), kept quantized on the device (GGUFLinear); the rest in bf16 (load_gguf_dit's storage),
# plus the LoRA GGUFLinear applies at run time (weight_bytes' lora_rank)
GGUF_BYTES = {q.name: (q.type_size, q.block_size) for q in QUANT_TYPES.values() if q.quantized}


# ---------------------------------------------------------------------------- sizes of other models
@dataclass(frozen=True)
class VAESize:
    """Wan 2.1 VAE (defaults: its released config, bf16 - the GPU default). Decode working set is an estimate."""

    base_dim: int = 96
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    params: int = 126_892_531  # AutoencoderKLWan(base_dim=96) on the meta device
    dtype_bytes: int = 2
    spatial_stride: int = 8
    temporal_stride: int = 4
    live_factor: int = 8  # full-resolution activations alive at once (input, norms, conv out, upsample)

    @property
    def weight_bytes(self) -> int:
        """What ``load_wan_vae`` allocates: every parameter in the decode dtype."""
        return self.params * self.dtype_bytes

    def with_precision(self, precision: str) -> "VAESize":
        """The same VAE in ``precision`` (bf16/fp16/fp32, the VAE loader's choices)."""
        return replace(self, dtype_bytes=PRECISIONS[precision])


@dataclass(frozen=True)
class EncoderSizes:
    """Text (umT5-XXL encoder) and audio (wav2vec2-large) encoders as the loaders allocate them.

    Counts are the real configs' parameters on the meta device (tied embedding once); bytes per
    parameter follow the loaders' precision (defaults: bf16 text, fp16 audio - the GPU defaults of
    ``encoder_precision``). An fp8 text encoder stores its ``text_fp8_params`` Linear weights at
    1 byte + one float32 scale per layer (``text_fp8_tensors``), the rest in ``text_bytes``.
    """

    text_params: int = 5_680_910_336
    text_bytes: int = 2
    audio_params: int = 315_438_720
    audio_bytes: int = 2
    text_fp8_params: int = 0
    text_fp8_tensors: int = 0
    text_linear_params: int = 4_630_511_616  # umT5-XXL's 168 Linear weights (what fp8 stores at 1 byte)
    text_linear_tensors: int = 168

    @property
    def text_total(self) -> int:
        return (self.text_params - self.text_fp8_params) * self.text_bytes + self.text_fp8_params + 4 * self.text_fp8_tensors

    @property
    def audio_total(self) -> int:
        return self.audio_params * self.audio_bytes

    def with_precision(self, text: str = "bf16", audio: str = "fp16") -> "EncoderSizes":
        """The encoders in the loaders' precisions (text: bf16/fp16/fp32/fp8; audio: bf16/fp16/fp32)."""
        fp8 = text == "fp8"
        return replace(self, text_bytes=2 if fp8 else PRECISIONS[text], audio_bytes=PRECISIONS[audio],
                       text_fp8_params=self.text_linear_params if fp8 else 0,
                       text_fp8_tensors=self.text_linear_tensors if fp8 else 0)

    @classmethod
    def of_models(cls, text_model: nn.Module, audio_model: nn.Module) -> "EncoderSizes":
        """Counts of two (meta or real) encoder modules: parameters and buffers, shared tensors once."""
        def count(m: nn.Module) -> int:
            return sum({id(t): t.numel() for t in [*m.parameters(), *m.buffers()]}.values())

        linears = [m for m in text_model.modules() if isinstance(m, nn.Linear)]
        return cls(text_params=count(text_model), audio_params=count(audio_model),
                   text_linear_params=sum(m.weight.numel() for m in linears), text_linear_tensors=len(linears))


# ---------------------------------------------------------------------------- plan objects
@dataclass
class Term:
    name: str
    bytes: int
    note: str = ""
    exact: bool = True


@dataclass
class DevicePlan:
    role: str
    count: int
    terms: list[Term]

    @property
    def total(self) -> int:
        return sum(t.bytes for t in self.terms)


@dataclass
class MemoryPlan:
    settings: dict
    devices: list[DevicePlan]
    host: list[Term]
    encode_phase: list[Term] = field(default_factory=list)  # device peak while encoders run (before sampling)
    traffic_per_forward: int = 0  # host -> device bytes per DiT call (block swap + host KV)
    timing: "Timing | None" = None  # predicted time per DiT call (see SpeedModel)
    choice: list[str] = field(default_factory=list)  # how choose_placement chose, what limited it
    # host peak while loading, where a placement loads the whole DiT on the host before placing it
    host_load: list[Term] = field(default_factory=list)

    @property
    def peak_device(self) -> int:
        return max(d.total for d in self.devices)

    @property
    def host_total(self) -> int:
        """Host peak: sampling, or loading if that is higher (``host_load``)."""
        return max(sum(t.bytes for t in self.host), sum(t.bytes for t in self.host_load))

    def term(self, name: str, device: int = 0) -> int:
        return sum(t.bytes for t in self.devices[device].terms if t.name == name)

    def table(self) -> str:
        s = self.settings
        lines = [
            f"{s['model']} | {s['precision']} weights | {s['width']}x{s['height']} "
            f"(latent {s['latent_h']}x{s['latent_w']}, {s['tokens_per_frame']} tokens/frame) | "
            f"{s['steps']} steps | mode {s['mode']} x{s['world_size']}"
            + (f" ({s['layout']})" if s.get("layout") and s["world_size"] > 1 else ""),
            f"placement: {s['placement']}",
            f"tokens: block {s['block_tokens']}, KV window {s['window_tokens']}, sink {s['sink_tokens']}, "
            f"keys per layer {s['keys_per_layer']}",
        ]
        for dev in self.devices:
            lines.append(f"-- per device: {dev.role}" + (f" (x{dev.count})" if dev.count > 1 else ""))
            for t in dev.terms:
                mark = "" if t.exact else " ~"
                lines.append(f"   {t.name:<26}{t.bytes / GiB:>8.2f} GiB{mark}  {t.note}")
            lines.append(f"   {'TOTAL':<26}{dev.total / GiB:>8.2f} GiB")
        if self.encode_phase:
            enc = sum(t.bytes for t in self.encode_phase)
            parts = ", ".join(f"{t.name} {t.bytes / GiB:.2f}" for t in self.encode_phase)
            lines.append(f"-- encode phase (before sampling, one device): {enc / GiB:.2f} GiB ({parts})")
        lines.append("-- host RAM")
        for t in self.host:
            lines.append(f"   {t.name:<26}{t.bytes / GiB:>8.2f} GiB  {t.note}")
        if self.host_load:
            load = sum(t.bytes for t in self.host_load)
            parts = ", ".join(f"{t.name} {t.bytes / GiB:.2f}" for t in self.host_load)
            lines.append(f"   {'while loading':<26}{load / GiB:>8.2f} GiB  ({parts})")
        lines.append(f"   {'TOTAL':<26}{self.host_total / GiB:>8.2f} GiB" + ("  (the higher of the two)" if self.host_load else ""))
        lines.append(f"host->device traffic per DiT call: {self.traffic_per_forward / GiB:.2f} GiB")
        if self.timing is not None:
            lines += self.timing.lines()
        lines.append("(~ = estimate; other terms are exact byte counts of what the engine allocates)")
        if self.choice:
            lines.append("-- choice")
            lines += [f"   {c}" for c in self.choice]
        return "\n".join(lines)


# ---------------------------------------------------------------------------- weights
@dataclass(frozen=True)
class WeightCount:
    block: int  # bytes of one DiT block
    base: int  # bytes outside the blocks
    block_params: int
    base_params: int

    def total(self, num_layers: int) -> int:
        return self.base + num_layers * self.block


_WEIGHT_CACHE: dict = {}


def weight_bytes(cfg: DiTConfig, precision: str, lora_rank: int | None = None) -> WeightCount:
    """Bytes of the DiT's weights in ``precision``, counted on a meta-device model.

    GGUF types also count the run-time LoRA their loader keeps (bf16 A and B of rank ``lora_rank``,
    default LiveAvatar's 128, on the quantized q,k,v,o,ffn.0,ffn.2; 0: no LoRA)."""
    key = (cfg, precision, lora_rank)
    if key in _WEIGHT_CACHE:
        return _WEIGHT_CACHE[key]
    from ..liveavatar.transformer import LiveAvatarTransformer

    if precision not in PRECISIONS and precision not in GGUF_BYTES:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)} or a GGUF type {sorted(GGUF_BYTES)}, got {precision!r}")
    with torch.device("meta"):
        model = LiveAvatarTransformer(cfg)
    keep = LiveAvatarTransformer.keep_in_fp32
    linear_weights = {
        f"{mname}.weight"
        for mname, m in model.named_modules()
        if isinstance(m, nn.Linear) and mname.split(".")[0] in FP8_SCOPES
    }
    block = base = block_params = base_params = 0
    for name, p in model.named_parameters():
        parts = name.split(".")
        if any(k in parts for k in keep):
            nbytes = 4 * p.numel()
        elif precision == "fp8" and name in linear_weights:
            nbytes = p.numel() + 4  # float8 values + one float32 scale per tensor
        elif precision in GGUF_BYTES and name in linear_weights:
            type_size, values = GGUF_BYTES[precision]
            nbytes = p.numel() // values * type_size  # the file's blocks, as GGUFLinear keeps them
        else:  # everything else in the storage dtype; fp8 and GGUF keep it in bf16 (load_dit's _target_dtype)
            nbytes = STORAGE_BYTES.get(precision, 2) * p.numel()
        if parts[0] == "blocks":
            if parts[1] == "0":
                block += nbytes
                block_params += p.numel()
        else:
            base += nbytes
            base_params += p.numel()
    if precision in GGUF_BYTES:  # the run-time LoRA of the quantized Linears (gguf_linear.GGUFLinear.set_lora)
        from ..liveavatar.lora import LIVEAVATAR_RANK, peft_wrapped

        rank = LIVEAVATAR_RANK if lora_rank is None else lora_rank
        for mname, m in model.named_modules():
            if rank and f"{mname}.weight" in linear_weights and peft_wrapped([mname]):
                nbytes = 2 * rank * (m.in_features + m.out_features)
                parts = mname.split(".")
                if parts[0] != "blocks":
                    base += nbytes
                elif parts[1] == "0":
                    block += nbytes
    out = WeightCount(block, base, block_params, base_params)
    _WEIGHT_CACHE[key] = out
    return out


# ---------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Geometry:
    latent_h: int
    latent_w: int
    tokens_per_frame: int
    block_tokens: int
    window_tokens: int
    sink_tokens: int

    @property
    def keys(self) -> int:
        return self.window_tokens + self.sink_tokens


def geometry(cfg: DiTConfig, scfg: SamplerConfig, width: int, height: int, vae_stride: int = 8) -> Geometry:
    h, w = height // vae_stride, width // vae_stride
    _, ph, pw = cfg.patch_size
    fsl = (h // ph) * (w // pw)
    # sink: reference frame + FramePack buckets (kernels 1x2x2, 2x4x4, 4x8x8 of the patch grid)
    n1, n2, n4 = cfg.zip_frame_buckets
    sink = fsl + n1 * (h // 2) * (w // 2) + (n2 // 2) * (h // 4) * (w // 4) + (n4 // 4) * (h // 8) * (w // 8)
    return Geometry(h, w, fsl, scfg.latent_frames_per_block * fsl, scfg.latent_frames_per_clip * fsl, sink)


def cache_bytes(cfg: DiTConfig, tokens: int, heads: int, dtype_bytes: int, scaled: bool) -> int:
    """One KVCache/CondCache: layers x (k, v) x heads x tokens x head_dim (+ float32 scale per token-head)."""
    n = cfg.num_layers * 2 * heads * tokens
    return n * cfg.head_dim * dtype_bytes + (n * 4 if scaled else 0)


# ---------------------------------------------------------------------------- activations
def activation_terms(cfg: DiTConfig, g: Geometry, b: int, heads_frac: float, kv_copies: int) -> tuple[int, dict]:
    """Estimated peak bytes of one ``forward_block`` beyond weights, caches and text K/V.

    b: compute dtype bytes. Attention phase (inside ``attend``): block input, normed input,
    q/k/v, roped q and k, attention output (7 x L x dim), concatenated keys and values
    (2 x K x dim x heads_frac), float32 RoPE temporaries (3 x L x dim x 4), plus ``kv_copies``
    materialised reads of the window and sink (fp8 decode or host copies; 2 with prefetch).
    FFN phase: input, float32 residual, normed input, hidden and GELU output (2 x L x ffn).
    Plus the RoPE tables (float32) and per-frame modulation and audio tokens.
    """
    L, K, dim = g.block_tokens, g.keys, cfg.dim
    attn = 7 * L * dim * b + 2 * K * dim * b * heads_frac + 3 * L * dim * 4
    attn += kv_copies * 2 * K * dim * b * heads_frac
    ffn = L * dim * b + L * dim * 4 + L * dim * b + 2 * L * cfg.ffn_dim * b + L * dim * 4
    fixed = (L + g.sink_tokens) * cfg.head_dim * 4  # cos/sin tables [tokens, D/2, 2] float32
    frames = L // g.tokens_per_frame
    fixed += frames * 6 * dim * 4 + frames * (cfg.num_audio_token + 2) * dim * b
    return int(max(attn, ffn) + fixed), {"attention": int(attn), "ffn": int(ffn), "fixed": int(fixed)}


def vae_decode_bytes(vae: VAESize, scfg: SamplerConfig, width: int, height: int) -> tuple[int, int]:
    """(weights, working set) of decoding one block: frames of one latent at a time at full size."""
    pixels = width * height
    full = vae.base_dim * vae.dim_mult[0]
    frames = vae.temporal_stride
    work = vae.live_factor * frames * pixels * full * vae.dtype_bytes
    # causal-conv caches: 2 frames per conv, (num_res_blocks + 1) res blocks x 2 convs per level
    convs = (vae.num_res_blocks + 1) * 2
    cache = 0
    for level, mult in enumerate(vae.dim_mult):  # level i: 1/2^i of the full size
        cache += convs * 2 * vae.base_dim * mult * (pixels // 4**level) * vae.dtype_bytes
    return vae.weight_bytes, work + cache


# ---------------------------------------------------------------------------- speed
@dataclass(frozen=True)
class Link:
    """How two GPUs of one machine exchange collectives (all-to-all, all-gather, hand-offs).

    gbps: bytes each rank moves per second, GB/s (NCCL's "bus bandwidth"). shares_host_link: the
    collectives cross the same PCIe x16 link as the host->device copies (block swap, host KV), so
    their times add on that link; NVLink is a separate path, so they overlap each other.
    """

    kind: str
    gbps: float
    shares_host_link: bool
    why: str


# The assumed links, by kind. Stated, not measured: override with --link / --link-gbps.
LINKS = {
    "pcie": Link("pcie", 12.0, True, "PCIe 4.0 x16 without P2P (consumer cards: peer-to-peer is off, NCCL stages "
                 "every transfer through host memory, ~half the 25 GB/s of a direct pinned copy)"),
    "pcie-p2p": Link("pcie-p2p", 22.0, True, "PCIe 4.0 x16 with peer-to-peer (workstation/datacenter PCIe cards, "
                     "e.g. 48 GB L40S, RTX 6000 Ada)"),
    "nvlink": Link("nvlink", 200.0, False, "NVLink (80 GB+ datacenter cards, A100/H100/H200 SXM: 300-450 GB/s per "
                   "direction, ~200 taken for NCCL collectives)"),
}


def link_for(gpu_gib: float) -> str:
    """The link kind assumed for cards of ``gpu_gib``: < 40 GiB consumer (PCIe, no P2P), < 80 GiB
    workstation/PCIe datacenter (PCIe P2P), 80+ GiB datacenter SXM (NVLink)."""
    return "pcie" if gpu_gib < 40 else "pcie-p2p" if gpu_gib < 80 else "nvlink"


@dataclass(frozen=True)
class SpeedModel:
    """The assumptions behind a predicted time per DiT call; printed with every plan.

    bandwidth_gbps: host->device copy rate, GB/s (pinned memory over PCIe 4.0 x16: ~25 of its 32
    theoretical). tflops: sustained model FLOP rate per GPU, TFLOP/s (400: ~40% of an H100/H200's 989
    dense bf16; a 24 GB desktop card sustains far less: an RTX 4090 ~66, 40% of its 165). link /
    link_gbps: the GPU-to-GPU link for collectives (``LINKS``; None: by card size, ``with_gpus``; a
    plan made without GPUs takes ``pcie``, the slowest). None is measured here: override them with
    what ``bench/bench_fullsize.py`` and NCCL's tests measure on the machine at hand.
    """

    bandwidth_gbps: float = 25.0
    tflops: float = 400.0
    link: str | None = None
    link_gbps: float | None = None

    def __post_init__(self) -> None:
        if not (self.bandwidth_gbps > 0 and self.tflops > 0):
            raise ValueError(f"bandwidth and TFLOP/s must be > 0, got {self.bandwidth_gbps} GB/s, {self.tflops} TFLOP/s")
        if self.link is not None and self.link not in LINKS:
            raise ValueError(f"link must be one of {', '.join(LINKS)}, got {self.link!r}")
        if self.link_gbps is not None and not self.link_gbps > 0:
            raise ValueError(f"link bandwidth must be > 0 GB/s, got {self.link_gbps}")

    def with_gpus(self, gpus: list[float]) -> "SpeedModel":
        """This model with the link fixed: the one given, else the one the smallest card implies."""
        return replace(self, link=self.link or link_for(min(gpus)))

    @property
    def gpu_link(self) -> Link:
        base = LINKS[self.link or "pcie"]
        return base if self.link_gbps is None else replace(base, gbps=self.link_gbps)

    def describe(self) -> str:
        return f"{self.bandwidth_gbps:g} GB/s host->device, {self.tflops:g} TFLOP/s sustained"

    def describe_link(self) -> str:
        link = self.gpu_link
        src = "given" if self.link_gbps is not None else "assumed"
        return f"{link.gbps:g} GB/s between GPUs ({src}; {link.kind}: {link.why})"


@dataclass(frozen=True)
class Timing:
    """Predicted time of one DiT call (one block, one step) on the busiest device, and of one block.

    Per call, on one rank: compute = FLOPs / throughput; copies = host->device bytes (block swap,
    host KV caches) / host bandwidth; gathers = FSDP all-gather bytes / link; all-to-alls = Ulysses
    bytes / link. Overlap: copies and gathers are prefetched on a side stream while the previous
    block / layer computes, so they hide behind compute (on PCIe they share the card's one link, so
    their times add there; NVLink is a separate path); the all-to-alls cannot hide: attention waits
    for its q/k/v and the output projection for the attention output. So

        call = a2a + max(compute, copies (+ or max) gathers)      (prefetch)
        call = a2a + compute + copies + gathers                   (no prefetch)

    A block: tpp pipelines the step groups, so in the steady state one block leaves every
    max(stage) seconds; a stage is ``calls_per_block`` calls (its steps; the busiest group when the
    groups do not divide the steps) plus the latent's hand-off to the next stage (counted on the
    path: it is < 1 MB). fps = frames per block / block time (DiT only; the VAE decode not counted).
    """

    flops: int
    copy_bytes: int
    speed: SpeedModel
    overlap: bool
    calls_per_block: int  # DiT calls per block on the busiest rank (steps; tpp: that rank's steps)
    frames_per_block: int
    gather_bytes: int = 0  # FSDP all-gathers per call per rank
    a2a_bytes: int = 0  # Ulysses all-to-alls (+ the output gather) per call per rank
    handoff_bytes: int = 0  # per block: the latent to the next step group / the decode rank

    @property
    def compute_s(self) -> float:
        return self.flops / (self.speed.tflops * 1e12)

    @property
    def copy_s(self) -> float:
        return self.copy_bytes / (self.speed.bandwidth_gbps * 1e9)

    @property
    def gather_s(self) -> float:
        return self.gather_bytes / (self.speed.gpu_link.gbps * 1e9)

    @property
    def a2a_s(self) -> float:
        return self.a2a_bytes / (self.speed.gpu_link.gbps * 1e9)

    @property
    def handoff_s(self) -> float:
        return self.handoff_bytes / (self.speed.gpu_link.gbps * 1e9)

    @property
    def hidden_s(self) -> float:
        """Prefetched transfers of one call: copies and gathers, on one PCIe link or two paths."""
        if self.speed.gpu_link.shares_host_link:
            return self.copy_s + self.gather_s
        return max(self.copy_s, self.gather_s)

    @property
    def call_s(self) -> float:
        if self.overlap:
            return self.a2a_s + max(self.compute_s, self.hidden_s)
        return self.a2a_s + self.compute_s + self.copy_s + self.gather_s

    @property
    def block_s(self) -> float:
        return self.calls_per_block * self.call_s + self.handoff_s

    @property
    def fps(self) -> float:
        return self.frames_per_block / self.block_s

    @property
    def bound(self) -> str:
        moved = self.hidden_s if self.overlap else self.copy_s + self.gather_s
        if self.a2a_s > max(self.compute_s, moved):
            return "all-to-all-bound"
        if self.gather_s > self.copy_s and moved > self.compute_s:
            return "all-gather-bound"
        return "copy-bound" if moved > self.compute_s else "compute-bound"

    def lines(self) -> list[str]:
        how = "max(copy, compute): copies overlap compute" if self.overlap else "copy + compute: no prefetch"
        out = [
            f"predicted time per DiT call: {self.call_s:.3f} s ({self.bound}; {how}) -> ~{self.fps:.1f} fps "
            f"(DiT only, {self.calls_per_block} call(s) per {self.frames_per_block}-frame block)",
            f"   copy {self.copy_bytes / GiB:.2f} GiB / {self.speed.bandwidth_gbps:g} GB/s = {self.copy_s:.3f} s; "
            f"compute {self.flops / 1e12:.1f} TFLOP / {self.speed.tflops:g} TFLOP/s = {self.compute_s:.3f} s",
        ]
        if self.gather_bytes or self.a2a_bytes or self.handoff_bytes:
            gbps = self.speed.gpu_link.gbps
            out.append(f"   between GPUs per call: all-gather {self.gather_bytes / GiB:.2f} GiB ({self.gather_s:.3f} s, "
                       f"prefetched), all-to-all {self.a2a_bytes / GiB:.2f} GiB ({self.a2a_s:.3f} s, on the path) at "
                       f"{gbps:g} GB/s; hand-off per block {self.handoff_bytes / 2**20:.2f} MiB")
            out.append(f"   time per block: {self.calls_per_block} x {self.call_s:.3f} s + hand-off {self.handoff_s:.4f} s "
                       f"= {self.block_s:.3f} s -> {self.fps:.1f} fps")
        out.append(f"   assumptions: {self.speed.describe()} (plan --bandwidth GBPS --tflops TFLOPS)")
        if self.gather_bytes or self.a2a_bytes or self.handoff_bytes:
            out.append(f"   link: {self.speed.describe_link()} (plan --link KIND --link-gbps GBPS)")
        return out


def block_step_flops(cfg: DiTConfig, scfg: SamplerConfig, width: int, height: int, sp: int = 1) -> dict[str, int]:
    """Model FLOPs of one ``forward_block`` in the steady state (KV window full), by term; ``sp``: on
    one rank of a Ulysses group of ``sp`` ranks (see the end).

    Counting rule: 2 FLOPs per multiply-add of every matmul and convolution (what
    ``torch.utils.flop_counter`` counts; bias adds, norms, RoPE, softmax and other elementwise
    work are not counted). With L block tokens, K = window + sink keys, d = dim, f = ffn_dim,
    T = text_len, A = audio tokens per frame (num_audio_token + 1), F latent frames per block:

    * per layer: q, k, v, o projections 4 * 2Ld^2; self-attention QK^T and PV 2 * 2LKd;
      text cross-attention q, o 2 * 2Ld^2 and attention 4LTd (its keys/values are computed once
      per video by ``embed_text``, not per step); FFN 2 * 2Ldf;
    * per audio-injector layer: AdaLN 2F*d*2d, q, o 2 * 2Ld^2, k, v of the F*A audio tokens
      2 * 2FAd^2, attention (each frame to its own tokens) 4LAd;
    * once: patch embedding 2L*d*in_dim*prod(patch), head 2L*d*out_dim*prod(patch), time
      embedding/projection 2F(freq*d + d^2 + 6d^2), and the causal audio encoder's convolutions
      over motion_video_frames + frames_per_block feature steps.

    ``bench/bench_fullsize.py`` checks it against ``FlopCounterMode`` (tests/test_bench_fullsize.py).

    Ulysses sp (``sp`` ranks): a rank holds ceil(L / sp) of the block's tokens and runs every
    token-wise matmul (projections, FFN, cross-attention, injectors, patch embedding, head) on
    those only; self-attention runs all L queries against all K keys for 1/sp of the heads
    (4LKd / sp). The per-frame and audio terms (time embedding, injector AdaLN and audio k/v, the
    audio encoder) are small and computed on every rank.
    """
    if sp < 1:
        raise ValueError(f"sp must be >= 1, got {sp}")
    g = geometry(cfg, scfg, width, height)
    d, f, nf = cfg.dim, cfg.ffn_dim, scfg.latent_frames_per_block
    L, K, T = -(-g.block_tokens // sp), g.window_tokens + g.sink_tokens, cfg.text_len
    A = cfg.num_audio_token + 1
    layers, inj = cfg.num_layers, len(cfg.audio_inject_layers)
    patch = math.prod(cfg.patch_size)

    def lin(rows, i, o):
        return 2 * rows * i * o

    # causal audio encoder: Conv1d(k=3, left pad 2) stacks; conv_flops = 2 * out_len * cout * cin * k
    ta = scfg.motion_video_frames + scfg.frames_per_block
    t2 = (ta - 1) // 2 + 1  # stride 2
    t3 = (t2 - 1) // 2 + 1
    ntok, q4 = cfg.num_audio_token, d // 4
    audio_enc = 2 * ta * (q4 * ntok) * cfg.audio_dim * 3 + 2 * ta * q4 * cfg.audio_dim * 3
    audio_enc += (ntok + 1) * (2 * t2 * (d // 2) * q4 * 3 + 2 * t3 * d * (d // 2) * 3)
    audio_enc += lin(t3, d, d)  # final_linear on the global branch

    return {
        "self_attn_proj": layers * 4 * lin(L, d, d),
        "self_attn": layers * 4 * g.block_tokens * K * d // sp,
        "text_cross_proj": layers * 2 * lin(L, d, d),
        "text_cross_attn": layers * 4 * L * T * d,
        "ffn": layers * (lin(L, d, f) + lin(L, f, d)),
        "audio_inject_proj": inj * (lin(nf, d, 2 * d) + 2 * lin(L, d, d) + 2 * lin(nf * A, d, d)),
        "audio_inject_attn": inj * 4 * L * A * d,
        "embed_head_time": 2 * L * d * cfg.in_dim * patch + lin(L, d, cfg.out_dim * patch)
        + lin(nf, cfg.freq_dim, d) + lin(nf, d, d) + lin(nf, d, 6 * d),
        "audio_encoder": audio_enc,
    }


def call_flops(cfg: DiTConfig, scfg: SamplerConfig, width: int, height: int, mode: str, world_size: int) -> int:
    """FLOPs of one DiT call on one rank: sp (Ulysses) splits the tokens and the heads over the
    ranks (``block_step_flops(sp=)``); single and tpp run the whole call on one device."""
    return sum(block_step_flops(cfg, scfg, width, height, world_size if mode == "sp" else 1).values())


# ---------------------------------------------------------------------------- traffic between GPUs
@dataclass(frozen=True)
class WireBytes:
    """Bytes one rank sends per DiT call (``all_to_all``, ``all_gather``) and per block (``handoff``)."""

    all_to_all: int = 0  # Ulysses: q, k, v in and the attention output back, every layer (+ output gather)
    all_gather: int = 0  # FSDP2: every unit's weights gathered once per call
    handoff: int = 0  # tpp: the block's latent to the next step group (or the decode rank), once per block

    @property
    def per_call(self) -> int:
        return self.all_to_all + self.all_gather


def layout_wire_bytes(cfg: DiTConfig, scfg: SamplerConfig, width: int, height: int, precision: str,
                      sp: int = 1, sharded: bool = False, handoff: bool = False) -> WireBytes:
    """The planner's traffic model: bytes on the wire per rank (sent; a rank receives as much).

    The sp terms are ``wire_bytes.predicted_wire_bytes`` (the formula ``tests/test_ulysses.py``
    checks byte for byte against the collectives a rank dispatches), for rank 0, the largest share:

    * all-to-all: per layer, q/k/v go sequence-sharded -> head-sharded and the attention output
      comes back (about 4 * layers * (N-1)/N * L/N * dim elements of ``b`` bytes, b = 4 for fp32,
      else 2), plus the head's output gathered once per call. Cross-attention (text keys
      replicated), the audio injectors and the FFN need nothing.
    * all-gather (``sharded``): FSDP2 gathers every unit a call runs, (N-1) padded shards of it; for
      a precision other than bf16 the bf16 figure is scaled by this precision's weight bytes.
    * hand-off (``handoff``, tpp): the float32 block latent c x F x h x w x 4, once per block.

    Not counted: once-per-clip or once-per-video exchanges (sink prefill, text K/V, the reference
    broadcast) and the one-element cancel/control messages.
    """
    from .wire_bytes import SPLayout, predicted_wire_bytes

    g = geometry(cfg, scfg, width, height)
    b = 4 if precision == "fp32" else 2
    latent = cfg.out_dim * scfg.latent_frames_per_block * g.latent_h * g.latent_w * 4
    a2a = gather = 0
    if sp > 1:
        sent = predicted_wire_bytes(cfg, g, SPLayout(sp, shard_weights=sharded, activation_bytes=b,
                                                     weight_bytes=4 if precision == "fp32" else 2))
        a2a = sent["all_to_all"] + sent["gather"]
        gather = sent["weights"]
        if sharded and precision not in ("fp32", "bf16", "fp16"):  # fp8, GGUF: the same units, fewer bytes
            layers = cfg.num_layers
            gather = round(gather * weight_bytes(cfg, precision).total(layers) / weight_bytes(cfg, "bf16").total(layers))
    return WireBytes(a2a, gather, latent if handoff else 0)


# ---------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class Layout:
    """How the DiT is spread over GPUs: ``groups`` tpp step groups, each a Ulysses sp group of ``sp``
    ranks (1 x 1: one process); within an sp group the weights are FSDP2-sharded (``sharded``) or
    replicated; ``decode_rank``: one more GPU holds only the VAE. CLI: ``--workers groups*sp --mode
    tpp --sp sp [--decode-rank]`` (``flags``)."""

    groups: int = 1
    sp: int = 1
    sharded: bool = False
    decode_rank: bool = False

    def __post_init__(self) -> None:
        if self.groups < 1 or self.sp < 1:
            raise ValueError(f"a layout needs >= 1 step group of >= 1 rank, got {self.groups} x {self.sp}")
        if self.sharded and self.sp == 1:
            raise ValueError("weights are sharded within an sp group: sharded needs sp >= 2")
        if self.decode_rank and self.groups == 1 and self.sp > 1:
            raise ValueError("a decode rank runs with --mode tpp (step groups), not plain sp")

    @property
    def dit_ranks(self) -> int:
        return self.groups * self.sp

    @property
    def gpus(self) -> int:
        return self.dit_ranks + int(self.decode_rank)

    @property
    def mode(self) -> str:
        """The plan's mode: single (one process), sp (one sp group) or tpp (step groups, with or without sp)."""
        if self.gpus == 1:
            return "single"
        return "sp" if self.groups == 1 and self.sp > 1 else "tpp"

    @classmethod
    def of_mode(cls, mode: str, world_size: int, steps: int) -> "Layout":
        """The layout ``--mode`` gives on ``world_size`` GPUs: tpp runs at most ``steps`` step groups
        (one more GPU becomes the decode rank), sp is one sharded group of all of them."""
        if mode == "single":
            return cls()
        if mode == "sp":
            return cls(1, world_size, sharded=True)
        return cls(min(world_size, steps), 1, decode_rank=world_size > steps)

    def name(self) -> str:
        parts = []
        if self.groups > 1 or (self.sp == 1 and self.decode_rank):
            parts.append(f"tpp {self.groups}")
        if self.sp > 1:
            parts.append(f"sp {self.sp} ({'sharded' if self.sharded else 'replicated'})")
        text = " x ".join(parts) or "single"
        return text + (" + decode rank" if self.decode_rank else "")

    def flags(self) -> str:
        """The ``generate``/``demo`` flags that run this layout."""
        if self.gpus == 1:
            return "(no --workers)"
        if self.mode == "sp":
            return f"--workers {self.sp} --mode sp"
        out = f"--workers {self.dit_ranks} --mode tpp" + (f" --sp {self.sp}" if self.sp > 1 else "")
        return out + (" --decode-rank" if self.decode_rank else "")

    def group_steps(self, steps: int) -> list[int]:
        """Steps per step group: contiguous runs, earlier groups one more (``liveavatar.schedule.assign_steps``)."""
        if self.groups > steps:
            raise ValueError(f"tpp runs at most {steps} step groups for {steps} steps, got {self.groups}")
        return [len(run) for run in assign_steps(steps, self.groups)]  # the schedule's own split


# ---------------------------------------------------------------------------- the plan
def plan_memory(
    dit_cfg: DiTConfig,
    precision: str = "bf16",
    width: int = 704,
    height: int = 384,
    sampler_cfg: SamplerConfig = SamplerConfig(),
    placement: PlacementConfig | None = None,
    world_size: int = 1,
    mode: str = "single",
    vae: VAESize = VAESize(),
    encoders: EncoderSizes = EncoderSizes(),
    encoders_resident: bool = False,
    runtime_reserve: int = int(0.75 * GiB),
    model_name: str | None = None,
    speed: SpeedModel = SpeedModel(),
    layout: Layout | None = None,
) -> MemoryPlan:
    """Per-device and host memory of sampling with this configuration (see module docstring), and
    its predicted time (``Timing``). ``layout`` (default: the one ``mode`` gives on ``world_size``
    GPUs, ``Layout.of_mode``) says how the DiT is spread; ``placement`` applies to every DiT rank."""
    placement = placement or PlacementConfig()
    if layout is None:
        if mode not in ("single", "tpp", "sp"):
            raise ValueError(f"mode must be single, tpp or sp, got {mode!r}")
        if mode == "single" and world_size != 1:
            raise ValueError("mode 'single' runs on one device; use tpp or sp for several")
        if mode != "single" and world_size < 2:
            raise ValueError(f"mode {mode} needs at least 2 devices")
        layout = Layout.of_mode(mode, world_size, sampler_cfg.steps)
    else:
        mode, world_size = layout.mode, layout.gpus
    sp = layout.sp
    if dit_cfg.num_heads % sp:
        raise ValueError(f"sp splits {dit_cfg.num_heads} heads evenly; {sp} ranks do not divide them")
    cfg, scfg = dit_cfg, sampler_cfg
    g = geometry(cfg, scfg, width, height, vae.spatial_stride)
    w = weight_bytes(cfg, precision)
    b = 4 if precision == "fp32" else 2
    L = cfg.num_layers
    kv_dtype = placement.kv_cache_dtype
    kv_b = kv_dtype.itemsize if kv_dtype is not None else b
    scaled = kv_b == 1
    kv_host = placement.kv_cache_device == "cpu"
    heads = cfg.num_heads // sp
    heads_frac = heads / cfg.num_heads
    per_group = layout.group_steps(scfg.steps)

    # weights on one DiT device
    swap = placement.blocks_on_device is not None and placement.blocks_on_device < L and not layout.sharded
    if layout.sharded:
        gathered = 2 * w.block  # the gathered unit and the next one (FSDP prefetch)
        dev_weights = Term("weights", math.ceil(w.total(L) / sp) + gathered,
                           f"1/{sp} shard + 2 gathered blocks", exact=False)
        host_weights = 0
        n_swapped = 0
    elif swap:
        n = placement.blocks_on_device
        buffer = w.block if placement.prefetch else 0
        dev_weights = Term("weights", w.base + n * w.block + buffer,
                           f"non-block + {n} resident block(s)" + (" + 1 prefetch buffer" if buffer else ""))
        n_swapped = L - (n - 1)
        host_weights = n_swapped * w.block
    else:
        dev_weights = Term("weights", w.total(L), f"{L} blocks of {w.block / 2**20:.0f} MiB + {w.base / 2**20:.0f} MiB")
        n_swapped = 0
        host_weights = w.total(L) if placement.offload_model_between_uses else 0
    if placement.offload_model_between_uses and not swap and not layout.sharded:
        dev_weights.note += " (while in use)"
        host_weights = w.total(L)
    elif placement.offload_model_between_uses and swap:
        host_weights = n_swapped * w.block + w.base + (placement.blocks_on_device - 1) * w.block

    one_kv = cache_bytes(cfg, g.window_tokens, heads, kv_b, scaled)
    sink = cache_bytes(cfg, g.sink_tokens, heads, kv_b, scaled)
    text_kv = L * 2 * cfg.text_len * cfg.dim * b
    if kv_host:
        kv_copies = 2 if placement.prefetch else 1
    else:
        kv_copies = 1 if kv_dtype is not None and kv_b != b else 0
    local = replace(g, block_tokens=-(-g.block_tokens // sp))  # Ulysses: a rank's share of the block's tokens
    act, _ = activation_terms(cfg, local, b, heads_frac, kv_copies)
    if sp > 1:
        act += 4 * local.block_tokens * cfg.dim * b  # all-to-all receive buffers of q/k/v + the output's send buffer
    vae_w, vae_work = vae_decode_bytes(vae, scfg, width, height)

    def dit_device(role: str, count: int, steps: int, with_vae: bool) -> DevicePlan:
        kv_note = f"{steps} step cache(s) x {one_kv / GiB:.2f} GiB ({dtype_name(kv_dtype) or 'model dtype'}"
        kv_note += f", {heads} heads)" if sp > 1 else ")"
        terms = [dev_weights]
        if kv_host:
            terms.append(Term("KV caches", 0, f"on host: {kv_note}"))
            terms.append(Term("sink cache", 0, "on host"))
        else:
            terms.append(Term("KV caches", steps * one_kv, kv_note))
            terms.append(Term("sink cache", sink, f"{g.sink_tokens} sink tokens"))
        terms.append(Term("text K/V", text_kv, f"{L} layers x 2 x {cfg.text_len} x {cfg.dim}"))
        act_note = f"one block: {local.block_tokens} tokens" + (f" (1/{sp})" if sp > 1 else "") + f", {g.keys} keys"
        terms.append(Term("activations", act, act_note, exact=False))
        if with_vae:
            terms.append(Term("VAE decode", vae_w + vae_work, "weights + one block's working set", exact=False))
        if encoders_resident:
            terms.append(Term("encoders (resident)", encoders.text_total + encoders.audio_total))
        terms.append(Term("runtime reserve", runtime_reserve, "CUDA context, workspaces, allocator", exact=False))
        return DevicePlan(role, count, terms)

    most, fewest = max(per_group), min(per_group)
    devices = []
    for steps_n in sorted(set(per_group), reverse=True):
        ranks = per_group.count(steps_n) * sp
        # without a decode rank the lightest step groups decode (all of them when the steps divide evenly)
        vae_here = not layout.decode_rank and steps_n == fewest
        if sp > 1:
            role = (f"sp rank ({steps_n} step(s), 1/{sp} of tokens and heads, weights "
                    f"{'sharded' if layout.sharded else 'replicated'})")
            if layout.groups == 1:
                role = f"sp rank (1/{sp} of tokens and heads, weights {'sharded' if layout.sharded else 'replicated'})"
            if vae_here:  # one rank of the group decodes
                devices.append(dit_device(role + ", decodes", 1, steps_n, True))
                ranks -= 1
            if ranks:
                devices.append(dit_device(role, ranks, steps_n, False))
        elif layout.groups == 1:
            devices.append(dit_device("GPU", 1, steps_n, not layout.decode_rank))
        elif steps_n == most:
            devices.append(dit_device(f"DiT rank ({steps_n} step(s) each)", ranks, steps_n, vae_here))
        else:
            devices.append(dit_device(f"DiT rank ({steps_n} step(s), decodes)", ranks, steps_n, vae_here))
    if layout.decode_rank:
        devices.append(DevicePlan("decode rank", 1, [
            Term("VAE decode", vae_w + vae_work, "weights + one block's working set", exact=False),
            Term("runtime reserve", runtime_reserve, "CUDA context, workspaces, allocator", exact=False)]))
    host_kv = sum(sp * (n * one_kv + sink) for n in per_group) if kv_host else 0
    host_w = host_weights * layout.dit_ranks

    host = []
    if host_w:
        host.append(Term("pinned weights", host_w, "swapped blocks" if swap else "offloaded model"))
    if host_kv:
        host.append(Term("KV + sink caches", host_kv, "pinned, prefetched per layer" if placement.prefetch else "pinned"))
    host.append(Term("encoders (CPU copy)", encoders.text_total + encoders.audio_total,
                     "umT5 + wav2vec2, offloaded after encoding", exact=False))
    host_load = []
    if (swap or placement.offload_model_between_uses) and not layout.sharded:
        # load_dit reads the whole DiT into host memory, then the placement moves the resident part
        # (bench/simulate_fullsize.py measured this peak: 42.35 GiB for bf16 with block swap + encoders)
        host_load = [Term("DiT loaded on the host", w.total(L) * layout.dit_ranks, "before placement"),
                     Term("encoders (CPU copy)", encoders.text_total + encoders.audio_total, exact=False)]
    encode_phase = [] if encoders_resident else [
        Term("text encoder", encoders.text_total),
        Term("audio encoder", encoders.audio_total)]

    traffic = 0
    if swap:
        traffic += n_swapped * w.block
    if kv_host:
        traffic += cache_bytes(cfg, g.keys, heads, kv_b, scaled)  # every layer's window + sink, once per call

    settings = {
        "model": model_name or f"DiT dim {cfg.dim} x {cfg.num_layers} layers",
        "precision": precision, "width": width, "height": height,
        "latent_h": g.latent_h, "latent_w": g.latent_w, "tokens_per_frame": g.tokens_per_frame,
        "block_tokens": g.block_tokens, "window_tokens": g.window_tokens, "sink_tokens": g.sink_tokens,
        "keys_per_layer": g.keys, "steps": scfg.steps, "mode": mode, "world_size": world_size,
        "layout": layout.name(), "layout_obj": layout,
        "placement": placement.describe(), "placement_dict": placement.to_dict(),
    }
    wire = layout_wire_bytes(cfg, scfg, width, height, precision, sp, layout.sharded,
                             handoff=layout.groups > 1 or layout.decode_rank)
    timing = Timing(sum(block_step_flops(cfg, scfg, width, height, sp).values()), traffic, speed, placement.prefetch,
                    most, scfg.frames_per_block, wire.all_gather, wire.all_to_all, wire.handoff)
    return MemoryPlan(settings, devices, host, encode_phase, traffic, timing, host_load=host_load)


# ---------------------------------------------------------------------------- verdicts
def parse_gpus(spec: str) -> list[float]:
    """'4x24' -> [24.0] * 4 (GiB each); '24' -> [24.0]; '80,80' -> [80.0, 80.0]."""
    out = []
    for part in str(spec).replace(" ", "").split(","):
        m = re.fullmatch(r"(?:(\d+)x)?(\d+(?:\.\d+)?)(?:g|gb|gib)?", part.lower())
        if not m:
            raise ValueError(f"cannot read GPUs {spec!r}: use COUNTxGIB, e.g. 1x24, 4x24, 5x80")
        out += [float(m.group(2))] * int(m.group(1) or 1)
    return out


def parse_size(spec: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[*x]\s*(\d+)\s*", str(spec))
    if not m:
        raise ValueError(f"cannot read size {spec!r}: use W*H, e.g. 704*384")
    return int(m.group(1)), int(m.group(2))


@dataclass
class Verdict:
    fits: bool
    message: str
    headroom: float  # GiB left on the tightest device (negative: missing)
    host_headroom: float | None = None  # GiB of host RAM left (None: host RAM not checked)


def available_host_ram_gib() -> float | None:
    """RAM the system reports available now (psutil), GiB; None where psutil is missing."""
    try:
        import psutil
    except ImportError:
        return None
    return psutil.virtual_memory().available / GiB


def _largest(terms: list[Term], n: int = 3) -> str:
    return ", ".join(f"{t.name} {t.bytes / GiB:.1f}" for t in sorted(terms, key=lambda t: -t.bytes)[:n] if t.bytes)


def verdict(plan: MemoryPlan, gpus: list[float] | str, host_ram_gib: float | None = None, margin: float = 0.05) -> Verdict:
    """Does ``plan`` fit on ``gpus`` (GiB each) and in ``host_ram_gib`` of host RAM (None: not
    checked), keeping ``margin`` of each free for the estimates' error and fragmentation (and, on
    the host, for the system)? The message names what to change when it does not."""
    gpus = parse_gpus(gpus) if isinstance(gpus, str) else list(gpus)
    needed = sum(d.count for d in plan.devices)
    if len(gpus) < needed:
        return Verdict(False, f"the plan needs {needed} devices, {len(gpus)} given", -math.inf)
    cap = min(gpus) * GiB * (1 - margin)
    worst = max(plan.devices, key=lambda d: d.total)
    headroom = (cap - worst.total) / GiB
    host_headroom = None if host_ram_gib is None else (host_ram_gib * GiB * (1 - margin) - plan.host_total) / GiB
    host_ok = host_headroom is None or host_headroom >= 0
    s, pd = plan.settings, plan.settings["placement_dict"]
    host_note = "" if host_ram_gib is None else f"; host RAM {plan.host_total / GiB:.1f} of {host_ram_gib:.1f} GiB"
    if headroom >= 0 and host_ok:
        return Verdict(True, f"fits: peak {worst.total / GiB:.1f} GiB of {min(gpus):.0f} GiB on {worst.role} "
                       f"({headroom:.1f} GiB spare beyond a {margin:.0%} margin){host_note}", headroom, host_headroom)
    problems, hints = [], []
    if headroom < 0:
        problems.append(f"{worst.role} needs {worst.total / GiB:.1f} GiB, has {min(gpus):.0f} GiB (minus a {margin:.0%} "
                        f"margin) (largest: {_largest(worst.terms)} GiB)")
        if s["precision"] not in ("fp8",):
            hints.append("fp8 weights (--precision fp8)")
        if pd["blocks_on_device"] is None and s["mode"] != "sp":
            hints.append("block swap (blocks_on_device N)")
        if pd["kv_cache_device"] != "cpu":
            hints.append("KV caches in host RAM (kv_cache_device cpu)")
    if not host_ok:
        problems.append(f"host RAM: needs {plan.host_total / GiB:.1f} GiB, {host_ram_gib:.1f} GiB available (minus a "
                        f"{margin:.0%} margin) (largest: {_largest(plan.host)} GiB)")
        if pd["kv_cache_device"] == "cpu":
            hints.append("KV caches on the GPU (more GPU memory, or block swap to make room)")
        if s["steps"] > 1:
            hints.append(f"fewer steps (--steps {s['steps'] - 1}: one KV cache less)")
        hints.append("a smaller size (KV caches grow with the pixels)")
        hints.append("more host RAM (--host-ram GIB if more is free than the system reports)")
    if pd["kv_cache_dtype"] is None:
        hints.append("fp8 KV caches (kv_cache_dtype float8_e4m3fn; changes results slightly)")
    if s["precision"] not in GGUF_BYTES:
        hints.append("a GGUF file (plan --precision Q4_K: quantized weights stay quantized on the GPU)")
    hints.append("more GPUs (--mode sp splits tokens, heads and weights; --mode tpp splits steps; plan --gpus NxGIB "
                 "ranks every layout)")
    return Verdict(False, "does not fit: " + "; ".join(problems) + ". Try: " + "; ".join(dict.fromkeys(hints)),
                   headroom, host_headroom)


def _candidates(num_layers: int, prefetch: bool, device: str):
    """Every placement the engine offers: KV caches on the device or the host, in the model dtype or
    fp8 (lossy), all blocks resident or block swap with N resident."""
    exact, lossy = [], []
    for fp8 in (False, True):
        for kv_dev in ("device", "cpu"):
            for n in [None] + list(range(num_layers - 1, 0, -1)):
                pc = PlacementConfig(device=device, blocks_on_device=n, kv_cache_device=kv_dev,
                                     kv_cache_dtype=torch.float8_e4m3fn if fp8 else None, prefetch=prefetch)
                (lossy if fp8 else exact).append(pc)
    return exact, lossy


def _rank_runs(pc: PlacementConfig) -> bool:
    """Whether a distributed DiT rank can run ``pc``: the ranks keep every block resident and their
    KV caches on the GPU in the model dtype (block swap, host or fp8 KV caches and offloading are
    placements of the single process - the nodes' Placement - only), so a layout is ranked by
    what ``generate --workers`` really runs."""
    return (pc.blocks_on_device is None and pc.kv_cache_device == "device" and pc.kv_cache_dtype is None
            and not pc.offload_model_between_uses)


@dataclass
class _Tried:
    pc: PlacementConfig
    plan: MemoryPlan
    lossy: bool
    gpu_ok: bool
    host_ok: bool

    @property
    def key(self) -> tuple:
        # fastest first; on a tie (copies hidden behind compute) exact, then less traffic, then a lower peak
        return (round(self.plan.timing.call_s, 6), self.lossy, self.plan.traffic_per_forward, self.plan.peak_device)


def choose_placement(
    dit_cfg: DiTConfig,
    precision: str,
    width: int,
    height: int,
    sampler_cfg: SamplerConfig,
    gpus: list[float] | str,
    mode: str = "single",
    device: str = "cuda",
    allow_fp8_kv: bool = True,
    host_ram_gib: float | None = None,
    speed: SpeedModel = SpeedModel(),
    layout: Layout | None = None,
    **plan_kwargs,
) -> tuple[PlacementConfig | None, MemoryPlan]:
    """The fastest placement that fits the GPUs and ``host_ram_gib`` (None: host RAM not limited),
    by predicted time per DiT call (``Timing``), within the user's weight precision. fp8 KV caches
    (lossy) only if ``allow_fp8_kv``. On a tie (copies hidden behind compute) an exact placement,
    then less traffic, then a lower peak. ``plan.choice`` says what limited the choice.
    Returns (None, the plan closest to fitting) if none fits. ``layout``: plan that layout (on
    its own number of GPUs) instead of ``mode`` on all of ``gpus``."""
    gpus = parse_gpus(gpus) if isinstance(gpus, str) else list(gpus)
    world = len(gpus) if mode != "single" else 1
    if layout is None:
        layout = Layout.of_mode(mode, world, sampler_cfg.steps)
    exact, lossy = _candidates(dit_cfg.num_layers, True, device)
    tried = []
    for group, is_lossy in ((exact, False), (lossy, True)):
        for pc in group:
            if layout.sharded and pc.blocks_on_device is not None:
                continue  # sharded sp already streams its blocks (all-gathers)
            if layout.gpus > 1 and not _rank_runs(pc):
                continue  # a distributed rank runs only what distributed/runtime.py builds
            plan = plan_memory(dit_cfg, precision, width, height, sampler_cfg, pc, speed=speed, layout=layout,
                               **plan_kwargs)
            gpu_ok = verdict(plan, gpus).fits
            host_ok = host_ram_gib is None or verdict(plan, gpus, host_ram_gib).host_headroom >= 0
            tried.append(_Tried(pc, plan, is_lossy, gpu_ok, host_ok))
    allowed = [t for t in tried if t.gpu_ok and t.host_ok and (allow_fp8_kv or not t.lossy)]
    cap = min(gpus) * GiB * 0.95
    host_cap = None if host_ram_gib is None else host_ram_gib * GiB * 0.95
    if allowed:
        best = min(allowed, key=lambda t: t.key)
    else:
        def deficit(t: _Tried) -> float:  # GiB missing, GPU and host together
            short = max(0, t.plan.peak_device - cap)
            return short + (0 if host_cap is None else max(0, t.plan.host_total - host_cap))
        best = min((t for t in tried if allow_fp8_kv or not t.lossy), key=lambda t: (deficit(t), t.key))
    best.plan.choice = _explain(best if allowed else None, best, tried, allow_fp8_kv, cap, host_cap, host_ram_gib)
    return (best.pc if allowed else None), best.plan


def _explain(chosen: _Tried | None, best: _Tried, tried: list[_Tried], allow_fp8_kv: bool, cap: float,
             host_cap: float | None, host_ram_gib: float | None) -> list[str]:
    """Lines saying how the placement was chosen and what ruled out the better-ranked ones."""
    host = "not limited" if host_ram_gib is None else f"{host_ram_gib:.1f} GiB"
    lines = [f"by predicted time per DiT call among {len(tried)} placements (GPU {cap / GiB:.1f} GiB usable; "
             f"host RAM {host}; fp8 KV caches {'allowed' if allow_fp8_kv else 'forbidden (exact)'})"]
    if chosen is None:
        usable = [t for t in tried if allow_fp8_kv or not t.lossy]
        gpu_only = [t for t in usable if t.gpu_ok and not t.host_ok]
        host_only = [t for t in usable if t.host_ok and not t.gpu_ok]
        lines.append(f"nothing fits; closest: {best.pc.describe()}")
        if gpu_only:
            t = min(gpu_only, key=lambda t: t.plan.host_total)
            lines.append(f"limited by host RAM: {len(gpu_only)} placement(s) fit the GPU but not host RAM; the leanest "
                         f"({t.pc.describe()}) needs {t.plan.host_total / GiB:.1f} GiB, {host_cap / GiB:.1f} usable")
        if host_only:
            t = min(host_only, key=lambda t: t.plan.peak_device)
            lines.append(f"limited by GPU memory: {len(host_only)} placement(s) fit host RAM but not the GPU; the "
                         f"leanest ({t.pc.describe()}) needs {t.plan.peak_device / GiB:.1f} GiB per device")
        lossy_fit = [t for t in tried if t.lossy and t.gpu_ok and t.host_ok]
        if lossy_fit and not allow_fp8_kv:
            t = min(lossy_fit, key=lambda t: t.key)
            lines.append(f"limited by exact (fp8 KV caches forbidden): {t.pc.describe()} would fit")
        return lines
    better = sorted((t for t in tried if t.key < chosen.key), key=lambda t: t.key)
    limits = {}
    for t in better:
        if not t.gpu_ok:
            limits.setdefault("GPU memory", (t, f"needs {t.plan.peak_device / GiB:.1f} GiB per device"))
        if not t.host_ok:
            limits.setdefault("host RAM", (t, f"needs {t.plan.host_total / GiB:.1f} GiB of host RAM"))
        if t.lossy and not allow_fp8_kv:
            limits.setdefault("exact (fp8 KV caches forbidden)", (t, "uses fp8 KV caches"))
    if not limits:
        lines.append(f"limited by: nothing (no faster or equally fast exact placement; {chosen.plan.timing.bound})")
    t0 = chosen.plan.timing.call_s
    for what, (t, why) in limits.items():
        exact = "exact, " if not t.lossy and chosen.lossy else ""
        lines.append(f"limited by {what}: {t.pc.describe()} ({exact}{t.plan.timing.call_s:.3f} s per call; "
                     f"chosen: {t0:.3f} s) {why}")
    return lines


# ---------------------------------------------------------------------------- the fastest layout
def enumerate_layouts(num_gpus: int, steps: int, num_heads: int) -> list[Layout]:
    """Every layout the runtime offers on at most ``num_gpus`` GPUs: one process; tpp with 1..steps
    step groups; Ulysses sp groups of any size that divides the heads, alone or as tpp step groups,
    weights sharded or replicated; each tpp layout with or without a decode rank."""
    out = []
    for sp in range(1, num_gpus + 1):
        if num_heads % sp:
            continue
        for groups in range(1, steps + 1):
            for decode in (False, True):
                if decode and groups == 1 and sp > 1:
                    continue  # plain sp has no decode rank
                if groups * sp + decode > num_gpus:
                    continue
                for sharded in ((False, True) if sp > 1 else (False,)):
                    out.append(Layout(groups, sp, sharded, decode))
    return out


@dataclass
class LayoutOption:
    """One layout with its fastest placement that fits (``placement`` None: none fits; ``plan``: the closest)."""

    layout: Layout
    placement: PlacementConfig | None
    plan: MemoryPlan

    @property
    def fits(self) -> bool:
        return self.placement is not None

    @property
    def lossy(self) -> bool:
        return self.placement is not None and self.placement.kv_fp8

    @property
    def key(self) -> tuple:
        # fastest first; on a tie exact, then fewer GPUs, then a lower peak
        return (round(self.plan.timing.block_s, 6), self.lossy, self.layout.gpus, self.plan.peak_device)

    def memory(self) -> str:
        """Per-device totals, GiB: '21.3 x3, 21.6 (decodes)'."""
        parts = []
        for d in self.plan.devices:
            tag = " (decode rank)" if d.role == "decode rank" else " (decodes)" if "decodes" in d.role else ""
            parts.append(f"{d.total / GiB:.1f}" + (f" x{d.count}" if d.count > 1 else "") + tag)
        return ", ".join(parts)


@dataclass
class LayoutChoice:
    """Every layout on the GPUs, fastest fitting first (``ranked``), and those nothing fits (``unfit``)."""

    gpus: list[float]
    speed: SpeedModel
    ranked: list[LayoutOption]
    unfit: list[LayoutOption]
    host_ram_gib: float | None
    allow_fp8_kv: bool

    @property
    def best(self) -> LayoutOption | None:
        return self.ranked[0] if self.ranked else None

    def lines(self, top: int = 8) -> list[str]:
        """The ranking as printed by ``plan --gpus``: the assumptions, the recommended layout first,
        then the runners-up (``top`` in all), then how many more fit and what ruled the others out."""
        g, sp = self.gpus, self.speed
        same = len(set(g)) == 1
        cards = f"{len(g)}x{g[0]:g}" if same else ",".join(f"{x:g}" for x in g)
        host = "not limited" if self.host_ram_gib is None else f"{self.host_ram_gib:.1f} GiB"
        out = [f"-- layouts on {cards} GiB, fastest first (GPU {min(g) * 0.95:.1f} GiB usable each; host RAM {host}; "
               f"fp8 KV caches {'allowed' if self.allow_fp8_kv else 'forbidden (exact)'})",
               f"   assumptions: {sp.tflops:g} TFLOP/s sustained per GPU, {sp.bandwidth_gbps:g} GB/s host->device, "
               f"{sp.describe_link()}",
               "   override: --tflops TFLOPS --bandwidth GBPS --link pcie|pcie-p2p|nvlink --link-gbps GBPS"]
        if min(g) < 80 and sp.tflops >= 200:
            out.append(f"   note: {sp.tflops:g} TFLOP/s is an H100-class rate; a 24 GB RTX 4090 sustains ~66 "
                       "(40% of its 165 dense bf16): --tflops 66")
        if not self.ranked:
            out.append("   no layout fits; closest:")
            for o in sorted(self.unfit, key=lambda o: o.plan.peak_device)[:3]:
                out.append(f"      {o.layout.name()} ({o.layout.flags()}): peak {o.plan.peak_device / GiB:.1f} GiB per GPU")
            return out
        width = max(len(o.layout.name()) for o in self.ranked[:top])
        fwidth = max(len(o.layout.flags()) for o in self.ranked[:top])
        for i, o in enumerate(self.ranked[:top]):
            if i < 2:
                out.append("recommended (the fastest that fits):" if i == 0 else "runners-up:")
            t = o.plan.timing
            out.append(f"  {i + 1:>2}. {o.layout.name():<{width}}  {o.layout.flags():<{fwidth}}  {t.fps:5.1f} fps  "
                       f"{t.block_s:6.3f} s/block  GiB per device: {o.memory()}; {_placement_text(o.placement)}; "
                       f"{t.bound}")
        if len(self.ranked) > top:
            out.append(f"   ({len(self.ranked) - top} more layouts fit, all slower or equal)")
        if self.unfit:
            o = min(self.unfit, key=lambda o: o.plan.timing.block_s)
            out.append(f"   {len(self.unfit)} layout(s) do not fit; the fastest of them, {o.layout.name()} "
                       f"({o.plan.timing.fps:.1f} fps), needs {o.plan.peak_device / GiB:.1f} GiB per GPU"
                       + ("" if self.host_ram_gib is None else f" and {o.plan.host_total / GiB:.1f} GiB of host RAM"))
        return out


def _placement_text(pc: PlacementConfig | None) -> str:
    if pc is None:
        return "none fits"
    blocks = "all blocks" if pc.blocks_on_device is None else f"block swap ({pc.blocks_on_device} resident)"
    kv = ("fp8 " if pc.kv_fp8 else "") + "KV on " + ("host" if pc.kv_cache_device == "cpu" else "GPU")
    return f"{blocks}, {kv}"


def choose_layout(
    dit_cfg: DiTConfig,
    precision: str,
    width: int,
    height: int,
    sampler_cfg: SamplerConfig,
    gpus: list[float] | str,
    allow_fp8_kv: bool = True,
    host_ram_gib: float | None = None,
    speed: SpeedModel = SpeedModel(),
    layouts: list[Layout] | None = None,
    **plan_kwargs,
) -> LayoutChoice:
    """The fastest layout that fits ``gpus``, by predicted time per block (``Timing.block_s``), each
    layout with its fastest fitting placement (``choose_placement``). ``speed``'s link, unless given,
    follows the smallest card (``link_for``). ``layouts``: those to consider (default: all,
    ``enumerate_layouts``)."""
    gpus = parse_gpus(gpus) if isinstance(gpus, str) else list(gpus)
    speed = speed.with_gpus(gpus)
    if layouts is None:
        layouts = enumerate_layouts(len(gpus), sampler_cfg.steps, dit_cfg.num_heads)
    ranked, unfit = [], []
    for layout in layouts:
        pc, plan = choose_placement(dit_cfg, precision, width, height, sampler_cfg, gpus[:layout.gpus], layout.mode,
                                    allow_fp8_kv=allow_fp8_kv, host_ram_gib=host_ram_gib, speed=speed, layout=layout,
                                    **plan_kwargs)
        (ranked if pc is not None else unfit).append(LayoutOption(layout, pc, plan))
    ranked.sort(key=lambda o: o.key)
    return LayoutChoice(gpus, speed, ranked, unfit, host_ram_gib, allow_fp8_kv)


# ---------------------------------------------------------------------------- generate's pre-load check
def dit_config_of(path) -> DiTConfig:
    """A DiT checkpoint's configuration from its header alone (config.json beside it, else its shapes)."""
    from .dit import infer_dit_config
    from .formats import ModelFileError, open_checkpoint

    with open_checkpoint(path) as ckpt:
        if ckpt.config is not None:
            try:
                return DiTConfig.from_dict(ckpt.config)
            except TypeError as exc:
                raise ModelFileError(f"{ckpt.path}/config.json: expected a DiT configuration; found {exc}") from None
        shapes = {n: ckpt.shape(k) for n, k in ckpt.model_keys().items()}
        try:
            return infer_dit_config(shapes)
        except ValueError as exc:
            raise ModelFileError(f"{ckpt.path}: cannot infer the DiT configuration: {exc}") from None


def gguf_type_of(path) -> str | None:
    """The main quantized type of a GGUF DiT file (what the planner counts), None for other files."""
    from .gguf_file import is_gguf, open_gguf

    if not is_gguf(path):
        return None
    with open_gguf(path) as ckpt:
        main = ckpt.main_type()
    return main if main in GGUF_BYTES else None


def preload_host_check(dit_path, precision: str, width: int, height: int, sampler_cfg: SamplerConfig,
                       device, host_ram_gib: float | None = None, margin: float = 0.05) -> Verdict:
    """Before ``generate`` loads anything: does its single-process run fit the host RAM?

    ``generate`` keeps the DiT, its caches and the VAE on ``device`` (no placement) and frees each
    encoder after use, so the host holds the planner's host terms without the encoders' copy, plus,
    on a CPU, every device term (the CPU is the device; no CUDA reserve). host_ram_gib None: what
    the system reports available now."""
    device = torch.device(device)
    if host_ram_gib is None:
        host_ram_gib = available_host_ram_gib()
    cfg = dit_config_of(dit_path)
    precision = gguf_type_of(dit_path) or precision  # a GGUF file's weights stay in its type
    plan = plan_memory(cfg, precision, width, height, sampler_cfg, PlacementConfig(device=str(device)))
    terms = [t for t in plan.host if not t.name.startswith("encoders")]
    if device.type == "cpu":
        terms += [t for d in plan.devices for t in d.terms if t.name not in ("runtime reserve", "encoders (resident)")]
    need = sum(t.bytes for t in terms)
    if host_ram_gib is None:
        return Verdict(True, f"host RAM: needs ~{need / GiB:.2f} GiB (available RAM unknown: psutil missing)", 0.0)
    spare = (host_ram_gib * GiB * (1 - margin) - need) / GiB
    what = f"{width}x{height}, {precision} DiT of dim {cfg.dim} x {cfg.num_layers} layers on {device}"
    if spare >= 0:
        return Verdict(True, f"host RAM: {what} needs ~{need / GiB:.2f} GiB of {host_ram_gib:.1f} GiB", 0.0, spare)
    return Verdict(False, f"host RAM: {what} needs ~{need / GiB:.2f} GiB (largest: {_largest(terms)} GiB), "
                   f"{host_ram_gib:.1f} GiB available (minus a {margin:.0%} margin); use a GPU, a smaller --precision, "
                   f"--size or --steps, or give --host-ram GIB if more is free", 0.0, spare)


__all__ = [
    "GiB", "VAESize", "EncoderSizes", "Term", "DevicePlan", "MemoryPlan", "Verdict", "Geometry",
    "weight_bytes", "geometry", "cache_bytes", "activation_terms", "vae_decode_bytes",
    "plan_memory", "verdict", "choose_placement", "parse_gpus", "parse_size",
    "SpeedModel", "Timing", "block_step_flops", "call_flops", "available_host_ram_gib", "STORAGE_BYTES",
    "dit_config_of", "preload_host_check", "GGUF_BYTES", "gguf_type_of",
    "Link", "LINKS", "link_for", "WireBytes", "layout_wire_bytes", "Layout", "LayoutOption", "LayoutChoice",
    "enumerate_layouts", "choose_layout",
]
