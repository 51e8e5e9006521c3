"""GGML quantization types: block sizes and torch dequantization (CPU and GPU alike).

A quantized GGUF tensor is a sequence of fixed-size blocks; each block encodes ``block_size``
consecutive values of a row (rows never share a block). Layouts, from ggml's format
specification (``ggml-common.h``; fp16 scales ``d``/``dmin``/``m``, little-endian):

=======  =====  ====  ===============================================================================
type     block  bytes layout (byte offsets) and value
=======  =====  ====  ===============================================================================
Q8_0     32     34    d[0:2], q int8[2:34]; x = d * q
Q4_0     32     18    d[0:2], nibbles[2:18] (low nibbles values 0-15, high 16-31); x = d * (q - 8)
Q4_1     32     20    d, m, nibbles[4:20]; x = d * q + m
Q5_0     32     22    d, qh uint32[2:6] (bit i: 5th bit of value i), nibbles[6:22]; x = d * (q - 16)
Q5_1     32     24    d, m, qh[4:8], nibbles[8:24]; x = d * q + m
Q4_K     256    144   d, dmin, 12 bytes of eight 6-bit (scale, min) pairs, nibbles[16:144] (64 values
                      per 32 bytes: low nibbles first); sub-block j of 32: x = d*sc_j*q - dmin*m_j
Q5_K     256    176   as Q4_K + qh[16:48] (bit j of byte i: 5th bit of value 32j+i), nibbles[48:176]
Q6_K     256    210   ql[0:128], qh[128:192] (2 bits each), int8 scales[192:208] (16 of 16 values), d;
                      x = d * scale * (q - 32)
Q3_K     256    110   hmask[0:32], 2-bit qs[32:96], 12 bytes of sixteen 6-bit scales (bias 32), d;
                      x = d * (scale - 32) * (q2 - (hmask bit ? 0 : 4))
=======  =====  ====  ===============================================================================

plus the float types F32, F16 and BF16. Everything is computed in float32 in the same order as the
``gguf`` package's numpy reference (``gguf.quants.dequantize``), so the results agree to rounding.
Other types (Q2_K, IQ*, TQ*, MXFP4, ...) are refused by name.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["QuantType", "QUANT_TYPES", "FLOAT_TYPES", "SUPPORTED", "quant_type", "dequantize_blocks",
           "dequantize", "UnsupportedQuantType"]


class UnsupportedQuantType(ValueError):
    """A GGML type this loader does not dequantize."""


@dataclass(frozen=True)
class QuantType:
    name: str
    ggml_id: int  # GGMLQuantizationType value in the file
    block_size: int  # values per block
    type_size: int  # bytes per block

    @property
    def bytes_per_param(self) -> float:
        return self.type_size / self.block_size

    @property
    def quantized(self) -> bool:
        return self.name not in FLOAT_TYPES

    def row_bytes(self, row: int) -> int:
        if row % self.block_size:
            raise ValueError(f"a {self.name} row of {row} values is not a whole number of {self.block_size}-value blocks")
        return row // self.block_size * self.type_size

    def nbytes(self, numel: int) -> int:
        return self.row_bytes(numel)


QUANT_TYPES: dict[str, QuantType] = {q.name: q for q in (
    QuantType("F32", 0, 1, 4), QuantType("F16", 1, 1, 2), QuantType("BF16", 30, 1, 2),
    QuantType("Q8_0", 8, 32, 34), QuantType("Q6_K", 14, 256, 210), QuantType("Q5_K", 13, 256, 176),
    QuantType("Q5_1", 7, 32, 24), QuantType("Q5_0", 6, 32, 22), QuantType("Q4_K", 12, 256, 144),
    QuantType("Q4_1", 3, 32, 20), QuantType("Q4_0", 2, 32, 18), QuantType("Q3_K", 11, 256, 110),
)}
FLOAT_TYPES = ("F32", "F16", "BF16")
SUPPORTED = tuple(QUANT_TYPES)
_BY_ID = {q.ggml_id: q for q in QUANT_TYPES.values()}


def quant_type(value: int | str) -> QuantType:
    """The QuantType of a GGML type id or name; UnsupportedQuantType (naming it) otherwise."""
    if isinstance(value, str):
        q = QUANT_TYPES.get(value.upper())
        name = value
    else:
        q = _BY_ID.get(int(value))
        name = _ggml_name(int(value))
    if q is None:
        raise UnsupportedQuantType(f"GGML type {name} is not supported; supported: {', '.join(SUPPORTED)}")
    return q


def _ggml_name(ggml_id: int) -> str:
    try:
        import gguf

        return gguf.GGMLQuantizationType(ggml_id).name
    except (ImportError, ValueError):
        return f"#{ggml_id}"


# ----------------------------------------------------------------------------- helpers
def _f16(b: torch.Tensor) -> torch.Tensor:
    """[n, 2k] bytes -> [n, k] float32 of the little-endian fp16 values."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, k] bytes -> [n, 2k]: all low nibbles, then all high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _bits(b: torch.Tensor, shifts: torch.Tensor, mask: int) -> torch.Tensor:
    """``(b[..., None, :] >> shifts[:, None]) & mask``: one row per shift."""
    return (b.unsqueeze(-2) >> shifts.view(-1, 1)) & mask


_SHIFTS: dict[tuple, torch.Tensor] = {}


