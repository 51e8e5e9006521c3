"""Weights sharded per module with FSDP2, for the sequence-parallel layouts (``ulysses``).

* ``shard_model`` shards the weights with FSDP2 ``fully_shard`` (reshard_after_forward):
  every DiT block, the audio injectors and the other large modules become one FSDP unit
  each; a unit's parameters are all-gathered just before its forward and freed right
  after. With ``prefetch`` each block's forward first issues the all-gather of the next
  block (FSDP2 explicit forward prefetch), so that transfer overlaps the block's compute.
  ``CrossAttention.context_kv`` (the text and audio keys/values) reads weights outside a
  forward; those layers get a ``WeightsGuard`` processor that gathers their unit first.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..liveavatar.attention import WeightsGuard


# Modules sharded as FSDP units (besides every DiT block and every audio injector).
SHARDED_CHILDREN = ("text_embedding", "time_embedding", "time_projection", "head", "casual_audio_encoder", "frame_packer")


def _guard(layer, unit, reshard: bool) -> None:
    """``layer.context_kv`` runs with ``unit``'s parameters gathered (it reads them outside a forward)."""
    layer.set_processor(WeightsGuard(layer.processor, unit.unshard, unit.reshard if reshard else lambda: None))


def _prefetch(unit) -> None:
    """Start ``unit``'s all-gather without waiting; its own pre-forward waits for it (FSDP2 keeps the
    pending result). Explicit ``set_modules_to_forward_prefetch`` needs one FSDP root over the whole
    model, which our per-unit roots (the engine calls methods, not ``forward``) do not have."""
    unit.unshard(async_op=True)


def shard_model(model: nn.Module, mesh, prefetch: bool = True) -> list[nn.Module]:
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
    if prefetch:  # block k's forward first issues block k+1's all-gather: it arrives while k computes
        for block, nxt in zip(model.blocks[:-1], model.blocks[1:]):
            block.register_forward_pre_hook(lambda _m, _a, nxt=nxt: _prefetch(nxt))
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
