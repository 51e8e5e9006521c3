"""GGUF DiT files -> ``LiveAvatarTransformer`` with its Linears kept quantized (``GGUFLinear``).

``load_dit`` hands a GGUF file (detected by content) to ``load_gguf_dit``. As for the other
formats, the model is built on the meta device, every key and shape is checked before any weight
is read, and tensors are materialised one at a time at their destination:

* a Linear whose weight is quantized in the file (Q8_0 ... Q3_K) becomes a ``GGUFLinear`` holding
  the file's blocks as they are (uint8), dequantized per call;
* every other tensor (F32/F16/BF16 ones, and quantized non-Linear tensors such as a Conv1d
  weight) is converted once to the storage dtype (``precision``: bf16, fp16 or fp32;
  ``keep_in_fp32`` modules in float32), as ``load_dit`` stores a bf16 file.

The LiveAvatar LoRA on a quantized base (``lora_mode``):

* ``"runtime"`` (default): each quantized Linear keeps its low-rank pair (A, B * alpha/rank) in the
  compute dtype and adds ``x A^T B^T`` per call; the base weights stay exactly the file's. Measured
  in bench/bench_gguf.py: the smaller error (Q8_0 weights 0.53% vs 0.76% from the float32 merge,
  latents 0.94% vs 1.25% from the bf16 merge), the only mode for K-quant files; costs the LoRA's
  bytes (676M parameters, 1.26 GiB in bf16 at full size, counted by the planner) and ~5% per call;
* ``"merge"``: dequantize -> add the delta in float32 -> requantize to the same type with the
  ``gguf`` package's quantizer (Q8_0, Q5_0/Q5_1, Q4_0/Q4_1: it has none for K-quants, so those
  files need ``"runtime"``); no run-time cost, but a second rounding on top of the file's.

Linears whose weight is F32/F16/BF16 in the file get the LoRA merged in float32, as ``load_dit`` does.
"""
from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn as nn

from ..liveavatar.lora import LoraReport
from .dit import (KIND_NAMES, PRECISIONS, DiTLoadReport, _check_keys, _check_lora, _EXPECTED, _finish_lora_report,
                  _listing, _release, _resolve_config, _set_tensor, _target_dtype, empty_model)
from .formats import ModelFileError
from .fp8 import _set_submodule
from .gguf_file import GGUFCheckpoint
from .gguf_linear import GGUFLinear
from .gguf_quants import QuantType, dequantize
from .lora_file import read_lora

__all__ = ["load_gguf_dit", "LORA_MODES", "requantize", "REQUANTIZABLE"]

LORA_MODES = ("runtime", "merge")
REQUANTIZABLE = ("BF16", "F16", "F32", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")  # what gguf.quants.quantize writes
_FIVE_D = "tools/fix_5d_tensors.py"


def requantize(values: torch.Tensor, qtype: QuantType) -> torch.Tensor:
    """float values ``[out, in]`` -> uint8 blocks ``[out, row_bytes]`` of ``qtype`` (gguf's own quantizer)."""
    if qtype.name not in REQUANTIZABLE:
        raise ValueError(f"the gguf package cannot quantize to {qtype.name}; merge-at-load supports {', '.join(REQUANTIZABLE)} "
                         "(use lora_mode='runtime')")
    import gguf
    import numpy as np

    raw = gguf.quants.quantize(values.detach().float().cpu().numpy(), gguf.GGMLQuantizationType[qtype.name])
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8).reshape(values.shape[0], -1))


def _missing_5d(path: Path, expected: dict[str, tuple], shapes: dict[str, tuple]) -> None:
    """ComfyUI-GGUF's converter leaves out >4-D tensors until its fix script adds them back: say so."""
    missing = sorted(k for k, s in expected.items() if len(s) > 4 and k not in shapes)
    if missing:
        raise ModelFileError(
            f"{path}: expected the 5-D Conv3d weights ({_listing(missing, 3)}) in the GGUF file; found them missing "
            f"(ComfyUI-GGUF's convert.py leaves them out; its {_FIVE_D} adds them back as F32)"
        )


