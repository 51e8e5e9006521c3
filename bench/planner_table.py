"""The README's VRAM planner table (14B), regenerated from the planner: nothing here is measured.

Each row is one ``choose_placement`` call (what ``python -m liveavatar plan`` prints), with the
planner's default speed assumptions unless given (``--bandwidth``, ``--tflops``). Host RAM is not
limited unless the row names a limit, so the table does not depend on the machine it runs on.

Usage: python bench/planner_table.py [--bandwidth 25] [--tflops 400] > table.md
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import _pack

_pack.load()
from liveavatar_pack.liveavatar.config import WAN_S2V_14B, SamplerConfig  # noqa: E402
from liveavatar_pack.model_loaders.placement import PlacementConfig  # noqa: E402
from liveavatar_pack.model_loaders.planner import GiB, SpeedModel, choose_placement, parse_gpus, parse_size, verdict  # noqa: E402


@dataclass(frozen=True)
class Row:
    gpus: str
    mode: str
    size: str
    precision: str
    host_ram: float | None = None  # GiB; None: not limited
    exact: bool = False  # fp8 KV caches forbidden
    steps: int = 4
    tflops: float | None = None  # None: the table's assumption


ROWS = (
    Row("1x24", "single", "704*384", "bf16"),
    Row("1x24", "single", "704*384", "fp8"),
    Row("1x24", "single", "704*384", "fp8", exact=True),
    Row("1x24", "single", "688*368", "fp8"),
    Row("1x24", "single", "704*384", "fp8", host_ram=64),
    Row("1x24", "single", "704*384", "fp8", host_ram=32),
    Row("1x24", "single", "704*384", "fp8", host_ram=32, steps=3),
    Row("1x24", "single", "704*384", "fp8", tflops=100),
    Row("1x48", "single", "704*384", "bf16"),
    Row("1x48", "single", "704*384", "bf16", host_ram=32),
    Row("1x48", "single", "704*384", "fp8"),
    Row("1x48", "single", "704*384", "fp8", exact=True),
    Row("1x80", "single", "704*384", "bf16"),
    Row("1x80", "single", "704*384", "bf16", host_ram=12),
    Row("1x80", "single", "704*384", "fp8"),
    Row("1x80", "single", "688*368", "bf16"),
    Row("4x24", "sp", "704*384", "bf16"),
    Row("4x24", "sp", "704*384", "fp8"),
    Row("4x24", "tpp", "704*384", "fp8"),
    Row("5x80", "tpp", "704*384", "bf16"),
    Row("5x80", "tpp", "704*384", "fp8"),
)


def placement_text(pc) -> str:
    if pc is None:
        return "none fits"
    blocks = "all blocks" if pc.blocks_on_device is None else f"block swap ({pc.blocks_on_device} resident)"
    kv = ("fp8 " if pc.kv_fp8 else "") + "KV on " + ("host" if pc.kv_cache_device == "cpu" else "GPU")
    return f"{blocks}, {kv}"


def limited_by(plan) -> str:
    """The categories of the plan's 'limited by' lines, or 'nothing'."""
    found = []
    for line in plan.choice:
        if line.startswith("limited by "):
            what = line[len("limited by "):].split(":", 1)[0]
            found.append("exact" if what.startswith("exact") else what)
    return ", ".join(dict.fromkeys(found)) or "nothing"


def plan_pc(plan) -> PlacementConfig:
    """The placement a plan was made for (a plan that fits nothing carries no chosen one)."""
    return PlacementConfig.from_dict(plan.settings["placement_dict"])


def table(speed: SpeedModel) -> str:
    head = ("| GPUs | mode | size | weights | TFLOP/s | host RAM limit | chosen placement | peak GiB / device | host RAM GiB "
            "| host->GPU GiB per DiT call | s per DiT call | fps (DiT) | limited by |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in ROWS:
        gpus = parse_gpus(r.gpus)
        w, h = parse_size(r.size)
        mode = "single" if len(gpus) == 1 else r.mode
        row_speed = speed if r.tflops is None else SpeedModel(speed.bandwidth_gbps, r.tflops)
        pc, plan = choose_placement(WAN_S2V_14B, r.precision, w, h, SamplerConfig(steps=r.steps), gpus, mode,
                                    allow_fp8_kv=not r.exact, host_ram_gib=r.host_ram, speed=row_speed, model_name="14B")
        v = verdict(plan, gpus, r.host_ram)
        limit = "-" if r.host_ram is None else f"{r.host_ram:g}"
        weights = r.precision + (", exact" if r.exact else "") + (f", {r.steps} steps" if r.steps != 4 else "")
        weights += f" | {row_speed.tflops:g}"
        if pc is None:
            t = plan.timing
            why = v.message.split(": ", 1)[1].split(" (largest", 1)[0]
            lines.append(f"| {r.gpus} | {mode} | {r.size} | {weights} | {limit} | none fits (closest: "
                         f"{placement_text(plan_pc(plan))}) | {plan.peak_device / GiB:.1f} | {plan.host_total / GiB:.1f} "
                         f"| {plan.traffic_per_forward / GiB:.1f} | {t.call_s:.3f} | {t.fps:.1f} | {why} |")
            continue
        t = plan.timing
        lines.append(f"| {r.gpus} | {mode} | {r.size} | {weights} | {limit} | {placement_text(pc)} "
                     f"| {plan.peak_device / GiB:.1f} | {plan.host_total / GiB:.1f} | {plan.traffic_per_forward / GiB:.1f} "
                     f"| {t.call_s:.3f} | {t.fps:.1f} | {limited_by(plan)} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bandwidth", type=float, default=SpeedModel.bandwidth_gbps, help="host->GPU GB/s")
    p.add_argument("--tflops", type=float, default=SpeedModel.tflops, help="sustained TFLOP/s")
    args = p.parse_args()
    speed = SpeedModel(args.bandwidth, args.tflops)
    print(f"assumptions: {speed.describe()}; host RAM not limited unless a limit is given\n")
    print(table(speed))


if __name__ == "__main__":
    main()
