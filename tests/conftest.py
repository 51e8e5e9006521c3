"""Test set-up: load the pack under its fixed name and locate the golden data."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("_liveavatar_bootstrap", ROOT / "liveavatar" / "bootstrap.py")
_bootstrap = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bootstrap)
PACK = _bootstrap.load_pack(ROOT)

GOLDEN_DIR = Path(os.environ.get("LIVEAVATAR_GOLDEN_DIR", ROOT.parent / "shared" / "golden"))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """The golden directory; golden tests skip (saying why) only when it does not exist."""
    if not GOLDEN_DIR.is_dir():
        pytest.skip(f"golden directory {GOLDEN_DIR} does not exist (set LIVEAVATAR_GOLDEN_DIR)")
    return GOLDEN_DIR


def golden_subdir(golden_dir: Path, name: str) -> Path:
    """A sub-folder the tests expect; its absence is a failure, not a skip."""
    path = golden_dir / name
    assert path.is_dir(), f"golden directory {golden_dir} lacks the expected sub-folder {name}/"
    return path


_golden_skips: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and "golden" in report.keywords:
        _golden_skips.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if _golden_skips and GOLDEN_DIR.is_dir():
        print(f"\nFAIL: {len(_golden_skips)} golden test(s) skipped although {GOLDEN_DIR} exists:")
        for nodeid in _golden_skips:
            print(f"  {nodeid}")
        session.exitstatus = 1
