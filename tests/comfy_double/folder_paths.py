"""Double of ComfyUI's folder_paths over one base folder (``configure(base)``)."""
from __future__ import annotations

import os
from pathlib import Path

EXTENSIONS = {".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".sft"}
_base = Path(".")


def configure(base) -> None:
    global _base
    _base = Path(base)


def get_folder_paths(kind: str) -> list[str]:
    return [str(_base / "models" / kind)]


def get_filename_list(kind: str) -> list[str]:
    out = []
    for root in get_folder_paths(kind):
        if os.path.isdir(root):
            for dirpath, _, files in os.walk(root):
                for f in files:
                    if os.path.splitext(f)[1] in EXTENSIONS:
                        out.append(os.path.relpath(os.path.join(dirpath, f), root))
    return sorted(out)


def get_full_path(kind: str, name: str) -> str | None:
    for root in get_folder_paths(kind):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    return None


def get_output_directory() -> str:
    return str(_base / "output")


def get_temp_directory() -> str:
    return str(_base / "temp")


def get_input_directory() -> str:
    return str(_base / "input")


def get_save_image_path(prefix: str, output_dir: str, width=0, height=0):
    subfolder, filename = os.path.split(prefix)
    folder = os.path.join(output_dir, subfolder)
    os.makedirs(folder, exist_ok=True)
    counter = 1 + len([f for f in os.listdir(folder) if f.startswith(filename + "_")])
    return folder, filename, counter, subfolder, prefix
