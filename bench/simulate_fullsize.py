"""Full-size LiveAvatar (Wan2.2-S2V-14B) memory, FLOPs and copies on a CPU: the real code on fake tensors.

Why: the README's 14B table is the VRAM planner's prediction; without a GPU nothing checked it at
full size. This runs the engine's own code for one clip of each configuration of that table -
``load_dit`` from a checkpoint file, ``apply_placement`` (block swap, fp8, resident blocks, KV
caches on the device or the host), the streaming sampler's DiT calls, the streaming VAE decode
of every block, and the text/audio encoders' load and encode - on tensors that allocate nothing,
and counts the bytes that would be live on the device and on the host at every operation.

How (and why this way):

* ``FakeTensorMode``: every tensor carries shape, dtype, device and strides but no data, so
  a 14B model costs no memory and each operation runs only its shape function. Meta tensors
  alone would not do: the code moves tensors between "cpu" and the device, and meta has one
  device. ``torch.distributed._tools``' ``MemTracker`` was tried and left: it is built for
  training (it registers gradient hooks on every parameter, which fails on our frozen weights).
* The device: a CPU-only torch cannot make fake ``cuda`` tensors move (the Python bindings of
  ``to``/``copy_``/indexing open a CUDA device guard, absent from the build). So the device is
  PyTorch's Python-registered PrivateUse1 backend, renamed ``simdev``
  (``torch.utils.backend_registration``): a real second device type with a no-op guard, on
  which fake tensors move, index and copy like CUDA ones. What differs from a CUDA run:
  code that asks ``device.type == "cuda"`` takes its non-CUDA branch - copies are issued
  synchronously instead of on a side stream (the same tensors are allocated at the same
  points; only their overlap in time is not modelled) and host memory is not pinned (same
  bytes). fp8 Linears take the ``_scaled_mm`` path, as on an fp8 GPU (``fp8_matmul_supported``
  answers yes for ``simdev``).
* The bookkeeping (``LiveBytes``): a dispatch mode under which every operation's outputs have
  their storages registered once (views share them) with a weak reference whose callback
  subtracts the bytes when the storage dies - so "live" is exactly what Python still holds,
  as the CUDA caching allocator's ``memory_allocated`` counts it (block rounding aside).
  Host-to-device copies are summed as traffic per DiT call.
* Checkpoints: sparse files with a real safetensors header (the 14B DiT, umT5-XXL, wav2vec2-large,
  the Wan 2.1 VAE) and holes for data; the loaders parse, check and plan from the header as
  always, and ``Checkpoint.read`` skips only the byte read into a fake tensor.

Order of one row, as the engine runs it: the encoders load on the host, encode on the device and
go back to the host (kept there: the planner's "encoders (CPU copy)"); the DiT loads straight onto
the device when every block stays there (as ``generate`` does), else on the host and then is placed
(as the model-loader node does with a placement); the VAE loads; the sampler's caches are made,
the decoder warms up, and one clip runs (4 blocks x steps DiT calls, each block decoded). A tpp row
simulates its busiest DiT rank (its steps' caches; the VAE only where the plan puts it there).
Rows that differ only in what the planner was asked (host limit, TFLOP/s) simulate the same run once.

Checked by ``--smoke`` (and tests/test_simulate_fullsize.py): the same run on real CPU tensors
(CPU as the device) tracked the same way peaks at exactly the fake run's device + host bytes.

Not simulated: CUDA context, cuBLAS workspaces and allocator fragmentation (the planner's fixed
"runtime reserve", added to the simulated peak before the ratio and printed), the LoRA merge
(load-time only), sequence-parallel rows (their sharding needs torch.distributed ranks) and
pinned-memory staging copies. Tensors the code keeps between calls (RoPE tables, the decoder's
causal cache) are counted, as on the GPU.

Output: per configuration one line with the simulated device peak (from the DiT load on; the
encode phase is printed once, apart, as the planner keeps it apart), the simulated host peak while
sampling (and while loading the DiT), the planner's predictions, and
``ratio X.XX`` = planner / (simulated device peak + runtime reserve); then the FLOPs of one
steady-state DiT call as ``FlopCounterMode`` counts them against ``block_step_flops``, and the
host->device bytes of that call against the planner's traffic term.

Usage: python bench/simulate_fullsize.py            (14B, the README table's rows: 704*384 and 688*368;
                                                    11 min, 0.5 GiB RSS on a loaded 2-core machine)
       python bench/simulate_fullsize.py --smoke    (scaled down; under a minute)
       [--rows 0,3] [--phases] [--json out.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import struct
import tempfile
import time
import warnings
import weakref
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import _pack

_pack.load()
from liveavatar_pack.liveavatar.config import WAN_S2V_14B, DiTConfig, SamplerConfig  # noqa: E402
from liveavatar_pack.model_loaders.placement import PlacementConfig  # noqa: E402
from liveavatar_pack.model_loaders.planner import (  # noqa: E402
    GiB, EncoderSizes, SpeedModel, VAESize, block_step_flops, choose_placement, parse_gpus, parse_size, plan_memory,
)

SIM = "simdev"
RESERVE = int(0.75 * GiB)  # plan_memory's runtime_reserve default: not simulable, added before the ratio
SMOKE_CFG = DiTConfig(dim=1024, ffn_dim=2048, num_heads=8, num_layers=4, text_dim=64, audio_dim=64, num_audio_layers=3,
                      audio_inject_layers=(0, 2))
SMOKE_SAMPLER = SamplerConfig(steps=2, frames_per_clip=24, decoder_warmup_latents=2)


# ============================================================================ the simulated device
def register_device() -> None:
    """PrivateUse1 as ``simdev`` (idempotent; a process can rename the backend only once)."""
    if getattr(torch, SIM, None) is not None:
        return
    from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

    _setup_privateuseone_for_python_backend(SIM)


# ============================================================================ bookkeeping
@dataclass
class Phase:
    device: int = 0
    host: int = 0


def _device(t: torch.Tensor) -> torch.device:
    """A tensor's device without dispatching ``prim.device`` (a fake tensor keeps it as an attribute)."""
    return getattr(t, "fake_device", None) or t.device


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages alive per place ("device" = ``device_type``, "host" = cpu), with peaks
    overall and per phase, and the host->device bytes copied while ``counting``."""

    def __init__(self, device_type: str):
        super().__init__()
        self.device_type = device_type
        self.live = {"device": 0, "host": 0}
        self.peak = {"device": 0, "host": 0}
        self.phase = "start"
        self.phases: dict[str, Phase] = {}
        self.copied = 0
        self.peak_total = 0  # device + host at the same moment
        self._seen: dict[int, weakref.ref] = {}

    def place(self, device: torch.device) -> str | None:
        if device.type == self.device_type:
            return "device"
        return "host" if device.type == "cpu" else None

    def set_phase(self, name: str) -> None:
        self.phase = name
        p = self.phases.setdefault(name, Phase())
        p.device, p.host = max(p.device, self.live["device"]), max(p.host, self.live["host"])

    def track(self, t: torch.Tensor) -> None:
        where = self.place(_device(t))
        if where is None:
            return
        st = t.untyped_storage()
        key = id(st)
        ref = self._seen.get(key)
        if ref is not None and ref() is st:
            return
        nbytes = st.nbytes()
        self.live[where] += nbytes

        def freed(_ref, where=where, nbytes=nbytes, key=key):
            self.live[where] -= nbytes
            if self._seen.get(key) is _ref:
                del self._seen[key]

        self._seen[key] = weakref.ref(st, freed)
        if self.live[where] > self.peak[where]:
            self.peak[where] = self.live[where]
        self.peak_total = max(self.peak_total, self.live["device"] + self.live["host"])
        p = self.phases.setdefault(self.phase, Phase())
        p.device, p.host = max(p.device, self.live["device"]), max(p.host, self.live["host"])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.prim.device.default:  # every ``t.device`` read: allocates nothing
            dev = getattr(args[0], "fake_device", None)
            return dev if dev is not None else func(*args)
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst = args[0] if func is torch.ops.aten.copy_.default else out
            if _device(src).type == "cpu" and _device(dst).type == self.device_type:
                self.copied += dst.numel() * dst.element_size()
        return out

    def reset_peaks(self) -> None:
        self.peak = dict(self.live)
        self.peak_total = self.live["device"] + self.live["host"]


# ============================================================================ sparse checkpoints
_ST_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def sparse_safetensors(path: Path, tensors: dict[str, tuple[tuple[int, ...], torch.dtype]], metadata: dict | None = None) -> Path:
    """A safetensors file whose data is a hole: its header is real, its size is right, its disk use ~0."""
    header, offset = {}, 0
    for name, (shape, dtype) in tensors.items():
        n = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)
    return path


def _shapes(module: torch.nn.Module, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), dtype if v.is_floating_point() else v.dtype) for k, v in module.state_dict().items()}


def dit_file(folder: Path, cfg: DiTConfig) -> Path:
    """The DiT in bf16 (ComfyUI's wan2.2_s2v_14B_bf16.safetensors layout) with a config.json beside it."""
    from liveavatar_pack.model_loaders.dit import empty_model

    d = folder / f"dit-{cfg.dim}x{cfg.num_layers}"
    d.mkdir(exist_ok=True)
    sparse_safetensors(d / "model.safetensors", _shapes(empty_model(cfg), torch.bfloat16))
    (d / "config.json").write_text(json.dumps({k: v for k, v in vars(cfg).items()}))
    return d


def vae_file(folder: Path, base_dim: int) -> Path:
    """A Wan 2.1 VAE (Wan key names, bf16) of ``base_dim`` (96: the released one)."""
    from diffusers import AutoencoderKLWan
    from liveavatar_pack.model_loaders.vae import to_wan_state_dict

    with torch.device("meta"):
        model = AutoencoderKLWan(base_dim=base_dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                 temperal_downsample=[False, True, True])
    sd = to_wan_state_dict(model)
    return sparse_safetensors(folder / f"vae-{base_dim}.safetensors", {k: (tuple(v.shape), torch.bfloat16) for k, v in sd.items()})


def text_encoder_file(folder: Path, small: bool) -> Path:
    """umT5-XXL's encoder (HF key names, bf16); ``small``: the same layout, scaled down."""
    from transformers import UMT5Config, UMT5EncoderModel

    if small:
        config = UMT5Config(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                            feed_forward_proj="gated-gelu")
    else:
        config = UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                            feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    shapes = _shapes(model, torch.bfloat16)
    shapes.pop("encoder.embed_tokens.weight", None)  # tied to shared
    return sparse_safetensors(folder / f"umt5-{'small' if small else 'xxl'}.safetensors", shapes)


def audio_encoder_file(folder: Path, small: bool) -> Path:
    """wav2vec2-large (HF key names, fp16 - ComfyUI's wav2vec2_large_english_fp16); ``small``: scaled down."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    if small:
        config = Wav2Vec2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                                do_stable_layer_norm=True, feat_extract_norm="layer")
    else:
        config = Wav2Vec2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                                do_stable_layer_norm=True, feat_extract_norm="layer", conv_bias=True)
    with torch.device("meta"):
        model = Wav2Vec2Model(config)
    d = folder / f"wav2vec2-{'small' if small else 'large'}"
    d.mkdir(exist_ok=True)
    sparse_safetensors(d / "model.safetensors", _shapes(model, torch.float16))
    (d / "config.json").write_text(config.to_json_string())
    return d


# ============================================================================ fake-tensor session
def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The engine's ``attention`` on the simulated device as a GPU runs it: the flash kernel
    (``aten._scaled_dot_product_flash_attention``: output + logsumexp, no L x K score matrix) for
    half-precision heads of <= 256 channels. Without this the fake device would take the math
    path, whose score matrices (40 heads x 3k queries x 15k keys in float32 per layer) no GPU run
    allocates."""
    if _device(q).type == SIM and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] <= 256:
        return torch.ops.aten._scaled_dot_product_flash_attention.default(q, k, v)[0]
    return F.scaled_dot_product_attention(q, k, v)


