"""Checkpoint files: what a file is, read from its keys, and lazy one-tensor-at-a-time access.

Formats handled (detected from the file's content, never from its name):

* a single ``.safetensors`` file, with or without a key prefix (``model.diffusion_model.``,
  ``diffusion_model.``, ``model.``); ComfyUI's repackaged files are of this kind;
* a sharded Hugging Face directory: ``*.safetensors.index.json`` (``weight_map``) + shards
  (+ ``config.json``), as ``Wan-AI/Wan2.2-S2V-14B`` ships its DiT;
* ComfyUI fp8 "scaled" files: ``float8_e4m3fn`` weights with a float32 scale beside each, in
  either spelling ComfyUI reads: ``<layer>.scale_weight`` (+ optional ``scale_input`` and a
  ``scaled_fp8`` marker tensor) or ``<layer>.weight_scale`` (+ ``input_scale``, a
  ``<layer>.comfy_quant`` JSON tensor). Both mean ``real_weight = fp8_weight * scale``;
* ``.pth``/``.pt``/``.bin``/``.ckpt`` files, read ONLY with
  ``torch.load(weights_only=True, mmap=True)``;
* PEFT LoRA files (``lora_A``/``lora_B``; ``lora_down``/``lora_up`` are recognised too);
* GGUF files (``GGUF`` magic; ComfyUI-GGUF's layout, quantized types): ``gguf_file.GGUFCheckpoint``.

Safetensors are read with plain positioned file reads into freshly allocated tensors (no
memory map), so a loader that materialises one tensor at a time holds one tensor of extra host
memory, and the page cache of the file is not charged to the process. The header is checked
against the file size, so a truncated download is reported before anything is read.

Hostile or damaged files are refused with a ``ModelFileError`` naming the file: a path that is not a
regular file (a FIFO would block ``open()``, a device would be read forever) is refused from its
``stat`` before it is opened; every tensor's ``data_offsets`` must lie inside the file's data and
not overlap another's; a sharded index may only name shards inside its own folder (after
resolving ``..`` and symlinks); and every floating tensor is checked for NaN/Inf as it is read,
since a model with non-finite weights otherwise runs to the end and writes a black video.
"""
from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import stat
import struct
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

__all__ = [
    "ModelFileError",
    "Checkpoint",
    "TensorInfo",
    "FileDescription",
    "open_checkpoint",
    "describe",
    "detect_kind",
    "KIND_NAMES",
]


class ModelFileError(ValueError):
    """A model file that cannot be used: the message names the file, what was expected and what was found."""


KIND_NAMES = {
    "liveavatar_dit": "LiveAvatar / Wan2.2-S2V DiT",
    "wan_dit": "Wan DiT without the S2V audio modules (not Wan2.2-S2V)",
    "wan_vae": "Wan VAE",
    "umt5": "umT5 text encoder",
    "wav2vec2": "wav2vec2 audio encoder",
    "lora": "LoRA",
    "unknown": "unknown model",
}

# Signature keys (after the prefix) per kind; every key of one alternative must be present.
_SIGNATURES: dict[str, tuple[tuple[str, ...], ...]] = {
    "liveavatar_dit": (("casual_audio_encoder.weights", "blocks.0.self_attn.q.weight"),),
    "wan_dit": (("head.modulation", "blocks.0.self_attn.q.weight"),),
    "wan_vae": (
        ("encoder.conv1.weight", "decoder.head.2.weight"),
        ("encoder.conv_in.weight", "decoder.conv_out.weight", "quant_conv.weight"),
    ),
    "umt5": (
        ("token_embedding.weight", "blocks.0.attn.q.weight"),
        ("encoder.block.0.layer.0.SelfAttention.q.weight",),
    ),
    "wav2vec2": (
        ("feature_extractor.conv_layers.0.conv.weight", "encoder.layers.0.attention.k_proj.weight"),
    ),
}
_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.", "model.", "wav2vec2.", "first_stage_model.", "vae.")
_LORA_MARKERS = (".lora_A.", ".lora_B.", ".lora_A.weight", ".lora_B.weight", ".lora_down.", ".lora_up.")

