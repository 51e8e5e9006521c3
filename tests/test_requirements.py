"""The declared dependencies are exactly what the code imports, in both lists.

``requirements.txt`` (what ComfyUI Manager and the README's set-up install) and pyproject's
``[project] dependencies`` (what ``pip install .`` installs) must name the same packages; every
third-party module the pack, its tests or its benchmarks import must be declared (nothing
arrives "by accident" through another package's dependencies), and nothing is declared that
nothing imports.
"""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# import name -> distribution name, where they differ
DISTRIBUTION = {"PIL": "Pillow", "imageio_ffmpeg": "imageio-ffmpeg"}
# provided by ComfyUI itself when the pack runs there; imported only inside nodes/ and its tests
COMFYUI_MODULES = {"comfy", "comfy_api", "folder_paths", "server", "nodes", "comfy_extras"}
DEV_ONLY = {"pytest"}  # requirements-dev.txt
# docs/ tools run with ComfyUI's own Python (docs/thumbnails.py drives a ComfyUI server): ComfyUI's deps
COMFYUI_PYTHON_TOOLS = {"docs": {"aiohttp"}}


def _names(lines) -> set[str]:
    out = set()
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            out.add(re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0].lower())
    return out


def _requirements(name: str) -> set[str]:
    return _names((ROOT / name).read_text().splitlines())


def _local_modules() -> set[str]:
    """Top-level names that resolve inside the repository (the pack's folders, test/bench/docs helpers)."""
    names = {p.name for p in ROOT.iterdir() if p.is_dir()} | {"liveavatar_pack"}
    for folder in ("tests", "bench", "docs"):  # scripts there import their siblings
        names |= {p.stem for p in (ROOT / folder).glob("*.py")}
    return names


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level module -> files importing it, over every .py file of the repository."""
    local, std = _local_modules(), set(sys.stdlib_module_names)
    found: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        if ".git" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".", 1)[0]
                if top in COMFYUI_PYTHON_TOOLS.get(path.relative_to(ROOT).parts[0], ()):
                    continue
                if top not in std and top not in local and top not in COMFYUI_MODULES:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_requirements_and_pyproject_list_the_same_packages():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert _names(project["dependencies"]) == _requirements("requirements.txt")


def test_every_import_is_declared_and_every_declared_package_imported():
    declared = _requirements("requirements.txt")
    imports = _third_party_imports()
    used = {DISTRIBUTION.get(m, m).lower() for m in imports}
    undeclared = {m: sorted(files)[:3] for m, files in imports.items()
                  if DISTRIBUTION.get(m, m).lower() not in declared | DEV_ONLY}
    assert not undeclared, f"imported but not in requirements.txt: {undeclared}"
    assert not declared - used, f"declared in requirements.txt but imported nowhere: {sorted(declared - used)}"
    assert DEV_ONLY <= _requirements("requirements-dev.txt")