@contextlib.contextmanager
def _real_session(tracker: LiveBytes):
    """Real tensors: only the tracker (and the sampler's data-dependent schedule runs as always)."""
    from liveavatar_pack.liveavatar import rope

    rope.device_rope_table.cache_clear()
    try:
        with torch.no_grad(), tracker:
            yield
    finally:
        rope.device_rope_table.cache_clear()


@contextlib.contextmanager
def fake_session(tracker: LiveBytes):
    """FakeTensorMode + the tracker, with the few seams a fake run needs (restored on exit):

    * ``Checkpoint.read``/``read_as`` into a fake tensor read no bytes (the file is a hole anyway);
    * ``load_dit`` builds its meta model (and fp8 Linears on meta) outside the fake mode, so
      accelerate's ``set_module_tensor_to_device`` sees real ``nn.Parameter`` classes;
    * ``WanVAE.__init__`` checks its latent mean/std and diffusers' scheduler computes the
      sigmas with data-dependent Python: both run outside the fake mode (a few real floats; the
      VAE model stays fake);
    * the DiT's ``attention`` runs the flash kernel on the simulated device (``flash_attention``);
    * ``fp8_matmul_supported`` says yes for ``simdev`` (an fp8 GPU's ``_scaled_mm`` path);
    * moving a fake parameter to another device: ``param.data = t`` (placement) and
      ``Module.to`` (encoders, resident blocks) are refused by torch for fake tensors (the
      PrivateUse1 key set is not "dense" for ``set_data``; fake parameters carry a weak
      reference that ``swap_tensors`` refuses), so both adopt ``t``'s storage by swapping the
      tensor implementation with an alias of ``t`` and setting the fake device - what
      ``set_data`` does on CUDA.
    """
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily

    from liveavatar_pack.liveavatar import rope
    from liveavatar_pack.liveavatar import sampler as sampler_mod
    from liveavatar_pack.liveavatar import attention as attention_mod
    from liveavatar_pack.liveavatar import transformer as transformer_mod
    from liveavatar_pack.liveavatar import vae as vae_mod
    from liveavatar_pack.model_loaders import dit, fp8, formats

    read_as = formats.Checkpoint.read_as
    read, empty_model, replace_linears, supported = (formats.Checkpoint.read, dit.empty_model, dit.replace_linears,
                                                      fp8.fp8_matmul_supported)

    def fake_read(self, key, out=None):
        if out is None:
            info = self.infos[key]
            out = torch.empty(info.shape, dtype=info.dtype)
        if isinstance(out, FakeTensor):
            return out
        return read(self, key, out)

    def fake_read_as(self, key, dtype=None):
        info = self.infos[key]
        if dtype is None or dtype == info.dtype:
            return self.read(key)
        if self._buffer is None:  # the chunk buffer the real conversion keeps per checkpoint
            self._buffer = torch.empty(formats.READ_CHUNK, dtype=torch.uint8)
        return torch.empty(info.shape, dtype=dtype)

    def real_meta(fn):
        def wrapped(*args, **kwargs):
            with unset_fake_temporarily():
                return fn(*args, **kwargs)
        return wrapped

    data, swap = torch.Tensor.data, torch.utils.swap_tensors
    base = torch._C.TensorBase.data

    def adopt(t, value):
        alias = value.detach()  # a leaf sharing the storage
        torch._C._swap_tensor_impl(t, alias)
        t.fake_device = value.fake_device

    def set_data(self, value):
        if isinstance(self, FakeTensor) and isinstance(value, FakeTensor) and self.device != value.device:
            adopt(self, value)
        else:
            base.__set__(self, value)

    def fake_swap(t1, t2):
        if isinstance(t1, FakeTensor) and isinstance(t2, FakeTensor) and (weakref.getweakrefcount(t1) or weakref.getweakrefcount(t2)):
            return adopt(t1, t2)
        return swap(t1, t2)

    torch.Tensor.data = property(lambda self: base.__get__(self), set_data)
    torch.utils.swap_tensors = fake_swap
    formats.Checkpoint.read, formats.Checkpoint.read_as = fake_read, fake_read_as
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    vae_init, schedule = vae_mod.WanVAE.__init__, sampler_mod.flow_schedule

    def init_vae(self, *args, **kwargs):
        real_meta(vae_init)(self, *args, **kwargs)
        self._mean, self._inv_std = mode.from_tensor(self._mean), mode.from_tensor(self._inv_std)

    def fake_schedule(cfg):
        return tuple(mode.from_tensor(t) for t in real_meta(schedule)(cfg))

    vae_mod.WanVAE.__init__, sampler_mod.flow_schedule = init_vae, fake_schedule
    # self-attention calls transformer.attention, cross-attention the processors' attention.attention
    attention, transformer_mod.attention = transformer_mod.attention, flash_attention
    cross_attention, attention_mod.attention = attention_mod.attention, flash_attention
    dit.empty_model, dit.replace_linears = real_meta(empty_model), real_meta(replace_linears)
    fp8.fp8_matmul_supported = lambda device: device.type == SIM or supported(device)
    rope.device_rope_table.cache_clear()
    try:
        with mode, tracker, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Module._apply reads .grad of the adopted (alias) parameters
            yield
    finally:
        torch.Tensor.data, torch.utils.swap_tensors = data, swap
        rope.device_rope_table.cache_clear()
        formats.Checkpoint.read, formats.Checkpoint.read_as = read, read_as
        vae_mod.WanVAE.__init__, sampler_mod.flow_schedule = vae_init, schedule
        transformer_mod.attention, attention_mod.attention = attention, cross_attention
        dit.empty_model, dit.replace_linears, fp8.fp8_matmul_supported = empty_model, replace_linears, supported


