"""Compute precision of the text encoder, the audio encoder and the VAE: choices and defaults.

``auto`` picks per device (figures: README "Encoder memory and precision", measured by
``bench/bench_encoders.py --parity`` against the golden data; max |err| / max |float32 output|):

* GPU: umT5 **bf16** (upstream runs it in bf16; fp16 overflows in T5 feed-forwards), wav2vec2
  **fp16** (its released weights are fp16; 2.3e-3 vs 1.7e-2 for bf16), VAE **bf16** (the range of
  float32, as ComfyUI runs the Wan VAE; fp16 is offered and measured closer on the tiny golden VAE,
  1.5e-2 vs 8e-2 on the streaming decode, but its range is not guaranteed for real activations).
* CPU: umT5 **bf16**: umT5-XXL is 5.7B parameters, 21.2 GiB in float32 and 10.6 GiB in bf16, which
  is the difference between fitting a 32 GB desktop or not; it runs once per prompt and costs
  1.1e-2 of parity. wav2vec2 and the VAE stay **float32** on the CPU: they are small (1.2 / 0.5 GiB),
  run on every window / block, and float32 is exact against the golden data.

``fp8`` (text encoder only): the Linear weights in float8 e4m3 with a per-tensor scale
(``FP8Linear``), dequantised per layer at call time, bf16 compute. An fp8-scaled file's Linear
weights stay fp8 under every choice: dequantising them at load would only double their memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PARTS = ("text", "audio", "vae")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
TEXT_PRECISIONS = PRECISIONS + ("fp8",)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.bfloat16}
GPU_DEFAULTS = {"text": "bf16", "audio": "fp16", "vae": "bf16"}
CPU_DEFAULTS = {"text": "bf16", "audio": "fp32", "vae": "fp32"}


@dataclass(frozen=True)
class EncoderPrecision:
    """A resolved choice: ``name`` (bf16/fp16/fp32/fp8), the compute ``dtype`` and the fp8 rule."""

    name: str
    dtype: torch.dtype
    fp8: bool | None = None  # text encoder: True quantises Linear weights; None keeps a file's fp8

    @property
    def bytes(self) -> int:
        """Bytes per parameter of the compute dtype (fp8 Linear weights are counted by the planner)."""
        return self.dtype.itemsize


def resolve(part: str, precision: str = "auto", device: str | torch.device = "cpu") -> EncoderPrecision:
    """The precision ``part`` (text/audio/vae) loads in for ``precision`` on ``device``."""
    if part not in PARTS:
        raise ValueError(f"unknown model part {part!r}; expected one of {PARTS}")
    allowed = TEXT_PRECISIONS if part == "text" else PRECISIONS
    if precision not in allowed:
        raise ValueError(f"{part} encoder precision {precision!r}: expected one of {', '.join(allowed)}")
    if precision == "auto":
        on_gpu = torch.device(device).type != "cpu"
        precision = (GPU_DEFAULTS if on_gpu else CPU_DEFAULTS)[part]
    return EncoderPrecision(precision, DTYPES[precision], True if precision == "fp8" else None)


__all__ = ["PARTS", "PRECISIONS", "TEXT_PRECISIONS", "GPU_DEFAULTS", "CPU_DEFAULTS", "EncoderPrecision", "resolve"]
