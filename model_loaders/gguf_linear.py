"""``GGUFLinear``: a Linear whose weight stays GGML-quantized in memory (host and device).

The weight is a uint8 buffer ``[out, row_bytes]`` holding the file's blocks as they are; each
call dequantizes it with torch code (``gguf_quants``) to the input's dtype on the input's device,
runs ``F.linear`` and frees the dequantized copy. Since the weight is a buffer,
``LiveAvatarTransformer.cast`` leaves it alone and block swap / offload (``placement``) move the
quantized bytes, never a dequantized copy.

An optional low-rank term (the LiveAvatar LoRA applied at run time instead of merged):
``y = x W^T + b + ((x A^T) B^T)`` with ``A`` ``[rank, in]`` and ``B`` ``[out, rank]`` already
multiplied by alpha / rank, both in the compute dtype (buffers, moved with the block).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .gguf_quants import QuantType, dequantize, quant_type

__all__ = ["GGUFLinear"]


class GGUFLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, qtype: QuantType | str,
                 device=None, compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.qtype = qtype if isinstance(qtype, QuantType) else quant_type(qtype)
        self.compute_dtype = compute_dtype
        self.register_buffer("weight", torch.empty(out_features, self.qtype.row_bytes(in_features), dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device), requires_grad=False) if bias else None
        self.register_buffer("lora_a", None)  # [rank, in], or None: no run-time LoRA
        self.register_buffer("lora_b", None)  # [out, rank], times alpha / rank

    def set_lora(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Attach a run-time low-rank term (``b`` already scaled by alpha / rank)."""
        self.lora_a = a.to(self.compute_dtype).contiguous()
        self.lora_b = b.to(self.compute_dtype).contiguous()

    @property
    def has_lora(self) -> bool:
        return self.lora_a is not None

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The real weight ``[out, in]`` (without any low-rank term), in ``dtype``."""
        return dequantize(self.weight, self.qtype, (self.out_features, self.in_features), dtype or self.compute_dtype)

    def extra_repr(self) -> str:
        lora = f", run-time LoRA rank {self.lora_a.shape[0]}" if self.has_lora else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {self.qtype.name}{lora}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = F.linear(x, self.dequantized(x.dtype), bias)
        if self.lora_a is not None:
            y = y + F.linear(F.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))
        return y
