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


class KVCache:
    """Keys (roped at write time) and values of the last ``capacity`` tokens of one step."""

    def __init__(self, num_layers: int, capacity: int, num_heads: int, head_dim: int, storage: CacheStorage):
        self.storage = storage
        self.capacity = capacity
        heads = storage.head_count(num_heads)
        shape = (num_layers, heads, capacity, head_dim)
        self.k = torch.zeros(shape, device=storage.device, dtype=storage.dtype)
        self.v = torch.zeros(shape, device=storage.device, dtype=storage.dtype)

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
        self.k[layer, :, s : s + n].copy_(k[0], non_blocking=True)
        self.v[layer, :, s : s + n].copy_(v[0], non_blocking=True)

    def read(self, layer: int, active: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [1, H, active, D] ready for attention."""
        to = self.storage.to_compute
        return to(self.k[layer, None, :, :active]), to(self.v[layer, None, :, :active])

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class CondCache:
    """Unroped keys and values of the sink tokens, per layer (re-roped at every block call)."""

    def __init__(self, num_layers: int, capacity: int, num_heads: int, head_dim: int, storage: CacheStorage):
        self.storage = storage
        self.capacity = capacity
        heads = storage.head_count(num_heads)
        shape = (num_layers, heads, capacity, head_dim)
        self.k = torch.zeros(shape, device=storage.device, dtype=storage.dtype)
        self.v = torch.zeros(shape, device=storage.device, dtype=storage.dtype)
        self.length = 0

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Overwrite the store with k, v [1, H, C, D] (a prefill replaces, never appends)."""
        n = k.shape[2]
        if n > self.capacity:
            raise ValueError(f"{n} sink tokens exceed the cond cache of {self.capacity}")
        self.k[layer, :, :n].copy_(k[0], non_blocking=True)
        self.v[layer, :, :n].copy_(v[0], non_blocking=True)
        self.length = n

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        to = self.storage.to_compute
        return to(self.k[layer, None, :, : self.length]), to(self.v[layer, None, :, : self.length])

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
