"""Thin ComfyUI V3 nodes over the engine (no math here)."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io


def all_nodes() -> list[type[io.ComfyNode]]:
    """Every node class the pack registers."""
    return []


class LiveAvatarExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return all_nodes()
