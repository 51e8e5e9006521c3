"""What the nodes need from ComfyUI, in one place: model files, devices, model management,
progress and interrupt.

Model management (how our models live beside ComfyUI's): every module we load is wrapped in
ComfyUI's own ``comfy.model_patcher.ModelPatcher`` (as core's audio encoder and CLIP vision do)
and ``load_models_gpu([patcher], force_full_load=True)`` is called right before each use. That
puts it in ComfyUI's list of loaded models, so other nodes that need VRAM can evict it (ComfyUI
moves it to the offload device) and ComfyUI's "free model memory" button unloads it; our next
use loads it back. Full loads only: our modules are not built from ``comfy.ops``, so ComfyUI's
partial (lowvram) loading cannot stream their weights. The one exception is a DiT with a
placement (block swap, host KV caches, offload between uses): its weights are moved by our
placement code, which a ModelPatcher would fight, so it is not registered; instead we ask
ComfyUI to free the VRAM the run needs (``free_memory``) before sampling, and everything a run
allocates (KV caches, activations) is released when it ends or is interrupted.
"""
from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

import comfy.model_management as mm
import comfy.utils
import folder_paths

NONE = "none"


def short_error_names() -> list[type]:
    """Errors our nodes raise print as ``liveavatar.<Name>`` in ComfyUI, not with the pack's folder path.

    ComfyUI reports an exception's type as ``module + '.' + qualname``; the pack is imported under
    its folder path, so the type read e.g. ``/x/custom_nodes/ComfyUI-LiveAvatar.model_loaders.formats.ModelFileError``.
    """
    from ..distributed.launcher import GPUsNotFound, WorkerError
    from ..liveavatar.lora import LoraError
    from ..liveavatar.sampler import Cancelled
    from ..liveavatar.video import VideoOutputError
    from ..model_loaders.formats import ModelFileError

    classes = [ModelFileError, LoraError, VideoOutputError, WorkerError, GPUsNotFound, Cancelled]
    for cls in classes:
        cls.__module__ = "liveavatar"
    return classes


short_error_names()


def model_files(kind: str) -> list[str]:
    """File names ComfyUI knows in folder ``kind`` (diffusion_models, loras, vae, ...)."""
    return list(folder_paths.get_filename_list(kind))


DIT_FOLDERS = ("diffusion_models", "unet")  # ComfyUI-GGUF users keep their .gguf DiTs in either
_GGUF = ".gguf"


def _folder_paths(kind: str) -> list[str]:
    try:
        return list(folder_paths.get_folder_paths(kind))
    except (KeyError, AttributeError):
        return []


def dit_files() -> list[str]:
    """DiT files: what ComfyUI lists in diffusion_models, plus ``.gguf`` files there and in ``unet``.

    ComfyUI lists only its own weight extensions; GGUF files are found here by walking the
    folders (ComfyUI's table of extensions stays untouched, whatever other packs do with it).
    """
    names = set(model_files("diffusion_models"))
    for kind in DIT_FOLDERS:
        for root in _folder_paths(kind):
            if os.path.isdir(root):
                for dirpath, _dirs, files in os.walk(root, followlinks=True):
                    names.update(os.path.relpath(os.path.join(dirpath, f), root) for f in files if f.lower().endswith(_GGUF))
    return sorted(names)


def dit_path(name: str) -> Path:
    """Full path of a DiT listed by :func:`dit_files` (diffusion_models first, then unet)."""
    for kind in DIT_FOLDERS:
        for root in _folder_paths(kind):
            path = os.path.join(root, name)
            if os.path.isfile(path) and Path(path).resolve().is_relative_to(Path(root).resolve()):
                return Path(path)
    return model_path("diffusion_models", name)


def model_path(kind: str, name: str) -> Path:
    """Full path of ``name`` in folder ``kind``; a clear error naming the folder when absent."""
    path = folder_paths.get_full_path(kind, name)
    if path is None or not os.path.exists(path):
        folders = ", ".join(folder_paths.get_folder_paths(kind))
        raise ValueError(f"model file {name!r} is not in ComfyUI's {kind} folder(s) ({folders}); "
                         f"put it there and press R to refresh")
    return Path(path)


