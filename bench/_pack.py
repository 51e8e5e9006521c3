"""Load the pack under its fixed name for benchmark scripts run as ``python bench/<script>.py``."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load():
    spec = importlib.util.spec_from_file_location("_liveavatar_bootstrap", ROOT / "liveavatar" / "bootstrap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load_pack(ROOT)