# ============================================================================ one configuration
@dataclass
class Files:
    dit: Path
    vae: Path
    text: Path
    audio: Path
    small: bool


@dataclass
class SimResult:
    device_peak: int
    host_peak_sampling: int
    host_peak_load: int
    phases: dict[str, Phase]
    call_flops: int | None = None
    call_copy_bytes: int | None = None
    seconds: float = 0.0
    encode_peak: int = 0  # device, while the encoders run (before the DiT is loaded)
    total_peak: int = 0  # device + host at one moment, from the DiT load on


class _CallMarker:
    """Wraps a StepWorker: names the phase of every DiT call; counts one steady-state call's FLOPs/copies."""

    def __init__(self, worker, tracker: LiveBytes, measure_at: tuple[int, int], out: dict, clip_of):
        self.worker, self.tracker, self.measure_at, self.out, self.clip_of = worker, tracker, measure_at, out, clip_of

    def __getattr__(self, name):
        return getattr(self.worker, name)

    def __call__(self, x, frame_start, audio, rd):
        from torch.utils.flop_counter import FlopCounterMode

        clip, block = self.clip_of(frame_start)
        self.tracker.set_phase(f"DiT call (clip {clip} block {block} step {self.worker.step})")
        if (clip, block) == self.measure_at and self.worker.step == 0:
            before = self.tracker.copied
            with FlopCounterMode(display=False) as counter:
                y = self.worker(x, frame_start, audio, rd)
            self.out["flops"] = int(counter.get_total_flops())
            self.out["copied"] = self.tracker.copied - before
        else:
            y = self.worker(x, frame_start, audio, rd)
        self.tracker.set_phase(f"VAE decode (clip {clip} block {block})")
        return y


