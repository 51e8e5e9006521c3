"""LiveAvatar / Wan2.2-S2V DiT checkpoints -> ``LiveAvatarTransformer``, with LoRA and precision.

``load_dit`` builds the model on the meta device, checks every key and shape of the file
against it before reading any weight, then materialises one tensor at a time straight at its
destination (device and dtype). A LoRA is merged per Linear in float32 as that weight is
materialised, before the cast to bf16/fp16 or the fp8 quantisation. Peak host memory is the
final model plus about one tensor (safetensors are read without a memory map).

What accelerate does and what it does not do here:

* the meta model is built under ``accelerate.init_empty_weights(include_buffers=True)``, plus
  ``_SkipMetaInit``: accelerate still runs every module's initialiser on the meta tensors, and
  the first ``normal_`` there imports sympy (measured at full 14B size: 2.9 s and +79 MiB RSS
  without it, 0.1 s and +5 MiB with it);
* each materialised tensor is put in place with ``accelerate.utils.set_module_tensor_to_device``
  (shape-checked against the meta tensor; ``clear_cache=False``, as emptying the CUDA cache
  once per tensor costs time for nothing);
* reading, the LoRA merge and the fp8 quantisation stay here: accelerate's loaders
  (``load_checkpoint_in_model``) read a whole shard into memory before placing its tensors,
  and know neither ComfyUI's fp8 "scaled" files nor a merge in float32 before the cast, so
  their host peak would be the model plus a shard (or a whole single-file checkpoint) instead
  of the model plus one tensor.

Config: ``config`` argument (DiTConfig, dict or JSON path) > ``config.json`` of a model
directory > inferred from the tensor shapes (heads = dim / 128, Wan's head size; audio
injection layers: upstream's list for 40 layers with 12 injectors, every layer when there is
one injector per layer; anything else needs a config).
"""
from __future__ import annotations

import gc
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from torch.overrides import TorchFunctionMode

from ..liveavatar.config import WAN_S2V_14B, DiTConfig
from ..liveavatar.lora import LoraError, LoraReport, peft_wrapped
from ..liveavatar.transformer import LiveAvatarTransformer
from .formats import KIND_NAMES, Checkpoint, ModelFileError, open_checkpoint
from .fp8 import FP8Linear, fp8_target_names, quantize_fp8_into, replace_linears
from .gguf_file import GGUFCheckpoint
from .lora_file import LoraFile, read_lora

__all__ = ["load_dit", "DiTLoadReport", "infer_dit_config", "PRECISIONS", "ModelFileError"]

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn}
_EXPECTED = (
    "a LiveAvatar / Wan2.2-S2V DiT (Wan-AI/Wan2.2-S2V-14B shards or ComfyUI's wan2.2_s2v_14B_*.safetensors; "
    "keys casual_audio_encoder.weights, blocks.0.self_attn.q.weight, ...)"
)
HEAD_DIM = 128  # every released Wan DiT uses 128-wide heads


@dataclass
class DiTLoadReport:
    path: Path
    format: str
    source_dtype: str
    precision: str
    device: str
    config: DiTConfig
    config_source: str
    tensors: int = 0
    fp8_layers: int = 0
    fp8_from_file: int = 0  # fp8 weights taken from the file as they were (no re-quantisation)
    gguf_layers: int = 0  # GGUFLinear layers (weights kept quantized as in the GGUF file)
    lora_mode: str = "merge"  # GGUF files: "runtime" (low-rank term per call) or "merge" (requantized)
    requant_error: float | None = None  # GGUF merge-at-load: relative L2 error requantizing the merged weights added
    lora: LoraReport | None = None
    lora_path: Path | None = None
    lora_alpha_source: str | None = None
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    model_bytes: int = 0

    def summary(self) -> str:
        c = self.config
        text = (
            f"DiT {self.path.name} ({self.format}, {self.source_dtype}) -> {self.precision} on {self.device}: "
            f"dim {c.dim}, {c.num_layers} layers, {c.num_heads} heads (config: {self.config_source}), "
            f"{self.model_bytes / 2**30:.2f} GiB in {self.seconds:.1f} s"
        )
        if self.fp8_layers:
            text += f"; {self.fp8_layers} fp8 Linears"
        if self.gguf_layers:
            text += f"; {self.gguf_layers} quantized GGUF Linears"
        if self.lora is not None:
            text += f"; LoRA {self.lora_path.name}: {self.lora.summary()} (alpha from {self.lora_alpha_source})"
            if self.gguf_layers and self.lora_mode == "runtime":
                text += ", applied at run time on the quantized layers"
            if self.requant_error is not None:
                text += f", merged and requantized (added error {100 * self.requant_error:.2f}% of the merged weights)"
        if self.skipped:
            text += f"; ignored {len(self.skipped)} unexpected tensors (e.g. {self.skipped[0]})"
        return text


