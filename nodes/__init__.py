"""Thin ComfyUI V3 nodes over the engine (no math here).

One module per concern: ``loaders`` (model files), ``conditioning`` (audio, reference image,
text), ``sampling`` (the clip sampler -> streaming latent handle, see ``stream``), ``output``
(decode to IMAGE/AUDIO, save MP4 -> VIDEO), ``plan`` (VRAM planner), ``distributed`` (torchrun
worker pool in place of a local model; release its GPUs). ``runtime`` is the only
place that talks to ComfyUI's services (folders, devices, model management, progress, interrupt).
"""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io


def all_nodes() -> list[type[io.ComfyNode]]:
    """Every node class the pack registers."""
    from . import conditioning, distributed, loaders, output, plan, sampling

    return [*loaders.NODES, *conditioning.NODES, *sampling.NODES, *output.NODES, *plan.NODES, *distributed.NODES]


class LiveAvatarExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return all_nodes()
