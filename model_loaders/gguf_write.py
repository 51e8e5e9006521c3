"""Write a DiT state dict as a GGUF file in ComfyUI-GGUF's layout (tiny models, tests, benchmarks).

Per tensor, the choices of ComfyUI-GGUF's ``tools/convert.py`` + quantizer for a Wan model:
5-D Conv3d weights as F32 with their 5 dimensions (what its ``fix_5d_tensors.py`` adds back),
1-D tensors, tensors of <= 1024 values, ``*.modulation`` and our ``keep_in_fp32`` modules as F32,
the quantized Linear weights (``targets``, default: the blocks' and audio injectors' Linears, the
set ``fp8.py`` quantizes and the planner counts) in ``qtype``, everything else BF16. Values are
quantized with the ``gguf`` package (``gguf.quants.quantize``); K-quants, which it cannot write,
may be given as ready blocks (``raw``: name -> uint8 ``[out, row_bytes]``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .gguf_quants import quant_type

__all__ = ["write_gguf_dit", "tensor_types", "quantize_values"]

SMALL = 1024  # convert.py's QUANTIZATION_THRESHOLD: tensors this small stay F32


def quantize_values(values: torch.Tensor, qtype: str) -> np.ndarray:
    """float values -> the ``gguf`` package's encoding of ``qtype`` (uint8 blocks; F32 as float32)."""
    import gguf

    data = values.detach().float().cpu().numpy()
    return gguf.quants.quantize(data, gguf.GGMLQuantizationType[quant_type(qtype).name])


def tensor_types(state: dict[str, torch.Tensor], qtype: str, targets: set[str] | None = None) -> dict[str, str]:
    """The GGML type of every tensor of a DiT state dict (no prefix) in ComfyUI-GGUF's layout."""
    from ..liveavatar.transformer import LiveAvatarTransformer

    if targets is None:
        targets = quantized_targets(state)
    keep = LiveAvatarTransformer.keep_in_fp32
    out = {}
    for name, v in state.items():
        if v.dim() > 4 or v.dim() <= 1 or v.numel() <= SMALL or name.endswith(".modulation") or any(p in keep for p in name.split(".")):
            out[name] = "F32"
        elif name in targets:
            out[name] = quant_type(qtype).name
        else:
            out[name] = "BF16"
    return out


def quantized_targets(state: dict[str, torch.Tensor]) -> set[str]:
    """Linear weights of ``blocks``/``audio_injector`` (their 2-D ``.weight`` tensors: ``fp8_target_names``' set)."""
    from .fp8 import FP8_SCOPES

    return {n for n, v in state.items() if n.endswith(".weight") and v.dim() == 2 and n.split(".")[0] in FP8_SCOPES}


def write_gguf_dit(state: dict[str, torch.Tensor], path: str | Path, qtype: str, *, prefix: str = "",
                   targets: set[str] | None = None, raw: dict[str, np.ndarray] | None = None, arch: str = "wan") -> Path:
    """Write ``state`` (name -> tensor, no prefix) to ``path``; returns the path."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    types = tensor_types(state, qtype, targets)
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    file_type = getattr(gguf.LlamaFileType, f"MOSTLY_{quant_type(qtype).name}", None)
    if file_type is not None:
        writer.add_file_type(file_type)
    for name, value in state.items():
        kind = types[name]
        ggml = gguf.GGMLQuantizationType[kind]
        if raw is not None and name in raw:
            data = raw[name]
        elif kind == "F32":
            data = value.detach().float().cpu().numpy()
        else:
            data = quantize_values(value, kind)
        writer.add_tensor(prefix + name, np.ascontiguousarray(data), raw_dtype=ggml)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