# ----------------------------------------------------------------------------- config
def _count(names, prefix: str) -> int:
    ids = {int(n[len(prefix):].split(".", 1)[0]) for n in names if n.startswith(prefix) and n[len(prefix):].split(".", 1)[0].isdigit()}
    return max(ids) + 1 if ids else 0


def infer_dit_config(shapes: dict[str, tuple[int, ...]]) -> DiTConfig:
    """A DiTConfig from the tensor shapes of a DiT state dict (no prefix); ValueError if ambiguous."""

    def need(key):
        if key not in shapes:
            raise ValueError(f"tensor {key!r} is missing, so the model size cannot be read off the file")
        return shapes[key]

    pe = need("patch_embedding.weight")  # [dim, in, pt, ph, pw]
    dim, in_dim, patch = pe[0], pe[1], tuple(pe[2:])
    if dim % HEAD_DIM:
        raise ValueError(f"dim {dim} is not a multiple of {HEAD_DIM}, so the head count is unknown; give a config.json")
    num_layers = _count(shapes, "blocks.")
    injectors = _count(shapes, "audio_injector.injector.")
    if (num_layers, injectors) == (WAN_S2V_14B.num_layers, len(WAN_S2V_14B.audio_inject_layers)):
        inject = WAN_S2V_14B.audio_inject_layers
    elif injectors == num_layers:
        inject = tuple(range(num_layers))
    else:
        raise ValueError(
            f"{injectors} audio injectors for {num_layers} layers: which layers they follow is not in the tensors; "
            "give a config.json with audio_inject_layers"
        )
    local = need("casual_audio_encoder.encoder.conv1_local.conv.weight")  # [dim/4 * tokens, audio_dim, k]
    return DiTConfig(
        dim=dim,
        ffn_dim=need("blocks.0.ffn.0.weight")[0],
        num_heads=dim // HEAD_DIM,
        num_layers=num_layers,
        in_dim=in_dim,
        out_dim=need("head.head.weight")[0] // math.prod(patch),
        cond_dim=need("cond_encoder.weight")[1],
        text_dim=need("text_embedding.0.weight")[1],
        freq_dim=need("time_embedding.0.weight")[1],
        audio_dim=local[1],
        num_audio_layers=need("casual_audio_encoder.weights")[1],
        num_audio_token=local[0] // (dim // 4),
        audio_inject_layers=inject,
        patch_size=patch,
    )


def _resolve_config(config, ckpt: Checkpoint, shapes) -> tuple[DiTConfig, str]:
    if isinstance(config, DiTConfig):
        return config, "given"
    if isinstance(config, dict):
        return DiTConfig.from_dict(config), "given"
    if isinstance(config, (str, os.PathLike)):
        try:
            return DiTConfig.from_json(config), str(config)
        except (OSError, ValueError, TypeError) as exc:
            raise ModelFileError(f"{config}: expected a DiT config.json; found an unreadable file ({exc})") from None
    if ckpt.config is not None:
        try:
            return DiTConfig.from_dict(ckpt.config), "config.json"
        except TypeError as exc:
            raise ModelFileError(f"{ckpt.path}/config.json: expected a DiT configuration; found {exc}") from None
    try:
        return infer_dit_config(shapes), "inferred from tensor shapes"
    except ValueError as exc:
        raise ModelFileError(f"{ckpt.path}: cannot infer the DiT configuration: {exc}") from None


