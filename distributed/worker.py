"""Worker entry run by torchrun (``python -m torch.distributed.run ... distributed/worker.py``).

torchrun runs this file as a script, outside any package, whatever folder the pack was
cloned to. It loads ``liveavatar/bootstrap.py`` by path (standard library only), which
registers the repository root as the package ``liveavatar_pack``, then hands over to
``liveavatar_pack.distributed.runtime``, where all imports are relative.
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_pack():
    spec = importlib.util.spec_from_file_location("_liveavatar_bootstrap", ROOT / "liveavatar" / "bootstrap.py")
    bootstrap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bootstrap)
    return bootstrap.load_pack(ROOT)


def main() -> None:
    pack = load_pack()
    importlib.import_module(pack.__name__ + ".distributed.runtime").serve()


if __name__ == "__main__":
    main()