def simulate(files: Files, cfg: DiTConfig, scfg: SamplerConfig, precision: str, width: int, height: int,
             pc: PlacementConfig, steps_here: list[int] | None = None, with_vae: bool = True,
             encoders: bool = True, vae_dtype: torch.dtype = torch.bfloat16, real: bool = False) -> SimResult:
    """One clip of one configuration on fake tensors; ``steps_here``: the denoising steps this device
    runs (a tpp rank; None: all, one process) and ``with_vae`` whether it decodes.

    ``real``: the same run on real CPU tensors with the CPU as the device (small models only), tracked
    the same way - what the fake run's device + host total must reproduce."""
    from liveavatar_pack.liveavatar.pipeline import BlockDecoder
    from liveavatar_pack.liveavatar.sampler import SinkInputs, StreamingSampler, TensorAudio
    from liveavatar_pack.liveavatar.vae import to_uint8
    from liveavatar_pack.model_loaders.dit import load_dit
    from liveavatar_pack.model_loaders.placement import apply_placement
    from liveavatar_pack.model_loaders.vae import load_wan_vae

    t0 = time.perf_counter()
    if not real:
        register_device()
    device = torch.device("cpu") if real else torch.device(SIM, 0)
    pc = replace(pc, device=device.type)
    tracker = LiveBytes(device.type)
    out: dict = {}
    h, w = height // 8, width // 8
    with (_real_session(tracker) if real else fake_session(tracker)):
        # 1. encoders (before the DiT, as generate runs them): load on the host, encode on the device,
        #    keep the host copies (the planner's "encoders (CPU copy)": a graph keeps its loaded encoders)
        kept = []  # the encoders' host copies live to the end, as the planner's "encoders (CPU copy)"
        if encoders:
            text, features, kept = encode(files, cfg, scfg, device, tracker)
        else:
            text = torch.zeros(64, cfg.text_dim, dtype=torch.bfloat16)
            features = torch.zeros(1, cfg.num_audio_layers, cfg.audio_dim, scfg.frames_per_clip)
        # 2. DiT: a placement loads on the host and places; all-resident loads straight onto the device
        encode_peak = tracker.peak["device"]
        tracker.reset_peaks()
        tracker.set_phase("load DiT")
        all_on_device = pc.blocks_on_device is None and not pc.offload_model_between_uses
        model, _ = load_dit(files.dit, precision=precision, device=device if all_on_device else "cpu", config=cfg)
        tracker.set_phase("place DiT")
        placed = apply_placement(model, pc)
        host_load = tracker.peak["host"]
        tracker.reset_peaks()
        tracker.set_phase("VAE load")
        vae = load_wan_vae(files.vae, device=device, dtype=vae_dtype) if with_vae else None
        tracker.set_phase("sampler setup")
        sink = SinkInputs(torch.zeros(16, 1, h, w), torch.zeros(16, cfg.motion_latent_frames, h, w))
        with placed.in_use():
            sampler = StreamingSampler(model, scfg, text, TensorAudio(features), sink, seed=0,
                                       cache_storage=placed.cache_storage())
            if steps_here is not None:
                sampler.workers = [sampler.workers[s] for s in steps_here]
            per_clip = scfg.latent_frames_per_clip
            nf = scfg.latent_frames_per_block

            def clip_of(frame_start):
                return frame_start // per_clip, (frame_start % per_clip) // nf

            last = (0, scfg.blocks_per_clip - 1)  # the window is full from the last block of clip 0 on
            sampler.workers = [_CallMarker(wk, tracker, last, out, clip_of) for wk in sampler.workers]
            decoder = None
            if vae is not None:
                tracker.set_phase("VAE warm-up")
                decoder = BlockDecoder.from_config(vae, scfg)
                decoder.warm_up(sink.motion_latents)
            for block in sampler.blocks(1):
                if decoder is not None:
                    frames = to_uint8(decoder.decode_block(block.latents))
                    del frames
            tracker.set_phase("end")
        res = SimResult(tracker.peak["device"], tracker.peak["host"], host_load, dict(tracker.phases),
                        out.get("flops"), out.get("copied"), encode_peak=encode_peak, total_peak=tracker.peak_total)
        del sampler, decoder, vae, placed, model, kept
    res.seconds = time.perf_counter() - t0
    return res