def load_gguf_dit(
    ckpt: GGUFCheckpoint,
    lora=None,
    precision: str = "bf16",
    device: str | torch.device = "cpu",
    config=None,
    *,
    lora_alpha: float | None = None,
    strict: bool = True,
    lora_mode: str = "runtime",
    t0: float | None = None,
):
    """Load an open GGUF DiT (the caller closes ``ckpt``); see the module docstring."""
    t0 = time.perf_counter() if t0 is None else t0
    path = ckpt.path
    if precision not in PRECISIONS or precision == "fp8":
        raise ModelFileError(f"{path}: a GGUF file is already quantized ({ckpt.main_type()}); precision sets the dtype of "
                             f"its other tensors and of the compute: expected bf16, fp16 or fp32; found {precision!r}")
    if lora_mode not in LORA_MODES:
        raise ValueError(f"lora_mode must be one of {LORA_MODES}, got {lora_mode!r}")
    prec = PRECISIONS[precision]
    device = torch.device(device)
    model = lora_file = None
    try:
        if ckpt.kind != "liveavatar_dit":
            raise ModelFileError(f"{path}: expected {_EXPECTED}; found a {KIND_NAMES[ckpt.kind]} GGUF file ({ckpt.sample_keys()})")
        names = ckpt.model_keys()
        shapes = {n: ckpt.shape(k) for n, k in names.items()}
        cfg, cfg_source = _resolve_config(config, ckpt, shapes)
        try:
            cfg.validate()
        except ValueError as exc:
            raise ModelFileError(f"{path}: configuration ({cfg_source}) is invalid: {exc}") from None
        model = empty_model(cfg)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        _missing_5d(path, expected, shapes)
        skipped = _check_keys(path, expected, shapes, strict, cfg)
        for name in expected:
            ckpt.qtype(names[name])  # an unsupported type is refused, by name, before anything is read
        modules = dict(model.named_modules())
        if lora is not None:
            lora_file = read_lora(lora, alpha=lora_alpha)
        replace = _check_lora(lora_file, modules, expected, path) if lora_file else {}
        lora_modules = set(lora_file.pairs) if lora_file else set()
        quantized = {}
        for name in expected:
            module_name = name.rpartition(".")[0]
            if (name.endswith(".weight") and name not in replace and ckpt.is_quantized(names[name])
                    and isinstance(modules.get(module_name), nn.Linear)):
                quantized[module_name] = ckpt.qtype(names[name])
        if lora_mode == "merge":
            for module_name in sorted(lora_modules & set(quantized)):
                if quantized[module_name].name not in REQUANTIZABLE:
                    raise ModelFileError(
                        f"{path}: merging the LoRA at load needs requantizing {module_name} to {quantized[module_name].name}, which "
                        f"the gguf package cannot write; expected lora_mode 'runtime' for K-quant files")
        for module_name, q in quantized.items():
            linear = modules[module_name]
            layer = GGUFLinear(linear.in_features, linear.out_features, linear.bias is not None, q, device="meta",
                               compute_dtype=_target_dtype(module_name + ".weight", prec))
            _set_submodule(model, module_name, layer)
            modules[module_name] = layer

        report = DiTLoadReport(path, ckpt.format, ckpt.dtype_summary(), f"GGUF {ckpt.main_type()} + {precision}",
                               str(device), cfg, cfg_source, skipped=skipped)
        lora_report = LoraReport(rank=lora_file.rank, alpha=lora_file.alpha) if lora_file else None
        raw_to_name = {raw: n for n, raw in names.items() if n in expected}
        sq_err = sq_ref = 0.0
        for base_raw in ckpt.read_order(raw_to_name):
            name = raw_to_name[base_raw]
            module_name = name.rpartition(".")[0]
            is_weight = name.endswith(".weight")
            merge = is_weight and module_name in lora_modules
            try:
                if is_weight and module_name in quantized:
                    layer, q = modules[module_name], quantized[module_name]
                    raw = ckpt.read_raw(base_raw)
                    if merge and lora_mode == "merge":
                        w = dequantize(raw, q, (layer.out_features, layer.in_features))
                        w.add_(lora_file.delta(module_name))
                        raw = requantize(w, q)
                        sq_err += (dequantize(raw, q, w.shape) - w).square().sum().item()  # what requantizing added
                        sq_ref += w.square().sum().item()
                        w = None
                    elif merge:
                        a, b = lora_file.read_pair(module_name)
                        layer.set_lora(a.to(device), b.to(device, torch.float32).mul_(lora_file.scaling))
                    _set_tensor(model, name, raw.to(device))
                    report.gguf_layers += 1
                else:
                    src, raw_key = (lora_file.checkpoint, replace[name]) if name in replace else (ckpt, base_raw)
                    target = _target_dtype(name, prec)
                    value = src.read(raw_key)
                    if merge:
                        value = value.to(device, torch.float32)
                        value.add_(lora_file.delta(module_name, device))
                    _set_tensor(model, name, value.to(device, target))
                    value = None
            except OSError as exc:
                raise ModelFileError(f"{path}: reading tensor {base_raw!r} failed ({exc}); the file is damaged or truncated") from None
            if merge:
                lora_report.merged.append(module_name)
            if name in replace:
                lora_report.replaced.append(name)
            report.tensors += 1
        leftover = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
        if leftover:
            raise ModelFileError(f"{path}: tensors not materialised: {_listing(leftover)}")
        if lora_report is not None:
            _finish_lora_report(model, report, lora_report, lora_file, lora_modules, (nn.Linear, GGUFLinear))
            report.lora_mode = lora_mode if lora_modules & set(quantized) else "merge"
            if sq_ref:
                report.requant_error = (sq_err / sq_ref) ** 0.5
        model.eval()
        report.model_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        report.seconds = time.perf_counter() - t0
        return model, report
    except BaseException:
        model = modules = value = layer = raw = w = None  # noqa: F841
        traceback.clear_frames(sys.exc_info()[2])
        _release(device)
        raise
    finally:
        if lora_file is not None:
            lora_file.close()