def _shifts(values, device) -> torch.Tensor:
    """Bit-shift amounts as a uint8 tensor on ``device``, made once per device (on a GPU a fresh
    ``torch.tensor`` per call would be a synchronous host-to-device copy in every Linear)."""
    key = (tuple(values), str(device))
    t = _SHIFTS.get(key)
    if t is None:
        t = _SHIFTS[key] = torch.tensor(key[0], dtype=torch.uint8, device=device)
    return t


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eight 6-bit scales and eight 6-bit mins of a Q4_K/Q5_K block from its 12 bytes."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc.float(), mn.float()


# ----------------------------------------------------------------------------- per type
def _q8_0(b):
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


def _q4_0(b):
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]).to(torch.int16) - 8).float()


def _q4_1(b):
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]).float() + _f16(b[:, 2:4])


def _qh32(b: torch.Tensor) -> torch.Tensor:
    """4 bytes -> 32 bits (value i <- bit i of the little-endian uint32)."""
    return _bits(b, _shifts(range(8), b.device), 1).transpose(1, 2).reshape(b.shape[0], 32)


def _q5_0(b):
    q = _nibbles(b[:, 6:]) | (_qh32(b[:, 2:6]) << 4)
    return _f16(b[:, :2]) * (q.to(torch.int16) - 16).float()


def _q5_1(b):
    q = _nibbles(b[:, 8:]) | (_qh32(b[:, 4:8]) << 4)
    return _f16(b[:, :2]) * q.float() + _f16(b[:, 2:4])


def _k_low(qs: torch.Tensor) -> torch.Tensor:
    """128 bytes of nibbles -> [n, 8, 32]: per 32 bytes, 32 low nibbles then 32 high ones."""
    n = qs.shape[0]
    return _bits(qs.reshape(n, 4, 32), _shifts((0, 4), qs.device), 0x0F).reshape(n, 8, 32)


def _q4_k(b):
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b[:, 0:2]) * sc).view(n, 8, 1)
    dm = (_f16(b[:, 2:4]) * mn).view(n, 8, 1)
    return (d * _k_low(b[:, 16:144]).float() - dm).reshape(n, 256)


def _q5_k(b):
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b[:, 0:2]) * sc).view(n, 8, 1)
    dm = (_f16(b[:, 2:4]) * mn).view(n, 8, 1)
    qh = _bits(b[:, 16:48], _shifts(range(8), b.device), 1)  # [n, 8, 32]
    q = _k_low(b[:, 48:176]) | (qh << 4)
    return (d * q.float() - dm).reshape(n, 256)


def _q6_k(b):
    n = b.shape[0]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b[:, 208:210]) * scales).view(n, 16, 1)
    ql = _bits(b[:, 0:128].reshape(n, 2, 64), _shifts((0, 4), b.device), 0x0F).reshape(n, 8, 32)
    qh = _bits(b[:, 128:192].reshape(n, 2, 32), _shifts((0, 2, 4, 6), b.device), 0x03).reshape(n, 8, 32)
    q = ((ql | (qh << 4)).to(torch.int16) - 32).reshape(n, 16, 16).float()
    return (d * q).reshape(n, 256)


def _q3_k(b):
    n = b.shape[0]
    s = b[:, 96:108]
    low = _bits(s[:, 0:8], _shifts((0, 4), b.device), 0x0F).reshape(n, 16)
    high = _bits(s[:, 8:12], _shifts((0, 2, 4, 6), b.device), 0x03).reshape(n, 16)
    scales = ((low | (high << 4)).to(torch.int16) - 32).float()
    dl = (_f16(b[:, 108:110]) * scales).view(n, 16, 1)
    ql = _bits(b[:, 32:96].reshape(n, 2, 32), _shifts((0, 2, 4, 6), b.device), 0x03).reshape(n, 16, 16)
    qh = (_bits(b[:, 0:32], _shifts(range(8), b.device), 1) ^ 1).reshape(n, 16, 16)
    q = (ql.to(torch.int16) - (qh.to(torch.int16) << 2)).float()
    return (dl * q).reshape(n, 256)


def _f32(b):
    return b.contiguous().view(torch.float32)


def _f16_all(b):
    return _f16(b)


def _bf16(b):
    return b.contiguous().view(torch.bfloat16).float()


_DEQUANT = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q4_K": _q4_k,
            "Q5_K": _q5_k, "Q6_K": _q6_k, "Q3_K": _q3_k, "F32": _f32, "F16": _f16_all, "BF16": _bf16}


def dequantize_blocks(raw: torch.Tensor, qtype: QuantType | str) -> torch.Tensor:
    """Blocks (uint8, any shape whose bytes are whole blocks) -> float32 values, flat."""
    q = qtype if isinstance(qtype, QuantType) else quant_type(qtype)
    if raw.dtype != torch.uint8:
        raise TypeError(f"{q.name} blocks must be uint8, got {raw.dtype}")
    if raw.numel() % q.type_size:
        raise ValueError(f"{raw.numel()} bytes are not whole {q.name} blocks of {q.type_size} bytes")
    return _DEQUANT[q.name](raw.reshape(-1, q.type_size)).reshape(-1)


def dequantize(raw: torch.Tensor, qtype: QuantType | str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A quantized tensor's bytes -> its values in ``shape`` and ``dtype`` (computed in float32)."""
    out = dequantize_blocks(raw, qtype).reshape(shape)
    return out if dtype == torch.float32 else out.to(dtype)
