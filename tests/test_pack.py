"""The pack imports under any folder name, cheaply, and ``python -m liveavatar`` runs."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_import_by_path_under_a_hyphenated_folder_is_light(tmp_path):
    custom_nodes = tmp_path / "custom_nodes"
    custom_nodes.mkdir()
    os.symlink(ROOT, custom_nodes / "ComfyUI-LiveAvatar")
    # a foreign top-level module named like one of our folders must not be picked up
    (tmp_path / "nodes.py").write_text("raise ImportError('wrong nodes module imported')\n")
    result = _run(
        f"""
        import importlib.util, sys
        sys.path.insert(0, {str(tmp_path)!r})
        path = {str(custom_nodes / "ComfyUI-LiveAvatar" / "__init__.py")!r}
        spec = importlib.util.spec_from_file_location("ComfyUI-LiveAvatar", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["ComfyUI-LiveAvatar"] = module
        spec.loader.exec_module(module)
        assert callable(module.comfy_entrypoint)
        heavy = [m for m in ("torch", "diffusers", "transformers") if m in sys.modules]
        assert not heavy, heavy
        cli = importlib.import_module("ComfyUI-LiveAvatar.liveavatar.config")
        print("ok", cli.SamplerConfig().fps)
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "ok 25" in result.stdout


def test_python_m_liveavatar_runs_from_the_root():
    result = subprocess.run([sys.executable, "-m", "liveavatar", "info"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "preset 14B" in result.stdout


def test_bootstrap_is_idempotent():
    from conftest import PACK, _bootstrap

    assert _bootstrap.load_pack(ROOT) is PACK
    assert PACK.__name__ == _bootstrap.PACK_NAME
