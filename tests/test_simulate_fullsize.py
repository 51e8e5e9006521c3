"""bench/simulate_fullsize.py cannot rot: its --smoke run checks the simulation and the planner.

The smoke runs the simulation's code (sparse checkpoints, load_dit, placement, sampler, VAE
decode, encoders, all on fake tensors on the simulated device) on a scaled-down model, in a
subprocess (the simulated device is a process-wide PyTorch backend registration). Checked:

* the bookkeeping: the fake run's device + host peak equals the same run on real CPU tensors
  (CPU as the device) tracked the same way - the simulation allocates what the real code does;
* the planner: every scaled-down placement's plan_memory peak (no runtime reserve at this size) at
  least 90% and at most 120% of the simulated device peak, so a drifting term or simulation fails here
  (the full-size run prints the README's rows: all within 10%);
* FLOPs of one steady-state DiT call as FlopCounterMode counts them equal block_step_flops, and
  the host->device bytes of that call match the planner's traffic term.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bench_modules import bench_module

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "simulate_fullsize.py"


def _module():
    return bench_module("simulate_fullsize")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("simulate") / "smoke.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_smoke_prints_one_line_per_row_with_its_ratio(smoke):
    stdout, result = smoke
    rows = result["rows"]
    assert len(rows) == len(_module().smoke_rows())
    lines = [line for line in stdout.splitlines() if "| sim device" in line]
    assert len(lines) == len(rows)
    for line, r in zip(lines, rows):
        m = re.search(r"ratio (\d+\.\d\d)$", line)
        assert m, line
        assert float(m.group(1)) == pytest.approx(r["ratio"], abs=0.006)


def test_fake_run_allocates_what_the_real_run_allocates(smoke):
    _, result = smoke
    check = result["real_check"]
    assert check["real_total"] > 0
    assert check["fake_total"] == pytest.approx(check["real_total"], rel=0.01), check


def test_planner_close_to_the_simulated_device_peak(smoke):
    """Never more than 10% under the simulation (an under-prediction is an OOM); at most 20% over: at this
    scale the estimated terms (activations, VAE working set, prefetched KV reads) weigh more than at
    full size, where every row of the README table is within 1.01-1.07 (python bench/simulate_fullsize.py)."""
    _, result = smoke
    for r in result["rows"]:
        assert "skipped" not in r, r
        assert 0.9 <= r["ratio"] <= 1.2, (r["row"], r["placement"], r["sim_device"], r["planner_device"])


def test_flops_and_copies_per_dit_call_match_the_planner(smoke):
    _, result = smoke
    for r in result["rows"]:
        assert r["call_flops"] == pytest.approx(r["planner_flops"], rel=0.01), r["placement"]
        if r["planner_traffic"] == 0:
            assert r["call_copy"] < 0.02 * r["sim_device"], r["placement"]  # only the block's inputs move
        else:
            assert r["call_copy"] == pytest.approx(r["planner_traffic"], rel=0.1), r["placement"]


def test_live_bytes_counts_storages_once_and_frees_them():
    lb = _module().LiveBytes("cpu")
    with lb:
        a = torch.empty(1000)  # 4000 bytes
        view = a[10:].view(-1, 10)  # same storage
        b = a * 2  # 4000 more
        assert lb.live["device"] == 8000
        del b
        c = view.clone()  # 3960
    assert lb.live["device"] == 4000 + 3960
    assert lb.peak["device"] == 8000
    del a, view, c
    assert lb.live["device"] == 0
