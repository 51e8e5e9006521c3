"""Cost of the NaN/Inf check on every tensor read (``model_loaders.formats.count_nonfinite``).

Writes the same DiT files as ``bench_load.py`` (dim 1024, 6 layers by default), then loads each
case in this process with the check on and with it replaced by a no-op, alternating, and keeps
the fastest of ``--repeat`` loads of each (the check's cost is small against the noise of a shared
CPU, so the minimum, not one run, is compared), and the time spent inside the check itself
(fastest run), the figure the README quotes. Also times the check against the alternative
``torch.isfinite(t).all()`` and a plain copy on one 96 MiB tensor.
Usage: python bench/bench_finite_check.py [--dim 1024] [--layers 6] [--repeat 5]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

import _pack

_pack.load()
from bench_load import write_all  # noqa: E402
from liveavatar_pack.liveavatar.config import DiTConfig  # noqa: E402
from liveavatar_pack.model_loaders import formats  # noqa: E402
from liveavatar_pack.model_loaders.dit import load_dit  # noqa: E402


def _fastest(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def tensor_costs(repeat: int) -> None:
    print(f"{'one tensor, 96 MiB':28s} {'fp32 ms':>8s} {'bf16 ms':>8s} {'fp8 ms':>8s}")
    base = torch.randn(25_165_824)
    rows = {"count_nonfinite (this check)": formats.count_nonfinite,
            "isfinite(t).all()": lambda t: bool(torch.isfinite(t.float() if t.element_size() == 1 else t).all()),
            "isfinite(t.sum()) (torch)": lambda t: bool(torch.isfinite((t.float() if t.element_size() == 1 else t).sum())),
            "a copy (for scale)": lambda t: torch.empty_like(t).copy_(t)}
    tensors = [base, base.bfloat16(), base.to(torch.float8_e4m3fn)]
    for name, fn in rows.items():
        print(f"{name:28s}" + "".join(f" {1000 * _fastest(lambda t=t: fn(t), repeat):8.1f}" for t in tensors))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    cfg = DiTConfig(dim=args.dim, ffn_dim=2 * args.dim, num_heads=args.dim // 128, num_layers=args.layers, text_dim=256,
                    audio_dim=64, audio_inject_layers=tuple(range(0, args.layers, 3)))
    checked = formats.count_nonfinite
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_all(tmp, cfg)
        cfg_json = json.loads(json.dumps(dataclasses.asdict(cfg)))
        cases = [
            ("sharded dir fp32 -> fp32", paths["sharded"], "fp32"),
            ("single file bf16 -> bf16", paths["bf16"], "bf16"),
            ("sharded fp32 -> bf16", paths["sharded"], "bf16"),
            ("ComfyUI fp8_scaled -> fp8", paths["fp8_scaled"], "fp8"),
            (".pth fp32 -> fp32 (mmap)", paths["pth"], "fp32"),
        ]
        spent = [0.0]

        def timed(t):
            t0 = time.perf_counter()
            try:
                return checked(t)
            finally:
                spent[0] += time.perf_counter() - t0

        print(f"{'case':32s} {'checked s':>9s} {'unchecked s':>11s} {'in check s':>10s} {'check/unchecked':>15s}")
        for label, path, precision in cases:
            times = {True: float("inf"), False: float("inf")}
            in_check = float("inf")
            for _ in range(args.repeat):
                for on in (True, False):
                    formats.count_nonfinite = timed if on else (lambda t: 0)
                    spent[0] = 0.0
                    t0 = time.perf_counter()
                    model, _ = load_dit(path, precision=precision, config=cfg_json)
                    times[on] = min(times[on], time.perf_counter() - t0)
                    if on:
                        in_check = min(in_check, spent[0])
                    del model
            formats.count_nonfinite = checked
            print(f"{label:32s} {times[True]:9.3f} {times[False]:11.3f} {in_check:10.3f} {100 * in_check / times[False]:14.0f}%")
    tensor_costs(args.repeat)


if __name__ == "__main__":
    main()
