"""Attention caches of the causal sampler.

``KVCache`` is one denoising step's rolling history (one clip of tokens, all layers);
``CondCache`` holds the sink (reference + motion tokens), shared by the step caches of
one process. Both are allocated once and written in place. Storage device, dtype and
the range of heads held are parameters, so a cache can live in host memory, in fp8,
or be split across ranks without the attention code changing.

Layout is head-major, ``[layers, H, tokens, D]``, so a read is a contiguous slice that
scaled_dot_product_attention takes as is.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CacheStorage:
    """Where and how cache tensors are kept; ``compute_*`` is what attention receives."""

    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32
    compute_device: torch.device | str | None = None  # None: same as device
    compute_dtype: torch.dtype | None = None  # None: same as dtype
    heads: tuple[int, int] | None = None  # [start, stop) of the heads held; None: all
    # Low-precision storage (e.g. float8_e4m3fn) with a float32 absmax scale per (layer, head, token):
    # values are stored as t / scale and read back as stored * scale, in compute_dtype.
    scaled: bool = False
    pin_memory: bool = False  # page-locked host tensors (async copies to an accelerator)
    # Optional factory ``read_hook(cache) -> reader`` with ``reader.read(layer, active) -> (k, v)``
    # and ``reader.wrote(layer, slot, k, v)``: lets a placement prefetch the next layer's history.
    read_hook: object = None

    def head_count(self, num_heads: int) -> int:
        if self.heads is None:
            return num_heads
        start, stop = self.heads
        if not 0 <= start < stop <= num_heads:
            raise ValueError(f"head range {self.heads} outside 0..{num_heads}")
        return stop - start

    def to_compute(self, t: torch.Tensor) -> torch.Tensor:
        device = self.compute_device if self.compute_device is not None else self.device
        dtype = self.compute_dtype if self.compute_dtype is not None else self.dtype
        return t.to(device=device, dtype=dtype, non_blocking=True)

    def to_storage(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(device=self.device, dtype=self.dtype, non_blocking=True)

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
        # Page-locked memory is allocated as such: pinning a finished tensor would copy it, and a
        # host cache of many GB would briefly need twice its size.
        t = torch.empty(shape, device=self.device, dtype=dtype or self.dtype, pin_memory=self.pin_memory)
        return t.zero_()

    def allocate_scale(self, shape: tuple[int, ...]) -> torch.Tensor | None:
        """Scales [..., tokens, 1] beside values [..., tokens, D] (None when unscaled)."""
        return self.allocate((*shape[:-1], 1), torch.float32) if self.scaled else None

    def encode(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """t [..., D] -> (values to store, scale [..., 1] or None), computed where t is."""
        if not self.scaled:
            return t, None
        tf = t.float()
        scale = tf.abs().amax(-1, keepdim=True).clamp_min(1e-12) / torch.finfo(self.dtype).max
        return (tf / scale).to(self.dtype), scale

    def decode(self, values: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """Stored values (and scale) -> the tensor attention receives."""
        if scale is None:
            return self.to_compute(values)
        device = self.compute_device if self.compute_device is not None else self.device
        dtype = self.compute_dtype if self.compute_dtype is not None else torch.float32
        v = values.to(device=device, non_blocking=True).float()
        return (v * scale.to(device=device, non_blocking=True)).to(dtype)


class _Store:
    """Values (+ optional scales) of keys or values, [layers, H, tokens, D]."""

    def __init__(self, shape: tuple[int, ...], storage: CacheStorage):
        self.storage = storage
        self.values = storage.allocate(shape)
        self.scale = storage.allocate_scale(shape)

    def write(self, layer: int, s: int, t: torch.Tensor) -> None:
        """t [H, n, D] into tokens [s, s+n) of ``layer``."""
        values, scale = self.storage.encode(t)
        self.values[layer, :, s : s + t.shape[1]].copy_(values, non_blocking=True)
        if scale is not None:
            self.scale[layer, :, s : s + t.shape[1]].copy_(scale, non_blocking=True)

    def raw(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stored values [1, H, length, D] and scales of ``layer``, not converted."""
        scale = None if self.scale is None else self.scale[layer, None, :, :length]
        return self.values[layer, None, :, :length], scale

    def read(self, layer: int, length: int) -> torch.Tensor:
        return self.storage.decode(*self.raw(layer, length))

    def nbytes(self) -> int:
        return self.values.nbytes + (0 if self.scale is None else self.scale.nbytes)


class _LayeredKV:
    """Key and value stores of every layer, [layers, H, capacity, D], with an optional read hook."""

    def __init__(self, num_layers: int, capacity: int, num_heads: int, head_dim: int, storage: CacheStorage):
        self.storage = storage
        self.capacity = capacity
        shape = (num_layers, storage.head_count(num_heads), capacity, head_dim)
        self.k_store, self.v_store = _Store(shape, storage), _Store(shape, storage)
        self.k, self.v = self.k_store.values, self.v_store.values
        self.reader = storage.read_hook(self) if storage.read_hook is not None else None

    def _write(self, layer: int, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k_store.write(layer, slot, k[0])
        self.v_store.write(layer, slot, v[0])
        if self.reader is not None:
            self.reader.wrote(layer, slot, k, v)

    def _read(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reader is not None:
            return self.reader.read(layer, length)
        return self.k_store.read(layer, length), self.v_store.read(layer, length)

    def nbytes(self) -> int:
        return self.k_store.nbytes() + self.v_store.nbytes()


class KVCache(_LayeredKV):
    """Keys (roped at write time) and values of the last ``capacity`` tokens of one step."""

    def slot(self, start: int) -> int:
        """Write position of absolute token ``start``: the history rolls over one capacity."""
        return start % self.capacity

    def active_length(self, start: int, length: int) -> int:
        """Tokens attended by a block written at ``start``: all written so far, or the whole window."""
        return self.capacity if start >= self.capacity else start + length

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [1, H, L, D] of absolute tokens [start, start+L) in place."""
        s = self.slot(start)
        n = k.shape[2]
        if s + n > self.capacity:
            raise ValueError(f"block of {n} tokens at slot {s} overflows a cache of {self.capacity}")
        self._write(layer, s, k, v)

    def read(self, layer: int, active: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [1, H, active, D] ready for attention."""
        return self._read(layer, active)


class CondCache(_LayeredKV):
    """Unroped keys and values of the sink tokens, per layer (re-roped at every block call)."""

    def __init__(self, num_layers: int, capacity: int, num_heads: int, head_dim: int, storage: CacheStorage):
        super().__init__(num_layers, capacity, num_heads, head_dim, storage)
        self.length = 0

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Overwrite the store with k, v [1, H, C, D] (a prefill replaces, never appends)."""
        n = k.shape[2]
        if n > self.capacity:
            raise ValueError(f"{n} sink tokens exceed the cond cache of {self.capacity}")
        self._write(layer, 0, k, v)
        self.length = n

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._read(layer, self.length)
