"""LiveAvatar for ComfyUI: pack entry point.

ComfyUI imports this file as a package by path (any folder name). Importing it pulls in
nothing heavy: the nodes, and with them torch and the engine, load only when ComfyUI
asks for the extension through ``comfy_entrypoint``.
"""

__version__ = "0.1.0"
WEB_DIRECTORY = "./web"  # frontend extension: shows the VRAM Plan node's verdict on the node


async def comfy_entrypoint():
    """ComfyUI V3 entry: return the pack's ``ComfyExtension``."""
    from .nodes import LiveAvatarExtension

    return LiveAvatarExtension()
