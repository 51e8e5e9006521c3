"""fp8 (e4m3fn) weight storage for the DiT's big Linear layers.

``FP8Linear`` keeps ``weight`` as float8_e4m3fn and a float32 ``weight_scale`` (one value per
tensor, or one per output channel, shape ``[out, 1]``) with ``real_weight = weight * scale`` -
the convention of ComfyUI's fp8 "scaled" files (``scale_weight``/``weight_scale``) and of
upstream LiveAvatar's ``FP8ScaleLinear``, so such files load without re-quantising.

Forward: on a CUDA GPU with fp8 tensor cores (compute capability >= 8.9) the input is
quantised per tensor (per row for per-channel weights) and ``torch._scaled_mm`` runs the
matmul; anywhere else (CPU included) the weight is dequantised to the input's dtype per call.

Which layers: every Linear inside ``blocks.*`` (self/cross attention q,k,v,o and the FFN) and
inside ``audio_injector`` (audio cross-attention and its AdaLN projection) - upstream's fp8 set
minus nothing: its exclusions (text/time embeddings, time projection, output head, the audio
encoder) are never touched here, nor are norms, convolutions or ``keep_in_fp32`` modules.
Weights are stored as buffers, so ``LiveAvatarTransformer.cast`` leaves them alone.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["FP8Linear", "FP8_MAX", "quantize_fp8", "quantize_fp8_into", "dequantize_fp8", "fp8_target_names", "replace_linears", "fp8_matmul_supported"]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
FP8_SCOPES = ("blocks", "audio_injector")


def quantize_fp8(weight: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 weight, float32 scale) with absmax scaling: scale = amax / 448, q = w / scale."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()
    scale = (amax / FP8_MAX).clamp(min=1e-12)
    q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.float()


def quantize_fp8_into(weight: torch.Tensor, out: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """``quantize_fp8`` without temporaries: writes ``out`` (float8) and returns the scale.

    ``weight`` (float32) is overwritten. Bitwise the same result as ``quantize_fp8``.
    """
    if per_channel:
        amax = torch.linalg.vector_norm(weight, float("inf"), dim=1, keepdim=True)
    else:
        amax = torch.linalg.vector_norm(weight, float("inf"))
    scale = (amax / FP8_MAX).clamp(min=1e-12).float()
    out.copy_(weight.div_(scale).clamp_(-FP8_MAX, FP8_MAX))
    return scale


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """real weight = weight * scale (computed in float32, then cast to ``dtype``)."""
    return (weight.float() * scale.to(weight.device, torch.float32)).to(dtype)


_CAPABILITY: dict[int, bool] = {}


def fp8_matmul_supported(device: torch.device) -> bool:
    """True on CUDA devices with fp8 tensor cores (compute capability >= 8.9) and a torch with _scaled_mm."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index) >= (8, 9)
    return _CAPABILITY[index]


class FP8Linear(nn.Module):
    """A Linear whose weight is float8_e4m3fn with a float32 scale; bias in the compute dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, per_channel: bool = False,
                 device=None, compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device))
        scale_shape = (out_features, 1) if per_channel else ()
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device), requires_grad=False) if bias else None
        self.use_scaled_mm = True  # switched off for this module if the fast path ever fails

    @property
    def per_channel(self) -> bool:
        return self.weight_scale.numel() > 1

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, per_channel: bool = False, compute_dtype: torch.dtype = torch.bfloat16) -> "FP8Linear":
        q, scale = quantize_fp8(linear.weight, per_channel)
        return cls.from_quantized(q, scale, linear.bias, compute_dtype)

    @classmethod
    def from_quantized(cls, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                       compute_dtype: torch.dtype = torch.bfloat16) -> "FP8Linear":
        out_f, in_f = weight.shape
        with torch.device("meta"):
            layer = cls(in_f, out_f, bias is not None, per_channel=scale.numel() > 1, compute_dtype=compute_dtype)
        layer.weight = weight.to(FP8_DTYPE)
        layer.weight_scale = scale.float().reshape(layer.weight_scale.shape).to(weight.device)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(weight.device, compute_dtype), requires_grad=False)
        return layer

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_fp8(self.weight, self.weight_scale, dtype or self.compute_dtype)

    def extra_repr(self) -> str:
        kind = "per-channel" if self.per_channel else "per-tensor"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8 e4m3fn {kind} scale"

    def _scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.per_channel:  # row-wise input scales pair with per-channel weight scales
            amax = x2.abs().amax(dim=1, keepdim=True).float()
            scale_b = self.weight_scale.reshape(1, -1)
        else:
            amax = x2.abs().amax().float()
            scale_b = self.weight_scale.reshape(())
        scale_a = (amax / FP8_MAX).clamp(min=1e-12)
        xq = (x2.float() / scale_a).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        out = torch._scaled_mm(xq, self.weight.t(), scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=x.dtype)
        if isinstance(out, tuple):
            out = out[0]
        return out.reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.use_scaled_mm
            and x.dtype in (torch.bfloat16, torch.float16)
            and self.in_features % 16 == 0
            and self.out_features % 16 == 0
            and fp8_matmul_supported(x.device)
        ):
            try:
                return self._scaled_mm(x)
            except RuntimeError:
                self.use_scaled_mm = False  # unsupported shape/scale mode on this GPU: dequantise instead
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), bias)


def fp8_target_names(model: nn.Module) -> list[str]:
    """Names of the Linear modules that get fp8 weights (see the module docstring)."""
    return [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.split(".", 1)[0] in FP8_SCOPES
    ]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def replace_linears(model: nn.Module, names: list[str], per_channel: bool = False,
                    compute_dtype: torch.dtype = torch.bfloat16, quantize: bool = True) -> nn.Module:
    """Swap the named Linears for FP8Linear in place (quantising their weights unless on meta)."""
    for name in names:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, not a Linear")
        if quantize and linear.weight.device.type != "meta":
            new = FP8Linear.from_linear(linear, per_channel, compute_dtype)
        else:
            new = FP8Linear(linear.in_features, linear.out_features, linear.bias is not None, per_channel,
                            device=linear.weight.device, compute_dtype=compute_dtype)
        _set_submodule(model, name, new)
    return model
