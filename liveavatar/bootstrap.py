"""Load the repository root as a package under one fixed name.

ComfyUI imports this pack by path under whatever folder name it was cloned to, and
other packs put modules called ``nodes`` or ``utils`` on ``sys.path``. Entry points
that run outside ComfyUI (``python -m liveavatar``, torchrun workers, tests) call
:func:`load_pack` first, so every import inside the pack is relative to one package
whose name does not depend on the folder. Only the standard library is used here.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PACK_NAME = "liveavatar_pack"
PACK_ROOT = Path(__file__).resolve().parent.parent


def load_pack(root: Path | str = PACK_ROOT, name: str = PACK_NAME) -> ModuleType:
    """Import ``root/__init__.py`` as package ``name`` (once) and return it."""
    existing = sys.modules.get(name)
    if existing is not None:
        return existing
    root = Path(root).resolve()
    init = root / "__init__.py"
    if not init.is_file():
        raise ImportError(f"{root} is not the LiveAvatar pack: {init} is missing")
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