# ComfyUI fp8 side tensors: scale spellings, input scales, per-layer format tags, file markers.
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
AUX_SUFFIXES = SCALE_SUFFIXES + (".scale_input", ".input_scale", ".comfy_quant", ".weight_scale_2")
MARKER_KEYS = ("scaled_fp8",)

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_PTH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
READ_CHUNK = 4 * 2**20  # bytes converted at a time by Checkpoint.read_as


def _short(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int = 0  # absolute byte offset of the data (safetensors only)
    nbytes: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


_FILE_TYPES = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"),
)


def _file_type(mode: int) -> str:
    return next((name for test, name in _FILE_TYPES if test(mode)), "not a regular file")


def check_regular(path: Path) -> int:
    """Size of ``path`` when it is a regular file (symlinks followed); else ModelFileError.

    Checked from ``stat`` before any ``open()``: opening a FIFO for reading blocks until a writer
    comes, and a device has no end to read to.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"model file {path} does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        raise ModelFileError(f"{path}: expected a regular model file; found {_file_type(st.st_mode)}")
    return st.st_size


def open_regular(path: Path):
    """``open(path, "rb")`` of a regular file only, never blocking on a FIFO swapped in after the check.

    ``O_NONBLOCK`` makes the open of a FIFO return at once; ``fstat`` of what was really opened
    then decides (a stat-then-open alone would leave a window to swap the file).
    """
    check_regular(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ModelFileError(f"{path}: expected a regular model file; found {_file_type(mode)}")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


# A float is NaN or Inf exactly when its exponent bits are all ones, i.e. when its bits, read as a
# signed integer, are >= the bound below (sign bit clear), or, read as an unsigned integer, are
# >= sign bit | bound (sign bit set). e4m3fn has no Inf and one NaN per sign (S.1111.111).
_NONFINITE_BITS: dict[torch.dtype, tuple[torch.dtype, int]] = {
    torch.float64: (torch.int64, 0x7FF0000000000000),
    torch.float32: (torch.int32, 0x7F800000),
    torch.float16: (torch.int16, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float8_e4m3fn: (torch.int8, 0x7F),
    torch.float8_e5m2: (torch.int8, 0x7C),
}
CHECK_CHUNK = 2**20  # bytes per step: the second pass over a step is served from the CPU cache


def count_nonfinite(t: torch.Tensor) -> int:
    """How many values of ``t`` are NaN or Inf (0 for integer and bool tensors).

    Two integer ``max`` reductions over the raw bits, in numpy, a cache-sized step at a time:
    exact for every dtype (float8 and bfloat16 included), no temporary, and single-threaded, so
    it never waits on torch's thread pool (on a busy machine a per-tensor ``sum`` or
    ``isfinite(t).all()`` cost milliseconds each just to start; see bench/bench_finite_check.py).
    The count itself is only computed when a step holds a non-finite value.
    """
    spec = _NONFINITE_BITS.get(t.dtype)
    if spec is None or t.numel() == 0:
        return 0
    ints, bound = spec
    signed = t.detach().reshape(-1).view(ints).numpy()
    unsigned = signed.view(f"u{signed.itemsize}")
    sign = 1 << (8 * signed.itemsize - 1)
    step = max(1, CHECK_CHUNK // signed.itemsize)
    bad = 0
    for start in range(0, signed.size, step):
        if signed[start:start + step].max() >= bound or unsigned[start:start + step].max() >= sign | bound:
            bad += int(((unsigned[start:start + step] & (sign - 1)) >= bound).sum())
    return bad


def _refuse_nonfinite(t: torch.Tensor, key: str, file: Path, dtype: torch.dtype | None = None) -> None:
    bad = count_nonfinite(t)
    if bad:
        raise ModelFileError(
            f"{file}: tensor {key!r} ({_short(dtype or t.dtype)}{list(t.shape)}) holds {bad} NaN/Inf value(s) of "
            f"{t.numel()}; expected finite weights (a damaged or badly converted file: download or convert it again)"
        )


def _read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict]:
    """Parse and validate a safetensors header; a truncated or foreign file -> ModelFileError."""
    size = check_regular(path)
    with open_regular(path) as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFileError(f"{path}: expected a safetensors file; found only {size} bytes (empty or truncated)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise ModelFileError(
                f"{path}: expected a safetensors file; found a header length of {n} bytes in a {size}-byte file "
                "(truncated download, or not a safetensors file)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path}: expected a safetensors JSON header; found unreadable bytes ({exc})") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: expected a safetensors header object; found {type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    infos: dict[str, TensorInfo] = {}
    data_size = size - base
    spans: list[tuple[int, int, str]] = []
    for key, entry in header.items():
        try:
            dtype = _ST_DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, stop = (int(v) for v in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(f"{path}: tensor {key!r} has an unsupported or malformed header entry {entry!r}") from None
        if any(s < 0 for s in shape):
            raise ModelFileError(f"{path}: tensor {key!r} has a negative dimension in its shape {list(shape)}")
        nbytes = math.prod(shape) * dtype.itemsize
        if begin < 0 or stop < begin:
            # a negative begin would read the header's own bytes as tensor data
            raise ModelFileError(f"{path}: tensor {key!r} has data_offsets [{begin}, {stop}]; expected 0 <= begin <= end")
        if stop - begin != nbytes:
            raise ModelFileError(f"{path}: tensor {key!r} {entry['dtype']}{list(shape)} needs {nbytes} bytes; the header gives {stop - begin}")
        infos[key] = TensorInfo(dtype, shape, path, base + begin, nbytes)
        if nbytes:
            spans.append((begin, stop, key))
    spans.sort()
    end = max((stop for _, stop, _ in spans), default=0)
    if end > data_size:
        raise ModelFileError(
            f"{path}: truncated safetensors file: its header describes {base + end} bytes, the file has {size} "
            f"({(end - data_size) / 2**20:.1f} MiB missing); download it again"
        )
    for (_, prev_stop, prev_key), (begin, _, key) in zip(spans, spans[1:]):
        if begin < prev_stop:
            raise ModelFileError(
                f"{path}: tensors {prev_key!r} and {key!r} overlap in the file (data_offsets {begin} < {prev_stop}); "
                "expected each tensor's bytes to be its own (a damaged or forged header)"
            )
    return infos, metadata


def _drop_range(start: int, size: int) -> None:
    """Give back the resident pages of ``[start, start + size)`` of a private file map (Linux; else no-op).

    The map is never written, so the kernel re-reads the file if they are touched again; without
    this the whole mapped file would stay counted in the process's RSS. Never call it on anonymous
    memory (its pages would read back as zeros).
    """
    if not sys.platform.startswith("linux"):
        return
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL(None, use_errno=True)
            _LIBC.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        page = mmap.PAGESIZE
        first = (start + page - 1) // page * page  # whole pages only: neighbours may share the edges
        last = (start + size) // page * page
        if last > first:
            _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED
    except (OSError, AttributeError, RuntimeError):
        pass


_LIBC = None


def _copy_chunks(dst: torch.Tensor, src: torch.Tensor, mapped: bool) -> None:
    """``dst.copy_(src)`` (flat, converting dtype) a chunk at a time, giving back the mapped source pages
    of each chunk once copied, so a memory-mapped ``.pth`` tensor is never resident whole."""
    step = max(1, READ_CHUNK // src.element_size())
    for start in range(0, src.numel(), step):
        piece = src[start:start + step]
        dst[start:start + step].copy_(piece)
        if mapped:
            _drop_range(piece.data_ptr(), piece.numel() * piece.element_size())


def _unwrap_pth(obj, path: Path) -> dict[str, torch.Tensor]:
    """A .pth state dict, possibly nested once under 'state_dict'/'model'/'module'."""
    for _ in range(2):
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            for wrapper in ("state_dict", "model", "module", "model_state_dict"):
                if isinstance(obj.get(wrapper), dict):
                    obj = obj[wrapper]
                    break
    if not isinstance(obj, dict):
        raise ModelFileError(f"{path}: expected a state dict (name -> tensor); found a {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelFileError(f"{path}: expected a state dict of tensors; found none (keys: {list(obj)[:5]})")
    return tensors


def detect_kind(keys: Iterable[str]) -> tuple[str, str]:
    """(kind, prefix) of a checkpoint from its keys; ('unknown', '') when nothing matches."""
    keys = set(keys)
    if any(marker in k for k in keys for marker in _LORA_MARKERS):
        return "lora", ""
    for kind, alternatives in _SIGNATURES.items():
        for prefix in _PREFIXES:
            if any(all(prefix + k in keys for k in alt) for alt in alternatives):
                return kind, prefix
    return "unknown", ""


class Checkpoint:
    """Lazy access to the tensors of one checkpoint (file or sharded directory).

    ``keys()`` are the raw keys; ``read(key)`` returns one tensor on the CPU that the caller
    owns (a fresh allocation; nothing else keeps it alive). Use as a context manager.
    """

    def __init__(self, path: Path, fmt: str, infos: dict[str, TensorInfo], metadata: dict | None = None,
                 config: dict | None = None, pth_state: dict[str, torch.Tensor] | None = None, files: list[Path] | None = None):
        self.path = path
        self.format = fmt
        self.infos = infos
        self.metadata = metadata or {}
        self.config = config
        self.files = files or [path]
        self._pth = pth_state
        self._handles: dict[Path, object] = {}
        self._buffer: torch.Tensor | None = None
        self._mapped = False  # pth_state memory-mapped from the file (its pages may be given back)
        self.kind, self.prefix = detect_kind(infos)

    # ----------------------------------------------------------------- access
    def keys(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, key: str) -> bool:
        return key in self.infos

    def shape(self, key: str) -> tuple[int, ...]:
        return self.infos[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self.infos[key].dtype

    def read(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``key`` on the CPU: a fresh tensor, or written into ``out`` (contiguous, same byte size)."""
        info = self.infos[key]
        if out is not None:
            if not out.is_contiguous() or out.numel() * out.element_size() != info.nbytes or out.device.type != "cpu":
                raise ValueError(f"out for {key!r} must be a contiguous CPU tensor of {info.nbytes} bytes")
        else:
            out = torch.empty(info.shape, dtype=info.dtype)
        if self._pth is not None:
            src = self._pth[key]
            if not src.is_contiguous():
                src = src.contiguous()
            _copy_chunks(out.view(-1).view(torch.uint8), src.view(-1).view(torch.uint8), self._mapped)
        else:
            handle = self._handle(info.file)
            if info.nbytes:
                handle.seek(info.offset)
                got = handle.readinto(out.view(-1).view(torch.uint8).numpy())
                if got != info.nbytes:
                    raise ModelFileError(f"{info.file}: tensor {key!r} is cut short ({got} of {info.nbytes} bytes); the file is truncated")
        self._check_finite(key, out if out.dtype == info.dtype else out.view(-1).view(torch.uint8).view(info.dtype).view(info.shape))
        return out

    def _handle(self, file: Path):
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = open_regular(file)
        return handle

    def _check_finite(self, key: str, values: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        """Refuse NaN/Inf in a floating tensor as it is read (fp8 kept in a uint8 container too)."""
        if values.dtype == torch.uint8 and key.endswith(".weight") and self.fp8_storage(key):
            values = values.view(torch.float8_e4m3fn)
        _refuse_nonfinite(values, key, self.infos[key].file, dtype)

    def read_as(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor ``key`` converted to ``dtype`` while it is read, a chunk at a time.

        A fresh CPU tensor in ``dtype`` (the file's dtype when None); the conversion never holds
        the whole tensor twice, so the extra memory is one chunk (``READ_CHUNK`` bytes), which
        keeps the load peak of a loader that reads tensor by tensor at ~1x of what it keeps.
        """
        info = self.infos[key]
        if dtype is None or dtype == info.dtype:
            return self.read(key)
        out = torch.empty(info.shape, dtype=dtype)
        dst = out.view(-1)
        n, item = dst.numel(), info.dtype.itemsize
        step = max(1, READ_CHUNK // item)
        if self._pth is not None:
            src = self._pth[key]
            _copy_chunks(dst, src.reshape(-1) if src.is_contiguous() else src.contiguous().view(-1), self._mapped)
            self._check_finite(key, out)  # after conversion: a value this dtype cannot hold counts too
            return out
        handle = self._handle(info.file)
        if self._buffer is None:  # one buffer per checkpoint: no allocator churn between tensors
            self._buffer = torch.empty(READ_CHUNK, dtype=torch.uint8)
        handle.seek(info.offset)
        for start in range(0, n, step):
            count = min(step, n - start)
            chunk = self._buffer[: count * item]
            got = handle.readinto(chunk.numpy())
            if got != count * item:
                raise ModelFileError(f"{info.file}: tensor {key!r} is cut short; the file is truncated")
            values = chunk.view(info.dtype)
            if count_nonfinite(values):  # checked in the file's dtype, while the chunk is in cache
                _refuse_nonfinite(self.read(key), key, info.file)
            dst[start:start + count].copy_(values)
        return out

    def read_order(self, keys: Iterable[str]) -> list[str]:
        """``keys`` sorted by file and offset, for sequential reads."""
        files = {f: i for i, f in enumerate(self.files)}
        return sorted(keys, key=lambda k: (files.get(self.infos[k].file, 0), self.infos[k].offset, k))

    # ----------------------------------------------------------------- fp8 side tensors
    def model_keys(self) -> dict[str, str]:
        """Names without the prefix and without fp8 side tensors -> raw keys."""
        out = {}
        for key in self.infos:
            if key in MARKER_KEYS or (self.prefix and key == self.prefix + "scaled_fp8"):
                continue
            if key.endswith(AUX_SUFFIXES):
                continue
            name = key[len(self.prefix):] if self.prefix and key.startswith(self.prefix) else key
            out[name] = key
        return out

    def scale_key(self, weight_key: str) -> str | None:
        """The raw key of the fp8 scale stored beside ``<layer>.weight``, if any."""
        if not weight_key.endswith(".weight"):
            return None
        layer = weight_key[: -len(".weight")]
        for suffix in SCALE_SUFFIXES:
            if layer + suffix in self.infos:
                return layer + suffix
        return None

    def fp8_storage(self, weight_key: str) -> bool:
        """True when ``weight_key`` holds float8_e4m3fn values (also in a uint8 container with a comfy_quant tag)."""
        dtype = self.infos[weight_key].dtype
        if dtype == torch.float8_e4m3fn:
            return True
        layer = weight_key[: -len(".weight")] if weight_key.endswith(".weight") else weight_key
        return dtype == torch.uint8 and (layer + ".comfy_quant") in self.infos and self.scale_key(weight_key) is not None

    def fp8_scale(self, weight_key: str) -> torch.Tensor:
        """float32 scale of an fp8 weight (``real = weight.float() * scale``): 0-d, or ``[out, 1]`` per channel.

        A file without a scale beside an fp8 weight (a plain fp8 cast) gets scale 1.
        """
        skey = self.scale_key(weight_key)
        if skey is None:
            return torch.ones((), dtype=torch.float32)
        s = self.read(skey).float()
        rows = self.infos[weight_key].shape[0]
        if s.numel() == 1:
            return s.reshape(())
        if s.numel() == rows:
            return s.reshape(-1, 1)
        raise ModelFileError(
            f"{self.path}: scale {skey!r} has shape {tuple(s.shape)}; expected one value or one per output "
            f"channel ({rows}) for weight {self.infos[weight_key].shape}"
        )

    def read_fp8(self, weight_key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(float8_e4m3fn weight, float32 scale) of one fp8 weight."""
        w = self.read(weight_key)
        return (w.view(torch.float8_e4m3fn) if w.dtype == torch.uint8 else w), self.fp8_scale(weight_key)

    def quantization(self) -> str | None:
        fp8 = [k for k, i in self.infos.items() if i.dtype == torch.float8_e4m3fn or (i.dtype == torch.uint8 and k.endswith(".weight") and self.fp8_storage(k))]
        if not fp8:
            return None
        if any(k.endswith(".weight_scale") for k in self.infos):
            return "fp8_scaled (ComfyUI weight_scale)"
        if any(k.endswith(".scale_weight") for k in self.infos):
            return "fp8_scaled (ComfyUI scale_weight)"
        return "fp8 (no scales)"

    # ----------------------------------------------------------------- life cycle
    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
        self._pth = None
        self._buffer = None

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def sample_keys(self, n: int = 4) -> str:
        keys = sorted(self.infos)
        return ", ".join(keys[:n]) + (f", ... ({len(keys)} tensors)" if len(keys) > n else f" ({len(keys)} tensors)")

    def dtype_summary(self) -> str:
        by_bytes = Counter()
        for info in self.infos.values():
            by_bytes[info.dtype] += info.numel * info.dtype.itemsize
        if not by_bytes:
            return "none"
        ordered = [d for d, _ in by_bytes.most_common()]
        total = sum(by_bytes.values())
        main = ordered[0]
        if by_bytes[main] >= 0.99 * total or len(ordered) == 1:
            return _short(main)
        return " + ".join(f"{_short(d)} {100 * by_bytes[d] / total:.0f}%" for d in ordered[:3])


def _open_pth(path: Path) -> Checkpoint:
    mapped = True
    try:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zip" not in str(exc).lower():
                raise
            # A pre-1.6 (non-zip) pickle cannot be memory-mapped; still weights-only.
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
            mapped = False
    except ModelFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise ModelFileError(
            f"{path}: expected a PyTorch weights file readable with torch.load(weights_only=True); "
            f"found an unreadable, truncated or code-carrying file ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
    state = _unwrap_pth(obj, path)
    infos = {k: TensorInfo(v.dtype, tuple(v.shape), path, 0, v.numel() * v.element_size()) for k, v in state.items()}
    ckpt = Checkpoint(path, "pth", infos, pth_state=state)
    ckpt._mapped = mapped
    return ckpt


def _shard_roots(directory: Path) -> list[Path]:
    """Folders a shard may resolve into: the index's own, and in a Hugging Face hub cache
    (``models--x--y/snapshots/<rev>/``, whose files are symlinks to ``../../blobs/<hash>``) that
    repository's ``blobs`` folder, so a model used straight from the hub cache still loads."""
    roots = [directory.resolve()]
    if directory.parent.name == "snapshots" and (directory.parent.parent / "blobs").is_dir():
        roots.append((directory.parent.parent / "blobs").resolve())
    return roots


def _shard_path(index: Path, shard) -> Path:
    """The file an index entry names, refused unless it stays inside the index's folder.

    The name must be relative without ``..`` going up, and the path, resolved (symlinks
    followed), must stay inside the folder (or the hub cache's ``blobs``): an index is data from a
    download and must not make the loader read ``/etc/passwd`` or a model elsewhere.
    """
    if not isinstance(shard, str) or not shard or "\x00" in shard:
        raise ModelFileError(f"{index}: expected shard file names in the weight_map; found {shard!r}")
    directory = index.parent
    candidate = directory / shard
    lexical = os.path.normpath(shard)
    resolved = candidate.resolve()
    if (Path(shard).is_absolute() or lexical == ".." or lexical.startswith(".." + os.sep)
            or not any(resolved.is_relative_to(root) for root in _shard_roots(directory))):
        raise ModelFileError(
            f"{index}: shard {shard!r} points outside the index's folder {directory.resolve()} (to {resolved}); "
            "expected shard files beside the index"
        )
    return candidate


def _open_sharded(index: Path) -> Checkpoint:
    directory = index.parent
    try:
        check_regular(index)
        raw = json.loads(index.read_text())
        weight_map = raw["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError(f"weight_map is a {type(weight_map).__name__}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelFileError(f"{index}: expected a safetensors index with a 'weight_map'; found unreadable content ({exc})") from None
    for shard in weight_map.values():
        _shard_path(index, shard)  # every entry checked before any shard is opened
    shards = sorted(set(weight_map.values()))
    infos: dict[str, TensorInfo] = {}
    metadata: dict = {}
    for shard in shards:
        shard_path = _shard_path(index, shard)
        if not shard_path.exists():
            raise ModelFileError(f"{index}: expected shard {shard} (listed in the index) in {directory}; found no such file")
        shard_infos, shard_meta = _read_safetensors_header(shard_path)
        metadata.update(shard_meta)
        infos.update(shard_infos)
    for key, shard in weight_map.items():
        info = infos.get(key)
        if info is None or info.file.name != Path(shard).name:
            raise ModelFileError(f"{index}: expected tensor {key!r} in shard {shard} as the index says; found it missing there")
    config = None
    config_path = directory / "config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except ValueError as exc:
            raise ModelFileError(f"{config_path}: expected a JSON model configuration; found invalid JSON ({exc})") from None
    return Checkpoint(directory, f"safetensors (sharded, {len(shards)} files)", infos, metadata, config,
                      files=[directory / s for s in shards])


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a file or model directory for lazy reading (raises ModelFileError / FileNotFoundError)."""
    path = Path(path)
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            preferred = [i for i in indexes if i.name.startswith("diffusion_pytorch_model")]
            indexes = preferred or indexes
        if indexes:
            return _open_sharded(indexes[0])
        candidates = sorted(path.glob("*.safetensors")) or sorted(p for p in path.iterdir() if p.suffix in _PTH_SUFFIXES)
        if len(candidates) > 1 and all(p.suffix == ".safetensors" for p in candidates):
            # e.g. a model beside its LoRA: keep the one file whose keys are a known model
            models = [p for p in candidates if detect_kind(_read_safetensors_header(p)[0])[0] not in ("lora", "unknown")]
            candidates = models if len(models) == 1 else candidates
        if len(candidates) != 1:
            raise ModelFileError(
                f"{path}: expected a model directory with a *.safetensors.index.json and its shards, or a single "
                f"weights file; found {len(candidates)} weight files ({', '.join(p.name for p in candidates[:4])})"
            )
        ckpt = open_checkpoint(candidates[0])
        config_path = path / "config.json"
        if config_path.is_file():
            ckpt.config = json.loads(config_path.read_text())
        return ckpt
    check_regular(path)  # before open(): a FIFO would block it
    with open_regular(path) as f:
        magic = f.read(9)
    if magic[:4] == b"GGUF":  # ComfyUI-GGUF / llama.cpp quantized files
        from .gguf_file import open_gguf

        return open_gguf(path)
    # safetensors: an 8-byte header length, then the JSON header's "{" (checked first: the length's
    # low byte may be 0x80, a pickle's first byte); zip (torch.save) and legacy pickles never have it
    if magic[8:9] != b"{" and (magic[:2] == b"PK" or magic[:1] == b"\x80"):
        return _open_pth(path)
    if path.suffix.lower() in _PTH_SUFFIXES:
        return _open_pth(path)
    infos, metadata = _read_safetensors_header(path)
    return Checkpoint(path, "safetensors", infos, metadata)


@dataclass
class FileDescription:
    path: Path
    kind: str
    format: str
    dtype: str
    tensors: int
    parameters: int
    prefix: str = ""
    quantization: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def kind_name(self) -> str:
        return KIND_NAMES.get(self.kind, self.kind)

    def __str__(self) -> str:
        text = f"{self.path.name}: {self.kind_name}, {self.format}, {self.dtype}, {self.tensors} tensors, {self.parameters / 1e6:.1f}M values"
        if self.prefix:
            text += f", key prefix {self.prefix!r}"
        if self.quantization:
            text += f", {self.quantization}"
        return text


def describe(path: str | os.PathLike) -> FileDescription:
    """What a model file or directory is: kind (from signature keys), format, dtype and size."""
    with open_checkpoint(path) as ckpt:
        return FileDescription(
            path=Path(path),
            kind=ckpt.kind,
            format=ckpt.format,
            dtype=ckpt.dtype_summary(),
            tensors=len(ckpt.infos),
            parameters=sum(i.numel for i in ckpt.infos.values()),
            prefix=ckpt.prefix,
            quantization=ckpt.quantization(),
        )