# ----------------------------------------------------------------------------- meta model
class _SkipMetaInit(TorchFunctionMode):
    """Turns in-place initialisers (``normal_``, ``uniform_``, ...) on meta tensors into no-ops.

    They compute nothing there, but some (``normal_``) run a Python decomposition whose first
    use imports sympy: ~1.7 s and ~70 MB of host memory for nothing. Modes are thread-local.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.startswith("__"):
            target = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


def empty_model(cfg: DiTConfig) -> LiveAvatarTransformer:
    """The DiT with every tensor on the meta device (no memory, no initialisation, no gradients)."""
    with init_empty_weights(include_buffers=True), _SkipMetaInit():
        model = LiveAvatarTransformer(cfg)
    return model.requires_grad_(False)


# ----------------------------------------------------------------------------- checks
def _listing(names, n=5) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _check_keys(path: Path, expected: dict[str, tuple], found: dict[str, tuple], strict: bool, cfg: DiTConfig) -> list[str]:
    missing = set(expected) - set(found)
    unexpected = set(found) - set(expected)
    size = f"dim {cfg.dim}, {cfg.num_layers} layers, {len(cfg.audio_inject_layers)} audio injectors"
    if missing:
        raise ModelFileError(
            f"{path}: expected every tensor of {_EXPECTED[:37]} ({size}); found {len(missing)} missing: {_listing(missing)}"
            + (" (an incomplete or other-sized checkpoint, or a wrong config.json)" if unexpected else "")
        )
    if unexpected and strict:
        raise ModelFileError(
            f"{path}: expected only the tensors of a LiveAvatar / Wan2.2-S2V DiT ({size}); found {len(unexpected)} "
            f"unexpected: {_listing(unexpected)} (pass strict=False to ignore them)"
        )
    bad = [(k, expected[k], found[k]) for k in sorted(expected) if tuple(expected[k]) != tuple(found[k])]
    if bad:
        detail = "; ".join(f"{k}: expected {list(e)}, found {list(f)}" for k, e, f in bad[:4])
        raise ModelFileError(f"{path}: tensor shapes do not fit a DiT of {size}: {detail}" + (f" (+{len(bad) - 4} more)" if len(bad) > 4 else ""))
    return sorted(unexpected)


def _check_lora(lora: LoraFile, modules: dict[str, nn.Module], expected: dict[str, tuple], dit_path: Path) -> dict[str, str]:
    """Check the LoRA's pairs and full tensors against the model; {model tensor: file key} to replace."""
    for name, pair in sorted(lora.pairs.items()):
        module = modules.get(name)
        if not isinstance(module, (nn.Linear, FP8Linear)):
            found = "nothing" if module is None else f"a {type(module).__name__}"
            raise ModelFileError(
                f"LoRA file {lora.path}: expected a LoRA for the DiT {dit_path.name} (modules such as "
                f"blocks.0.self_attn.q); found module {name!r}, which is {found} in that model (a LoRA for another model?)"
            )
        out_f, in_f = module.out_features, module.in_features
        if tuple(pair.a.shape) != (lora.rank, in_f) or tuple(pair.b.shape) != (out_f, lora.rank):
            raise ModelFileError(
                f"LoRA file {lora.path}: expected lora_A ({lora.rank}, {in_f}) and lora_B ({out_f}, {lora.rank}) for "
                f"{name} (weight ({out_f}, {in_f}) in {dit_path.name}); found lora_A {tuple(pair.a.shape)} and "
                f"lora_B {tuple(pair.b.shape)} (a LoRA for another model size?)"
            )
    linears = [n for n, m in modules.items() if isinstance(m, (nn.Linear, FP8Linear))]
    try:
        return lora.replacements(expected, peft_wrapped(linears) | set(lora.pairs))
    except LoraError as exc:
        raise ModelFileError(f"LoRA file {lora.path}: {exc} (checked against the DiT {dit_path.name})") from None


