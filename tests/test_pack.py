"""The pack imports under any folder name, cheaply, and ``python -m liveavatar`` runs."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

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


def _pack_packages() -> list[str]:
    """Every folder of the repository that is a sub-package of the pack (has an __init__.py)."""
    return sorted(["liveavatar_pack"] + [f"liveavatar_pack.{p.parent.name}" for p in ROOT.glob("*/__init__.py")
                                         if p.parent.name not in ("tests", "bench")])


def test_pyproject_maps_the_root_to_the_pack_with_every_subpackage():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["build-system"]["build-backend"] == "setuptools.build_meta"
    setuptools = project["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"liveavatar_pack": "."}
    assert sorted(setuptools["packages"]) == _pack_packages()
    assert project["project"]["scripts"]["liveavatar"] == "liveavatar_pack.liveavatar.__main__:main"


@pytest.mark.slow
def test_pip_install_gives_a_liveavatar_command_that_runs_anywhere(tmp_path):
    """``pip install .`` into a fresh venv (offline: the system's setuptools, no deps) -> ``liveavatar`` works
    from an unrelated folder, importing the installed copy, not this checkout."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                              "--no-build-isolation", "--no-index", str(src)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([str(venv / "bin" / "liveavatar"), "info"], cwd=elsewhere, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "preset 14B" in result.stdout
    where = subprocess.run([str(python), "-c", "import liveavatar_pack.cli as c; print(c.__file__)"], cwd=elsewhere,
                           capture_output=True, text=True, timeout=300, env=env)
    assert where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr
    helptext = subprocess.run([str(venv / "bin" / "liveavatar"), "--help"], cwd=elsewhere, capture_output=True,
                              text=True, timeout=300, env=env)
    assert helptext.returncode == 0 and helptext.stdout.startswith("usage: liveavatar ")


def test_readme_names_every_subcommand():
    from liveavatar_pack.cli import commands

    readme = (ROOT / "README.md").read_text()
    missing = [c.name for c in commands.ALL if f"`{c.name}`" not in readme and f"liveavatar {c.name}" not in readme]
    assert not missing, f"README.md does not mention the subcommand(s) {missing}"
