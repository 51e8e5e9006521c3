"""Sequence/head parallelism pieces: heads split across ranks, weights sharded per module.

* ``HeadSplit`` is a self-attention processor (liveavatar/attention.py): each rank attends (and
  caches) only its contiguous range of heads; the attention output of all heads is re-assembled with one
  all-gather per layer. Everything outside self-attention is computed identically on
  every rank, so the ranks need no other exchange.
* ``shard_model`` shards the weights with FSDP2 ``fully_shard`` (reshard_after_forward):
  every DiT block, the audio injectors and the other large modules become one FSDP unit
  each; a unit's parameters are all-gathered just before its forward and freed right
  after. ``CrossAttention.context_kv`` (the text and audio keys/values) reads weights outside a
  forward; those layers get a ``WeightsGuard`` processor that gathers their unit first.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from ..liveavatar.attention import DEFAULT_PROCESSOR, ProcessorWrapper, WeightsGuard


def head_range(num_heads: int, rank: int, world: int) -> tuple[int, int]:
    if num_heads % world:
        raise ValueError(f"sp splits attention heads evenly: {num_heads} heads do not split over {world} ranks")
    per = num_heads // world
    return rank * per, (rank + 1) * per


class HeadSplit(ProcessorWrapper):
    """Self-attention processor: this rank's heads [start, stop) of q/k/v; all-gather of the outputs."""

    def __init__(self, num_heads: int, rank: int, world: int, group=None, inner=DEFAULT_PROCESSOR):
        super().__init__(inner)
        self.start, self.stop = head_range(num_heads, rank, world)
        self.world, self.group = world, group
        self.gathers = 0

    def scatter(self, t: torch.Tensor) -> torch.Tensor:
        return t[:, self.start : self.stop].contiguous()

    def gather(self, y: torch.Tensor) -> torch.Tensor:
        y = y.contiguous()
        parts = [torch.empty_like(y) for _ in range(self.world)]
        dist.all_gather(parts, y, group=self.group)
        self.gathers += 1
        return torch.cat(parts, dim=1)

    def self_attention(self, attn, x, attend):
        q, k, v = attn.qkv(x)
        return attn.out(self.gather(attend(self.scatter(q), self.scatter(k), self.scatter(v))))


# Modules sharded as FSDP units (besides every DiT block and every audio injector).
SHARDED_CHILDREN = ("text_embedding", "time_embedding", "time_projection", "head", "casual_audio_encoder", "frame_packer")


def _guard(layer, unit, reshard: bool) -> None:
    """``layer.context_kv`` runs with ``unit``'s parameters gathered (it reads them outside a forward)."""
    layer.set_processor(WeightsGuard(layer.processor, unit.unshard, unit.reshard if reshard else lambda: None))


def shard_model(model: nn.Module, mesh) -> list[nn.Module]:
    """Shard ``model``'s weights over ``mesh`` with FSDP2; returns the FSDP units."""
    from torch.distributed.fsdp import fully_shard

    units: list[nn.Module] = []
    for block in model.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
        _guard(block.cross_attn, block, reshard=True)  # embed_text reads the text k/v weights outside a forward
        units.append(block)
    for injector, adain in zip(model.audio_injector.injector, model.audio_injector.injector_adain_layers):
        fully_shard(injector, mesh=mesh, reshard_after_forward=True)
        _guard(injector, injector, reshard=False)  # right before the injector's forward, which reshards
        fully_shard(adain, mesh=mesh, reshard_after_forward=True)
        units += [injector, adain]
    for name in SHARDED_CHILDREN:
        child = getattr(model, name)
        fully_shard(child, mesh=mesh, reshard_after_forward=True)
        units.append(child)
    return units


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def parameter_bytes(model: nn.Module, units: list[nn.Module] | None = None) -> dict:
    """Parameter bytes this process holds right now.

    ``resident``: the parameters as registered (sharded units hold their local shard) plus
    any gathered copy of a unit that is still alive; ``sharded_local``/``sharded_full``: the
    sharded units' local and global sizes; ``unsharded_alive``: bytes of gathered copies
    not freed (0 between forwards when resharding works).
    """
    unit_params = {id(p) for u in (units or []) for p in u.parameters()}
    resident = sharded_local = sharded_full = 0
    seen = set()
    for p in model.parameters():
        local = _local(p)
        storage = local.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            resident += storage.nbytes()
        if id(p) in unit_params:
            sharded_local += local.numel() * local.element_size()
            sharded_full += p.numel() * p.element_size()
    alive = 0
    for u in units or []:
        state = getattr(u, "_get_fsdp_state", None)
        group = state()._fsdp_param_group if state is not None else None
        for fp in getattr(group, "fsdp_params", []) if group is not None else []:
            unsharded = getattr(fp, "_unsharded_param", None)
            if unsharded is not None:
                storage = unsharded.untyped_storage()
                alive += storage.nbytes()
                if storage.nbytes() and storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    resident += storage.nbytes()
    return {
        "resident": resident,
        "sharded_local": sharded_local,
        "sharded_full": sharded_full,
        "unsharded_alive": alive,
    }