def model_dirs(kind: str, marker_files: tuple[str, ...]) -> list[str]:
    """Sub-folders (one level) of folder ``kind`` that hold one of ``marker_files`` (e.g. a tokenizer)."""
    found = []
    for root in folder_paths.get_folder_paths(kind):
        base = Path(root)
        if not base.is_dir():
            continue
        for sub in sorted(p for p in base.iterdir() if p.is_dir()):
            if any((sub / m).is_file() for m in marker_files):
                found.append(sub.name)
    return sorted(set(found))


def model_dir(kind: str, name: str) -> Path:
    for root in folder_paths.get_folder_paths(kind):
        path = Path(root) / name
        if path.is_dir():
            return path
    raise ValueError(f"folder {name!r} is not in ComfyUI's {kind} folder(s)")


def device() -> torch.device:
    """The device ComfyUI computes on (the CPU under ``--cpu``)."""
    return mm.get_torch_device()


def offload_device() -> torch.device:
    return mm.unet_offload_device()


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception when the user pressed Cancel (called between DiT calls)."""
    mm.throw_exception_if_processing_interrupted()


def release_memory() -> None:
    """Give back what a finished or interrupted run allocated (caches, activations)."""
    gc.collect()
    mm.soft_empty_cache()


def free_vram(nbytes: int) -> None:
    """Ask ComfyUI to evict other models until ``nbytes`` are free on the compute device."""
    dev = device()
    if dev.type != "cpu":
        mm.free_memory(nbytes, dev)


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes the module's tensors occupy: every parameter and buffer (persistent or not), each tensor once."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.nelement() * t.element_size() for t in tensors.values())


class Managed:
    """A module registered with ComfyUI's model management (see the module docstring)."""

    def __init__(self, module: torch.nn.Module, name: str):
        import comfy.model_patcher

        self.module, self.name = module, name
        # ModelPatcher writes ``.device`` (and bookkeeping attributes) on what it manages; our modules
        # have a read-only ``device`` property, so it manages a plain container holding the module,
        # of a class named after it (ComfyUI logs "Requested to load <class name>").
        holder = type(f"LiveAvatar{type(module).__name__}", (torch.nn.Module,), {})()
        holder.inner = module
        # The real size, so ComfyUI's free_memory / eviction decisions count what the module holds (its own
        # estimate walks state_dict(), which misses non-persistent buffers and counts tied tensors twice).
        # Note: the "loaded completely 9.5367e+25 ..." log line's first number is ComfyUI's budget for a full
        # load (1e32 bytes = no limit), printed so for every model on the CPU; the second one is this size in MB.
        self.size = module_bytes(module)
        self.patcher = comfy.model_patcher.ModelPatcher(holder, load_device=device(), offload_device=offload_device(),
                                                        size=self.size)

    def load(self) -> torch.nn.Module:
        """Load onto the compute device (evicting others if needed) and return the module."""
        mm.load_models_gpu([self.patcher], force_full_load=True)
        return self.module


def temp_dir() -> Path:
    return Path(folder_paths.get_temp_directory())


def output_dir() -> Path:
    return Path(folder_paths.get_output_directory())


def save_path(prefix: str, width: int, height: int) -> tuple[Path, str, str]:
    """(full path of a new ``.mp4``, file name, sub-folder) in ComfyUI's output folder, numbered like core."""
    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, str(output_dir()), width, height)
    name = f"{filename}_{counter:05}_.mp4"
    return Path(folder) / name, name, subfolder


class Progress:
    """ComfyUI's ProgressBar, one step per block, with the block's last frame as preview."""

    def __init__(self, total: int, preview_size: int = 512):
        self.bar = comfy.utils.ProgressBar(total)
        self.total, self.preview_size = total, preview_size

    def __call__(self, done: int, frame: torch.Tensor | None = None) -> None:
        preview = None
        if frame is not None:
            from PIL import Image

            preview = ("JPEG", Image.fromarray(frame.cpu().numpy()), self.preview_size)
        self.bar.update_absolute(done, self.total, preview)


@contextmanager
def run_guard() -> Iterator[None]:
    """Release memory however a run ends (success, error, interrupt)."""
    try:
        yield
    finally:
        release_memory()


CancelHook = Callable[[], None]
