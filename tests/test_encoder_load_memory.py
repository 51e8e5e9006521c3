"""Peak host RAM while loading each encoder stays <= 1.2x what the loaded module keeps.

Runs ``bench/bench_encoders.py``'s measurement (a fresh process per load, peak RSS above a baseline
taken after the libraries are imported) on a few-hundred-MB encoder of each kind, in the case
where the previous loaders held the whole file plus a converted copy (2-3x).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _bench():
    if "bench_encoders" not in sys.modules:
        sys.path.insert(0, str(BENCH))
        try:
            import bench_encoders  # noqa: F401
        finally:
            sys.path.remove(str(BENCH))
    return sys.modules["bench_encoders"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
@pytest.mark.parametrize("kind,label", [
    ("text", "text fp16 sft -> bf16 (CPU auto)"),
    ("text", "text Wan bf16 .pth -> bf16"),
    ("audio", "audio fp16 sft -> fp32 (CPU auto)"),
    ("vae", "VAE fp32 sft -> bf16 (GPU auto)"),
])
def test_load_peak_is_at_most_1_2x_resident(tmp_path, kind, label):
    bench = _bench()
    cases = {c[0]: c for c in bench.write_files(tmp_path, 1.0, kinds=(kind,))}
    _, kind, path, precision = cases[label]
    got = bench.measure(kind, path, precision)
    ratio = got["extra"] / got["size"]
    assert got["size"] > 80 * 2**20  # large enough for the allocator's noise not to matter
    assert ratio <= 1.2, f"{label}: peak {got['extra'] / 2**20:.0f} MiB above baseline for a {got['size'] / 2**20:.0f} MiB module"