# ----------------------------------------------------------------------------- loading
def _target_dtype(name: str, precision: torch.dtype) -> torch.dtype:
    if any(part in LiveAvatarTransformer.keep_in_fp32 for part in name.split(".")):
        return torch.float32
    return torch.bfloat16 if precision == torch.float8_e4m3fn else precision


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put a materialised tensor (already on its device, in its dtype) in place of the meta one."""
    set_module_tensor_to_device(model, name, value.device, value=value, dtype=value.dtype, clear_cache=False)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _finish_lora_report(model: nn.Module, report, lora_report, lora_file, lora_modules, linear_types) -> None:
    """Sort the merged/replaced lists, name the LoRA-able Linears the file left out, attach it to ``report``."""
    lora_report.merged.sort()
    lora_report.replaced.sort()
    targets = ("q", "k", "v", "o", "ffn.0", "ffn.2")
    lora_report.uncovered = [
        n for n, m in model.named_modules()
        if isinstance(m, linear_types) and n not in lora_modules and any(n == t or n.endswith("." + t) for t in targets)
    ]
    report.lora, report.lora_path, report.lora_alpha_source = lora_report, lora_file.path, lora_file.alpha_source


def load_dit(
    path: str | os.PathLike,
    lora: str | os.PathLike | None = None,
    precision: str = "bf16",
    device: str | torch.device = "cpu",
    config: DiTConfig | dict | str | os.PathLike | None = None,
    *,
    lora_alpha: float | None = None,
    strict: bool = True,
    fp8_per_channel: bool = False,
    lora_mode: str = "runtime",
) -> tuple[LiveAvatarTransformer, DiTLoadReport]:
    """Load a DiT checkpoint (file or sharded directory), merge ``lora``, store in ``precision``.

    precision: "bf16" | "fp16" | "fp32" | "fp8" (fp8 e4m3fn weights for the blocks' and audio
    injectors' Linears, bf16 for the rest; ``keep_in_fp32`` modules stay float32 always).
    Raises ``ModelFileError`` (a ValueError) for a wrong, incomplete, mismatched or truncated
    file or LoRA; nothing stays allocated then. A GGUF file goes to ``gguf_dit.load_gguf_dit``
    (quantized Linears kept quantized; ``lora_mode`` "runtime" or "merge" for the LoRA on them).
    """
    t0 = time.perf_counter()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    prec = PRECISIONS[precision]
    device = torch.device(device)
    path = Path(path)
    model = None
    lora_file = None
    ckpt = open_checkpoint(path)
    if isinstance(ckpt, GGUFCheckpoint):
        from .gguf_dit import load_gguf_dit

        try:
            return load_gguf_dit(ckpt, lora, precision, device, config, lora_alpha=lora_alpha, strict=strict,
                                 lora_mode=lora_mode, t0=t0)
        finally:
            ckpt.close()
    try:
        if ckpt.kind != "liveavatar_dit":
            raise ModelFileError(f"{path}: expected {_EXPECTED}; found a {KIND_NAMES[ckpt.kind]} file ({ckpt.sample_keys()})")
        names = ckpt.model_keys()  # name -> raw key
        shapes = {n: ckpt.shape(k) for n, k in names.items()}
        cfg, cfg_source = _resolve_config(config, ckpt, shapes)
        try:
            cfg.validate()
        except ValueError as exc:
            raise ModelFileError(f"{path}: configuration ({cfg_source}) is invalid: {exc}") from None
        model = empty_model(cfg)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        skipped = _check_keys(path, expected, shapes, strict, cfg)
        fp8_names = set(fp8_target_names(model)) if prec == torch.float8_e4m3fn else set()
        if fp8_names:
            replace_linears(model, sorted(fp8_names), per_channel=fp8_per_channel, compute_dtype=torch.bfloat16, quantize=False)
        modules = dict(model.named_modules())
        if lora is not None:
            lora_file = read_lora(lora, alpha=lora_alpha)
        replace = _check_lora(lora_file, modules, expected, path) if lora_file else {}  # name -> key in the LoRA file
        lora_modules = set(lora_file.pairs) if lora_file else set()

        report = DiTLoadReport(path, ckpt.format, ckpt.dtype_summary(), precision, str(device), cfg, cfg_source, skipped=skipped)
        lora_report = LoraReport(rank=lora_file.rank, alpha=lora_file.alpha) if lora_file else None
        raw_to_name = {raw: n for n, raw in names.items() if n in expected}
        scratch = _Scratch()
        for base_raw in ckpt.read_order(raw_to_name):
            name = raw_to_name[base_raw]
            # A full tensor of the LoRA file replaces the base one before the merge, as upstream loads it.
            src, raw = (lora_file.checkpoint, replace[name]) if name in replace else (ckpt, base_raw)
            module_name = name.rpartition(".")[0]
            is_weight = name.endswith(".weight")
            file_fp8 = is_weight and src.fp8_storage(raw)
            merge = is_weight and module_name in lora_modules
            try:
                if module_name in fp8_names and is_weight:
                    layer = modules[module_name]
                    if file_fp8 and not merge and (src.fp8_scale(raw).numel() > 1) == fp8_per_channel:
                        q = torch.empty(src.shape(raw), dtype=torch.float8_e4m3fn)  # the file's fp8 values, as they are
                        src.read(raw, out=q)
                        q, scale = q.to(device), src.fp8_scale(raw).to(device)
                        report.fp8_from_file += 1
                    else:
                        w = _read_f32(src, raw, file_fp8, device, scratch)
                        if merge:
                            w.add_(lora_file.delta(module_name, device, out=scratch.get("delta", w.shape, torch.float32, device)))
                        q = torch.empty(w.shape, dtype=torch.float8_e4m3fn, device=device)
                        scale = quantize_fp8_into(w, q, fp8_per_channel)  # overwrites the scratch w
                    _set_tensor(model, module_name + ".weight", q)
                    _set_tensor(model, module_name + ".weight_scale", scale.reshape(layer.weight_scale.shape))
                    report.fp8_layers += 1
                else:
                    target = _target_dtype(name, prec)
                    info = src.infos[raw]
                    if merge or file_fp8:
                        w = _read_f32(src, raw, file_fp8, device, scratch)
                        if merge:
                            w.add_(lora_file.delta(module_name, device, out=scratch.get("delta", w.shape, torch.float32, device)))
                        value = torch.empty(w.shape, dtype=target, device=device)
                        value.copy_(w)
                    elif not info.dtype.is_floating_point:
                        raise ModelFileError(f"{src.path}: tensor {raw!r} is {info.dtype}; expected a floating-point weight")
                    elif info.dtype == target and device.type == "cpu":
                        value = torch.empty(info.shape, dtype=target)
                        src.read(raw, out=value)  # straight into the parameter
                    else:
                        staged = scratch.get("raw", info.shape, info.dtype, torch.device("cpu"))
                        src.read(raw, out=staged)
                        value = torch.empty(info.shape, dtype=target, device=device)
                        value.copy_(staged)
                    _set_tensor(model, name, value)
                    value = None
            except OSError as exc:
                raise ModelFileError(f"{src.path}: reading tensor {raw!r} failed ({exc}); the file is damaged or truncated") from None
            if merge:
                lora_report.merged.append(module_name)
            if name in replace:
                lora_report.replaced.append(name)
            report.tensors += 1
        leftover = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
        if leftover:  # cannot happen after _check_keys; a guard against silent half-built models
            raise ModelFileError(f"{path}: tensors not materialised: {_listing(leftover)}")
        if lora_report is not None:
            _finish_lora_report(model, report, lora_report, lora_file, lora_modules, (nn.Linear, FP8Linear))
        model.eval()
        report.model_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        report.seconds = time.perf_counter() - t0
        return model, report
    except BaseException:
        # Drop every reference to the half-built model, including those held by the frames of
        # the traceback, so a failed load leaves nothing allocated.
        model = modules = value = q = scale = w = staged = layer = scratch = None  # noqa: F841
        traceback.clear_frames(sys.exc_info()[2])
        _release(device)
        raise
    finally:
        ckpt.close()
        if lora_file is not None:
            lora_file.close()


class _Scratch:
    """Work buffers reused from tensor to tensor, so conversions allocate (and free) nothing per tensor.

    Freed temporaries of every size would fragment the host heap (glibc keeps them), which
    shows as peak RSS well above the model; with these the extra is a few of the largest tensor.
    """

    def __init__(self):
        self.buffers: dict[tuple[str, torch.device], torch.Tensor] = {}

    def get(self, role: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        key = (role, device)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < nbytes:
            self.buffers[key] = None
            buf = self.buffers[key] = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
        return buf[:nbytes].view(dtype).view(shape)


def _read_f32(ckpt: Checkpoint, raw: str, file_fp8: bool, device: torch.device, scratch: _Scratch) -> torch.Tensor:
    """One weight as float32 in a scratch buffer on ``device`` (fp8 files: times their scale)."""
    info = ckpt.infos[raw]
    w = scratch.get("f32", info.shape, torch.float32, device)
    if info.dtype == torch.float32 and device.type == "cpu":
        ckpt.read(raw, out=w)
    else:
        src = scratch.get("raw", info.shape, info.dtype, torch.device("cpu"))
        ckpt.read(raw, out=src)
        w.copy_(src.view(torch.float8_e4m3fn) if file_fp8 else src)
    if file_fp8:
        w.mul_(ckpt.fp8_scale(raw).to(device))
    return w
