"""The LiveAvatar engine: torch-only model, sampler, conditioning and output.

Kept import-free so that ``python -m liveavatar`` and ComfyUI's import of the pack
stay cheap; import the submodules you need.
"""
