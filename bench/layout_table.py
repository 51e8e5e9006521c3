"""The README's multi-GPU layout table (14B, 704*384, 4 steps), regenerated from the planner: nothing
here is measured.

Each block of rows is one ``choose_layout`` call (what ``python -m liveavatar plan --gpus G`` ranks):
the recommended layout and the next runners-up, with per-device memory and predicted fps. Every
row states its throughput per GPU and its GPU-to-GPU link; host RAM is not limited, so the table
does not depend on the machine it runs on.

Usage: python bench/layout_table.py > table.md
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import _pack

_pack.load()
from liveavatar_pack.liveavatar.config import WAN_S2V_14B, SamplerConfig  # noqa: E402
from liveavatar_pack.model_loaders.planner import SpeedModel, choose_layout, parse_gpus, parse_size  # noqa: E402
from liveavatar_pack.model_loaders.planner import _placement_text  # noqa: E402


@dataclass(frozen=True)
class Machine:
    gpus: str
    precision: str
    tflops: float  # sustained per GPU (40% of the card's dense bf16 peak)
    card: str  # what the throughput stands for


MACHINES = (
    Machine("4x24", "fp8", 400, "CLI default, H100-class"),
    Machine("4x24", "fp8", 66, "RTX 4090: 40% of 165"),
    Machine("5x24", "fp8", 66, "RTX 4090: 40% of 165"),
    Machine("8x24", "fp8", 66, "RTX 4090: 40% of 165"),
    Machine("2x48", "fp8", 72, "L40S / RTX 6000 Ada: 40% of ~180"),
    Machine("4x80", "bf16", 400, "H100 SXM: 40% of 989"),
)


def table(size: str = "704*384", top: int = 3) -> str:
    head = ("| GPUs | weights | TFLOP/s per GPU | link GB/s | # | layout | flags | placement per DiT rank "
            "| GiB per device | s per block | fps | bound |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    w, h = parse_size(size)
    for m in MACHINES:
        gpus = parse_gpus(m.gpus)
        choice = choose_layout(WAN_S2V_14B, m.precision, w, h, SamplerConfig(), gpus, speed=SpeedModel(tflops=m.tflops),
                               model_name="14B")
        link = choice.speed.gpu_link
        for i, o in enumerate(choice.ranked[:top]):
            t = o.plan.timing
            lines.append(f"| {m.gpus} | {m.precision} | {m.tflops:g} ({m.card}) | {link.gbps:g} ({link.kind}) | {i + 1} "
                         f"| {o.layout.name()} | `{o.layout.flags()}` | {_placement_text(o.placement)} | {o.memory()} "
                         f"| {t.block_s:.3f} | {t.fps:.1f} fps | {t.bound} |")
        if not choice.ranked:
            lines.append(f"| {m.gpus} | {m.precision} | {m.tflops:g} ({m.card}) | {link.gbps:g} ({link.kind}) | - "
                         f"| none fits | | | | | | |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="704*384")
    p.add_argument("--top", type=int, default=3, help="layouts per machine (the recommended one first)")
    args = p.parse_args()
    print(table(args.size, args.top))


if __name__ == "__main__":
    main()
