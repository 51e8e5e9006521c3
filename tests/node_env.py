"""Fixture helpers for node tests: the ComfyUI test double on sys.path, only while a test module runs."""
from __future__ import annotations

import importlib
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

DOUBLE = str(Path(__file__).resolve().parent / "comfy_double")
_DOUBLE_MODULES = ("comfy_api", "comfy", "folder_paths")


def _is_ours(name: str) -> bool:
    return name in _DOUBLE_MODULES or name.startswith(tuple(m + "." for m in _DOUBLE_MODULES)) \
        or name == "liveavatar_pack.nodes" or name.startswith("liveavatar_pack.nodes.")


@contextmanager
def comfy_double(base: Path):
    """Import the pack's nodes against the double rooted at ``base``; undo everything afterwards."""
    clash = sorted(n for n in sys.modules if _is_ours(n))
    saved = {n: sys.modules.pop(n) for n in clash}
    sys.path.insert(0, DOUBLE)
    try:
        folder_paths = importlib.import_module("folder_paths")
        folder_paths.configure(base)
        yield SimpleNamespace(
            folder_paths=folder_paths,
            mm=importlib.import_module("comfy.model_management"),
            utils=importlib.import_module("comfy.utils"),
            nodes=importlib.import_module("liveavatar_pack.nodes"),
            base=base,
        )
    finally:
        sys.path.remove(DOUBLE)
        for name in [n for n in sys.modules if _is_ours(n)]:
            del sys.modules[name]
        sys.modules.update(saved)
        pack = sys.modules.get("liveavatar_pack")
        if pack is not None and "nodes" in vars(pack) and "liveavatar_pack.nodes" not in sys.modules:
            delattr(pack, "nodes")


def run(node_cls, **inputs):
    """Execute a node as ComfyUI does (classmethod ``execute`` with keyword inputs)."""
    return node_cls.execute(**inputs)