def encode(files: Files, cfg: DiTConfig, scfg: SamplerConfig, device, tracker: LiveBytes):
    """Text and audio encoders: loaded on the host, moved to the device to encode, offloaded back
    (returned, so the caller decides how long their host copies live)."""
    from liveavatar_pack.model_loaders.audio_encoder import load_audio_encoder
    from liveavatar_pack.model_loaders.text_encoder import load_text_encoder

    tracker.set_phase("text encoder load")
    t5 = load_text_encoder(files.text, dtype=torch.bfloat16, device="cpu")
    tracker.set_phase("text encode")
    t5.to(device)
    ids = torch.zeros(1, cfg.text_len, dtype=torch.int64)
    mask = torch.ones(1, cfg.text_len, dtype=torch.int64)
    out = t5(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
    text = out[0].to("cpu")  # encode_text trims to the real tokens: all 512 here (the longest prompt)
    del out
    t5.to("cpu")
    tracker.set_phase("audio encoder load")
    w2v = load_audio_encoder(files.audio, dtype=torch.float16, device="cpu")
    tracker.set_phase("audio encode")
    w2v.to(device)
    seconds = scfg.frames_per_clip / scfg.fps + 1
    wave = torch.zeros(1, int(16000 * seconds), dtype=torch.float16)
    states = torch.cat(w2v(wave.to(device), output_hidden_states=True).hidden_states)
    states = states.to("cpu")
    w2v.to("cpu")
    layers, n, dim = states.shape
    features = torch.zeros(1, layers, dim, scfg.frames_per_clip)  # per video frame, as AudioFeatures.frames
    del states
    return text, features, [t5, w2v]


# ============================================================================ the table
@dataclass
class Row:
    gpus: str
    mode: str
    size: str
    precision: str
    host_ram: float | None = None
    exact: bool = False
    steps: int = 4
    tflops: float | None = None
    placement: PlacementConfig | None = None  # given (smoke rows); None: the planner's choice


def table_rows() -> list[Row]:
    """The README planner table's rows (bench/planner_table.py)."""
    import planner_table

    return [Row(**vars(r)) if not hasattr(r, "__dataclass_fields__") else Row(**{f: getattr(r, f) for f in r.__dataclass_fields__})
            for r in planner_table.ROWS]


def smoke_rows() -> list[Row]:
    """Scaled-down placements covering every mechanism: resident, block swap, host KV (prefetched), fp8 KV, fp8 weights."""
    pcs = [PlacementConfig(), PlacementConfig(kv_cache_device="cpu"),
           PlacementConfig(blocks_on_device=3, kv_cache_device="cpu", kv_cache_dtype="fp8")]
    rows = [Row("1x1", "single", "704*384", "bf16", steps=2, placement=pc) for pc in pcs]
    rows.append(Row("1x1", "single", "704*384", "fp8", steps=2, placement=PlacementConfig(blocks_on_device=2)))
    rows.append(Row("2x1", "tpp", "704*384", "bf16", steps=2, placement=PlacementConfig()))
    return rows


def describe(pc: PlacementConfig) -> str:
    blocks = "all blocks" if pc.blocks_on_device is None else f"block swap ({pc.blocks_on_device} resident)"
    return f"{blocks}, " + ("fp8 " if pc.kv_fp8 else "") + "KV on " + ("host" if pc.kv_cache_device == "cpu" else "GPU")


def run_row(row: Row, files: Files, cfg: DiTConfig, smoke: bool, speed: SpeedModel) -> dict:
    """Plan and simulate one row; a dict of the figures printed and returned."""
    gpus = parse_gpus(row.gpus)
    width, height = parse_size(row.size)
    scfg = replace(SMOKE_SAMPLER, steps=row.steps) if smoke else SamplerConfig(steps=row.steps)
    mode = "single" if len(gpus) == 1 else row.mode
    world = 1 if mode == "single" else len(gpus)
    kw = dict(model_name="smoke" if smoke else "14B")
    if smoke:
        kw.update(vae=files_vae_size(files), encoders=files_encoder_sizes(files), runtime_reserve=0)
    if row.placement is not None:
        pc = row.placement
        plan = plan_memory(cfg, row.precision, width, height, scfg, pc, world, mode, speed=speed, **kw)
        chosen = pc
    else:
        row_speed = speed if row.tflops is None else SpeedModel(speed.bandwidth_gbps, row.tflops)
        chosen, plan = choose_placement(cfg, row.precision, width, height, scfg, gpus, mode, allow_fp8_kv=not row.exact,
                                        host_ram_gib=row.host_ram, speed=row_speed, **kw)
        pc = chosen if chosen is not None else PlacementConfig.from_dict(plan.settings["placement_dict"])
    result = {"row": f"{row.gpus} {mode} {row.size} {row.precision}" + (", exact" if row.exact else "")
              + (f", {row.steps} steps" if row.steps != 4 else "") + (f", host {row.host_ram:g}" if row.host_ram else "")
              + (f", {row.tflops:g} TFLOP/s" if row.tflops else ""),
              "placement": describe(pc) + ("" if chosen is not None or row.placement else " (closest; none fits)"),
              "planner_device": plan.peak_device, "planner_host": plan.host_total,
              "planner_traffic": plan.traffic_per_forward, "reserve": 0 if smoke else RESERVE,
              "planner_encode": sum(t.bytes for t in plan.encode_phase)}
    if mode == "sp":
        result["skipped"] = "sp: weights sharded across torch.distributed ranks; not simulated in one process"
        return result
    steps_here, with_vae = None, True
    if mode == "tpp":
        dit_ranks = min(world, scfg.steps)
        per = [scfg.steps // dit_ranks + (1 if r < scfg.steps % dit_ranks else 0) for r in range(dit_ranks)]
        steps_here = list(range(max(per)))  # the busiest DiT rank (its step numbers do not change memory)
        with_vae = world <= scfg.steps and per.count(max(per)) == dit_ranks  # as plan_memory: no decode rank
    key = (row.precision, width, height, json.dumps(pc.to_dict(), sort_keys=True), scfg, tuple(steps_here or ()), with_vae)
    sim = _SIM_CACHE.get(key)
    if sim is None:  # rows that differ only in what the planner was asked (limits, speed) simulate the same run
        sim = _SIM_CACHE[key] = simulate(files, cfg, scfg if steps_here is None else replace(scfg, steps=len(steps_here)),
                                         row.precision, width, height, pc, with_vae=with_vae,
                                         vae_dtype=torch.bfloat16)
    terms = block_step_flops(cfg, scfg, width, height)
    result.update(sim_encode=sim.encode_peak, sim_device=sim.device_peak, sim_host=sim.host_peak_sampling, sim_host_load=sim.host_peak_load,
                  ratio=plan.peak_device / (sim.device_peak + result["reserve"]),
                  host_ratio=plan.host_total / max(sim.host_peak_sampling, 1),
                  call_flops=sim.call_flops, planner_flops=sum(terms.values()), call_copy=sim.call_copy_bytes,
                  seconds=sim.seconds, phase_max=_top_phase(sim.phases),
                  phases={k: (v.device, v.host) for k, v in sim.phases.items()})
    return result


_SIM_CACHE: dict = {}


def _top_phase(phases: dict[str, Phase]) -> str:
    name, p = max(phases.items(), key=lambda kv: kv[1].device)
    return name


SMOKE_VAE_DIM = 4  # the VAE's share of the smoke's peak about as at full size (its working set grows with base_dim)


def files_vae_size(files: Files) -> VAESize:
    return VAESize(base_dim=SMOKE_VAE_DIM, params=_param_count_vae(SMOKE_VAE_DIM), dtype_bytes=2)


def _param_count_vae(base_dim: int) -> int:
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        m = AutoencoderKLWan(base_dim=base_dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                             temperal_downsample=[False, True, True])
    return sum(p.numel() for p in m.parameters())


def files_encoder_sizes(files: Files) -> EncoderSizes:
    """The scaled-down encoders' sizes, counted on meta models as the planner counts the real ones."""
    from transformers import UMT5Config, UMT5EncoderModel, Wav2Vec2Config, Wav2Vec2Model

    with torch.device("meta"):
        t5 = UMT5EncoderModel(UMT5Config(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                         feed_forward_proj="gated-gelu"))
        w2v = Wav2Vec2Model(Wav2Vec2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=128, conv_dim=(32,) * 7, num_conv_pos_embeddings=16,
                                           num_conv_pos_embedding_groups=4, do_stable_layer_norm=True,
                                           feat_extract_norm="layer"))
    return replace(EncoderSizes.of_models(t5, w2v), text_bytes=2, audio_bytes=2)


def make_files(folder: Path, cfg: DiTConfig, smoke: bool) -> Files:
    return Files(dit_file(folder, cfg), vae_file(folder, SMOKE_VAE_DIM if smoke else 96), text_encoder_file(folder, smoke),
                 audio_encoder_file(folder, smoke), smoke)


def real_check(files: Files, cfg: DiTConfig) -> dict:
    """Row 0 of the smoke (all on the device, bf16) once on fake tensors and once on real CPU tensors
    (CPU = device): the fake run's device + host peak must equal the real run's (same bookkeeping)."""
    row = smoke_rows()[0]
    width, height = 128, 64  # real compute on the CPU: a small frame
    scfg = replace(SMOKE_SAMPLER, steps=row.steps)
    kw = dict(encoders=False, vae_dtype=torch.float32)
    fake = simulate(files, cfg, scfg, row.precision, width, height, row.placement, **kw)
    real = simulate(files, cfg, scfg, row.precision, width, height, row.placement, real=True, **kw)
    return {"fake_total": fake.total_peak, "real_total": real.total_peak, "fake_device": fake.device_peak}


def format_line(r: dict, unit: tuple[int, str] = (GiB, "GiB")) -> str:
    u, name = unit
    head = f"{r['row']:<44} | {r['placement']:<42}"
    if "skipped" in r:
        return f"{head} | planner {r['planner_device'] / u:6.2f} {name} | not simulated ({r['skipped']})"
    reserve = f" + {r['reserve'] / u:.2f} reserve" if r["reserve"] else ""
    return (f"{head} | sim device {r['sim_device'] / u:6.2f} {name}{reserve} | sim host {r['sim_host'] / u:6.2f} {name} "
            f"(load {r['sim_host_load'] / u:5.2f}) | planner {r['planner_device'] / u:6.2f} {name}, host "
            f"{r['planner_host'] / u:6.2f} {name} (host ratio {r['host_ratio']:.2f}) | ratio {r['ratio']:.2f}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="scaled-down model and sizes: the same code in seconds")
    p.add_argument("--rows", help="comma-separated row indices to run (default: all)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--phases", action="store_true", help="print each row's peaks per phase")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = SMOKE_CFG if args.smoke else WAN_S2V_14B
    rows = smoke_rows() if args.smoke else table_rows()
    if args.rows:
        rows = [rows[int(i)] for i in args.rows.split(",")]
    speed = SpeedModel()
    unit = (2**20, "MiB") if args.smoke else (GiB, "GiB")
    results = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="simulate-fullsize-") as tmp:
        files = make_files(Path(tmp), cfg, args.smoke)
        print(f"simulated: {'smoke DiT ' + str(cfg.dim) + 'x' + str(cfg.num_layers) if args.smoke else 'Wan2.2-S2V-14B'}, "
              f"one clip per row, fake tensors on '{SIM}'; device peak = live tensor bytes (all phases); "
              f"ratio = planner / (device peak + runtime reserve)")
        for row in rows:
            r = run_row(row, files, cfg, args.smoke, speed)
            results.append(r)
            print(format_line(r, unit), flush=True)
            if args.phases and "phases" in r:
                for name, (dev, host) in r["phases"].items():
                    print(f"      {name:<40} device {dev / unit[0]:8.3f} {unit[1]}  host {host / unit[0]:8.3f} {unit[1]}")
        if args.smoke:
            out_real = real_check(files, cfg)
    print()
    print("per DiT call (steady state, one block-step, window full):")
    seen = set()
    for r in results:
        if r.get("call_flops") is None:
            continue
        key = (r["row"].split()[2], r["placement"], r["row"].split()[3])
        if key in seen:
            continue
        seen.add(key)
        print(f"  {r['row']:<40} | {r['placement']:<40} | FlopCounterMode {r['call_flops'] / 1e12:8.3f} TFLOP, "
              f"block_step_flops {r['planner_flops'] / 1e12:8.3f} (ratio {r['planner_flops'] / r['call_flops']:.3f}) | "
              f"host->device {r['call_copy'] / unit[0]:7.2f} {unit[1]}, planner {r['planner_traffic'] / unit[0]:7.2f} {unit[1]}")
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if args.smoke:
        print(f"\nreal CPU check (row 0's run on real CPU tensors, the CPU as the device, tracked the same way): peak "
              f"{out_real['real_total'] / 2**20:.2f} MiB; simulated device + host peak {out_real['fake_total'] / 2**20:.2f} MiB "
              f"(ratio {out_real['fake_total'] / out_real['real_total']:.3f})")
    enc = [r for r in results if "sim_encode" in r]
    if enc:
        r = enc[0]
        print(f"\nencode phase (text then audio encoder on the device, before the DiT): simulated {r['sim_encode'] / unit[0]:.2f} "
              f"{unit[1]}, planner {r['planner_encode'] / unit[0]:.2f} {unit[1]} (both encoders' weights)")
    print(f"\n{len(results)} rows in {time.perf_counter() - t0:.0f} s, peak RSS of this process {rss:.2f} GiB")
    out = {"rows": results, "seconds": time.perf_counter() - t0, "rss_gib": rss}
    if args.smoke:
        out["real_check"] = out_real
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return out


if __name__ == "__main__":
    main()
