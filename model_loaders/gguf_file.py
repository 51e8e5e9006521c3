"""GGUF model files (ComfyUI-GGUF's layout) as a lazy :class:`~.formats.Checkpoint`.

The header (metadata, tensor names, types, shapes, offsets) is parsed by the ``gguf`` package's
``GGUFReader``; tensor bytes are read with positioned file reads into fresh tensors, as for
safetensors, so loading tensor by tensor holds about one tensor of extra host memory and the
file's page cache is not charged to the process.

Layout written by ComfyUI-GGUF's ``tools/convert.py`` for Wan models (architecture ``wan``):

* tensor names are the original state-dict keys, prefix stripped (``model.diffusion_model.``
  may still be there in other converters' files: detected like every other format);
* GGUF stores dimensions innermost first, so the torch shape is the reversed GGUF shape; a
  ``comfy.gguf.orig_shape.<name>`` int32 array, when present, gives the real shape of a tensor
  that was flattened to rows of 256 before quantization (SD-style models; Wan files have none);
* 1-D tensors, tensors of <= 1024 values and ``*.modulation`` stay F32; other tensors are BF16
  or F16 in the converter's output, then quantized (Q8_0 ... Q3_K) by the patched llama-quantize;
* tensors of more than 4 dimensions (Wan's ``patch_embedding.weight`` and the other Conv3d
  weights, ``[out, in, t, h, w]``) are left out by the converter and added back as F32 by its
  ``tools/fix_5d_tensors.py``; a file without them is reported as such.

``read(key)`` gives float values (dequantized to float32 for quantized types); ``read_raw(key)``
gives the stored blocks as uint8 ``[*shape[:-1], row_bytes]`` for weights kept quantized.
"""
from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import torch

from .formats import Checkpoint, ModelFileError, TensorInfo, check_regular, count_nonfinite
from .gguf_quants import SUPPORTED, QuantType, UnsupportedQuantType, dequantize, quant_type

__all__ = ["GGUFCheckpoint", "open_gguf", "GGUF_MAGIC", "is_gguf"]

GGUF_MAGIC = b"GGUF"
ORIG_SHAPE = "comfy.gguf.orig_shape."
_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# byte ranges of the fp16 scales in one block, checked for NaN/Inf as a tensor is read
_SCALE_BYTES = {"Q8_0": (0, 2), "Q4_0": (0, 2), "Q4_1": (0, 4), "Q5_0": (0, 2), "Q5_1": (0, 4), "Q4_K": (0, 4),
                "Q5_K": (0, 4), "Q6_K": (208, 210), "Q3_K": (108, 110)}


