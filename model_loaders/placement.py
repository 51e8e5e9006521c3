"""Where the DiT's weights and KV caches live while it runs: one config, one mechanism.

``PlacementConfig`` is the plain, JSON-able description shared by the CLI, the nodes and
the distributed workers. ``apply_placement(model, cfg)`` implements it on a built (and
already merged/quantized) ``LiveAvatarTransformer`` and returns a :class:`PlacedModel`:

* all on device (the default);
* whole-model offload between uses: weights live in (pinned) host memory and
  ``with placed.in_use():`` brings them to the device for the duration of a job;
* block swap (``blocks_on_device = N``): the first N-1 DiT blocks stay resident, the
  others live in (pinned) host memory and pass through one device slot. A forward-pre-hook
  brings block k onto the device and issues the copy of the next swapped block on a side
  CUDA stream (an event orders it before that block's compute); a forward hook releases
  block k. Resident blocks never exceed N, plus one block in flight when prefetching.
  On a CPU "device" the copies are no-ops but the same hooks and bookkeeping run;
* KV caches (``cache_storage()``): on the device or in pinned host memory (then each
  layer's history is copied in while the previous layer computes), in the model dtype or
  in float8_e4m3fn with a float32 scale per (layer, head, token), computed in the model dtype.

Placement never changes results: weights are moved, never converted, and a cache in the
model dtype reads back exactly what was written (tests/test_placement.py checks bitwise
equality). fp8 caches are a precision choice, measured there.

Apply placement last: after LoRA merge and quantization (the host copies are snapshots).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn

from ..liveavatar.attention import WeightsGuard
from ..liveavatar.kv_cache import CacheStorage

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float8_e4m3fn": torch.float8_e4m3fn,
}
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp8": "float8_e4m3fn", "fp8_e4m3fn": "float8_e4m3fn"}


def parse_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """None, a torch dtype, or a name (``bf16``, ``float8_e4m3fn``, ``torch.float16``...) -> dtype."""
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    name = _ALIASES.get(name, name)
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {value!r}; expected one of {sorted(_DTYPES) + sorted(_ALIASES)}")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


@dataclass
class PlacementConfig:
    """How the DiT is placed; ``to_dict``/``from_dict`` round-trip through JSON."""

    device: str = "cuda"
    offload_model_between_uses: bool = False
    blocks_on_device: int | None = None  # None: all blocks; N: block swap, at most N resident
    pin_memory: bool = True  # page-locked host copies (ignored where no CUDA)
    kv_cache_device: str = "device"  # "device" | "cpu"
    kv_cache_dtype: torch.dtype | None = None  # None: the model's dtype; float8_e4m3fn: fp8 + scales
    prefetch: bool = True  # overlap the next block's / layer's copy with the current compute

    def __post_init__(self) -> None:
        self.kv_cache_dtype = parse_dtype(self.kv_cache_dtype)
        self.validate()

    def validate(self) -> None:
        if self.blocks_on_device is not None and self.blocks_on_device < 1:
            raise ValueError(f"blocks_on_device must be >= 1 or None (all), got {self.blocks_on_device}")
        if self.kv_cache_device not in ("device", "cpu"):
            raise ValueError(f"kv_cache_device must be 'device' or 'cpu', got {self.kv_cache_device!r}")

    @property
    def kv_fp8(self) -> bool:
        return self.kv_cache_dtype is not None and self.kv_cache_dtype.itemsize == 1

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["kv_cache_dtype"] = dtype_name(self.kv_cache_dtype)
        d["device"] = str(self.device)
        return d

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "PlacementConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"unknown placement keys {unknown}; expected some of {sorted(names)}")
        return cls(**raw)

    def describe(self) -> str:
        parts = [f"device {self.device}"]
        parts.append("all blocks resident" if self.blocks_on_device is None else f"block swap, {self.blocks_on_device} resident")
        if self.offload_model_between_uses:
            parts.append("model offloaded between uses")
        kv = dtype_name(self.kv_cache_dtype) or "model dtype"
        parts.append(f"KV caches on {'host' if self.kv_cache_device == 'cpu' else 'device'} in {kv}")
        if not self.prefetch:
            parts.append("no prefetch")
        return ", ".join(parts)


# ---------------------------------------------------------------------------- copies
@dataclass
class _Ticket:
    tensors: list[torch.Tensor]
    event: Any = None


class _Copier:
    """Host -> device copies: on a side CUDA stream with an event, elsewhere synchronous.

    ``force_copy`` makes a real copy even when source and target coincide (CPU tests).
    """

    def __init__(self, device: torch.device, force_copy: bool = False):
        self.device = device
        self.force_copy = force_copy
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def issue(self, tensors: list[torch.Tensor]) -> _Ticket:
        if self.stream is None:
            return _Ticket([t.to(self.device, copy=self.force_copy) for t in tensors])
        # everything queued so far (e.g. cache writes into the same host memory) comes first
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            out = [t.to(self.device, non_blocking=True, copy=self.force_copy) for t in tensors]
            event = torch.cuda.Event()
            event.record(self.stream)
        return _Ticket(out, event)

    def wait(self, ticket: _Ticket) -> list[torch.Tensor]:
        if ticket.event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ticket.event)
            for t in ticket.tensors:
                t.record_stream(current)  # allocated on the side stream, used and freed on this one
        return ticket.tensors


def _pinned(t: torch.Tensor, pin: bool) -> torch.Tensor:
    t = t.detach().to("cpu")
    return t.pin_memory() if pin and not t.is_pinned() else t


class _Slots:
    """The parameters and buffers of a module as (owner, name, is_param) triples."""

    def __init__(self, module: nn.Module, exclude: set[int] = frozenset()):
        self.slots = []
        for owner in module.modules():
            if id(owner) in exclude:
                continue
            self.slots += [(owner, name, True) for name, p in owner._parameters.items() if p is not None]
            self.slots += [(owner, name, False) for name, b in owner._buffers.items() if b is not None]

    def get(self) -> list[torch.Tensor]:
        return [getattr(o, n).data if p else getattr(o, n) for o, n, p in self.slots]

    def set(self, tensors: list[torch.Tensor]) -> None:
        for (owner, name, is_param), t in zip(self.slots, tensors):
            if is_param:
                owner._parameters[name].data = t
            else:
                owner._buffers[name] = t

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.get())


# ---------------------------------------------------------------------------- block swap
class BlockSwapper:
    """Keeps at most ``resident`` of ``blocks`` on the device; the rest pass through one slot.

    Blocks [0, resident - 1) stay on the device; every later block lives in host memory and is
    brought in by ``acquire`` (a forward-pre-hook) and dropped by ``release`` (a forward hook).
    With ``prefetch``, acquiring block k issues the copy of the next swapped block (cyclically)
    so it overlaps block k's compute; one block at most is in flight.
    """

    def __init__(
        self,
        blocks: nn.ModuleList,
        device: torch.device,
        resident: int,
        prefetch: bool,
        pin: bool,
        guard: bool = False,
        log: list | None = None,
    ):
        n = len(blocks)
        if not 1 <= resident < n:
            raise ValueError(f"block swap needs 1 <= resident < {n} blocks, got {resident}")
        self.blocks, self.device, self.limit, self.prefetch = blocks, device, resident, prefetch
        self.guard, self.log = guard, log
        self.permanent = list(range(resident - 1))
        self.swapped = list(range(resident - 1, n))
        self.copier = _Copier(device)
        self.slots = {k: _Slots(blocks[k]) for k in self.swapped}
        self.host: dict[int, list[torch.Tensor]] = {}
        for k in self.swapped:
            self.host[k] = [_pinned(t, pin) for t in self.slots[k].get()]
            self._drop(k)
        for k in self.permanent:
            blocks[k].to(device)
        self.inflight: dict[int, _Ticket] = {}
        self.refs: dict[int, int] = {}  # swapped blocks on the device, with their users
        self.max_resident = len(self.permanent)
        self.max_on_device = len(self.permanent)
        self.transfers = 0
        self.handles = []
        for k, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(lambda m, a, k=k: self._pre(k)))
            self.handles.append(block.register_forward_hook(lambda m, a, o, k=k: self.release(k)))
        self.guarded: dict[int, object] = {}  # swapped block -> its cross-attention's previous processor
        for k in self.slots:
            layer = getattr(blocks[k], "cross_attn", None)
            if layer is not None:  # embed_text reads each block's text k/v projections outside its forward
                guard = WeightsGuard(layer.processor, lambda k=k: self.acquire(k), lambda k=k: self.release(k))
                self.guarded[k] = layer.set_processor(guard)

    def _record(self, what: str, k: int) -> None:
        if self.log is not None:
            self.log.append((what, k))

    def _drop(self, k: int) -> None:
        """Point block k at its host copy (or at NaN placeholders, in guard mode: any use shows).

        Integer tensors (GGUF blocks, uint8) get all bits set: their fp16 block scales read as NaN.
        """
        if self.guard:
            self.slots[k].set([torch.full_like(t, float("nan") if t.is_floating_point() else torch.iinfo(t.dtype).max)
                               for t in self.host[k]])
        else:
            self.slots[k].set(self.host[k])

    def _issue(self, k: int) -> None:
        self.inflight[k] = self.copier.issue(self.host[k])
        self.transfers += 1
        self._record("transfer", k)
        self._account()

    def _account(self) -> None:
        resident = len(self.permanent) + len(self.refs)
        self.max_resident = max(self.max_resident, resident)
        self.max_on_device = max(self.max_on_device, resident + len(self.inflight))
        if resident > self.limit or len(self.inflight) > 1:
            raise RuntimeError(f"block swap overflow: {resident} resident, {len(self.inflight)} in flight")

    def next_swapped(self, k: int) -> int:
        later = [j for j in self.swapped if j > k]
        return later[0] if later else self.swapped[0]

    def _pre(self, k: int) -> None:
        self.acquire(k)
        self._record("compute", k)

    def acquire(self, k: int) -> None:
        if k in self.slots:
            if k in self.refs:
                self.refs[k] += 1
            else:
                for other in list(self.inflight):
                    if other != k:  # out-of-order use: drop the stale prefetch
                        del self.inflight[other]
                        self._record("drop", other)
                ticket = self.inflight.pop(k, None)
                if ticket is None:
                    self._issue(k)
                    ticket = self.inflight.pop(k)
                self.slots[k].set(self.copier.wait(ticket))
                self.refs[k] = 1
                self._record("acquire", k)
                self._account()
        if self.prefetch:
            nxt = self.next_swapped(k)
            if nxt not in self.refs and nxt not in self.inflight:
                self._issue(nxt)

    def release(self, k: int) -> None:
        if k not in self.refs:
            return
        self.refs[k] -= 1
        if self.refs[k] == 0:
            del self.refs[k]
            self._drop(k)
            self._record("release", k)

    def drop_inflight(self) -> None:
        for k in self.inflight:
            self._record("drop", k)
        self.inflight.clear()

    def resident_blocks(self) -> list[int]:
        return sorted(self.permanent + list(self.refs))

    def remove(self) -> None:
        """Remove the hooks and put every block back, holding its host copy."""
        for h in self.handles:
            h.remove()
        for k, previous in self.guarded.items():
            self.blocks[k].cross_attn.set_processor(previous)
        self.guarded.clear()
        for k in self.swapped:
            self.slots[k].set(self.host[k])
        self.inflight.clear()
        self.refs.clear()


# ---------------------------------------------------------------------------- KV prefetch
@dataclass
class _PendingLayer:
    layer: int
    active: int
    ticket: _Ticket
    writes: list


class LayerPrefetcher:
    """Reader of a host-resident cache: while layer l computes, layer l+1's history is copied in.

    Tokens written to layer l+1 after its copy was issued (the current block's own keys) are
    patched into the copy from the written tensors, rounded exactly as the store rounds them,
    so a prefetched read equals a direct read bit for bit.
    """

    def __init__(self, cache, copier: _Copier, log: list | None = None):
        self.cache, self.copier, self.log = cache, copier, log
        self.storage: CacheStorage = cache.storage
        self.num_layers = cache.k.shape[0]
        self.pending: _PendingLayer | None = None

    def wrote(self, layer: int, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.pending is not None and self.pending.layer == layer:
            self.pending.writes.append((slot, k, v))

    def _issue(self, layer: int, active: int) -> _PendingLayer:
        kv, ks = self.cache.k_store.raw(layer, active)
        vv, vs = self.cache.v_store.raw(layer, active)
        tensors = [kv, vv] + ([ks, vs] if ks is not None else [])
        if self.log is not None:
            self.log.append(("kv_transfer", layer))
        return _PendingLayer(layer, active, self.copier.issue(tensors), [])

    def _rounded(self, t: torch.Tensor) -> torch.Tensor:
        values, scale = self.storage.encode(t)
        return self.storage.decode(values.to(self.storage.dtype), scale)

    def read(self, layer: int, active: int) -> tuple[torch.Tensor, torch.Tensor]:
        p, self.pending = self.pending, None
        if p is None or p.layer != layer or p.active != active:
            p = self._issue(layer, active)
        got = self.copier.wait(p.ticket)
        scales = got[2:] if len(got) > 2 else (None, None)
        k = self.storage.decode(got[0], scales[0])
        v = self.storage.decode(got[1], scales[1])
        for slot, nk, nv in p.writes:
            n = nk.shape[2]
            k[:, :, slot : slot + n] = self._rounded(nk)
            v[:, :, slot : slot + n] = self._rounded(nv)
        if layer + 1 < self.num_layers:
            self.pending = self._issue(layer + 1, active)
        if self.log is not None:
            self.log.append(("kv_read", layer))
        return k, v


class _PrefetchHook:
    """``CacheStorage.read_hook``: one LayerPrefetcher per cache."""

    def __init__(self, device: torch.device, log: list | None):
        self.device, self.log = device, log

    def __call__(self, cache) -> LayerPrefetcher:
        return LayerPrefetcher(cache, _Copier(self.device, force_copy=True), self.log)


# ---------------------------------------------------------------------------- placed model
class PlacedModel:
    """A model with its placement applied: ``in_use()``, ``cache_storage()``, bookkeeping."""

    def __init__(self, model: nn.Module, cfg: PlacementConfig, guard: bool = False, log: list | None = None):
        self.model, self.config, self.log = model, cfg, log
        self.device = torch.device(cfg.device)
        self.compute_dtype = model.dtype
        self.pin = bool(cfg.pin_memory and self.device.type == "cuda" and torch.cuda.is_available())
        blocks = model.blocks
        n = len(blocks)
        swap = cfg.blocks_on_device is not None and cfg.blocks_on_device < n
        self.swapper = (
            BlockSwapper(blocks, self.device, cfg.blocks_on_device, cfg.prefetch, self.pin, guard=guard, log=log)
            if swap
            else None
        )
        # "base": every parameter outside the swapped blocks
        swapped = self.swapper.swapped if swap else []
        self.base = _Slots(model, exclude={id(m) for k in swapped for m in blocks[k].modules()})
        self.depth = 0
        if cfg.offload_model_between_uses:
            self.base_host = [_pinned(t, self.pin) for t in self.base.get()]
            self.base.set(self.base_host)
        else:
            self.base_host = None
            self.base.set([t.to(self.device) for t in self.base.get()])

    @property
    def blocks_resident(self) -> list[int]:
        if self.swapper is None:
            return list(range(len(self.model.blocks)))
        return self.swapper.resident_blocks()

    @property
    def loaded(self) -> bool:
        """Whether the non-swapped weights are on the device now (always, unless offloading)."""
        return self.base_host is None or self.depth > 0

    @contextlib.contextmanager
    def in_use(self) -> Iterator[nn.Module]:
        """The model ready on the device for a job (moved there and back when offloading)."""
        if self.base_host is not None and self.depth == 0:
            self.base.set([t.to(self.device, non_blocking=True) for t in self.base_host])
        self.depth += 1
        try:
            yield self.model
        finally:
            self.depth -= 1
            if self.base_host is not None and self.depth == 0:
                if self.device.type == "cuda":
                    torch.cuda.current_stream(self.device).synchronize()
                self.base.set(self.base_host)
                if self.swapper is not None:
                    self.swapper.drop_inflight()

    def cache_storage(self, heads: tuple[int, int] | None = None) -> CacheStorage:
        """The CacheStorage of this placement for KV and sink caches (optionally a head range)."""
        cfg = self.config
        dtype = cfg.kv_cache_dtype or self.compute_dtype
        host = cfg.kv_cache_device == "cpu"
        return CacheStorage(
            device=torch.device("cpu") if host else self.device,
            dtype=dtype,
            compute_device=self.device,
            compute_dtype=self.compute_dtype,
            heads=heads,
            scaled=dtype.itemsize == 1,
            pin_memory=host and self.pin,
            read_hook=_PrefetchHook(self.device, self.log) if host and cfg.prefetch else None,
        )

    def remove(self) -> nn.Module:
        """Undo the hooks; weights stay where they are (swapped blocks on the host)."""
        if self.swapper is not None:
            self.swapper.remove()
        if self.base_host is not None:
            self.base.set(self.base_host)
        return self.model


def apply_placement(model: nn.Module, cfg: PlacementConfig | dict, *, guard: bool = False, log: list | None = None) -> PlacedModel:
    """Place ``model`` (a LiveAvatarTransformer, or anything with ``blocks`` and ``dtype``) per ``cfg``.

    ``guard`` (tests): blocks not on the device hold NaN placeholders, so any use of a block
    outside its acquire/release window poisons the output. ``log`` receives
    ("transfer"|"acquire"|"compute"|"release"|"drop", k)
    and ("kv_transfer"|"kv_read", layer) events in issue order.
    """
    if isinstance(cfg, dict):
        cfg = PlacementConfig.from_dict(cfg)
    return PlacedModel(model, cfg, guard=guard, log=log)


__all__ = ["PlacementConfig", "PlacedModel", "apply_placement", "BlockSwapper", "LayerPrefetcher", "parse_dtype", "dtype_name"]