def is_gguf(path: str | Path) -> bool:
    """True when ``path`` is a regular file starting with the GGUF magic."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _field_str(reader, name: str) -> str | None:
    field = reader.get_field(name)
    if field is None or not field.data:
        return None
    try:
        return bytes(field.parts[field.data[-1]]).decode("utf-8")
    except (UnicodeDecodeError, TypeError, IndexError):
        return None


def _orig_shape(reader, name: str, path: Path) -> tuple[int, ...] | None:
    field = reader.get_field(ORIG_SHAPE + name)
    if field is None:
        return None
    try:
        return tuple(int(field.parts[i][0]) for i in field.data)
    except (IndexError, TypeError, ValueError):
        raise ModelFileError(f"{path}: metadata {ORIG_SHAPE + name!r} is not an array of integers") from None


class GGUFCheckpoint(Checkpoint):
    """A GGUF file: ``infos`` hold torch shapes; ``qtypes`` the GGML type of every tensor."""

    def __init__(self, path: Path, reader):
        self.arch = _field_str(reader, "general.architecture")
        self.qtypes: dict[str, QuantType] = {}
        self.unsupported: dict[str, str] = {}  # tensor -> GGML type name we cannot dequantize
        infos: dict[str, TensorInfo] = {}
        for t in reader.tensors:
            shape = _orig_shape(reader, t.name, path) or tuple(int(d) for d in reversed(t.shape.tolist()))
            try:
                q = quant_type(int(t.tensor_type))
            except UnsupportedQuantType:
                self.unsupported[t.name] = getattr(t.tensor_type, "name", str(t.tensor_type))
                q = None
            dtype = _FLOAT_DTYPES.get(q.name, torch.uint8) if q is not None else torch.uint8
            if q is not None and q.quantized and shape and shape[-1] % q.block_size:
                raise ModelFileError(f"{path}: tensor {t.name!r} {list(shape)} is {q.name}, whose rows must be "
                                     f"multiples of {q.block_size} values; found rows of {shape[-1]}")
            if q is not None:
                self.qtypes[t.name] = q
            infos[t.name] = TensorInfo(dtype, shape, path, int(t.data_offset), int(t.n_bytes))
        fmt = f"gguf ({self.arch or 'no architecture'})"
        super().__init__(path, fmt, infos, {"general.architecture": self.arch})

    # ----------------------------------------------------------------- access
    def is_quantized(self, key: str) -> bool:
        q = self.qtypes.get(key)
        return key in self.unsupported or (q is not None and q.quantized)

    def qtype(self, key: str) -> QuantType:
        """The tensor's QuantType; a one-line ModelFileError for a type we do not support."""
        if key in self.unsupported:
            raise ModelFileError(
                f"{self.path}: tensor {key!r} is quantized as {self.unsupported[key]}, which this loader does not "
                f"support; expected one of {', '.join(SUPPORTED)} (use a Q8_0, Q6_K, Q5_K, Q4_K ... file)"
            )
        return self.qtypes[key]

    def read_raw(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The stored bytes of ``key``: uint8 ``[*shape[:-1], row_bytes]`` (a fresh tensor, or into ``out``)."""
        q, info = self.qtype(key), self.infos[key]
        byte_shape = (*info.shape[:-1], q.row_bytes(info.shape[-1])) if info.shape else (info.nbytes,)
        if out is None:
            out = torch.empty(byte_shape, dtype=torch.uint8)
        elif out.dtype != torch.uint8 or out.numel() != info.nbytes or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(f"out for {key!r} must be a contiguous CPU uint8 tensor of {info.nbytes} bytes")
        if info.nbytes:
            handle = self._handle(info.file)
            handle.seek(info.offset)
            got = handle.readinto(out.view(-1).numpy())
            if got != info.nbytes:
                raise ModelFileError(f"{info.file}: tensor {key!r} is cut short ({got} of {info.nbytes} bytes); the file is truncated")
        self._check_blocks(key, q, out)
        return out

    def _check_blocks(self, key: str, q: QuantType, raw: torch.Tensor) -> None:
        """Refuse NaN/Inf in a float tensor, or in the fp16 scales of a quantized one."""
        if not q.quantized:
            values = raw.view(-1).view(_FLOAT_DTYPES[q.name])
        else:
            lo, hi = _SCALE_BYTES[q.name]
            values = raw.view(-1, q.type_size)[:, lo:hi].contiguous().view(torch.float16)
        bad = count_nonfinite(values)
        if bad:
            what = "values" if not q.quantized else "block scales"
            raise ModelFileError(
                f"{self.path}: tensor {key!r} ({q.name}{list(self.infos[key].shape)}) holds {bad} NaN/Inf {what}; "
                "expected finite weights (a damaged or badly converted file: download or convert it again)"
            )

    def read(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Float values of ``key``: the file's dtype for F32/F16/BF16, float32 for quantized types."""
        q, info = self.qtype(key), self.infos[key]
        if not q.quantized:
            raw = self.read_raw(key, None if out is None else out.view(-1).view(torch.uint8))
            return raw.view(-1).view(info.dtype).view(info.shape) if out is None else out
        values = dequantize(self.read_raw(key), q, info.shape)
        if out is None:
            return values
        out.copy_(values.view(out.shape))
        return out

    def read_as(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        values = self.read(key)
        return values if dtype is None or values.dtype == dtype else values.to(dtype)

    # ----------------------------------------------------------------- description
    def fp8_storage(self, weight_key: str) -> bool:
        return False

    def type_counts(self) -> Counter:
        counts = Counter(q.name for q in self.qtypes.values())
        counts.update(self.unsupported.values())
        return counts

    def quantization(self) -> str | None:
        quantized = {k: v for k, v in self.type_counts().items() if k not in _FLOAT_DTYPES}
        if not quantized:
            return None
        return "GGUF " + ", ".join(f"{name} x{n}" for name, n in sorted(quantized.items(), key=lambda kv: -kv[1]))

    def main_type(self) -> str:
        """The quantized type holding most bytes (what the file is called by: Q4_K, Q8_0, ...), else the float type."""
        by_bytes = Counter()
        for key, info in self.infos.items():
            name = self.unsupported.get(key) or self.qtypes[key].name
            by_bytes[name] += info.nbytes
        quantized = [n for n, _ in by_bytes.most_common() if n not in _FLOAT_DTYPES]
        return quantized[0] if quantized else (by_bytes.most_common(1)[0][0] if by_bytes else "none")

    def dtype_summary(self) -> str:
        total = sum(i.nbytes for i in self.infos.values()) or 1
        by_bytes = Counter()
        for key, info in self.infos.items():
            by_bytes[self.unsupported.get(key) or self.qtypes[key].name] += info.nbytes
        return " + ".join(f"{n} {100 * b / total:.0f}%" for n, b in by_bytes.most_common(3))

    def file_bytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())


def open_gguf(path: str | Path) -> GGUFCheckpoint:
    """Parse a GGUF file's header with ``gguf.GGUFReader``; a damaged or foreign file -> ModelFileError."""
    path = Path(path)
    size = check_regular(path)
    try:
        import gguf
    except ImportError:  # declared in requirements.txt; a broken install gets one line, not a traceback
        raise ModelFileError(f"{path}: reading GGUF files needs the 'gguf' package (pip install gguf)") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reader = gguf.GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, OSError, TypeError, OverflowError) as exc:
        raise ModelFileError(
            f"{path}: expected a GGUF model file; found an unreadable or truncated one ({size} bytes: "
            f"{type(exc).__name__}: {str(exc)[:160]})"
        ) from None
    ckpt = GGUFCheckpoint(path, reader)
    end = max((i.offset + i.nbytes for i in ckpt.infos.values()), default=0)
    if end > size:
        raise ModelFileError(f"{path}: truncated GGUF file: its header describes {end} bytes, the file has {size}; download it again")
    return ckpt

